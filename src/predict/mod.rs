//! Predictive access engine: per-partition next-window access prediction.
//!
//! Every predictor implements [`Predictor`]: it observes one window of per-partition counts at
//! a time and scores every partition for the next window. [`LstmPredictor`] is the learned one
//! (a small LSTM, see [`lstm`]) with online retraining on drift, an atomic model swap
//! ([`ModelCell`]), a burst detector ([`AnomalyDetector`]) and Hot/Warm/Cold classification.
//! [`EwmaPredictor`] and [`MarkovPredictor`] are the baselines.

pub mod bench;
pub mod lstm;

use lstm::{Adam, Lstm, Rng};
use ndarray::{Array2, Array3};
use std::sync::{Arc, Mutex};

/// One window of observations over all partitions.
#[derive(Debug, Clone, Copy)]
pub struct WindowObs<'a> {
    /// Accesses per partition.
    pub counts: &'a [u32],
    /// Write accesses per partition.
    pub writes: &'a [u32],
    /// Sequential accesses per partition.
    pub sequential: &'a [u32],
    /// Partition-to-partition transitions between consecutive requests (self included).
    pub transitions: &'a [(u32, u32)],
}

/// A next-window access predictor over partitions.
pub trait Predictor {
    /// Short name.
    fn name(&self) -> &'static str;
    /// Observes the window that just ended.
    fn observe(&mut self, w: &WindowObs);
    /// Score per partition for the next window (higher = more likely accessed).
    fn scores(&self) -> &[f32];
}

/// EWMA heat: `score = alpha * count + (1 - alpha) * score`.
pub struct EwmaPredictor {
    pub alpha: f32,
    score: Vec<f32>,
}

impl EwmaPredictor {
    pub fn new(partitions: usize, alpha: f32) -> Self {
        assert!(alpha > 0.0 && alpha <= 1.0);
        EwmaPredictor {
            alpha,
            score: vec![0.0; partitions],
        }
    }
}

impl Predictor for EwmaPredictor {
    fn name(&self) -> &'static str {
        "ewma"
    }
    fn observe(&mut self, w: &WindowObs) {
        let a = self.alpha;
        for (s, &c) in self.score.iter_mut().zip(w.counts) {
            *s = a * c as f32 + (1.0 - a) * *s;
        }
    }
    fn scores(&self) -> &[f32] {
        &self.score
    }
}

const MARKOV_WAYS: usize = 4;

/// First-order Markov chain over partitions: `score(q) = sum_p count(p) * P(q | p)`, with the
/// transition counts decayed per window and at most four successors kept per partition.
pub struct MarkovPredictor {
    table: Vec<[(u32, f32); MARKOV_WAYS]>,
    score: Vec<f32>,
    pub decay: f32,
}

impl MarkovPredictor {
    pub fn new(partitions: usize) -> Self {
        MarkovPredictor {
            table: vec![[(u32::MAX, 0.0); MARKOV_WAYS]; partitions],
            score: vec![0.0; partitions],
            decay: 0.8,
        }
    }
}

impl Predictor for MarkovPredictor {
    fn name(&self) -> &'static str {
        "markov"
    }
    fn observe(&mut self, w: &WindowObs) {
        let d = self.decay;
        for (p, &c) in w.counts.iter().enumerate() {
            if c > 0 || self.table[p][0].1 > 0.0 {
                for e in self.table[p].iter_mut() {
                    e.1 *= d;
                }
            }
        }
        for &(from, to) in w.transitions {
            let row = &mut self.table[from as usize];
            if let Some(e) = row.iter_mut().find(|e| e.0 == to) {
                e.1 += 1.0;
            } else {
                let min = row
                    .iter_mut()
                    .min_by(|a, b| a.1.total_cmp(&b.1))
                    .expect("non-empty row");
                *min = (to, 1.0);
            }
        }
        self.score.iter_mut().for_each(|s| *s = 0.0);
        for (p, &c) in w.counts.iter().enumerate() {
            if c == 0 {
                continue;
            }
            let row = &self.table[p];
            let tot: f32 = row.iter().map(|e| e.1).sum();
            if tot <= 0.0 {
                continue;
            }
            for e in row.iter().filter(|e| e.0 != u32::MAX) {
                self.score[e.0 as usize] += c as f32 * e.1 / tot;
            }
        }
    }
    fn scores(&self) -> &[f32] {
        &self.score
    }
}

