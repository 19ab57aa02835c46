//! The metadata journal and the metadata service that owns every map change.
//!
//! Layout of the reserved metadata region at the start of the fastest tier
//! (see docs/FORMAT.md for the byte-level description):
//!
//! ```text
//! 0        superblock copy A (4 KiB)   even generations
//! 4 KiB    superblock copy B (4 KiB)   odd generations
//! 1 MiB    checkpoint slot 0 (16 MiB)
//! 17 MiB   checkpoint slot 1 (16 MiB)
//! 33 MiB   log (31 MiB), each commit starts on a 4 KiB boundary
//! 64 MiB   end of metadata; tier data starts here
//! ```
//!
//! Every frame is [`crate::frame`]: magic | len | crc32c | sequence | postcard.
//! A change is durable when its log commit (written with FUA) completes; only
//! then is it applied to the in-memory map and acknowledged.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use serde::{Deserialize, Serialize};

use super::allocator::TierAllocator;
use super::extent_map::Location;
use super::Volume;
use crate::bdev::{
    submit_and_wait, BlockDevice, ChannelOptions, IoChannel, IoKind, IoRequest, BUF_INDEX_NONE,
};
use crate::dma::AlignedBuf;
use crate::frame;

mod runtime;
pub use runtime::{
    MoveParams, RuntimeTier, RuntimeTierOpen, VolumeMoveState, MAGIC_CHECKPOINT_EXT,
};

pub const META_BYTES: u64 = 64 << 20;
pub const SUPERBLOCK_OFFSETS: [u64; 2] = [0, 4096];
pub const SUPERBLOCK_BYTES: u64 = 4096;
pub const CHECKPOINT_OFFSETS: [u64; 2] = [1 << 20, 17 << 20];
pub const CHECKPOINT_BYTES_MAX: u64 = 16 << 20;
pub const LOG_OFFSET: u64 = 33 << 20;
pub const LOG_BYTES: u64 = META_BYTES - LOG_OFFSET;
pub const BLOCK_BYTES: u64 = 4096;
/// Granule: the smallest partition and the unit of the extent map.
pub const GRANULE_BYTES: u64 = 64 << 10;

pub const MAGIC_SUPERBLOCK: u32 = u32::from_le_bytes(*b"KLNS");
pub const MAGIC_CHECKPOINT: u32 = u32::from_le_bytes(*b"KLNC");
pub const MAGIC_RECORD: u32 = u32::from_le_bytes(*b"KLNJ");
pub const FORMAT_VERSION: u32 = 1;

