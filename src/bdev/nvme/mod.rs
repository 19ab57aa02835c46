//! The NVMe command layer shared by the two NVMe backends: the user-space
//! VFIO driver ([`super::vfio_nvme`], `nvme:BDF`) and the io_uring
//! passthrough ([`super::nvme_passthru`], `ng:/dev/ngXnY`).
//!
//! - [`Sqe`] and [`Cqe`]: the 64-byte submission and 16-byte completion queue
//!   entries of the NVMe Base specification, layouts checked by `const` asserts.
//! - [`Status`]: the 15-bit status field, decoded to a name and an errno.
//! - [`io_command`] turns one piece of an [`IoRequest`] into an NVM command;
//!   [`pieces`] splits a request at the transfer limit (MDTS, 16-bit NLB).
//! - [`build_prps`]: PRP1/PRP2 and the PRP list for a virtually contiguous
//!   buffer in a contiguous IOVA range.
//! - [`IdentifyController`] / [`IdentifyNamespace`]: the few Identify fields kiln uses.
//! - [`RequestTable`]: per-channel request slots that gather split commands
//!   back into one [`Completion`].
//!
//! Nothing here does I/O, so all of it is unit-tested on the host.

pub mod vfio;

use super::{Completion, IoKind, IoRequest};

/// The memory page size kiln programs (CC.MPS = 0) and builds PRPs for.
pub const PAGE_BYTES: u64 = 4096;

/// Admin command opcodes.
pub mod admin_opcode {
    pub const DELETE_IO_SQ: u8 = 0x00;
    pub const CREATE_IO_SQ: u8 = 0x01;
    pub const DELETE_IO_CQ: u8 = 0x04;
    pub const CREATE_IO_CQ: u8 = 0x05;
    pub const IDENTIFY: u8 = 0x06;
    pub const SET_FEATURES: u8 = 0x09;
}

/// NVM command set opcodes.
pub mod io_opcode {
    pub const FLUSH: u8 = 0x00;
    pub const WRITE: u8 = 0x01;
    pub const READ: u8 = 0x02;
    pub const WRITE_ZEROES: u8 = 0x08;
}

/// Identify CNS values.
pub const CNS_NAMESPACE: u32 = 0x00;
pub const CNS_CONTROLLER: u32 = 0x01;
pub const CNS_ACTIVE_NAMESPACES: u32 = 0x02;
/// Set Features: Number of Queues.
pub const FEATURE_NUMBER_OF_QUEUES: u32 = 0x07;

/// Read/Write/Write Zeroes CDW12: force unit access.
pub const CDW12_FUA: u32 = 1 << 30;
/// Write Zeroes CDW12: deallocate the blocks (they still read as zeros).
pub const CDW12_DEAC: u32 = 1 << 25;
/// Blocks one command can address: NLB is a 16-bit zero-based count.
pub const NLB_MAX: u64 = 1 << 16;

/// A submission queue entry (NVMe Base 2.0, figure "Common Command Format").
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sqe {
    pub opcode: u8,
    /// FUSE (bits 1:0) and PSDT (bits 7:6; 0 = PRPs).
    pub flags: u8,
    pub cid: u16,
    pub nsid: u32,
    pub cdw2: u32,
    pub cdw3: u32,
    pub mptr: u64,
    pub prp1: u64,
    pub prp2: u64,
    pub cdw10: u32,
    pub cdw11: u32,
    pub cdw12: u32,
    pub cdw13: u32,
    pub cdw14: u32,
    pub cdw15: u32,
}

const _: () = {
    assert!(std::mem::size_of::<Sqe>() == 64);
    assert!(std::mem::offset_of!(Sqe, cid) == 2);
    assert!(std::mem::offset_of!(Sqe, nsid) == 4);
    assert!(std::mem::offset_of!(Sqe, mptr) == 16);
    assert!(std::mem::offset_of!(Sqe, prp1) == 24);
    assert!(std::mem::offset_of!(Sqe, prp2) == 32);
    assert!(std::mem::offset_of!(Sqe, cdw10) == 40);
    assert!(std::mem::offset_of!(Sqe, cdw15) == 60);
};

impl Sqe {
    /// Identify with the given CNS into the 4 KiB page at `prp1`.
    pub fn identify(cns: u32, nsid: u32, prp1: u64) -> Sqe {
        Sqe {
            opcode: admin_opcode::IDENTIFY,
            nsid,
            prp1,
            cdw10: cns,
            ..Sqe::default()
        }
    }

