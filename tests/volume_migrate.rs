//! Whole-volume migration to a new device while the volume is in use:
//!
//! - integrity: fio `verify=crc32c` random read/write through NBD for the whole move,
//!   started with `kiln migrate --follow`; then the clean end state (every chunk on the
//!   destination in `volume_get_map`, the sources trimmed, completion with totals in
//!   `migration_get_status`);
//! - crash: SIGKILL at a random point of a move while a client writes, restart: the move
//!   resumes from the journal (not from zero) and every acknowledged write reads back.
//!
//! The volume starts on both configured tiers (the small fast tier fills first), so the
//! move has two sources. `KILN_VOLMIG_SEED` replays the crash trials (the seed is printed).

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use common::*;

/// The two tests move hundreds of MiB each; run them one at a time (2-core CI).
static SERIAL: Mutex<()> = Mutex::new(());

const STATIC: &str = "\n[policy]\npolicy = \"static\"\n";

/// 128 MiB fast tier (64 MiB of it metadata), 1 GiB capacity tier, a 256 MiB volume.
fn opts() -> Opts {
    let mut o = Opts {
        fast: "128MiB",
        capacity: "1GiB",
        volume: "256MiB",
        ..Opts::default()
    };
    o.reactor.push_str(STATIC);
    o
}

