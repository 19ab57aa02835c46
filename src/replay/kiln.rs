//! The `kiln` tiering policy: an S3-FIFO demand core, plus prefetch ahead of access driven by a
//! Markov last-successor table and sequential-stream detection, gated by the LSTM's per-partition
//! next-window access prediction, with a migration budget in pages per request.

use super::policy::{Policy, S3Fifo};
use super::predictors::PartitionWindows;
use super::trace::Trace;
use crate::predict::{LstmConfig, LstmPredictor, Predictor};

/// Configuration of the kiln policy.
#[derive(Debug, Clone)]
pub struct KilnConfig {
    /// Maximum pages migrated ahead of access per request.
    pub prefetch_budget_pages: u32,
    /// Pages per heat partition.
    pub partition_pages: u32,
    /// Requests per heat window.
    pub window_requests: u64,
    /// Prefetch only into partitions whose predicted access probability reaches this.
    pub prefetch_min_prob: f32,
    /// Admit first-touch pages on a miss only when their partition's probability reaches this.
    pub admit_min_prob: f32,
    pub lstm: LstmConfig,
}

impl Default for KilnConfig {
    fn default() -> Self {
        KilnConfig {
            prefetch_budget_pages: 2,
            partition_pages: 256,
            window_requests: 10_000,
            prefetch_min_prob: 0.0,
            admit_min_prob: 0.0,
            lstm: LstmConfig::default(),
        }
    }
}

/// The kiln policy (see the module documentation).
pub struct KilnPolicy {
    cfg: KilnConfig,
    core: S3Fifo,
    succ: Vec<u32>,
    seen: Vec<bool>,
    prev_last: u32,
    windows: PartitionWindows,
    lstm: LstmPredictor,
    requests: u64,
    pub prefetched_pages: u64,
}

impl KilnPolicy {
    pub fn new(trace: &Trace, fast_pages: usize, cfg: &KilnConfig) -> Self {
        let n = trace.unique_pages();
        let windows = PartitionWindows::new(trace, cfg.partition_pages);
        let lstm = LstmPredictor::new(windows.partitions, cfg.lstm);
        KilnPolicy {
            cfg: cfg.clone(),
            core: S3Fifo::new(n, fast_pages),
            succ: vec![u32::MAX; n],
            seen: vec![false; n],
            prev_last: u32::MAX,
            windows,
            lstm,
            requests: 0,
            prefetched_pages: 0,
        }
    }

    fn prob(&self, page: u32) -> f32 {
        self.lstm.scores()[self.windows.part_of[page as usize] as usize]
    }

    fn try_prefetch(&mut self, page: u32) -> bool {
        if self.core.contains(page) || self.prob(page) < self.cfg.prefetch_min_prob {
            return false;
        }
        self.core.insert(page);
        self.prefetched_pages += 1;
        true
    }
}

impl Policy for KilnPolicy {
    fn name(&self) -> &'static str {
        "kiln"
    }
    fn contains(&self, page: u32) -> bool {
        self.core.contains(page)
    }
    fn access(&mut self, page: u32, pos: usize) -> bool {
        let first_touch = !self.seen[page as usize];
        self.seen[page as usize] = true;
        if !self.core.contains(page) && first_touch && self.prob(page) < self.cfg.admit_min_prob {
            return false; // served from the capacity tier, not migrated
        }
        self.core.access(page, pos)
    }
    fn after_request(&mut self, trace: &Trace, req: usize) -> u64 {
        let pages = trace.request(req);
        let (first, last) = (pages[0], pages[pages.len() - 1]);
        if self.prev_last != u32::MAX && self.prev_last != first {
            self.succ[self.prev_last as usize] = first;
        }
        self.prev_last = last;
        self.windows.add(trace, req);
        self.requests += 1;
        if self.requests.checked_rem(self.cfg.window_requests) == Some(0) {
            self.lstm.observe(&self.windows.obs());
            self.windows.reset();
        }
        let mut budget = self.cfg.prefetch_budget_pages;
        let mut migrated = 0u64;
        // Markov chain of last successors.
        let mut cur = last;
        let mut steps = 0;
        while budget > 0 && steps < self.cfg.prefetch_budget_pages {
            let nx = self.succ[cur as usize];
            if nx == u32::MAX {
                break;
            }
            if self.try_prefetch(nx) {
                migrated += 1;
                budget -= 1;
            }
            cur = nx;
            steps += 1;
        }
        // Sequential: the next pages of a multi-page request's stream.
        if pages.len() > 1 {
            let raw_last = trace.raw_pages[last as usize];
            let mut p = last as usize + 1;
            while budget > 0 && p < trace.raw_pages.len() {
                if trace.raw_pages[p] != raw_last + (p - last as usize) as u64 {
                    break;
                }
                if self.try_prefetch(p as u32) {
                    migrated += 1;
                    budget -= 1;
                }
                p += 1;
            }
        }
        migrated
    }
    fn resident_pages(&self) -> usize {
        self.core.resident_pages()
    }
}
