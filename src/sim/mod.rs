//! `kiln sim --seed N --steps M`: the real volume engine ([`VolumeIo`]), the
//! real metadata service and journal ([`MetaService`]) and the real
//! [`Migrator`] run against simulated devices ([`device`]) under a seeded
//! random workload, with crashes, and are checked against a reference model.
//!
//! Determinism: the simulation thread drives the I/O engine and the metadata
//! service itself ([`MetaService::serve_pending`]); a migration runs on a
//! helper thread while the I/O engine is idle, and the simulation thread only
//! answers its metadata requests, so every device request happens in an order
//! fixed by the seed. Time is the real clock, but nothing waits on it: devices
//! complete after a number of polls, not of nanoseconds (the engine is not
//! generic over its clock yet).
//!
//! The model, per 4 KiB block: `live`, the values a read may return now
//! (one, unless a write to it failed), and `durable`, the values a read may
//! return after a crash: every value written since the last completed flush
//! (or acknowledged FUA write, or any acknowledged write on a device without
//! a write cache), plus the one before. Garbage (data that no write put
//! there) is never allowed.

pub mod device;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};

use crate::bdev::{BlockDevice, IoKind};
use crate::dma::DmaPool;
use crate::migrate::{MigrateTier, MigrationSettings, MigrationStats, Migrator};
use crate::volume::epoch::Epochs;
use crate::volume::io::{VolumeIo, VolumeOp};
use crate::volume::journal::{
    MetaRequest, MetaService, MetaTier, TierUsage, GRANULE_BYTES, META_BYTES,
};
use crate::volume::Volume;
use device::{CrashPoint, Event, Faults, Rng, SimDevice, World, SECTOR};

const BLOCK: u64 = SECTOR;
const VOLUME_BYTES: u64 = 8 << 20;
const CHUNK_BYTES: u64 = 1 << 20;
const MAX_OP_BLOCKS: u64 = 8;

#[derive(clap::Args, Debug, Clone)]
pub struct SimArgs {
    /// The seed: the whole run (devices, faults, workload, crashes) follows from it.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Workload steps per seed.
    #[arg(long, default_value_t = 200)]
    pub steps: u64,
    /// Run this many consecutive seeds from --seed (in parallel over --threads).
    #[arg(long, default_value_t = 1)]
    pub seeds: u64,
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Crash at this durable event (1-based) instead of a random one.
    #[arg(long)]
    pub crash_event: Option<u64>,
    /// With --crash-event: crash just after the event instead of just before it.
    #[arg(long)]
    pub crash_after: bool,
    /// No injected faults (crashes still happen).
    #[arg(long)]
    pub no_faults: bool,
    /// Leave misdirected metadata writes (reported done, landed elsewhere) out of the faults.
    #[arg(long)]
    pub no_misdirect: bool,
    /// The default (kept so that older replay commands still parse).
    #[arg(long, hide = true, conflicts_with = "no_misdirect")]
    pub misdirect: bool,
    /// Do not read durable metadata writes back (shows the acknowledged commits that
    /// misdirected writes then lose; see docs/FORMAT.md, "Media assumptions").
    #[arg(long, hide = true)]
    pub no_verify_writes: bool,
    /// Print the durable events of the run.
    #[arg(long)]
    pub events: bool,
}

/// What one run did.
#[derive(Debug, Default, Clone)]
pub struct SimReport {
    pub ops: u64,
    pub acked_writes: u64,
    pub failed_ops: u64,
    pub blocks_checked: u64,
    pub crashes: u64,
    pub migrations_ok: u64,
    pub migrations_failed: u64,
    pub checkpoints: u64,
    pub faults_injected: u64,
    /// Metadata writes the journal found elsewhere than addressed on read-back and rewrote.
    pub misdirects_rewritten: u64,
    pub write_cache: bool,
    pub events: Vec<Event>,
}

/// How a run is set up.
#[derive(Clone, Copy, Debug)]
pub struct SimOptions {
    pub seed: u64,
    pub steps: u64,
    pub faults: bool,
    /// Whether misdirected metadata writes are among the faults.
    pub misdirect: bool,
    /// Whether the journal reads its durable writes back (`MetaService::open_verified`).
    pub verify_writes: bool,
    /// A fixed crash point; otherwise crashes are drawn from the seed.
    pub crash: Option<CrashPoint>,
}

