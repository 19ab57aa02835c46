//! Whole-volume migration to a new device while clients keep using the volume.
//!
//! The orchestrator runs on the policy thread (which owns the heat samplers and
//! the [`Migrator`]); the policy's own planning pauses while it runs. Its loop:
//!
//! 1. **Analyse** (every `FOLD_MS`): fold the volume's heat sampler; each
//!    granule's decayed access count is its predicted access likelihood.
//! 2. **Adjust**: from the window's copy throughput and the foreground's mean
//!    read latency, AIMD on the copy queue depth (halve when foreground
//!    latency rose by half over its average, else +1) and size the cold chunk
//!    to about `COLD_CHUNK_S` of copying, within `[chunk_min, chunk_max]`.
//! 3. **Pick**: the prefetch queue (a bounded max-heap of the hot set: the
//!    hottest granules not yet on the destination that carry `HOT_MASS` of
//!    their heat, keyed by heat over estimated copy time) gives up to
//!    batches of up to `HOT_PER_SWEEP` small chunks (`chunk_min`, merged with
//!    adjacent hot granules up to `HOT_MERGE_MAX`; one lock/grace round and one
//!    journal commit per batch) for up to `COLD_CHUNK_S`, then the sequential
//!    sweep gives one large chunk, cut short before any hot granule.
//! 4. **Migrate** the chunk with the engine's protocol (lock → grace → copy
//!    through DMA buffers → crc32c read-back → shadow → one journaled `Map`
//!    switch → release): reads always go to the current copy, writes reach
//!    both copies while a chunk is in flight.
//! 5. **Progress** is published in [`MoveStatus`].
//!
//! At the end, every free range of each source tier is trimmed and one
//! `VolumeMoveDone` record closes the move. `VolumeMoveStart` was journaled
//! first; a crash in between leaves it open, and the server resumes it at
//! start: chunks already switched (their `Map` records are durable) are not
//! copied again.
//!
//! Baselines in the same harness: `naive` (fixed 1 MiB chunks, sequential, no
//! heat) and `fixed` (fixed `chunk_bytes`, sequential, no prefetch).

use std::collections::{BinaryHeap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{MigrateTier, Migrator};
use crate::heat::HeatSampler;
use crate::volume::extent_map::{Location, Migration};
use crate::volume::journal::{MetaRequest, MoveParams};

/// How often the heat is folded and the rate adapted.
pub const FOLD_MS: u64 = 250;
/// Most runs of a batch locked at once (see `Migrator::migrate_batch`); a group also
/// stops at one copy unit of bytes.
const LOCK_GROUP_RUNS: usize = 16;
/// Seconds of copying a cold chunk should take at the observed rate.
const COLD_CHUNK_S: f64 = 0.25;
/// Hot chunks taken from the prefetch queue per sweep chunk, moved as one batch.
const HOT_PER_SWEEP: usize = 128;
/// Adjacent hot granules merged into one hot chunk, at most (in chunk_min units).
const HOT_MERGE_MAX: u64 = 4;
/// Entries kept in the prefetch queue (a bounded queue; the rest wait for the next fold).
const PREFETCH_QUEUE_MAX: usize = 8192;
/// Decayed accesses below which a granule is not prefetched: one access six folds (1.5 s)
/// ago still counts. Every granule moves anyway, so a granule seen even once is worth taking
/// before the unseen ones: under a skewed load most reads land on granules read before, and
/// a threshold of two accesses left the long tail of the hot set to the sweep.
const HOT_SCORE_MIN: f32 = 0.01;
/// The hot set: the hottest granules that together carry this share of the
/// predicted accesses of the granules still to move.
const HOT_MASS: f64 = 0.98;
/// Decayed accesses at or above which the sweep cuts a cold chunk short (the granule is
/// moved as a small chunk of its own, so that writes to it never wait behind a big copy).
/// Higher than `HOT_SCORE_MIN`: a granule read once does not break up the sweep.
const SWEEP_CUT_SCORE: f32 = 2.0;
/// Copy I/Os in flight: the naive and fixed baselines run at this depth, and an adaptive
/// move starts at it.
const BASELINE_QUEUE_DEPTH: usize = 8;
/// Copy I/Os in flight at most in an adaptive move (reached while foreground latency holds:
/// a copy that also reads every block back needs the deeper queue to keep up with a raw copy).
const QUEUE_DEPTH_MAX: usize = 16;
/// Bytes per lock/grace step of a cold chunk (hot chunks are smaller than a step).
const COLD_COPY_UNIT_BYTES: u64 = 4 << 20;
/// Consecutive failed chunks after which the move gives up (it stays resumable).
const FAILURES_MAX: u64 = 64;
/// Largest cold chunk moved as one batch (copy, read-back, one commit).
const COLD_BATCH_BYTES: u64 = 64 << 20;

/// Chunking strategy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MoveMode {
    /// Fixed 1 MiB chunks in LBA order (what `dd` or a simple mirror does).
    Naive = 0,
    /// Fixed `chunk_bytes` chunks in LBA order, no prefetch.
    Fixed = 1,
    /// Heat-adaptive chunk sizes, prefetch queue interleaved with the sweep.
    Adaptive = 2,
}

impl MoveMode {
    pub fn parse(s: &str) -> Result<MoveMode, String> {
        match s {
            "naive" => Ok(MoveMode::Naive),
            "fixed" => Ok(MoveMode::Fixed),
            "adaptive" | "kiln" => Ok(MoveMode::Adaptive),
            _ => Err(format!("mode '{s}' is not one of naive, fixed, adaptive")),
        }
    }

