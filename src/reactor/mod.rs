//! Reactors: one pinned thread per configured core, each running a poll loop
//! over its registered pollers, as SPDK's `spdk_thread` does.
//!
//! - A [`Poller`] reports [`PollStatus::Busy`] when it did work and
//!   [`PollStatus::Idle`] when it found none.
//! - Other threads talk to a reactor only by message ([`ReactorHandle::send`]):
//!   a closure run on the reactor, drained in bounded batches per loop.
//! - [`PollMode::Busy`] spins forever. [`PollMode::Adaptive`] (the default)
//!   spins while there is work and, after `idle_spin_us` without any, parks
//!   in `epoll_wait` on every fd its pollers registered (sockets, io_uring
//!   rings), the message eventfd, and a timerfd for the earliest poller
//!   deadline. Any message, completion or packet wakes it.

mod idle;

pub use idle::Parker;

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender, TryRecvError};

use crate::clock::now_ns;
use crate::dma::DmaPool;

/// How a reactor waits when it has nothing to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PollMode {
    /// Spin forever: lowest latency, one full core per reactor.
    Busy,
    /// Spin while busy, park after `idle_spin_us` of idleness.
    Adaptive,
}

impl std::str::FromStr for PollMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "busy" => Ok(PollMode::Busy),
            "adaptive" => Ok(PollMode::Adaptive),
            _ => Err(format!("poll mode '{s}' is not 'busy' or 'adaptive'")),
        }
    }
}

/// What one poll found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PollStatus {
    Busy,
    Idle,
    /// The poller is finished and is removed.
    Done,
}

/// Everything a poller may use while it polls.
pub struct PollCtx<'a> {
    pub reactor_id: usize,
    pub pool: &'a mut DmaPool,
    pub parker: &'a Parker,
}

/// A unit of polled work owned by one reactor.
pub trait Poller {
    fn poll(&mut self, ctx: &mut PollCtx<'_>) -> PollStatus;

    /// The earliest time this poller needs to run again even if no fd fires.
    fn next_deadline_ns(&self) -> Option<u64> {
        None
    }
}

/// A message: a closure run on the reactor.
pub type Msg = Box<dyn FnOnce(&mut Reactor) + Send>;

/// Messages handled per loop iteration at most, so pollers are never starved.
pub const MSG_BATCH_MAX: usize = 64;

/// Settings shared by all reactors.
#[derive(Clone, Debug)]
pub struct ReactorConfig {
    pub mode: PollMode,
    /// Spin this long with no work before parking (adaptive mode).
    pub idle_spin_us: u64,
    /// DMA pool per reactor: buffer size and count.
    pub dma_buf_bytes: usize,
    pub dma_buf_count: usize,
}

impl Default for ReactorConfig {
    fn default() -> Self {
        ReactorConfig {
            mode: PollMode::Adaptive,
            idle_spin_us: 20,
            dma_buf_bytes: 128 << 10,
            dma_buf_count: 512,
        }
    }
}

/// Counters a reactor publishes for metrics and tests.
#[derive(Default, Debug)]
pub struct ReactorStats {
    pub loops: AtomicU64,
    pub busy_loops: AtomicU64,
    pub parks: AtomicU64,
    pub messages: AtomicU64,
}

/// A cloneable, sendable handle to a reactor.
#[derive(Clone)]
pub struct ReactorHandle {
    pub id: usize,
    pub core: Option<usize>,
    tx: Sender<Msg>,
    parker: Arc<idle::Waker>,
    pub stats: Arc<ReactorStats>,
}

impl ReactorHandle {
    /// Runs `f` on the reactor. Returns false if the reactor has stopped.
    pub fn send(&self, f: impl FnOnce(&mut Reactor) + Send + 'static) -> bool {
        let ok = self.tx.send(Box::new(f)).is_ok();
        self.parker.wake();
        ok
    }

    /// Wakes the reactor if it is parked (after feeding one of its own queues).
    #[inline]
    pub fn wake(&self) {
        self.parker.wake();
    }

    /// Runs `f` on the reactor and waits for its result.
    pub fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Reactor) -> R + Send + 'static,
    ) -> Option<R> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        if !self.send(move |r| {
            let _ = tx.send(f(r));
        }) {
            return None;
        }
        rx.recv().ok()
    }

    /// Adds a poller built on the reactor itself (so it may hold non-Send state).
    pub fn add_poller<F>(&self, build: F) -> bool
    where
        F: FnOnce(&mut Reactor) -> Box<dyn Poller> + Send + 'static,
    {
        self.send(move |r| {
            let p = build(r);
            r.pollers.push(p);
        })
    }

    /// Asks the reactor to stop after the current loop.
    pub fn stop(&self) {
        self.send(|r| r.stop = true);
    }
}

/// The state owned by one reactor thread.
pub struct Reactor {
    pub id: usize,
    pub core: Option<usize>,
    pub config: ReactorConfig,
    pub pool: DmaPool,
    pub parker: Parker,
    pollers: Vec<Box<dyn Poller>>,
    rx: Receiver<Msg>,
    stop: bool,
    stats: Arc<ReactorStats>,
}

