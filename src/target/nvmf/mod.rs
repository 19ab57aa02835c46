//! The NVMe/TCP target on the reactors.
//!
//! Each reactor runs one [`NvmfPoller`] that owns its connections (one NVMe
//! queue each: the admin queue or one I/O queue of a controller) and its own
//! [`VolumeIo`] engine. Acceptor threads hand sockets to reactors round-robin,
//! so the queues of one controller spread over the reactors; the controller
//! itself ([`ctrl::Ctrl`]) is shared and only touched at Connect, by admin
//! commands, and by one relaxed load of its `dead` flag per poll.
//!
//! A connection first waits for ICReq, then decodes PDUs with the sans-I/O
//! codec ([`super::nvmf_proto`]). Every command occupies a request slot whose
//! explicit state ([`ReqState`]) moves:
//!
//! ```text
//! Free -> (in-capsule data or none) ------------------------> Executing -> Responding -> Free
//! Free -> AwaitR2T -> ReceivingData (H2CData PDUs) ---------> Executing -> Responding -> Free
//! Free -> AerHeld (Async Event Request, until teardown)
//! ```
//!
//! Responses (C2HData with the read data, then CapsuleResp; or C2HData with
//! SUCCESS when the host disabled SQ flow control) go out with one `writev`
//! per batch. A malformed PDU gets a C2HTermReq and closes that connection
//! only.

pub mod ctrl;
pub mod service;

use crate::target::nbd::send_iovecs;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crossbeam_channel::Receiver;

use self::ctrl::{AdminCtx, AdminOutcome, Ctrl, Namespace, Registry, LBA_SHIFT};
use super::nvmf_proto::{self as p, Digests, Limits, Pdu, Role, Sqe};
use crate::bdev::IoKind;
use crate::clock::now_ns;
use crate::dma::{DmaBuf, DmaPool};
use crate::reactor::{PollCtx, PollStatus, Poller};
use crate::volume::io::{VolumeIo, VolumeOp};

/// Messages to a reactor's NVMe/TCP poller.
pub enum NvmfMsg {
    /// A freshly accepted socket and the listener address it came in on.
    Connection {
        fd: OwnedFd,
        peer: String,
        local: SocketAddr,
    },
    /// Stop reading commands; finish what is in flight, then close everything.
    Drain {
        done: crossbeam_channel::Sender<usize>,
    },
}

