//! Partitions and placement: which run of granules belongs on which tier.
//!
//! Cost-benefit of moving partition p from tier s to tier d, per window:
//! - benefit = predicted accesses of p per window × horizon windows ×
//!   (latency of s − latency of d) in µs;
//! - cost = the copy's device time (bytes / bandwidth of the slower of s, d)
//!   in µs, plus the capacity cost difference (cost_per_gib_month of d − s) ×
//!   GiB × horizon, weighted by [`DOLLAR_US`] µs per dollar.
//!
//! Cold placement on an object tier ([`cold_moves`]) compares dollars over
//! [`COLD_HORIZON_WINDOWS`]: capacity, request prices (`cost_per_1k_get`,
//! `cost_per_1k_put`), the latency of predicted accesses and the copy time.
//!
//! A move happens only when benefit > cost, and a promotion that must evict
//! a resident partition must beat that partition's predicted heat by the
//! hysteresis factor. A partition that moved stays for `min_residence_windows`.

use serde::Serialize;

use super::{PlanTier, PolicyKind};
use crate::heat::HeatMap;
use crate::volume::journal::META_BYTES;
use crate::volume::Volume;

/// How many µs of saved device time one dollar of capacity cost is worth.
pub const DOLLAR_US: f64 = 1e7;
/// Largest partition (in granules) that warm neighbours merge into: 4 MiB.
pub const WARM_MERGE_GRANULES_MAX: u64 = 64;
/// Predicted accesses per window (per granule) by which a promotion must beat the
/// resident it displaces, on top of the relative hysteresis: near the fast tier's
/// boundary both are estimates of rates around 0.1 per window, noise that would
/// otherwise swap them back and forth.
pub const SWAP_MARGIN: f64 = 0.2;
/// Windows a move's benefit is counted over.
pub const HORIZON_WINDOWS: f64 = 30.0;

#[derive(Clone, Debug)]
pub struct Params {
    pub kind: PolicyKind,
    pub chunk_min_granules: u64,
    pub chunk_max_granules: u64,
    pub initial_granules: u64,
    pub min_residence_windows: u64,
    pub hysteresis: f64,
    pub fast_watermark: f64,
    pub budget_bytes: u64,
    pub granule_bytes: u64,
}

/// One planned migration.
#[derive(Clone, Debug, Serialize)]
pub struct Move {
    pub volume: usize,
    pub first_granule: u64,
    pub count: u64,
    pub from_tier: u8,
    pub to_tier: u8,
    /// Higher first: predicted accesses per window per granule (demotions that
    /// make room inherit the priority of the promotion they serve).
    pub priority: f64,
    /// When the first access is predicted, in ms from now.
    pub deadline_ms: f64,
}

/// Heat classes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Class {
    Hot,
    Warm,
    Cold,
}

/// A partition as RPC shows it.
#[derive(Clone, Debug, Serialize)]
pub struct PartitionView {
    pub offset: u64,
    pub length: u64,
    pub tier: Option<u8>,
    pub class: Class,
    /// Predicted accesses in the next window.
    pub predicted: f64,
    /// Confidence of the class, 0..1.
    pub confidence: f64,
}

#[derive(Clone, Copy, Debug)]
struct Partition {
    first: u64,
    count: u64,
    moved_window: u64,
}

pub struct VolumeState {
    /// Predicted accesses per granule in the next window.
    pred: Vec<f64>,
    /// Fast EWMA (weight raised during bursts) and slow EWMA (about 10 windows).
    short: Vec<f64>,
    long: Vec<f64>,
    last_access: Vec<u64>,
    windows_active: Vec<u8>,
    parts: Vec<Partition>,
    totals: VecDeque<f64>,
    burst_weight: f64,
}

use std::collections::VecDeque;

impl VolumeState {
    /// Per granule: the window of its latest access.
    pub fn last_access(&self) -> &[u64] {
        &self.last_access
    }

    pub fn new(granules: u64, initial: u64) -> VolumeState {
        let initial = initial.max(1);
        let parts = (0..granules.div_ceil(initial))
            .map(|i| Partition {
                first: i * initial,
                count: initial.min(granules - i * initial),
                moved_window: 0,
            })
            .collect();
        VolumeState {
            pred: vec![0.0; granules as usize],
            short: vec![0.0; granules as usize],
            long: vec![0.0; granules as usize],
            last_access: vec![0; granules as usize],
            windows_active: vec![0; granules as usize],
            parts,
            totals: VecDeque::new(),
            burst_weight: 0.5,
        }
    }

