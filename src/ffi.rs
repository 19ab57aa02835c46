//! A C ABI over the block-device layer, for C code that runs kiln devices in its own
//! threads: the fio external ioengine in `native/` (declared in `native/kiln.h`).
//!
//! The objects mirror the Rust ones:
//! - [`KilnDevice`]: one handle on a device opened from a spec (`malloc:1G`, `file:...`,
//!   anything [`crate::bdev::spec`] parses). Handles on the same spec text share one device
//!   within a process, so every fio job (thread) on `malloc:256M` sees the same RAM.
//! - [`KilnDma`]: a region of DMA buffers ([`DmaPool`]); the caller carves its own I/O
//!   buffers out of it, and channels opened with it register it (io_uring fixed buffers),
//!   so data moves between the device and the caller's buffers with no copy.
//! - [`KilnChannel`]: one thread's queue on a device ([`IoChannel`]). Not thread-safe and
//!   needs no lock: each thread opens its own.
//!
//! Handles are boxed Rust objects behind opaque pointers. Errors on open come back as a
//! null pointer plus a one-line message in the caller's buffer; errors on submit as a
//! negative errno. Nothing on the submit / submit-pending / poll path allocates.

use std::ffi::{c_char, c_int, CStr};
use std::sync::{Arc, Mutex, Weak};

use crate::bdev::{
    BlockDevice, ChannelOptions, Completion, IoChannel, IoKind, IoRequest, BUF_INDEX_NONE,
};
use crate::dma::DmaPool;

/// `op` values of [`kiln_channel_submit`] (`KILN_OP_*` in `native/kiln.h`).
pub const KILN_OP_READ: u32 = 0;
pub const KILN_OP_WRITE: u32 = 1;
pub const KILN_OP_FLUSH: u32 = 2;
pub const KILN_OP_WRITE_ZEROES: u32 = 3;
pub const KILN_OP_TRIM: u32 = 4;

// `struct kiln_completion` in native/kiln.h: { uint64_t tag; int32_t result; } (16 bytes).
const _: () = assert!(std::mem::size_of::<Completion>() == 16);
const _: () = assert!(std::mem::align_of::<Completion>() == 8);
const _: () = assert!(std::mem::offset_of!(Completion, tag) == 0);
const _: () = assert!(std::mem::offset_of!(Completion, result) == 8);

/// One handle on a shared device.
pub struct KilnDevice {
    dev: Arc<dyn BlockDevice>,
}

/// A region of DMA buffers, shared by the channels that registered it.
pub struct KilnDma {
    pool: Arc<DmaPool>,
}

/// One thread's queue on a device.
pub struct KilnChannel {
    // Dropped first: the channel's registration refers to the pool and the device.
    chan: Box<dyn IoChannel>,
    /// The registered region: base address, length, bytes per buffer, and the pool
    /// itself (kept alive while the channel may use it).
    dma: Option<(usize, usize, usize, Arc<DmaPool>)>,
    _dev: Arc<dyn BlockDevice>,
}

/// Devices open in this process, by spec text, so that every handle on one spec shares
/// one device. Touched only by open and close, never on the I/O path.
static DEVICES: Mutex<Vec<(String, Weak<dyn BlockDevice>)>> = Mutex::new(Vec::new());

/// Copies `msg` into the caller's buffer (truncated, NUL-terminated).
fn write_error(err: *mut c_char, err_len: usize, msg: &str) {
    if err.is_null() || err_len == 0 {
        return;
    }
    let n = msg.len().min(err_len - 1);
    // SAFETY: the caller passes a writable buffer of err_len bytes; we write n + 1 <= err_len.
    unsafe {
        std::ptr::copy_nonoverlapping(msg.as_ptr(), err as *mut u8, n);
        *err.add(n) = 0;
    }
}

/// The spec text behind a C string, or a message saying why there is none.
fn spec_text<'a>(spec: *const c_char) -> Result<&'a str, String> {
    if spec.is_null() {
        return Err("device spec is a null pointer".to_string());
    }
    // SAFETY: the caller passes a NUL-terminated string that outlives this call.
    let spec = unsafe { CStr::from_ptr(spec) };
    spec.to_str()
        .map_err(|_| format!("device spec {spec:?} is not UTF-8"))
}