/// The current model, swapped atomically by the trainer; readers clone the `Arc` (the lock is
/// held only for that clone, never across inference or training).
#[derive(Clone)]
pub struct ModelCell(Arc<Mutex<Arc<Lstm>>>);

impl ModelCell {
    pub fn new(m: Lstm) -> Self {
        ModelCell(Arc::new(Mutex::new(Arc::new(m))))
    }
    /// The current model.
    pub fn load(&self) -> Arc<Lstm> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
    /// Publishes `m` as the current model.
    pub fn swap(&self, m: Lstm) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Arc::new(m);
    }
}

/// One training job: sequences `B x T x F`, targets and weights `B x T`, and the state each
/// sequence starts from (`B x H`, zeros for none).
pub struct TrainJob {
    pub xs: Array3<f64>,
    pub ys: Array2<f64>,
    pub ws: Array2<f64>,
    pub h0: Array2<f64>,
    pub c0: Array2<f64>,
}

/// Trains a copy of the current model on `job` and swaps it in. Returns the final loss.
pub fn train_and_swap(cell: &ModelCell, opt: &mut Adam, job: &TrainJob, steps: usize) -> f64 {
    let mut m = (*cell.load()).clone();
    let mut loss = 0.0;
    for _ in 0..steps {
        let (l, mut g) = m.loss_and_grads_from(&job.xs, &job.ys, &job.ws, &job.h0, &job.c0);
        opt.step(&mut m, &mut g);
        loss = l;
    }
    cell.swap(m);
    loss
}

/// A background training thread: jobs arrive on a bounded channel (a full channel drops the
/// job, so the sender never waits) and each finished training swaps the model in `cell`.
pub struct BackgroundTrainer {
    tx: Option<crossbeam_channel::Sender<TrainJob>>,
    join: Option<std::thread::JoinHandle<()>>,
}

impl BackgroundTrainer {
    pub fn spawn(cell: ModelCell, lr: f64, steps: usize) -> Self {
        let (tx, rx) = crossbeam_channel::bounded::<TrainJob>(1);
        let join = std::thread::Builder::new()
            .name("kiln-predict-train".into())
            .spawn(move || {
                let mut opt = Adam::new(&cell.load(), lr, 1.0);
                for job in rx {
                    train_and_swap(&cell, &mut opt, &job, steps);
                }
            })
            .expect("spawn trainer thread");
        BackgroundTrainer {
            tx: Some(tx),
            join: Some(join),
        }
    }

    /// Offers a job; returns false when the trainer is still busy with the previous one.
    pub fn offer(&self, job: TrainJob) -> bool {
        self.tx.as_ref().is_some_and(|tx| tx.try_send(job).is_ok())
    }
}

impl Drop for BackgroundTrainer {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
    }
}

/// Burst detector: z-score of the window's total accesses against an EWMA mean and variance.
#[derive(Debug, Clone)]
pub struct AnomalyDetector {
    pub z_threshold: f64,
    pub alpha: f64,
    mean: f64,
    var: f64,
    seen: u64,
    /// Windows left with raised weight of recent observations.
    pub boost_windows_left: u32,
    pub bursts: u64,
}

impl AnomalyDetector {
    pub fn new(z_threshold: f64) -> Self {
        AnomalyDetector {
            z_threshold,
            alpha: 0.1,
            mean: 0.0,
            var: 0.0,
            seen: 0,
            boost_windows_left: 0,
            bursts: 0,
        }
    }

    /// Feeds one window total; returns its z-score and whether it is a burst.
    pub fn observe(&mut self, total: f64) -> (f64, bool) {
        self.boost_windows_left = self.boost_windows_left.saturating_sub(1);
        if self.seen == 0 {
            self.mean = total;
        }
        let resid = total - self.mean;
        let z = if self.var > 0.0 {
            resid / self.var.sqrt()
        } else {
            0.0
        };
        let burst = self.seen >= 4 && z > self.z_threshold;
        if burst {
            self.bursts += 1;
            self.boost_windows_left = 3;
        }
        self.mean += self.alpha * resid;
        self.var = (1.0 - self.alpha) * (self.var + self.alpha * resid * resid);
        self.seen += 1;
        (z, burst)
    }

    /// Weight multiplier for the most recent observations.
    pub fn recent_weight(&self) -> f64 {
        if self.boost_windows_left > 0 {
            3.0
        } else {
            1.0
        }
    }
}

