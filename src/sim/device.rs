//! Simulated block devices for `kiln sim`: sparse in-memory media with a
//! durable image and a volatile write cache, and faults drawn from the
//! simulation's seeded generator.
//!
//! All devices of one simulation share a [`World`] (one mutex: this is a
//! test harness, not a hot path). A write lands in the volatile image when it
//! completes (or in the durable one with FUA, or on a device without a write
//! cache); a flush makes the volatile image durable. Requests complete out of
//! order, after a seeded number of polls (latency spikes). At a crash every
//! volatile block independently reaches the media or is lost, and every write
//! still in flight reaches it torn: a seeded prefix of its blocks, or nothing.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::bdev::{
    BlockDevice, ChannelOptions, Completion, DeviceError, DeviceInfo, IoChannel, IoKind, IoRequest,
    SubmitError,
};
use crate::volume::journal::{region_name, LOG_OFFSET, META_BYTES};

/// The sector size of simulated devices: the unit of atomicity and of tearing.
pub const SECTOR: u64 = 4096;

/// A small, seedable generator (xorshift64*), shared by the whole simulation.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        // SplitMix64 of the seed, so that neighbouring seeds diverge at once.
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Rng((z ^ (z >> 31)) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `[0, n)`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// True with probability `per_million` / 1,000,000.
    pub fn chance(&mut self, per_million: u64) -> bool {
        self.below(1_000_000) < per_million
    }
}

/// Fault rates, in parts per million of requests.
#[derive(Clone, Copy, Debug, Default)]
pub struct Faults {
    pub read_eio: u64,
    pub write_eio: u64,
    /// A completion held back for many polls (others overtake it).
    pub latency_spike: u64,
    /// A metadata write (log commit, checkpoint, superblock) that is reported done but lands
    /// 1..63 sectors after where it was addressed; the addressed sectors keep what they held.
    pub misdirect: u64,
}

/// One durable event (a write or flush reaching a device), for crash points.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub device: usize,
    /// What the write was, e.g. `journal commit`, `superblock copy A`, `data write`.
    pub what: String,
    /// The simulation phase when it happened, e.g. `migration`.
    pub phase: &'static str,
}

/// Where to crash: at the `n`th event (counted from 1), before or after it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CrashPoint {
    pub event: u64,
    pub after: bool,
}

#[derive(Default)]
struct Image {
    durable: BTreeMap<u64, Box<[u8]>>,
    volatile: BTreeMap<u64, Box<[u8]>>,
}

struct Pending {
    device: usize,
    channel: u64,
    ready_tick: u64,
    req: IoRequest,
    /// The written data, copied at submission.
    data: Vec<u8>,
}

struct State {
    rng: Rng,
    /// Draws for misdirected checkpoint and superblock writes, apart from `rng` so that
    /// adding them left every other draw of a seed (and the log misdirects) as it was.
    meta_rng: Rng,
    /// The next this many metadata writes are misdirected, whatever the rates (for tests).
    misdirect_next: u64,
    pub faults: Faults,
    images: Vec<Image>,
    caches: Vec<bool>,
    pending: Vec<Pending>,
    ticks: BTreeMap<u64, u64>,
    next_channel: u64,
    crashed: bool,
    crash_at: Option<CrashPoint>,
    events: Vec<Event>,
    phase: &'static str,
    injected: u64,
}

/// The shared state of every simulated device.
pub struct World {
    state: Mutex<State>,
}

// SAFETY: a pending request's buffer pointer is only dereferenced by the
// channel that submitted it, while its submitter keeps the buffer alive
// (IoChannel::submit contract); the rest is plain data.
unsafe impl Send for Pending {}