/// Whether `spec` parses as a device spec (nothing is opened). The fio engine uses it to
/// rejoin a spec that fio split at its `:` file-name separator.
#[no_mangle]
pub extern "C" fn kiln_spec_valid(spec: *const c_char) -> bool {
    spec_text(spec)
        .map(|s| crate::bdev::spec::DeviceSpec::parse(s).is_ok())
        .unwrap_or(false)
}

fn open_shared(spec: &str) -> Result<Arc<dyn BlockDevice>, String> {
    let mut devices = DEVICES.lock().unwrap_or_else(|e| e.into_inner());
    devices.retain(|(_, weak)| weak.strong_count() > 0);
    if let Some(dev) = devices
        .iter()
        .find(|(s, _)| s == spec)
        .and_then(|(_, weak)| weak.upgrade())
    {
        return Ok(dev);
    }
    let dev = std::panic::catch_unwind(|| crate::bdev::open(spec))
        .map_err(|_| format!("{spec}: opening the device panicked"))?
        .map_err(|e| e.to_string())?;
    devices.push((spec.to_string(), Arc::downgrade(&dev)));
    Ok(dev)
}

/// Opens (or shares) the device `spec`. Returns null and a message in `err` on failure.
#[no_mangle]
pub extern "C" fn kiln_device_open(
    spec: *const c_char,
    err: *mut c_char,
    err_len: usize,
) -> *mut KilnDevice {
    match spec_text(spec).and_then(open_shared) {
        Ok(dev) => Box::into_raw(Box::new(KilnDevice { dev })),
        Err(msg) => {
            write_error(err, err_len, &msg);
            std::ptr::null_mut()
        }
    }
}

/// Borrows the device behind a handle.
///
/// # Safety
/// `dev` is a live handle from [`kiln_device_open`].
unsafe fn device<'a>(dev: *const KilnDevice) -> &'a KilnDevice {
    assert!(!dev.is_null(), "null kiln device handle");
    // SAFETY: the caller passes a live handle (see above).
    unsafe { &*dev }
}

/// Size of the device in bytes.
///
/// # Safety
/// `dev` is a live handle from [`kiln_device_open`].
#[no_mangle]
pub unsafe extern "C" fn kiln_device_size_bytes(dev: *const KilnDevice) -> u64 {
    // SAFETY: passed through from the caller.
    unsafe { device(dev) }.dev.info().size_bytes()
}

/// Logical block size: offsets and lengths must be multiples of it.
///
/// # Safety
/// `dev` is a live handle from [`kiln_device_open`].
#[no_mangle]
pub unsafe extern "C" fn kiln_device_block_size(dev: *const KilnDevice) -> u32 {
    // SAFETY: passed through from the caller.
    unsafe { device(dev) }.dev.info().block_size
}

/// Releases a handle; the device closes when its last handle and channel are gone.
///
/// # Safety
/// `dev` is null or a live handle from [`kiln_device_open`], not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn kiln_device_close(dev: *mut KilnDevice) {
    if !dev.is_null() {
        // SAFETY: the handle came from Box::into_raw in kiln_device_open and is given back once.
        drop(unsafe { Box::from_raw(dev) });
    }
}

/// A DMA region of at least `bytes_min` bytes made of buffers of `buf_bytes` (rounded up
/// to 4 KiB), page aligned; hugepages when the system has them.
#[no_mangle]
pub extern "C" fn kiln_dma_create(
    bytes_min: usize,
    buf_bytes: usize,
    err: *mut c_char,
    err_len: usize,
) -> *mut KilnDma {
    let buf_bytes = buf_bytes.max(4096).next_multiple_of(4096);
    let count = bytes_min.div_ceil(buf_bytes).max(1);
    if count >= u16::MAX as usize {
        write_error(
            err,
            err_len,
            &format!("DMA region of {bytes_min} bytes needs {count} buffers of {buf_bytes} bytes (at most 65534)"),
        );
        return std::ptr::null_mut();
    }
    match DmaPool::new(buf_bytes, count) {
        Ok(pool) => Box::into_raw(Box::new(KilnDma {
            pool: Arc::new(pool),
        })),
        Err(e) => {
            write_error(
                err,
                err_len,
                &format!("cannot map a DMA region of {count} x {buf_bytes} bytes: {e}"),
            );
            std::ptr::null_mut()
        }
    }
}