    /// Set Features / Number of Queues: asks for `pairs` I/O SQs and CQs.
    pub fn set_queue_count(pairs: u16) -> Sqe {
        let n = pairs.max(1) as u32 - 1;
        Sqe {
            opcode: admin_opcode::SET_FEATURES,
            cdw10: FEATURE_NUMBER_OF_QUEUES,
            cdw11: (n << 16) | n,
            ..Sqe::default()
        }
    }

    /// Create I/O Completion Queue: physically contiguous, interrupts off (polled).
    pub fn create_io_cq(qid: u16, entries: u16, prp1: u64) -> Sqe {
        Sqe {
            opcode: admin_opcode::CREATE_IO_CQ,
            prp1,
            cdw10: ((entries as u32 - 1) << 16) | qid as u32,
            cdw11: 1, // PC = 1, IEN = 0
            ..Sqe::default()
        }
    }

    /// Create I/O Submission Queue bound to completion queue `cqid`.
    pub fn create_io_sq(qid: u16, entries: u16, cqid: u16, prp1: u64) -> Sqe {
        Sqe {
            opcode: admin_opcode::CREATE_IO_SQ,
            prp1,
            cdw10: ((entries as u32 - 1) << 16) | qid as u32,
            cdw11: ((cqid as u32) << 16) | 1, // PC = 1, priority urgent/ignored
            ..Sqe::default()
        }
    }

    pub fn delete_io_sq(qid: u16) -> Sqe {
        Sqe {
            opcode: admin_opcode::DELETE_IO_SQ,
            cdw10: qid as u32,
            ..Sqe::default()
        }
    }

    pub fn delete_io_cq(qid: u16) -> Sqe {
        Sqe {
            opcode: admin_opcode::DELETE_IO_CQ,
            cdw10: qid as u32,
            ..Sqe::default()
        }
    }
}

/// A completion queue entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cqe {
    /// Command specific result (e.g. Set Features' allocated queue counts).
    pub dw0: u32,
    pub dw1: u32,
    pub sq_head: u16,
    pub sq_id: u16,
    pub cid: u16,
    /// Phase tag (bit 0) and the status field (bits 15:1).
    pub status_phase: u16,
}

const _: () = {
    assert!(std::mem::size_of::<Cqe>() == 16);
    assert!(std::mem::offset_of!(Cqe, sq_head) == 8);
    assert!(std::mem::offset_of!(Cqe, cid) == 12);
    assert!(std::mem::offset_of!(Cqe, status_phase) == 14);
};

impl Cqe {
    #[inline]
    pub fn phase(&self) -> bool {
        self.status_phase & 1 == 1
    }

    #[inline]
    pub fn status(&self) -> Status {
        Status(self.status_phase >> 1)
    }
}

/// The 15-bit NVMe status field: SC (7:0), SCT (10:8), CRD (12:11), M (13),
/// DNR (14). This is also what Linux returns as a positive `res` of an NVMe
/// passthrough command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Status(pub u16);

impl Status {
    pub const SUCCESS: Status = Status(0);

    /// Status code.
    pub fn sc(self) -> u8 {
        self.0 as u8
    }

    /// Status code type: 0 generic, 1 command specific, 2 media, 3 path.
    pub fn sct(self) -> u8 {
        ((self.0 >> 8) & 7) as u8
    }

    /// Do Not Retry.
    pub fn dnr(self) -> bool {
        self.0 & (1 << 14) != 0
    }

    pub fn is_success(self) -> bool {
        self.sct() == 0 && self.sc() == 0
    }

    /// The negative errno kiln completes the request with (0 on success).
    pub fn to_errno(self) -> i32 {
        let e = match (self.sct(), self.sc()) {
            (0, 0x00) => return 0,
            (0, 0x01) => libc::EOPNOTSUPP, // invalid command opcode
            (0, 0x02) => libc::EINVAL,     // invalid field in command
            (0, 0x07) | (0, 0x08) => libc::ECANCELED, // aborted by request / SQ deletion
            (0, 0x0b) => libc::ENXIO,      // invalid namespace or format
            (0, 0x80) => libc::ERANGE,     // LBA out of range
            (0, 0x81) => libc::ENOSPC,     // capacity exceeded
            (0, 0x82) => libc::EAGAIN,     // namespace not ready
            (1, 0x82) => libc::EILSEQ,     // invalid protection information
            (1, 0x83) => libc::EROFS,      // write to read-only range
            (2, 0x85) => libc::EILSEQ,     // compare failure
            (2, 0x86) => libc::EACCES,     // access denied
            (3, _) => libc::ENOLINK,       // path related
            _ => libc::EIO,
        };
        -e
    }

