//! The NBD server on the reactors.
//!
//! Each reactor runs one [`NbdPoller`] that owns its connections and its
//! [`VolumeIo`] engine. Sockets are non-blocking and registered with the
//! reactor's parker, so an adaptive reactor sleeps until a packet or a
//! completion arrives. The acceptor threads hand new sockets to reactors
//! round-robin by message.
//!
//! A connection moves through explicit states: `Handshake` (bytes fed to the
//! sans-I/O [`Handshake`]), `Header` (reading a 28-byte request), `Payload`
//! (receiving a WRITE's data straight into a DMA buffer), and `Closing`
//! (no more reads; close once replies are flushed and nothing is in flight).
//! Replies go out with one `writev` of header and payload.
//!
//! `StartTls` sits between the plain-text `STARTTLS` acknowledgement and the TLS
//! handshake: once the acknowledgement is sent the connection gets a
//! [`TlsStream`] and every later byte, handshake options included, goes through
//! it (see [`super::nbd_tls`] for what that costs).

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crossbeam_channel::Receiver;

use super::nbd_proto::{self as proto, Handshake, HandshakeConfig, HandshakeStep, Request};
use super::nbd_tls::TlsStream;
use crate::bdev::IoKind;
use crate::dma::{DmaBuf, DmaPool};
use crate::reactor::{PollCtx, PollStatus, Poller};
use crate::volume::io::{VolumeIo, VolumeOp};

/// Messages to a reactor's NBD poller.
pub enum NbdMsg {
    /// A freshly accepted socket.
    Connection { fd: OwnedFd, peer: String },
    /// Stop reading requests; finish what is in flight, then close everything.
    Drain {
        done: crossbeam_channel::Sender<usize>,
    },
}

/// Limits applied per connection and per reactor.
#[derive(Clone, Debug)]
pub struct NbdLimits {
    pub max_queue_depth: usize,
    pub max_payload_bytes: u32,
    /// READ/WRITE payload bytes one connection may have in flight before the server
    /// stops reading its requests (at least `max_payload_bytes`).
    pub max_inflight_bytes: u64,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum ConnState {
    Handshake,
    /// `STARTTLS` accepted: send the plain acknowledgement, then start TLS.
    StartTls,
    Header,
    Payload {
        slot: u16,
        have: u32,
    },
    Closing,
}

#[derive(Clone, Copy)]
struct Slot {
    req: Request,
    buf: Option<DmaBuf>,
    /// NBD errno to reply with instead of running the request (0 = run it).
    reject: u32,
}

/// One queued reply: header bytes plus an optional payload.
struct Out {
    hdr: [u8; 32],
    hdr_len: u8,
    data: *const u8,
    data_len: u32,
    sent: u32,
    /// The slot to release once fully sent.
    slot: Option<u16>,
}

struct Conn {
    fd: OwnedFd,
    peer: String,
    generation: u16,
    state: ConnState,
    hs: Option<Handshake>,
    export: u32,
    structured: bool,
    rx: Vec<u8>,
    rx_len: usize,
    hs_out: Vec<u8>,
    hs_sent: usize,
    slots: Vec<Slot>,
    free_slots: Vec<u16>,
    outq: VecDeque<Out>,
    inflight: usize,
    /// READ/WRITE payload bytes of the requests in `inflight` (see `max_inflight_bytes`).
    inflight_bytes: u64,
    /// A request waits in `rx` for in-flight bytes or a DMA buffer to be released.
    rx_blocked: bool,
    /// Set once the `STARTTLS` acknowledgement has gone out.
    tls: Option<Box<TlsStream>>,
    close_after_flush: bool,
    /// The socket failed: close as soon as nothing is in flight.
    dead: bool,
    /// Whether a recv may find data: cleared on EAGAIN, set when the reactor's
    /// epoll reports the socket (edge-triggered), so an idle socket costs no syscall.
    rx_ready: bool,
}

/// Holds the largest legal handshake option (16 + 64 KiB) with room to spare.
const RX_BYTES: usize = 80 << 10;

pub struct NbdPoller {
    io: VolumeIo,
    conns: Vec<Option<Conn>>,
    generation: u16,
    inbox: Receiver<NbdMsg>,
    hs_config: Arc<HandshakeConfig>,
    limits: NbdLimits,
    tls_config: Option<Arc<rustls::ServerConfig>>,
    live: Arc<AtomicUsize>,
    draining: Option<crossbeam_channel::Sender<usize>>,
    watched: Vec<RawFd>,
    /// Engine tiers whose fds are watched (a tier added at run time brings a new fd).
    watched_tiers: usize,
    fired: Vec<RawFd>,
    polls: u64,
}

/// One non-blocking `sendmsg` of the first `n_iov` iovecs. `Ok(bytes)` on progress;
/// `Err(fatal)` when nothing was sent, `fatal` false for EAGAIN (try again later).
pub(crate) fn send_iovecs(fd: RawFd, iov: &mut [libc::iovec], n_iov: usize) -> Result<usize, bool> {
    let msg = libc::msghdr {
        msg_name: std::ptr::null_mut(),
        msg_namelen: 0,
        msg_iov: iov.as_mut_ptr(),
        msg_iovlen: n_iov,
        msg_control: std::ptr::null_mut(),
        msg_controllen: 0,
        msg_flags: 0,
    };
    // SAFETY: the caller's iovecs point into memory that stays valid for the call
    // (reply headers and DMA buffers owned by in-use request slots).
    let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        return Err(e.kind() != std::io::ErrorKind::WouldBlock);
    }
    Ok(n as usize)
}

