//! Fuzzes journal recovery, `kiln::volume::journal::recover_region` then `claim_mapped`: the
//! superblock copies, the checkpoint (plain `KLNC` or extended `KLNX` with runtime tiers and
//! volume moves) and the log records (maps, unmaps, added tiers, volume moves), decoded from a
//! metadata region built from the input.
//!
//! The input is a small program that writes the region. Each op writes a well-formed frame
//! (a superblock, a checkpoint or a log record with fields taken from the input and a valid
//! checksum), a frame with a valid checksum around raw payload bytes, raw bytes, a flipped
//! byte or a truncation. So the fuzzer gets past the checksums to the postcard decoder and to
//! the checks behind it, while raw bytes keep exercising the frame decoder itself.
//!
//! Checks: no panic and no unbounded allocation (libFuzzer's -malloc_limit_mb); a blank
//! answer only for a blank region; errors are one line; after a successful recovery the
//! runtime tiers follow the configured ones in index order, every move names an existing
//! tier, every mapped granule lies inside its volume and its tier, no two claim the same
//! physical granule, nothing claims the metadata region, the allocators account for exactly
//! the claimed space, and the sequence and log position agree with the records replayed.

#![no_main]

use std::sync::Arc;

use kiln::frame;
use kiln::volume::allocator::TierAllocator;
use kiln::volume::journal::{
    self as j, Checkpoint, CheckpointExt, MappedRun, MoveParams, Record, RuntimeTier, Superblock,
    VolumeImage, VolumeMoveState, GRANULE_BYTES,
};
use kiln::volume::Volume;
use libfuzzer_sys::fuzz_target;

/// Tiers as `(name, capacity_bytes)`: the fast one holds the metadata region and 4 MiB.
const TIERS: [(&str, u64); 2] = [("fast", j::META_BYTES + (4 << 20)), ("slow", 8 << 20)];
/// Volumes as `(name, size_bytes)`, chunk 1 MiB.
const VOLUMES: [(&str, u64); 2] = [("v0", 2 << 20), ("v1", 1 << 20)];
/// Names records and images use: the volumes, one gone from the config, and junk.
const NAMES: [&str; 4] = ["v0", "v1", "gone", ""];
/// Values that sit on the edges of the checks.
const EDGES: [u64; 8] = [
    0,
    1,
    u64::MAX,
    u64::MAX - 1,
    1 << 55,
    1 << 56,
    j::META_BYTES / GRANULE_BYTES,
    u32::MAX as u64,
];

/// Reads the input; past its end every value is zero.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn u8(&mut self) -> u8 {
        let Some((&b, rest)) = self.0.split_first() else {
            return 0;
        };
        self.0 = rest;
        b
    }

    fn bytes(&mut self, n: usize) -> &[u8] {
        let (head, rest) = self.0.split_at(n.min(self.0.len()));
        self.0 = rest;
        head
    }

    fn flag(&mut self) -> bool {
        self.u8() & 1 != 0
    }

    /// Small numbers mostly, sometimes any u64 or an edge value.
    fn num(&mut self) -> u64 {
        match self.u8() % 4 {
            0 => self.u8() as u64,
            1 => u16::from_le_bytes([self.u8(), self.u8()]) as u64,
            2 => {
                let mut b = [0; 8];
                b.iter_mut().for_each(|x| *x = self.u8());
                u64::from_le_bytes(b)
            }
            _ => EDGES[self.u8() as usize % EDGES.len()],
        }
    }

    fn name(&mut self) -> String {
        NAMES[self.u8() as usize % NAMES.len()].to_string()
    }
}

/// The metadata region: only the places recovery reads.
#[derive(Default)]
struct Region {
    /// Superblock copies A and B, checkpoint slots 0 and 1, the log.
    parts: [Vec<u8>; 5],
}

const LOG: usize = 4;

impl Region {
    fn base(part: usize) -> u64 {
        match part {
            0 | 1 => j::SUPERBLOCK_OFFSETS[part],
            2 | 3 => j::CHECKPOINT_OFFSETS[part - 2],
            _ => j::LOG_OFFSET,
        }
    }

