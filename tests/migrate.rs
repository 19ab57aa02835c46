//! Migration correctness in one process, against a reference model: writes
//! race with copies, locks, shadows and switches while a migrator moves
//! runs back and forth between a fast and a slow tier. Every read must match
//! the last acknowledged write. Also proves the copy path is zero-copy.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use kiln::bdev::{BlockDevice, IoKind};
use kiln::dma::DmaPool;
use kiln::migrate::{MigrateTier, MigrationSettings, MigrationStats, Migrator};
use kiln::volume::epoch::Epochs;
use kiln::volume::io::{VolumeIo, VolumeOp};
use kiln::volume::journal::{self, MetaTier, TierUsage};
use kiln::volume::Volume;

const BLOCK: u64 = 4096;

struct Setup {
    tiers: Vec<(String, Arc<dyn BlockDevice>)>,
    vol: Arc<Volume>,
    meta_tx: crossbeam_channel::Sender<journal::MetaRequest>,
    _meta: std::thread::JoinHandle<()>,
}

fn setup(vol_bytes: u64) -> Setup {
    let tiers: Vec<(String, Arc<dyn BlockDevice>)> = vec![
        ("fast".into(), kiln::bdev::open("malloc:160MiB").unwrap()),
        (
            "slow".into(),
            kiln::bdev::open("delay:30,30,0:malloc:128MiB").unwrap(),
        ),
    ];
    let vol = Arc::new(Volume::new(0, "v", vol_bytes, 1 << 20));
    let meta_tiers = tiers
        .iter()
        .map(|(n, d)| MetaTier {
            name: n.clone(),
            device: d.clone(),
            capacity_bytes: d.info().size_bytes(),
            usage: Arc::new(TierUsage::default()),
        })
        .collect();
    let (meta_tx, meta, _) = journal::start(meta_tiers, vec![vol.clone()]).unwrap();
    Setup {
        tiers,
        vol,
        meta_tx,
        _meta: meta,
    }
}

fn pattern(buf: &mut [u8], block: u64, version: u64) {
    for (i, w) in buf.chunks_exact_mut(8).enumerate() {
        w.copy_from_slice(&(block << 40 ^ version << 16 ^ i as u64).to_le_bytes());
    }
}

fn version_of(buf: &[u8], block: u64) -> Option<u64> {
    if buf.iter().all(|&b| b == 0) {
        return Some(0);
    }
    let w0 = u64::from_le_bytes(buf[..8].try_into().unwrap());
    let version = (w0 ^ (block << 40)) >> 16;
    let mut expect = vec![0u8; buf.len()];
    pattern(&mut expect, block, version);
    (expect == buf).then_some(version)
}