pub(crate) fn set_nonblocking_nodelay(fd: RawFd) {
    // SAFETY: fcntl on an fd we own; flags are read then written back.
    unsafe {
        let fl = libc::fcntl(fd, libc::F_GETFL);
        libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK);
    }
    let one: libc::c_int = 1;
    // SAFETY: setsockopt with a valid int; fails harmlessly (ENOTSUP) on unix sockets.
    unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            &one as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as u32,
        )
    };
}

impl NbdPoller {
    pub fn new(
        io: VolumeIo,
        inbox: Receiver<NbdMsg>,
        hs_config: Arc<HandshakeConfig>,
        limits: NbdLimits,
        tls_config: Option<Arc<rustls::ServerConfig>>,
        live: Arc<AtomicUsize>,
    ) -> NbdPoller {
        assert_eq!(
            tls_config.is_some(),
            hs_config.tls_available || hs_config.tls_required,
            "STARTTLS is offered exactly when a TLS configuration is given"
        );
        NbdPoller {
            io,
            conns: Vec::new(),
            generation: 0,
            inbox,
            hs_config,
            limits,
            tls_config,
            live,
            draining: None,
            watched: Vec::new(),
            watched_tiers: 0,
            fired: Vec::with_capacity(64),
            polls: 0,
        }
    }

    /// Registers the engine's channel fds with the parker (once).
    pub fn watch_engine(&mut self, parker: &crate::reactor::Parker) {
        for fd in self.io.notifier_fds() {
            if !self.watched.contains(&fd) {
                let _ = parker.watch(fd);
                self.watched.push(fd);
            }
        }
    }

    fn accept(&mut self, fd: OwnedFd, peer: String, ctx: &mut PollCtx<'_>) {
        let raw = fd.as_raw_fd();
        set_nonblocking_nodelay(raw);
        if let Err(e) = ctx.parker.watch_rw(raw) {
            tracing::warn!(%peer, "cannot watch NBD socket: {e}");
        }
        let mut hs = Handshake::new((*self.hs_config).clone());
        let mut hs_out = Vec::with_capacity(256);
        hs.greeting(&mut hs_out);
        self.generation = self.generation.wrapping_add(1);
        let qd = self.limits.max_queue_depth;
        let conn = Conn {
            fd,
            peer,
            generation: self.generation,
            state: ConnState::Handshake,
            hs: Some(hs),
            export: 0,
            structured: false,
            rx: vec![0; RX_BYTES],
            rx_len: 0,
            hs_out,
            hs_sent: 0,
            slots: vec![
                Slot {
                    req: Request::default(),
                    buf: None,
                    reject: 0
                };
                qd
            ],
            free_slots: (0..qd as u16).rev().collect(),
            outq: VecDeque::with_capacity(qd),
            inflight: 0,
            inflight_bytes: 0,
            rx_blocked: false,
            tls: None,
            close_after_flush: false,
            dead: false,
            rx_ready: true,
        };
        match self.conns.iter().position(|c| c.is_none()) {
            Some(i) => self.conns[i] = Some(conn),
            None => self.conns.push(Some(conn)),
        }
    }

