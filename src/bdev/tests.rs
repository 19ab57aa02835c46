//! Shared block-device test bodies, written once and run on every backend
//! (the cloud-hypervisor pattern). `cargo test` runs them on the host's
//! backends; `kiln device-test --device SPEC` runs the same bodies on real
//! devices, which is how the guest lab tests `nvme:BDF` and `ng:/dev/ngXnY`.

use super::*;
use crate::dma::DmaPool;

/// Drives `chan` until `tag` completes; returns its result.
pub fn wait_for(chan: &mut dyn IoChannel, tag: u64) -> i32 {
    let mut out = [Completion::default(); 16];
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut stash: Vec<Completion> = Vec::new();
    loop {
        chan.submit_pending();
        let n = chan.poll_completions(&mut out);
        stash.extend_from_slice(&out[..n]);
        if let Some(i) = stash.iter().position(|c| c.tag == tag) {
            return stash.swap_remove(i).result;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "tag {tag} never completed"
        );
        std::thread::yield_now();
    }
}

fn sync_io(chan: &mut dyn IoChannel, req: IoRequest) -> i32 {
    // SAFETY: the buffers the tests pass live on the test's stack or pool until wait_for returns.
    unsafe { chan.submit(&req) }.expect("submit");
    wait_for(chan, req.tag)
}

/// Write, read back, overwrite part, write-zeroes, trim, flush, bounds.
pub fn body_read_write_zero_trim(dev: &dyn BlockDevice) {
    let info = dev.info().clone();
    let bs = info.block_size as u64;
    let pool = DmaPool::new(64 << 10, 8).unwrap();
    let mut chan = dev
        .open_channel(&ChannelOptions {
            queue_depth: 32,
            pool: Some(&pool),
        })
        .unwrap();
    let chan = chan.as_mut();
    let a = pool.buf(0);
    let b = pool.buf(1);
    // SAFETY: buffers are not in flight between synchronous requests.
    let (wa, rb) = unsafe { (a.as_mut_slice(), b.as_mut_slice()) };
    let len = 16 * bs as usize;
    for (i, x) in wa[..len].iter_mut().enumerate() {
        *x = (i * 7 + 3) as u8;
    }
    let off = 8 * bs;
    assert_eq!(
        sync_io(chan, IoRequest::write(1, off, a.ptr, len as u32, a.index)),
        0
    );
    rb[..len].fill(0);
    assert_eq!(
        sync_io(chan, IoRequest::read(2, off, b.ptr, len as u32, b.index)),
        0
    );
    assert_eq!(&rb[..len], &wa[..len], "{}: read-back differs", info.name);
    // Unregistered buffer path too.
    let mut plain = vec![0u8; len + 4096];
    let p = plain
        .as_mut_ptr()
        .wrapping_add(plain.as_ptr().align_offset(4096));
    assert_eq!(
        sync_io(chan, IoRequest::read(3, off, p, len as u32, BUF_INDEX_NONE)),
        0
    );
    // SAFETY: `p` points at len bytes inside `plain`.
    assert_eq!(unsafe { std::slice::from_raw_parts(p, len) }, &wa[..len]);
    // Write-zeroes the middle, then check zeros and the untouched edges.
    assert_eq!(
        sync_io(
            chan,
            IoRequest::range(4, IoKind::WriteZeroes, off + 4 * bs, 4 * bs as u32)
        ),
        0
    );
    assert_eq!(
        sync_io(chan, IoRequest::read(5, off, b.ptr, len as u32, b.index)),
        0
    );
    assert_eq!(&rb[..4 * bs as usize], &wa[..4 * bs as usize]);
    assert!(
        rb[4 * bs as usize..8 * bs as usize].iter().all(|&x| x == 0),
        "{}: write-zeroes left data",
        info.name
    );
    assert_eq!(&rb[8 * bs as usize..len], &wa[8 * bs as usize..len]);
    // Trim leaves zeros on every kiln backend (the volume layer relies on it).
    assert_eq!(
        sync_io(chan, IoRequest::range(6, IoKind::Trim, off, len as u32)),
        0
    );
    assert_eq!(
        sync_io(chan, IoRequest::read(7, off, b.ptr, len as u32, b.index)),
        0
    );
    assert!(
        rb[..len].iter().all(|&x| x == 0),
        "{}: trim left data",
        info.name
    );
    assert_eq!(sync_io(chan, IoRequest::flush(8)), 0);
    // Bounds and alignment are refused at submission.
    let end = info.size_bytes();
    // SAFETY: refused before any buffer access.
    let past = unsafe { chan.submit(&IoRequest::read(9, end, b.ptr, bs as u32, b.index)) };
    assert_eq!(past, Err(SubmitError::OutOfRange));
    // SAFETY: refused before any buffer access.
    let odd = unsafe { chan.submit(&IoRequest::read(10, 1, b.ptr, bs as u32, b.index)) };
    assert_eq!(odd, Err(SubmitError::Misaligned));
    assert_eq!(chan.inflight(), 0);
}

