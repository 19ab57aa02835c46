//! Prometheus / OpenMetrics instrumentation and a tiny scrape endpoint.
//!
//! [`Metrics`] owns a `prometheus-client` [`Registry`] plus every metric family kiln exports.
//! The data path never touches the registry: at setup time a volume or tier resolves its label
//! set once into a handle ([`VolumeIoHandle`], [`TierIoHandle`]) that holds cloned, `Arc`-backed
//! metric cells. Recording through a handle is a handful of relaxed atomic adds and takes no
//! lock. (`prometheus-client` 0.22's own `Histogram` takes a write lock per `observe`, so the
//! latency histogram is the lock-free [`LatencyHistogram`] defined here.)
//!
//! [`MetricsServer`] serves `GET /metrics` over plain HTTP/1.x using only `std::net`, one short
//! lived thread per scrape (bounded), with read/write deadlines so a slow client cannot wedge it.
//!
//! Exported families (OpenMetrics names):
//!
//! | name | type | labels |
//! |---|---|---|
//! | `kiln_io_total` | counter | `volume`, `op` |
//! | `kiln_io_bytes_total` | counter | `volume`, `op` |
//! | `kiln_io_errors_total` | counter | `volume`, `op` |
//! | `kiln_io_latency_seconds` | histogram | `volume`, `op` |
//! | `kiln_tier_io_total` | counter | `tier`, `op` |
//! | `kiln_tier_io_bytes_total` | counter | `tier`, `op` |
//! | `kiln_tier_capacity_bytes` | gauge | `tier` |
//! | `kiln_tier_used_bytes` | gauge | `tier` |
//! | `kiln_mirror_degraded` | gauge | `tier` (1 while a mirror leg is faulted or resyncing) |
//! | `kiln_mirror_resync_done_bytes` | gauge | `tier` |
//! | `kiln_volume_size_bytes` | gauge | `volume` |
//! | `kiln_nbd_connections` | gauge | |
//! | `kiln_journal_misdirected_writes_total` | counter | (durable metadata writes rewritten after a read-back differed) |
//! | `kiln_journal_failed` | gauge | (1 once a metadata write never read back as written: metadata changes fail) |
//! | `kiln_info` | gauge (always 1) | `version` |

use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use prometheus_client::encoding::{
    EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelValueEncoder, MetricEncoder,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::exemplar::Exemplar;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::{Registry, Unit};

/// Content type of the OpenMetrics text exposition format.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Kind of block I/O, used as the `op` label.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum IoOp {
    /// Read.
    Read,
    /// Write.
    Write,
    /// Flush / FUA barrier.
    Flush,
    /// Trim / discard.
    Trim,
    /// Write zeroes.
    WriteZeroes,
}

impl IoOp {
    /// Every variant, in label order.
    pub const ALL: [IoOp; 5] = [
        IoOp::Read,
        IoOp::Write,
        IoOp::Flush,
        IoOp::Trim,
        IoOp::WriteZeroes,
    ];

    /// The `op` label value: `read`, `write`, `flush`, `trim` or `write_zeroes`.
    pub const fn as_str(self) -> &'static str {
        match self {
            IoOp::Read => "read",
            IoOp::Write => "write",
            IoOp::Flush => "flush",
            IoOp::Trim => "trim",
            IoOp::WriteZeroes => "write_zeroes",
        }
    }
}

impl std::fmt::Display for IoOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl EncodeLabelValue for IoOp {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.as_str())
    }
}

/// A free-form label value (volume / tier name), escaped per the OpenMetrics text format.
///
/// `prometheus-client` 0.22 writes label values verbatim, so a `"` or `\` in a user-chosen
/// volume name would otherwise corrupt the exposition.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct Name(String);

