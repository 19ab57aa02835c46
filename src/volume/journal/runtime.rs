//! Runtime tiers and whole-volume moves in the journal (see docs/FORMAT.md,
//! "Runtime tiers and volume moves").
//!
//! The superblock's tier list is the configured one and never changes. A tier
//! added at run time (a volume migration's new destination device) is one
//! `Record::AddTier` in the log, committed with FUA before anything maps onto
//! it, and is carried by every later checkpoint in the extended checkpoint
//! frame (`KLNX`), which also carries the volume moves. A checkpoint with no
//! runtime tier and no move is written in the original `KLNC` form, so a
//! journal that never used this feature is byte-for-byte what format 1 wrote;
//! an older binary meeting a `KLNX` checkpoint refuses to start (bad magic)
//! instead of silently dropping a tier.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{
    Checkpoint, MetaService, MetaTier, Record, TierUsage, VolumeImage, GRANULE_BYTES,
    MAGIC_CHECKPOINT,
};
use crate::bdev::spec::DeviceSpec;
use crate::bdev::{BlockDevice, ChannelOptions, IoKind};
use crate::crashpoint::crashpoint;
use crate::frame;
use crate::volume::allocator::TierAllocator;

/// Magic of the extended checkpoint frame.
pub const MAGIC_CHECKPOINT_EXT: u32 = u32::from_le_bytes(*b"KLNX");

/// A tier added at run time, as journaled.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct RuntimeTier {
    pub index: u8,
    pub name: String,
    /// The device spec it was opened from (reopened by recovery).
    pub device: String,
    pub capacity_bytes: u64,
}

/// How a whole-volume move runs (kept so a resumed move runs the same way).
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Default)]
pub struct MoveParams {
    /// 0 naive, 1 fixed, 2 adaptive.
    pub mode: u8,
    /// Copy rate cap in MiB/s; 0: none.
    pub rate_mib_s: u64,
    pub chunk_min_bytes: u64,
    pub chunk_max_bytes: u64,
    /// The fixed mode's chunk size.
    pub chunk_bytes: u64,
}

/// A whole-volume move as journaled.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct VolumeMoveState {
    pub volume: String,
    pub to_tier: u8,
    pub params: MoveParams,
    pub done: bool,
}

/// The checkpoint when runtime tiers or moves exist (frame magic `KLNX`).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct CheckpointExt {
    pub volumes: Vec<VolumeImage>,
    pub tiers: Vec<RuntimeTier>,
    pub moves: Vec<VolumeMoveState>,
}

/// A runtime tier with its opened device, handed to the server.
#[derive(Clone)]
pub struct RuntimeTierOpen {
    pub tier: RuntimeTier,
    pub device: Arc<dyn BlockDevice>,
    pub usage: Arc<TierUsage>,
}

impl std::fmt::Debug for RuntimeTierOpen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuntimeTierOpen")
            .field("tier", &self.tier)
            .finish()
    }
}

/// Opens a runtime tier's device. At recovery (`must_exist`) a file that is gone
/// is an error, never silently re-created empty.
fn open_device(
    spec_text: &str,
    capacity_bytes: u64,
    must_exist: bool,
) -> Result<(Arc<dyn BlockDevice>, u64), String> {
    let spec = DeviceSpec::parse(spec_text).map_err(|e| e.to_string())?;
    if let (true, Some(path)) = (must_exist, spec.backing_file()) {
        if !path.exists() {
            return Err(format!(
                "runtime tier device {spec_text}: its file {} is missing",
                path.display()
            ));
        }
    }
    let dev = spec.open().map_err(|e| format!("{spec_text}: {e}"))?;
    if dev.object_tier().is_some() {
        // Its space is addressed by object generation, which only a configured tier has.
        return Err(format!(
            "{spec_text}: an object-storage device cannot be added as a runtime tier"
        ));
    }
    let info = dev.info();
    if !info.persistent {
        return Err(format!("{spec_text}: the device does not store data"));
    }
    let size = info.size_bytes();
    let capacity = if capacity_bytes == 0 {
        size
    } else {
        capacity_bytes
    };
    if capacity > size || capacity < GRANULE_BYTES {
        return Err(format!(
            "{spec_text}: capacity {capacity} does not fit the device ({size} bytes)"
        ));
    }
    Ok((dev, capacity - capacity % GRANULE_BYTES))
}

