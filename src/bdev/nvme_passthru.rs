//! `ng:/dev/ngXnY`: NVMe commands through io_uring passthrough
//! (`IORING_OP_URING_CMD` with `NVME_URING_CMD_IO`) on the kernel's NVMe
//! generic character device, as fio's `io_uring_cmd` engine does.
//!
//! - The ring uses 128-byte SQEs and 32-byte CQEs (`IORING_SETUP_SQE128 |
//!   CQE32`); the 80-byte command area carries a [`NvmeUringCmd`] built from
//!   the same [`super::nvme::io_command`] the VFIO driver uses.
//! - The reactor's DMA pool is registered, so pool buffers go as fixed
//!   buffers (`IORING_URING_CMD_FIXED`); the device fd is a fixed file.
//! - A positive CQE result is an NVMe status ([`super::nvme::Status`]).
//! - Geometry comes from `NVME_IOCTL_ID` and Identify through the admin
//!   passthrough ioctl on the same char device (root or CAP_SYS_ADMIN).
//! - Requests larger than the kernel's passthrough limit (MDTS, the queue's
//!   `max_hw_sectors_kb` and `max_segments`) are split into several commands.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use io_uring::{cqueue, opcode, squeue, types, IoUring};

use super::nvme::{
    self, io_command, piece_count, pieces, IdentifyController, IdentifyNamespace, RequestTable,
    Sqe, Status, PAGE_BYTES,
};
use super::uring::io_err;
use super::{
    BlockDevice, ChannelOptions, Completion, DeviceError, DeviceInfo, IoChannel, IoKind, IoRequest,
    SubmitError, BUF_INDEX_NONE,
};

/// `struct nvme_uring_cmd` of `linux/nvme_ioctl.h` (the command area of a 128-byte SQE).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct NvmeUringCmd {
    pub opcode: u8,
    pub flags: u8,
    pub rsvd1: u16,
    pub nsid: u32,
    pub cdw2: u32,
    pub cdw3: u32,
    pub metadata: u64,
    pub addr: u64,
    pub metadata_len: u32,
    pub data_len: u32,
    pub cdw10: u32,
    pub cdw11: u32,
    pub cdw12: u32,
    pub cdw13: u32,
    pub cdw14: u32,
    pub cdw15: u32,
    pub timeout_ms: u32,
    pub rsvd2: u32,
}

const _: () = {
    assert!(std::mem::size_of::<NvmeUringCmd>() == 72);
    assert!(std::mem::offset_of!(NvmeUringCmd, nsid) == 4);
    assert!(std::mem::offset_of!(NvmeUringCmd, metadata) == 16);
    assert!(std::mem::offset_of!(NvmeUringCmd, addr) == 24);
    assert!(std::mem::offset_of!(NvmeUringCmd, metadata_len) == 32);
    assert!(std::mem::offset_of!(NvmeUringCmd, data_len) == 36);
    assert!(std::mem::offset_of!(NvmeUringCmd, cdw10) == 40);
    assert!(std::mem::offset_of!(NvmeUringCmd, cdw15) == 60);
    assert!(std::mem::offset_of!(NvmeUringCmd, timeout_ms) == 64);
    assert!(std::mem::size_of::<NvmeUringCmd>() <= 80);
};

/// `struct nvme_passthru_cmd` (a.k.a. `nvme_admin_cmd`) for the ioctls.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct NvmePassthruCmd {
    cmd: NvmeUringCmd,
}

const _: () = assert!(std::mem::size_of::<NvmePassthruCmd>() == 72);

const fn ioc(dir: u32, nr: u32, size: usize) -> u32 {
    (dir << 30) | ((size as u32) << 16) | ((b'N' as u32) << 8) | nr
}
const IOC_READ_WRITE: u32 = 3;
const NVME_IOCTL_ID: u32 = ioc(0, 0x40, 0);
const NVME_IOCTL_ADMIN_CMD: u32 = ioc(IOC_READ_WRITE, 0x41, 72);
/// `NVME_URING_CMD_IO`, the `cmd_op` of an I/O passthrough SQE.
pub const NVME_URING_CMD_IO: u32 = ioc(IOC_READ_WRITE, 0x80, 72);

impl NvmeUringCmd {
    /// The passthrough form of a command built by the shared layer; the data
    /// pointer is a user address, not PRPs (the kernel maps it).
    pub fn from_sqe(sqe: &Sqe, addr: u64, data_len: u32) -> NvmeUringCmd {
        NvmeUringCmd {
            opcode: sqe.opcode,
            flags: 0,
            rsvd1: 0,
            nsid: sqe.nsid,
            cdw2: sqe.cdw2,
            cdw3: sqe.cdw3,
            metadata: 0,
            addr,
            metadata_len: 0,
            data_len,
            cdw10: sqe.cdw10,
            cdw11: sqe.cdw11,
            cdw12: sqe.cdw12,
            cdw13: sqe.cdw13,
            cdw14: sqe.cdw14,
            cdw15: sqe.cdw15,
            timeout_ms: 0,
            rsvd2: 0,
        }
    }

