//! Crash consistency: fio writes with `--verify_state_save=1` while the server is killed with
//! SIGKILL at a random point; after a restart, `fio --verify_only --verify_state_load=1` must
//! find every acknowledged write intact.
//!
//! fio 3.33's verify state assumes the writes in flight at the crash are among the last
//! `iodepth` issued. NBD servers may answer out of order, and kiln does (a write can be
//! answered hundreds of requests late), so fio may also verify a few writes that were still in
//! flight when the server died and were never acknowledged. The write phase therefore keeps a
//! completion log (`--write_lat_log --log_offset=1`, one line per acknowledged write), and a
//! verify failure counts only if its block was acknowledged. A second test tracks every
//! acknowledgement itself with a raw NBD client and tolerates nothing.
//!
//! `KILN_CRASH_SEED` replays a run (the seed is printed), `KILN_CRASH_TRIALS` changes the
//! number of trials (default 10 for fio, 3 for the raw client).

mod common;

use std::io::Read;
use std::time::{Duration, Instant};

use common::*;

/// Writes fio issues per trial: 64 MiB in 4 KiB blocks.
const BLOCKS: u64 = 16384;
const IODEPTH: u64 = 16;

fn job(k: &Kiln, phase: &[&str]) -> Vec<String> {
    let mut a = args(&[
        "--name=crash",
        "--ioengine=nbd",
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=16",
        "--size=64m",
        "--verify=crc32c",
    ]);
    a.push(format!("--uri={}", k.unix_uri()));
    a.extend(phase.iter().map(|s| s.to_string()));
    a
}

struct Outcome {
    acked_at_kill: f64,
    fio_acked: usize,
    verified: u64,
    tolerated: usize,
    replayed: String,
}