fn pattern(buf: &mut [u8], block: u64, version: u64) {
    if version == 0 {
        buf.fill(0);
        return;
    }
    for (i, w) in buf.chunks_exact_mut(8).enumerate() {
        w.copy_from_slice(&pattern_word(block, version, i).to_le_bytes());
    }
}

/// Word `i` of `block`'s data at `version`: unique to block, version and position.
fn pattern_word(block: u64, version: u64, i: usize) -> u64 {
    (block << 40) ^ (version << 16) ^ i as u64
}

/// The version a block holds, or None for garbage (including another block's data).
fn version_of(buf: &[u8], block: u64) -> Option<u64> {
    if buf.iter().all(|&b| b == 0) {
        return Some(0);
    }
    let w0 = u64::from_le_bytes(buf[..8].try_into().unwrap());
    let version = (w0 >> 16) & ((1 << 24) - 1);
    if w0 >> 40 != block || version == 0 {
        return None;
    }
    let intact = buf
        .chunks_exact(8)
        .enumerate()
        .all(|(i, w)| u64::from_le_bytes(w.try_into().unwrap()) == pattern_word(block, version, i));
    intact.then_some(version)
}

struct Model {
    live: Vec<Vec<u64>>,
    durable: Vec<Vec<u64>>,
    write_cache: bool,
}

impl Model {
    fn write(&mut self, b: usize, v: u64, ok: bool, fua: bool) {
        if ok {
            self.live[b] = vec![v];
            if fua || !self.write_cache {
                self.durable[b] = vec![v];
                return;
            }
        } else {
            self.live[b].push(v);
        }
        self.durable[b].push(v);
    }

    fn flushed(&mut self) {
        for (d, l) in self.durable.iter_mut().zip(&self.live) {
            d.clone_from(l);
        }
    }
}

/// One generation of the engine between crashes.
struct Engine {
    meta: MetaService,
    meta_tx: Sender<MetaRequest>,
    meta_rx: Receiver<MetaRequest>,
    io: VolumeIo,
    volumes: Arc<Vec<Arc<Volume>>>,
    epochs: Arc<Epochs>,
    mig_tx: Option<Sender<(u64, u64, u8)>>,
    mig_rx: Receiver<(Result<u64, String>, usize)>,
    mig_thread: Option<std::thread::JoinHandle<()>>,
}

impl Engine {
    fn open(
        tiers: &[(String, Arc<dyn BlockDevice>)],
        pool: &DmaPool,
        metrics: &crate::metrics::Metrics,
        verify_writes: bool,
    ) -> Result<Engine, String> {
        let vol = Arc::new(Volume::new(0, "simvol", VOLUME_BYTES, CHUNK_BYTES));
        let volumes = Arc::new(vec![vol.clone()]);
        let meta_tiers = tiers
            .iter()
            .map(|(n, d)| MetaTier {
                name: n.clone(),
                device: d.clone(),
                capacity_bytes: d.info().size_bytes(),
                usage: Arc::new(TierUsage::default()),
            })
            .collect();
        let meta = MetaService::open_verified(meta_tiers, vec![vol], verify_writes)?;
        let (meta_tx, meta_rx) = crossbeam_channel::unbounded();
        let mut io = VolumeIo::new(
            volumes.clone(),
            tiers,
            pool,
            metrics,
            16,
            meta_tx.clone(),
            None,
        )?;
        let epochs = Arc::new(Epochs::new(1));
        io.set_epochs(epochs.clone(), 0);
        // The migrator lives on its own thread: it blocks on grace periods and
        // metadata replies, which this thread provides.
        let (mig_tx, cmd_rx) = crossbeam_channel::unbounded::<(u64, u64, u8)>();
        let (res_tx, mig_rx) = crossbeam_channel::unbounded();
        let mtiers: Vec<MigrateTier> = tiers
            .iter()
            .map(|(n, d)| MigrateTier {
                name: n.clone(),
                device: d.clone(),
                bandwidth_mib_s: 1 << 20,
            })
            .collect();
        let (v2, m2, e2) = (volumes.clone(), meta_tx.clone(), epochs.clone());
        let mig_thread = std::thread::Builder::new()
            .name("kiln-sim-migrate".into())
            .spawn(move || {
                let settings = Arc::new(MigrationSettings::default());
                settings.bandwidth_pct.store(100, Ordering::Relaxed);
                let mut mg = match Migrator::new(
                    v2,
                    mtiers,
                    m2,
                    e2,
                    settings,
                    Arc::new(MigrationStats::default()),
                ) {
                    Ok(m) => m,
                    Err(e) => {
                        let _ = res_tx.send((Err(e), 0));
                        return;
                    }
                };
                while let Ok((first, count, to)) = cmd_rx.recv() {
                    let r = mg.migrate(0, first, count, to);
                    let leaked = mg.copy_buffers_in_use();
                    let _ = res_tx.send((r, leaked));
                }
            })
            .map_err(|e| format!("cannot start the simulated migrator: {e}"))?;
        Ok(Engine {
            meta,
            meta_tx,
            meta_rx,
            io,
            volumes,
            epochs,
            mig_tx: Some(mig_tx),
            mig_rx,
            mig_thread: Some(mig_thread),
        })
    }

