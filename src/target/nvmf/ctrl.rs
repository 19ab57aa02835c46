//! NVMe-oF subsystems, controllers and the admin command set.
//!
//! Subsystems live in a [`Registry`] shared by every reactor, the acceptors and
//! the RPC thread. It is only locked at Connect time, by admin commands and by
//! RPC: the I/O path holds an `Arc<Ctrl>` and a namespace snapshot and reads
//! nothing shared but one relaxed atomic per command (the namespace generation)
//! and one per poll (the controller's `dead` flag).
//!
//! Admin and Fabrics commands run synchronously on the reactor that owns the
//! admin queue: [`admin_command`] fills the response data and returns the
//! completion.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::super::nvmf_proto::{self as p, put16, put32, put64, Sqe};
use crate::volume::Volume;

/// Logical block size of every namespace.
pub const LBA_BYTES: u32 = 4096;
pub const LBA_SHIFT: u32 = 12;
/// Entries per queue (CAP.MQES + 1) and outstanding commands per queue (MAXCMD).
pub const QUEUE_ENTRIES_MAX: u16 = 128;
/// Highest NSID a subsystem may use (Identify Controller NN).
pub const NSID_MAX: u32 = crate::config::NAMESPACES_MAX as u32;
/// Async Event Requests a controller holds at most (AERL + 1).
pub const AER_MAX: usize = 4;
/// Changed Namespace List entries (log page 0x04) before it reports 0xFFFFFFFF.
pub const CHANGED_NS_MAX: usize = 1024;
/// Pending asynchronous event: Namespace Attribute Changed (notice 0x00, log page 0x04).
pub const AEN_NS_CHANGED: u32 = 1;
/// Pending asynchronous event: Discovery Log Page Change (notice 0xF0, log page 0x70).
pub const AEN_DISCOVERY_CHANGED: u32 = 2;
/// I/O queues a controller may have.
pub const IO_QUEUES_MAX: u16 = 64;
/// In-capsule data on I/O queues: IOCCSZ = (64 + 8192) / 16.
pub const IN_CAPSULE_BYTES: u32 = 8192;
/// MAXH2CDATA advertised in ICResp.
pub const MAXH2CDATA_BYTES: u32 = 128 << 10;
/// Keep Alive granularity (KAS, in 100 ms units).
pub const KAS_100MS: u16 = 1;

/// One namespace: an NSID bound to a volume.
#[derive(Clone, Debug)]
pub struct Namespace {
    pub nsid: u32,
    /// Index in the server's volume list.
    pub volume: u32,
    pub volume_name: String,
    pub blocks: u64,
    /// NGUID / UUID, derived from the subsystem NQN and the volume name.
    pub uuid: [u8; 16],
}

pub struct Subsystem {
    pub nqn: String,
    pub serial: String,
    pub model: String,
    pub allow_any_host: AtomicBool,
    pub hosts: Mutex<Vec<String>>,
    pub listeners: Mutex<Vec<SocketAddr>>,
    pub namespaces: Mutex<Vec<Namespace>>,
    /// Bumped whenever `namespaces` changes; I/O queues re-read their snapshot.
    pub ns_generation: AtomicU64,
    pub ctrls: Mutex<Vec<Arc<Ctrl>>>,
    next_cntlid: AtomicU16,
}

/// A controller: created by an admin-queue Connect, joined by I/O queues.
pub struct Ctrl {
    pub cntlid: u16,
    pub subsys: Arc<Subsystem>,
    pub discovery: bool,
    pub hostnqn: String,
    pub hostid: [u8; 16],
    pub kato_ms: AtomicU32,
    pub cc: AtomicU32,
    pub csts: AtomicU32,
    pub aec: AtomicU32,
    /// I/O queues granted by Set Features Number of Queues (0 = none asked yet).
    pub io_queues: AtomicU16,
    /// Set when the controller is torn down (keep-alive timeout, admin queue gone).
    pub dead: AtomicBool,
    /// Connected I/O queue ids.
    pub qids: Mutex<Vec<u16>>,
    /// Asynchronous events waiting for a held Async Event Request (`AEN_*` bits).
    pub aen_pending: AtomicU32,
    /// Events reported and not yet acknowledged by reading their log page: the
    /// controller sends no second notice of the same kind until the host reads it.
    pub aen_masked: AtomicU32,
    /// Changed Namespace List (log page 0x04) since the host last read it.
    pub changed_ns: Mutex<Vec<u32>>,
}

/// Every subsystem, plus the discovery subsystem.
pub struct Registry {
    pub subsystems: Mutex<Vec<Arc<Subsystem>>>,
    pub discovery: Arc<Subsystem>,
    /// Discovery log generation counter.
    pub genctr: AtomicU64,
    pub volumes: Arc<Vec<Arc<Volume>>>,
}

fn uuid_for(nqn: &str, volume: &str) -> [u8; 16] {
    let a = crc32c::crc32c(nqn.as_bytes());
    let b = crc32c::crc32c_append(a, volume.as_bytes());
    let c = crc32c::crc32c_append(b, b"kiln-ns");
    let d = crc32c::crc32c_append(c, &a.to_le_bytes());
    let mut u = [0u8; 16];
    u[..4].copy_from_slice(&a.to_be_bytes());
    u[4..8].copy_from_slice(&b.to_be_bytes());
    u[8..12].copy_from_slice(&c.to_be_bytes());
    u[12..].copy_from_slice(&d.to_be_bytes());
    u[6] = (u[6] & 0x0f) | 0x80; // RFC 4122 version 8 (custom), variant 1
    u[8] = (u[8] & 0x3f) | 0x80;
    u
}

pub use crate::config::check_nqn;