/// Base address of the region; its length in bytes goes to `*len` (if not null).
///
/// # Safety
/// `dma` is a live handle from [`kiln_dma_create`]; `len` is null or writable.
#[no_mangle]
pub unsafe extern "C" fn kiln_dma_base(dma: *const KilnDma, len: *mut usize) -> *mut u8 {
    assert!(!dma.is_null(), "null kiln DMA handle");
    // SAFETY: the caller passes a live handle.
    let (base, bytes) = unsafe { &*dma }.pool.region();
    if !len.is_null() {
        // SAFETY: the caller passes a writable usize.
        unsafe { *len = bytes };
    }
    base as *mut u8
}

/// Releases the caller's handle. Channels that registered the region keep it mapped until
/// they close.
///
/// # Safety
/// `dma` is null or a live handle from [`kiln_dma_create`], not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn kiln_dma_destroy(dma: *mut KilnDma) {
    if !dma.is_null() {
        // SAFETY: the handle came from Box::into_raw in kiln_dma_create and is given back once.
        drop(unsafe { Box::from_raw(dma) });
    }
}

/// Opens this thread's channel on `dev`, holding up to `queue_depth` requests. With a
/// DMA region, requests whose buffer lies inside one of its buffers use it as a
/// registered (fixed) buffer. Returns null and a message in `err` on failure.
///
/// # Safety
/// `dev` is a live device handle; `dma` is null or a live DMA handle.
#[no_mangle]
pub unsafe extern "C" fn kiln_channel_open(
    dev: *const KilnDevice,
    dma: *const KilnDma,
    queue_depth: u32,
    err: *mut c_char,
    err_len: usize,
) -> *mut KilnChannel {
    // SAFETY: passed through from the caller.
    let dev = unsafe { device(dev) }.dev.clone();
    let pool = if dma.is_null() {
        None
    } else {
        // SAFETY: the caller passes a live DMA handle.
        Some(unsafe { &*dma }.pool.clone())
    };
    let opts = ChannelOptions {
        queue_depth: queue_depth.max(1),
        pool: pool.as_deref(),
    };
    match dev.open_channel(&opts) {
        Ok(chan) => {
            let dma = pool.map(|p| {
                let (base, len) = p.region();
                (base as usize, len, p.buf_bytes(), p)
            });
            Box::into_raw(Box::new(KilnChannel {
                chan,
                dma,
                _dev: dev,
            }))
        }
        Err(e) => {
            write_error(err, err_len, &format!("{}: {e}", dev.info().name));
            std::ptr::null_mut()
        }
    }
}

/// Queues one request tagged `tag`; it reaches the device at the next
/// [`kiln_channel_submit_pending`]. Returns 0, or a negative errno: `-EAGAIN` when the
/// queue is full (reap completions, then retry), `-EINVAL` for a misaligned or
/// out-of-range request, `-EOPNOTSUPP` for an operation the device lacks.
///
/// # Safety
/// `chan` is a live channel used only by this thread. For reads and writes, `buf` points
/// to `len` bytes that stay valid and untouched until the completion for `tag` is polled.
#[no_mangle]
pub unsafe extern "C" fn kiln_channel_submit(
    chan: *mut KilnChannel,
    op: u32,
    offset: u64,
    len: u32,
    buf: *mut u8,
    tag: u64,
) -> c_int {
    debug_assert!(!chan.is_null());
    // SAFETY: the caller passes a live channel that no other thread uses.
    let ch = unsafe { &mut *chan };
    let kind = match op {
        KILN_OP_READ => IoKind::Read,
        KILN_OP_WRITE => IoKind::Write,
        KILN_OP_FLUSH => IoKind::Flush,
        KILN_OP_WRITE_ZEROES => IoKind::WriteZeroes,
        KILN_OP_TRIM => IoKind::Trim,
        _ => return -libc::EINVAL,
    };
    let mut buf_index = BUF_INDEX_NONE;
    if let Some((base, region_len, buf_bytes, _)) = ch.dma {
        let start = (buf as usize).wrapping_sub(base);
        if start < region_len {
            let index = start / buf_bytes;
            // A fixed buffer only when the whole transfer stays inside one pool buffer.
            if start + len as usize <= (index + 1) * buf_bytes {
                buf_index = index as u16;
            }
        }
    }
    let req = IoRequest {
        tag,
        kind,
        offset_bytes: offset,
        len_bytes: len,
        buf: if matches!(kind, IoKind::Read | IoKind::Write) {
            buf
        } else {
            std::ptr::null_mut()
        },
        buf_index: if matches!(kind, IoKind::Read | IoKind::Write) {
            buf_index
        } else {
            BUF_INDEX_NONE
        },
        fua: false,
    };
    // SAFETY: the caller keeps the buffer valid until the completion (contract above).
    match unsafe { ch.chan.submit(&req) } {
        Ok(()) => 0,
        Err(e) => -e.errno(),
    }
}

