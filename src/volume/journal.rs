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
//! A change is durable when its log commit (written with FUA) completes and reads
//! back as written; only then is it applied to the in-memory map and acknowledged.
//! Every durable metadata write (log commit, checkpoint slot, superblock copy) is
//! read back: a write reported done that is not where it was addressed (misdirected
//! or lost) is rewritten, and after [`VERIFY_REWRITES`] rewrites the metadata device
//! is failed (see docs/FORMAT.md, "Media assumptions").

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
use crate::crashpoint::crashpoint;
use crate::dma::AlignedBuf;
use crate::frame;

mod runtime;
pub use runtime::{
    CheckpointExt, MoveParams, RuntimeTier, RuntimeTierOpen, VolumeMoveState, MAGIC_CHECKPOINT_EXT,
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

/// How many times a durable metadata write whose read-back differs is rewritten before the
/// metadata device is failed.
pub const VERIFY_REWRITES: u32 = 3;

/// Counters of the metadata service, shared with metrics.
#[derive(Debug, Default)]
pub struct JournalStats {
    /// Durable metadata writes reported done whose read-back differed from what was written
    /// (misdirected or lost); each was rewritten.
    pub misdirected_writes: AtomicU64,
    /// Set once a durable metadata write could not be verified: every later change fails.
    pub failed: AtomicBool,
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
    pub stats: Arc<JournalStats>,
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
    /// Where durable metadata writes are read back into (as large as `buf` needed).
    verify_buf: AlignedBuf,
    /// Whether durable metadata writes are read back (see `open_verified`).
    verify_writes: bool,
    /// Why the metadata device was failed: a write that never read back as written.
    failed: Option<String>,
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
            assert!(len as usize <= self.buf.len());
            self.buf.as_mut_ptr()
        } else {
            std::ptr::null_mut()
        };
        self.sync_buf(tier, kind, offset, len, fua, buf)
    }

    /// `sync` with `buf`: null, or `self.buf` or `self.verify_buf` holding `len` bytes.
    fn sync_buf(
        &mut self,
        tier: usize,
        kind: IoKind,
        offset: u64,
        len: u64,
        fua: bool,
        buf: *mut u8,
    ) -> Result<(), String> {
        let req = IoRequest {
            tag: 1,
            kind,
            offset_bytes: offset,
            len_bytes: len as u32,
            buf,
            buf_index: BUF_INDEX_NONE,
            fua,
        };
        // SAFETY: `buf` is null or one of our own AlignedBufs of at least `len` bytes (the
        // callers' contract), alive and untouched until the call returns.
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
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
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
        // A write that fails outright changed nothing the caller relies on: not fatal.
        self.sync(0, IoKind::Write, offset, len, true)?;
        if self.verify_writes {
            self.verify_write(offset, len)?;
        }
        Ok(())
    }

    /// Reads back the durable write of `self.buf[..len]` at `offset` of the metadata region
    /// and rewrites it while it differs (misdirected or lost: reported done but not there),
    /// up to [`VERIFY_REWRITES`] times. If it still does not read back as written, the
    /// metadata device is failed: a copy of it may sit elsewhere in the region (another
    /// superblock copy, say), so no later change may assume what the media holds.
    fn verify_write(&mut self, offset: u64, len: u64) -> Result<(), String> {
        if len as usize > self.verify_buf.len() {
            self.verify_buf = AlignedBuf::zeroed(len as usize);
        }
        let what = region_name(offset);
        let mut last = String::new();
        for attempt in 0..=VERIFY_REWRITES {
            if attempt > 0 {
                if let Err(e) = self.sync(0, IoKind::Write, offset, len, true) {
                    last = format!("rewrite failed: {e}");
                    continue;
                }
            }
            let dst = self.verify_buf.as_mut_ptr();
            if let Err(e) = self.sync_buf(0, IoKind::Read, offset, len, false, dst) {
                let tier = &self.tiers[0].name;
                tracing::warn!(%tier, offset, len, what, "metadata read-back failed: {e}");
                last = format!("read-back failed: {e}");
                continue;
            }
            let n = len as usize;
            if self.verify_buf.as_slice()[..n] == self.buf.as_slice()[..n] {
                return Ok(());
            }
            self.state
                .stats
                .misdirected_writes
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                tier = %self.tiers[0].name,
                offset,
                len,
                what,
                rewrites_left = VERIFY_REWRITES - attempt,
                "metadata write reported done but reads back different (misdirected or lost)"
            );
            last = "it reads back different (misdirected or lost)".into();
        }
        let tier = &self.tiers[0].name;
        let e = format!(
            "metadata device failed: tier '{tier}' {what} at byte {offset}+{len} did not read \
             back as written after {VERIFY_REWRITES} rewrites ({last}); no further metadata \
             change is accepted"
        );
        tracing::error!("{e}");
        self.state.stats.failed.store(true, Ordering::Relaxed);
        self.failed = Some(e.clone());
        Err(e)
    }

    fn read_region(&mut self, offset: u64, len: u64) -> Result<Vec<u8>, String> {
        if len as usize > self.buf.len() {
            self.buf = AlignedBuf::zeroed(len as usize);
        }
        self.sync(0, IoKind::Read, offset, len, false)?;
        Ok(self.buf.as_slice()[..len as usize].to_vec())
    }

    /// Opens the journal on `tiers[0]`, formatting blank media, and recovers
    /// every volume's map: checkpoint, then log replay up to the torn tail.
    pub fn open(tiers: Vec<MetaTier>, volumes: Vec<Arc<Volume>>) -> Result<MetaService, String> {
        Self::open_verified(tiers, volumes, true)
    }

    /// [`MetaService::open`], with the read-back of durable metadata writes on or off (off
    /// only to show what it prevents: the simulator's `--no-verify-writes`).
    pub fn open_verified(
        tiers: Vec<MetaTier>,
        volumes: Vec<Arc<Volume>>,
        verify_writes: bool,
    ) -> Result<MetaService, String> {
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
                stats: Arc::new(JournalStats::default()),
            },
            buf: AlignedBuf::zeroed(1 << 20),
            verify_buf: AlignedBuf::zeroed(1 << 20),
            verify_writes,
            failed: None,
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
        let tiers = self.tier_table();
        // The configured tiers' address spaces (an object tier's is not its capacity).
        let tier_granules: Vec<u64> = self.allocators.iter().map(|a| a.end_granule()).collect();
        let volumes = self.volumes.clone();
        let found = recover_region(
            &mut |offset, len| self.read_region(offset, len),
            &tiers,
            &tier_granules,
            &volumes,
        )?;
        let Some(r) = found else {
            tracing::info!(tier = %self.tiers[0].name, "blank metadata region: formatting");
            // A fresh log: zero its first block so no stale frame can be replayed.
            self.write_frame_block(LOG_OFFSET, &[], BLOCK_BYTES)?;
            self.state.generation = 0;
            self.state.checkpoint_slot = 1;
            self.write_checkpoint()?;
            return Ok(());
        };
        // Reopen the runtime tiers (their files must still exist), then claim every mapped
        // granule, on configured and runtime tiers alike.
        self.reopen_tiers(r.runtime_tiers)?;
        claim_mapped(&self.volumes, &r.orphans, &mut self.allocators)?;
        self.orphans = r.orphans;
        self.state = JournalState {
            generation: r.superblock.generation,
            checkpoint_slot: r.superblock.checkpoint_slot,
            next_seq: r.next_seq,
            log_pos: r.log_pos,
            replayed_records: r.replayed_records,
            runtime_tiers: std::mem::take(&mut self.state.runtime_tiers),
            moves: r.moves,
            stats: self.state.stats.clone(),
        };
        tracing::info!(
            generation = r.superblock.generation,
            checkpoint_seq = r.superblock.checkpoint_seq,
            replayed = r.replayed_records,
            "metadata recovered"
        );
        // Start from a clean checkpoint so the next replay is short.
        self.write_checkpoint()?;
        Ok(())
    }

    /// Applies a record to the maps. During replay the allocators are rebuilt
    /// afterwards from the maps, so only the maps change here.
    fn apply(&mut self, rec: &Record, replay: bool) -> Result<(), String> {
        match rec {
            Record::Map { .. } | Record::Unmap { .. } => {
                let tier_granules: Vec<u64> =
                    self.allocators.iter().map(|a| a.end_granule()).collect();
                apply_record(&self.volumes, &tier_granules, rec, replay)
            }
            Record::AddTier { .. }
            | Record::VolumeMoveStart { .. }
            | Record::VolumeMoveDone { .. } => self.apply_runtime(rec, replay),
        }
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
        crashpoint("checkpoint.before_slot_write");
        self.write_frame_block(
            CHECKPOINT_OFFSETS[slot as usize],
            &bytes,
            CHECKPOINT_BYTES_MAX,
        )?;
        crashpoint("checkpoint.after_slot_write");
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
        crashpoint("checkpoint.after_superblock_write");
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
            crashpoint("log_wrap.before_checkpoint");
            self.write_checkpoint()?;
            crashpoint("log_wrap.after_checkpoint");
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
        // (`Unmap` records have no crash point: no client operation sends `MetaRequest::Unmap`.)
        let has_map = records.iter().any(|r| matches!(r, Record::Map { .. }));
        if result.is_ok() {
            if has_map {
                crashpoint("alloc.map.before_commit");
            }
            result = self.commit(&records);
            if result.is_ok() && has_map {
                crashpoint("alloc.map.after_commit");
            }
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
        let promote = to.tier < from.tier;
        if promote {
            crashpoint("promote.switch.before_commit");
        } else {
            crashpoint("demote.switch.before_commit");
        }
        self.commit(std::slice::from_ref(&rec))?;
        if promote {
            crashpoint("promote.switch.after_commit");
        } else {
            crashpoint("demote.switch.after_commit");
        }
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
        // Onto an object tier (a demotion's objects) or a block tier (a batch of moves).
        let object = runs
            .first()
            .is_some_and(|r| self.object[r.3.tier as usize].is_some());
        if object {
            crashpoint("object.switch.before_commit");
        } else {
            crashpoint("batch.switch.before_commit");
        }
        self.commit(&records)?;
        if object {
            crashpoint("object.switch.after_commit");
        } else {
            crashpoint("batch.switch.after_commit");
        }
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
        // A fresh generation's space is free; anything else is a broken invariant.
        if let Err(e) = self.allocators[tier as usize].reserve(phys, granules) {
            panic!("object generation {gen}: {e}");
        }
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
                        crashpoint("migrate.release.after_free");
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

/// What [`recover_region`] found in a formatted metadata region.
#[derive(Debug)]
pub struct Recovered {
    /// The newest valid superblock copy.
    pub superblock: Superblock,
    /// Images of volumes on disk that the config no longer names (kept, not exported).
    pub orphans: Vec<VolumeImage>,
    /// Tiers added at run time, from the checkpoint and the log, in index order (after the
    /// configured ones). The caller reopens their devices.
    pub runtime_tiers: Vec<RuntimeTier>,
    /// Whole-volume moves, finished or not.
    pub moves: Vec<VolumeMoveState>,
    /// The sequence the next log record gets.
    pub next_seq: u64,
    /// Where the next commit goes, relative to the start of the log.
    pub log_pos: u64,
    pub replayed_records: u64,
}

/// Reads `len` bytes of the metadata region at `offset`. It may return fewer bytes; those
/// past the end of what it returns read as zeros (blank media).
pub type ReadRegion<'a> = dyn FnMut(u64, u64) -> Result<Vec<u8>, String> + 'a;

/// Recovery from the bytes of a metadata region, whatever device they come from: picks the
/// newest superblock copy, loads its checkpoint (either form, see `runtime.rs`) into the maps
/// of `volumes`, and replays the log up to its torn tail, collecting runtime tiers and volume
/// moves on the way. `tiers` are the configured tiers as `(name, capacity_bytes)` and
/// `tier_granules` their address spaces in granules (an allocator's end). `Ok(None)`: the
/// region is blank and must be formatted. Claiming the mapped space in the allocators is the
/// caller's next step, [`claim_mapped`], once the runtime tiers have allocators too.
///
/// Everything read is checked, frame by frame and run by run: corrupt metadata, even with
/// valid checksums, is an error naming what is wrong, never a panic. The fuzz target
/// `journal_record` feeds it arbitrary regions.
pub fn recover_region(
    read: &mut ReadRegion<'_>,
    tiers: &[(String, u64)],
    tier_granules: &[u64],
    volumes: &[Arc<Volume>],
) -> Result<Option<Recovered>, String> {
    assert!(!tiers.is_empty() && tier_granules.len() == tiers.len());
    let Some(sb) = choose_superblock(read, &tiers[0].0)? else {
        return Ok(None);
    };
    if sb.tiers != tiers {
        return Err(format!(
            "the tier list {tiers:?} differs from the one the metadata was formatted with {:?}; tiers cannot be renamed, reordered or resized",
            sb.tiers
        ));
    }
    // Grows with every runtime tier found, so later runs and records may name it.
    let mut tier_granules = tier_granules.to_vec();
    // Checkpoint.
    let slot_off = CHECKPOINT_OFFSETS[sb.checkpoint_slot as usize];
    let head = read(slot_off, BLOCK_BYTES)?;
    let len = head
        .get(4..8)
        .map_or(0, |b| u32::from_le_bytes(b.try_into().unwrap())) as u64
        + frame::FRAME_HEADER_BYTES as u64;
    if len > CHECKPOINT_BYTES_MAX {
        return Err(format!(
            "checkpoint in slot {} has an impossible length {len}",
            sb.checkpoint_slot
        ));
    }
    let raw = read(slot_off, len.next_multiple_of(BLOCK_BYTES))?;
    let (seq, ckpt) = runtime::decode_checkpoint(&raw)
        .map_err(|e| format!("checkpoint in slot {} is corrupt: {e}", sb.checkpoint_slot))?;
    if seq != sb.checkpoint_seq {
        return Err(format!(
            "checkpoint sequence {seq} does not match the superblock's {}",
            sb.checkpoint_seq
        ));
    }
    for t in &ckpt.tiers {
        runtime::check_runtime_tier(t, tier_granules.len())
            .map_err(|e| format!("checkpoint: {e}"))?;
        tier_granules.push(t.capacity_bytes / GRANULE_BYTES);
    }
    let (runtime_tiers, mut moves) = (ckpt.tiers, ckpt.moves);
    for m in &moves {
        if m.to_tier as usize >= tier_granules.len() {
            return Err(format!(
                "checkpoint: the move of volume '{}' names tier {}, which does not exist",
                m.volume, m.to_tier
            ));
        }
    }
    let mut orphans = Vec::new();
    for image in ckpt.volumes {
        let context = |e: String| format!("checkpoint volume {:?}: {e}", image.name);
        match volumes.iter().find(|v| v.name == image.name) {
            Some(v) => {
                if v.size_bytes != image.size_bytes {
                    return Err(format!(
                        "volume '{}' is {} on disk but {} in the config; resizing is not supported",
                        v.name,
                        crate::units::format_size(image.size_bytes),
                        crate::units::format_size(v.size_bytes)
                    ));
                }
                for r in &image.runs {
                    let loc = Location {
                        tier: r.tier,
                        phys_granule: r.phys_granule,
                    };
                    check_run(v, r.first_granule, r.count, Some(loc), &tier_granules)
                        .map_err(context)?;
                    v.map.set_run(r.first_granule, r.count, Some(loc));
                }
            }
            None => {
                tracing::warn!(volume = %image.name, "volume on disk is not in the config; its space stays reserved");
                for r in &image.runs {
                    check_phys(r.tier, r.phys_granule, r.count, &tier_granules).map_err(context)?;
                }
                orphans.push(image);
            }
        }
    }
    // Log replay.
    let log = read_log_prefix(read, sb.checkpoint_seq + 1)?;
    let mut runtime_tiers = runtime_tiers;
    let end = scan_log(&log, sb.checkpoint_seq + 1, |seq, rec| {
        match rec {
            Record::Map { .. } | Record::Unmap { .. } => {
                apply_record(volumes, &tier_granules, rec, true)
            }
            Record::AddTier {
                index,
                name,
                device,
                capacity_bytes,
            } => {
                let t = RuntimeTier {
                    index: *index,
                    name: name.clone(),
                    device: device.clone(),
                    capacity_bytes: *capacity_bytes,
                };
                // No `?` here: the error takes the record's sequence below.
                runtime::check_runtime_tier(&t, tier_granules.len()).map(|()| {
                    tier_granules.push(t.capacity_bytes / GRANULE_BYTES);
                    runtime_tiers.push(t);
                })
            }
            Record::VolumeMoveStart { .. } | Record::VolumeMoveDone { .. } => {
                runtime::apply_move(&mut moves, tier_granules.len(), rec, true)
            }
        }
        .map_err(|e| format!("log record {seq}: {e}"))
    })?;
    Ok(Some(Recovered {
        superblock: sb,
        orphans,
        runtime_tiers,
        moves,
        next_seq: end.next_seq,
        log_pos: end.pos.next_multiple_of(BLOCK_BYTES),
        replayed_records: end.records,
    }))
}

/// Claims every mapped granule of `volumes` and of the orphaned images in `allocators` (one
/// per tier, runtime tiers included), after [`recover_region`]. Two claims on the same space,
/// or a claim outside a tier's free space (the metadata region), is corrupt metadata: an error.
pub fn claim_mapped(
    volumes: &[Arc<Volume>],
    orphans: &[VolumeImage],
    allocators: &mut [TierAllocator],
) -> Result<(), String> {
    let mut claim = |tier: u8, phys: u64, count: u64| {
        allocators
            .get_mut(tier as usize)
            .ok_or_else(|| format!("tier {tier} does not exist"))?
            .reserve(phys, count)
    };
    for v in volumes {
        for (first, count, loc) in v.map.runs() {
            if let Some(l) = loc {
                claim(l.tier, l.phys_granule, count)
                    .map_err(|e| format!("volume '{}' granule {first}: {e}", v.name))?;
            }
        }
    }
    for image in orphans {
        for r in &image.runs {
            claim(r.tier, r.phys_granule, r.count)
                .map_err(|e| format!("orphaned volume {:?}: {e}", image.name))?;
        }
    }
    Ok(())
}

/// Picks the newest valid superblock copy. `Ok(None)`: both copies are blank.
fn choose_superblock(
    read: &mut ReadRegion<'_>,
    tier_name: &str,
) -> Result<Option<Superblock>, String> {
    let mut best: Option<Superblock> = None;
    let mut blank = true;
    for off in SUPERBLOCK_OFFSETS {
        let raw = read(off, SUPERBLOCK_BYTES)?;
        let written = raw.iter().any(|&b| b != 0);
        blank &= !written;
        match frame::decode::<Superblock>(MAGIC_SUPERBLOCK, &raw) {
            Ok((seq, sb, _)) => {
                // A checksummed copy that makes no sense is not a torn write: refuse it.
                check_superblock(&sb, seq).map_err(|e| format!("superblock copy at {off}: {e}"))?;
                if best.as_ref().is_none_or(|b| sb.generation > b.generation) {
                    best = Some(sb);
                }
            }
            Err(e) if written => {
                tracing::warn!(
                    "superblock copy at {off} is unreadable ({e}); using the other copy"
                );
            }
            Err(_) => {}
        }
    }
    if best.is_none() && !blank {
        return Err(format!(
            "tier '{tier_name}': both superblock copies are corrupt; refusing to format over existing data"
        ));
    }
    Ok(best)
}

/// The checks a decoded superblock must pass before recovery trusts it.
fn check_superblock(sb: &Superblock, frame_seq: u64) -> Result<(), String> {
    if sb.version != FORMAT_VERSION {
        return Err(format!(
            "superblock version {} is not supported (this is {FORMAT_VERSION})",
            sb.version
        ));
    }
    if sb.granule_bytes != GRANULE_BYTES {
        return Err(format!(
            "granule size {} is not kiln's {GRANULE_BYTES}",
            sb.granule_bytes
        ));
    }
    if sb.checkpoint_slot as usize >= CHECKPOINT_OFFSETS.len() {
        return Err(format!(
            "checkpoint slot {} does not exist",
            sb.checkpoint_slot
        ));
    }
    if frame_seq != sb.generation {
        return Err(format!(
            "frame sequence {frame_seq} differs from generation {}",
            sb.generation
        ));
    }
    // Recovery continues at generation + 1 and sequence + 1.
    if sb.generation == u64::MAX || sb.checkpoint_seq == u64::MAX {
        return Err("generation or checkpoint sequence is at its limit".into());
    }
    Ok(())
}

/// What lies at `offset` of the metadata region, for messages and the simulator's events.
pub fn region_name(offset: u64) -> &'static str {
    if offset == SUPERBLOCK_OFFSETS[0] {
        "superblock copy A"
    } else if offset == SUPERBLOCK_OFFSETS[1] {
        "superblock copy B"
    } else if (CHECKPOINT_OFFSETS[0]..CHECKPOINT_OFFSETS[1]).contains(&offset) {
        "checkpoint slot 0"
    } else if (CHECKPOINT_OFFSETS[1]..LOG_OFFSET).contains(&offset) {
        "checkpoint slot 1"
    } else if (LOG_OFFSET..META_BYTES).contains(&offset) {
        "journal commit"
    } else {
        "metadata region"
    }
}

/// Where [`scan_log`] stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogEnd {
    /// The sequence after the last record replayed.
    pub next_seq: u64,
    /// Offset just past the last record replayed.
    pub pos: u64,
    pub records: u64,
}

