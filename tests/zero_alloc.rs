//! The hot path allocates nothing: a counting global allocator watches 100 k
//! I/Os in steady state on every backend, through the bench job (device
//! channel, DMA buffers, histogram) and through the volume engine.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};

struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// Only the measuring thread counts: the test harness's own threads may allocate.
    static COUNTING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn counting() -> bool {
    COUNTING.try_with(|c| c.get()).unwrap_or(false)
}

// SAFETY: forwards to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if counting() {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if counting() {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

use kiln::bench::{BenchJob, Workload};
use kiln::dma::DmaPool;

/// Counts allocations in `f` (single-threaded use only).
fn count<R>(f: impl FnOnce() -> R) -> (R, u64) {
    ALLOCS.store(0, Ordering::SeqCst);
    COUNTING.with(|c| c.set(true));
    let r = f();
    COUNTING.with(|c| c.set(false));
    (r, ALLOCS.load(Ordering::SeqCst))
}

fn run_job(spec: &str, workload: Workload) {
    let dev = kiln::bdev::open(spec).unwrap();
    let mut pool = DmaPool::new(4096, 64).unwrap();
    let mut job = BenchJob::new(
        dev.as_ref(),
        &mut pool,
        workload,
        4096,
        32,
        u64::MAX / 4,
        70,
        9,
    )
    .unwrap();
    job.start().unwrap();
    // Warm up: histogram buckets, channel queues, lazily-sized structures.
    while job.ios_done < 10_000 {
        job.step();
    }
    let target = job.ios_done + 100_000;
    let (_, allocs) = count(|| {
        while job.ios_done < target {
            job.step();
        }
    });
    assert!(job.ios_done >= target);
    assert_eq!(job.mismatches, 0);
    assert_eq!(
        allocs, 0,
        "{spec} {workload:?}: {allocs} heap allocations in 100k steady-state I/Os"
    );
}

#[test]
fn bench_hot_path_allocates_nothing_on_every_backend() {
    let dir = std::env::temp_dir().join(format!("kiln-zero-alloc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("f.img");
    run_job("null:64MiB", Workload::Randread);
    run_job("malloc:64MiB", Workload::Randrw);
    run_job("malloc:64MiB", Workload::Verify);
    run_job(
        &format!("file:{}?size=64MiB", file.display()),
        Workload::Randrw,
    );
    run_job("delay:1,1,0:malloc:64MiB", Workload::Randread);
    run_job("error:0,1:malloc:64MiB", Workload::Randwrite);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn volume_engine_hot_path_allocates_nothing() {
    use kiln::bdev::IoKind;
    use kiln::volume::extent_map::Location;
    use kiln::volume::io::{VolumeIo, VolumeOp};
    use kiln::volume::Volume;
    use std::sync::Arc;

    let tiers: Vec<(String, Arc<dyn kiln::bdev::BlockDevice>)> = vec![
        ("fast".into(), kiln::bdev::open("malloc:64MiB").unwrap()),
        (
            "slow".into(),
            kiln::bdev::open("delay:5,5,0:malloc:64MiB").unwrap(),
        ),
    ];
    let vol = Arc::new(Volume::new(0, "v", 32 << 20, 1 << 20));
    // Half on each tier, so requests straddle tiers at the 16 MiB boundary.
    let g = vol.map.granule_bytes;
    vol.map.set_run(
        0,
        (16 << 20) / g,
        Some(Location {
            tier: 0,
            phys_granule: 0,
        }),
    );
    vol.map.set_run(
        (16 << 20) / g,
        (16 << 20) / g,
        Some(Location {
            tier: 1,
            phys_granule: 0,
        }),
    );
    let metrics = kiln::metrics::Metrics::new();
    let pool = DmaPool::new(64 << 10, 64).unwrap();
    let (meta_tx, _meta_rx) = crossbeam_channel::unbounded();
    let mut io = VolumeIo::new(
        Arc::new(vec![vol]),
        &tiers,
        &pool,
        &metrics,
        64,
        meta_tx,
        None,
    )
    .unwrap();
    let mut rng = 7u64;
    let mut issued = 0u64;
    let mut done = 0u64;
    let mut step = |io: &mut VolumeIo, target: u64| {
        while done < target {
            while io.inflight() < 32 && issued < target {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let slot = (issued % 32) as u16;
                let buf = pool.buf(slot);
                let offset = (rng % ((32 << 20) / 8192 - 1)) * 8192;
                let kind = if rng & 1 == 0 {
                    IoKind::Read
                } else {
                    IoKind::Write
                };
                let op = VolumeOp {
                    volume: 0,
                    kind,
                    offset_bytes: offset,
                    len_bytes: 16384,
                    buf: buf.ptr,
                    buf_index: buf.index,
                    fua: false,
                    token: issued,
                };
                // SAFETY: the pool outlives the engine's use of the buffer.
                assert!(unsafe { io.submit(op) });
                issued += 1;
            }
            io.poll();
            while let Some((_, rc)) = io.pop_completion() {
                assert_eq!(rc, 0);
                done += 1;
            }
        }
    };
    step(&mut io, 5_000);
    let (_, allocs) = count(|| step(&mut io, 105_000));
    assert_eq!(
        allocs, 0,
        "volume engine: {allocs} heap allocations in 100k steady-state I/Os"
    );
}
