//! Moves to and from an object-storage tier (see [`crate::bdev::object`]).
//!
//! Demotion of a run (granules `[g, g+n)` at P on a block tier) is done one
//! object at a time, each object at most `OBJECT_SPAN_GRANULES`:
//! 1. Reserve a fresh generation on the object tier (never used before).
//! 2. Lock the granules (writes wait; reads keep using P), wait a grace period.
//! 3. Read P, build the object (header with a crc32c per 64 KiB, then the
//!    data), PUT it (multipart when large), GET it back and check it.
//! 4. Switch: one journaled `Map` record points the granules at the object.
//! 5. Grace, unlock, grace, release P.
//!
//! A crash before 4's commit leaves the map on P and, at worst, a garbage
//! object no map entry names; `tier_gc` deletes it. The lock stays on through
//! the switch because an object cannot take shadow writes.
//!
//! Promotion uses the ordinary engine (reads through the tier's channel are
//! ranged GETs). Writes never reach an object tier: the volume layer sends a
//! [`PromoteRequest`] and retries the write once the data is on a block tier.

use std::time::Instant;

use crossbeam_channel::Sender;

use super::{MigrateError, Migrator};
use crate::bdev::object::{ObjectHeader, ObjectTier, HEADER_BYTES, OBJECT_SPAN_GRANULES};
use crate::bdev::IoRequest;
use crate::crashpoint::crashpoint;
use crate::volume::extent_map::{Location, Migration};
use crate::volume::journal::{MetaRequest, GRANULE_BYTES};

const _: () = assert!(GRANULE_BYTES == crate::bdev::object::CRC_BLOCK_BYTES);

/// A write found object-resident data in its range: promote it, then reply
/// 0 (the write is retried) or a negative errno (the write fails). Or, with
/// `read`, a read under the synchronous demand policy found data off the
/// fastest tier: promote it there (evicting the least recently used), then
/// reply 0 (the read is served from the new copy) or a negative errno (the
/// read is served from where the data is).
pub struct PromoteRequest {
    pub volume: usize,
    pub offset_bytes: u64,
    pub len_bytes: u64,
    pub read: bool,
    pub reply: Box<dyn FnOnce(i32) + Send>,
}

/// What one garbage collection of an object tier did.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct GcReport {
    pub listed: u64,
    pub deleted: u64,
}

/// Deletes the objects of tier `tier` that no map entry and no reservation
/// names. Safe at any time: generations are never reused, so an object found
/// free stays garbage forever.
pub fn tier_gc(
    object: &ObjectTier,
    tier: u8,
    meta_tx: &Sender<MetaRequest>,
) -> Result<GcReport, String> {
    let gens = object.list_blocking()?;
    let listed = gens.len() as u64;
    let (tx, rx) = crossbeam_channel::bounded(1);
    meta_tx
        .send(MetaRequest::ObjectGarbage {
            tier,
            gens,
            reply: tx,
        })
        .map_err(|_| "metadata service stopped".to_string())?;
    let dead = rx
        .recv_timeout(std::time::Duration::from_secs(60))
        .map_err(|_| "metadata service did not answer".to_string())?;
    let deleted = if dead.is_empty() {
        0
    } else {
        tracing::info!(tier = %object.tier_name(), count = dead.len(), "tier_gc: deleting objects no map entry names");
        crashpoint("object.gc.before_delete");
        let n = object.delete_blocking(dead)?;
        crashpoint("object.gc.after_delete");
        n
    };
    Ok(GcReport { listed, deleted })
}

impl Migrator {
    /// The object tier behind tier `t`, if it is one.
    pub fn object_tier(&self, t: u8) -> Option<std::sync::Arc<ObjectTier>> {
        self.tiers
            .get(t as usize)
            .and_then(|x| x.device.object_tier())
    }

    /// Garbage-collects every object tier (the policy thread's periodic task).
    pub fn gc_object_tiers(&self) -> Vec<(String, Result<GcReport, String>)> {
        (0..self.tiers.len() as u8)
            .filter_map(|t| {
                let o = self.object_tier(t)?;
                Some((
                    self.tiers[t as usize].name.clone(),
                    tier_gc(&o, t, &self.meta_tx),
                ))
            })
            .collect()
    }

    /// Demotes granules `[first, first+count)` of a volume (all mapped, on
    /// block tiers, in any number of physical runs) to an object tier, in
    /// objects of at most `object_granules` granules. Returns the bytes moved.
    pub fn demote_to_object(
        &mut self,
        volume: usize,
        first: u64,
        count: u64,
        to_tier: u8,
        object_granules: u64,
    ) -> Result<u64, String> {
        let object = self
            .object_tier(to_tier)
            .ok_or_else(|| format!("tier {to_tier} is not an object tier"))?;
        let per = object_granules.clamp(1, OBJECT_SPAN_GRANULES);
        let mut done = 0;
        while done < count {
            let n = per.min(count - done);
            self.demote_one(&object, volume, first + done, n, to_tier)
                .map_err(|e| e.to_string())?;
            done += n;
        }
        Ok(count * GRANULE_BYTES)
    }