impl World {
    pub fn new(seed: u64, faults: Faults) -> Arc<World> {
        Arc::new(World {
            state: Mutex::new(State {
                rng: Rng::new(seed ^ 0x5eed_d0d0),
                meta_rng: Rng::new(seed ^ 0x3e7a_d0d0),
                misdirect_next: 0,
                faults,
                images: Vec::new(),
                caches: Vec::new(),
                pending: Vec::new(),
                ticks: BTreeMap::new(),
                next_channel: 0,
                crashed: false,
                crash_at: None,
                events: Vec::new(),
                phase: "workload",
                injected: 0,
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a device of `size_bytes`; `write_cache` gives it a volatile cache.
    pub fn add_device(
        self: &Arc<World>,
        name: &str,
        size_bytes: u64,
        write_cache: bool,
    ) -> Arc<SimDevice> {
        let mut s = self.lock();
        s.images.push(Image::default());
        s.caches.push(write_cache);
        let index = s.images.len() - 1;
        Arc::new(SimDevice {
            world: self.clone(),
            index,
            info: DeviceInfo {
                name: format!("sim:{name}"),
                product: "sim",
                block_size: SECTOR as u32,
                num_blocks: size_bytes / SECTOR,
                buf_align: 1,
                persistent: true,
                volatile_write_cache: write_cache,
            },
        })
    }

    pub fn set_faults(&self, f: Faults) {
        self.lock().faults = f;
    }

    pub fn set_phase(&self, phase: &'static str) {
        self.lock().phase = phase;
    }

    /// Misdirects the next `n` metadata writes of device 0 (see [`Faults::misdirect`]).
    pub fn misdirect_next(&self, n: u64) {
        self.lock().misdirect_next = n;
    }

    pub fn arm_crash(&self, at: Option<CrashPoint>) {
        self.lock().crash_at = at;
    }

    pub fn crashed(&self) -> bool {
        self.lock().crashed
    }

    /// Durable events so far.
    pub fn events(&self) -> Vec<Event> {
        self.lock().events.clone()
    }

    pub fn injected(&self) -> u64 {
        self.lock().injected
    }

    /// Crashes now: volatile blocks survive or not, in-flight writes tear.
    /// Every later request fails with EIO and changes nothing.
    pub fn crash(&self) {
        let mut s = self.lock();
        crash_locked(&mut s);
    }

    /// Power back on after a crash: no pending requests, no volatile data.
    pub fn restart(&self) {
        let mut s = self.lock();
        assert!(s.crashed, "restart without a crash");
        s.pending.clear();
        for img in &mut s.images {
            img.volatile.clear();
        }
        s.crashed = false;
        s.crash_at = None;
    }

    /// A copy of the durable image of a device's sector, for tests.
    pub fn durable_sector(&self, device: usize, sector: u64) -> Option<Vec<u8>> {
        self.lock().images[device]
            .durable
            .get(&sector)
            .map(|b| b.to_vec())
    }
}

fn crash_locked(s: &mut State) {
    if s.crashed {
        return;
    }
    s.crashed = true;
    // Unflushed data: each volatile sector independently made it or not.
    for d in 0..s.images.len() {
        let vol = std::mem::take(&mut s.images[d].volatile);
        for (sector, data) in vol {
            if s.rng.chance(500_000) {
                s.images[d].durable.insert(sector, data);
            }
        }
    }
    // In-flight writes: a prefix of their sectors, possibly empty, reaches the media.
    // (They stay queued and complete with EIO when their channel polls.)
    for k in 0..s.pending.len() {
        let p = &s.pending[k];
        if !matches!(
            p.req.kind,
            IoKind::Write | IoKind::WriteZeroes | IoKind::Trim
        ) {
            continue;
        }
        let (device, kind, data) = (p.device, p.req.kind, p.data.clone());
        let sectors = p.req.len_bytes as u64 / SECTOR;
        let first = p.req.offset_bytes / SECTOR;
        let keep = s.rng.below(sectors + 1);
        for i in 0..keep {
            let sector: Box<[u8]> = if kind == IoKind::Write {
                data[(i * SECTOR) as usize..((i + 1) * SECTOR) as usize].into()
            } else {
                vec![0u8; SECTOR as usize].into()
            };
            s.images[device].durable.insert(first + i, sector);
        }
    }
}

fn describe(device: usize, req: &IoRequest) -> String {
    let off = req.offset_bytes;
    match req.kind {
        IoKind::Flush => "flush".into(),
        _ if device == 0 && off < META_BYTES => region_name(off).into(),
        IoKind::WriteZeroes => "zeroing new space".into(),
        IoKind::Trim => "trim".into(),
        _ => "data write".into(),
    }
}

/// How many sectors past its address a write to the metadata region of device 0 lands, if it
/// is misdirected. Log commits draw from the main generator (as they always did); checkpoint
/// and superblock writes from their own.
fn misdirected(s: &mut State, d: usize, req: &IoRequest) -> Option<u64> {
    let end = req.offset_bytes + req.len_bytes as u64;
    if d != 0 || req.kind != IoKind::Write || end + 64 * SECTOR > META_BYTES {
        return None;
    }
    let r = s.faults.misdirect;
    if s.misdirect_next > 0 {
        s.misdirect_next -= 1;
        Some(1 + s.meta_rng.below(63))
    } else if req.offset_bytes >= LOG_OFFSET {
        s.rng.chance(r).then(|| 1 + s.rng.below(63))
    } else {
        (r > 0 && s.meta_rng.chance(r)).then(|| 1 + s.meta_rng.below(63))
    }
}

/// Applies a completed request's effect; returns its result.
fn complete_locked(s: &mut State, p: Pending) -> i32 {
    let req = p.req;
    let d = p.device;
    if s.crashed {
        return -libc::EIO;
    }
    let modifies = req.kind != IoKind::Read;
    if modifies {
        if let Some(cp) = s.crash_at {
            let n = s.events.len() as u64 + 1;
            if n == cp.event && !cp.after {
                crash_locked(s);
                return -libc::EIO;
            }
        }
    }
    let first = req.offset_bytes / SECTOR;
    let sectors = req.len_bytes as u64 / SECTOR;
    match req.kind {
        IoKind::Read => {
            let r = s.faults.read_eio;
            if s.rng.chance(r) {
                s.injected += 1;
                return -libc::EIO;
            }
            let img = &s.images[d];
            for i in 0..sectors {
                let src = img
                    .volatile
                    .get(&(first + i))
                    .or_else(|| img.durable.get(&(first + i)));
                // SAFETY: the caller keeps `buf` valid for len_bytes until this
                // completion is returned (IoChannel::submit contract).
                let dst = unsafe {
                    std::slice::from_raw_parts_mut(
                        req.buf.add((i * SECTOR) as usize),
                        SECTOR as usize,
                    )
                };
                match src {
                    Some(b) => dst.copy_from_slice(b),
                    None => dst.fill(0),
                }
            }
            return 0;
        }
        IoKind::Flush => {
            let vol = std::mem::take(&mut s.images[d].volatile);
            s.images[d].durable.extend(vol);
        }
        IoKind::Write | IoKind::WriteZeroes | IoKind::Trim => {
            let r = s.faults.write_eio;
            if s.rng.chance(r) {
                s.injected += 1;
                return -libc::EIO;
            }
            let mut target = first;
            if let Some(by) = misdirected(s, d, &req) {
                s.injected += 1;
                target = first + by;
            }
            let durable_now = req.fua || !s.caches[d];
            for i in 0..sectors {
                let data: Box<[u8]> = if req.kind == IoKind::Write {
                    p.data[(i * SECTOR) as usize..((i + 1) * SECTOR) as usize].into()
                } else {
                    vec![0u8; SECTOR as usize].into()
                };
                let img = &mut s.images[d];
                if durable_now {
                    img.volatile.remove(&(target + i));
                    img.durable.insert(target + i, data);
                } else {
                    img.volatile.insert(target + i, data);
                }
            }
        }
    }
    let what = describe(d, &req);
    let phase = s.phase;
    s.events.push(Event {
        device: d,
        what,
        phase,
    });
    if let Some(cp) = s.crash_at {
        if s.events.len() as u64 == cp.event && cp.after {
            crash_locked(s);
        }
    }
    0
}

pub struct SimDevice {
    world: Arc<World>,
    index: usize,
    info: DeviceInfo,
}

impl BlockDevice for SimDevice {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn open_channel(&self, _opts: &ChannelOptions<'_>) -> Result<Box<dyn IoChannel>, DeviceError> {
        let mut s = self.world.lock();
        let id = s.next_channel;
        s.next_channel += 1;
        s.ticks.insert(id, 0);
        Ok(Box::new(SimChannel {
            world: self.world.clone(),
            device: self.index,
            id,
            info: self.info.clone(),
            inflight: 0,
        }))
    }
}

struct SimChannel {
    world: Arc<World>,
    device: usize,
    id: u64,
    info: DeviceInfo,
    inflight: usize,
}

impl IoChannel for SimChannel {
    unsafe fn submit(&mut self, req: &IoRequest) -> Result<(), SubmitError> {
        self.info.check(req)?;
        let mut s = self.world.lock();
        let tick = s.ticks[&self.id];
        let r = s.faults.latency_spike;
        let delay = if s.rng.chance(r) {
            20 + s.rng.below(60)
        } else {
            s.rng.below(3)
        };
        let data = if req.kind == IoKind::Write {
            // SAFETY: the caller guarantees `buf` holds len_bytes (IoChannel::submit contract).
            unsafe { std::slice::from_raw_parts(req.buf, req.len_bytes as usize) }.to_vec()
        } else {
            Vec::new()
        };
        s.pending.push(Pending {
            device: self.device,
            channel: self.id,
            ready_tick: tick + delay,
            req: *req,
            data,
        });
        self.inflight += 1;
        Ok(())
    }

    fn poll_completions(&mut self, out: &mut [Completion]) -> usize {
        let mut s = self.world.lock();
        let tick = {
            let t = s.ticks.get_mut(&self.id).expect("channel registered");
            *t += 1;
            *t
        };
        let mut n = 0;
        while n < out.len() {
            let Some(i) = s
                .pending
                .iter()
                .position(|p| p.channel == self.id && p.ready_tick <= tick)
            else {
                break;
            };
            let p = s.pending.remove(i);
            let tag = p.req.tag;
            let result = complete_locked(&mut s, p);
            out[n] = Completion { tag, result };
            n += 1;
        }
        self.inflight -= n;
        n
    }

    fn inflight(&self) -> usize {
        self.inflight
    }

    fn next_deadline_ns(&self) -> Option<u64> {
        // Completions need only polls, never time: callers should spin, not sleep.
        (self.inflight > 0).then_some(0)
    }
}