/// Hands queued requests to the device (one doorbell / `io_uring_enter` per batch).
/// Returns how many were handed over.
///
/// # Safety
/// `chan` is a live channel used only by this thread.
#[no_mangle]
pub unsafe extern "C" fn kiln_channel_submit_pending(chan: *mut KilnChannel) -> u32 {
    // SAFETY: the caller passes a live channel that no other thread uses.
    unsafe { &mut *chan }.chan.submit_pending() as u32
}

/// Moves up to `max` completions into `out`; returns how many. Each carries the request's
/// tag and 0 or a negative errno.
///
/// # Safety
/// `chan` is a live channel used only by this thread; `out` points to `max` writable
/// `struct kiln_completion`s.
#[no_mangle]
pub unsafe extern "C" fn kiln_channel_poll(
    chan: *mut KilnChannel,
    out: *mut Completion,
    max: u32,
) -> u32 {
    if max == 0 {
        return 0;
    }
    // SAFETY: the caller passes a live channel that no other thread uses.
    let ch = unsafe { &mut *chan };
    // SAFETY: the caller passes `max` writable completions; Completion is repr(C) and
    // matches struct kiln_completion (checked by the const assertions above).
    let out = unsafe { std::slice::from_raw_parts_mut(out, max as usize) };
    ch.chan.poll_completions(out) as u32
}

/// Requests submitted on the channel and not yet polled.
///
/// # Safety
/// `chan` is a live channel used only by this thread.
#[no_mangle]
pub unsafe extern "C" fn kiln_channel_inflight(chan: *const KilnChannel) -> u32 {
    // SAFETY: the caller passes a live channel.
    unsafe { &*chan }.chan.inflight() as u32
}

/// An fd that becomes readable when completions are ready (for sleeping instead of
/// spinning), or -1 when the device has none.
///
/// # Safety
/// `chan` is a live channel.
#[no_mangle]
pub unsafe extern "C" fn kiln_channel_notifier_fd(chan: *const KilnChannel) -> c_int {
    // SAFETY: the caller passes a live channel.
    unsafe { &*chan }.chan.notifier_fd().unwrap_or(-1)
}