    fn pump(&mut self) {
        self.io.poll();
        while self.meta.serve_pending(&self.meta_rx) {}
    }

    /// Runs ops to completion; returns `(token, rc)` of each.
    fn run_ops(&mut self, ops: &[VolumeOp]) -> Vec<(u64, i32)> {
        for op in ops {
            // SAFETY: every buffer is a pool buffer the caller does not touch until
            // this returns, which is after every completion.
            assert!(unsafe { self.io.submit(*op) }, "engine slab full");
        }
        let mut done = Vec::with_capacity(ops.len());
        let mut spins = 0u64;
        while done.len() < ops.len() {
            self.pump();
            while let Some(c) = self.io.pop_completion() {
                done.push(c);
            }
            spins += 1;
            assert!(spins < 50_000_000, "simulated I/O never completed");
        }
        done
    }

    /// Runs one migration. The outer error is a broken invariant of the migrator (the
    /// seed fails); the inner result is the migration's own (faults may fail it).
    fn migrate(&mut self, first: u64, count: u64, to: u8) -> Result<Result<u64, String>, String> {
        self.mig_tx
            .as_ref()
            .expect("migrator running")
            .send((first, count, to))
            .map_err(|_| "simulated migrator stopped".to_string())?;
        // The I/O engine is idle meanwhile: serve the migrator's metadata requests and
        // otherwise block until it sends one or finishes (never spin against it: on a
        // loaded machine a spinning waiter starves the thread it waits for).
        let (meta_rx, mig_rx) = (self.meta_rx.clone(), self.mig_rx.clone());
        let mut sel = crossbeam_channel::Select::new();
        sel.recv(&mig_rx);
        sel.recv(&meta_rx);
        loop {
            self.pump();
            match mig_rx.try_recv() {
                Ok((_, leaked)) if leaked > 0 => {
                    return Err(format!(
                        "the migration of granules {first}+{count} to tier {to} left {leaked} \
                         copy buffers out of the pool"
                    ))
                }
                Ok((r, _)) => return Ok(r),
                Err(crossbeam_channel::TryRecvError::Disconnected) => {
                    return Err("the simulated migrator thread stopped".into())
                }
                Err(crossbeam_channel::TryRecvError::Empty) => {}
            }
            sel.ready();
        }
    }

    fn meta_call(
        &mut self,
        req: MetaRequest,
        rx: &Receiver<Result<u64, String>>,
    ) -> Result<u64, String> {
        self.meta_tx
            .send(req)
            .map_err(|_| "metadata stopped".to_string())?;
        loop {
            self.pump();
            if let Ok(r) = rx.try_recv() {
                return r;
            }
        }
    }

    /// Stops the engine; returns how many misdirected metadata writes it rewrote.
    fn stop(mut self) -> u64 {
        drop(self.mig_tx.take());
        if let Some(t) = self.mig_thread.take() {
            let _ = t.join();
        }
        let _ = &self.epochs;
        let stats = &self.meta.state().stats;
        stats.misdirected_writes.load(Ordering::Relaxed)
    }
}

