//! Crash-point enumeration with the real binary: for every point in
//! `kiln::crashpoint::POINTS` (a point before and after each durable step of allocation,
//! trim, checkpoint, log wrap, promotion, demotion, batched and object switches and
//! volume moves), `kiln serve` runs with `KILN_CRASHPOINT=point`, a workload or RPC
//! reaches it, the process dies by SIGKILL there (exit status and its one stderr line are
//! checked), and the next start recovers: every acknowledged write reads back (fio
//! `--verify_only` over crc32c headers), every 1 MiB chunk is wholly on one tier, the
//! mapped bytes add up, the step's own outcome holds (docs/FORMAT.md, "Crash points") and
//! the interrupted migration resumes or can be run again to its end.
//!
//! Points are chained: the start that recovers from one crash is armed with the next
//! point, so a scenario needs one server start per point. `every_point_has_a_scenario`
//! checks that the scenarios together name every listed point.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use common::s3::{self, cold_gens, key_gens, S3Server};
use common::*;

const STATIC: &str = r#"
[policy]
policy = "static"
interval_ms = 200
"#;

const MIB: u64 = 1 << 20;
const PREFILL: &str = "16m";
const PREFILL_BYTES: u64 = 16 * MIB;

/// fast 128 MiB (64 MiB of it metadata), capacity 512 MiB, a 64 MiB volume, no policy moves.
fn opts() -> Opts {
    let mut o = Opts {
        fast: "128MiB",
        capacity: "512MiB",
        volume: "64MiB",
        ..Opts::default()
    };
    o.reactor.push_str(STATIC);
    o
}

fn name_of(point: &str) -> &str {
    point.split(':').next().unwrap()
}

/// A server directory driven through a chain of crash points.
struct Chain {
    k: Kiln,
    /// Log bytes before the current start (the crash line must be after it).
    log_at: usize,
    /// The point the running (or last) start is armed with.
    armed: Option<String>,
    t0: Instant,
}

impl Chain {
    fn new(tag: &str, opts: Opts) -> Chain {
        Chain {
            k: Kiln::configure(tag, opts),
            log_at: 0,
            armed: None,
            t0: Instant::now(),
        }
    }

    /// Starts the server armed with `point` (or unarmed). Returns false when it died
    /// at the point during start-up (recovery), which is then checked as a crash.
    fn start(&mut self, point: Option<&str>) -> bool {
        self.log_at = self.k.log_text().len();
        self.armed = point.map(str::to_string);
        match point {
            Some(p) => self.k.spawn_env(&[("KILN_CRASHPOINT", p)]),
            None => self.k.spawn_env(&[]),
        }
        match self.k.ready_or_exit(Duration::from_secs(60)) {
            Ok(()) => true,
            Err(st) => {
                self.check_crash(st);
                false
            }
        }
    }

    /// Waits for the armed point to kill the server (within `limit`) and checks it did.
    fn expect_crash(&mut self, limit: Duration) {
        let point = self.armed.clone().expect("a point is armed");
        let Some(st) = self.k.wait_exit(limit) else {
            panic!(
                "crash point {point} not reached within {limit:?}; log:\n{}",
                self.k.log_text()
            );
        };
        self.check_crash(st);
    }

    fn check_crash(&mut self, st: ExitStatus) {
        use std::os::unix::process::ExitStatusExt;
        let point = self
            .armed
            .clone()
            .unwrap_or_else(|| panic!("unarmed server exited ({st}); log:\n{}", self.k.log_text()));
        let log = self.k.log_text();
        let line = format!("kiln: crash point {} hit", name_of(&point));
        assert_eq!(
            st.signal(),
            Some(libc::SIGKILL),
            "{point}: server exited with {st}, not SIGKILL; log:\n{log}"
        );
        assert!(
            log[self.log_at.min(log.len())..].contains(&line),
            "{point}: killed, but no '{line}' line; log:\n{log}"
        );
        eprintln!(
            "[{:6.1}s] crashed at {point} as armed",
            self.t0.elapsed().as_secs_f64()
        );
    }

