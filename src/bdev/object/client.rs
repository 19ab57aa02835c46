//! The S3 client of an object tier (feature `s3`): the `object_store` store, its tokio
//! runtime thread and the async requests it runs. Everything else about the tier (the spec,
//! the object header, the reactor channel) is in the parent module and builds without it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, PutPayload};

use super::{
    DeviceError, Job, ObjectHeader, ObjectSpec, ObjectStats, ObjectTier, CRC_BLOCK_BYTES,
    DEGRADE_AFTER_FAILURES, HEADER_BYTES, MULTIPART_PART_BYTES,
};
use crate::bdev::Completion;

/// How reactors and the migration engine hand requests to the runtime thread.
pub(super) type JobSender = tokio::sync::mpsc::UnboundedSender<Job>;

impl ObjectTier {
    fn succeeded(&self) {
        self.failures.store(0, Ordering::Relaxed);
    }

    fn failed(&self, what: &str, e: &object_store::Error) {
        self.stats.errors.fetch_add(1, Ordering::Relaxed);
        if matches!(e, object_store::Error::NotFound { .. }) {
            // The server answered: not a health problem.
            tracing::error!(tier = %self.tier_name(), "object tier '{}' ({}): {what}: object not found", self.tier_name(), self.spec);
            return;
        }
        let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::warn!(tier = %self.tier_name(), "object tier '{}' ({}): {what} failed: {e}", self.tier_name(), self.spec);
        if n >= DEGRADE_AFTER_FAILURES && !self.degraded.swap(true, Ordering::AcqRel) {
            tracing::error!(
                tier = %self.tier_name(),
                "object tier '{}' ({}) is DEGRADED after {n} failed requests: reads of its data fail with EIO and new data stays on block tiers until it answers again",
                self.tier_name(),
                self.spec
            );
        }
    }
}

/// Builds the client and starts the tier's runtime thread. No request is sent.
pub(super) fn start(spec: &ObjectSpec) -> Result<Arc<ObjectTier>, DeviceError> {
    let mut b = object_store::aws::AmazonS3Builder::from_env().with_bucket_name(&spec.bucket);
    if let Some(e) = &spec.endpoint {
        b = b.with_endpoint(e);
    }
    let allow_http = spec
        .endpoint
        .as_deref()
        .is_some_and(|e| e.starts_with("http://"));
    let region = spec
        .region
        .clone()
        .or_else(|| std::env::var("AWS_REGION").ok())
        .or_else(|| std::env::var("AWS_DEFAULT_REGION").ok())
        .unwrap_or_else(|| "us-east-1".into());
    b = b.with_region(region);
    if let Some(k) = &spec.access_key_id {
        b = b.with_access_key_id(k);
    }
    if let Some(s) = &spec.secret_access_key {
        b = b.with_secret_access_key(s);
    }
    let retry = object_store::RetryConfig {
        backoff: object_store::BackoffConfig {
            init_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(1),
            base: 2.0,
        },
        max_retries: spec.retries as usize,
        retry_timeout: Duration::from_millis(spec.timeout_ms * (spec.retries + 1)),
    };
    // (Client options replace the builder's: allow_http belongs here.)
    let opts = object_store::ClientOptions::new()
        .with_allow_http(allow_http)
        .with_connect_timeout(Duration::from_millis(spec.timeout_ms.min(2000)))
        .with_timeout(Duration::from_millis(spec.timeout_ms));
    let store: Arc<dyn ObjectStore> = Arc::new(
        b.with_retry(retry)
            .with_client_options(opts)
            .build()
            .map_err(|e| DeviceError::Io(format!("{spec}: {e}")))?,
    );
    let (jobs, rx) = tokio::sync::mpsc::unbounded_channel();
    let tier = Arc::new(ObjectTier {
        spec: spec.clone(),
        tier_name: OnceLock::new(),
        jobs,
        degraded: AtomicBool::new(false),
        failures: AtomicU64::new(0),
        stats: ObjectStats::default(),
        last_log_ns: AtomicU64::new(0),
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| DeviceError::Io(format!("{spec}: tokio runtime: {e}")))?;
    let weak = Arc::downgrade(&tier);
    std::thread::Builder::new()
        .name("kiln-s3".into())
        .spawn(move || runtime.block_on(run_jobs(store, weak, rx)))
        .map_err(|e| DeviceError::Io(format!("{spec}: runtime thread: {e}")))?;
    Ok(tier)
}

/// The runtime thread: one task per request; a probe while degraded. Ends
/// when every sender (the device) is gone.
async fn run_jobs(
    store: Arc<dyn ObjectStore>,
    tier: std::sync::Weak<ObjectTier>,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Job>,
) {
    let headers: Arc<Mutex<HashMap<u64, Arc<[u32]>>>> = Arc::new(Mutex::new(HashMap::new()));
    let probe = {
        let (store, tier) = (store.clone(), tier.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let Some(t) = tier.upgrade() else { return };
                if !t.is_degraded() {
                    continue;
                }
                let key = ObjectPath::from(t.spec.key(u64::MAX));
                match store.head(&key).await {
                    Ok(_) | Err(object_store::Error::NotFound { .. }) => {
                        t.failures.store(0, Ordering::Relaxed);
                        t.degraded.store(false, Ordering::Release);
                        tracing::warn!(tier = %t.tier_name(), "object tier '{}' ({}) answers again: no longer degraded", t.tier_name(), t.spec);
                    }
                    Err(_) => {}
                }
            }
        })
    };
    while let Some(job) = rx.recv().await {
        let Some(t) = tier.upgrade() else { break };
        let (store, headers) = (store.clone(), headers.clone());
        tokio::spawn(async move { handle(store, t, headers, job).await });
    }
    probe.abort();
}

