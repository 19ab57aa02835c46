//! Baseline policies built on predictors (EWMA heat, Markov prefetch), partition windows shared
//! with the kiln policy, and the precision@k report.

use super::policy::{Lru, Policy};
use super::trace::Trace;
use crate::heat::{HeatConfig, HeatRecorder, HeatSampler};
use crate::predict::{
    EwmaPredictor, LstmConfig, LstmPredictor, MarkovPredictor, Predictor, WindowObs,
};

/// Per-page EWMA heat with decay in virtual time; evicts the coldest of 16 sampled pages.
pub struct EwmaPolicy {
    cap: usize,
    heat: Vec<f32>,
    stamp: Vec<u64>,
    slot: Vec<u32>,
    resident: Vec<u32>,
    now: u64,
    half_life: f64,
    rng: crate::predict::lstm::Rng,
}

impl EwmaPolicy {
    pub fn new(n: usize, cap: usize) -> Self {
        assert!(cap > 0);
        EwmaPolicy {
            cap,
            heat: vec![0.0; n],
            stamp: vec![0; n],
            slot: vec![u32::MAX; n],
            resident: Vec::with_capacity(cap),
            now: 0,
            half_life: cap as f64,
            rng: crate::predict::lstm::Rng::new(7),
        }
    }

    fn heat_now(&self, p: u32) -> f32 {
        let dt = (self.now - self.stamp[p as usize]) as f64;
        self.heat[p as usize] * (0.5f64).powf(dt / self.half_life) as f32
    }
}

impl Policy for EwmaPolicy {
    fn name(&self) -> &'static str {
        "ewma"
    }
    fn contains(&self, p: u32) -> bool {
        self.slot[p as usize] != u32::MAX
    }
    fn access(&mut self, p: u32, _pos: usize) -> bool {
        self.now += 1;
        let h = self.heat_now(p) + 1.0;
        self.heat[p as usize] = h;
        self.stamp[p as usize] = self.now;
        if self.contains(p) {
            return false;
        }
        if self.resident.len() >= self.cap {
            let mut victim = 0usize;
            let mut coldest = f32::MAX;
            for _ in 0..16 {
                let i = self.rng.below(self.resident.len());
                let h = self.heat_now(self.resident[i]);
                if h < coldest {
                    coldest = h;
                    victim = i;
                }
            }
            let v = self.resident.swap_remove(victim);
            self.slot[v as usize] = u32::MAX;
            if victim < self.resident.len() {
                self.slot[self.resident[victim] as usize] = victim as u32;
            }
        }
        self.slot[p as usize] = self.resident.len() as u32;
        self.resident.push(p);
        true
    }
    fn resident_pages(&self) -> usize {
        self.resident.len()
    }
}

/// LRU plus a Markov (last-successor) next-chunk prefetcher with a page budget per request.
pub struct MarkovPolicy {
    lru: Lru,
    succ: Vec<u32>,
    prev_last: u32,
    budget_pages: u32,
}

impl MarkovPolicy {
    pub fn new(n: usize, cap: usize, budget_pages: u32) -> Self {
        MarkovPolicy {
            lru: Lru::new(n, cap),
            succ: vec![u32::MAX; n],
            prev_last: u32::MAX,
            budget_pages,
        }
    }
}

impl Policy for MarkovPolicy {
    fn name(&self) -> &'static str {
        "markov"
    }
    fn contains(&self, p: u32) -> bool {
        self.lru.contains(p)
    }
    fn access(&mut self, p: u32, pos: usize) -> bool {
        self.lru.access(p, pos)
    }
    fn after_request(&mut self, trace: &Trace, req: usize) -> u64 {
        let pages = trace.request(req);
        let (first, last) = (pages[0], pages[pages.len() - 1]);
        if self.prev_last != u32::MAX && self.prev_last != first {
            self.succ[self.prev_last as usize] = first;
        }
        self.prev_last = last;
        let mut migrated = 0;
        let mut cur = last;
        for _ in 0..self.budget_pages {
            let nx = self.succ[cur as usize];
            if nx == u32::MAX {
                break;
            }
            if !self.lru.contains(nx) {
                self.lru.insert(nx);
                migrated += 1;
            }
            cur = nx;
        }
        migrated
    }
    fn resident_pages(&self) -> usize {
        self.lru.resident_pages()
    }
}

/// Splits a trace into windows of per-partition observations. Accesses are counted by the
/// engine's lock-free [`HeatSampler`] (one recorder, as one reactor would) and each window is
/// folded out of it, so the replay sees exactly the counts the engine's policy thread would.
pub struct PartitionWindows {
    /// Partition of each dense page.
    pub part_of: Vec<u32>,
    pub partitions: usize,
    sampler: HeatSampler,
    recorder: HeatRecorder,
    counts: Vec<u32>,
    writes: Vec<u32>,
    seq: Vec<u32>,
    trans: Vec<(u32, u32)>,
    prev_part: u32,
    prev_last_raw: u64,
}

