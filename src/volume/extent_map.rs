//! A volume's extent map: logical granules to (tier, physical granule).
//!
//! The map is a flat array of `AtomicU64`, one entry per granule (the
//! smallest partition size). Reactors read it with one acquire load per
//! granule, without locks; only the metadata service writes it, after the
//! journal record for the change is durable. A partition (chunk) is a run of
//! granules mapped to consecutive physical granules on one tier, so chunks
//! of any size between the configured bounds are representable and can be
//! split or merged by rewriting entries.
//!
//! Entry encoding: `0` = unmapped (reads return zeros); otherwise bits 63..56
//! hold `tier + 1` and bits 55..0 the physical granule index on that tier.

use std::sync::atomic::{AtomicU64, Ordering};

const TIER_SHIFT: u32 = 56;
// Physical granule indexes stay below the migration lock bit.
const _: () = assert!(LOCK_BIT < (1 << TIER_SHIFT));
const PHYS_MASK: u64 = (1 << TIER_SHIFT) - 1;

/// Where one granule lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Location {
    pub tier: u8,
    pub phys_granule: u64,
}

#[inline]
pub fn encode(loc: Option<Location>) -> u64 {
    match loc {
        None => 0,
        Some(l) => {
            assert!(l.phys_granule <= PHYS_MASK && l.tier < 255);
            ((l.tier as u64 + 1) << TIER_SHIFT) | l.phys_granule
        }
    }
}

#[inline]
pub fn decode(entry: u64) -> Option<Location> {
    if entry == 0 {
        None
    } else {
        Some(Location {
            tier: ((entry >> TIER_SHIFT) - 1) as u8,
            phys_granule: entry & PHYS_MASK,
        })
    }
}

/// Migration state of one granule (see [`ExtentMap::migration`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Migration {
    /// Not migrating.
    None,
    /// Being copied to the destination: writes must wait.
    Locked(Location),
    /// Copied (or copy pending): writes go to the primary and to this shadow.
    Shadow(Location),
}

const LOCK_BIT: u64 = 1 << 55;

pub struct ExtentMap {
    pub granule_bytes: u64,
    entries: Box<[AtomicU64]>,
    /// Per granule: 0, or the encoded destination of a migration, with LOCK_BIT while copying.
    migration: Box<[AtomicU64]>,
}