/// State shared by every reactor's poller, the acceptors and RPC.
pub struct NvmfShared {
    pub registry: Arc<Registry>,
    /// Largest data transfer of one command (the DMA buffer size; MDTS).
    pub max_io_bytes: u32,
    /// Connections open, over all reactors.
    pub live: AtomicUsize,
    /// Connections the acceptors admit (`nvmf.max_connections`, at most
    /// [`service::CONNECTIONS_MAX`]); one more is closed at once.
    pub max_connections: usize,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum ReqState {
    Free,
    /// Host data comes by R2T; waiting for an R2T credit.
    AwaitR2T,
    /// R2T sent; H2CData PDUs arrive.
    ReceivingData,
    /// Volume operations in flight (`pending` of them).
    Executing,
    /// The response is queued; the slot is freed once it is sent.
    Responding,
    /// An Async Event Request, held until an event or teardown.
    AerHeld,
}

#[derive(Clone, Copy)]
struct Req {
    state: ReqState,
    sqe: Sqe,
    buf: Option<DmaBuf>,
    /// Bytes the command transfers (host to controller or back).
    len: u32,
    /// Host data received so far (R2T path).
    received: u32,
    /// Volume operations outstanding.
    pending: u32,
    /// First error status of the command (0 = none yet).
    status: u16,
}

const REQ_FREE: Req = Req {
    state: ReqState::Free,
    sqe: Sqe {
        opcode: 0,
        flags: 0,
        cid: 0,
        nsid: 0,
        cdw2: 0,
        cdw3: 0,
        sgl_addr: 0,
        sgl_len: 0,
        sgl_type: 0,
        cdw10: 0,
        cdw11: 0,
        cdw12: 0,
        cdw13: 0,
        cdw14: 0,
        cdw15: 0,
    },
    buf: None,
    len: 0,
    received: 0,
    pending: 0,
    status: 0,
};

/// One queued response: header, optional data, optional tail (data digest
/// and/or CapsuleResp).
struct Out {
    hdr: [u8; 64],
    hdr_len: u8,
    data: *const u8,
    data_len: u32,
    tail: [u8; 32],
    tail_len: u8,
    sent: u32,
    /// The slot to release once fully sent.
    slot: Option<u16>,
}

impl Out {
    fn total(&self) -> u32 {
        self.hdr_len as u32 + self.data_len + self.tail_len as u32
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Rx {
    /// A PDU header is expected at `rx[0]`.
    Pdu,
    /// H2CData payload for `slot`: bytes `at..end` of its buffer are still to come.
    H2CData {
        slot: u16,
        start: u32,
        at: u32,
        end: u32,
        digest: bool,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    AwaitIcReq,
    Active,
    Closing,
}

struct Conn {
    fd: OwnedFd,
    peer: String,
    local: SocketAddr,
    generation: u16,
    phase: Phase,
    digests: Digests,
    hpda: u8,
    r2t_wait: VecDeque<u16>,
    rx: Vec<u8>,
    rx_len: usize,
    rx_state: Rx,
    raw_out: Vec<u8>,
    raw_sent: usize,
    outq: VecDeque<Out>,
    reqs: Vec<Req>,
    free: Vec<u16>,
    /// Volume operations in flight (their buffers belong to the engine).
    ops_inflight: usize,
    ctrl: Option<Arc<Ctrl>>,
    qid: u16,
    entries: u16,
    sqhd: u16,
    sq_flow_disabled: bool,
    ns: Vec<Namespace>,
    ns_generation: u64,
    aers: usize,
    last_cmd_ns: u64,
    close_after_flush: bool,
    /// A TermReq was queued: nothing else may follow it on the wire.
    terminated: bool,
    dead: bool,
    rx_ready: bool,
}

/// Room for many small capsules per recv and one whole capsule with 8 KiB of data.
const RX_BYTES: usize = 64 << 10;
/// Request slots per connection: the largest queue (CAP.MQES + 1).
const SLOTS: usize = ctrl::QUEUE_ENTRIES_MAX as usize;
/// Volume operations per reactor engine.
const ENGINE_SLAB: usize = 4096;
/// Slack added to KATO before a silent host's controller is torn down.
const KATO_SLACK_NS: u64 = 500_000_000;

const LIMITS: Limits = Limits {
    in_capsule_data_max: ctrl::IN_CAPSULE_BYTES,
    data_pdu_max: ctrl::MAXH2CDATA_BYTES,
};

/// Why a connection must end with a C2HTermReq.
struct Fatal {
    fes: u16,
    fei: u32,
    why: String,
    /// How many bytes of `rx` hold the offending header.
    hdr_bytes: usize,
}

pub struct NvmfPoller {
    io: VolumeIo,
    conns: Vec<Option<Conn>>,
    generation: u16,
    inbox: Receiver<NvmfMsg>,
    shared: Arc<NvmfShared>,
    draining: Option<crossbeam_channel::Sender<usize>>,
    watched: Vec<RawFd>,
    fired: Vec<RawFd>,
    polls: u64,
}

impl NvmfPoller {
    /// The volume engine's slab size this poller wants.
    pub const ENGINE_SLAB: usize = ENGINE_SLAB;

    pub fn new(io: VolumeIo, inbox: Receiver<NvmfMsg>, shared: Arc<NvmfShared>) -> NvmfPoller {
        NvmfPoller {
            io,
            conns: Vec::new(),
            generation: 0,
            inbox,
            shared,
            draining: None,
            watched: Vec::new(),
            fired: Vec::with_capacity(64),
            polls: 0,
        }
    }

    fn accept(&mut self, fd: OwnedFd, peer: String, local: SocketAddr, ctx: &mut PollCtx<'_>) {
        let raw = fd.as_raw_fd();
        super::nbd::set_nonblocking_nodelay(raw);
        if let Err(e) = ctx.parker.watch_rw(raw) {
            tracing::warn!(%peer, "cannot watch NVMe/TCP socket: {e}");
        }
        self.generation = self.generation.wrapping_add(1);
        let conn = Conn {
            fd,
            peer,
            local,
            generation: self.generation,
            phase: Phase::AwaitIcReq,
            digests: Digests::default(),
            hpda: 0,
            r2t_wait: VecDeque::with_capacity(SLOTS),
            rx: vec![0; RX_BYTES],
            rx_len: 0,
            rx_state: Rx::Pdu,
            raw_out: Vec::with_capacity(256),
            raw_sent: 0,
            outq: VecDeque::with_capacity(SLOTS),
            reqs: vec![REQ_FREE; SLOTS],
            free: (0..SLOTS as u16).rev().collect(),
            ops_inflight: 0,
            ctrl: None,
            qid: 0,
            entries: 1,
            sqhd: 0,
            sq_flow_disabled: false,
            ns: Vec::new(),
            ns_generation: u64::MAX,
            aers: 0,
            last_cmd_ns: now_ns(),
            close_after_flush: false,
            terminated: false,
            dead: false,
            rx_ready: true,
        };
        tracing::debug!(peer = %conn.peer, "NVMe/TCP connection accepted");
        match self.conns.iter().position(|c| c.is_none()) {
            Some(i) => self.conns[i] = Some(conn),
            None => self.conns.push(Some(conn)),
        }
    }

    fn token(idx: usize, generation: u16, slot: u16) -> u64 {
        ((idx as u64) << 32) | ((generation as u64) << 16) | slot as u64
    }
}

/// Everything a connection's command handling needs besides the connection.
struct Env<'a> {
    io: &'a mut VolumeIo,
    pool: &'a mut DmaPool,
    shared: &'a NvmfShared,
    idx: usize,
}

impl Conn {
    fn cqe(&self, slot: u16, status: u16, dw0: u32, dw1: u32) -> p::Cqe {
        p::Cqe {
            dw0,
            dw1,
            sqhd: self.sqhd,
            sqid: self.qid,
            cid: self.reqs[slot as usize].sqe.cid,
            status,
        }
    }

    /// Completes one held Async Event Request with event `dw0`.
    fn complete_aer(&mut self, dw0: u32) {
        let Some(slot) = self.reqs.iter().position(|r| r.state == ReqState::AerHeld) else {
            return;
        };
        self.aers -= 1;
        tracing::debug!(peer = %self.peer, dw0 = format_args!("{dw0:#x}"), "asynchronous event");
        self.respond(slot as u16, p::STATUS_SUCCESS, dw0, 0, 0);
    }

    /// Queues the response of `slot`: C2HData with `data_len` bytes of its buffer
    /// (when it succeeded and moves data to the host), then CapsuleResp unless
    /// the C2HData carries SUCCESS.
    fn respond(&mut self, slot: u16, status: u16, dw0: u32, dw1: u32, data_len: u32) {
        let d = self.digests;
        let r = &mut self.reqs[slot as usize];
        r.state = ReqState::Responding;
        let mut out = Out {
            hdr: [0; 64],
            hdr_len: 0,
            data: std::ptr::null(),
            data_len: 0,
            tail: [0; 32],
            tail_len: 0,
            sent: 0,
            slot: Some(slot),
        };
        let cqe = self.cqe(slot, status, dw0, dw1);
        let r = self.reqs[slot as usize];
        if status == 0 && data_len > 0 {
            let buf = r.buf.expect("a command with response data has a buffer");
            let success = self.sq_flow_disabled;
            let flags = p::FLAG_DATA_LAST | if success { p::FLAG_DATA_SUCCESS } else { 0 };
            let hdr = p::DataHdr {
                cccid: r.sqe.cid,
                ttag: 0,
                datao: 0,
                datal: data_len,
            };
            let header_end = p::DATA_HLEN + if d.header { p::DIGEST_BYTES } else { 0 };
            let pad = p::hpda_pad(header_end, self.hpda);
            out.hdr_len =
                p::encode_data_hdr(&mut out.hdr, p::PDU_C2H_DATA, flags, &hdr, pad, d) as u8;
            out.data = buf.ptr;
            out.data_len = data_len;
            let mut t = 0;
            if d.data {
                // SAFETY: the buffer holds data_len valid bytes and belongs to this slot.
                let data = unsafe { std::slice::from_raw_parts(buf.ptr, data_len as usize) };
                p::put32(&mut out.tail, 0, p::digest(data));
                t = p::DIGEST_BYTES;
            }
            if !success {
                t += p::encode_capsule_resp(&mut out.tail[t..], &cqe, d);
            }
            out.tail_len = t as u8;
        } else {
            out.hdr_len = p::encode_capsule_resp(&mut out.hdr, &cqe, d) as u8;
        }
        tracing::trace!(peer = %self.peer, cid = r.sqe.cid, status, "NVMe/TCP response queued");
        self.outq.push_back(out);
    }

    fn release(&mut self, slot: u16, pool: &mut DmaPool) {
        let r = &mut self.reqs[slot as usize];
        if let Some(b) = r.buf.take() {
            pool.free(b);
        }
        *r = REQ_FREE;
        self.free.push(slot);
        // Buffered commands may have waited for this slot.
        self.rx_ready |= self.rx_len > 0;
    }

    /// Queues a C2HTermReq and stops reading.
    fn terminate(&mut self, f: Fatal) {
        tracing::warn!(peer = %self.peer, fes = f.fes, fei = f.fei, "NVMe/TCP connection terminated: {}", f.why);
        let mut b = [0u8; p::TERM_REQ_HLEN + p::TERM_REQ_DATA_MAX];
        let hdr = &self.rx[..f.hdr_bytes.min(self.rx_len).min(p::TERM_REQ_DATA_MAX)];
        let n = p::encode_term_req(
            &mut b,
            p::PDU_C2H_TERM_REQ,
            &p::TermReq {
                fes: f.fes,
                fei: f.fei,
            },
            hdr,
        );
        self.raw_out.extend_from_slice(&b[..n]);
        self.phase = Phase::Closing;
        self.close_after_flush = true;
        self.terminated = true;
    }

    /// Sends an R2T for every write waiting for one. MAXR2T limits R2Ts per
    /// command, and each command gets exactly one (for its whole transfer).
    fn pump_r2t(&mut self) {
        while let Some(slot) = self.r2t_wait.pop_front() {
            let r = &mut self.reqs[slot as usize];
            r.state = ReqState::ReceivingData;
            let mut out = Out {
                hdr: [0; 64],
                hdr_len: 0,
                data: std::ptr::null(),
                data_len: 0,
                tail: [0; 32],
                tail_len: 0,
                sent: 0,
                slot: None,
            };
            out.hdr_len = p::encode_r2t(
                &mut out.hdr,
                &p::R2t {
                    cccid: r.sqe.cid,
                    ttag: slot,
                    r2to: 0,
                    r2tl: r.len,
                },
                self.digests,
            ) as u8;
            self.outq.push_back(out);
        }
    }

    /// Refreshes the namespace snapshot when the subsystem changed.
    fn refresh_ns(&mut self) {
        if let Some(c) = &self.ctrl {
            let g = c.subsys.ns_generation.load(Ordering::Acquire);
            if g != self.ns_generation {
                self.ns = c.subsys.namespaces.lock().unwrap().clone();
                self.ns_generation = g;
            }
        }
    }
}

/// What the I/O path needs of a namespace (copied, so no allocation per command).
struct NsRef {
    volume: u32,
    blocks: u64,
}

/// Direction and length of a command's data.
enum Xfer {
    None,
    ToHost(u32),
    FromHost(u32),
}

fn xfer_of(conn: &Conn, sqe: &Sqe) -> Xfer {
    if sqe.opcode == p::OPC_FABRICS {
        return if sqe.fctype() == p::FCTYPE_CONNECT {
            Xfer::FromHost(p::CONNECT_DATA_BYTES as u32)
        } else {
            Xfer::None
        };
    }
    if conn.ctrl.is_none() {
        return Xfer::None;
    }
    if conn.qid == 0 {
        return match sqe.opcode {
            p::ADMIN_IDENTIFY | p::ADMIN_GET_LOG_PAGE | p::ADMIN_GET_FEATURES
                if sqe.sgl_len > 0 =>
            {
                Xfer::ToHost(sqe.sgl_len)
            }
            _ => Xfer::None,
        };
    }
    match sqe.opcode {
        p::IO_READ => Xfer::ToHost(sqe.nlb() << LBA_SHIFT),
        p::IO_WRITE => Xfer::FromHost(sqe.nlb() << LBA_SHIFT),
        p::IO_DSM => Xfer::FromHost(((sqe.cdw10 & 0xff) + 1) * 16),
        _ => Xfer::None,
    }
}

const fn generic(sc: u8) -> u16 {
    p::status(p::SCT_GENERIC, sc)
}

impl NvmfPoller {
    /// Handles one CapsuleCmd whose in-capsule data (if any) is `data`.
    fn capsule(conn: &mut Conn, env: &mut Env<'_>, slot: u16, sqe: Sqe, data: &[u8]) {
        conn.free.pop();
        conn.reqs[slot as usize] = Req { sqe, ..REQ_FREE };
        conn.reqs[slot as usize].state = ReqState::Executing;
        conn.sqhd = (conn.sqhd + 1) % conn.entries.max(1);
        if conn.qid == 0 {
            conn.last_cmd_ns = now_ns();
        }
        let (len, from_host) = match xfer_of(conn, &sqe) {
            Xfer::None => (0, false),
            Xfer::ToHost(n) => (n, false),
            Xfer::FromHost(n) => (n, true),
        };
        if len > 0 {
            if len > env.shared.max_io_bytes {
                return conn.respond(slot, generic(p::SC_INVALID_FIELD), 0, 0, 0);
            }
            let sgl_ok = if from_host {
                match sqe.sgl_type {
                    p::SGL_DATA_BLOCK_OFFSET if sqe.sgl_addr != 0 => {
                        return conn.respond(slot, generic(p::SC_SGL_OFFSET_INVALID), 0, 0, 0)
                    }
                    p::SGL_DATA_BLOCK_OFFSET => sqe.sgl_len == len && data.len() == len as usize,
                    p::SGL_TRANSPORT_DATA_BLOCK => sqe.sgl_len == len && data.is_empty(),
                    _ => return conn.respond(slot, generic(p::SC_SGL_TYPE_INVALID), 0, 0, 0),
                }
            } else {
                match sqe.sgl_type {
                    p::SGL_TRANSPORT_DATA_BLOCK => sqe.sgl_len >= len,
                    _ => return conn.respond(slot, generic(p::SC_SGL_TYPE_INVALID), 0, 0, 0),
                }
            };
            if !sgl_ok {
                return conn.respond(slot, generic(p::SC_SGL_LENGTH_INVALID), 0, 0, 0);
            }
            let buf = env
                .pool
                .alloc()
                .expect("a buffer was checked before the capsule");
            let r = &mut conn.reqs[slot as usize];
            r.buf = Some(buf);
            r.len = len;
            if from_host {
                if data.is_empty() {
                    r.state = ReqState::AwaitR2T;
                    conn.r2t_wait.push_back(slot);
                    conn.pump_r2t();
                    return;
                }
                // SAFETY: len <= max_io_bytes = buffer size; the buffer belongs to this slot.
                unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), buf.ptr, data.len()) };
                r.received = len;
            }
        } else if !data.is_empty() {
            return conn.respond(slot, generic(p::SC_INVALID_FIELD), 0, 0, 0);
        }
        Self::execute(conn, env, slot);
    }

