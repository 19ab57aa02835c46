//! `kiln bench`: a bdevperf-like load generator that runs on the reactors.
//!
//! One [`BenchJob`] poller per reactor keeps `queue_depth` requests in flight
//! on its own channel of the device. Latency is taken with the TSC at
//! submission and once per reaped batch, recorded in an `hdrhistogram` in
//! ticks and converted at the end. Nothing is allocated per I/O.
//!
//! `verify` writes a self-describing pattern (offset, generation, crc32c) and
//! reads it back into a poisoned buffer; any mismatch is printed and counted.

use std::sync::Arc;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde_json::json;

use crate::bdev::{
    self, BlockDevice, ChannelOptions, Completion, IoChannel, IoKind, IoRequest, SubmitError,
};
use crate::clock::{ticks, TickRate};
use crate::dma::DmaBuf;
use crate::reactor::{PollCtx, PollMode, PollStatus, Poller, ReactorConfig, Reactors};

/// The access pattern.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Workload {
    Read,
    Write,
    Randread,
    Randwrite,
    Randrw,
    Verify,
}

#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Device spec: null:SIZE, malloc:SIZE, file:PATH[?size=SIZE], delay:..., error:...
    #[arg(long)]
    pub device: String,
    /// Workload.
    #[arg(short = 'w', long = "workload", value_enum, default_value = "randread")]
    pub workload: Workload,
    /// I/O size in bytes (accepts 4k, 128KiB).
    #[arg(short = 'o', long = "io-size", default_value = "4096", value_parser = parse_size_arg)]
    pub io_bytes: u64,
    /// Queue depth per core.
    #[arg(short = 'q', long = "queue-depth", default_value_t = 32)]
    pub queue_depth: u32,
    /// Run time in seconds.
    #[arg(short = 't', long = "time", default_value_t = 10.0)]
    pub seconds: f64,
    /// Cores to run reactors on, e.g. 0 or 0,1 or 0-3.
    #[arg(long, default_value = "0", value_parser = parse_core_list)]
    pub cores: CoreList,
    /// Percentage of reads for randrw.
    #[arg(long, default_value_t = 50)]
    pub rwmixread: u32,
    /// Print fio-compatible JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Reactor poll mode while the bench runs (busy spins; adaptive parks when idle).
    #[arg(long, default_value = "adaptive")]
    pub poll_mode: PollMode,
    /// Adaptive mode: spin this long with no work before parking.
    #[arg(long, default_value_t = 20)]
    pub idle_spin_us: u64,
    /// Count every I/O in a heat sampler (64 KiB granules), as the volume engine
    /// does, to measure the sampler's cost on the hot path.
    #[arg(long)]
    pub heat: bool,
    /// With --heat: count one I/O in 2^N (the sampler scales counts back up).
    #[arg(long, default_value_t = 4)]
    pub heat_sample_shift: u32,
    /// Seed for offsets and verify patterns.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// A list of core ids.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CoreList(pub Vec<usize>);

pub fn parse_size_arg(s: &str) -> Result<u64, String> {
    crate::units::parse_size(s)
}

/// Parses `0`, `0,1`, `0-3` or `[0,1]`.
pub fn parse_core_list(s: &str) -> Result<CoreList, String> {
    let mut cores = Vec::new();
    for part in s
        .trim_matches(|c| c == '[' || c == ']')
        .split(',')
        .filter(|p| !p.trim().is_empty())
    {
        let part = part.trim();
        if let Some((a, b)) = part.split_once('-') {
            let a: usize = a
                .parse()
                .map_err(|_| format!("core range '{part}' is not A-B"))?;
            let b: usize = b
                .parse()
                .map_err(|_| format!("core range '{part}' is not A-B"))?;
            if a > b {
                return Err(format!("core range '{part}' is empty"));
            }
            cores.extend(a..=b);
        } else {
            cores.push(
                part.parse()
                    .map_err(|_| format!("core '{part}' is not a number"))?,
            );
        }
    }
    if cores.is_empty() {
        return Err("core list is empty".into());
    }
    Ok(CoreList(cores))
}

const VERIFY_MAGIC: u64 = 0x4b49_4c4e_5645_5246; // "KILNVERF"

