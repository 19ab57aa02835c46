//! `s3://BUCKET/PREFIX?endpoint=URL&region=R`: a cold tier on S3-compatible
//! object storage, through the `object_store` crate.
//!
//! The tier's physical address space is cut into *generations*: physical
//! granule `p` belongs to generation `p / OBJECT_SPAN_GRANULES`, and each
//! generation is at most one immutable object, `PREFIX/kiln-obj-GEN` (16 hex
//! digits): an 8 KiB header (volume, first granule, generation, length, a
//! crc32c per 64 KiB block) followed by the data. Generations are never
//! reused (see `docs/FORMAT.md`), so an object, once written, never changes.
//!
//! - The crate is async: it runs on one small tokio runtime thread owned by
//!   the tier. Reactors send it requests by message (never blocking) and get
//!   completions back on a bounded queue, with an eventfd to wake a parked
//!   reactor.
//! - Reactor channels only read: a read is one ranged GET covering the 64 KiB
//!   blocks it touches, each checked against the header's crc32c table (the
//!   header is cached per object). Writes never reach this device: the volume
//!   layer promotes a partition before writing it, and the migration engine
//!   uploads whole objects through [`ObjectTier::put_blocking`].
//! - Requests are retried with backoff on 5xx and timeouts by `object_store`;
//!   after [`DEGRADE_AFTER_FAILURES`] failed requests in a row the tier is
//!   degraded: reads fail at once with EIO and a log line naming the tier, and
//!   a probe every 500 ms clears the state when the server answers again.
//! - Credentials come from the standard `AWS_*` environment variables, or
//!   from `access_key_id=`/`secret_access_key=` in the spec; they are never
//!   printed (`Display` and `Debug` redact them).

use std::collections::VecDeque;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender};

use super::{
    BlockDevice, ChannelOptions, Completion, DeviceError, DeviceInfo, IoChannel, IoKind, IoRequest,
    SubmitError,
};

#[cfg(feature = "s3")]
mod client;
#[cfg(feature = "s3")]
use client::JobSender;
/// Without the client no tier is ever opened; the type only keeps the channel code whole.
#[cfg(not(feature = "s3"))]
type JobSender = std::sync::mpsc::Sender<Job>;

/// Size of one crc32c block, and of the smallest ranged GET (the volume granule).
pub const CRC_BLOCK_BYTES: u64 = 64 << 10;
/// Physical granules per generation (the largest object: 64 MiB of data).
pub const OBJECT_SPAN_GRANULES: u64 = 1024;
pub const OBJECT_SPAN_BYTES: u64 = OBJECT_SPAN_GRANULES * CRC_BLOCK_BYTES;
/// The header before the data of every object.
pub const HEADER_BYTES: u64 = 8192;
pub const MAGIC_OBJECT: u32 = u32::from_le_bytes(*b"KLNO");
pub const OBJECT_VERSION: u32 = 1;
/// Objects larger than this are uploaded in parts of this size.
pub const MULTIPART_PART_BYTES: usize = 8 << 20;
/// Failed requests in a row (after retries) that mark the tier degraded.
pub const DEGRADE_AFTER_FAILURES: u64 = 3;
/// The address space the tier pretends to have (2^63 bytes: generations below 2^37,
/// i.e. superblock generations below 2^23 with 14 counter bits).
pub const DEVICE_BYTES: u64 = 1 << 63;
const VOLUME_NAME_BYTES_MAX: usize = 64;
const CRC_TABLE_OFFSET: usize = 112;
const HEADER_CRC_OFFSET: usize = HEADER_BYTES as usize - 4;

const _: () = assert!(CRC_TABLE_OFFSET + 4 * OBJECT_SPAN_GRANULES as usize <= HEADER_CRC_OFFSET);
const _: () = assert!(41 + VOLUME_NAME_BYTES_MAX <= CRC_TABLE_OFFSET);

/// The parsed `s3://` spec. `Display` and `Debug` never show secrets.
#[derive(Clone, PartialEq)]
pub struct ObjectSpec {
    pub bucket: String,
    pub prefix: String,
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    /// Per-request timeout and retries (after which a request has failed).
    pub timeout_ms: u64,
    pub retries: u64,
}

