//! The cold tier on S3-compatible object storage, end to end against a real local S3 server
//! (`moto_server`, started on a free 127.0.0.1 port) with real clients over NBD (fio):
//!
//! - integrity: tiers fast (file) → capacity (file) → cold (S3); fio writes with crc32c
//!   verify headers, `policy_force_tier` demotes everything, the objects appear in the
//!   bucket (plain HTTP ListObjectsV2), fio verifies every block read back through ranged
//!   GETs, a small read fetches one 64 KiB block, rewritten chunks are promoted and demoted
//!   as new generations, and after `tier_gc` the bucket holds exactly the generations the
//!   map names;
//! - crash: `kill -9` during a forced demotion, restart, fio `--verify_only` finds every
//!   acknowledged write, no map entry names a missing object, `tier_gc` deletes exactly the
//!   orphans the crash left;
//! - degraded: the S3 server is stopped (SIGSTOP) mid-run: reads of S3-resident data fail
//!   with EIO and a log line naming the tier, `tier_list` says degraded, block-resident data
//!   keeps serving reads and writes, and everything reads back once the server runs again.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::Value;

use common::s3::{self, *};
use common::*;

fn tools() -> bool {
    require_tools(&["fio", "moto_server", "curl"])
}

fn cold(k: &Kiln) -> Value {
    k.rpc("tier_list", None)
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "cold")
        .cloned()
        .expect("cold tier in tier_list")
}

