//! The per-reactor volume I/O engine: turns one volume request into tier
//! requests on this reactor's channels and completes it when every piece is
//! done. Protocol targets (NBD, NVMe/TCP) sit on top of it.
//!
//! - Requests live in a preallocated slab; the slab index is the tag of every
//!   piece, so completions route back without lookups or allocation.
//! - A read of unmapped space is zero-filled in place; a write to unmapped
//!   space first asks the metadata service to allocate (and journal) whole
//!   chunks, then proceeds. That is the only path that leaves the reactor.
//! - A full channel is normal: pieces wait in a bounded deferred queue.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};

use super::epoch::Epochs;
use super::journal::MetaRequest;
use super::tier_registry::TierRegistry;
use super::Volume;
use crate::bdev::{
    BlockDevice, ChannelOptions, Completion, IoChannel, IoKind, IoRequest, SubmitError,
    BUF_INDEX_NONE,
};
use crate::clock::now_ns;
use crate::dma::DmaPool;
use crate::heat::HeatRecorder;
use crate::metrics::{IoOp, Metrics, TierIoHandle, VolumeIoHandle};
use crate::reactor::ReactorHandle;

/// One operation on a volume, as a target submits it.
#[derive(Clone, Copy, Debug)]
pub struct VolumeOp {
    pub volume: u32,
    pub kind: IoKind,
    pub offset_bytes: u64,
    pub len_bytes: u32,
    pub buf: *mut u8,
    pub buf_index: u16,
    pub fua: bool,
    /// The target's own token, returned in the completion.
    pub token: u64,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum ReqState {
    Free,
    /// Waiting for the metadata service to map the range.
    Mapping,
    /// Pieces in flight.
    Running,
}

#[derive(Clone, Copy)]
struct Req {
    op: VolumeOp,
    state: ReqState,
    pieces_left: u32,
    result: i32,
    start_ns: u64,
    /// The epoch bit entered at dispatch, or EPOCH_NONE.
    epoch_bit: u8,
    /// A read that already waited for one demand promotion: served from wherever the
    /// data is now, never parked again (no promotion loop under eviction churn).
    promoted: bool,
}

const EPOCH_NONE: u8 = u8::MAX;

/// Completed volume operation: `(token, result)` with 0 or a negative errno.
pub type VolumeCompletion = (u64, i32);

pub struct VolumeIo {
    pub volumes: Arc<Vec<Arc<Volume>>>,
    chans: Vec<Box<dyn IoChannel>>,
    reqs: Vec<Req>,
    free: Vec<u32>,
    deferred: VecDeque<(usize, IoRequest)>,
    reaped: Vec<Completion>,
    done: VecDeque<VolumeCompletion>,
    meta_tx: Sender<MetaRequest>,
    map_tx: Sender<(u32, i32)>,
    map_rx: Receiver<(u32, i32)>,
    reactor: Option<ReactorHandle>,
    /// Per volume, per op (read, write, flush, trim, write-zeroes).
    vol_metrics: Vec<[VolumeIoHandle; 5]>,
    /// Per tier, per op.
    tier_metrics: Vec<[TierIoHandle; 5]>,
    /// Grace-period counters shared with the migration engine, and our index in them.
    epochs: Arc<Epochs>,
    reactor_index: usize,
    /// Writes waiting because their range is locked by a migration copy.
    blocked: VecDeque<u32>,
    /// Per volume: this reactor's heat recorder and the end of its last request.
    heat: Vec<Option<HeatRecorder>>,
    last_end: Vec<u64>,
    /// Tiers added at run time appear here; channels on them are opened on the next poll.
    registry: Option<Arc<TierRegistry>>,
    /// Bit t set: tier t is object storage (reads only; writes promote first).
    object_mask: u64,
    promote_tx: Option<Sender<crate::migrate::PromoteRequest>>,
    /// Where the synchronous demand policy is switched on (see `set_demand_reads`).
    demand: Option<Arc<crate::migrate::MigrationSettings>>,
}

/// Whether any mapped granule of `[offset, offset + len)` is on a tier `pred` accepts.
fn any_tier(vol: &Volume, offset: u64, len: u64, pred: impl Fn(u8) -> bool) -> bool {
    let g = vol.map.granule_bytes;
    (offset / g..(offset + len).div_ceil(g)).any(|x| vol.map.get(x).is_some_and(|l| pred(l.tier)))
}

fn op_index(kind: IoKind) -> usize {
    match kind {
        IoKind::Read => 0,
        IoKind::Write => 1,
        IoKind::Flush => 2,
        IoKind::Trim => 3,
        IoKind::WriteZeroes => 4,
    }
}

/// The tier request for the piece of `op` at logical offset `logical`,
/// `len` bytes long, placed at byte `phys` of its tier.
#[inline]
fn piece_request(op: &VolumeOp, tag: u64, logical: u64, len: u64, phys: u64) -> IoRequest {
    let buf_off = (logical - op.offset_bytes) as usize;
    IoRequest {
        tag,
        kind: op.kind,
        offset_bytes: phys,
        len_bytes: len as u32,
        buf: if op.buf.is_null() {
            op.buf
        } else {
            // SAFETY: buf_off < len_bytes, inside the caller's buffer (VolumeIo::submit contract).
            unsafe { op.buf.add(buf_off) }
        },
        buf_index: op.buf_index,
        fua: op.fua,
    }
}

const OPS: [IoOp; 5] = [
    IoOp::Read,
    IoOp::Write,
    IoOp::Flush,
    IoOp::Trim,
    IoOp::WriteZeroes,
];

impl VolumeIo {
    /// Opens this reactor's channels on every tier.
    pub fn new(
        volumes: Arc<Vec<Arc<Volume>>>,
        tiers: &[(String, Arc<dyn BlockDevice>)],
        pool: &DmaPool,
        metrics: &Metrics,
        max_requests: usize,
        meta_tx: Sender<MetaRequest>,
        reactor: Option<ReactorHandle>,
    ) -> Result<VolumeIo, String> {
        let depth = (max_requests * 4).min(4096) as u32;
        let chans = tiers
            .iter()
            .map(|(_, d)| {
                d.open_channel(&ChannelOptions {
                    queue_depth: depth,
                    pool: Some(pool),
                })
                .map_err(|e| e.to_string())
            })
            .collect::<Result<Vec<_>, _>>()?;
        let (map_tx, map_rx) = crossbeam_channel::unbounded();
        let idle = Req {
            op: VolumeOp {
                volume: 0,
                kind: IoKind::Flush,
                offset_bytes: 0,
                len_bytes: 0,
                buf: std::ptr::null_mut(),
                buf_index: BUF_INDEX_NONE,
                fua: false,
                token: 0,
            },
            state: ReqState::Free,
            pieces_left: 0,
            result: 0,
            start_ns: 0,
            epoch_bit: EPOCH_NONE,
            promoted: false,
        };
        Ok(VolumeIo {
            volumes: volumes.clone(),
            chans,
            reqs: vec![idle; max_requests],
            free: (0..max_requests as u32).rev().collect(),
            deferred: VecDeque::with_capacity(max_requests * 8),
            reaped: vec![Completion::default(); 128],
            done: VecDeque::with_capacity(max_requests),
            meta_tx,
            map_tx,
            map_rx,
            reactor,
            vol_metrics: volumes
                .iter()
                .map(|v| OPS.map(|op| metrics.volume_io(&v.name, op)))
                .collect(),
            tier_metrics: tiers
                .iter()
                .map(|(name, _)| OPS.map(|op| metrics.tier_io(name, op)))
                .collect(),
            epochs: Arc::new(Epochs::new(1)),
            reactor_index: 0,
            blocked: VecDeque::with_capacity(max_requests),
            heat: volumes.iter().map(|_| None).collect(),
            last_end: vec![u64::MAX; volumes.len()],
            registry: None,
            object_mask: tiers
                .iter()
                .enumerate()
                .filter(|(_, (_, d))| d.object_tier().is_some())
                .fold(0, |m, (i, _)| m | 1 << i),
            promote_tx: None,
            demand: None,
        })
    }