    pub fn from_u8(v: u8) -> MoveMode {
        match v {
            0 => MoveMode::Naive,
            1 => MoveMode::Fixed,
            _ => MoveMode::Adaptive,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            MoveMode::Naive => "naive",
            MoveMode::Fixed => "fixed",
            MoveMode::Adaptive => "adaptive",
        }
    }
}

/// One requested move.
pub struct MoveJob {
    pub volume: usize,
    pub to_tier: u8,
    pub mode: MoveMode,
    pub chunk_min_bytes: u64,
    pub chunk_max_bytes: u64,
    /// The chunk size of `fixed` mode.
    pub chunk_bytes: u64,
    /// Copy rate cap; None: as fast as the devices go.
    pub rate_cap_bytes_per_s: Option<f64>,
    /// A tier the migrator does not know yet (added at run time).
    pub new_tier: Option<MigrateTier>,
    /// Resumed from the journal at start.
    pub resumed: bool,
    pub status: Arc<MoveStatus>,
}

impl MoveJob {
    /// The journaled form of the job's settings.
    pub fn params(&self) -> MoveParams {
        MoveParams {
            mode: self.mode as u8,
            rate_mib_s: self
                .rate_cap_bytes_per_s
                .map_or(0, |r| (r / (1u64 << 20) as f64) as u64),
            chunk_min_bytes: self.chunk_min_bytes,
            chunk_max_bytes: self.chunk_max_bytes,
            chunk_bytes: self.chunk_bytes,
        }
    }

    /// A job resumed from its journaled settings.
    pub fn resumed(volume: usize, to_tier: u8, p: &MoveParams, status: Arc<MoveStatus>) -> MoveJob {
        status.resumed.store(true, Ordering::Relaxed);
        MoveJob {
            volume,
            to_tier,
            mode: MoveMode::from_u8(p.mode),
            chunk_min_bytes: p.chunk_min_bytes,
            chunk_max_bytes: p.chunk_max_bytes,
            chunk_bytes: p.chunk_bytes,
            rate_cap_bytes_per_s: (p.rate_mib_s > 0)
                .then_some(p.rate_mib_s as f64 * (1u64 << 20) as f64),
            new_tier: None,
            resumed: true,
            status,
        }
    }
}

/// Progress of one move, published for RPC.
#[derive(Default, Debug)]
pub struct MoveStatus {
    pub volume: String,
    pub destination: String,
    pub mode: String,
    /// 0 queued, 1 running, 2 done, 3 failed, 4 interrupted (resumes at next start).
    pub state: AtomicU64,
    pub resumed: AtomicBool,
    /// Mapped bytes of the volume, and how many were on the destination, at start.
    pub total_bytes: AtomicU64,
    pub on_destination_at_start_bytes: AtomicU64,
    /// Bytes copied and switched by this run.
    pub moved_bytes: AtomicU64,
    pub chunks: AtomicU64,
    pub hot_chunks: AtomicU64,
    pub hot_bytes: AtomicU64,
    pub failed_chunks: AtomicU64,
    pub prefetch_queue: AtomicU64,
    pub cold_chunk_bytes: AtomicU64,
    pub queue_depth: AtomicU64,
    pub rate_bytes_per_s: AtomicU64,
    pub fg_read_latency_us: AtomicU64,
    pub source_trimmed_bytes: AtomicU64,
    pub started_unix_ms: AtomicU64,
    pub elapsed_ms: AtomicU64,
    pub error: Mutex<Option<String>>,
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl MoveStatus {
    pub fn new(volume: &str, destination: &str, mode: MoveMode) -> MoveStatus {
        MoveStatus {
            volume: volume.to_string(),
            destination: destination.to_string(),
            mode: mode.name().to_string(),
            ..MoveStatus::default()
        }
    }

    pub fn state_name(&self) -> &'static str {
        match self.state.load(Ordering::Relaxed) {
            0 => "queued",
            1 => "running",
            2 => "done",
            3 => "failed",
            _ => "interrupted",
        }
    }

    pub fn is_active(&self) -> bool {
        self.state.load(Ordering::Relaxed) <= 1
    }

    pub fn snapshot(&self) -> Value {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let total = l(&self.total_bytes);
        let done = (l(&self.on_destination_at_start_bytes) + l(&self.moved_bytes)).min(total);
        let rate = l(&self.rate_bytes_per_s);
        let eta = if rate > 0 {
            (total - done) as f64 / rate as f64
        } else {
            0.0
        };
        json!({
            "volume": self.volume,
            "destination": self.destination,
            "mode": self.mode,
            "state": self.state_name(),
            "resumed": self.resumed.load(Ordering::Relaxed),
            "total_bytes": total,
            "done_bytes": done,
            "moved_bytes": l(&self.moved_bytes),
            "on_destination_at_start_bytes": l(&self.on_destination_at_start_bytes),
            "chunks": l(&self.chunks),
            "hot_chunks": l(&self.hot_chunks),
            "hot_bytes": l(&self.hot_bytes),
            "failed_chunks": l(&self.failed_chunks),
            "prefetch_queue": l(&self.prefetch_queue),
            "cold_chunk_bytes": l(&self.cold_chunk_bytes),
            "queue_depth": l(&self.queue_depth),
            "rate_bytes_per_s": rate,
            "eta_s": eta,
            "fg_read_latency_us": l(&self.fg_read_latency_us),
            "source_trimmed_bytes": l(&self.source_trimmed_bytes),
            "started_unix_ms": l(&self.started_unix_ms),
            "elapsed_s": l(&self.elapsed_ms) as f64 / 1000.0,
            "error": *self.error.lock().unwrap(),
        })
    }
}