/// Closes a channel. Requests still in flight are waited for (at most 10 s) and their
/// completions dropped, so no device writes into buffers the caller is about to free.
/// Returns how many requests were still in flight when it gave up waiting (0 normally).
///
/// # Safety
/// `chan` is null or a live channel, not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn kiln_channel_close(chan: *mut KilnChannel) -> u32 {
    if chan.is_null() {
        return 0;
    }
    // SAFETY: the handle came from Box::into_raw in kiln_channel_open and is given back once.
    let mut ch = unsafe { Box::from_raw(chan) };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut sink = [Completion::default(); 32];
    while ch.chan.inflight() > 0 && std::time::Instant::now() < deadline {
        ch.chan.submit_pending();
        if ch.chan.poll_completions(&mut sink) == 0 {
            std::thread::sleep(std::time::Duration::from_micros(100));
        }
    }
    let left = ch.chan.inflight() as u32;
    if left > 0 {
        // Leak the channel (and with it the pool) rather than free memory a device may
        // still write.
        std::mem::forget(ch);
    }
    left
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(spec: &str) -> *mut KilnDevice {
        let spec = std::ffi::CString::new(spec).unwrap();
        let mut err = [0 as c_char; 256];
        let dev = kiln_device_open(spec.as_ptr(), err.as_mut_ptr(), err.len());
        if dev.is_null() {
            // SAFETY: kiln_device_open NUL-terminated its message in `err`.
            panic!("{:?}", unsafe { CStr::from_ptr(err.as_ptr()) });
        }
        dev
    }

    /// Submits, rings and polls until the one completion arrives.
    unsafe fn io(ch: *mut KilnChannel, op: u32, offset: u64, buf: *mut u8, len: u32) -> i32 {
        // SAFETY: passed through from the caller.
        let rc = unsafe { kiln_channel_submit(ch, op, offset, len, buf, 7) };
        assert_eq!(rc, 0);
        let mut out = [Completion::default(); 4];
        loop {
            // SAFETY: as above; `out` holds 4 completions.
            unsafe { kiln_channel_submit_pending(ch) };
            // SAFETY: as above.
            if unsafe { kiln_channel_poll(ch, out.as_mut_ptr(), 4) } == 1 {
                assert_eq!(out[0].tag, 7);
                return out[0].result;
            }
        }
    }

    #[test]
    fn one_spec_is_one_device_and_buffers_come_from_the_dma_region() {
        let (a, b) = (open("malloc:1MiB"), open("malloc:1MiB"));
        // SAFETY: live handles; every buffer below lies inside the DMA region, which
        // outlives the I/O (each call waits for its completion).
        unsafe {
            assert_eq!(kiln_device_size_bytes(a), 1 << 20);
            let dma = kiln_dma_create(3 * 8192, 8192, std::ptr::null_mut(), 0);
            assert!(!dma.is_null());
            let mut len = 0;
            let base = kiln_dma_base(dma, &mut len);
            assert!(len >= 3 * 8192 && base as usize % 4096 == 0);
            let (ca, cb) = (
                kiln_channel_open(a, dma, 4, std::ptr::null_mut(), 0),
                kiln_channel_open(b, dma, 4, std::ptr::null_mut(), 0),
            );
            assert!(!ca.is_null() && !cb.is_null());
            // The region stays mapped while channels use it.
            kiln_dma_destroy(dma);
            std::ptr::write_bytes(base, 0xa5, 8192);
            assert_eq!(io(ca, KILN_OP_WRITE, 4096, base, 8192), 0);
            let back = base.add(8192);
            assert_eq!(io(cb, KILN_OP_READ, 4096, back, 8192), 0);
            assert!(std::slice::from_raw_parts(back, 8192)
                .iter()
                .all(|&x| x == 0xa5));
            assert_eq!(io(cb, KILN_OP_FLUSH, 0, std::ptr::null_mut(), 0), 0);
            assert_eq!(io(cb, KILN_OP_TRIM, 4096, std::ptr::null_mut(), 4096), 0);
            assert_eq!(
                kiln_channel_submit(ca, KILN_OP_READ, 1 << 20, 4096, base, 1),
                -libc::EINVAL,
                "past the end"
            );
            assert_eq!(kiln_channel_submit(ca, 99, 0, 0, base, 1), -libc::EINVAL);
            assert_eq!(kiln_channel_close(ca), 0);
            assert_eq!(kiln_channel_close(cb), 0);
            kiln_device_close(a);
            kiln_device_close(b);
        }
    }

    #[test]
    fn a_full_queue_is_eagain_and_bad_specs_say_why() {
        let dev = open("null:1MiB");
        // SAFETY: a live handle; null-device requests carry no buffer.
        unsafe {
            let ch = kiln_channel_open(dev, std::ptr::null(), 2, std::ptr::null_mut(), 0);
            let mut buf = [0u8; 512];
            for tag in 0..2 {
                assert_eq!(
                    kiln_channel_submit(ch, KILN_OP_READ, 0, 512, buf.as_mut_ptr(), tag),
                    0
                );
            }
            assert_eq!(
                kiln_channel_submit(ch, KILN_OP_READ, 0, 512, buf.as_mut_ptr(), 2),
                -libc::EAGAIN
            );
            assert_eq!(kiln_channel_inflight(ch), 2);
            assert_eq!(kiln_channel_close(ch), 0, "close drains what is in flight");
            kiln_device_close(dev);
        }
        assert!(!kiln_spec_valid(c"malloc".as_ptr()));
        assert!(kiln_spec_valid(c"malloc:256M".as_ptr()));
        let mut err = [0 as c_char; 64];
        let dev = kiln_device_open(c"malloc:12345".as_ptr(), err.as_mut_ptr(), err.len());
        assert!(dev.is_null());
        // SAFETY: kiln_device_open NUL-terminated the (truncated) message.
        let msg = unsafe { CStr::from_ptr(err.as_ptr()) }.to_str().unwrap();
        assert!(msg.starts_with("bad device spec: 'malloc:12345'"), "{msg}");
        assert_eq!(msg.len(), 63, "truncated to the buffer");
    }
}