/// Runs one seed. `Err` carries a description of the first violation.
pub fn run(opts: SimOptions) -> Result<SimReport, String> {
    let mut rng = Rng::new(opts.seed);
    let write_cache = rng.below(2) == 1;
    let fast_data = (1 + rng.below(4)) << 20;
    let slow_data = (1 + rng.below(6)) << 20;
    let faults = if opts.faults {
        Faults {
            read_eio: rng.below(20_000),
            write_eio: rng.below(20_000),
            latency_spike: rng.below(50_000),
            misdirect: match (rng.below(2), rng.below(20_000)) {
                (1, r) if opts.misdirect => r,
                _ => 0,
            },
        }
    } else {
        Faults::default()
    };
    let world = World::new(opts.seed, Faults::default());
    let fast: Arc<SimDevice> = world.add_device("fast", META_BYTES + fast_data, write_cache);
    let slow: Arc<SimDevice> = world.add_device("slow", slow_data, write_cache);
    let tiers: Vec<(String, Arc<dyn BlockDevice>)> =
        vec![("fast".into(), fast), ("slow".into(), slow)];
    let pool = DmaPool::new((MAX_OP_BLOCKS * BLOCK) as usize, 16)
        .map_err(|e| format!("sim DMA pool: {e}"))?;
    let metrics = crate::metrics::Metrics::new();
    let blocks = VOLUME_BYTES / BLOCK;
    let mut model = Model {
        live: vec![vec![0]; blocks as usize],
        durable: vec![vec![0]; blocks as usize],
        write_cache,
    };
    let mut report = SimReport {
        write_cache,
        ..SimReport::default()
    };
    let mut next_version = 1u64;
    let mut eng = Engine::open(&tiers, &pool, &metrics, opts.verify_writes)?;
    world.set_faults(faults);
    // Crashes: a fixed point, or 1-2 drawn from the seed (counted in durable events).
    let mut crashes_left = if opts.crash.is_some() {
        1
    } else {
        1 + rng.below(2)
    };
    let arm = |rng: &mut Rng, world: &World| {
        let base = world.events().len() as u64;
        world.arm_crash(Some(CrashPoint {
            event: base + 1 + rng.below(opts.steps * 2 + 10),
            after: rng.below(2) == 1,
        }));
    };
    match opts.crash {
        Some(cp) => world.arm_crash(Some(cp)),
        None => arm(&mut rng, &world),
    }
    let mut step = 0;
    while step < opts.steps || crashes_left > 0 {
        if step >= opts.steps && !world.crashed() {
            // Out of steps: crash now, with nothing in flight.
            world.crash();
        }
        if world.crashed() {
            report.misdirects_rewritten += eng.stop();
            world.restart();
            world.set_faults(Faults::default());
            world.set_phase("recovery");
            report.crashes += 1;
            crashes_left = crashes_left.saturating_sub(1);
            eng = Engine::open(&tiers, &pool, &metrics, opts.verify_writes)
                .map_err(|e| format!("recovery after crash {} failed: {e}", report.crashes))?;
            let when = format!(
                "after crash {} (write cache {write_cache}, faults {faults:?}, {} durable events; last: {:?})",
                report.crashes,
                world.events().len(),
                world.events().iter().rev().take(4).collect::<Vec<_>>()
            );
            check_all(&mut eng, &pool, &mut model, &mut report, &when)?;
            world.set_phase("workload");
            world.set_faults(faults);
            if crashes_left > 0 && opts.crash.is_none() {
                arm(&mut rng, &world);
            }
            if step >= opts.steps {
                break;
            }
            continue;
        }
        step += 1;
        let dice = rng.below(100);
        if dice < 62 {
            io_batch(
                &mut eng,
                &pool,
                &mut rng,
                &mut model,
                &mut report,
                &mut next_version,
            )?;
        } else if dice < 72 {
            // Flush: a barrier, nothing else in flight.
            let op = VolumeOp {
                volume: 0,
                kind: IoKind::Flush,
                offset_bytes: 0,
                len_bytes: 0,
                buf: std::ptr::null_mut(),
                buf_index: crate::bdev::BUF_INDEX_NONE,
                fua: false,
                token: 0,
            };
            report.ops += 1;
            if eng.run_ops(&[op])[0].1 == 0 {
                model.flushed();
            }
        } else if dice < 86 {
            let granules = VOLUME_BYTES / GRANULE_BYTES;
            let first = rng.below(granules);
            let count = (1 + rng.below(32)).min(granules - first);
            let to = rng.below(2) as u8;
            world.set_phase(if to == 0 { "promotion" } else { "demotion" });
            match eng.migrate(first, count, to)? {
                Ok(_) => report.migrations_ok += 1,
                Err(_) => report.migrations_failed += 1,
            }
            world.set_phase("workload");
        } else if dice < 94 {
            world.set_phase("checkpoint");
            let (tx, rx) = crossbeam_channel::bounded(1);
            if eng
                .meta_call(MetaRequest::Checkpoint { reply: tx }, &rx)
                .is_ok()
            {
                report.checkpoints += 1;
            }
            world.set_phase("workload");
        } else {
            // Unmap whole granules through the metadata service (the RPC path).
            let g = GRANULE_BYTES / BLOCK;
            let first = rng.below(blocks / g) * g;
            let n = (1 + rng.below(8)) * g;
            let n = n.min(blocks - first);
            world.set_phase("unmap");
            let (tx, rx) = crossbeam_channel::bounded(1);
            let req = MetaRequest::Unmap {
                volume: 0,
                offset_bytes: first * BLOCK,
                len_bytes: n * BLOCK,
                reply: Box::new(move |rc| {
                    let _ = tx.send(if rc == 0 {
                        Ok(0)
                    } else {
                        Err(format!("rc {rc}"))
                    });
                }),
            };
            let r = eng.meta_call(req, &rx);
            world.set_phase("workload");
            report.ops += 1;
            for b in first..first + n {
                if r.is_ok() {
                    model.live[b as usize] = vec![0];
                    model.durable[b as usize] = vec![0];
                } else {
                    model.live[b as usize].push(0);
                    model.durable[b as usize].push(0);
                }
            }
        }
    }
    report.misdirects_rewritten += eng.stop();
    report.faults_injected = world.injected();
    report.events = world.events();
    Ok(report)
}

