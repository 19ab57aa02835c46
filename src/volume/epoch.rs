//! Grace periods for the I/O path, RCU-style.
//!
//! Every dispatched request enters the current epoch on its reactor (one
//! relaxed-cost increment on a counter line only that reactor writes) and
//! exits it when it completes. A writer of the map (the migration engine)
//! publishes a change, then calls [`Epochs::grace`]: it flips the global
//! epoch and waits until every reactor's count for the old epoch is zero.
//! Afterwards every request either saw the change or has completed. That is
//! what makes a lock, a shadow or a switch atomic with respect to in-flight
//! I/O, and what makes freeing the old space after a switch safe.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[repr(align(64))]
#[derive(Default)]
struct Line([AtomicU64; 2]);

pub struct Epochs {
    global: AtomicU64,
    reactors: Box<[Line]>,
    serial: Mutex<()>,
}

impl Epochs {
    pub fn new(reactors: usize) -> Epochs {
        Epochs {
            global: AtomicU64::new(0),
            reactors: (0..reactors.max(1)).map(|_| Line::default()).collect(),
            serial: Mutex::new(()),
        }
    }

    /// Enters the current epoch on `reactor`; returns the epoch bit to exit with.
    /// Must be called before reading the map for the request.
    #[inline]
    pub fn enter(&self, reactor: usize) -> u8 {
        let bit = (self.global.load(Ordering::SeqCst) & 1) as u8;
        self.reactors[reactor].0[bit as usize].fetch_add(1, Ordering::SeqCst);
        bit
    }

    #[inline]
    pub fn exit(&self, reactor: usize, bit: u8) {
        let prev = self.reactors[reactor].0[bit as usize].fetch_sub(1, Ordering::Release);
        debug_assert!(prev > 0, "epoch exit without enter");
    }

    /// Waits until every request dispatched before this call has completed.
    /// Returns false if `timeout` passed first (a hung device).
    pub fn grace(&self, timeout: Duration) -> bool {
        let _one_at_a_time = self.serial.lock().unwrap_or_else(|e| e.into_inner());
        let old = (self.global.fetch_add(1, Ordering::SeqCst) & 1) as usize;
        let deadline = Instant::now() + timeout;
        let mut spins = 0u32;
        loop {
            if self
                .reactors
                .iter()
                .all(|l| l.0[old].load(Ordering::SeqCst) == 0)
            {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            spins += 1;
            if spins < 100 {
                std::hint::spin_loop();
            } else {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn grace_waits_for_requests_of_the_old_epoch_only() {
        let e = Arc::new(Epochs::new(2));
        let old = e.enter(0);
        let e2 = e.clone();
        let t = std::thread::spawn(move || e2.grace(Duration::from_secs(5)));
        std::thread::sleep(Duration::from_millis(20));
        // A request entering after the flip does not hold the grace period up.
        let new = e.enter(1);
        assert_ne!(old, new);
        assert!(
            !t.is_finished(),
            "grace returned while an old request was in flight"
        );
        e.exit(0, old);
        assert!(t.join().unwrap());
        e.exit(1, new);
    }

    #[test]
    fn grace_times_out_on_a_stuck_request() {
        let e = Epochs::new(1);
        let _bit = e.enter(0);
        assert!(!e.grace(Duration::from_millis(10)));
    }
}
