//! The tiers every reactor's volume engine can reach, growable at run time.
//!
//! A tier added while serving (a volume migration's destination) is pushed here;
//! each engine notices the new count on its next poll (one relaxed load per
//! poll, no lock on the I/O path), opens its own channel on the device and
//! acknowledges. Nothing may map onto the tier before every engine has
//! acknowledged it ([`TierRegistry::wait_opened`]).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::bdev::BlockDevice;
use crate::metrics::Metrics;
use crate::reactor::ReactorHandle;

pub struct TierRegistry {
    count: AtomicUsize,
    tiers: Mutex<Vec<(String, Arc<dyn BlockDevice>)>>,
    /// Per reactor: how many tiers its engine has opened channels on.
    opened: Vec<AtomicUsize>,
    pub metrics: Arc<Metrics>,
}

impl TierRegistry {
    pub fn new(
        tiers: Vec<(String, Arc<dyn BlockDevice>)>,
        reactors: usize,
        metrics: Arc<Metrics>,
    ) -> TierRegistry {
        TierRegistry {
            count: AtomicUsize::new(tiers.len()),
            opened: (0..reactors)
                .map(|_| AtomicUsize::new(tiers.len()))
                .collect(),
            tiers: Mutex::new(tiers),
            metrics,
        }
    }

    /// Tiers registered so far.
    #[inline]
    pub fn count(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    pub fn name(&self, index: usize) -> Option<String> {
        self.tiers.lock().unwrap().get(index).map(|t| t.0.clone())
    }

    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.tiers.lock().unwrap().iter().position(|t| t.0 == name)
    }

    pub fn get(&self, index: usize) -> Option<(String, Arc<dyn BlockDevice>)> {
        self.tiers.lock().unwrap().get(index).cloned()
    }

    /// Registers the tier with index `index` (the journal's index; tiers arrive in order).
    pub fn add(&self, index: usize, name: String, device: Arc<dyn BlockDevice>) {
        let mut t = self.tiers.lock().unwrap();
        assert_eq!(
            index,
            t.len(),
            "runtime tiers are registered in index order"
        );
        t.push((name, device));
        self.count.store(t.len(), Ordering::Release);
    }

    /// An engine reports it has channels on `count` tiers.
    pub fn ack(&self, reactor: usize, count: usize) {
        if let Some(o) = self.opened.get(reactor) {
            o.store(count, Ordering::Release);
        }
    }

    /// Waits until every engine has opened tiers `[0, count)`, waking reactors so
    /// parked ones poll.
    pub fn wait_opened(
        &self,
        count: usize,
        reactors: &[ReactorHandle],
        limit: Duration,
    ) -> Result<(), String> {
        let deadline = Instant::now() + limit;
        while self
            .opened
            .iter()
            .any(|o| o.load(Ordering::Acquire) < count)
        {
            if Instant::now() > deadline {
                return Err(format!(
                    "a reactor did not open the new tier within {limit:?}"
                ));
            }
            for r in reactors {
                r.wake();
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(())
    }
}