    /// Shares grace-period counters with the migration engine; `reactor_index`
    /// is this reactor's line in them.
    pub fn set_epochs(&mut self, epochs: Arc<Epochs>, reactor_index: usize) {
        self.epochs = epochs;
        self.reactor_index = reactor_index;
    }

    /// Follows the tier registry: tiers added at run time get channels here.
    pub fn set_tier_registry(&mut self, registry: Arc<TierRegistry>) {
        self.registry = Some(registry);
        self.open_new_tiers();
    }

    /// Tiers this engine has channels on.
    pub fn tiers_opened(&self) -> usize {
        self.chans.len()
    }

    /// Opens channels on tiers registered since the last look (off the I/O path:
    /// runs only when the registry's count changed). Buffers are not registered
    /// with these channels (the reactor's pool is not ours to keep); pieces to
    /// them use plain reads and writes.
    #[cold]
    fn open_new_tiers(&mut self) {
        let Some(reg) = self.registry.clone() else {
            return;
        };
        while self.chans.len() < reg.count() {
            let i = self.chans.len();
            let (name, dev) = reg.get(i).expect("counted tier is registered");
            let depth = (self.reqs.len() * 4).min(4096) as u32;
            match dev.open_channel(&ChannelOptions {
                queue_depth: depth,
                pool: None,
            }) {
                Ok(c) => {
                    self.chans.push(c);
                    self.tier_metrics
                        .push(OPS.map(|op| reg.metrics.tier_io(&name, op)));
                }
                Err(e) => {
                    tracing::error!(tier = %name, "cannot open a channel on the new tier: {e}");
                    return;
                }
            }
        }
        reg.ack(self.reactor_index, self.chans.len());
    }