    fn name(self) -> &'static str {
        match (self.sct(), self.sc()) {
            (0, 0x00) => "success",
            (0, 0x01) => "invalid command opcode",
            (0, 0x02) => "invalid field in command",
            (0, 0x04) => "data transfer error",
            (0, 0x06) => "internal error",
            (0, 0x07) => "command abort requested",
            (0, 0x08) => "command aborted due to SQ deletion",
            (0, 0x0b) => "invalid namespace or format",
            (0, 0x80) => "LBA out of range",
            (0, 0x81) => "capacity exceeded",
            (0, 0x82) => "namespace not ready",
            (1, 0x01) => "invalid queue identifier",
            (1, 0x02) => "invalid queue size",
            (1, 0x80) => "conflicting attributes",
            (1, 0x83) => "attempted write to read only range",
            (2, 0x80) => "write fault",
            (2, 0x81) => "unrecovered read error",
            (2, 0x85) => "compare failure",
            (2, 0x86) => "access denied",
            _ => "other",
        }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "NVMe status {} (SCT {:#x} SC {:#04x}{})",
            self.name(),
            self.sct(),
            self.sc(),
            if self.dnr() { ", DNR" } else { "" }
        )
    }
}

/// Controller fatal status (CSTS.CFS) or an all-ones read (device gone).
pub fn csts_fatal(csts: u32) -> bool {
    csts == u32::MAX || csts & 0b10 != 0
}

/// PRP entries for `len` bytes at `iova` (which is dword aligned and lies in
/// one contiguous IOVA range). Returns `(prp1, prp2, list_entries)`: PRP2 is
/// 0 for one page, the second page for two, and `list_iova` when more pages
/// follow, in which case `list[..list_entries]` holds their addresses. One
/// list page covers 1 + 512 pages, so callers cap a command's transfer at
/// 2 MiB ([`PRP_TRANSFER_BYTES_MAX`]) and never chain lists.
pub fn build_prps(iova: u64, len: u32, list: &mut [u64], list_iova: u64) -> (u64, u64, usize) {
    assert!(len > 0, "zero-length data transfer");
    assert_eq!(iova % 4, 0, "PRP entries must be dword aligned");
    assert_eq!(list_iova % 8, 0, "PRP list must be qword aligned");
    let first_bytes = PAGE_BYTES - iova % PAGE_BYTES;
    let len = len as u64;
    if len <= first_bytes {
        return (iova, 0, 0);
    }
    let next = iova + first_bytes;
    let rest = len - first_bytes;
    if rest <= PAGE_BYTES {
        return (iova, next, 0);
    }
    let pages = rest.div_ceil(PAGE_BYTES) as usize;
    assert!(
        pages <= list.len(),
        "transfer of {len} bytes needs {pages} PRP list entries, the list holds {}",
        list.len()
    );
    for (k, entry) in list[..pages].iter_mut().enumerate() {
        *entry = next + k as u64 * PAGE_BYTES;
    }
    (iova, list_iova, pages)
}

/// PRP list entries in one 4 KiB page.
pub const PRP_LIST_ENTRIES: usize = (PAGE_BYTES / 8) as usize;
/// The largest transfer whose PRPs fit PRP1 plus one list page, at any dword offset.
pub const PRP_TRANSFER_BYTES_MAX: u32 = (PRP_LIST_ENTRIES as u32) * PAGE_BYTES as u32;

/// One command's share of a request: device byte offset, length and the
/// offset into the request's buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    pub offset_bytes: u64,
    pub len_bytes: u32,
    pub buf_offset: u32,
}