    /// The physical runs `(first, count, location)` of a range; an error if
    /// any granule is unmapped or already on an object tier.
    fn block_runs(
        &self,
        volume: usize,
        first: u64,
        count: u64,
    ) -> Result<Vec<(u64, u64, Location)>, String> {
        let vol = &self.volumes[volume];
        let mut runs: Vec<(u64, u64, Location)> = Vec::new();
        for g in first..first + count {
            let loc = vol
                .map
                .get(g)
                .filter(|l| self.object_tier(l.tier).is_none())
                .ok_or_else(|| format!("granule {g} of '{}' is not on a block tier", vol.name))?;
            match runs.last_mut() {
                Some(r) if r.2.tier == loc.tier && r.2.phys_granule + r.1 == loc.phys_granule => {
                    r.1 += 1
                }
                _ => runs.push((g, 1, loc)),
            }
        }
        Ok(runs)
    }

    fn demote_one(
        &mut self,
        object: &ObjectTier,
        volume: usize,
        first: u64,
        count: u64,
        to_tier: u8,
    ) -> Result<(), MigrateError> {
        use std::sync::atomic::Ordering::Relaxed;
        if object.is_degraded() {
            return Err(MigrateError::Failed(format!(
                "object tier '{}' is degraded: data stays on block tiers",
                object.tier_name()
            )));
        }
        let vol = self.volumes[volume].clone();
        let bytes = count * GRANULE_BYTES;
        let phys = self
            .meta_call(|reply| MetaRequest::Reserve {
                tier: to_tier,
                granules: count,
                reply,
            })
            .map_err(MigrateError::NoRoom)?;
        let to = Location {
            tier: to_tier,
            phys_granule: phys,
        };
        let gen = phys / OBJECT_SPAN_GRANULES;
        self.stats.inflight.fetch_add(1, Relaxed);
        self.stats.inflight_bytes.fetch_add(bytes, Relaxed);
        let t0 = Instant::now();
        vol.map.set_migration(first, count, Migration::Locked(to));
        let mut runs = Vec::new();
        let result = self.grace().and_then(|()| {
            // Under the lock the map of the range cannot change but by us.
            runs = self.block_runs(volume, first, count)?;
            let mut data = vec![0u8; bytes as usize];
            for &(f, n, loc) in &runs {
                let at = ((f - first) * GRANULE_BYTES) as usize;
                self.read_run(loc, n, &mut data[at..at + (n * GRANULE_BYTES) as usize])?;
            }
            let header = ObjectHeader::for_data(&vol.name, first, gen, &data);
            let mut body = header.encode();
            body.extend_from_slice(&data);
            drop(data);
            crashpoint("object.put.before");
            object.put_blocking(gen, body)?;
            // Verify the stored object against what was read before switching.
            let back = object.get_blocking(gen)?;
            let ok = back.len() as u64 == HEADER_BYTES + bytes
                && ObjectHeader::decode(&back).as_ref() == Ok(&header)
                && back[HEADER_BYTES as usize..]
                    .chunks(GRANULE_BYTES as usize)
                    .map(crc32c::crc32c)
                    .eq(header.crcs.iter().copied());
            if !ok {
                return Err(format!(
                    "object {} read back differs from what was uploaded",
                    object.spec.key(gen)
                ));
            }
            self.stats.bytes_verified.fetch_add(bytes, Relaxed);
            crashpoint("object.put.after_verify");
            let switch: Vec<_> = runs
                .iter()
                .map(|&(f, n, loc)| {
                    let dst = Location {
                        tier: to_tier,
                        phys_granule: phys + (f - first),
                    };
                    (f, n, loc, dst)
                })
                .collect();
            self.meta_call(|reply| MetaRequest::SwitchMany {
                volume,
                runs: switch,
                reply,
            })
        });
        self.stats.inflight.fetch_sub(1, Relaxed);
        self.stats.inflight_bytes.fetch_sub(bytes, Relaxed);
        let pre_clear = if result.is_ok() { self.grace() } else { Ok(()) };
        vol.map.set_migration(first, count, Migration::None);
        let grace = pre_clear.and(self.grace());
        match result {
            Ok(()) => {
                grace.map_err(MigrateError::Failed)?;
                for &(_, n, loc) in &runs {
                    let _ = self.meta_tx.send(MetaRequest::Release {
                        tier: loc.tier,
                        phys_granule: loc.phys_granule,
                        count: n,
                    });
                }
                self.stats.completed.fetch_add(1, Relaxed);
                self.stats.demotions.fetch_add(1, Relaxed);
                self.stats.bytes_moved.fetch_add(bytes, Relaxed);
                let rate = bytes as f64 / t0.elapsed().as_secs_f64().max(1e-6);
                let old = self.stats.rate_bytes_per_s.load(Relaxed) as f64;
                self.stats
                    .rate_bytes_per_s
                    .store((old * 0.7 + rate * 0.3) as u64, Relaxed);
                tracing::debug!(volume = %vol.name, first, count, gen, "demoted to object");
                Ok(())
            }
            Err(e) => {
                if grace.is_ok() {
                    // Frees the generation; its object (if uploaded) is deleted.
                    let _ = self.meta_tx.send(MetaRequest::Release {
                        tier: to.tier,
                        phys_granule: to.phys_granule,
                        count,
                    });
                }
                self.stats.failed.fetch_add(1, Relaxed);
                tracing::warn!(volume = %vol.name, first, count, "demotion to object tier aborted: {e}");
                Err(MigrateError::Failed(e))
            }
        }
    }