impl Subsystem {
    fn new(nqn: &str, serial: &str, model: &str) -> Subsystem {
        Subsystem {
            nqn: nqn.into(),
            serial: serial.into(),
            model: model.into(),
            allow_any_host: AtomicBool::new(false),
            hosts: Mutex::new(Vec::new()),
            listeners: Mutex::new(Vec::new()),
            namespaces: Mutex::new(Vec::new()),
            ns_generation: AtomicU64::new(0),
            ctrls: Mutex::new(Vec::new()),
            next_cntlid: AtomicU16::new(1),
        }
    }

    pub fn host_allowed(&self, hostnqn: &str) -> bool {
        self.allow_any_host.load(Ordering::Relaxed)
            || self.hosts.lock().unwrap().iter().any(|h| h == hostnqn)
    }

    /// A JSON description in the shape of SPDK's `nvmf_get_subsystems`.
    pub fn to_json(&self) -> serde_json::Value {
        let listen: Vec<_> = self
            .listeners
            .lock()
            .unwrap()
            .iter()
            .map(|a| {
                serde_json::json!({"trtype": "TCP", "adrfam": if a.is_ipv4() {"IPv4"} else {"IPv6"},
                    "traddr": a.ip().to_string(), "trsvcid": a.port().to_string()})
            })
            .collect();
        let ns: Vec<_> = self
            .namespaces
            .lock()
            .unwrap()
            .iter()
            .map(|n| {
                serde_json::json!({"nsid": n.nsid, "bdev_name": n.volume_name, "name": n.volume_name,
                    "block_size": LBA_BYTES, "num_blocks": n.blocks,
                    "uuid": fmt_uuid(&n.uuid)})
            })
            .collect();
        serde_json::json!({
            "nqn": self.nqn,
            "subtype": if self.nqn == p::DISCOVERY_NQN { "Discovery" } else { "NVMe" },
            "listen_addresses": listen,
            "allow_any_host": self.allow_any_host.load(Ordering::Relaxed),
            "hosts": self.hosts.lock().unwrap().iter().map(|h| serde_json::json!({"nqn": h})).collect::<Vec<_>>(),
            "serial_number": self.serial,
            "model_number": self.model,
            "namespaces": ns,
            "controllers": self.ctrls.lock().unwrap().len(),
        })
    }
}

fn fmt_uuid(u: &[u8; 16]) -> String {
    let h: String = u.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

impl Registry {
    pub fn new(volumes: Arc<Vec<Arc<Volume>>>) -> Registry {
        let discovery = Subsystem::new(p::DISCOVERY_NQN, "", "");
        discovery.allow_any_host.store(true, Ordering::Relaxed);
        Registry {
            subsystems: Mutex::new(Vec::new()),
            discovery: Arc::new(discovery),
            genctr: AtomicU64::new(1),
            volumes,
        }
    }

    pub fn find(&self, nqn: &str) -> Option<Arc<Subsystem>> {
        if nqn == p::DISCOVERY_NQN {
            return Some(self.discovery.clone());
        }
        self.subsystems
            .lock()
            .unwrap()
            .iter()
            .find(|s| s.nqn == nqn)
            .cloned()
    }

    /// The discovery log changed: bump its generation and tell the discovery
    /// controllers (Discovery Log Page Change notice).
    fn bump(&self) {
        self.genctr.fetch_add(1, Ordering::Relaxed);
        for c in self.discovery.ctrls.lock().unwrap().iter() {
            c.aen_pending
                .fetch_or(AEN_DISCOVERY_CHANGED, Ordering::Release);
        }
    }

    /// `nvmf_create_subsystem`.
    pub fn create_subsystem(
        &self,
        nqn: &str,
        serial: &str,
        model: &str,
        allow_any_host: bool,
    ) -> Result<Arc<Subsystem>, String> {
        check_nqn(nqn)?;
        if nqn == p::DISCOVERY_NQN {
            return Err(format!("'{nqn}' is the discovery NQN"));
        }
        if serial.len() > 20 || !serial.is_ascii() {
            return Err(format!(
                "serial number '{serial}' must be ASCII of at most 20 bytes"
            ));
        }
        if model.len() > 40 || !model.is_ascii() {
            return Err(format!(
                "model number '{model}' must be ASCII of at most 40 bytes"
            ));
        }
        let mut subs = self.subsystems.lock().unwrap();
        if subs.iter().any(|s| s.nqn == nqn) {
            return Err(format!("subsystem '{nqn}' already exists"));
        }
        let s = Arc::new(Subsystem::new(nqn, serial, model));
        s.allow_any_host.store(allow_any_host, Ordering::Relaxed);
        subs.push(s.clone());
        self.bump();
        Ok(s)
    }

    fn subsystem(&self, nqn: &str) -> Result<Arc<Subsystem>, String> {
        self.subsystems
            .lock()
            .unwrap()
            .iter()
            .find(|s| s.nqn == nqn)
            .cloned()
            .ok_or_else(|| format!("subsystem '{nqn}' not found"))
    }

    /// `nvmf_subsystem_add_ns`: returns the NSID given.
    pub fn add_ns(&self, nqn: &str, volume: &str, nsid: Option<u32>) -> Result<u32, String> {
        let s = self.subsystem(nqn)?;
        let (vi, v) = self
            .volumes
            .iter()
            .enumerate()
            .find(|(_, v)| v.name == volume)
            .ok_or_else(|| format!("volume '{volume}' not found"))?;
        if v.size_bytes % LBA_BYTES as u64 != 0 {
            return Err(format!(
                "volume '{volume}' size is not a multiple of {LBA_BYTES}"
            ));
        }
        let mut ns = s.namespaces.lock().unwrap();
        let nsid = match nsid {
            Some(n) if n == 0 || n > NSID_MAX => {
                return Err(format!("nsid {n} must be 1..={NSID_MAX}"))
            }
            Some(n) if ns.iter().any(|x| x.nsid == n) => {
                return Err(format!("nsid {n} is already used in '{nqn}'"))
            }
            Some(n) => n,
            None => (1..=NSID_MAX)
                .find(|n| !ns.iter().any(|x| x.nsid == *n))
                .ok_or_else(|| format!("'{nqn}' already has {NSID_MAX} namespaces"))?,
        };
        ns.push(Namespace {
            nsid,
            volume: vi as u32,
            volume_name: volume.into(),
            blocks: v.size_bytes / LBA_BYTES as u64,
            uuid: uuid_for(nqn, volume),
        });
        ns.sort_by_key(|n| n.nsid);
        s.ns_generation.fetch_add(1, Ordering::Release);
        drop(ns);
        for c in s.ctrls.lock().unwrap().iter() {
            let mut list = c.changed_ns.lock().unwrap();
            if list.len() < CHANGED_NS_MAX && !list.contains(&nsid) {
                list.push(nsid);
            } else if list.len() >= CHANGED_NS_MAX {
                // More than 1024 changes: the list is one 0xFFFFFFFF entry.
                list.clear();
                list.push(u32::MAX);
            }
            c.aen_pending.fetch_or(AEN_NS_CHANGED, Ordering::Release);
        }
        self.bump();
        Ok(nsid)
    }

    pub fn add_host(&self, nqn: &str, host: &str) -> Result<(), String> {
        check_nqn(host)?;
        let s = self.subsystem(nqn)?;
        let mut h = s.hosts.lock().unwrap();
        if !h.iter().any(|x| x == host) {
            h.push(host.into());
        }
        self.bump();
        Ok(())
    }

    pub fn add_listener(&self, nqn: &str, addr: SocketAddr) -> Result<(), String> {
        let s = self.subsystem(nqn)?;
        let mut l = s.listeners.lock().unwrap();
        if !l.contains(&addr) {
            l.push(addr);
        }
        self.bump();
        Ok(())
    }

    /// Builds a subsystem from its configuration.
    pub fn add_spec(&self, spec: &crate::config::SubsystemPlan) -> Result<(), String> {
        self.create_subsystem(&spec.nqn, &spec.serial, &spec.model, spec.allow_any_host)?;
        for v in &spec.namespaces {
            self.add_ns(&spec.nqn, v, None)?;
        }
        for l in &spec.listeners {
            self.add_listener(&spec.nqn, *l)?;
        }
        for h in &spec.allowed_hosts {
            self.add_host(&spec.nqn, h)?;
        }
        Ok(())
    }
}

/// Why a Connect was refused: status and the IATTR/IPO (dw0) for invalid parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectRefusal {
    pub status: u16,
    pub dw0: u32,
    pub why: &'static str,
}

