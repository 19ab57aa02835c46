//! Fuzzes how a mirror opens from its legs' superblocks,
//! `kiln::bdev::mirror::plan_from_superblocks`: the frame and postcard decoding of each leg's
//! 4 KiB superblock block, then the decision between fresh legs, one formatted leg or both.
//!
//! Input: `[mode]`, then per leg either raw bytes or a superblock built from the input's
//! fields (postcard by hand: version, uuid, leg, generation, stale flags) in a frame with a
//! valid checksum, so that the fuzzer reaches the decision past the checksum. Bit 0 of `mode`
//! makes both legs share a uuid. Checks: no panic, errors are one line, a plan never has both
//! legs stale, the generation always advances, and two blank legs open fresh.

#![no_main]

use kiln::bdev::mirror::{plan_from_superblocks, SB_MAGIC};
use libfuzzer_sys::fuzz_target;

const SB_BYTES: usize = 4096;

fn take<'a>(data: &mut &'a [u8], n: usize) -> &'a [u8] {
    let (head, rest) = data.split_at(n.min(data.len()));
    *data = rest;
    head
}

fn byte(data: &mut &[u8]) -> u8 {
    take(data, 1).first().copied().unwrap_or(0)
}

fn u64_le(data: &mut &[u8]) -> u64 {
    let mut b = [0; 8];
    let head = take(data, 8);
    b[..head.len()].copy_from_slice(head);
    u64::from_le_bytes(b)
}

/// postcard's unsigned varint.
fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn leg_block(data: &mut &[u8], shared_uuid: u64) -> Vec<u8> {
    let kind = byte(data);
    let mut block = Vec::new();
    if kind & 1 == 0 {
        let len = u16::from_le_bytes([byte(data), byte(data)]) as usize % (SB_BYTES + 1);
        block.extend_from_slice(take(data, len));
        return block;
    }
    let mut payload = Vec::new();
    let version = if kind & 2 != 0 {
        u64_le(data) as u32
    } else {
        1
    };
    varint(version.into(), &mut payload);
    let uuid = if kind & 4 != 0 {
        u64_le(data)
    } else {
        shared_uuid
    };
    varint(uuid, &mut payload);
    payload.push(byte(data));
    let generation = match kind >> 3 & 3 {
        0 => byte(data) as u64,
        1 => u64::MAX,
        _ => u64_le(data),
    };
    varint(generation, &mut payload);
    let stale = byte(data);
    payload.extend_from_slice(&[stale & 1, stale >> 1 & 1]);
    if kind & 32 != 0 {
        // Trailing or bad bytes inside a valid frame.
        let len = byte(data) as usize;
        payload.extend_from_slice(take(data, len));
    }
    kiln::frame::encode_raw(SB_MAGIC, generation, &payload, &mut block);
    block.resize(SB_BYTES, 0);
    block
}

fuzz_target!(|data: &[u8]| {
    let mut data = data;
    let mode = byte(&mut data);
    let shared_uuid = if mode & 1 != 0 { 7 } else { u64_le(&mut data) };
    let a = leg_block(&mut data, shared_uuid);
    let b = leg_block(&mut data, shared_uuid);
    match plan_from_superblocks("fuzz", [&a, &b]) {
        Ok(plan) => {
            assert_ne!(plan.stale, [true, true]);
            assert!(plan.generation >= 1);
            if a.iter().chain(&b).all(|&x| x == 0) {
                assert_eq!((plan.generation, plan.stale), (1, [false, false]));
            }
        }
        Err(e) => {
            let e = e.to_string();
            assert!(!e.is_empty() && !e.contains('\n'), "{e:?}");
        }
    }
});