/// The checks a runtime tier read back must pass: the next index after `tiers` tiers, and
/// room for at least one granule. Names read from disk are shown escaped (`{:?}`), so a
/// corrupt one cannot break an error message over several lines (fuzz target
/// `journal_record`).
pub(super) fn check_runtime_tier(tier: &RuntimeTier, tiers: usize) -> Result<(), String> {
    if tier.index as usize != tiers {
        return Err(format!(
            "runtime tier {:?} has index {} but {tiers} tiers exist",
            tier.name, tier.index
        ));
    }
    if tier.capacity_bytes < GRANULE_BYTES {
        return Err(format!(
            "runtime tier {:?} has a capacity of {} bytes, less than a granule",
            tier.name, tier.capacity_bytes
        ));
    }
    Ok(())
}

/// Applies `VolumeMoveStart` or `VolumeMoveDone` to `moves`, with `tiers` tiers existing.
/// A replayed `VolumeMoveDone` without its start (checkpointed away) is no error.
pub(super) fn apply_move(
    moves: &mut Vec<VolumeMoveState>,
    tiers: usize,
    rec: &Record,
    replay: bool,
) -> Result<(), String> {
    match rec {
        Record::VolumeMoveStart {
            volume,
            to_tier,
            params,
        } => {
            if *to_tier as usize >= tiers {
                return Err(format!(
                    "volume move names tier {to_tier}, which does not exist"
                ));
            }
            moves.retain(|m| m.volume != *volume);
            moves.push(VolumeMoveState {
                volume: volume.clone(),
                to_tier: *to_tier,
                params: *params,
                done: false,
            });
        }
        Record::VolumeMoveDone { volume, to_tier } => {
            match moves
                .iter_mut()
                .find(|m| m.volume == *volume && m.to_tier == *to_tier)
            {
                Some(m) => m.done = true,
                None if replay => {}
                None => return Err(format!("volume '{volume}' has no move to tier {to_tier}")),
            }
        }
        _ => unreachable!("not a volume move record"),
    }
    Ok(())
}

/// Decodes the checkpoint frame in either form; the original `KLNC` one carries no runtime
/// tier and no move. Pure: recovery checks and installs what it holds.
pub(super) fn decode_checkpoint(raw: &[u8]) -> Result<(u64, CheckpointExt), String> {
    if raw.len() >= 4 && raw[..4] == MAGIC_CHECKPOINT_EXT.to_le_bytes() {
        let (seq, ext, _) =
            frame::decode::<CheckpointExt>(MAGIC_CHECKPOINT_EXT, raw).map_err(|e| e.to_string())?;
        return Ok((seq, ext));
    }
    let (seq, ckpt, _) =
        frame::decode::<Checkpoint>(MAGIC_CHECKPOINT, raw).map_err(|e| e.to_string())?;
    let ext = CheckpointExt {
        volumes: ckpt.volumes,
        tiers: Vec::new(),
        moves: Vec::new(),
    };
    Ok((seq, ext))
}

impl MetaService {
    /// Installs a runtime tier: device, metadata channel, allocator, published state.
    fn install_tier(
        &mut self,
        tier: RuntimeTier,
        device: Arc<dyn BlockDevice>,
    ) -> Result<RuntimeTierOpen, String> {
        check_runtime_tier(&tier, self.tiers.len())?;
        let chan = device
            .open_channel(&ChannelOptions {
                queue_depth: 4,
                pool: None,
            })
            .map_err(|e| format!("tier '{}': {e}", tier.name))?;
        let usage = Arc::new(TierUsage::default());
        self.tiers.push(MetaTier {
            name: tier.name.clone(),
            device: device.clone(),
            capacity_bytes: tier.capacity_bytes,
            usage: usage.clone(),
        });
        self.chans.push(chan);
        // Every per-tier table grows with the tier (free_space and place index `object`);
        // `open_device` refuses object-storage devices.
        self.object.push(None);
        self.allocators
            .push(TierAllocator::new(0, tier.capacity_bytes / GRANULE_BYTES));
        let open = RuntimeTierOpen {
            tier,
            device,
            usage,
        };
        self.state.runtime_tiers.push(open.clone());
        Ok(open)
    }