    /// Where writes to object-resident data ask for a promotion.
    pub fn set_promoter(&mut self, tx: Sender<crate::migrate::PromoteRequest>) {
        self.promote_tx = Some(tx);
    }

    /// Reads off the fastest tier wait for their promotion while
    /// `settings.demand_reads` is set (the classic cache-like baseline).
    pub fn set_demand_reads(&mut self, settings: Arc<crate::migrate::MigrationSettings>) {
        self.demand = Some(settings);
    }

    /// Whether a read of the range should wait for a demand promotion: the policy is
    /// on, this read has not waited once already, and some granule is on a slower
    /// block tier (object tiers are read in place: a ranged GET, no promotion).
    fn wants_demand_promotion(&self, idx: u32, vol: &Volume) -> bool {
        let r = &self.reqs[idx as usize];
        if r.promoted
            || self.promote_tx.is_none()
            || !self
                .demand
                .as_ref()
                .is_some_and(|d| d.demand_reads.load(Ordering::Relaxed))
        {
            return false;
        }
        any_tier(vol, r.op.offset_bytes, r.op.len_bytes as u64, |t| {
            t != 0 && (self.object_mask >> t) & 1 == 0
        })
    }

    /// Whether any granule of the range is mapped to an object tier.
    fn touches_object_tier(&self, vol: &Volume, offset: u64, len: u64) -> bool {
        any_tier(vol, offset, len, |t| (self.object_mask >> t) & 1 != 0)
    }

    /// Parks a write whose range is object-resident (or a read under the demand
    /// policy) until the policy thread has promoted it, then dispatches it again (as
    /// after an allocation).
    fn promote_then_dispatch(&mut self, idx: u32) {
        let op = self.reqs[idx as usize].op;
        let read = op.kind == IoKind::Read;
        let Some(promote_tx) = &self.promote_tx else {
            // Only writes get here without a promoter (`wants_demand_promotion` needs one).
            tracing::error!("write to object-resident data with no promoter: EIO");
            self.finish_early(idx, -libc::EIO);
            return;
        };
        self.reqs[idx as usize].state = ReqState::Mapping;
        self.reqs[idx as usize].promoted = read;
        let tx = self.map_tx.clone();
        let waker = self.reactor.clone();
        let sent = promote_tx.send(crate::migrate::PromoteRequest {
            volume: op.volume as usize,
            offset_bytes: op.offset_bytes,
            len_bytes: op.len_bytes as u64,
            read,
            reply: Box::new(move |rc| {
                let _ = tx.send((idx, rc));
                if let Some(h) = waker {
                    h.wake();
                }
            }),
        });
        if sent.is_err() {
            self.reqs[idx as usize].state = ReqState::Running;
            self.finish_early(idx, -libc::ESHUTDOWN);
        }
    }

