//! Lock-free heat sampler: reactors count accesses per partition on the hot path, a policy thread
//! folds the counts into sliding windows.
//!
//! Each reactor owns one [`HeatRecorder`] whose counters only that reactor writes (a relaxed
//! load + store, no read-modify-write, no lock, and no cache line shared with another reactor:
//! every reactor's arrays are separate 64-byte-aligned allocations). The policy thread reads the
//! counters without resetting them and keeps the previous reading, so a fold never races with a
//! writer and counts stay exact: a window's count is `now.wrapping_sub(previous)`.
//!
//! Sampling: with `sample_shift = s` a recorder counts every `2^s`-th access (a per-reactor
//! countdown, deterministic, no RNG) and the fold scales counts by `2^s`. The default `s = 0`
//! counts every access exactly.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

const SLOTS_PER_LINE: usize = 16;

/// One cache line of counters.
#[repr(align(64))]
#[derive(Default)]
struct CounterLine([AtomicU32; SLOTS_PER_LINE]);

const _: () = assert!(std::mem::size_of::<CounterLine>() == 64);

/// The counters of one reactor: monotonically increasing (wrapping) per-partition counts.
pub struct HeatCounters {
    reads: Box<[CounterLine]>,
    writes: Box<[CounterLine]>,
    sequential: Box<[CounterLine]>,
}

impl HeatCounters {
    fn new(partitions: usize) -> Self {
        let lines = partitions.div_ceil(SLOTS_PER_LINE);
        let mk = || {
            (0..lines)
                .map(|_| CounterLine::default())
                .collect::<Vec<_>>()
                .into_boxed_slice()
        };
        HeatCounters {
            reads: mk(),
            writes: mk(),
            sequential: mk(),
        }
    }

    #[inline(always)]
    fn slot(arr: &[CounterLine], partition: u32) -> &AtomicU32 {
        let p = partition as usize;
        &arr[p / SLOTS_PER_LINE].0[p % SLOTS_PER_LINE]
    }

    #[inline(always)]
    fn bump(arr: &[CounterLine], partition: u32) {
        let c = Self::slot(arr, partition);
        // Single writer: a plain load + store cannot lose an update, and readers only need
        // an eventually visible value.
        c.store(c.load(Ordering::Relaxed).wrapping_add(1), Ordering::Relaxed);
    }
}

/// Heat sampler configuration.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HeatConfig {
    /// Number of windows kept in the sliding history.
    pub windows: usize,
    /// Length of one window in the caller's time unit (ms in the engine, requests in replay);
    /// informational: the caller decides when to call [`HeatSampler::fold_window`].
    pub window_len: u64,
    /// Multiplier applied to the decayed heat per window (0 < decay < 1).
    pub decay: f32,
    /// Count one access in `2^sample_shift` (0 = exact).
    pub sample_shift: u32,
    /// Maximum number of reactors.
    pub reactors_max: usize,
}

impl Default for HeatConfig {
    fn default() -> Self {
        HeatConfig {
            windows: 8,
            window_len: 1000,
            decay: 0.5,
            sample_shift: 0,
            reactors_max: 64,
        }
    }
}

/// The reactor-side handle. `Send` but not `Sync`: exactly one thread records through it.
pub struct HeatRecorder {
    counters: Arc<HeatCounters>,
    partitions: u32,
    sample_mask: u32,
    countdown: Cell<u32>,
}

impl HeatRecorder {
    /// Counts one access of `partition`. A few nanoseconds: no lock, no shared cache line.
    #[inline]
    pub fn record(&self, partition: u32, is_write: bool, sequential: bool) {
        debug_assert!(partition < self.partitions, "partition out of range");
        if self.sample_mask != 0 {
            let t = self.countdown.get().wrapping_add(1);
            self.countdown.set(t);
            if t & self.sample_mask != 0 {
                return;
            }
        }
        let c = &*self.counters;
        HeatCounters::bump(if is_write { &c.writes } else { &c.reads }, partition);
        if sequential {
            HeatCounters::bump(&c.sequential, partition);
        }
    }
}