    fn limit(part: usize) -> u64 {
        match part {
            0 | 1 => j::SUPERBLOCK_BYTES,
            2 | 3 => j::CHECKPOINT_BYTES_MAX,
            _ => j::LOG_BYTES,
        }
    }

    /// `len` bytes at `offset`, fewer where the region holds nothing (zeros).
    fn read(&self, offset: u64, len: u64) -> Result<Vec<u8>, String> {
        let part = (0..5)
            .find(|&p| (Self::base(p)..Self::base(p) + Self::limit(p)).contains(&offset))
            .ok_or_else(|| format!("recovery read at {offset}, outside every structure"))?;
        assert!(offset + len <= Self::base(part) + Self::limit(part));
        let data = &self.parts[part];
        let from = ((offset - Self::base(part)) as usize).min(data.len());
        let to = (from + len as usize).min(data.len());
        Ok(data[from..to].to_vec())
    }

    /// Puts a frame in its place: appended to the log, replacing anything else.
    fn put(&mut self, part: usize, bytes: Vec<u8>) {
        if part == LOG {
            self.parts[LOG].extend_from_slice(&bytes);
        } else {
            self.parts[part] = bytes;
        }
        let limit = Self::limit(part) as usize;
        self.parts[part].truncate(limit);
    }
}

fn superblock(inp: &mut Input) -> (usize, u64, Superblock) {
    let copy = inp.u8() as usize & 1;
    let odd = inp.u8();
    let mut tiers: Vec<(String, u64)> = TIERS.iter().map(|&(n, c)| (n.into(), c)).collect();
    match odd & 3 {
        1 => tiers[1].1 = inp.num(),
        2 => tiers[0].0 = inp.name(),
        3 => {
            tiers.pop();
        }
        _ => {}
    }
    let sb = Superblock {
        version: if odd & 4 != 0 {
            inp.num() as u32
        } else {
            j::FORMAT_VERSION
        },
        generation: inp.num(),
        tiers,
        granule_bytes: if odd & 8 != 0 {
            inp.num()
        } else {
            GRANULE_BYTES
        },
        checkpoint_slot: inp.u8() % 3,
        checkpoint_seq: inp.num(),
    };
    let seq = if odd & 16 != 0 {
        inp.num()
    } else {
        sb.generation
    };
    (copy, seq, sb)
}

/// A tier index: mostly the configured ones and the next few runtime ones.
fn tier(inp: &mut Input) -> u8 {
    match inp.u8() {
        b @ 0..=250 => b % 5,
        b => b,
    }
}

fn runtime_tier(inp: &mut Input, index: u8) -> RuntimeTier {
    RuntimeTier {
        index: if inp.flag() { index } else { tier(inp) },
        name: format!("rt{index}"),
        device: "file:/nonexistent".into(),
        capacity_bytes: inp.num().wrapping_mul(GRANULE_BYTES) + inp.num() % 2,
    }
}

fn move_params(inp: &mut Input) -> MoveParams {
    MoveParams {
        mode: inp.u8(),
        rate_mib_s: inp.num(),
        chunk_min_bytes: inp.num(),
        chunk_max_bytes: inp.num(),
        chunk_bytes: inp.num(),
    }
}

/// The extended checkpoint: a plain one plus runtime tiers and moves.
fn checkpoint_ext(inp: &mut Input) -> CheckpointExt {
    let volumes = checkpoint(inp).volumes;
    let tiers = (0..inp.u8() % 3)
        .map(|i| runtime_tier(inp, TIERS.len() as u8 + i))
        .collect();
    let moves = (0..inp.u8() % 3)
        .map(|_| VolumeMoveState {
            volume: inp.name(),
            to_tier: tier(inp),
            params: move_params(inp),
            done: inp.flag(),
        })
        .collect();
    CheckpointExt {
        volumes,
        tiers,
        moves,
    }
}

fn checkpoint(inp: &mut Input) -> Checkpoint {
    let volumes = (0..inp.u8() % 4)
        .map(|_| {
            let name = inp.name();
            let size_bytes = match VOLUMES.iter().find(|v| v.0 == name) {
                Some(v) if !inp.flag() => v.1,
                _ => inp.num(),
            };
            let runs = (0..inp.u8() % 6)
                .map(|_| MappedRun {
                    first_granule: inp.num(),
                    count: inp.num(),
                    tier: tier(inp),
                    phys_granule: inp.num(),
                })
                .collect();
            VolumeImage {
                name,
                size_bytes,
                runs,
            }
        })
        .collect();
    Checkpoint { volumes }
}

