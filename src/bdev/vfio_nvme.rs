//! `nvme:PCI_BDF[?ns=N][&timeout_ms=MS]`: a user-space NVMe driver on VFIO,
//! the way SPDK's PCIe transport drives a controller.
//!
//! - **Set-up** ([`Controller::open`]): container, IOMMU group and device fd
//!   ([`super::nvme::vfio`]), bus mastering on in config space, BAR0 mapped,
//!   controller disabled and re-enabled from CAP/CC/CSTS with the admin queue
//!   programmed, doorbells at `0x1000 + (2*qid + is_cq) * (4 << CAP.DSTRD)`.
//!   Identify Controller and Namespace give the geometry; Set Features asks
//!   for I/O queue pairs. One controller serves every namespace spec of its
//!   BDF in the process.
//! - **Queues**: each [`IoChannel`] (one per reactor) creates its own I/O CQ
//!   and SQ through the admin queue, and from then on owns them alone: it
//!   writes SQEs, rings its SQ tail doorbell once per [`IoChannel::submit_pending`],
//!   reaps CQEs by the phase bit and rings its CQ head doorbell once per
//!   reaped batch. Only the admin queue (channel open/close) takes a lock.
//! - **DMA**: each channel owns a 4 GiB IOVA window. Its rings and PRP list
//!   pages come from a [`DmaPool`] mapped at the window's start, the
//!   reactor's pool is mapped with `VFIO_IOMMU_MAP_DMA` at +64 MiB, so a
//!   pool buffer's IOVA is one subtraction. Other buffers (metadata I/O off
//!   the hot path) are mapped per request in the window's last GiB and
//!   unmapped when the request completes.
//! - **Errors**: an NVMe status completes the request with an errno
//!   ([`super::nvme::Status::to_errno`]). A command older than the timeout,
//!   or CSTS.CFS, disables the controller (so no DMA can land later) and
//!   fails every outstanding request; later requests complete with EIO.
//! - **Release**: the last user sets CC.SHN, waits for CSTS.SHST, turns bus
//!   mastering off and closes the fds. Rebinding to the kernel driver is
//!   the administrator's step (README, "NVMe through VFIO").

use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use super::nvme::vfio::{iova_windows, RegionInfo, VfioDevice, BAR0_REGION, CONFIG_REGION};
use super::nvme::{
    self, build_prps, csts_fatal, io_command, piece_count, pieces, Cqe, IdentifyController,
    IdentifyNamespace, RequestTable, Sqe, PAGE_BYTES, PRP_LIST_ENTRIES, PRP_TRANSFER_BYTES_MAX,
};
use super::{
    BlockDevice, ChannelOptions, Completion, DeviceError, DeviceInfo, IoChannel, IoKind, IoRequest,
    SubmitError,
};
use crate::clock::{ticks, TickRate};
use crate::dma::DmaPool;

const REG_CAP: usize = 0x00;
const REG_VS: usize = 0x08;
const REG_CC: usize = 0x14;
const REG_CSTS: usize = 0x1c;
const REG_AQA: usize = 0x24;
const REG_ASQ: usize = 0x28;
const REG_ACQ: usize = 0x30;
const DOORBELL_BASE: usize = 0x1000;

const CC_EN: u32 = 1;
const CC_IOSQES_64: u32 = 6 << 16;
const CC_IOCQES_16: u32 = 4 << 20;
const CC_SHN_MASK: u32 = 3 << 14;
const CC_SHN_NORMAL: u32 = 1 << 14;
const CSTS_RDY: u32 = 1;
const CSTS_SHST_MASK: u32 = 3 << 2;
const CSTS_SHST_DONE: u32 = 2 << 2;

const PCI_COMMAND: u64 = 0x04;
const PCI_COMMAND_MEMORY: u16 = 1 << 1;
const PCI_COMMAND_MASTER: u16 = 1 << 2;
const PCI_COMMAND_INTX_DISABLE: u16 = 1 << 10;

const ADMIN_ENTRIES: u16 = 32;
/// I/O queue pairs kiln asks the controller for (one per reactor is needed).
const IO_PAIRS_WANTED: u16 = 64;

/// Each channel's IOVA window and its layout.
const WINDOW_BYTES: u64 = 4 << 30;
const WINDOW_POOL_OFF: u64 = 64 << 20;
const WINDOW_DYN_OFF: u64 = 3 << 30;
const WINDOW_DYN_BYTES: u64 = WINDOW_BYTES - WINDOW_DYN_OFF;
const RING_BYTES_MAX: u64 = WINDOW_POOL_OFF;
const POOL_BYTES_MAX: u64 = WINDOW_DYN_OFF - WINDOW_POOL_OFF;

/// Empty polls between health checks (timeouts, CSTS.CFS) while I/O is outstanding.
const HEALTH_CHECK_POLLS: u32 = 1024;
const TIMEOUT_MS_DEFAULT: u64 = 30_000;

/// BAR0, mapped. Registers are read and written with volatile 32-bit accesses.
struct Bar {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is device memory shared by design; every access is a volatile
// 32-bit load or store at a checked offset, and each doorbell is written by one owner.
unsafe impl Send for Bar {}
// SAFETY: as above.
unsafe impl Sync for Bar {}

impl Bar {
    fn read32(&self, off: usize) -> u32 {
        assert!(off + 4 <= self.len && off % 4 == 0, "BAR0 read at {off:#x}");
        // SAFETY: in bounds and aligned (checked); MMIO wants volatile.
        unsafe { std::ptr::read_volatile(self.ptr.add(off) as *const u32) }
    }