    /// Runs a command whose host data (if any) is in its buffer.
    fn execute(conn: &mut Conn, env: &mut Env<'_>, slot: u16) {
        let r = conn.reqs[slot as usize];
        let sqe = r.sqe;
        if r.status != 0 {
            return conn.respond(slot, r.status, 0, 0, 0);
        }
        if sqe.flags & 0x03 != 0 {
            // Fused commands are not supported.
            return conn.respond(slot, generic(p::SC_INVALID_FIELD), 0, 0, 0);
        }
        if conn.ctrl.is_none() {
            if sqe.opcode == p::OPC_FABRICS && sqe.fctype() == p::FCTYPE_CONNECT {
                return Self::connect(conn, env, slot);
            }
            tracing::info!(peer = %conn.peer, opcode = sqe.opcode, "command before Connect refused");
            return conn.respond(slot, generic(p::SC_CMD_SEQ_ERROR), 0, 0, 0);
        }
        if sqe.opcode == p::OPC_FABRICS && conn.qid != 0 {
            return match sqe.fctype() {
                p::FCTYPE_DISCONNECT => {
                    conn.respond(slot, p::STATUS_SUCCESS, 0, 0, 0);
                    conn.phase = Phase::Closing;
                    conn.close_after_flush = true;
                }
                p::FCTYPE_CONNECT => conn.respond(slot, generic(p::SC_CMD_SEQ_ERROR), 0, 0, 0),
                _ => conn.respond(slot, generic(p::SC_INVALID_FIELD), 0, 0, 0),
            };
        }
        if conn.qid == 0 && sqe.opcode == p::ADMIN_ABORT && sqe.cdw10 & 0xffff == 0 {
            // Abort of an admin command: a held Async Event Request is the only one
            // that can still be waiting; anything else already completed.
            let cid = (sqe.cdw10 >> 16) as u16;
            let held = conn
                .reqs
                .iter()
                .position(|r| r.state == ReqState::AerHeld && r.sqe.cid == cid);
            if let Some(aer) = held {
                conn.aers -= 1;
                conn.respond(aer as u16, generic(p::SC_ABORT_REQUESTED), 0, 0, 0);
                return conn.respond(slot, p::STATUS_SUCCESS, 0, 0, 0);
            }
        }
        if conn.qid == 0 {
            let ctrl = conn.ctrl.clone().expect("connected");
            let buf = r.buf;
            let mut scratch = [0u8; 0];
            let out: &mut [u8] = match buf {
                // SAFETY: the buffer belongs to this slot; nothing else touches it.
                Some(b) => unsafe { std::slice::from_raw_parts_mut(b.ptr, b.len) },
                None => &mut scratch,
            };
            let mut big = Vec::new();
            let out = if out.len() < 4096 {
                big.resize(4096, 0);
                big.as_mut_slice()
            } else {
                out
            };
            let mut actx = AdminCtx {
                reg: &env.shared.registry,
                ctrl: &ctrl,
                aers_held: conn.aers,
                max_transfer_bytes: env.shared.max_io_bytes,
            };
            match ctrl::admin_command(&mut actx, &sqe, out) {
                AdminOutcome::HoldAer => {
                    conn.aers += 1;
                    conn.reqs[slot as usize].state = ReqState::AerHeld;
                }
                AdminOutcome::Done {
                    status,
                    dw0,
                    dw1,
                    data_len,
                } => {
                    let n = if r.buf.is_some() {
                        data_len.min(r.len)
                    } else {
                        0
                    };
                    conn.respond(slot, status, dw0, dw1, n);
                }
            }
            return;
        }
        Self::io_command(conn, env, slot)
    }

