//! `mirror:SPEC_A|SPEC_B`: RAID-1 over any two devices, with failover, a
//! durable record of which leg is stale, and background resync.
//!
//! ## Data path
//! Every write (and write-zeroes, trim, flush) goes to each leg that is not
//! faulted; the client's completion comes when both legs answered. A read goes
//! to one in-sync leg, chosen by a per-channel latency average (with a probe of
//! the other leg every [`PROBE_EVERY`] reads); a failed read is retried on the
//! other leg. A leg that fails a write the other leg completed, or a read the
//! other leg then served, or a write the other leg finished more than
//! `timeout` earlier, is marked *faulted*: no I/O goes to it any more and the
//! mirror is degraded. The client sees no error while one leg is healthy.
//!
//! ## Durable state
//! Each leg reserves its first [`MIRROR_RESERVED_BYTES`]; a superblock at
//! offset 0 (a crc32c frame, see `docs/FORMAT.md`) holds the mirror's uuid,
//! a generation and a stale flag per leg. A write that did not reach a leg is
//! acknowledged only after a superblock saying "that leg is stale" is durable
//! on the surviving leg, so a restart can never read an acknowledged block
//! from a leg that missed it. On open the superblock with the higher
//! generation wins; a stale leg is resynced before it serves reads.
//!
//! ## Resync
//! A service thread per mirror copies the in-sync leg to the stale one in
//! [`REGION_BYTES`] regions, paced by a token bucket, while foreground I/O
//! continues and writes reach both legs. Per-region in-flight counters and
//! write epochs fence the copy: a region is copied only with no write in
//! flight in it, and copied again when a write landed during the copy, so a
//! racing write never leaves an old block on the new leg.
//! `bdev_mirror_replace` (RPC) swaps a new device in as a leg and resyncs it.
//!
//! Hot path cost: two atomic adds per region a write touches, one relaxed load
//! per leg per request. No lock and no allocation per I/O.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use serde::{Deserialize, Serialize};

use super::{
    submit_and_wait, BlockDevice, ChannelOptions, Completion, DeviceError, DeviceInfo, IoChannel,
    IoKind, IoRequest, SubmitError, BUF_INDEX_NONE,
};
use crate::clock::now_ns;
use crate::dma::DmaPool;

/// Bytes reserved at the start of each leg for the superblock.
pub const MIRROR_RESERVED_BYTES: u64 = 1 << 20;
/// The unit of resync copies and of the write fence.
pub const REGION_BYTES: u64 = 1 << 20;
/// One read in this many goes to the slower leg, to keep its latency current.
pub const PROBE_EVERY: u64 = 64;
/// A leg that has not answered a write this long after the other leg did is faulted
/// (the Linux block layer's default I/O timeout, so a busy disk is not mistaken for a dead one).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Default resync pace.
pub const DEFAULT_RESYNC_MIB_S: u64 = 256;

/// Magic of the mirror superblock frame, "KMR1" (docs/FORMAT.md).
pub const SB_MAGIC: u32 = 0x4b4d_5231;
const SB_BYTES: usize = 4096;
const SB_VERSION: u32 = 1;

const IN_SYNC: u8 = 0;
const FAULTED: u8 = 1;
const RESYNCING: u8 = 2;

fn state_name(s: u8) -> &'static str {
    match s {
        IN_SYNC => "in_sync",
        FAULTED => "faulted",
        _ => "resyncing",
    }
}

/// The on-disk superblock, the same on both legs but for `leg`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
struct MirrorSb {
    version: u32,
    uuid: u64,
    /// Which leg this copy was written to.
    leg: u8,
    /// Bumped on every state change; the higher one wins on open.
    generation: u64,
    /// Per leg: it missed writes and must be resynced before serving reads.
    stale: [bool; 2],
}

/// What the service thread is asked to do.
enum Command {
    /// A leg changed state: write superblocks, then mark the staleness durable.
    Persist,
    /// Swap in a new device for a leg and resync it.
    Replace(usize, Arc<dyn BlockDevice>),
    Stop,
}

/// Resync progress, for RPC and tests.
#[derive(Debug, Clone, Serialize)]
pub struct MirrorStatus {
    pub degraded: bool,
    pub legs: [String; 2],
    pub states: [&'static str; 2],
    pub generation: u64,
    pub failovers: u64,
    pub read_retries: u64,
    pub resync_leg: Option<usize>,
    pub resync_done_bytes: u64,
    pub resync_total_bytes: u64,
    pub resyncs_completed: u64,
}

/// State shared by the device, its channels and its service thread.
struct Shared {
    size_bytes: u64,
    legs: Mutex<[Arc<dyn BlockDevice>; 2]>,
    /// Bumped when a leg's device is replaced; channels reopen on change.
    leg_version: [AtomicU64; 2],
    state: [AtomicU8; 2],
    /// Bit per leg: its staleness is durable in the other leg's superblock.
    stale_durable: AtomicU8,
    uuid: u64,
    generation: AtomicU64,
    region_inflight: Box<[AtomicU32]>,
    region_epoch: Box<[AtomicU32]>,
    timeout_ns: u64,
    resync_mib_s: AtomicU64,
    failovers: AtomicU64,
    read_retries: AtomicU64,
    resync_leg: AtomicU8,
    resync_done: AtomicU64,
    resyncs_completed: AtomicU64,
    /// Set when the service could not make a leg's staleness durable: writes that
    /// missed that leg fail instead of waiting forever.
    persist_failed: AtomicBool,
    tx: Sender<Command>,
}

impl Shared {
    fn state(&self, leg: usize) -> u8 {
        self.state[leg].load(Ordering::SeqCst)
    }