    /// The 80-byte command area of the SQE.
    pub fn to_bytes(&self) -> [u8; 80] {
        let mut out = [0u8; 80];
        // SAFETY: NvmeUringCmd is repr(C) plain data of 72 bytes without padding
        // (checked above), so viewing it as bytes is sound.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                self as *const NvmeUringCmd as *const u8,
                std::mem::size_of::<NvmeUringCmd>(),
            )
        };
        out[..bytes.len()].copy_from_slice(bytes);
        out
    }
}

/// Identify through `NVME_IOCTL_ADMIN_CMD` into a 4 KiB page.
fn identify(file: &File, path: &Path, cns: u32, nsid: u32) -> Result<Vec<u8>, DeviceError> {
    let mut page = crate::dma::AlignedBuf::zeroed(4096);
    let sqe = Sqe::identify(cns, nsid, 0);
    let mut cmd = NvmePassthruCmd {
        cmd: NvmeUringCmd::from_sqe(&sqe, page.as_mut_ptr() as u64, 4096),
    };
    // SAFETY: `cmd` is a valid nvme_passthru_cmd whose data buffer is 4096 writable bytes.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), NVME_IOCTL_ADMIN_CMD as _, &mut cmd) };
    if rc < 0 {
        return Err(io_err(
            path,
            &format!("Identify (CNS {cns}) through NVME_IOCTL_ADMIN_CMD"),
            std::io::Error::last_os_error(),
        ));
    }
    if rc > 0 {
        return Err(DeviceError::Io(format!(
            "{}: Identify (CNS {cns}): {}",
            path.display(),
            Status(rc as u16)
        )));
    }
    Ok(page.as_slice().to_vec())
}

/// The kernel's limits for passthrough on this namespace, from the block queue
/// of the same namespace (`/dev/ng0n1` ↔ `/sys/block/nvme0n1/queue`):
/// `(max_hw_sectors_kb * 1024, max_segments)`.
fn queue_limits(path: &Path) -> Option<(u64, u64)> {
    let name = path.file_name()?.to_str()?;
    let block = format!("nvme{}", name.strip_prefix("ng")?);
    let read = |f: &str| -> Option<u64> {
        std::fs::read_to_string(format!("/sys/block/{block}/queue/{f}"))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    Some((read("max_hw_sectors_kb")? * 1024, read("max_segments")?))
}

pub struct NvmePassthruDevice {
    info: DeviceInfo,
    file: File,
    path: PathBuf,
    nsid: u32,
    lba_shift: u32,
    transfer_bytes_max: u32,
    /// The queue's `max_segments`.
    segments_max: u64,
    write_zeroes: bool,
}

impl NvmePassthruDevice {
    pub fn open(name: String, path: &Path) -> Result<NvmePassthruDevice, DeviceError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| io_err(path, "cannot open", e))?;
        let meta = file.metadata().map_err(|e| io_err(path, "stat", e))?;
        if !meta.file_type().is_char_device() {
            return Err(DeviceError::Io(format!(
                "{}: not a character device (ng: wants the NVMe generic device /dev/ngXnY)",
                path.display()
            )));
        }
        // SAFETY: NVME_IOCTL_ID takes no argument and returns the namespace id.
        let nsid = unsafe { libc::ioctl(file.as_raw_fd(), NVME_IOCTL_ID as _) };
        if nsid <= 0 {
            return Err(io_err(
                path,
                "NVME_IOCTL_ID",
                std::io::Error::last_os_error(),
            ));
        }
        let nsid = nsid as u32;
        let ctrl = IdentifyController::parse(&identify(&file, path, nvme::CNS_CONTROLLER, 0)?);
        let ns = IdentifyNamespace::parse(&identify(&file, path, nvme::CNS_NAMESPACE, nsid)?)
            .map_err(|e| DeviceError::Io(format!("{}: namespace {nsid}: {e}", path.display())))?;
        if ns.metadata_bytes != 0 {
            return Err(DeviceError::Io(format!(
                "{}: namespace formatted with {} metadata bytes per block; kiln needs 0",
                path.display(),
                ns.metadata_bytes
            )));
        }
        // User buffers are mapped page by page: one segment per page, one spare.
        let (hw_bytes, segments_max) = queue_limits(path).unwrap_or((128 << 10, 33));
        let queue_limit = hw_bytes.min(segments_max.saturating_sub(1).max(1) * PAGE_BYTES);
        let transfer_bytes_max = ctrl
            .mdts_bytes(PAGE_BYTES)
            .unwrap_or(u64::MAX)
            .min(queue_limit)
            .min(u32::MAX as u64 / 2 + 1) as u32
            & !((1u32 << ns.lba_shift) - 1);
        if transfer_bytes_max == 0 {
            return Err(DeviceError::Io(format!(
                "{}: transfer limit below one block",
                path.display()
            )));
        }
        tracing::info!(path = %path.display(), nsid, blocks = ns.nsze, block_bytes = 1u32 << ns.lba_shift, transfer_bytes_max, model = %ctrl.model, "NVMe passthrough namespace");
        Ok(NvmePassthruDevice {
            info: DeviceInfo {
                name,
                product: "nvme-passthru",
                block_size: 1 << ns.lba_shift,
                num_blocks: ns.nsze,
                buf_align: 4,
                persistent: true,
                volatile_write_cache: ctrl.vwc,
            },
            file,
            path: path.to_path_buf(),
            nsid,
            lba_shift: ns.lba_shift,
            transfer_bytes_max,
            segments_max,
            write_zeroes: ctrl.supports_write_zeroes(),
        })
    }
}