impl Reactor {
    /// Creates a reactor to be driven on the current thread (tests, `kiln sim`).
    pub fn new(
        id: usize,
        core: Option<usize>,
        config: ReactorConfig,
    ) -> std::io::Result<(Reactor, ReactorHandle)> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let parker = Parker::new()?;
        let stats = Arc::new(ReactorStats::default());
        let handle = ReactorHandle {
            id,
            core,
            tx,
            parker: parker.waker(),
            stats: stats.clone(),
        };
        let pool = DmaPool::new(config.dma_buf_bytes, config.dma_buf_count)?;
        Ok((
            Reactor {
                id,
                core,
                config,
                pool,
                parker,
                pollers: Vec::new(),
                rx,
                stop: false,
                stats,
            },
            handle,
        ))
    }

    pub fn add_poller(&mut self, p: Box<dyn Poller>) {
        self.pollers.push(p);
    }

    pub fn request_stop(&mut self) {
        self.stop = true;
    }

    /// Registers an fd whose readability should wake a parked reactor.
    pub fn watch_fd(&self, fd: RawFd) -> std::io::Result<()> {
        self.parker.watch(fd)
    }

    /// One loop iteration: messages, then every poller. Returns whether anything was busy.
    pub fn poll_once(&mut self) -> bool {
        let mut busy = false;
        for _ in 0..MSG_BATCH_MAX {
            match self.rx.try_recv() {
                Ok(msg) => {
                    msg(self);
                    busy = true;
                    self.stats.messages.fetch_add(1, Ordering::Relaxed);
                }
                Err(TryRecvError::Empty) | Err(TryRecvError::Disconnected) => break,
            }
        }
        let mut ctx = PollCtx {
            reactor_id: self.id,
            pool: &mut self.pool,
            parker: &self.parker,
        };
        let mut i = 0;
        while i < self.pollers.len() {
            match self.pollers[i].poll(&mut ctx) {
                PollStatus::Busy => busy = true,
                PollStatus::Idle => {}
                PollStatus::Done => {
                    self.pollers.swap_remove(i);
                    busy = true;
                    continue;
                }
            }
            i += 1;
        }
        // Every poller has seen the fds that fired during the last park.
        self.parker.clear_fired();
        busy
    }

    /// Whether a stop was requested.
    pub fn stopping(&self) -> bool {
        self.stop
    }

    /// Number of registered pollers.
    pub fn poller_count(&self) -> usize {
        self.pollers.len()
    }

    /// Runs until stopped.
    ///
    /// Adaptive parking keeps an EWMA of how long idle gaps last. Spinning only
    /// pays when work usually returns well within the spin budget (gaps under
    /// half of it); when gaps are longer (a device at moderate load, a client
    /// at a fixed rate), the reactor parks at once instead of burning the
    /// budget on every gap.
    pub fn run(&mut self) {
        let idle_spin_ns = self.config.idle_spin_us * 1000;
        let mut idle_since_ns = 0u64;
        let mut gap_ewma_ns = 0u64;
        let stats = self.stats.clone();
        let mut loops = 0u64;
        while !self.stop {
            let busy = self.poll_once();
            loops += 1;
            if loops & 1023 == 0 {
                stats.loops.fetch_add(1024, Ordering::Relaxed);
            }
            if busy {
                if idle_since_ns != 0 {
                    let gap = now_ns().saturating_sub(idle_since_ns);
                    gap_ewma_ns = (gap_ewma_ns * 7 + gap) / 8;
                    idle_since_ns = 0;
                }
                continue;
            }
            if self.config.mode == PollMode::Busy {
                continue;
            }
            let now = now_ns();
            if idle_since_ns == 0 {
                idle_since_ns = now;
            }
            let spin_limit_ns = if gap_ewma_ns > idle_spin_ns / 2 {
                0
            } else {
                idle_spin_ns
            };
            if now - idle_since_ns < spin_limit_ns {
                std::hint::spin_loop();
                continue;
            }
            let deadline = self
                .pollers
                .iter()
                .filter_map(|p| p.next_deadline_ns())
                .min();
            if deadline.is_some_and(|d| d <= now) {
                continue;
            }
            stats.parks.fetch_add(1, Ordering::Relaxed);
            let rx = &self.rx;
            self.parker.park(deadline, || !rx.is_empty());
        }
        stats.loops.fetch_add(loops & 1023, Ordering::Relaxed);
    }
}

/// A set of running reactor threads.
pub struct Reactors {
    pub handles: Vec<ReactorHandle>,
    threads: Vec<JoinHandle<()>>,
    stopped: Arc<AtomicBool>,
}

impl Reactors {
    /// Starts one reactor per entry of `cores`, pinned to that core.
    pub fn start(cores: &[usize], config: &ReactorConfig) -> std::io::Result<Reactors> {
        let available: Vec<usize> = core_affinity::get_core_ids()
            .unwrap_or_default()
            .into_iter()
            .map(|c| c.id)
            .collect();
        let mut handles = Vec::new();
        let mut threads = Vec::new();
        for (id, &core) in cores.iter().enumerate() {
            if !available.is_empty() && !available.contains(&core) {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!(
                        "core {core} is not available to this process (available: {available:?})"
                    ),
                ));
            }
            let (ready_tx, ready_rx) = crossbeam_channel::bounded(1);
            let config = config.clone();
            let thread = std::thread::Builder::new()
                .name(format!("reactor{id}"))
                .spawn(move || {
                    let pinned = core_affinity::set_for_current(core_affinity::CoreId { id: core });
                    if !pinned {
                        tracing::warn!(reactor = id, core, "could not pin reactor to its core");
                    }
                    match Reactor::new(id, Some(core), config) {
                        Ok((mut reactor, handle)) => {
                            let _ = ready_tx.send(Ok(handle));
                            reactor.run();
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                        }
                    }
                })?;
            let handle = ready_rx
                .recv()
                .map_err(|_| std::io::Error::other("reactor thread died during start"))??;
            handles.push(handle);
            threads.push(thread);
        }
        Ok(Reactors {
            handles,
            threads,
            stopped: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Stops every reactor and joins its thread.
    pub fn shutdown(&mut self) {
        if self.stopped.swap(true, Ordering::SeqCst) {
            return;
        }
        for h in &self.handles {
            h.stop();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Reactors {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests;