fn record(inp: &mut Input) -> Record {
    match inp.u8() % 8 {
        0..=2 => Record::Map {
            volume: inp.name(),
            first_granule: inp.num(),
            count: inp.num(),
            tier: tier(inp),
            phys_granule: inp.num(),
        },
        3 | 4 => Record::Unmap {
            volume: inp.name(),
            first_granule: inp.num(),
            count: inp.num(),
        },
        5 => {
            let index = tier(inp);
            let t = runtime_tier(inp, index);
            Record::AddTier {
                index: t.index,
                name: t.name,
                device: t.device,
                capacity_bytes: t.capacity_bytes,
            }
        }
        6 => Record::VolumeMoveStart {
            volume: inp.name(),
            to_tier: tier(inp),
            params: move_params(inp),
        },
        _ => Record::VolumeMoveDone {
            volume: inp.name(),
            to_tier: tier(inp),
        },
    }
}

fn build(mut inp: Input) -> Region {
    let mut region = Region::default();
    // The sequence the next record gets: the last superblock's checkpoint sequence + 1.
    let mut next_seq = 1u64;
    let mut ops = 0;
    while !inp.is_empty() && ops < 64 {
        ops += 1;
        let op = inp.u8();
        let part = (op >> 3) as usize % 5;
        let mut bytes = Vec::new();
        match op & 7 {
            0 => {
                let (copy, seq, sb) = superblock(&mut inp);
                next_seq = sb.checkpoint_seq.wrapping_add(1);
                frame::encode(j::MAGIC_SUPERBLOCK, seq, &sb, &mut bytes);
                region.put(copy, bytes);
            }
            1 => {
                let slot = 2 + (op as usize >> 3 & 1);
                let seq = inp.num();
                if inp.flag() {
                    let ext = checkpoint_ext(&mut inp);
                    frame::encode(j::MAGIC_CHECKPOINT_EXT, seq, &ext, &mut bytes);
                } else {
                    frame::encode(j::MAGIC_CHECKPOINT, seq, &checkpoint(&mut inp), &mut bytes);
                }
                region.put(slot, bytes);
            }
            2 => {
                let seq = if op & 8 != 0 { inp.num() } else { next_seq };
                next_seq = next_seq.wrapping_add(1);
                frame::encode(j::MAGIC_RECORD, seq, &record(&mut inp), &mut bytes);
                region.put(LOG, bytes);
            }
            3 => {
                // End of a commit: zeros up to the next block.
                let log = &mut region.parts[LOG];
                log.resize(log.len().next_multiple_of(j::BLOCK_BYTES as usize), 0);
            }
            4 => {
                let magic = match inp.u8() % 5 {
                    0 => j::MAGIC_SUPERBLOCK,
                    1 => j::MAGIC_CHECKPOINT,
                    2 => j::MAGIC_RECORD,
                    3 => j::MAGIC_CHECKPOINT_EXT,
                    _ => inp.num() as u32,
                };
                let seq = inp.num();
                let len = inp.u8() as usize;
                frame::encode_raw(magic, seq, inp.bytes(len), &mut bytes);
                region.put(part, bytes);
            }
            5 => {
                let len = inp.u8() as usize;
                bytes.extend_from_slice(inp.bytes(len));
                region.put(part, bytes);
            }
            6 => {
                let at = inp.num() as usize;
                let mask = inp.u8() | 1;
                let data = &mut region.parts[part];
                if !data.is_empty() {
                    let n = data.len();
                    data[at % n] ^= mask;
                }
            }
            _ => {
                let len = inp.num() as usize;
                region.parts[part].truncate(len);
            }
        }
    }
    region
}