/// Heat class of a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum HeatClass {
    Hot,
    Warm,
    Cold,
}

/// Classifies a predicted access probability; returns the class and a confidence in [0, 1].
pub fn classify(p: f32) -> (HeatClass, f32) {
    const HOT: f32 = 0.6;
    const COLD: f32 = 0.2;
    if p >= HOT {
        (HeatClass::Hot, (p - HOT) / (1.0 - HOT) * 0.5 + 0.5)
    } else if p < COLD {
        (HeatClass::Cold, (COLD - p) / COLD * 0.5 + 0.5)
    } else {
        let mid = (HOT + COLD) / 2.0;
        (HeatClass::Warm, 1.0 - (p - mid).abs() / (HOT - mid))
    }
}

/// Number of input features per partition and window.
pub const FEATURES: usize = 8;

/// LSTM predictor configuration.
#[derive(Debug, Clone, Copy)]
pub struct LstmConfig {
    pub hidden: usize,
    /// Windows per training sequence (truncated BPTT; inference is stateful, one step per
    /// window).
    pub seq_windows: usize,
    /// Partitions sampled per training job.
    pub train_partitions: usize,
    /// Adam steps per training job.
    pub train_steps: usize,
    /// Retrain every this many windows even without drift.
    pub retrain_windows: u64,
    /// Retrain early when the recent error exceeds the post-training error by this factor.
    pub drift_factor: f64,
    pub lr: f64,
    pub seed: u64,
}

impl Default for LstmConfig {
    fn default() -> Self {
        LstmConfig {
            hidden: 8,
            seq_windows: 4,
            train_partitions: 512,
            train_steps: 40,
            retrain_windows: 16,
            drift_factor: 1.25,
            lr: 0.01,
            seed: 0x6b69_6c6e,
        }
    }
}

/// The learned predictor: features per partition are current count, fast and slow EWMA, Markov
/// score, write and sequential fractions, an accessed bit and the age since last access.
pub struct LstmPredictor {
    cfg: LstmConfig,
    partitions: usize,
    pub model: ModelCell,
    opt: Adam,
    rng: Rng,
    ewma_fast: Vec<f32>,
    ewma_slow: Vec<f32>,
    age: Vec<u32>,
    markov: MarkovPredictor,
    /// Feature ring: `seq_windows + 1` matrices of `P x F`.
    hist: Vec<Array2<f64>>,
    /// Count ring, aligned with `hist`.
    hist_counts: Vec<Vec<u32>>,
    /// Per-partition LSTM state `[h; c]` (`P x 2H`) after the newest window.
    state: Vec<f32>,
    /// State ring (`seq_windows + 2` entries): the state after each recent window, so training
    /// sequences start from the state the predictor had.
    state_hist: Vec<Vec<f32>>,
    windows: u64,
    score: Vec<f32>,
    err_recent: f64,
    err_trained: f64,
    last_train: u64,
    pub anomaly: AnomalyDetector,
    pub retrains: u64,
    pub drift_retrains: u64,
    pub train_ns: u128,
}

impl LstmPredictor {
    pub fn new(partitions: usize, cfg: LstmConfig) -> Self {
        let m = Lstm::new(FEATURES, cfg.hidden, cfg.seed);
        let opt = Adam::new(&m, cfg.lr, 1.0);
        let ring = cfg.seq_windows + 1;
        LstmPredictor {
            cfg,
            partitions,
            model: ModelCell::new(m),
            opt,
            rng: Rng::new(cfg.seed ^ 0x9e37),
            ewma_fast: vec![0.0; partitions],
            ewma_slow: vec![0.0; partitions],
            age: vec![64; partitions],
            markov: MarkovPredictor::new(partitions),
            hist: (0..ring)
                .map(|_| Array2::zeros((partitions, FEATURES)))
                .collect(),
            hist_counts: (0..ring).map(|_| vec![0; partitions]).collect(),
            state: vec![0.0; partitions * 2 * cfg.hidden],
            state_hist: (0..ring + 1)
                .map(|_| vec![0.0; partitions * 2 * cfg.hidden])
                .collect(),
            windows: 0,
            score: vec![0.0; partitions],
            err_recent: 0.0,
            err_trained: f64::MAX,
            last_train: 0,
            anomaly: AnomalyDetector::new(3.0),
            retrains: 0,
            drift_retrains: 0,
            train_ns: 0,
        }
    }