/// Fills `buf` with the pattern for (offset, generation).
pub fn fill_pattern(buf: &mut [u8], offset: u64, generation: u64) {
    let mut x = (offset ^ generation.rotate_left(32)) | 1;
    for chunk in buf[32..].chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes());
    }
    let crc = crc32c::crc32c(&buf[32..]);
    buf[0..8].copy_from_slice(&VERIFY_MAGIC.to_le_bytes());
    buf[8..16].copy_from_slice(&offset.to_le_bytes());
    buf[16..24].copy_from_slice(&generation.to_le_bytes());
    buf[24..32].copy_from_slice(&(crc as u64).to_le_bytes());
}

/// Checks a pattern; returns a description of the first difference.
pub fn check_pattern(buf: &[u8], offset: u64, generation: u64) -> Result<(), String> {
    let word = |at: usize| u64::from_le_bytes(buf[at..at + 8].try_into().unwrap());
    if word(0) != VERIFY_MAGIC {
        return Err(format!("bad magic {:#018x}", word(0)));
    }
    if word(8) != offset || word(16) != generation {
        return Err(format!(
            "header says offset {} generation {}, expected {offset} {generation}",
            word(8),
            word(16)
        ));
    }
    let crc = crc32c::crc32c(&buf[32..]) as u64;
    if crc != word(24) {
        return Err(format!(
            "payload crc32c {crc:#010x} != header {:#010x}",
            word(24)
        ));
    }
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum SlotState {
    Free,
    Writing,
    Reading,
}

#[derive(Clone, Copy)]
struct Slot {
    buf: DmaBuf,
    submit_ticks: u64,
    kind: IoKind,
    offset: u64,
    generation: u64,
    state: SlotState,
}

/// Per-direction results.
pub struct DirStats {
    pub ios: u64,
    pub bytes: u64,
    pub hist: Histogram<u64>,
    pub errors: u64,
}

impl DirStats {
    fn new() -> DirStats {
        DirStats {
            ios: 0,
            bytes: 0,
            hist: Histogram::new_with_bounds(1, 1 << 42, 3).expect("static histogram bounds"),
            errors: 0,
        }
    }
}

/// What one job measured.
pub struct JobResult {
    pub read: DirStats,
    pub write: DirStats,
    pub elapsed_ticks: u64,
    pub mismatches: u64,
}

/// The per-reactor load generator poller.
pub struct BenchJob {
    chan: Box<dyn IoChannel>,
    slots: Vec<Slot>,
    workload: Workload,
    io_bytes: u64,
    ios_per_device: u64,
    /// Verify: each slot owns offsets congruent to its index modulo the queue depth.
    stripe: u64,
    rwmixread_threshold: u64,
    rng: u64,
    seq_next: u64,
    start_ticks: u64,
    end_ticks: u64,
    stopping: bool,
    reaped: Vec<Completion>,
    pub read: DirStats,
    pub write: DirStats,
    pub mismatches: u64,
    pub ios_done: u64,
    /// Stop after this many completions (tests), or `u64::MAX`.
    pub ios_limit: u64,
    /// Whether the last step reaped anything (the poller reports busy or idle from it).
    pub progressed: bool,
    /// Optional heat recorder: one count per submitted I/O.
    pub heat: Option<crate::heat::HeatRecorder>,
    result_tx: Option<crossbeam_channel::Sender<JobResult>>,
}

impl BenchJob {
    /// Builds a job; buffers come from the reactor's pool.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        dev: &dyn BlockDevice,
        pool: &mut crate::dma::DmaPool,
        workload: Workload,
        io_bytes: u64,
        queue_depth: u32,
        duration_ticks: u64,
        rwmixread: u32,
        seed: u64,
    ) -> Result<BenchJob, String> {
        let info = dev.info();
        if io_bytes == 0 || io_bytes % info.block_size as u64 != 0 {
            return Err(format!(
                "I/O size {io_bytes} is not a multiple of the device block size {}",
                info.block_size
            ));
        }
        if io_bytes as usize > pool.buf_bytes() {
            return Err(format!(
                "I/O size {io_bytes} is above the DMA buffer size {}",
                pool.buf_bytes()
            ));
        }
        if workload == Workload::Verify && !info.persistent {
            return Err(format!(
                "{}: verify needs a device that stores data ({} discards it)",
                info.name, info.product
            ));
        }
        let ios_per_device = info.size_bytes() / io_bytes;
        if ios_per_device < queue_depth as u64 {
            return Err(format!(
                "device of {} bytes is too small for {queue_depth} x {io_bytes}",
                info.size_bytes()
            ));
        }
        let chan = dev
            .open_channel(&ChannelOptions {
                queue_depth,
                pool: Some(pool),
            })
            .map_err(|e| e.to_string())?;
        let mut slots = Vec::with_capacity(queue_depth as usize);
        for _ in 0..queue_depth {
            let buf = pool
                .alloc()
                .ok_or("DMA pool too small for the queue depth")?;
            // SAFETY: freshly allocated and not in flight.
            unsafe { buf.as_mut_slice() }.fill(0xa5);
            slots.push(Slot {
                buf,
                submit_ticks: 0,
                kind: IoKind::Read,
                offset: 0,
                generation: 0,
                state: SlotState::Free,
            });
        }
        let now = ticks();
        Ok(BenchJob {
            chan,
            slots,
            workload,
            io_bytes,
            ios_per_device,
            stripe: queue_depth as u64,
            rwmixread_threshold: (rwmixread.min(100) as u128 * u64::MAX as u128 / 100) as u64,
            rng: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
            seq_next: 0,
            start_ticks: now,
            end_ticks: now.saturating_add(duration_ticks),
            stopping: false,
            reaped: vec![Completion::default(); 64],
            read: DirStats::new(),
            write: DirStats::new(),
            mismatches: 0,
            ios_done: 0,
            ios_limit: u64::MAX,
            progressed: false,
            heat: None,
            result_tx: None,
        })
    }

    /// Sends the result here when the job ends.
    pub fn report_to(&mut self, tx: crossbeam_channel::Sender<JobResult>) {
        self.result_tx = Some(tx);
    }

    #[inline]
    fn next_rand(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    #[inline]
    fn rand_below(&mut self, n: u64) -> u64 {
        ((self.next_rand() as u128 * n as u128) >> 64) as u64
    }

    /// Chooses and submits the next request for slot `i`.
    #[inline]
    fn issue(&mut self, i: usize) -> Result<(), SubmitError> {
        let (kind, offset) = match self.workload {
            Workload::Read | Workload::Write => {
                let o = self.seq_next;
                self.seq_next = (self.seq_next + 1) % self.ios_per_device;
                (
                    if self.workload == Workload::Read {
                        IoKind::Read
                    } else {
                        IoKind::Write
                    },
                    o * self.io_bytes,
                )
            }
            Workload::Randread => (
                IoKind::Read,
                self.rand_below(self.ios_per_device) * self.io_bytes,
            ),
            Workload::Randwrite => (
                IoKind::Write,
                self.rand_below(self.ios_per_device) * self.io_bytes,
            ),
            Workload::Randrw => {
                let k = if self.next_rand() < self.rwmixread_threshold {
                    IoKind::Read
                } else {
                    IoKind::Write
                };
                (k, self.rand_below(self.ios_per_device) * self.io_bytes)
            }
            Workload::Verify => {
                let slot = self.slots[i];
                if slot.state == SlotState::Writing {
                    // The write completed: read the same block back into a poisoned buffer.
                    // SAFETY: the slot's buffer is not in flight between completion and resubmission.
                    (unsafe { slot.buf.as_mut_slice() })[..self.io_bytes as usize].fill(0xee);
                    (IoKind::Read, slot.offset)
                } else {
                    let rows = self.ios_per_device / self.stripe;
                    let offset = (self.rand_below(rows) * self.stripe + i as u64) * self.io_bytes;
                    let generation = self.next_rand();
                    // SAFETY: as above.
                    fill_pattern(
                        &mut unsafe { slot.buf.as_mut_slice() }[..self.io_bytes as usize],
                        offset,
                        generation,
                    );
                    self.slots[i].generation = generation;
                    (IoKind::Write, offset)
                }
            }
        };
        let slot = &mut self.slots[i];
        let req = IoRequest {
            tag: i as u64,
            kind,
            offset_bytes: offset,
            len_bytes: self.io_bytes as u32,
            buf: slot.buf.ptr,
            buf_index: slot.buf.index,
            fua: false,
        };
        // SAFETY: the slot's buffer belongs to this job for its whole life and is only
        // reused after the completion for tag `i` has been reaped.
        unsafe { self.chan.submit(&req)? };
        if let Some(h) = &self.heat {
            h.record((offset >> 16) as u32, kind == IoKind::Write, false);
        }
        slot.kind = kind;
        slot.offset = offset;
        slot.state = if kind == IoKind::Write {
            SlotState::Writing
        } else {
            SlotState::Reading
        };
        slot.submit_ticks = ticks();
        Ok(())
    }

    /// Submits the initial queue depth.
    pub fn start(&mut self) -> Result<(), String> {
        self.start_ticks = ticks();
        let duration = self.end_ticks - self.start_ticks.min(self.end_ticks);
        self.end_ticks = self.start_ticks.saturating_add(duration);
        for i in 0..self.slots.len() {
            self.issue(i)
                .map_err(|e| format!("initial submit failed: {e}"))?;
        }
        self.chan.submit_pending();
        Ok(())
    }

    /// One poll: reap, account, resubmit. Returns whether the job is finished.
    #[inline]
    pub fn step(&mut self) -> bool {
        let n = self.chan.poll_completions(&mut self.reaped);
        self.progressed = n > 0;
        let now = ticks();
        if !self.stopping && (now >= self.end_ticks || self.ios_done >= self.ios_limit) {
            self.stopping = true;
            self.end_ticks = now;
        }
        for k in 0..n {
            let c = self.reaped[k];
            let i = c.tag as usize;
            let slot = self.slots[i];
            let lat = now.saturating_sub(slot.submit_ticks).max(1);
            let dir = if slot.kind == IoKind::Read {
                &mut self.read
            } else {
                &mut self.write
            };
            dir.ios += 1;
            dir.bytes += self.io_bytes;
            dir.hist.saturating_record(lat);
            self.ios_done += 1;
            if c.result != 0 {
                dir.errors += 1;
                if dir.errors <= 5 {
                    eprintln!(
                        "kiln bench: I/O error at offset {}: {}",
                        slot.offset,
                        std::io::Error::from_raw_os_error(-c.result)
                    );
                }
            } else if self.workload == Workload::Verify && slot.kind == IoKind::Read {
                // SAFETY: the read completed; the buffer is ours until resubmitted.
                let data = &unsafe { slot.buf.as_slice() }[..self.io_bytes as usize];
                if let Err(why) = check_pattern(data, slot.offset, slot.generation) {
                    self.mismatches += 1;
                    eprintln!(
                        "kiln bench: VERIFY MISMATCH at offset {}: {why}",
                        slot.offset
                    );
                }
            }
            self.slots[i].state = if slot.kind == IoKind::Read {
                SlotState::Free
            } else {
                slot.state
            };
            if !self.stopping || (self.workload == Workload::Verify && slot.kind == IoKind::Write) {
                if let Err(e) = self.issue(i) {
                    panic!("resubmit failed with {e}: the channel is smaller than the job's queue depth");
                }
            } else {
                self.slots[i].state = SlotState::Free;
            }
        }
        self.chan.submit_pending();
        self.stopping && self.chan.inflight() == 0
    }

    fn into_result(self, pool: &mut crate::dma::DmaPool) -> JobResult {
        for s in &self.slots {
            pool.free(s.buf);
        }
        JobResult {
            read: self.read,
            write: self.write,
            elapsed_ticks: self.end_ticks - self.start_ticks,
            mismatches: self.mismatches,
        }
    }
}

/// Wraps a job as a reactor poller.
struct BenchPoller {
    job: Option<BenchJob>,
    watching: bool,
}

impl Poller for BenchPoller {
    fn poll(&mut self, ctx: &mut PollCtx<'_>) -> PollStatus {
        let Some(job) = self.job.as_mut() else {
            return PollStatus::Done;
        };
        if !self.watching {
            // Completions must wake a parked reactor.
            if let Some(fd) = job.chan.notifier_fd() {
                let _ = ctx.parker.watch(fd);
            }
            self.watching = true;
        }
        if !job.step() {
            return if job.progressed {
                PollStatus::Busy
            } else {
                PollStatus::Idle
            };
        }
        let mut job = self.job.take().unwrap();
        let tx = job.result_tx.take();
        let result = job.into_result(ctx.pool);
        if let Some(tx) = tx {
            let _ = tx.send(result);
        }
        PollStatus::Done
    }

    fn next_deadline_ns(&self) -> Option<u64> {
        self.job.as_ref().and_then(|j| j.chan.next_deadline_ns())
    }
}

fn process_cpu_ns() -> u64 {
    let mut ru: libc::rusage = unsafe_zeroed_rusage();
    // SAFETY: `ru` is a valid rusage to fill.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as u64 * 1_000_000_000 + t.tv_usec as u64 * 1000;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn unsafe_zeroed_rusage() -> libc::rusage {
    // SAFETY: rusage is plain old data; all-zero is a valid value.
    unsafe { std::mem::zeroed() }
}

/// The merged outcome of a run.
pub struct BenchReport {
    pub device: String,
    pub args: BenchArgs,
    pub rate: TickRate,
    pub read: DirStats,
    pub write: DirStats,
    pub elapsed_s: f64,
    pub cpu_s: f64,
    pub mismatches: u64,
}

/// Runs a benchmark on fresh reactors and merges the per-core results.
pub fn run_bench(args: &BenchArgs) -> Result<BenchReport, String> {
    let dev: Arc<dyn BlockDevice> = bdev::open(&args.device).map_err(|e| e.to_string())?;
    if args.queue_depth == 0 || args.queue_depth > 4096 {
        return Err(format!("queue depth {} must be 1..=4096", args.queue_depth));
    }
    let rate = TickRate::calibrate();
    let duration_ticks = rate.from_ns((args.seconds * 1e9) as u64);
    let config = ReactorConfig {
        mode: args.poll_mode,
        idle_spin_us: args.idle_spin_us,
        dma_buf_bytes: (args.io_bytes as usize).max(4096),
        dma_buf_count: args.queue_depth as usize + 8,
    };
    let mut reactors = Reactors::start(&args.cores.0, &config).map_err(|e| e.to_string())?;
    let partitions = (dev.info().size_bytes() >> 16).max(1) as usize;
    let mut sampler = args.heat.then(|| {
        crate::heat::HeatSampler::new(
            partitions,
            crate::heat::HeatConfig {
                reactors_max: args.cores.0.len(),
                sample_shift: args.heat_sample_shift.min(15),
                ..Default::default()
            },
        )
    });
    let (tx, rx) = crossbeam_channel::unbounded();
    let (err_tx, err_rx) = crossbeam_channel::unbounded::<String>();
    let cpu0 = process_cpu_ns();
    let t0 = std::time::Instant::now();
    for (n, h) in reactors.handles.iter().enumerate() {
        let dev = dev.clone();
        let tx = tx.clone();
        let err_tx = err_tx.clone();
        let a = args.clone();
        let recorder = sampler.as_mut().map(|s| s.handle(n));
        h.send(move |r| {
            let job = BenchJob::new(
                dev.as_ref(),
                &mut r.pool,
                a.workload,
                a.io_bytes,
                a.queue_depth,
                duration_ticks,
                a.rwmixread,
                a.seed.wrapping_add(n as u64 * 7919),
            )
            .and_then(|mut j| j.start().map(|_| j));
            match job {
                Ok(mut job) => {
                    job.heat = recorder;
                    job.report_to(tx);
                    r.add_poller(Box::new(BenchPoller {
                        job: Some(job),
                        watching: false,
                    }));
                }
                Err(e) => {
                    let _ = err_tx.send(e);
                }
            }
        });
    }
    drop(tx);
    drop(err_tx);
    let mut results = Vec::new();
    let limit = Duration::from_secs_f64(args.seconds + 60.0);
    while results.len() < reactors.handles.len() {
        if let Ok(e) = err_rx.try_recv() {
            reactors.shutdown();
            return Err(e);
        }
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(r) => results.push(r),
            Err(crossbeam_channel::RecvTimeoutError::Timeout) if t0.elapsed() < limit => {}
            Err(_) => {
                reactors.shutdown();
                return Err(err_rx
                    .try_recv()
                    .unwrap_or_else(|_| "bench job did not finish".into()));
            }
        }
    }
    let cpu_s = (process_cpu_ns() - cpu0) as f64 / 1e9;
    reactors.shutdown();
    let mut read = DirStats::new();
    let mut write = DirStats::new();
    let mut elapsed_ticks = 0;
    let mut mismatches = 0;
    for r in results {
        read.ios += r.read.ios;
        read.bytes += r.read.bytes;
        read.errors += r.read.errors;
        read.hist.add(&r.read.hist).map_err(|e| e.to_string())?;
        write.ios += r.write.ios;
        write.bytes += r.write.bytes;
        write.errors += r.write.errors;
        write.hist.add(&r.write.hist).map_err(|e| e.to_string())?;
        elapsed_ticks = elapsed_ticks.max(r.elapsed_ticks);
        mismatches += r.mismatches;
    }
    Ok(BenchReport {
        device: dev.info().name.clone(),
        args: args.clone(),
        rate,
        read,
        write,
        elapsed_s: rate.to_ns(elapsed_ticks) as f64 / 1e9,
        cpu_s,
        mismatches,
    })
}