/// A batch of non-overlapping reads, writes and trims in flight together.
fn io_batch(
    eng: &mut Engine,
    pool: &DmaPool,
    rng: &mut Rng,
    model: &mut Model,
    report: &mut SimReport,
    next_version: &mut u64,
) -> Result<(), String> {
    let blocks = VOLUME_BYTES / BLOCK;
    let n_ops = 1 + rng.below(8) as usize;
    let mut busy = vec![false; blocks as usize];
    let mut ops = Vec::new();
    // (kind, first block, n blocks, version, fua)
    let mut meta = Vec::new();
    for i in 0..n_ops {
        let n = 1 + rng.below(MAX_OP_BLOCKS);
        let first = rng.below(blocks - n + 1);
        if (first..first + n).any(|b| busy[b as usize]) {
            continue;
        }
        (first..first + n).for_each(|b| busy[b as usize] = true);
        let buf = pool.buf(i as u16);
        // SAFETY: not in flight.
        let data = unsafe { buf.as_mut_slice() };
        let r = rng.below(100);
        let (kind, version) = if r < 45 {
            let v = *next_version;
            *next_version += 1;
            for k in 0..n {
                pattern(
                    &mut data[(k * BLOCK) as usize..((k + 1) * BLOCK) as usize],
                    first + k,
                    v,
                );
            }
            (IoKind::Write, v)
        } else if r < 90 {
            data.fill(0xee);
            (IoKind::Read, 0)
        } else {
            (IoKind::Trim, 0)
        };
        let fua = kind == IoKind::Write && rng.below(8) == 0;
        ops.push(VolumeOp {
            volume: 0,
            kind,
            offset_bytes: first * BLOCK,
            len_bytes: (n * BLOCK) as u32,
            buf: if kind == IoKind::Trim {
                std::ptr::null_mut()
            } else {
                buf.ptr
            },
            buf_index: buf.index,
            fua,
            token: ops.len() as u64,
        });
        meta.push((kind, first, n, version, fua, i));
    }
    for (token, rc) in eng.run_ops(&ops) {
        let (kind, first, n, version, fua, slot) = meta[token as usize];
        report.ops += 1;
        if rc != 0 {
            report.failed_ops += 1;
        }
        match kind {
            IoKind::Write | IoKind::Trim => {
                if rc == 0 {
                    report.acked_writes += 1;
                }
                for b in first..first + n {
                    model.write(b as usize, version, rc == 0, fua);
                }
            }
            IoKind::Read if rc == 0 => {
                // SAFETY: completed.
                let rbuf = pool.buf(slot as u16);
                // SAFETY: completed.
                let data = unsafe { rbuf.as_slice() };
                for k in 0..n {
                    let b = first + k;
                    let got =
                        version_of(&data[(k * BLOCK) as usize..((k + 1) * BLOCK) as usize], b);
                    report.blocks_checked += 1;
                    match got {
                        Some(v) if model.live[b as usize].contains(&v) => {
                            model.live[b as usize] = vec![v];
                        }
                        _ => {
                            return Err(format!(
                                "live read of block {b}: got {}, allowed {:?}",
                                describe(got),
                                model.live[b as usize]
                            ))
                        }
                    }
                }
            }
            _ => {}
        }
    }
    Ok(())
}

