//! A small single-layer LSTM with a sigmoid output per step, written with ndarray:
//! batched forward, backpropagation through time, Adam and global-norm gradient clipping.
//!
//! Gate order in the stacked weights is input, forget, cell, output.

use ndarray::{s, Array1, Array2, Array3, ArrayView2, Axis};
use serde::{Deserialize, Serialize};

/// Frame magic of a saved model ("KLSM").
pub const LSTM_MAGIC: u32 = 0x4b4c_534d;

/// LSTM parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct Lstm {
    pub input: usize,
    pub hidden: usize,
    /// `4H x I`.
    pub wx: Array2<f64>,
    /// `4H x H`.
    pub wh: Array2<f64>,
    /// `4H`.
    pub b: Array1<f64>,
    /// `H`: output weights.
    pub wy: Array1<f64>,
    /// Output bias (length 1).
    pub by: Array1<f64>,
}

/// Gradients (or Adam moments), same shapes as [`Lstm`].
#[derive(Debug, Clone)]
pub struct LstmGrads {
    pub wx: Array2<f64>,
    pub wh: Array2<f64>,
    pub b: Array1<f64>,
    pub wy: Array1<f64>,
    pub by: Array1<f64>,
}

impl LstmGrads {
    fn zeros(m: &Lstm) -> Self {
        LstmGrads {
            wx: Array2::zeros(m.wx.raw_dim()),
            wh: Array2::zeros(m.wh.raw_dim()),
            b: Array1::zeros(m.b.raw_dim()),
            wy: Array1::zeros(m.wy.raw_dim()),
            by: Array1::zeros(1),
        }
    }

    fn slices_mut(&mut self) -> [&mut [f64]; 5] {
        [
            self.wx.as_slice_mut().expect("standard layout"),
            self.wh.as_slice_mut().expect("standard layout"),
            self.b.as_slice_mut().expect("standard layout"),
            self.wy.as_slice_mut().expect("standard layout"),
            self.by.as_slice_mut().expect("standard layout"),
        ]
    }

    /// Global L2 norm.
    pub fn norm(&mut self) -> f64 {
        self.slices_mut()
            .iter()
            .flat_map(|s| s.iter())
            .map(|x| x * x)
            .sum::<f64>()
            .sqrt()
    }
}

/// Serialized form of an [`Lstm`] (postcard inside a `crate::frame` frame).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LstmState {
    pub input: usize,
    pub hidden: usize,
    pub params: Vec<f64>,
}

/// Per-step activations kept for backpropagation.
struct StepCache {
    x: Array2<f64>,
    h_prev: Array2<f64>,
    c_prev: Array2<f64>,
    i: Array2<f64>,
    f: Array2<f64>,
    g: Array2<f64>,
    o: Array2<f64>,
    tanh_c: Array2<f64>,
    h: Array2<f64>,
    y: Array1<f64>,
}

#[inline]
fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// Small deterministic generator for initialisation and sampling (xorshift64*).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.max(1))
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Uniform in 0..n.
    pub fn below(&mut self, n: usize) -> usize {
        assert!(n > 0);
        (self.next_u64() % n as u64) as usize
    }
}

impl Lstm {
    /// Random initialisation (uniform +-1/sqrt(H)); forget-gate bias 1.
    pub fn new(input: usize, hidden: usize, seed: u64) -> Self {
        assert!(input > 0 && hidden > 0);
        let mut rng = Rng::new(seed);
        let k = 1.0 / (hidden as f64).sqrt();
        let mut rnd = |_| (rng.unit() * 2.0 - 1.0) * k;
        let wx = Array2::from_shape_fn((4 * hidden, input), |ij| rnd(ij.0));
        let wh = Array2::from_shape_fn((4 * hidden, hidden), |ij| rnd(ij.0));
        let mut b = Array1::zeros(4 * hidden);
        b.slice_mut(s![hidden..2 * hidden]).fill(1.0);
        let wy = Array1::from_shape_fn(hidden, rnd);
        Lstm {
            input,
            hidden,
            wx,
            wh,
            b,
            wy,
            by: Array1::zeros(1),
        }
    }

