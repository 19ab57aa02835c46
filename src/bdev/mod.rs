//! The block-device layer: a small trait in the spirit of SPDK's bdev function
//! table and cloud-hypervisor's `AsyncIo`.
//!
//! A [`BlockDevice`] is the shared description of a device (size, block size,
//! alignment). Each reactor opens its own [`IoChannel`] on it, the way SPDK
//! gives each thread its own I/O channel: the channel owns that reactor's
//! queues, so the hot path takes no lock. A caller submits requests tagged
//! with its own `u64`, calls [`IoChannel::submit_pending`] once per poll, and
//! reaps [`Completion`]s in batches.
//!
//! Backends live one per file: `null`, `malloc`, `uring`, `delay`, `error`, `mirror`,
//! `vfio_nvme` and `nvme_passthru` (both on the shared [`nvme`] command layer), `nvmf`
//! and `object` (S3-compatible object storage, the cold tier).
//! [`spec`] parses the device-spec grammar shared by the CLI, config and RPC.

pub mod delay;
pub mod error;
pub mod malloc;
pub mod mirror;
pub mod null;
pub mod nvme;
pub mod nvme_passthru;
pub mod nvmf;
pub mod object;
pub mod spec;
pub mod tests;
pub mod uring;
pub mod vfio_nvme;

use std::os::fd::RawFd;
use std::sync::Arc;

use crate::dma::DmaPool;

/// What a request does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoKind {
    Read,
    Write,
    Flush,
    WriteZeroes,
    Trim,
}

/// Sentinel for [`IoRequest::buf_index`]: the buffer is not a registered one.
pub const BUF_INDEX_NONE: u16 = u16::MAX;

/// One request. Offsets and lengths are in bytes and must be multiples of the
/// device's block size.
#[derive(Clone, Copy, Debug)]
pub struct IoRequest {
    /// The caller's tag, returned unchanged in the completion.
    pub tag: u64,
    pub kind: IoKind,
    pub offset_bytes: u64,
    pub len_bytes: u32,
    /// Data buffer for reads and writes; null otherwise.
    pub buf: *mut u8,
    /// Index of `buf` in the channel's registered buffer table, or [`BUF_INDEX_NONE`].
    pub buf_index: u16,
    /// Force unit access: the write is durable when it completes.
    pub fua: bool,
}

impl IoRequest {
    pub fn read(tag: u64, offset_bytes: u64, buf: *mut u8, len_bytes: u32, buf_index: u16) -> Self {
        IoRequest {
            tag,
            kind: IoKind::Read,
            offset_bytes,
            len_bytes,
            buf,
            buf_index,
            fua: false,
        }
    }

    pub fn write(
        tag: u64,
        offset_bytes: u64,
        buf: *mut u8,
        len_bytes: u32,
        buf_index: u16,
    ) -> Self {
        IoRequest {
            tag,
            kind: IoKind::Write,
            offset_bytes,
            len_bytes,
            buf,
            buf_index,
            fua: false,
        }
    }

    pub fn flush(tag: u64) -> Self {
        IoRequest {
            tag,
            kind: IoKind::Flush,
            offset_bytes: 0,
            len_bytes: 0,
            buf: std::ptr::null_mut(),
            buf_index: BUF_INDEX_NONE,
            fua: false,
        }
    }

    pub fn range(tag: u64, kind: IoKind, offset_bytes: u64, len_bytes: u32) -> Self {
        debug_assert!(matches!(kind, IoKind::WriteZeroes | IoKind::Trim));
        IoRequest {
            tag,
            kind,
            offset_bytes,
            len_bytes,
            buf: std::ptr::null_mut(),
            buf_index: BUF_INDEX_NONE,
            fua: false,
        }
    }
}

/// The result of one request: `result` is 0 on success or a negative errno.
/// `repr(C)`: the C ABI (`crate::ffi`) polls completions straight into C arrays.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[repr(C)]
pub struct Completion {
    pub tag: u64,
    pub result: i32,
}

/// Why a request was refused at submission (it never reaches the device).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SubmitError {
    /// The channel's queue is full: back off and retry after reaping.
    QueueFull,
    /// Offset or length not a multiple of the block size, or buffer misaligned.
    Misaligned,
    /// The range runs past the end of the device.
    OutOfRange,
    /// The device does not support this kind of request.
    Unsupported,
}

impl SubmitError {
    /// The errno a protocol target reports for this refusal.
    pub fn errno(self) -> i32 {
        match self {
            SubmitError::QueueFull => libc::EAGAIN,
            SubmitError::Misaligned | SubmitError::OutOfRange => libc::EINVAL,
            SubmitError::Unsupported => libc::EOPNOTSUPP,
        }
    }
}

impl std::fmt::Display for SubmitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let text = match self {
            SubmitError::QueueFull => "queue full",
            SubmitError::Misaligned => "offset, length or buffer not aligned to the block size",
            SubmitError::OutOfRange => "range past the end of the device",
            SubmitError::Unsupported => "operation not supported by the device",
        };
        f.write_str(text)
    }
}

/// Errors opening or creating a device.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeviceError {
    /// The spec did not parse; the message says where and why.
    BadSpec(String),
    /// The OS refused (open, mmap, io_uring set-up).
    Io(String),
}

impl std::fmt::Display for DeviceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceError::BadSpec(m) => write!(f, "bad device spec: {m}"),
            DeviceError::Io(m) => write!(f, "device error: {m}"),
        }
    }
}

impl std::error::Error for DeviceError {}

