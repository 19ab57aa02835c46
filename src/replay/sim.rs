//! The virtual-time replay harness: runs one [`Policy`] over a [`Trace`], no devices.

use super::policy::Policy;
use super::trace::Trace;
use serde::Serialize;

/// Modelled service latency per request of each tier.
#[derive(Debug, Clone, Copy)]
pub struct TierLatency {
    pub fast_us: f64,
    pub capacity_us: f64,
}

/// Result of one replay.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ReplayReport {
    pub policy: String,
    pub fast_ratio: f64,
    pub fast_pages: u64,
    pub requests: u64,
    pub unique_pages: u64,
    pub misses: u64,
    pub miss_ratio: f64,
    pub pages_migrated: u64,
    pub bytes_migrated: u64,
    pub latency_us_mean: f64,
    pub latency_us_p99: f64,
}

/// Fast-tier size in pages for a ratio of the working set (libCacheSim truncates).
pub fn fast_pages_for(unique_pages: usize, fast_ratio: f64) -> usize {
    assert!(
        fast_ratio > 0.0 && fast_ratio <= 1.0,
        "fast ratio must be in (0, 1]"
    );
    ((unique_pages as f64 * fast_ratio) as usize).max(2)
}

/// Replays `trace` through `policy`. A request hits only when all its pages are on the fast
/// tier when it arrives. `progress` is called every 65536 requests with the request index.
pub fn replay(
    trace: &Trace,
    policy: &mut dyn Policy,
    fast_ratio: f64,
    lat: TierLatency,
    progress: &mut dyn FnMut(usize),
) -> ReplayReport {
    let n_req = trace.requests();
    let mut misses = 0u64;
    let mut migrated = 0u64;
    let mut pos = 0usize;
    for r in 0..n_req {
        let pages = trace.request(r);
        let hit = pages.iter().all(|&p| policy.contains(p));
        for &p in pages {
            migrated += u64::from(policy.access(p, pos));
            pos += 1;
        }
        migrated += policy.after_request(trace, r);
        misses += u64::from(!hit);
        if r & 0xffff == 0 {
            progress(r);
        }
    }
    assert_eq!(pos, trace.pages.len());
    let miss_ratio = misses as f64 / n_req.max(1) as f64;
    let mean = lat.fast_us * (1.0 - miss_ratio) + lat.capacity_us * miss_ratio;
    // p99 of a two-point distribution: the slow tier as soon as more than 1% of requests miss.
    let p99 = if misses * 100 > n_req as u64 {
        lat.capacity_us
    } else {
        lat.fast_us
    };
    ReplayReport {
        policy: policy.name().to_string(),
        fast_ratio,
        fast_pages: fast_pages_for(trace.unique_pages(), fast_ratio) as u64,
        requests: n_req as u64,
        unique_pages: trace.unique_pages() as u64,
        misses,
        miss_ratio,
        pages_migrated: migrated,
        bytes_migrated: migrated * super::trace::PAGE_BYTES,
        latency_us_mean: mean,
        latency_us_p99: p99,
    }
}