    /// Marks `leg` faulted if it was in service; asks for the superblocks to say so.
    fn fault(&self, leg: usize, why: &str) {
        let was = self.state(leg);
        if was != FAULTED
            && self.state[leg]
                .compare_exchange(was, FAULTED, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
        {
            self.failovers.fetch_add(1, Ordering::Relaxed);
            tracing::error!(
                leg,
                why,
                "mirror leg faulted; serving from the other leg (degraded)"
            );
            if was == IN_SYNC {
                self.stale_durable.fetch_and(!(1 << leg), Ordering::SeqCst);
                let _ = self.tx.send(Command::Persist);
            }
        }
    }

    fn regions(&self, offset: u64, len: u64) -> std::ops::Range<usize> {
        let first = (offset / REGION_BYTES) as usize;
        let last = ((offset + len.max(1) - 1) / REGION_BYTES) as usize;
        first..(last + 1).min(self.region_inflight.len())
    }
}

/// A RAID-1 device over two legs.
pub struct MirrorDevice {
    info: DeviceInfo,
    shared: Arc<Shared>,
    service: Option<std::thread::JoinHandle<()>>,
}

fn geometry(name: &str, a: &DeviceInfo, b: &DeviceInfo) -> Result<DeviceInfo, DeviceError> {
    let block_size = a.block_size.max(b.block_size);
    let usable = a.size_bytes().min(b.size_bytes());
    if usable <= MIRROR_RESERVED_BYTES + REGION_BYTES {
        return Err(DeviceError::BadSpec(format!(
            "'{name}': legs of {} and {} bytes are too small (each reserves {} bytes)",
            a.size_bytes(),
            b.size_bytes(),
            MIRROR_RESERVED_BYTES
        )));
    }
    // Whole regions only, so the region table covers every block.
    let size = (usable - MIRROR_RESERVED_BYTES) / REGION_BYTES * REGION_BYTES;
    Ok(DeviceInfo {
        name: name.to_string(),
        product: "mirror",
        block_size,
        num_blocks: size / block_size as u64,
        buf_align: a.buf_align.max(b.buf_align),
        persistent: a.persistent && b.persistent,
        volatile_write_cache: a.volatile_write_cache || b.volatile_write_cache,
    })
}

/// Reads the superblock of one leg; `None` when absent or torn.
fn read_sb(dev: &dyn BlockDevice) -> Result<Option<MirrorSb>, DeviceError> {
    let pool = DmaPool::new(SB_BYTES, 1).map_err(|e| DeviceError::Io(e.to_string()))?;
    let mut chan = dev.open_channel(&ChannelOptions {
        queue_depth: 4,
        pool: Some(&pool),
    })?;
    let buf = pool.buf(0);
    let req = IoRequest::read(1, 0, buf.ptr, SB_BYTES as u32, buf.index);
    // SAFETY: the pool's buffer is ours and lives until submit_and_wait returns.
    let rc = unsafe { submit_and_wait(chan.as_mut(), &req) };
    if rc != 0 {
        return Err(DeviceError::Io(format!(
            "{}: reading the mirror superblock failed: errno {}",
            dev.info().name,
            -rc
        )));
    }
    // SAFETY: the read completed; nothing else uses the buffer.
    let bytes = unsafe { buf.as_slice() };
    Ok(decode_sb(bytes))
}

/// Decodes one leg's superblock; `None` when absent, torn or of another version.
fn decode_sb(bytes: &[u8]) -> Option<MirrorSb> {
    crate::frame::decode::<MirrorSb>(SB_MAGIC, bytes)
        .ok()
        .map(|(_, sb, _)| sb)
        .filter(|sb| sb.version == SB_VERSION)
}

/// What a mirror opens with, decided from its legs' superblocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SuperblockPlan {
    pub uuid: u64,
    /// The generation the mirror writes to both legs on open.
    pub generation: u64,
    /// Per leg: it must be resynced before it serves reads.
    pub stale: [bool; 2],
}

/// Decides how mirror `name` opens from the raw superblock blocks of its two legs (what
/// [`MirrorDevice::open`] reads): fresh legs, one leg formatted, or both. Errors: the legs
/// belong to different mirrors, both are stale, or the generation cannot advance. The fuzz
/// target `mirror_sb` feeds it arbitrary blocks.
pub fn plan_from_superblocks(
    name: &str,
    copies: [&[u8]; 2],
) -> Result<SuperblockPlan, DeviceError> {
    plan_open(
        name,
        &[decode_sb(copies[0]), decode_sb(copies[1])],
        random_u64,
    )
}

fn plan_open(
    name: &str,
    sbs: &[Option<MirrorSb>; 2],
    new_uuid: impl FnOnce() -> u64,
) -> Result<SuperblockPlan, DeviceError> {
    let (uuid, generation, stale) = match (&sbs[0], &sbs[1]) {
        (None, None) => (new_uuid(), 0, [false, false]),
        (Some(s), None) => (s.uuid, s.generation, [false, true]),
        (None, Some(s)) => (s.uuid, s.generation, [true, false]),
        (Some(x), Some(y)) => {
            if x.uuid != y.uuid {
                return Err(DeviceError::BadSpec(format!(
                    "'{name}': the legs belong to different mirrors (uuid {:#x} vs {:#x})",
                    x.uuid, y.uuid
                )));
            }
            let best = if x.generation >= y.generation { x } else { y };
            (best.uuid, best.generation, best.stale)
        }
    };
    if stale == [true, true] {
        return Err(DeviceError::BadSpec(format!(
            "'{name}': the superblocks say both legs are stale; no copy can be trusted"
        )));
    }
    let generation = generation.checked_add(1).ok_or_else(|| {
        DeviceError::BadSpec(format!(
            "'{name}': superblock generation {generation} cannot advance; the superblock is corrupt"
        ))
    })?;
    Ok(SuperblockPlan {
        uuid,
        generation,
        stale,
    })
}

/// Writes `sb` (with `leg` set) to one leg, durably.
fn write_sb(dev: &dyn BlockDevice, leg: usize, sb: &MirrorSb) -> Result<(), String> {
    let pool = DmaPool::new(SB_BYTES, 1).map_err(|e| e.to_string())?;
    let mut chan = dev
        .open_channel(&ChannelOptions {
            queue_depth: 4,
            pool: Some(&pool),
        })
        .map_err(|e| e.to_string())?;
    let mut sb = sb.clone();
    sb.leg = leg as u8;
    let mut bytes = Vec::with_capacity(SB_BYTES);
    crate::frame::encode(SB_MAGIC, sb.generation, &sb, &mut bytes);
    bytes.resize(SB_BYTES, 0);
    let buf = pool.buf(0);
    // SAFETY: the buffer is ours; no I/O is in flight on it.
    unsafe { buf.as_mut_slice()[..SB_BYTES].copy_from_slice(&bytes) };
    let mut req = IoRequest::write(1, 0, buf.ptr, SB_BYTES as u32, buf.index);
    req.fua = true;
    // SAFETY: as above; the buffer outlives the call.
    let rc = unsafe { submit_and_wait(chan.as_mut(), &req) };
    if rc != 0 {
        return Err(format!(
            "{}: superblock write failed: errno {}",
            dev.info().name,
            -rc
        ));
    }
    // SAFETY: no buffer involved in a flush.
    let rc = unsafe { submit_and_wait(chan.as_mut(), &IoRequest::flush(2)) };
    if rc != 0 {
        return Err(format!("{}: flush failed: errno {}", dev.info().name, -rc));
    }
    Ok(())
}

fn random_u64() -> u64 {
    let mut x = [0u8; 8];
    // SAFETY: getrandom writes at most 8 bytes into the local array.
    let n = unsafe { libc::getrandom(x.as_mut_ptr().cast(), 8, 0) };
    if n == 8 {
        u64::from_le_bytes(x)
    } else {
        now_ns() ^ (std::process::id() as u64) << 32
    }
}

impl MirrorDevice {
    /// Opens a mirror over `a` and `b`, formatting blank legs and reading the
    /// durable state of formatted ones. Fresh legs are assumed identical (as
    /// `mdadm --assume-clean`): kiln zeroes every chunk before it maps it.
    pub fn open(
        name: String,
        a: Arc<dyn BlockDevice>,
        b: Arc<dyn BlockDevice>,
        timeout: Duration,
    ) -> Result<MirrorDevice, DeviceError> {
        let info = geometry(&name, a.info(), b.info())?;
        let sbs = [read_sb(a.as_ref())?, read_sb(b.as_ref())?];
        let SuperblockPlan {
            uuid,
            generation,
            stale,
        } = plan_open(&name, &sbs, random_u64)?;
        let sb = MirrorSb {
            version: SB_VERSION,
            uuid,
            leg: 0,
            generation,
            stale,
        };
        for (leg, dev) in [&a, &b].into_iter().enumerate() {
            write_sb(dev.as_ref(), leg, &sb).map_err(DeviceError::Io)?;
        }
        let regions = (info.size_bytes() / REGION_BYTES) as usize;
        let (tx, rx) = crossbeam_channel::unbounded();
        let state = |leg: usize| AtomicU8::new(if stale[leg] { RESYNCING } else { IN_SYNC });
        let shared = Arc::new(Shared {
            size_bytes: info.size_bytes(),
            legs: Mutex::new([a, b]),
            leg_version: [AtomicU64::new(0), AtomicU64::new(0)],
            state: [state(0), state(1)],
            stale_durable: AtomicU8::new(stale[0] as u8 | (stale[1] as u8) << 1),
            uuid,
            generation: AtomicU64::new(generation),
            region_inflight: (0..regions).map(|_| AtomicU32::new(0)).collect(),
            region_epoch: (0..regions).map(|_| AtomicU32::new(0)).collect(),
            timeout_ns: timeout.as_nanos() as u64,
            resync_mib_s: AtomicU64::new(DEFAULT_RESYNC_MIB_S),
            failovers: AtomicU64::new(0),
            read_retries: AtomicU64::new(0),
            resync_leg: AtomicU8::new(u8::MAX),
            resync_done: AtomicU64::new(0),
            resyncs_completed: AtomicU64::new(0),
            persist_failed: AtomicBool::new(false),
            tx,
        });
        let svc = shared.clone();
        let service = std::thread::Builder::new()
            .name("kiln-mirror".into())
            .spawn(move || service(svc, rx))
            .map_err(|e| DeviceError::Io(format!("spawning the mirror service: {e}")))?;
        if stale.contains(&true) {
            tracing::warn!(mirror = %name, ?stale, "mirror opened degraded; resyncing the stale leg");
        }
        Ok(MirrorDevice {
            info,
            shared,
            service: Some(service),
        })
    }