impl EncodeLabelValue for Name {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        let s = self.0.as_str();
        if !s.contains(['\\', '"', '\n']) {
            return encoder.write_str(s);
        }
        for c in s.chars() {
            match c {
                '\\' => encoder.write_str("\\\\")?,
                '"' => encoder.write_str("\\\"")?,
                '\n' => encoder.write_str("\\n")?,
                c => encoder.write_char(c)?,
            }
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VolumeOpLabels {
    volume: Name,
    op: IoOp,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TierOpLabels {
    tier: Name,
    op: IoOp,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TierLabels {
    tier: Name,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VolumeLabels {
    volume: Name,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabels {
    version: Name,
}

/// Lowest latency bucket upper bound, in nanoseconds (10 µs).
const LATENCY_BASE_NS: u64 = 10_000;
/// Number of finite latency buckets: `10µs * 2^k` for `k in 0..18`, i.e. 10 µs .. ~1.31 s.
const LATENCY_BUCKETS: usize = 18;

/// Lock-free latency histogram with fixed exponential buckets (10 µs · 2^k, up to ~1.31 s,
/// plus `+Inf`), exported as `<name>_seconds`.
///
/// Observations are integer nanoseconds; `observe_ns` is three relaxed atomic adds and a
/// `leading_zeros`. Cloning shares the underlying cells.
#[derive(Clone, Debug, Default)]
pub struct LatencyHistogram {
    inner: Arc<HistogramCells>,
}

#[derive(Debug, Default)]
struct HistogramCells {
    /// Non-cumulative bucket counts; the last slot is `+Inf`.
    buckets: [AtomicU64; LATENCY_BUCKETS + 1],
    sum_ns: AtomicU64,
}

impl LatencyHistogram {
    /// Index of the first bucket whose upper bound is `>= ns`.
    #[inline]
    fn bucket_index(ns: u64) -> usize {
        // For 10µs·2^(k-1) < ns <= 10µs·2^k, (ns-1)/10µs lies in [2^(k-1), 2^k - 1] whose
        // bit length is k; ns <= 10µs gives 0.
        let q = ns.saturating_sub(1) / LATENCY_BASE_NS;
        let k = (u64::BITS - q.leading_zeros()) as usize;
        k.min(LATENCY_BUCKETS)
    }

    /// Record one observation of `ns` nanoseconds.
    #[inline]
    pub fn observe_ns(&self, ns: u64) {
        let cells = &*self.inner;
        cells.buckets[Self::bucket_index(ns)].fetch_add(1, Ordering::Relaxed);
        cells.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Total number of observations so far.
    pub fn count(&self) -> u64 {
        self.inner
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .sum()
    }

    /// Sum of all observations, in nanoseconds.
    pub fn sum_ns(&self) -> u64 {
        self.inner.sum_ns.load(Ordering::Relaxed)
    }
}

impl TypedMetric for LatencyHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for LatencyHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let mut buckets = [(0.0f64, 0u64); LATENCY_BUCKETS + 1];
        let mut count = 0u64;
        for (k, (slot, cell)) in buckets
            .iter_mut()
            .zip(self.inner.buckets.iter())
            .enumerate()
        {
            let n = cell.load(Ordering::Relaxed);
            count += n;
            // f64::MAX is how prometheus-client spells the +Inf bucket.
            let bound = if k < LATENCY_BUCKETS {
                (LATENCY_BASE_NS << k) as f64 / 1e9
            } else {
                f64::MAX
            };
            *slot = (bound, n);
        }
        let sum = self.sum_ns() as f64 / 1e9;
        // Count is derived from the buckets so `_count` always equals the `+Inf` bucket.
        encoder.encode_histogram::<()>(sum, count, &buckets, None::<&NoExemplars>)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

type NoExemplars = std::collections::HashMap<usize, Exemplar<(), f64>>;

/// Pre-resolved per-(volume, op) metric cells; recording is lock-free.
#[derive(Clone, Debug)]
pub struct VolumeIoHandle {
    ops: Counter,
    bytes: Counter,
    errors: Counter,
    latency: LatencyHistogram,
}

impl VolumeIoHandle {
    /// Record one completed I/O.
    ///
    /// Every completion increments `kiln_io_total` and is observed in `kiln_io_latency_seconds`;
    /// `bytes` is added to `kiln_io_bytes_total` only when `ok`, otherwise
    /// `kiln_io_errors_total` is incremented.
    #[inline]
    pub fn record(&self, bytes: u64, latency_ns: u64, ok: bool) {
        self.ops.inc();
        if ok {
            self.bytes.inc_by(bytes);
        } else {
            self.errors.inc();
        }
        self.latency.observe_ns(latency_ns);
    }
}

/// Pre-resolved per-(tier, op) metric cells; recording is lock-free.
#[derive(Clone, Debug)]
pub struct TierIoHandle {
    ops: Counter,
    bytes: Counter,
}

impl TierIoHandle {
    /// Record one I/O of `bytes` issued to the tier.
    #[inline]
    pub fn record(&self, bytes: u64) {
        self.ops.inc();
        self.bytes.inc_by(bytes);
    }
}

/// All kiln metrics plus the registry used to encode them.
#[derive(Debug)]
pub struct Metrics {
    /// Only locked by [`Metrics::encode`]; recording never touches it.
    registry: Mutex<Registry>,
    io_ops: Family<VolumeOpLabels, Counter>,
    io_bytes: Family<VolumeOpLabels, Counter>,
    io_errors: Family<VolumeOpLabels, Counter>,
    io_latency: Family<VolumeOpLabels, LatencyHistogram>,
    tier_ops: Family<TierOpLabels, Counter>,
    tier_bytes: Family<TierOpLabels, Counter>,
    tier_capacity: Family<TierLabels, Gauge>,
    tier_used: Family<TierLabels, Gauge>,
    mirror_degraded: Family<TierLabels, Gauge>,
    mirror_resync_done: Family<TierLabels, Gauge>,
    volume_size: Family<VolumeLabels, Gauge>,
    nbd_connections: Gauge,
    tier_degraded: Family<TierLabels, Gauge>,
    journal_misdirected: Counter,
    journal_failed: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn gauge_value(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Metrics {
    /// Create the registry with `kiln_info{version}` set to this crate's version.
    pub fn new() -> Self {
        Self::with_version(env!("CARGO_PKG_VERSION"))
    }

    /// Create the registry with `kiln_info{version="<version>"} 1`.
    pub fn with_version(version: &str) -> Self {
        let mut r = Registry::default();
        let io_ops = Family::<VolumeOpLabels, Counter>::default();
        let io_bytes = Family::<VolumeOpLabels, Counter>::default();
        let io_errors = Family::<VolumeOpLabels, Counter>::default();
        let io_latency = Family::<VolumeOpLabels, LatencyHistogram>::default();
        let tier_ops = Family::<TierOpLabels, Counter>::default();
        let tier_bytes = Family::<TierOpLabels, Counter>::default();
        let tier_capacity = Family::<TierLabels, Gauge>::default();
        let tier_used = Family::<TierLabels, Gauge>::default();
        let mirror_degraded = Family::<TierLabels, Gauge>::default();
        let mirror_resync_done = Family::<TierLabels, Gauge>::default();
        let volume_size = Family::<VolumeLabels, Gauge>::default();
        let nbd_connections = Gauge::default();
        let tier_degraded = Family::<TierLabels, Gauge>::default();
        let journal_misdirected = Counter::default();
        let journal_failed = Gauge::default();
        let info = Family::<VersionLabels, Gauge>::default();
        info.get_or_create(&VersionLabels {
            version: Name(version.to_owned()),
        })
        .set(1);

        // Counter names omit `_total`; the encoder appends it. Units are appended from `Unit`.
        r.register("kiln_io", "Completed volume I/Os", io_ops.clone());
        r.register_with_unit(
            "kiln_io",
            "Bytes transferred by successful volume I/Os",
            Unit::Bytes,
            io_bytes.clone(),
        );
        r.register("kiln_io_errors", "Failed volume I/Os", io_errors.clone());
        r.register_with_unit(
            "kiln_io_latency",
            "Volume I/O completion latency",
            Unit::Seconds,
            io_latency.clone(),
        );
        r.register(
            "kiln_tier_io",
            "I/Os issued to a storage tier",
            tier_ops.clone(),
        );
        r.register_with_unit(
            "kiln_tier_io",
            "Bytes issued to a storage tier",
            Unit::Bytes,
            tier_bytes.clone(),
        );
        r.register_with_unit(
            "kiln_tier_capacity",
            "Capacity of a storage tier",
            Unit::Bytes,
            tier_capacity.clone(),
        );
        r.register_with_unit(
            "kiln_tier_used",
            "Space in use on a storage tier",
            Unit::Bytes,
            tier_used.clone(),
        );
        r.register(
            "kiln_mirror_degraded",
            "1 while a mirror tier has a faulted or resyncing leg",
            mirror_degraded.clone(),
        );
        r.register_with_unit(
            "kiln_mirror_resync_done",
            "Bytes resynced onto a mirror tier's new leg",
            Unit::Bytes,
            mirror_resync_done.clone(),
        );
        r.register_with_unit(
            "kiln_volume_size",
            "Logical size of a volume",
            Unit::Bytes,
            volume_size.clone(),
        );
        r.register(
            "kiln_nbd_connections",
            "Open NBD client connections",
            nbd_connections.clone(),
        );
        r.register(
            "kiln_tier_degraded",
            "1 while an object tier is degraded (reads of its data fail; nothing is demoted to it)",
            tier_degraded.clone(),
        );
        r.register(
            "kiln_journal_misdirected_writes",
            "Durable metadata writes that read back different (misdirected or lost) and were rewritten",
            journal_misdirected.clone(),
        );
        r.register(
            "kiln_journal_failed",
            "1 once a metadata write never read back as written (every metadata change fails)",
            journal_failed.clone(),
        );
        r.register("kiln_info", "kiln build information (always 1)", info);

        Metrics {
            registry: Mutex::new(r),
            io_ops,
            io_bytes,
            io_errors,
            io_latency,
            tier_ops,
            tier_bytes,
            tier_capacity,
            tier_used,
            mirror_degraded,
            mirror_resync_done,
            volume_size,
            nbd_connections,
            tier_degraded,
            journal_misdirected,
            journal_failed,
        }
    }

    /// Set the journal's read-back figures from its running totals (periodic, not per I/O).
    pub fn set_journal_status(&self, misdirected_writes: u64, failed: bool) {
        let c = &self.journal_misdirected;
        c.inc_by(misdirected_writes.saturating_sub(c.get()));
        self.journal_failed.set(failed as i64);
    }

    /// Set `kiln_tier_degraded` for an object tier (periodic, not per I/O).
    pub fn set_tier_degraded(&self, tier: &str, degraded: bool) {
        let l = TierLabels {
            tier: Name(tier.to_owned()),
        };
        self.tier_degraded.get_or_create(&l).set(degraded as i64);
    }

    /// Resolve the lock-free recording handle for `(volume, op)`. Call at setup, not per I/O.
    pub fn volume_io(&self, volume: &str, op: IoOp) -> VolumeIoHandle {
        let l = VolumeOpLabels {
            volume: Name(volume.to_owned()),
            op,
        };
        VolumeIoHandle {
            ops: self.io_ops.get_or_create(&l).clone(),
            bytes: self.io_bytes.get_or_create(&l).clone(),
            errors: self.io_errors.get_or_create(&l).clone(),
            latency: self.io_latency.get_or_create(&l).clone(),
        }
    }

    /// Resolve the lock-free recording handle for `(tier, op)`. Call at setup, not per I/O.
    pub fn tier_io(&self, tier: &str, op: IoOp) -> TierIoHandle {
        let l = TierOpLabels {
            tier: Name(tier.to_owned()),
            op,
        };
        TierIoHandle {
            ops: self.tier_ops.get_or_create(&l).clone(),
            bytes: self.tier_bytes.get_or_create(&l).clone(),
        }
    }

    /// Set `kiln_tier_capacity_bytes` and `kiln_tier_used_bytes` for `tier`.
    ///
    /// Takes the family's internal lock; for periodic (not per-I/O) updates.
    pub fn set_tier_usage(&self, tier: &str, capacity_bytes: u64, used_bytes: u64) {
        let l = TierLabels {
            tier: Name(tier.to_owned()),
        };
        self.tier_capacity
            .get_or_create(&l)
            .set(gauge_value(capacity_bytes));
        self.tier_used
            .get_or_create(&l)
            .set(gauge_value(used_bytes));
    }

    /// Set the mirror health gauges of `tier`. Periodic, not per I/O.
    pub fn set_mirror_health(&self, tier: &str, degraded: bool, resync_done_bytes: u64) {
        let l = TierLabels {
            tier: Name(tier.to_owned()),
        };
        self.mirror_degraded.get_or_create(&l).set(degraded as i64);
        self.mirror_resync_done
            .get_or_create(&l)
            .set(gauge_value(resync_done_bytes));
    }

    /// Set `kiln_volume_size_bytes` for `volume`.
    pub fn set_volume_size(&self, volume: &str, size_bytes: u64) {
        let l = VolumeLabels {
            volume: Name(volume.to_owned()),
        };
        self.volume_size
            .get_or_create(&l)
            .set(gauge_value(size_bytes));
    }

    /// Drop every series labelled with `volume` (after the volume is deleted). Handles that
    /// were resolved earlier keep working but are no longer exported.
    pub fn remove_volume(&self, volume: &str) {
        let name = Name(volume.to_owned());
        for op in IoOp::ALL {
            let l = VolumeOpLabels {
                volume: name.clone(),
                op,
            };
            self.io_ops.remove(&l);
            self.io_bytes.remove(&l);
            self.io_errors.remove(&l);
            self.io_latency.remove(&l);
        }
        self.volume_size.remove(&VolumeLabels { volume: name });
    }

    /// The `kiln_nbd_connections` gauge (shared handle; `inc()`/`dec()` are lock-free).
    pub fn nbd_connections(&self) -> Gauge {
        self.nbd_connections.clone()
    }

    /// Encode every metric in the OpenMetrics text format (terminated by `# EOF`).
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(8 * 1024);
        let registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        // Writing into a String cannot fail; an Err could only come from a metric's encoder.
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &registry) {
            tracing::error!("metrics encoding failed: {e}");
        }
        out
    }
}

/// Maximum simultaneously served scrape connections; extra ones get `503`.
const MAX_HTTP_CONNECTIONS: usize = 16;
/// Maximum size of an HTTP request head.
const MAX_REQUEST_HEAD_BYTES: usize = 8 * 1024;
/// Deadline for receiving a complete request head.
const HTTP_READ_DEADLINE: Duration = Duration::from_secs(5);
/// Timeout for each write of the response.
const HTTP_WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Minimal HTTP/1.x server exposing `GET /metrics`.
///
/// Runs an accept thread plus one short-lived thread per connection (at most 16 at once).
/// Every response closes the connection. [`MetricsServer::stop`] (also run on drop) stops
/// accepting and joins the accept thread.
#[derive(Debug)]
pub struct MetricsServer {
    local_addr: SocketAddr,
    stopping: Arc<AtomicBool>,
    wake: Option<UnixStream>,
    thread: Option<JoinHandle<()>>,
}

impl MetricsServer {
    /// Bind `addr` (e.g. `127.0.0.1:9187`, port 0 for an ephemeral port) and start serving.
    ///
    /// Unless `allow_remote` is true, every address `addr` resolves to must be loopback;
    /// otherwise this fails with `PermissionDenied` (metrics leak volume names).
    pub fn start(
        addr: &str,
        metrics: Arc<Metrics>,
        allow_remote: bool,
    ) -> io::Result<MetricsServer> {
        let addrs: Vec<SocketAddr> = addr.to_socket_addrs()?.collect();
        if addrs.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("metrics address '{addr}' resolved to nothing"),
            ));
        }
        if !allow_remote {
            if let Some(bad) = addrs.iter().find(|a| !a.ip().is_loopback()) {
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!(
                        "refusing to serve metrics on non-loopback address {bad} \
                         (enable allow_remote to expose them)"
                    ),
                ));
            }
        }
        let listener = TcpListener::bind(&addrs[..])?;
        listener.set_nonblocking(true)?;
        let local_addr = listener.local_addr()?;
        let (wake_tx, wake_rx) = UnixStream::pair()?;
        let stopping = Arc::new(AtomicBool::new(false));
        let stop2 = Arc::clone(&stopping);
        let thread = std::thread::Builder::new()
            .name("kiln-metrics".into())
            .spawn(move || accept_loop(listener, wake_rx, stop2, metrics))?;
        tracing::info!("metrics endpoint listening on http://{local_addr}/metrics");
        Ok(MetricsServer {
            local_addr,
            stopping,
            wake: Some(wake_tx),
            thread: Some(thread),
        })
    }

    /// The bound address (useful after binding port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stop accepting connections and join the accept thread. Idempotent. In-flight scrapes
    /// finish on their own (bounded by the read/write timeouts).
    pub fn stop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        if let Some(mut w) = self.wake.take() {
            let _ = w.write_all(&[1]);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn accept_loop(
    listener: TcpListener,
    wake: UnixStream,
    stopping: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
) {
    let active = Arc::new(AtomicUsize::new(0));
    loop {
        let accepted = crate::rpc::next_connection(&listener, &wake, &stopping, "metrics", || {
            listener.accept().map(|(s, _)| s)
        });
        let stream = match accepted {
            crate::rpc::Accepted::Stop => return,
            crate::rpc::Accepted::Retry => continue,
            crate::rpc::Accepted::Stream(s) => s,
        };
        if active.fetch_add(1, Ordering::SeqCst) >= MAX_HTTP_CONNECTIONS {
            active.fetch_sub(1, Ordering::SeqCst);
            let _ = stream.set_nonblocking(false);
            let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
            let _ = respond(
                &stream,
                "503 Service Unavailable",
                "text/plain",
                b"busy\n",
                false,
            );
            continue;
        }
        let metrics = Arc::clone(&metrics);
        let active2 = Arc::clone(&active);
        let spawned = std::thread::Builder::new()
            .name("kiln-metrics-conn".into())
            .spawn(move || {
                if let Err(e) = serve_http(&stream, &metrics) {
                    tracing::debug!("metrics connection error: {e}");
                }
                let _ = stream.shutdown(Shutdown::Both);
                active2.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            active.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!("cannot spawn metrics connection thread: {e}");
        }
    }
}

/// Read one request head (until a blank line) within [`HTTP_READ_DEADLINE`].
/// Returns `Ok(None)` if the peer closed without sending anything.
fn read_head(stream: &TcpStream) -> io::Result<Option<Vec<u8>>> {
    let deadline = Instant::now() + HTTP_READ_DEADLINE;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "request head timed out",
            ));
        }
        stream.set_read_timeout(Some(remaining))?;
        let n = (&*stream).read(&mut chunk)?;
        if n == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Ok(Some(buf))
            };
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n") {
            return Ok(Some(buf));
        }
        if buf.len() > MAX_REQUEST_HEAD_BYTES {
            return Ok(Some(buf));
        }
    }
}

