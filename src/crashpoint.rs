//! Named crash points before and after every durable step (see docs/FORMAT.md,
//! "Crash points").
//!
//! A point is armed for one process by `KILN_CRASHPOINT=NAME[:NTH]` (read once by
//! [`init_from_env`] at `kiln serve` start): the NTH time (default 1) execution
//! reaches `crashpoint(NAME)`, the process prints one line to stderr and sends
//! itself SIGKILL, which is exactly what `kill -9` does. Unarmed, a point costs one
//! relaxed atomic load: no allocation, no lock, no string compare.
//!
//! [`crashpoint_hit`] is the side-effect-free half (it counts and answers whether
//! this hit is the armed one) for a simulator that wants to model the crash itself.
//! [`POINTS`] lists every point, so tests can enumerate them; a unit test checks
//! that each is used exactly once in `src/` and that no other name is.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;

/// The environment variable that arms a point: `NAME` or `NAME:NTH`.
pub const ENV: &str = "KILN_CRASHPOINT";

/// Every crash point, grouped by the durable step it surrounds.
pub const POINTS: &[&str] = &[
    // New-chunk allocation: zeroed space flushed, `Map` commit (FUA), publish.
    "alloc.map.before_commit",
    "alloc.map.after_commit",
    // Checkpoint: slot frame (FUA), then the superblock copy (FUA).
    "checkpoint.before_slot_write",
    "checkpoint.after_slot_write",
    "checkpoint.after_superblock_write",
    // Log wrap: a commit finds the log 3/4 full, checkpoints, restarts at offset 0.
    "log_wrap.before_checkpoint",
    "log_wrap.after_checkpoint",
    // Migration between block tiers (promotion, demotion, a volume move's cold chunks).
    "migrate.copy.before",
    "migrate.copy.after_flush",
    "promote.switch.before_commit",
    "promote.switch.after_commit",
    "demote.switch.before_commit",
    "demote.switch.after_commit",
    "migrate.release.after_free",
    // Batched switch (`SwitchMany`) onto a block tier: policy batches, hot chunks of a move.
    "batch.switch.before_commit",
    "batch.switch.after_commit",
    // Demotion to an object tier: PUT + read-back, `Map` records, garbage collection.
    "object.put.before",
    "object.put.after_verify",
    "object.switch.before_commit",
    "object.switch.after_commit",
    "object.gc.before_delete",
    "object.gc.after_delete",
    // Whole-volume move: runtime tier, start record, source trim, done record.
    "add_tier.before_commit",
    "add_tier.after_commit",
    "volume_move.start.before_commit",
    "volume_move.start.after_commit",
    "volume_move.trim.before",
    "volume_move.trim.after",
    "volume_move.done.before_commit",
    "volume_move.done.after_commit",
];

static ARMED: AtomicBool = AtomicBool::new(false);
static TARGET: OnceLock<(&'static str, u64)> = OnceLock::new();
static HITS: AtomicU64 = AtomicU64::new(0);

/// Parses `NAME[:NTH]` against [`POINTS`].
pub fn parse(spec: &str) -> Result<(&'static str, u64), String> {
    let (name, nth) = match spec.split_once(':') {
        Some((n, k)) => (
            n,
            k.parse::<u64>()
                .ok()
                .filter(|&k| k > 0)
                .ok_or_else(|| format!("{ENV}={spec}: the count after ':' must be 1 or more"))?,
        ),
        None => (spec, 1),
    };
    let point = POINTS
        .iter()
        .find(|p| **p == name)
        .ok_or_else(|| format!("{ENV}={spec}: no crash point named '{name}'"))?;
    Ok((point, nth))
}

/// Arms the point `spec` names (`NAME[:NTH]`) for the rest of the process. Only one
/// point can ever be armed in a process.
pub fn arm(spec: &str) -> Result<(), String> {
    let target = parse(spec)?;
    TARGET
        .set(target)
        .map_err(|_| format!("{ENV}: a crash point is already armed in this process"))?;
    ARMED.store(true, Ordering::Release);
    Ok(())
}

/// Arms the point named by `KILN_CRASHPOINT`, if it is set. Called once at start.
pub fn init_from_env() -> Result<(), String> {
    match std::env::var(ENV) {
        Ok(spec) if !spec.is_empty() => {
            arm(&spec)?;
            eprintln!("kiln: crash point {spec} armed");
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Whether reaching `name` now is the armed hit (the NTH one). Counts hits of the
/// armed point; has no other effect.
#[inline]
pub fn crashpoint_hit(name: &'static str) -> bool {
    if !ARMED.load(Ordering::Relaxed) {
        return false;
    }
    hit_slow(name)
}

#[cold]
fn hit_slow(name: &'static str) -> bool {
    let Some(&(target, nth)) = TARGET.get() else {
        return false;
    };
    debug_assert!(
        POINTS.contains(&name),
        "crash point '{name}' is not in POINTS"
    );
    name == target && HITS.fetch_add(1, Ordering::AcqRel) + 1 == nth
}

/// A crash point: when armed for this hit, one line on stderr, then SIGKILL.
#[inline]
pub fn crashpoint(name: &'static str) {
    if crashpoint_hit(name) {
        die(name);
    }
}

#[cold]
fn die(name: &str) -> ! {
    let nth = HITS.load(Ordering::Acquire);
    eprintln!("kiln: crash point {name} hit (hit {nth}): SIGKILL");
    // SAFETY: kill(2) on our own pid with a valid signal number; no memory is involved.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
    // SIGKILL cannot be caught; it is delivered before this thread runs much further.
    loop {
        std::thread::park();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every name in POINTS is used exactly once in src/, and every point used is in POINTS.
    #[test]
    fn every_point_is_used_exactly_once() {
        let mut files = Vec::new();
        let mut dirs = vec![std::path::PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/src"
        ))];
        while let Some(d) = dirs.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    dirs.push(p);
                } else if p.extension().is_some_and(|x| x == "rs") && !p.ends_with("crashpoint.rs")
                {
                    files.push(std::fs::read_to_string(&p).unwrap());
                }
            }
        }
        let call = "crashpoint(\"";
        let mut used: Vec<String> = Vec::new();
        for text in &files {
            for part in text.split(call).skip(1) {
                used.push(part.split('"').next().unwrap().to_string());
            }
        }
        for p in POINTS {
            let n = used.iter().filter(|u| u == p).count();
            assert_eq!(n, 1, "crash point '{p}' is used {n} times in src/");
        }
        for u in &used {
            assert!(
                POINTS.contains(&u.as_str()),
                "'{u}' is not listed in POINTS"
            );
        }
        let mut sorted = POINTS.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), POINTS.len(), "duplicate names in POINTS");
    }

    #[test]
    fn parse_names_and_counts() {
        assert_eq!(
            parse("demote.switch.after_commit").unwrap(),
            ("demote.switch.after_commit", 1)
        );
        assert_eq!(
            parse("alloc.map.before_commit:3").unwrap(),
            ("alloc.map.before_commit", 3)
        );
        assert!(parse("nope")
            .unwrap_err()
            .contains("no crash point named 'nope'"));
        assert!(parse("alloc.map.before_commit:0").is_err());
        assert!(parse("alloc.map.before_commit:x").is_err());
        // Unarmed in unit tests: never a hit.
        assert!(!crashpoint_hit("alloc.map.before_commit"));
    }
}
