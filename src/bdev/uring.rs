//! `file:PATH`: a file or block device through io_uring.
//!
//! - `O_DIRECT` by default (`direct=0` turns it off; a filesystem that refuses
//!   `O_DIRECT`, such as tmpfs, falls back to buffered I/O with a warning).
//! - The file is registered, so SQEs use a fixed file; buffers from the
//!   reactor's [`crate::dma::DmaPool`] are registered and used with
//!   `READ_FIXED`/`WRITE_FIXED`.
//! - Submissions queue while the reactor polls and go to the kernel in one
//!   `io_uring_enter` per poll ([`IoChannel::submit_pending`]).
//! - `sqpoll=1` adds a kernel submission thread. IOPOLL is used for block
//!   devices whose queue advertises `io_poll`; otherwise the reason is logged.
//! - Write-zeroes is `fallocate(ZERO_RANGE)`, trim is `fallocate(PUNCH_HOLE)`:
//!   both leave zeros behind, which the volume layer relies on.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use io_uring::{opcode, squeue, types, IoUring};

use super::{
    BlockDevice, ChannelOptions, Completion, DeviceError, DeviceInfo, IoChannel, IoKind, IoRequest,
    SubmitError, BUF_INDEX_NONE,
};

pub struct UringDevice {
    info: DeviceInfo,
    file: File,
    path: PathBuf,
    sqpoll: bool,
    iopoll: bool,
    /// `fallocate` mode of write-zeroes: ZERO_RANGE, or PUNCH_HOLE where the filesystem
    /// has no ZERO_RANGE (tmpfs); both leave zeros and keep the size.
    zero_mode: i32,
}

/// Whether the file supports `FALLOC_FL_ZERO_RANGE`, asked with a zero-range of one block
/// past the end (KEEP_SIZE: neither the size nor any data changes).
fn zero_range_supported(file: &File, size_bytes: u64) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: fallocate(2) on our own open descriptor; no memory is passed.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            size_bytes as libc::off_t,
            4096,
        )
    };
    !(rc != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EOPNOTSUPP))
}

pub(crate) fn io_err(path: &Path, what: &str, e: std::io::Error) -> DeviceError {
    DeviceError::Io(format!("{}: {what}: {e}", path.display()))
}

/// Size of a block device in bytes (BLKGETSIZE64).
fn block_device_size(file: &File) -> std::io::Result<u64> {
    let mut size: u64 = 0;
    const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer we pass.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64 as _, &mut size) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(size)
}

/// The smallest O_DIRECT block the file accepts: 512 if a 512-byte read at
/// offset 512 is not refused with EINVAL, else 4096.
fn probe_direct_block_size(file: &File) -> u32 {
    let layout = std::alloc::Layout::from_size_align(4096, 4096).unwrap();
    // SAFETY: the layout is non-zero-sized.
    let buf = unsafe { std::alloc::alloc(layout) };
    assert!(!buf.is_null());
    // SAFETY: buf + 512 .. + 1024 lies inside the 4096-byte allocation.
    let rc = unsafe {
        libc::pread(
            file.as_raw_fd(),
            buf.add(512) as *mut libc::c_void,
            512,
            512,
        )
    };
    let einval = rc < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL);
    // SAFETY: allocated above with the same layout.
    unsafe { std::alloc::dealloc(buf, layout) };
    if einval {
        4096
    } else {
        512
    }
}