    fn connect(conn: &mut Conn, env: &mut Env<'_>, slot: u16) {
        let r = conn.reqs[slot as usize];
        let buf = r.buf.expect("Connect carries data");
        // SAFETY: the slot owns the buffer, which holds the 1024 received bytes.
        let data = unsafe { std::slice::from_raw_parts(buf.ptr, p::CONNECT_DATA_BYTES) };
        match ctrl::connect(&env.shared.registry, &r.sqe, data, conn.local) {
            Ok(c) => {
                tracing::info!(peer = %conn.peer, subnqn = %c.ctrl.subsys.nqn, hostnqn = %c.ctrl.hostnqn,
                    cntlid = c.ctrl.cntlid, qid = c.qid, entries = c.entries, "NVMe-oF Connect");
                conn.qid = c.qid;
                conn.entries = c.entries;
                conn.sqhd = 1 % c.entries;
                conn.sq_flow_disabled = c.sq_flow_disabled;
                let cntlid = c.ctrl.cntlid;
                conn.ctrl = Some(c.ctrl);
                conn.refresh_ns();
                conn.respond(slot, p::STATUS_SUCCESS, cntlid as u32, 0, 0);
            }
            Err(refusal) => {
                let d = p::ConnectData::parse(data).unwrap_or_default();
                tracing::warn!(peer = %conn.peer, subnqn = %d.subnqn, hostnqn = %d.hostnqn,
                    "NVMe-oF Connect refused: {}", refusal.why);
                conn.respond(slot, refusal.status, refusal.dw0, 0, 0);
            }
        }
    }