impl ObjectSpec {
    /// Parses the part after `s3:`: `//BUCKET[/PREFIX][?endpoint=..&region=..]`.
    pub fn parse(rest: &str) -> Result<ObjectSpec, String> {
        let body = rest
            .strip_prefix("//")
            .ok_or("s3 spec wants s3://BUCKET/PREFIX[?endpoint=URL&region=R]")?;
        let (path, query) = body.split_once('?').unwrap_or((body, ""));
        let (bucket, prefix) = path.split_once('/').unwrap_or((path, ""));
        if bucket.is_empty() {
            return Err("s3 spec needs a bucket name".into());
        }
        let mut spec = ObjectSpec {
            bucket: bucket.to_string(),
            prefix: prefix.trim_matches('/').to_string(),
            endpoint: None,
            region: None,
            access_key_id: None,
            secret_access_key: None,
            timeout_ms: 30_000,
            retries: 3,
        };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| format!("option '{pair}' is not KEY=VALUE"))?;
            let number = || {
                value
                    .parse::<u64>()
                    .map_err(|_| format!("option '{key}' wants a number, not '{value}'"))
            };
            match key {
                "timeout_ms" => {
                    spec.timeout_ms = number()?.max(1);
                    continue;
                }
                "retries" => {
                    spec.retries = number()?;
                    continue;
                }
                _ => {}
            }
            let slot = match key {
                "endpoint" => &mut spec.endpoint,
                "region" => &mut spec.region,
                "access_key_id" => &mut spec.access_key_id,
                "secret_access_key" => &mut spec.secret_access_key,
                _ => {
                    return Err(format!(
                        "unknown s3 option '{key}' (endpoint, region, timeout_ms, retries, access_key_id, secret_access_key)"
                    ))
                }
            };
            *slot = Some(value.to_string());
        }
        Ok(spec)
    }

    /// The key of generation `gen`.
    pub fn key(&self, gen: u64) -> String {
        if self.prefix.is_empty() {
            format!("kiln-obj-{gen:016x}")
        } else {
            format!("{}/kiln-obj-{gen:016x}", self.prefix)
        }
    }
}

impl std::fmt::Display for ObjectSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "s3://{}/{}", self.bucket, self.prefix)?;
        let mut sep = '?';
        let mut opt = |f: &mut std::fmt::Formatter<'_>, k: &str, v: &str| {
            let r = write!(f, "{sep}{k}={v}");
            sep = '&';
            r
        };
        if let Some(e) = &self.endpoint {
            opt(f, "endpoint", e)?;
        }
        if let Some(r) = &self.region {
            opt(f, "region", r)?;
        }
        if self.timeout_ms != 30_000 {
            opt(f, "timeout_ms", &self.timeout_ms.to_string())?;
        }
        if self.retries != 3 {
            opt(f, "retries", &self.retries.to_string())?;
        }
        if self.access_key_id.is_some() {
            opt(f, "access_key_id", "<redacted>")?;
        }
        if self.secret_access_key.is_some() {
            opt(f, "secret_access_key", "<redacted>")?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for ObjectSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ObjectSpec({self})")
    }
}

/// The generation holding physical byte `phys` of the tier, and the offset in its data.
#[inline]
pub fn locate(phys_bytes: u64) -> (u64, u64) {
    (
        phys_bytes / OBJECT_SPAN_BYTES,
        phys_bytes % OBJECT_SPAN_BYTES,
    )
}

/// The object header, as written before the data.
#[derive(Clone, Debug, PartialEq)]
pub struct ObjectHeader {
    pub volume: String,
    pub first_granule: u64,
    pub generation: u64,
    pub data_bytes: u64,
    /// crc32c of each 64 KiB block of the data.
    pub crcs: Vec<u32>,
}

impl ObjectHeader {
    /// Builds the header of `data` (a whole number of crc blocks).
    pub fn for_data(volume: &str, first_granule: u64, generation: u64, data: &[u8]) -> Self {
        assert!(data.len() as u64 % CRC_BLOCK_BYTES == 0 && data.len() as u64 <= OBJECT_SPAN_BYTES);
        ObjectHeader {
            volume: volume.to_string(),
            first_granule,
            generation,
            data_bytes: data.len() as u64,
            crcs: data
                .chunks(CRC_BLOCK_BYTES as usize)
                .map(crc32c::crc32c)
                .collect(),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_BYTES as usize];
        let name = self.volume.as_bytes();
        assert!(
            name.len() <= VOLUME_NAME_BYTES_MAX && self.crcs.len() as u64 <= OBJECT_SPAN_GRANULES
        );
        b[0..4].copy_from_slice(&MAGIC_OBJECT.to_le_bytes());
        b[4..8].copy_from_slice(&OBJECT_VERSION.to_le_bytes());
        b[8..16].copy_from_slice(&self.generation.to_le_bytes());
        b[16..24].copy_from_slice(&self.first_granule.to_le_bytes());
        b[24..32].copy_from_slice(&self.data_bytes.to_le_bytes());
        b[32..36].copy_from_slice(&(CRC_BLOCK_BYTES as u32).to_le_bytes());
        b[36..40].copy_from_slice(&(self.crcs.len() as u32).to_le_bytes());
        b[40] = name.len() as u8;
        b[41..41 + name.len()].copy_from_slice(name);
        for (i, c) in self.crcs.iter().enumerate() {
            let at = CRC_TABLE_OFFSET + 4 * i;
            b[at..at + 4].copy_from_slice(&c.to_le_bytes());
        }
        let crc = crc32c::crc32c(&b[..HEADER_CRC_OFFSET]);
        b[HEADER_CRC_OFFSET..].copy_from_slice(&crc.to_le_bytes());
        // Assert metadata before it is written.
        assert_eq!(ObjectHeader::decode(&b).as_ref(), Ok(self));
        b
    }