    fn token(conn_idx: usize, generation: u16, slot: u16) -> u64 {
        ((conn_idx as u64) << 32) | ((generation as u64) << 16) | slot as u64
    }

    /// Queues the reply for a finished request.
    fn reply(conn: &mut Conn, slot: u16, error: u32) {
        let s = conn.slots[slot as usize];
        let mut out = Out {
            hdr: [0; 32],
            hdr_len: 0,
            data: std::ptr::null(),
            data_len: 0,
            sent: 0,
            slot: Some(slot),
        };
        let is_read_ok = s.req.kind == proto::NBD_CMD_READ && error == 0;
        if conn.structured && s.req.kind == proto::NBD_CMD_READ {
            if is_read_ok {
                let mut h = [0u8; proto::OFFSET_DATA_HEADER_BYTES];
                proto::encode_offset_data_header(
                    &mut h,
                    proto::NBD_REPLY_FLAG_DONE,
                    s.req.cookie,
                    s.req.offset,
                    s.req.length,
                );
                out.hdr[..h.len()].copy_from_slice(&h);
                out.hdr_len = h.len() as u8;
            } else {
                let n = proto::encode_error_chunk(
                    &mut out.hdr,
                    proto::NBD_REPLY_FLAG_DONE,
                    s.req.cookie,
                    error,
                    "",
                );
                out.hdr_len = n as u8;
            }
        } else {
            let mut h = [0u8; proto::SIMPLE_REPLY_BYTES];
            proto::encode_simple_reply(&mut h, error, s.req.cookie);
            out.hdr[..h.len()].copy_from_slice(&h);
            out.hdr_len = h.len() as u8;
        }
        if is_read_ok {
            let buf = s.buf.expect("a read has a buffer");
            out.data = buf.ptr;
            out.data_len = s.req.length;
        }
        conn.outq.push_back(out);
    }

    fn release_slot(conn: &mut Conn, slot: u16, pool: &mut DmaPool) {
        let s = &mut conn.slots[slot as usize];
        if let Some(buf) = s.buf.take() {
            conn.inflight_bytes -= u64::from(s.req.length);
            pool.free(buf);
            if conn.rx_blocked {
                conn.rx_blocked = false;
                conn.rx_ready = true;
            }
        }
        conn.free_slots.push(slot);
    }

    /// One non-blocking send of the first `n_iov` iovecs, through TLS once it is up
    /// (the contract of [`send_iovecs`]).
    fn send(conn: &mut Conn, iov: &mut [libc::iovec], n_iov: usize) -> Result<usize, bool> {
        let fd = conn.fd.as_raw_fd();
        match conn.tls.as_deref_mut() {
            Some(tls) => tls.send(fd, iov, n_iov),
            None => send_iovecs(fd, iov, n_iov),
        }
    }

    /// One non-blocking receive into `len` bytes at `buf`, through TLS once it is up.
    /// `Ok(0)` at the end of the stream; `Err(fatal)`, `fatal` false for EAGAIN.
    ///
    /// # Safety
    /// `buf..buf + len` is writable memory the connection owns (its rx buffer or a
    /// slot's DMA buffer).
    unsafe fn recv(conn: &mut Conn, buf: *mut u8, len: usize) -> Result<usize, bool> {
        let fd = conn.fd.as_raw_fd();
        let n = match conn.tls.as_deref_mut() {
            Some(tls) => {
                // SAFETY: the caller guarantees the range is valid and ours.
                let dst = unsafe { std::slice::from_raw_parts_mut(buf, len) };
                tls.recv(fd, dst)
            }
            None => {
                // SAFETY: the caller guarantees the range is valid and ours.
                let n = unsafe { libc::recv(fd, buf as *mut libc::c_void, len, 0) };
                if n < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            }
        };
        n.map_err(|e| e.kind() != std::io::ErrorKind::WouldBlock)
    }

