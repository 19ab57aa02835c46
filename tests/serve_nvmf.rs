//! End-to-end tests of `kiln serve` over NVMe/TCP.
//!
//! - kiln's own `nvmf://` initiator runs `kiln bench -w verify` against kiln's target, with
//!   header and data digests off and on, small (in-capsule) and large (R2T) writes.
//! - A raw client built on `kiln::target::nvmf_proto` sends malformed PDUs, bad opcodes, an
//!   unlisted host NQN and an out-of-range LBA, and checks the exact NVMe status or TermReq,
//!   while a second, healthy I/O queue keeps working.
//! - Discovery (log page 0x70), keep-alive timeout teardown, and the `nvmf_*` RPCs.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use kiln::target::nvmf_proto::{self as p, Cqe, Digests, Limits, Pdu, Role, Sqe};
use serde_json::Value;

const NQN: &str = "nqn.2024-01.io.kiln:test";
const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:11111111-2222-3333-4444-555555555555";
const INITIATOR: &str = "nqn.2024-01.io.kiln:initiator";

struct Target {
    k: Kiln,
    port: u16,
}

fn start(tag: &str) -> Target {
    let port = free_port();
    let mut opts = Opts {
        volume: "256MiB",
        ..Opts::default()
    };
    opts.reactor = format!(
        "{}\n[[subsystem]]\nnqn = \"{NQN}\"\nserial = \"KILNTEST\"\nmodel = \"kiln test volume\"\n\
         namespaces = [\"vol0\"]\nlisteners = [\"127.0.0.1:{port}\"]\n\
         allowed_hosts = [\"{HOST}\", \"{INITIATOR}\"]\n",
        opts.reactor
    );
    let k = Kiln::start(tag, opts);
    Target { k, port }
}

fn bench(t: &Target, args: &[&str]) -> Value {
    let out = Command::new(KILN)
        .arg("bench")
        .args(args)
        .arg("--json")
        .output()
        .expect("run kiln bench");
    assert!(
        out.status.success(),
        "kiln bench {args:?} failed:\n{}\n{}\n--- server log ---\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        t.k.log_text()
    );
    serde_json::from_slice(&out.stdout).expect("bench JSON")
}