const PERCENTILES: [f64; 5] = [50.0, 90.0, 99.0, 99.9, 99.99];

impl BenchReport {
    fn dir_json(&self, d: &DirStats) -> serde_json::Value {
        let ns = |t: u64| self.rate.to_ns(t);
        let mut pct = serde_json::Map::new();
        for p in [
            1.0, 5.0, 10.0, 50.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.95, 99.99,
        ] {
            let v = if d.ios == 0 {
                0
            } else {
                ns(d.hist.value_at_quantile(p / 100.0))
            };
            pct.insert(format!("{p:.6}"), json!(v));
        }
        let mean = if d.ios == 0 {
            0.0
        } else {
            d.hist.mean() / self.rate.ticks_per_ns
        };
        let clat = json!({
            "min": if d.ios == 0 { 0 } else { ns(d.hist.min()) },
            "max": if d.ios == 0 { 0 } else { ns(d.hist.max()) },
            "mean": mean,
            "stddev": d.hist.stdev() / self.rate.ticks_per_ns,
            "N": d.ios,
            "percentile": pct,
        });
        json!({
            "io_bytes": d.bytes,
            "io_kbytes": d.bytes / 1024,
            "bw_bytes": (d.bytes as f64 / self.elapsed_s) as u64,
            "bw": (d.bytes as f64 / 1024.0 / self.elapsed_s) as u64,
            "iops": d.ios as f64 / self.elapsed_s,
            "runtime": (self.elapsed_s * 1000.0) as u64,
            "total_ios": d.ios,
            "short_ios": 0,
            "drop_ios": 0,
            "clat_ns": clat.clone(),
            "lat_ns": clat,
            "errors": d.errors,
        })
    }