/// The queue of requested moves and every move's status (control plane side).
#[derive(Default)]
pub struct MoveControl {
    jobs: Mutex<VecDeque<MoveJob>>,
    statuses: Mutex<Vec<Arc<MoveStatus>>>,
}

impl MoveControl {
    /// Queues a move; refuses a second active move of the same volume.
    pub fn submit(&self, job: MoveJob) -> Result<(), String> {
        let mut st = self.statuses.lock().unwrap();
        if st
            .iter()
            .any(|s| s.volume == job.status.volume && s.is_active())
        {
            return Err(format!(
                "volume '{}' is already being migrated",
                job.status.volume
            ));
        }
        st.retain(|s| s.volume != job.status.volume);
        st.push(job.status.clone());
        self.jobs.lock().unwrap().push_back(job);
        Ok(())
    }

    pub fn next_job(&self) -> Option<MoveJob> {
        self.jobs.lock().unwrap().pop_front()
    }

    pub fn status(&self, volume: Option<&str>) -> Vec<Value> {
        self.statuses
            .lock()
            .unwrap()
            .iter()
            .filter(|s| volume.is_none_or(|v| s.volume == v))
            .map(|s| s.snapshot())
            .collect()
    }

    pub fn any_active(&self) -> bool {
        self.statuses.lock().unwrap().iter().any(|s| s.is_active())
    }
}

/// A prefetch queue entry: a hot granule and its priority.
#[derive(PartialEq)]
struct Hot {
    priority: f32,
    granule: u64,
}

impl Eq for Hot {}

impl PartialOrd for Hot {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Hot {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.priority
            .total_cmp(&other.priority)
            .then(other.granule.cmp(&self.granule))
    }
}

/// The orchestrator's working state for one move.
struct Orchestrator<'a> {
    job: &'a MoveJob,
    migrator: &'a mut Migrator,
    sampler: &'a mut HeatSampler,
    stop: &'a AtomicBool,
    granule_bytes: u64,
    granules: u64,
    sweep: u64,
    queue: BinaryHeap<Hot>,
    cold_chunk_granules: u64,
    queue_depth: usize,
    /// Source tiers seen (trimmed at the end).
    sources: Vec<u8>,
    /// Per source tier: EWMA of copy seconds per byte (estimated latency of a chunk).
    s_per_byte: Vec<f64>,
    // Adaptation window.
    window_start: Instant,
    window_bytes: u64,
    fg_reads: u64,
    fg_lat_ns: u64,
    fg_lat_avg_us: f64,
    failures: u64,
    /// Heat at or above which a granule is hot (from the latest fold).
    hot_threshold: f32,
}