    /// Folds one window of heat into the prediction. Returns whether the
    /// window was an anomalous burst (residual z-score above 3).
    pub fn observe(&mut self, map: &HeatMap, window: u64) -> bool {
        let n = self.pred.len().min(map.partitions());
        let total: f64 = (0..n).map(|g| (map.reads[g] + map.writes[g]) as f64).sum();
        let burst = if self.totals.len() >= 5 {
            let mean = self.totals.iter().sum::<f64>() / self.totals.len() as f64;
            let var = self.totals.iter().map(|t| (t - mean).powi(2)).sum::<f64>()
                / self.totals.len() as f64;
            (total - mean) / var.sqrt().max(1.0) > 3.0
        } else {
            false
        };
        if self.totals.len() == 30 {
            self.totals.pop_front();
        }
        self.totals.push_back(total);
        // A burst raises the weight of the newest window for a while.
        self.burst_weight = if burst {
            0.9
        } else {
            (self.burst_weight * 0.8 + 0.5 * 0.2).max(0.5)
        };
        let w = self.burst_weight;
        for g in 0..n {
            let now = (map.reads[g] + map.writes[g]) as f64;
            let prev = map.recent(g, 1) as f64;
            // The slow average finds a sparse but steady hot set (zipf tails);
            // the fast one and the trend react to a shifting one.
            let trend = (now - prev).max(0.0) * 0.5;
            self.short[g] = self.short[g] * (1.0 - w) + now * w;
            self.long[g] = self.long[g] * 0.9 + now * 0.1;
            self.pred[g] = 0.5 * self.short[g] + 0.5 * self.long[g] + trend;
            if now > 0.0 {
                self.last_access[g] = window;
                self.windows_active[g] = (self.windows_active[g] << 1) | 1;
            } else {
                self.windows_active[g] <<= 1;
            }
        }
        burst
    }

    fn heat(&self, first: u64, count: u64) -> f64 {
        self.pred[first as usize..(first + count) as usize]
            .iter()
            .sum()
    }

    fn tier_of(vol: &Volume, first: u64, count: u64) -> Option<u8> {
        let t = vol.map.get(first)?.tier;
        (first..first + count)
            .all(|g| vol.map.get(g).is_some_and(|l| l.tier == t))
            .then_some(t)
    }

    /// Splits uneven partitions and merges even neighbours. Returns (splits, merges).
    ///
    /// - Split (repeatedly, down to `chunk_min`) when some granule predicts at
    ///   least 0.05 accesses per window and either it predicts at least 4x the
    ///   partition's mean or one half predicts over 3x the other, so a hot
    ///   64 KiB inside a cold chunk can move alone.
    /// - Merge buddies (equal size, aligned, same tier): both cold (under 0.01
    ///   predicted accesses per granule) up to `chunk_max`, or both warm with
    ///   heat within 2x of each other up to [`WARM_MERGE_GRANULES_MAX`].
    pub fn repartition(&mut self, vol: &Volume, p: &Params) -> (u64, u64) {
        let mut splits = 0;
        let mut out: Vec<Partition> = Vec::with_capacity(self.parts.len());
        let mut work: Vec<Partition> = std::mem::take(&mut self.parts);
        work.reverse();
        while let Some(part) = work.pop() {
            if part.count >= 2 * p.chunk_min_granules && part.count % 2 == 0 {
                let range = part.first as usize..(part.first + part.count) as usize;
                let max = self.pred[range.clone()].iter().cloned().fold(0.0, f64::max);
                let half = part.count / 2;
                let left = self.heat(part.first, half);
                let right = self.heat(part.first + half, half);
                // Uneven: the hottest granule predicts at least 4x the mean (a few hot
                // granules scattered in a cold chunk, as a hashed zipf makes), or one
                // half holds over three quarters of the heat (one hot granule of two).
                let concentrated = max * part.count as f64 >= 4.0 * (left + right) * (1.0 - 1e-9);
                if max >= 0.05 && (concentrated || left.max(right) > 3.0 * left.min(right)) {
                    work.push(Partition {
                        first: part.first + half,
                        count: half,
                        ..part
                    });
                    work.push(Partition {
                        first: part.first,
                        count: half,
                        ..part
                    });
                    splits += 1;
                    continue;
                }
            }
            out.push(part);
        }
        let mut merges = 0;
        let mut merged: Vec<Partition> = Vec::with_capacity(out.len());
        let mut i = 0;
        while i < out.len() {
            let a = out[i];
            if i + 1 < out.len() {
                let b = out[i + 1];
                let size = a.count + b.count;
                let buddies =
                    a.count == b.count && a.first % size == 0 && b.first == a.first + a.count;
                if buddies && size <= p.chunk_max_granules {
                    let (ha, hb) = (self.heat(a.first, a.count), self.heat(b.first, b.count));
                    let cold = ha < 0.01 * a.count as f64 && hb < 0.01 * b.count as f64;
                    let warm_similar =
                        size <= WARM_MERGE_GRANULES_MAX && ha.max(hb) <= 2.0 * ha.min(hb);
                    let ta = Self::tier_of(vol, a.first, a.count);
                    if (cold || warm_similar)
                        && ta.is_some()
                        && ta == Self::tier_of(vol, b.first, b.count)
                    {
                        merged.push(Partition {
                            first: a.first,
                            count: size,
                            moved_window: a.moved_window.max(b.moved_window),
                        });
                        merges += 1;
                        i += 2;
                        continue;
                    }
                }
            }
            merged.push(a);
            i += 1;
        }
        self.parts = merged;
        (splits, merges)
    }