    fn slot(&self, ago: u64) -> usize {
        ((self.windows - 1 - ago) % self.hist.len() as u64) as usize
    }

    /// Predicted class and confidence of `partition`.
    pub fn classify(&self, partition: usize) -> (HeatClass, f32) {
        classify(self.score[partition])
    }

    fn build_job(&mut self) -> Option<TrainJob> {
        let t = self.cfg.seq_windows;
        if self.windows < t as u64 + 1 {
            return None;
        }
        // Windows: inputs are the t windows before the newest, targets are "accessed in the
        // following window"; the newest window provides the last targets.
        let active: Vec<usize> = (0..self.partitions)
            .filter(|&p| (0..=t as u64).any(|a| self.hist_counts[self.slot(a)][p] > 0))
            .collect();
        if active.is_empty() {
            return None;
        }
        let b = self.cfg.train_partitions.min(2 * active.len().max(16));
        let hd = self.cfg.hidden;
        let mut xs = Array3::zeros((b, t, FEATURES));
        let mut ys = Array2::zeros((b, t));
        let mut ws = Array2::ones((b, t));
        let mut h0 = Array2::zeros((b, hd));
        let mut c0 = Array2::zeros((b, hd));
        let boost = self.anomaly.recent_weight();
        // The state before the first input window: after the window `t + 1` ago.
        let st = if self.windows > t as u64 + 1 {
            Some(
                &self.state_hist
                    [((self.windows - 2 - t as u64) % self.state_hist.len() as u64) as usize],
            )
        } else {
            None
        };
        for r in 0..b {
            // Half from partitions active lately, half uniformly (as inference sees them).
            let p = if r % 2 == 0 {
                active[self.rng.below(active.len())]
            } else {
                self.rng.below(self.partitions)
            };
            if let Some(st) = st {
                for j in 0..hd {
                    h0[[r, j]] = f64::from(st[p * 2 * hd + j]);
                    c0[[r, j]] = f64::from(st[p * 2 * hd + hd + j]);
                }
            }
            for k in 0..t {
                let ago_in = (t - k) as u64;
                let sin = self.slot(ago_in);
                let sout = self.slot(ago_in - 1);
                for f in 0..FEATURES {
                    xs[[r, k, f]] = self.hist[sin][[p, f]];
                }
                ys[[r, k]] = f64::from(self.hist_counts[sout][p] > 0);
            }
            ws[[r, t - 1]] = boost;
        }
        Some(TrainJob { xs, ys, ws, h0, c0 })
    }

    /// One stateful LSTM step per partition on the newest window's features.
    fn predict_all(&mut self) {
        let fast = lstm::FastLstm::from_model(&self.model.load());
        let hd = fast.hidden();
        let s = self.slot(0);
        let mut x = [0f32; FEATURES];
        for p in 0..self.partitions {
            for (f, v) in x.iter_mut().enumerate() {
                *v = self.hist[s][[p, f]] as f32;
            }
            let (h, c) = self.state[p * 2 * hd..(p + 1) * 2 * hd].split_at_mut(hd);
            self.score[p] = fast.step(&x, h, c);
        }
        let n = self.state_hist.len() as u64;
        self.state_hist[((self.windows - 1) % n) as usize].copy_from_slice(&self.state);
    }
}