impl BlockDevice for NvmePassthruDevice {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn open_channel(&self, opts: &ChannelOptions<'_>) -> Result<Box<dyn IoChannel>, DeviceError> {
        let capacity = opts.queue_depth.max(1) as usize;
        // Room for requests split into a few commands each.
        let entries = (capacity as u32 * 4).clamp(16, 4096).next_power_of_two();
        let ring = IoUring::<squeue::Entry128, cqueue::Entry32>::builder()
            .setup_cqsize(entries * 2)
            .build(entries)
            .map_err(|e| io_err(&self.path, "io_uring_setup with SQE128|CQE32", e))?;
        ring.submitter()
            .register_files(&[self.file.as_raw_fd()])
            .map_err(|e| io_err(&self.path, "io_uring register_files", e))?;
        let mut registered = false;
        // Linux 6.1 counts every page of a fixed buffer from the I/O's start to the
        // buffer's end against max_segments and refuses the command (EINVAL) above
        // it, so buffers larger than that go as plain user addresses.
        let fixed_ok = |pool: &crate::dma::DmaPool| {
            let pages = pool.buf_bytes() as u64 / PAGE_BYTES;
            if pages > self.segments_max {
                tracing::info!(path = %self.path.display(), buf_bytes = pool.buf_bytes(), segments_max = self.segments_max, "fixed buffers not used: a buffer spans more pages than the queue's max_segments");
            }
            pages <= self.segments_max
        };
        if let Some(pool) = opts.pool.filter(|p| fixed_ok(p)) {
            let iovecs = pool.iovecs();
            // SAFETY: the iovecs describe the pool's mapping, which the reactor keeps alive
            // for longer than any channel it opens.
            match unsafe { ring.submitter().register_buffers(&iovecs) } {
                Ok(()) => registered = true,
                Err(e) => {
                    tracing::warn!(path = %self.path.display(), "fixed buffers not registered: {e}")
                }
            }
        }
        Ok(Box::new(PassthruChannel {
            info: self.info.clone(),
            ring,
            nsid: self.nsid,
            lba_shift: self.lba_shift,
            transfer_bytes_max: self.transfer_bytes_max,
            write_zeroes: self.write_zeroes,
            registered,
            requests: RequestTable::new(capacity),
            commands_inflight: 0,
            commands_max: entries as usize,
            queued: 0,
            inflight: 0,
        }))
    }
}

struct PassthruChannel {
    info: DeviceInfo,
    ring: IoUring<squeue::Entry128, cqueue::Entry32>,
    nsid: u32,
    lba_shift: u32,
    transfer_bytes_max: u32,
    write_zeroes: bool,
    registered: bool,
    requests: RequestTable,
    commands_inflight: usize,
    /// Commands in flight at most: the SQ size, half the CQ.
    commands_max: usize,
    queued: usize,
    inflight: usize,
}

const FILE: types::Fixed = types::Fixed(0);