    fn io_command(conn: &mut Conn, env: &mut Env<'_>, slot: u16) {
        let r = conn.reqs[slot as usize];
        let sqe = r.sqe;
        conn.refresh_ns();
        let known = matches!(
            sqe.opcode,
            p::IO_READ | p::IO_WRITE | p::IO_FLUSH | p::IO_WRITE_ZEROES | p::IO_DSM
        );
        if !known {
            tracing::info!(peer = %conn.peer, opcode = sqe.opcode, "unknown I/O opcode");
            return conn.respond(slot, generic(p::SC_INVALID_OPCODE), 0, 0, 0);
        }
        let ns = if sqe.opcode == p::IO_FLUSH && sqe.nsid == 0xffff_ffff {
            conn.ns.first()
        } else {
            conn.ns.iter().find(|n| n.nsid == sqe.nsid)
        }
        .map(|n| NsRef {
            volume: n.volume,
            blocks: n.blocks,
        });
        let Some(ns) = ns else {
            return conn.respond(slot, generic(p::SC_INVALID_NS), 0, 0, 0);
        };
        let (buf, buf_index) = match r.buf {
            Some(b) => (b.ptr, b.index),
            None => (std::ptr::null_mut(), crate::bdev::BUF_INDEX_NONE),
        };
        let token = Self::token(env.idx, conn.generation, slot);
        let mut op = VolumeOp {
            volume: ns.volume,
            kind: IoKind::Flush,
            offset_bytes: 0,
            len_bytes: 0,
            buf,
            buf_index,
            fua: false,
            token,
        };
        let mut ranges = [(0u64, 0u64); 1];
        let ranges: &[(u64, u64)] = match sqe.opcode {
            p::IO_FLUSH => &[],
            p::IO_READ | p::IO_WRITE | p::IO_WRITE_ZEROES => {
                let slba = sqe.slba();
                let nlb = sqe.nlb() as u64;
                if slba.checked_add(nlb).is_none_or(|end| end > ns.blocks) {
                    return conn.respond(slot, generic(p::SC_LBA_RANGE), 0, 0, 0);
                }
                op.kind = match sqe.opcode {
                    p::IO_READ => IoKind::Read,
                    p::IO_WRITE => IoKind::Write,
                    _ => IoKind::WriteZeroes,
                };
                op.fua = sqe.fua();
                ranges[0] = (slba, nlb);
                &ranges
            }
            _ => {
                // Dataset Management: only deallocate (AD) does anything.
                if sqe.cdw11 & (1 << 2) == 0 {
                    return conn.respond(slot, p::STATUS_SUCCESS, 0, 0, 0);
                }
                return Self::deallocate(conn, env, slot, &ns, op);
            }
        };
        if let Some(&(slba, nlb)) = ranges.first() {
            op.offset_bytes = slba << LBA_SHIFT;
            op.len_bytes = (nlb << LBA_SHIFT) as u32;
        }
        conn.reqs[slot as usize].pending = 1;
        conn.reqs[slot as usize].state = ReqState::Executing;
        conn.ops_inflight += 1;
        // SAFETY: the slot's buffer stays allocated until the response is sent, which
        // happens only after the engine returns this token.
        if !unsafe { env.io.submit(op) } {
            conn.ops_inflight -= 1;
            conn.respond(slot, generic(p::SC_INTERNAL), 0, 0, 0);
        }
    }

    /// Dataset Management with AD: one trim per range (split at 1 GiB).
    fn deallocate(conn: &mut Conn, env: &mut Env<'_>, slot: u16, ns: &NsRef, op: VolumeOp) {
        let r = conn.reqs[slot as usize];
        let buf = r.buf.expect("DSM carries ranges");
        let nr = r.len as usize / 16;
        // SAFETY: the slot owns the buffer holding r.len received bytes.
        let data = unsafe { std::slice::from_raw_parts(buf.ptr, r.len as usize) };
        for i in 0..nr {
            let nlb = p::le32(data, i * 16 + 4) as u64;
            let slba = p::le64(data, i * 16 + 8);
            if slba.checked_add(nlb).is_none_or(|end| end > ns.blocks) {
                return conn.respond(slot, generic(p::SC_LBA_RANGE), 0, 0, 0);
            }
        }
        const PIECE_BYTES: u64 = 1 << 30;
        conn.reqs[slot as usize].state = ReqState::Executing;
        let mut pending = 0;
        for i in 0..nr {
            let mut off = p::le64(data, i * 16 + 8) << LBA_SHIFT;
            let end = off + ((p::le32(data, i * 16 + 4) as u64) << LBA_SHIFT);
            while off < end {
                let n = (end - off).min(PIECE_BYTES);
                let trim = VolumeOp {
                    kind: IoKind::Trim,
                    offset_bytes: off,
                    len_bytes: n as u32,
                    buf: std::ptr::null_mut(),
                    buf_index: crate::bdev::BUF_INDEX_NONE,
                    ..op
                };
                // SAFETY: a trim carries no buffer.
                if unsafe { env.io.submit(trim) } {
                    pending += 1;
                } else {
                    conn.reqs[slot as usize].status = generic(p::SC_INTERNAL);
                    break;
                }
                off += n;
            }
        }
        conn.ops_inflight += pending as usize;
        conn.reqs[slot as usize].pending = pending;
        if pending == 0 {
            let st = conn.reqs[slot as usize].status;
            conn.respond(slot, st, 0, 0, 0);
        }
    }

    /// A volume operation finished.
    fn op_done(conn: &mut Conn, slot: u16, rc: i32) {
        conn.ops_inflight -= 1;
        let r = &mut conn.reqs[slot as usize];
        debug_assert_eq!(r.state, ReqState::Executing);
        if rc != 0 && r.status == 0 {
            r.status = match (r.sqe.opcode, -rc) {
                (_, libc::EINVAL) => generic(p::SC_INVALID_FIELD),
                (p::IO_READ, _) => p::status(p::SCT_MEDIA, p::SC_UNRECOVERED_READ),
                (p::IO_WRITE | p::IO_WRITE_ZEROES, _) => p::status(p::SCT_MEDIA, p::SC_WRITE_FAULT),
                _ => generic(p::SC_INTERNAL),
            };
        }
        r.pending -= 1;
        if r.pending > 0 {
            return;
        }
        let (status, read_len) = (r.status, if r.sqe.opcode == p::IO_READ { r.len } else { 0 });
        conn.respond(slot, status, 0, 0, read_len);
    }