    pub fn decode(b: &[u8]) -> Result<ObjectHeader, String> {
        if b.len() < HEADER_BYTES as usize {
            return Err(format!("object header truncated at {} bytes", b.len()));
        }
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        if u32_at(0) != MAGIC_OBJECT {
            return Err(format!("bad object magic {:#010x}", u32_at(0)));
        }
        let stored = u32_at(HEADER_CRC_OFFSET);
        let computed = crc32c::crc32c(&b[..HEADER_CRC_OFFSET]);
        if stored != computed {
            return Err(format!(
                "object header crc32c mismatch: stored {stored:#010x}, computed {computed:#010x}"
            ));
        }
        if u32_at(4) != OBJECT_VERSION || u32_at(32) as u64 != CRC_BLOCK_BYTES {
            return Err(format!(
                "object header version {} / block {} not supported",
                u32_at(4),
                u32_at(32)
            ));
        }
        let n = u32_at(36) as usize;
        let name_len = b[40] as usize;
        if n as u64 > OBJECT_SPAN_GRANULES || name_len > VOLUME_NAME_BYTES_MAX {
            return Err("object header fields out of range".into());
        }
        Ok(ObjectHeader {
            volume: String::from_utf8_lossy(&b[41..41 + name_len]).into_owned(),
            generation: u64_at(8),
            first_granule: u64_at(16),
            data_bytes: u64_at(24),
            crcs: (0..n).map(|i| u32_at(CRC_TABLE_OFFSET + 4 * i)).collect(),
        })
    }
}

/// Counters of one object tier, for RPC and metrics.
#[derive(Default, Debug)]
pub struct ObjectStats {
    pub gets: AtomicU64,
    pub get_bytes: AtomicU64,
    pub puts: AtomicU64,
    pub put_bytes: AtomicU64,
    pub multipart_puts: AtomicU64,
    pub deletes: AtomicU64,
    pub errors: AtomicU64,
    pub crc_errors: AtomicU64,
}

/// Where a reactor channel's completions go.
struct ChanDone {
    tx: Sender<Completion>,
    eventfd: RawFd,
    signaled: AtomicBool,
}

impl ChanDone {
    #[cfg_attr(not(feature = "s3"), allow(dead_code))]
    fn complete(&self, c: Completion) {
        // The queue holds the channel's whole depth: it cannot be full.
        let _ = self.tx.try_send(c);
        self.signaled.store(true, Ordering::Release);
        let one = 1u64;
        // SAFETY: writes 8 bytes from a valid u64 to the eventfd we own until drop.
        unsafe { libc::write(self.eventfd, &one as *const u64 as *const libc::c_void, 8) };
    }
}

impl Drop for ChanDone {
    fn drop(&mut self) {
        // SAFETY: the eventfd is ours; nothing uses it after the last reference.
        unsafe { libc::close(self.eventfd) };
    }
}

type Reply<T> = Sender<Result<T, String>>;

/// A request to the runtime thread (only the `s3` client reads them).
#[cfg_attr(not(feature = "s3"), allow(dead_code))]
enum Job {
    Read {
        gen: u64,
        offset: u64,
        len: u32,
        buf: usize,
        tag: u64,
        done: Arc<ChanDone>,
    },
    Put {
        gen: u64,
        body: Vec<u8>,
        reply: Reply<()>,
    },
    Get {
        gen: u64,
        reply: Reply<Bytes>,
    },
    List {
        reply: Reply<Vec<u64>>,
    },
    Delete {
        gens: Vec<u64>,
        reply: Option<Reply<u64>>,
    },
}

