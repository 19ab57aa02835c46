//! The fio external ioengine (`native/kiln_fio.c`, `libkiln_fio.so`): real fio drives kiln
//! devices in-process and verifies every block it wrote with crc32c.
//!
//! Needs fio and a `libkiln_fio.so` built with the engine (`ci/fio-headers.sh`, then
//! `cargo build --release`). Under `CI=true` either missing is a failure; elsewhere the
//! tests print SKIPPED.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(120);

/// `target/<profile>/libkiln_fio.so` next to this test's `deps/` directory, or
/// `$KILN_FIO_ENGINE`.
fn engine_path() -> PathBuf {
    if let Some(p) = std::env::var_os("KILN_FIO_ENGINE") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent()
        .and_then(|deps| deps.parent())
        .expect("test binary lives in target/<profile>/deps")
        .join("libkiln_fio.so")
}

/// `--ioengine=external:...` when fio and an engine-carrying library are there.
fn engine_arg() -> Option<String> {
    if !require_tool("fio") {
        return None;
    }
    let path = engine_path();
    let bytes = std::fs::read(&path).unwrap_or_default();
    let built = !bytes.is_empty();
    // The library always exists after `cargo build`; it carries the engine only when
    // native/build.rs found fio's headers (then it exports get_ioengine).
    let has_engine = bytes.windows(13).any(|w| w == b"get_ioengine\0");
    let why = if !built {
        format!(
            "{} is missing (run `cargo build --release`)",
            path.display()
        )
    } else {
        format!(
            "{} was built without fio's headers (run ci/fio-headers.sh, then `cargo build --release`)",
            path.display()
        )
    };
    if !require(built && has_engine, "the fio external ioengine", &why) {
        return None;
    }
    Some(format!("--ioengine=external:{}", path.display()))
}

fn jobs(run: &FioRun) -> &Vec<Value> {
    run.json
        .as_ref()
        .and_then(|j| j["jobs"].as_array())
        .unwrap_or_else(|| panic!("fio printed no jobs: {}", run.describe()))
}

/// fio exited 0, every job reports error 0, and no verify failure was printed.
fn assert_clean(run: &FioRun) {
    assert!(run.status.success(), "{}", run.describe());
    for job in jobs(run) {
        assert_eq!(
            job["error"].as_i64(),
            Some(0),
            "job {}: {}",
            job["jobname"],
            run.describe()
        );
    }
    assert!(
        run.verify_errors().is_empty(),
        "verify mismatches: {:?}\n{}",
        run.verify_errors(),
        run.describe()
    );
}

fn ios(job: &Value, dir: &str) -> u64 {
    job[dir]["total_ios"].as_u64().unwrap_or(0)
}

/// The acceptance command: random mixed I/O on `malloc:256M`, every written block
/// read back and checked by crc32c. The spec is passed unescaped; the engine rejoins what
/// fio split at ':'.
#[test]
fn randrw_crc32c_verify_on_malloc() {
    let Some(engine) = engine_arg() else { return };
    let dir = TempDir::new("fio-engine");
    let run = fio(
        &dir.path,
        &args(&[
            &engine,
            "--name=randrw",
            "--filename=malloc:256M",
            "--rw=randrw",
            "--verify=crc32c",
            "--bs=4k",
            "--iodepth=32",
            "--iodepth_batch_submit=8",
            "--iodepth_batch_complete_min=1",
        ]),
        LIMIT,
    );
    assert_clean(&run);
    let job = run.job();
    let (reads, writes) = (ios(job, "read"), ios(job, "write"));
    // randrw over 256 MiB at 4 KiB: about half of the 65536 blocks are written, and the
    // verify phase reads every written block back.
    assert!(
        writes > 16_384,
        "too few writes: {writes}\n{}",
        run.describe()
    );
    assert!(
        reads >= writes,
        "reads {reads} < writes {writes}: not every write verified"
    );
    assert_eq!(job["job options"]["filename"].as_str(), Some("malloc:256M"));
}