#[test]
fn writes_racing_migrations_never_lose_data() {
    let s = setup(16 << 20);
    let blocks = s.vol.size_bytes / BLOCK;
    let epochs = Arc::new(Epochs::new(1));
    let stats = Arc::new(MigrationStats::default());
    let settings = Arc::new(MigrationSettings::default());
    settings.bandwidth_pct.store(100, Ordering::Relaxed);
    let stop = Arc::new(AtomicBool::new(false));
    let volumes = Arc::new(vec![s.vol.clone()]);
    // The migrator thread moves random runs back and forth.
    let mig = {
        let (v, t, m, e, st, stats, stop) = (
            volumes.clone(),
            s.tiers.clone(),
            s.meta_tx.clone(),
            epochs.clone(),
            settings.clone(),
            stats.clone(),
            stop.clone(),
        );
        std::thread::spawn(move || {
            let mt = t
                .iter()
                .map(|(n, d)| MigrateTier {
                    name: n.clone(),
                    device: d.clone(),
                    bandwidth_mib_s: 4000,
                })
                .collect();
            let mut mg = Migrator::new(v.clone(), mt, m, e, st, stats).unwrap();
            let granules = v[0].map.granules();
            let mut rng = 0x1234_5678u64;
            let mut done = 0;
            while !stop.load(Ordering::Relaxed) {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let first = rng % granules;
                let count = 1 + (rng >> 20) % 24;
                let count = count.min(granules - first);
                let to = ((rng >> 40) & 1) as u8;
                if mg.migrate(0, first, count, to).is_ok() {
                    done += 1;
                }
            }
            done
        })
    };
    let pool = DmaPool::new(BLOCK as usize * 4, 64).unwrap();
    let metrics = kiln::metrics::Metrics::new();
    let mut io = VolumeIo::new(
        volumes.clone(),
        &s.tiers,
        &pool,
        &metrics,
        64,
        s.meta_tx.clone(),
        None,
    )
    .unwrap();
    io.set_epochs(epochs.clone(), 0);
    // Reference model: acknowledged version per block; in-flight writes per block.
    let mut acked = vec![0u64; blocks as usize];
    let mut writing = vec![0u32; blocks as usize];
    // Reads in flight per block: a write never overlaps a read of the same block,
    // so every read has exactly one correct answer.
    let mut reading = vec![0u32; blocks as usize];
    let mut next_version = 1u64;
    // Slot state: (kind, first block, nblocks, version)
    let mut slots: Vec<Option<(IoKind, u64, u64, u64)>> = vec![None; 32];
    let mut rng = 99u64;
    let mut reads_checked = 0u64;
    let t0 = std::time::Instant::now();
    let mut ops = 0u64;
    while t0.elapsed() < std::time::Duration::from_secs(6) || ops < 20_000 {
        for (i, slot) in slots.iter_mut().enumerate() {
            if slot.is_some() {
                continue;
            }
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let n = 1 + (rng >> 8) % 4;
            let first = (rng >> 16) % (blocks - n);
            let buf = pool.buf(i as u16);
            // SAFETY: slot i's buffer is not in flight.
            let data = unsafe { buf.as_mut_slice() };
            let (kind, version) =
                if (first..first + n).any(|b| writing[b as usize] > 0) || rng & 3 == 0 {
                    if (first..first + n).any(|b| writing[b as usize] > 0) {
                        continue;
                    }
                    data[..(n * BLOCK) as usize].fill(0xee);
                    for b in first..first + n {
                        reading[b as usize] += 1;
                    }
                    (IoKind::Read, 0)
                } else if (first..first + n).any(|b| reading[b as usize] > 0) {
                    continue;
                } else {
                    let v = next_version;
                    next_version += 1;
                    for b in 0..n {
                        pattern(
                            &mut data[(b * BLOCK) as usize..((b + 1) * BLOCK) as usize],
                            first + b,
                            v,
                        );
                        writing[(first + b) as usize] += 1;
                    }
                    (IoKind::Write, v)
                };
            let op = VolumeOp {
                volume: 0,
                kind,
                offset_bytes: first * BLOCK,
                len_bytes: (n * BLOCK) as u32,
                buf: buf.ptr,
                buf_index: buf.index,
                fua: false,
                token: i as u64,
            };
            // SAFETY: the pool outlives the engine; slot i's buffer is reused only after completion.
            assert!(unsafe { io.submit(op) });
            *slot = Some((kind, first, n, version));
        }
        io.poll();
        while let Some((token, rc)) = io.pop_completion() {
            assert_eq!(rc, 0, "I/O failed during migration");
            let (kind, first, n, version) = slots[token as usize].take().unwrap();
            let buf = pool.buf(token as u16);
            // SAFETY: completed.
            let data = unsafe { buf.as_slice() };
            for b in 0..n {
                let blk = first + b;
                if kind == IoKind::Write {
                    writing[blk as usize] -= 1;
                    acked[blk as usize] = version;
                } else {
                    reading[blk as usize] -= 1;
                    let got =
                        version_of(&data[(b * BLOCK) as usize..((b + 1) * BLOCK) as usize], blk);
                    assert_eq!(
                        got,
                        Some(acked[blk as usize]),
                        "block {blk}: read {got:?}, last acked {}",
                        acked[blk as usize]
                    );
                    reads_checked += 1;
                }
            }
            ops += 1;
        }
    }
    stop.store(true, Ordering::Relaxed);
    // Keep driving I/O until the migrator's last grace period can finish.
    // Keep completing I/O (the migrator's last grace period waits for it).
    while !mig.is_finished() || io.inflight() > 0 {
        io.poll();
        while let Some((token, rc)) = io.pop_completion() {
            assert_eq!(rc, 0);
            let (kind, first, n, version) = slots[token as usize].take().unwrap();
            if kind == IoKind::Write {
                for b in first..first + n {
                    writing[b as usize] -= 1;
                    acked[b as usize] = version;
                }
            }
        }
    }
    let migrations = mig.join().unwrap();
    // Final full check.
    for chunk in 0..blocks / 4 {
        let buf = pool.buf(0);
        let op = VolumeOp {
            volume: 0,
            kind: IoKind::Read,
            offset_bytes: chunk * 4 * BLOCK,
            len_bytes: (4 * BLOCK) as u32,
            buf: buf.ptr,
            buf_index: buf.index,
            fua: false,
            token: 0,
        };
        // SAFETY: nothing else is in flight.
        assert!(unsafe { io.submit(op) });
        loop {
            io.poll();
            if let Some((_, rc)) = io.pop_completion() {
                assert_eq!(rc, 0);
                break;
            }
        }
        // SAFETY: completed.
        let data = unsafe { buf.as_slice() };
        for b in 0..4 {
            let blk = chunk * 4 + b;
            assert_eq!(
                version_of(&data[(b * BLOCK) as usize..((b + 1) * BLOCK) as usize], blk),
                Some(acked[blk as usize]),
                "final check, block {blk}"
            );
        }
    }
    eprintln!(
        "{ops} ops, {reads_checked} reads checked, {migrations} migrations, {} verify retries",
        stats.verify_retries.load(Ordering::Relaxed)
    );
    assert!(
        migrations > 20,
        "the migrator should have moved many runs, moved {migrations}"
    );
    assert!(reads_checked > 1000);
}

