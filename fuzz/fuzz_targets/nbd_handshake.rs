//! Fuzzes the NBD handshake state machine and the transmission-phase request parser.
//!
//! Input layout: `[config selector] [split seed] [client byte stream...]`. The stream is fed to
//! [`Handshake::feed`] in pseudo-random pieces (sizes derived from the seed) the way the
//! connection code does it: unconsumed bytes are kept and re-fed with the next piece. Whatever
//! follows the handshake is parsed as transmission requests. Checks: no panic, consumed counts
//! within bounds, bounded buffering and bounded output.

#![no_main]

use kiln::target::nbd_proto::{
    self as nbd, ExportInfo, Handshake, HandshakeConfig, HandshakeStep, Request,
};
use libfuzzer_sys::fuzz_target;

/// Most output one option may produce (largest case: an error message echoing a name).
const MAX_OUT_PER_OPTION_BYTES: usize = 4096;
/// Largest piece handed to `feed` at once.
const MAX_PIECE_BYTES: usize = 4096;

fn config(selector: u8) -> HandshakeConfig {
    HandshakeConfig {
        exports: vec![
            ExportInfo {
                name: "disk0".into(),
                size_bytes: 1 << 30,
                block_size_min: 512,
                block_size_preferred: 4096,
                block_size_max: 1 << 20,
                read_only: false,
                multi_conn: true,
                description: "fuzz disk".into(),
            },
            ExportInfo {
                name: String::new(),
                size_bytes: 1 << 20,
                block_size_min: 1,
                block_size_preferred: 512,
                block_size_max: 1 << 25,
                read_only: true,
                multi_conn: false,
                description: String::new(),
            },
        ],
        tls_required: selector & 1 != 0,
        tls_available: selector & 2 != 0,
    }
}

fuzz_target!(|data: &[u8]| {
    let [selector, seed, stream @ ..] = data else {
        return;
    };
    let cfg = config(*selector);
    let mut rng = u32::from(*seed) | 0x100;
    let mut next_piece = move || {
        rng ^= rng << 13;
        rng ^= rng >> 17;
        rng ^= rng << 5;
        // Mostly tiny pieces, sometimes large ones.
        if rng & 0x8000 != 0 {
            (rng as usize >> 16) % MAX_PIECE_BYTES + 1
        } else {
            (rng as usize >> 16) % 20 + 1
        }
    };

    let mut hs = Handshake::new(cfg.clone());
    let mut out = Vec::new();
    hs.greeting(&mut out);
    assert_eq!(out.len(), nbd::GREETING_BYTES);
    out.clear();

    let mut pending: Vec<u8> = Vec::new();
    let mut fed = 0;
    let mut options_seen = 0usize;
    let negotiated = loop {
        let before = out.len();
        let (used, step) = match hs.feed(&pending, &mut out) {
            Ok(r) => r,
            Err(e) => {
                assert!(!e.what.is_empty());
                break None;
            }
        };
        assert!(
            used <= pending.len(),
            "consumed {used} of {}",
            pending.len()
        );
        // Every option is at least a 16-byte header.
        options_seen += used / nbd::OPTION_HEADER_BYTES + 1;
        assert!(out.len() - before <= MAX_OUT_PER_OPTION_BYTES * (used / 16 + 1));
        assert!(out.len() <= MAX_OUT_PER_OPTION_BYTES * options_seen);
        pending.drain(..used);
        match step {
            HandshakeStep::NeedMore => {
                assert!(
                    pending.len() <= nbd::OPTION_HEADER_BYTES + nbd::MAX_OPTION_DATA_BYTES as usize,
                    "handshake asked for more while {} bytes are pending",
                    pending.len()
                );
                if fed == stream.len() {
                    break None;
                }
                let n = next_piece().min(stream.len() - fed);
                pending.extend_from_slice(&stream[fed..fed + n]);
                fed += n;
            }
            // A real server would run TLS now and drop plain-text leftovers.
            HandshakeStep::StartTls => pending.clear(),
            HandshakeStep::Abort => break None,
            HandshakeStep::Done(n) => break Some(n),
        }
    };
    // Feeding after the end must fail, never panic.
    if negotiated.is_some() {
        assert!(hs.feed(&pending, &mut out).is_err());
    }

    // Transmission phase over the rest of the stream.
    pending.extend_from_slice(&stream[fed..]);
    let export = &cfg.exports[negotiated.map_or(0, |n| n.export_index)];
    let mut rest = pending.as_slice();
    while let Some((header, tail)) = rest.split_first_chunk::<{ nbd::REQUEST_HEADER_BYTES }>() {
        let Ok(req) = nbd::parse_request(header) else {
            break;
        };
        let mut again = [0; nbd::REQUEST_HEADER_BYTES];
        req.encode(&mut again);
        assert_eq!(&again, header);
        let verdict = nbd::validate_request(
            &req,
            export.size_bytes,
            export.block_size_min,
            export.block_size_max,
            export.read_only,
        );
        if verdict.is_ok() && req.kind != nbd::NBD_CMD_DISC && req.kind != nbd::NBD_CMD_FLUSH {
            let end = req.offset + u64::from(req.length);
            assert!(end <= export.size_bytes && req.length > 0);
        }
        encode_replies(&req, verdict.err().unwrap_or(0));
        if verdict.is_err() && nbd::reject_requires_disconnect(&req, export.block_size_max) {
            break;
        }
        let payload = (req.payload_bytes() as usize).min(tail.len());
        rest = &tail[payload..];
        if req.kind == nbd::NBD_CMD_DISC {
            break;
        }
    }
});

fn encode_replies(req: &Request, error: u32) {
    let mut simple = [0; nbd::SIMPLE_REPLY_BYTES];
    nbd::encode_simple_reply(&mut simple, error, req.cookie);
    let mut data = [0; nbd::OFFSET_DATA_HEADER_BYTES];
    nbd::encode_offset_data_header(
        &mut data,
        nbd::NBD_REPLY_FLAG_DONE,
        req.cookie,
        req.offset,
        req.length.min(u32::MAX - 8),
    );
    let mut chunk = [0; 64];
    let n = nbd::encode_error_chunk(
        &mut chunk,
        nbd::NBD_REPLY_FLAG_DONE,
        req.cookie,
        error.max(1),
        "request rejected by fuzz harness",
    );
    assert!(n <= chunk.len());
}