    /// Decodes and handles buffered PDUs. Returns Ok(true) if anything was consumed.
    fn parse(conn: &mut Conn, env: &mut Env<'_>) -> Result<bool, Fatal> {
        let mut progress = false;
        let mut used = 0usize;
        let result = loop {
            if conn.phase == Phase::Closing {
                break Ok(());
            }
            let rest = &conn.rx[used..conn.rx_len];
            if let Rx::H2CData {
                slot,
                start,
                at,
                end,
                digest,
            } = conn.rx_state
            {
                let r = conn.reqs[slot as usize];
                let buf = r.buf.expect("receiving slot has a buffer");
                let n = rest.len().min((end - at) as usize);
                // SAFETY: at + n <= end <= r.len <= buffer size; the slot owns the buffer.
                unsafe {
                    std::ptr::copy_nonoverlapping(rest.as_ptr(), buf.ptr.add(at as usize), n)
                };
                used += n;
                progress |= n > 0;
                let at = at + n as u32;
                if at < end {
                    conn.rx_state = Rx::H2CData {
                        slot,
                        start,
                        at,
                        end,
                        digest,
                    };
                    break Ok(());
                }
                if digest {
                    if conn.rx_len - used < p::DIGEST_BYTES {
                        conn.rx_state = Rx::H2CData {
                            slot,
                            start,
                            at,
                            end,
                            digest,
                        };
                        break Ok(());
                    }
                    let got = p::le32(&conn.rx, used);
                    used += p::DIGEST_BYTES;
                    // SAFETY: start..end of the slot's buffer was just filled.
                    let data = unsafe {
                        std::slice::from_raw_parts(
                            buf.ptr.add(start as usize),
                            (end - start) as usize,
                        )
                    };
                    if p::digest(data) != got {
                        tracing::warn!(peer = %conn.peer, cid = r.sqe.cid, "H2CData data digest mismatch");
                        let r = &mut conn.reqs[slot as usize];
                        if r.status == 0 {
                            r.status = generic(p::SC_DATA_TRANSFER_ERROR);
                        }
                    }
                }
                conn.rx_state = Rx::Pdu;
                let r = &mut conn.reqs[slot as usize];
                r.received = end;
                if r.received == r.len {
                    r.state = ReqState::Executing;
                    Self::execute(conn, env, slot);
                    conn.pump_r2t();
                }
                continue;
            }
            let head = match p::decode(rest, Role::Target, conn.digests, &LIMITS) {
                Ok(Some(h)) => h,
                Ok(None) => break Ok(()),
                Err(e) => {
                    let hdr_bytes = rest
                        .len()
                        .min((rest.get(2).copied().unwrap_or(0) as usize).max(8));
                    conn.rx.copy_within(used..conn.rx_len, 0);
                    conn.rx_len -= used;
                    return Err(Fatal {
                        fes: e.fes(),
                        fei: e.fei(),
                        why: e.to_string(),
                        hdr_bytes,
                    });
                }
            };
            let hlen = rest[2] as usize;
            let fatal = |fes: u16, fei: u32, why: String| Fatal {
                fes,
                fei,
                why,
                hdr_bytes: hlen,
            };
            match (conn.phase, head.pdu) {
                (Phase::AwaitIcReq, Pdu::IcReq(ic)) => {
                    if ic.hpda > 7 {
                        break Err(fatal(
                            p::FES_UNSUPPORTED_PARAMETER,
                            10,
                            format!("HPDA {} above the supported 7", ic.hpda),
                        ));
                    }
                    used += p::IC_PDU_BYTES;
                    conn.hpda = ic.hpda;
                    conn.digests = ic.digests;
                    let mut b = [0u8; p::IC_PDU_BYTES];
                    p::encode_icresp(&mut b, 0, ic.digests, ctrl::MAXH2CDATA_BYTES);
                    conn.raw_out.extend_from_slice(&b);
                    conn.phase = Phase::Active;
                    progress = true;
                    tracing::debug!(peer = %conn.peer, header_digest = ic.digests.header,
                        data_digest = ic.digests.data, "NVMe/TCP ICReq");
                }
                (Phase::AwaitIcReq, _) | (Phase::Active, Pdu::IcReq(_)) => {
                    break Err(fatal(
                        p::FES_PDU_SEQUENCE_ERROR,
                        0,
                        "PDU out of sequence (ICReq must come first, and only once)".into(),
                    ))
                }
                (_, Pdu::H2CTermReq(t)) => {
                    tracing::warn!(peer = %conn.peer, fes = t.fes, fei = t.fei, "host terminated the connection");
                    conn.phase = Phase::Closing;
                    conn.close_after_flush = true;
                    used = conn.rx_len;
                    break Ok(());
                }
                (_, Pdu::CapsuleCmd(sqe)) => {
                    let total = head.total_bytes as usize;
                    if head.data_bytes > 0 && rest.len() < total {
                        break Ok(()); // wait for the whole capsule
                    }
                    // Back-pressure: a slot, a buffer and engine room for every command.
                    let Some(&slot) = conn.free.last() else {
                        break Ok(());
                    };
                    if env.pool.available() == 0 || !env.io.has_capacity() {
                        break Ok(());
                    }
                    let data_start = head.data_offset as usize;
                    let data_end = data_start + head.data_bytes as usize;
                    if head.data_digest {
                        let got = p::le32(rest, data_end);
                        let want = p::digest(&rest[data_start..data_end]);
                        if got != want {
                            // A capsule whose data digest fails is a transport error.
                            break Err(Fatal {
                                fes: p::FES_HEADER_DIGEST_ERROR,
                                fei: 0,
                                why: format!(
                                    "CapsuleCmd data digest {got:#010x}, computed {want:#010x}"
                                ),
                                hdr_bytes: hlen,
                            });
                        }
                    }
                    let end = used + total;
                    // Copy the in-capsule data out of rx before handling (rx is borrowed).
                    let (a, b) = (used + data_start, used + data_end);
                    let data_range = a..b;
                    used = end;
                    progress = true;
                    let rx = std::mem::take(&mut conn.rx);
                    Self::capsule(conn, env, slot, sqe, &rx[data_range]);
                    conn.rx = rx;
                }
                (_, Pdu::H2CData(h)) => {
                    let slot = h.ttag;
                    let r = conn.reqs.get(slot as usize).copied();
                    let Some(r) = r.filter(|r| r.state == ReqState::ReceivingData) else {
                        break Err(fatal(
                            p::FES_INVALID_HEADER_FIELD,
                            10,
                            format!("H2CData for unknown transfer tag {}", h.ttag),
                        ));
                    };
                    if r.sqe.cid != h.cccid {
                        break Err(fatal(
                            p::FES_INVALID_HEADER_FIELD,
                            8,
                            format!(
                                "H2CData CCCID {} does not match tag {}'s command {}",
                                h.cccid, slot, r.sqe.cid
                            ),
                        ));
                    }
                    if h.datao != r.received || h.datao + h.datal > r.len {
                        break Err(fatal(
                            p::FES_DATA_OUT_OF_RANGE,
                            12,
                            format!(
                                "H2CData offset {} length {} outside the expected {}..{}",
                                h.datao, h.datal, r.received, r.len
                            ),
                        ));
                    }
                    used += head.data_offset as usize;
                    progress = true;
                    conn.rx_state = Rx::H2CData {
                        slot,
                        start: h.datao,
                        at: h.datao,
                        end: h.datao + h.datal,
                        digest: head.data_digest,
                    };
                }
                (_, other) => {
                    break Err(fatal(
                        p::FES_INVALID_HEADER_FIELD,
                        0,
                        format!("unexpected PDU {other:?}"),
                    ))
                }
            }
        };
        if used > 0 {
            conn.rx.copy_within(used..conn.rx_len, 0);
            conn.rx_len -= used;
        }
        result.map(|_| progress)
    }