    fn slices_mut(&mut self) -> [&mut [f64]; 5] {
        [
            self.wx.as_slice_mut().expect("standard layout"),
            self.wh.as_slice_mut().expect("standard layout"),
            self.b.as_slice_mut().expect("standard layout"),
            self.wy.as_slice_mut().expect("standard layout"),
            self.by.as_slice_mut().expect("standard layout"),
        ]
    }

    /// Number of scalar parameters.
    pub fn param_count(&self) -> usize {
        self.wx.len() + self.wh.len() + self.b.len() + self.wy.len() + 1
    }

    fn step_full(&self, x: ArrayView2<f64>, h: &Array2<f64>, c: &Array2<f64>) -> StepCache {
        let hd = self.hidden;
        let mut z = x.dot(&self.wx.t()) + h.dot(&self.wh.t());
        z += &self.b;
        let i = z.slice(s![.., 0..hd]).mapv(sigmoid);
        let f = z.slice(s![.., hd..2 * hd]).mapv(sigmoid);
        let g = z.slice(s![.., 2 * hd..3 * hd]).mapv(f64::tanh);
        let o = z.slice(s![.., 3 * hd..4 * hd]).mapv(sigmoid);
        let c_new = &f * c + &i * &g;
        let tanh_c = c_new.mapv(f64::tanh);
        let h_new = &o * &tanh_c;
        let y = (h_new.dot(&self.wy) + self.by[0]).mapv(sigmoid);
        StepCache {
            x: x.to_owned(),
            h_prev: h.clone(),
            c_prev: c.clone(),
            i,
            f,
            g,
            o,
            tanh_c,
            h: h_new,
            y,
        }
    }

    /// One inference step for a batch: updates `h` and `c` (`B x H`) in place and returns the
    /// predicted probability per row.
    pub fn step(
        &self,
        x: ArrayView2<f64>,
        h: &mut Array2<f64>,
        c: &mut Array2<f64>,
    ) -> Array1<f64> {
        assert_eq!(x.ncols(), self.input, "feature width");
        let sc = self.step_full(x, h, c);
        let c_new = &sc.f * &sc.c_prev + &sc.i * &sc.g;
        *h = sc.h;
        *c = c_new;
        sc.y
    }

    /// Forward over `xs` (`B x T x I`) from zero state; returns `B x T` probabilities.
    pub fn forward(&self, xs: &Array3<f64>) -> Array2<f64> {
        let (b, _, _) = xs.dim();
        let z = Array2::zeros((b, self.hidden));
        self.forward_from(xs, &z, &z)
    }

    /// Forward over `xs` from the state `h0`, `c0` (`B x H`).
    pub fn forward_from(
        &self,
        xs: &Array3<f64>,
        h0: &Array2<f64>,
        c0: &Array2<f64>,
    ) -> Array2<f64> {
        let (b, t, _) = xs.dim();
        let mut h = h0.clone();
        let mut c = c0.clone();
        let mut out = Array2::zeros((b, t));
        for k in 0..t {
            let y = self.step(xs.index_axis(Axis(1), k), &mut h, &mut c);
            out.column_mut(k).assign(&y);
        }
        out
    }

    /// Weighted mean binary cross-entropy of `forward(xs)` against `targets` (`B x T`).
    pub fn loss(&self, xs: &Array3<f64>, targets: &Array2<f64>, weights: &Array2<f64>) -> f64 {
        let z = Array2::zeros((xs.dim().0, self.hidden));
        self.loss_from(xs, targets, weights, &z, &z)
    }

    /// [`Lstm::loss`] from the state `h0`, `c0`.
    pub fn loss_from(
        &self,
        xs: &Array3<f64>,
        targets: &Array2<f64>,
        weights: &Array2<f64>,
        h0: &Array2<f64>,
        c0: &Array2<f64>,
    ) -> f64 {
        let y = self.forward_from(xs, h0, c0);
        let n = targets.len() as f64;
        let mut l = 0.0;
        for ((&p, &t), &w) in y.iter().zip(targets.iter()).zip(weights.iter()) {
            let p = p.clamp(1e-12, 1.0 - 1e-12);
            l -= w * (t * p.ln() + (1.0 - t) * (1.0 - p).ln());
        }
        l / n
    }