async fn handle(
    store: Arc<dyn ObjectStore>,
    t: Arc<ObjectTier>,
    headers: Arc<Mutex<HashMap<u64, Arc<[u32]>>>>,
    job: Job,
) {
    match job {
        Job::Read {
            gen,
            offset,
            len,
            buf,
            tag,
            done,
        } => {
            let result = match read_range(&store, &t, &headers, gen, offset, len).await {
                Ok(data) => {
                    let skip = (offset % CRC_BLOCK_BYTES) as usize;
                    // SAFETY: the channel's submit contract keeps `buf` valid for `len`
                    // bytes, untouched by anyone else, until this completion is reaped.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            data[skip..].as_ptr(),
                            buf as *mut u8,
                            len as usize,
                        )
                    };
                    0
                }
                Err(errno) => -errno,
            };
            done.complete(Completion { tag, result });
        }
        Job::Put { gen, body, reply } => {
            let key = ObjectPath::from(t.spec.key(gen));
            let n = body.len() as u64;
            let r = put(&store, &t, &key, body).await;
            match &r {
                Ok(()) => {
                    t.succeeded();
                    t.stats.puts.fetch_add(1, Ordering::Relaxed);
                    t.stats.put_bytes.fetch_add(n, Ordering::Relaxed);
                }
                Err(e) => t.failed(&format!("PUT {key}"), e),
            }
            let _ = reply
                .send(r.map_err(|e| format!("object tier '{}': PUT {key}: {e}", t.tier_name())));
        }
        Job::Get { gen, reply } => {
            let key = ObjectPath::from(t.spec.key(gen));
            let r = match store.get(&key).await {
                Ok(g) => g.bytes().await,
                Err(e) => Err(e),
            };
            match &r {
                Ok(b) => {
                    t.succeeded();
                    t.stats.gets.fetch_add(1, Ordering::Relaxed);
                    t.stats
                        .get_bytes
                        .fetch_add(b.len() as u64, Ordering::Relaxed);
                }
                Err(e) => t.failed(&format!("GET {key}"), e),
            }
            let _ = reply
                .send(r.map_err(|e| format!("object tier '{}': GET {key}: {e}", t.tier_name())));
        }
        Job::List { reply } => {
            use futures::StreamExt;
            let prefix =
                (!t.spec.prefix.is_empty()).then(|| ObjectPath::from(t.spec.prefix.as_str()));
            let mut stream = store.list(prefix.as_ref());
            let mut gens = Vec::new();
            let mut err = None;
            while let Some(item) = stream.next().await {
                match item {
                    Ok(meta) => {
                        if let Some(g) = meta
                            .location
                            .filename()
                            .and_then(|f| f.strip_prefix("kiln-obj-"))
                            .and_then(|h| u64::from_str_radix(h, 16).ok())
                        {
                            gens.push(g);
                        }
                    }
                    Err(e) => {
                        t.failed("LIST", &e);
                        err = Some(format!("object tier '{}': LIST: {e}", t.tier_name()));
                        break;
                    }
                }
            }
            if err.is_none() {
                t.succeeded();
            }
            let _ = reply.send(match err {
                Some(e) => Err(e),
                None => Ok(gens),
            });
        }
        Job::Delete { gens, reply } => {
            let mut deleted = 0u64;
            let mut err = None;
            for gen in gens {
                headers.lock().unwrap().remove(&gen);
                let key = ObjectPath::from(t.spec.key(gen));
                match store.delete(&key).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => {
                        deleted += 1;
                        t.stats.deletes.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        t.failed(&format!("DELETE {key}"), &e);
                        err = Some(format!(
                            "object tier '{}': DELETE {key}: {e}",
                            t.tier_name()
                        ));
                    }
                }
            }
            if let Some(r) = reply {
                let _ = r.send(match err {
                    Some(e) => Err(e),
                    None => Ok(deleted),
                });
            }
        }
    }
}