fn serve_http(stream: &TcpStream, metrics: &Metrics) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_write_timeout(Some(HTTP_WRITE_TIMEOUT))?;
    let head = match read_head(stream) {
        Ok(Some(h)) => h,
        Ok(None) => return Ok(()),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
            ) =>
        {
            return respond(
                stream,
                "408 Request Timeout",
                "text/plain",
                b"timeout\n",
                false,
            );
        }
        Err(e) => return Err(e),
    };
    if head.len() > MAX_REQUEST_HEAD_BYTES {
        return respond(
            stream,
            "431 Request Header Fields Too Large",
            "text/plain",
            b"",
            false,
        );
    }
    let Some((method, target)) = parse_request_line(&head) else {
        return respond(
            stream,
            "400 Bad Request",
            "text/plain",
            b"bad request\n",
            false,
        );
    };
    let head_only = match method {
        "GET" => false,
        "HEAD" => true,
        _ => return respond(stream, "405 Method Not Allowed", "text/plain", b"", false),
    };
    let path = target.split(['?', '#']).next().unwrap_or("");
    if path == "/metrics" {
        let body = metrics.encode();
        respond(
            stream,
            "200 OK",
            OPENMETRICS_CONTENT_TYPE,
            body.as_bytes(),
            head_only,
        )
    } else {
        respond(
            stream,
            "404 Not Found",
            "text/plain",
            b"not found; try /metrics\n",
            head_only,
        )
    }
}