/// Static facts about a device.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    /// The spec it was opened from, e.g. `malloc:1GiB`.
    pub name: String,
    /// Backend name (`null`, `malloc`, `uring`, ...).
    pub product: &'static str,
    /// Logical block size in bytes: the unit of offsets and lengths.
    pub block_size: u32,
    pub num_blocks: u64,
    /// Required alignment of data buffers in bytes.
    pub buf_align: usize,
    /// Whether written data can be read back (false for `null`).
    pub persistent: bool,
    /// Whether a completed write is durable only after a flush.
    pub volatile_write_cache: bool,
}

impl DeviceInfo {
    pub fn size_bytes(&self) -> u64 {
        self.num_blocks * self.block_size as u64
    }

    /// Checks a request against the geometry. Backends call this in `submit`.
    #[inline]
    pub fn check(&self, req: &IoRequest) -> Result<(), SubmitError> {
        if req.kind == IoKind::Flush {
            return Ok(());
        }
        let bs = self.block_size as u64;
        if req.offset_bytes % bs != 0 || req.len_bytes as u64 % bs != 0 {
            return Err(SubmitError::Misaligned);
        }
        let end = req
            .offset_bytes
            .checked_add(req.len_bytes as u64)
            .ok_or(SubmitError::OutOfRange)?;
        if end > self.size_bytes() {
            return Err(SubmitError::OutOfRange);
        }
        if matches!(req.kind, IoKind::Read | IoKind::Write)
            && (req.buf as usize) % self.buf_align != 0
        {
            return Err(SubmitError::Misaligned);
        }
        Ok(())
    }
}

/// What a reactor passes when it opens a channel.
pub struct ChannelOptions<'a> {
    /// Requests the channel must be able to hold in flight.
    pub queue_depth: u32,
    /// The reactor's DMA pool; backends that can register buffers do so.
    pub pool: Option<&'a DmaPool>,
}

impl Default for ChannelOptions<'_> {
    fn default() -> Self {
        ChannelOptions {
            queue_depth: 128,
            pool: None,
        }
    }
}

/// A block device: shared, immutable description plus a factory of channels.
pub trait BlockDevice: Send + Sync {
    fn info(&self) -> &DeviceInfo;

    /// Opens this reactor's queue on the device.
    fn open_channel(&self, opts: &ChannelOptions<'_>) -> Result<Box<dyn IoChannel>, DeviceError>;

    /// The mirror behind this device, for its control plane (health, replace).
    fn as_mirror(&self) -> Option<&mirror::MirrorDevice> {
        None
    }

    /// For an object-storage tier, its shared state (uploads, deletes, health).
    /// Such a tier only serves reads through channels: see [`object`].
    fn object_tier(&self) -> Option<Arc<object::ObjectTier>> {
        None
    }
}

/// One reactor's queue on a device. Not shared between threads.
pub trait IoChannel {
    /// Queues one request.
    ///
    /// # Safety
    /// For reads and writes, `req.buf` must point to `req.len_bytes` bytes that
    /// stay valid and are not otherwise accessed until the completion for
    /// `req.tag` has been returned by [`IoChannel::poll_completions`].
    unsafe fn submit(&mut self, req: &IoRequest) -> Result<(), SubmitError>;

    /// Hands queued requests to the device. Called once per poll.
    fn submit_pending(&mut self) -> usize {
        0
    }

    /// Moves up to `out.len()` completions into `out`; returns how many.
    fn poll_completions(&mut self, out: &mut [Completion]) -> usize;

    /// Requests submitted and not yet returned as completions.
    fn inflight(&self) -> usize;

    /// An fd that becomes readable when completions are ready, for parking.
    fn notifier_fd(&self) -> Option<RawFd> {
        None
    }

    /// When the channel will next have a completion without any fd waking it
    /// (timers of emulated devices), in [`crate::clock::now_ns`] time.
    fn next_deadline_ns(&self) -> Option<u64> {
        None
    }
}

/// Opens a device from a spec string such as `malloc:1GiB` or `file:./a.img?size=4GiB`.
pub fn open(spec_text: &str) -> Result<Arc<dyn BlockDevice>, DeviceError> {
    let spec = spec::DeviceSpec::parse(spec_text)?;
    spec.open()
}

/// Submits one request and waits for it, off the hot path (metadata thread,
/// tools, tests). Sleeps on the channel's notifier fd or deadline rather than
/// spinning. Other completions that arrive meanwhile are a bug here: the
/// channel must be used by this caller only.
///
/// # Safety
/// As for [`IoChannel::submit`]; the buffer only needs to live until this returns.
pub unsafe fn submit_and_wait(chan: &mut dyn IoChannel, req: &IoRequest) -> i32 {
    loop {
        // SAFETY: the caller's obligations are passed through.
        match unsafe { chan.submit(req) } {
            Ok(()) => break,
            Err(SubmitError::QueueFull) => {
                let mut out = [Completion::default(); 1];
                chan.submit_pending();
                let _ = chan.poll_completions(&mut out);
                std::thread::yield_now();
            }
            Err(e) => return -e.errno(),
        }
    }
    let mut out = [Completion::default(); 1];
    loop {
        chan.submit_pending();
        if chan.poll_completions(&mut out) == 1 {
            assert_eq!(out[0].tag, req.tag, "submit_and_wait on a shared channel");
            return out[0].result;
        }
        let timeout_ms = match chan.next_deadline_ns() {
            Some(d) => (d.saturating_sub(crate::clock::now_ns()) / 1_000_000) as i32,
            None => 10,
        };
        match chan.notifier_fd() {
            Some(fd) => {
                let mut pfd = libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                unsafe { libc::poll(&mut pfd, 1, timeout_ms.clamp(0, 10)) };
            }
            None if timeout_ms > 0 => std::thread::sleep(std::time::Duration::from_micros(50)),
            None => std::hint::spin_loop(),
        }
    }
}