/// Splits a request into commands of at most `data_bytes_max` (reads and
/// writes) or [`NLB_MAX`] blocks (write-zeroes, trim). Flush is one piece.
pub fn pieces(
    req: &IoRequest,
    block_bytes: u32,
    data_bytes_max: u32,
) -> impl Iterator<Item = Piece> {
    let step = match req.kind {
        IoKind::Read | IoKind::Write => data_bytes_max.min((NLB_MAX * block_bytes as u64) as u32),
        IoKind::WriteZeroes | IoKind::Trim => {
            (NLB_MAX * block_bytes as u64).min(u32::MAX as u64 / 2 + 1) as u32
        }
        IoKind::Flush => u32::MAX,
    };
    assert!(req.kind == IoKind::Flush || (step >= block_bytes && step % block_bytes == 0));
    let total = req.len_bytes;
    let count = if req.kind == IoKind::Flush {
        1
    } else {
        total.div_ceil(step)
    };
    let base = req.offset_bytes;
    (0..count).map(move |k| {
        let done = k * step;
        Piece {
            offset_bytes: base + done as u64,
            len_bytes: (total - done).min(step),
            buf_offset: done,
        }
    })
}

/// How many commands [`pieces`] yields.
pub fn piece_count(req: &IoRequest, block_bytes: u32, data_bytes_max: u32) -> usize {
    match req.kind {
        IoKind::Flush => 1,
        IoKind::Read | IoKind::Write => req
            .len_bytes
            .div_ceil(data_bytes_max.min((NLB_MAX * block_bytes as u64) as u32))
            as usize,
        IoKind::WriteZeroes | IoKind::Trim => {
            (req.len_bytes as u64).div_ceil(NLB_MAX * block_bytes as u64) as usize
        }
    }
}

/// The NVM command for one piece (data pointer left for the caller: PRPs
/// for the VFIO driver, an address for passthrough). Trim is Write Zeroes with
/// the deallocate bit: kiln's contract is that trimmed blocks read as zeros,
/// which Dataset Management does not promise.
pub fn io_command(kind: IoKind, fua: bool, nsid: u32, lba_shift: u32, piece: &Piece) -> Sqe {
    let slba = piece.offset_bytes >> lba_shift;
    let nlb = (piece.len_bytes as u64) >> lba_shift;
    let (opcode, cdw12_flags) = match kind {
        IoKind::Read => (io_opcode::READ, 0),
        IoKind::Write => (io_opcode::WRITE, if fua { CDW12_FUA } else { 0 }),
        IoKind::Flush => {
            return Sqe {
                opcode: io_opcode::FLUSH,
                nsid,
                ..Sqe::default()
            }
        }
        IoKind::WriteZeroes => (io_opcode::WRITE_ZEROES, 0),
        IoKind::Trim => (io_opcode::WRITE_ZEROES, CDW12_DEAC),
    };
    assert!((1..=NLB_MAX).contains(&nlb), "piece of {nlb} blocks");
    Sqe {
        opcode,
        nsid,
        cdw10: slba as u32,
        cdw11: (slba >> 32) as u32,
        cdw12: (nlb - 1) as u32 | cdw12_flags,
        ..Sqe::default()
    }
}

fn ascii_field(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .trim_end_matches(['\0', ' '])
        .to_string()
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// The Identify Controller fields kiln uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentifyController {
    pub serial: String,
    pub model: String,
    pub firmware: String,
    /// Maximum data transfer size as a power of two of the minimum page size; 0 = no limit.
    pub mdts: u8,
    /// Optional NVM command support (bit 3: Write Zeroes).
    pub oncs: u16,
    /// Volatile write cache present.
    pub vwc: bool,
    /// Number of namespaces.
    pub nn: u32,
}

impl IdentifyController {
    pub fn parse(page: &[u8]) -> IdentifyController {
        assert!(page.len() >= 4096, "identify page is {} bytes", page.len());
        IdentifyController {
            serial: ascii_field(&page[4..24]),
            model: ascii_field(&page[24..64]),
            firmware: ascii_field(&page[64..72]),
            mdts: page[77],
            oncs: le16(page, 520),
            vwc: page[525] & 1 != 0,
            nn: le32(page, 516),
        }
    }

    /// MDTS in bytes for a minimum page size of `mps_min_bytes`, or `None` if unlimited.
    pub fn mdts_bytes(&self, mps_min_bytes: u64) -> Option<u64> {
        (self.mdts != 0).then(|| mps_min_bytes << self.mdts)
    }