impl IoChannel for PassthruChannel {
    #[inline]
    unsafe fn submit(&mut self, req: &IoRequest) -> Result<(), SubmitError> {
        self.info.check(req)?;
        if matches!(req.kind, IoKind::WriteZeroes | IoKind::Trim) && !self.write_zeroes {
            return Err(SubmitError::Unsupported);
        }
        if self.inflight >= self.requests.capacity() {
            return Err(SubmitError::QueueFull);
        }
        let block_bytes = self.info.block_size;
        let count = piece_count(req, block_bytes, self.transfer_bytes_max);
        if count > self.commands_max {
            return Err(SubmitError::Unsupported);
        }
        if self.commands_inflight + count > self.commands_max {
            return Err(SubmitError::QueueFull);
        }
        let request = self
            .requests
            .start(req.tag, count)
            .expect("request table sized to the channel capacity");
        let data = matches!(req.kind, IoKind::Read | IoKind::Write);
        let fixed = data && self.registered && req.buf_index != BUF_INDEX_NONE;
        for piece in pieces(req, block_bytes, self.transfer_bytes_max) {
            let sqe = io_command(req.kind, req.fua, self.nsid, self.lba_shift, &piece);
            let (addr, len) = if data {
                (req.buf as u64 + piece.buf_offset as u64, piece.len_bytes)
            } else {
                (0, 0)
            };
            let cmd = NvmeUringCmd::from_sqe(&sqe, addr, len).to_bytes();
            let mut op = opcode::UringCmd80::new(FILE, NVME_URING_CMD_IO).cmd(cmd);
            if fixed {
                op = op.buf_index(Some(req.buf_index));
            }
            let entry = op.build().user_data(request as u64);
            // SAFETY: the caller keeps the buffer valid until the completion (IoChannel::submit
            // contract); the fixed file 0 and the fixed buffers were registered at open.
            if unsafe { self.ring.submission().push(&entry) }.is_err() {
                self.ring.submit().map_err(|_| SubmitError::QueueFull)?;
                self.queued = 0;
                // SAFETY: as above.
                unsafe { self.ring.submission().push(&entry) }
                    .expect("SQ has room for commands_max entries after a submit");
            }
            self.queued += 1;
        }
        self.commands_inflight += count;
        self.inflight += 1;
        Ok(())
    }

    #[inline]
    fn submit_pending(&mut self) -> usize {
        if self.queued == 0 {
            return 0;
        }
        super::uring::enter(self.ring.submitter(), &mut self.queued)
    }

    #[inline]
    fn poll_completions(&mut self, out: &mut [Completion]) -> usize {
        let mut n = 0;
        let mut cq = self.ring.completion();
        cq.sync();
        while n < out.len() {
            let Some(cqe) = cq.next() else {
                break;
            };
            self.commands_inflight -= 1;
            let res = cqe.result();
            let result = if res > 0 {
                let status = Status(res as u16);
                tracing::warn!("{}: {status}", self.info.name);
                status.to_errno()
            } else {
                res
            };
            if let Some(done) = self.requests.command_done(cqe.user_data() as u16, result) {
                out[n] = done;
                n += 1;
            }
        }
        drop(cq);
        self.inflight -= n;
        n
    }

    fn inflight(&self) -> usize {
        self.inflight
    }

    fn notifier_fd(&self) -> Option<RawFd> {
        Some(self.ring.as_raw_fd())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uring_cmd_layout_and_ioctl_numbers() {
        // linux/nvme_ioctl.h: NVME_URING_CMD_IO = _IOWR('N', 0x80, struct nvme_uring_cmd).
        assert_eq!(NVME_URING_CMD_IO, 0xc048_4e80);
        assert_eq!(NVME_IOCTL_ADMIN_CMD, 0xc048_4e41);
        assert_eq!(NVME_IOCTL_ID, 0x4e40);
        let piece = nvme::Piece {
            offset_bytes: 4096 * 3,
            len_bytes: 8192,
            buf_offset: 0,
        };
        let sqe = io_command(IoKind::Read, false, 1, 12, &piece);
        let bytes = NvmeUringCmd::from_sqe(&sqe, 0x1234_5678, 8192).to_bytes();
        assert_eq!(bytes[0], nvme::io_opcode::READ);
        assert_eq!(u32::from_le_bytes(bytes[4..8].try_into().unwrap()), 1);
        assert_eq!(
            u64::from_le_bytes(bytes[24..32].try_into().unwrap()),
            0x1234_5678
        );
        assert_eq!(u32::from_le_bytes(bytes[36..40].try_into().unwrap()), 8192);
        assert_eq!(u32::from_le_bytes(bytes[40..44].try_into().unwrap()), 3);
        assert_eq!(u32::from_le_bytes(bytes[48..52].try_into().unwrap()), 1);
        assert!(bytes[72..].iter().all(|&b| b == 0));
    }

    #[test]
    fn a_device_that_is_not_nvme_is_refused() {
        let e = NvmePassthruDevice::open("ng:/dev/zero".into(), Path::new("/dev/zero"))
            .err()
            .map(|e| e.to_string())
            .unwrap();
        assert!(e.contains("/dev/zero: NVME_IOCTL_ID"), "{e}");
    }
}