/// The shared state of one object tier: its runtime thread and health.
pub struct ObjectTier {
    pub spec: ObjectSpec,
    tier_name: OnceLock<String>,
    jobs: JobSender,
    degraded: AtomicBool,
    /// Failed requests in a row (only the `s3` client counts them).
    #[cfg_attr(not(feature = "s3"), allow(dead_code))]
    failures: AtomicU64,
    pub stats: ObjectStats,
    last_log_ns: AtomicU64,
}

impl std::fmt::Debug for ObjectTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ObjectTier({})", self.spec)
    }
}

impl ObjectTier {
    /// Names the tier in log lines (the device only knows its spec).
    pub fn set_tier_name(&self, name: &str) {
        let _ = self.tier_name.set(name.to_string());
    }

    pub fn tier_name(&self) -> &str {
        self.tier_name.get().map(|s| s.as_str()).unwrap_or("?")
    }

    pub fn is_degraded(&self) -> bool {
        self.degraded.load(Ordering::Acquire)
    }

    /// Logs a refused read at most once a second.
    fn log_refused(&self, gen: u64) {
        let now = crate::clock::now_ns();
        let last = self.last_log_ns.load(Ordering::Relaxed);
        if now.saturating_sub(last) > 1_000_000_000
            && self
                .last_log_ns
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::error!(
                tier = %self.tier_name(),
                "object tier '{}' ({}) is degraded: read of {} failed with EIO",
                self.tier_name(),
                self.spec,
                self.spec.key(gen)
            );
        }
    }

    fn call<T>(&self, build: impl FnOnce(Reply<T>) -> Job) -> Result<T, String> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.jobs
            .send(build(tx))
            .map_err(|_| format!("object tier '{}': runtime thread stopped", self.tier_name()))?;
        rx.recv_timeout(Duration::from_secs(300))
            .map_err(|_| format!("object tier '{}': request timed out", self.tier_name()))?
    }

    /// Uploads one object (multipart above [`MULTIPART_PART_BYTES`]); blocks the caller.
    pub fn put_blocking(&self, gen: u64, body: Vec<u8>) -> Result<(), String> {
        if self.is_degraded() {
            return Err(format!("object tier '{}' is degraded", self.tier_name()));
        }
        self.call(|reply| Job::Put { gen, body, reply })
    }

    /// Downloads one whole object; blocks the caller.
    pub fn get_blocking(&self, gen: u64) -> Result<Bytes, String> {
        self.call(|reply| Job::Get { gen, reply })
    }

    /// The generations present under the prefix; blocks the caller.
    pub fn list_blocking(&self) -> Result<Vec<u64>, String> {
        self.call(|reply| Job::List { reply })
    }

    /// Deletes objects and waits; returns how many were deleted.
    pub fn delete_blocking(&self, gens: Vec<u64>) -> Result<u64, String> {
        self.call(|reply| Job::Delete {
            gens,
            reply: Some(reply),
        })
    }

    /// Deletes objects in the background (failures leave garbage for `tier_gc`).
    pub fn delete_later(&self, gens: Vec<u64>) {
        let _ = self.jobs.send(Job::Delete { gens, reply: None });
    }
}

pub struct ObjectDevice {
    info: DeviceInfo,
    tier: Arc<ObjectTier>,
}

impl ObjectDevice {
    /// Builds the client and starts the tier's runtime thread. No request is
    /// sent: a server that is down makes the tier degraded, not the start fail.
    pub fn open(spec: &ObjectSpec) -> Result<ObjectDevice, DeviceError> {
        #[cfg(not(feature = "s3"))]
        return Err(DeviceError::BadSpec(format!(
            "{spec}: this kiln was built without the s3 feature"
        )));
        #[cfg(feature = "s3")]
        Ok(ObjectDevice {
            info: DeviceInfo {
                name: spec.to_string(),
                product: "s3",
                block_size: 4096,
                num_blocks: DEVICE_BYTES / 4096,
                buf_align: 1,
                persistent: true,
                volatile_write_cache: false,
            },
            tier: client::start(spec)?,
        })
    }
}

impl BlockDevice for ObjectDevice {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn open_channel(&self, opts: &ChannelOptions<'_>) -> Result<Box<dyn IoChannel>, DeviceError> {
        let depth = opts.queue_depth.max(1) as usize;
        // SAFETY: plain syscall; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(DeviceError::Io(format!(
                "{}: eventfd: {}",
                self.info.name,
                std::io::Error::last_os_error()
            )));
        }
        let (tx, rx) = crossbeam_channel::bounded(depth);
        Ok(Box::new(ObjectChannel {
            tier: self.tier.clone(),
            done: Arc::new(ChanDone {
                tx,
                eventfd: fd,
                signaled: AtomicBool::new(false),
            }),
            rx,
            ready: VecDeque::with_capacity(depth),
            depth,
            inflight: 0,
        }))
    }

    fn object_tier(&self) -> Option<Arc<ObjectTier>> {
        Some(self.tier.clone())
    }
}