    /// Loss and its gradients by backpropagation through time, from zero state.
    pub fn loss_and_grads(
        &self,
        xs: &Array3<f64>,
        targets: &Array2<f64>,
        weights: &Array2<f64>,
    ) -> (f64, LstmGrads) {
        let z = Array2::zeros((xs.dim().0, self.hidden));
        self.loss_and_grads_from(xs, targets, weights, &z, &z)
    }

    /// Loss and gradients from the state `h0`, `c0` (`B x H`), treated as constants: truncated
    /// backpropagation through time for a stateful predictor.
    pub fn loss_and_grads_from(
        &self,
        xs: &Array3<f64>,
        targets: &Array2<f64>,
        weights: &Array2<f64>,
        h0: &Array2<f64>,
        c0: &Array2<f64>,
    ) -> (f64, LstmGrads) {
        let (b, t, i_n) = xs.dim();
        assert_eq!(i_n, self.input);
        assert_eq!(targets.dim(), (b, t));
        assert_eq!(weights.dim(), (b, t));
        let hd = self.hidden;
        assert_eq!(h0.dim(), (b, hd));
        assert_eq!(c0.dim(), (b, hd));
        let mut h = h0.clone();
        let mut c = c0.clone();
        let mut caches = Vec::with_capacity(t);
        for k in 0..t {
            let sc = self.step_full(xs.index_axis(Axis(1), k), &h, &c);
            c = &sc.f * &sc.c_prev + &sc.i * &sc.g;
            h = sc.h.clone();
            caches.push(sc);
        }
        let n = (b * t) as f64;
        let mut loss = 0.0;
        let mut g = LstmGrads::zeros(self);
        let mut dh_next = Array2::<f64>::zeros((b, hd));
        let mut dc_next = Array2::<f64>::zeros((b, hd));
        for k in (0..t).rev() {
            let sc = &caches[k];
            let tk = targets.column(k);
            let wk = weights.column(k);
            let mut dlogit = Array1::zeros(b);
            for r in 0..b {
                let p = sc.y[r].clamp(1e-12, 1.0 - 1e-12);
                loss -= wk[r] * (tk[r] * p.ln() + (1.0 - tk[r]) * (1.0 - p).ln());
                dlogit[r] = wk[r] * (sc.y[r] - tk[r]) / n;
            }
            g.wy += &sc.h.t().dot(&dlogit);
            g.by[0] += dlogit.sum();
            let dlogit_col = dlogit.insert_axis(Axis(1));
            let dh = &dh_next + &dlogit_col.dot(&self.wy.view().insert_axis(Axis(0)));
            let d_o = &dh * &sc.tanh_c;
            let dc = &dh * &sc.o * &sc.tanh_c.mapv(|v| 1.0 - v * v) + &dc_next;
            let di = &dc * &sc.g;
            let dg = &dc * &sc.i;
            let df = &dc * &sc.c_prev;
            dc_next = &dc * &sc.f;
            let mut dz = Array2::zeros((b, 4 * hd));
            dz.slice_mut(s![.., 0..hd])
                .assign(&(&di * &sc.i.mapv(|v| v * (1.0 - v))));
            dz.slice_mut(s![.., hd..2 * hd])
                .assign(&(&df * &sc.f.mapv(|v| v * (1.0 - v))));
            dz.slice_mut(s![.., 2 * hd..3 * hd])
                .assign(&(&dg * &sc.g.mapv(|v| 1.0 - v * v)));
            dz.slice_mut(s![.., 3 * hd..4 * hd])
                .assign(&(&d_o * &sc.o.mapv(|v| v * (1.0 - v))));
            g.wx += &dz.t().dot(&sc.x);
            g.wh += &dz.t().dot(&sc.h_prev);
            g.b += &dz.sum_axis(Axis(0));
            dh_next = dz.dot(&self.wh);
        }
        (loss / n, g)
    }