fn describe(v: Option<u64>) -> String {
    match v {
        Some(0) => "zeros".into(),
        Some(v) => format!("version {v}"),
        None => "garbage".into(),
    }
}

/// Reads the whole volume after a recovery and checks every block.
fn check_all(
    eng: &mut Engine,
    pool: &DmaPool,
    model: &mut Model,
    report: &mut SimReport,
    when: &str,
) -> Result<(), String> {
    let blocks = VOLUME_BYTES / BLOCK;
    let mut b0 = 0;
    while b0 < blocks {
        let n = MAX_OP_BLOCKS.min(blocks - b0);
        let buf = pool.buf(0);
        let op = VolumeOp {
            volume: 0,
            kind: IoKind::Read,
            offset_bytes: b0 * BLOCK,
            len_bytes: (n * BLOCK) as u32,
            buf: buf.ptr,
            buf_index: buf.index,
            fua: false,
            token: 0,
        };
        let rc = eng.run_ops(&[op])[0].1;
        if rc != 0 {
            return Err(format!("{when}: read of blocks {b0}+{n} failed with {rc}"));
        }
        // SAFETY: completed.
        let data = unsafe { buf.as_slice() };
        for k in 0..n {
            let b = b0 + k;
            let got = version_of(&data[(k * BLOCK) as usize..((k + 1) * BLOCK) as usize], b);
            report.blocks_checked += 1;
            match got {
                Some(v) if model.durable[b as usize].contains(&v) => {
                    model.live[b as usize] = vec![v];
                    model.durable[b as usize] = vec![v];
                }
                _ => {
                    let loc = eng.volumes[0].map.get(b * BLOCK / GRANULE_BYTES);
                    return Err(format!(
                        "{when}: block {b} reads {}, allowed {:?} (granule at {loc:?})",
                        describe(got),
                        model.durable[b as usize]
                    ));
                }
            }
        }
        b0 += n;
    }
    Ok(())
}