    /// Current health and resync progress.
    pub fn status(&self) -> MirrorStatus {
        let s = &self.shared;
        let legs = s.legs.lock().unwrap();
        let states = [state_name(s.state(0)), state_name(s.state(1))];
        let resync_leg = s.resync_leg.load(Ordering::SeqCst);
        MirrorStatus {
            degraded: states != ["in_sync", "in_sync"],
            legs: [legs[0].info().name.clone(), legs[1].info().name.clone()],
            states,
            generation: s.generation.load(Ordering::SeqCst),
            failovers: s.failovers.load(Ordering::Relaxed),
            read_retries: s.read_retries.load(Ordering::Relaxed),
            resync_leg: (resync_leg != u8::MAX).then_some(resync_leg as usize),
            resync_done_bytes: s.resync_done.load(Ordering::Relaxed),
            resync_total_bytes: s.size_bytes,
            resyncs_completed: s.resyncs_completed.load(Ordering::Relaxed),
        }
    }

    /// Attaches `dev` as leg `leg` (replacing whatever was there) and resyncs it
    /// in the background. Refused while the other leg is not in sync.
    pub fn replace(&self, leg: usize, dev: Arc<dyn BlockDevice>) -> Result<(), String> {
        if leg > 1 {
            return Err(format!("leg {leg} does not exist (0 or 1)"));
        }
        let other = 1 - leg;
        if self.shared.state(other) != IN_SYNC {
            return Err(format!(
                "leg {other} is {}: it cannot be the resync source",
                state_name(self.shared.state(other))
            ));
        }
        let need = self.shared.size_bytes + MIRROR_RESERVED_BYTES;
        let have = dev.info().size_bytes();
        if have < need {
            return Err(format!(
                "{}: {have} bytes is smaller than the {need} bytes a leg needs",
                dev.info().name
            ));
        }
        if dev.info().block_size > self.info.block_size
            || dev.info().buf_align > self.info.buf_align
        {
            return Err(format!(
                "{}: block size {} or alignment {} larger than the mirror's",
                dev.info().name,
                dev.info().block_size,
                dev.info().buf_align
            ));
        }
        self.shared
            .tx
            .send(Command::Replace(leg, dev))
            .map_err(|_| "the mirror service has stopped".to_string())
    }

    /// Resync pace in MiB/s.
    pub fn set_resync_rate(&self, mib_s: u64) {
        self.shared
            .resync_mib_s
            .store(mib_s.max(1), Ordering::Relaxed);
    }
}

impl Drop for MirrorDevice {
    fn drop(&mut self) {
        let _ = self.shared.tx.send(Command::Stop);
        if let Some(h) = self.service.take() {
            let _ = h.join();
        }
    }
}

impl BlockDevice for MirrorDevice {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn open_channel(&self, opts: &ChannelOptions<'_>) -> Result<Box<dyn IoChannel>, DeviceError> {
        let qd = opts.queue_depth.max(1) as usize;
        let legs = self.shared.legs.lock().unwrap().clone();
        let versions = [
            self.shared.leg_version[0].load(Ordering::SeqCst),
            self.shared.leg_version[1].load(Ordering::SeqCst),
        ];
        let open = |d: &Arc<dyn BlockDevice>| d.open_channel(opts);
        Ok(Box::new(MirrorChannel {
            info: self.info.clone(),
            shared: self.shared.clone(),
            legs: [open(&legs[0])?, open(&legs[1])?],
            registered: [opts.pool.is_some(); 2],
            versions,
            queue_depth: qd as u32,
            retired: Vec::new(),
            slots: (0..qd).map(|_| Slot::default()).collect(),
            free: (0..qd as u32).rev().collect(),
            ready: VecDeque::with_capacity(qd),
            held: VecDeque::with_capacity(qd),
            deferred: VecDeque::with_capacity(2 * qd),
            scratch: vec![Completion::default(); qd.max(32)],
            ewma_ns: [0.0; 2],
            reads: 0,
            next_timeout_scan_ns: 0,
        }))
    }