fn move_status(k: &Kiln) -> Value {
    k.rpc("volume_migrate_status", Some(r#"{"volume":"vol0"}"#))
}

fn num(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("'{key}' missing in {v}"))
}

/// Waits until the move reaches `state`, panicking on failure or after `limit`.
fn wait_state(k: &Kiln, state: &str, limit: Duration) -> Value {
    let t0 = Instant::now();
    loop {
        let st = move_status(k);
        if st["state"] == state {
            return st;
        }
        assert!(
            st["state"] != "failed",
            "volume migration failed: {st}\nlog:\n{}",
            k.log_text()
        );
        assert!(
            t0.elapsed() < limit,
            "volume migration not {state} after {limit:?}: {st}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Every mapped chunk of vol0 is on `tier`; returns the mapped bytes.
fn assert_all_on(k: &Kiln, tier: &str) -> u64 {
    let map = k.rpc("volume_get_map", Some(r#"{"volume":"vol0"}"#));
    let mut mapped = 0;
    for c in map["chunks"].as_array().unwrap() {
        if c["tier"].is_null() {
            continue;
        }
        assert_eq!(c["tier"], tier, "chunk not on the destination: {c}");
        mapped += num(c, "length");
    }
    mapped
}

/// Bytes of a file actually allocated on disk.
fn allocated_bytes(path: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}

#[test]
fn fio_verify_passes_while_the_volume_moves_then_the_source_is_released() {
    if !require_tool("fio") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let t0 = Instant::now();
    let k = Kiln::start("volmig-int", opts());
    let uri = k.unix_uri();
    // Fill the whole volume first (with verify headers) so every chunk is mapped.
    let mut fill = args(&[
        "--name=fill",
        "--ioengine=nbd",
        "--rw=write",
        "--bs=1m",
        "--iodepth=8",
        "--size=256m",
    ]);
    fill.push(format!("--uri={uri}"));
    let r = fio(&k.dir.path, &fill, Duration::from_secs(60));
    assert!(r.status.success(), "fill: {}", r.describe());
    let sources_before = allocated_bytes(&k.dir.join("capacity.img"));
    assert!(
        sources_before >= 128 << 20,
        "the volume should start mostly on the capacity tier"
    );
    // Random read/write with crc32c verify, in rounds until the move has ended (every
    // round verifies what it wrote, so the whole move is covered).
    let mut a = args(&[
        "--name=integrity",
        "--ioengine=nbd",
        "--rw=randrw",
        "--bs=4k",
        "--iodepth=16",
        "--size=256m",
        "--io_size=48m",
        "--norandommap",
        "--serialize_overlap=1",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_backlog=1024",
        "--random_distribution=zipf:1.2",
    ]);
    a.push(format!("--uri={uri}"));
    let load = spawn_fio(&k.dir.path, &a);
    std::thread::sleep(Duration::from_millis(300));
    let dst = k.dir.join("dst.img");
    let mut mover = std::process::Command::new(KILN)
        .args([
            "migrate", "--volume", "vol0", "--follow", "--name", "newdisk",
        ])
        .arg("--to")
        .arg(format!("file:{}?size=512MiB", dst.display()))
        .args(["--rate-mib-s", "64"])
        .arg("-s")
        .arg(&k.rpc_sock)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut rounds = vec![load];
    let mut writes = 0;
    let moved = loop {
        let r = rounds.pop().unwrap().finish(Duration::from_secs(90));
        assert!(r.status.success(), "fio: {}", r.describe());
        assert_eq!(r.job_error(), 0, "{}", r.describe());
        assert!(
            r.verify_errors().is_empty(),
            "verify errors {:?}",
            r.verify_errors()
        );
        writes += r.total_ios("write");
        if let Some(st) = mover.try_wait().unwrap() {
            break st;
        }
        rounds.push(spawn_fio(&k.dir.path, &a));
    };
    let out = mover.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        moved.success(),
        "kiln migrate: {stdout}\n{}\nlog:\n{}",
        String::from_utf8_lossy(&out.stderr),
        k.log_text()
    );
    assert!(stdout.contains("done:"), "{stdout}");
    assert!(writes > 5_000, "{writes} writes");
    // Clean end state.
    let mapped = assert_all_on(&k, "newdisk");
    assert_eq!(mapped, 256 << 20, "the whole volume stays mapped");
    let st = k.rpc("migration_get_status", None);
    let mv = &st["volume_moves"][0];
    assert_eq!(mv["state"], "done", "{st}");
    assert_eq!(num(mv, "total_bytes"), 256 << 20, "{mv}");
    assert_eq!(num(mv, "done_bytes"), 256 << 20, "{mv}");
    assert!(num(mv, "moved_bytes") >= 256 << 20, "{mv}");
    assert!(
        num(mv, "hot_chunks") > 0,
        "zipf reads make hot chunks: {mv}"
    );
    assert!(num(mv, "source_trimmed_bytes") > 0, "{mv}");
    let after = allocated_bytes(&k.dir.join("capacity.img"));
    assert!(
        after < 1 << 20,
        "source tier still holds {after} bytes after the move (was {sources_before})"
    );
    assert!(
        allocated_bytes(&dst) >= 256 << 20,
        "the destination holds the volume"
    );
    // Everything reads back once more, sequentially.
    let mut rb = args(&[
        "--name=readall",
        "--ioengine=nbd",
        "--rw=read",
        "--bs=1m",
        "--iodepth=4",
        "--size=256m",
    ]);
    rb.push(format!("--uri={uri}"));
    let r = fio(&k.dir.path, &rb, Duration::from_secs(60));
    assert!(r.status.success(), "read back: {}", r.describe());
    eprintln!("integrity: {:.1}s, move {mv}", t0.elapsed().as_secs_f64());
}

const BLOCK: usize = 4096;

/// The content of a block at `offset` written in `version`.
fn pattern(offset: u64, version: u32) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK];
    let mut x = offset ^ ((version as u64) << 40) ^ 0x9e37_79b9_7f4a_7c15;
    for c in b.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes());
    }
    b
}

#[test]
fn kill9_mid_move_resumes_from_the_journal_and_keeps_every_acked_write() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let seed = seed_from_env("KILN_VOLMIG_SEED");
    eprintln!("KILN_VOLMIG_SEED={seed}");
    let mut rng = Rng::new(seed);
    let mut k = Kiln::start("volmig-crash", opts());
    let size = k.volume_size;
    // Version 0 everywhere.
    let mut c = RawClient::unix(&k.nbd_sock, false);
    for off in (0..size).step_by(1 << 20) {
        let buf: Vec<u8> = (0..(1 << 20) / BLOCK as u64)
            .flat_map(|i| pattern(off + i * BLOCK as u64, 0))
            .collect();
        assert_eq!(c.write(off, &buf), 0);
    }
    c.disconnect();
    let versions: Arc<Mutex<HashMap<u64, u32>>> = Arc::default();
    let dst = k.dir.join("dst.img");
    for trial in 0..2 {
        if trial == 0 {
            // Slow enough (rate cap) to be killed in the middle.
            k.rpc(
                "volume_migrate",
                Some(&format!(
                    r#"{{"volume":"vol0","destination":"file:{}?size=512MiB","name":"newdisk","rate_mib_s":40}}"#,
                    dst.display()
                )),
            );
        }
        // A writer: one 4 KiB write at a time; `versions` holds acknowledged ones.
        let stop = Arc::new(AtomicBool::new(false));
        let inflight: Arc<Mutex<Option<(u64, u32)>>> = Arc::default();
        let writer = {
            let (stop, versions, inflight, sock) = (
                stop.clone(),
                versions.clone(),
                inflight.clone(),
                k.nbd_sock.clone(),
            );
            let mut r = Rng::new(seed ^ trial);
            std::thread::spawn(move || {
                let mut c = RawClient::unix(&sock, false);
                while !stop.load(Ordering::Relaxed) {
                    let off = r.range(0, size / BLOCK as u64) * BLOCK as u64;
                    let v = versions.lock().unwrap().get(&off).copied().unwrap_or(0) + 1;
                    *inflight.lock().unwrap() = Some((off, v));
                    // Panics (ending the thread) when the server dies mid-request.
                    assert_eq!(c.write(off, &pattern(off, v)), 0);
                    versions.lock().unwrap().insert(off, v);
                    *inflight.lock().unwrap() = None;
                }
            })
        };
        // Kill at a random point of the move.
        let frac = rng.range(20, 70);
        let t0 = Instant::now();
        loop {
            let st = move_status(&k);
            let total = num(&st, "total_bytes");
            if total > 0 && num(&st, "done_bytes") * 100 >= total * frac {
                break;
            }
            assert!(st["state"] == "running" || st["state"] == "queued", "{st}");
            assert!(t0.elapsed() < Duration::from_secs(60), "{st}");
            std::thread::sleep(Duration::from_millis(50));
        }
        k.kill9();
        stop.store(true, Ordering::Relaxed);
        let _ = writer.join();
        let ambiguous = *inflight.lock().unwrap();
        eprintln!("trial {trial}: killed at {frac}% (ambiguous write: {ambiguous:?})");
        k.spawn();
        let t0 = Instant::now();
        let st = loop {
            let st = move_status(&k);
            if st["state"] != "queued" || t0.elapsed() > Duration::from_secs(30) {
                break st;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(st["resumed"], true, "{st}");
        assert!(
            num(&st, "on_destination_at_start_bytes") > 0,
            "the resumed move started from zero: {st}"
        );
        if trial == 1 {
            let st = wait_state(&k, "done", Duration::from_secs(60));
            assert!(
                num(&st, "moved_bytes") < size,
                "resumed move copied everything again: {st}"
            );
            assert_all_on(&k, "newdisk");
        }
        // Every acknowledged write is there; the one in flight may be old or new.
        let mut versions = versions.lock().unwrap();
        let mut c = RawClient::unix(&k.nbd_sock, false);
        let mut bad = Vec::new();
        for off in (0..size).step_by(1 << 20) {
            let got = c.read(off, 1 << 20).expect("read back");
            for (i, blk) in got.chunks(BLOCK).enumerate() {
                let o = off + (i * BLOCK) as u64;
                let v = versions.get(&o).copied().unwrap_or(0);
                if blk == pattern(o, v).as_slice() {
                    continue;
                }
                match ambiguous {
                    // The unacknowledged write landed: it is the block's version from now on.
                    Some((ao, av)) if ao == o && blk == pattern(o, av).as_slice() => {
                        versions.insert(o, av);
                    }
                    _ => bad.push(o),
                }
            }
        }
        c.disconnect();
        assert!(
            bad.is_empty(),
            "trial {trial}: {} blocks lost or stale, first {:?}\nlog:\n{}",
            bad.len(),
            &bad[..bad.len().min(8)],
            k.log_text()
        );
    }
}