/// Per-partition heat after the latest fold.
#[derive(Debug, Clone, Default)]
pub struct HeatMap {
    partitions: usize,
    windows: usize,
    folded: u64,
    /// Ring of total counts: window `w` at `[w % windows * partitions ..][..partitions]`.
    history: Vec<u32>,
    /// Reads, writes and sequential accesses of the latest window.
    pub reads: Vec<u32>,
    pub writes: Vec<u32>,
    pub sequential: Vec<u32>,
    /// Exponentially decayed heat: `decayed = decayed * decay + count` per window.
    pub decayed: Vec<f32>,
}

impl HeatMap {
    /// Number of partitions.
    pub fn partitions(&self) -> usize {
        self.partitions
    }

    /// Windows folded so far.
    pub fn windows_folded(&self) -> u64 {
        self.folded
    }

    /// Total count of `partition` `ago` windows back (0 = latest window).
    pub fn recent(&self, partition: usize, ago: usize) -> u32 {
        assert!(ago < self.windows, "only {} windows are kept", self.windows);
        if (ago as u64) >= self.folded {
            return 0;
        }
        let w = ((self.folded - 1 - ago as u64) % self.windows as u64) as usize;
        self.history[w * self.partitions + partition]
    }

    /// Sum over the kept windows.
    pub fn sum_recent(&self, partition: usize) -> u64 {
        (0..self.windows)
            .map(|a| u64::from(self.recent(partition, a)))
            .sum()
    }

    /// Fraction of the latest window's accesses that were writes.
    pub fn write_fraction(&self, partition: usize) -> f32 {
        let (r, w) = (self.reads[partition], self.writes[partition]);
        if r + w == 0 {
            0.0
        } else {
            w as f32 / (r + w) as f32
        }
    }

    /// Fraction of the latest window's accesses that were sequential.
    pub fn sequentiality(&self, partition: usize) -> f32 {
        let n = self.reads[partition] + self.writes[partition];
        if n == 0 {
            0.0
        } else {
            (self.sequential[partition] as f32 / n as f32).min(1.0)
        }
    }
}

/// Owns the per-reactor counters and folds them into a [`HeatMap`] (policy thread only).
pub struct HeatSampler {
    cfg: HeatConfig,
    partitions: usize,
    reactors: Vec<Option<Arc<HeatCounters>>>,
    claimed: Vec<AtomicBool>,
    /// Previous readings per reactor: reads, writes, sequential.
    last: Vec<[Vec<u32>; 3]>,
    map: HeatMap,
}

impl HeatSampler {
    /// A sampler over `partitions` partitions.
    pub fn new(partitions: usize, cfg: HeatConfig) -> Self {
        assert!(
            partitions > 0 && partitions <= u32::MAX as usize,
            "bad partition count"
        );
        assert!(cfg.windows > 0, "need at least one window");
        assert!(
            cfg.decay > 0.0 && cfg.decay < 1.0,
            "decay must be in (0, 1)"
        );
        assert!(
            cfg.sample_shift < 16,
            "sample_shift above 15 makes counts meaningless"
        );
        let map = HeatMap {
            partitions,
            windows: cfg.windows,
            folded: 0,
            history: vec![0; partitions * cfg.windows],
            reads: vec![0; partitions],
            writes: vec![0; partitions],
            sequential: vec![0; partitions],
            decayed: vec![0.0; partitions],
        };
        HeatSampler {
            cfg,
            partitions,
            reactors: (0..cfg.reactors_max).map(|_| None).collect(),
            claimed: (0..cfg.reactors_max)
                .map(|_| AtomicBool::new(false))
                .collect(),
            last: Vec::new(),
            map,
        }
    }

    /// The recorder of reactor `reactor_id`; each id can be claimed once.
    pub fn handle(&mut self, reactor_id: usize) -> HeatRecorder {
        assert!(
            reactor_id < self.cfg.reactors_max,
            "reactor id above reactors_max"
        );
        let was = self.claimed[reactor_id].swap(true, Ordering::AcqRel);
        assert!(!was, "reactor {reactor_id} already has a recorder");
        let counters = Arc::new(HeatCounters::new(self.partitions));
        self.reactors[reactor_id] = Some(counters.clone());
        HeatRecorder {
            counters,
            partitions: self.partitions as u32,
            sample_mask: (1u32 << self.cfg.sample_shift) - 1,
            countdown: Cell::new(0),
        }
    }