    /// Serializable state.
    pub fn state(&self) -> LstmState {
        let mut params = Vec::with_capacity(self.param_count());
        params.extend(self.wx.iter());
        params.extend(self.wh.iter());
        params.extend(self.b.iter());
        params.extend(self.wy.iter());
        params.push(self.by[0]);
        LstmState {
            input: self.input,
            hidden: self.hidden,
            params,
        }
    }

    /// Rebuilds a model from its state.
    pub fn from_state(st: &LstmState) -> Result<Self, String> {
        let mut m = Lstm::new(st.input.max(1), st.hidden.max(1), 1);
        if st.input == 0 || st.hidden == 0 || st.params.len() != m.param_count() {
            return Err("LSTM state has inconsistent sizes".into());
        }
        let mut at = 0;
        for sl in m.slices_mut() {
            let n = sl.len();
            sl.copy_from_slice(&st.params[at..at + n]);
            at += n;
        }
        Ok(m)
    }

    /// Appends the model as one `crate::frame` frame to `out`.
    pub fn save(&self, seq: u64, out: &mut Vec<u8>) {
        crate::frame::encode(LSTM_MAGIC, seq, &self.state(), out);
    }

    /// Loads a model saved by [`Lstm::save`]; returns it with its sequence number.
    pub fn load(buf: &[u8]) -> Result<(u64, Self), String> {
        let (seq, st, _): (u64, LstmState, usize) =
            crate::frame::decode(LSTM_MAGIC, buf).map_err(|e| e.to_string())?;
        Ok((seq, Lstm::from_state(&st)?))
    }
}

/// Inference-only copy of an [`Lstm`] in `f32`, evaluated one partition at a time with fused
/// gate loops (no allocation per step). Same maths as [`Lstm::step`].
#[derive(Debug, Clone)]
pub struct FastLstm {
    input: usize,
    hidden: usize,
    /// Column-major gates: entry `(k, j)` at `k * 4H + j` for input `k` of `[x, h]` and gate row
    /// `j`, so the inner loop runs over independent gates and vectorizes.
    w: Vec<f32>,
    b: Vec<f32>,
    wy: Vec<f32>,
    by: f32,
}

impl FastLstm {
    pub fn from_model(m: &Lstm) -> Self {
        let (i_n, h_n) = (m.input, m.hidden);
        let mut w = Vec::with_capacity(4 * h_n * (i_n + h_n));
        for k in 0..i_n {
            w.extend(m.wx.column(k).iter().map(|&v| v as f32));
        }
        for k in 0..h_n {
            w.extend(m.wh.column(k).iter().map(|&v| v as f32));
        }
        FastLstm {
            input: i_n,
            hidden: h_n,
            w,
            b: m.b.iter().map(|&v| v as f32).collect(),
            wy: m.wy.iter().map(|&v| v as f32).collect(),
            by: m.by[0] as f32,
        }
    }

    /// Hidden size.
    pub fn hidden(&self) -> usize {
        self.hidden
    }

    /// One stateful step: updates `h` and `c` (length `hidden`) in place and returns the
    /// output. This is what the predictor runs per partition and window.
    #[inline]
    pub fn step(&self, x: &[f32], h: &mut [f32], c: &mut [f32]) -> f32 {
        const H_MAX: usize = 64;
        let (i_n, h_n) = (self.input, self.hidden);
        assert!(h_n <= H_MAX && x.len() == i_n && h.len() == h_n && c.len() == h_n);
        let g_n = 4 * h_n;
        let mut z = [0f32; 4 * H_MAX];
        let z = &mut z[..g_n];
        z.copy_from_slice(&self.b);
        for (k, &v) in x.iter().chain(h.iter()).enumerate() {
            let col = &self.w[k * g_n..(k + 1) * g_n];
            for (zj, wj) in z.iter_mut().zip(col) {
                *zj += v * wj;
            }
        }
        let mut acc = self.by;
        for k in 0..h_n {
            let ig = sigmoid32(z[k]);
            let fg = sigmoid32(z[h_n + k]);
            let gg = tanh32(z[2 * h_n + k]);
            let og = sigmoid32(z[3 * h_n + k]);
            c[k] = fg * c[k] + ig * gg;
            h[k] = og * tanh32(c[k]);
            acc += self.wy[k] * h[k];
        }
        sigmoid32(acc)
    }