    /// Installs this reactor's heat recorder for a volume.
    pub fn set_heat(&mut self, volume: usize, recorder: HeatRecorder) {
        self.heat[volume] = Some(recorder);
    }

    /// Notifier fds of the tier channels, for the reactor's parker.
    pub fn notifier_fds(&self) -> Vec<std::os::fd::RawFd> {
        self.chans.iter().filter_map(|c| c.notifier_fd()).collect()
    }

    pub fn next_deadline_ns(&self) -> Option<u64> {
        self.chans.iter().filter_map(|c| c.next_deadline_ns()).min()
    }

    /// Requests accepted and not yet completed.
    pub fn inflight(&self) -> usize {
        self.reqs.len() - self.free.len()
    }

    pub fn has_capacity(&self) -> bool {
        !self.free.is_empty()
    }

    /// Starts an operation. The range must already be validated against the
    /// volume size and block size; returns false when the slab is full.
    ///
    /// # Safety
    /// `op.buf` must stay valid until the operation's completion is returned.
    pub unsafe fn submit(&mut self, op: VolumeOp) -> bool {
        let Some(idx) = self.free.pop() else {
            return false;
        };
        let vol = &self.volumes[op.volume as usize];
        assert!(
            op.offset_bytes + op.len_bytes as u64 <= vol.size_bytes,
            "unvalidated range reached the engine"
        );
        self.reqs[idx as usize] = Req {
            op,
            state: ReqState::Running,
            pieces_left: 0,
            result: 0,
            start_ns: now_ns(),
            epoch_bit: EPOCH_NONE,
            promoted: false,
        };
        if let (Some(h), IoKind::Read | IoKind::Write) = (&self.heat[op.volume as usize], op.kind) {
            let g = vol.map.granule_bytes;
            let last = &mut self.last_end[op.volume as usize];
            let sequential = *last == op.offset_bytes;
            *last = op.offset_bytes + op.len_bytes as u64;
            let first = op.offset_bytes / g;
            let end = (op.offset_bytes + op.len_bytes as u64)
                .div_ceil(g)
                .min(first + 16);
            for granule in first..end {
                h.record(granule as u32, op.kind == IoKind::Write, sequential);
            }
        }
        let needs_map =
            op.kind == IoKind::Write && !vol.is_mapped(op.offset_bytes, op.len_bytes as u64);
        if needs_map {
            self.reqs[idx as usize].state = ReqState::Mapping;
            let tx = self.map_tx.clone();
            let waker = self.reactor.clone();
            let sent = self.meta_tx.send(MetaRequest::Allocate {
                volume: op.volume as usize,
                offset_bytes: op.offset_bytes,
                len_bytes: op.len_bytes as u64,
                reply: Box::new(move |rc| {
                    let _ = tx.send((idx, rc));
                    if let Some(h) = waker {
                        h.wake();
                    }
                }),
            });
            if sent.is_err() {
                self.finish_early(idx, -libc::ESHUTDOWN);
            }
            return true;
        }
        self.dispatch(idx);
        true
    }

    fn finish_early(&mut self, idx: u32, rc: i32) {
        let r = &mut self.reqs[idx as usize];
        r.result = rc;
        r.pieces_left = 0;
        self.complete(idx);
    }