    /// Records that `[first, first+count)` moved in `window`.
    pub fn moved(&mut self, first: u64, count: u64, window: u64) {
        for part in self
            .parts
            .iter_mut()
            .filter(|x| x.first < first + count && first < x.first + x.count)
        {
            part.moved_window = window;
        }
    }

    fn classify(&self, density: f64, hot: f64) -> (Class, f64) {
        if density >= hot {
            (Class::Hot, (density / hot / 2.0).clamp(0.5, 1.0))
        } else if density >= hot / 8.0 && density > 0.0 {
            (Class::Warm, 0.5)
        } else {
            (Class::Cold, if density == 0.0 { 1.0 } else { 0.6 })
        }
    }

    /// Partitions with their class, for RPC.
    pub fn view(&self, vol: &Volume) -> Vec<PartitionView> {
        let g = vol.map.granule_bytes;
        let mut d: Vec<f64> = self
            .parts
            .iter()
            .map(|x| self.heat(x.first, x.count) / x.count as f64)
            .collect();
        d.sort_by(|a, b| b.total_cmp(a));
        let hot = d.get(d.len() / 10).copied().unwrap_or(0.0).max(1e-9);
        self.parts
            .iter()
            .map(|x| {
                let h = self.heat(x.first, x.count);
                let (class, confidence) = self.classify(h / x.count as f64, hot);
                PartitionView {
                    offset: x.first * g,
                    length: x.count * g,
                    tier: Self::tier_of(vol, x.first, x.count),
                    class,
                    predicted: h,
                    confidence,
                }
            })
            .collect()
    }
}