fn refuse(sc: u8, ipo_in_data: Option<u16>, why: &'static str) -> ConnectRefusal {
    ConnectRefusal {
        status: p::status(p::SCT_CMD, sc),
        dw0: match ipo_in_data {
            Some(ipo) => 1 | (ipo as u32) << 16,
            None => 0,
        },
        why,
    }
}

/// What the queue became after a successful Connect.
pub struct Connected {
    pub ctrl: Arc<Ctrl>,
    pub qid: u16,
    /// Queue entries (SQSIZE + 1).
    pub entries: u16,
    pub sq_flow_disabled: bool,
}

/// Handles Fabrics Connect. `local` is the listener address the host reached.
pub fn connect(
    reg: &Registry,
    sqe: &Sqe,
    data: &[u8],
    local: SocketAddr,
) -> Result<Connected, ConnectRefusal> {
    let recfmt = sqe.cdw10 as u16;
    let qid = (sqe.cdw10 >> 16) as u16;
    let sqsize = sqe.cdw11 as u16;
    let cattr = (sqe.cdw11 >> 16) as u8;
    let kato_ms = sqe.cdw12;
    if recfmt != 0 {
        return Err(refuse(p::SC_CONNECT_FORMAT, None, "record format is not 0"));
    }
    let d = p::ConnectData::parse(data)
        .map_err(|_| refuse(p::SC_CONNECT_INVALID_PARAM, Some(256), "bad Connect data"))?;
    let Some(subsys) = reg.find(&d.subnqn) else {
        return Err(refuse(
            p::SC_CONNECT_INVALID_PARAM,
            Some(256),
            "unknown subsystem NQN",
        ));
    };
    let discovery = subsys.nqn == p::DISCOVERY_NQN;
    if !discovery && !subsys.listeners.lock().unwrap().contains(&local) {
        return Err(refuse(
            p::SC_CONNECT_INVALID_PARAM,
            Some(256),
            "subsystem is not reachable through this listener",
        ));
    }
    if !subsys.host_allowed(&d.hostnqn) {
        return Err(refuse(
            p::SC_CONNECT_INVALID_HOST,
            Some(512),
            "host NQN is not on the subsystem's allow-list",
        ));
    }
    if sqsize == 0 || sqsize >= QUEUE_ENTRIES_MAX {
        // IPO 44: byte offset of SQSIZE in the SQE.
        return Err(ConnectRefusal {
            status: p::status(p::SCT_CMD, p::SC_CONNECT_INVALID_PARAM),
            dw0: 44 << 16,
            why: "SQSIZE out of range",
        });
    }
    let sq_flow_disabled = cattr & p::CATTR_DISABLE_SQ_FLOW != 0;
    if qid == 0 {
        if d.cntlid != 0xffff && d.cntlid != 0xfffe {
            return Err(refuse(
                p::SC_CONNECT_INVALID_PARAM,
                Some(16),
                "admin Connect must ask for a dynamic controller (CNTLID 0xFFFF)",
            ));
        }
        let mut ctrls = subsys.ctrls.lock().unwrap();
        ctrls.retain(|c| !c.dead.load(Ordering::Relaxed));
        let cntlid = (0..0xffefu32)
            .map(|_| {
                let c = subsys.next_cntlid.fetch_add(1, Ordering::Relaxed);
                if c == 0 || c >= 0xfff0 {
                    subsys.next_cntlid.store(2, Ordering::Relaxed);
                    1
                } else {
                    c
                }
            })
            .find(|c| !ctrls.iter().any(|x| x.cntlid == *c))
            .ok_or_else(|| refuse(p::SC_CONNECT_CTRL_BUSY, None, "no free controller id"))?;
        let ctrl = Arc::new(Ctrl {
            cntlid,
            subsys: subsys.clone(),
            discovery,
            hostnqn: d.hostnqn.clone(),
            hostid: d.hostid,
            kato_ms: AtomicU32::new(kato_ms),
            cc: AtomicU32::new(0),
            csts: AtomicU32::new(0),
            aec: AtomicU32::new(0),
            io_queues: AtomicU16::new(0),
            dead: AtomicBool::new(false),
            qids: Mutex::new(Vec::new()),
            aen_pending: AtomicU32::new(0),
            aen_masked: AtomicU32::new(0),
            changed_ns: Mutex::new(Vec::new()),
        });
        ctrls.push(ctrl.clone());
        return Ok(Connected {
            ctrl,
            qid,
            entries: sqsize + 1,
            sq_flow_disabled,
        });
    }
    if discovery {
        return Err(refuse(
            p::SC_CONNECT_INVALID_PARAM,
            None,
            "the discovery controller has no I/O queues",
        ));
    }
    let ctrl = subsys
        .ctrls
        .lock()
        .unwrap()
        .iter()
        .find(|c| c.cntlid == d.cntlid && !c.dead.load(Ordering::Relaxed))
        .cloned()
        .ok_or_else(|| {
            refuse(
                p::SC_CONNECT_INVALID_PARAM,
                Some(16),
                "no live controller with that CNTLID",
            )
        })?;
    if ctrl.hostnqn != d.hostnqn || ctrl.hostid != d.hostid {
        return Err(refuse(
            p::SC_CONNECT_INVALID_PARAM,
            Some(512),
            "host NQN or host ID differs from the admin queue's",
        ));
    }
    if ctrl.cc.load(Ordering::Relaxed) & 1 == 0 {
        return Err(ConnectRefusal {
            status: p::status(p::SCT_GENERIC, p::SC_CMD_SEQ_ERROR),
            dw0: 0,
            why: "I/O queue Connect before CC.EN was set",
        });
    }
    let granted = match ctrl.io_queues.load(Ordering::Relaxed) {
        0 => IO_QUEUES_MAX,
        n => n,
    };
    if qid > granted {
        return Err(ConnectRefusal {
            status: p::status(p::SCT_CMD, p::SC_CONNECT_INVALID_PARAM),
            dw0: 42 << 16,
            why: "queue id above the number of queues granted",
        });
    }
    let mut qids = ctrl.qids.lock().unwrap();
    if qids.contains(&qid) {
        return Err(ConnectRefusal {
            status: p::status(p::SCT_CMD, p::SC_CONNECT_INVALID_PARAM),
            dw0: 42 << 16,
            why: "queue id already connected",
        });
    }
    qids.push(qid);
    drop(qids);
    Ok(Connected {
        ctrl,
        qid,
        entries: sqsize + 1,
        sq_flow_disabled,
    })
}

