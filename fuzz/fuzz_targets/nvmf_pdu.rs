//! Fuzzes the NVMe/TCP PDU decoder (`kiln::target::nvmf_proto::decode`) as both the target and
//! the host see a byte stream, with and without digests.
//!
//! Input layout: `[mode] [stream...]`. Bit 0 of `mode` picks the role, bits 1-2 the digests.
//! The stream is decoded PDU after PDU the way the connections do it: a header, then its data
//! (skipped, digest checked), then the next header. Checks: no panic; a decoded PDU's parts lie
//! inside PLEN; data never exceeds the limits; re-encoding a decoded CapsuleCmd, R2T or data
//! header gives back the same header bytes; error codes map to a defined FES.
//!
//! As the target, every whole CapsuleCmd then goes to the controller code the admin queue runs
//! (`ctrl::connect` with its in-capsule data, `ctrl::admin_command` otherwise) on a subsystem
//! with one namespace. Bits 3-4 of `mode` start from an enabled I/O or discovery controller
//! (so the fuzzer reaches Identify, Get Log Page and the features at once), bit 5 lets any
//! host connect, and bit 6 replaces a Connect's data by a well-formed one chosen by its first
//! bytes. Checks: no panic; a refused Connect has a status and a reason; a command completes
//! with data only on success and never more than the buffer or MDTS.

#![no_main]

use std::net::SocketAddr;
use std::sync::Arc;

use kiln::target::nvmf::ctrl::{self, AdminCtx, AdminOutcome, Ctrl, Registry};
use kiln::target::nvmf_proto::{self as p, ConnectData, Digests, Limits, Pdu, Role, Sqe};
use kiln::volume::Volume;
use libfuzzer_sys::fuzz_target;

const LIMITS: Limits = Limits {
    in_capsule_data_max: 8192,
    data_pdu_max: 128 << 10,
};

const NQN: &str = "nqn.2024-01.io.kiln:fuzz";
const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:fuzz";
/// Response buffer and MDTS of the admin queue.
const OUT_BYTES: usize = 64 << 10;

/// The controller side of one connection: a subsystem, and the controller once connected.
struct Controller {
    reg: Registry,
    local: SocketAddr,
    ctrl: Option<Arc<Ctrl>>,
    /// Every controller an admin Connect created, killed at the end as the server does when
    /// the admin queue closes (a subsystem and its controllers point at each other).
    admins: Vec<Arc<Ctrl>>,
    out: Vec<u8>,
    /// Replace a Connect's data by a well-formed one (mode bit 6).
    good_connect: bool,
}

impl Controller {
    fn new(mode: u8) -> Controller {
        let volume = Arc::new(Volume::new(0, "v0", 64 << 20, 1 << 20));
        let reg = Registry::new(Arc::new(vec![volume]));
        let local: SocketAddr = "127.0.0.1:4420".parse().unwrap();
        reg.create_subsystem(NQN, "FUZZ0001", "kiln fuzz", mode & 32 != 0)
            .unwrap();
        reg.add_ns(NQN, "v0", None).unwrap();
        reg.add_listener(NQN, local).unwrap();
        reg.add_host(NQN, HOST).unwrap();
        let mut c = Controller {
            reg,
            local,
            ctrl: None,
            admins: Vec::new(),
            out: vec![0; OUT_BYTES],
            good_connect: false,
        };
        if mode & 24 != 0 {
            let discovery = mode & 16 != 0;
            let sqe = Sqe {
                opcode: p::OPC_FABRICS,
                nsid: p::FCTYPE_CONNECT as u32,
                cdw11: 31,
                ..Default::default()
            };
            let data = connect_data(if discovery { 0 } else { 1 }, 0xffff);
            c.command(&sqe, &data);
            let enable = Sqe {
                opcode: p::OPC_FABRICS,
                nsid: p::FCTYPE_PROPERTY_SET as u32,
                cdw11: p::PROP_CC,
                cdw12: 1 | 6 << 16 | 4 << 20,
                ..Default::default()
            };
            c.command(&enable, &[]);
            assert!(c.ctrl.is_some(), "the harness's own Connect failed");
        }
        c.good_connect = mode & 64 != 0;
        c
    }