/// Several fio jobs as threads of one process: each has its own kiln channel on the one
/// shared `malloc:` device, each writes and verifies its own 64 MiB.
#[test]
fn threads_share_one_device_each_with_its_channel() {
    let Some(engine) = engine_arg() else { return };
    let dir = TempDir::new("fio-engine");
    // spawn_fio passes --thread.
    let run = fio(
        &dir.path,
        &args(&[
            &engine,
            "--name=jobs",
            "--filename=malloc\\:256M",
            "--numjobs=4",
            "--offset_increment=64M",
            "--size=64M",
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--verify=crc32c",
        ]),
        LIMIT,
    );
    assert_clean(&run);
    let jobs = jobs(&run);
    assert_eq!(jobs.len(), 4, "{}", run.describe());
    for job in jobs {
        assert_eq!(ios(job, "write"), 16_384, "job {}", job["jobname"]);
        assert_eq!(
            ios(job, "read"),
            16_384,
            "job {} did not verify every block",
            job["jobname"]
        );
    }
}

/// A later job in the same fio process reads and verifies what an earlier job wrote: both
/// handles on `malloc:64M` are the same device.
#[test]
fn a_later_job_verifies_what_an_earlier_job_wrote() {
    let Some(engine) = engine_arg() else { return };
    let dir = TempDir::new("fio-engine");
    let run = fio(
        &dir.path,
        &args(&[
            &engine,
            "--filename=malloc:64M",
            "--bs=64k",
            "--verify=crc32c",
            "--name=writer",
            "--rw=write",
            "--do_verify=0",
            "--name=reader",
            "--stonewall",
            "--rw=read",
        ]),
        LIMIT,
    );
    assert_clean(&run);
    let jobs = jobs(&run);
    assert_eq!(ios(&jobs[0], "write"), 1024);
    assert_eq!(ios(&jobs[1], "read"), 1024);
}

/// fio's default process mode: each job process opens its own channel; a `file:` device
/// is shared through the kernel, and sync requests become kiln flushes.
#[test]
fn processes_with_fsync_on_a_file_device() {
    let Some(engine) = engine_arg() else { return };
    let dir = TempDir::new("fio-engine");
    let img = dir.join("disk.img");
    let spec = format!("--filename=file\\:{}?size=64M", img.display());
    let run = fio_processes(
        &dir.path,
        &args(&[
            &engine,
            "--name=procs",
            &spec,
            "--numjobs=2",
            "--offset_increment=32M",
            "--size=16M",
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--fsync=16",
            "--verify=crc32c",
        ]),
        LIMIT,
    );
    assert_clean(&run);
    let jobs = jobs(&run);
    assert_eq!(jobs.len(), 2, "{}", run.describe());
    for job in jobs {
        assert_eq!(ios(job, "write"), 4096, "job {}", job["jobname"]);
        assert_eq!(ios(job, "read"), 4096, "job {}", job["jobname"]);
        assert!(
            job["sync"]["total_ios"].as_u64().unwrap_or(0) > 0,
            "no fsync reached the device: {}",
            job["sync"]
        );
    }
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 64 << 20);
}

/// The verification is real: a device that silently flips a byte in some reads makes fio
/// report crc32c mismatches through the engine.
#[test]
fn corrupted_reads_fail_verification() {
    let Some(engine) = engine_arg() else { return };
    let dir = TempDir::new("fio-engine");
    let run = fio(
        &dir.path,
        &args(&[
            &engine,
            "--name=corrupt",
            "--filename=error:0.05,7,mode=corrupt:malloc:16M",
            "--rw=write",
            "--bs=4k",
            "--iodepth=8",
            "--verify=crc32c",
        ]),
        LIMIT,
    );
    assert!(
        !run.status.success(),
        "fio passed on a corrupting device: {}",
        run.describe()
    );
    // EILSEQ is how fio's verify reports a mismatch.
    assert_eq!(run.job_error(), libc::EILSEQ as i64, "{}", run.describe());
    assert!(
        run.stderr.contains("crc32c") || run.stdout.contains("crc32c"),
        "no crc32c mismatch reported: {}",
        run.describe()
    );
}

/// A spec kiln cannot parse fails the job with the parser's message.
#[test]
fn a_bad_spec_fails_with_the_reason() {
    let Some(engine) = engine_arg() else { return };
    let dir = TempDir::new("fio-engine");
    let run = fio(
        &dir.path,
        &args(&[
            &engine,
            "--name=bad",
            "--filename=malloc:12345",
            "--rw=read",
        ]),
        LIMIT,
    );
    assert!(!run.status.success(), "{}", run.describe());
    let text = format!("{}{}", run.stdout, run.stderr);
    assert!(
        text.contains("bad device spec: 'malloc:12345'"),
        "no parser message: {}",
        run.describe()
    );
}