impl Ctrl {
    /// Releases an I/O queue id (its connection closed).
    pub fn release_qid(&self, qid: u16) {
        self.qids.lock().unwrap().retain(|q| *q != qid);
    }

    /// The next asynchronous event to report on a held Async Event Request, as the
    /// completion's dword 0 (type Notice, information, log page), or `None`.
    /// Events the host disabled in Asynchronous Event Configuration are dropped;
    /// events of a kind already reported and not yet read stay pending.
    pub fn take_event(&self) -> Option<u32> {
        let pending = self.aen_pending.load(Ordering::Acquire);
        if pending == 0 {
            return None;
        }
        let aec = self.aec.load(Ordering::Relaxed);
        let masked = self.aen_masked.load(Ordering::Relaxed);
        for (bit, enable, info, lid) in [
            (AEN_NS_CHANGED, 1u32 << 8, 0x00u32, 0x04u32),
            (AEN_DISCOVERY_CHANGED, 1 << 31, 0xf0, 0x70),
        ] {
            if pending & bit == 0 {
                continue;
            }
            if aec & enable == 0 {
                self.aen_pending.fetch_and(!bit, Ordering::AcqRel);
                continue;
            }
            if masked & bit != 0 {
                continue;
            }
            self.aen_pending.fetch_and(!bit, Ordering::AcqRel);
            self.aen_masked.fetch_or(bit, Ordering::Relaxed);
            const NOTICE: u32 = 2;
            return Some(NOTICE | info << 8 | lid << 16);
        }
        None
    }

    /// The host read the log page of event kind `bit`: unmask it and, unless
    /// it asked to retain the event (RAE), forget what that read reported.
    fn event_log_read(&self, bit: u32, rae: bool) {
        if rae {
            return;
        }
        self.aen_pending.fetch_and(!bit, Ordering::AcqRel);
        self.aen_masked.fetch_and(!bit, Ordering::Relaxed);
    }