    /// Runs one command as the admin queue does: Connect, or any other admin command.
    fn command(&mut self, sqe: &Sqe, data: &[u8]) {
        if sqe.opcode == p::OPC_FABRICS && sqe.fctype() == p::FCTYPE_CONNECT {
            let good;
            let data = if self.good_connect && data.len() >= 3 {
                good = connect_data(data[0], u16::from_le_bytes([data[1], data[2]]));
                &good[..]
            } else {
                data
            };
            match ctrl::connect(&self.reg, sqe, data, self.local) {
                Ok(c) => {
                    assert!(c.entries >= 2 && c.entries <= ctrl::QUEUE_ENTRIES_MAX);
                    if c.qid == 0 {
                        self.admins.push(c.ctrl.clone());
                        self.ctrl = Some(c.ctrl);
                    }
                }
                Err(r) => assert!(r.status != 0 && !r.why.is_empty(), "{r:?}"),
            }
            return;
        }
        let Some(ctrl) = self.ctrl.clone() else {
            return;
        };
        let mut ctx = AdminCtx {
            reg: &self.reg,
            ctrl: &ctrl,
            aers_held: 0,
            max_transfer_bytes: OUT_BYTES as u32,
        };
        match ctrl::admin_command(&mut ctx, sqe, &mut self.out) {
            AdminOutcome::Done {
                status, data_len, ..
            } => {
                assert!(
                    data_len as usize <= OUT_BYTES,
                    "{data_len} bytes of response"
                );
                assert!(status == 0 || data_len == 0, "data with status {status:#x}");
            }
            AdminOutcome::HoldAer => {}
        }
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        for c in &self.admins {
            c.kill();
        }
    }
}

/// Connect data for one of a few subsystem and host NQNs (`pick` chooses).
fn connect_data(pick: u8, cntlid: u16) -> [u8; p::CONNECT_DATA_BYTES] {
    let subnqn = [p::DISCOVERY_NQN, NQN, "nqn.2024-01.io.kiln:other", ""][pick as usize & 3];
    let hostnqn = [HOST, "nqn.2014-08.org.nvmexpress:uuid:stranger"][pick as usize >> 2 & 1];
    let mut b = [0u8; p::CONNECT_DATA_BYTES];
    ConnectData {
        hostid: [pick; 16],
        cntlid,
        subnqn: subnqn.into(),
        hostnqn: hostnqn.into(),
    }
    .encode(&mut b);
    b
}

fuzz_target!(|data: &[u8]| {
    let [mode, stream @ ..] = data else {
        return;
    };
    let role = if mode & 1 == 0 {
        Role::Target
    } else {
        Role::Host
    };
    let d = Digests {
        header: mode & 2 != 0,
        data: mode & 4 != 0,
    };
    let mut controller = (role == Role::Target).then(|| Controller::new(*mode));
    let mut rest = stream;
    loop {
        // Every prefix of an undecodable header must say "need more" or fail the same way.
        let head = match p::decode(rest, role, d, &LIMITS) {
            Ok(None) => {
                assert!(rest.len() < p::HEADER_BYTES_MAX + p::TERM_REQ_DATA_MAX);
                break;
            }
            Err(e) => {
                assert!((1..=6).contains(&e.fes()), "{e}");
                assert!(!e.to_string().is_empty());
                break;
            }
            Ok(Some(h)) => h,
        };
        let total = head.total_bytes as usize;
        let end_of_data = head.data_offset as usize + head.data_bytes as usize;
        let dd = if head.data_digest { p::DIGEST_BYTES } else { 0 };
        assert!(head.data_offset as usize >= p::COMMON_HEADER_BYTES);
        assert_eq!(
            if head.data_bytes > 0 {
                end_of_data + dd
            } else {
                total
            },
            total
        );
        assert!(head.data_bytes <= LIMITS.data_pdu_max.max(LIMITS.in_capsule_data_max));
        let hlen = rest[2] as usize;
        let hd = if d.header && rest[0] > p::PDU_C2H_TERM_REQ {
            p::DIGEST_BYTES
        } else {
            0
        };
        let mut again = [0u8; 160];
        match head.pdu {
            Pdu::CapsuleCmd(sqe) => {
                let n = p::encode_capsule_cmd(&mut again, &sqe, head.data_bytes as usize, d);
                assert_eq!(n, hlen + hd);
                // Sqe keeps the fields kiln uses, not MPTR (SQE bytes 16-23) nor the reserved SGL
                // bytes 36-38: the round trip holds for what it keeps.
                let sqe_again: &[u8; p::SQE_BYTES] = again[8..72].try_into().unwrap();
                assert_eq!(p::Sqe::parse(sqe_again), sqe, "SQE round trip");
                if let (Some(c), Some(data)) = (controller.as_mut(), rest.get(..end_of_data)) {
                    c.command(&sqe, &data[head.data_offset as usize..]);
                }
            }
            Pdu::R2T(r) => {
                let n = p::encode_r2t(&mut again, &r, d);
                assert_eq!(&again[8..20], &rest[8..20]);
                assert_eq!(n, hlen + hd);
            }
            Pdu::H2CData(h) | Pdu::C2HData(h) => {
                assert_eq!(h.datal, head.data_bytes);
                let n = p::encode_data_hdr(&mut again, rest[0], 0, &h, 0, d);
                assert_eq!(&again[8..20], &rest[8..20]);
                assert_eq!(n, hlen + hd);
            }
            _ => {}
        }
        if rest.len() < total {
            break;
        }
        if head.data_digest {
            let got = p::le32(rest, end_of_data);
            let _ = got == p::digest(&rest[head.data_offset as usize..end_of_data]);
        }
        rest = &rest[total..];
    }
});