impl Orchestrator<'_> {
    fn pending(&self, g: u64) -> Option<u8> {
        let vol = self.migrator.volume(self.job.volume);
        vol.map
            .get(g)
            .filter(|l| l.tier != self.job.to_tier)
            .map(|l| l.tier)
    }

    fn chunk_min_granules(&self) -> u64 {
        (self.job.chunk_min_bytes / self.granule_bytes).max(1)
    }

    /// Steps 1-2: fold heat, rebuild the prefetch queue, adapt queue depth and chunk size.
    fn analyse(&mut self) {
        let elapsed = self.window_start.elapsed().as_secs_f64().max(1e-3);
        let rate = self.window_bytes as f64 / elapsed;
        let st = &self.job.status;
        if self.window_bytes > 0 {
            st.rate_bytes_per_s.store(rate as u64, Ordering::Relaxed);
        }
        let vol = self.migrator.volume(self.job.volume);
        let (reads, lat) = (
            vol.stats.read_ios.load(Ordering::Relaxed),
            vol.stats.read_latency_ns_total.load(Ordering::Relaxed),
        );
        let (dr, dl) = (reads - self.fg_reads, lat - self.fg_lat_ns);
        (self.fg_reads, self.fg_lat_ns) = (reads, lat);
        let copied = self.window_bytes > 0;
        self.window_start = Instant::now();
        self.window_bytes = 0;
        if self.job.mode != MoveMode::Adaptive {
            return;
        }
        // Rate adaptation: AIMD on the copy queue depth from foreground latency.
        if dr > 0 {
            let lat_us = dl as f64 / dr as f64 / 1000.0;
            st.fg_read_latency_us
                .store(lat_us as u64, Ordering::Relaxed);
            if self.fg_lat_avg_us > 0.0 && lat_us > 1.5 * self.fg_lat_avg_us {
                self.queue_depth = (self.queue_depth / 2).max(1);
            } else {
                self.queue_depth = (self.queue_depth + 1).min(QUEUE_DEPTH_MAX);
            }
            self.fg_lat_avg_us = if self.fg_lat_avg_us == 0.0 {
                lat_us
            } else {
                0.8 * self.fg_lat_avg_us + 0.2 * lat_us
            };
        } else {
            self.queue_depth = (self.queue_depth + 1).min(QUEUE_DEPTH_MAX);
        }
        self.migrator.queue_depth_override = Some(self.queue_depth);
        st.queue_depth
            .store(self.queue_depth as u64, Ordering::Relaxed);
        // Cold chunks: about COLD_CHUNK_S of copying at the observed rate.
        if copied {
            let want = (rate * COLD_CHUNK_S) as u64 / self.granule_bytes;
            let lo = self
                .chunk_min_granules()
                .max((1 << 20) / self.granule_bytes);
            let hi = (self.job.chunk_max_bytes / self.granule_bytes).max(lo);
            let pow2 = want.max(1).next_power_of_two();
            let smoothed = if pow2 > self.cold_chunk_granules * 2 {
                self.cold_chunk_granules * 2
            } else {
                pow2
            };
            self.cold_chunk_granules = smoothed.clamp(lo, hi);
        }
        st.cold_chunk_bytes.store(
            self.cold_chunk_granules * self.granule_bytes,
            Ordering::Relaxed,
        );
        // Prefetch queue: hot granules not on the destination, by heat over copy time.
        let (to, s_per_byte, chunk_min) =
            (self.job.to_tier, &self.s_per_byte, self.job.chunk_min_bytes);
        let map = self.sampler.fold_window();
        let mut hot: Vec<Hot> = Vec::new();
        for g in 0..self.granules.min(map.partitions() as u64) {
            let score = map.decayed[g as usize];
            if score < HOT_SCORE_MIN {
                continue;
            }
            let Some(src) = vol.map.get(g).filter(|l| l.tier != to).map(|l| l.tier) else {
                continue;
            };
            let spb = s_per_byte
                .get(src as usize)
                .copied()
                .filter(|s| *s > 0.0)
                .unwrap_or(1.0);
            hot.push(Hot {
                priority: score / (spb * chunk_min as f64) as f32,
                granule: g,
            });
        }
        // Keep the hottest granules carrying HOT_MASS of the heat (bounded queue).
        let mass: f64 = hot
            .iter()
            .map(|h| map.decayed[h.granule as usize] as f64)
            .sum();
        hot.sort_unstable_by(|a, b| {
            map.decayed[b.granule as usize].total_cmp(&map.decayed[a.granule as usize])
        });
        let mut acc = 0.0;
        let mut keep = 0;
        for h in &hot {
            if acc >= HOT_MASS * mass || keep == PREFETCH_QUEUE_MAX {
                break;
            }
            acc += map.decayed[h.granule as usize] as f64;
            keep += 1;
        }
        hot.truncate(keep);
        self.hot_threshold = hot
            .last()
            .map_or(f32::INFINITY, |h| map.decayed[h.granule as usize]);
        self.queue = hot.into_iter().collect();
        st.prefetch_queue
            .store(self.queue.len() as u64, Ordering::Relaxed);
    }

    fn is_hot(&self, g: u64) -> bool {
        self.heat_at_least(g, self.hot_threshold.max(HOT_SCORE_MIN))
    }

    /// Whether the sweep should cut a cold chunk before `g`.
    fn cuts_sweep(&self, g: u64) -> bool {
        self.heat_at_least(g, self.hot_threshold.max(SWEEP_CUT_SCORE))
    }

    fn heat_at_least(&self, g: u64, threshold: f32) -> bool {
        self.job.mode == MoveMode::Adaptive
            && self
                .sampler
                .map()
                .decayed
                .get(g as usize)
                .is_some_and(|&s| s >= threshold)
    }

    /// The next hot chunk from the prefetch queue: `(first, count)`.
    fn next_hot(&mut self) -> Option<(u64, u64)> {
        while let Some(h) = self.queue.pop() {
            if self.pending(h.granule).is_none() {
                continue;
            }
            let unit = self.chunk_min_granules();
            let first = h.granule / unit * unit;
            let mut count = unit.min(self.granules - first);
            while count < unit * HOT_MERGE_MAX
                && first + count < self.granules
                && self.is_hot(first + count)
                && self.pending(first + count).is_some()
            {
                count = (count + unit).min(self.granules - first);
            }
            return Some((first, count));
        }
        None
    }

    /// The next sweep chunk: `(first, count)`, or None when the sweep is done.
    fn next_sweep(&mut self) -> Option<(u64, u64)> {
        while self.sweep < self.granules && self.pending(self.sweep).is_none() {
            self.sweep += 1;
        }
        if self.sweep >= self.granules {
            return None;
        }
        let size = match self.job.mode {
            MoveMode::Naive => (1 << 20) / self.granule_bytes,
            MoveMode::Fixed => self.job.chunk_bytes / self.granule_bytes,
            MoveMode::Adaptive => self.cold_chunk_granules,
        }
        .max(1);
        // Chunks are aligned to their size (candidate boundaries on a fixed grid).
        let first = self.sweep;
        let mut end = ((first / size + 1) * size).min(self.granules);
        if self.cuts_sweep(first) {
            // A hot granule the queue has not taken yet: a small chunk.
            let unit = self.chunk_min_granules();
            end = end.min((first / unit + 1) * unit);
        }
        let mut last = first + 1;
        while last < end && !self.cuts_sweep(last) {
            last += 1;
        }
        self.sweep = last;
        Some((first, last - first))
    }

    /// Step 4: migrate one chunk; returns the bytes switched.
    fn migrate(&mut self, first: u64, count: u64, hot: bool) {
        if let Some(src) = self.pending(first) {
            if !self.sources.contains(&src) {
                self.sources.push(src);
            }
        }
        let src = self.pending(first);
        let t0 = Instant::now();
        // A cold chunk moves as one batch: one lock/grace round, one flush and one
        // journal commit for up to COLD_BATCH_BYTES, instead of one per copy unit.
        // The naive baseline keeps its per-unit protocol; a failed batch falls back
        // to it too.
        let batched = if hot || self.job.mode == MoveMode::Naive {
            None
        } else {
            let runs = self.runs_of(first, count);
            let g = self.granule_bytes;
            let total: u64 = runs.iter().map(|r| r.1).sum();
            (!runs.is_empty() && total * g <= COLD_BATCH_BYTES).then(|| {
                self.migrator
                    .migrate_batch(self.job.volume, &runs, self.job.to_tier)
            })
        };
        let st = &self.job.status;
        let result = match batched {
            Some(Ok(bytes)) => Ok(bytes),
            Some(Err(e)) => {
                tracing::info!(
                    first,
                    count,
                    "volume move: cold batch failed ({e}); moving it unit by unit"
                );
                self.migrator
                    .migrate(self.job.volume, first, count, self.job.to_tier)
            }
            None => self
                .migrator
                .migrate(self.job.volume, first, count, self.job.to_tier),
        };
        match result {
            Ok(bytes) => {
                self.failures = 0;
                self.window_bytes += bytes;
                st.moved_bytes.fetch_add(bytes, Ordering::Relaxed);
                st.chunks.fetch_add(1, Ordering::Relaxed);
                if hot {
                    st.hot_chunks.fetch_add(1, Ordering::Relaxed);
                    st.hot_bytes.fetch_add(bytes, Ordering::Relaxed);
                }
                if let (Some(s), true) = (src, bytes > 0) {
                    let s = s as usize;
                    if self.s_per_byte.len() <= s {
                        self.s_per_byte.resize(s + 1, 0.0);
                    }
                    let x = t0.elapsed().as_secs_f64() / bytes as f64;
                    let e = &mut self.s_per_byte[s];
                    *e = if *e == 0.0 { x } else { 0.8 * *e + 0.2 * x };
                }
            }
            Err(e) => {
                // A trim or a racing write can abort one chunk; it is picked up again
                // by the final pass. Persistent failures end the move (still resumable).
                self.failures += 1;
                st.failed_chunks.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(first, count, "volume move: chunk not moved: {e}");
            }
        }
    }

    /// The physically contiguous runs of `[first, first+count)` not yet on the destination.
    fn runs_of(&self, first: u64, count: u64) -> Vec<(u64, u64, Location)> {
        self.migrator
            .runs_to_move(self.job.volume, first, count, self.job.to_tier)
    }

    /// Takes up to `HOT_PER_SWEEP` hot chunks from the prefetch queue and moves them in
    /// one batch (one lock/grace round, one journal commit); falls back to one chunk at
    /// a time if the batch fails. Returns the chunks taken.
    fn migrate_hot_batch(&mut self) -> usize {
        let mut chunks: Vec<(u64, u64)> = Vec::new();
        let mut runs: Vec<(u64, u64, Location)> = Vec::new();
        while chunks.len() < HOT_PER_SWEEP {
            let Some((first, count)) = self.next_hot() else {
                break;
            };
            if chunks
                .iter()
                .any(|&(f, c)| first < f + c && f < first + count)
            {
                continue;
            }
            chunks.push((first, count));
            runs.extend(self.runs_of(first, count));
        }
        if runs.is_empty() {
            return chunks.len();
        }
        for r in &runs {
            if !self.sources.contains(&r.2.tier) {
                self.sources.push(r.2.tier);
            }
        }
        let st = &self.job.status;
        match self
            .migrator
            .migrate_batch(self.job.volume, &runs, self.job.to_tier)
        {
            Ok(bytes) => {
                self.failures = 0;
                self.window_bytes += bytes;
                st.moved_bytes.fetch_add(bytes, Ordering::Relaxed);
                st.chunks.fetch_add(chunks.len() as u64, Ordering::Relaxed);
                st.hot_chunks
                    .fetch_add(chunks.len() as u64, Ordering::Relaxed);
                st.hot_bytes.fetch_add(bytes, Ordering::Relaxed);
            }
            Err(e) => {
                tracing::info!("volume move: hot batch failed ({e}); moving its chunks one by one");
                for (first, count) in chunks.clone() {
                    self.migrate(first, count, true);
                }
            }
        }
        chunks.len()
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    fn run(&mut self) -> Result<(), String> {
        let mut next_fold = Instant::now();
        loop {
            if self.stopped() {
                return Err("interrupted by shutdown".into());
            }
            if self.failures >= FAILURES_MAX {
                return Err(format!("{FAILURES_MAX} chunks in a row failed to move"));
            }
            if Instant::now() >= next_fold {
                self.analyse();
                next_fold = Instant::now() + Duration::from_millis(FOLD_MS);
            }
            // Hot batches while the queue has entries, for at most about as long as a
            // cold chunk takes: the hot set gets at least half of the copy time.
            let t_hot = Instant::now();
            let mut hot_taken = 0;
            loop {
                let n = self.migrate_hot_batch();
                hot_taken += n;
                if n == 0 || t_hot.elapsed() >= Duration::from_secs_f64(COLD_CHUNK_S) {
                    break;
                }
            }
            self.job
                .status
                .prefetch_queue
                .store(self.queue.len() as u64, Ordering::Relaxed);
            match self.next_sweep() {
                Some((first, count)) => self.migrate(first, count, false),
                None if hot_taken > 0 => {}
                None => {
                    // Sweep done and queue empty: a final pass for anything left
                    // (chunks that failed, or were written after the sweep passed).
                    match (0..self.granules).find(|&g| self.pending(g).is_some()) {
                        Some(g) => self.sweep = g,
                        None => return Ok(()),
                    }
                }
            }
        }
    }
}