    /// Opens `device`, journals it as a new tier, then installs it.
    pub(super) fn add_tier(
        &mut self,
        name: &str,
        device: &str,
        capacity_bytes: u64,
    ) -> Result<RuntimeTierOpen, String> {
        if name.is_empty() || self.tiers.iter().any(|t| t.name == name) {
            return Err(format!("tier name '{name}' is empty or already used"));
        }
        if self.tiers.len() >= u8::MAX as usize {
            return Err("no more tiers can be added (255 at most)".into());
        }
        let (dev, capacity) = open_device(device, capacity_bytes, false)?;
        let tier = RuntimeTier {
            index: self.tiers.len() as u8,
            name: name.to_string(),
            device: device.to_string(),
            capacity_bytes: capacity,
        };
        // Durable before anything can be mapped onto it.
        crashpoint("add_tier.before_commit");
        self.commit(&[Record::AddTier {
            index: tier.index,
            name: tier.name.clone(),
            device: tier.device.clone(),
            capacity_bytes: tier.capacity_bytes,
        }])?;
        crashpoint("add_tier.after_commit");
        let open = self.install_tier(tier, dev)?;
        self.publish_usage();
        tracing::info!(tier = %name, index = open.tier.index, %device, "tier added");
        Ok(open)
    }

    /// Journals the start or the end of a whole-volume move.
    pub(super) fn volume_move(
        &mut self,
        volume: usize,
        to_tier: u8,
        params: MoveParams,
        done: bool,
    ) -> Result<(), String> {
        if to_tier as usize >= self.tiers.len() {
            return Err(format!("tier {to_tier} does not exist"));
        }
        let name = self.volumes[volume].name.clone();
        let rec = if done {
            Record::VolumeMoveDone {
                volume: name,
                to_tier,
            }
        } else {
            Record::VolumeMoveStart {
                volume: name,
                to_tier,
                params,
            }
        };
        if done {
            crashpoint("volume_move.done.before_commit");
        } else {
            crashpoint("volume_move.start.before_commit");
        }
        self.commit(std::slice::from_ref(&rec))?;
        if done {
            crashpoint("volume_move.done.after_commit");
        } else {
            crashpoint("volume_move.start.after_commit");
        }
        self.apply_runtime(&rec, false)
    }

    /// Applies `AddTier`, `VolumeMoveStart` and `VolumeMoveDone` live (recovery collects
    /// them in `recover_region` and reopens the tiers with `reopen_tiers`).
    pub(super) fn apply_runtime(&mut self, rec: &Record, replay: bool) -> Result<(), String> {
        match rec {
            // `add_tier` installs the device it opened and validated.
            Record::AddTier { .. } => Ok(()),
            _ => apply_move(&mut self.state.moves, self.tiers.len(), rec, replay),
        }
    }

    /// Reopens the runtime tiers recovery found, in index order. A file that is gone is an
    /// error, never silently re-created empty.
    pub(super) fn reopen_tiers(&mut self, tiers: Vec<RuntimeTier>) -> Result<(), String> {
        for t in tiers {
            let (dev, _) = open_device(&t.device, t.capacity_bytes, true)?;
            self.install_tier(t, dev)?;
        }
        Ok(())
    }

    /// Where new chunks of a volume go: its move's destination first (a moving or
    /// moved volume grows on its new device), then the fastest tier with room.
    pub(super) fn place_for(&mut self, volume: usize, granules: u64) -> Option<(u8, u64)> {
        let name = &self.volumes[volume].name;
        if let Some(m) = self.state.moves.iter().find(|m| m.volume == *name) {
            let t = m.to_tier as usize;
            if let Some(phys) = self.allocators[t].alloc(granules, granules.min(16)) {
                return Some((m.to_tier, phys));
            }
        }
        self.place(granules)
    }