    pub fn supports_write_zeroes(&self) -> bool {
        self.oncs & (1 << 3) != 0
    }
}

/// The Identify Namespace fields kiln uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentifyNamespace {
    /// Namespace size in logical blocks.
    pub nsze: u64,
    /// log2 of the logical block size of the formatted LBA format.
    pub lba_shift: u32,
    /// Metadata bytes per block of that format (kiln needs 0).
    pub metadata_bytes: u16,
}

impl IdentifyNamespace {
    pub fn parse(page: &[u8]) -> Result<IdentifyNamespace, String> {
        assert!(page.len() >= 4096, "identify page is {} bytes", page.len());
        let nlbaf = page[25] as usize + 1;
        let flbas = page[26];
        let mut index = (flbas & 0xf) as usize;
        if nlbaf > 16 {
            index |= (((flbas >> 5) & 3) as usize) << 4;
        }
        if index >= nlbaf {
            return Err(format!(
                "formatted LBA format {index} is not one of the {nlbaf} formats"
            ));
        }
        let lbaf = le32(page, 128 + 4 * index);
        let lba_shift = (lbaf >> 16) & 0xff;
        if !(9..=16).contains(&lba_shift) {
            return Err(format!(
                "LBA format {index} has a block size of 2^{lba_shift} bytes"
            ));
        }
        Ok(IdentifyNamespace {
            nsze: le64(page, 0),
            lba_shift,
            metadata_bytes: lbaf as u16,
        })
    }
}

/// The active namespace list (CNS 2): ids in increasing order, ending at the first 0.
pub fn parse_namespace_list(page: &[u8]) -> Vec<u32> {
    page.chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
        .take_while(|&id| id != 0)
        .collect()
}

#[derive(Clone, Copy, Debug)]
struct ReqSlot {
    tag: u64,
    /// Commands still outstanding.
    remaining: u16,
    /// The first failure among the commands, or 0.
    result: i32,
}

/// A channel's request slots: one per request in flight, each counting the
/// commands it was split into. Sized at open; an empty table is queue-full.
pub struct RequestTable {
    slots: Vec<ReqSlot>,
    free: Vec<u16>,
}

impl RequestTable {
    pub fn new(capacity: usize) -> RequestTable {
        assert!(capacity > 0 && capacity < u16::MAX as usize);
        RequestTable {
            slots: vec![
                ReqSlot {
                    tag: 0,
                    remaining: 0,
                    result: 0,
                };
                capacity
            ],
            free: (0..capacity as u16).rev().collect(),
        }
    }

    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    pub fn in_use(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Takes a slot for a request of `commands` commands, or `None` when full.
    #[inline]
    pub fn start(&mut self, tag: u64, commands: usize) -> Option<u16> {
        assert!(commands > 0 && commands <= u16::MAX as usize);
        let i = self.free.pop()?;
        self.slots[i as usize] = ReqSlot {
            tag,
            remaining: commands as u16,
            result: 0,
        };
        Some(i)
    }

    /// One command of slot `i` finished with `result` (0 or a negative errno);
    /// returns the request's completion when it was the last.
    #[inline]
    pub fn command_done(&mut self, i: u16, result: i32) -> Option<Completion> {
        let slot = &mut self.slots[i as usize];
        assert!(slot.remaining > 0, "completion for idle request slot {i}");
        slot.remaining -= 1;
        if slot.result == 0 {
            slot.result = result;
        }
        if slot.remaining > 0 {
            return None;
        }
        self.free.push(i);
        Some(Completion {
            tag: slot.tag,
            result: slot.result,
        })
    }

    /// The slots still waiting for commands (for failing them all).
    pub fn busy_slots(&self) -> impl Iterator<Item = u16> + '_ {
        (0..self.slots.len() as u16).filter(|&i| self.slots[i as usize].remaining > 0)
    }