/// Many requests in flight at once, reaped in batches; queue-full is a normal answer.
pub fn body_queue_depth(dev: &dyn BlockDevice) {
    let info = dev.info().clone();
    let bs = info.block_size as usize;
    let pool = DmaPool::new(4096, 40).unwrap();
    let mut chan = dev
        .open_channel(&ChannelOptions {
            queue_depth: 32,
            pool: Some(&pool),
        })
        .unwrap();
    for i in 0..32u16 {
        let buf = pool.buf(i);
        // SAFETY: not yet submitted.
        (unsafe { buf.as_mut_slice() })[..bs].fill(i as u8 + 1);
        // SAFETY: pool outlives the requests; each tag has its own buffer.
        unsafe {
            chan.submit(&IoRequest::write(
                i as u64,
                i as u64 * 4096,
                buf.ptr,
                bs as u32,
                buf.index,
            ))
        }
        .unwrap();
    }
    let extra = pool.buf(33);
    // SAFETY: refused before any buffer access.
    let full = unsafe { chan.submit(&IoRequest::write(99, 0, extra.ptr, bs as u32, extra.index)) };
    assert_eq!(
        full,
        Err(SubmitError::QueueFull),
        "{}: a full queue must say so",
        info.name
    );
    let mut seen = [false; 32];
    let mut out = [Completion::default(); 8];
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while seen.iter().any(|s| !s) {
        chan.submit_pending();
        let n = chan.poll_completions(&mut out);
        for c in &out[..n] {
            assert_eq!(c.result, 0);
            assert!(!seen[c.tag as usize], "duplicate completion");
            seen[c.tag as usize] = true;
        }
        assert!(std::time::Instant::now() < deadline);
    }
    assert_eq!(chan.inflight(), 0);
    if info.persistent {
        for i in 0..32u16 {
            let buf = pool.buf(i);
            assert_eq!(
                sync_io(
                    chan.as_mut(),
                    IoRequest::read(
                        100 + i as u64,
                        i as u64 * 4096,
                        buf.ptr,
                        bs as u32,
                        buf.index
                    )
                ),
                0
            );
            // SAFETY: the read completed.
            assert!(unsafe { buf.as_slice() }[..bs]
                .iter()
                .all(|&x| x == i as u8 + 1));
        }
    }
}

