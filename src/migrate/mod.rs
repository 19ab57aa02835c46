//! The migration engine: moves a run of granules to another tier while
//! clients keep reading and writing it.
//!
//! Protocol for one run (granules `[g, g+n)` at P on tier A, to tier B):
//! 1. Reserve Q on B (not journaled: free again after a crash).
//! 2. For each copy unit (1 MiB): mark it `Locked(Q)` in the map's migration
//!    state, wait a grace period (every write that did not see the lock has
//!    completed; new writes to the unit wait), copy P→Q through one DMA
//!    buffer per I/O (read into it, write out of it: no memcpy), read Q back
//!    and check every block's crc32c against the source's, then mark it
//!    `Shadow(Q)`: from now on writes go to both P and Q.
//! 3. (A unit whose check fails is copied once more; a second failure aborts.)
//! 4. Switch: one journaled `Map` record points the granules at Q; the
//!    metadata service publishes it only after the commit is durable.
//! 5. Wait a grace period (a write that read the old map has also seen the
//!    shadow and finished), clear the migration state, wait another grace
//!    period (no request still reads P), and release P.
//!
//! A crash before step 4's commit leaves the map on P, which every
//! acknowledged write reached; after it, on Q, which every acknowledged write
//! also reached (shadowing). Copies are paced by a token bucket per tier and
//! a queue-depth share, adjustable at run time.

pub mod demand;
mod object;
pub mod volume_move;
pub mod volume_move_cli;
pub use object::{tier_gc, GcReport, PromoteRequest};

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;

use crate::bdev::{
    BlockDevice, ChannelOptions, Completion, IoChannel, IoKind, IoRequest, SubmitError,
};
use crate::clock::now_ns;
use crate::crashpoint::crashpoint;
use crate::dma::{DmaBuf, DmaPool};
use crate::volume::epoch::Epochs;
use crate::volume::extent_map::{Location, Migration};
use crate::volume::journal::MetaRequest;
use crate::volume::Volume;

/// Bytes copied per lock/grace step.
pub const COPY_UNIT_BYTES: u64 = 1 << 20;
/// Size of one copy I/O (and of each DMA buffer).
pub const COPY_IO_BYTES: usize = 256 << 10;

/// Knobs adjustable at run time (RPC `migration_set_priority`).
#[derive(Debug)]
pub struct MigrationSettings {
    /// Share of each tier's `bandwidth_mib_s` migrations may use, in percent.
    pub bandwidth_pct: AtomicU64,
    /// Copy I/Os in flight at once (the migration's share of device queue depth).
    pub queue_depth: AtomicU64,
    pub paused: AtomicBool,
    /// Reads of data off the fastest tier wait for its promotion (policy `demand-lru`
    /// with `demand_promotion = "sync"`). The policy thread clears it while it is paused
    /// or moving a whole volume, when nothing would serve the promotions.
    pub demand_reads: AtomicBool,
}

impl Default for MigrationSettings {
    fn default() -> Self {
        MigrationSettings {
            bandwidth_pct: AtomicU64::new(50),
            queue_depth: AtomicU64::new(4),
            paused: AtomicBool::new(false),
            demand_reads: AtomicBool::new(false),
        }
    }
}

/// Counters published for RPC and metrics.
#[derive(Default, Debug)]
pub struct MigrationStats {
    pub completed: AtomicU64,
    pub failed: AtomicU64,
    pub bytes_moved: AtomicU64,
    pub bytes_verified: AtomicU64,
    pub verify_retries: AtomicU64,
    pub queued: AtomicU64,
    pub queued_bytes: AtomicU64,
    pub inflight: AtomicU64,
    pub inflight_bytes: AtomicU64,
    pub rate_bytes_per_s: AtomicU64,
    pub promotions: AtomicU64,
    pub demotions: AtomicU64,
}