#[test]
fn copy_path_is_zero_copy() {
    let s = setup(8 << 20);
    let volumes = Arc::new(vec![s.vol.clone()]);
    // Map the whole volume on the slow tier by writing it through the engine.
    let pool = DmaPool::new(1 << 20, 4).unwrap();
    let metrics = kiln::metrics::Metrics::new();
    let mut io = VolumeIo::new(
        volumes.clone(),
        &s.tiers,
        &pool,
        &metrics,
        8,
        s.meta_tx.clone(),
        None,
    )
    .unwrap();
    for mib in 0..8u64 {
        let buf = pool.buf(0);
        // SAFETY: not in flight.
        unsafe { buf.as_mut_slice() }.fill(mib as u8 + 1);
        let op = VolumeOp {
            volume: 0,
            kind: IoKind::Write,
            offset_bytes: mib << 20,
            len_bytes: 1 << 20,
            buf: buf.ptr,
            buf_index: buf.index,
            fua: false,
            token: mib,
        };
        // SAFETY: waited for below.
        assert!(unsafe { io.submit(op) });
        loop {
            io.poll();
            if let Some((_, rc)) = io.pop_completion() {
                assert_eq!(rc, 0);
                break;
            }
        }
    }
    let mt = s
        .tiers
        .iter()
        .map(|(n, d)| MigrateTier {
            name: n.clone(),
            device: d.clone(),
            bandwidth_mib_s: 4000,
        })
        .collect();
    let settings = Arc::new(MigrationSettings::default());
    settings.bandwidth_pct.store(100, Ordering::Relaxed);
    let mut mg = Migrator::new(
        volumes.clone(),
        mt,
        s.meta_tx.clone(),
        Arc::new(Epochs::new(1)),
        settings,
        Arc::new(MigrationStats::default()),
    )
    .unwrap();
    mg.trace = Some(Vec::new());
    let g = s.vol.map.granules();
    let to = 1 - s.vol.map.get(0).unwrap().tier;
    let moved = mg.migrate(0, 0, g, to).unwrap();
    assert_eq!(moved, 8 << 20);
    let trace = mg.trace.take().unwrap();
    let reads: Vec<_> = trace.iter().filter(|t| t.kind == IoKind::Read).collect();
    let writes: Vec<_> = trace.iter().filter(|t| t.kind == IoKind::Write).collect();
    assert!(!writes.is_empty());
    // Every write goes out of the very buffer the preceding read of the same
    // length filled: no payload is copied between buffers.
    for (i, w) in trace
        .iter()
        .enumerate()
        .filter(|(_, t)| t.kind == IoKind::Write)
    {
        let read = trace[..i]
            .iter()
            .rev()
            .find(|t| t.kind == IoKind::Read && t.buf == w.buf);
        assert!(
            read.is_some_and(|r| r.len == w.len && r.tier != w.tier),
            "write {i} did not reuse its read buffer"
        );
    }
    // Reads = copy reads + the read-back of every copied block.
    assert_eq!(reads.len(), writes.len() * 2);
    // Data moved intact.
    assert!((0..g).all(|x| s.vol.map.get(x).unwrap().tier == to));
}