/// Replays the log's records from sequence `first_seq` through `apply`, in order, until the
/// first torn, invalid or older frame or the zero block after the last commit. Bytes past the
/// end of `log` read as zeros. An error from `apply` stops the scan and is returned.
/// Largest log commit (the metadata service's commit buffer), plus a block of slack.
const COMMIT_BYTES_MAX: u64 = (1 << 20) + BLOCK_BYTES;

/// Reads as much of the log as replay needs instead of all of it: a 1 MiB prefix, grown
/// 4x while the valid records might run past it (the scan stopped within one commit of
/// the prefix's end). A start then reads what it replays, not 31 MiB.
fn read_log_prefix(read: &mut ReadRegion<'_>, first_seq: u64) -> Result<Vec<u8>, String> {
    let mut len = (1u64 << 20).min(LOG_BYTES);
    loop {
        let log = read(LOG_OFFSET, len)?;
        if len == LOG_BYTES {
            return Ok(log);
        }
        let end = scan_log(&log, first_seq, |_, _| Ok(()))?;
        if end.pos + COMMIT_BYTES_MAX <= len {
            return Ok(log);
        }
        len = (len * 4).min(LOG_BYTES);
    }
}

pub fn scan_log(
    log: &[u8],
    first_seq: u64,
    mut apply: impl FnMut(u64, &Record) -> Result<(), String>,
) -> Result<LogEnd, String> {
    let log_bytes = log.len() as u64;
    let mut end = LogEnd {
        next_seq: first_seq,
        pos: 0,
        records: 0,
    };
    while end.pos + frame::FRAME_HEADER_BYTES as u64 <= log_bytes {
        let at = &log[end.pos as usize..];
        if at[..4] == [0, 0, 0, 0] {
            // Padding to the end of a commit; the next commit starts on a block boundary.
            let next = (end.pos + 1).next_multiple_of(BLOCK_BYTES);
            if end.pos % BLOCK_BYTES == 0 || next >= log_bytes {
                break;
            }
            end.pos = next;
            continue;
        }
        match frame::decode::<Record>(MAGIC_RECORD, at) {
            Ok((seq, rec, used)) if seq == end.next_seq => {
                apply(seq, &rec)?;
                end.next_seq = seq
                    .checked_add(1)
                    .ok_or_else(|| format!("log record sequence {seq} is at its limit"))?;
                end.records += 1;
                end.pos += used as u64;
            }
            Ok((seq, _, _)) => {
                tracing::debug!(seq, expected = end.next_seq, "log ends at an older record");
                break;
            }
            Err(e) => {
                tracing::info!(pos = end.pos, "log ends at a torn or invalid frame: {e}");
                break;
            }
        }
    }
    Ok(end)
}