    fn write32(&self, off: usize, value: u32) {
        assert!(
            off + 4 <= self.len && off % 4 == 0,
            "BAR0 write at {off:#x}"
        );
        // SAFETY: in bounds and aligned (checked); MMIO wants volatile.
        unsafe { std::ptr::write_volatile(self.ptr.add(off) as *mut u32, value) }
    }

    fn read64(&self, off: usize) -> u64 {
        self.read32(off) as u64 | (self.read32(off + 4) as u64) << 32
    }

    fn write64(&self, off: usize, value: u64) {
        self.write32(off, value as u32);
        self.write32(off + 4, (value >> 32) as u32);
    }

    fn doorbell(&self, off: usize) -> *mut u32 {
        assert!(
            off + 4 <= self.len,
            "doorbell {off:#x} past BAR0's {} mapped bytes",
            self.len
        );
        // SAFETY: in bounds (checked).
        unsafe { self.ptr.add(off) as *mut u32 }
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        // SAFETY: the mapping was created with this length and nothing uses it any more.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
    }
}

/// One submission/completion queue pair's ring state.
struct Queue {
    sq: *mut Sqe,
    cq: *const Cqe,
    entries: u16,
    sq_tail: u16,
    sq_rung: u16,
    cq_head: u16,
    phase: bool,
    sq_doorbell: *mut u32,
    cq_doorbell: *mut u32,
}

// SAFETY: a Queue is owned by exactly one thread at a time (a channel, or the admin
// state under its mutex); its pointers target DMA memory and doorbells it alone uses.
unsafe impl Send for Queue {}

impl Queue {
    fn new(sq: *mut Sqe, cq: *const Cqe, entries: u16, bar: &Bar, qid: u16, stride: usize) -> Self {
        Queue {
            sq,
            cq,
            entries,
            sq_tail: 0,
            sq_rung: 0,
            cq_head: 0,
            phase: true,
            sq_doorbell: bar.doorbell(DOORBELL_BASE + (2 * qid as usize) * stride),
            cq_doorbell: bar.doorbell(DOORBELL_BASE + (2 * qid as usize + 1) * stride),
        }
    }

    /// Writes one SQE at the tail (the doorbell is rung later, once per batch).
    #[inline]
    fn push(&mut self, sqe: &Sqe) {
        // SAFETY: sq_tail < entries and the SQ holds `entries` SQEs; the caller keeps
        // outstanding commands below `entries`, so this slot was consumed by the device.
        unsafe { std::ptr::write_volatile(self.sq.add(self.sq_tail as usize), *sqe) };
        self.sq_tail = if self.sq_tail + 1 == self.entries {
            0
        } else {
            self.sq_tail + 1
        };
    }

    /// Rings the SQ tail doorbell if SQEs were pushed since the last ring; returns how many.
    #[inline]
    fn ring_sq(&mut self) -> usize {
        if self.sq_tail == self.sq_rung {
            return 0;
        }
        let n = (self.sq_tail as usize + self.entries as usize - self.sq_rung as usize)
            % self.entries as usize;
        // The SQE stores must reach memory before the device sees the new tail.
        fence(Ordering::SeqCst);
        // SAFETY: the doorbell lies inside BAR0 (checked at construction).
        unsafe { std::ptr::write_volatile(self.sq_doorbell, self.sq_tail as u32) };
        self.sq_rung = self.sq_tail;
        n
    }

    /// The CQE at the head if the device has posted it (its phase tag matches).
    #[inline]
    fn peek(&self) -> Option<Cqe> {
        // SAFETY: cq_head < entries; the CQ holds `entries` CQEs of DMA memory.
        let slot = unsafe { self.cq.add(self.cq_head as usize) };
        // SAFETY: as above; the status word is read first, alone.
        let status = unsafe { std::ptr::read_volatile(std::ptr::addr_of!((*slot).status_phase)) };
        if (status & 1 == 1) != self.phase {
            return None;
        }
        fence(Ordering::Acquire);
        // SAFETY: as above; the entry is complete once its phase tag flipped.
        Some(unsafe { std::ptr::read_volatile(slot) })
    }

    #[inline]
    fn advance(&mut self) {
        self.cq_head += 1;
        if self.cq_head == self.entries {
            self.cq_head = 0;
            self.phase = !self.phase;
        }
    }

    /// Tells the device how far the CQ was consumed (once per reaped batch).
    #[inline]
    fn ring_cq(&mut self) {
        // SAFETY: the doorbell lies inside BAR0 (checked at construction).
        unsafe { std::ptr::write_volatile(self.cq_doorbell, self.cq_head as u32) };
    }
}

/// DMA memory kiln allocated and mapped into the IOMMU at `iova`.
struct DmaMem {
    pool: DmaPool,
    iova: u64,
}

impl DmaMem {
    fn new(vfio: &VfioDevice, pages: usize, iova: u64) -> Result<DmaMem, String> {
        let pool = DmaPool::new(PAGE_BYTES as usize, pages)
            .map_err(|e| format!("DMA memory of {pages} pages: {e}"))?;
        let (ptr, len) = pool.region();
        // SAFETY: the pool's mapping lives in `DmaMem` and is unmapped from the IOMMU in
        // `Controller::unmap` before the pool is dropped.
        unsafe { vfio.map_dma(ptr, len as u64, iova)? };
        Ok(DmaMem { pool, iova })
    }