/// One reactor's queue on the object tier: reads only.
struct ObjectChannel {
    tier: Arc<ObjectTier>,
    done: Arc<ChanDone>,
    rx: Receiver<Completion>,
    /// Completions decided at submit (flush, refused reads).
    ready: VecDeque<Completion>,
    depth: usize,
    inflight: usize,
}

impl IoChannel for ObjectChannel {
    unsafe fn submit(&mut self, req: &IoRequest) -> Result<(), SubmitError> {
        if self.inflight >= self.depth {
            return Err(SubmitError::QueueFull);
        }
        match req.kind {
            IoKind::Flush => {
                self.ready.push_back(Completion {
                    tag: req.tag,
                    result: 0,
                });
            }
            IoKind::Read => {
                let (gen, offset) = locate(req.offset_bytes);
                if offset + req.len_bytes as u64 > OBJECT_SPAN_BYTES {
                    return Err(SubmitError::OutOfRange);
                }
                if self.tier.is_degraded() {
                    self.tier.log_refused(gen);
                    self.ready.push_back(Completion {
                        tag: req.tag,
                        result: -libc::EIO,
                    });
                } else {
                    let job = Job::Read {
                        gen,
                        offset,
                        len: req.len_bytes,
                        buf: req.buf as usize,
                        tag: req.tag,
                        done: self.done.clone(),
                    };
                    if self.tier.jobs.send(job).is_err() {
                        self.ready.push_back(Completion {
                            tag: req.tag,
                            result: -libc::EIO,
                        });
                    }
                }
            }
            // Object data is immutable: the volume layer promotes before writing.
            _ => return Err(SubmitError::Unsupported),
        }
        self.inflight += 1;
        Ok(())
    }

    fn poll_completions(&mut self, out: &mut [Completion]) -> usize {
        let mut n = 0;
        while n < out.len() {
            let Some(c) = self.ready.pop_front() else {
                break;
            };
            out[n] = c;
            n += 1;
        }
        if self.done.signaled.swap(false, Ordering::Acquire) {
            let mut v = 0u64;
            // SAFETY: reads 8 bytes into a valid u64 from our non-blocking eventfd.
            unsafe {
                libc::read(
                    self.done.eventfd,
                    &mut v as *mut u64 as *mut libc::c_void,
                    8,
                )
            };
        }
        while n < out.len() {
            match self.rx.try_recv() {
                Ok(c) => {
                    out[n] = c;
                    n += 1;
                }
                Err(_) => break,
            }
        }
        self.inflight -= n;
        n
    }

    fn inflight(&self) -> usize {
        self.inflight
    }

    fn notifier_fd(&self) -> Option<RawFd> {
        Some(self.done.eventfd)
    }

    fn next_deadline_ns(&self) -> Option<u64> {
        // Completions decided at submit are due now.
        (!self.ready.is_empty()).then(crate::clock::now_ns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_parses_and_redacts() {
        let s = ObjectSpec::parse(
            "//bkt/a/b?endpoint=http://127.0.0.1:9000&region=eu-west-1&secret_access_key=hunter2",
        )
        .unwrap();
        assert_eq!(s.bucket, "bkt");
        assert_eq!(s.prefix, "a/b");
        assert_eq!(s.key(0x2a), "a/b/kiln-obj-000000000000002a");
        let shown = format!("{s} {s:?}");
        assert!(
            !shown.contains("hunter2") && shown.contains("<redacted>"),
            "{shown}"
        );
        assert!(ObjectSpec::parse("//").is_err());
        assert!(ObjectSpec::parse("//b?colour=red")
            .unwrap_err()
            .contains("colour"));
    }

    #[test]
    fn header_round_trip_and_corruption() {
        let data = vec![7u8; 3 * CRC_BLOCK_BYTES as usize];
        let h = ObjectHeader::for_data("vol0", 48, 9, &data);
        let mut b = h.encode();
        assert_eq!(ObjectHeader::decode(&b).unwrap(), h);
        b[200] ^= 1;
        assert!(ObjectHeader::decode(&b).unwrap_err().contains("crc32c"));
        assert_eq!(locate(OBJECT_SPAN_BYTES * 3 + 4096), (3, 4096));
    }
}