    /// Fails every outstanding request with `result`, pushing completions into `out`.
    pub fn fail_all(&mut self, result: i32, out: &mut Vec<Completion>) {
        for i in 0..self.slots.len() {
            let slot = &mut self.slots[i];
            if slot.remaining > 0 {
                slot.remaining = 0;
                out.push(Completion {
                    tag: slot.tag,
                    result: if slot.result != 0 {
                        slot.result
                    } else {
                        result
                    },
                });
                self.free.push(i as u16);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prp_one_two_and_list() {
        let mut list = [0u64; PRP_LIST_ENTRIES];
        // Within one page, aligned or not.
        assert_eq!(
            build_prps(0x10000, 4096, &mut list, 0x9000),
            (0x10000, 0, 0)
        );
        assert_eq!(build_prps(0x10200, 512, &mut list, 0x9000), (0x10200, 0, 0));
        // Two pages: PRP2 is the second page.
        assert_eq!(
            build_prps(0x10000, 8192, &mut list, 0x9000),
            (0x10000, 0x11000, 0)
        );
        // Unaligned start crossing one boundary.
        assert_eq!(
            build_prps(0x10e00, 1024, &mut list, 0x9000),
            (0x10e00, 0x11000, 0)
        );
        // Three pages: a list with two entries.
        assert_eq!(
            build_prps(0x10000, 12288, &mut list, 0x9000),
            (0x10000, 0x9000, 2)
        );
        assert_eq!(&list[..2], &[0x11000, 0x12000]);
        // Unaligned 8 KiB spans three pages.
        assert_eq!(
            build_prps(0x10200, 8192, &mut list, 0x9000),
            (0x10200, 0x9000, 2)
        );
        assert_eq!(&list[..2], &[0x11000, 0x12000]);
        // 1 MiB aligned: PRP1 + 255 list entries.
        let (p1, p2, n) = build_prps(0x4000_0000, 1 << 20, &mut list, 0x9000);
        assert_eq!((p1, p2, n), (0x4000_0000, 0x9000, 255));
        assert_eq!(list[254], 0x4000_0000 + 255 * 4096);
        // The largest transfer at the worst offset still fits one list page.
        let (_, _, n) = build_prps(0x4000_0004, PRP_TRANSFER_BYTES_MAX, &mut list, 0x9000);
        assert_eq!(n, PRP_LIST_ENTRIES);
    }

    #[test]
    #[should_panic(expected = "PRP list entries")]
    fn prp_list_overflow_is_a_bug() {
        let mut list = [0u64; 4];
        build_prps(0, 6 * 4096, &mut list, 0x9000);
    }

    #[test]
    fn status_decoding() {
        // Status field as the CQE carries it: phase in bit 0.
        let cqe = Cqe {
            status_phase: (0x0281 << 1) | 1,
            ..Cqe::default()
        };
        assert!(cqe.phase());
        let s = cqe.status();
        assert_eq!((s.sct(), s.sc()), (2, 0x81));
        assert_eq!(s.to_errno(), -libc::EIO);
        assert!(s.to_string().contains("unrecovered read error"));
        let dnr = Status(0x4000 | 0x0002);
        assert!(dnr.dnr());
        assert_eq!(dnr.to_errno(), -libc::EINVAL);
        assert!(dnr.to_string().contains("DNR"));
        assert_eq!(Status(0x80).to_errno(), -libc::ERANGE);
        assert_eq!(Status(0x08).to_errno(), -libc::ECANCELED);
        assert_eq!(Status(0x0386).to_errno(), -libc::ENOLINK);
        assert!(Status::SUCCESS.is_success());
        assert_eq!(Status::SUCCESS.to_errno(), 0);
        // More/CRD bits do not change the meaning.
        assert!(Status(0x2000).is_success());
        assert!(csts_fatal(0b11));
        assert!(csts_fatal(u32::MAX));
        assert!(!csts_fatal(0b1));
    }

    #[test]
    fn commands_and_pieces() {
        let req = IoRequest::write(7, 1 << 20, std::ptr::null_mut(), 3 << 19, 0);
        let p: Vec<Piece> = pieces(&req, 512, 512 << 10).collect();
        assert_eq!(p.len(), 3);
        assert_eq!(piece_count(&req, 512, 512 << 10), 3);
        assert_eq!(p[1].offset_bytes, (1 << 20) + (512 << 10));
        assert_eq!(p[2].buf_offset, 1 << 20);
        let sqe = io_command(IoKind::Write, true, 1, 9, &p[0]);
        assert_eq!(sqe.opcode, io_opcode::WRITE);
        assert_eq!(sqe.cdw10, (1 << 20) >> 9);
        assert_eq!(sqe.cdw12 & 0xffff, 1023);
        assert_ne!(sqe.cdw12 & CDW12_FUA, 0);
        // Trim is Write Zeroes with DEAC; NLB is 16 bits, so 64 MiB of 512 B
        // blocks takes two commands.
        let trim = IoRequest::range(1, IoKind::Trim, (1 << 40) + 4096, 64 << 20);
        assert_eq!(piece_count(&trim, 512, 4096), 2);
        let t: Vec<Piece> = pieces(&trim, 512, 4096).collect();
        let sqe = io_command(IoKind::Trim, false, 3, 9, &t[0]);
        assert_eq!(sqe.opcode, io_opcode::WRITE_ZEROES);
        assert_eq!(sqe.cdw12, 0xffff | CDW12_DEAC);
        let slba = ((1u64 << 40) + 4096) >> 9;
        assert_eq!((sqe.cdw10, sqe.cdw11), (slba as u32, (slba >> 32) as u32));
        assert_eq!(sqe.nsid, 3);
        let flush = IoRequest::flush(2);
        assert_eq!(pieces(&flush, 4096, 4096).count(), 1);
        assert_eq!(
            io_command(
                IoKind::Flush,
                false,
                1,
                12,
                &Piece {
                    offset_bytes: 0,
                    len_bytes: 0,
                    buf_offset: 0
                }
            )
            .opcode,
            io_opcode::FLUSH
        );
        // Admin builders.
        let cq = Sqe::create_io_cq(3, 256, 0x1000);
        assert_eq!((cq.cdw10, cq.cdw11), ((255 << 16) | 3, 1));
        let sq = Sqe::create_io_sq(3, 256, 3, 0x2000);
        assert_eq!(sq.cdw11, (3 << 16) | 1);
        assert_eq!(Sqe::set_queue_count(4).cdw11, 0x0003_0003);
    }

    #[test]
    fn identify_parsing() {
        let mut page = vec![0u8; 4096];
        page[4..12].copy_from_slice(b"SER123  ");
        page[24..28].copy_from_slice(b"QEMU");
        page[77] = 7;
        page[520] = 1 << 3;
        page[525] = 1;
        page[516] = 2;
        let c = IdentifyController::parse(&page);
        assert_eq!(c.serial, "SER123");
        assert_eq!(c.model, "QEMU");
        assert_eq!(c.mdts_bytes(4096), Some(512 << 10));
        assert!(c.supports_write_zeroes() && c.vwc);
        assert_eq!(c.nn, 2);
        let mut ns = vec![0u8; 4096];
        ns[0..8].copy_from_slice(&(1u64 << 21).to_le_bytes());
        ns[25] = 1; // two formats
        ns[26] = 1; // format 1 in use
        ns[128..132].copy_from_slice(&(9u32 << 16).to_le_bytes());
        ns[132..136].copy_from_slice(&(12u32 << 16).to_le_bytes());
        let n = IdentifyNamespace::parse(&ns).unwrap();
        assert_eq!((n.nsze, n.lba_shift, n.metadata_bytes), (1 << 21, 12, 0));
        ns[26] = 5;
        assert!(IdentifyNamespace::parse(&ns)
            .unwrap_err()
            .contains("not one of the 2 formats"));
        let mut list = vec![0u8; 4096];
        list[0] = 1;
        list[4] = 3;
        assert_eq!(parse_namespace_list(&list), vec![1, 3]);
    }

    #[test]
    fn request_table_gathers_split_commands() {
        let mut t = RequestTable::new(2);
        let a = t.start(10, 3).unwrap();
        let b = t.start(11, 1).unwrap();
        assert_eq!(t.start(12, 1), None, "full table is queue-full");
        assert_eq!(t.command_done(a, 0), None);
        assert_eq!(t.command_done(a, -libc::EIO), None);
        assert_eq!(
            t.command_done(b, 0),
            Some(Completion { tag: 11, result: 0 })
        );
        assert_eq!(
            t.command_done(a, 0),
            Some(Completion {
                tag: 10,
                result: -libc::EIO
            }),
            "the first error wins"
        );
        let c = t.start(13, 2).unwrap();
        t.command_done(c, 0);
        let mut out = Vec::new();
        t.fail_all(-libc::ETIMEDOUT, &mut out);
        assert_eq!(
            out,
            vec![Completion {
                tag: 13,
                result: -libc::ETIMEDOUT
            }]
        );
        assert_eq!(t.in_use(), 0);
    }
}
