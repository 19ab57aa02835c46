//! Fuzzes the NVMe/TCP PDU decoder (`kiln::target::nvmf_proto::decode`) as both the target and
//! the host see a byte stream, with and without digests.
//!
//! Input layout: `[mode] [stream...]`. Bit 0 of `mode` picks the role, bits 1-2 the digests.
//! The stream is decoded PDU after PDU the way the connections do it: a header, then its data
//! (skipped, digest checked), then the next header. Checks: no panic; a decoded PDU's parts lie
//! inside PLEN; data never exceeds the limits; re-encoding a decoded CapsuleCmd, R2T or data
//! header gives back the same header bytes; error codes map to a defined FES.

#![no_main]

use kiln::target::nvmf_proto::{self as p, Digests, Limits, Pdu, Role};
use libfuzzer_sys::fuzz_target;

const LIMITS: Limits = Limits {
    in_capsule_data_max: 8192,
    data_pdu_max: 128 << 10,
};

fuzz_target!(|data: &[u8]| {
    let [mode, stream @ ..] = data else {
        return;
    };
    let role = if mode & 1 == 0 { Role::Target } else { Role::Host };
    let d = Digests {
        header: mode & 2 != 0,
        data: mode & 4 != 0,
    };
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
        assert_eq!(if head.data_bytes > 0 { end_of_data + dd } else { total }, total);
        assert!(head.data_bytes <= LIMITS.data_pdu_max.max(LIMITS.in_capsule_data_max));
        let hlen = rest[2] as usize;
        let hd = if d.header && rest[0] > p::PDU_C2H_TERM_REQ { p::DIGEST_BYTES } else { 0 };
        let mut again = [0u8; 160];
        match head.pdu {
            Pdu::CapsuleCmd(sqe) => {
                let n = p::encode_capsule_cmd(&mut again, &sqe, head.data_bytes as usize, d);
                assert_eq!(n, hlen + hd);
                assert_eq!(&again[8..72], &rest[8..72], "SQE round trip");
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