    /// Reads and handles PDUs. Returns (progress, socket error).
    fn read(conn: &mut Conn, env: &mut Env<'_>) -> (bool, bool) {
        let fd = conn.fd.as_raw_fd();
        let mut progress = false;
        loop {
            if conn.phase == Phase::Closing {
                return (progress, false);
            }
            match Self::parse(conn, env) {
                Ok(p) => progress |= p,
                Err(f) => {
                    conn.terminate(f);
                    return (true, false);
                }
            }
            if conn.phase == Phase::Closing {
                return (progress, false);
            }
            // Large H2CData payloads go straight into the slot's buffer (the data
            // digest, once the payload is complete, comes through rx).
            let direct = match conn.rx_state {
                Rx::H2CData { at, end, .. } => conn.rx_len == 0 && at < end,
                Rx::Pdu => false,
            };
            if let (
                true,
                Rx::H2CData {
                    slot,
                    start,
                    at,
                    end,
                    digest,
                },
            ) = (direct, conn.rx_state)
            {
                let buf = conn.reqs[slot as usize]
                    .buf
                    .expect("receiving slot has a buffer");
                // SAFETY: at < end <= buffer size; the buffer belongs to this slot.
                let n = unsafe {
                    libc::recv(
                        fd,
                        buf.ptr.add(at as usize) as *mut libc::c_void,
                        (end - at) as usize,
                        0,
                    )
                };
                if n == 0 {
                    return (progress, true);
                }
                if n < 0 {
                    let e = std::io::Error::last_os_error();
                    let wb = e.kind() == std::io::ErrorKind::WouldBlock;
                    conn.rx_ready &= !wb;
                    return (progress, !wb);
                }
                progress = true;
                conn.rx_state = Rx::H2CData {
                    slot,
                    start,
                    at: at + n as u32,
                    end,
                    digest,
                };
                continue;
            }
            if conn.rx_len == conn.rx.len() {
                return (progress, false); // blocked on slots, buffers or engine room
            }
            // SAFETY: receiving into the unused tail of our own buffer.
            let n = unsafe {
                libc::recv(
                    fd,
                    conn.rx[conn.rx_len..].as_mut_ptr() as *mut libc::c_void,
                    conn.rx.len() - conn.rx_len,
                    0,
                )
            };
            if n == 0 {
                return (progress, true);
            }
            if n < 0 {
                let e = std::io::Error::last_os_error();
                let wb = e.kind() == std::io::ErrorKind::WouldBlock;
                conn.rx_ready &= !wb;
                return (progress, !wb);
            }
            conn.rx_len += n as usize;
            progress = true;
        }
    }

    /// Sends queued bytes; returns (progress, error).
    fn flush(conn: &mut Conn, pool: &mut DmaPool) -> (bool, bool) {
        let fd = conn.fd.as_raw_fd();
        let mut progress = false;
        while conn.raw_sent < conn.raw_out.len() {
            let rest = &conn.raw_out[conn.raw_sent..];
            // SAFETY: sending from a slice we own.
            let n = unsafe {
                libc::send(
                    fd,
                    rest.as_ptr() as *const libc::c_void,
                    rest.len(),
                    libc::MSG_NOSIGNAL,
                )
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                return (progress, e.kind() != std::io::ErrorKind::WouldBlock);
            }
            conn.raw_sent += n as usize;
            progress = true;
        }
        if conn.raw_sent > 0 && conn.raw_sent == conn.raw_out.len() {
            conn.raw_out.clear();
            conn.raw_sent = 0;
        }
        if conn.terminated {
            return (progress, false);
        }
        while !conn.outq.is_empty() {
            let mut iov = [libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            }; 48];
            let mut n_iov = 0;
            for o in conn.outq.iter().take(16) {
                let (hl, dl) = (o.hdr_len as u32, o.data_len);
                let mut s = o.sent;
                if s < hl {
                    iov[n_iov] = libc::iovec {
                        iov_base: o.hdr[s as usize..].as_ptr() as *mut libc::c_void,
                        iov_len: (hl - s) as usize,
                    };
                    n_iov += 1;
                    s = hl;
                }
                if s < hl + dl {
                    // SAFETY: s - hl < data_len, inside the slot's DMA buffer.
                    let base = unsafe { o.data.add((s - hl) as usize) };
                    iov[n_iov] = libc::iovec {
                        iov_base: base as *mut libc::c_void,
                        iov_len: (hl + dl - s) as usize,
                    };
                    n_iov += 1;
                    s = hl + dl;
                }
                if s < o.total() {
                    iov[n_iov] = libc::iovec {
                        iov_base: o.tail[(s - hl - dl) as usize..].as_ptr() as *mut libc::c_void,
                        iov_len: (o.total() - s) as usize,
                    };
                    n_iov += 1;
                }
            }
            let n = match send_iovecs(fd, &mut iov, n_iov) {
                Ok(n) => n,
                Err(fatal) => return (progress, fatal),
            };
            progress = true;
            let mut left = n as u32;
            while left > 0 {
                let o = conn.outq.front_mut().expect("sent more than queued");
                let take = left.min(o.total() - o.sent);
                o.sent += take;
                left -= take;
                if o.sent == o.total() {
                    let slot = o.slot;
                    conn.outq.pop_front();
                    if let Some(s) = slot {
                        conn.release(s, pool);
                    }
                }
            }
        }
        (progress, false)
    }

    fn close(&mut self, idx: usize, ctx: &mut PollCtx<'_>) {
        let Some(mut conn) = self.conns[idx].take() else {
            return;
        };
        assert_eq!(
            conn.ops_inflight, 0,
            "closing a connection with volume I/O in flight"
        );
        ctx.parker.unwatch(conn.fd.as_raw_fd());
        conn.outq.clear();
        for s in 0..SLOTS as u16 {
            if conn.reqs[s as usize].state != ReqState::Free {
                conn.release(s, ctx.pool);
            }
        }
        if let Some(c) = &conn.ctrl {
            if conn.qid == 0 {
                if !c.dead.load(Ordering::Relaxed) {
                    tracing::info!(peer = %conn.peer, cntlid = c.cntlid, subnqn = %c.subsys.nqn,
                        "admin queue closed; controller removed");
                }
                c.kill();
            } else {
                c.release_qid(conn.qid);
            }
        }
        self.shared.live.fetch_sub(1, Ordering::Relaxed);
        tracing::debug!(peer = %conn.peer, qid = conn.qid, "NVMe/TCP connection closed");
    }
}

