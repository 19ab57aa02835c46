//! Tiered volumes: a logical LBA space mapped in chunks to (tier, offset).
//!
//! - [`extent_map`]: the lock-free map reactors read on every I/O.
//! - [`allocator`]: free space per tier, used only by the metadata service.
//! - [`journal`]: the write-ahead journal, checkpoints, recovery, and the
//!   metadata service thread that performs every map change.

pub mod allocator;
pub mod epoch;
pub mod extent_map;
pub mod io;
pub mod journal;
pub mod tier_registry;

use std::sync::atomic::{AtomicU64, Ordering};

use extent_map::ExtentMap;

/// Per-volume I/O counters (relaxed atomics, for RPC iostat).
#[derive(Default, Debug)]
pub struct VolumeStats {
    pub read_ios: AtomicU64,
    pub read_bytes: AtomicU64,
    pub write_ios: AtomicU64,
    pub write_bytes: AtomicU64,
    pub other_ios: AtomicU64,
    pub errors: AtomicU64,
    pub read_latency_ns_total: AtomicU64,
    pub write_latency_ns_total: AtomicU64,
}

impl VolumeStats {
    pub fn snapshot(&self) -> serde_json::Value {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        serde_json::json!({
            "read_ios": l(&self.read_ios),
            "read_bytes": l(&self.read_bytes),
            "write_ios": l(&self.write_ios),
            "write_bytes": l(&self.write_bytes),
            "other_ios": l(&self.other_ios),
            "errors": l(&self.errors),
            "read_latency_us_mean": l(&self.read_latency_ns_total) as f64 / 1000.0 / l(&self.read_ios).max(1) as f64,
            "write_latency_us_mean": l(&self.write_latency_ns_total) as f64 / 1000.0 / l(&self.write_ios).max(1) as f64,
        })
    }
}

pub struct Volume {
    pub id: usize,
    pub name: String,
    pub size_bytes: u64,
    /// Allocation unit for new data (a partition's initial size).
    pub chunk_bytes: u64,
    pub map: ExtentMap,
    pub stats: VolumeStats,
}

impl Volume {
    pub fn new(id: usize, name: &str, size_bytes: u64, chunk_bytes: u64) -> Volume {
        assert!(chunk_bytes % journal::GRANULE_BYTES == 0 && size_bytes % chunk_bytes == 0);
        Volume {
            id,
            name: name.to_string(),
            size_bytes,
            chunk_bytes,
            map: ExtentMap::new(size_bytes, journal::GRANULE_BYTES),
            stats: VolumeStats::default(),
        }
    }

    /// Whether every granule of the range is mapped.
    pub fn is_mapped(&self, offset: u64, len: u64) -> bool {
        let g = self.map.granule_bytes;
        (offset / g..(offset + len).div_ceil(g)).all(|x| self.map.get(x).is_some())
    }
}