/// One trial; None when fio itself hung after the kill (no verify state to check).
fn trial(n: usize, kill_after_writes: u64, fio_seed: u64) -> Option<Outcome> {
    let mut k = Kiln::start(
        &format!("crash{n}"),
        Opts {
            fast: "192MiB",
            capacity: "512MiB",
            volume: "256MiB",
            ..Opts::default()
        },
    );
    let randseed = format!("--randseed={fio_seed}");
    let mut w = spawn_fio(
        &k.dir.path,
        &job(
            &k,
            &[
                "--do_verify=0",
                "--verify_state_save=1",
                "--write_lat_log=acked",
                "--log_offset=1",
                &randseed,
            ],
        ),
    );
    // Kill once the server has acknowledged enough writes (or fio finished, or 30 s passed).
    let t0 = Instant::now();
    let mut acked = 0.0;
    while t0.elapsed() < Duration::from_secs(30) {
        acked = writes_total(&k);
        if acked >= kill_after_writes as f64 || w.child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    k.kill9();
    // In-flight writes fail when the server dies, so fio exits non-zero here (expected).
    let w = w.finish_or_abandon(Duration::from_secs(3))?;
    let state = k.dir.join("local-crash-0-verify.state");
    assert!(
        state.exists(),
        "trial {n}: fio wrote no verify state file; {}",
        w.describe()
    );
    let fio_acked = acked_offsets(&k.dir.join("acked_clat.1.log"));
    let issued = w.total_ios("write");

    k.spawn();
    let v = fio(
        &k.dir.path,
        &job(
            &k,
            &[
                "--verify_only",
                "--verify_state_load=1",
                "--verify_state_save=0",
                &randseed,
            ],
        ),
        Duration::from_secs(120),
    );
    let what = format!(
        "trial {n} (kill after {kill_after_writes} writes, {acked} acked by the server, fio \
         issued {issued} and saw {} complete, fio seed {fio_seed}):\n--- write phase ---\n{}\n\
         --- verify phase ---\n{}",
        fio_acked.len(),
        w.describe(),
        v.describe()
    );
    assert!(v.json.is_some(), "{what}");
    let bad = bad_offsets(&v.stderr);
    let lost: Vec<u64> = bad
        .iter()
        .copied()
        .filter(|o| fio_acked.contains(o))
        .collect();
    assert!(
        lost.is_empty(),
        "{} ACKNOWLEDGED writes failed verification, offsets {lost:?}: {what}",
        lost.len()
    );
    assert!(
        bad.len() as u64 <= IODEPTH,
        "more verify failures ({}) than writes in flight: {what}",
        bad.len()
    );
    if bad.is_empty() {
        assert!(v.status.success(), "{what}");
        assert_eq!(v.job_error(), 0, "{what}");
        assert!(v.verify_errors().is_empty(), "{what}");
    }
    let verified = v.total_ios("read");
    // fio verifies up to the in-flight window of its state file.
    assert!(
        verified + 2 * IODEPTH >= fio_acked.len() as u64,
        "verified only {verified} of {} acknowledged blocks: {what}",
        fio_acked.len()
    );
    let log = k.log_text();
    let replayed = log
        .lines()
        .rev()
        .find(|l| l.contains("journal open"))
        .and_then(|l| l.split_whitespace().find(|w| w.starts_with("replayed=")))
        .unwrap_or("replayed=?")
        .to_string();
    Some(Outcome {
        acked_at_kill: acked,
        fio_acked: fio_acked.len(),
        verified,
        tolerated: bad.len(),
        replayed,
    })
}

#[test]
fn kill9_mid_write_loses_no_acknowledged_write() {
    if !require_tool("fio") {
        return;
    }
    let seed = seed_from_env("KILN_CRASH_SEED");
    let trials: usize = std::env::var("KILN_CRASH_TRIALS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    eprintln!("crash test: {trials} trials, seed {seed} (replay with KILN_CRASH_SEED={seed})");
    let mut rng = Rng::new(seed);
    let mut inconclusive = 0;
    let mut n = 0;
    while n < trials {
        // From right after the first writes to near the end of the job.
        let kill_after = rng.range(64, BLOCKS - 1000);
        let fio_seed = rng.range(1, 1 << 31);
        let t0 = Instant::now();
        // fio's nbd engine can hang on the dead connection: such a trial has nothing to
        // verify and is run again (a few times at most).
        let Some(o) = trial(n + inconclusive, kill_after, fio_seed) else {
            inconclusive += 1;
            assert!(
                inconclusive <= 3,
                "fio hung after kill -9 in {inconclusive} trials"
            );
            continue;
        };
        eprintln!(
            "trial {n}: kill after {kill_after} writes: {} acked at kill, fio saw {} complete, \
             verified {}, {} unacknowledged in-flight blocks failed verify (tolerated), \
             restart {}, {:.1}s",
            o.acked_at_kill,
            o.fio_acked,
            o.verified,
            o.tolerated,
            o.replayed,
            t0.elapsed().as_secs_f64()
        );
        n += 1;
    }
}

/// The content of block `blk` in a raw-client trial.
fn block_content(blk: u64, seed: u64) -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    Rng::new(seed ^ blk.wrapping_mul(0x9e37_79b9_7f4a_7c15)).fill(&mut b);
    b[..8].copy_from_slice(&blk.to_le_bytes());
    b[8..16].copy_from_slice(&seed.to_le_bytes());
    b
}

/// Exact bookkeeping without fio: a raw client writes every block of 64 MiB once, in a random
/// order, 16 in flight, and records which writes the server acknowledged (including replies
/// still in the socket after the kill). After the restart every acknowledged block must hold
/// its data, and every other block either its data or zeros.
fn raw_trial(n: usize, kill_after_acks: u64, seed: u64) -> (u64, u64, u64) {
    use std::sync::mpsc::sync_channel;
    let mut k = Kiln::start(
        &format!("rawcrash{n}"),
        Opts {
            fast: "192MiB",
            capacity: "512MiB",
            volume: "256MiB",
            ..Opts::default()
        },
    );
    let mut order: Vec<u64> = (0..BLOCKS).collect();
    let mut rng = Rng::new(seed);
    for i in (1..order.len()).rev() {
        order.swap(i, rng.range(0, i as u64 + 1) as usize);
    }
    let c = RawClient::unix(&k.nbd_sock, false);
    let mut tx = c.s.try_clone_box().unwrap();
    let mut rx = c.s;
    let (credit_tx, credit_rx) = sync_channel::<()>(64);
    for _ in 0..16 {
        credit_tx.send(()).unwrap();
    }
    let sender = {
        let order = order.clone();
        std::thread::spawn(move || {
            let mut sent = 0u64;
            for (i, &blk) in order.iter().enumerate() {
                if credit_rx.recv().is_err() {
                    break;
                }
                let data = block_content(blk, seed);
                let cookie = i as u64 + 1;
                if send_request(tx.as_mut(), 1, cookie, blk * 4096, 4096, &data).is_err() {
                    break;
                }
                sent += 1;
            }
            sent
        })
    };
    let mut acked = vec![false; order.len()];
    let mut n_acked = 0u64;
    let mut killed = false;
    loop {
        let mut hdr = [0u8; 16];
        if rx.read_exact(&mut hdr).is_err() {
            break;
        }
        let (err, cookie) = kiln::target::nbd_proto::client::parse_simple_reply(&hdr).unwrap();
        assert_eq!(err, 0, "write {cookie} failed with NBD error {err}");
        acked[cookie as usize - 1] = true;
        n_acked += 1;
        if !killed && n_acked >= kill_after_acks {
            k.kill9();
            killed = true;
        }
        if n_acked == BLOCKS {
            break;
        }
        let _ = credit_tx.send(());
    }
    drop(credit_tx);
    rx.shutdown_both();
    let sent = sender.join().unwrap();
    if !killed {
        k.kill9();
    }

    k.spawn();
    let mut c = RawClient::unix(&k.nbd_sock, false);
    let mut lost = Vec::new();
    let mut torn = Vec::new();
    for (i, &blk) in order.iter().enumerate().take(sent as usize) {
        let want = block_content(blk, seed);
        let got = c.read(blk * 4096, 4096).expect("read back");
        if got == want {
            continue;
        }
        if acked[i] {
            lost.push((i, blk, got.iter().all(|&b| b == 0)));
        } else if got.iter().any(|&b| b != 0) {
            torn.push((i, blk));
        }
    }
    // Never-written blocks read as zeros.
    for &blk in order.iter().skip(sent as usize).take(64) {
        assert_eq!(
            c.read(blk * 4096, 4096).unwrap(),
            vec![0; 4096],
            "block {blk}"
        );
    }
    c.disconnect();
    assert!(
        lost.is_empty() && torn.is_empty(),
        "raw trial {n} (seed {seed}, kill after {kill_after_acks} acks, {n_acked} acked, {sent} \
         sent): {} acknowledged writes lost (write#, block, reads as zeros): {:?}; {} \
         unacknowledged blocks hold neither old nor new data: {:?}",
        lost.len(),
        &lost[..lost.len().min(20)],
        torn.len(),
        &torn[..torn.len().min(20)]
    );
    // How far behind the newest request the oldest unanswered one was (fio 3.33's verify state
    // assumes at most iodepth).
    let oldest = (0..sent as usize)
        .find(|&i| !acked[i])
        .unwrap_or(sent as usize);
    (n_acked, sent, sent - oldest as u64)
}

#[test]
fn kill9_raw_client_loses_no_acknowledged_write() {
    let seed = seed_from_env("KILN_CRASH_SEED");
    let trials: usize = std::env::var("KILN_CRASH_TRIALS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    eprintln!("raw crash test: {trials} trials, seed {seed} (replay with KILN_CRASH_SEED={seed})");
    let mut rng = Rng::new(seed ^ 0x5eed);
    for n in 0..trials {
        let kill_after = rng.range(16, BLOCKS - 1000);
        let s = rng.next_u64();
        let t0 = Instant::now();
        let (acked, sent, age) = raw_trial(n, kill_after, s);
        eprintln!(
            "raw trial {n}: kill after {kill_after} acks: {acked} acked, {sent} sent, oldest \
             unanswered write {age} behind the newest, {:.1}s",
            t0.elapsed().as_secs_f64()
        );
    }
}