    /// fio's JSON shape: `jobs[0].read.iops`, `jobs[0].read.clat_ns.percentile["99.000000"]`.
    pub fn to_json(&self) -> serde_json::Value {
        let cpu_pct = 100.0 * self.cpu_s / self.elapsed_s;
        json!({
            "fio version": concat!("kiln-", env!("CARGO_PKG_VERSION")),
            "timestamp": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
            "global options": {
                "filename": self.device,
                "rw": format!("{:?}", self.args.workload).to_lowercase(),
                "bs": self.args.io_bytes,
                "iodepth": self.args.queue_depth,
                "runtime": self.args.seconds,
                "cores": self.args.cores.0,
            },
            "jobs": [{
                "jobname": "kiln-bench",
                "groupid": 0,
                "error": 0,
                "elapsed": self.elapsed_s.round() as u64,
                "read": self.dir_json(&self.read),
                "write": self.dir_json(&self.write),
                "trim": self.dir_json(&DirStats::new()),
                "usr_cpu": cpu_pct,
                "sys_cpu": 0.0,
                "cpu_ns_per_io": self.cpu_ns_per_io(),
                "verify_mismatches": self.mismatches,
            }],
        })
    }

    pub fn total_iops(&self) -> f64 {
        (self.read.ios + self.write.ios) as f64 / self.elapsed_s
    }

