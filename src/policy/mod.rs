//! The policy loop, off the hot path, on its own thread:
//! collect heat → predict → plan partitions and tiers → migrate → sleep.
//!
//! - Heat: each reactor counts accesses per 64 KiB granule in its own
//!   counters ([`crate::heat`]); every window the loop folds them.
//! - Prediction: per granule, an exponentially decayed count plus a trend
//!   term (the rise over the previous window), so a partition that is heating
//!   up is moved before it peaks. A burst detector (residual z-score of the
//!   volume's total) raises the weight of the latest window while it lasts.
//! - Partitions ([`planner`]): variable-size runs of granules between
//!   `chunk_min` and `chunk_max`. A partition whose heat is uneven is split;
//!   adjacent partitions of the same class on the same tier are merged.
//! - Placement: by cost against benefit under tier capacities, with
//!   hysteresis and a minimum residence time (see [`planner::plan`]).
//! - Migration: [`crate::migrate::Migrator`], paced, shadowed, verified.

pub mod planner;

/// Most moves in one batch (one lock/grace round, one journal commit).
const BATCH_MOVES_MAX: usize = 64;
/// Most bytes in one batch, so a batch never holds foreground writes for long.
const BATCH_BYTES_MAX: u64 = 4 << 20;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::heat::{HeatConfig, HeatRecorder, HeatSampler};
use crossbeam_channel::Receiver;

use crate::migrate::{MigrationSettings, MigrationStats, Migrator, PromoteRequest};
use crate::volume::journal::TierUsage;
use crate::volume::Volume;

/// Which placement policy runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PolicyKind {
    /// Predictive: promote what is heating up, demote what cooled, by cost-benefit.
    Kiln,
    /// Classic cache-like baseline: promote whatever was read on a slow tier, evict LRU.
    DemandLru,
    /// S3-FIFO-like baseline: promote after two windows with accesses, evict FIFO with a second chance.
    S3fifo,
    /// Never move anything.
    Static,
}

/// How `demand-lru` promotes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DemandPromotion {
    /// In the I/O path: a read of data off the fastest tier waits while its granules are
    /// promoted (evicting the least recently used), then reads the new copy. The classic
    /// cache-like baseline (see `crate::migrate::demand`).
    Sync,
    /// Through the plan, once per window: what was read on a slower tier is promoted
    /// at the next window, and the read itself is served from where the data is.
    Window,
}

/// The `[policy]` section.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    #[serde(default = "d_policy")]
    pub policy: PolicyKind,
    /// Window length: heat is folded and the plan recomputed this often.
    #[serde(default = "d_interval")]
    pub interval_ms: u64,
    /// Bytes the policy may migrate per window.
    #[serde(default = "d_budget")]
    pub budget_bytes_per_window: String,
    /// Smallest and largest partition.
    #[serde(default = "d_chunk_min")]
    pub chunk_min: String,
    #[serde(default = "d_chunk_max")]
    pub chunk_max: String,
    /// Windows a partition stays on its tier before it may move again.
    #[serde(default = "d_residence")]
    pub min_residence_windows: u64,
    /// A promotion must beat the partition it displaces by this factor.
    #[serde(default = "d_hysteresis")]
    pub hysteresis: f64,
    /// Fill the fastest tier only up to this percentage, keeping room for new writes.
    #[serde(default = "d_watermark")]
    pub fast_watermark_pct: u64,
    /// Share of each tier's bandwidth migrations may use, in percent.
    #[serde(default = "d_bw")]
    pub migration_bandwidth_pct: u64,
    /// Copy I/Os in flight at once.
    #[serde(default = "d_qd")]
    pub migration_queue_depth: u64,
    /// How `policy = "demand-lru"` promotes: `"sync"` (default) or `"window"`.
    #[serde(default = "d_demand")]
    pub demand_promotion: DemandPromotion,
}