/// The CLI entry: runs the seeds, prints a summary, returns the exit code.
pub fn main(args: &SimArgs) -> i32 {
    let failures = std::sync::Mutex::new(Vec::new());
    let next = std::sync::atomic::AtomicU64::new(0);
    let totals = std::sync::Mutex::new(SimReport::default());
    let t0 = std::time::Instant::now();
    std::thread::scope(|s| {
        for _ in 0..args.threads.max(1) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= args.seeds {
                    break;
                }
                let seed = args.seed + i;
                let opts = SimOptions {
                    seed,
                    steps: args.steps,
                    faults: !args.no_faults,
                    misdirect: !args.no_misdirect,
                    verify_writes: !args.no_verify_writes,
                    crash: args.crash_event.map(|event| CrashPoint {
                        event,
                        after: args.crash_after,
                    }),
                };
                match run_guarded(opts) {
                    Ok(r) => {
                        if args.events {
                            for (k, e) in r.events.iter().enumerate() {
                                println!(
                                    "event {}: device {} {} ({})",
                                    k + 1,
                                    e.device,
                                    e.what,
                                    e.phase
                                );
                            }
                        }
                        let mut t = totals.lock().unwrap();
                        t.ops += r.ops;
                        t.acked_writes += r.acked_writes;
                        t.failed_ops += r.failed_ops;
                        t.blocks_checked += r.blocks_checked;
                        t.crashes += r.crashes;
                        t.migrations_ok += r.migrations_ok;
                        t.migrations_failed += r.migrations_failed;
                        t.checkpoints += r.checkpoints;
                        t.faults_injected += r.faults_injected;
                        t.misdirects_rewritten += r.misdirects_rewritten;
                    }
                    Err(e) => {
                        eprintln!("kiln sim: seed {seed} FAILED: {e}");
                        eprintln!("  replay: {}", replay_command(&opts));
                        failures.lock().unwrap().push(seed);
                    }
                }
            });
        }
    });
    let t = totals.into_inner().unwrap();
    let failures = failures.into_inner().unwrap();
    println!(
        "kiln sim: {} seeds x {} steps in {:.1}s: {} ops, {} acked writes, {} failed ops, {} blocks checked, {} crashes, {} migrations ({} failed), {} checkpoints, {} faults injected ({} misdirected metadata writes rewritten), {} failing seeds",
        args.seeds,
        args.steps,
        t0.elapsed().as_secs_f64(),
        t.ops,
        t.acked_writes,
        t.failed_ops,
        t.blocks_checked,
        t.crashes,
        t.migrations_ok,
        t.migrations_failed,
        t.checkpoints,
        t.faults_injected,
        t.misdirects_rewritten,
        failures.len()
    );
    println!("seeds={} failures={}", args.seeds, failures.len());
    i32::from(!failures.is_empty())
}

/// Runs a seed, turning a panic in the engine into a failure of that seed.
pub fn run_guarded(opts: SimOptions) -> Result<SimReport, String> {
    match std::panic::catch_unwind(|| run(opts)) {
        Ok(r) => r,
        Err(p) => Err(format!(
            "panic: {}",
            p.downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| p.downcast_ref::<&str>().copied())
                .unwrap_or("?")
        )),
    }
}

/// The command that replays a run.
pub fn replay_command(o: &SimOptions) -> String {
    let mut c = format!("kiln sim --seed {} --steps {}", o.seed, o.steps);
    if !o.faults {
        c.push_str(" --no-faults");
    } else if !o.misdirect {
        c.push_str(" --no-misdirect");
    }
    if !o.verify_writes {
        c.push_str(" --no-verify-writes");
    }
    if let Some(cp) = o.crash {
        c.push_str(&format!(" --crash-event {}", cp.event));
        if cp.after {
            c.push_str(" --crash-after");
        }
    }
    c
}

#[cfg(test)]
mod tests {
    //! The journal's read-back of durable metadata writes, on a simulated device that
    //! misdirects chosen writes (`World::misdirect_next`).
    use super::*;
    use crate::volume::journal::{LOG_OFFSET, VERIFY_REWRITES};

    const FAST_BYTES: u64 = META_BYTES + (4 << 20);

    fn open(dev: &Arc<SimDevice>, verify: bool) -> (MetaService, Arc<Volume>) {
        let vol = Arc::new(Volume::new(0, "v", 4 << 20, 1 << 20));
        let tier = MetaTier {
            name: "fast".into(),
            device: dev.clone(),
            capacity_bytes: FAST_BYTES,
            usage: Arc::new(TierUsage::default()),
        };
        let meta =
            MetaService::open_verified(vec![tier], vec![vol.clone()], verify).expect("opens");
        (meta, vol)
    }