    fn page(&self, k: usize) -> (*mut u8, u64) {
        (
            self.pool.buf(k as u16).ptr,
            self.iova + k as u64 * PAGE_BYTES,
        )
    }

    fn len(&self) -> u64 {
        self.pool.region().1 as u64
    }
}

struct AdminState {
    queue: Queue,
    mem: DmaMem,
    next_cid: u16,
    free_qids: Vec<u16>,
    free_windows: Vec<u64>,
}

/// One controller, shared by every namespace device and channel on it.
struct Controller {
    bdf: String,
    vfio: VfioDevice,
    bar: Bar,
    config: RegionInfo,
    doorbell_stride: usize,
    /// CAP.MQES + 1: the largest queue.
    queue_entries_max: u32,
    /// CAP.TO: how long enable, disable and shutdown may take.
    ready_timeout: Duration,
    ident: IdentifyController,
    admin: Mutex<AdminState>,
    failed: AtomicBool,
}

static CONTROLLERS: Mutex<Vec<(String, Weak<Controller>)>> = Mutex::new(Vec::new());

impl Controller {
    /// The controller of `bdf`, opened once per process.
    fn get(bdf: &str) -> Result<Arc<Controller>, String> {
        let mut all = CONTROLLERS.lock().unwrap_or_else(|e| e.into_inner());
        all.retain(|(_, w)| w.strong_count() > 0);
        if let Some(c) = all
            .iter()
            .find(|(b, _)| b == bdf)
            .and_then(|(_, w)| w.upgrade())
        {
            return Ok(c);
        }
        let c = Arc::new(Controller::open(bdf)?);
        all.push((bdf.to_string(), Arc::downgrade(&c)));
        Ok(c)
    }

    fn open(bdf: &str) -> Result<Controller, String> {
        let vfio = VfioDevice::open(bdf)?;
        let config = vfio.region_info(CONFIG_REGION)?;
        let cmd = vfio.config_read16(&config, PCI_COMMAND)?;
        vfio.config_write16(
            &config,
            PCI_COMMAND,
            cmd | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER | PCI_COMMAND_INTX_DISABLE,
        )?;
        let bar_info = vfio.region_info(BAR0_REGION)?;
        if !VfioDevice::region_mmappable(&bar_info) || bar_info.size < 0x2000 {
            return Err(format!(
                "{bdf}: BAR0 ({} bytes) cannot be mapped",
                bar_info.size
            ));
        }
        // The whole BAR, or (if the kernel keeps the MSI-X table out of reach) the
        // registers and doorbells, which come first.
        let (ptr, len) = match vfio.mmap_region(&bar_info, bar_info.size as usize) {
            Ok(p) => (p, bar_info.size as usize),
            Err(_) => (vfio.mmap_region(&bar_info, 0x2000)?, 0x2000),
        };
        let bar = Bar { ptr, len };
        let cap = bar.read64(REG_CAP);
        let vs = bar.read32(REG_VS);
        let queue_entries_max = (cap & 0xffff) as u32 + 1;
        let doorbell_stride = 4usize << ((cap >> 32) & 0xf);
        let ready_timeout = Duration::from_millis(((cap >> 24) & 0xff).max(1) * 500);
        let css = (cap >> 37) & 0xff;
        let mps_min = PAGE_BYTES << ((cap >> 48) & 0xf);
        if css & 1 == 0 {
            return Err(format!(
                "{bdf}: controller does not support the NVM command set (CAP {cap:#x})"
            ));
        }
        if mps_min > PAGE_BYTES {
            return Err(format!(
                "{bdf}: minimum memory page {mps_min} bytes; kiln uses 4096"
            ));
        }
        tracing::info!(
            bdf,
            version = format!("{}.{}.{}", vs >> 16, (vs >> 8) & 0xff, vs & 0xff),
            queue_entries_max,
            doorbell_stride,
            bar0_mapped_bytes = len,
            "NVMe controller over VFIO"
        );
        let windows = iova_windows(
            &vfio.iova_ranges,
            WINDOW_BYTES,
            1 + IO_PAIRS_WANTED as usize,
        );
        if windows.len() < 2 {
            return Err(format!(
                "{bdf}: the IOMMU's IOVA ranges {:x?} have no room for kiln's 4 GiB windows",
                vfio.iova_ranges
            ));
        }
        // Disable, then program the admin queue and enable.
        let wait_csts = |bar: &Bar, what: &str, done: &dyn Fn(u32) -> bool| {
            let t0 = Instant::now();
            loop {
                let csts = bar.read32(REG_CSTS);
                if done(csts) {
                    return Ok(());
                }
                if csts == u32::MAX || t0.elapsed() > ready_timeout {
                    return Err(format!(
                        "{bdf}: controller did not {what} within {ready_timeout:?} (CSTS {csts:#x})"
                    ));
                }
                std::thread::sleep(Duration::from_micros(100));
            }
        };
        let cc = bar.read32(REG_CC);
        if cc & CC_EN != 0 {
            bar.write32(REG_CC, cc & !CC_EN);
        }
        wait_csts(&bar, "disable", &|c| c & CSTS_RDY == 0)?;
        let mem = DmaMem::new(&vfio, 3, windows[0])?;
        let admin_entries = ADMIN_ENTRIES.min(queue_entries_max as u16);
        let (sq_ptr, sq_iova) = mem.page(0);
        let (cq_ptr, cq_iova) = mem.page(1);
        let aqs = admin_entries as u32 - 1;
        bar.write32(REG_AQA, (aqs << 16) | aqs);
        bar.write64(REG_ASQ, sq_iova);
        bar.write64(REG_ACQ, cq_iova);
        bar.write32(REG_CC, CC_EN | CC_IOSQES_64 | CC_IOCQES_16);
        if let Err(e) = wait_csts(&bar, "become ready", &|c| {
            c & CSTS_RDY != 0 || csts_fatal(c)
        }) {
            let _ = vfio.unmap_dma(mem.iova, mem.len());
            return Err(e);
        }
        if csts_fatal(bar.read32(REG_CSTS)) {
            let _ = vfio.unmap_dma(mem.iova, mem.len());
            return Err(format!("{bdf}: controller fatal status while enabling"));
        }
        let queue = Queue::new(
            sq_ptr as *mut Sqe,
            cq_ptr as *const Cqe,
            admin_entries,
            &bar,
            0,
            doorbell_stride,
        );
        let mut ctrl = Controller {
            bdf: bdf.to_string(),
            vfio,
            bar,
            config,
            doorbell_stride,
            queue_entries_max,
            ready_timeout,
            ident: IdentifyController::parse(&[0u8; 4096]),
            admin: Mutex::new(AdminState {
                queue,
                mem,
                next_cid: 0,
                free_qids: Vec::new(),
                free_windows: windows[1..].iter().rev().copied().collect(),
            }),
            failed: AtomicBool::new(false),
        };
        let mut page = vec![0u8; 4096];
        ctrl.admin_data(Sqe::identify(nvme::CNS_CONTROLLER, 0, 0), &mut page)?;
        ctrl.ident = IdentifyController::parse(&page);
        let pairs = match ctrl.admin(Sqe::set_queue_count(IO_PAIRS_WANTED)) {
            Ok(cqe) => ((cqe.dw0 & 0xffff).min(cqe.dw0 >> 16) + 1).min(IO_PAIRS_WANTED as u32),
            Err(e) => {
                tracing::warn!(
                    bdf,
                    "Set Features (number of queues) failed, using 1 pair: {e}"
                );
                1
            }
        } as u16;
        // Every pair's doorbells must lie inside the mapped part of BAR0.
        let pairs_mapped =
            ((ctrl.bar.len - DOORBELL_BASE) / (2 * doorbell_stride)).saturating_sub(1);
        let pairs = pairs.min(pairs_mapped as u16);
        let admin = ctrl.admin.get_mut().unwrap();
        admin.free_qids = (1..=pairs).rev().collect();
        tracing::info!(
            bdf,
            model = %ctrl.ident.model,
            serial = %ctrl.ident.serial,
            firmware = %ctrl.ident.firmware,
            mdts = ctrl.ident.mdts,
            io_queue_pairs = pairs,
            "NVMe controller identified"
        );
        Ok(ctrl)
    }