fn d_policy() -> PolicyKind {
    PolicyKind::Kiln
}
fn d_interval() -> u64 {
    1000
}
fn d_budget() -> String {
    "256MiB".into()
}
fn d_chunk_min() -> String {
    "64KiB".into()
}
fn d_chunk_max() -> String {
    "64MiB".into()
}
fn d_residence() -> u64 {
    5
}
fn d_hysteresis() -> f64 {
    0.25
}
fn d_watermark() -> u64 {
    90
}
fn d_bw() -> u64 {
    50
}
fn d_qd() -> u64 {
    4
}
fn d_demand() -> DemandPromotion {
    DemandPromotion::Sync
}

impl Default for PolicyConfig {
    fn default() -> Self {
        toml::from_str("").expect("defaults")
    }
}

/// One window of a volume's heat, kept for `volume_get_heatmap` and `kiln heatmap`.
#[derive(Clone, Debug, Serialize)]
pub struct HeatFrame {
    pub window: u64,
    pub unix_ms: u64,
    /// Accesses per cell in this window (a cell is `cell_bytes` of the volume).
    pub accesses: Vec<u32>,
    /// Tier index of each cell at the end of the window (255 = unmapped).
    pub tiers: Vec<u8>,
}

/// What the control plane reads.
pub struct PolicyShared {
    pub kind: PolicyKind,
    pub paused: AtomicBool,
    pub stop: AtomicBool,
    pub windows: AtomicU64,
    pub splits: AtomicU64,
    pub merges: AtomicU64,
    pub last_plan_moves: AtomicU64,
    pub bursts: AtomicU64,
    pub settings: Arc<MigrationSettings>,
    pub stats: Arc<MigrationStats>,
    /// Per volume: the latest heat frames (bounded), and the cell size.
    pub heat: Vec<Mutex<VecDeque<HeatFrame>>>,
    pub cell_bytes: Vec<u64>,
    /// Per volume: the current partitions `(first_granule, count, class, score)`.
    pub partitions: Vec<Mutex<Vec<planner::PartitionView>>>,
    /// Whole-volume moves: requested, running and finished (run on this thread).
    pub moves: Arc<crate::migrate::volume_move::MoveControl>,
    /// RPC `policy_force_tier`: the tier to move every mapped granule to
    /// (`FORCE_NONE` when none is pending), the object size for an object
    /// tier, and how many forced passes have finished.
    pub force_tier: AtomicU64,
    pub force_object_granules: AtomicU64,
    pub force_done: AtomicU64,
    pub force_error: Mutex<Option<String>>,
}

/// No forced placement pending.
pub const FORCE_NONE: u64 = u64::MAX;
/// How often the policy thread garbage-collects object tiers.
pub const OBJECT_GC_INTERVAL: Duration = Duration::from_secs(300);

/// Frames kept per volume.
pub const HEAT_FRAMES_MAX: usize = 900;