impl Predictor for LstmPredictor {
    fn name(&self) -> &'static str {
        "lstm"
    }

    fn observe(&mut self, w: &WindowObs) {
        assert_eq!(w.counts.len(), self.partitions);
        // Error of the previous prediction (Brier score over active-or-predicted partitions).
        if self.windows > 0 {
            let mut e = 0.0;
            let mut n = 0usize;
            for (p, &c) in w.counts.iter().enumerate() {
                let s = f64::from(self.score[p]);
                if c > 0 || s > 0.05 {
                    let t = f64::from(c > 0);
                    e += (s - t) * (s - t);
                    n += 1;
                }
            }
            let e = if n > 0 { e / n as f64 } else { 0.0 };
            self.err_recent = 0.7 * self.err_recent + 0.3 * e;
        }
        let total: f64 = w.counts.iter().map(|&c| f64::from(c)).sum();
        let (_, burst) = self.anomaly.observe(total);
        let af = if self.anomaly.boost_windows_left > 0 {
            0.8
        } else {
            0.5
        };
        self.markov.observe(w);
        self.windows += 1;
        let s = self.slot(0);
        let mut feat = std::mem::take(&mut self.hist[s]);
        for p in 0..self.partitions {
            let c = w.counts[p] as f32;
            self.ewma_fast[p] = af * c + (1.0 - af) * self.ewma_fast[p];
            self.ewma_slow[p] = 0.1 * c + 0.9 * self.ewma_slow[p];
            self.age[p] = if c > 0.0 {
                0
            } else {
                (self.age[p] + 1).min(64)
            };
            let n = w.counts[p].max(1) as f32;
            let f = [
                (c.ln_1p() / 4.0),
                (self.ewma_fast[p].ln_1p() / 4.0),
                (self.ewma_slow[p].ln_1p() / 4.0),
                (self.markov.scores()[p].ln_1p() / 4.0),
                w.writes[p] as f32 / n,
                (w.sequential[p] as f32 / n).min(1.0),
                f32::from(c > 0.0),
                self.age[p] as f32 / 64.0,
            ];
            for (k, v) in f.iter().enumerate() {
                feat[[p, k]] = f64::from(*v);
            }
        }
        self.hist[s] = feat;
        self.hist_counts[s].copy_from_slice(w.counts);
        let due = self.windows - self.last_train >= self.cfg.retrain_windows;
        let drift = self.err_recent > self.err_trained * self.cfg.drift_factor;
        if due || drift || burst || self.retrains == 0 {
            let t0 = std::time::Instant::now();
            if let Some(job) = self.build_job() {
                let steps = if self.retrains == 0 {
                    self.cfg.train_steps * 4
                } else {
                    self.cfg.train_steps
                };
                train_and_swap(&self.model, &mut self.opt, &job, steps);
                self.retrains += 1;
                self.drift_retrains += u64::from(drift && !due);
                self.last_train = self.windows;
                self.err_trained = self.err_recent.max(1e-4);
            }
            self.train_ns += t0.elapsed().as_nanos();
        }
        self.predict_all();
    }

    fn scores(&self) -> &[f32] {
        &self.score
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_cell_swaps_and_background_trainer_runs() {
        let cell = ModelCell::new(Lstm::new(FEATURES, 4, 1));
        let before = cell.load();
        let tr = BackgroundTrainer::spawn(cell.clone(), 0.01, 2);
        let job = TrainJob {
            xs: Array3::zeros((4, 3, FEATURES)),
            ys: Array2::ones((4, 3)),
            ws: Array2::ones((4, 3)),
            h0: Array2::zeros((4, 4)),
            c0: Array2::zeros((4, 4)),
        };
        assert!(tr.offer(job));
        drop(tr);
        assert_ne!(*cell.load(), *before);
    }

    #[test]
    fn lstm_predictor_learns_periodic_partitions() {
        let parts = 64;
        let cfg = LstmConfig {
            hidden: 8,
            train_steps: 20,
            ..Default::default()
        };
        let mut lp = LstmPredictor::new(parts, cfg);
        let zeros = vec![0u32; parts];
        let mut hits = 0;
        for w in 0..60 {
            // Partitions 0..16 always hot; 16..32 hot every other window.
            let counts: Vec<u32> = (0..parts)
                .map(|p| u32::from(p < 16 || (p < 32 && w % 2 == 0)) * 10)
                .collect();
            if w >= 40 {
                let s = lp.scores();
                let predicted_hot = (0..32).filter(|&p| s[p] > 0.5).count();
                hits += predicted_hot;
            }
            let obs = WindowObs {
                counts: &counts,
                writes: &zeros,
                sequential: &zeros,
                transitions: &[],
            };
            lp.observe(&obs);
        }
        // Over 20 windows: 16 always-hot + 16 hot in half of them.
        assert!(hits >= 400, "hits {hits}");
        assert_eq!(lp.classify(0).0, HeatClass::Hot);
        assert_eq!(lp.classify(60).0, HeatClass::Cold);
    }

    #[test]
    fn anomaly_flags_a_burst() {
        let mut a = AnomalyDetector::new(3.0);
        for i in 0..20 {
            assert!(!a.observe(100.0 + f64::from(i % 3)).1);
        }
        assert!(a.observe(1000.0).1);
        assert!(a.recent_weight() > 1.0);
    }
}