impl MigrationStats {
    pub fn snapshot(&self) -> serde_json::Value {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let rate = l(&self.rate_bytes_per_s);
        let pending = l(&self.queued_bytes) + l(&self.inflight_bytes);
        serde_json::json!({
            "completed": l(&self.completed),
            "failed": l(&self.failed),
            "bytes_moved": l(&self.bytes_moved),
            "bytes_verified": l(&self.bytes_verified),
            "verify_retries": l(&self.verify_retries),
            "queued": l(&self.queued),
            "queued_bytes": l(&self.queued_bytes),
            "in_flight": l(&self.inflight),
            "in_flight_bytes": l(&self.inflight_bytes),
            "rate_bytes_per_s": rate,
            "eta_s": if rate > 0 { pending as f64 / rate as f64 } else { 0.0 },
            "promotions": l(&self.promotions),
            "demotions": l(&self.demotions),
        })
    }
}

/// A token bucket in bytes (also paces mirror resync).
pub(crate) struct Bucket {
    rate_bytes_per_s: f64,
    tokens: f64,
    last_ns: u64,
}

impl Bucket {
    pub(crate) fn new() -> Bucket {
        Bucket {
            rate_bytes_per_s: 1.0,
            tokens: 0.0,
            last_ns: now_ns(),
        }
    }

    /// Blocks the calling (background) thread until `bytes` may go at `rate_bytes_per_s`.
    pub(crate) fn take(&mut self, bytes: u64, rate_bytes_per_s: f64) {
        self.rate_bytes_per_s = rate_bytes_per_s.max(1.0);
        loop {
            let now = now_ns();
            let dt = now.saturating_sub(self.last_ns) as f64 / 1e9;
            self.last_ns = now;
            // Burst of at most 4 copy units.
            self.tokens =
                (self.tokens + dt * self.rate_bytes_per_s).min((4 * COPY_UNIT_BYTES) as f64);
            if self.tokens >= bytes as f64 {
                self.tokens -= bytes as f64;
                return;
            }
            let wait = (bytes as f64 - self.tokens) / self.rate_bytes_per_s;
            std::thread::sleep(Duration::from_secs_f64(wait.min(0.05)));
        }
    }
}

/// Why a migration did not happen.
#[derive(Debug)]
pub enum MigrateError {
    /// The destination tier has no contiguous room of that size.
    NoRoom(String),
    /// The copy, the verification or the switch failed; nothing changed.
    Failed(String),
}

impl std::fmt::Display for MigrateError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MigrateError::NoRoom(m) | MigrateError::Failed(m) => f.write_str(m),
        }
    }
}

/// A tier as the migrator sees it.
pub struct MigrateTier {
    pub name: String,
    pub device: Arc<dyn BlockDevice>,
    pub bandwidth_mib_s: u64,
}

/// One recorded transfer, for the zero-copy test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceEntry {
    pub kind: IoKind,
    pub tier: u8,
    pub buf: usize,
    pub len: u32,
}

pub struct Migrator {
    volumes: Arc<Vec<Arc<Volume>>>,
    tiers: Vec<MigrateTier>,
    chans: Vec<Box<dyn IoChannel>>,
    pool: DmaPool,
    meta_tx: Sender<MetaRequest>,
    epochs: Arc<Epochs>,
    buckets: Vec<Bucket>,
    pub settings: Arc<MigrationSettings>,
    pub stats: Arc<MigrationStats>,
    reaped: Vec<Completion>,
    /// When set, every copy I/O is recorded (tests).
    pub trace: Option<Vec<TraceEntry>>,
    grace_timeout: Duration,
    /// A whole-volume move's overrides: copy rate cap (bytes/s, replaces the
    /// tier share), copy queue depth, and bytes per lock/grace step.
    pub rate_cap_bytes_per_s: Option<f64>,
    pub queue_depth_override: Option<usize>,
    pub copy_unit_bytes: u64,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Step {
    Read,
    Write,
    Done,
}

struct CopyOp {
    src: (u8, u64),
    dst: (u8, u64),
    len: u32,
    step: Step,
    buf: Option<DmaBuf>,
}

impl Migrator {
    pub fn new(
        volumes: Arc<Vec<Arc<Volume>>>,
        tiers: Vec<MigrateTier>,
        meta_tx: Sender<MetaRequest>,
        epochs: Arc<Epochs>,
        settings: Arc<MigrationSettings>,
        stats: Arc<MigrationStats>,
    ) -> Result<Migrator, String> {
        let pool =
            DmaPool::new(COPY_IO_BYTES, 32).map_err(|e| format!("migration DMA pool: {e}"))?;
        let chans = tiers
            .iter()
            .map(|t| {
                t.device
                    .open_channel(&ChannelOptions {
                        queue_depth: 32,
                        pool: Some(&pool),
                    })
                    .map_err(|e| e.to_string())
            })
            .collect::<Result<Vec<_>, _>>()?;
        let buckets = tiers.iter().map(|_| Bucket::new()).collect();
        Ok(Migrator {
            volumes,
            tiers,
            chans,
            pool,
            meta_tx,
            epochs,
            buckets,
            settings,
            stats,
            reaped: vec![Completion::default(); 32],
            trace: None,
            grace_timeout: Duration::from_secs(30),
            rate_cap_bytes_per_s: None,
            queue_depth_override: None,
            copy_unit_bytes: COPY_UNIT_BYTES,
        })
    }

