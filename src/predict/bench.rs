//! Cost micro-benchmarks of the LSTM predictor (`kiln replay --bench-predict`).

use super::lstm::{Adam, FastLstm, Lstm, Rng};
use super::{LstmConfig, FEATURES};
use ndarray::{Array2, Array3};
use std::time::Instant;

/// Benchmark figures.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PredictBench {
    pub hidden: usize,
    pub seq_windows: usize,
    pub batch_partitions: usize,
    /// Inference per partition and window (one stateful step).
    pub inference_ns_per_partition: f64,
    pub train_partitions: usize,
    pub train_steps: usize,
    /// One training job (the default retrain).
    pub train_ms_per_job: f64,
    pub volume_partitions: u64,
    pub window_ms: u64,
    pub retrain_windows: u64,
    /// Training share of one core at the default retrain interval.
    pub train_core_pct: f64,
    /// Inference of every partition once per window, share of one core.
    pub inference_core_pct: f64,
}

impl std::fmt::Display for PredictBench {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "# LSTM cost (hidden {}, stateful inference, {}-window training sequences)",
            self.hidden, self.seq_windows
        )?;
        writeln!(
            f,
            "inference: {:.0} ns per partition and window (one stateful step; {} partitions)",
            self.inference_ns_per_partition, self.batch_partitions
        )?;
        writeln!(
            f,
            "training: {:.2} ms per retrain ({} sampled partitions x {} windows, {} Adam steps)",
            self.train_ms_per_job, self.train_partitions, self.seq_windows, self.train_steps
        )?;
        writeln!(
            f,
            "1 TiB volume, 1 MiB partitions ({} partitions), {} ms windows, retrain every {} windows:",
            self.volume_partitions, self.window_ms, self.retrain_windows
        )?;
        writeln!(f, "  training   {:.3}% of one core", self.train_core_pct)?;
        write!(
            f,
            "  inference  {:.2}% of one core (all partitions every window)",
            self.inference_core_pct
        )
    }
}

/// Runs the benchmarks with the default [`LstmConfig`], 1 s windows and a 1 TiB volume.
pub fn run_default() -> PredictBench {
    let cfg = LstmConfig::default();
    let window_ms = 1000;
    let volume_partitions = 1u64 << 20;
    let mut rng = Rng::new(1);
    let m = Lstm::new(FEATURES, cfg.hidden, 3);
    let batch = 65_536;
    // Stateful inference: one LSTM step per partition and window, state kept per partition.
    let xs_inf: Vec<f32> = (0..batch * FEATURES).map(|_| rng.unit() as f32).collect();
    let fast = FastLstm::from_model(&m);
    let hd = cfg.hidden;
    let mut state = vec![0f32; batch * 2 * hd];
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t0 = Instant::now();
        let mut acc = 0.0f32;
        for p in 0..batch {
            let x = &xs_inf[p * FEATURES..(p + 1) * FEATURES];
            let (h, c) = state[p * 2 * hd..(p + 1) * 2 * hd].split_at_mut(hd);
            acc += fast.step(x, h, c);
        }
        std::hint::black_box(acc);
        best = best.min(t0.elapsed().as_nanos() as f64 / batch as f64);
    }
    let b = cfg.train_partitions;
    let xs = Array3::from_shape_fn((b, cfg.seq_windows, FEATURES), |_| rng.unit());
    let ys = Array2::from_shape_fn((b, cfg.seq_windows), |_| f64::from(rng.unit() > 0.5));
    let ws = Array2::ones((b, cfg.seq_windows));
    let mut mm = m.clone();
    let mut opt = Adam::new(&mm, cfg.lr, 1.0);
    let t0 = Instant::now();
    let jobs = 3;
    for _ in 0..jobs {
        for _ in 0..cfg.train_steps {
            let (_, mut g) = mm.loss_and_grads(&xs, &ys, &ws);
            opt.step(&mut mm, &mut g);
        }
    }
    let train_ms = t0.elapsed().as_secs_f64() * 1e3 / jobs as f64;
    let interval_ms = (cfg.retrain_windows * window_ms) as f64;
    PredictBench {
        hidden: cfg.hidden,
        seq_windows: cfg.seq_windows,
        batch_partitions: batch,
        inference_ns_per_partition: best,
        train_partitions: b,
        train_steps: cfg.train_steps,
        train_ms_per_job: train_ms,
        volume_partitions,
        window_ms,
        retrain_windows: cfg.retrain_windows,
        train_core_pct: 100.0 * train_ms / interval_ms,
        inference_core_pct: 100.0 * best * volume_partitions as f64 / 1e6 / window_ms as f64,
    }
}