    /// Tears the controller down: its I/O queues close on their reactors.
    pub fn kill(&self) {
        self.dead.store(true, Ordering::Release);
        self.subsys
            .ctrls
            .lock()
            .unwrap()
            .retain(|c| c.cntlid != self.cntlid);
    }
}

/// The outcome of one admin (or Fabrics) command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminOutcome {
    /// Complete now with this status, result dwords, and `data_len` bytes of
    /// response data (sent to the host in C2HData).
    Done {
        status: u16,
        dw0: u32,
        dw1: u32,
        data_len: u32,
    },
    /// Hold the command (Async Event Request) until an event or teardown.
    HoldAer,
}

fn done(status: u16) -> AdminOutcome {
    AdminOutcome::Done {
        status,
        dw0: 0,
        dw1: 0,
        data_len: 0,
    }
}

fn ok_dw0(dw0: u32) -> AdminOutcome {
    AdminOutcome::Done {
        status: 0,
        dw0,
        dw1: 0,
        data_len: 0,
    }
}

fn ok_data(data_len: usize) -> AdminOutcome {
    AdminOutcome::Done {
        status: 0,
        dw0: 0,
        dw1: 0,
        data_len: data_len as u32,
    }
}

fn invalid_field() -> AdminOutcome {
    done(p::status(p::SCT_GENERIC, p::SC_INVALID_FIELD))
}

/// What an admin command may look at.
pub struct AdminCtx<'a> {
    pub reg: &'a Registry,
    pub ctrl: &'a Ctrl,
    /// Async Event Requests currently held on this admin queue.
    pub aers_held: usize,
    /// Largest transfer (MDTS) in bytes.
    pub max_transfer_bytes: u32,
}

/// Writes `s` into `b` padded with spaces (Identify SN/MN/FR fields).
fn put_ascii_padded(b: &mut [u8], s: &str) {
    b.fill(b' ');
    let n = s.len().min(b.len());
    b[..n].copy_from_slice(&s.as_bytes()[..n]);
}

fn put_str_nul(b: &mut [u8], s: &str) {
    b.fill(0);
    let n = s.len().min(b.len() - 1);
    b[..n].copy_from_slice(&s.as_bytes()[..n]);
}

/// Fabrics Property Get/Set and every admin command except Connect.
/// `data_in` is data the host sent (none for admin commands kiln supports);
/// `out` receives response data (at least 4096 bytes).
pub fn admin_command(ctx: &mut AdminCtx<'_>, sqe: &Sqe, out: &mut [u8]) -> AdminOutcome {
    let ctrl = ctx.ctrl;
    if sqe.opcode == p::OPC_FABRICS {
        return match sqe.fctype() {
            p::FCTYPE_PROPERTY_GET => property_get(ctrl, sqe),
            p::FCTYPE_PROPERTY_SET => property_set(ctrl, sqe),
            p::FCTYPE_DISCONNECT => done(p::STATUS_SUCCESS),
            p::FCTYPE_CONNECT => done(p::status(p::SCT_GENERIC, p::SC_CMD_SEQ_ERROR)),
            _ => done(p::status(p::SCT_GENERIC, p::SC_INVALID_OPCODE)),
        };
    }
    // Everything but Property Get/Set needs an enabled controller.
    if ctrl.csts.load(Ordering::Relaxed) & 1 == 0 {
        return done(p::status(p::SCT_GENERIC, p::SC_CMD_SEQ_ERROR));
    }
    match sqe.opcode {
        p::ADMIN_IDENTIFY => identify(ctx, sqe, out),
        p::ADMIN_GET_LOG_PAGE => get_log_page(ctx, sqe, out),
        p::ADMIN_SET_FEATURES => set_features(ctrl, sqe),
        p::ADMIN_GET_FEATURES => get_features(ctrl, sqe, out),
        p::ADMIN_KEEP_ALIVE => done(p::STATUS_SUCCESS),
        p::ADMIN_ASYNC_EVENT => {
            if ctx.aers_held >= AER_MAX {
                done(p::status(p::SCT_CMD, p::SC_AER_LIMIT))
            } else {
                AdminOutcome::HoldAer
            }
        }
        // Abort of anything but a held AER (handled by the queue): dw0 bit 0 set =
        // not aborted, allowed by the spec. I/O already handed to the volume engine
        // runs to completion.
        p::ADMIN_ABORT => ok_dw0(1),
        _ => done(p::status(p::SCT_GENERIC, p::SC_INVALID_OPCODE)),
    }
}

fn cap() -> u64 {
    let mqes = (QUEUE_ENTRIES_MAX - 1) as u64;
    let cqr = 1u64 << 16;
    let to = 30u64 << 24; // 15 s in 500 ms units
    let css_nvm = 1u64 << 37;
    mqes | cqr | to | css_nvm
}

const VS_1_3: u32 = 0x0001_0300;

fn property_get(ctrl: &Ctrl, sqe: &Sqe) -> AdminOutcome {
    let size8 = sqe.cdw10 & 1 != 0;
    let v: u64 = match (sqe.cdw11, size8) {
        (p::PROP_CAP, true) => cap(),
        (p::PROP_VS, false) => VS_1_3 as u64,
        (p::PROP_CC, false) => ctrl.cc.load(Ordering::Relaxed) as u64,
        (p::PROP_CSTS, false) => ctrl.csts.load(Ordering::Relaxed) as u64,
        _ => return invalid_field(),
    };
    AdminOutcome::Done {
        status: 0,
        dw0: v as u32,
        dw1: (v >> 32) as u32,
        data_len: 0,
    }
}

