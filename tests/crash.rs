//! Crash consistency: fio writes with `--verify_state_save=1` while the server is killed with
//! SIGKILL at a random point; after a restart, `fio --verify_only --verify_state_load=1` must
//! find every acknowledged write intact.
//!
//! `KILN_CRASH_SEED` replays a run (the seed is printed), `KILN_CRASH_TRIALS` changes the
//! number of trials (default 10).

mod common;

use std::time::{Duration, Instant};

use common::*;

/// Writes fio issues per trial: 64 MiB in 4 KiB blocks.
const BLOCKS: u64 = 16384;

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
    fio_writes: u64,
    verified: u64,
    replayed: String,
}

fn trial(n: usize, kill_after_writes: u64, fio_seed: u64) -> Outcome {
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
    let w = spawn_fio(
        &k.dir.path,
        &job(&k, &["--do_verify=0", "--verify_state_save=1", &randseed]),
    );
    // Kill once the server has acknowledged enough writes (or fio finished, or 30 s passed).
    let t0 = Instant::now();
    let mut acked = 0.0;
    let mut w = w;
    while t0.elapsed() < Duration::from_secs(30) {
        acked = writes_total(&k);
        if acked >= kill_after_writes as f64 || w.child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    k.kill9();
    let w = w.finish(Duration::from_secs(60));
    // In-flight writes fail when the server dies, so fio usually exits non-zero here; only
    // completed writes are recorded in the state file.
    let fio_writes = w.total_ios("write");
    let state = k.dir.join("local-crash-0-verify.state");
    assert!(
        state.exists(),
        "trial {n}: fio wrote no verify state file; {}",
        w.describe()
    );

    k.spawn();
    let v = fio(
        &k.dir.path,
        &job(&k, &["--verify_only", "--verify_state_load=1", &randseed]),
        Duration::from_secs(120),
    );
    let what = format!(
        "trial {n} (kill after {kill_after_writes} writes, {acked} acked, fio completed \
         {fio_writes}, fio seed {fio_seed}):\n--- write phase ---\n{}\n--- verify phase ---\n{}",
        w.describe(),
        v.describe()
    );
    assert!(v.status.success(), "{what}");
    assert_eq!(v.job_error(), 0, "{what}");
    assert!(v.verify_errors().is_empty(), "{what}");
    let verified = v.total_ios("read");
    // fio verifies the writes it saw complete; allow for the in-flight window.
    assert!(
        verified + 32 >= fio_writes && (fio_writes == 0 || verified > 0),
        "verified only {verified} of {fio_writes} blocks: {what}"
    );
    let log = k.log_text();
    let replayed = log
        .lines()
        .rev()
        .find(|l| l.contains("journal open"))
        .and_then(|l| l.split_whitespace().find(|w| w.starts_with("replayed=")))
        .unwrap_or("replayed=?")
        .to_string();
    Outcome {
        acked_at_kill: acked,
        fio_writes,
        verified,
        replayed,
    }
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
    for n in 0..trials {
        // From right after the first writes to near the end of the job.
        let kill_after = rng.range(64, BLOCKS - 1000);
        let fio_seed = rng.range(1, 1 << 31);
        let t0 = Instant::now();
        let o = trial(n, kill_after, fio_seed);
        eprintln!(
            "trial {n}: kill after {kill_after} writes: {} acked at kill, fio completed {}, \
             verified {}, restart {}, {:.1}s",
            o.acked_at_kill,
            o.fio_writes,
            o.verified,
            o.replayed,
            t0.elapsed().as_secs_f64()
        );
    }
}