impl PartitionWindows {
    pub fn new(trace: &Trace, partition_pages: u32) -> Self {
        assert!(partition_pages > 0);
        let raw_part: Vec<u64> = trace
            .raw_pages
            .iter()
            .map(|&r| r / u64::from(partition_pages))
            .collect();
        let mut part_of = Vec::with_capacity(raw_part.len());
        let mut next = 0u32;
        for (i, &rp) in raw_part.iter().enumerate() {
            if i > 0 && rp != raw_part[i - 1] {
                next += 1;
            }
            part_of.push(next);
        }
        let partitions = if part_of.is_empty() {
            0
        } else {
            next as usize + 1
        };
        let mut sampler = HeatSampler::new(
            partitions.max(1),
            HeatConfig {
                windows: 1,
                reactors_max: 1,
                ..HeatConfig::default()
            },
        );
        let recorder = sampler.handle(0);
        PartitionWindows {
            part_of,
            partitions,
            sampler,
            recorder,
            counts: vec![0; partitions],
            writes: vec![0; partitions],
            seq: vec![0; partitions],
            trans: Vec::new(),
            prev_part: u32::MAX,
            prev_last_raw: u64::MAX,
        }
    }

    /// Accounts request `req` (one access per request to each partition it touches).
    pub fn add(&mut self, trace: &Trace, req: usize) {
        let pages = trace.request(req);
        let first_raw = trace.raw_pages[pages[0] as usize];
        let sequential = self.prev_last_raw != u64::MAX
            && (first_raw == self.prev_last_raw + 1 || first_raw == self.prev_last_raw);
        let mut last_part = u32::MAX;
        for &p in pages {
            let part = self.part_of[p as usize];
            if part != last_part {
                self.recorder.record(part, trace.writes[req], sequential);
                if self.prev_part != u32::MAX {
                    self.trans.push((self.prev_part, part));
                }
                self.prev_part = part;
                last_part = part;
            }
        }
        self.prev_last_raw = trace.raw_pages[pages[pages.len() - 1] as usize];
    }

    /// Ends the window: folds the sampler's counts into [`PartitionWindows::obs`].
    pub fn fold(&mut self) {
        let map = self.sampler.fold_window();
        let n = self.partitions;
        for p in 0..n {
            self.counts[p] = map.reads[p] + map.writes[p];
        }
        self.writes.copy_from_slice(&map.writes[..n]);
        self.seq.copy_from_slice(&map.sequential[..n]);
    }

    /// The window folded last (call [`PartitionWindows::fold`] first).
    pub fn obs(&self) -> WindowObs<'_> {
        WindowObs {
            counts: &self.counts,
            writes: &self.writes,
            sequential: &self.seq,
            transitions: &self.trans,
        }
    }

    /// Starts a new window.
    pub fn reset(&mut self) {
        self.trans.clear();
    }
}

/// Precision@k of next-window partition prediction: k is the number of partitions accessed in
/// the next window; precision is the share of the top-k scored partitions that were accessed.
pub fn precision_at_k(scores: &[f32], next_counts: &[u32]) -> (u64, u64) {
    let k = next_counts.iter().filter(|&&c| c > 0).count();
    if k == 0 {
        return (0, 0);
    }
    let mut idx: Vec<u32> = (0..scores.len() as u32).collect();
    // Ties broken by index so the result is deterministic.
    let cmp = |a: &u32, b: &u32| {
        scores[*b as usize]
            .total_cmp(&scores[*a as usize])
            .then(a.cmp(b))
    };
    if k < idx.len() {
        idx.select_nth_unstable_by(k - 1, cmp);
    }
    let hits = idx[..k]
        .iter()
        .filter(|&&p| next_counts[p as usize] > 0)
        .count();
    (hits as u64, k as u64)
}

/// Runs LSTM, EWMA and Markov predictors over the trace's windows and reports precision@k.
pub fn precision_report(trace: &Trace, partition_pages: u32, window_requests: u64) -> String {
    let mut pw = PartitionWindows::new(trace, partition_pages);
    let n = pw.partitions;
    let mut preds: Vec<Box<dyn Predictor>> = vec![
        Box::new(LstmPredictor::new(n, LstmConfig::default())),
        Box::new(EwmaPredictor::new(n, 0.5)),
        Box::new(MarkovPredictor::new(n)),
    ];
    let mut tallies = vec![(0u64, 0u64); preds.len()];
    let mut windows = 0u64;
    let warmup = 8;
    for r in 0..trace.requests() {
        pw.add(trace, r);
        if (r as u64 + 1).checked_rem(window_requests) == Some(0) {
            pw.fold();
            let obs = pw.obs();
            if windows >= warmup {
                for (p, t) in preds.iter().zip(tallies.iter_mut()) {
                    let (h, k) = precision_at_k(p.scores(), obs.counts);
                    t.0 += h;
                    t.1 += k;
                }
            }
            for p in preds.iter_mut() {
                p.observe(&obs);
            }
            pw.reset();
            windows += 1;
        }
    }
    let mut s = format!(
        "# precision@k of next-window accessed partitions ({} partitions of {} pages, {} windows of {} requests, first {} windows skipped)\n",
        n, partition_pages, windows, window_requests, warmup
    );
    for (p, t) in preds.iter().zip(&tallies) {
        s += &format!(
            "{:<8} precision@k {:.4}\n",
            p.name(),
            t.0 as f64 / t.1.max(1) as f64
        );
    }
    s
}