fn property_set(ctrl: &Ctrl, sqe: &Sqe) -> AdminOutcome {
    if sqe.cdw10 & 1 != 0 || sqe.cdw11 != p::PROP_CC {
        return invalid_field();
    }
    let new = sqe.cdw12;
    let old = ctrl.cc.swap(new, Ordering::Relaxed);
    let en = new & 1 != 0;
    let shn = (new >> 14) & 3;
    let mut csts = ctrl.csts.load(Ordering::Relaxed);
    if en && old & 1 == 0 {
        // IOSQES must be 6 (64 bytes) and IOCQES 4 (16 bytes) once enabled by a host
        // that sets them; CSS must be NVM (0).
        let iosqes = (new >> 16) & 0xf;
        let iocqes = (new >> 20) & 0xf;
        if (iosqes != 0 && iosqes != 6) || (iocqes != 0 && iocqes != 4) || (new >> 4) & 7 != 0 {
            csts |= 2; // CFS: the host asked for something we cannot do
        } else {
            csts |= 1;
        }
    } else if !en {
        csts &= !1;
    }
    if shn != 0 {
        csts = (csts & !(3 << 2)) | (2 << 2); // shutdown complete at once
    } else {
        csts &= !(3 << 2);
    }
    ctrl.csts.store(csts, Ordering::Relaxed);
    done(p::STATUS_SUCCESS)
}

fn namespaces(ctrl: &Ctrl) -> Vec<Namespace> {
    if ctrl.discovery {
        return Vec::new();
    }
    ctrl.subsys.namespaces.lock().unwrap().clone()
}

fn identify(ctx: &AdminCtx<'_>, sqe: &Sqe, out: &mut [u8]) -> AdminOutcome {
    let ctrl = ctx.ctrl;
    let cns = sqe.cdw10 as u8;
    let out = &mut out[..4096];
    out.fill(0);
    match cns {
        0x01 => {
            identify_ctrl(ctx, out);
            ok_data(4096)
        }
        0x00 if !ctrl.discovery => {
            let ns = namespaces(ctrl);
            if sqe.nsid == 0 || (sqe.nsid > NSID_MAX && sqe.nsid != 0xffff_ffff) {
                return done(p::status(p::SCT_GENERIC, p::SC_INVALID_NS));
            }
            if let Some(n) = ns.iter().find(|n| n.nsid == sqe.nsid) {
                put64(out, 0, n.blocks); // NSZE
                put64(out, 8, n.blocks); // NCAP
                let used = ctx.reg.volumes[n.volume as usize]
                    .map
                    .runs()
                    .iter()
                    .filter(|r| r.2.is_some())
                    .map(|r| r.1)
                    .sum::<u64>()
                    * ctx.reg.volumes[n.volume as usize].map.granule_bytes
                    / LBA_BYTES as u64;
                put64(out, 16, used.min(n.blocks)); // NUSE
                out[24] = 1 | (1 << 3); // NSFEAT: thin provisioning, NGUID/EUI64 never reused
                out[25] = 0; // NLBAF: one format
                out[26] = 0; // FLBAS: format 0
                out[30] = 1; // NMIC: may be shared by controllers
                out[33] = 0; // DLFEAT
                out[104..120].copy_from_slice(&n.uuid); // NGUID
                put32(out, 128, LBA_SHIFT << 16); // LBAF0: LBADS 12, no metadata
            }
            // An inactive NSID gets a zeroed structure.
            ok_data(4096)
        }
        0x02 if !ctrl.discovery => {
            let ns = namespaces(ctrl);
            if sqe.nsid >= 0xffff_fffe {
                return done(p::status(p::SCT_GENERIC, p::SC_INVALID_NS));
            }
            for (i, n) in ns
                .iter()
                .filter(|n| n.nsid > sqe.nsid)
                .take(1024)
                .enumerate()
            {
                put32(out, i * 4, n.nsid);
            }
            ok_data(4096)
        }
        0x03 if !ctrl.discovery => {
            let ns = namespaces(ctrl);
            let Some(n) = ns.iter().find(|n| n.nsid == sqe.nsid) else {
                return done(p::status(p::SCT_GENERIC, p::SC_INVALID_NS));
            };
            // NGUID (type 2), UUID (type 3), CSI (type 4) = NVM.
            out[0] = 2;
            out[1] = 16;
            out[4..20].copy_from_slice(&n.uuid);
            out[20] = 3;
            out[21] = 16;
            out[24..40].copy_from_slice(&n.uuid);
            out[40] = 4;
            out[41] = 1;
            out[44] = 0;
            ok_data(4096)
        }
        // I/O command set specific structures for the NVM command set (CSI 0): all
        // limits zero ("no limit"), as the Linux host asks for them.
        0x06 if !ctrl.discovery && sqe.cdw11 >> 24 == 0 => ok_data(4096),
        0x05 if !ctrl.discovery && sqe.cdw11 >> 24 == 0 => {
            if !namespaces(ctrl).iter().any(|n| n.nsid == sqe.nsid) {
                return done(p::status(p::SCT_GENERIC, p::SC_INVALID_NS));
            }
            ok_data(4096)
        }
        _ => invalid_field(),
    }
}