const _: () = assert!(CHECKPOINT_OFFSETS[1] + CHECKPOINT_BYTES_MAX <= LOG_OFFSET);
const _: () = assert!(LOG_OFFSET % BLOCK_BYTES == 0 && META_BYTES % GRANULE_BYTES == 0);

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Superblock {
    pub version: u32,
    pub generation: u64,
    /// Tier names and the bytes of each tier kiln may use, in tier order.
    pub tiers: Vec<(String, u64)>,
    pub granule_bytes: u64,
    pub checkpoint_slot: u8,
    /// The last record sequence the checkpoint includes.
    pub checkpoint_seq: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct MappedRun {
    pub first_granule: u64,
    pub count: u64,
    pub tier: u8,
    pub phys_granule: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct VolumeImage {
    pub name: String,
    pub size_bytes: u64,
    pub runs: Vec<MappedRun>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Checkpoint {
    pub volumes: Vec<VolumeImage>,
}

/// One journaled change.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum Record {
    /// Granules `[first, first+count)` of `volume` now live at `phys` on `tier`.
    Map {
        volume: String,
        first_granule: u64,
        count: u64,
        tier: u8,
        phys_granule: u64,
    },
    /// Granules `[first, first+count)` of `volume` are unmapped (read as zeros).
    Unmap {
        volume: String,
        first_granule: u64,
        count: u64,
    },
    // Variants below were added after format 1 shipped: appended so the postcard
    // tags of the records above keep their values (old journals stay readable).
    /// A tier added at run time (a volume migration's destination device).
    AddTier {
        index: u8,
        name: String,
        device: String,
        capacity_bytes: u64,
    },
    /// A whole-volume migration to `to_tier` started (or its mode changed).
    VolumeMoveStart {
        volume: String,
        to_tier: u8,
        params: MoveParams,
    },
    /// Every mapped granule of `volume` is on `to_tier` and the source was released.
    VolumeMoveDone { volume: String, to_tier: u8 },
}

/// Usage of one tier, published for RPC and metrics.
#[derive(Default, Debug)]
pub struct TierUsage {
    pub capacity_bytes: AtomicU64,
    pub used_bytes: AtomicU64,
}

/// A tier as the metadata service sees it.
pub struct MetaTier {
    pub name: String,
    pub device: Arc<dyn BlockDevice>,
    /// Bytes of the device kiln may use (the configured capacity).
    pub capacity_bytes: u64,
    pub usage: Arc<TierUsage>,
}

/// How the metadata service answers an allocation or unmap: 0 or a negative errno.
pub type Reply = Box<dyn FnOnce(i32) + Send>;

/// Requests to the metadata service.
pub enum MetaRequest {
    /// Make sure every granule in the range is mapped, allocating whole chunks.
    /// The reply carries 0 or a negative errno (ENOSPC when every tier is full).
    Allocate {
        volume: usize,
        offset_bytes: u64,
        len_bytes: u64,
        reply: Box<dyn FnOnce(i32) + Send>,
    },
    /// Unmap whole chunks inside the range (trim), freeing their space.
    Unmap {
        volume: usize,
        offset_bytes: u64,
        len_bytes: u64,
        reply: Box<dyn FnOnce(i32) + Send>,
    },
    /// Reserve space for a migration destination (not journaled: until a
    /// `Switch` maps it, recovery sees it as free).
    Reserve {
        tier: u8,
        granules: u64,
        reply: Sender<Result<u64, String>>,
    },
    /// Atomically remap granules `[first, first+count)` of a volume from `from`
    /// to `to` with one journaled record. Fails if the map no longer points at `from`.
    Switch {
        volume: usize,
        first_granule: u64,
        count: u64,
        from: Location,
        to: Location,
        reply: Sender<Result<(), String>>,
    },
    /// Return space to a tier (after a switch's grace period, or an aborted copy).
    Release {
        tier: u8,
        phys_granule: u64,
        count: u64,
    },
    /// Write a checkpoint now.
    Checkpoint { reply: Sender<Result<u64, String>> },
    /// Final checkpoint, then exit the thread.
    Shutdown { reply: Sender<Result<u64, String>> },
    /// Open a device and journal it as a new tier (`Record::AddTier`).
    AddTier {
        name: String,
        device: String,
        capacity_bytes: u64,
        reply: Sender<Result<RuntimeTierOpen, String>>,
    },
    /// Journal the start (`done == false`) or the end of a whole-volume move.
    VolumeMove {
        volume: usize,
        to_tier: u8,
        params: MoveParams,
        done: bool,
        reply: Sender<Result<(), String>>,
    },
    /// Of these generations of an object tier, the ones no map entry and no
    /// reservation uses (garbage `tier_gc` may delete: generations are never reused).
    ObjectGarbage {
        tier: u8,
        gens: Vec<u64>,
        reply: Sender<Vec<u64>>,
    },
    /// Like `Switch` for several runs `(first_granule, count, from, to)` of one
    /// volume, checked together and committed as one journal commit.
    SwitchMany {
        volume: usize,
        runs: Vec<(u64, u64, Location, Location)>,
        reply: Sender<Result<(), String>>,
    },
    /// Trim every free range of a tier (a released migration source); replies with bytes trimmed.
    TrimFree {
        tier: u8,
        reply: Sender<Result<u64, String>>,
    },
}

/// Where the journal stands.
#[derive(Debug, Clone)]
pub struct JournalState {
    pub generation: u64,
    pub checkpoint_slot: u8,
    pub next_seq: u64,
    pub log_pos: u64,
    pub replayed_records: u64,
    /// Tiers added at run time (after the configured ones, in index order).
    pub runtime_tiers: Vec<RuntimeTierOpen>,
    /// Whole-volume moves, finished or not.
    pub moves: Vec<VolumeMoveState>,
}

/// Owns the map changes: allocators, journal, checkpoints.
pub struct MetaService {
    tiers: Vec<MetaTier>,
    chans: Vec<Box<dyn IoChannel>>,
    allocators: Vec<TierAllocator>,
    volumes: Vec<Arc<Volume>>,
    /// Images of volumes on disk that the config no longer names (kept, not exported).
    orphans: Vec<VolumeImage>,
    state: JournalState,
    buf: AlignedBuf,
    /// How many of `tiers` come from the config (the superblock's list); the rest are runtime.
    config_tiers: usize,
    /// Per tier: the object-storage tier behind it, if it is one.
    object: Vec<Option<Arc<crate::bdev::object::ObjectTier>>>,
    /// Object generations: the base (superblock generation << OBJECT_GEN_COUNTER_BITS)
    /// and the next counter under it. See `next_object_generation`.
    object_gen_base: u64,
    object_gen_next: u64,
}

/// Object generations handed out per superblock generation before a checkpoint re-bases them.
pub const OBJECT_GEN_COUNTER_BITS: u32 = 14;

fn io_error(what: &str, rc: i32) -> String {
    format!("{what}: {}", std::io::Error::from_raw_os_error(-rc))
}

impl MetaService {
    fn sync(
        &mut self,
        tier: usize,
        kind: IoKind,
        offset: u64,
        len: u64,
        fua: bool,
    ) -> Result<(), String> {
        let buf = if matches!(kind, IoKind::Read | IoKind::Write) {
            self.buf.as_mut_ptr()
        } else {
            std::ptr::null_mut()
        };
        assert!(len as usize <= self.buf.len() || !matches!(kind, IoKind::Read | IoKind::Write));
        let req = IoRequest {
            tag: 1,
            kind,
            offset_bytes: offset,
            len_bytes: len as u32,
            buf,
            buf_index: BUF_INDEX_NONE,
            fua,
        };
        // SAFETY: `buf` is our own AlignedBuf, alive and untouched until the call returns.
        let rc = unsafe { submit_and_wait(self.chans[tier].as_mut(), &req) };
        if rc < 0 {
            return Err(io_error(
                &format!(
                    "tier {} {:?} at {offset}+{len}",
                    self.tiers[tier].name, kind
                ),
                rc,
            ));
        }
        Ok(())
    }

    fn write_frame_block(&mut self, offset: u64, bytes: &[u8], limit: u64) -> Result<(), String> {
        let len = (bytes.len() as u64).max(1).next_multiple_of(BLOCK_BYTES);
        if len > limit {
            return Err(format!(
                "metadata of {len} bytes exceeds its region of {limit} bytes"
            ));
        }
        if len as usize > self.buf.len() {
            self.buf = AlignedBuf::zeroed(len as usize);
        }
        let b = self.buf.as_mut_slice();
        b[..bytes.len()].copy_from_slice(bytes);
        b[bytes.len()..len as usize].fill(0);
        self.sync(0, IoKind::Write, offset, len, true)
    }

    fn read_region(&mut self, offset: u64, len: u64) -> Result<Vec<u8>, String> {
        if len as usize > self.buf.len() {
            self.buf = AlignedBuf::zeroed(len as usize);
        }
        self.sync(0, IoKind::Read, offset, len, false)?;
        Ok(self.buf.as_slice()[..len as usize].to_vec())
    }

    /// The log bytes `[pos, pos + need)` (cut at the log's end) for replay, read through
    /// `window` (its log offset and bytes) in pieces of at least 1 MiB, so a start reads only
    /// as much of the log as it replays instead of all 31 MiB.
    fn log_slice<'w>(
        &mut self,
        window: &'w mut (u64, Vec<u8>),
        pos: u64,
        need: u64,
    ) -> Result<&'w [u8], String> {
        let end = pos.saturating_add(need).min(LOG_BYTES);
        if pos < window.0 || end > window.0 + window.1.len() as u64 {
            let start = pos - pos % BLOCK_BYTES;
            let len = (end - start)
                .next_multiple_of(BLOCK_BYTES)
                .max(1 << 20)
                .min(LOG_BYTES - start);
            *window = (start, self.read_region(LOG_OFFSET + start, len)?);
        }
        Ok(&window.1[(pos - window.0) as usize..(end - window.0) as usize])
    }

    /// Opens the journal on `tiers[0]`, formatting blank media, and recovers
    /// every volume's map: checkpoint, then log replay up to the torn tail.
    pub fn open(tiers: Vec<MetaTier>, volumes: Vec<Arc<Volume>>) -> Result<MetaService, String> {
        assert!(!tiers.is_empty());
        let mut chans = Vec::new();
        for t in &tiers {
            let info = t.device.info();
            if t.capacity_bytes > info.size_bytes() {
                return Err(format!(
                    "tier '{}': capacity {} is larger than the device {} ({})",
                    t.name,
                    crate::units::format_size(t.capacity_bytes),
                    info.name,
                    crate::units::format_size(info.size_bytes())
                ));
            }
            if !info.persistent {
                return Err(format!(
                    "tier '{}': device {} does not store data",
                    t.name, info.name
                ));
            }
            chans.push(
                t.device
                    .open_channel(&ChannelOptions {
                        queue_depth: 4,
                        pool: None,
                    })
                    .map_err(|e| e.to_string())?,
            );
        }
        if tiers[0].capacity_bytes < META_BYTES + GRANULE_BYTES {
            return Err(format!(
                "tier '{}': the fastest tier holds the {} metadata region and needs more capacity",
                tiers[0].name,
                crate::units::format_size(META_BYTES)
            ));
        }
        let object: Vec<_> = tiers.iter().map(|t| t.device.object_tier()).collect();
        if object[0].is_some() {
            return Err(format!(
                "tier '{}': an object-storage tier cannot be the first tier (it holds the metadata)",
                tiers[0].name
            ));
        }
        let allocators = tiers
            .iter()
            .enumerate()
            .map(|(i, t)| {
                if object[i].is_some() {
                    // Addressed by generation (see next_object_generation), not packed.
                    return TierAllocator::new(
                        0,
                        crate::bdev::object::DEVICE_BYTES / GRANULE_BYTES,
                    );
                }
                let first = if i == 0 {
                    META_BYTES / GRANULE_BYTES
                } else {
                    0
                };
                TierAllocator::new(first, t.capacity_bytes / GRANULE_BYTES - first)
            })
            .collect();
        let mut svc = MetaService {
            tiers,
            chans,
            allocators,
            volumes,
            orphans: Vec::new(),
            state: JournalState {
                generation: 0,
                checkpoint_slot: 0,
                next_seq: 1,
                log_pos: 0,
                replayed_records: 0,
                runtime_tiers: Vec::new(),
                moves: Vec::new(),
            },
            buf: AlignedBuf::zeroed(1 << 20),
            config_tiers: 0,
            object,
            object_gen_base: 0,
            object_gen_next: 0,
        };
        svc.config_tiers = svc.tiers.len();
        svc.recover()?;
        svc.object_gen_base = svc.state.generation << OBJECT_GEN_COUNTER_BITS;
        svc.publish_usage();
        Ok(svc)
    }

    fn tier_table(&self) -> Vec<(String, u64)> {
        self.tiers[..self.config_tiers]
            .iter()
            .map(|t| (t.name.clone(), t.capacity_bytes))
            .collect()
    }

    fn recover(&mut self) -> Result<(), String> {
        let mut best: Option<Superblock> = None;
        let mut blank = true;
        for off in SUPERBLOCK_OFFSETS {
            let raw = self.read_region(off, SUPERBLOCK_BYTES)?;
            if raw.iter().any(|&b| b != 0) {
                blank = false;
            }
            match frame::decode::<Superblock>(MAGIC_SUPERBLOCK, &raw) {
                Ok((_, sb, _)) if sb.version == FORMAT_VERSION => {
                    if best.as_ref().is_none_or(|b| sb.generation > b.generation) {
                        best = Some(sb);
                    }
                }
                Ok((_, sb, _)) => {
                    return Err(format!(
                        "superblock version {} is not supported (this is {FORMAT_VERSION})",
                        sb.version
                    ))
                }
                Err(e) if raw.iter().any(|&b| b != 0) => {
                    tracing::warn!(
                        "superblock copy at {off} is unreadable ({e}); using the other copy"
                    );
                }
                Err(_) => {}
            }
        }
        let Some(sb) = best else {
            if !blank {
                return Err(format!(
                    "tier '{}': both superblock copies are corrupt; refusing to format over existing data",
                    self.tiers[0].name
                ));
            }
            tracing::info!(tier = %self.tiers[0].name, "blank metadata region: formatting");
            // A fresh log: zero its first block so no stale frame can be replayed.
            self.write_frame_block(LOG_OFFSET, &[], BLOCK_BYTES)?;
            self.state.generation = 0;
            self.state.checkpoint_slot = 1;
            self.write_checkpoint()?;
            return Ok(());
        };
        if sb.tiers != self.tier_table() {
            return Err(format!(
                "the tier list {:?} differs from the one the metadata was formatted with {:?}; tiers cannot be renamed, reordered or resized",
                self.tier_table(),
                sb.tiers
            ));
        }
        assert_eq!(sb.granule_bytes, GRANULE_BYTES);
        // Checkpoint.
        let slot_off = CHECKPOINT_OFFSETS[sb.checkpoint_slot as usize];
        let head = self.read_region(slot_off, BLOCK_BYTES)?;
        let len = u32::from_le_bytes(head[4..8].try_into().unwrap()) as u64
            + frame::FRAME_HEADER_BYTES as u64;
        if len > CHECKPOINT_BYTES_MAX {
            return Err(format!(
                "checkpoint in slot {} has an impossible length {len}",
                sb.checkpoint_slot
            ));
        }
        let raw = self.read_region(slot_off, len.next_multiple_of(BLOCK_BYTES))?;
        let (seq, ckpt) = self
            .decode_checkpoint(&raw)
            .map_err(|e| format!("checkpoint in slot {} is corrupt: {e}", sb.checkpoint_slot))?;
        if seq != sb.checkpoint_seq {
            return Err(format!(
                "checkpoint sequence {seq} does not match the superblock's {}",
                sb.checkpoint_seq
            ));
        }
        for image in ckpt.volumes {
            match self.volumes.iter().position(|v| v.name == image.name) {
                Some(i) => {
                    let v = &self.volumes[i];
                    if v.size_bytes != image.size_bytes {
                        return Err(format!(
                            "volume '{}' is {} on disk but {} in the config; resizing is not supported",
                            v.name,
                            crate::units::format_size(image.size_bytes),
                            crate::units::format_size(v.size_bytes)
                        ));
                    }
                    for r in &image.runs {
                        v.map.set_run(
                            r.first_granule,
                            r.count,
                            Some(Location {
                                tier: r.tier,
                                phys_granule: r.phys_granule,
                            }),
                        );
                    }
                }
                None => {
                    tracing::warn!(volume = %image.name, "volume on disk is not in the config; its space stays reserved");
                    self.orphans.push(image);
                }
            }
        }
        // Log replay.
        let mut expected = sb.checkpoint_seq + 1;
        let mut pos = 0u64;
        let mut replayed = 0u64;
        let hdr = frame::FRAME_HEADER_BYTES as u64;
        let mut window = (0u64, Vec::new());
        'scan: while pos + hdr <= LOG_BYTES {
            if self.log_slice(&mut window, pos, hdr)?[..4] == [0, 0, 0, 0] {
                // Padding to the end of a commit; the next commit starts on a block boundary.
                let next = (pos + 1).next_multiple_of(BLOCK_BYTES);
                if pos % BLOCK_BYTES == 0 || next >= LOG_BYTES {
                    break;
                }
                pos = next;
                continue;
            }
            let head = self.log_slice(&mut window, pos, hdr)?;
            // A foreign or garbage length fails the decode below; never read more for it.
            let len = u64::from(u32::from_le_bytes(head[4..8].try_into().unwrap()))
                .min(frame::FRAME_PAYLOAD_BYTES_MAX as u64);
            let at = self.log_slice(&mut window, pos, hdr + len)?;
            match frame::decode::<Record>(MAGIC_RECORD, at) {
                Ok((seq, rec, used)) if seq == expected => {
                    self.apply(&rec, true)
                        .map_err(|e| format!("log record {seq}: {e}"))?;
                    expected += 1;
                    replayed += 1;
                    pos += used as u64;
                }
                Ok((seq, _, _)) => {
                    tracing::debug!(seq, expected, "log ends at an older record");
                    break 'scan;
                }
                Err(e) => {
                    tracing::info!(pos, "log ends at a torn or invalid frame: {e}");
                    break 'scan;
                }
            }
        }
        self.state = JournalState {
            generation: sb.generation,
            checkpoint_slot: sb.checkpoint_slot,
            next_seq: expected,
            log_pos: pos.next_multiple_of(BLOCK_BYTES),
            replayed_records: replayed,
            runtime_tiers: std::mem::take(&mut self.state.runtime_tiers),
            moves: std::mem::take(&mut self.state.moves),
        };
        // Reserve orphaned volumes' space and every mapped granule in the allocators.
        let mut claims: Vec<(u8, u64, u64)> = Vec::new();
        for v in &self.volumes {
            for (_, count, loc) in v.map.runs() {
                if let Some(l) = loc {
                    claims.push((l.tier, l.phys_granule, count));
                }
            }
        }
        for image in &self.orphans {
            for r in &image.runs {
                claims.push((r.tier, r.phys_granule, r.count));
            }
        }
        for (tier, phys, count) in claims {
            self.allocators[tier as usize].reserve(phys, count);
        }
        tracing::info!(
            generation = sb.generation,
            checkpoint_seq = sb.checkpoint_seq,
            replayed,
            "metadata recovered"
        );
        // Start from a clean checkpoint so the next replay is short.
        self.write_checkpoint()?;
        Ok(())
    }

    /// Applies a record to the maps. During replay the allocators are rebuilt
    /// afterwards from the maps, so only the maps change here.
    fn apply(&mut self, rec: &Record, replay: bool) -> Result<(), String> {
        let find = |name: &str| self.volumes.iter().position(|v| v.name == name);
        match rec {
            Record::Map {
                volume,
                first_granule,
                count,
                tier,
                phys_granule,
            } => {
                let Some(i) = find(volume) else {
                    return if replay {
                        Ok(())
                    } else {
                        Err(format!("unknown volume '{volume}'"))
                    };
                };
                if *tier as usize >= self.tiers.len() {
                    return Err(format!("record names tier {tier}, which does not exist"));
                }
                self.volumes[i].map.set_run(
                    *first_granule,
                    *count,
                    Some(Location {
                        tier: *tier,
                        phys_granule: *phys_granule,
                    }),
                );
            }
            Record::Unmap {
                volume,
                first_granule,
                count,
            } => {
                let Some(i) = find(volume) else { return Ok(()) };
                self.volumes[i].map.set_run(*first_granule, *count, None);
            }
            Record::AddTier { .. }
            | Record::VolumeMoveStart { .. }
            | Record::VolumeMoveDone { .. } => self.apply_runtime(rec, replay)?,
        }
        Ok(())
    }

    fn write_checkpoint(&mut self) -> Result<u64, String> {
        let mut volumes: Vec<VolumeImage> = self
            .volumes
            .iter()
            .map(|v| VolumeImage {
                name: v.name.clone(),
                size_bytes: v.size_bytes,
                runs: v
                    .map
                    .runs()
                    .into_iter()
                    .filter_map(|(first, count, loc)| {
                        loc.map(|l| MappedRun {
                            first_granule: first,
                            count,
                            tier: l.tier,
                            phys_granule: l.phys_granule,
                        })
                    })
                    .collect(),
            })
            .collect();
        volumes.extend(self.orphans.iter().cloned());
        let seq = self.state.next_seq - 1;
        let bytes = self.encode_checkpoint(seq, volumes);
        let slot = 1 - self.state.checkpoint_slot;
        self.write_frame_block(
            CHECKPOINT_OFFSETS[slot as usize],
            &bytes,
            CHECKPOINT_BYTES_MAX,
        )?;
        let generation = self.state.generation + 1;
        let sb = Superblock {
            version: FORMAT_VERSION,
            generation,
            tiers: self.tier_table(),
            granule_bytes: GRANULE_BYTES,
            checkpoint_slot: slot,
            checkpoint_seq: seq,
        };
        let mut sb_bytes = Vec::new();
        frame::encode(MAGIC_SUPERBLOCK, generation, &sb, &mut sb_bytes);
        // Read it back before trusting it (assert metadata before and after writing).
        assert!(
            frame::decode::<Superblock>(MAGIC_SUPERBLOCK, &sb_bytes).is_ok_and(|(_, s, _)| s == sb)
        );
        self.write_frame_block(
            SUPERBLOCK_OFFSETS[(generation % 2) as usize],
            &sb_bytes,
            SUPERBLOCK_BYTES,
        )?;
        self.state.generation = generation;
        self.state.checkpoint_slot = slot;
        self.state.log_pos = 0;
        Ok(seq)
    }

    /// Writes records as one commit (FUA). Checkpoints first if the log is full.
    fn commit(&mut self, records: &[Record]) -> Result<(), String> {
        if records.is_empty() {
            return Ok(());
        }
        let mut bytes = Vec::new();
        for (i, r) in records.iter().enumerate() {
            frame::encode(MAGIC_RECORD, self.state.next_seq + i as u64, r, &mut bytes);
        }
        let len = (bytes.len() as u64).next_multiple_of(BLOCK_BYTES);
        if self.state.log_pos + len > LOG_BYTES * 3 / 4 {
            self.write_checkpoint()?;
        }
        if len > LOG_BYTES {
            return Err("commit larger than the log".into());
        }
        self.write_frame_block(
            LOG_OFFSET + self.state.log_pos,
            &bytes,
            LOG_BYTES - self.state.log_pos,
        )?;
        self.state.log_pos += len;
        self.state.next_seq += records.len() as u64;
        Ok(())
    }

    fn publish_usage(&self) {
        for (t, a) in self.tiers.iter().zip(&self.allocators) {
            t.usage
                .capacity_bytes
                .store(t.capacity_bytes, Ordering::Relaxed);
            let reserved = if std::ptr::eq(t, &self.tiers[0]) {
                META_BYTES
            } else {
                0
            };
            t.usage.used_bytes.store(
                a.used_granules() * GRANULE_BYTES + reserved,
                Ordering::Relaxed,
            );
        }
    }

    pub fn state(&self) -> &JournalState {
        &self.state
    }

    /// Handles a batch of allocation/unmap requests with one journal commit.
    fn handle_batch(&mut self, batch: Vec<MetaRequest>) {
        let mut records = Vec::new();
        let mut replies: Vec<(Reply, i32)> = Vec::new();
        let mut applied: Vec<Record> = Vec::new();
        let mut to_free: Vec<(u8, u64, u64)> = Vec::new();
        let mut new_space: Vec<(u8, u64, u64)> = Vec::new();
        for req in batch {
            match req {
                MetaRequest::Allocate {
                    volume,
                    offset_bytes,
                    len_bytes,
                    reply,
                } => {
                    let v = self.volumes[volume].clone();
                    let chunk_granules = v.chunk_bytes / GRANULE_BYTES;
                    let first_chunk = offset_bytes / v.chunk_bytes;
                    let last_chunk = (offset_bytes + len_bytes - 1) / v.chunk_bytes;
                    let mut rc = 0;
                    for c in first_chunk..=last_chunk {
                        let g0 = c * chunk_granules;
                        let pending = records.iter().any(|r| matches!(r, Record::Map { volume: n, first_granule, .. } if *n == v.name && *first_granule == g0));
                        if pending || (g0..g0 + chunk_granules).all(|g| v.map.get(g).is_some()) {
                            continue;
                        }
                        if (g0..g0 + chunk_granules).any(|g| v.map.get(g).is_some()) {
                            // Partly mapped chunk (after a split): map the holes one granule at a time.
                            for g in g0..g0 + chunk_granules {
                                if v.map.get(g).is_none() {
                                    match self.place_for(volume, 1) {
                                        Some((tier, phys)) => {
                                            new_space.push((tier, phys, 1));
                                            records.push(Record::Map {
                                                volume: v.name.clone(),
                                                first_granule: g,
                                                count: 1,
                                                tier,
                                                phys_granule: phys,
                                            });
                                        }
                                        None => rc = -libc::ENOSPC,
                                    }
                                }
                            }
                            continue;
                        }
                        match self.place_for(volume, chunk_granules) {
                            Some((tier, phys)) => {
                                new_space.push((tier, phys, chunk_granules));
                                records.push(Record::Map {
                                    volume: v.name.clone(),
                                    first_granule: g0,
                                    count: chunk_granules,
                                    tier,
                                    phys_granule: phys,
                                });
                            }
                            None => {
                                rc = -libc::ENOSPC;
                                break;
                            }
                        }
                    }
                    if rc == -libc::ENOSPC {
                        tracing::warn!(volume = %v.name, "every tier is full: write refused with ENOSPC");
                    }
                    replies.push((reply, rc));
                }
                MetaRequest::Unmap {
                    volume,
                    offset_bytes,
                    len_bytes,
                    reply,
                } => {
                    let v = self.volumes[volume].clone();
                    let g = GRANULE_BYTES;
                    let first = offset_bytes.div_ceil(g);
                    let end = (offset_bytes + len_bytes) / g;
                    for (f, count, loc) in v.map.runs() {
                        let (s, e) = (f.max(first), (f + count).min(end));
                        if let (Some(l), true) = (loc, s < e) {
                            records.push(Record::Unmap {
                                volume: v.name.clone(),
                                first_granule: s,
                                count: e - s,
                            });
                            to_free.push((l.tier, l.phys_granule + (s - f), e - s));
                        }
                    }
                    replies.push((reply, 0));
                }
                _ => unreachable!("only Allocate and Unmap are batched"),
            }
        }
        // New space must read as zeros before the map points at it.
        let mut result = Ok(());
        for &(tier, phys, count) in &new_space {
            if let Err(e) = self.sync(
                tier as usize,
                IoKind::WriteZeroes,
                phys * GRANULE_BYTES,
                count * GRANULE_BYTES,
                false,
            ) {
                result = Err(e);
                break;
            }
        }
        // ... durably: the map record is FUA, and on a device with a volatile write cache
        // the zeros could otherwise be lost at a crash while the record survives, exposing
        // the space's previous contents (found by `kiln sim`, seed 1).
        let mut zeroed: Vec<u8> = new_space.iter().map(|&(t, _, _)| t).collect();
        zeroed.sort_unstable();
        zeroed.dedup();
        for tier in zeroed {
            if result.is_ok() {
                result = self.sync(tier as usize, IoKind::Flush, 0, 0, false);
            }
        }
        if result.is_ok() {
            result = self.commit(&records);
        }
        match result {
            Ok(()) => {
                for r in &records {
                    self.apply(r, false).expect("a record built here applies");
                    applied.push(r.clone());
                }
                // Space is freed only after the unmap record is durable.
                for (tier, phys, count) in to_free {
                    self.free_space(tier, phys, count);
                }
                self.publish_usage();
                for (reply, rc) in replies {
                    reply(rc);
                }
            }
            Err(e) => {
                tracing::error!("metadata commit failed: {e}; failing the requests with EIO");
                for (tier, phys, count) in new_space {
                    self.allocators[tier as usize].free(phys, count);
                }
                for (reply, _) in replies {
                    reply(-libc::EIO);
                }
            }
        }
    }

    /// Journals and applies a migration's switch.
    fn switch(
        &mut self,
        volume: usize,
        first: u64,
        count: u64,
        from: Location,
        to: Location,
    ) -> Result<(), String> {
        let v = self.volumes[volume].clone();
        for i in 0..count {
            let expected = Location {
                tier: from.tier,
                phys_granule: from.phys_granule + i,
            };
            if v.map.get(first + i) != Some(expected) {
                return Err(format!(
                    "granule {} of '{}' moved during the copy",
                    first + i,
                    v.name
                ));
            }
        }
        let rec = Record::Map {
            volume: v.name.clone(),
            first_granule: first,
            count,
            tier: to.tier,
            phys_granule: to.phys_granule,
        };
        self.commit(std::slice::from_ref(&rec))?;
        self.apply(&rec, false)?;
        self.publish_usage();
        Ok(())
    }

    /// Journals and applies the switch of several runs in one commit. Each
    /// record is valid on its own, so a torn commit leaves some runs switched
    /// and the others where they were, every one of them complete.
    fn switch_many(
        &mut self,
        volume: usize,
        runs: &[(u64, u64, Location, Location)],
    ) -> Result<(), String> {
        let v = self.volumes[volume].clone();
        let mut records = Vec::new();
        for &(first, count, from, to) in runs {
            for i in 0..count {
                let expected = Location {
                    tier: from.tier,
                    phys_granule: from.phys_granule + i,
                };
                if v.map.get(first + i) != Some(expected) {
                    return Err(format!(
                        "granule {} of '{}' moved during the copy",
                        first + i,
                        v.name
                    ));
                }
            }
            records.push(Record::Map {
                volume: v.name.clone(),
                first_granule: first,
                count,
                tier: to.tier,
                phys_granule: to.phys_granule,
            });
        }
        self.commit(&records)?;
        for r in &records {
            self.apply(r, false)?;
        }
        self.publish_usage();
        Ok(())
    }

    /// Frees space; on an object tier, deletes the objects no granule uses any
    /// more (the map change that freed them is already durable).
    fn free_space(&mut self, tier: u8, phys: u64, count: u64) {
        self.allocators[tier as usize].free(phys, count);
        if let Some(o) = &self.object[tier as usize] {
            let span = crate::bdev::object::OBJECT_SPAN_GRANULES;
            let a = &self.allocators[tier as usize];
            let gens: Vec<u64> = (phys / span..(phys + count).div_ceil(span))
                .filter(|g| a.is_free(g * span, span))
                .collect();
            o.delete_later(gens);
        }
    }

    /// A generation never used before, on any run of this metadata: the
    /// superblock generation (durable, and higher at every start than any
    /// generation of an earlier start) shifted left, plus a counter. When the
    /// counter runs out, a checkpoint raises the superblock generation.
    fn next_object_generation(&mut self) -> Result<u64, String> {
        if self.object_gen_next >= 1 << OBJECT_GEN_COUNTER_BITS {
            self.write_checkpoint()?;
            self.object_gen_base = self.state.generation << OBJECT_GEN_COUNTER_BITS;
            self.object_gen_next = 0;
        }
        let gen = self.object_gen_base | self.object_gen_next;
        self.object_gen_next += 1;
        Ok(gen)
    }

    /// Reserves one object's worth of an object tier: a fresh generation.
    fn reserve_object(&mut self, tier: u8, granules: u64) -> Result<u64, String> {
        let span = crate::bdev::object::OBJECT_SPAN_GRANULES;
        let t = &self.tiers[tier as usize];
        let a = &self.allocators[tier as usize];
        if granules == 0 || granules > span {
            return Err(format!(
                "tier '{}': an object holds 1..={span} granules, not {granules}",
                t.name
            ));
        }
        if (a.used_granules() + granules) * GRANULE_BYTES > t.capacity_bytes {
            return Err(format!("tier '{}' is full", t.name));
        }
        let gen = self.next_object_generation()?;
        let phys = gen
            .checked_mul(span)
            .filter(|p| p + span <= self.allocators[tier as usize].total_granules)
            .ok_or_else(|| format!("object generation {gen} is out of address space"))?;
        self.allocators[tier as usize].reserve(phys, granules);
        self.publish_usage();
        Ok(phys)
    }

    /// Picks the fastest tier with room for `granules` contiguous granules.
    fn place(&mut self, granules: u64) -> Option<(u8, u64)> {
        for (i, a) in self.allocators.iter_mut().enumerate() {
            if self.object[i].is_some() {
                // New data never lands on an object tier; it is demoted there whole.
                continue;
            }
            if let Some(phys) = a.alloc(granules, granules.min(16)) {
                return Some((i as u8, phys));
            }
        }
        None
    }

    /// Runs the service on the current thread until shutdown.
    pub fn run(mut self, rx: Receiver<MetaRequest>) {
        self.serve(&rx, false);
    }

    /// Handles every request already queued, without blocking (the simulator drives the
    /// service this way from its own loop). Returns whether any was handled; after a
    /// `Shutdown` the service must not be used again.
    pub fn serve_pending(&mut self, rx: &Receiver<MetaRequest>) -> bool {
        self.serve(rx, true)
    }

    /// The service loop: batches whatever is queued into one commit. `pending_only` returns
    /// once the queue is empty instead of waiting. Returns whether any request was handled.
    fn serve(&mut self, rx: &Receiver<MetaRequest>, pending_only: bool) -> bool {
        let mut served = false;
        loop {
            let first = if pending_only {
                match rx.try_recv() {
                    Ok(r) => r,
                    Err(_) => return served,
                }
            } else {
                match rx.recv_timeout(Duration::from_millis(500)) {
                    Ok(r) => r,
                    Err(crossbeam_channel::RecvTimeoutError::Timeout) => continue,
                    Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return served,
                }
            };
            served = true;
            let mut batch = vec![first];
            while batch.len() < 1024 {
                match rx.try_recv() {
                    Ok(r) => batch.push(r),
                    Err(_) => break,
                }
            }
            let mut work = Vec::new();
            for req in batch {
                match req {
                    MetaRequest::Checkpoint { reply } => {
                        self.handle_batch(std::mem::take(&mut work));
                        let _ = reply.send(self.write_checkpoint());
                    }
                    MetaRequest::Reserve {
                        tier,
                        granules,
                        reply,
                    } if self.object.get(tier as usize).is_some_and(|o| o.is_some()) => {
                        let _ = reply.send(self.reserve_object(tier, granules));
                    }
                    MetaRequest::SwitchMany {
                        volume,
                        runs,
                        reply,
                    } => {
                        self.handle_batch(std::mem::take(&mut work));
                        let _ = reply.send(self.switch_many(volume, &runs));
                    }
                    MetaRequest::ObjectGarbage { tier, gens, reply } => {
                        let span = crate::bdev::object::OBJECT_SPAN_GRANULES;
                        let a = &self.allocators[tier as usize];
                        let dead = gens
                            .into_iter()
                            .filter(|&g| {
                                g.checked_mul(span).is_some_and(|p| {
                                    p + span <= a.total_granules && a.is_free(p, span)
                                })
                            })
                            .collect();
                        let _ = reply.send(dead);
                    }
                    MetaRequest::Reserve {
                        tier,
                        granules,
                        reply,
                    } => {
                        let r = self
                            .allocators
                            .get_mut(tier as usize)
                            .and_then(|a| a.alloc(granules, 1))
                            .ok_or_else(|| {
                                format!("tier {tier} has no room for {granules} granules")
                            });
                        self.publish_usage();
                        let _ = reply.send(r);
                    }
                    MetaRequest::Switch {
                        volume,
                        first_granule,
                        count,
                        from,
                        to,
                        reply,
                    } => {
                        self.handle_batch(std::mem::take(&mut work));
                        let _ = reply.send(self.switch(volume, first_granule, count, from, to));
                    }
                    MetaRequest::Release {
                        tier,
                        phys_granule,
                        count,
                    } => {
                        self.free_space(tier, phys_granule, count);
                        self.publish_usage();
                    }
                    MetaRequest::Shutdown { reply } => {
                        self.handle_batch(std::mem::take(&mut work));
                        let r = self.write_checkpoint();
                        let _ = reply.send(r);
                        return true;
                    }
                    MetaRequest::AddTier {
                        name,
                        device,
                        capacity_bytes,
                        reply,
                    } => {
                        self.handle_batch(std::mem::take(&mut work));
                        let _ = reply.send(self.add_tier(&name, &device, capacity_bytes));
                    }
                    MetaRequest::VolumeMove {
                        volume,
                        to_tier,
                        params,
                        done,
                        reply,
                    } => {
                        self.handle_batch(std::mem::take(&mut work));
                        let _ = reply.send(self.volume_move(volume, to_tier, params, done));
                    }
                    MetaRequest::TrimFree { tier, reply } => {
                        self.handle_batch(std::mem::take(&mut work));
                        let _ = reply.send(self.trim_free(tier));
                    }
                    other => work.push(other),
                }
            }
            if !work.is_empty() {
                self.handle_batch(work);
            }
        }
    }
}

/// Opens (recovers) the metadata on its own thread and runs the service there.
/// Channels are per thread, so the service must be built where it runs.
pub fn start(
    tiers: Vec<MetaTier>,
    volumes: Vec<Arc<Volume>>,
) -> Result<
    (
        Sender<MetaRequest>,
        std::thread::JoinHandle<()>,
        JournalState,
    ),
    String,
> {
    let (tx, rx) = crossbeam_channel::unbounded();
    let (ready_tx, ready_rx) = crossbeam_channel::bounded(1);
    let handle = std::thread::Builder::new()
        .name("kiln-meta".into())
        .spawn(move || match MetaService::open(tiers, volumes) {
            Ok(svc) => {
                let _ = ready_tx.send(Ok(svc.state().clone()));
                svc.run(rx);
            }
            Err(e) => {
                let _ = ready_tx.send(Err(e));
            }
        })
        .map_err(|e| format!("cannot start the metadata thread: {e}"))?;
    let state = ready_rx
        .recv()
        .map_err(|_| "the metadata thread died during recovery".to_string())??;
    Ok((tx, handle, state))
}
