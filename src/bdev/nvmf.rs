//! `nvmf://HOST:PORT/NQN/NSID`: a namespace on an NVMe/TCP target (kiln, SPDK
//! or Linux nvmet) as a block device.
//!
//! Opening the device connects the admin queue (ICReq, Connect with a dynamic
//! controller, CC.EN, Identify, Number of Queues) with a blocking socket and
//! keeps it open: the controller lives as long as the device. Each reactor's
//! [`IoChannel`] is one I/O queue on its own connection: Connect is blocking,
//! then the socket is non-blocking and polled. Commands are queued by
//! `submit`, sent with one `writev` per poll, and their PDUs are decoded by
//! the shared codec ([`crate::target::nvmf_proto`]). Reads land straight in
//! the caller's buffer; writes up to the in-capsule size (IOCCSZ) travel in
//! the capsule, larger ones answer the target's R2Ts with H2CData PDUs. The
//! I/O queues disable SQ flow control, so a successful read completes with
//! its last C2HData PDU (SUCCESS flag).
//!
//! Options: `?hdgst=1&ddgst=1` (digests), `&hostnqn=NQN`.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{
    BlockDevice, ChannelOptions, Completion, DeviceError, DeviceInfo, IoChannel, IoKind, IoRequest,
    SubmitError,
};
use crate::target::nvmf_proto::{self as p, Cqe, Digests, Limits, Pdu, Role, Sqe};

/// The host NQN kiln uses unless the spec names one.
pub const DEFAULT_HOSTNQN: &str = "nqn.2024-01.io.kiln:initiator";
/// Entries of the admin queue.
const ADMIN_ENTRIES: u16 = 32;
/// Largest C2HData this initiator accepts in one PDU.
const C2H_DATA_MAX: u32 = 16 << 20;

/// What `nvmf://` names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NvmfTarget {
    /// HOST:PORT (IPv6 in brackets).
    pub addr: String,
    pub subnqn: String,
    pub nsid: u32,
    pub digests: Digests,
    pub hostnqn: String,
}

fn io_err(what: &str, e: impl std::fmt::Display) -> DeviceError {
    DeviceError::Io(format!("{what}: {e}"))
}

/// A blocking NVMe/TCP queue used for set-up (admin queue, I/O queue Connect).
struct SyncQueue {
    s: TcpStream,
    digests: Digests,
    maxh2cdata: u32,
    what: String,
    next_cid: u16,
}

impl SyncQueue {
    fn connect(t: &NvmfTarget) -> Result<SyncQueue, DeviceError> {
        let what = format!("nvmf://{}/{}", t.addr, t.subnqn);
        let s = TcpStream::connect(&t.addr).map_err(|e| io_err(&what, e))?;
        s.set_nodelay(true).map_err(|e| io_err(&what, e))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(|e| io_err(&what, e))?;
        let mut q = SyncQueue {
            s,
            digests: Digests::default(),
            maxh2cdata: 4096,
            what,
            next_cid: 0,
        };
        let mut b = [0u8; p::IC_PDU_BYTES];
        p::encode_icreq(&mut b, 0, t.digests, 0);
        q.s.write_all(&b).map_err(|e| io_err(&q.what, e))?;
        match q.read_pdu(None)? {
            Pdu::IcResp(r) => {
                if r.cpda != 0 {
                    return Err(io_err(&q.what, format!("target wants CPDA {}", r.cpda)));
                }
                if r.digests != t.digests {
                    return Err(io_err(
                        &q.what,
                        format!(
                            "target answered digests {:?}, asked {:?}",
                            r.digests, t.digests
                        ),
                    ));
                }
                q.digests = r.digests;
                q.maxh2cdata = r.maxh2cdata;
            }
            other => return Err(io_err(&q.what, format!("expected ICResp, got {other:?}"))),
        }
        Ok(q)
    }