    /// Sends queued bytes; returns (progress, error).
    fn flush(
        conn: &mut Conn,
        pool: &mut DmaPool,
        tls_config: Option<&Arc<rustls::ServerConfig>>,
    ) -> (bool, bool) {
        let mut progress = false;
        if let Some(tls) = conn.tls.as_deref_mut() {
            match tls.flush(conn.fd.as_raw_fd()) {
                Ok(p) => progress |= p,
                Err(_) => return (progress, true),
            }
        }
        while conn.hs_sent < conn.hs_out.len() {
            let rest = &conn.hs_out[conn.hs_sent..];
            let mut iov = [libc::iovec {
                iov_base: rest.as_ptr() as *mut libc::c_void,
                iov_len: rest.len(),
            }];
            match Self::send(conn, &mut iov, 1) {
                Ok(n) => conn.hs_sent += n,
                Err(fatal) => return (progress, fatal),
            }
            progress = true;
        }
        if conn.hs_sent == conn.hs_out.len() && conn.hs_sent > 0 {
            conn.hs_out.clear();
            conn.hs_sent = 0;
        }
        if conn.state == ConnState::StartTls {
            // The acknowledgement is out in plain text: everything from here on is TLS.
            let cfg = tls_config.expect("STARTTLS is accepted only with a TLS configuration");
            match TlsStream::new(cfg) {
                Ok(t) => {
                    conn.tls = Some(Box::new(t));
                    conn.state = ConnState::Handshake;
                    conn.rx_ready = true;
                    progress = true;
                }
                Err(e) => {
                    tracing::warn!(peer = %conn.peer, "closing NBD connection: TLS session: {e}");
                    return (progress, true);
                }
            }
        }
        while !conn.outq.is_empty() {
            let mut iov: [libc::iovec; 32] = [libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            }; 32];
            let mut n_iov = 0;
            for o in conn.outq.iter().take(16) {
                let hl = o.hdr_len as u32;
                if o.sent < hl {
                    iov[n_iov] = libc::iovec {
                        iov_base: o.hdr[o.sent as usize..].as_ptr() as *mut libc::c_void,
                        iov_len: (hl - o.sent) as usize,
                    };
                    n_iov += 1;
                }
                if o.data_len > 0 {
                    let done = o.sent.saturating_sub(hl);
                    // SAFETY: done < data_len, inside the slot's DMA buffer.
                    let base = unsafe { o.data.add(done as usize) };
                    iov[n_iov] = libc::iovec {
                        iov_base: base as *mut libc::c_void,
                        iov_len: (o.data_len - done) as usize,
                    };
                    n_iov += 1;
                }
            }
            let n = match Self::send(conn, &mut iov, n_iov) {
                Ok(n) => n,
                Err(fatal) => return (progress, fatal),
            };
            progress = true;
            let mut left = n as u32;
            while left > 0 {
                let o = conn.outq.front_mut().expect("sent more than queued");
                let total = o.hdr_len as u32 + o.data_len;
                let take = left.min(total - o.sent);
                o.sent += take;
                left -= take;
                if o.sent == total {
                    let slot = o.slot;
                    conn.outq.pop_front();
                    if let Some(s) = slot {
                        Self::release_slot(conn, s, pool);
                    }
                }
            }
        }
        (progress, false)
    }

    /// Reads and handles requests. Returns (progress, error).
    fn read(&mut self, idx: usize, pool: &mut DmaPool) -> (bool, bool) {
        let mut progress = false;
        let draining = self.draining.is_some();
        let conn = self.conns[idx].as_mut().unwrap();
        loop {
            if matches!(conn.state, ConnState::Closing | ConnState::StartTls) || draining {
                return (progress, false);
            }
            // Receive a write payload straight into its DMA buffer.
            if let ConnState::Payload { slot, have } = conn.state {
                let s = conn.slots[slot as usize];
                let buf = s.buf.expect("payload slot has a buffer");
                let want = s.req.length - have;
                // SAFETY: have < length <= buffer size; the buffer is owned by this slot.
                let n = match unsafe { Self::recv(conn, buf.ptr.add(have as usize), want as usize) }
                {
                    Ok(0) => return (progress, true),
                    Ok(n) => n,
                    Err(fatal) => {
                        conn.rx_ready &= fatal;
                        return (progress, fatal);
                    }
                };
                progress = true;
                let have = have + n as u32;
                if have < s.req.length {
                    conn.state = ConnState::Payload { slot, have };
                    continue;
                }
                conn.state = ConnState::Header;
                Self::start(&mut self.io, idx, conn, slot);
                continue;
            }
            // Parse what is buffered before reading more.
            match Self::parse(&mut self.io, idx, conn, pool, &self.limits, &self.hs_config) {
                Ok(true) => {
                    progress = true;
                    continue;
                }
                Ok(false) => {}
                Err(why) => {
                    tracing::warn!(peer = %conn.peer, "closing NBD connection: {why}");
                    conn.state = ConnState::Closing;
                    conn.close_after_flush = true;
                    return (true, false);
                }
            }
            if conn.rx_len == conn.rx.len() {
                // Buffer full but nothing parseable: blocked on slots or buffers.
                return (progress, false);
            }
            if conn.state == ConnState::Header && conn.free_slots.is_empty() {
                return (progress, false);
            }
            let tail = conn.rx[conn.rx_len..].as_mut_ptr();
            let room = conn.rx.len() - conn.rx_len;
            // SAFETY: receiving into the unused tail of our own buffer.
            let n = match unsafe { Self::recv(conn, tail, room) } {
                Ok(0) => return (progress, true),
                Ok(n) => n,
                Err(fatal) => {
                    conn.rx_ready &= fatal;
                    return (progress, fatal);
                }
            };
            conn.rx_len += n;
            progress = true;
        }
    }

    /// Handles buffered bytes. Ok(true) if something was consumed.
    fn parse(
        io: &mut VolumeIo,
        idx: usize,
        conn: &mut Conn,
        pool: &mut DmaPool,
        limits: &NbdLimits,
        hs_config: &HandshakeConfig,
    ) -> Result<bool, String> {
        match conn.state {
            ConnState::Handshake => {
                if conn.rx_len == 0 {
                    return Ok(false);
                }
                let hs = conn.hs.as_mut().expect("handshake state");
                let (used, step) = hs
                    .feed(&conn.rx[..conn.rx_len], &mut conn.hs_out)
                    .map_err(|e| e.to_string())?;
                conn.rx.copy_within(used..conn.rx_len, 0);
                conn.rx_len -= used;
                match step {
                    HandshakeStep::NeedMore => Ok(used > 0),
                    HandshakeStep::Done(n) => {
                        conn.export = n.export_index as u32;
                        conn.structured = n.structured_replies;
                        conn.hs = None;
                        conn.state = ConnState::Header;
                        tracing::debug!(peer = %conn.peer, export = %hs_config.exports[n.export_index].name, "NBD handshake done");
                        Ok(true)
                    }
                    HandshakeStep::StartTls => {
                        // Plain bytes after STARTTLS would be injected data: drop them.
                        conn.rx_len = 0;
                        conn.state = ConnState::StartTls;
                        Ok(true)
                    }
                    HandshakeStep::Abort => {
                        conn.state = ConnState::Closing;
                        conn.close_after_flush = true;
                        Ok(true)
                    }
                }
            }
            ConnState::Header => {
                if conn.rx_len < proto::REQUEST_HEADER_BYTES {
                    return Ok(false);
                }
                let Some(&slot) = conn.free_slots.last() else {
                    return Ok(false);
                };
                let hdr: [u8; proto::REQUEST_HEADER_BYTES] =
                    conn.rx[..proto::REQUEST_HEADER_BYTES].try_into().unwrap();
                let req = proto::parse_request(&hdr).map_err(|e| e.to_string())?;
                let export = &hs_config.exports[conn.export as usize];
                if proto::reject_requires_disconnect(&req, limits.max_payload_bytes) {
                    return Err(format!(
                        "write of {} bytes above the {} byte limit",
                        req.length, limits.max_payload_bytes
                    ));
                }
                if req.kind == proto::NBD_CMD_DISC {
                    conn.rx_len = 0;
                    conn.state = ConnState::Closing;
                    conn.close_after_flush = true;
                    return Ok(true);
                }
                let reject = match proto::validate_request(
                    &req,
                    export.size_bytes,
                    export.block_size_min,
                    limits.max_payload_bytes,
                    export.read_only,
                ) {
                    Ok(()) => 0,
                    Err(e) => {
                        tracing::info!(peer = %conn.peer, cmd = req.kind, offset = req.offset, length = req.length, errno = e, "NBD request refused");
                        e
                    }
                };
                let needs_buf = reject == 0 && req.kind == proto::NBD_CMD_READ
                    || req.kind == proto::NBD_CMD_WRITE;
                if needs_buf
                    && conn.inflight_bytes > 0
                    && conn.inflight_bytes + u64::from(req.length) > limits.max_inflight_bytes
                {
                    // Back-pressure: wait for replies to go out. The request is already in
                    // `rx`, so no socket event will come for it: releasing a slot re-arms reads.
                    conn.rx_blocked = true;
                    return Ok(false);
                }
                let buf = if needs_buf {
                    match pool.alloc() {
                        Some(b) => Some(b),
                        None => {
                            conn.rx_blocked = true; // back-pressure: wait for buffers
                            return Ok(false);
                        }
                    }
                } else {
                    None
                };
                conn.free_slots.pop();
                if buf.is_some() {
                    conn.inflight_bytes += u64::from(req.length);
                }
                conn.slots[slot as usize] = Slot { req, buf, reject };
                conn.rx
                    .copy_within(proto::REQUEST_HEADER_BYTES..conn.rx_len, 0);
                conn.rx_len -= proto::REQUEST_HEADER_BYTES;
                conn.inflight += 1;
                if req.kind == proto::NBD_CMD_WRITE {
                    let b = buf.expect("write buffer");
                    let take = conn.rx_len.min(req.length as usize);
                    // SAFETY: take <= length <= buffer size; source is our rx buffer.
                    unsafe { std::ptr::copy_nonoverlapping(conn.rx.as_ptr(), b.ptr, take) };
                    conn.rx.copy_within(take..conn.rx_len, 0);
                    conn.rx_len -= take;
                    if (take as u32) < req.length {
                        conn.state = ConnState::Payload {
                            slot,
                            have: take as u32,
                        };
                        return Ok(true);
                    }
                }
                Self::start(io, idx, conn, slot);
                Ok(true)
            }
            ConnState::Payload { .. } | ConnState::Closing | ConnState::StartTls => Ok(false),
        }
    }

    /// Submits a fully received request to the volume engine, or rejects it.
    fn start(io: &mut VolumeIo, idx: usize, conn: &mut Conn, slot: u16) {
        let s = conn.slots[slot as usize];
        if s.reject != 0 {
            conn.inflight -= 1;
            Self::reply(conn, slot, s.reject);
            return;
        }
        let kind = match s.req.kind {
            proto::NBD_CMD_READ => IoKind::Read,
            proto::NBD_CMD_WRITE => IoKind::Write,
            proto::NBD_CMD_FLUSH => IoKind::Flush,
            proto::NBD_CMD_TRIM => IoKind::Trim,
            proto::NBD_CMD_WRITE_ZEROES => IoKind::WriteZeroes,
            _ => unreachable!("validated"),
        };
        let (buf, buf_index) = match s.buf {
            Some(b) => (b.ptr, b.index),
            None => (std::ptr::null_mut(), crate::bdev::BUF_INDEX_NONE),
        };
        let op = VolumeOp {
            volume: conn.export,
            kind,
            offset_bytes: if kind == IoKind::Flush {
                0
            } else {
                s.req.offset
            },
            len_bytes: if kind == IoKind::Flush {
                0
            } else {
                s.req.length
            },
            buf,
            buf_index,
            fua: s.req.flags & proto::NBD_CMD_FLAG_FUA != 0,
            token: Self::token(idx, conn.generation, slot),
        };
        // SAFETY: the slot's DMA buffer stays allocated until the reply is sent,
        // which happens only after the engine returns this token.
        if !unsafe { io.submit(op) } {
            // The engine's slab is sized for every connection's queue depth, so this
            // only happens under a configuration error; fail the request cleanly.
            conn.inflight -= 1;
            Self::reply(conn, slot, proto::NBD_ENOMEM);
        }
    }

    fn close(&mut self, idx: usize, parker: &crate::reactor::Parker, pool: &mut DmaPool) {
        if let Some(mut conn) = self.conns[idx].take() {
            parker.unwatch(conn.fd.as_raw_fd());
            while let Some(o) = conn.outq.pop_front() {
                if let Some(s) = o.slot {
                    Self::release_slot(&mut conn, s, pool);
                }
            }
            debug_assert!(
                !matches!(conn.state, ConnState::Payload { .. }),
                "payload slot leaked"
            );
            self.live.fetch_sub(1, Ordering::Relaxed);
            tracing::debug!(peer = %conn.peer, "NBD connection closed");
        }
    }
}