    fn as_mirror(&self) -> Option<&MirrorDevice> {
        Some(self)
    }
}

#[derive(Clone, Copy, Default)]
struct Slot {
    active: bool,
    gen: u32,
    req: Option<IoRequest>,
    /// Legs whose answer is outstanding.
    pending: u8,
    /// Legs that did not get (or failed) this write.
    missing: u8,
    /// Legs that failed it (or timed out): these are faulted, skipped ones are not.
    failed: u8,
    /// Legs that completed it.
    ok: u8,
    err: i32,
    read_leg: u8,
    tried: u8,
    started_ns: u64,
    first_done_ns: u64,
}

struct MirrorChannel {
    info: DeviceInfo,
    shared: Arc<Shared>,
    legs: [Box<dyn IoChannel>; 2],
    /// Whether the leg's channel has the reactor's buffers registered.
    registered: [bool; 2],
    versions: [u64; 2],
    queue_depth: u32,
    /// Channels of replaced legs (with the leg they served), polled until they drain.
    retired: Vec<(usize, Box<dyn IoChannel>)>,
    slots: Vec<Slot>,
    free: Vec<u32>,
    ready: VecDeque<Completion>,
    /// Completions waiting for a leg's staleness to become durable.
    held: VecDeque<(Completion, u8)>,
    /// Leg submissions refused with QueueFull, retried in order.
    deferred: VecDeque<(usize, IoRequest)>,
    scratch: Vec<Completion>,
    ewma_ns: [f64; 2],
    reads: u64,
    next_timeout_scan_ns: u64,
}

fn leg_tag(slot: u32, gen: u32) -> u64 {
    (gen as u64) << 32 | slot as u64
}

impl MirrorChannel {
    /// Reopens a leg whose device was replaced (rare; off the per-I/O path).
    fn refresh_legs(&mut self) {
        for leg in 0..2 {
            let v = self.shared.leg_version[leg].load(Ordering::SeqCst);
            if v == self.versions[leg] {
                continue;
            }
            let dev = self.shared.legs.lock().unwrap()[leg].clone();
            match dev.open_channel(&ChannelOptions {
                queue_depth: self.queue_depth,
                pool: None,
            }) {
                Ok(chan) => {
                    let old = std::mem::replace(&mut self.legs[leg], chan);
                    if old.inflight() > 0 {
                        // Its answers still route to their slots (by tag) as they arrive.
                        self.retired.push((leg, old));
                    }
                    self.registered[leg] = false;
                    self.versions[leg] = v;
                }
                Err(e) => {
                    tracing::error!(leg, "mirror: cannot open the replaced leg: {e}");
                    self.shared.fault(leg, "open failed");
                    self.versions[leg] = v;
                }
            }
        }
    }

    /// Sends one request to one leg, remapped past the reserved area.
    fn send(&mut self, leg: usize, slot: u32, mut req: IoRequest) -> Result<(), SubmitError> {
        req.tag = leg_tag(slot, self.slots[slot as usize].gen);
        if req.kind != IoKind::Flush {
            req.offset_bytes += MIRROR_RESERVED_BYTES;
        }
        if !self.registered[leg] {
            req.buf_index = BUF_INDEX_NONE;
        }
        if !self.deferred.is_empty() {
            self.deferred.push_back((leg, req));
            return Ok(());
        }
        // SAFETY: the caller's buffer obligations cover the leg request: it completes
        // (or is forgotten only for a faulted leg) before the slot is finished.
        match unsafe { self.legs[leg].submit(&req) } {
            Err(SubmitError::QueueFull) => {
                self.deferred.push_back((leg, req));
                Ok(())
            }
            other => other,
        }
    }

    fn retry_deferred(&mut self) {
        while let Some((leg, req)) = self.deferred.pop_front() {
            // SAFETY: as in `send`.
            match unsafe { self.legs[leg].submit(&req) } {
                Ok(()) => {}
                Err(SubmitError::QueueFull) => {
                    self.deferred.push_front((leg, req));
                    return;
                }
                Err(e) => {
                    let slot = (req.tag & 0xffff_ffff) as u32;
                    self.leg_done(leg, slot, -e.errno(), now_ns());
                }
            }
        }
    }

    /// Hands a leg's completion to its slot, unless the slot moved on (timed out).
    fn route(&mut self, leg: usize, c: Completion, now: u64) {
        let slot = (c.tag & 0xffff_ffff) as u32;
        let gen = (c.tag >> 32) as u32;
        if (slot as usize) < self.slots.len() && self.slots[slot as usize].gen == gen {
            self.leg_done(leg, slot, c.result, now);
        }
    }

    fn pick_read_leg(&mut self) -> Option<usize> {
        let ok = |leg: usize| self.shared.state(leg) == IN_SYNC;
        match (ok(0), ok(1)) {
            (true, true) => {
                self.reads += 1;
                let fast = if self.ewma_ns[0] <= self.ewma_ns[1] {
                    0
                } else {
                    1
                };
                Some(if self.reads % PROBE_EVERY == 0 {
                    1 - fast
                } else {
                    fast
                })
            }
            (true, false) => Some(0),
            (false, true) => Some(1),
            (false, false) => None,
        }
    }

    /// One leg answered for `slot`.
    fn leg_done(&mut self, leg: usize, slot_idx: u32, result: i32, now: u64) {
        let s = &mut self.slots[slot_idx as usize];
        if !s.active || s.pending & (1 << leg) == 0 {
            return;
        }
        s.pending &= !(1 << leg);
        let req = s.req.expect("active slot has a request");
        if req.kind == IoKind::Read {
            if result == 0 {
                // A leg that failed this read, which the other leg then served, is faulty.
                for bad in 0..2 {
                    if s.tried & (1 << bad) != 0 {
                        self.shared
                            .fault(bad, "read failed; the other leg served it");
                    }
                }
                let s = &mut self.slots[slot_idx as usize];
                let dt = now.saturating_sub(s.started_ns) as f64;
                let e = &mut self.ewma_ns[leg];
                *e = if *e == 0.0 { dt } else { *e * 0.9 + dt * 0.1 };
                self.finish(slot_idx, 0);
                return;
            }
            // Retry on the other leg if it is in sync and has not been tried.
            let other = 1 - leg;
            s.tried |= 1 << leg;
            if s.tried & (1 << other) == 0 && self.shared.state(other) == IN_SYNC {
                self.shared.read_retries.fetch_add(1, Ordering::Relaxed);
                let s = &mut self.slots[slot_idx as usize];
                s.pending |= 1 << other;
                s.read_leg = other as u8;
                s.started_ns = now;
                if self.send(other, slot_idx, req).is_err() {
                    self.slots[slot_idx as usize].pending &= !(1 << other);
                    self.finish(slot_idx, result);
                }
                return;
            }
            self.finish(slot_idx, result);
            return;
        }
        if result == 0 {
            s.ok |= 1 << leg;
        } else {
            s.missing |= 1 << leg;
            s.failed |= 1 << leg;
            if s.err == 0 {
                s.err = result;
            }
        }
        if s.first_done_ns == 0 {
            s.first_done_ns = now;
        }
        if s.pending == 0 {
            self.complete_write(slot_idx);
        }
    }