/// Parse `METHOD SP TARGET SP HTTP/1.x` from the first line of `head`.
fn parse_request_line(head: &[u8]) -> Option<(&str, &str)> {
    let end = head.iter().position(|&b| b == b'\n')?;
    let line = std::str::from_utf8(&head[..end])
        .ok()?
        .trim_end_matches('\r');
    let mut parts = line.split(' ');
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    let token_ok = !method.is_empty() && method.bytes().all(|b| b.is_ascii_uppercase());
    if parts.next().is_some() || !token_ok || !target.starts_with('/') {
        return None;
    }
    if !(version == "HTTP/1.1" || version == "HTTP/1.0") {
        return None;
    }
    Some((method, target))
}

fn respond(
    mut stream: &TcpStream,
    status: &str,
    content_type: &str,
    body: &[u8],
    head_only: bool,
) -> io::Result<()> {
    let mut head = String::with_capacity(160);
    let _ = write!(
        head,
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n",
        body.len()
    );
    if status.starts_with("405") {
        head.push_str("Allow: GET, HEAD\r\n");
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    if !head_only {
        stream.write_all(body)?;
    }
    stream.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn http(addr: SocketAddr, raw: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(raw).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    fn scrape(addr: SocketAddr) -> String {
        let resp = http(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(resp.starts_with("HTTP/1.1 200 OK\r\n"), "{resp}");
        assert!(resp.contains(&format!("Content-Type: {OPENMETRICS_CONTENT_TYPE}\r\n")));
        let body = resp.split_once("\r\n\r\n").unwrap().1.to_owned();
        let cl: usize = resp
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_eq!(cl, body.len());
        body
    }

    fn value(body: &str, series: &str) -> Option<f64> {
        body.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn bucket_index_matches_bounds() {
        assert_eq!(LatencyHistogram::bucket_index(0), 0);
        assert_eq!(LatencyHistogram::bucket_index(10_000), 0);
        assert_eq!(LatencyHistogram::bucket_index(10_001), 1);
        assert_eq!(LatencyHistogram::bucket_index(20_000), 1);
        assert_eq!(LatencyHistogram::bucket_index(20_001), 2);
        for k in 0..LATENCY_BUCKETS {
            let bound = LATENCY_BASE_NS << k;
            assert_eq!(LatencyHistogram::bucket_index(bound), k);
            assert_eq!(
                LatencyHistogram::bucket_index(bound + 1),
                (k + 1).min(LATENCY_BUCKETS)
            );
        }
        assert_eq!(LatencyHistogram::bucket_index(u64::MAX), LATENCY_BUCKETS);
    }

    #[test]
    fn encode_contains_all_families() {
        let m = Metrics::with_version("1.2.3");
        let h = m.volume_io("vol\"1", IoOp::Write);
        h.record(4096, 15_000, true);
        h.record(4096, 2_000_000_000, false);
        m.tier_io("nvme", IoOp::Read).record(8192);
        m.set_tier_usage("nvme", 1 << 40, 1 << 30);
        m.set_volume_size("vol\"1", 1 << 30);
        m.nbd_connections().inc();
        let t = m.encode();
        let v = r#"volume="vol\"1",op="write""#;
        assert_eq!(
            value(&t, &format!("kiln_io_total{{{v}}}")),
            Some(2.0),
            "{t}"
        );
        assert_eq!(
            value(&t, &format!("kiln_io_bytes_total{{{v}}}")),
            Some(4096.0)
        );
        assert_eq!(
            value(&t, &format!("kiln_io_errors_total{{{v}}}")),
            Some(1.0)
        );
        assert_eq!(
            value(&t, &format!("kiln_io_latency_seconds_count{{{v}}}")),
            Some(2.0)
        );
        assert_eq!(
            value(&t, &format!("kiln_io_latency_seconds_sum{{{v}}}")),
            Some(2.000015)
        );
        assert_eq!(
            value(
                &t,
                &format!("kiln_io_latency_seconds_bucket{{le=\"0.00001\",{v}}}")
            ),
            Some(0.0)
        );
        assert_eq!(
            value(
                &t,
                &format!("kiln_io_latency_seconds_bucket{{le=\"0.00002\",{v}}}")
            ),
            Some(1.0)
        );
        assert_eq!(
            value(
                &t,
                &format!("kiln_io_latency_seconds_bucket{{le=\"+Inf\",{v}}}")
            ),
            Some(2.0)
        );
        assert_eq!(
            value(&t, r#"kiln_tier_io_total{tier="nvme",op="read"}"#),
            Some(1.0)
        );
        assert_eq!(
            value(&t, r#"kiln_tier_io_bytes_total{tier="nvme",op="read"}"#),
            Some(8192.0)
        );
        assert_eq!(
            value(&t, r#"kiln_tier_capacity_bytes{tier="nvme"}"#),
            Some((1u64 << 40) as f64)
        );
        assert_eq!(
            value(&t, r#"kiln_tier_used_bytes{tier="nvme"}"#),
            Some((1u64 << 30) as f64)
        );
        assert_eq!(
            value(&t, r#"kiln_volume_size_bytes{volume="vol\"1"}"#),
            Some((1u64 << 30) as f64)
        );
        assert_eq!(value(&t, "kiln_nbd_connections"), Some(1.0));
        assert_eq!(value(&t, r#"kiln_info{version="1.2.3"}"#), Some(1.0));
        assert_eq!(
            value(&t, "kiln_journal_misdirected_writes_total"),
            Some(0.0)
        );
        m.set_journal_status(3, true);
        m.set_journal_status(5, true);
        let t = m.encode();
        assert_eq!(
            value(&t, "kiln_journal_misdirected_writes_total"),
            Some(5.0)
        );
        assert_eq!(value(&t, "kiln_journal_failed"), Some(1.0));
        assert!(t.contains("# TYPE kiln_io_latency_seconds histogram\n"));
        assert!(t.contains("# UNIT kiln_io_bytes bytes\n"));
        assert!(t.ends_with("# EOF\n"));

        m.remove_volume("vol\"1");
        let t = m.encode();
        assert!(!t.contains("vol\\\"1"), "{t}");
        h.record(1, 1, true); // stale handle still usable
    }

    #[test]
    fn scrape_counts_grow_and_errors_do_not_kill_server() {
        let m = Arc::new(Metrics::new());
        let mut srv = MetricsServer::start("127.0.0.1:0", Arc::clone(&m), false).unwrap();
        let addr = srv.local_addr();
        let h = m.volume_io("v0", IoOp::Read);
        h.record(512, 30_000, true);
        let series = r#"kiln_io_total{volume="v0",op="read"}"#;
        let bytes = r#"kiln_io_bytes_total{volume="v0",op="read"}"#;
        let body = scrape(addr);
        assert_eq!(value(&body, series), Some(1.0), "{body}");
        assert_eq!(value(&body, bytes), Some(512.0));

        for _ in 0..9 {
            h.record(512, 30_000, true);
        }
        let body = scrape(addr);
        assert_eq!(value(&body, series), Some(10.0));
        assert_eq!(value(&body, bytes), Some(5120.0));

        let resp = http(addr, b"GET /nope HTTP/1.1\r\n\r\n");
        assert!(resp.starts_with("HTTP/1.1 404 "), "{resp}");
        let resp = http(addr, b"\x00\xffgarbage\x01\r\n\r\n");
        assert!(resp.starts_with("HTTP/1.1 400 "), "{resp}");
        let resp = http(addr, b"POST /metrics HTTP/1.1\r\n\r\n");
        assert!(resp.starts_with("HTTP/1.1 405 "), "{resp}");
        let resp = http(addr, b"HEAD /metrics HTTP/1.0\r\n\r\n");
        assert!(
            resp.starts_with("HTTP/1.1 200 ") && resp.ends_with("\r\n\r\n"),
            "{resp}"
        );
        let resp = http(addr, &[b'A'; MAX_REQUEST_HEAD_BYTES + 10]);
        assert!(resp.starts_with("HTTP/1.1 431 "), "{resp}");
        // Connect-and-close and a silent (slow) client must not block scrapes.
        drop(TcpStream::connect(addr).unwrap());
        let _silent = TcpStream::connect(addr).unwrap();
        assert_eq!(value(&scrape(addr), series), Some(10.0));

        srv.stop();
        srv.stop();
        assert!(TcpStream::connect(addr).is_err());
    }

    #[test]
    fn refuses_remote_bind_without_opt_in() {
        let m = Arc::new(Metrics::new());
        let err = MetricsServer::start("0.0.0.0:0", Arc::clone(&m), false).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
        let srv = MetricsServer::start("0.0.0.0:0", m, true).unwrap();
        let port = srv.local_addr().port();
        assert!(scrape(SocketAddr::from(([127, 0, 0, 1], port))).contains("kiln_info"));
    }
}