/// One 1 MiB write and read-back, through a pool buffer and through a plain
/// heap buffer: a multi-page transfer (NVMe: PRP lists, split at MDTS).
pub fn body_large_io(dev: &dyn BlockDevice) {
    const LEN: usize = 1 << 20;
    let info = dev.info().clone();
    assert!(
        info.size_bytes() >= 2 * LEN as u64,
        "{}: too small",
        info.name
    );
    let pool = DmaPool::new(LEN, 2).unwrap();
    let mut chan = dev
        .open_channel(&ChannelOptions {
            queue_depth: 4,
            pool: Some(&pool),
        })
        .unwrap();
    let chan = chan.as_mut();
    let (a, b) = (pool.buf(0), pool.buf(1));
    // SAFETY: buffers are not in flight between synchronous requests.
    let (wa, rb) = unsafe { (a.as_mut_slice(), b.as_mut_slice()) };
    let off = LEN as u64;
    crate::bench::fill_pattern(&mut wa[..LEN], off, 0x1a29e);
    assert_eq!(
        sync_io(chan, IoRequest::write(1, off, a.ptr, LEN as u32, a.index)),
        0
    );
    rb.fill(0xee);
    assert_eq!(
        sync_io(chan, IoRequest::read(2, off, b.ptr, LEN as u32, b.index)),
        0
    );
    assert!(
        rb[..LEN] == wa[..LEN],
        "{}: 1 MiB read-back differs",
        info.name
    );
    // A buffer outside the pool, 4 KiB aligned.
    let mut plain = vec![0u8; LEN + 4096];
    let p = plain
        .as_mut_ptr()
        .wrapping_add(plain.as_ptr().align_offset(4096));
    assert_eq!(
        sync_io(chan, IoRequest::read(3, off, p, LEN as u32, BUF_INDEX_NONE)),
        0
    );
    // SAFETY: `p` points at LEN bytes inside `plain`.
    let got = unsafe { std::slice::from_raw_parts(p, LEN) };
    assert!(
        got == &wa[..LEN],
        "{}: 1 MiB read into a heap buffer differs",
        info.name
    );
    assert_eq!(chan.inflight(), 0);
}

/// A shared test body: panics (assert) on failure.
pub type TestBody = fn(&dyn BlockDevice);

/// The bodies `kiln device-test` runs, by name.
pub const BODIES: [(&str, TestBody); 3] = [
    ("read_write_zero_trim", body_read_write_zero_trim),
    ("queue_depth", body_queue_depth),
    ("large_io", body_large_io),
];

/// Writes `data` (padded with zeros to whole blocks) at `offset_bytes` and reads it back.
pub fn write_and_check(
    dev: &dyn BlockDevice,
    offset_bytes: u64,
    data: &[u8],
) -> Result<(), String> {
    let bs = dev.info().block_size as usize;
    let len = data.len().div_ceil(bs) * bs;
    let pool = DmaPool::new(len, 2).map_err(|e| format!("DMA pool: {e}"))?;
    let mut chan = dev
        .open_channel(&ChannelOptions {
            queue_depth: 2,
            pool: Some(&pool),
        })
        .map_err(|e| e.to_string())?;
    let (a, b) = (pool.buf(0), pool.buf(1));
    // SAFETY: not in flight.
    let (wa, rb) = unsafe { (a.as_mut_slice(), b.as_mut_slice()) };
    wa[..data.len()].copy_from_slice(data);
    wa[data.len()..len].fill(0);
    let w = sync_io(
        chan.as_mut(),
        IoRequest::write(1, offset_bytes, a.ptr, len as u32, a.index),
    );
    if w != 0 {
        return Err(format!("write: {}", std::io::Error::from_raw_os_error(-w)));
    }
    let f = sync_io(chan.as_mut(), IoRequest::flush(2));
    if f != 0 {
        return Err(format!("flush: {}", std::io::Error::from_raw_os_error(-f)));
    }
    let r = sync_io(
        chan.as_mut(),
        IoRequest::read(3, offset_bytes, b.ptr, len as u32, b.index),
    );
    if r != 0 {
        return Err(format!("read: {}", std::io::Error::from_raw_os_error(-r)));
    }
    if rb[..len] != wa[..len] {
        return Err("read-back differs".into());
    }
    Ok(())
}

/// `kiln device-test`: the shared block-device test bodies on a real device.
#[derive(clap::Args, Debug, Clone)]
pub struct DeviceTestArgs {
    /// Device spec, e.g. nvme:0000:00:04.0 or ng:/dev/ng0n1 (its data is overwritten).
    #[arg(long)]
    pub device: String,
    /// Instead of the bodies: write this file at --offset, flush and read it back.
    #[arg(long)]
    pub write_file: Option<std::path::PathBuf>,
    /// Byte offset for --write-file.
    #[arg(long, default_value = "0", value_parser = crate::bench::parse_size_arg)]
    pub offset: u64,
}