/// Applies a `Map` or `Unmap` record to the maps of `volumes`, after checking it against their
/// sizes and the tiers' (`tier_granules`, granules per tier). A replayed record may name a volume that is
/// gone from the config; it is skipped.
fn apply_record(
    volumes: &[Arc<Volume>],
    tier_granules: &[u64],
    rec: &Record,
    replay: bool,
) -> Result<(), String> {
    let (name, first, count, loc) = match rec {
        Record::Map {
            volume,
            first_granule,
            count,
            tier,
            phys_granule,
        } => {
            let loc = Location {
                tier: *tier,
                phys_granule: *phys_granule,
            };
            (volume, *first_granule, *count, Some(loc))
        }
        Record::Unmap {
            volume,
            first_granule,
            count,
        } => (volume, *first_granule, *count, None),
        Record::AddTier { .. } | Record::VolumeMoveStart { .. } | Record::VolumeMoveDone { .. } => {
            unreachable!("not a map record")
        }
    };
    let Some(v) = volumes.iter().find(|v| &v.name == name) else {
        return if replay || loc.is_none() {
            Ok(())
        } else {
            Err(format!("unknown volume '{name}'"))
        };
    };
    check_run(v, first, count, loc, tier_granules)?;
    v.map.set_run(first, count, loc);
    Ok(())
}

