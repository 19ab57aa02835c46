//! `error:RATE,SEED[,mode=eio|torn|corrupt][,lba=FIRST-LAST]:INNER`: wraps any
//! device and injects faults, for tests and failure drills.
//!
//! Each read or write (in the LBA range, if one is given) draws from a seeded
//! xorshift generator; with probability RATE it is faulted:
//! - `eio`: the request completes with `-EIO` (a write does not reach the media);
//! - `torn`: a write reports success but only its first half reaches the media;
//! - `corrupt`: a read reports success with one byte flipped.
//!
//! The fault switch can be flipped at run time ([`ErrorDevice::set_enabled`]),
//! so a test can fail one mirror leg mid-run.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use super::spec::FaultMode;
use super::{
    BlockDevice, ChannelOptions, Completion, DeviceError, DeviceInfo, IoChannel, IoKind, IoRequest,
    SubmitError,
};

pub struct ErrorDevice {
    info: DeviceInfo,
    inner: Arc<dyn BlockDevice>,
    rate: f64,
    seed: u64,
    mode: FaultMode,
    lba_range: Option<(u64, u64)>,
    enabled: Arc<AtomicBool>,
    injected: Arc<AtomicU64>,
    channels_opened: AtomicU64,
}

impl ErrorDevice {
    pub fn new(
        name: String,
        inner: Arc<dyn BlockDevice>,
        rate: f64,
        seed: u64,
        mode: FaultMode,
        lba_range: Option<(u64, u64)>,
    ) -> ErrorDevice {
        let mut info = inner.info().clone();
        info.name = name;
        info.product = "error";
        ErrorDevice {
            info,
            inner,
            rate,
            seed,
            mode,
            lba_range,
            enabled: Arc::new(AtomicBool::new(true)),
            injected: Arc::new(AtomicU64::new(0)),
            channels_opened: AtomicU64::new(0),
        }
    }

    /// Turns injection on or off for every channel.
    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::Relaxed);
    }

    /// Faults injected so far.
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::Relaxed)
    }
}

/// Every `error` device opened by this process, so the control plane can
/// switch injection on and off by name (`bdev_error_inject`).
static REGISTRY: std::sync::Mutex<Vec<std::sync::Weak<ErrorDevice>>> =
    std::sync::Mutex::new(Vec::new());

/// Records `dev` in the registry.
pub fn register(dev: &Arc<ErrorDevice>) {
    let mut r = REGISTRY.lock().unwrap();
    r.retain(|w| w.strong_count() > 0);
    r.push(Arc::downgrade(dev));
}

/// Switches injection on every registered device whose name contains `pattern`;
/// returns the names it touched.
pub fn set_enabled_matching(pattern: &str, on: bool) -> Vec<String> {
    let r = REGISTRY.lock().unwrap();
    r.iter()
        .filter_map(|w| w.upgrade())
        .filter(|d| d.info.name.contains(pattern))
        .map(|d| {
            d.set_enabled(on);
            d.info.name.clone()
        })
        .collect()
}