    /// Maps the first chunk of the volume; returns the reply's errno.
    fn allocate(meta: &mut MetaService) -> i32 {
        let (tx, rx) = crossbeam_channel::unbounded();
        let (rtx, rrx) = crossbeam_channel::bounded(1);
        tx.send(MetaRequest::Allocate {
            volume: 0,
            offset_bytes: 0,
            len_bytes: BLOCK,
            reply: Box::new(move |rc| {
                let _ = rtx.send(rc);
            }),
        })
        .unwrap();
        assert!(meta.serve_pending(&rx));
        rrx.try_recv().expect("answered")
    }

    /// Power off and on; then recovery, with the read-back on.
    fn reopen(world: &World, dev: &Arc<SimDevice>) -> (MetaService, Arc<Volume>) {
        world.crash();
        world.restart();
        open(dev, true)
    }

    /// A misdirected Map commit is found by its read-back and rewritten before the request
    /// is answered, so recovery finds it; without the read-back the acknowledged mapping is
    /// gone after recovery (the log ends at the hole).
    #[test]
    fn a_misdirected_commit_is_rewritten_before_it_is_acknowledged() {
        for verify in [true, false] {
            let world = World::new(1, Faults::default());
            let dev = world.add_device("fast", FAST_BYTES, false);
            let (mut meta, _) = open(&dev, verify);
            let sector = (LOG_OFFSET + meta.state().log_pos) / SECTOR;
            let before = world.durable_sector(0, sector);
            world.misdirect_next(1);
            assert_eq!(allocate(&mut meta), 0, "verify {verify}");
            let stats = meta.state().stats.clone();
            let commit = world.durable_sector(0, sector);
            // The misdirected copy: the commit's bytes 1..63 sectors past its address.
            let copy = (sector + 1..sector + 64).find(|&s| {
                world
                    .durable_sector(0, s)
                    .is_some_and(|b| b[..4] == *b"KLNJ")
            });
            assert!(copy.is_some(), "verify {verify}: no misdirected copy");
            drop(meta);
            let (_, vol) = reopen(&world, &dev);
            if verify {
                assert_eq!(stats.misdirected_writes.load(Ordering::Relaxed), 1);
                assert_eq!(commit, world.durable_sector(0, copy.unwrap()));
                assert!(
                    vol.map.get(0).is_some(),
                    "the acknowledged Map commit was lost"
                );
            } else {
                assert_eq!(stats.misdirected_writes.load(Ordering::Relaxed), 0);
                assert_eq!(commit, before, "the addressed sector changed");
                assert!(vol.map.get(0).is_none(), "the hole did not end the log");
            }
        }
    }

    /// A write that never reads back as written fails the metadata device after the bounded
    /// rewrites: the commit is not acknowledged, every later change fails with the same
    /// precise error, and recovery shows nothing of it.
    #[test]
    fn a_write_that_never_reads_back_fails_the_metadata_device() {
        let world = World::new(2, Faults::default());
        let dev = world.add_device("fast", FAST_BYTES, true);
        let (mut meta, vol) = open(&dev, true);
        world.misdirect_next(u64::MAX);
        assert_eq!(allocate(&mut meta), -libc::EIO);
        let stats = meta.state().stats.clone();
        assert_eq!(
            stats.misdirected_writes.load(Ordering::Relaxed),
            1 + VERIFY_REWRITES as u64
        );
        assert!(stats.failed.load(Ordering::Relaxed));
        assert!(vol.map.get(0).is_none(), "an unverified commit was applied");
        // The device stays failed even when writes land again.
        world.misdirect_next(0);
        assert_eq!(allocate(&mut meta), -libc::EIO);
        let (tx, rx) = crossbeam_channel::unbounded();
        let (rtx, rrx) = crossbeam_channel::bounded(1);
        tx.send(MetaRequest::Checkpoint { reply: rtx }).unwrap();
        meta.serve_pending(&rx);
        let e = rrx
            .try_recv()
            .unwrap()
            .expect_err("checkpoint on a failed device");
        assert!(
            e.starts_with("metadata device failed: tier 'fast' journal commit at byte ")
                && e.contains("did not read back as written after 3 rewrites"),
            "{e}"
        );
        drop(meta);
        let (_, vol) = reopen(&world, &dev);
        assert!(vol.map.get(0).is_none());
    }
}