    /// Every leg answered a write (or the laggard timed out).
    fn complete_write(&mut self, slot_idx: u32) {
        let s = self.slots[slot_idx as usize];
        if s.ok == 0 {
            // No leg has the data: the client gets the error, no leg is blamed.
            self.finish(slot_idx, if s.err != 0 { s.err } else { -libc::EIO });
            return;
        }
        for leg in 0..2 {
            if s.failed & (1 << leg) != 0 && s.ok & (1 << (1 - leg)) != 0 {
                let req = s.req.expect("active slot");
                let why = if s.err == 0 {
                    format!(
                        "{:?} at {}+{} timed out",
                        req.kind, req.offset_bytes, req.len_bytes
                    )
                } else {
                    format!(
                        "{:?} at {}+{} failed: errno {}",
                        req.kind, req.offset_bytes, req.len_bytes, -s.err
                    )
                };
                self.shared.fault(leg, &why);
            }
        }
        self.finish_with_missing(slot_idx, s.missing);
    }

    fn finish_with_missing(&mut self, slot_idx: u32, missing: u8) {
        let s = self.slots[slot_idx as usize];
        let req = s.req.expect("active slot");
        self.release(slot_idx, &req);
        let c = Completion {
            tag: req.tag,
            result: 0,
        };
        if missing & !self.shared.stale_durable.load(Ordering::SeqCst) != 0 {
            self.held.push_back((c, missing));
        } else {
            self.ready.push_back(c);
        }
    }

    fn finish(&mut self, slot_idx: u32, result: i32) {
        let req = self.slots[slot_idx as usize].req.expect("active slot");
        self.release(slot_idx, &req);
        self.ready.push_back(Completion {
            tag: req.tag,
            result,
        });
    }

    fn release(&mut self, slot_idx: u32, req: &IoRequest) {
        if matches!(req.kind, IoKind::Write | IoKind::WriteZeroes | IoKind::Trim) {
            for r in self.shared.regions(req.offset_bytes, req.len_bytes as u64) {
                self.shared.region_inflight[r].fetch_sub(1, Ordering::SeqCst);
            }
        }
        let s = &mut self.slots[slot_idx as usize];
        s.active = false;
        s.gen = s.gen.wrapping_add(1);
        self.free.push(slot_idx);
    }

    fn release_held(&mut self) {
        if self.held.is_empty() {
            return;
        }
        let durable = self.shared.stale_durable.load(Ordering::SeqCst);
        let failed = self.shared.persist_failed.load(Ordering::SeqCst);
        for _ in 0..self.held.len() {
            let (mut c, missing) = self.held.pop_front().unwrap();
            if missing & !durable == 0 {
                self.ready.push_back(c);
            } else if failed {
                c.result = -libc::EIO;
                self.ready.push_back(c);
            } else {
                self.held.push_back((c, missing));
            }
        }
    }

    /// Writes whose second leg lags past the timeout complete without it.
    fn scan_timeouts(&mut self, now: u64) {
        if now < self.next_timeout_scan_ns {
            return;
        }
        self.next_timeout_scan_ns = now + self.shared.timeout_ns / 8;
        for i in 0..self.slots.len() {
            let s = self.slots[i];
            let is_write = s.req.is_some_and(|r| r.kind != IoKind::Read);
            if s.active
                && is_write
                && s.ok != 0
                && s.pending != 0
                && now.saturating_sub(s.first_done_ns) > self.shared.timeout_ns
            {
                let lagging = s.pending;
                self.slots[i].missing |= lagging;
                self.slots[i].failed |= lagging;
                self.slots[i].pending = 0;
                // A late answer from the faulted leg is ignored (the slot's generation moves
                // on); its write may still land, which is harmless: the leg is resynced whole.
                self.complete_write(i as u32);
            }
        }
    }
}

impl IoChannel for MirrorChannel {
    unsafe fn submit(&mut self, req: &IoRequest) -> Result<(), SubmitError> {
        self.info.check(req)?;
        // State first, then versions: a leg seen resyncing has its new device visible.
        let states = [self.shared.state(0), self.shared.state(1)];
        if self.shared.leg_version[0].load(Ordering::Relaxed) != self.versions[0]
            || self.shared.leg_version[1].load(Ordering::Relaxed) != self.versions[1]
        {
            self.refresh_legs();
        }
        let Some(slot_idx) = self.free.pop() else {
            return Err(SubmitError::QueueFull);
        };
        let now = now_ns();
        {
            let s = &mut self.slots[slot_idx as usize];
            s.active = true;
            s.req = Some(*req);
            s.pending = 0;
            s.missing = 0;
            s.failed = 0;
            s.ok = 0;
            s.err = 0;
            s.tried = 0;
            s.started_ns = now;
            s.first_done_ns = 0;
        }
        if req.kind == IoKind::Read {
            let Some(leg) = self.pick_read_leg() else {
                self.slots[slot_idx as usize].active = false;
                self.free.push(slot_idx);
                self.ready.push_back(Completion {
                    tag: req.tag,
                    result: -libc::EIO,
                });
                return Ok(());
            };
            let s = &mut self.slots[slot_idx as usize];
            s.pending = 1 << leg;
            s.read_leg = leg as u8;
            if let Err(e) = self.send(leg, slot_idx, *req) {
                self.leg_done(leg, slot_idx, -e.errno(), now);
            }
            return Ok(());
        }
        if matches!(req.kind, IoKind::Write | IoKind::WriteZeroes | IoKind::Trim) {
            for r in self.shared.regions(req.offset_bytes, req.len_bytes as u64) {
                self.shared.region_inflight[r].fetch_add(1, Ordering::SeqCst);
                self.shared.region_epoch[r].fetch_add(1, Ordering::SeqCst);
            }
        }
        let mut pending = 0u8;
        let mut missing = 0u8;
        for (leg, st) in states.iter().enumerate() {
            if *st == FAULTED {
                missing |= 1 << leg;
            } else {
                pending |= 1 << leg;
            }
        }
        {
            let s = &mut self.slots[slot_idx as usize];
            s.pending = pending;
            s.missing = missing;
        }
        if pending == 0 {
            self.finish(slot_idx, -libc::EIO);
            return Ok(());
        }
        for leg in 0..2 {
            if pending & (1 << leg) != 0 {
                if let Err(e) = self.send(leg, slot_idx, *req) {
                    self.leg_done(leg, slot_idx, -e.errno(), now);
                }
            }
        }
        Ok(())
    }

    fn submit_pending(&mut self) -> usize {
        self.retry_deferred();
        let mut n = self.legs[0].submit_pending() + self.legs[1].submit_pending();
        for (_, r) in &mut self.retired {
            n += r.submit_pending();
        }
        n
    }

    fn poll_completions(&mut self, out: &mut [Completion]) -> usize {
        let now = now_ns();
        for leg in 0..2 {
            loop {
                let got = self.legs[leg].poll_completions(&mut self.scratch);
                for i in 0..got {
                    let c = self.scratch[i];
                    self.route(leg, c, now);
                }
                if got < self.scratch.len() {
                    break;
                }
            }
        }
        for i in 0..self.retired.len() {
            let leg = self.retired[i].0;
            let got = self.retired[i].1.poll_completions(&mut self.scratch);
            for k in 0..got {
                let c = self.scratch[k];
                self.route(leg, c, now);
            }
        }
        if !self.retired.is_empty() {
            self.retired.retain(|(_, r)| r.inflight() > 0);
        }
        self.scan_timeouts(now);
        self.release_held();
        let mut n = 0;
        while n < out.len() {
            match self.ready.pop_front() {
                Some(c) => {
                    out[n] = c;
                    n += 1;
                }
                None => break,
            }
        }
        n
    }