/// Runs one move to its end (or to shutdown) on the policy thread.
pub fn run(job: MoveJob, migrator: &mut Migrator, sampler: &mut HeatSampler, stop: &AtomicBool) {
    let st = job.status.clone();
    st.resumed.store(job.resumed, Ordering::Relaxed);
    st.started_unix_ms.store(unix_ms(), Ordering::Relaxed);
    let t0 = Instant::now();
    let result = run_inner(&job, migrator, sampler, stop);
    st.elapsed_ms
        .store(t0.elapsed().as_millis() as u64, Ordering::Relaxed);
    // Back to the policy's own settings.
    migrator.rate_cap_bytes_per_s = None;
    migrator.queue_depth_override = None;
    migrator.copy_unit_bytes = super::COPY_UNIT_BYTES;
    match result {
        Ok(()) => {
            st.state.store(2, Ordering::Relaxed);
            tracing::info!(volume = %st.volume, destination = %st.destination, elapsed_s = t0.elapsed().as_secs_f64(), "volume migration complete");
        }
        Err(e) => {
            let interrupted = stop.load(Ordering::Relaxed);
            st.state
                .store(if interrupted { 4 } else { 3 }, Ordering::Relaxed);
            tracing::warn!(volume = %st.volume, "volume migration stopped: {e}; it resumes at the next start");
            *st.error.lock().unwrap() = Some(e);
        }
    }
}