    /// Runs the sequence `xs` (each of length `input`) from zero state; returns the last output.
    pub fn run<'a>(&self, xs: impl Iterator<Item = &'a [f32]>) -> f32 {
        const H_MAX: usize = 64;
        assert!(self.hidden <= H_MAX, "hidden size above {H_MAX}");
        let (i_n, h_n) = (self.input, self.hidden);
        let row = i_n + h_n;
        let mut xh = [0f32; 2 * H_MAX];
        let mut c = [0f32; H_MAX];
        let mut z = [0f32; 4 * H_MAX];
        let mut y = 0.0;
        for x in xs {
            assert_eq!(x.len(), i_n, "feature width");
            xh[..i_n].copy_from_slice(x);
            let g_n = 4 * h_n;
            let z = &mut z[..g_n];
            z.copy_from_slice(&self.b);
            for (k, &v) in xh[..row].iter().enumerate() {
                let col = &self.w[k * g_n..(k + 1) * g_n];
                for (zj, wj) in z.iter_mut().zip(col) {
                    *zj += v * wj;
                }
            }
            let mut acc = self.by;
            for k in 0..h_n {
                let ig = sigmoid32(z[k]);
                let fg = sigmoid32(z[h_n + k]);
                let gg = tanh32(z[2 * h_n + k]);
                let og = sigmoid32(z[3 * h_n + k]);
                c[k] = fg * c[k] + ig * gg;
                let h = og * tanh32(c[k]);
                xh[i_n + k] = h;
                acc += self.wy[k] * h;
            }
            y = sigmoid32(acc);
        }
        y
    }
}

/// Pade [7/6] approximation of tanh, clamped; absolute error below 1e-5 (libm `tanhf` is the
/// inference bottleneck otherwise).
#[inline(always)]
fn tanh32(x: f32) -> f32 {
    let x = x.clamp(-4.97, 4.97);
    let x2 = x * x;
    let p = x * (135_135.0 + x2 * (17_325.0 + x2 * (378.0 + x2)));
    let q = 135_135.0 + x2 * (62_370.0 + x2 * (3_150.0 + x2 * 28.0));
    (p / q).clamp(-1.0, 1.0)
}

#[inline(always)]
fn sigmoid32(x: f32) -> f32 {
    0.5 * tanh32(0.5 * x) + 0.5
}

/// Adam optimiser with global-norm gradient clipping.
#[derive(Debug, Clone)]
pub struct Adam {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub clip_norm: f64,
    t: u64,
    m: LstmGrads,
    v: LstmGrads,
}

impl Adam {
    pub fn new(model: &Lstm, lr: f64, clip_norm: f64) -> Self {
        Adam {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            clip_norm,
            t: 0,
            m: LstmGrads::zeros(model),
            v: LstmGrads::zeros(model),
        }
    }