    /// Adds a tier opened at run time (it gets index `tiers().len()`).
    pub fn add_tier(&mut self, tier: MigrateTier) -> Result<(), String> {
        let chan = tier
            .device
            .open_channel(&ChannelOptions {
                queue_depth: 32,
                pool: Some(&self.pool),
            })
            .map_err(|e| format!("tier '{}': {e}", tier.name))?;
        self.chans.push(chan);
        self.tiers.push(tier);
        self.buckets.push(Bucket {
            rate_bytes_per_s: 1.0,
            tokens: 0.0,
            last_ns: now_ns(),
        });
        Ok(())
    }

    pub fn tier_count(&self) -> usize {
        self.tiers.len()
    }

    pub fn volume(&self, index: usize) -> Arc<Volume> {
        self.volumes[index].clone()
    }

    fn bucket_rate(&self, tier: u8) -> f64 {
        if let Some(cap) = self.rate_cap_bytes_per_s {
            return cap;
        }
        let pct = self
            .settings
            .bandwidth_pct
            .load(Ordering::Relaxed)
            .clamp(1, 100) as f64;
        self.tiers[tier as usize].bandwidth_mib_s as f64 * (1 << 20) as f64 * pct / 100.0
    }

    /// Runs copy operations to completion, `queue_depth` at a time.
    fn run_ops(&mut self, ops: &mut [CopyOp], verify: bool) -> Result<Vec<u32>, String> {
        let qd = self
            .queue_depth_override
            .unwrap_or(self.settings.queue_depth.load(Ordering::Relaxed) as usize)
            .clamp(1, 16);
        let mut crcs = vec![0u32; ops.len()];
        let mut next = 0usize;
        let mut inflight = 0usize;
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            while inflight < qd && next < ops.len() {
                let op = &mut ops[next];
                let src_tier = op.src.0;
                let len = op.len as u64;
                let rate = self.bucket_rate(src_tier);
                self.buckets[src_tier as usize].take(len, rate);
                let buf = self.pool.alloc().ok_or("migration DMA pool exhausted")?;
                let req = IoRequest::read(next as u64, op.src.1, buf.ptr, op.len, buf.index);
                // SAFETY: the buffer belongs to this op until its completion is reaped below.
                match unsafe { self.chans[src_tier as usize].submit(&req) } {
                    Ok(()) => {}
                    Err(SubmitError::QueueFull) => {
                        self.pool.free(buf);
                        break;
                    }
                    Err(e) => {
                        self.pool.free(buf);
                        return Err(format!("copy read refused: {e}"));
                    }
                }
                if let Some(t) = self.trace.as_mut() {
                    t.push(TraceEntry {
                        kind: IoKind::Read,
                        tier: src_tier,
                        buf: buf.ptr as usize,
                        len: op.len,
                    });
                }
                op.buf = Some(buf);
                op.step = Step::Read;
                next += 1;
                inflight += 1;
            }
            if inflight == 0 && next == ops.len() {
                return Ok(crcs);
            }
            let mut progressed = false;
            for t in 0..self.chans.len() {
                self.chans[t].submit_pending();
                let n = self.chans[t].poll_completions(&mut self.reaped);
                for k in 0..n {
                    let c = self.reaped[k];
                    let i = c.tag as usize;
                    progressed = true;
                    if c.result < 0 {
                        // Free what is ours: this op and every other op completed in the same
                        // batch (they are no longer in flight, and `drain` would wait 30 s for
                        // them and leak their buffers; found by `kiln sim`, seeds 58 and 61).
                        // In-flight others finish in `drain` before returning.
                        let err = std::io::Error::from_raw_os_error(-c.result);
                        for done in &self.reaped[k..n] {
                            if let Some(b) = ops[done.tag as usize].buf.take() {
                                self.pool.free(b);
                            }
                        }
                        self.drain(ops);
                        return Err(format!(
                            "copy I/O failed on tier '{}': {err}",
                            self.tiers[t].name
                        ));
                    }
                    let op = &mut ops[i];
                    let buf = op.buf.expect("op in flight has a buffer");
                    match op.step {
                        Step::Read => {
                            // SAFETY: the read completed; we only read the buffer to checksum it.
                            crcs[i] = crc32c::crc32c(&unsafe { buf.as_slice() }[..op.len as usize]);
                            if verify {
                                op.step = Step::Done;
                                self.pool.free(op.buf.take().unwrap());
                                inflight -= 1;
                                continue;
                            }
                            let w =
                                IoRequest::write(i as u64, op.dst.1, buf.ptr, op.len, buf.index);
                            // The same buffer goes back out: zero-copy.
                            // SAFETY: the buffer stays owned by this op until the write completes.
                            unsafe { self.chans[op.dst.0 as usize].submit(&w) }
                                .map_err(|e| format!("copy write refused: {e}"))?;
                            if let Some(tr) = self.trace.as_mut() {
                                tr.push(TraceEntry {
                                    kind: IoKind::Write,
                                    tier: op.dst.0,
                                    buf: buf.ptr as usize,
                                    len: op.len,
                                });
                            }
                            op.step = Step::Write;
                        }
                        Step::Write => {
                            op.step = Step::Done;
                            self.pool.free(op.buf.take().unwrap());
                            inflight -= 1;
                        }
                        Step::Done => unreachable!("completion for a finished copy op"),
                    }
                }
            }
            if !progressed {
                if Instant::now() > deadline {
                    return Err("copy I/O timed out".into());
                }
                self.wait();
            }
        }
    }