impl Poller for NvmfPoller {
    fn poll(&mut self, ctx: &mut PollCtx<'_>) -> PollStatus {
        let mut busy = false;
        for _ in 0..16 {
            match self.inbox.try_recv() {
                Ok(NvmfMsg::Connection { fd, peer, local }) => {
                    self.accept(fd, peer, local, ctx);
                    busy = true;
                }
                Ok(NvmfMsg::Drain { done }) => {
                    self.draining = Some(done);
                    busy = true;
                }
                Err(_) => break,
            }
        }
        if self.watched.is_empty() {
            for fd in self.io.notifier_fds() {
                let _ = ctx.parker.watch(fd);
                self.watched.push(fd);
            }
            self.watched.push(-1);
        }
        busy |= self.io.poll();
        while let Some((token, rc)) = self.io.pop_completion() {
            let idx = (token >> 32) as usize;
            let generation = (token >> 16) as u16;
            let slot = token as u16;
            match self.conns.get_mut(idx).and_then(|c| c.as_mut()) {
                Some(conn) if conn.generation == generation => Self::op_done(conn, slot, rc),
                _ => unreachable!("a connection closed with volume I/O in flight"),
            }
            busy = true;
        }
        ctx.parker.take_fired(&mut self.fired);
        for c in self.conns.iter_mut().flatten() {
            if self.fired.contains(&c.fd.as_raw_fd()) {
                c.rx_ready = true;
            }
        }
        self.polls += 1;
        let sweep = self.polls % 8 == 0;
        let now = if sweep { now_ns() } else { 0 };
        let draining = self.draining.is_some();
        for idx in 0..self.conns.len() {
            let Some(conn) = self.conns[idx].as_mut() else {
                continue;
            };
            // Controller torn down elsewhere (keep-alive timeout, admin queue gone).
            if let Some(c) = &conn.ctrl {
                if c.dead.load(Ordering::Relaxed) && conn.phase != Phase::Closing {
                    tracing::info!(peer = %conn.peer, qid = conn.qid, "controller gone; closing queue");
                    conn.phase = Phase::Closing;
                    conn.dead = true;
                }
                let kato = c.kato_ms.load(Ordering::Relaxed) as u64;
                if sweep
                    && conn.qid == 0
                    && kato > 0
                    && conn.phase != Phase::Closing
                    && now.saturating_sub(conn.last_cmd_ns) > kato * 1_000_000 + KATO_SLACK_NS
                {
                    tracing::warn!(peer = %conn.peer, cntlid = c.cntlid, kato_ms = kato,
                        "keep-alive timeout: tearing the controller down");
                    c.kill();
                    conn.phase = Phase::Closing;
                    conn.dead = true;
                }
            }
            if conn.aers > 0 && conn.phase == Phase::Active {
                if let Some(dw0) = conn.ctrl.as_ref().and_then(|c| c.take_event()) {
                    conn.complete_aer(dw0);
                    busy = true;
                }
            }
            let (p1, e1) = Self::flush(conn, ctx.pool);
            let (p2, e2) = if (conn.rx_ready || sweep) && !draining {
                let mut env = Env {
                    io: &mut self.io,
                    pool: ctx.pool,
                    shared: &self.shared,
                    idx,
                };
                Self::read(conn, &mut env)
            } else {
                (false, false)
            };
            let (p3, e3) = Self::flush(conn, ctx.pool);
            busy |= p1 || p2 || p3;
            if e1 || e2 || e3 {
                conn.phase = Phase::Closing;
                conn.dead = true;
            }
            if draining {
                conn.phase = Phase::Closing;
            }
            let flushed = (conn.outq.is_empty() || conn.terminated) && conn.raw_out.is_empty();
            if conn.phase == Phase::Closing && conn.ops_inflight == 0 && (flushed || conn.dead) {
                self.close(idx, ctx);
                busy = true;
            }
        }
        busy |= self.io.poll();
        let closed = self.conns.iter().all(|c| c.is_none());
        super::nbd::poll_end(&mut self.draining, &self.io, closed, ctx.reactor_id, busy)
    }

    fn next_deadline_ns(&self) -> Option<u64> {
        let kato = self
            .conns
            .iter()
            .flatten()
            .filter_map(|c| {
                let k = c.ctrl.as_ref()?.kato_ms.load(Ordering::Relaxed) as u64;
                (c.qid == 0 && k > 0).then(|| c.last_cmd_ns + k * 1_000_000 + KATO_SLACK_NS)
            })
            .min();
        match (kato, self.io.next_deadline_ns()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}