/// Computes this window's moves for one volume.
pub fn plan(
    vi: usize,
    vol: &Volume,
    st: &VolumeState,
    tiers: &[PlanTier],
    p: &Params,
    window: u64,
) -> Vec<Move> {
    if tiers.len() < 2 {
        return Vec::new();
    }
    let g = p.granule_bytes;
    let fast = &tiers[0];
    let cap = fast
        .usage
        .capacity_bytes
        .load(std::sync::atomic::Ordering::Relaxed) as f64;
    let used = fast
        .usage
        .used_bytes
        .load(std::sync::atomic::Ordering::Relaxed) as f64;
    let usable = (cap * p.fast_watermark - META_BYTES as f64).max(0.0);
    let mut free = usable - (used - META_BYTES as f64);
    let resident_ok = |part: &Partition| window >= part.moved_window + p.min_residence_windows;
    // Candidates for promotion: mapped partitions not (entirely) on the fast tier.
    let mut promote: Vec<(f64, Partition, u8)> = Vec::new();
    // Residents that could make room, coldest first.
    let mut residents: Vec<(f64, Partition)> = Vec::new();
    for part in &st.parts {
        let tier = VolumeState::tier_of(vol, part.first, part.count);
        let heat = st.heat(part.first, part.count);
        let score = match p.kind {
            PolicyKind::Kiln => heat,
            // Recency: the window of the latest access, ties by heat.
            PolicyKind::DemandLru => {
                let last = (part.first..part.first + part.count)
                    .map(|x| st.last_access[x as usize])
                    .max()
                    .unwrap_or(0);
                last as f64 * 1e6 + heat
            }
            PolicyKind::S3fifo => heat,
            PolicyKind::Static => return Vec::new(),
        };
        match tier {
            Some(0) => residents.push((score, *part)),
            Some(t) => {
                let accessed = st.last_access
                    [part.first as usize..(part.first + part.count) as usize]
                    .contains(&window);
                let eligible = match p.kind {
                    PolicyKind::Kiln => heat > 0.0,
                    PolicyKind::DemandLru => accessed,
                    PolicyKind::S3fifo => {
                        accessed
                            && (part.first..part.first + part.count)
                                .any(|x| st.windows_active[x as usize].count_ones() >= 2)
                    }
                    PolicyKind::Static => false,
                };
                if eligible {
                    promote.push((score, *part, t));
                }
            }
            None => {}
        }
    }
    promote.sort_by(|a, b| (b.0 / b.1.count as f64).total_cmp(&(a.0 / a.1.count as f64)));
    match p.kind {
        // S3-FIFO evicts in insertion order: oldest promotion first, unless still active.
        PolicyKind::S3fifo => residents
            .sort_by_key(|(_, x)| (st.windows_active[x.first as usize] & 1, x.moved_window)),
        _ => {
            residents.sort_by(|a, b| (a.0 / a.1.count as f64).total_cmp(&(b.0 / b.1.count as f64)))
        }
    }
    let mut moves = Vec::new();
    let mut victim = 0usize;
    let mut budget = p.budget_bytes as f64;
    for (score, part, from) in promote {
        if p.kind == PolicyKind::Kiln && !resident_ok(&part) {
            continue;
        }
        let bytes = (part.count * g) as f64;
        let density = score / part.count as f64;
        if p.kind == PolicyKind::Kiln {
            let src = &tiers[from as usize];
            let saved_us = src.read_latency_us.saturating_sub(fast.read_latency_us) as f64;
            let benefit = st.heat(part.first, part.count) * HORIZON_WINDOWS * saved_us;
            let bw = src.bandwidth_mib_s.min(fast.bandwidth_mib_s).max(1) as f64 * (1 << 20) as f64;
            let copy_us = bytes / bw * 1e6;
            let months = HORIZON_WINDOWS * 1.0 / (30.0 * 24.0 * 3600.0);
            let dollars = (fast.cost_per_gib_month - src.cost_per_gib_month) * bytes
                / (1u64 << 30) as f64
                * months;
            if benefit <= copy_us + dollars * DOLLAR_US {
                continue;
            }
        }
        // Displacing a resident takes evidence, not one access: the partition must
        // have been read or written in at least two of the last eight windows. A
        // single access in a zipf tail predicts a lot for one window (the trend term)
        // and then nothing, and would churn the boundary of the fast tier.
        if p.kind == PolicyKind::Kiln
            && free < bytes
            && !(part.first..part.first + part.count)
                .any(|x| st.windows_active[x as usize].count_ones() >= 2)
        {
            continue;
        }
        // Make room by demoting the coldest residents that this partition beats.
        let mut demotions = Vec::new();
        let mut room = free;
        let mut v = victim;
        while room < bytes && v < residents.len() {
            let (rs, rp) = residents[v];
            let r_density = rs / rp.count as f64;
            let beats = match p.kind {
                PolicyKind::Kiln => {
                    resident_ok(&rp) && density > r_density * (1.0 + p.hysteresis) + SWAP_MARGIN
                }
                _ => window > rp.moved_window && density > r_density,
            };
            if !beats {
                break;
            }
            demotions.push(rp);
            room += (rp.count * g) as f64;
            v += 1;
        }
        if room < bytes {
            break;
        }
        let cost: f64 = bytes + demotions.iter().map(|d| (d.count * g) as f64).sum::<f64>();
        if cost > budget {
            break;
        }
        budget -= cost;
        victim = v;
        free = room - bytes;
        let rate = density.max(1e-9);
        for d in demotions {
            moves.push(Move {
                volume: vi,
                first_granule: d.first,
                count: d.count,
                from_tier: 0,
                to_tier: 1,
                priority: rate + 1e-6,
                deadline_ms: 0.0,
            });
        }
        moves.push(Move {
            volume: vi,
            first_granule: part.first,
            count: part.count,
            from_tier: from,
            to_tier: 0,
            priority: rate,
            deadline_ms: 1000.0 / rate.max(1e-3),
        });
    }
    if p.kind == PolicyKind::Kiln {
        moves.extend(cold_moves(vi, vol, st, tiers, p, window, budget));
    }
    moves
}

/// Windows over which cold placement is judged (30 days of 1 s windows):
/// data sits on an object tier for a long time, so its capacity saving is
/// counted over a longer horizon than a promotion's benefit.
pub const COLD_HORIZON_WINDOWS: f64 = 30.0 * 86_400.0;
/// The price of one second of background copy (device and network time off
/// the foreground path): about what a small instance costs per second.
pub const BACKGROUND_DOLLAR_PER_S: f64 = 1e-4;