fn identify_ctrl(ctx: &AdminCtx<'_>, out: &mut [u8]) {
    let ctrl = ctx.ctrl;
    let s = &ctrl.subsys;
    put16(out, 0, 0x1b36); // VID (QEMU/Red Hat's PCI id, as emulated targets use)
    put16(out, 2, 0x1af4); // SSVID
    put_ascii_padded(&mut out[4..24], if ctrl.discovery { "" } else { &s.serial });
    put_ascii_padded(
        &mut out[24..64],
        if ctrl.discovery {
            "kiln discovery"
        } else {
            &s.model
        },
    );
    put_ascii_padded(&mut out[64..72], env!("CARGO_PKG_VERSION"));
    out[72] = 6; // RAB
    out[76] = if ctrl.discovery { 0 } else { 1 << 1 }; // CMIC: several controllers
    let mdts = (ctx.max_transfer_bytes / 4096).max(1).ilog2();
    out[77] = mdts as u8; // MDTS in 4 KiB pages (CAP.MPSMIN)
    put16(out, 78, ctrl.cntlid);
    put32(out, 80, VS_1_3);
    put32(out, 92, if ctrl.discovery { 1 << 31 } else { 1 << 8 }); // OAES
    out[111] = if ctrl.discovery { 2 } else { 1 }; // CNTRLTYPE: discovery / I/O
    put16(out, 256, 0); // OACS: no optional admin commands
    out[258] = 3; // ACL: 4 concurrent Aborts
    out[259] = (AER_MAX - 1) as u8; // AERL
    out[260] = 1 << 1 | 1; // FRMW: one slot, read-only
    out[261] = 1 << 1 | 1 << 2; // LPA: effects log, extended data
    out[262] = 0; // ELPE: one error log entry
    put16(out, 266, 0x0157); // WCTEMP 343 K
    put16(out, 268, 0x0175); // CCTEMP 373 K
    put16(out, 320, KAS_100MS); // KAS
    if !ctrl.discovery {
        out[512] = 0x66; // SQES
        out[513] = 0x44; // CQES
    }
    put16(out, 514, QUEUE_ENTRIES_MAX); // MAXCMD
    put32(out, 516, if ctrl.discovery { 0 } else { NSID_MAX }); // NN
                                                                // ONCS: Dataset Management (bit 2), Write Zeroes (bit 3).
    put16(out, 520, if ctrl.discovery { 0 } else { 1 << 2 | 1 << 3 });
    out[525] = if ctrl.discovery { 0 } else { 1 }; // VWC present
                                                   // SGLS: SGLs supported (bit 0), SGL offset / in-capsule data (bit 20).
    put32(out, 536, 1 | 1 << 20);
    put32(out, 540, if ctrl.discovery { 0 } else { NSID_MAX }); // MNAN
    put_str_nul(&mut out[768..1024], &s.nqn); // SUBNQN
                                              // Fabrics: IOCCSZ and IORCSZ in 16-byte units, ICDOFF 0, FCATT dynamic, MSDBD 1.
    put32(out, 1792, ((p::SQE_BYTES as u32) + IN_CAPSULE_BYTES) / 16);
    put32(out, 1796, (p::CQE_BYTES / 16) as u32);
    put16(out, 1800, 0);
    out[1802] = 0;
    out[1803] = 1;
    put16(out, 1804, 1); // OFCS: Disconnect supported
                         // Power state 0: 25 W max.
    put16(out, 2048, 2500);
}

fn get_log_page(ctx: &AdminCtx<'_>, sqe: &Sqe, out: &mut [u8]) -> AdminOutcome {
    let lid = sqe.cdw10 as u8;
    let numd = ((sqe.cdw11 as u64 & 0xffff) << 16 | (sqe.cdw10 >> 16) as u64) + 1;
    let len = numd * 4;
    let offset = sqe.cdw12 as u64 | (sqe.cdw13 as u64) << 32;
    if len > out.len() as u64 || len > ctx.max_transfer_bytes as u64 {
        return invalid_field();
    }
    let len = len as usize;
    let ctrl = ctx.ctrl;
    // Build the whole page, then copy the requested window.
    let mut page: Vec<u8>;
    match lid {
        0x70 if ctrl.discovery => {
            page = discovery_log(ctx.reg, &ctrl.hostnqn);
            ctrl.event_log_read(AEN_DISCOVERY_CHANGED, sqe.cdw10 & (1 << 15) != 0);
        }
        0x01 => page = vec![0; 64],
        0x02 if !ctrl.discovery => {
            page = vec![0; 512];
            page[3] = 100; // available spare
            page[4] = 10; // threshold
            put16(&mut page, 1, 293); // composite temperature, Kelvin
            let (mut rd, mut wr, mut rios, mut wios) = (0u64, 0u64, 0u64, 0u64);
            for n in namespaces(ctrl) {
                let st = &ctx.reg.volumes[n.volume as usize].stats;
                rd += st.read_bytes.load(Ordering::Relaxed);
                wr += st.write_bytes.load(Ordering::Relaxed);
                rios += st.read_ios.load(Ordering::Relaxed);
                wios += st.write_ios.load(Ordering::Relaxed);
            }
            put64(&mut page, 32, rd.div_ceil(512_000)); // data units read (1000 x 512 B)
            put64(&mut page, 48, wr.div_ceil(512_000));
            put64(&mut page, 64, rios);
            put64(&mut page, 80, wios);
        }
        0x03 => {
            page = vec![0; 512];
            page[0] = 1; // active slot 1
            put_ascii_padded(&mut page[8..16], env!("CARGO_PKG_VERSION"));
        }
        0x04 if !ctrl.discovery => {
            page = vec![0; 4096];
            let rae = sqe.cdw10 & (1 << 15) != 0;
            let mut list = ctrl.changed_ns.lock().unwrap();
            for (i, nsid) in list.iter().enumerate() {
                put32(&mut page, i * 4, *nsid);
            }
            if !rae {
                list.clear();
            }
            ctrl.event_log_read(AEN_NS_CHANGED, rae);
        }
        0x05 if !ctrl.discovery => {
            page = vec![0; 4096];
            for opc in [
                p::ADMIN_GET_LOG_PAGE,
                p::ADMIN_IDENTIFY,
                p::ADMIN_ABORT,
                p::ADMIN_SET_FEATURES,
                p::ADMIN_GET_FEATURES,
                p::ADMIN_ASYNC_EVENT,
                p::ADMIN_KEEP_ALIVE,
            ] {
                put32(&mut page, opc as usize * 4, 1);
            }
            for (opc, lbcc) in [
                (p::IO_FLUSH, false),
                (p::IO_WRITE, true),
                (p::IO_READ, false),
                (p::IO_WRITE_ZEROES, true),
                (p::IO_DSM, true),
            ] {
                put32(
                    &mut page,
                    1024 + opc as usize * 4,
                    1 | if lbcc { 1 << 1 } else { 0 },
                );
            }
        }
        _ => return done(p::status(p::SCT_CMD, p::SC_INVALID_LOG_PAGE)),
    }
    if offset > page.len() as u64 || offset % 4 != 0 {
        return invalid_field();
    }
    let offset = offset as usize;
    out[..len].fill(0);
    let n = (page.len() - offset).min(len);
    out[..n].copy_from_slice(&page[offset..offset + n]);
    ok_data(len)
}