    fn inflight(&self) -> usize {
        self.slots.len() - self.free.len() + self.ready.len() + self.held.len()
    }

    fn notifier_fd(&self) -> Option<std::os::fd::RawFd> {
        // Either leg may wake us; the reactor watches one fd per channel, so report the
        // first and rely on the deadline below for the other.
        self.legs[0].notifier_fd().or(self.legs[1].notifier_fd())
    }

    fn next_deadline_ns(&self) -> Option<u64> {
        if !self.ready.is_empty() || !self.held.is_empty() || !self.deferred.is_empty() {
            return Some(now_ns() + 50_000);
        }
        let busy = self.slots.len() != self.free.len();
        let mut d = [
            self.legs[0].next_deadline_ns(),
            self.legs[1].next_deadline_ns(),
        ]
        .into_iter()
        .flatten()
        .min();
        if busy {
            // The second leg has no fd the reactor watches, and timeouts need scans.
            let poll_soon = now_ns() + 200_000;
            d = Some(d.map_or(poll_soon, |x| x.min(poll_soon)));
        }
        d
    }
}

/// The mirror's service thread: superblock updates and resync.
fn service(shared: Arc<Shared>, rx: Receiver<Command>) {
    let mut resync: Option<Resync> = None;
    for leg in 0..2 {
        if shared.state(leg) == RESYNCING {
            resync = Resync::start(&shared, leg);
        }
    }
    loop {
        let cmd = if resync.is_some() {
            match rx.try_recv() {
                Ok(c) => Some(c),
                Err(crossbeam_channel::TryRecvError::Empty) => None,
                Err(_) => return,
            }
        } else {
            match rx.recv() {
                Ok(c) => Some(c),
                Err(_) => return,
            }
        };
        match cmd {
            Some(Command::Stop) => return,
            Some(Command::Persist) => persist(&shared),
            Some(Command::Replace(leg, dev)) => {
                drop(resync.take());
                shared.resync_leg.store(u8::MAX, Ordering::SeqCst);
                // Fault first so no new write counts on the old device, then swap.
                shared.fault(leg, "replaced");
                persist(&shared);
                shared.legs.lock().unwrap()[leg] = dev;
                shared.leg_version[leg].fetch_add(1, Ordering::SeqCst);
                shared.state[leg].store(RESYNCING, Ordering::SeqCst);
                // The new device gets a superblock marking it stale before anything else.
                persist(&shared);
                resync = Resync::start(&shared, leg);
            }
            None => {}
        }
        if let Some(r) = resync.as_mut() {
            match r.step(&shared) {
                Ok(true) => {}
                Ok(false) => {
                    let leg = r.leg;
                    resync = None;
                    shared.resync_leg.store(u8::MAX, Ordering::SeqCst);
                    // Durable first, then reads may use the leg.
                    shared.state[leg].store(IN_SYNC, Ordering::SeqCst);
                    persist(&shared);
                    shared.resyncs_completed.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(leg, "mirror resync complete; mirror healthy");
                }
                Err(e) => {
                    tracing::error!(leg = r.leg, "mirror resync stopped: {e}");
                    let leg = r.leg;
                    resync = None;
                    shared.resync_leg.store(u8::MAX, Ordering::SeqCst);
                    shared.fault(leg, "resync failed");
                }
            }
        }
    }
}

/// Writes the current state to every leg that can take it.
fn persist(shared: &Shared) {
    let states = [shared.state(0), shared.state(1)];
    let generation = shared.generation.fetch_add(1, Ordering::SeqCst) + 1;
    let sb = MirrorSb {
        version: SB_VERSION,
        uuid: shared.uuid,
        leg: 0,
        generation,
        stale: [states[0] != IN_SYNC, states[1] != IN_SYNC],
    };
    let legs = shared.legs.lock().unwrap().clone();
    let mut durable_somewhere = false;
    for leg in 0..2 {
        if states[leg] == FAULTED {
            continue;
        }
        match write_sb(legs[leg].as_ref(), leg, &sb) {
            Ok(()) => durable_somewhere |= states[leg] == IN_SYNC,
            Err(e) => {
                tracing::error!("mirror superblock: {e}");
                shared.fault(leg, "superblock write failed");
            }
        }
    }
    if durable_somewhere {
        let mask = sb.stale[0] as u8 | (sb.stale[1] as u8) << 1;
        shared.stale_durable.store(mask, Ordering::SeqCst);
    } else {
        tracing::error!("mirror: no in-sync leg took the superblock; failing degraded writes");
        shared.persist_failed.store(true, Ordering::SeqCst);
    }
}

/// A background copy of the in-sync leg onto a stale one.
struct Resync {
    leg: usize,
    next_region: usize,
    src: Box<dyn IoChannel>,
    dst: Box<dyn IoChannel>,
    pool: DmaPool,
    bucket: crate::migrate::Bucket,
}

impl Resync {
    fn start(shared: &Shared, leg: usize) -> Option<Resync> {
        let legs = shared.legs.lock().unwrap().clone();
        let pool = DmaPool::new(REGION_BYTES as usize, 1).ok()?;
        let opts = ChannelOptions {
            queue_depth: 4,
            pool: Some(&pool),
        };
        let (src, dst) = match (
            legs[1 - leg].open_channel(&opts),
            legs[leg].open_channel(&opts),
        ) {
            (Ok(s), Ok(d)) => (s, d),
            (Err(e), _) | (_, Err(e)) => {
                tracing::error!(leg, "mirror resync cannot open channels: {e}");
                return None;
            }
        };
        shared.resync_leg.store(leg as u8, Ordering::SeqCst);
        shared.resync_done.store(0, Ordering::Relaxed);
        tracing::info!(leg, bytes = shared.size_bytes, "mirror resync started");
        Some(Resync {
            leg,
            next_region: 0,
            src,
            dst,
            pool,
            bucket: crate::migrate::Bucket::new(),
        })
    }