#[test]
fn kiln_initiator_verifies_through_kiln_target_with_and_without_digests() {
    let t = start("nvmf-verify");
    // The bench runs on the other core than the server where there are two.
    let core = if std::thread::available_parallelism().map_or(1, |n| n.get()) > 1 {
        "1"
    } else {
        "0"
    };
    for (query, io_size) in [
        ("", "4k"),
        ("?hdgst=1&ddgst=1", "4k"),
        ("?hdgst=1&ddgst=1", "64k"),
        ("", "128k"),
    ] {
        let dev = format!("nvmf://127.0.0.1:{}/{NQN}/1{query}", t.port);
        let v = bench(
            &t,
            &[
                "--device", &dev, "-w", "verify", "-o", io_size, "-q", "16", "-t", "2", "--cores",
                core,
            ],
        );
        let job = &v["jobs"][0];
        let (w, r) = (
            job["write"]["total_ios"].as_u64().unwrap(),
            job["read"]["total_ios"].as_u64().unwrap(),
        );
        assert_eq!(job["verify_mismatches"], 0, "{dev} {io_size}: {v}");
        assert_eq!(job["read"]["errors"], 0, "{dev} {io_size}: {v}");
        assert_eq!(job["write"]["errors"], 0, "{dev} {io_size}: {v}");
        assert!(
            w > 100 && r > 100,
            "{dev} {io_size}: too little I/O verified: {w} writes, {r} reads"
        );
        eprintln!("verify {dev} {io_size}: {w} writes, {r} reads verified");
    }
    // The data went through the volume: its counters saw it.
    let st = t.k.rpc("volume_iostat", Some(r#"{"volume":"vol0"}"#));
    assert!(st[0]["write_ios"].as_u64().unwrap() > 400, "{st}");
}

// ---------------------------------------------------------------------------------------------
// A raw NVMe/TCP host.
// ---------------------------------------------------------------------------------------------

struct Raw {
    s: TcpStream,
    d: Digests,
    cid: u16,
}

const LIM: Limits = Limits {
    in_capsule_data_max: 0,
    data_pdu_max: 16 << 20,
};

/// One PDU as received: header, data, and what the codec made of it.
struct Got {
    pdu: Pdu,
    data: Vec<u8>,
}

impl Raw {
    fn tcp(port: u16) -> Raw {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.set_nodelay(true).unwrap();
        Raw {
            s,
            d: Digests::default(),
            cid: 0,
        }
    }

    fn ic(port: u16, d: Digests) -> Raw {
        let mut r = Raw::tcp(port);
        let mut b = [0u8; 128];
        p::encode_icreq(&mut b, 0, d, 0);
        r.s.write_all(&b).unwrap();
        match r.recv().expect("ICResp").pdu {
            Pdu::IcResp(ic) => {
                assert_eq!(ic.pfv, 0);
                assert_eq!(ic.cpda, 0);
                assert_eq!(ic.digests, d, "digests echoed");
                assert!(ic.maxh2cdata >= 4096);
            }
            other => panic!("expected ICResp, got {other:?}"),
        }
        r.d = d;
        r
    }

    /// Reads one PDU; None when the target closed the connection.
    fn recv(&mut self) -> Option<Got> {
        let mut h = [0u8; 8];
        match self.s.read_exact(&mut h) {
            Ok(()) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
                ) =>
            {
                return None
            }
            Err(e) => panic!("recv: {e}"),
        }
        let plen = u32::from_le_bytes(h[4..8].try_into().unwrap()) as usize;
        let mut all = h.to_vec();
        all.resize(plen, 0);
        self.s.read_exact(&mut all[8..]).unwrap();
        let head = p::decode(&all, Role::Host, self.d, &LIM).unwrap().unwrap();
        let data = all[head.data_offset as usize..][..head.data_bytes as usize].to_vec();
        if head.data_digest {
            let got = p::le32(&all, (head.data_offset + head.data_bytes) as usize);
            assert_eq!(got, p::digest(&data), "C2H data digest");
        }
        Some(Got {
            pdu: head.pdu,
            data,
        })
    }

    fn expect_closed(&mut self) {
        let mut b = [0u8; 1];
        match self.s.read(&mut b) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("expected the target to close the connection, got {other:?}"),
        }
    }

    fn expect_term(&mut self, fes: u16, fei: u32) {
        match self.recv().map(|g| g.pdu) {
            Some(Pdu::C2HTermReq(t)) => {
                assert_eq!((t.fes, t.fei), (fes, fei), "TermReq FES/FEI");
            }
            other => panic!("expected C2HTermReq, got {other:?}"),
        }
        self.expect_closed();
    }

    fn send_capsule(&mut self, mut sqe: Sqe, data: &[u8]) -> u16 {
        self.cid = self.cid.wrapping_add(1);
        sqe.cid = self.cid;
        if !data.is_empty() {
            sqe.sgl_type = p::SGL_DATA_BLOCK_OFFSET;
            sqe.sgl_len = data.len() as u32;
        } else if sqe.sgl_type == 0 {
            sqe.sgl_type = p::SGL_TRANSPORT_DATA_BLOCK;
        }
        let mut b = vec![0u8; 128];
        let n = p::encode_capsule_cmd(&mut b, &sqe, data.len(), self.d);
        b.truncate(n);
        b.extend_from_slice(data);
        if self.d.data && !data.is_empty() {
            b.extend_from_slice(&p::digest(data).to_le_bytes());
        }
        self.s.write_all(&b).unwrap();
        self.cid
    }

    /// Runs a command; returns the CQE and any C2H data.
    fn cmd(&mut self, sqe: Sqe, data: &[u8]) -> (Cqe, Vec<u8>) {
        let cid = self.send_capsule(sqe, data);
        let mut got = Vec::new();
        loop {
            let g = self.recv().expect("response");
            match g.pdu {
                Pdu::CapsuleResp(c) => {
                    assert_eq!(c.cid, cid, "CID echoed");
                    return (c, got);
                }
                Pdu::C2HData(d) => {
                    assert_eq!(d.cccid, cid);
                    assert_eq!(d.datao as usize, got.len(), "C2HData in order");
                    got.extend_from_slice(&g.data);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    fn connect(&mut self, qid: u16, cntlid: u16, hostnqn: &str, kato_ms: u32) -> Cqe {
        let sqe = Sqe {
            opcode: p::OPC_FABRICS,
            nsid: p::FCTYPE_CONNECT as u32,
            cdw10: (qid as u32) << 16,
            cdw11: 31,
            cdw12: kato_ms,
            ..Default::default()
        };
        let mut data = [0u8; 1024];
        p::ConnectData {
            hostid: [7; 16],
            cntlid,
            subnqn: if qid == 0 && cntlid == 0xfffe {
                p::DISCOVERY_NQN.into()
            } else {
                NQN.into()
            },
            hostnqn: hostnqn.into(),
        }
        .encode(&mut data);
        self.cmd(sqe, &data).0
    }

    fn prop_set_cc(&mut self, cc: u32) -> Cqe {
        let sqe = Sqe {
            opcode: p::OPC_FABRICS,
            nsid: p::FCTYPE_PROPERTY_SET as u32,
            cdw11: p::PROP_CC,
            cdw12: cc,
            ..Default::default()
        };
        self.cmd(sqe, &[]).0
    }

    fn prop_get(&mut self, offset: u32, eight: bool) -> u64 {
        let sqe = Sqe {
            opcode: p::OPC_FABRICS,
            nsid: p::FCTYPE_PROPERTY_GET as u32,
            cdw10: eight as u32,
            cdw11: offset,
            ..Default::default()
        };
        let (c, _) = self.cmd(sqe, &[]);
        assert_eq!(c.status, 0);
        c.dw0 as u64 | (c.dw1 as u64) << 32
    }

    fn read(&mut self, slba: u64, nlb: u32) -> (Cqe, Vec<u8>) {
        self.cmd(
            Sqe {
                opcode: p::IO_READ,
                nsid: 1,
                cdw10: slba as u32,
                cdw11: (slba >> 32) as u32,
                cdw12: nlb - 1,
                sgl_type: p::SGL_TRANSPORT_DATA_BLOCK,
                sgl_len: nlb * 4096,
                ..Default::default()
            },
            &[],
        )
    }

    /// Sends a Write of `blocks` 4 KiB blocks at `slba` whose data comes by R2T (transport
    /// SGL) and returns its CID and the R2T, checked to ask for all of it at offset 0.
    fn write_by_r2t(&mut self, slba: u64, blocks: u32) -> (u16, p::R2t) {
        let cid = self.send_capsule(
            Sqe {
                opcode: p::IO_WRITE,
                nsid: 1,
                cdw10: slba as u32,
                cdw11: (slba >> 32) as u32,
                cdw12: blocks - 1,
                sgl_type: p::SGL_TRANSPORT_DATA_BLOCK,
                sgl_len: blocks * 4096,
                ..Default::default()
            },
            &[],
        );
        let r2t = match self.recv().expect("R2T").pdu {
            Pdu::R2T(r) => r,
            other => panic!("expected R2T, got {other:?}"),
        };
        assert_eq!((r2t.cccid, r2t.r2to, r2t.r2tl), (cid, 0, blocks * 4096));
        (cid, r2t)
    }

    fn write(&mut self, slba: u64, data: &[u8]) -> Cqe {
        let nlb = data.len() as u32 / 4096;
        self.cmd(
            Sqe {
                opcode: p::IO_WRITE,
                nsid: 1,
                cdw10: slba as u32,
                cdw11: (slba >> 32) as u32,
                cdw12: nlb - 1,
                ..Default::default()
            },
            data,
        )
        .0
    }
}

/// An admin queue (controller enabled) plus one I/O queue.
fn controller(port: u16, d: Digests) -> (Raw, Raw, u16) {
    let mut a = Raw::ic(port, d);
    let c = a.connect(0, 0xffff, HOST, 0);
    assert_eq!(c.status, 0, "admin Connect");
    let cntlid = c.dw0 as u16;
    assert_eq!(a.prop_set_cc(1 | 6 << 16 | 4 << 20).status, 0);
    assert_eq!(
        a.prop_get(p::PROP_CSTS, false) & 1,
        1,
        "CSTS.RDY after CC.EN"
    );
    let mut io = Raw::ic(port, d);
    let c = io.connect(1, cntlid, HOST, 0);
    assert_eq!(c.status, 0, "I/O queue Connect");
    (a, io, cntlid)
}

fn sc(c: &Cqe) -> (u8, u8) {
    p::status_parts(c.status)
}

#[test]
fn raw_client_protocol_behaviour_and_bad_input() {
    let t = start("nvmf-raw");
    let port = t.port;
    for d in [
        Digests::default(),
        Digests {
            header: true,
            data: true,
        },
    ] {
        let (mut admin, mut io, cntlid) = controller(port, d);
        // Identify Controller: the fields the Linux host checks.
        let (c, id) = admin.cmd(
            Sqe {
                opcode: p::ADMIN_IDENTIFY,
                cdw10: 1,
                sgl_len: 4096,
                ..Default::default()
            },
            &[],
        );
        assert_eq!(c.status, 0);
        assert_eq!(id.len(), 4096);
        assert_eq!(p::le16(&id, 78), cntlid, "CNTLID");
        assert_eq!(id[111], 1, "CNTRLTYPE I/O");
        assert!(p::le32(&id, 1792) >= 4, "IOCCSZ");
        assert_eq!(p::le32(&id, 1796), 1, "IORCSZ");
        assert_eq!(p::le16(&id, 1800), 0, "ICDOFF");
        assert!(p::le16(&id, 320) > 0, "KAS");
        assert!(p::le16(&id, 514) > 0, "MAXCMD");
        assert_eq!(p::le32(&id, 536) & 3, 1, "SGLS");
        assert_eq!((id[512], id[513]), (0x66, 0x44), "SQES/CQES");
        assert_eq!(p::le16(&id, 520) & 0xc, 0xc, "ONCS DSM + Write Zeroes");
        assert!(p::le32(&id, 516) >= 1, "NN");
        assert!(
            String::from_utf8_lossy(&id[768..1024]).starts_with(NQN),
            "SUBNQN"
        );
        assert!(
            String::from_utf8_lossy(&id[24..64]).starts_with("kiln test volume"),
            "MN"
        );
        // Identify Namespace 1: 256 MiB of 4 KiB blocks.
        let (c, ns) = admin.cmd(
            Sqe {
                opcode: p::ADMIN_IDENTIFY,
                nsid: 1,
                cdw10: 0,
                sgl_len: 4096,
                ..Default::default()
            },
            &[],
        );
        assert_eq!(c.status, 0);
        assert_eq!(p::le64(&ns, 0), 256 << 8, "NSZE");
        assert_eq!((p::le32(&ns, 128) >> 16) & 0xff, 12, "LBADS");
        // Active namespace list and descriptors.
        let (_, list) = admin.cmd(
            Sqe {
                opcode: p::ADMIN_IDENTIFY,
                cdw10: 2,
                sgl_len: 4096,
                ..Default::default()
            },
            &[],
        );
        assert_eq!((p::le32(&list, 0), p::le32(&list, 4)), (1, 0));
        let (c, desc) = admin.cmd(
            Sqe {
                opcode: p::ADMIN_IDENTIFY,
                nsid: 1,
                cdw10: 3,
                sgl_len: 4096,
                ..Default::default()
            },
            &[],
        );
        assert_eq!(c.status, 0);
        assert_eq!((desc[0], desc[1]), (2, 16), "NGUID descriptor");
        // Get Log Page SMART (512 bytes), unknown log page, Set Features Number of Queues.
        let (c, smart) = admin.cmd(
            Sqe {
                opcode: p::ADMIN_GET_LOG_PAGE,
                cdw10: 0x02 | (127 << 16),
                sgl_len: 512,
                ..Default::default()
            },
            &[],
        );
        assert_eq!((c.status, smart.len()), (0, 512));
        let (c, _) = admin.cmd(
            Sqe {
                opcode: p::ADMIN_GET_LOG_PAGE,
                cdw10: 0x42 | (127 << 16),
                sgl_len: 512,
                ..Default::default()
            },
            &[],
        );
        assert_eq!(sc(&c), (p::SCT_CMD, p::SC_INVALID_LOG_PAGE));
        let (c, _) = admin.cmd(
            Sqe {
                opcode: p::ADMIN_SET_FEATURES,
                cdw10: 7,
                cdw11: 3 | 3 << 16,
                ..Default::default()
            },
            &[],
        );
        assert_eq!((c.status, c.dw0), (0, 3 | 3 << 16));
        // Unknown admin opcode.
        let (c, _) = admin.cmd(
            Sqe {
                opcode: 0xc5,
                ..Default::default()
            },
            &[],
        );
        assert_eq!(sc(&c), (p::SCT_GENERIC, p::SC_INVALID_OPCODE));
        assert_ne!(c.status & 0x8000, 0, "DNR");

        // I/O: write then read back, CID echoed, SQ head advances.
        let data: Vec<u8> = (0..8192u32)
            .map(|i| (i * 7 + d.header as u32) as u8)
            .collect();
        let c1 = io.write(100, &data);
        assert_eq!(c1.status, 0);
        let (c2, back) = io.read(100, 2);
        assert_eq!(c2.status, 0);
        assert_eq!(back, data, "read back what was written");
        assert_eq!(c2.sqid, 1);
        assert_eq!(
            c2.sqhd,
            (c1.sqhd + 1) % 32,
            "SQ head advances by one per command"
        );
        // Unknown I/O opcode, LBA out of range, bad namespace.
        let (c, _) = io.cmd(
            Sqe {
                opcode: 0x7e,
                nsid: 1,
                ..Default::default()
            },
            &[],
        );
        assert_eq!(sc(&c), (p::SCT_GENERIC, p::SC_INVALID_OPCODE));
        let (c, _) = io.read((256 << 8) - 1, 2);
        assert_eq!(sc(&c), (p::SCT_GENERIC, p::SC_LBA_RANGE));
        let (c, _) = io.cmd(
            Sqe {
                opcode: p::IO_READ,
                nsid: 9,
                sgl_len: 4096,
                ..Default::default()
            },
            &[],
        );
        assert_eq!(sc(&c), (p::SCT_GENERIC, p::SC_INVALID_NS));
        // Flush, Write Zeroes, Dataset Management deallocate.
        assert_eq!(
            io.cmd(
                Sqe {
                    opcode: p::IO_FLUSH,
                    nsid: 1,
                    ..Default::default()
                },
                &[]
            )
            .0
            .status,
            0
        );
        let wz = Sqe {
            opcode: p::IO_WRITE_ZEROES,
            nsid: 1,
            cdw10: 100,
            cdw12: 0,
            ..Default::default()
        };
        assert_eq!(io.cmd(wz, &[]).0.status, 0);
        let (_, z) = io.read(100, 1);
        assert!(z.iter().all(|&b| b == 0), "Write Zeroes zeroed the block");
        let mut range = [0u8; 16];
        p::put32(&mut range, 4, 1);
        p::put64(&mut range, 8, 101);
        let dsm = Sqe {
            opcode: p::IO_DSM,
            nsid: 1,
            cdw10: 0,
            cdw11: 1 << 2,
            ..Default::default()
        };
        assert_eq!(io.cmd(dsm, &range).0.status, 0);
        let (c, _) = io.read(0, 1);
        assert_eq!(c.status, 0, "the I/O queue still works after bad commands");
        drop(io);
        drop(admin);
    }

    // A healthy queue that must survive everything below.
    let (_admin, mut healthy, _) = controller(port, Digests::default());
    let mut check_healthy = |what: &str| {
        let (c, _) = healthy.read(7, 1);
        assert_eq!(c.status, 0, "healthy queue broken after {what}");
    };

    // Host NQN not on the allow-list: Connect Invalid Host.
    let mut r = Raw::ic(port, Digests::default());
    let c = r.connect(0, 0xffff, "nqn.2014-08.org.nvmexpress:uuid:not-allowed", 0);
    assert_eq!(sc(&c), (p::SCT_CMD, p::SC_CONNECT_INVALID_HOST));
    assert_eq!(c.dw0 & 1, 1, "IATTR: the bad field is in the Connect data");
    assert_eq!(c.dw0 >> 16, 512, "IPO: HOSTNQN offset");
    check_healthy("an unlisted host");
    // Commands before Connect: Command Sequence Error.
    let (c, _) = r.cmd(
        Sqe {
            opcode: p::ADMIN_KEEP_ALIVE,
            ..Default::default()
        },
        &[],
    );
    assert_eq!(sc(&c), (p::SCT_GENERIC, p::SC_CMD_SEQ_ERROR));
    drop(r);

    // Unknown PDU type.
    let mut r = Raw::ic(port, Digests::default());
    r.s.write_all(&[0x42, 0, 24, 0, 24, 0, 0, 0]).unwrap();
    r.expect_term(p::FES_INVALID_HEADER_FIELD, 0);
    check_healthy("an unknown PDU type");

    // A capsule before ICReq.
    let mut r = Raw::tcp(port);
    r.send_capsule(Sqe::default(), &[]);
    r.expect_term(p::FES_PDU_SEQUENCE_ERROR, 0);
    check_healthy("a capsule before ICReq");

    // Oversized in-capsule data (PLEN claims 1 MiB of data): Data Transfer Limit Exceeded.
    let mut r = Raw::ic(port, Digests::default());
    let mut b = [0u8; 72];
    p::encode_capsule_cmd(
        &mut b,
        &Sqe {
            opcode: p::IO_WRITE,
            ..Default::default()
        },
        1 << 20,
        Digests::default(),
    );
    r.s.write_all(&b).unwrap();
    r.expect_term(p::FES_DATA_LIMIT_EXCEEDED, 4);
    check_healthy("an oversized PDU");

    // Bad HLEN.
    let mut r = Raw::ic(port, Digests::default());
    let mut b = [0u8; 72];
    p::encode_capsule_cmd(&mut b, &Sqe::default(), 0, Digests::default());
    b[2] = 60;
    r.s.write_all(&b).unwrap();
    r.expect_term(p::FES_INVALID_HEADER_FIELD, 2);
    check_healthy("a bad HLEN");

    // Corrupt header digest.
    let on = Digests {
        header: true,
        data: false,
    };
    let mut r = Raw::ic(port, on);
    let mut b = [0u8; 76];
    p::encode_capsule_cmd(&mut b, &Sqe::default(), 0, on);
    b[74] ^= 0xff;
    r.s.write_all(&b).unwrap();
    r.expect_term(p::FES_HEADER_DIGEST_ERROR, 0);
    check_healthy("a bad header digest");

    // ICReq with PFV 1.
    let mut r = Raw::tcp(port);
    let mut b = [0u8; 128];
    p::encode_icreq(&mut b, 0, Digests::default(), 0);
    b[8] = 1;
    r.s.write_all(&b).unwrap();
    r.expect_term(p::FES_UNSUPPORTED_PARAMETER, 8);
    check_healthy("a bad PFV");

    // Truncated PDUs: half a header, then half a capsule's data, then hang up.
    let mut r = Raw::ic(port, Digests::default());
    r.s.write_all(&[p::PDU_CAPSULE_CMD, 0, 72]).unwrap();
    drop(r);
    let mut r = Raw::ic(port, Digests::default());
    let mut b = [0u8; 72];
    p::encode_capsule_cmd(
        &mut b,
        &Sqe {
            opcode: p::IO_WRITE,
            ..Default::default()
        },
        4096,
        Digests::default(),
    );
    r.s.write_all(&b).unwrap();
    r.s.write_all(&[0xab; 1000]).unwrap();
    drop(r);
    check_healthy("truncated PDUs");

    // H2CData for a transfer tag that was never sent.
    let (_a2, mut q, _) = controller(port, Digests::default());
    let mut b = [0u8; 24];
    let n = p::encode_data_hdr(
        &mut b,
        p::PDU_H2C_DATA,
        p::FLAG_DATA_LAST,
        &p::DataHdr {
            cccid: 1,
            ttag: 77,
            datao: 0,
            datal: 4096,
        },
        0,
        Digests::default(),
    );
    q.s.write_all(&b[..n]).unwrap();
    q.s.write_all(&[0u8; 4096]).unwrap();
    q.expect_term(p::FES_INVALID_HEADER_FIELD, 10);
    check_healthy("a stray H2CData");

    // A large write through R2T + H2CData by hand (transport SGL), then read back.
    let (_a3, mut q, _) = controller(port, Digests::default());
    let data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
    let (cid, r2t) = q.write_by_r2t(1000, 16);
    for (i, chunk) in data.chunks(16384).enumerate() {
        let mut b = [0u8; 24];
        let last = if i == 3 { p::FLAG_DATA_LAST } else { 0 };
        let n = p::encode_data_hdr(
            &mut b,
            p::PDU_H2C_DATA,
            last,
            &p::DataHdr {
                cccid: cid,
                ttag: r2t.ttag,
                datao: i as u32 * 16384,
                datal: 16384,
            },
            0,
            Digests::default(),
        );
        q.s.write_all(&b[..n]).unwrap();
        q.s.write_all(chunk).unwrap();
    }
    match q.recv().unwrap().pdu {
        Pdu::CapsuleResp(c) => assert_eq!((c.cid, c.status), (cid, 0)),
        other => panic!("expected CapsuleResp, got {other:?}"),
    }
    let (c, back) = q.read(1000, 16);
    assert_eq!(c.status, 0);
    assert!(back == data, "R2T write read back");
    check_healthy("everything");
    assert!(t.k.log_text().contains("NVMe/TCP connection terminated"));
}

/// A fresh connection pair after bad input: ICReq, admin Connect, CC.EN, I/O Connect, then a
/// write and its read-back. Proves the listener and the reactors still serve new hosts.
fn new_connection_works(port: u16, what: &str) {
    let (_admin, mut io, _) = controller(port, Digests::default());
    let data = vec![what.len() as u8; 4096];
    assert_eq!(
        io.write(11, &data).status,
        0,
        "write on a new connection after {what}"
    );
    let (c, back) = io.read(11, 1);
    assert_eq!(c.status, 0, "read on a new connection after {what}");
    assert!(back == data, "read back on a new connection after {what}");
}

/// Issue 7's robustness acceptance over raw TCP: truncated PDUs, oversized and inconsistent
/// lengths (HLEN, PLEN, PDO, DATAL), PDU types only a controller may send, and unknown opcodes.
/// Transport errors get a C2HTermReq with the exact FES/FEI and close that connection only;
/// command errors get the exact NVMe status and the queue goes on. After every case a new
/// connection works, and a queue opened before everything keeps working.
#[test]
fn bad_pdus_and_opcodes_leave_other_connections_working() {
    let t = start("nvmf-robust");
    let port = t.port;
    let (_admin, mut healthy, _) = controller(port, Digests::default());
    let mut check = |what: &str| {
        let (c, _) = healthy.read(3, 1);
        assert_eq!(c.status, 0, "the old queue broke after {what}");
        new_connection_works(port, what);
    };
    let capsule = |sqe: &Sqe, data_bytes: usize| {
        let mut b = [0u8; 72];
        p::encode_capsule_cmd(&mut b, sqe, data_bytes, Digests::default());
        b
    };
    let write = Sqe {
        opcode: p::IO_WRITE,
        nsid: 1,
        sgl_type: p::SGL_DATA_BLOCK_OFFSET,
        ..Default::default()
    };

    // Oversized lengths. PLEN at its maximum: more in-capsule data than IOCCSZ allows.
    let mut r = Raw::ic(port, Digests::default());
    let b = capsule(&write, u32::MAX as usize - 72);
    assert_eq!(p::le32(&b, 4), u32::MAX);
    r.s.write_all(&b).unwrap();
    r.expect_term(p::FES_DATA_LIMIT_EXCEEDED, 4);
    check("PLEN 0xffffffff");
    // PLEN shorter than the header.
    let mut r = Raw::ic(port, Digests::default());
    let mut b = capsule(&Sqe::default(), 0);
    p::put32(&mut b, 4, 8);
    r.s.write_all(&b).unwrap();
    r.expect_term(p::FES_INVALID_HEADER_FIELD, 4);
    check("PLEN below HLEN");
    // HLEN larger than any header (255).
    let mut r = Raw::ic(port, Digests::default());
    let mut b = capsule(&Sqe::default(), 0);
    b[2] = 255;
    r.s.write_all(&b).unwrap();
    r.expect_term(p::FES_INVALID_HEADER_FIELD, 2);
    check("HLEN 255");
    // Data that starts inside the header (PDO 8).
    let mut r = Raw::ic(port, Digests::default());
    let mut b = capsule(&write, 4096);
    b[3] = 8;
    r.s.write_all(&b).unwrap();
    r.expect_term(p::FES_INVALID_HEADER_FIELD, 3);
    check("PDO inside the header");
    // A header digest flag that was not negotiated.
    let mut r = Raw::ic(port, Digests::default());
    let mut b = capsule(&Sqe::default(), 0);
    b[1] |= p::FLAG_HDGST;
    r.s.write_all(&b).unwrap();
    r.expect_term(p::FES_INVALID_HEADER_FIELD, 1);
    check("an unnegotiated digest flag");

    // PDU types only a controller sends (CapsuleResp, C2HData, R2T), and a second ICReq.
    for (pdu_type, hlen) in [
        (p::PDU_CAPSULE_RESP, p::CAPSULE_RESP_HLEN),
        (p::PDU_C2H_DATA, p::DATA_HLEN),
        (p::PDU_R2T, p::R2T_HLEN),
    ] {
        let mut r = Raw::ic(port, Digests::default());
        let mut b = vec![0u8; hlen];
        b[0] = pdu_type;
        b[2] = hlen as u8;
        p::put32(&mut b, 4, hlen as u32);
        r.s.write_all(&b).unwrap();
        r.expect_term(p::FES_INVALID_HEADER_FIELD, 0);
        check(&format!("a host PDU of type {pdu_type:#04x}"));
    }
    let mut r = Raw::ic(port, Digests::default());
    let mut b = [0u8; 128];
    p::encode_icreq(&mut b, 0, Digests::default(), 0);
    r.s.write_all(&b).unwrap();
    r.expect_term(p::FES_PDU_SEQUENCE_ERROR, 0);
    check("a second ICReq");

    // H2CData outside its R2T window, and for another command's tag.
    let (_a, mut q, _) = controller(port, Digests::default());
    let (cid, r2t) = q.write_by_r2t(0, 2);
    let mut b = [0u8; 24];
    let data = p::DataHdr {
        cccid: cid,
        ttag: r2t.ttag,
        datao: 4096,
        datal: 8192,
    };
    let n = p::encode_data_hdr(&mut b, p::PDU_H2C_DATA, 0, &data, 0, Digests::default());
    q.s.write_all(&b[..n]).unwrap();
    q.s.write_all(&[0u8; 8192]).unwrap();
    q.expect_term(p::FES_DATA_OUT_OF_RANGE, 12);
    check("H2CData past its R2T");
    let (_a, mut q, _) = controller(port, Digests::default());
    let (cid, r2t) = q.write_by_r2t(0, 1);
    let data = p::DataHdr {
        cccid: cid.wrapping_add(5),
        ttag: r2t.ttag,
        datao: 0,
        datal: 4096,
    };
    let n = p::encode_data_hdr(&mut b, p::PDU_H2C_DATA, 0, &data, 0, Digests::default());
    q.s.write_all(&b[..n]).unwrap();
    q.s.write_all(&[0u8; 4096]).unwrap();
    q.expect_term(p::FES_INVALID_HEADER_FIELD, 8);
    check("H2CData with another command's CCCID");

    // Truncated PDUs, each followed by a hang-up: part of an ICReq, part of a CapsuleCmd
    // header, a capsule without its in-capsule data, half an H2CData.
    let mut r = Raw::tcp(port);
    let mut b = [0u8; 128];
    p::encode_icreq(&mut b, 0, Digests::default(), 0);
    r.s.write_all(&b[..100]).unwrap();
    drop(r);
    let mut r = Raw::ic(port, Digests::default());
    r.s.write_all(&capsule(&Sqe::default(), 0)[..40]).unwrap();
    drop(r);
    let mut r = Raw::ic(port, Digests::default());
    r.s.write_all(&capsule(&write, 4096)).unwrap();
    drop(r);
    let (_a, mut q, _) = controller(port, Digests::default());
    let (cid, r2t) = q.write_by_r2t(0, 1);
    let data = p::DataHdr {
        cccid: cid,
        ttag: r2t.ttag,
        datao: 0,
        datal: 4096,
    };
    let n = p::encode_data_hdr(&mut b, p::PDU_H2C_DATA, 0, &data, 0, Digests::default());
    q.s.write_all(&b[..n]).unwrap();
    q.s.write_all(&[0u8; 2048]).unwrap();
    drop(q);
    check("truncated PDUs");

    // Unknown and unsupported opcodes: an NVMe status, Do Not Retry, and the queue goes on.
    let (mut admin, mut io, _) = controller(port, Digests::default());
    for opcode in [0x03, 0x7e, 0x80, 0xff] {
        let (c, _) = io.cmd(
            Sqe {
                opcode,
                nsid: 1,
                ..Default::default()
            },
            &[],
        );
        assert_eq!(
            sc(&c),
            (p::SCT_GENERIC, p::SC_INVALID_OPCODE),
            "I/O opcode {opcode:#x}"
        );
        assert_ne!(c.status & 0x8000, 0, "DNR on I/O opcode {opcode:#x}");
    }
    for opcode in [0x01, 0x0d, 0x7e, 0xc1, 0xff] {
        let (c, _) = admin.cmd(
            Sqe {
                opcode,
                ..Default::default()
            },
            &[],
        );
        assert_eq!(
            sc(&c),
            (p::SCT_GENERIC, p::SC_INVALID_OPCODE),
            "admin opcode {opcode:#x}"
        );
    }
    // A Fabrics command of an unknown type, on the admin queue and on an I/O queue.
    let fabrics = Sqe {
        opcode: p::OPC_FABRICS,
        nsid: 0x33,
        ..Default::default()
    };
    let (c, _) = admin.cmd(fabrics, &[]);
    assert_eq!(sc(&c), (p::SCT_GENERIC, p::SC_INVALID_OPCODE));
    let (c, _) = io.cmd(fabrics, &[]);
    assert_eq!(sc(&c), (p::SCT_GENERIC, p::SC_INVALID_FIELD));
    // Transfers that do not fit their SGL: a read asking for in-capsule data, a write whose
    // in-capsule data is shorter than its blocks, a transfer above MDTS.
    let (c, _) = io.cmd(
        Sqe {
            opcode: p::IO_READ,
            nsid: 1,
            sgl_type: p::SGL_DATA_BLOCK_OFFSET,
            sgl_len: 4096,
            ..Default::default()
        },
        &[],
    );
    assert_eq!(sc(&c), (p::SCT_GENERIC, p::SC_SGL_TYPE_INVALID));
    let short = Sqe { cdw12: 1, ..write };
    let (c, _) = io.cmd(short, &[7u8; 4096]);
    assert_eq!(sc(&c), (p::SCT_GENERIC, p::SC_SGL_LENGTH_INVALID));
    let (c, _) = io.read(0, 65535);
    assert_eq!(sc(&c), (p::SCT_GENERIC, p::SC_INVALID_FIELD), "above MDTS");
    let (c, _) = io.read(9, 1);
    assert_eq!(c.status, 0, "the queue still works after bad commands");
    check("bad opcodes");
    assert!(t.k.log_text().contains("NVMe/TCP connection terminated"));
}

#[test]
fn discovery_keep_alive_and_rpc() {
    let t = start("nvmf-disc");
    let port = t.port;
    // Discovery controller: CNTRLTYPE 2 and log page 0x70 listing the subsystem.
    let mut d = Raw::ic(port, Digests::default());
    let c = d.connect(0, 0xfffe, HOST, 0);
    assert_eq!(c.status, 0, "discovery Connect");
    assert_eq!(d.prop_set_cc(1).status, 0);
    let (c, id) = d.cmd(
        Sqe {
            opcode: p::ADMIN_IDENTIFY,
            cdw10: 1,
            sgl_len: 4096,
            ..Default::default()
        },
        &[],
    );
    assert_eq!(c.status, 0);
    assert_eq!(id[111], 2, "CNTRLTYPE discovery");
    let (c, log) = d.cmd(
        Sqe {
            opcode: p::ADMIN_GET_LOG_PAGE,
            cdw10: 0x70 | (511 << 16),
            sgl_len: 2048,
            ..Default::default()
        },
        &[],
    );
    assert_eq!(c.status, 0);
    assert_eq!(p::le64(&log, 8), 1, "one discovery record");
    let e = &log[1024..2048];
    assert_eq!((e[0], e[1], e[2]), (3, 1, 2), "TCP, IPv4, NVMe subsystem");
    assert!(String::from_utf8_lossy(&e[256..512]).starts_with(NQN));
    assert_eq!(String::from_utf8_lossy(&e[32..64]).trim(), port.to_string());
    assert_eq!(String::from_utf8_lossy(&e[512..768]).trim(), "127.0.0.1");

    // Keep-alive: KATO 1 s and silence tear the controller down.
    let mut a = Raw::ic(port, Digests::default());
    let c = a.connect(0, 0xffff, HOST, 1000);
    assert_eq!(c.status, 0);
    let cntlid = c.dw0 as u16;
    assert_eq!(a.prop_set_cc(1 | 6 << 16 | 4 << 20).status, 0);
    let t0 = Instant::now();
    a.expect_closed();
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    let mut io = Raw::ic(port, Digests::default());
    let c = io.connect(1, cntlid, HOST, 0);
    assert_eq!(
        sc(&c),
        (p::SCT_CMD, p::SC_CONNECT_INVALID_PARAM),
        "the controller is gone"
    );
    assert!(t.k.log_text().contains("keep-alive timeout"));

    // RPC: a second subsystem built at run time, reachable by kiln's initiator.
    let nqn2 = "nqn.2024-01.io.kiln:rpc";
    t.k.rpc(
        "nvmf_create_subsystem",
        Some(&format!(
            r#"{{"nqn":"{nqn2}","serial_number":"RPC1","model_number":"rpc model"}}"#
        )),
    );
    let nsid = t.k.rpc(
        "nvmf_subsystem_add_ns",
        Some(&format!(
            r#"{{"nqn":"{nqn2}","namespace":{{"bdev_name":"vol0"}}}}"#
        )),
    );
    assert_eq!(nsid, 1);
    let port2 = free_port();
    t.k.rpc(
        "nvmf_subsystem_add_listener",
        Some(&format!(r#"{{"nqn":"{nqn2}","listen_address":{{"trtype":"tcp","traddr":"127.0.0.1","trsvcid":"{port2}"}}}}"#)),
    );
    let err = t.k.try_rpc(
        "nvmf_subsystem_add_ns",
        Some(&format!(
            r#"{{"nqn":"{nqn2}","namespace":{{"bdev_name":"nope"}}}}"#
        )),
    );
    assert!(err.unwrap_err().contains("volume 'nope' not found"));
    // Not yet allowed.
    let dev = format!("nvmf://127.0.0.1:{port2}/{nqn2}/1");
    let out = Command::new(KILN)
        .args(["bench", "--device", &dev, "-t", "1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let msg = String::from_utf8_lossy(&out.stderr);
    assert!(
        msg.contains("Connect (queue 0) failed: status type 0x1 code 0x84"),
        "{msg}"
    );
    t.k.rpc(
        "nvmf_subsystem_add_host",
        Some(&format!(r#"{{"nqn":"{nqn2}","host":"{INITIATOR}"}}"#)),
    );
    let v = bench(
        &t,
        &["--device", &dev, "-w", "randread", "-t", "1", "-q", "8"],
    );
    assert!(
        v["jobs"][0]["read"]["total_ios"].as_u64().unwrap() > 100,
        "{v}"
    );
    let subs = t.k.rpc("nvmf_get_subsystems", None);
    let s = subs
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["nqn"] == nqn2)
        .expect("listed");
    assert_eq!(s["namespaces"][0]["bdev_name"], "vol0");
    assert_eq!(s["allow_any_host"], false);
    assert_eq!(s["listen_addresses"][0]["trsvcid"], port2.to_string());
}

impl Raw {
    fn set_aec(&mut self, aec: u32) {
        let sqe = Sqe {
            opcode: p::ADMIN_SET_FEATURES,
            cdw10: 0x0b,
            cdw11: aec,
            ..Default::default()
        };
        assert_eq!(self.cmd(sqe, &[]).0.status, 0, "Set Features AEC");
    }

    fn send_aer(&mut self) -> u16 {
        self.send_capsule(
            Sqe {
                opcode: p::ADMIN_ASYNC_EVENT,
                ..Default::default()
            },
            &[],
        )
    }

    fn expect_aer(&mut self, cid: u16, dw0: u32) {
        match self.recv().map(|g| g.pdu) {
            Some(Pdu::CapsuleResp(c)) => {
                assert_eq!(c.cid, cid, "the held AER completes");
                assert_eq!(c.status, 0);
                assert_eq!(c.dw0, dw0, "event type / information / log page");
            }
            other => panic!("expected the AER completion, got {other:?}"),
        }
    }

    /// Log page 0x04 (Changed Namespace List): the NSIDs before the first zero.
    fn changed_ns(&mut self) -> Vec<u32> {
        let (c, log) = self.cmd(
            Sqe {
                opcode: p::ADMIN_GET_LOG_PAGE,
                cdw10: 0x04 | (1023 << 16),
                sgl_len: 4096,
                ..Default::default()
            },
            &[],
        );
        assert_eq!(c.status, 0);
        (0..1024)
            .map(|i| p::le32(&log, i * 4))
            .take_while(|n| *n != 0)
            .collect()
    }
}

#[test]
fn async_event_notices_for_namespace_and_discovery_changes() {
    let t = start("nvmf-aen");
    let add_ns = |nsid: u32| {
        let got = t.k.rpc(
            "nvmf_subsystem_add_ns",
            Some(&format!(
                r#"{{"nqn":"{NQN}","namespace":{{"bdev_name":"vol0","nsid":{nsid}}}}}"#
            )),
        );
        assert_eq!(got, nsid as u64);
    };
    const NS_NOTICE: u32 = 0x0004_0002; // Notice, Namespace Attribute Changed, log 0x04
    let (mut a, _io, _) = controller(t.port, Digests::default());
    a.set_aec(1 << 8);
    let aer1 = a.send_aer();
    let aer2 = a.send_aer();
    add_ns(2);
    a.expect_aer(aer1, NS_NOTICE);
    // Masked until the log is read: NS 3 is recorded but not reported.
    add_ns(3);
    assert_eq!(a.changed_ns(), vec![2, 3], "changed namespace list");
    assert_eq!(
        a.changed_ns(),
        Vec::<u32>::new(),
        "reading the log cleared it"
    );
    let (c, list) = a.cmd(
        Sqe {
            opcode: p::ADMIN_IDENTIFY,
            cdw10: 2,
            sgl_len: 4096,
            ..Default::default()
        },
        &[],
    );
    assert_eq!(c.status, 0);
    assert_eq!(
        (p::le32(&list, 0), p::le32(&list, 4), p::le32(&list, 8)),
        (1, 2, 3)
    );
    // Unmasked again: the next change completes the second AER.
    add_ns(4);
    a.expect_aer(aer2, NS_NOTICE);
    assert_eq!(a.changed_ns(), vec![4]);
    // Abort of a held AER completes it with Command Abort Requested.
    let aer3 = a.send_aer();
    let abort = a.send_capsule(
        Sqe {
            opcode: p::ADMIN_ABORT,
            cdw10: (aer3 as u32) << 16,
            ..Default::default()
        },
        &[],
    );
    for _ in 0..2 {
        match a.recv().map(|g| g.pdu) {
            Some(Pdu::CapsuleResp(c)) if c.cid == aer3 => {
                assert_eq!(sc(&c), (p::SCT_GENERIC, p::SC_ABORT_REQUESTED));
            }
            Some(Pdu::CapsuleResp(c)) if c.cid == abort => {
                assert_eq!((c.status, c.dw0 & 1), (0, 0), "Abort: command aborted");
            }
            other => panic!("expected the AER and Abort completions, got {other:?}"),
        }
    }

    // Without AEC bit 8 nothing is reported; the log still records the change.
    let (mut b, _io2, _) = controller(t.port, Digests::default());
    let aer = b.send_aer();
    add_ns(5);
    assert_eq!(b.changed_ns(), vec![5]);
    let (c, _) = b.cmd(
        Sqe {
            opcode: p::ADMIN_KEEP_ALIVE,
            ..Default::default()
        },
        &[],
    );
    assert_eq!(c.status, 0, "the held AER did not complete in its place");
    b.set_aec(1 << 8);
    add_ns(6);
    b.expect_aer(aer, NS_NOTICE);

    // Discovery controller: a new listener is a Discovery Log Page Change notice.
    let mut d = Raw::ic(t.port, Digests::default());
    assert_eq!(d.connect(0, 0xfffe, HOST, 0).status, 0);
    assert_eq!(d.prop_set_cc(1).status, 0);
    d.set_aec(1 << 31);
    let aer = d.send_aer();
    let port2 = free_port();
    t.k.rpc(
        "nvmf_subsystem_add_listener",
        Some(&format!(r#"{{"nqn":"{NQN}","listen_address":{{"trtype":"tcp","traddr":"127.0.0.1","trsvcid":"{port2}"}}}}"#)),
    );
    d.expect_aer(aer, 0x0070_f002);
    let (c, log) = d.cmd(
        Sqe {
            opcode: p::ADMIN_GET_LOG_PAGE,
            cdw10: 0x70 | (1023 << 16),
            sgl_len: 4096,
            ..Default::default()
        },
        &[],
    );
    assert_eq!(c.status, 0);
    assert_eq!(
        p::le64(&log, 8),
        2,
        "two discovery records after the new listener"
    );
}