/// Runs `kiln device-test`; returns the exit code (0 only if every body passed).
pub fn run_device_test(args: &DeviceTestArgs) -> i32 {
    let spec = match spec::DeviceSpec::parse(&args.device) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("kiln device-test: {e}");
            return 2;
        }
    };
    // The VFIO driver is opened by type to read its PRP-list counter afterwards.
    let (dev, vfio): (Arc<dyn BlockDevice>, Option<Arc<vfio_nvme::VfioNvmeDevice>>) = match &spec {
        spec::DeviceSpec::Nvme {
            bdf,
            nsid,
            timeout_ms,
        } => match vfio_nvme::VfioNvmeDevice::open(spec.to_string(), bdf, *nsid, *timeout_ms) {
            Ok(d) => {
                let d = Arc::new(d);
                (d.clone(), Some(d))
            }
            Err(e) => {
                eprintln!("kiln device-test: {e}");
                return 2;
            }
        },
        _ => match spec.open() {
            Ok(d) => (d, None),
            Err(e) => {
                eprintln!("kiln device-test: {e}");
                return 2;
            }
        },
    };
    let info = dev.info().clone();
    println!(
        "device {} ({}): {} blocks of {} bytes",
        info.name, info.product, info.num_blocks, info.block_size
    );
    if let Some(path) = &args.write_file {
        let data = match std::fs::read(path) {
            Ok(d) => d,
            Err(e) => {
                eprintln!("kiln device-test: {}: {e}", path.display());
                return 2;
            }
        };
        return match write_and_check(dev.as_ref(), args.offset, &data) {
            Ok(()) => {
                println!(
                    "PASS write_file {} ({} bytes at offset {})",
                    path.display(),
                    data.len(),
                    args.offset
                );
                0
            }
            Err(e) => {
                println!("FAIL write_file: {e}");
                1
            }
        };
    }
    let mut failed = 0;
    for (name, body) in BODIES {
        let t0 = std::time::Instant::now();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body(dev.as_ref())));
        match outcome {
            Ok(()) => println!("PASS {name} ({:.2} s)", t0.elapsed().as_secs_f64()),
            Err(p) => {
                failed += 1;
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                println!("FAIL {name}: {msg}");
            }
        }
    }
    if let Some(v) = vfio {
        let lists = v.prp_list_commands();
        if lists == 0 {
            failed += 1;
            println!("FAIL prp_lists: no command used a PRP list");
        } else {
            println!("PASS prp_lists ({lists} commands used a PRP list)");
        }
    }
    if failed == 0 {
        println!("device-test: all passed");
        0
    } else {
        println!("device-test: {failed} failed");
        1
    }
}

