//! The `kiln` tiering policy: an S3-FIFO demand core with admission control, plus prefetch ahead
//! of access driven by a confidence-counted Markov successor table and sequential-stream
//! detection, throttled by each source's measured accuracy, with a migration budget in pages
//! per request.
//!
//! Admission: a demand miss migrates the page only when its reuse is likely: the page is in the
//! ghost FIFO, or its previous access lies within the reuse horizon (a two-touch filter), or the
//! LSTM predicts its partition accessed next window with probability >= `admit_min_prob`. Other
//! misses are served from the capacity tier without a migration.
//!
//! Prefetch: the chain of confirmed Markov successors of the request's last page (a successor
//! counts as confirmed once it was observed at least `markov_min_conf` times in a row), then the
//! next raw pages of a sequential stream (after a multi-page request one page; after requests
//! that continue where the previous one ended, one more page per continuation up to the budget). Sequential prefetch may target raw pages the trace never touches:
//! those become phantom pages that are migrated (counted) and occupy fast-tier space until
//! evicted, as a real mis-prefetch would. Each source's accuracy (prefetched pages later demanded
//! while resident / prefetched pages) is tracked with decay; a source below `min_accuracy` only
//! issues one probe prefetch in 16.

use super::policy::{Policy, S3Fifo};
use super::predictors::PartitionWindows;
use super::trace::Trace;
use crate::predict::{LstmConfig, LstmPredictor, Predictor};
use std::collections::HashMap;

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
    /// Admit a cold missed page when its partition's predicted probability reaches this.
    pub admit_min_prob: f32,
    /// Two-touch admission: a missed page is admitted when its previous access is at most this
    /// many fast-tier capacities (in page references) ago.
    pub reuse_horizon: f64,
    /// Times a Markov successor must be observed before it is prefetched.
    pub markov_min_conf: u8,
    /// A prefetch source below this accuracy is throttled to probes.
    pub min_accuracy: f64,
    pub lstm: LstmConfig,
}

impl Default for KilnConfig {
    fn default() -> Self {
        KilnConfig {
            prefetch_budget_pages: 2,
            partition_pages: 256,
            window_requests: 10_000,
            prefetch_min_prob: 0.0,
            admit_min_prob: 0.9,
            reuse_horizon: 1.0,
            markov_min_conf: 2,
            min_accuracy: 0.25,
            lstm: LstmConfig::default(),
        }
    }
}

const SRC_NONE: u8 = 0;
const SRC_MARKOV: u8 = 1;
const SRC_SEQ: u8 = 2;
const NEVER: u64 = u64::MAX;

/// Accuracy of one prefetch source, with decay.
#[derive(Debug, Clone, Copy, Default)]
struct SourceStats {
    issued: f64,
    used: f64,
    probe: u32,
}

impl SourceStats {
    fn accuracy(&self) -> f64 {
        if self.issued < 64.0 {
            1.0
        } else {
            self.used / self.issued
        }
    }
    fn issue(&mut self) {
        self.issued += 1.0;
        if self.issued > 8192.0 {
            self.issued *= 0.5;
            self.used *= 0.5;
        }
    }
}

/// Counters of what the kiln policy did (for reports and tuning).
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct KilnStats {
    pub demand_admitted: u64,
    pub demand_bypassed: u64,
    pub prefetch_markov: u64,
    pub prefetch_seq: u64,
    pub prefetch_phantom: u64,
    pub prefetch_used: u64,
}

/// The kiln policy (see the module documentation).
pub struct KilnPolicy {
    cfg: KilnConfig,
    core: S3Fifo,
    /// Real (trace) pages; ids `n..` are phantom pages.
    n: usize,
    cap: usize,
    succ: Vec<u32>,
    succ_conf: Vec<u8>,
    last_ref: Vec<u64>,
    clock: u64,
    /// Which source prefetched a resident, not yet demanded page.
    pf_src: Vec<u8>,
    src: [SourceStats; 3],
    prev_last: u32,
    prev_last_raw: u64,
    /// Consecutive requests that continued the previous one.
    run: u32,
    phantom_next: usize,
    phantom_raw: Vec<u64>,
    phantom_of: HashMap<u64, u32>,
    windows: PartitionWindows,
    lstm: LstmPredictor,
    requests: u64,
    pub stats: KilnStats,
}

impl KilnPolicy {
    pub fn new(trace: &Trace, fast_pages: usize, cfg: &KilnConfig) -> Self {
        let n = trace.unique_pages();
        let windows = PartitionWindows::new(trace, cfg.partition_pages);
        let lstm = LstmPredictor::new(windows.partitions, cfg.lstm);
        // Resident plus ghost pages never exceed `fast_pages + ghost`, so a pool twice that
        // always has a free phantom id close to the round-robin cursor.
        let probe = S3Fifo::new(2, fast_pages.max(2));
        let pool = 2 * (fast_pages + probe.ghost_capacity()) + 2;
        KilnPolicy {
            cfg: cfg.clone(),
            core: S3Fifo::new(n + pool, fast_pages),
            n,
            cap: fast_pages,
            succ: vec![u32::MAX; n],
            succ_conf: vec![0; n],
            last_ref: vec![NEVER; n],
            clock: 0,
            pf_src: vec![SRC_NONE; n + pool],
            src: [SourceStats::default(); 3],
            prev_last: u32::MAX,
            prev_last_raw: NEVER,
            run: 0,
            phantom_next: 0,
            phantom_raw: vec![NEVER; pool],
            phantom_of: HashMap::new(),
            windows,
            lstm,
            requests: 0,
            stats: KilnStats::default(),
        }
    }

    fn prob(&self, page: u32) -> f32 {
        self.lstm.scores()[self.windows.part_of[page as usize] as usize]
    }