pub struct PolicyThread {
    pub shared: Arc<PolicyShared>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl PolicyThread {
    pub fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Drop for PolicyThread {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Tier facts the planner needs.
#[derive(Clone, Debug)]
pub struct PlanTier {
    pub name: String,
    pub read_latency_us: u64,
    pub write_latency_us: u64,
    pub bandwidth_mib_s: u64,
    pub cost_per_gib_month: f64,
    pub usage: Arc<TierUsage>,
    /// Request prices, dollars per 1000 (object tiers).
    pub cost_per_1k_get: f64,
    pub cost_per_1k_put: f64,
    /// The object tier behind this tier, if it is one (its health gates demotions).
    pub object: Option<Arc<crate::bdev::object::ObjectTier>>,
}

/// Creates the heat samplers (one per volume, one counter set per reactor)
/// and returns each reactor's recorders.
pub fn heat_samplers(
    volumes: &[Arc<Volume>],
    reactors: usize,
) -> (Vec<HeatSampler>, Vec<Vec<HeatRecorder>>) {
    let cfg = HeatConfig {
        windows: 8,
        window_len: 1000,
        decay: 0.5,
        sample_shift: 0,
        reactors_max: reactors.max(1),
    };
    let mut samplers: Vec<HeatSampler> = volumes
        .iter()
        .map(|v| HeatSampler::new(v.map.granules() as usize, cfg))
        .collect();
    let recorders = (0..reactors)
        .map(|r| samplers.iter_mut().map(|s| s.handle(r)).collect())
        .collect();
    (samplers, recorders)
}

/// Starts the policy loop.
pub fn start(
    config: PolicyConfig,
    volumes: Arc<Vec<Arc<Volume>>>,
    tiers: Vec<PlanTier>,
    samplers: Vec<HeatSampler>,
    settings: Arc<MigrationSettings>,
    stats: Arc<MigrationStats>,
    build_migrator: impl FnOnce() -> Result<Migrator, String> + Send + 'static,
) -> Result<PolicyThread, String> {
    start_with_objects(
        config,
        volumes,
        tiers,
        samplers,
        settings,
        stats,
        build_migrator,
        None,
    )
}

/// [`start`], plus the queue of promotions that writes to object-resident
/// data wait for (served between migrations and while the loop sleeps).
#[allow(clippy::too_many_arguments)]
pub fn start_with_objects(
    config: PolicyConfig,
    volumes: Arc<Vec<Arc<Volume>>>,
    tiers: Vec<PlanTier>,
    samplers: Vec<HeatSampler>,
    settings: Arc<MigrationSettings>,
    stats: Arc<MigrationStats>,
    build_migrator: impl FnOnce() -> Result<Migrator, String> + Send + 'static,
    promote_rx: Option<Receiver<PromoteRequest>>,
) -> Result<PolicyThread, String> {
    let g = volumes
        .first()
        .map(|v| v.map.granule_bytes)
        .unwrap_or(64 << 10);
    let parse =
        |s: &str, key: &str| crate::units::parse_size(s).map_err(|e| format!("policy.{key}: {e}"));
    let chunk_min = parse(&config.chunk_min, "chunk_min")?;
    let chunk_max = parse(&config.chunk_max, "chunk_max")?;
    let budget = parse(&config.budget_bytes_per_window, "budget_bytes_per_window")?;
    if chunk_min < g
        || chunk_min % g != 0
        || chunk_max < chunk_min
        || !chunk_max.is_power_of_two()
        || !chunk_min.is_power_of_two()
    {
        return Err(format!(
            "policy.chunk_min/chunk_max: need powers of two with {g} <= chunk_min <= chunk_max"
        ));
    }
    settings.bandwidth_pct.store(
        config.migration_bandwidth_pct.clamp(1, 100),
        Ordering::Relaxed,
    );
    settings
        .queue_depth
        .store(config.migration_queue_depth.clamp(1, 16), Ordering::Relaxed);
    let cell_bytes: Vec<u64> = volumes
        .iter()
        .map(|v| (v.size_bytes / 4096).max(1 << 20).next_power_of_two())
        .collect();
    let shared = Arc::new(PolicyShared {
        kind: config.policy,
        paused: AtomicBool::new(false),
        stop: AtomicBool::new(false),
        windows: AtomicU64::new(0),
        splits: AtomicU64::new(0),
        merges: AtomicU64::new(0),
        last_plan_moves: AtomicU64::new(0),
        bursts: AtomicU64::new(0),
        settings,
        stats,
        heat: volumes
            .iter()
            .map(|_| Mutex::new(VecDeque::new()))
            .collect(),
        cell_bytes,
        partitions: volumes.iter().map(|_| Mutex::new(Vec::new())).collect(),
        moves: Arc::default(),
        force_tier: AtomicU64::new(FORCE_NONE),
        force_object_granules: AtomicU64::new(crate::bdev::object::OBJECT_SPAN_GRANULES),
        force_done: AtomicU64::new(0),
        force_error: Mutex::new(None),
    });
    let s2 = shared.clone();
    let params = planner::Params {
        kind: config.policy,
        chunk_min_granules: chunk_min / g,
        chunk_max_granules: chunk_max / g,
        initial_granules: 0,
        min_residence_windows: config.min_residence_windows,
        hysteresis: config.hysteresis,
        fast_watermark: config.fast_watermark_pct.clamp(10, 100) as f64 / 100.0,
        budget_bytes: budget,
        granule_bytes: g,
    };
    // Channels belong to the thread that polls them: build the migrator there.
    let (ready_tx, ready_rx) = crossbeam_channel::bounded(1);
    let handle = std::thread::Builder::new()
        .name("kiln-policy".into())
        .spawn(move || match build_migrator() {
            Ok(migrator) => {
                let _ = ready_tx.send(Ok(()));
                let objects = ObjectWork {
                    promote_rx,
                    last_gc: Instant::now(),
                    demand: (config.policy == PolicyKind::DemandLru
                        && config.demand_promotion == DemandPromotion::Sync)
                        .then(|| DemandWork {
                            settings: s2.settings.clone(),
                            recent: volumes
                                .iter()
                                .map(|v| vec![0; v.map.granules() as usize])
                                .collect(),
                            clock: 0,
                        }),
                };
                run(
                    config, s2, volumes, tiers, samplers, migrator, params, objects,
                )
            }
            Err(e) => {
                let _ = ready_tx.send(Err(e));
            }
        })
        .map_err(|e| e.to_string())?;
    ready_rx
        .recv()
        .map_err(|_| "the policy thread died at start".to_string())??;
    Ok(PolicyThread {
        shared,
        handle: Some(handle),
    })
}

#[allow(clippy::too_many_arguments)]
fn run(
    config: PolicyConfig,
    shared: Arc<PolicyShared>,
    volumes: Arc<Vec<Arc<Volume>>>,
    tiers: Vec<PlanTier>,
    mut samplers: Vec<HeatSampler>,
    mut migrator: Migrator,
    params: planner::Params,
    mut objects: ObjectWork,
) {
    let interval = Duration::from_millis(config.interval_ms.max(10));
    let mut states: Vec<planner::VolumeState> = volumes
        .iter()
        .map(|v| {
            planner::VolumeState::new(
                v.map.granules(),
                (v.chunk_bytes / v.map.granule_bytes).max(params.chunk_min_granules),
            )
        })
        .collect();
    let mut next = Instant::now() + interval;
    let mut window = 0u64;
    while !shared.stop.load(Ordering::Relaxed) {
        // Demand reads wait for this thread: only while it serves them promptly.
        let demand_on = !shared.paused.load(Ordering::Relaxed)
            && shared.force_tier.load(Ordering::Relaxed) == FORCE_NONE;
        objects.set_demand(demand_on, &mut migrator);
        objects.serve(&mut migrator);
        force_placement(&shared, &volumes, &mut migrator, &mut objects);
        objects.gc_if_due(&migrator);
        // A whole-volume move takes the thread (and the heat) until it ends.
        if let Some(job) = shared.moves.next_job() {
            objects.set_demand(false, &mut migrator);
            let vi = job.volume;
            crate::migrate::volume_move::run(job, &mut migrator, &mut samplers[vi], &shared.stop);
            next = Instant::now() + interval;
            continue;
        }
        let now = Instant::now();
        if now < next {
            objects.wait((next - now).min(Duration::from_millis(50)), &mut migrator);
            continue;
        }
        next += interval;
        if next < Instant::now() {
            next = Instant::now() + interval;
        }
        window += 1;
        shared.windows.store(window, Ordering::Relaxed);
        // 1. Collect heat.
        for (vi, (vol, sampler)) in volumes.iter().zip(samplers.iter_mut()).enumerate() {
            let map = sampler.fold_window();
            let st = &mut states[vi];
            if st.observe(map, window) {
                shared.bursts.fetch_add(1, Ordering::Relaxed);
            }
            objects.note_accesses(vi, st.last_access(), window);
            record_frame(&shared, vi, vol, map, window);
        }
        if shared.paused.load(Ordering::Relaxed) || params.kind == PolicyKind::Static {
            continue;
        }
        // 2-3. Predict and plan.
        let mut moves = Vec::new();
        for (vi, vol) in volumes.iter().enumerate() {
            if moved_volume(vol, migrator.tier_count(), tiers.len()) {
                // Its chunks live on a tier the planner does not model (added at run time).
                continue;
            }
            let st = &mut states[vi];
            let (s, m) = st.repartition(vol, &params);
            shared.splits.fetch_add(s, Ordering::Relaxed);
            shared.merges.fetch_add(m, Ordering::Relaxed);
            moves.extend(planner::plan(vi, vol, st, &tiers, &params, window));
            *shared.partitions[vi].lock().unwrap() = st.view(vol);
        }
        moves.sort_by(|a, b| b.priority.total_cmp(&a.priority));
        shared
            .last_plan_moves
            .store(moves.len() as u64, Ordering::Relaxed);
        let mut bytes_left = params.budget_bytes;
        let queued: Vec<_> = moves
            .into_iter()
            .take_while(|m| {
                let take = m.count * params.granule_bytes;
                if take > bytes_left {
                    return false;
                }
                bytes_left -= take;
                true
            })
            .collect();
        let queued = batch_order(queued, params.granule_bytes);
        shared
            .stats
            .queued
            .store(queued.len() as u64, Ordering::Relaxed);
        shared.stats.queued_bytes.store(
            queued.iter().map(|m| m.count * params.granule_bytes).sum(),
            Ordering::Relaxed,
        );
        // 4. Migrate, most urgent first, until the window is over. Consecutive small
        //    moves to the same tier go as one batch: one lock and grace round and one
        //    journal commit for all of them, instead of one each.
        let mut i = 0;
        while i < queued.len() {
            if shared.stop.load(Ordering::Relaxed) || shared.paused.load(Ordering::Relaxed) {
                break;
            }
            objects.serve(&mut migrator);
            let head = &queued[i];
            let mut end = i + 1;
            let mut bytes = head.count * params.granule_bytes;
            while end < queued.len()
                && end - i < BATCH_MOVES_MAX
                && queued[end].volume == head.volume
                && queued[end].to_tier == head.to_tier
                && bytes + queued[end].count * params.granule_bytes <= BATCH_BYTES_MAX
            {
                bytes += queued[end].count * params.granule_bytes;
                end += 1;
            }
            let batch = &queued[i..end];
            i = end;
            shared
                .stats
                .queued
                .fetch_sub(batch.len() as u64, Ordering::Relaxed);
            shared
                .stats
                .queued_bytes
                .fetch_sub(bytes, Ordering::Relaxed);
            if batch.len() > 1 {
                let runs: Vec<_> = batch
                    .iter()
                    .flat_map(|m| {
                        migrator.runs_to_move(m.volume, m.first_granule, m.count, m.to_tier)
                    })
                    .collect();
                let t0 = Instant::now();
                let moved = runs.is_empty()
                    || migrator
                        .migrate_batch(head.volume, &runs, head.to_tier)
                        .map_err(|e| tracing::debug!("batch of {} moves: {e}", batch.len()))
                        .is_ok();
                tracing::debug!(
                    moves = batch.len(),
                    runs = runs.len(),
                    bytes,
                    to = head.to_tier,
                    ms = t0.elapsed().as_millis() as u64,
                    moved,
                    "batch"
                );
                if moved {
                    for m in batch {
                        states[m.volume].moved(m.first_granule, m.count, window);
                    }
                    if Instant::now() > next + interval {
                        break;
                    }
                    continue;
                }
            }
            // One at a time (a single move, or a batch that failed as a whole: the
            // one-by-one path halves a move that finds no contiguous room).
            let mut failed = false;
            for m in batch {
                match migrator.migrate(m.volume, m.first_granule, m.count, m.to_tier) {
                    Ok(_) => states[m.volume].moved(m.first_granule, m.count, window),
                    Err(e) => {
                        tracing::warn!(
                            "migration of {}+{} to tier {} failed: {e}",
                            m.first_granule,
                            m.count,
                            m.to_tier
                        );
                        failed = true;
                        break;
                    }
                }
            }
            // A full tier or a failing device: stop this window's plan.
            if failed || Instant::now() > next + interval {
                break;
            }
        }
        shared.stats.queued.store(0, Ordering::Relaxed);
        shared.stats.queued_bytes.store(0, Ordering::Relaxed);
    }
    // Reads parked for a demand promotion go on where their data is.
    objects.set_demand(false, &mut migrator);
}

/// Reorders a window's queue (most urgent first) so that moves batch: it is cut
/// into segments of up to two batches' worth of moves, and inside a segment the
/// moves to slower tiers (the demotions that make room) go first, then the
/// promotions they make room for, each group in priority order. The planner
/// emits each promotion right after its own demotions, so without this the
/// queue alternates tiers and every batch holds one move.
fn batch_order(queued: Vec<planner::Move>, granule_bytes: u64) -> Vec<planner::Move> {
    let mut out = Vec::with_capacity(queued.len());
    let mut segment: Vec<planner::Move> = Vec::new();
    let mut bytes = 0;
    let flush = |segment: &mut Vec<planner::Move>, out: &mut Vec<planner::Move>| {
        // Stable: priority order survives inside each (volume, tier) group.
        segment.sort_by_key(|m| (std::cmp::Reverse(m.to_tier), m.volume));
        out.append(segment);
    };
    for m in queued {
        bytes += m.count * granule_bytes;
        segment.push(m);
        if segment.len() >= 2 * BATCH_MOVES_MAX || bytes >= 2 * BATCH_BYTES_MAX {
            flush(&mut segment, &mut out);
            bytes = 0;
        }
    }
    flush(&mut segment, &mut out);
    out
}

/// Promotions requests wait for: object-tier writes, demand reads, and the
/// object tiers' garbage collection.
struct ObjectWork {
    promote_rx: Option<Receiver<PromoteRequest>>,
    last_gc: Instant,
    /// The synchronous demand policy's state, when it is the policy.
    demand: Option<DemandWork>,
}

/// State of the synchronous demand path (`crate::migrate::demand`).
struct DemandWork {
    settings: Arc<MigrationSettings>,
    /// Per volume, per granule: the logical time of its latest access or promotion (LRU).
    recent: Vec<Vec<u64>>,
    /// Logical clock: +1 per promotion round and per window fold.
    clock: u64,
}

impl ObjectWork {
    /// Switches demand reads on or off. Switching off waits one epoch grace period,
    /// so that every reactor that saw them on has sent its request, then serves
    /// (without promoting) the reads already waiting.
    fn set_demand(&mut self, on: bool, migrator: &mut Migrator) {
        let Some(d) = &self.demand else { return };
        let was = d.settings.demand_reads.swap(on, Ordering::Relaxed);
        if was && !on {
            if let Err(e) = migrator.grace() {
                tracing::warn!("demand reads off: {e}");
            }
            self.serve(migrator);
        }
    }

    /// Folds a window's accesses into the demand path's LRU: a granule accessed in
    /// this window counts as used now.
    fn note_accesses(&mut self, volume: usize, last_access: &[u64], window: u64) {
        let Some(d) = &mut self.demand else { return };
        d.clock += 1;
        for (r, &a) in d.recent[volume].iter_mut().zip(last_access) {
            if a == window {
                *r = d.clock;
            }
        }
    }

    /// Serves the promotions writes and demand reads are waiting for.
    fn serve(&mut self, migrator: &mut Migrator) {
        self.serve_from(None, migrator);
    }

    /// Serves `first` (a request already received) and every request waiting behind it:
    /// writes one by one, reads in one batch per volume.
    fn serve_from(&mut self, first: Option<PromoteRequest>, migrator: &mut Migrator) {
        let Some(rx) = &self.promote_rx else { return };
        let mut reads = Vec::new();
        for req in first
            .into_iter()
            .chain(std::iter::from_fn(|| rx.try_recv().ok()))
        {
            if req.read {
                reads.push(req);
            } else {
                let rc = migrator.promote_for_write(&req);
                (req.reply)(rc);
            }
        }
        self.serve_reads(reads, migrator);
    }

    /// Promotes what the waiting reads need, one batch per volume, then lets them go.
    fn serve_reads(&mut self, mut reads: Vec<PromoteRequest>, migrator: &mut Migrator) {
        if reads.is_empty() {
            return;
        }
        let on = self
            .demand
            .as_ref()
            .is_some_and(|d| d.settings.demand_reads.load(Ordering::Relaxed));
        reads.sort_by_key(|r| r.volume);
        while !reads.is_empty() {
            let vi = reads[0].volume;
            let n = reads.iter().take_while(|r| r.volume == vi).count();
            let rc = match &mut self.demand {
                Some(d) if on => {
                    let ranges: Vec<(u64, u64)> = reads[..n]
                        .iter()
                        .map(|r| (r.offset_bytes, r.len_bytes))
                        .collect();
                    d.clock += 1;
                    match migrator.promote_for_reads(vi, &ranges, &mut d.recent[vi], d.clock) {
                        Ok(_) => 0,
                        Err(e) => {
                            tracing::debug!(volume = vi, "demand promotion failed: {e}");
                            -libc::EAGAIN
                        }
                    }
                }
                // Paused or stopping: the reads go on where their data is.
                _ => -libc::EAGAIN,
            };
            for r in reads.drain(..n) {
                (r.reply)(rc);
            }
        }
    }

    /// Sleeps up to `d`, waking for a promotion; whatever arrived with it goes in
    /// the same round.
    fn wait(&mut self, d: Duration, migrator: &mut Migrator) {
        match &self.promote_rx {
            Some(rx) => {
                if let Ok(req) = rx.recv_timeout(d) {
                    self.serve_from(Some(req), migrator);
                }
            }
            None => std::thread::sleep(d),
        }
    }

    fn gc_if_due(&mut self, migrator: &Migrator) {
        if self.last_gc.elapsed() < OBJECT_GC_INTERVAL {
            return;
        }
        self.last_gc = Instant::now();
        for (tier, r) in migrator.gc_object_tiers() {
            match r {
                Ok(rep) => {
                    tracing::info!(tier = %tier, listed = rep.listed, deleted = rep.deleted, "periodic tier_gc")
                }
                Err(e) => tracing::warn!(tier = %tier, "periodic tier_gc failed: {e}"),
            }
        }
    }
}

/// Runs a pending `policy_force_tier`: every mapped run not on the tier moves there.
fn force_placement(
    shared: &PolicyShared,
    volumes: &[Arc<Volume>],
    migrator: &mut Migrator,
    objects: &mut ObjectWork,
) {
    let t = shared.force_tier.load(Ordering::Acquire);
    if t == FORCE_NONE {
        return;
    }
    let to = t as u8;
    let object_granules = shared.force_object_granules.load(Ordering::Relaxed);
    let to_object = migrator.object_tier(to).is_some();
    let mut error = None;
    'volumes: for (vi, vol) in volumes.iter().enumerate() {
        if to_object {
            // Whole windows of `object_granules` become one object each; a window with
            // holes or with granules already there goes run by run.
            let mut w = 0;
            while w < vol.map.granules() {
                if shared.stop.load(Ordering::Relaxed) {
                    break 'volumes;
                }
                let n = object_granules.min(vol.map.granules() - w);
                let locs: Vec<_> = (w..w + n).map(|g| vol.map.get(g)).collect();
                let r = if locs
                    .iter()
                    .all(|l| l.is_some_and(|l| migrator.object_tier(l.tier).is_none()))
                {
                    migrator.demote_to_object(vi, w, n, to, object_granules)
                } else {
                    let mut r = Ok(0);
                    let mut g = w;
                    while g < w + n && r.is_ok() {
                        let here = locs[(g - w) as usize];
                        let mut e = g + 1;
                        if let Some(h) = here {
                            while e < w + n
                                && locs[(e - w) as usize]
                                    == Some(crate::volume::extent_map::Location {
                                        tier: h.tier,
                                        phys_granule: h.phys_granule + (e - g),
                                    })
                            {
                                e += 1;
                            }
                        }
                        if here.is_some_and(|l| migrator.object_tier(l.tier).is_none()) {
                            r = migrator.demote_to_object(vi, g, e - g, to, object_granules);
                        }
                        g = e;
                    }
                    r
                };
                if let Err(e) = r {
                    tracing::warn!(volume = %vol.name, first = w, "forced placement stopped: {e}");
                    error = Some(e);
                    break 'volumes;
                }
                objects.serve(migrator);
                w += n;
            }
            continue;
        }
        for (first, count, loc) in vol.map.runs() {
            let Some(loc) = loc.filter(|l| l.tier != to) else {
                continue;
            };
            if shared.stop.load(Ordering::Relaxed) {
                break 'volumes;
            }
            if vol.map.get(first) != Some(loc) {
                continue; // moved by a write's promotion since the snapshot
            }
            if let Err(e) = migrator.migrate(vi, first, count, to) {
                tracing::warn!(volume = %vol.name, first, count, "forced placement stopped: {e}");
                error = Some(e);
                break 'volumes;
            }
            objects.serve(migrator);
        }
    }
    *shared.force_error.lock().unwrap() = error;
    shared.force_tier.store(FORCE_NONE, Ordering::Release);
    shared.force_done.fetch_add(1, Ordering::Release);
}

fn record_frame(
    shared: &PolicyShared,
    vi: usize,
    vol: &Volume,
    map: &crate::heat::HeatMap,
    window: u64,
) {
    let cell = shared.cell_bytes[vi];
    let per_cell = (cell / vol.map.granule_bytes).max(1) as usize;
    let cells = (vol.size_bytes / cell).max(1) as usize;
    let mut accesses = vec![0u32; cells];
    let mut tiers = vec![255u8; cells];
    for (c, (a, t)) in accesses.iter_mut().zip(tiers.iter_mut()).enumerate() {
        let g0 = c * per_cell;
        for gi in g0..(g0 + per_cell).min(map.partitions()) {
            *a = a.saturating_add(map.reads[gi].saturating_add(map.writes[gi]));
        }
        if let Some(l) = vol.map.get(g0 as u64) {
            *t = l.tier;
        }
    }
    let unix_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let mut q = shared.heat[vi].lock().unwrap();
    if q.len() == HEAT_FRAMES_MAX {
        q.pop_front();
    }
    q.push_back(HeatFrame {
        window,
        unix_ms,
        accesses,
        tiers,
    });
}

/// Whether a volume has chunks on a tier beyond the planner's tiers (a runtime tier).
fn moved_volume(vol: &Volume, migrator_tiers: usize, plan_tiers: usize) -> bool {
    migrator_tiers > plan_tiers
        && vol
            .map
            .runs()
            .iter()
            .any(|r| r.2.is_some_and(|l| l.tier as usize >= plan_tiers))
}

#[cfg(test)]
mod tests {
    use super::*;
    use planner::Move;

    fn mv(first: u64, from: u8, to: u8, priority: f64) -> Move {
        Move {
            volume: 0,
            first_granule: first,
            count: 1,
            from_tier: from,
            to_tier: to,
            priority,
            deadline_ms: 0.0,
        }
    }

    #[test]
    fn batch_order_puts_demotions_before_their_promotions_per_segment() {
        // The planner's shape: each promotion right after the demotion that makes room.
        let mut q = Vec::new();
        for i in 0..(3 * BATCH_MOVES_MAX as u64) {
            q.push(mv(10_000 + i, 0, 1, 1000.0 - i as f64 + 1e-6));
            q.push(mv(i, 1, 0, 1000.0 - i as f64));
        }
        let g = 64 << 10;
        let out = batch_order(q.clone(), g);
        assert_eq!(out.len(), q.len());
        // Same moves, none lost or duplicated.
        let mut a: Vec<_> = q.iter().map(|m| m.first_granule).collect();
        let mut b: Vec<_> = out.iter().map(|m| m.first_granule).collect();
        a.sort();
        b.sort();
        assert_eq!(a, b);
        // Runs of one direction are whole batches, not single moves.
        let mut runs = vec![(out[0].to_tier, 1usize)];
        for m in &out[1..] {
            match runs.last_mut() {
                Some((t, n)) if *t == m.to_tier => *n += 1,
                _ => runs.push((m.to_tier, 1)),
            }
        }
        assert!(runs.iter().all(|&(_, n)| n >= BATCH_MOVES_MAX), "{runs:?}");
        // Every promotion comes after the demotion planned with it.
        for (i, m) in out.iter().enumerate().filter(|(_, m)| m.to_tier == 0) {
            let d = out
                .iter()
                .position(|x| x.first_granule == m.first_granule + 10_000)
                .unwrap();
            assert!(d < i, "promotion {} before its demotion", m.first_granule);
        }
        // Priority order holds inside each direction.
        for t in [0u8, 1] {
            let p: Vec<f64> = out
                .iter()
                .filter(|m| m.to_tier == t)
                .map(|m| m.priority)
                .collect();
            assert!(p.windows(2).all(|w| w[0] >= w[1]));
        }
    }
}