    /// Folds every reactor's counts since the previous fold into a new window.
    pub fn fold_window(&mut self) -> &HeatMap {
        let p_n = self.partitions;
        let scale = 1u32 << self.cfg.sample_shift;
        let map = &mut self.map;
        map.reads.iter_mut().for_each(|x| *x = 0);
        map.writes.iter_mut().for_each(|x| *x = 0);
        map.sequential.iter_mut().for_each(|x| *x = 0);
        let active: Vec<&Arc<HeatCounters>> = self.reactors.iter().flatten().collect();
        while self.last.len() < active.len() {
            self.last.push([vec![0; p_n], vec![0; p_n], vec![0; p_n]]);
        }
        for (c, last) in active.iter().zip(self.last.iter_mut()) {
            let arrays = [&c.reads, &c.writes, &c.sequential];
            let outs = [&mut map.reads, &mut map.writes, &mut map.sequential];
            for ((arr, prev), out) in arrays.into_iter().zip(last.iter_mut()).zip(outs) {
                for p in 0..p_n {
                    let now = HeatCounters::slot(arr, p as u32).load(Ordering::Relaxed);
                    let d = now.wrapping_sub(prev[p]);
                    prev[p] = now;
                    out[p] = out[p].saturating_add(d.saturating_mul(scale));
                }
            }
        }
        let w = (map.folded % map.windows as u64) as usize;
        let decay = self.cfg.decay;
        for p in 0..p_n {
            let total = map.reads[p].saturating_add(map.writes[p]);
            map.history[w * p_n + p] = total;
            map.decayed[p] = map.decayed[p] * decay + total as f32;
        }
        map.folded += 1;
        &self.map
    }

    /// The latest heat map.
    pub fn map(&self) -> &HeatMap {
        &self.map
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_exact_under_concurrent_reactors() {
        let partitions = 100;
        let mut s = HeatSampler::new(
            partitions,
            HeatConfig {
                windows: 4,
                ..Default::default()
            },
        );
        let threads = 4;
        // Miri (ci/miri.sh) interprets every instruction: fewer accesses, same interleavings.
        let per_thread = if cfg!(miri) { 300 } else { 200_000u32 };
        let mut recs: Vec<HeatRecorder> = (0..threads).map(|t| s.handle(t)).collect();
        for window in 0..3u32 {
            std::thread::scope(|sc| {
                for (t, rec) in recs.iter_mut().enumerate() {
                    // `&mut HeatRecorder` is Send: each thread records through its own recorder.
                    sc.spawn(move || {
                        for i in 0..per_thread {
                            let p = (i as usize * 7 + t) % partitions;
                            rec.record(p as u32, i % 3 == 0, i % 2 == 0);
                        }
                    });
                }
            });
            let m = s.fold_window();
            let mut total = 0u64;
            for p in 0..partitions {
                total += u64::from(m.reads[p] + m.writes[p]);
            }
            assert_eq!(
                total,
                u64::from(per_thread) * threads as u64,
                "window {window}"
            );
            for p in 0..partitions {
                let mut want = [0u32; 3];
                for t in 0..threads {
                    for i in 0..per_thread {
                        if (i as usize * 7 + t) % partitions == p {
                            want[usize::from(i % 3 == 0)] += 1;
                            want[2] += u32::from(i % 2 == 0);
                        }
                    }
                }
                assert_eq!(
                    [m.reads[p], m.writes[p], m.sequential[p]],
                    want,
                    "partition {p}"
                );
                assert_eq!(m.recent(p, 0), want[0] + want[1]);
            }
        }
        assert_eq!(s.map().windows_folded(), 3);
        assert_eq!(s.map().sum_recent(0), 3 * u64::from(s.map().recent(0, 0)));
    }

    #[test]
    fn sampling_scales_counts() {
        let cfg = HeatConfig {
            sample_shift: 2,
            ..Default::default()
        };
        let mut s = HeatSampler::new(4, cfg);
        let r = s.handle(0);
        for _ in 0..400 {
            r.record(1, false, false);
        }
        assert_eq!(s.fold_window().reads[1], 400);
        let m = s.fold_window();
        assert_eq!(m.reads[1], 0);
        assert!((m.decayed[1] - 200.0).abs() < 1e-3);
    }
}