    /// Clips `g` to `clip_norm` and applies one Adam step to `model`. Returns the pre-clip norm.
    pub fn step(&mut self, model: &mut Lstm, g: &mut LstmGrads) -> f64 {
        let norm = g.norm();
        let scale = if norm > self.clip_norm {
            self.clip_norm / norm
        } else {
            1.0
        };
        self.t += 1;
        let bc1 = 1.0 - self.beta1.powi(self.t as i32);
        let bc2 = 1.0 - self.beta2.powi(self.t as i32);
        let (b1, b2, lr, eps) = (self.beta1, self.beta2, self.lr, self.eps);
        let ps = model.slices_mut();
        let gs = g.slices_mut();
        let ms = self.m.slices_mut();
        let vs = self.v.slices_mut();
        for (((p, g), m), v) in ps.into_iter().zip(gs).zip(ms).zip(vs) {
            for k in 0..p.len() {
                let gk = g[k] * scale;
                m[k] = b1 * m[k] + (1.0 - b1) * gk;
                v[k] = b2 * v[k] + (1.0 - b2) * gk * gk;
                p[k] -= lr * (m[k] / bc1) / ((v[k] / bc2).sqrt() + eps);
            }
        }
        norm
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toy(b: usize, t: usize, i: usize, seed: u64) -> (Array3<f64>, Array2<f64>, Array2<f64>) {
        let mut r = Rng::new(seed);
        let xs = Array3::from_shape_fn((b, t, i), |_| r.unit() * 2.0 - 1.0);
        let ys = Array2::from_shape_fn((b, t), |_| f64::from(r.unit() > 0.5));
        let ws = Array2::from_shape_fn((b, t), |_| 0.5 + r.unit());
        (xs, ys, ws)
    }

    #[test]
    fn gradients_match_finite_differences() {
        let mut m = Lstm::new(3, 4, 7);
        let (xs, ys, ws) = toy(2, 5, 3, 11);
        let mut r = Rng::new(5);
        let h0 = Array2::from_shape_fn((2, 4), |_| r.unit() - 0.5);
        let c0 = Array2::from_shape_fn((2, 4), |_| r.unit() - 0.5);
        let (_, mut g) = m.loss_and_grads_from(&xs, &ys, &ws, &h0, &c0);
        let eps = 1e-6;
        let analytic: Vec<Vec<f64>> = g.slices_mut().iter().map(|s| s.to_vec()).collect();
        let mut worst = 0.0f64;
        for (a, grad) in analytic.iter().enumerate() {
            #[allow(clippy::needless_range_loop)]
            for k in 0..grad.len() {
                let orig = m.slices_mut()[a][k];
                m.slices_mut()[a][k] = orig + eps;
                let lp = m.loss_from(&xs, &ys, &ws, &h0, &c0);
                m.slices_mut()[a][k] = orig - eps;
                let lm = m.loss_from(&xs, &ys, &ws, &h0, &c0);
                m.slices_mut()[a][k] = orig;
                let num = (lp - lm) / (2.0 * eps);
                let err = (num - grad[k]).abs() / (num.abs() + grad[k].abs()).max(1e-6);
                worst = worst.max(err);
            }
        }
        assert!(worst < 1e-4, "worst relative gradient error {worst}");
    }

    #[test]
    fn adam_learns_a_sequence_rule_and_state_round_trips() {
        // Target: whether the previous step's first feature was positive (needs memory).
        let mut r = Rng::new(3);
        let (b, t) = (32, 6);
        let xs = Array3::from_shape_fn((b, t, 2), |_| r.unit() * 2.0 - 1.0);
        let ys = Array2::from_shape_fn((b, t), |(i, k)| {
            if k == 0 {
                0.0
            } else {
                f64::from(xs[[i, k - 1, 0]] > 0.0)
            }
        });
        let ws = Array2::ones((b, t));
        let mut m = Lstm::new(2, 8, 5);
        let mut opt = Adam::new(&m, 0.03, 5.0);
        let l0 = m.loss(&xs, &ys, &ws);
        for _ in 0..150 {
            let (_, mut g) = m.loss_and_grads(&xs, &ys, &ws);
            opt.step(&mut m, &mut g);
        }
        let l1 = m.loss(&xs, &ys, &ws);
        assert!(l1 < 0.5 * l0, "loss {l0} -> {l1}");
        let fast = FastLstm::from_model(&m);
        let y = m.forward(&xs);
        for r in 0..4 {
            let rows: Vec<Vec<f32>> = (0..t)
                .map(|k| (0..2).map(|f| xs[[r, k, f]] as f32).collect())
                .collect();
            let yf = fast.run(rows.iter().map(|v| v.as_slice()));
            assert!((f64::from(yf) - y[[r, t - 1]]).abs() < 1e-3);
            let (mut h, mut c) = (vec![0f32; 8], vec![0f32; 8]);
            let mut ys_step = 0.0;
            for row in &rows {
                ys_step = fast.step(row, &mut h, &mut c);
            }
            assert!((ys_step - yf).abs() < 1e-5);
        }
        let mut buf = Vec::new();
        m.save(9, &mut buf);
        let (seq, back) = Lstm::load(&buf).unwrap();
        assert_eq!(seq, 9);
        assert_eq!(back, m);
        buf[30] ^= 1;
        assert!(Lstm::load(&buf).is_err());
    }
}