impl Poller for NbdPoller {
    fn poll(&mut self, ctx: &mut PollCtx<'_>) -> PollStatus {
        let mut busy = false;
        for _ in 0..16 {
            match self.inbox.try_recv() {
                Ok(NbdMsg::Connection { fd, peer }) => {
                    self.accept(fd, peer, ctx);
                    busy = true;
                }
                Ok(NbdMsg::Drain { done }) => {
                    self.draining = Some(done);
                    busy = true;
                }
                Err(_) => break,
            }
        }
        if self.watched.is_empty() || self.watched_tiers != self.io.tiers_opened() {
            self.watched_tiers = self.io.tiers_opened();
            self.watch_engine(ctx.parker);
        }
        busy |= self.io.poll();
        while let Some((token, rc)) = self.io.pop_completion() {
            let idx = (token >> 32) as usize;
            let generation = (token >> 16) as u16;
            let slot = token as u16;
            match self.conns.get_mut(idx).and_then(|c| c.as_mut()) {
                Some(conn) if conn.generation == generation => {
                    conn.inflight -= 1;
                    let err = if rc == 0 { 0 } else { proto::errno_to_nbd(-rc) };
                    Self::reply(conn, slot, err);
                }
                _ => unreachable!("a connection closed with requests in flight"),
            }
            busy = true;
        }
        // Sockets the reactor's epoll reported since the last park may have data;
        // others are tried only every 8th poll (a spinning reactor never parks).
        ctx.parker.take_fired(&mut self.fired);
        for c in self.conns.iter_mut().flatten() {
            if self.fired.contains(&c.fd.as_raw_fd()) {
                c.rx_ready = true;
            }
        }
        self.polls += 1;
        let sweep = self.polls % 8 == 0;
        for idx in 0..self.conns.len() {
            if self.conns[idx].is_none() {
                continue;
            }
            let tls_config = self.tls_config.as_ref();
            let (p1, e1) = Self::flush(self.conns[idx].as_mut().unwrap(), ctx.pool, tls_config);
            let try_read = self.conns[idx]
                .as_ref()
                .is_some_and(|c| c.rx_ready || sweep);
            let (p2, e2) = if try_read {
                self.read(idx, ctx.pool)
            } else {
                (false, false)
            };
            let tls_config = self.tls_config.as_ref();
            let (p3, e3) = Self::flush(self.conns[idx].as_mut().unwrap(), ctx.pool, tls_config);
            busy |= p1 || p2 || p3;
            let conn = self.conns[idx].as_mut().unwrap();
            if e1 || e2 || e3 || self.draining.is_some() {
                // A WRITE whose payload never fully arrived was never submitted and
                // never acknowledged: drop it, or the connection would wait for it forever.
                if let ConnState::Payload { slot, .. } = conn.state {
                    conn.inflight -= 1;
                    Self::release_slot(conn, slot, ctx.pool);
                    conn.state = ConnState::Closing;
                }
            }
            if e1 || e2 || e3 {
                conn.state = ConnState::Closing;
                conn.dead = true;
            }
            let flushed = conn.outq.is_empty()
                && conn.hs_out.is_empty()
                && !conn.tls.as_ref().is_some_and(|t| t.wants_write());
            let closing = conn.state == ConnState::Closing || self.draining.is_some();
            if closing && conn.inflight == 0 && (flushed || conn.dead) {
                self.close(idx, ctx.parker, ctx.pool);
                busy = true;
            }
        }
        busy |= self.io.poll();
        let closed = self.conns.iter().all(|c| c.is_none());
        poll_end(&mut self.draining, &self.io, closed, ctx.reactor_id, busy)
    }

    fn next_deadline_ns(&self) -> Option<u64> {
        self.io.next_deadline_ns()
    }
}

/// The end of a target poller's poll: once draining, with no volume I/O in flight and every
/// connection closed (`closed`), report this reactor done; otherwise busy or idle.
pub(crate) fn poll_end(
    draining: &mut Option<crossbeam_channel::Sender<usize>>,
    io: &VolumeIo,
    closed: bool,
    reactor_id: usize,
    busy: bool,
) -> PollStatus {
    if let Some(done) = draining {
        if io.inflight() == 0 && closed {
            let _ = done.send(reactor_id);
            *draining = None;
            return PollStatus::Done;
        }
    }
    if busy {
        PollStatus::Busy
    } else {
        PollStatus::Idle
    }
}