#[cfg(test)]
fn backends(test: &str) -> Vec<(String, Arc<dyn BlockDevice>)> {
    let dir = std::env::temp_dir().join(format!("kiln-bdev-{test}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("dev.img");
    let specs = [
        "malloc:16MiB".to_string(),
        format!("file:{}?size=16MiB", file.display()),
        format!("file:{}?direct=0", file.display()),
        "delay:200,300,500:malloc:16MiB".to_string(),
        format!("delay:100,100,0:file:{}", file.display()),
        "error:0,1:malloc:16MiB".to_string(),
    ];
    specs
        .iter()
        .map(|s| (s.clone(), open(s).unwrap_or_else(|e| panic!("{s}: {e}"))))
        .collect()
}

#[cfg(test)]
#[test]
fn read_write_zero_trim_on_every_backend() {
    for (spec, dev) in backends("rw") {
        eprintln!("backend {spec}");
        body_read_write_zero_trim(dev.as_ref());
    }
}

#[cfg(test)]
#[test]
fn queue_depth_on_every_backend() {
    let mut all = backends("qd");
    all.push(("null:16MiB".into(), open("null:16MiB").unwrap()));
    for (spec, dev) in all {
        eprintln!("backend {spec}");
        body_queue_depth(dev.as_ref());
    }
}

#[cfg(test)]
#[test]
fn large_io_on_every_backend() {
    let dir = std::env::temp_dir().join(format!("kiln-bdev-large-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("dev.img");
    for spec in [
        "malloc:4MiB".to_string(),
        format!("file:{}?size=4MiB", file.display()),
        "delay:10,10,0:malloc:4MiB".to_string(),
    ] {
        eprintln!("backend {spec}");
        body_large_io(open(&spec).unwrap().as_ref());
        assert!(write_and_check(open(&spec).unwrap().as_ref(), 4096, b"kiln").is_ok());
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[cfg(test)]
#[test]
fn delay_device_adds_latency() {
    let dev = open("delay:2000,0,0:malloc:1MiB").unwrap();
    let pool = DmaPool::new(4096, 1).unwrap();
    let mut chan = dev
        .open_channel(&ChannelOptions {
            queue_depth: 4,
            pool: Some(&pool),
        })
        .unwrap();
    let b = pool.buf(0);
    let t0 = std::time::Instant::now();
    assert_eq!(
        sync_io(chan.as_mut(), IoRequest::read(1, 0, b.ptr, 4096, b.index)),
        0
    );
    assert!(
        t0.elapsed() >= std::time::Duration::from_micros(2000),
        "read took {:?}",
        t0.elapsed()
    );
    assert!(chan.next_deadline_ns().is_none());
}

#[cfg(test)]
#[test]
fn error_device_injects_eio_torn_and_corrupt() {
    let pool = DmaPool::new(8192, 2).unwrap();
    let b = pool.buf(0);
    let dev = open("error:1,3:malloc:1MiB").unwrap();
    let mut chan = dev
        .open_channel(&ChannelOptions {
            queue_depth: 4,
            pool: Some(&pool),
        })
        .unwrap();
    assert_eq!(
        sync_io(chan.as_mut(), IoRequest::read(1, 0, b.ptr, 4096, b.index)),
        -libc::EIO
    );
    // Only the given LBA range faults.
    let dev = open("error:1,3,lba=100-200:malloc:1MiB").unwrap();
    let mut chan = dev
        .open_channel(&ChannelOptions {
            queue_depth: 4,
            pool: Some(&pool),
        })
        .unwrap();
    assert_eq!(
        sync_io(chan.as_mut(), IoRequest::read(1, 0, b.ptr, 4096, b.index)),
        0
    );
    assert_eq!(
        sync_io(
            chan.as_mut(),
            IoRequest::read(2, 100 * 512, b.ptr, 512, b.index)
        ),
        -libc::EIO
    );
    // Corrupt: success, but the data differs.
    let dev = open("error:1,3,mode=corrupt:malloc:1MiB").unwrap();
    let mut chan = dev
        .open_channel(&ChannelOptions {
            queue_depth: 4,
            pool: Some(&pool),
        })
        .unwrap();
    // SAFETY: not in flight.
    unsafe { b.as_mut_slice() }.fill(0x11);
    assert_eq!(
        sync_io(chan.as_mut(), IoRequest::write(1, 0, b.ptr, 4096, b.index)),
        0
    );
    assert_eq!(
        sync_io(chan.as_mut(), IoRequest::read(2, 0, b.ptr, 4096, b.index)),
        0
    );
    // SAFETY: completed.
    assert_ne!(unsafe { b.as_slice() }[0], 0x11);
    // Torn: the second half of the write never lands.
    let dev = open("error:1,3,mode=torn:malloc:1MiB").unwrap();
    let mut chan = dev
        .open_channel(&ChannelOptions {
            queue_depth: 4,
            pool: Some(&pool),
        })
        .unwrap();
    // SAFETY: not in flight.
    unsafe { b.as_mut_slice() }.fill(0x22);
    assert_eq!(
        sync_io(chan.as_mut(), IoRequest::write(1, 0, b.ptr, 8192, b.index)),
        0
    );
    let c = pool.buf(1);
    // Torn mode only affects writes, so this read shows what reached the media.
    assert_eq!(
        sync_io(chan.as_mut(), IoRequest::read(2, 0, c.ptr, 8192, c.index)),
        0
    );
    // SAFETY: completed.
    let data = unsafe { c.as_slice() };
    assert!(data[..4096].iter().all(|&x| x == 0x22));
    assert!(
        data[4096..8192].iter().all(|&x| x == 0),
        "torn write reached the media whole"
    );
}