/// Discovery log page 0x70: one 1024-byte entry per (subsystem, listener) the host may use.
pub fn discovery_log(reg: &Registry, hostnqn: &str) -> Vec<u8> {
    let subs = reg.subsystems.lock().unwrap().clone();
    let mut entries = Vec::new();
    for s in subs.iter().filter(|s| s.host_allowed(hostnqn)) {
        for (portid, a) in s.listeners.lock().unwrap().iter().enumerate() {
            let mut e = vec![0u8; 1024];
            e[0] = 3; // TRTYPE TCP
            e[1] = if a.is_ipv4() { 1 } else { 2 }; // ADRFAM
            e[2] = 2; // SUBTYPE: NVMe subsystem
            e[3] = 0x02; // TREQ: secure channel not required
            put16(&mut e, 4, portid as u16 + 1);
            put16(&mut e, 6, 0xffff); // dynamic controllers
            put16(&mut e, 8, 32); // ASQSZ
            put_ascii_padded(&mut e[32..64], &a.port().to_string());
            put_str_nul(&mut e[256..512], &s.nqn);
            put_ascii_padded(&mut e[512..768], &a.ip().to_string());
            e[768] = 0; // TSAS: SECTYPE none
            entries.push(e);
        }
    }
    let mut page = vec![0u8; 1024];
    put64(&mut page, 0, reg.genctr.load(Ordering::Relaxed));
    put64(&mut page, 8, entries.len() as u64);
    for e in entries {
        page.extend_from_slice(&e);
    }
    page
}

const FID_VWC: u8 = 0x06;
const FID_NUM_QUEUES: u8 = 0x07;
const FID_ASYNC_EVENT_CONFIG: u8 = 0x0b;
const FID_KATO: u8 = 0x0f;
const FID_HOST_ID: u8 = 0x81;

fn set_features(ctrl: &Ctrl, sqe: &Sqe) -> AdminOutcome {
    if sqe.cdw10 & (1 << 31) != 0 {
        return done(p::status(p::SCT_CMD, p::SC_FEATURE_NOT_SAVEABLE));
    }
    match sqe.cdw10 as u8 {
        FID_NUM_QUEUES if !ctrl.discovery => {
            let nsqr = sqe.cdw11 & 0xffff;
            let ncqr = sqe.cdw11 >> 16;
            if nsqr == 0xffff || ncqr == 0xffff {
                return invalid_field();
            }
            let granted = (nsqr.max(ncqr) + 1).min(IO_QUEUES_MAX as u32);
            ctrl.io_queues.store(granted as u16, Ordering::Relaxed);
            ok_dw0((granted - 1) | (granted - 1) << 16)
        }
        FID_KATO => {
            ctrl.kato_ms.store(sqe.cdw11, Ordering::Relaxed);
            done(p::STATUS_SUCCESS)
        }
        FID_ASYNC_EVENT_CONFIG => {
            ctrl.aec.store(sqe.cdw11, Ordering::Relaxed);
            done(p::STATUS_SUCCESS)
        }
        // The volume engine always writes through to the tiers and Flush flushes
        // them; the cache stays reported as enabled.
        FID_VWC if !ctrl.discovery => done(p::STATUS_SUCCESS),
        // On fabrics the host identifier comes from Connect.
        FID_HOST_ID => done(p::status(p::SCT_GENERIC, p::SC_CMD_SEQ_ERROR)),
        _ => invalid_field(),
    }
}

fn get_features(ctrl: &Ctrl, sqe: &Sqe, out: &mut [u8]) -> AdminOutcome {
    match sqe.cdw10 as u8 {
        FID_NUM_QUEUES if !ctrl.discovery => {
            let g = match ctrl.io_queues.load(Ordering::Relaxed) {
                0 => IO_QUEUES_MAX,
                n => n,
            } as u32;
            ok_dw0((g - 1) | (g - 1) << 16)
        }
        FID_KATO => ok_dw0(ctrl.kato_ms.load(Ordering::Relaxed)),
        FID_ASYNC_EVENT_CONFIG => ok_dw0(ctrl.aec.load(Ordering::Relaxed)),
        FID_VWC if !ctrl.discovery => ok_dw0(1),
        FID_HOST_ID => {
            if sqe.cdw11 & 1 == 0 {
                // 64-bit host identifiers are not used on fabrics.
                return invalid_field();
            }
            out[..16].copy_from_slice(&ctrl.hostid);
            ok_data(16)
        }
        _ => invalid_field(),
    }
}