    /// Whether `source` may prefetch now (accurate enough, or this is a probe).
    fn source_open(&mut self, source: u8) -> bool {
        let st = &mut self.src[source as usize];
        if st.accuracy() >= self.cfg.min_accuracy {
            return true;
        }
        st.probe = st.probe.wrapping_add(1);
        st.probe & 15 == 0
    }

    fn prefetch_id(&mut self, id: u32, source: u8) -> bool {
        if self.core.contains(id) {
            return false;
        }
        if (id as usize) < self.n && self.prob(id) < self.cfg.prefetch_min_prob {
            return false;
        }
        self.core.insert(id);
        self.pf_src[id as usize] = source;
        self.src[source as usize].issue();
        match source {
            SRC_MARKOV => self.stats.prefetch_markov += 1,
            _ => self.stats.prefetch_seq += 1,
        }
        true
    }

    /// Prefetches raw page `raw`, which the trace never touches, as a phantom page.
    fn prefetch_phantom(&mut self, raw: u64, source: u8) -> bool {
        if let Some(&id) = self.phantom_of.get(&raw) {
            if self.core.contains(id) {
                return false;
            }
        }
        let pool = self.phantom_raw.len();
        let mut id = self.n + self.phantom_next;
        while self.core.tracked(id as u32) {
            self.phantom_next = (self.phantom_next + 1) % pool;
            id = self.n + self.phantom_next;
        }
        self.phantom_next = (self.phantom_next + 1) % pool;
        let slot = id - self.n;
        let old = self.phantom_raw[slot];
        if old != NEVER && self.phantom_of.get(&old) == Some(&(id as u32)) {
            self.phantom_of.remove(&old);
        }
        self.phantom_raw[slot] = raw;
        self.phantom_of.insert(raw, id as u32);
        self.stats.prefetch_phantom += 1;
        self.prefetch_id(id as u32, source)
    }

    fn admit(&self, page: u32) -> bool {
        let last = self.last_ref[page as usize];
        if self.core.in_ghost(page) {
            return true;
        }
        if last != NEVER && ((self.clock - last) as f64) <= self.cfg.reuse_horizon * self.cap as f64
        {
            return true;
        }
        self.prob(page) >= self.cfg.admit_min_prob
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
        self.clock += 1;
        let pi = page as usize;
        let resident = self.core.contains(page);
        let admit = resident || self.admit(page);
        self.last_ref[pi] = self.clock;
        if resident {
            let s = std::mem::replace(&mut self.pf_src[pi], SRC_NONE);
            if s != SRC_NONE {
                self.src[s as usize].used += 1.0;
                self.stats.prefetch_used += 1;
            }
        } else {
            self.pf_src[pi] = SRC_NONE;
        }
        if !admit {
            self.stats.demand_bypassed += 1;
            return false; // served from the capacity tier, not migrated
        }
        let migrated = self.core.access(page, pos);
        self.stats.demand_admitted += u64::from(migrated);
        migrated
    }
    fn after_request(&mut self, trace: &Trace, req: usize) -> u64 {
        let pages = trace.request(req);
        let (first, last) = (pages[0], pages[pages.len() - 1]);
        let first_raw = trace.raw_pages[first as usize];
        let last_raw = trace.raw_pages[last as usize];
        if self.prev_last != u32::MAX && self.prev_last != first {
            let pl = self.prev_last as usize;
            if self.succ[pl] == first {
                self.succ_conf[pl] = (self.succ_conf[pl] + 1).min(3);
            } else if self.succ_conf[pl] > 1 {
                self.succ_conf[pl] -= 1;
            } else {
                self.succ[pl] = first;
                self.succ_conf[pl] = 1;
            }
        }
        let continues = self.prev_last_raw != NEVER && first_raw == self.prev_last_raw + 1;
        self.prev_last = last;
        self.prev_last_raw = last_raw;
        self.run = if continues { self.run + 1 } else { 0 };
        self.windows.add(trace, req);
        self.requests += 1;
        if self.requests.checked_rem(self.cfg.window_requests) == Some(0) {
            self.windows.fold();
            self.lstm.observe(&self.windows.obs());
            self.windows.reset();
        }
        let mut budget = self.cfg.prefetch_budget_pages;
        let mut migrated = 0u64;
        // Chain of confirmed Markov successors.
        if self.source_open(SRC_MARKOV) {
            let mut cur = last;
            let mut steps = 0;
            while budget > 0 && steps < self.cfg.prefetch_budget_pages {
                let nx = self.succ[cur as usize];
                if nx == u32::MAX || self.succ_conf[cur as usize] < self.cfg.markov_min_conf {
                    break;
                }
                if self.prefetch_id(nx, SRC_MARKOV) {
                    migrated += 1;
                    budget -= 1;
                }
                cur = nx;
                steps += 1;
            }
        }
        // Sequential stream: the next raw pages after the request, touched by the trace or not.
        if budget > 0 && (pages.len() > 1 || continues) && self.source_open(SRC_SEQ) {
            let mut dense = last as usize + 1;
            // Readahead ramp: one page after a multi-page request, then one more page per
            // further request that continues the stream (a stream must continue once before
            // single-page requests trigger prefetch).
            let depth = if continues {
                budget.min(self.run - 1)
            } else {
                1
            };
            for k in 1..=u64::from(depth) {
                let raw = last_raw + k;
                let done = if dense < self.n && trace.raw_pages[dense] == raw {
                    dense += 1;
                    self.prefetch_id((dense - 1) as u32, SRC_SEQ)
                } else {
                    self.prefetch_phantom(raw, SRC_SEQ)
                };
                migrated += u64::from(done);
            }
        }
        migrated
    }
    fn resident_pages(&self) -> usize {
        self.core.resident_pages()
    }
}