fn fio_job(
    k: &Kiln,
    name: &str,
    rw: &str,
    offset: &str,
    size: &str,
    extra: &[&str],
) -> Vec<String> {
    let mut a = args(&[
        "--ioengine=nbd",
        "--bs=256k",
        "--iodepth=16",
        "--verify=crc32c",
    ]);
    a.push(format!("--name={name}"));
    a.push(format!("--rw={rw}"));
    a.push(format!("--offset={offset}"));
    a.push(format!("--size={size}"));
    a.push(format!("--uri={}", k.unix_uri()));
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

fn assert_clean(r: &FioRun, what: &str) {
    assert!(r.status.success(), "{what}: {}", r.describe());
    assert_eq!(r.job_error(), 0, "{what}: {}", r.describe());
    let bad = r.verify_errors();
    assert!(
        bad.is_empty(),
        "{what}: verify errors {bad:?}: {}",
        r.describe()
    );
}

fn run_clean(k: &Kiln, a: &[String], what: &str) -> FioRun {
    let r = fio(&k.dir.path, a, Duration::from_secs(120));
    assert_clean(&r, what);
    r
}

#[test]
fn demoted_volume_reads_back_from_s3_and_gc_keeps_only_named_generations() {
    if !tools() {
        return;
    }
    let t0 = Instant::now();
    let scratch = TempDir::new("s3-int-moto");
    let s3 = S3Server::start(&scratch.path);
    let prefix = "int";
    let k = Kiln::start("s3-int", s3::opts(&s3, prefix, "128MiB", "128MiB", 20_000));
    // Credentials never show.
    let tl = k.rpc("tier_list", None).to_string();
    assert!(!tl.contains(SECRET) && tl.contains("<redacted>"), "{tl}");
    assert_eq!(cold(&k)["kind"], "object");

    // 1. Write the whole volume with verify headers (random order; the first 16 MiB as its
    // own job, rewritten later), then demote everything.
    let head = |extra: &[&str]| fio_job(&k, "head", "randwrite", "0", "16m", extra);
    let tail = |extra: &[&str]| fio_job(&k, "tail", "randwrite", "16m", "112m", extra);
    run_clean(&k, &head(&["--do_verify=0"]), "write head");
    run_clean(&k, &tail(&["--do_verify=0"]), "write tail");
    let t_demote = Instant::now();
    k.rpc(
        "policy_force_tier",
        Some(r#"{"tier":"cold","object_size":"16MiB","wait":true}"#),
    );
    let demote_s = t_demote.elapsed().as_secs_f64();
    let (gens, all) = cold_gens(&k);
    assert!(
        all,
        "not everything is on the cold tier: {}",
        k.rpc("volume_get_map", Some(r#"{"volume":"vol0"}"#))
    );
    assert_eq!(gens.len(), 8, "128 MiB in 16 MiB objects: {gens:?}");
    let keys = s3.keys(prefix);
    assert_eq!(key_gens(&keys, prefix), gens, "bucket keys {keys:?}");
    let st = cold(&k);
    assert!(
        st["objects"]["multipart_puts"].as_u64().unwrap() >= 8,
        "{st}"
    );
    eprintln!("demoted 128 MiB in {demote_s:.1}s; tier: {st}");

    // 2. Every block reads back through ranged GETs with its crc32c intact.
    let r = run_clean(&k, &head(&["--verify_only"]), "verify head from S3");
    assert_eq!(r.total_ios("read"), 64, "{}", r.describe());
    let r = run_clean(&k, &tail(&["--verify_only"]), "verify tail from S3");
    assert_eq!(r.total_ios("read"), 448, "{}", r.describe());

    // 3. A small read fetches one 64 KiB block, not the object (its header is cached).
    let before = cold(&k)["objects"]["get_bytes"].as_u64().unwrap();
    let one = fio_job(
        &k,
        "one",
        "read",
        "96m",
        "4k",
        &["--bs=4k", "--verify=0", "--iodepth=1"],
    );
    run_clean(&k, &one, "small read");
    let fetched = cold(&k)["objects"]["get_bytes"].as_u64().unwrap() - before;
    assert!(fetched == 64 << 10, "a 4 KiB read fetched {fetched} bytes");

    // 4. Rewrite the first 16 MiB: the write promotes its object to a block tier.
    let rewrite = fio_job(
        &k,
        "rewrite",
        "randwrite",
        "0",
        "16m",
        &["--do_verify=0", "--randseed=99"],
    );
    run_clean(&k, &rewrite, "rewrite");
    let (after_write, all) = cold_gens(&k);
    assert!(
        !all && after_write.len() == 7,
        "rewritten object still cold: {after_write:?}"
    );
    // Demote again: the rewritten chunk becomes a new generation.
    k.rpc(
        "policy_force_tier",
        Some(r#"{"tier":"cold","object_size":"16MiB","wait":true}"#),
    );
    let (gens2, all) = cold_gens(&k);
    assert!(all && gens2.len() == 8, "{gens2:?}");
    let new: Vec<_> = gens2.difference(&gens).collect();
    let gone: Vec<_> = gens.difference(&gens2).collect();
    assert!(
        new.len() == 1 && gone.len() == 1 && new[0] > gone[0],
        "new {new:?} old {gone:?}"
    );
    // 5. tier_gc: afterwards the bucket holds exactly the generations the map names.
    let gc = k.rpc("tier_gc", Some(r#"{"tier":"cold"}"#));
    assert_eq!(
        key_gens(&s3.keys(prefix), prefix),
        gens2,
        "after tier_gc {gc}"
    );
    assert!(!s3
        .keys(prefix)
        .iter()
        .any(|key| key.ends_with(&format!("{:016x}", gone[0]))));
    // Both jobs still verify.
    let r = run_clean(
        &k,
        &fio_job(
            &k,
            "rewrite",
            "randwrite",
            "0",
            "16m",
            &["--verify_only", "--randseed=99"],
        ),
        "verify rewrite",
    );
    assert_eq!(r.total_ios("read"), 64);
    run_clean(&k, &tail(&["--verify_only"]), "verify tail again");
    eprintln!(
        "integrity: {:.1}s, gc {gc}, tier {}",
        t0.elapsed().as_secs_f64(),
        cold(&k)
    );
}

#[test]
fn kill9_during_demotion_loses_nothing_and_gc_deletes_the_orphans() {
    if !tools() {
        return;
    }
    let scratch = TempDir::new("s3-crash-moto");
    let s3 = S3Server::start(&scratch.path);
    let prefix = "crash";
    let mut k = Kiln::start(
        "s3-crash",
        s3::opts(&s3, prefix, "128MiB", "128MiB", 20_000),
    );
    let write = fio_job(&k, "all", "randwrite", "0", "128m", &["--do_verify=0"]);
    run_clean(&k, &write, "write");
    // Three rounds: start (or resume) the forced demotion, kill -9 while an object is in
    // flight a few ms after it started (so some kills land after its upload, before its
    // switch), restart, check.
    let mut orphans_total = 0;
    let mut named = BTreeSet::new();
    for (round, delay_ms) in [(0u64, 0u64), (1, 25), (2, 60)] {
        k.rpc(
            "policy_force_tier",
            Some(r#"{"tier":"cold","object_size":"4MiB"}"#),
        );
        let t0 = Instant::now();
        loop {
            let st = k.rpc("migration_get_status", None);
            if st["demotions"].as_u64().unwrap() >= 3 && st["in_flight"].as_u64().unwrap() == 1 {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "round {round}: no demotion in flight: {st}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(delay_ms));
        k.kill9();
        let at_kill = key_gens(&s3.keys(prefix), prefix);
        k.spawn();
        let (now_named, all) = cold_gens(&k);
        assert!(!all, "round {round}: the forced pass cannot have finished");
        assert!(
            now_named.len() >= named.len() + 3,
            "round {round}: durable demotions lost: {now_named:?} after {named:?}"
        );
        named = now_named;
        // Never a dangling map entry: every generation the map names is in the bucket.
        assert!(
            named.is_subset(&at_kill),
            "round {round}: map names missing objects: {named:?} vs {at_kill:?}"
        );
        let verify = fio_job(&k, "all", "randwrite", "0", "128m", &["--verify_only"]);
        let r = run_clean(&k, &verify, &format!("round {round}: verify after kill -9"));
        assert_eq!(r.total_ios("read"), 512);
        // (Listed again now: a PUT the server received before the kill may have finished
        // after it.)
        let before_gc = key_gens(&s3.keys(prefix), prefix);
        let orphans = before_gc.difference(&named).count() as u64;
        let gc = k.rpc("tier_gc", Some(r#"{"tier":"cold"}"#));
        assert_eq!(gc["deleted"].as_u64(), Some(orphans), "round {round}: {gc}");
        assert_eq!(key_gens(&s3.keys(prefix), prefix), named, "round {round}");
        eprintln!(
            "crash round {round}: killed {delay_ms} ms into an upload; {} objects named, {orphans} orphans deleted by tier_gc",
            named.len()
        );
        orphans_total += orphans;
    }
    let orphans = orphans_total;
    eprintln!(
        "crash: {} objects named, {orphans} orphans deleted by tier_gc",
        named.len()
    );
}

#[test]
fn stopped_s3_fails_cold_reads_with_eio_and_recovers() {
    if !tools() {
        return;
    }
    let scratch = TempDir::new("s3-deg-moto");
    let s3 = S3Server::start(&scratch.path);
    let prefix = "deg";
    let k = Kiln::start("s3-deg", s3::opts(&s3, prefix, "128MiB", "64MiB", 3000));
    let cold_job = fio_job(&k, "coldpart", "randwrite", "0", "32m", &["--do_verify=0"]);
    run_clean(&k, &cold_job, "write cold part");
    k.rpc("policy_force_tier", Some(r#"{"tier":"cold","wait":true}"#));
    // The other half is written after the demotion: it lives on a block tier.
    let warm_job = |extra: &[&str]| fio_job(&k, "warmpart", "randwrite", "32m", "32m", extra);
    run_clean(&k, &warm_job(&["--do_verify=0"]), "write warm part");

    s3.signal(libc::SIGSTOP);
    let mut read_cold = fio_job(&k, "coldpart", "randwrite", "0", "32m", &["--verify_only"]);
    read_cold.push("--iodepth=4".into());
    let r = fio(&k.dir.path, &read_cold, Duration::from_secs(120));
    assert!(
        !r.status.success() || r.job_error() != 0,
        "cold reads succeeded: {}",
        r.describe()
    );
    assert!(
        r.job_error() == libc::EIO as i64 || r.stderr.contains("Input/output error"),
        "{}",
        r.describe()
    );
    let t0 = Instant::now();
    while cold(&k)["degraded"] != true {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "tier not degraded: {}",
            cold(&k)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = k.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("object tier 'cold'") && l.contains("DEGRADED")),
        "no log line names the tier:\n{log}"
    );
    // The gauge is refreshed every 500 ms.
    let t0 = Instant::now();
    while metric_value(&k.scrape(), "kiln_tier_degraded", &[("tier", "cold")]) != Some(1.0) {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "kiln_tier_degraded: {}",
            k.scrape()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Block-resident data keeps serving, reads and writes.
    run_clean(
        &k,
        &warm_job(&["--do_verify=1"]),
        "warm part while S3 is down",
    );
    let e = k
        .try_rpc("policy_force_tier", Some(r#"{"tier":"cold"}"#))
        .unwrap_err();
    assert!(e.contains("degraded"), "{e}");

    s3.signal(libc::SIGCONT);
    let t0 = Instant::now();
    while cold(&k)["degraded"] != false {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "tier did not recover: {}",
            cold(&k)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let r = run_clean(&k, &read_cold, "cold part after recovery");
    assert_eq!(r.total_ios("read"), 128);
    assert!(k.log_text().contains("answers again"));
}