    /// Waits for in-flight ops after an error so their buffers can be freed.
    fn drain(&mut self, ops: &mut [CopyOp]) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while ops.iter().any(|o| o.buf.is_some()) && Instant::now() < deadline {
            for t in 0..self.chans.len() {
                self.chans[t].submit_pending();
                let n = self.chans[t].poll_completions(&mut self.reaped);
                for k in 0..n {
                    let i = self.reaped[k].tag as usize;
                    if let Some(b) = ops[i].buf.take() {
                        self.pool.free(b);
                    }
                }
            }
            self.wait();
        }
    }

    fn wait(&self) {
        let mut fds: Vec<libc::pollfd> = self
            .chans
            .iter()
            .filter_map(|c| c.notifier_fd())
            .map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        if fds.is_empty() || self.chans.iter().any(|c| c.next_deadline_ns().is_some()) {
            std::thread::sleep(Duration::from_micros(50));
            return;
        }
        // SAFETY: `fds` is a valid array of pollfd of the length we pass.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 1) };
    }

    /// Counts one switched run as a promotion (to a faster tier) or a demotion.
    fn count_direction(&self, from: u8, to: u8) {
        let c = if to < from {
            &self.stats.promotions
        } else {
            &self.stats.demotions
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn grace(&self) -> Result<(), String> {
        if self.epochs.grace(self.grace_timeout) {
            Ok(())
        } else {
            Err(format!(
                "grace period not reached in {:?}: a device is not completing I/O",
                self.grace_timeout
            ))
        }
    }

    /// Flushes one tier's volatile write cache through the migrator's channel. A device
    /// without flush support has no volatile cache to lose.
    pub(crate) fn flush_tier(&mut self, tier: u8) -> Result<(), String> {
        let req = IoRequest::flush(u64::MAX);
        // SAFETY: a flush carries no buffer; no other copy I/O is in flight on the channel.
        let rc = unsafe { crate::bdev::submit_and_wait(self.chans[tier as usize].as_mut(), &req) };
        if rc < 0 && rc != -libc::EOPNOTSUPP {
            return Err(format!(
                "flush of tier {tier} before the switch failed: {}",
                std::io::Error::from_raw_os_error(-rc)
            ));
        }
        Ok(())
    }

    /// Copy buffers not back in the pool: zero whenever no migration runs.
    pub fn copy_buffers_in_use(&self) -> usize {
        self.pool.capacity() - self.pool.available()
    }

    pub(crate) fn meta_call<T>(
        &self,
        build: impl FnOnce(Sender<Result<T, String>>) -> MetaRequest,
    ) -> Result<T, String> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.meta_tx
            .send(build(tx))
            .map_err(|_| "metadata service stopped".to_string())?;
        rx.recv_timeout(Duration::from_secs(60))
            .map_err(|_| "metadata service did not answer".to_string())?
    }

    fn ops_for(&self, src: Location, dst: Location, first: u64, count: u64) -> Vec<CopyOp> {
        let g = self.volumes[0].map.granule_bytes;
        let total = count * g;
        let mut ops = Vec::new();
        let mut off = 0u64;
        while off < total {
            let len = (total - off).min(COPY_IO_BYTES as u64) as u32;
            let _ = first;
            ops.push(CopyOp {
                src: (src.tier, src.phys_granule * g + off),
                dst: (dst.tier, dst.phys_granule * g + off),
                len,
                step: Step::Done,
                buf: None,
            });
            off += len as u64;
        }
        ops
    }

    /// Moves granules `[first, first+count)` of `volume` to `to_tier`. Runs on
    /// other tiers are moved one by one; unmapped granules are skipped.
    pub fn migrate(
        &mut self,
        volume: usize,
        first: u64,
        count: u64,
        to_tier: u8,
    ) -> Result<u64, String> {
        let vol = self.volumes[volume].clone();
        let mut moved = 0;
        let mut g = first;
        while g < first + count {
            let Some(loc) = vol.map.get(g) else {
                g += 1;
                continue;
            };
            // The physically contiguous run starting here, within the request.
            let mut n = 1;
            while g + n < first + count
                && vol.map.get(g + n)
                    == Some(Location {
                        tier: loc.tier,
                        phys_granule: loc.phys_granule + n,
                    })
            {
                n += 1;
            }
            if loc.tier != to_tier && self.object_tier(to_tier).is_some() {
                // Objects are written whole: see object.rs.
                let span = crate::bdev::object::OBJECT_SPAN_GRANULES;
                moved += self.demote_to_object(volume, g, n, to_tier, span)?;
            } else if loc.tier != to_tier {
                moved += self.migrate_fitting(volume, g, n, loc, to_tier)?;
            }
            g += n;
        }
        Ok(moved)
    }

    /// Moves a run, halving it while the destination has no contiguous room for it.
    fn migrate_fitting(
        &mut self,
        volume: usize,
        first: u64,
        count: u64,
        from: Location,
        to_tier: u8,
    ) -> Result<u64, String> {
        match self.migrate_run(volume, first, count, from, to_tier) {
            Ok(()) => Ok(count * self.volumes[volume].map.granule_bytes),
            Err(MigrateError::NoRoom(_)) if count > 1 => {
                let half = count / 2;
                let a = self.migrate_fitting(volume, first, half, from, to_tier)?;
                let rest = Location {
                    tier: from.tier,
                    phys_granule: from.phys_granule + half,
                };
                let b = self.migrate_fitting(volume, first + half, count - half, rest, to_tier)?;
                Ok(a + b)
            }
            Err(e) => Err(e.to_string()),
        }
    }

    fn migrate_run(
        &mut self,
        volume: usize,
        first: u64,
        count: u64,
        from: Location,
        to_tier: u8,
    ) -> Result<(), MigrateError> {
        let vol = self.volumes[volume].clone();
        let g = vol.map.granule_bytes;
        let bytes = count * g;
        let phys = self
            .meta_call(|reply| MetaRequest::Reserve {
                tier: to_tier,
                granules: count,
                reply,
            })
            .map_err(MigrateError::NoRoom)?;
        let to = Location {
            tier: to_tier,
            phys_granule: phys,
        };
        self.stats.inflight.fetch_add(1, Ordering::Relaxed);
        self.stats
            .inflight_bytes
            .fetch_add(bytes, Ordering::Relaxed);
        let t0 = Instant::now();
        let result = self.copy_verify_switch(&vol, volume, first, count, from, to);
        self.stats.inflight.fetch_sub(1, Ordering::Relaxed);
        self.stats
            .inflight_bytes
            .fetch_sub(bytes, Ordering::Relaxed);
        // After a switch, a write that read the old map must also still see the
        // shadow: wait for every request that may have read the old map before
        // clearing it (a write reads the map, then the shadow state).
        let pre_clear = if result.is_ok() { self.grace() } else { Ok(()) };
        // Whatever happened, no granule stays locked or shadowed.
        vol.map.set_migration(first, count, Migration::None);
        let grace = pre_clear.and(self.grace());
        match result {
            Ok(()) => {
                grace.map_err(MigrateError::Failed)?;
                let _ = self.meta_tx.send(MetaRequest::Release {
                    tier: from.tier,
                    phys_granule: from.phys_granule,
                    count,
                });
                self.stats.completed.fetch_add(1, Ordering::Relaxed);
                self.stats.bytes_moved.fetch_add(bytes, Ordering::Relaxed);
                let rate = bytes as f64 / t0.elapsed().as_secs_f64().max(1e-6);
                let old = self.stats.rate_bytes_per_s.load(Ordering::Relaxed) as f64;
                self.stats
                    .rate_bytes_per_s
                    .store((old * 0.7 + rate * 0.3) as u64, Ordering::Relaxed);
                self.count_direction(from.tier, to_tier);
                tracing::debug!(volume = %vol.name, first, count, from = from.tier, to = to_tier, "migrated");
                Ok(())
            }
            Err(e) => {
                if grace.is_ok() {
                    let _ = self.meta_tx.send(MetaRequest::Release {
                        tier: to.tier,
                        phys_granule: to.phys_granule,
                        count,
                    });
                }
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(volume = %vol.name, first, count, "migration aborted: {e}");
                Err(MigrateError::Failed(e))
            }
        }
    }

    /// Copies one unit under its lock and verifies the copy before unlocking:
    /// the crc32c of every block read from the source must equal the crc32c of
    /// the block read back from the destination. Only then does the unit
    /// become a shadow (writes go to both copies).
    fn copy_unit(
        &mut self,
        vol: &Volume,
        first: u64,
        count: u64,
        from: Location,
        to: Location,
    ) -> Result<(), String> {
        vol.map.set_migration(first, count, Migration::Locked(to));
        let r = self.grace().and_then(|()| {
            let mut ops = self.ops_for(from, to, first, count);
            let src = self.run_ops(&mut ops, false)?;
            let mut back = self.ops_for(to, to, first, count);
            let dst = self.run_ops(&mut back, true)?;
            if src != dst {
                return Err(format!(
                    "crc32c mismatch between source and copy of granules {first}+{count}"
                ));
            }
            self.stats
                .bytes_verified
                .fetch_add(count * vol.map.granule_bytes, Ordering::Relaxed);
            Ok(())
        });
        vol.map.set_migration(first, count, Migration::Shadow(to));
        r
    }

    fn copy_verify_switch(
        &mut self,
        vol: &Volume,
        volume: usize,
        first: u64,
        count: u64,
        from: Location,
        to: Location,
    ) -> Result<(), String> {
        let g = vol.map.granule_bytes;
        let unit = (self.copy_unit_bytes / g).max(1);
        crashpoint("migrate.copy.before");
        let mut u = 0;
        while u < count {
            let n = unit.min(count - u);
            let shift = |l: Location| Location {
                tier: l.tier,
                phys_granule: l.phys_granule + u,
            };
            if let Err(e) = self.copy_unit(vol, first + u, n, shift(from), shift(to)) {
                // One retry: a device hiccup, not a race (the unit was locked).
                self.stats.verify_retries.fetch_add(1, Ordering::Relaxed);
                tracing::info!("retrying copy of granules {}+{n}: {e}", first + u);
                self.copy_unit(vol, first + u, n, shift(from), shift(to))?;
            }
            u += n;
        }
        // The copy must be durable before the switch record is: on a device with a
        // volatile write cache a crash could otherwise keep the record and lose the data
        // it points at (found by `kiln sim`, seed 15).
        self.flush_tier(to.tier)?;
        crashpoint("migrate.copy.after_flush");
        self.meta_call(|reply| MetaRequest::Switch {
            volume,
            first_granule: first,
            count,
            from,
            to,
            reply,
        })
    }
}