    fn csts(&self) -> u32 {
        self.bar.read32(REG_CSTS)
    }

    /// Runs one admin command and waits for it.
    fn admin(&self, sqe: Sqe) -> Result<Cqe, String> {
        self.admin_inner(sqe, None)
    }

    /// Runs one admin command that returns a 4 KiB page into `out`.
    fn admin_data(&self, sqe: Sqe, out: &mut [u8]) -> Result<Cqe, String> {
        self.admin_inner(sqe, Some(out))
    }

    fn admin_inner(&self, mut sqe: Sqe, out: Option<&mut [u8]>) -> Result<Cqe, String> {
        if self.failed.load(Ordering::Acquire) {
            return Err(format!("{}: controller failed earlier", self.bdf));
        }
        let mut admin = self.admin.lock().unwrap_or_else(|e| e.into_inner());
        let admin = &mut *admin;
        let (data_ptr, data_iova) = admin.mem.page(2);
        if out.is_some() {
            sqe.prp1 = data_iova;
        }
        sqe.cid = admin.next_cid;
        admin.next_cid = admin.next_cid.wrapping_add(1);
        admin.queue.push(&sqe);
        admin.queue.ring_sq();
        let t0 = Instant::now();
        let limit = self.ready_timeout.max(Duration::from_secs(10));
        let cqe = loop {
            if let Some(cqe) = admin.queue.peek() {
                admin.queue.advance();
                admin.queue.ring_cq();
                if cqe.cid == sqe.cid {
                    break cqe;
                }
                continue;
            }
            let csts = self.csts();
            if csts_fatal(csts) || t0.elapsed() > limit {
                self.fail();
                return Err(format!(
                    "{}: admin command {:#04x} {} (CSTS {csts:#x})",
                    self.bdf,
                    sqe.opcode,
                    if csts_fatal(csts) {
                        "hit controller fatal status".to_string()
                    } else {
                        format!("timed out after {limit:?}")
                    }
                ));
            }
            std::thread::yield_now();
        };
        if !cqe.status().is_success() {
            return Err(format!(
                "{}: admin command {:#04x}: {}",
                self.bdf,
                sqe.opcode,
                cqe.status()
            ));
        }
        if let Some(out) = out {
            let n = out.len().min(PAGE_BYTES as usize);
            // SAFETY: the data page is 4 KiB of DMA memory, written by the completed command.
            out[..n].copy_from_slice(unsafe { std::slice::from_raw_parts(data_ptr, n) });
        }
        Ok(cqe)
    }