    /// Reads one PDU; C2HData goes into `data_in` at its offset.
    fn read_pdu(&mut self, data_in: Option<&mut [u8]>) -> Result<Pdu, DeviceError> {
        let mut buf = [0u8; p::HEADER_BYTES_MAX];
        let mut have = 0;
        let lim = Limits {
            in_capsule_data_max: 0,
            data_pdu_max: C2H_DATA_MAX,
        };
        let head = loop {
            match p::decode(&buf[..have], Role::Host, self.digests, &lim) {
                Ok(Some(h)) => break h,
                Ok(None) => {
                    let want = if have < 8 {
                        8
                    } else {
                        (buf[2] as usize + p::DIGEST_BYTES).min(buf.len())
                    };
                    let n = self
                        .s
                        .read(&mut buf[have..want.max(have + 1)])
                        .map_err(|e| io_err(&self.what, e))?;
                    if n == 0 {
                        return Err(io_err(&self.what, "target closed the connection"));
                    }
                    have += n;
                }
                Err(e) => return Err(io_err(&self.what, e)),
            }
        };
        // Header consumed up to `have`; read the rest of the PDU.
        let mut rest = vec![0u8; head.total_bytes as usize - have.min(head.total_bytes as usize)];
        self.s
            .read_exact(&mut rest)
            .map_err(|e| io_err(&self.what, e))?;
        let mut whole = buf[..have].to_vec();
        whole.extend_from_slice(&rest);
        let data = &whole[head.data_offset as usize..][..head.data_bytes as usize];
        if head.data_digest {
            let got = p::le32(&whole, (head.data_offset + head.data_bytes) as usize);
            if got != p::digest(data) {
                return Err(io_err(&self.what, "C2HData data digest mismatch"));
            }
        }
        match head.pdu {
            Pdu::C2HData(d) => {
                let dst = data_in.ok_or_else(|| io_err(&self.what, "unexpected C2HData"))?;
                let end = d.datao as usize + d.datal as usize;
                if end > dst.len() {
                    return Err(io_err(&self.what, "C2HData beyond the buffer"));
                }
                dst[d.datao as usize..end].copy_from_slice(data);
            }
            Pdu::C2HTermReq(t) => {
                return Err(io_err(
                    &self.what,
                    format!(
                        "target terminated the connection (FES {:#x}, FEI {})",
                        t.fes, t.fei
                    ),
                ))
            }
            _ => {}
        }
        Ok(head.pdu)
    }

    /// Runs one command: `data_out` goes in-capsule, `data_in` receives C2HData.
    fn command(
        &mut self,
        mut sqe: Sqe,
        data_out: &[u8],
        mut data_in: Option<&mut [u8]>,
    ) -> Result<Cqe, DeviceError> {
        sqe.cid = self.next_cid;
        self.next_cid = self.next_cid.wrapping_add(1);
        if !data_out.is_empty() {
            sqe.sgl_type = p::SGL_DATA_BLOCK_OFFSET;
            sqe.sgl_addr = 0;
            sqe.sgl_len = data_out.len() as u32;
        } else {
            sqe.sgl_type = p::SGL_TRANSPORT_DATA_BLOCK;
            sqe.sgl_len = data_in.as_ref().map_or(0, |d| d.len() as u32);
        }
        let mut b = vec![0u8; 128];
        let n = p::encode_capsule_cmd(&mut b, &sqe, data_out.len(), self.digests);
        b.truncate(n);
        b.extend_from_slice(data_out);
        if self.digests.data && !data_out.is_empty() {
            b.extend_from_slice(&p::digest(data_out).to_le_bytes());
        }
        self.s.write_all(&b).map_err(|e| io_err(&self.what, e))?;
        loop {
            match self.read_pdu(data_in.as_deref_mut())? {
                Pdu::CapsuleResp(c) if c.cid == sqe.cid => return Ok(c),
                Pdu::C2HData(_) => {}
                other => {
                    return Err(io_err(&self.what, format!("unexpected {other:?}")));
                }
            }
        }
    }

    fn ok(
        &mut self,
        sqe: Sqe,
        out: &[u8],
        inp: Option<&mut [u8]>,
        what: &str,
    ) -> Result<Cqe, DeviceError> {
        let c = self.command(sqe, out, inp)?;
        if c.status != 0 {
            let (sct, sc) = p::status_parts(c.status);
            return Err(io_err(
                &self.what,
                format!("{what} failed: status type {sct:#x} code {sc:#04x}"),
            ));
        }
        Ok(c)
    }