fn run_inner(
    job: &MoveJob,
    migrator: &mut Migrator,
    sampler: &mut HeatSampler,
    stop: &AtomicBool,
) -> Result<(), String> {
    if let Some(t) = &job.new_tier {
        if migrator.tier_count() == job.to_tier as usize {
            migrator.add_tier(MigrateTier {
                name: t.name.clone(),
                device: t.device.clone(),
                bandwidth_mib_s: t.bandwidth_mib_s,
            })?;
        }
    }
    if job.to_tier as usize >= migrator.tier_count() {
        return Err(format!("tier {} is unknown to the migrator", job.to_tier));
    }
    let vol = migrator.volume(job.volume);
    let g = vol.map.granule_bytes;
    let st = &job.status;
    let (mut total, mut on_dst) = (0u64, 0u64);
    for (_, count, loc) in vol.map.runs() {
        if let Some(l) = loc {
            total += count * g;
            if l.tier == job.to_tier {
                on_dst += count * g;
            }
        }
    }
    st.total_bytes.store(total, Ordering::Relaxed);
    st.on_destination_at_start_bytes
        .store(on_dst, Ordering::Relaxed);
    st.state.store(1, Ordering::Relaxed);
    // Journal the start (a resumed move's record is already there; writing it again is harmless).
    migrator.meta_call(|reply| MetaRequest::VolumeMove {
        volume: job.volume,
        to_tier: job.to_tier,
        params: job.params(),
        done: false,
        reply,
    })?;
    migrator.rate_cap_bytes_per_s = Some(job.rate_cap_bytes_per_s.unwrap_or(1e12));
    let queue_depth = BASELINE_QUEUE_DEPTH;
    if job.mode != MoveMode::Naive {
        // Fewer lock/grace rounds per cold chunk; writes to a unit wait at most one unit's copy.
        migrator.copy_unit_bytes = COLD_COPY_UNIT_BYTES;
    }
    migrator.queue_depth_override = Some(queue_depth);
    st.queue_depth.store(queue_depth as u64, Ordering::Relaxed);
    let initial_cold = match job.mode {
        MoveMode::Naive => 1 << 20,
        MoveMode::Fixed => job.chunk_bytes,
        MoveMode::Adaptive => (8 << 20u64).clamp(job.chunk_min_bytes, job.chunk_max_bytes),
    };
    st.cold_chunk_bytes.store(initial_cold, Ordering::Relaxed);
    let mut o = Orchestrator {
        job,
        migrator,
        sampler,
        stop,
        granule_bytes: g,
        granules: vol.map.granules(),
        sweep: 0,
        queue: BinaryHeap::new(),
        cold_chunk_granules: (initial_cold / g).max(1),
        queue_depth,
        sources: Vec::new(),
        s_per_byte: Vec::new(),
        window_start: Instant::now(),
        window_bytes: 0,
        fg_reads: vol.stats.read_ios.load(Ordering::Relaxed),
        fg_lat_ns: vol.stats.read_latency_ns_total.load(Ordering::Relaxed),
        fg_lat_avg_us: 0.0,
        failures: 0,
        hot_threshold: f32::INFINITY,
    };
    o.run()?;
    // Release the sources: every free range trimmed (idempotent), then the closing record.
    let mut sources = std::mem::take(&mut o.sources);
    let migrator = o.migrator;
    if sources.is_empty() && job.resumed {
        // Resumed after the last switch: the sources are no longer in the map.
        // Trimming free space loses nothing, so trim every other tier.
        sources = (0..migrator.tier_count() as u8)
            .filter(|&t| t != job.to_tier)
            .collect();
    }
    for t in sources {
        let trimmed = migrator.meta_call(|reply| MetaRequest::TrimFree { tier: t, reply })?;
        st.source_trimmed_bytes
            .fetch_add(trimmed, Ordering::Relaxed);
    }
    migrator.meta_call(|reply| MetaRequest::VolumeMove {
        volume: job.volume,
        to_tier: job.to_tier,
        params: job.params(),
        done: true,
        reply,
    })?;
    Ok(())
}