impl BlockDevice for ErrorDevice {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn open_channel(&self, opts: &ChannelOptions<'_>) -> Result<Box<dyn IoChannel>, DeviceError> {
        let capacity = opts.queue_depth.max(1) as usize;
        let n = self.channels_opened.fetch_add(1, Ordering::Relaxed);
        let threshold = (self.rate * u64::MAX as f64) as u64;
        Ok(Box::new(ErrorChannel {
            inner: self.inner.open_channel(opts)?,
            rng: (self.seed ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1,
            threshold,
            always: self.rate >= 1.0,
            mode: self.mode,
            lba_range: self.lba_range,
            block_size: self.info.block_size as u64,
            enabled: self.enabled.clone(),
            injected: self.injected.clone(),
            failed: VecDeque::with_capacity(capacity),
            corrupt_reads: Vec::with_capacity(capacity),
            capacity,
        }))
    }
}

struct ErrorChannel {
    inner: Box<dyn IoChannel>,
    rng: u64,
    threshold: u64,
    always: bool,
    mode: FaultMode,
    lba_range: Option<(u64, u64)>,
    block_size: u64,
    enabled: Arc<AtomicBool>,
    injected: Arc<AtomicU64>,
    /// Requests failed without reaching the inner device.
    failed: VecDeque<Completion>,
    /// Reads to corrupt on completion: (tag, buffer).
    corrupt_reads: Vec<(u64, *mut u8)>,
    capacity: usize,
}

impl ErrorChannel {
    fn draw(&mut self, req: &IoRequest) -> bool {
        if !self.enabled.load(Ordering::Relaxed)
            || !matches!(req.kind, IoKind::Read | IoKind::Write)
        {
            return false;
        }
        if let Some((first, last)) = self.lba_range {
            let lba0 = req.offset_bytes / self.block_size;
            let lba1 = lba0 + (req.len_bytes as u64 / self.block_size).max(1) - 1;
            if lba1 < first || lba0 > last {
                return false;
            }
        }
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.always || self.rng < self.threshold
    }
}

impl IoChannel for ErrorChannel {
    unsafe fn submit(&mut self, req: &IoRequest) -> Result<(), SubmitError> {
        if self.inflight() >= self.capacity {
            return Err(SubmitError::QueueFull);
        }
        if !self.draw(req) {
            // SAFETY: forwarded unchanged; the caller's obligations carry over.
            return unsafe { self.inner.submit(req) };
        }
        match (self.mode, req.kind) {
            (FaultMode::Eio, _) => {
                self.failed.push_back(Completion {
                    tag: req.tag,
                    result: -libc::EIO,
                });
            }
            (FaultMode::Torn, IoKind::Write) => {
                let mut torn = *req;
                let bs = self.block_size as u32;
                torn.len_bytes = (req.len_bytes / 2 / bs * bs).max(bs.min(req.len_bytes));
                if torn.len_bytes == req.len_bytes {
                    // A one-block write cannot tear at block granularity: drop it instead.
                    self.failed.push_back(Completion {
                        tag: req.tag,
                        result: 0,
                    });
                } else {
                    // SAFETY: a prefix of the caller's buffer, still covered by its obligations.
                    unsafe { self.inner.submit(&torn)? };
                }
            }
            (FaultMode::Corrupt, IoKind::Read) => {
                // SAFETY: forwarded unchanged.
                unsafe { self.inner.submit(req)? };
                self.corrupt_reads.push((req.tag, req.buf));
            }
            // SAFETY: forwarded unchanged.
            _ => return unsafe { self.inner.submit(req) },
        }
        self.injected.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn submit_pending(&mut self) -> usize {
        self.inner.submit_pending()
    }

    fn poll_completions(&mut self, out: &mut [Completion]) -> usize {
        let mut n = 0;
        while n < out.len() {
            let Some(c) = self.failed.pop_front() else {
                break;
            };
            out[n] = c;
            n += 1;
        }
        let got = self.inner.poll_completions(&mut out[n..]);
        if !self.corrupt_reads.is_empty() {
            for c in &out[n..n + got] {
                if let Some(i) = self.corrupt_reads.iter().position(|(t, _)| *t == c.tag) {
                    let (_, buf) = self.corrupt_reads.swap_remove(i);
                    if c.result == 0 {
                        // SAFETY: the read completed into the caller's buffer, which is valid for
                        // at least one byte and not yet handed back to the caller.
                        unsafe { *buf ^= 0x5a };
                    }
                }
            }
        }
        n + got
    }

    fn inflight(&self) -> usize {
        self.inner.inflight() + self.failed.len()
    }

    fn notifier_fd(&self) -> Option<std::os::fd::RawFd> {
        self.inner.notifier_fd()
    }

    fn next_deadline_ns(&self) -> Option<u64> {
        if self.failed.is_empty() {
            self.inner.next_deadline_ns()
        } else {
            Some(0)
        }
    }
}