    fn fabrics_connect(
        &mut self,
        t: &NvmfTarget,
        qid: u16,
        entries: u16,
        cattr: u8,
        cntlid: u16,
        hostid: [u8; 16],
    ) -> Result<u16, DeviceError> {
        let sqe = Sqe {
            opcode: p::OPC_FABRICS,
            nsid: p::FCTYPE_CONNECT as u32,
            cdw10: (qid as u32) << 16,
            cdw11: (entries - 1) as u32 | (cattr as u32) << 16,
            cdw12: 0, // KATO 0: no keep-alive (the device keeps its admin queue open)
            ..Default::default()
        };
        let mut data = [0u8; p::CONNECT_DATA_BYTES];
        p::ConnectData {
            hostid,
            cntlid,
            subnqn: t.subnqn.clone(),
            hostnqn: t.hostnqn.clone(),
        }
        .encode(&mut data);
        let c = self.ok(sqe, &data, None, &format!("Connect (queue {qid})"))?;
        Ok(c.dw0 as u16)
    }

    fn property_get(&mut self, offset: u32, eight: bool) -> Result<u64, DeviceError> {
        let sqe = Sqe {
            opcode: p::OPC_FABRICS,
            nsid: p::FCTYPE_PROPERTY_GET as u32,
            cdw10: eight as u32,
            cdw11: offset,
            ..Default::default()
        };
        let c = self.ok(sqe, &[], None, "Property Get")?;
        Ok(c.dw0 as u64 | (c.dw1 as u64) << 32)
    }
}

/// The device: geometry from Identify, and the admin queue kept open.
pub struct NvmfDevice {
    info: DeviceInfo,
    target: NvmfTarget,
    cntlid: u16,
    hostid: [u8; 16],
    /// In-capsule data the I/O queues accept (IOCCSZ * 16 - 64).
    in_capsule_bytes: u32,
    /// Largest transfer (MDTS).
    max_transfer_bytes: u32,
    max_queue_entries: u16,
    io_queues: u16,
    next_qid: AtomicU16,
    _admin: Mutex<SyncQueue>,
}