    /// Splits a running request into tier pieces and submits them.
    fn dispatch(&mut self, idx: u32) {
        let op = self.reqs[idx as usize].op;
        let vol = self.volumes[op.volume as usize].clone();
        let mut pieces = 0u32;
        let tag = idx as u64;
        let bit = self.epochs.enter(self.reactor_index);
        let modifies = matches!(op.kind, IoKind::Write | IoKind::WriteZeroes | IoKind::Trim);
        if modifies && vol.map.any_locked(op.offset_bytes, op.len_bytes as u64) {
            // A migration is copying this range: wait, then re-read the map.
            self.epochs.exit(self.reactor_index, bit);
            self.blocked.push_back(idx);
            return;
        }
        if modifies
            && self.object_mask != 0
            && self.touches_object_tier(&vol, op.offset_bytes, op.len_bytes as u64)
        {
            self.epochs.exit(self.reactor_index, bit);
            self.promote_then_dispatch(idx);
            return;
        }
        if op.kind == IoKind::Read && self.wants_demand_promotion(idx, &vol) {
            // Sent inside the epoch: once the policy thread has switched demand reads
            // off and waited a grace period, every such request is in its channel.
            self.promote_then_dispatch(idx);
            self.epochs.exit(self.reactor_index, bit);
            return;
        }
        self.reqs[idx as usize].epoch_bit = bit;
        match op.kind {
            IoKind::Flush => {
                for t in 0..self.chans.len() {
                    if self.push_piece(t, IoRequest::flush(tag)) {
                        pieces += 1;
                    }
                }
            }
            kind => {
                let mut unmapped_write = false;
                // The primary pieces this request uses, to tell shadows apart from them.
                let mut primary = [(0u64, 0u64, 0u8, 0u64); 8];
                let mut primary_n = 0usize;
                vol.map.for_each_piece(
                    op.offset_bytes,
                    op.len_bytes as u64,
                    |logical, len, target| {
                        let buf_off = (logical - op.offset_bytes) as usize;
                        match (target, kind) {
                            (None, IoKind::Read) => {
                                // SAFETY: the target guarantees `buf` holds len_bytes (submit contract).
                                unsafe {
                                    std::ptr::write_bytes(op.buf.add(buf_off), 0, len as usize)
                                };
                            }
                            (None, IoKind::Write) => unmapped_write = true,
                            (None, _) => {}
                            (Some((tier, phys)), _) => {
                                if primary_n < primary.len() {
                                    primary[primary_n] = (logical, len, tier, phys);
                                    primary_n += 1;
                                }
                                let req = piece_request(&op, tag, logical, len, phys);
                                if self.push_piece(tier as usize, req) {
                                    pieces += 1;
                                }
                            }
                        }
                    },
                );
                assert!(
                    !unmapped_write,
                    "write dispatched before its range was mapped"
                );
                if modifies {
                    vol.map.for_each_shadow_piece(
                        op.offset_bytes,
                        op.len_bytes as u64,
                        |logical, len, (tier, phys)| {
                            // Skip a shadow that is the location this request already writes
                            // (after a switch, before the shadow is cleared).
                            let same = primary[..primary_n].iter().any(|&(pl, plen, pt, pp)| {
                                pt == tier
                                    && logical >= pl
                                    && logical + len <= pl + plen
                                    && pp + (logical - pl) == phys
                            });
                            // An object tier takes no shadow writes: its copy is
                            // made under the lock, after this write completes.
                            if same || (self.object_mask >> tier) & 1 != 0 {
                                return;
                            }
                            let req = piece_request(&op, tag, logical, len, phys);
                            if self.push_piece(tier as usize, req) {
                                pieces += 1;
                            }
                        },
                    );
                }
            }
        }
        let r = &mut self.reqs[idx as usize];
        r.pieces_left = pieces;
        if pieces == 0 {
            self.complete(idx);
        }
    }

    /// Queues one piece; false if the device refused it (the request's result is set).
    fn push_piece(&mut self, tier: usize, req: IoRequest) -> bool {
        self.tier_metrics[tier][op_index(req.kind)].record(req.len_bytes as u64);
        if !self.deferred.is_empty() {
            self.deferred.push_back((tier, req));
            return true;
        }
        // SAFETY: the buffer obligations were accepted by `submit`'s caller and last
        // until the whole request completes, which is after this piece completes.
        match unsafe { self.chans[tier].submit(&req) } {
            Ok(()) => true,
            Err(SubmitError::QueueFull) => {
                self.deferred.push_back((tier, req));
                true
            }
            Err(e) => {
                tracing::error!("tier {tier} refused a piece at {}: {e}", req.offset_bytes);
                self.reqs[req.tag as usize].result = -e.errno();
                false
            }
        }
    }