/// What the `volume_migrate` RPC needs from the server.
pub struct MoveRpc<'a> {
    pub volume: &'a crate::volume::Volume,
    pub meta_tx: &'a crossbeam_channel::Sender<MetaRequest>,
    pub registry: &'a crate::volume::tier_registry::TierRegistry,
    pub reactors: &'a [crate::reactor::ReactorHandle],
    pub control: &'a MoveControl,
}

fn size_param(params: &Value, key: &str, default: u64) -> Result<u64, String> {
    match params.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Number(n)) => n
            .as_u64()
            .ok_or_else(|| format!("'{key}' must be a byte count")),
        Some(Value::String(s)) => crate::units::parse_size(s).map_err(|e| format!("'{key}': {e}")),
        Some(v) => Err(format!("'{key}' must be a size, not {v}")),
    }
}

/// `volume_migrate {"volume", "destination", "mode"?, "name"?, "capacity"?,
/// "chunk_min"?, "chunk_max"?, "chunk"?, "rate_mib_s"?}`: adds the destination
/// as a tier (unless it names an existing tier) and queues the move.
pub fn rpc_volume_migrate(ctx: &MoveRpc<'_>, params: &Value) -> Result<Value, String> {
    let dest = params
        .get("destination")
        .and_then(Value::as_str)
        .ok_or("missing string parameter 'destination' (a device spec or a tier name)")?;
    let mode = MoveMode::parse(
        params
            .get("mode")
            .and_then(Value::as_str)
            .unwrap_or("adaptive"),
    )?;
    let g = ctx.volume.map.granule_bytes;
    let chunk_min_bytes = size_param(params, "chunk_min", 64 << 10)?;
    let chunk_max_bytes = size_param(params, "chunk_max", 64 << 20)?;
    let chunk_bytes = size_param(params, "chunk", 8 << 20)?;
    for (k, v) in [
        ("chunk_min", chunk_min_bytes),
        ("chunk_max", chunk_max_bytes),
        ("chunk", chunk_bytes),
    ] {
        if v < g || v % g != 0 || !v.is_power_of_two() {
            return Err(format!(
                "'{k}' must be a power of two and a multiple of {g}"
            ));
        }
    }
    if chunk_max_bytes < chunk_min_bytes {
        return Err("'chunk_max' is smaller than 'chunk_min'".into());
    }
    let rate_cap_bytes_per_s = match params.get("rate_mib_s").and_then(Value::as_u64) {
        None | Some(0) => None,
        Some(r) => Some(r as f64 * (1u64 << 20) as f64),
    };
    let volume_index = ctx.volume.id;
    if ctx
        .control
        .status(Some(&ctx.volume.name))
        .iter()
        .any(|s| matches!(s["state"].as_str(), Some("queued" | "running")))
    {
        return Err(format!(
            "volume '{}' is already being migrated",
            ctx.volume.name
        ));
    }
    let (to_tier, name, new_tier) = match ctx.registry.index_of(dest) {
        Some(i) => (i, dest.to_string(), None),
        None => {
            let name = match params.get("name").and_then(Value::as_str) {
                Some(n) => n.to_string(),
                None => format!("{}-dst{}", ctx.volume.name, ctx.registry.count()),
            };
            let capacity_bytes = size_param(params, "capacity", 0)?;
            let (tx, rx) = crossbeam_channel::bounded(1);
            ctx.meta_tx
                .send(MetaRequest::AddTier {
                    name: name.clone(),
                    device: dest.to_string(),
                    capacity_bytes,
                    reply: tx,
                })
                .map_err(|_| "metadata service stopped")?;
            let open = rx
                .recv_timeout(Duration::from_secs(60))
                .map_err(|_| "metadata service did not answer")??;
            let index = open.tier.index as usize;
            ctx.registry.add(index, name.clone(), open.device.clone());
            ctx.registry
                .wait_opened(index + 1, ctx.reactors, Duration::from_secs(30))?;
            let t = MigrateTier {
                name: name.clone(),
                device: open.device,
                bandwidth_mib_s: 1000,
            };
            (index, name, Some(t))
        }
    };
    let status = Arc::new(MoveStatus::new(&ctx.volume.name, &name, mode));
    ctx.control.submit(MoveJob {
        volume: volume_index,
        to_tier: to_tier as u8,
        mode,
        chunk_min_bytes,
        chunk_max_bytes,
        chunk_bytes,
        rate_cap_bytes_per_s,
        new_tier,
        resumed: false,
        status: status.clone(),
    })?;
    Ok(status.snapshot())
}

impl Migrator {
    /// The mapped granules of `[first, first + count)` not already on `to_tier`, as runs
    /// that are contiguous both in the volume and on their source tier.
    pub(crate) fn runs_to_move(
        &self,
        volume: usize,
        first: u64,
        count: u64,
        to_tier: u8,
    ) -> Vec<(u64, u64, Location)> {
        let vol = self.volume(volume);
        let mut runs: Vec<(u64, u64, Location)> = Vec::new();
        for g in first..first + count {
            let Some(l) = vol.map.get(g).filter(|l| l.tier != to_tier) else {
                continue;
            };
            match runs.last_mut() {
                Some(r)
                    if r.0 + r.1 == g
                        && r.2.tier == l.tier
                        && r.2.phys_granule + r.1 == l.phys_granule =>
                {
                    r.1 += 1
                }
                _ => runs.push((g, 1, l)),
            }
        }
        runs
    }