impl NvmfDevice {
    pub fn open(name: String, t: &NvmfTarget) -> Result<NvmfDevice, DeviceError> {
        let mut a = SyncQueue::connect(t)?;
        let hostid = {
            let x = crc32c::crc32c(t.hostnqn.as_bytes()).to_le_bytes();
            let y = crc32c::crc32c(&std::process::id().to_le_bytes()).to_le_bytes();
            let mut h = [0u8; 16];
            h[..4].copy_from_slice(&x);
            h[4..8].copy_from_slice(&y);
            h[8..12].copy_from_slice(&x);
            h[12..].copy_from_slice(&y);
            h
        };
        let cntlid = a.fabrics_connect(t, 0, ADMIN_ENTRIES, 0, 0xffff, hostid)?;
        let cap = a.property_get(p::PROP_CAP, true)?;
        let mqes = (cap & 0xffff) as u16;
        let timeout_ms = ((cap >> 24) & 0xff) * 500;
        let cc = 1 | 6 << 16 | 4 << 20;
        let set = Sqe {
            opcode: p::OPC_FABRICS,
            nsid: p::FCTYPE_PROPERTY_SET as u32,
            cdw10: 0,
            cdw11: p::PROP_CC,
            cdw12: cc,
            ..Default::default()
        };
        a.ok(set, &[], None, "Property Set CC.EN")?;
        let deadline = Instant::now() + Duration::from_millis(timeout_ms.max(1000));
        loop {
            let csts = a.property_get(p::PROP_CSTS, false)?;
            if csts & 2 != 0 {
                return Err(io_err(&a.what, "controller fatal status (CSTS.CFS)"));
            }
            if csts & 1 != 0 {
                break;
            }
            if Instant::now() > deadline {
                return Err(io_err(&a.what, "controller did not become ready"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let mut idc = vec![0u8; 4096];
        let ident = |cns: u32, nsid: u32| Sqe {
            opcode: p::ADMIN_IDENTIFY,
            nsid,
            cdw10: cns,
            ..Default::default()
        };
        a.ok(ident(1, 0), &[], Some(&mut idc), "Identify Controller")?;
        let mdts = idc[77];
        let mps_min = 4096u64 << ((cap >> 48) & 0xf);
        let max_transfer_bytes = if mdts == 0 {
            1 << 20
        } else {
            (mps_min << mdts).min(1 << 20) as u32
        };
        let ioccsz = p::le32(&idc, 1792);
        let in_capsule_bytes = (ioccsz * 16).saturating_sub(p::SQE_BYTES as u32);
        if p::le16(&idc, 1800) != 0 {
            return Err(io_err(&a.what, "ICDOFF is not 0"));
        }
        let mut idn = vec![0u8; 4096];
        a.ok(ident(0, t.nsid), &[], Some(&mut idn), "Identify Namespace")?;
        let nsze = p::le64(&idn, 0);
        if nsze == 0 {
            return Err(io_err(
                &a.what,
                format!("namespace {} is not active", t.nsid),
            ));
        }
        let flbas = (idn[26] & 0xf) as usize;
        let lbaf = p::le32(&idn, 128 + flbas * 4);
        if lbaf & 0xffff != 0 {
            return Err(io_err(
                &a.what,
                "namespaces with metadata are not supported",
            ));
        }
        let lbads = (lbaf >> 16) & 0xff;
        if !(9..=16).contains(&lbads) {
            return Err(io_err(&a.what, format!("LBA data size 2^{lbads}")));
        }
        let nq = Sqe {
            opcode: p::ADMIN_SET_FEATURES,
            cdw10: 0x07,
            cdw11: 63 | 63 << 16,
            ..Default::default()
        };
        let c = a.ok(nq, &[], None, "Set Features Number of Queues")?;
        let io_queues = ((c.dw0 & 0xffff).min(c.dw0 >> 16) + 1) as u16;
        let block_size = 1u32 << lbads;
        Ok(NvmfDevice {
            info: DeviceInfo {
                name,
                product: "nvmf",
                block_size,
                num_blocks: nsze,
                buf_align: 1,
                persistent: true,
                volatile_write_cache: idc[525] & 1 != 0,
            },
            target: t.clone(),
            cntlid,
            hostid,
            in_capsule_bytes,
            max_transfer_bytes,
            max_queue_entries: mqes.saturating_add(1).min(1024),
            io_queues,
            next_qid: AtomicU16::new(1),
            _admin: Mutex::new(a),
        })
    }
}

impl BlockDevice for NvmfDevice {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn open_channel(&self, opts: &ChannelOptions<'_>) -> Result<Box<dyn IoChannel>, DeviceError> {
        let qid = self.next_qid.fetch_add(1, Ordering::Relaxed);
        if qid > self.io_queues {
            return Err(io_err(
                &self.info.name,
                format!("the target granted only {} I/O queues", self.io_queues),
            ));
        }
        // Commands in flight = queue entries (SQSIZE + 1), as the Linux host does; with
        // SQ flow control disabled the SQ head pointer is not what limits the queue.
        let entries = (opts.queue_depth.max(2) as u16).min(self.max_queue_entries);
        let mut q = SyncQueue::connect(&self.target)?;
        q.fabrics_connect(
            &self.target,
            qid,
            entries,
            p::CATTR_DISABLE_SQ_FLOW,
            self.cntlid,
            self.hostid,
        )?;
        q.s.set_nonblocking(true).map_err(|e| io_err(&q.what, e))?;
        let slots = entries as usize;
        Ok(Box::new(NvmfChannel {
            s: q.s,
            what: q.what,
            digests: q.digests,
            maxh2cdata: q.maxh2cdata,
            nsid: self.target.nsid,
            block_shift: self.info.block_size.trailing_zeros(),
            info: self.info.clone(),
            in_capsule_bytes: self.in_capsule_bytes,
            max_transfer_bytes: self.max_transfer_bytes,
            slots: vec![Slot::default(); slots],
            free: (0..slots as u16).rev().collect(),
            tx: VecDeque::with_capacity(slots * 2),
            rx: vec![0; 64 << 10],
            rx_len: 0,
            rx_state: RxState::Pdu,
            done: VecDeque::with_capacity(slots),
            broken: false,
        }))
    }
}

#[derive(Clone, Copy)]
struct Slot {
    busy: bool,
    tag: u64,
    kind: IoKind,
    buf: *mut u8,
    len: u32,
    received: u32,
    /// A DSM range for trims (sent in-capsule from here).
    range: [u8; 16],
}

impl Default for Slot {
    fn default() -> Self {
        Slot {
            busy: false,
            tag: 0,
            kind: IoKind::Read,
            buf: std::ptr::null_mut(),
            len: 0,
            received: 0,
            range: [0; 16],
        }
    }
}

/// One outgoing PDU: header, data, data digest.
struct Tx {
    hdr: [u8; 80],
    hdr_len: u8,
    data: *const u8,
    data_len: u32,
    tail: [u8; 4],
    tail_len: u8,
    sent: u32,
}

impl Tx {
    fn total(&self) -> u32 {
        self.hdr_len as u32 + self.data_len + self.tail_len as u32
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum RxState {
    Pdu,
    C2HData {
        cid: u16,
        start: u32,
        at: u32,
        end: u32,
        digest: bool,
        success: bool,
    },
}

struct NvmfChannel {
    s: TcpStream,
    what: String,
    digests: Digests,
    maxh2cdata: u32,
    nsid: u32,
    block_shift: u32,
    info: DeviceInfo,
    in_capsule_bytes: u32,
    max_transfer_bytes: u32,
    slots: Vec<Slot>,
    free: Vec<u16>,
    tx: VecDeque<Tx>,
    rx: Vec<u8>,
    rx_len: usize,
    rx_state: RxState,
    done: VecDeque<Completion>,
    broken: bool,
}

const HOST_LIMITS: Limits = Limits {
    in_capsule_data_max: 0,
    data_pdu_max: C2H_DATA_MAX,
};

impl NvmfChannel {
    fn finish(&mut self, cid: u16, result: i32) {
        let s = &mut self.slots[cid as usize];
        debug_assert!(s.busy);
        s.busy = false;
        self.done.push_back(Completion { tag: s.tag, result });
        self.free.push(cid);
    }

    /// The connection failed: every command in flight fails.
    fn fail_all(&mut self, why: &str) {
        if !self.broken {
            tracing::error!("{}: I/O queue failed: {why}", self.what);
        }
        self.broken = true;
        self.tx.clear();
        for cid in 0..self.slots.len() as u16 {
            if self.slots[cid as usize].busy {
                self.finish(cid, -libc::EIO);
            }
        }
    }

    fn send(&mut self) {
        while !self.tx.is_empty() && !self.broken {
            let mut iov = [libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            }; 48];
            let mut n_iov = 0;
            for t in self.tx.iter().take(16) {
                let (hl, dl) = (t.hdr_len as u32, t.data_len);
                let mut s = t.sent;
                if s < hl {
                    iov[n_iov] = libc::iovec {
                        iov_base: t.hdr[s as usize..].as_ptr() as *mut libc::c_void,
                        iov_len: (hl - s) as usize,
                    };
                    n_iov += 1;
                    s = hl;
                }
                if s < hl + dl {
                    // SAFETY: s - hl < data_len, inside the caller's buffer (submit contract).
                    let base = unsafe { t.data.add((s - hl) as usize) };
                    iov[n_iov] = libc::iovec {
                        iov_base: base as *mut libc::c_void,
                        iov_len: (hl + dl - s) as usize,
                    };
                    n_iov += 1;
                    s = hl + dl;
                }
                if s < t.total() {
                    iov[n_iov] = libc::iovec {
                        iov_base: t.tail[(s - hl - dl) as usize..].as_ptr() as *mut libc::c_void,
                        iov_len: (t.total() - s) as usize,
                    };
                    n_iov += 1;
                }
            }
            let msg = libc::msghdr {
                msg_name: std::ptr::null_mut(),
                msg_namelen: 0,
                msg_iov: iov.as_mut_ptr(),
                msg_iovlen: n_iov,
                msg_control: std::ptr::null_mut(),
                msg_controllen: 0,
                msg_flags: 0,
            };
            // SAFETY: the iovecs point into `tx` entries and caller buffers that stay
            // valid until their commands complete.
            let n = unsafe { libc::sendmsg(self.s.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::WouldBlock {
                    self.fail_all(&format!("send: {e}"));
                }
                return;
            }
            let mut left = n as u32;
            while left > 0 {
                let t = self.tx.front_mut().expect("sent more than queued");
                let take = left.min(t.total() - t.sent);
                t.sent += take;
                left -= take;
                if t.sent == t.total() {
                    self.tx.pop_front();
                }
            }
        }
    }

    fn queue_pdu(&mut self, hdr: &[u8], data: *const u8, data_len: u32, digest: Option<u32>) {
        let mut t = Tx {
            hdr: [0; 80],
            hdr_len: hdr.len() as u8,
            data,
            data_len,
            tail: [0; 4],
            tail_len: 0,
            sent: 0,
        };
        t.hdr[..hdr.len()].copy_from_slice(hdr);
        if let Some(d) = digest {
            t.tail = d.to_le_bytes();
            t.tail_len = 4;
        }
        self.tx.push_back(t);
    }

    fn data_digest(&self, data: *const u8, len: u32) -> Option<u32> {
        self.digests.data.then(|| {
            // SAFETY: the caller's buffer holds `len` bytes (submit contract).
            p::digest(unsafe { std::slice::from_raw_parts(data, len as usize) })
        })
    }

    /// Handles one decoded PDU header at `rx[0]`; returns bytes consumed, or 0 to wait.
    fn on_pdu(&mut self, head: p::PduHead) -> Result<usize, String> {
        match head.pdu {
            Pdu::CapsuleResp(c) => {
                let s = self.slots.get(c.cid as usize).filter(|s| s.busy).copied();
                if s.is_none() {
                    return Err(format!("CapsuleResp for idle command {}", c.cid));
                }
                let rc = if c.status == 0 {
                    0
                } else {
                    let (sct, sc) = p::status_parts(c.status);
                    tracing::warn!(
                        "{}: command {} failed: status type {sct:#x} code {sc:#04x}",
                        self.what,
                        c.cid
                    );
                    match (sct, sc) {
                        (p::SCT_GENERIC, p::SC_LBA_RANGE)
                        | (p::SCT_GENERIC, p::SC_INVALID_FIELD) => -libc::EINVAL,
                        (p::SCT_GENERIC, p::SC_INVALID_OPCODE) => -libc::EOPNOTSUPP,
                        _ => -libc::EIO,
                    }
                };
                self.finish(c.cid, rc);
                Ok(head.total_bytes as usize)
            }
            Pdu::C2HData(d) => {
                let s = self
                    .slots
                    .get(d.cccid as usize)
                    .copied()
                    .filter(|s| s.busy && s.kind == IoKind::Read);
                let Some(s) = s else {
                    return Err(format!(
                        "C2HData for command {} that is not a read",
                        d.cccid
                    ));
                };
                if d.datao != s.received || d.datao + d.datal > s.len {
                    return Err(format!(
                        "C2HData offset {} length {} outside the read",
                        d.datao, d.datal
                    ));
                }
                self.rx_state = RxState::C2HData {
                    cid: d.cccid,
                    start: d.datao,
                    at: d.datao,
                    end: d.datao + d.datal,
                    digest: head.data_digest,
                    success: head.flags & p::FLAG_DATA_SUCCESS != 0,
                };
                Ok(head.data_offset as usize)
            }
            Pdu::R2T(r) => {
                let s = self
                    .slots
                    .get(r.cccid as usize)
                    .copied()
                    .filter(|s| s.busy && s.kind == IoKind::Write);
                let Some(s) = s else {
                    return Err(format!("R2T for command {} that is not a write", r.cccid));
                };
                if r.r2to as u64 + r.r2tl as u64 > s.len as u64 {
                    return Err(format!(
                        "R2T offset {} length {} outside the write",
                        r.r2to, r.r2tl
                    ));
                }
                let mut off = r.r2to;
                let end = r.r2to + r.r2tl;
                while off < end {
                    let n = (end - off).min(self.maxh2cdata);
                    let mut h = [0u8; 32];
                    let last = if off + n == end { p::FLAG_DATA_LAST } else { 0 };
                    let hl = p::encode_data_hdr(
                        &mut h,
                        p::PDU_H2C_DATA,
                        last,
                        &p::DataHdr {
                            cccid: r.cccid,
                            ttag: r.ttag,
                            datao: off,
                            datal: n,
                        },
                        0,
                        self.digests,
                    );
                    // SAFETY: off + n <= len, inside the caller's buffer.
                    let data = unsafe { s.buf.add(off as usize) };
                    let dg = self.data_digest(data, n);
                    self.queue_pdu(&h[..hl], data, n, dg);
                    off += n;
                }
                Ok(head.total_bytes as usize)
            }
            Pdu::C2HTermReq(t) => Err(format!(
                "target terminated the connection (FES {:#x}, FEI {})",
                t.fes, t.fei
            )),
            other => Err(format!("unexpected {other:?}")),
        }
    }

    /// Receives and handles PDUs until the socket has nothing more.
    fn receive(&mut self) {
        let fd = self.s.as_raw_fd();
        while !self.broken {
            // Parse what is buffered.
            let mut used = 0;
            let mut err = None;
            loop {
                if let RxState::C2HData {
                    cid,
                    start,
                    at,
                    end,
                    digest,
                    success,
                } = self.rx_state
                {
                    let s = self.slots[cid as usize];
                    let avail = self.rx_len - used;
                    let n = avail.min((end - at) as usize);
                    // SAFETY: at + n <= end <= len, inside the read's buffer.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            self.rx[used..].as_ptr(),
                            s.buf.add(at as usize),
                            n,
                        )
                    };
                    used += n;
                    let at = at + n as u32;
                    if at < end || (digest && self.rx_len - used < 4) {
                        self.rx_state = RxState::C2HData {
                            cid,
                            start,
                            at,
                            end,
                            digest,
                            success,
                        };
                        break;
                    }
                    if digest {
                        let got = p::le32(&self.rx, used);
                        used += 4;
                        // SAFETY: start..end of the buffer was just filled.
                        let d = unsafe {
                            std::slice::from_raw_parts(
                                s.buf.add(start as usize),
                                (end - start) as usize,
                            )
                        };
                        if p::digest(d) != got {
                            err = Some("C2HData data digest mismatch".to_string());
                            break;
                        }
                    }
                    self.slots[cid as usize].received = end;
                    self.rx_state = RxState::Pdu;
                    if success {
                        if end != s.len {
                            err = Some("SUCCESS before all data arrived".into());
                            break;
                        }
                        self.finish(cid, 0);
                    }
                    continue;
                }
                match p::decode(
                    &self.rx[used..self.rx_len],
                    Role::Host,
                    self.digests,
                    &HOST_LIMITS,
                ) {
                    Ok(None) => break,
                    Ok(Some(h)) => {
                        // PDUs without data must be complete in the buffer.
                        if h.data_bytes == 0 && self.rx_len - used < h.total_bytes as usize {
                            break;
                        }
                        match self.on_pdu(h) {
                            Ok(n) => used += n,
                            Err(e) => {
                                err = Some(e);
                                break;
                            }
                        }
                    }
                    Err(e) => {
                        err = Some(e.to_string());
                        break;
                    }
                }
            }
            if let Some(e) = err {
                self.fail_all(&e);
                return;
            }
            self.rx.copy_within(used..self.rx_len, 0);
            self.rx_len -= used;
            // Large reads go straight into the caller's buffer.
            let (ptr, room) = match self.rx_state {
                RxState::C2HData { cid, at, end, .. } if self.rx_len == 0 && end - at > 4096 => {
                    // SAFETY: at < end <= len, inside the read's buffer.
                    (
                        unsafe { self.slots[cid as usize].buf.add(at as usize) },
                        (end - at) as usize,
                    )
                }
                _ => (
                    self.rx[self.rx_len..].as_mut_ptr(),
                    self.rx.len() - self.rx_len,
                ),
            };
            // SAFETY: `ptr` has `room` writable bytes (our buffer or the read's buffer).
            let n = unsafe { libc::recv(fd, ptr as *mut libc::c_void, room, 0) };
            if n == 0 {
                self.fail_all("target closed the connection");
                return;
            }
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::WouldBlock {
                    self.fail_all(&format!("recv: {e}"));
                }
                return;
            }
            if ptr == self.rx[self.rx_len..].as_mut_ptr() {
                self.rx_len += n as usize;
            } else if let RxState::C2HData {
                cid,
                start,
                at,
                end,
                digest,
                success,
            } = self.rx_state
            {
                self.rx_state = RxState::C2HData {
                    cid,
                    start,
                    at: at + n as u32,
                    end,
                    digest,
                    success,
                };
            }
        }
    }
}

impl IoChannel for NvmfChannel {
    unsafe fn submit(&mut self, req: &IoRequest) -> Result<(), SubmitError> {
        self.info.check(req)?;
        if req.len_bytes > self.max_transfer_bytes
            && matches!(req.kind, IoKind::Read | IoKind::Write)
        {
            return Err(SubmitError::Unsupported);
        }
        let Some(cid) = self.free.pop() else {
            return Err(SubmitError::QueueFull);
        };
        let slba = req.offset_bytes >> self.block_shift;
        let nlb = req.len_bytes >> self.block_shift;
        let mut sqe = Sqe {
            cid,
            nsid: self.nsid,
            cdw10: slba as u32,
            cdw11: (slba >> 32) as u32,
            cdw12: nlb.saturating_sub(1) | if req.fua { 1 << 30 } else { 0 },
            sgl_type: p::SGL_TRANSPORT_DATA_BLOCK,
            ..Default::default()
        };
        let slot = &mut self.slots[cid as usize];
        *slot = Slot {
            busy: true,
            tag: req.tag,
            kind: req.kind,
            buf: req.buf,
            len: req.len_bytes,
            received: 0,
            range: [0; 16],
        };
        let mut data: (*const u8, u32) = (std::ptr::null(), 0);
        match req.kind {
            IoKind::Read => {
                sqe.opcode = p::IO_READ;
                sqe.sgl_len = req.len_bytes;
            }
            IoKind::Write => {
                sqe.opcode = p::IO_WRITE;
                sqe.sgl_len = req.len_bytes;
                if req.len_bytes <= self.in_capsule_bytes {
                    sqe.sgl_type = p::SGL_DATA_BLOCK_OFFSET;
                    data = (req.buf, req.len_bytes);
                }
            }
            IoKind::Flush => {
                sqe.opcode = p::IO_FLUSH;
                sqe.cdw10 = 0;
                sqe.cdw11 = 0;
                sqe.cdw12 = 0;
            }
            IoKind::WriteZeroes | IoKind::Trim
                if nlb > 65536 && req.kind == IoKind::WriteZeroes =>
            {
                self.free.push(cid);
                self.slots[cid as usize].busy = false;
                return Err(SubmitError::Unsupported);
            }
            IoKind::WriteZeroes => sqe.opcode = p::IO_WRITE_ZEROES,
            IoKind::Trim => {
                sqe.opcode = p::IO_DSM;
                sqe.cdw10 = 0; // one range
                sqe.cdw11 = 1 << 2; // deallocate
                sqe.cdw12 = 0;
                p::put32(&mut slot.range, 4, nlb);
                p::put64(&mut slot.range, 8, slba);
                sqe.sgl_type = p::SGL_DATA_BLOCK_OFFSET;
                sqe.sgl_len = 16;
                data = (slot.range.as_ptr(), 16);
            }
        }
        if self.broken {
            self.finish(cid, -libc::EIO);
            return Ok(());
        }
        let mut h = [0u8; 80];
        let hl = p::encode_capsule_cmd(&mut h, &sqe, data.1 as usize, self.digests);
        let dg = if data.1 > 0 {
            self.data_digest(data.0, data.1)
        } else {
            None
        };
        self.queue_pdu(&h[..hl], data.0, data.1, dg);
        Ok(())
    }

    fn submit_pending(&mut self) -> usize {
        let n = self.tx.len();
        self.send();
        n - self.tx.len()
    }

    fn poll_completions(&mut self, out: &mut [Completion]) -> usize {
        self.send();
        if !self.broken && self.free.len() < self.slots.len() {
            self.receive();
            self.send();
        }
        let n = out.len().min(self.done.len());
        for (slot, c) in out.iter_mut().zip(self.done.drain(..n)) {
            *slot = c;
        }
        n
    }

    fn inflight(&self) -> usize {
        self.slots.len() - self.free.len() + self.done.len()
    }

    fn notifier_fd(&self) -> Option<RawFd> {
        Some(self.s.as_raw_fd())
    }
}