    /// Marks the controller failed and disables it, which stops all its DMA.
    fn fail(&self) {
        if !self.failed.swap(true, Ordering::AcqRel) {
            tracing::error!(bdf = %self.bdf, csts = self.csts(), "NVMe controller failed; disabling it");
            let cc = self.bar.read32(REG_CC);
            self.bar.write32(REG_CC, cc & !CC_EN);
        }
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        if !self.failed.load(Ordering::Acquire) {
            let cc = self.bar.read32(REG_CC);
            self.bar
                .write32(REG_CC, (cc & !CC_SHN_MASK) | CC_SHN_NORMAL);
            let t0 = Instant::now();
            while self.csts() & CSTS_SHST_MASK != CSTS_SHST_DONE {
                if t0.elapsed() > self.ready_timeout || csts_fatal(self.csts()) {
                    tracing::warn!(bdf = %self.bdf, csts = self.csts(), "shutdown did not complete");
                    break;
                }
                std::thread::sleep(Duration::from_micros(200));
            }
            let cc = self.bar.read32(REG_CC);
            self.bar.write32(REG_CC, cc & !CC_EN);
        }
        let admin = self.admin.get_mut().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = self.vfio.unmap_dma(admin.mem.iova, admin.mem.len()) {
            tracing::warn!(bdf = %self.bdf, "{e}");
        }
        if let Ok(cmd) = self.vfio.config_read16(&self.config, PCI_COMMAND) {
            let _ = self
                .vfio
                .config_write16(&self.config, PCI_COMMAND, cmd & !PCI_COMMAND_MASTER);
        }
        tracing::info!(bdf = %self.bdf, "NVMe controller shut down and released");
    }
}

/// One namespace of a controller driven through VFIO.
pub struct VfioNvmeDevice {
    info: DeviceInfo,
    ctrl: Arc<Controller>,
    nsid: u32,
    lba_shift: u32,
    /// Largest data transfer of one command (MDTS, capped at one PRP list page).
    transfer_bytes_max: u32,
    write_zeroes: bool,
    timeout_ms: u64,
    rate: TickRate,
    prp_list_commands: Arc<AtomicU64>,
}

impl VfioNvmeDevice {
    pub fn open(
        name: String,
        bdf: &str,
        nsid: Option<u32>,
        timeout_ms: Option<u64>,
    ) -> Result<VfioNvmeDevice, DeviceError> {
        let err = |e: String| DeviceError::Io(format!("nvme:{bdf}: {e}"));
        let ctrl = Controller::get(bdf).map_err(err)?;
        let mut page = vec![0u8; 4096];
        let nsid = match nsid {
            Some(n) => n,
            None => {
                ctrl.admin_data(Sqe::identify(nvme::CNS_ACTIVE_NAMESPACES, 0, 0), &mut page)
                    .map_err(err)?;
                *nvme::parse_namespace_list(&page)
                    .first()
                    .ok_or_else(|| err("the controller has no active namespace".into()))?
            }
        };
        ctrl.admin_data(Sqe::identify(nvme::CNS_NAMESPACE, nsid, 0), &mut page)
            .map_err(|e| err(format!("namespace {nsid}: {e}")))?;
        let ns =
            IdentifyNamespace::parse(&page).map_err(|e| err(format!("namespace {nsid}: {e}")))?;
        if ns.nsze == 0 {
            return Err(err(format!("namespace {nsid} is not active (size 0)")));
        }
        if ns.metadata_bytes != 0 {
            return Err(err(format!(
                "namespace {nsid} is formatted with {} metadata bytes per block; kiln needs 0",
                ns.metadata_bytes
            )));
        }
        let transfer_bytes_max = ctrl
            .ident
            .mdts_bytes(PAGE_BYTES)
            .unwrap_or(u64::MAX)
            .min(PRP_TRANSFER_BYTES_MAX as u64) as u32;
        tracing::info!(
            bdf,
            nsid,
            blocks = ns.nsze,
            block_bytes = 1u32 << ns.lba_shift,
            transfer_bytes_max,
            "NVMe namespace"
        );
        Ok(VfioNvmeDevice {
            info: DeviceInfo {
                name,
                product: "vfio-nvme",
                block_size: 1 << ns.lba_shift,
                num_blocks: ns.nsze,
                buf_align: 4,
                persistent: true,
                volatile_write_cache: ctrl.ident.vwc,
            },
            write_zeroes: ctrl.ident.supports_write_zeroes(),
            ctrl,
            nsid,
            lba_shift: ns.lba_shift,
            transfer_bytes_max,
            timeout_ms: timeout_ms.unwrap_or(TIMEOUT_MS_DEFAULT),
            rate: TickRate::calibrate(),
            prp_list_commands: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Commands so far (of closed channels) whose data needed a PRP list.
    pub fn prp_list_commands(&self) -> u64 {
        self.prp_list_commands.load(Ordering::Relaxed)
    }

    pub fn nsid(&self) -> u32 {
        self.nsid
    }
}

impl BlockDevice for VfioNvmeDevice {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn open_channel(&self, opts: &ChannelOptions<'_>) -> Result<Box<dyn IoChannel>, DeviceError> {
        let ctrl = &self.ctrl;
        let err = |e: String| DeviceError::Io(format!("nvme:{}: {e}", ctrl.bdf));
        let capacity = (opts.queue_depth.max(1) as usize).min(ctrl.queue_entries_max as usize - 1);
        let command_slots = (capacity * 2)
            .max(8)
            .min(ctrl.queue_entries_max as usize - 1);
        let entries = command_slots as u16 + 1;
        let sq_pages = (entries as u64 * 64).div_ceil(PAGE_BYTES) as usize;
        let cq_pages = (entries as u64 * 16).div_ceil(PAGE_BYTES) as usize;
        let pages = sq_pages + cq_pages + command_slots;
        if pages as u64 * PAGE_BYTES > RING_BYTES_MAX {
            return Err(err(format!(
                "queue of {entries} entries does not fit the ring window"
            )));
        }
        let (qid, window) = {
            let mut admin = ctrl.admin.lock().unwrap_or_else(|e| e.into_inner());
            let Some(qid) = admin.free_qids.pop() else {
                return Err(err("no free I/O queue pair (one per reactor)".into()));
            };
            let Some(window) = admin.free_windows.pop() else {
                admin.free_qids.push(qid);
                return Err(err("no free IOVA window".into()));
            };
            (qid, window)
        };
        let give_back = |ctrl: &Controller| {
            let mut admin = ctrl.admin.lock().unwrap_or_else(|e| e.into_inner());
            admin.free_qids.push(qid);
            admin.free_windows.push(window);
        };
        let ring = match DmaMem::new(&ctrl.vfio, pages, window) {
            Ok(r) => r,
            Err(e) => {
                give_back(ctrl);
                return Err(err(e));
            }
        };
        let mut pool_map = None;
        if let Some(pool) = opts.pool {
            let (ptr, len) = pool.region();
            let iova = window + WINDOW_POOL_OFF;
            let mapped = if len as u64 > POOL_BYTES_MAX {
                Err(format!(
                    "DMA pool of {len} bytes exceeds the {POOL_BYTES_MAX}-byte window"
                ))
            } else {
                // SAFETY: the reactor keeps its pool alive longer than any channel it
                // opens (channels are dropped first), and the channel unmaps it on drop.
                unsafe { ctrl.vfio.map_dma(ptr, len as u64, iova) }
            };
            match mapped {
                Ok(()) => pool_map = Some((ptr as usize, len, iova)),
                Err(e) => {
                    let _ = ctrl.vfio.unmap_dma(ring.iova, ring.len());
                    give_back(ctrl);
                    return Err(err(e));
                }
            }
        }
        let (sq_ptr, sq_iova) = ring.page(0);
        let (cq_ptr, cq_iova) = ring.page(sq_pages);
        let created = ctrl
            .admin(Sqe::create_io_cq(qid, entries, cq_iova))
            .and_then(|_| {
                ctrl.admin(Sqe::create_io_sq(qid, entries, qid, sq_iova))
                    .inspect_err(|_| {
                        let _ = ctrl.admin(Sqe::delete_io_cq(qid));
                    })
            });
        if let Err(e) = created {
            let _ = ctrl.vfio.unmap_dma(ring.iova, ring.len());
            if let Some((_, len, iova)) = pool_map {
                let _ = ctrl.vfio.unmap_dma(iova, len as u64);
            }
            give_back(ctrl);
            return Err(err(format!("creating I/O queue pair {qid}: {e}")));
        }
        let queue = Queue::new(
            sq_ptr as *mut Sqe,
            cq_ptr as *const Cqe,
            entries,
            &ctrl.bar,
            qid,
            ctrl.doorbell_stride,
        );
        let prp_base = sq_pages + cq_pages;
        let commands = (0..command_slots)
            .map(|k| {
                let (ptr, iova) = ring.page(prp_base + k);
                Command {
                    request: 0,
                    busy: false,
                    submit_ticks: 0,
                    prp_list: ptr as *mut u64,
                    prp_list_iova: iova,
                }
            })
            .collect();
        tracing::debug!(bdf = %ctrl.bdf, qid, entries, "I/O queue pair created");
        Ok(Box::new(VfioNvmeChannel {
            info: self.info.clone(),
            ctrl: ctrl.clone(),
            nsid: self.nsid,
            lba_shift: self.lba_shift,
            transfer_bytes_max: self.transfer_bytes_max,
            write_zeroes: self.write_zeroes,
            qid,
            window,
            queue,
            ring,
            pool_map,
            commands,
            free_commands: (0..command_slots as u16).rev().collect(),
            requests: RequestTable::new(capacity),
            dyn_maps: vec![(0, 0); capacity],
            dyn_next: 0,
            dyn_live: 0,
            failed_out: Vec::with_capacity(capacity),
            inflight: 0,
            capacity,
            empty_polls: 0,
            timeout_ticks: self.rate.from_ns(self.timeout_ms * 1_000_000),
            dead: false,
            prp_list_commands: 0,
            prp_list_total: self.prp_list_commands.clone(),
        }))
    }
}

struct Command {
    /// The request slot this command belongs to.
    request: u16,
    busy: bool,
    submit_ticks: u64,
    /// This command's PRP list page.
    prp_list: *mut u64,
    prp_list_iova: u64,
}

/// One reactor's I/O queue pair on the controller.
struct VfioNvmeChannel {
    info: DeviceInfo,
    ctrl: Arc<Controller>,
    nsid: u32,
    lba_shift: u32,
    transfer_bytes_max: u32,
    write_zeroes: bool,
    qid: u16,
    window: u64,
    queue: Queue,
    ring: DmaMem,
    /// The reactor's pool: (address, length, IOVA).
    pool_map: Option<(usize, usize, u64)>,
    /// Indexed by CID.
    commands: Vec<Command>,
    free_commands: Vec<u16>,
    requests: RequestTable,
    /// Per request slot: a per-request mapping (IOVA, bytes) of a buffer outside the pool.
    dyn_maps: Vec<(u64, u64)>,
    dyn_next: u64,
    dyn_live: usize,
    /// Completions made without the device (after a failure).
    failed_out: Vec<Completion>,
    inflight: usize,
    capacity: usize,
    empty_polls: u32,
    timeout_ticks: u64,
    dead: bool,
    prp_list_commands: u64,
    prp_list_total: Arc<AtomicU64>,
}

impl VfioNvmeChannel {
    /// The IOVA of `len` bytes at `buf`: inside the mapped pool, or mapped now for
    /// this request (`Ok((iova, Some(map)))`).
    fn data_iova(&mut self, buf: *mut u8, len: u32) -> Result<(u64, Option<(u64, u64)>), i32> {
        let addr = buf as usize;
        if let Some((base, size, iova)) = self.pool_map {
            if addr >= base && addr + len as usize <= base + size {
                return Ok((iova + (addr - base) as u64, None));
            }
        }
        let start = addr as u64 & !(PAGE_BYTES - 1);
        let bytes = (addr as u64 + len as u64).next_multiple_of(PAGE_BYTES) - start;
        if bytes > WINDOW_DYN_BYTES {
            return Err(-libc::E2BIG);
        }
        if self.dyn_next + bytes > WINDOW_DYN_BYTES {
            if self.dyn_live > 0 {
                return Err(-libc::EAGAIN);
            }
            self.dyn_next = 0;
        }
        let iova = self.window + WINDOW_DYN_OFF + self.dyn_next;
        // SAFETY: the caller of `submit` keeps the buffer alive until its completion,
        // when `release_dyn` unmaps it.
        if let Err(e) = unsafe { self.ctrl.vfio.map_dma(start as *const u8, bytes, iova) } {
            tracing::warn!(bdf = %self.ctrl.bdf, "{e}");
            return Err(-libc::ENOMEM);
        }
        self.dyn_next += bytes;
        self.dyn_live += 1;
        Ok((iova + (addr as u64 - start), Some((iova, bytes))))
    }

    fn release_dyn(&mut self, request: u16) {
        let (iova, bytes) = std::mem::take(&mut self.dyn_maps[request as usize]);
        if bytes != 0 {
            if let Err(e) = self.ctrl.vfio.unmap_dma(iova, bytes) {
                tracing::warn!(bdf = %self.ctrl.bdf, "{e}");
            }
            self.dyn_live -= 1;
        }
    }

    /// A completion without the device: the request is counted in flight until reaped.
    fn complete_now(&mut self, tag: u64, result: i32) {
        self.failed_out.push(Completion { tag, result });
        self.inflight += 1;
    }

    /// Timeouts and controller-fatal status; fails everything if either hit.
    #[cold]
    fn check_health(&mut self) {
        if self.ctrl.failed.load(Ordering::Acquire) {
            self.fail_all(-libc::EIO);
            return;
        }
        let csts = self.ctrl.csts();
        if csts_fatal(csts) {
            tracing::error!(bdf = %self.ctrl.bdf, qid = self.qid, csts, "controller fatal status (CSTS.CFS)");
            self.ctrl.fail();
            self.fail_all(-libc::EIO);
            return;
        }
        let now = ticks();
        if let Some(c) = self
            .commands
            .iter()
            .find(|c| c.busy && now.saturating_sub(c.submit_ticks) > self.timeout_ticks)
        {
            tracing::error!(
                bdf = %self.ctrl.bdf,
                qid = self.qid,
                request = c.request,
                "NVMe command timed out"
            );
            self.ctrl.fail();
            self.fail_all(-libc::ETIMEDOUT);
        }
    }

    /// The controller is disabled (no DMA can land any more): complete every
    /// outstanding request with `result` and refuse the device from now on.
    fn fail_all(&mut self, result: i32) {
        self.dead = true;
        for c in &mut self.commands {
            c.busy = false;
        }
        self.free_commands = (0..self.commands.len() as u16).rev().collect();
        let before = self.failed_out.len();
        self.requests.fail_all(result, &mut self.failed_out);
        for r in 0..self.dyn_maps.len() as u16 {
            self.release_dyn(r);
        }
        tracing::error!(
            bdf = %self.ctrl.bdf,
            qid = self.qid,
            failed = self.failed_out.len() - before,
            "outstanding requests failed"
        );
    }
}

impl IoChannel for VfioNvmeChannel {
    #[inline]
    unsafe fn submit(&mut self, req: &IoRequest) -> Result<(), SubmitError> {
        self.info.check(req)?;
        if matches!(req.kind, IoKind::WriteZeroes | IoKind::Trim) && !self.write_zeroes {
            return Err(SubmitError::Unsupported);
        }
        if self.inflight >= self.capacity {
            return Err(SubmitError::QueueFull);
        }
        if self.dead {
            self.complete_now(req.tag, -libc::EIO);
            return Ok(());
        }
        let block_bytes = self.info.block_size;
        let count = piece_count(req, block_bytes, self.transfer_bytes_max);
        if count > self.free_commands.len() {
            return Err(if count > self.commands.len() {
                SubmitError::Unsupported
            } else {
                SubmitError::QueueFull
            });
        }
        let data = matches!(req.kind, IoKind::Read | IoKind::Write);
        let (iova, dyn_map) = if data {
            match self.data_iova(req.buf, req.len_bytes) {
                Ok(x) => x,
                Err(e) if e == -libc::EAGAIN => return Err(SubmitError::QueueFull),
                Err(e) => {
                    self.complete_now(req.tag, e);
                    return Ok(());
                }
            }
        } else {
            (0, None)
        };
        let request = self
            .requests
            .start(req.tag, count)
            .expect("request table sized to the channel capacity");
        if let Some(m) = dyn_map {
            self.dyn_maps[request as usize] = m;
        }
        let now = ticks();
        for piece in pieces(req, block_bytes, self.transfer_bytes_max) {
            let cid = self
                .free_commands
                .pop()
                .expect("command slots counted above");
            let cmd = &mut self.commands[cid as usize];
            let mut sqe = io_command(req.kind, req.fua, self.nsid, self.lba_shift, &piece);
            sqe.cid = cid;
            if data {
                // SAFETY: each command slot owns one 4 KiB PRP list page of the ring memory.
                let list =
                    unsafe { std::slice::from_raw_parts_mut(cmd.prp_list, PRP_LIST_ENTRIES) };
                let (prp1, prp2, listed) = build_prps(
                    iova + piece.buf_offset as u64,
                    piece.len_bytes,
                    list,
                    cmd.prp_list_iova,
                );
                sqe.prp1 = prp1;
                sqe.prp2 = prp2;
                if listed > 0 {
                    self.prp_list_commands += 1;
                }
            }
            cmd.request = request;
            cmd.busy = true;
            cmd.submit_ticks = now;
            self.queue.push(&sqe);
        }
        self.inflight += 1;
        Ok(())
    }

    #[inline]
    fn submit_pending(&mut self) -> usize {
        self.queue.ring_sq()
    }

    #[inline]
    fn poll_completions(&mut self, out: &mut [Completion]) -> usize {
        let mut n = 0;
        while n < out.len() {
            let Some(c) = self.failed_out.pop() else {
                break;
            };
            out[n] = c;
            n += 1;
            self.inflight -= 1;
        }
        let mut reaped = 0;
        while n < out.len() {
            let Some(cqe) = self.queue.peek() else {
                break;
            };
            self.queue.advance();
            reaped += 1;
            let cmd = &mut self.commands[cqe.cid as usize];
            assert!(
                cmd.busy,
                "qid {}: completion for idle CID {}",
                self.qid, cqe.cid
            );
            cmd.busy = false;
            let request = cmd.request;
            self.free_commands.push(cqe.cid);
            let status = cqe.status();
            let result = status.to_errno();
            if result != 0 {
                tracing::warn!(bdf = %self.ctrl.bdf, qid = self.qid, cid = cqe.cid, "{status}");
            }
            if let Some(done) = self.requests.command_done(request, result) {
                self.release_dyn(request);
                out[n] = done;
                n += 1;
                self.inflight -= 1;
            }
        }
        if reaped > 0 {
            self.queue.ring_cq();
            self.empty_polls = 0;
        } else if self.inflight > self.failed_out.len() {
            self.empty_polls += 1;
            if self.empty_polls % HEALTH_CHECK_POLLS == 0 {
                self.check_health();
            }
        }
        n
    }

    fn inflight(&self) -> usize {
        self.inflight
    }

    /// Completions are polled (interrupts are off), so a reactor with I/O
    /// outstanding must not park.
    fn next_deadline_ns(&self) -> Option<u64> {
        (self.inflight > 0).then(crate::clock::now_ns)
    }
}

impl Drop for VfioNvmeChannel {
    fn drop(&mut self) {
        self.prp_list_total
            .fetch_add(self.prp_list_commands, Ordering::Relaxed);
        let ctrl = self.ctrl.clone();
        if !self.dead && !ctrl.failed.load(Ordering::Acquire) {
            if self.inflight > 0 {
                tracing::warn!(bdf = %ctrl.bdf, qid = self.qid, inflight = self.inflight, "channel closed with I/O outstanding; deleting its SQ aborts it");
            }
            // Deleting the SQ completes (aborts) whatever it still holds before the
            // delete itself completes, so no DMA can follow.
            if let Err(e) = ctrl
                .admin(Sqe::delete_io_sq(self.qid))
                .and_then(|_| ctrl.admin(Sqe::delete_io_cq(self.qid)))
            {
                tracing::error!("{e}");
                ctrl.fail();
            }
        }
        for r in 0..self.dyn_maps.len() as u16 {
            self.release_dyn(r);
        }
        if let Some((_, len, iova)) = self.pool_map {
            if let Err(e) = ctrl.vfio.unmap_dma(iova, len as u64) {
                tracing::warn!(bdf = %ctrl.bdf, "{e}");
            }
        }
        if let Err(e) = ctrl.vfio.unmap_dma(self.ring.iova, self.ring.len()) {
            tracing::warn!(bdf = %ctrl.bdf, "{e}");
        }
        let mut admin = ctrl.admin.lock().unwrap_or_else(|e| e.into_inner());
        if !ctrl.failed.load(Ordering::Acquire) {
            admin.free_qids.push(self.qid);
        }
        admin.free_windows.push(self.window);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_layout_is_disjoint() {
        const { assert!(RING_BYTES_MAX <= WINDOW_POOL_OFF) };
        const { assert!(WINDOW_POOL_OFF + POOL_BYTES_MAX <= WINDOW_DYN_OFF) };
        const { assert!(WINDOW_DYN_OFF + WINDOW_DYN_BYTES == WINDOW_BYTES) };
    }

    #[test]
    fn opening_a_missing_pci_device_says_why() {
        let e = VfioNvmeDevice::open("nvme:0000:ff:1f.7".into(), "0000:ff:1f.7", None, None)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("0000:ff:1f.7") && e.contains("iommu_group"),
            "{e}"
        );
    }
}