/// The dollar cost over [`COLD_HORIZON_WINDOWS`] of keeping a partition on
/// `tier` (coming from `src`): capacity (`cost_per_gib_month`), the requests
/// its predicted accesses make (`cost_per_1k_get` each, `cost_per_1k_put`
/// per object to put it there), the latency of those accesses (µs at
/// [`DOLLAR_US`]), and the copy (bytes over the slower bandwidth, at
/// [`BACKGROUND_DOLLAR_PER_S`]).
pub fn placement_cost(
    tier: &PlanTier,
    src: &PlanTier,
    bytes: f64,
    accesses: f64,
    objects: f64,
) -> f64 {
    let months = COLD_HORIZON_WINDOWS / (30.0 * 24.0 * 3600.0);
    let capacity = tier.cost_per_gib_month * bytes / (1u64 << 30) as f64 * months;
    let requests =
        accesses * tier.cost_per_1k_get / 1000.0 + objects * tier.cost_per_1k_put / 1000.0;
    let latency_us = accesses * tier.read_latency_us as f64;
    let bw = tier.bandwidth_mib_s.min(src.bandwidth_mib_s).max(1) as f64 * (1 << 20) as f64;
    let copy_s = if std::ptr::eq(tier, src) {
        0.0
    } else {
        bytes / bw
    };
    capacity + requests + latency_us / DOLLAR_US + copy_s * BACKGROUND_DOLLAR_PER_S
}

/// Demotions to object tiers that pay: the partition costs less there over
/// [`COLD_HORIZON_WINDOWS`] than where it is, counting request prices,
/// latency and the copy as well as capacity. A degraded object tier takes nothing.
fn cold_moves(
    vi: usize,
    vol: &Volume,
    st: &VolumeState,
    tiers: &[PlanTier],
    p: &Params,
    window: u64,
    mut budget: f64,
) -> Vec<Move> {
    let g = p.granule_bytes;
    let span = crate::bdev::object::OBJECT_SPAN_GRANULES;
    let mut moves = Vec::new();
    for part in &st.parts {
        let Some(from) = VolumeState::tier_of(vol, part.first, part.count) else {
            continue;
        };
        let src = &tiers[from as usize];
        if src.object.is_some() || window < part.moved_window + p.min_residence_windows {
            continue;
        }
        let bytes = (part.count * g) as f64;
        let accesses = st.heat(part.first, part.count) * COLD_HORIZON_WINDOWS;
        let stay = placement_cost(src, src, bytes, accesses, 0.0);
        let best = tiers
            .iter()
            .enumerate()
            .filter(|(_, t)| t.object.as_ref().is_some_and(|o| !o.is_degraded()))
            .map(|(i, t)| {
                let objects = part.count.div_ceil(span) as f64;
                (i, placement_cost(t, src, bytes, accesses, objects))
            })
            .min_by(|a, b| a.1.total_cmp(&b.1));
        if let Some((to, cost)) = best {
            if cost < stay && bytes <= budget {
                budget -= bytes;
                moves.push(Move {
                    volume: vi,
                    first_granule: part.first,
                    count: part.count,
                    from_tier: from,
                    to_tier: to as u8,
                    priority: 0.0,
                    deadline_ms: 0.0,
                });
            }
        }
    }
    moves
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tier(cost: f64, get: f64, put: f64, latency_us: u64) -> PlanTier {
        PlanTier {
            name: "t".into(),
            read_latency_us: latency_us,
            write_latency_us: latency_us,
            bandwidth_mib_s: 100,
            cost_per_gib_month: cost,
            usage: Default::default(),
            cost_per_1k_get: get,
            cost_per_1k_put: put,
            object: None,
        }
    }

    #[test]
    fn cold_data_pays_on_the_object_tier_and_hot_data_does_not() {
        let capacity = tier(0.02, 0.0, 0.0, 2000);
        let s3 = tier(0.004, 0.0004, 0.005, 20_000);
        let bytes = (64u64 << 20) as f64;
        let stay = |acc: f64| placement_cost(&capacity, &capacity, bytes, acc, 0.0);
        let go = |acc: f64| placement_cost(&s3, &capacity, bytes, acc, 1.0);
        // Untouched for a month: the capacity saving beats one PUT and the copy.
        assert!(go(0.0) < stay(0.0), "{} vs {}", go(0.0), stay(0.0));
        // Read ten times a second: GETs and 18 ms more per read make it a loss.
        let hot = 10.0 * COLD_HORIZON_WINDOWS;
        assert!(go(hot) > stay(hot), "{} vs {}", go(hot), stay(hot));
        // With free requests but the same latency, a tier that costs more never pays.
        let dear = tier(0.05, 0.0, 0.0, 20_000);
        assert!(placement_cost(&dear, &capacity, bytes, 0.0, 1.0) > stay(0.0));
    }
}