    /// Copies one region; `Ok(false)` when the whole device is done.
    fn step(&mut self, shared: &Shared) -> Result<bool, String> {
        if shared.state(self.leg) != RESYNCING {
            return Err("the leg left the resyncing state".into());
        }
        let r = self.next_region;
        if r >= shared.region_inflight.len() {
            return Ok(false);
        }
        let rate = shared.resync_mib_s.load(Ordering::Relaxed) as f64 * (1 << 20) as f64;
        self.bucket.take(REGION_BYTES, rate);
        let buf = self.pool.buf(0);
        let offset = MIRROR_RESERVED_BYTES + r as u64 * REGION_BYTES;
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let epoch = shared.region_epoch[r].load(Ordering::SeqCst);
            // Wait for writes already in flight in this region (they reach both legs).
            while shared.region_inflight[r].load(Ordering::SeqCst) != 0 {
                std::thread::sleep(Duration::from_micros(50));
            }
            let len = REGION_BYTES as u32;
            let rd = IoRequest::read(1, offset, buf.ptr, len, buf.index);
            // SAFETY: the pool buffer belongs to this thread and outlives the call.
            let rc = unsafe { submit_and_wait(self.src.as_mut(), &rd) };
            if rc != 0 {
                return Err(format!("reading the source leg at {offset}: errno {}", -rc));
            }
            let wr = IoRequest::write(2, offset, buf.ptr, len, buf.index);
            // SAFETY: as above.
            let rc = unsafe { submit_and_wait(self.dst.as_mut(), &wr) };
            if rc != 0 {
                return Err(format!("writing the new leg at {offset}: errno {}", -rc));
            }
            // A write that started after `epoch` may have reached the new leg before our
            // copy did and been overwritten by older data: copy the region again.
            if shared.region_epoch[r].load(Ordering::SeqCst) == epoch {
                break;
            }
            if attempts % 64 == 0 {
                tracing::warn!(region = r, attempts, "mirror resync: region busy, retrying");
            }
        }
        self.next_region += 1;
        shared
            .resync_done
            .store(self.next_region as u64 * REGION_BYTES, Ordering::Relaxed);
        if self.next_region == shared.region_inflight.len() {
            // SAFETY: a flush carries no buffer.
            let rc = unsafe { submit_and_wait(self.dst.as_mut(), &IoRequest::flush(3)) };
            if rc != 0 {
                return Err(format!("flushing the new leg: errno {}", -rc));
            }
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bdev::error::ErrorDevice;
    use crate::bdev::malloc::MallocDevice;
    use crate::bdev::spec::FaultMode;
    use crate::bdev::tests::wait_for;

    fn malloc(mib: u64) -> Arc<dyn BlockDevice> {
        Arc::new(MallocDevice::new(format!("malloc:{mib}M"), mib << 20).unwrap())
    }

    /// A checksummed superblock at the last generation used to overflow `generation + 1`
    /// (a panic with overflow checks, a wrap to 0 without, after which the other leg's older
    /// copy would win). Now the open fails with a message.
    #[test]
    fn superblock_at_the_last_generation_is_refused() {
        let block = |sb: &MirrorSb| {
            let mut b = Vec::new();
            crate::frame::encode(SB_MAGIC, sb.generation, sb, &mut b);
            b.resize(SB_BYTES, 0);
            b
        };
        let mut sb = MirrorSb {
            version: SB_VERSION,
            uuid: 7,
            leg: 0,
            generation: u64::MAX,
            stale: [false, false],
        };
        let last = block(&sb);
        let e = plan_from_superblocks("m", [&last, &[0; SB_BYTES]]).unwrap_err();
        assert!(e.to_string().contains("cannot advance"), "{e}");
        sb.generation = 41;
        sb.stale = [false, true];
        let older = block(&sb);
        let plan = plan_from_superblocks("m", [&older, &[1; 8]]).unwrap();
        assert_eq!(
            (plan.uuid, plan.generation, plan.stale),
            (7, 42, [false, true])
        );
        let fresh = plan_from_superblocks("m", [&[0; 16], &[]]).unwrap();
        assert_eq!((fresh.generation, fresh.stale), (1, [false, false]));
    }

    fn faulty(inner: Arc<dyn BlockDevice>) -> Arc<ErrorDevice> {
        let e = Arc::new(ErrorDevice::new(
            "error:1,1:leg".into(),
            inner,
            1.0,
            1,
            FaultMode::Eio,
            None,
        ));
        e.set_enabled(false);
        e
    }

    fn io(chan: &mut dyn IoChannel, req: IoRequest) -> i32 {
        // SAFETY: the tests' buffers outlive wait_for.
        let r = unsafe { chan.submit(&req) };
        assert_eq!(r, Ok(()), "submit of {req:?}");
        wait_for(chan, req.tag)
    }

    fn fill(buf: &mut [u8], seed: u8) {
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(31).wrapping_add(seed);
        }
    }

    #[test]
    fn shared_bodies_pass_on_a_mirror() {
        let m = MirrorDevice::open("mirror".into(), malloc(8), malloc(8), DEFAULT_TIMEOUT).unwrap();
        crate::bdev::tests::body_read_write_zero_trim(&m);
    }