/// Checks that a run read from the media lies inside its volume and, if mapped, its tier.
fn check_run(
    volume: &Volume,
    first_granule: u64,
    count: u64,
    loc: Option<Location>,
    tier_granules: &[u64],
) -> Result<(), String> {
    let granules = volume.map.granules();
    if first_granule
        .checked_add(count)
        .is_none_or(|end| end > granules)
    {
        return Err(format!(
            "granules {first_granule}+{count} lie past the end of volume '{}' ({granules} granules)",
            volume.name
        ));
    }
    match loc {
        Some(l) => check_phys(l.tier, l.phys_granule, count, tier_granules),
        None => Ok(()),
    }
}

/// Checks that physical granules `[phys, phys+count)` lie inside tier `tier`.
fn check_phys(tier: u8, phys: u64, count: u64, tier_granules: &[u64]) -> Result<(), String> {
    let Some(&granules) = tier_granules.get(tier as usize) else {
        return Err(format!("record names tier {tier}, which does not exist"));
    };
    if phys.checked_add(count).is_none_or(|end| end > granules) {
        return Err(format!(
            "physical granules {phys}+{count} lie past the end of tier {tier} ({granules} granules)"
        ));
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    //! Recovery from corrupt but checksummed metadata: each case was a panic (index out of
    //! bounds, a failed assert, an overflow) before the checks in `recover_region`; the fuzz
    //! target `journal_record` covers the rest.
    use super::*;

    const FAST_BYTES: u64 = META_BYTES + (4 << 20);
    const SLOW_BYTES: u64 = 8 << 20;

    fn tiers() -> Vec<(String, u64)> {
        vec![("fast".into(), FAST_BYTES), ("slow".into(), SLOW_BYTES)]
    }

    fn superblock(generation: u64, checkpoint_seq: u64) -> Superblock {
        Superblock {
            version: FORMAT_VERSION,
            generation,
            tiers: tiers(),
            granule_bytes: GRANULE_BYTES,
            checkpoint_slot: 0,
            checkpoint_seq,
        }
    }

    fn run(first_granule: u64, count: u64, tier: u8, phys_granule: u64) -> MappedRun {
        MappedRun {
            first_granule,
            count,
            tier,
            phys_granule,
        }
    }

    /// The places recovery reads: superblock copy A, checkpoint slot 0, the log.
    struct Region {
        sb: Vec<u8>,
        checkpoint: Vec<u8>,
        log: Vec<u8>,
    }

    impl Region {
        fn new(sb: &Superblock, runs: Vec<MappedRun>, records: &[Record]) -> Region {
            let mut r = Region {
                sb: Vec::new(),
                checkpoint: Vec::new(),
                log: Vec::new(),
            };
            frame::encode(MAGIC_SUPERBLOCK, sb.generation, sb, &mut r.sb);
            let image = VolumeImage {
                name: "v0".into(),
                size_bytes: 2 << 20,
                runs,
            };
            let ckpt = Checkpoint {
                volumes: vec![image],
            };
            frame::encode(
                MAGIC_CHECKPOINT,
                sb.checkpoint_seq,
                &ckpt,
                &mut r.checkpoint,
            );
            for (i, rec) in records.iter().enumerate() {
                frame::encode(
                    MAGIC_RECORD,
                    sb.checkpoint_seq + 1 + i as u64,
                    rec,
                    &mut r.log,
                );
            }
            r
        }

        /// Replaces the checkpoint with the extended (`KLNX`) form holding `tiers` and `moves`.
        fn with_runtime(
            mut self,
            sb: &Superblock,
            runs: Vec<MappedRun>,
            tiers: Vec<RuntimeTier>,
            moves: Vec<VolumeMoveState>,
        ) -> Region {
            let ext = CheckpointExt {
                volumes: vec![VolumeImage {
                    name: "v0".into(),
                    size_bytes: 2 << 20,
                    runs,
                }],
                tiers,
                moves,
            };
            self.checkpoint.clear();
            frame::encode(
                MAGIC_CHECKPOINT_EXT,
                sb.checkpoint_seq,
                &ext,
                &mut self.checkpoint,
            );
            self
        }

        /// Recovery as `MetaService::recover` runs it: the region, then the claims, with an
        /// allocator for each runtime tier found.
        fn recover(&self) -> (Result<Option<Recovered>, String>, Arc<Volume>) {
            let volume = Arc::new(Volume::new(0, "v0", 2 << 20, 1 << 20));
            let meta = META_BYTES / GRANULE_BYTES;
            let mut allocators = vec![
                TierAllocator::new(meta, FAST_BYTES / GRANULE_BYTES - meta),
                TierAllocator::new(0, SLOW_BYTES / GRANULE_BYTES),
            ];
            let ends: Vec<u64> = allocators.iter().map(|a| a.end_granule()).collect();
            let mut read = |offset: u64, len: u64| {
                let part = match offset {
                    0 => &self.sb,
                    o if o == CHECKPOINT_OFFSETS[0] => &self.checkpoint,
                    LOG_OFFSET => &self.log,
                    _ => &Vec::new(),
                };
                Ok(part[..part.len().min(len as usize)].to_vec())
            };
            let volumes = std::slice::from_ref(&volume);
            let found = recover_region(&mut read, &tiers(), &ends, volumes).and_then(|found| {
                let Some(r) = found else { return Ok(None) };
                for t in &r.runtime_tiers {
                    allocators.push(TierAllocator::new(0, t.capacity_bytes / GRANULE_BYTES));
                }
                claim_mapped(volumes, &r.orphans, &mut allocators)?;
                Ok(Some(r))
            });
            (found, volume)
        }

        fn error(&self) -> String {
            let e = self
                .recover()
                .0
                .expect_err("corrupt metadata must not recover");
            assert!(!e.contains('\n'), "{e}");
            e
        }
    }

    fn map(first_granule: u64, count: u64, tier: u8, phys_granule: u64) -> Record {
        Record::Map {
            volume: "v0".into(),
            first_granule,
            count,
            tier,
            phys_granule,
        }
    }

    #[test]
    fn recovers_checkpoint_and_log() {
        let sb = superblock(3, 10);
        let region = Region::new(&sb, vec![run(0, 16, 1, 0)], &[map(16, 16, 0, 1024)]);
        let (found, volume) = region.recover();
        let r = found.unwrap().expect("a formatted region");
        assert_eq!((r.next_seq, r.replayed_records), (12, 1));
        assert_eq!(r.log_pos, BLOCK_BYTES);
        let at = |g| volume.map.get(g).map(|l| (l.tier, l.phys_granule));
        assert_eq!(
            (at(0), at(15), at(16), at(31)),
            (
                Some((1, 0)),
                Some((1, 15)),
                Some((0, 1024)),
                Some((0, 1039))
            )
        );
        assert!(Region::new(&sb, vec![], &[]).recover().0.unwrap().is_some());
        let blank = Region {
            sb: vec![0; 4096],
            checkpoint: Vec::new(),
            log: Vec::new(),
        };
        assert!(blank.recover().0.unwrap().is_none());
    }

    #[test]
    fn corrupt_superblock_is_an_error_not_a_panic() {
        let mut sb = superblock(3, 10);
        sb.checkpoint_slot = 2;
        assert!(Region::new(&sb, vec![], &[])
            .error()
            .contains("checkpoint slot 2 does not exist"));
        let mut sb = superblock(3, 10);
        sb.granule_bytes = 4096;
        assert!(Region::new(&sb, vec![], &[])
            .error()
            .contains("granule size 4096"));
        let sb = superblock(u64::MAX, 10);
        assert!(Region::new(&sb, vec![], &[])
            .error()
            .contains("at its limit"));
        let sb = superblock(3, u64::MAX);
        assert!(Region::new(&sb, vec![], &[])
            .error()
            .contains("at its limit"));
    }

    #[test]
    fn checkpoint_runs_outside_volume_or_tier_are_errors() {
        let sb = superblock(3, 10);
        let e = Region::new(&sb, vec![run(30, 4, 1, 0)], &[]).error();
        assert!(e.contains("past the end of volume 'v0'"), "{e}");
        let e = Region::new(&sb, vec![run(1, u64::MAX, 1, 0)], &[]).error();
        assert!(e.contains("past the end of volume 'v0'"), "{e}");
        let e = Region::new(&sb, vec![run(0, 1, 7, 0)], &[]).error();
        assert!(e.contains("tier 7, which does not exist"), "{e}");
        let e = Region::new(&sb, vec![run(0, 1, 1, 1 << 56)], &[]).error();
        assert!(e.contains("past the end of tier 1"), "{e}");
        // Two runs on the same space, and a run inside the metadata region.
        let e = Region::new(&sb, vec![run(0, 4, 1, 0), run(4, 4, 1, 2)], &[]).error();
        assert!(e.contains("not free"), "{e}");
        let e = Region::new(&sb, vec![run(0, 4, 0, 0)], &[]).error();
        assert!(e.contains("not free"), "{e}");
    }

    #[test]
    fn log_records_outside_volume_or_tier_are_errors() {
        let sb = superblock(3, 10);
        let e = Region::new(&sb, vec![], &[map(31, 2, 1, 0)]).error();
        assert!(
            e.starts_with("log record 11: granules 31+2 lie past the end"),
            "{e}"
        );
        let unmap = Record::Unmap {
            volume: "v0".into(),
            first_granule: 2,
            count: u64::MAX,
        };
        let e = Region::new(&sb, vec![], &[unmap]).error();
        assert!(e.contains("past the end of volume"), "{e}");
        let e = Region::new(&sb, vec![], &[map(0, 1, 1, u64::MAX)]).error();
        assert!(e.contains("past the end of tier 1"), "{e}");
        // A record for a volume no longer configured is skipped, as before.
        let gone = Record::Map {
            volume: "gone".into(),
            first_granule: u64::MAX,
            count: 9,
            tier: 9,
            phys_granule: 0,
        };
        let (found, _) = Region::new(&sb, vec![], &[gone]).recover();
        assert_eq!(found.unwrap().unwrap().replayed_records, 1);
    }

    #[test]
    fn log_sequence_at_its_limit_is_an_error() {
        let mut log = Vec::new();
        frame::encode(MAGIC_RECORD, u64::MAX, &map(0, 1, 1, 0), &mut log);
        let volume = Arc::new(Volume::new(0, "v0", 2 << 20, 1 << 20));
        let e = scan_log(&log, u64::MAX, |_, r| {
            apply_record(std::slice::from_ref(&volume), &[0, 128], r, true)
        })
        .unwrap_err();
        assert!(e.contains("at its limit"), "{e}");
    }

    fn runtime_tier(index: u8, capacity_bytes: u64) -> RuntimeTier {
        RuntimeTier {
            index,
            name: format!("rt{index}"),
            device: format!("file:/nonexistent/rt{index}.img"),
            capacity_bytes,
        }
    }

    fn add_tier(t: &RuntimeTier) -> Record {
        Record::AddTier {
            index: t.index,
            name: t.name.clone(),
            device: t.device.clone(),
            capacity_bytes: t.capacity_bytes,
        }
    }

    /// Runtime tiers and volume moves from a `KLNX` checkpoint and from the log: collected in
    /// index order, and runs on them claimed like any other.
    #[test]
    fn recovers_runtime_tiers_and_moves() {
        let sb = superblock(3, 10);
        let (t2, t3) = (runtime_tier(2, 4 << 20), runtime_tier(3, 2 << 20));
        let params = MoveParams::default();
        let moving = |to_tier, done| VolumeMoveState {
            volume: "v0".into(),
            to_tier,
            params,
            done,
        };
        let records = [
            map(0, 4, 2, 8),
            add_tier(&t3),
            Record::VolumeMoveStart {
                volume: "v0".into(),
                to_tier: 3,
                params,
            },
            map(4, 4, 3, 0),
            Record::VolumeMoveDone {
                volume: "v0".into(),
                to_tier: 3,
            },
        ];
        let region = Region::new(&sb, vec![], &records).with_runtime(
            &sb,
            vec![run(16, 2, 2, 0)],
            vec![t2.clone()],
            vec![moving(2, true)],
        );
        let (found, volume) = region.recover();
        let r = found.unwrap().expect("a formatted region");
        assert_eq!(r.runtime_tiers, vec![t2, t3]);
        // One move per volume: the newer start replaced the checkpoint's finished one.
        assert_eq!(r.moves, vec![moving(3, true)]);
        assert_eq!(r.replayed_records, 5);
        let at = |g| volume.map.get(g).map(|l| (l.tier, l.phys_granule));
        assert_eq!(
            (at(0), at(4), at(16)),
            (Some((2, 8)), Some((3, 0)), Some((2, 0)))
        );
    }

    #[test]
    fn bad_runtime_tiers_and_moves_are_errors() {
        let sb = superblock(3, 10);
        let plain = || Region::new(&sb, vec![], &[]);
        // A checkpoint tier out of order, one smaller than a granule, a move to no tier.
        let e = plain()
            .with_runtime(&sb, vec![], vec![runtime_tier(3, 1 << 20)], vec![])
            .error();
        assert!(e.contains("has index 3 but 2 tiers exist"), "{e}");
        let e = plain()
            .with_runtime(&sb, vec![], vec![runtime_tier(2, 4096)], vec![])
            .error();
        assert!(e.contains("less than a granule"), "{e}");
        let m = VolumeMoveState {
            volume: "v0".into(),
            to_tier: 2,
            params: MoveParams::default(),
            done: false,
        };
        let e = plain().with_runtime(&sb, vec![], vec![], vec![m]).error();
        assert!(e.contains("names tier 2, which does not exist"), "{e}");
        // In the log: an AddTier out of order, a map past a runtime tier, a move to no tier.
        let e = Region::new(&sb, vec![], &[add_tier(&runtime_tier(5, 1 << 20))]).error();
        assert!(
            e.starts_with("log record 11: runtime tier \"rt5\" has index 5"),
            "{e}"
        );
        let records = [add_tier(&runtime_tier(2, 1 << 20)), map(0, 1, 2, 16)];
        let e = Region::new(&sb, vec![], &records).error();
        assert!(e.contains("past the end of tier 2 (16 granules)"), "{e}");
        let start = Record::VolumeMoveStart {
            volume: "v0".into(),
            to_tier: 2,
            params: MoveParams::default(),
        };
        let e = Region::new(&sb, vec![], &[start]).error();
        assert!(e.contains("names tier 2, which does not exist"), "{e}");
        // A map onto a runtime tier that no record added.
        let e = Region::new(&sb, vec![], &[map(0, 1, 2, 0)]).error();
        assert!(e.contains("tier 2, which does not exist"), "{e}");
    }
}