impl UringDevice {
    pub fn open(
        name: String,
        path: &Path,
        create_size_bytes: Option<u64>,
        direct: bool,
        sqpoll: bool,
        iopoll: bool,
    ) -> Result<UringDevice, DeviceError> {
        if let Some(size) = create_size_bytes {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)
                    .map_err(|e| io_err(dir, "cannot create directory", e))?;
            }
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)
                .map_err(|e| io_err(path, "cannot create", e))?;
            let meta = f.metadata().map_err(|e| io_err(path, "stat", e))?;
            if meta.file_type().is_file() && meta.len() < size {
                f.set_len(size)
                    .map_err(|e| io_err(path, "cannot size", e))?;
            }
        }
        let open = |flags: i32| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(flags)
                .open(path)
        };
        let mut is_direct = direct;
        let file = match open(if direct { libc::O_DIRECT } else { 0 }) {
            Ok(f) => f,
            Err(e) if direct && e.raw_os_error() == Some(libc::EINVAL) => {
                tracing::warn!(path = %path.display(), "filesystem refuses O_DIRECT; using buffered I/O");
                is_direct = false;
                open(0).map_err(|e| io_err(path, "cannot open", e))?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(DeviceError::Io(format!(
                    "{}: no such file (add ?size=SIZE to the spec to create it)",
                    path.display()
                )))
            }
            Err(e) => return Err(io_err(path, "cannot open", e)),
        };
        let meta = file.metadata().map_err(|e| io_err(path, "stat", e))?;
        let is_block = meta.file_type().is_block_device();
        let size_bytes = if is_block {
            block_device_size(&file).map_err(|e| io_err(path, "BLKGETSIZE64", e))?
        } else {
            meta.len()
        };
        let block_size = if is_direct {
            probe_direct_block_size(&file)
        } else {
            512
        };
        if size_bytes < block_size as u64 {
            return Err(DeviceError::Io(format!(
                "{}: size {size_bytes} is smaller than one block (add ?size=SIZE to create it)",
                path.display()
            )));
        }
        let iopoll = if !is_block {
            if iopoll {
                tracing::info!(path = %path.display(), "IOPOLL not used: a regular file on a filesystem cannot complete by polling; interrupt-driven completions instead");
            }
            false
        } else {
            let dev = path
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default();
            let sys = format!("/sys/block/{dev}/queue/io_poll");
            let supported = std::fs::read_to_string(&sys)
                .map(|s| s.trim() == "1")
                .unwrap_or(false);
            if !supported {
                tracing::info!(path = %path.display(), "IOPOLL not used: {sys} is not 1 (the driver has no poll queues)");
            }
            supported && is_direct
        };
        let zero_mode = if is_block || zero_range_supported(&file, size_bytes) {
            libc::FALLOC_FL_ZERO_RANGE
        } else {
            tracing::info!(path = %path.display(), "no FALLOC_FL_ZERO_RANGE here: write-zeroes punches holes");
            libc::FALLOC_FL_PUNCH_HOLE
        };
        Ok(UringDevice {
            info: DeviceInfo {
                name,
                product: "uring",
                block_size,
                num_blocks: size_bytes / block_size as u64,
                buf_align: if is_direct { block_size as usize } else { 1 },
                persistent: true,
                volatile_write_cache: true,
            },
            file,
            path: path.to_path_buf(),
            sqpoll,
            iopoll,
            zero_mode,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl BlockDevice for UringDevice {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn open_channel(&self, opts: &ChannelOptions<'_>) -> Result<Box<dyn IoChannel>, DeviceError> {
        let entries = opts.queue_depth.max(8).next_power_of_two();
        let mut builder = IoUring::builder();
        builder.setup_cqsize(entries * 2);
        if self.sqpoll {
            builder.setup_sqpoll(2000);
        }
        if self.iopoll {
            builder.setup_iopoll();
        }
        let ring = builder
            .build(entries)
            .map_err(|e| io_err(&self.path, "io_uring_setup", e))?;
        ring.submitter()
            .register_files(&[self.file.as_raw_fd()])
            .map_err(|e| io_err(&self.path, "io_uring register_files", e))?;
        let mut registered = false;
        if let Some(pool) = opts.pool {
            let iovecs = pool.iovecs();
            // SAFETY: the iovecs describe the pool's mapping, which the reactor keeps alive
            // for longer than any channel it opens (channels are dropped first).
            match unsafe { ring.submitter().register_buffers(&iovecs) } {
                Ok(()) => registered = true,
                Err(e) => {
                    tracing::warn!(path = %self.path.display(), "fixed buffers not registered: {e}")
                }
            }
        }
        Ok(Box::new(UringChannel {
            info: self.info.clone(),
            ring,
            queued: 0,
            inflight: 0,
            capacity: opts.queue_depth.max(1) as usize,
            registered,
            iopoll: self.iopoll,
            zero_mode: self.zero_mode,
        }))
    }
}

struct UringChannel {
    info: DeviceInfo,
    ring: IoUring,
    queued: usize,
    inflight: usize,
    capacity: usize,
    registered: bool,
    iopoll: bool,
    zero_mode: i32,
}

const FILE: types::Fixed = types::Fixed(0);

/// One `io_uring_enter` for the `queued` SQEs; returns how many were handed over.
/// EBUSY/EAGAIN (the CQ is full) leave them queued for the next poll.
pub(crate) fn enter(submitter: io_uring::Submitter<'_>, queued: &mut usize) -> usize {
    let n = *queued;
    match submitter.submit() {
        Ok(_) => *queued = 0,
        Err(e)
            if e.raw_os_error() == Some(libc::EBUSY) || e.raw_os_error() == Some(libc::EAGAIN) => {}
        Err(e) => panic!("io_uring_enter failed: {e}"),
    }
    n
}

impl IoChannel for UringChannel {
    #[inline]
    unsafe fn submit(&mut self, req: &IoRequest) -> Result<(), SubmitError> {
        self.info.check(req)?;
        if self.inflight == self.capacity {
            return Err(SubmitError::QueueFull);
        }
        let fixed = self.registered && req.buf_index != BUF_INDEX_NONE;
        let rw_flags = if req.fua { libc::RWF_DSYNC } else { 0 };
        let entry = match req.kind {
            IoKind::Read if fixed => {
                opcode::ReadFixed::new(FILE, req.buf, req.len_bytes, req.buf_index)
                    .offset(req.offset_bytes)
                    .build()
            }
            IoKind::Read => opcode::Read::new(FILE, req.buf, req.len_bytes)
                .offset(req.offset_bytes)
                .build(),
            IoKind::Write if fixed => {
                opcode::WriteFixed::new(FILE, req.buf, req.len_bytes, req.buf_index)
                    .offset(req.offset_bytes)
                    .rw_flags(rw_flags)
                    .build()
            }
            IoKind::Write => opcode::Write::new(FILE, req.buf, req.len_bytes)
                .offset(req.offset_bytes)
                .rw_flags(rw_flags)
                .build(),
            IoKind::Flush => opcode::Fsync::new(FILE)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            IoKind::WriteZeroes => opcode::Fallocate::new(FILE, req.len_bytes as u64)
                .offset(req.offset_bytes)
                .mode(self.zero_mode | libc::FALLOC_FL_KEEP_SIZE)
                .build(),
            IoKind::Trim => opcode::Fallocate::new(FILE, req.len_bytes as u64)
                .offset(req.offset_bytes)
                .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
                .build(),
        }
        .user_data(req.tag);
        let entry: squeue::Entry = entry;
        // SAFETY: the caller guarantees the buffer outlives the request (IoChannel::submit
        // contract); the fixed file index 0 was registered at channel open.
        if unsafe { self.ring.submission().push(&entry) }.is_err() {
            // The SQ holds `entries` >= capacity slots, so this only happens when the
            // kernel has not consumed earlier entries yet: push them and retry once.
            self.submit_pending();
            // SAFETY: as above.
            unsafe { self.ring.submission().push(&entry) }.map_err(|_| SubmitError::QueueFull)?;
        }
        self.queued += 1;
        self.inflight += 1;
        Ok(())
    }

    #[inline]
    fn submit_pending(&mut self) -> usize {
        if self.queued == 0 && !(self.iopoll && self.inflight > 0) {
            return 0;
        }
        enter(self.ring.submitter(), &mut self.queued)
    }

    #[inline]
    fn poll_completions(&mut self, out: &mut [Completion]) -> usize {
        let mut n = 0;
        let mut cq = self.ring.completion();
        cq.sync();
        for (slot, cqe) in out.iter_mut().zip(&mut cq) {
            *slot = Completion {
                tag: cqe.user_data(),
                result: cqe.result().min(0),
            };
            n += 1;
        }
        drop(cq);
        self.inflight -= n;
        n
    }

    fn inflight(&self) -> usize {
        self.inflight
    }

    fn notifier_fd(&self) -> Option<RawFd> {
        if self.iopoll {
            None
        } else {
            Some(self.ring.as_raw_fd())
        }
    }
}