    /// Runs an RPC that the armed point interrupts (its error is the crash), then checks
    /// the crash.
    fn rpc_crash(&mut self, method: &str, params: &str) {
        let r = self.k.try_rpc(method, Some(params));
        self.expect_crash(Duration::from_secs(60));
        if let Ok(v) = r {
            // An asynchronous RPC may answer before the crash; a waiting one may not.
            assert!(
                v.get("done").is_none(),
                "{method} {params} completed although the server crashed: {v}"
            );
        }
    }
}

/// A sequential 1 MiB write job over `[0, size)` with crc32c verify headers.
fn seq_job(k: &Kiln, size: &str, extra: &[&str]) -> Vec<String> {
    let mut a = args(&[
        "--name=prefill",
        "--ioengine=nbd",
        "--rw=write",
        "--bs=1m",
        "--iodepth=1",
        "--offset=0",
        "--verify=crc32c",
    ]);
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

fn prefill(k: &Kiln) {
    let r = fio(
        &k.dir.path,
        &seq_job(k, PREFILL, &["--do_verify=0"]),
        Duration::from_secs(120),
    );
    assert_clean(&r, "prefill");
}

/// Every block of the first `bytes` reads back with its crc32c header intact.
fn verify(k: &Kiln, bytes: u64, what: &str) {
    if bytes == 0 {
        return;
    }
    let size = format!("{}m", bytes / MIB);
    let r = fio(
        &k.dir.path,
        &seq_job(k, &size, &["--verify_only"]),
        Duration::from_secs(120),
    );
    assert_clean(&r, what);
    assert_eq!(r.total_ios("read"), bytes / MIB, "{what}: {}", r.describe());
}

/// Sequential writes (queue depth 1) that an armed allocation point interrupts; returns
/// the bytes fio saw acknowledged (a prefix of the volume), None if fio hung after the kill.
fn writes_until_crash(c: &mut Chain) -> Option<u64> {
    let log = c.k.dir.join("acked_clat.1.log");
    let _ = std::fs::remove_file(&log);
    let w = spawn_fio(
        &c.k.dir.path,
        &seq_job(
            &c.k,
            PREFILL,
            &["--do_verify=0", "--write_lat_log=acked", "--log_offset=1"],
        ),
    );
    c.expect_crash(Duration::from_secs(60));
    w.finish_or_abandon(Duration::from_secs(10))?;
    let acked = acked_offsets(&log);
    let n = acked.len() as u64;
    // Queue depth 1, sequential: what was acknowledged is exactly the first n blocks.
    assert!(
        (0..n).all(|i| acked.contains(&(i * MIB))),
        "acknowledged blocks are not a prefix: {acked:?}"
    );
    Some(n * MIB)
}

/// Mapped bytes per tier name; asserts that every 1 MiB chunk lies wholly on one tier.
fn tiers(k: &Kiln) -> BTreeMap<String, u64> {
    let map = k.rpc("volume_get_map", Some(r#"{"volume":"vol0"}"#));
    let mut per_tier = BTreeMap::new();
    let mut chunk_tier: BTreeMap<u64, String> = BTreeMap::new();
    for c in map["chunks"].as_array().unwrap() {
        let Some(t) = c["tier"].as_str() else {
            continue;
        };
        let (off, len) = (c["offset"].as_u64().unwrap(), c["length"].as_u64().unwrap());
        *per_tier.entry(t.to_string()).or_insert(0) += len;
        let mut o = off;
        while o < off + len {
            let prev = chunk_tier.insert(o / MIB, t.to_string());
            assert!(
                prev.as_deref().is_none_or(|p| p == t),
                "chunk at {} MiB is split between tiers {prev:?} and {t}: {map}",
                o / MIB
            );
            o += map["granule_bytes"].as_u64().unwrap();
        }
    }
    per_tier
}

fn only(tier: &str, bytes: u64) -> BTreeMap<String, u64> {
    BTreeMap::from([(tier.to_string(), bytes)])
}

fn force(tier: &str) -> String {
    format!(r#"{{"tier":"{tier}","wait":true}}"#)
}

/// Allocation, checkpoint, promotion, demotion and release between two file tiers.
#[test]
fn file_tier_points() {
    if !require_tool("fio") {
        return;
    }
    let mut c = Chain::new("cp-file", opts());
    // 1. New-chunk allocation (the 3rd Map commit of a sequential write).
    assert!(c.start(Some("alloc.map.before_commit:3")));
    let acked = writes_until_crash(&mut c);
    assert!(c.start(Some("alloc.map.after_commit:3")));
    if let Some(b) = acked {
        assert_eq!(b, 2 * MIB, "before the 3rd allocation commit");
        verify(&c.k, b, "acknowledged writes after alloc.map.before_commit");
    }
    // The first two chunks are mapped: this run's 3rd allocation is chunk 5.
    let acked = writes_until_crash(&mut c);
    assert!(c.start(Some("migrate.copy.before")));
    if let Some(b) = acked {
        assert_eq!(b, 4 * MIB, "before chunk 5's write");
        verify(&c.k, b, "acknowledged writes after alloc.map.after_commit");
    }
    // Chunk 5 was mapped by the durable record, never written: it reads zeros (old data).
    let m = tiers(&c.k);
    assert_eq!(m, only("fast", 5 * MIB), "after alloc.map.after_commit");
    prefill(&c.k);
    verify(&c.k, PREFILL_BYTES, "prefill");

    // 2. Demotion fast -> capacity, one switch record for the whole run.
    let chain = [
        ("migrate.copy.after_flush", "fast"),
        ("demote.switch.before_commit", "fast"),
        ("demote.switch.after_commit", "fast"),
        ("promote.switch.before_commit", "capacity"),
    ];
    let mut prev = "migrate.copy.before";
    for (next, on) in chain {
        c.rpc_crash("policy_force_tier", &force("capacity"));
        assert!(c.start(Some(next)));
        verify(&c.k, PREFILL_BYTES, &format!("after {prev}"));
        assert_eq!(tiers(&c.k), only(on, PREFILL_BYTES), "after {prev}");
        prev = next;
    }
    // 3. Promotion capacity -> fast.
    c.rpc_crash("policy_force_tier", &force("fast"));
    assert!(c.start(Some("promote.switch.after_commit")));
    verify(&c.k, PREFILL_BYTES, "after promote.switch.before_commit");
    assert_eq!(tiers(&c.k), only("capacity", PREFILL_BYTES));
    c.rpc_crash("policy_force_tier", &force("fast"));
    assert!(c.start(Some("migrate.release.after_free")));
    verify(&c.k, PREFILL_BYTES, "after promote.switch.after_commit");
    assert_eq!(tiers(&c.k), only("fast", PREFILL_BYTES));
    // 4. Release of the old space after a demotion's switch.
    c.rpc_crash("policy_force_tier", &force("capacity"));
    // 5. Checkpoints: recovery's own checkpoint at start-up crashes, three times.
    assert!(!c.start(Some("checkpoint.before_slot_write")));
    assert!(!c.start(Some("checkpoint.after_slot_write")));
    assert!(!c.start(Some("checkpoint.after_superblock_write")));
    assert!(c.start(None));
    verify(&c.k, PREFILL_BYTES, "after the checkpoint crashes");
    assert_eq!(tiers(&c.k), only("capacity", PREFILL_BYTES));
    // 6. The migration can still run to its end.
    c.k.rpc("policy_force_tier", Some(&force("fast")));
    assert_eq!(tiers(&c.k), only("fast", PREFILL_BYTES));
    verify(&c.k, PREFILL_BYTES, "after the final promotion");
    eprintln!("file_tier_points: {:.1}s", c.t0.elapsed().as_secs_f64());
}

/// Tier names of the devices the server opened (configured and journaled runtime tiers).
fn tier_names(k: &Kiln) -> BTreeSet<String> {
    k.rpc("bdev_get_bdevs", None)
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["tier"].as_str().unwrap().to_string())
        .collect()
}

/// Random reads over `[12m, 14m)` so the move (1 MiB chunks at 4 MiB/s from offset 0)
/// finds hot chunks there before its sweep does and moves them in a batch.
fn heat(k: &Kiln) -> FioChild {
    let mut a = args(&[
        "--name=heat",
        "--ioengine=nbd",
        "--rw=randread",
        "--bs=4k",
        "--iodepth=4",
        "--offset=12m",
        "--size=2m",
        "--time_based",
        "--runtime=60",
    ]);
    a.push(format!("--uri={}", k.unix_uri()));
    spawn_fio(&k.dir.path, &a)
}

/// A whole-volume move onto a new device: AddTier, VolumeMoveStart, hot batches, source
/// trim, VolumeMoveDone; then the data moves back (a runtime tier frees space).
#[test]
fn volume_move_points() {
    if !require_tool("fio") {
        return;
    }
    let mut c = Chain::new("cp-move", opts());
    let dst = format!("file:{}?size=256MiB", c.k.dir.join("dst.img").display());
    let by_spec = format!(
        r#"{{"volume":"vol0","destination":"{dst}","name":"dst","mode":"adaptive","chunk_min":"1MiB","chunk_max":"1MiB","rate_mib_s":4}}"#
    );
    let by_name = r#"{"volume":"vol0","destination":"dst","mode":"adaptive","chunk_min":"1MiB","chunk_max":"1MiB","rate_mib_s":4}"#;
    assert!(c.start(Some("add_tier.before_commit")));
    prefill(&c.k);
    c.rpc_crash("volume_migrate", &by_spec);
    assert!(c.start(Some("add_tier.after_commit")));
    verify(&c.k, PREFILL_BYTES, "after add_tier.before_commit");
    assert!(
        !tier_names(&c.k).contains("dst"),
        "tier added without its record"
    );
    c.rpc_crash("volume_migrate", &by_spec);
    assert!(c.start(Some("volume_move.start.before_commit")));
    verify(&c.k, PREFILL_BYTES, "after add_tier.after_commit");
    assert!(tier_names(&c.k).contains("dst"), "journaled tier lost");
    c.rpc_crash("volume_migrate", by_name);
    assert!(c.start(Some("volume_move.start.after_commit")));
    verify(&c.k, PREFILL_BYTES, "after volume_move.start.before_commit");
    assert_eq!(tiers(&c.k), only("fast", PREFILL_BYTES));
    c.rpc_crash("volume_migrate", by_name);
    // From here the journaled move resumes by itself at every start.
    for point in ["batch.switch.before_commit", "batch.switch.after_commit"] {
        if c.start(Some(point)) {
            let mut h = heat(&c.k);
            c.expect_crash(Duration::from_secs(60));
            let _ = h.child.kill();
            let _ = h.child.wait();
        }
    }
    for point in [
        "volume_move.trim.before",
        "volume_move.trim.after",
        "volume_move.done.before_commit",
        "volume_move.done.after_commit",
    ] {
        if c.start(Some(point)) {
            c.expect_crash(Duration::from_secs(60));
        }
    }
    assert!(c.start(None));
    verify(&c.k, PREFILL_BYTES, "after volume_move.done.after_commit");
    assert_eq!(tiers(&c.k), only("dst", PREFILL_BYTES));
    // Closed by its durable record: not resumed (no migration, or none running).
    match c
        .k
        .try_rpc("volume_migrate_status", Some(r#"{"volume":"vol0"}"#))
    {
        Ok(st) => assert!(
            !matches!(st["state"].as_str(), Some("running" | "queued")),
            "a finished move was resumed: {st}"
        ),
        Err(e) => assert!(e.contains("has no migration"), "{e}"),
    }
    // Regression: freeing space on a runtime tier (the release after moving data off it)
    // indexed past the metadata service's per-tier object table and killed its thread
    // (the release is asynchronous: the checkpoint behind it finds the thread gone).
    c.k.rpc("policy_force_tier", Some(&force("fast")));
    c.k.rpc("journal_checkpoint", None);
    assert_eq!(tiers(&c.k), only("fast", PREFILL_BYTES));
    verify(
        &c.k,
        PREFILL_BYTES,
        "after moving the data back off the runtime tier",
    );
    prefill(&c.k);
    eprintln!("volume_move_points: {:.1}s", c.t0.elapsed().as_secs_f64());
}

/// Demotion to an S3 object tier (PUT + read-back, switch) and garbage collection.
#[test]
fn object_tier_points() {
    if !require_tools(&["fio", "moto_server", "curl"]) {
        return;
    }
    let scratch = TempDir::new("cp-moto");
    let s3 = S3Server::start(&scratch.path);
    let prefix = "cp";
    let mut c = Chain::new("cp-s3", s3::opts(&s3, prefix, "128MiB", "64MiB", 20_000));
    let demote = r#"{"tier":"cold","object_size":"16MiB","wait":true}"#;
    let keys = |s3: &S3Server| key_gens(&s3.keys(prefix), prefix);
    assert!(c.start(Some("object.put.before")));
    prefill(&c.k);
    c.rpc_crash("policy_force_tier", demote);
    assert!(c.start(Some("object.put.after_verify")));
    verify(&c.k, PREFILL_BYTES, "after object.put.before");
    assert_eq!(tiers(&c.k), only("fast", PREFILL_BYTES));
    c.rpc_crash("policy_force_tier", demote);
    // A verified object no map entry names: garbage for tier_gc.
    let garbage = keys(&s3);
    assert_eq!(garbage.len(), 1, "after object.put.after_verify");
    assert!(c.start(Some("object.gc.before_delete")));
    verify(&c.k, PREFILL_BYTES, "after object.put.after_verify");
    assert_eq!(tiers(&c.k), only("fast", PREFILL_BYTES));
    c.rpc_crash("tier_gc", r#"{"tier":"cold"}"#);
    assert_eq!(keys(&s3), garbage, "deleted before object.gc.before_delete");
    assert!(c.start(Some("object.gc.after_delete")));
    c.rpc_crash("tier_gc", r#"{"tier":"cold"}"#);
    assert!(
        keys(&s3).is_empty(),
        "garbage left after object.gc.after_delete"
    );
    assert!(c.start(Some("object.switch.before_commit")));
    verify(&c.k, PREFILL_BYTES, "after object.gc.after_delete");
    c.rpc_crash("policy_force_tier", demote);
    assert!(c.start(Some("object.switch.after_commit")));
    verify(&c.k, PREFILL_BYTES, "after object.switch.before_commit");
    assert_eq!(tiers(&c.k), only("fast", PREFILL_BYTES));
    let before = keys(&s3);
    assert_eq!(before.len(), 1, "after object.switch.before_commit");
    c.rpc_crash("policy_force_tier", demote);
    assert!(c.start(None));
    // The switch is durable: everything reads back from the object named by the map.
    assert_eq!(tiers(&c.k), only("cold", PREFILL_BYTES));
    verify(
        &c.k,
        PREFILL_BYTES,
        "after object.switch.after_commit (from S3)",
    );
    let (named, all) = cold_gens(&c.k);
    assert!(all && named.len() == 1, "{named:?}");
    assert!(
        keys(&s3).is_superset(&named),
        "a map entry names a missing object"
    );
    // The earlier crash's object is garbage; gc deletes exactly it.
    c.k.rpc("tier_gc", Some(r#"{"tier":"cold"}"#));
    assert_eq!(keys(&s3), named);
    // Promotion back to a block tier finishes.
    c.k.rpc("policy_force_tier", Some(&force("fast")));
    assert_eq!(tiers(&c.k), only("fast", PREFILL_BYTES));
    verify(&c.k, PREFILL_BYTES, "after promotion from S3");
    eprintln!("object_tier_points: {:.1}s", c.t0.elapsed().as_secs_f64());
}

/// Points each scenario crashes at, in order (the tests above arm exactly these).
const SCENARIOS: &[(&str, &[&str])] = &[
    (
        "file_tier_points",
        &[
            "alloc.map.before_commit",
            "alloc.map.after_commit",
            "migrate.copy.before",
            "migrate.copy.after_flush",
            "demote.switch.before_commit",
            "demote.switch.after_commit",
            "promote.switch.before_commit",
            "promote.switch.after_commit",
            "migrate.release.after_free",
            "checkpoint.before_slot_write",
            "checkpoint.after_slot_write",
            "checkpoint.after_superblock_write",
        ],
    ),
    (
        "volume_move_points",
        &[
            "add_tier.before_commit",
            "add_tier.after_commit",
            "volume_move.start.before_commit",
            "volume_move.start.after_commit",
            "batch.switch.before_commit",
            "batch.switch.after_commit",
            "volume_move.trim.before",
            "volume_move.trim.after",
            "volume_move.done.before_commit",
            "volume_move.done.after_commit",
        ],
    ),
    (
        "object_tier_points",
        &[
            "object.put.before",
            "object.put.after_verify",
            "object.gc.before_delete",
            "object.gc.after_delete",
            "object.switch.before_commit",
            "object.switch.after_commit",
        ],
    ),
    (
        "log_wrap_points",
        &["log_wrap.before_checkpoint", "log_wrap.after_checkpoint"],
    ),
];

/// The scenarios cover every crash point the binary knows, and their sources arm each.
#[test]
fn every_point_has_a_scenario() {
    let src = std::fs::read_to_string(file!()).unwrap();
    let mut named: Vec<&str> = SCENARIOS.iter().flat_map(|s| s.1.iter().copied()).collect();
    named.sort_unstable();
    let mut all = kiln::crashpoint::POINTS.to_vec();
    all.sort_unstable();
    assert_eq!(named, all, "scenarios and kiln::crashpoint::POINTS differ");
    for p in all {
        // Armed by a literal `Some("point` or listed in a chain `("point"` / `"point",` above.
        let uses = src.matches(&format!("\"{p}")).count();
        assert!(
            uses >= 2,
            "crash point {p} is listed but never armed by a scenario"
        );
    }
}

/// Free bytes of the filesystem at `path` (0 if it cannot be asked).
fn free_bytes(path: &str) -> u64 {
    let Ok(c) = std::ffi::CString::new(path) else {
        return 0;
    };
    // SAFETY: an all-zero statvfs is a valid value for statvfs(3) to overwrite.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `st` a valid out-pointer for the call.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return 0;
    }
    st.f_bavail as u64 * st.f_frsize as u64
}

/// Removes a directory on drop.
struct RemoveDir(std::path::PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One 4 KiB block (crc32c verify header) at the start of each 64 KiB chunk of volume
/// "wrap" in `[offset, offset+size)`, queue depth 1: every block is one allocation commit.
fn strided(k: &Kiln, offset: u64, size: u64, extra: &[&str]) -> Vec<String> {
    let mut a = args(&[
        "--name=strided",
        "--ioengine=nbd",
        "--rw=write:60k",
        "--bs=4k",
        "--iodepth=1",
        "--verify=crc32c",
    ]);
    a.push(format!("--offset={offset}"));
    a.push(format!("--size={size}"));
    // One block per chunk, not a wrap-around of the region.
    a.push(format!("--io_size={}", size / 16));
    a.push(format!(
        "--uri=nbd+unix:///wrap?socket={}",
        k.nbd_sock.display()
    ));
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// Mapped bytes of volume "wrap" in `[offset, offset+size)`.
fn wrap_mapped(k: &Kiln, offset: u64, size: u64) -> u64 {
    let map = k.rpc("volume_get_map", Some(r#"{"volume":"wrap"}"#));
    map["chunks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| !c["tier"].is_null())
        .map(|c| {
            let (o, l) = (c["offset"].as_u64().unwrap(), c["length"].as_u64().unwrap());
            (o + l).min(offset + size).saturating_sub(o.max(offset))
        })
        .sum()
}

/// Log wrap: a commit finds the log 3/4 full (about 5,950 commits of 4 KiB) and writes a
/// checkpoint first. A second volume with 64 KiB chunks gets one 4 KiB write per chunk at
/// queue depth 1, so every write is one allocation commit; each round maps fresh chunks
/// until the armed wrap point kills the server. The fast tier (metadata and data) lives on
/// /dev/shm when it has room: FUA writes and flushes there cost microseconds, on a disk
/// milliseconds (then the test takes minutes).
#[test]
fn log_wrap_points() {
    if !require_tool("fio") {
        return;
    }
    const ROUND: u64 = 512 * MIB;
    const CHUNK: u64 = 64 << 10;
    let shm = std::path::Path::new("/dev/shm");
    let meta_dir = (shm.is_dir() && free_bytes("/dev/shm") > 2048 * MIB).then(|| {
        let d = shm.join(format!("kiln-wrap-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        RemoveDir(d)
    });
    let mut o = Opts {
        fast: "1104MiB",
        capacity: "256MiB",
        volume: "16MiB",
        ..Opts::default()
    };
    o.reactor.push_str(STATIC);
    o.reactor
        .push_str("\n[[volume]]\nname = \"wrap\"\nsize = \"1GiB\"\nchunk_size = \"64KiB\"\n");
    let dir = match &meta_dir {
        Some(d) => d.0.display().to_string(),
        None => {
            eprintln!("log_wrap_points: no room on /dev/shm: the fast tier is on disk (slow)");
            "{d}".to_string()
        }
    };
    o.fast_device = Some(format!("file:{dir}/fast.img?size=1104MiB"));
    let mut c = Chain::new("cp-wrap", o);
    assert!(c.start(Some("log_wrap.before_checkpoint")));
    let mut acked_rounds: Vec<(u64, u64)> = Vec::new();
    for (round, next) in [Some("log_wrap.after_checkpoint"), None]
        .into_iter()
        .enumerate()
    {
        let base = round as u64 * ROUND;
        let point = c.armed.clone().unwrap();
        let log = c.k.dir.join("acked_clat.1.log");
        let _ = std::fs::remove_file(&log);
        let w = spawn_fio(
            &c.k.dir.path,
            &strided(
                &c.k,
                base,
                ROUND,
                &["--do_verify=0", "--write_lat_log=acked", "--log_offset=1"],
            ),
        );
        c.expect_crash(Duration::from_secs(300));
        let fio_done = w.finish_or_abandon(Duration::from_secs(10)).is_some();
        assert!(c.start(next));
        // Sequential at queue depth 1: the acknowledged writes are the first n chunks, and
        // the one in flight was waiting for its allocation commit, which never happened.
        let mapped = wrap_mapped(&c.k, base, ROUND);
        assert!(
            mapped > ROUND / 2,
            "{point}: only {mapped} bytes mapped: the log wraps after ~5,950 commits"
        );
        if fio_done {
            let acked = acked_offsets(&log);
            let n = acked.len() as u64;
            assert!(
                (0..n).all(|i| acked.contains(&(base + i * CHUNK))),
                "{point}: acknowledged writes are not a prefix"
            );
            assert_eq!(mapped, n * CHUNK, "{point}: {n} writes acknowledged");
        }
        acked_rounds.push((base, mapped));
        // Every acknowledged write of every round so far reads back.
        for &(b, m) in &acked_rounds {
            let r = fio(
                &c.k.dir.path,
                &strided(&c.k, b, m, &["--verify_only"]),
                Duration::from_secs(120),
            );
            assert_clean(&r, &format!("round at {b} after {point}"));
            assert_eq!(r.total_ios("read"), m / CHUNK, "{}", r.describe());
        }
        eprintln!("{point}: {} chunks mapped and verified", mapped / CHUNK);
    }
    eprintln!("log_wrap_points: {:.1}s", c.t0.elapsed().as_secs_f64());
}