    pub fn cpu_ns_per_io(&self) -> f64 {
        self.cpu_s * 1e9 / (self.read.ios + self.write.ios).max(1) as f64
    }

    /// The human table.
    pub fn to_table(&self) -> String {
        let mut s = format!(
            "kiln bench: {} {:?} {} B QD{} on cores {:?} for {:.1} s\n",
            self.device,
            self.args.workload,
            self.args.io_bytes,
            self.args.queue_depth,
            self.args.cores.0,
            self.elapsed_s
        );
        s += &format!(
            "{:<6} {:>12} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>8}\n",
            "dir",
            "IOPS",
            "MiB/s",
            "mean_us",
            "p50_us",
            "p99_us",
            "p99.9_us",
            "p99.99_us",
            "errors"
        );
        for (name, d) in [("read", &self.read), ("write", &self.write)] {
            if d.ios == 0 {
                continue;
            }
            let us = |q: f64| self.rate.to_ns(d.hist.value_at_quantile(q)) as f64 / 1000.0;
            s += &format!(
                "{:<6} {:>12.0} {:>10.1} {:>10.2} {:>10.2} {:>10.2} {:>10.2} {:>10.2} {:>8}\n",
                name,
                d.ios as f64 / self.elapsed_s,
                d.bytes as f64 / (1 << 20) as f64 / self.elapsed_s,
                d.hist.mean() / self.rate.ticks_per_ns / 1000.0,
                us(PERCENTILES[0] / 100.0),
                us(PERCENTILES[2] / 100.0),
                us(PERCENTILES[3] / 100.0),
                us(PERCENTILES[4] / 100.0),
                d.errors
            );
        }
        s += &format!(
            "total  {:>12.0} IOPS, cpu {:.2} s ({:.0} ns per I/O)",
            self.total_iops(),
            self.cpu_s,
            self.cpu_ns_per_io()
        );
        if self.args.workload == Workload::Verify {
            s += &format!(", verify mismatches {}", self.mismatches);
        }
        s
    }
}