    /// Trims every free range of a tier. The service is single-threaded, so no
    /// allocation can race with it; a granule freed here was unmapped by a durable record.
    pub(super) fn trim_free(&mut self, tier: u8) -> Result<u64, String> {
        let t = tier as usize;
        if t >= self.tiers.len() {
            return Err(format!("tier {tier} does not exist"));
        }
        let ranges = self.allocators[t].free_ranges();
        let mut trimmed = 0u64;
        // A trim's length is a u32: 1 GiB pieces.
        let piece = 1u64 << 30;
        crashpoint("volume_move.trim.before");
        for (start, count) in ranges {
            let (mut off, end) = (start * GRANULE_BYTES, (start + count) * GRANULE_BYTES);
            while off < end {
                let len = (end - off).min(piece);
                self.sync(t, IoKind::Trim, off, len, false)?;
                off += len;
                trimmed += len;
            }
        }
        crashpoint("volume_move.trim.after");
        tracing::info!(tier = %self.tiers[t].name, trimmed, "free space of the tier trimmed");
        Ok(trimmed)
    }

    /// Encodes the checkpoint: the original form unless runtime state exists.
    pub(super) fn encode_checkpoint(&self, seq: u64, volumes: Vec<VolumeImage>) -> Vec<u8> {
        let mut bytes = Vec::new();
        if self.state.runtime_tiers.is_empty() && self.state.moves.is_empty() {
            frame::encode(MAGIC_CHECKPOINT, seq, &Checkpoint { volumes }, &mut bytes);
        } else {
            let ext = CheckpointExt {
                volumes,
                tiers: self
                    .state
                    .runtime_tiers
                    .iter()
                    .map(|t| t.tier.clone())
                    .collect(),
                moves: self.state.moves.clone(),
            };
            frame::encode(MAGIC_CHECKPOINT_EXT, seq, &ext, &mut bytes);
            // Assert metadata before it is written: it must decode to what we meant.
            assert!(frame::decode::<CheckpointExt>(MAGIC_CHECKPOINT_EXT, &bytes)
                .is_ok_and(|(s, e, _)| s == seq && e == ext));
        }
        bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression (fuzz target `journal_record`, 2026-11-21): a runtime tier record whose
    /// name held a newline made a two-line error message.
    #[test]
    fn a_corrupt_runtime_tier_name_is_escaped_in_the_error() {
        let t = RuntimeTier {
            index: 3,
            name: "\n;".into(),
            device: "null:1GiB".into(),
            capacity_bytes: 2,
        };
        let e = check_runtime_tier(&t, 3).unwrap_err();
        assert_eq!(
            e,
            "runtime tier \"\\n;\" has a capacity of 2 bytes, less than a granule"
        );
        let e = check_runtime_tier(&t, 2).unwrap_err();
        assert!(!e.contains('\n'), "{e}");
    }

    /// Old records keep their postcard tags: a format-1 `Map` encodes as it always did.
    #[test]
    fn old_record_tags_are_unchanged() {
        let map = Record::Map {
            volume: "v".into(),
            first_granule: 1,
            count: 2,
            tier: 3,
            phys_granule: 4,
        };
        let bytes = postcard::to_allocvec(&map).unwrap();
        assert_eq!(bytes, [0, 1, b'v', 1, 2, 3, 4]);
        let unmap = Record::Unmap {
            volume: "v".into(),
            first_granule: 1,
            count: 2,
        };
        assert_eq!(postcard::to_allocvec(&unmap).unwrap()[0], 1);
        let add = Record::AddTier {
            index: 2,
            name: "d".into(),
            device: "malloc:1MiB".into(),
            capacity_bytes: 0,
        };
        let b = postcard::to_allocvec(&add).unwrap();
        assert_eq!(b[0], 2);
        assert_eq!(postcard::from_bytes::<Record>(&b).unwrap(), add);
    }
}