async fn put(
    store: &Arc<dyn ObjectStore>,
    t: &ObjectTier,
    key: &ObjectPath,
    body: Vec<u8>,
) -> object_store::Result<()> {
    if body.len() <= MULTIPART_PART_BYTES {
        return store.put(key, PutPayload::from(body)).await.map(|_| ());
    }
    let body = Bytes::from(body);
    let mut upload = store.put_multipart(key).await?;
    let mut at = 0;
    while at < body.len() {
        let end = (at + MULTIPART_PART_BYTES).min(body.len());
        if let Err(e) = upload.put_part(PutPayload::from(body.slice(at..end))).await {
            let _ = upload.abort().await;
            return Err(e);
        }
        at = end;
    }
    upload.complete().await?;
    t.stats.multipart_puts.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// Reads `len` bytes at `offset` of generation `gen`'s data: one ranged GET of
/// the 64 KiB blocks they touch, each checked against the header's crc32c.
/// Returns the blocks (the caller skips to `offset`), or an errno.
async fn read_range(
    store: &Arc<dyn ObjectStore>,
    t: &ObjectTier,
    headers: &Mutex<HashMap<u64, Arc<[u32]>>>,
    gen: u64,
    offset: u64,
    len: u32,
) -> Result<Bytes, i32> {
    let key = ObjectPath::from(t.spec.key(gen));
    let cached = headers.lock().unwrap().get(&gen).cloned();
    let crcs = match cached {
        Some(c) => c,
        None => {
            let raw = store.get_range(&key, 0..HEADER_BYTES).await.map_err(|e| {
                t.failed(&format!("GET header of {key}"), &e);
                libc::EIO
            })?;
            let h = ObjectHeader::decode(&raw).map_err(|e| {
                tracing::error!(tier = %t.tier_name(), "object tier '{}': {key}: {e}", t.tier_name());
                t.stats.crc_errors.fetch_add(1, Ordering::Relaxed);
                libc::EIO
            })?;
            if h.generation != gen {
                tracing::error!(tier = %t.tier_name(), "object tier '{}': {key} holds generation {}", t.tier_name(), h.generation);
                return Err(libc::EIO);
            }
            let c: Arc<[u32]> = h.crcs.into();
            let mut map = headers.lock().unwrap();
            if map.len() >= 65536 {
                map.clear();
            }
            map.insert(gen, c.clone());
            c
        }
    };
    let first = offset / CRC_BLOCK_BYTES;
    let end = (offset + len as u64).div_ceil(CRC_BLOCK_BYTES);
    if end as usize > crcs.len() {
        tracing::error!(tier = %t.tier_name(), "object tier '{}': read of {key} at {offset}+{len} past its {} blocks", t.tier_name(), crcs.len());
        return Err(libc::EIO);
    }
    let range = HEADER_BYTES + first * CRC_BLOCK_BYTES..HEADER_BYTES + end * CRC_BLOCK_BYTES;
    let data = store.get_range(&key, range).await.map_err(|e| {
        t.failed(&format!("GET {key}"), &e);
        libc::EIO
    })?;
    t.succeeded();
    t.stats.gets.fetch_add(1, Ordering::Relaxed);
    t.stats
        .get_bytes
        .fetch_add(data.len() as u64, Ordering::Relaxed);
    if data.len() as u64 != (end - first) * CRC_BLOCK_BYTES {
        tracing::error!(tier = %t.tier_name(), "object tier '{}': short ranged GET of {key}", t.tier_name());
        return Err(libc::EIO);
    }
    for (i, block) in data.chunks(CRC_BLOCK_BYTES as usize).enumerate() {
        let want = crcs[first as usize + i];
        let got = crc32c::crc32c(block);
        if want != got {
            t.stats.crc_errors.fetch_add(1, Ordering::Relaxed);
            tracing::error!(
                tier = %t.tier_name(),
                "object tier '{}': {key} block {} crc32c mismatch: header {want:#010x}, data {got:#010x}",
                t.tier_name(),
                first as usize + i
            );
            return Err(libc::EIO);
        }
    }
    Ok(data)
}