/// Serves probe requests: one malloc I/O per request, replied when complete.
struct ProbePoller {
    chan: Box<dyn IoChannel>,
    buf: DmaBuf,
    rx: crossbeam_channel::Receiver<crossbeam_channel::Sender<()>>,
    waiting: Option<crossbeam_channel::Sender<()>>,
    reaped: [Completion; 4],
}

impl Poller for ProbePoller {
    fn poll(&mut self, _ctx: &mut PollCtx<'_>) -> PollStatus {
        if self.waiting.is_none() {
            let Ok(reply) = self.rx.try_recv() else {
                return PollStatus::Idle;
            };
            let req = IoRequest::read(1, 0, self.buf.ptr, 4096, self.buf.index);
            // SAFETY: the poller owns the buffer until the completion is reaped.
            unsafe { self.chan.submit(&req) }.expect("probe submit");
            self.chan.submit_pending();
            self.waiting = Some(reply);
        }
        if self.chan.poll_completions(&mut self.reaped) > 0 {
            let _ = self.waiting.take().unwrap().send(());
        }
        PollStatus::Busy
    }
}

fn thread_cpu_ns(tid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap_or_default();
    let Some(close) = stat.rfind(')') else {
        return 0;
    };
    let f: Vec<&str> = stat[close + 2..].split_whitespace().collect();
    let ticks: u64 = f.get(11).and_then(|x| x.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|x| x.parse().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    ticks * 1_000_000_000 / hz.max(1)
}

/// `kiln probe-idle`: CPU of an idle adaptive reactor, and the latency of the
/// first I/O after it parked against a warm one.
#[derive(clap::Args, Debug, Clone)]
pub struct IdleProbeArgs {
    /// Seconds of idleness to measure CPU over.
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// Core for the reactor.
    #[arg(long, default_value_t = 0)]
    pub core: usize,
    /// Probe rounds for the latency comparison.
    #[arg(long, default_value_t = 50)]
    pub rounds: usize,
}

pub fn idle_probe(args: &IdleProbeArgs) -> Result<serde_json::Value, String> {
    let config = ReactorConfig {
        dma_buf_count: 8,
        dma_buf_bytes: 4096,
        ..ReactorConfig::default()
    };
    let mut reactors = Reactors::start(&[args.core], &config).map_err(|e| e.to_string())?;
    let h = reactors.handles[0].clone();
    let dev = bdev::open("malloc:16MiB").map_err(|e| e.to_string())?;
    let (tx, rx) = crossbeam_channel::unbounded::<crossbeam_channel::Sender<()>>();
    let d2 = dev.clone();
    let tid = h
        .call(move |r| {
            let chan = d2
                .open_channel(&ChannelOptions {
                    queue_depth: 4,
                    pool: Some(&r.pool),
                })
                .expect("probe channel");
            let buf = r.pool.alloc().expect("probe buffer");
            r.add_poller(Box::new(ProbePoller {
                chan,
                buf,
                rx,
                waiting: None,
                reaped: [Completion::default(); 4],
            }));
            // SAFETY: gettid has no preconditions.
            unsafe { libc::gettid() }
        })
        .ok_or("reactor died")?;
    let probe = |tx: &crossbeam_channel::Sender<crossbeam_channel::Sender<()>>| {
        let (rtx, rrx) = crossbeam_channel::bounded(1);
        let t0 = std::time::Instant::now();
        tx.send(rtx).unwrap();
        h.wake();
        // Spin for the answer so the prober's own wake-up is not measured.
        while rrx.try_recv().is_err() {
            std::hint::spin_loop();
        }
        t0.elapsed().as_nanos() as u64
    };
    // Idle CPU.
    std::thread::sleep(Duration::from_millis(200));
    let c0 = thread_cpu_ns(tid);
    let t0 = std::time::Instant::now();
    std::thread::sleep(Duration::from_secs_f64(args.seconds));
    let idle_cpu = (thread_cpu_ns(tid) - c0) as f64 / t0.elapsed().as_nanos() as f64;
    // Warm: back-to-back probes while the reactor spins; cold: after it has parked.
    let mut warm = Vec::new();
    let mut cold = Vec::new();
    for _ in 0..args.rounds {
        std::thread::sleep(Duration::from_millis(20));
        cold.push(probe(&tx));
        for _ in 0..5 {
            warm.push(probe(&tx));
        }
    }
    reactors.shutdown();
    let median = |v: &mut Vec<u64>| {
        v.sort_unstable();
        v[v.len() / 2]
    };
    let (w, c) = (median(&mut warm), median(&mut cold));
    let (mut fw, mut fc) = wake_floor(args.core, args.rounds)?;
    let (fw, fc) = (median(&mut fw), median(&mut fc));
    Ok(json!({
        "idle_seconds": args.seconds,
        "idle_cpu_fraction": idle_cpu,
        "warm_io_us_median": w as f64 / 1000.0,
        "first_io_after_idle_us_median": c as f64 / 1000.0,
        "wake_penalty_us": (c as f64 - w as f64) / 1000.0,
        "floor_warm_us_median": fw as f64 / 1000.0,
        "floor_after_idle_us_median": fc as f64 / 1000.0,
        "floor_wake_penalty_us": (fc as f64 - fw as f64) / 1000.0,
    }))
}

/// The platform's own wake-up cost, without kiln: a bare thread pinned to `core`
/// answers pings, spinning (warm) or blocked in `epoll_wait` on an eventfd after the
/// same 20 ms of idleness as the reactor probe (cold). Returns (warm, cold) round
/// trips in ns. The reactor's penalty can only be compared with this floor.
fn wake_floor(core: usize, rounds: usize) -> Result<(Vec<u64>, Vec<u64>), String> {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    // SAFETY: plain syscall with constant flags; the result is checked.
    let efd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if efd < 0 {
        return Err(format!("eventfd: {}", std::io::Error::last_os_error()));
    }
    let pings = Arc::new(AtomicU64::new(0));
    let pongs = Arc::new(AtomicU64::new(0));
    let spin = Arc::new(AtomicBool::new(true));
    let stop = Arc::new(AtomicBool::new(false));
    let (pi, po, sp, st) = (pings.clone(), pongs.clone(), spin.clone(), stop.clone());
    let t = std::thread::spawn(move || {
        core_affinity::set_for_current(core_affinity::CoreId { id: core });
        // SAFETY: plain syscalls on our own fds; results are checked or harmless.
        let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: 0,
        };
        // SAFETY: `ev` is a valid event for the eventfd we own.
        unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, efd, &mut ev) };
        let mut seen = 0u64;
        while !st.load(Ordering::Relaxed) {
            let p = pi.load(Ordering::Acquire);
            if p != seen {
                seen = p;
                po.store(p, Ordering::Release);
                continue;
            }
            if sp.load(Ordering::Relaxed) {
                std::hint::spin_loop();
                continue;
            }
            let mut out = [libc::epoll_event { events: 0, u64: 0 }; 1];
            // SAFETY: `out` has room for the one event we ask for.
            let n = unsafe { libc::epoll_wait(ep, out.as_mut_ptr(), 1, 100) };
            if n > 0 {
                let mut b = 0u64;
                // SAFETY: reads 8 bytes into a valid u64 from our non-blocking eventfd.
                unsafe { libc::read(efd, &mut b as *mut u64 as *mut libc::c_void, 8) };
            }
        }
        // SAFETY: we own the epoll fd.
        unsafe { libc::close(ep) };
    });
    let ping = |n: u64, wake: bool| {
        let t0 = std::time::Instant::now();
        pings.store(n, Ordering::Release);
        if wake {
            let one = 1u64;
            // SAFETY: writes 8 bytes from a valid u64 to our eventfd.
            unsafe { libc::write(efd, &one as *const u64 as *const libc::c_void, 8) };
        }
        while pongs.load(Ordering::Acquire) != n {
            std::hint::spin_loop();
        }
        t0.elapsed().as_nanos() as u64
    };
    let (mut warm, mut cold) = (Vec::new(), Vec::new());
    let mut n = 0u64;
    for _ in 0..rounds {
        // Warm: the thread spins.
        spin.store(true, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(1));
        for _ in 0..5 {
            n += 1;
            warm.push(ping(n, false));
        }
        // Cold: the thread blocks, the core idles 20 ms, then one eventfd wake.
        spin.store(false, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(20));
        n += 1;
        cold.push(ping(n, true));
    }
    stop.store(true, Ordering::Relaxed);
    let _ = t.join();
    // SAFETY: the thread that used the eventfd has exited.
    unsafe { libc::close(efd) };
    Ok((warm, cold))
}