fuzz_target!(|data: &[u8]| {
    let region = build(Input(data));
    let tiers: Vec<(String, u64)> = TIERS.iter().map(|&(n, c)| (n.into(), c)).collect();
    let volumes: Vec<Arc<Volume>> = VOLUMES
        .iter()
        .enumerate()
        .map(|(i, &(name, size))| Arc::new(Volume::new(i, name, size, 1 << 20)))
        .collect();
    let meta_granules = j::META_BYTES / GRANULE_BYTES;
    let mut allocators = vec![
        TierAllocator::new(meta_granules, TIERS[0].1 / GRANULE_BYTES - meta_granules),
        TierAllocator::new(0, TIERS[1].1 / GRANULE_BYTES),
    ];
    let ends: Vec<u64> = allocators.iter().map(|a| a.end_granule()).collect();
    // As `MetaService::recover`: the region, then an allocator per runtime tier, then claims.
    let found = j::recover_region(
        &mut |offset, len| region.read(offset, len),
        &tiers,
        &ends,
        &volumes,
    )
    .and_then(|found| {
        let Some(r) = found else { return Ok(None) };
        for t in &r.runtime_tiers {
            allocators.push(TierAllocator::new(0, t.capacity_bytes / GRANULE_BYTES));
        }
        j::claim_mapped(&volumes, &r.orphans, &mut allocators)?;
        Ok(Some(r))
    });
    let r = match found {
        Err(e) => {
            assert!(!e.is_empty() && !e.contains('\n'), "{e:?}");
            return;
        }
        Ok(None) => {
            assert!(
                region.parts[..2].iter().flatten().all(|&b| b == 0),
                "a region with a superblock was taken for blank"
            );
            return;
        }
        Ok(Some(r)) => r,
    };
    let sb = &r.superblock;
    assert_eq!(sb.version, j::FORMAT_VERSION);
    assert_eq!(sb.granule_bytes, GRANULE_BYTES);
    assert_eq!(sb.tiers, tiers);
    assert!(sb.checkpoint_slot < 2);
    assert_eq!(r.next_seq, sb.checkpoint_seq + 1 + r.replayed_records);
    assert_eq!(r.log_pos % j::BLOCK_BYTES, 0);
    let log_len = region.parts[LOG].len() as u64;
    assert!(r.log_pos <= log_len.next_multiple_of(j::BLOCK_BYTES));
    assert!(r.replayed_records == 0 || r.log_pos > 0);
    // Runtime tiers in index order after the configured ones; moves name existing tiers.
    let mut tier_granules: Vec<u64> = TIERS.iter().map(|t| t.1 / GRANULE_BYTES).collect();
    for (i, t) in r.runtime_tiers.iter().enumerate() {
        assert_eq!(t.index as usize, TIERS.len() + i);
        assert!(t.capacity_bytes >= GRANULE_BYTES);
        tier_granules.push(t.capacity_bytes / GRANULE_BYTES);
    }
    for m in &r.moves {
        assert!((m.to_tier as usize) < tier_granules.len(), "{m:?}");
    }
    // Every claim inside its tier, above the metadata on the fast one, and claimed once.
    let mut claims: Vec<(u8, u64, u64)> = Vec::new();
    for v in &volumes {
        let mut next = 0;
        for (first, count, loc) in v.map.runs() {
            assert_eq!(first, next);
            next = first + count;
            if let Some(l) = loc {
                claims.push((l.tier, l.phys_granule, count));
            }
        }
        assert_eq!(next, v.map.granules());
    }
    for image in &r.orphans {
        assert!(VOLUMES.iter().all(|v| v.0 != image.name));
        for run in &image.runs {
            claims.push((run.tier, run.phys_granule, run.count));
        }
    }
    claims.retain(|c| c.2 > 0);
    claims.sort_unstable();
    let mut used = vec![0u64; tier_granules.len()];
    for (i, &(tier, phys, count)) in claims.iter().enumerate() {
        let t = tier as usize;
        assert!(t < tier_granules.len(), "claim on tier {t}");
        assert!(t > 0 || phys >= meta_granules, "claim in the metadata");
        assert!(phys + count <= tier_granules[t], "claim past tier {t}");
        if let Some(&(next_tier, next_phys, _)) = claims.get(i + 1) {
            assert!(
                next_tier != tier || phys + count <= next_phys,
                "granules of tier {t} claimed twice"
            );
        }
        used[t] += count;
    }
    for (t, a) in allocators.iter().enumerate() {
        assert_eq!(a.used_granules(), used[t], "tier {t} accounting");
    }
});