impl ExtentMap {
    pub fn new(size_bytes: u64, granule_bytes: u64) -> ExtentMap {
        assert!(granule_bytes.is_power_of_two() && size_bytes % granule_bytes == 0);
        let n = (size_bytes / granule_bytes) as usize;
        ExtentMap {
            granule_bytes,
            entries: (0..n).map(|_| AtomicU64::new(0)).collect(),
            migration: (0..n).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    pub fn granules(&self) -> u64 {
        self.entries.len() as u64
    }

    #[inline]
    pub fn get(&self, granule: u64) -> Option<Location> {
        decode(self.entries[granule as usize].load(Ordering::Acquire))
    }

    /// The migration state of a granule.
    #[inline]
    pub fn migration(&self, granule: u64) -> Migration {
        let v = self.migration[granule as usize].load(Ordering::SeqCst);
        match decode(v & !LOCK_BIT) {
            None => Migration::None,
            Some(l) if v & LOCK_BIT != 0 => Migration::Locked(l),
            Some(l) => Migration::Shadow(l),
        }
    }

    /// Sets the migration state of `count` granules from `first`; the
    /// destination advances with the granule. Only the migration engine calls it.
    pub fn set_migration(&self, first: u64, count: u64, state: Migration) {
        assert!(first + count <= self.granules());
        for i in 0..count {
            let v = match state {
                Migration::None => 0,
                Migration::Locked(l) => {
                    encode(Some(Location {
                        tier: l.tier,
                        phys_granule: l.phys_granule + i,
                    })) | LOCK_BIT
                }
                Migration::Shadow(l) => encode(Some(Location {
                    tier: l.tier,
                    phys_granule: l.phys_granule + i,
                })),
            };
            self.migration[(first + i) as usize].store(v, Ordering::SeqCst);
        }
    }

    /// Whether any granule of the byte range is locked for copying.
    #[inline]
    pub fn any_locked(&self, offset: u64, len: u64) -> bool {
        let g = self.granule_bytes;
        (offset / g..(offset + len).div_ceil(g))
            .any(|x| self.migration[x as usize].load(Ordering::SeqCst) & LOCK_BIT != 0)
    }

    /// Calls `f(logical_offset, len, (tier, phys_byte))` for each contiguous
    /// shadow destination inside the byte range. The caller skips pieces equal
    /// to the primary locations it used: comparing with a fresh map read here
    /// would race with a switch.
    #[inline]
    pub fn for_each_shadow_piece(
        &self,
        offset: u64,
        len: u64,
        mut f: impl FnMut(u64, u64, (u8, u64)),
    ) {
        let g = self.granule_bytes;
        let end = offset + len;
        let mut pos = offset;
        let mut run: Option<(u64, u64, u8, u64)> = None; // (start, len, tier, phys_byte)
        while pos < end {
            let granule = pos / g;
            let piece_end = ((granule + 1) * g).min(end);
            let in_g = pos % g;
            let target = match self.migration(granule) {
                Migration::Shadow(l) | Migration::Locked(l) => {
                    Some((l.tier, l.phys_granule * g + in_g))
                }
                _ => None,
            };
            match (run.as_mut(), target) {
                (Some(r), Some((t, p))) if r.2 == t && r.3 + r.1 == p => r.1 += piece_end - pos,
                (_, t) => {
                    if let Some(r) = run.take() {
                        f(r.0, r.1, (r.2, r.3));
                    }
                    run = t.map(|(t, p)| (pos, piece_end - pos, t, p));
                }
            }
            pos = piece_end;
        }
        if let Some(r) = run {
            f(r.0, r.1, (r.2, r.3));
        }
    }

    /// Maps `count` granules from `first` to consecutive physical granules.
    /// Only the metadata service calls this, after the journal is durable.
    pub fn set_run(&self, first: u64, count: u64, loc: Option<Location>) {
        assert!(
            first + count <= self.granules(),
            "map run past the end of the volume"
        );
        for i in 0..count {
            let l = loc.map(|l| Location {
                tier: l.tier,
                phys_granule: l.phys_granule + i,
            });
            self.entries[(first + i) as usize].store(encode(l), Ordering::Release);
        }
    }

    /// The map as runs `(first_granule, count, location)` of contiguous entries.
    pub fn runs(&self) -> Vec<(u64, u64, Option<Location>)> {
        let mut runs: Vec<(u64, u64, Option<Location>)> = Vec::new();
        for g in 0..self.granules() {
            let loc = self.get(g);
            if let Some(last) = runs.last_mut() {
                let contiguous = match (last.2, loc) {
                    (None, None) => true,
                    (Some(a), Some(b)) => {
                        a.tier == b.tier && a.phys_granule + last.1 == b.phys_granule
                    }
                    _ => false,
                };
                if contiguous {
                    last.1 += 1;
                    continue;
                }
            }
            runs.push((g, 1, loc));
        }
        runs
    }

    /// Splits the byte range `[offset, offset+len)` into pieces that each lie
    /// in one run of physically contiguous granules. Calls `f(logical_offset,
    /// len, target)` per piece, where `target` is `(tier, physical byte
    /// offset)`, or None for unmapped space.
    #[inline]
    pub fn for_each_piece(
        &self,
        offset: u64,
        len: u64,
        mut f: impl FnMut(u64, u64, Option<(u8, u64)>),
    ) {
        let g = self.granule_bytes;
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let granule = pos / g;
            let loc = self.get(granule);
            let mut piece_end = ((granule + 1) * g).min(end);
            // Extend while the next granule continues the same physical run.
            while piece_end < end {
                let next = self.get(piece_end / g);
                let continues = match (loc, next) {
                    (None, None) => true,
                    (Some(a), Some(b)) => {
                        a.tier == b.tier
                            && b.phys_granule == a.phys_granule + (piece_end / g - granule)
                    }
                    _ => false,
                };
                if !continues {
                    break;
                }
                piece_end = (piece_end + g).min(end);
            }
            let in_granule = pos % g;
            f(
                pos,
                piece_end - pos,
                loc.map(|l| (l.tier, l.phys_granule * g + in_granule)),
            );
            pos = piece_end;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shadow_pieces_follow_destinations() {
        let g = 64 << 10;
        let m = ExtentMap::new(1 << 20, g);
        m.set_run(
            0,
            4,
            Some(Location {
                tier: 1,
                phys_granule: 40,
            }),
        );
        m.set_migration(
            1,
            2,
            Migration::Shadow(Location {
                tier: 0,
                phys_granule: 8,
            }),
        );
        assert!(!m.any_locked(0, 4 * g));
        let mut p = Vec::new();
        m.for_each_shadow_piece(0, 4 * g, |o, l, t| p.push((o, l, t)));
        assert_eq!(p, vec![(g, 2 * g, (0, 8 * g))]);
        m.set_migration(
            2,
            1,
            Migration::Locked(Location {
                tier: 0,
                phys_granule: 9,
            }),
        );
        assert!(m.any_locked(2 * g + 512, 512));
        assert_eq!(
            m.migration(2),
            Migration::Locked(Location {
                tier: 0,
                phys_granule: 9
            })
        );
        // After the switch the shadow equals the primary.
        m.set_run(
            1,
            2,
            Some(Location {
                tier: 0,
                phys_granule: 8,
            }),
        );
        m.set_migration(
            2,
            1,
            Migration::Shadow(Location {
                tier: 0,
                phys_granule: 9,
            }),
        );
        // The shadow is still reported: the caller skips it because it equals
        // the primary location it read (a fresh map read here would race).
        let mut p = Vec::new();
        m.for_each_shadow_piece(0, 4 * g, |o, l, t| p.push((o, l, t)));
        assert_eq!(p, vec![(g, 2 * g, (0, 8 * g))]);
    }

    #[test]
    fn encode_decode_and_runs() {
        let m = ExtentMap::new(1 << 20, 64 << 10);
        assert_eq!(m.granules(), 16);
        assert_eq!(m.get(3), None);
        m.set_run(
            4,
            4,
            Some(Location {
                tier: 1,
                phys_granule: 100,
            }),
        );
        assert_eq!(
            m.get(5),
            Some(Location {
                tier: 1,
                phys_granule: 101
            })
        );
        let runs = m.runs();
        assert_eq!(runs.len(), 3);
        assert_eq!(
            runs[1],
            (
                4,
                4,
                Some(Location {
                    tier: 1,
                    phys_granule: 100
                })
            )
        );
    }

    #[test]
    fn pieces_split_at_run_boundaries() {
        let g = 64 << 10;
        let m = ExtentMap::new(1 << 20, g);
        m.set_run(
            0,
            2,
            Some(Location {
                tier: 0,
                phys_granule: 10,
            }),
        );
        m.set_run(
            2,
            2,
            Some(Location {
                tier: 1,
                phys_granule: 0,
            }),
        );
        let mut pieces = Vec::new();
        // From the middle of granule 1 to the middle of granule 4.
        m.for_each_piece(g + 4096, 3 * g, |o, l, loc| pieces.push((o, l, loc)));
        assert_eq!(pieces.len(), 3);
        // The byte address is phys_granule * g + offset in granule.
        assert_eq!(pieces[0], (g + 4096, g - 4096, Some((0, 11 * g + 4096))));
        assert_eq!(pieces[1], (2 * g, 2 * g, Some((1, 0))));
        assert_eq!(pieces[2], (4 * g, 4096, None));
    }
}
