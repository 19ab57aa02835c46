//! The synchronous demand path: policy `demand-lru` with `demand_promotion = "sync"`,
//! the classic cache-like baseline of the tiering policies.
//!
//! A read that finds any of its granules on a slower block tier is parked by its
//! reactor (`VolumeIo::promote_then_dispatch`) and sent to the policy thread as a
//! [`PromoteRequest`] with `read` set. The policy thread drains every pending
//! request at once and promotes all their granules to tier 0 in one batch (one
//! lock/grace round, one flush, one journal commit: concurrent misses share the
//! cost). When tier 0 has no room it first demotes the least recently used
//! granules of the volume (at least [`EVICT_MIN_GRANULES`], so that a run of
//! misses does not pay one eviction round each). The parked reads are then
//! dispatched again and served from the new copy; a read whose promotion failed
//! is served from wherever its data is, so the demand path never fails a read.
//!
//! Recency is a logical clock the policy thread advances per promotion round
//! and per window fold: a granule's time is that of its latest promotion or of
//! the latest fold that saw it accessed, so a granule just promoted is not the
//! next victim.

use super::Migrator;
use crate::volume::extent_map::Location;

/// Granules demoted at least per eviction round (1 MiB of 64 KiB granules).
pub const EVICT_MIN_GRANULES: u64 = 16;

impl Migrator {
    /// Promotes to tier 0 every granule of the byte `ranges` of volume `volume` that
    /// sits on a slower block tier, making room by demoting the least recently used
    /// granules of tier 0 (by `recent`, the logical time of each granule's latest use)
    /// when the tier is full; the promoted granules' time becomes `now`. Returns the
    /// bytes promoted.
    pub fn promote_for_reads(
        &mut self,
        volume: usize,
        ranges: &[(u64, u64)],
        recent: &mut [u64],
        now: u64,
    ) -> Result<u64, String> {
        let vol = self.volume(volume);
        let g = vol.map.granule_bytes;
        let mut want: Vec<u64> = ranges
            .iter()
            .flat_map(|&(offset, len)| offset / g..(offset + len).div_ceil(g))
            .filter(|&x| {
                vol.map
                    .get(x)
                    .is_some_and(|l| l.tier != 0 && self.object_tier(l.tier).is_none())
            })
            .collect();
        want.sort_unstable();
        want.dedup();
        if want.is_empty() {
            return Ok(0);
        }
        let runs = self.runs_of_granules(volume, &want, 0);
        let need: u64 = runs.iter().map(|r| r.1).sum();
        let moved = match self.migrate_batch(volume, &runs, 0) {
            Ok(bytes) => bytes,
            Err(first) => {
                // Most likely a full tier 0: evict, then try once more.
                self.evict_lru(volume, need.max(EVICT_MIN_GRANULES), &want, recent)
                    .map_err(|e| format!("{first}; eviction: {e}"))?;
                let runs = self.runs_of_granules(volume, &want, 0);
                self.migrate_batch(volume, &runs, 0)?
            }
        };
        for &x in &want {
            if let Some(r) = recent.get_mut(x as usize) {
                *r = (*r).max(now);
            }
        }
        Ok(moved)
    }

    /// Demotes the `n` least recently used granules of volume `volume` on tier 0 (not
    /// those in `keep`, sorted) to the next block tier, in one batch.
    fn evict_lru(
        &mut self,
        volume: usize,
        n: u64,
        keep: &[u64],
        recent: &[u64],
    ) -> Result<(), String> {
        let to = (1..self.tiers.len() as u8)
            .find(|&t| self.object_tier(t).is_none())
            .ok_or("no slower block tier to evict to")?;
        let vol = self.volume(volume);
        let mut residents: Vec<u64> = (0..vol.map.granules())
            .filter(|&x| vol.map.get(x).is_some_and(|l| l.tier == 0))
            .filter(|x| keep.binary_search(x).is_err())
            .collect();
        let n = (n as usize).min(residents.len());
        if n == 0 {
            return Err("tier 0 holds nothing to evict".into());
        }
        let age = |x: &u64| recent.get(*x as usize).copied().unwrap_or(0);
        residents.select_nth_unstable_by_key(n - 1, age);
        residents.truncate(n);
        residents.sort_unstable();
        let runs = self.runs_of_granules(volume, &residents, to);
        self.migrate_batch(volume, &runs, to).map(|_| ())
    }

    /// The runs (contiguous in the volume and on their source tier) of the sorted
    /// `granules` not already on `to_tier`.
    fn runs_of_granules(
        &self,
        volume: usize,
        granules: &[u64],
        to_tier: u8,
    ) -> Vec<(u64, u64, Location)> {
        let mut runs = Vec::new();
        let mut i = 0;
        while i < granules.len() {
            let mut j = i + 1;
            while j < granules.len() && granules[j] == granules[j - 1] + 1 {
                j += 1;
            }
            let (first, last) = (granules[i], granules[j - 1]);
            runs.extend(self.runs_to_move(volume, first, last - first + 1, to_tier));
            i = j;
        }
        runs
    }
}
