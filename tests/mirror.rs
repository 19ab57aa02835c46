//! Redundancy end to end: the fast tier is a `mirror:` of two files, each leg
//! wrapped in an `error` device that starts switched off. fio writes and
//! verifies through NBD while one leg starts failing every I/O; the client
//! must see no error and no mismatch, and the mirror must say it is degraded.
//! Then the leg is replaced and resynced, the *other* leg is failed, and the
//! data must still verify: every read now comes from the resynced leg.
//! A second test kills the server while degraded and checks that the stale
//! leg is remembered across the restart (its superblock) and resynced.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const LEG: &str = "320MiB";

fn mirror_opts() -> Opts {
    Opts {
        fast: "256MiB",
        fast_device: Some(format!(
            "mirror:error:1,1,enabled=0:file:{{d}}/legA.img?size={LEG}\
             |error:1,2,enabled=0:file:{{d}}/legB.img?size={LEG}"
        )),
        ..Opts::default()
    }
}

/// Sequential 64 KiB writes with crc32c headers; `phase` adds --do_verify or --verify_only.
fn fio_job(k: &Kiln, phase: &[&str]) -> Vec<String> {
    let mut a = args(&[
        "--name=mirror",
        "--ioengine=nbd",
        "--rw=write",
        "--bs=64k",
        "--iodepth=16",
        "--size=160m",
        "--verify=crc32c",
    ]);
    a.push(format!("--uri={}", k.unix_uri()));
    a.extend(phase.iter().map(|s| s.to_string()));
    a
}

fn assert_clean(r: &FioRun, what: &str) {
    assert!(r.status.success(), "{what}: {}", r.describe());
    assert_eq!(r.job_error(), 0, "{what}: {}", r.describe());
    assert!(r.verify_errors().is_empty(), "{what}: {}", r.describe());
}

fn status(k: &Kiln) -> Value {
    k.rpc("bdev_mirror_get_status", Some(r#"{"tier":"fast"}"#))
}

fn wait_resynced(k: &Kiln, completed_at_least: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let st = status(k);
        if st["resyncs_completed"].as_u64().unwrap_or(0) >= completed_at_least
            && st["degraded"] == Value::Bool(false)
        {
            return st;
        }
        assert!(Instant::now() < deadline, "resync did not finish: {st}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn mirror_fails_over_without_client_errors_then_resyncs_a_new_leg() {
    if !require_tools(&["fio", "curl"]) {
        return;
    }
    let k = Kiln::start("mirror", mirror_opts());
    let st = status(&k);
    assert_eq!(st["degraded"], Value::Bool(false), "{st}");

    // Fail leg A once fio has written a good part of its data.
    let writer = spawn_fio(&k.dir.path, &fio_job(&k, &["--do_verify=1"]));
    let t0 = Instant::now();
    while writes_total(&k) < 600.0 {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "fio made no progress"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let inj = k.rpc(
        "bdev_error_inject",
        Some(r#"{"name":"legA.img","enable":true}"#),
    );
    assert_eq!(inj["devices"].as_array().map(|a| a.len()), Some(1), "{inj}");
    let r = writer.finish(Duration::from_secs(300));
    assert_clean(&r, "write + verify while leg A fails");
    assert_eq!(r.total_ios("read"), 2560, "every block verified");

    let st = status(&k);
    assert_eq!(st["degraded"], Value::Bool(true), "{st}");
    assert_eq!(st["states"][0], "faulted", "{st}");
    assert_eq!(st["states"][1], "in_sync", "{st}");
    assert!(st["failovers"].as_u64().unwrap() >= 1, "{st}");
    let m = k.scrape();
    assert_eq!(
        metric_value(&m, "kiln_mirror_degraded", &[("tier", "fast")]),
        Some(1.0),
        "{m:.2000}"
    );

    // Replace leg A with a new file and watch the resync complete.
    let replace = format!(
        r#"{{"tier":"fast","leg":0,"resync_mib_s":400,
            "spec":"error:1,3,enabled=0:file:{}/legC.img?size={LEG}"}}"#,
        k.dir.path.display()
    );
    let st = k.rpc("bdev_mirror_replace", Some(&replace));
    assert_eq!(st["states"][0], "faulted", "replace answers at once: {st}");
    let st = wait_resynced(&k, 1);
    assert!(st["legs"][0].as_str().unwrap().contains("legC.img"), "{st}");
    assert_eq!(
        st["resync_done_bytes"], st["resync_total_bytes"],
        "whole leg copied: {st}"
    );

    // Now fail leg B: every read must be served by the resynced leg C.
    k.rpc(
        "bdev_error_inject",
        Some(r#"{"name":"legB.img","enable":true}"#),
    );
    let v = fio(
        &k.dir.path,
        &fio_job(&k, &["--verify_only"]),
        Duration::from_secs(300),
    );
    assert_clean(&v, "verify from the resynced leg alone");
    assert_eq!(v.total_ios("read"), 2560);
    let st = status(&k);
    assert_eq!(st["states"][1], "faulted", "leg B failed reads: {st}");
    assert_eq!(st["states"][0], "in_sync", "{st}");
}

#[test]
fn a_stale_leg_is_remembered_across_kill_9_and_resynced() {
    if !require_tool("fio") {
        return;
    }
    let mut k = Kiln::start("mirror-restart", mirror_opts());
    k.rpc(
        "bdev_error_inject",
        Some(r#"{"name":"legB.img","enable":true}"#),
    );
    // Every write below misses leg B: only leg A holds the data.
    let w = fio(
        &k.dir.path,
        &fio_job(&k, &["--do_verify=0"]),
        Duration::from_secs(300),
    );
    assert_clean(&w, "write while leg B fails");
    assert_eq!(status(&k)["states"][1], "faulted");
    k.kill9();
    // Restart: injection is off again, so leg B would serve reads happily if the
    // mirror forgot that it missed those writes.
    k.spawn();
    let st = status(&k);
    assert_eq!(
        st["degraded"],
        Value::Bool(true),
        "leg B must come back stale: {st}"
    );
    assert_ne!(st["states"][1], "in_sync", "{st}");
    let v = fio(
        &k.dir.path,
        &fio_job(&k, &["--verify_only"]),
        Duration::from_secs(300),
    );
    assert_clean(&v, "verify after restart while leg B resyncs");
    let _ = wait_resynced(&k, 1);
    // Fail leg A: the resynced leg B alone must hold every block.
    k.rpc(
        "bdev_error_inject",
        Some(r#"{"name":"legA.img","enable":true}"#),
    );
    let v = fio(
        &k.dir.path,
        &fio_job(&k, &["--verify_only"]),
        Duration::from_secs(300),
    );
    assert_clean(&v, "verify from the resynced leg B alone");
    assert_eq!(v.total_ios("read"), 2560);
}