    #[test]
    fn write_failover_read_retry_and_durable_staleness() {
        let a = malloc(8);
        let b_inner = malloc(8);
        let b = faulty(b_inner.clone());
        let m = MirrorDevice::open("m".into(), a.clone(), b.clone(), DEFAULT_TIMEOUT).unwrap();
        let pool = DmaPool::new(64 << 10, 2).unwrap();
        let mut chan = m
            .open_channel(&ChannelOptions {
                queue_depth: 8,
                pool: Some(&pool),
            })
            .unwrap();
        let w = pool.buf(0);
        let r = pool.buf(1);
        // SAFETY: no I/O in flight on the buffers here.
        fill(unsafe { w.as_mut_slice() }, 7);
        assert_eq!(
            io(chan.as_mut(), IoRequest::write(1, 0, w.ptr, 65536, w.index)),
            0
        );
        b.set_enabled(true);
        // SAFETY: as above.
        fill(unsafe { w.as_mut_slice() }, 9);
        assert_eq!(
            io(
                chan.as_mut(),
                IoRequest::write(2, 65536, w.ptr, 65536, w.index)
            ),
            0,
            "one failed leg must not fail the client"
        );
        let st = m.status();
        assert!(st.degraded);
        assert_eq!(st.states, ["in_sync", "faulted"]);
        // The staleness is durable on leg 0 before the write was acknowledged.
        let sb = read_sb(a.as_ref()).unwrap().unwrap();
        assert_eq!(sb.stale, [false, true]);
        assert_eq!(
            io(
                chan.as_mut(),
                IoRequest::read(3, 65536, r.ptr, 65536, r.index)
            ),
            0
        );
        // SAFETY: the read completed; no I/O is in flight on either buffer.
        let (got, want) = unsafe { (r.as_slice(), w.as_slice()) };
        assert_eq!(got[..65536], want[..65536]);
        // Reopen: leg 1 comes back stale and is resynced, then matches leg 0.
        drop(chan);
        drop(m);
        b.set_enabled(false);
        let m = MirrorDevice::open("m".into(), a.clone(), b.clone(), DEFAULT_TIMEOUT).unwrap();
        assert!(
            m.status().degraded,
            "a stale leg must not come back in sync"
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while m.status().degraded {
            assert!(
                std::time::Instant::now() < deadline,
                "resync never finished"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let mut ca = a.open_channel(&ChannelOptions::default()).unwrap();
        let mut cb = b_inner.open_channel(&ChannelOptions::default()).unwrap();
        let mut x = crate::dma::AlignedBuf::zeroed(65536);
        let mut y = crate::dma::AlignedBuf::zeroed(65536);
        let off = MIRROR_RESERVED_BYTES + 65536;
        assert_eq!(
            io(
                ca.as_mut(),
                IoRequest::read(1, off, x.as_mut_ptr(), 65536, BUF_INDEX_NONE)
            ),
            0
        );
        assert_eq!(
            io(
                cb.as_mut(),
                IoRequest::read(1, off, y.as_mut_ptr(), 65536, BUF_INDEX_NONE)
            ),
            0
        );
        assert_eq!(x.as_slice(), y.as_slice(), "resync left leg 1 different");
    }

    #[test]
    fn failed_read_is_retried_on_the_other_leg() {
        let a = faulty(malloc(8));
        let m = MirrorDevice::open("m".into(), a.clone(), malloc(8), DEFAULT_TIMEOUT).unwrap();
        let mut chan = m.open_channel(&ChannelOptions::default()).unwrap();
        let mut w = crate::dma::AlignedBuf::zeroed(8192);
        fill(w.as_mut_slice(), 3);
        assert_eq!(
            io(
                chan.as_mut(),
                IoRequest::write(1, 4096, w.as_mut_ptr(), 8192, BUF_INDEX_NONE)
            ),
            0
        );
        a.set_enabled(true);
        for t in 0..10 {
            let mut r = crate::dma::AlignedBuf::zeroed(8192);
            assert_eq!(
                io(
                    chan.as_mut(),
                    IoRequest::read(10 + t, 4096, r.as_mut_ptr(), 8192, BUF_INDEX_NONE)
                ),
                0
            );
            assert_eq!(r.as_slice(), w.as_slice());
        }
        assert_eq!(m.status().states[0], "faulted");
    }

    /// A device whose writes never complete.
    struct Stuck(DeviceInfo);
    struct StuckChan(usize);
    impl BlockDevice for Stuck {
        fn info(&self) -> &DeviceInfo {
            &self.0
        }
        fn open_channel(&self, _: &ChannelOptions<'_>) -> Result<Box<dyn IoChannel>, DeviceError> {
            Ok(Box::new(StuckChan(0)))
        }
    }
    impl IoChannel for StuckChan {
        unsafe fn submit(&mut self, r: &IoRequest) -> Result<(), SubmitError> {
            if r.kind == IoKind::Read && r.offset_bytes == 0 {
                return Err(SubmitError::Unsupported);
            }
            self.0 += 1;
            Ok(())
        }
        fn poll_completions(&mut self, _: &mut [Completion]) -> usize {
            0
        }
        fn inflight(&self) -> usize {
            self.0
        }
    }

    #[test]
    fn a_hung_leg_times_out_and_faults() {
        let mut info = malloc(8).info().clone();
        info.name = "stuck".into();
        // The stuck leg cannot take a superblock, so open fails: check the message...
        let stuck: Arc<dyn BlockDevice> = Arc::new(Stuck(info));
        let err = MirrorDevice::open(
            "m".into(),
            malloc(8),
            stuck.clone(),
            Duration::from_millis(50),
        );
        assert!(err.is_err());
        // ...and a leg that hangs after open is timed out.
        let leg = faulty(malloc(8));
        let m = MirrorDevice::open(
            "m".into(),
            malloc(8),
            leg.clone(),
            Duration::from_millis(50),
        )
        .unwrap();
        m.shared.legs.lock().unwrap()[1] = stuck;
        m.shared.leg_version[1].fetch_add(1, Ordering::SeqCst);
        let mut chan = m.open_channel(&ChannelOptions::default()).unwrap();
        let mut w = crate::dma::AlignedBuf::zeroed(4096);
        let t0 = std::time::Instant::now();
        assert_eq!(
            io(
                chan.as_mut(),
                IoRequest::write(1, 0, w.as_mut_ptr(), 4096, BUF_INDEX_NONE)
            ),
            0
        );
        assert!(t0.elapsed() >= Duration::from_millis(50));
        assert_eq!(m.status().states[1], "faulted");
    }

    #[test]
    fn resync_under_racing_writes_leaves_no_stale_block() {
        // Slow legs widen the window between the copy's read and its write, so writes
        // racing with the copy of their region are common.
        let slow = |inner: &Arc<dyn BlockDevice>| -> Arc<dyn BlockDevice> {
            Arc::new(crate::bdev::delay::DelayDevice::new(
                "slow".into(),
                inner.clone(),
                2000,
                200,
                0,
            ))
        };
        let a = malloc(5);
        let b_new = malloc(5);
        let m = MirrorDevice::open("m".into(), slow(&a), malloc(5), DEFAULT_TIMEOUT).unwrap();
        m.set_resync_rate(8);
        let m = Arc::new(m);
        // Fault leg 1, then replace it while writers hammer the device.
        m.shared.fault(1, "test");
        let stop = Arc::new(AtomicBool::new(false));
        let writers: Vec<_> = (0..3u64)
            .map(|w| {
                let m = m.clone();
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut chan = m.open_channel(&ChannelOptions::default()).unwrap();
                    let mut buf = crate::dma::AlignedBuf::zeroed(4096);
                    let mut rng = 0x1234_5678u64 + w;
                    let mut n = 0u64;
                    let blocks = m.info().size_bytes() / 4096;
                    while !stop.load(Ordering::Relaxed) || n < 300 {
                        rng ^= rng << 13;
                        rng ^= rng >> 7;
                        rng ^= rng << 17;
                        let lba = rng % blocks;
                        buf.as_mut_slice()[..8].copy_from_slice(&(n << 8 | w).to_le_bytes());
                        let req =
                            IoRequest::write(n, lba * 4096, buf.as_mut_ptr(), 4096, BUF_INDEX_NONE);
                        assert_eq!(io(chan.as_mut(), req), 0);
                        n += 1;
                    }
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(20));
        m.replace(1, slow(&b_new)).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while m.status().resyncs_completed == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "resync never finished"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        stop.store(true, Ordering::Relaxed);
        for w in writers {
            w.join().unwrap();
        }
        let size = (m.info().size_bytes()) as usize;
        let mut x = crate::dma::AlignedBuf::zeroed(size);
        let mut y = crate::dma::AlignedBuf::zeroed(size);
        let mut ca = a.open_channel(&ChannelOptions::default()).unwrap();
        let mut cb = b_new.open_channel(&ChannelOptions::default()).unwrap();
        let rd = |c: &mut dyn IoChannel, p: *mut u8| {
            io(
                c,
                IoRequest::read(1, MIRROR_RESERVED_BYTES, p, size as u32, BUF_INDEX_NONE),
            )
        };
        assert_eq!(rd(ca.as_mut(), x.as_mut_ptr()), 0);
        assert_eq!(rd(cb.as_mut(), y.as_mut_ptr()), 0);
        let diff = x
            .as_slice()
            .chunks(4096)
            .zip(y.as_slice().chunks(4096))
            .position(|(p, q)| p != q);
        assert_eq!(diff, None, "block differs between legs after resync");
        assert!(!m.status().degraded);
    }
}