    /// Moves several small runs (each physically contiguous on one source tier) in
    /// one round of the engine's protocol: lock all, one grace period, copy and
    /// read back through DMA buffers, crc32c compare, shadow, one journal commit
    /// switching all of them (`SwitchMany`), grace, clear, grace, release. All or
    /// nothing: on any failure no run is switched and the reservation is released.
    pub(crate) fn migrate_batch(
        &mut self,
        volume: usize,
        runs: &[(u64, u64, Location)],
        to_tier: u8,
    ) -> Result<u64, String> {
        let vol = self.volumes[volume].clone();
        let g = vol.map.granule_bytes;
        let total: u64 = runs.iter().map(|r| r.1).sum();
        // One contiguous reservation when the tier has one, else one per run: a
        // fragmented tier (scattered hot granules promoted and demoted over time) must
        // not push a batch back to one journal commit per run.
        let mut plan = Vec::with_capacity(runs.len());
        let whole = self.meta_call(|reply| MetaRequest::Reserve {
            tier: to_tier,
            granules: total,
            reply,
        });
        let mut off = 0;
        for &(first, count, from) in runs {
            let phys_granule = match whole {
                Ok(base) => base + off,
                Err(_) => match self.meta_call(|reply| MetaRequest::Reserve {
                    tier: to_tier,
                    granules: count,
                    reply,
                }) {
                    Ok(p) => p,
                    Err(e) => {
                        self.release_reserved(&plan);
                        return Err(e);
                    }
                },
            };
            let to = Location {
                tier: to_tier,
                phys_granule,
            };
            plan.push((first, count, from, to));
            off += count;
        }
        self.stats.inflight.fetch_add(1, Ordering::Relaxed);
        self.stats
            .inflight_bytes
            .fetch_add(total * g, Ordering::Relaxed);
        // Lock, copy, verify and shadow a few runs at a time: a run is locked (its
        // writes wait) only while its own group copies, not for the whole batch, so a
        // hot granule in a 4 MiB batch holds its writers for one group's copy.
        let mut copied = Ok(());
        let mut group_start = 0;
        while group_start < plan.len() {
            let mut end = group_start;
            let mut bytes = 0;
            while end < plan.len()
                && (end == group_start
                    || (end - group_start < LOCK_GROUP_RUNS
                        && bytes + plan[end].1 * g <= super::COPY_UNIT_BYTES))
            {
                bytes += plan[end].1 * g;
                end += 1;
            }
            let group = &plan[group_start..end];
            for p in group {
                vol.map.set_migration(p.0, p.1, Migration::Locked(p.3));
            }
            copied = self.grace().and_then(|()| {
                let mut ops = Vec::new();
                let mut back = Vec::new();
                for p in group {
                    ops.extend(self.ops_for(p.2, p.3, p.0, p.1));
                    back.extend(self.ops_for(p.3, p.3, p.0, p.1));
                }
                let src = self.run_ops(&mut ops, false)?;
                let dst = self.run_ops(&mut back, true)?;
                if src != dst {
                    return Err(format!(
                        "crc32c mismatch between source and copy in a batch of {} runs",
                        plan.len()
                    ));
                }
                self.stats
                    .bytes_verified
                    .fetch_add(bytes, Ordering::Relaxed);
                Ok(())
            });
            // From here writes go to both copies (also after a failure, until the
            // state is cleared below, after a grace period).
            for p in group {
                vol.map.set_migration(p.0, p.1, Migration::Shadow(p.3));
            }
            group_start = end;
            if copied.is_err() {
                break;
            }
        }
        // Copies durable before the record that points at them (see `flush_tier`).
        let result = copied
            .and_then(|()| self.flush_tier(to_tier))
            .and_then(|()| {
                self.meta_call(|reply| MetaRequest::SwitchMany {
                    volume,
                    runs: plan.clone(),
                    reply,
                })
            });
        self.stats.inflight.fetch_sub(1, Ordering::Relaxed);
        self.stats
            .inflight_bytes
            .fetch_sub(total * g, Ordering::Relaxed);
        // As in `migrate_run`: a write that read the old map must still see the shadow.
        let pre_clear = if result.is_ok() { self.grace() } else { Ok(()) };
        for p in &plan {
            vol.map.set_migration(p.0, p.1, Migration::None);
        }
        let grace = pre_clear.and(self.grace());
        match result {
            Ok(()) => {
                grace?;
                for p in &plan {
                    let _ = self.meta_tx.send(MetaRequest::Release {
                        tier: p.2.tier,
                        phys_granule: p.2.phys_granule,
                        count: p.1,
                    });
                }
                self.stats
                    .completed
                    .fetch_add(plan.len() as u64, Ordering::Relaxed);
                for p in &plan {
                    self.count_direction(p.2.tier, to_tier);
                }
                self.stats
                    .bytes_moved
                    .fetch_add(total * g, Ordering::Relaxed);
                Ok(total * g)
            }
            Err(e) => {
                if grace.is_ok() {
                    self.release_reserved(&plan);
                }
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                Err(e)
            }
        }
    }

    /// Frees the destinations of a batch that was not switched.
    fn release_reserved(&self, plan: &[(u64, u64, Location, Location)]) {
        for p in plan {
            let _ = self.meta_tx.send(MetaRequest::Release {
                tier: p.3.tier,
                phys_granule: p.3.phys_granule,
                count: p.1,
            });
        }
    }
}