    /// Reads a run of a block tier into `out` (one DMA buffer at a time).
    fn read_run(&mut self, from: Location, count: u64, out: &mut [u8]) -> Result<(), String> {
        let total = (count * GRANULE_BYTES) as usize;
        assert_eq!(out.len(), total);
        let buf = self.pool.alloc().ok_or("migration DMA pool exhausted")?;
        let mut at = 0usize;
        let mut result = Ok(());
        while at < total {
            let len = (total - at).min(super::COPY_IO_BYTES);
            let rate = self.bucket_rate(from.tier);
            self.buckets[from.tier as usize].take(len as u64, rate);
            let req = IoRequest::read(
                1,
                from.phys_granule * GRANULE_BYTES + at as u64,
                buf.ptr,
                len as u32,
                buf.index,
            );
            // SAFETY: the buffer is ours until submit_and_wait returns.
            let rc = unsafe {
                crate::bdev::submit_and_wait(self.chans[from.tier as usize].as_mut(), &req)
            };
            if rc < 0 {
                result = Err(format!(
                    "read of tier '{}' failed: {}",
                    self.tiers[from.tier as usize].name,
                    std::io::Error::from_raw_os_error(-rc)
                ));
                break;
            }
            // SAFETY: the read completed; the buffer holds `len` bytes we own.
            out[at..at + len].copy_from_slice(&unsafe { buf.as_slice() }[..len]);
            at += len;
        }
        self.pool.free(buf);
        result
    }

    /// Serves a write's promotion: every object-resident run in the range goes
    /// to the fastest block tier with room. Returns 0 or a negative errno.
    pub fn promote_for_write(&mut self, req: &PromoteRequest) -> i32 {
        let vol = self.volumes[req.volume].clone();
        let g0 = req.offset_bytes / GRANULE_BYTES;
        let g1 = (req.offset_bytes + req.len_bytes).div_ceil(GRANULE_BYTES);
        let mut g = g0;
        while g < g1 {
            let Some(loc) = vol.map.get(g) else {
                g += 1;
                continue;
            };
            if self.object_tier(loc.tier).is_none() {
                g += 1;
                continue;
            }
            // The whole object run this granule belongs to.
            let gen = loc.phys_granule / OBJECT_SPAN_GRANULES;
            let same = |x: u64, back: bool| {
                let d = if back { g - x } else { x - g };
                let want = if back {
                    loc.phys_granule.checked_sub(d)
                } else {
                    Some(loc.phys_granule + d)
                };
                want.is_some_and(|p| {
                    p / OBJECT_SPAN_GRANULES == gen
                        && vol.map.get(x)
                            == Some(Location {
                                tier: loc.tier,
                                phys_granule: p,
                            })
                })
            };
            let mut first = g;
            while first > 0 && same(first - 1, true) {
                first -= 1;
            }
            let mut end = g + 1;
            while end < vol.map.granules() && same(end, false) {
                end += 1;
            }
            let start = Location {
                tier: loc.tier,
                phys_granule: loc.phys_granule - (g - first),
            };
            let mut moved = false;
            let mut last_err = String::new();
            for t in 0..self.tiers.len() as u8 {
                if self.object_tier(t).is_some() {
                    continue;
                }
                match self.migrate_run(req.volume, first, end - first, start, t) {
                    Ok(()) => {
                        moved = true;
                        break;
                    }
                    Err(e) => last_err = e.to_string(),
                }
            }
            if !moved {
                tracing::error!(volume = %vol.name, first, count = end - first, "promotion for a write failed: {last_err}");
                return -libc::EIO;
            }
            g = end;
        }
        0
    }
}