    fn complete(&mut self, idx: u32) {
        let r = self.reqs[idx as usize];
        let vol = &self.volumes[r.op.volume as usize];
        let lat = now_ns().saturating_sub(r.start_ns);
        let s = &vol.stats;
        match r.op.kind {
            IoKind::Read => {
                s.read_ios.fetch_add(1, Ordering::Relaxed);
                s.read_bytes
                    .fetch_add(r.op.len_bytes as u64, Ordering::Relaxed);
                s.read_latency_ns_total.fetch_add(lat, Ordering::Relaxed);
            }
            IoKind::Write => {
                s.write_ios.fetch_add(1, Ordering::Relaxed);
                s.write_bytes
                    .fetch_add(r.op.len_bytes as u64, Ordering::Relaxed);
                s.write_latency_ns_total.fetch_add(lat, Ordering::Relaxed);
            }
            _ => {
                s.other_ios.fetch_add(1, Ordering::Relaxed);
            }
        }
        if r.result != 0 {
            s.errors.fetch_add(1, Ordering::Relaxed);
        }
        self.vol_metrics[r.op.volume as usize][op_index(r.op.kind)].record(
            r.op.len_bytes as u64,
            lat,
            r.result == 0,
        );
        if r.epoch_bit != EPOCH_NONE {
            self.epochs.exit(self.reactor_index, r.epoch_bit);
        }
        self.reqs[idx as usize].state = ReqState::Free;
        self.reqs[idx as usize].epoch_bit = EPOCH_NONE;
        self.free.push(idx);
        self.done.push_back((r.op.token, r.result));
    }

    /// Drives the engine: map replies, deferred pieces, submissions, completions.
    /// Returns whether anything happened.
    pub fn poll(&mut self) -> bool {
        let mut busy = false;
        if self
            .registry
            .as_ref()
            .is_some_and(|r| r.count() != self.chans.len())
        {
            self.open_new_tiers();
        }
        while let Ok((idx, rc)) = self.map_rx.try_recv() {
            busy = true;
            assert_eq!(self.reqs[idx as usize].state, ReqState::Mapping);
            self.reqs[idx as usize].state = ReqState::Running;
            // A read waited for a demand promotion: served from wherever the data is
            // now, whether the promotion worked or not.
            if rc != 0 && self.reqs[idx as usize].op.kind != IoKind::Read {
                self.finish_early(idx, rc);
            } else {
                self.dispatch(idx);
            }
        }
        for _ in 0..self.blocked.len() {
            let idx = self.blocked.pop_front().expect("counted");
            self.dispatch(idx);
            busy = true;
        }
        while let Some(&(tier, req)) = self.deferred.front() {
            // SAFETY: as in push_piece.
            match unsafe { self.chans[tier].submit(&req) } {
                Ok(()) => {
                    self.deferred.pop_front();
                    busy = true;
                }
                Err(SubmitError::QueueFull) => break,
                Err(e) => {
                    self.deferred.pop_front();
                    let r = &mut self.reqs[req.tag as usize];
                    r.result = -e.errno();
                    r.pieces_left -= 1;
                    if r.pieces_left == 0 {
                        self.complete(req.tag as u32);
                    }
                }
            }
        }
        for t in 0..self.chans.len() {
            if self.chans[t].submit_pending() > 0 {
                busy = true;
            }
            loop {
                let n = self.chans[t].poll_completions(&mut self.reaped);
                for k in 0..n {
                    let c = self.reaped[k];
                    let idx = c.tag as u32;
                    let r = &mut self.reqs[idx as usize];
                    debug_assert_eq!(r.state, ReqState::Running);
                    if c.result < 0 && r.result == 0 {
                        r.result = c.result;
                        tracing::warn!(
                            tier = t,
                            "tier I/O failed: {}",
                            std::io::Error::from_raw_os_error(-c.result)
                        );
                    }
                    r.pieces_left -= 1;
                    if r.pieces_left == 0 {
                        self.complete(idx);
                    }
                }
                busy |= n > 0;
                if n < self.reaped.len() {
                    break;
                }
            }
        }
        busy
    }

    /// Takes the next completed operation.
    #[inline]
    pub fn pop_completion(&mut self) -> Option<VolumeCompletion> {
        self.done.pop_front()
    }
}
