//! JSON-RPC 2.0 control plane over a unix socket, in the spirit of SPDK's `rpc.py`.
//!
//! Framing: requests are JSON values written back to back on a stream socket, with or without
//! whitespace/newlines between them (SPDK clients send one object with no trailing newline and
//! read until a complete JSON value parses). The server parses with
//! [`serde_json::StreamDeserializer`], so both styles work, and writes each reply as one JSON
//! value followed by `\n`. A connection may carry any number of requests.
//!
//! Semantics follow the JSON-RPC 2.0 spec: batch requests (arrays) are supported, notifications
//! (requests without `id`) get no reply, malformed JSON gets a `-32700` reply and the
//! connection is closed (other connections are unaffected). Absent `params` are passed to the
//! [`Handler`] as `Value::Null`.
//!
//! The socket file is created with mode `0600`: whoever can connect can control kiln.

use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::io::{self, BufReader, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

/// Method dispatcher: `(method, params) -> result`. `params` is `Value::Null` when absent.
pub type Handler = std::sync::Arc<
    dyn Fn(&str, serde_json::Value) -> Result<serde_json::Value, RpcError> + Send + Sync,
>;

/// Maximum number of simultaneously open client connections.
pub const MAX_CONNECTIONS: usize = 64;
/// Maximum size of a single request (one top-level JSON value, batch included).
pub const MAX_REQUEST_BYTES: u64 = 16 * 1024 * 1024;
/// A connection that sends nothing for this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// Timeout for each reply write (a client that never reads cannot pin a thread forever).
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// A JSON-RPC error object (`{"code": .., "message": ..}`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RpcError {
    /// JSON-RPC error code; `-32768..=-32000` are reserved by the spec.
    pub code: i64,
    /// Human-readable message, shown verbatim by the CLI.
    pub message: String,
}

impl RpcError {
    /// Invalid JSON was received.
    pub const PARSE_ERROR: i64 = -32700;
    /// The JSON sent is not a valid request object.
    pub const INVALID_REQUEST: i64 = -32600;
    /// The method does not exist.
    pub const METHOD_NOT_FOUND: i64 = -32601;
    /// Invalid method parameters.
    pub const INVALID_PARAMS: i64 = -32602;
    /// Internal error.
    pub const INTERNAL_ERROR: i64 = -32603;

    /// An error with an arbitrary code.
    pub fn new(code: i64, message: impl Into<String>) -> Self {
        RpcError {
            code,
            message: message.into(),
        }
    }

    /// `-32602 Invalid params`, e.g. `invalid_params(format!("volume '{name}' not found"))`.
    pub fn invalid_params(msg: impl Into<String>) -> Self {
        Self::new(Self::INVALID_PARAMS, msg)
    }

    /// `-32601 Method not found: <name>`.
    pub fn method_not_found(name: &str) -> Self {
        Self::new(Self::METHOD_NOT_FOUND, format!("Method not found: {name}"))
    }

    /// `-32603 Internal error`.
    pub fn internal(msg: impl Into<String>) -> Self {
        Self::new(Self::INTERNAL_ERROR, msg)
    }

    /// `-32700 Parse error`.
    pub fn parse_error(msg: impl Into<String>) -> Self {
        Self::new(Self::PARSE_ERROR, msg)
    }

    /// `-32600 Invalid Request`.
    pub fn invalid_request(msg: impl Into<String>) -> Self {
        Self::new(Self::INVALID_REQUEST, msg)
    }

    fn to_json(&self) -> Value {
        json!({ "code": self.code, "message": self.message })
    }
}

impl fmt::Display for RpcError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "rpc error {}: {}", self.code, self.message)
    }
}

impl std::error::Error for RpcError {}

/// A running JSON-RPC server bound to a unix socket.
///
/// Dropping it (or calling [`RpcServer::stop`]) stops accepting, shuts down open connections
/// and removes the socket file.
pub struct RpcServer {
    path: PathBuf,
    /// `(dev, ino)` of the socket file we created, so stop never removes someone else's.
    ident: (u64, u64),
    stopping: Arc<AtomicBool>,
    wake: Option<UnixStream>,
    thread: Option<JoinHandle<()>>,
    conns: Arc<Mutex<HashMap<u64, UnixStream>>>,
}

impl fmt::Debug for RpcServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RpcServer")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// Remove a stale socket at `path`; fail if it is live or is not a socket.
fn clear_stale_socket(path: &Path) -> io::Result<()> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "{} exists and is not a socket; refusing to replace it",
                path.display()
            ),
        ));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!(
                "another kiln is running (rpc socket {} is live)",
                path.display()
            ),
        )),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            tracing::info!("removing stale rpc socket {}", path.display());
            match fs::remove_file(path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            }
        }
        Err(e) => Err(io::Error::new(
            e.kind(),
            format!("cannot probe existing rpc socket {}: {e}", path.display()),
        )),
    }
}

/// Bind a listener at `path` whose socket file is never visible with a mode other than 0600:
/// bind under a temporary name in the same directory, chmod, then rename into place.
fn bind_private(path: &Path) -> io::Result<UnixListener> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let tmp_name = format!(
        ".kiln-{}-{}.tmp",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    );
    let tmp = path.with_file_name(tmp_name);
    let _ = fs::remove_file(&tmp);
    match UnixListener::bind(&tmp) {
        Ok(listener) => {
            let placed = fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600))
                .and_then(|()| fs::rename(&tmp, path));
            if let Err(e) = placed {
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
            Ok(listener)
        }
        // The temporary name can exceed sun_path where `path` itself fits: bind directly.
        Err(e) if e.kind() == io::ErrorKind::InvalidInput => {
            let listener = UnixListener::bind(path)?;
            if let Err(e) = fs::set_permissions(path, fs::Permissions::from_mode(0o600)) {
                let _ = fs::remove_file(path);
                return Err(e);
            }
            Ok(listener)
        }
        Err(e) => Err(e),
    }
}

impl RpcServer {
    /// Bind `path` and serve `handler` on background threads.
    ///
    /// A leftover socket file from a dead process is removed; if a live server answers on
    /// `path` this fails with `AddrInUse` ("another kiln is running"); a non-socket file at
    /// `path` is never removed. The socket file gets mode `0600`.
    pub fn start(path: &Path, handler: Handler) -> io::Result<RpcServer> {
        clear_stale_socket(path)?;
        let listener = bind_private(path)?;
        let meta = fs::symlink_metadata(path)?;
        listener.set_nonblocking(true)?;
        let (wake_tx, wake_rx) = UnixStream::pair()?;
        let stopping = Arc::new(AtomicBool::new(false));
        let conns = Arc::new(Mutex::new(HashMap::new()));
        let (stop2, conns2) = (Arc::clone(&stopping), Arc::clone(&conns));
        let spawned = std::thread::Builder::new()
            .name("kiln-rpc".into())
            .spawn(move || accept_loop(listener, wake_rx, stop2, conns2, handler));
        let thread = match spawned {
            Ok(t) => t,
            Err(e) => {
                let _ = fs::remove_file(path);
                return Err(e);
            }
        };
        tracing::info!("rpc server listening on {}", path.display());
        Ok(RpcServer {
            path: path.to_owned(),
            ident: (meta.dev(), meta.ino()),
            stopping,
            wake: Some(wake_tx),
            thread: Some(thread),
            conns,
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stop accepting, shut down open connections and remove the socket file (only if it is
    /// still the one this server created). Idempotent. A handler call already in progress
    /// runs to completion on its detached connection thread, but its reply is discarded.
    pub fn stop(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        self.stopping.store(true, Ordering::SeqCst);
        if let Some(mut w) = self.wake.take() {
            let _ = w.write_all(&[1]);
        }
        let _ = thread.join();
        for (_, s) in self.conns.lock().unwrap_or_else(|e| e.into_inner()).drain() {
            let _ = s.shutdown(Shutdown::Both);
        }
        if let Ok(m) = fs::symlink_metadata(&self.path) {
            if (m.dev(), m.ino()) == self.ident {
                let _ = fs::remove_file(&self.path);
            }
        }
    }
}

impl Drop for RpcServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Wait until `a` or `b` is readable. Returns `(a_ready, b_ready)`.
/// What [`next_connection`] found.
pub(crate) enum Accepted<S> {
    /// The server is stopping (or its poll failed): leave the accept loop.
    Stop,
    /// Nothing to accept after all (spurious wake-up or a transient error): poll again.
    Retry,
    Stream(S),
}

/// One step of an accept loop shared by the RPC and metrics servers: wait until the
/// listener or the wake-up socket is readable, then accept one connection.
pub(crate) fn next_connection<S>(
    listener: &impl AsRawFd,
    wake: &impl AsRawFd,
    stopping: &AtomicBool,
    what: &str,
    accept: impl FnOnce() -> io::Result<S>,
) -> Accepted<S> {
    let (ready, woken) = match poll_two(listener, wake) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("{what} server poll failed: {e}");
            return Accepted::Stop;
        }
    };
    if woken || stopping.load(Ordering::SeqCst) {
        return Accepted::Stop;
    }
    if !ready {
        return Accepted::Retry;
    }
    match accept() {
        Ok(s) => Accepted::Stream(s),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Accepted::Retry,
        Err(e) => {
            tracing::warn!("{what} accept failed: {e}");
            std::thread::sleep(Duration::from_millis(50));
            Accepted::Retry
        }
    }
}

fn poll_two(a: &impl AsRawFd, b: &impl AsRawFd) -> io::Result<(bool, bool)> {
    let mut fds = [
        libc::pollfd {
            fd: a.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: b.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: `fds` is a valid, initialised array of two pollfd structs that lives across
        // the call, and its length is passed as nfds; both fds are owned by live objects.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if rc >= 0 {
            return Ok((fds[0].revents != 0, fds[1].revents != 0));
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

fn accept_loop(
    listener: UnixListener,
    wake: UnixStream,
    stopping: Arc<AtomicBool>,
    conns: Arc<Mutex<HashMap<u64, UnixStream>>>,
    handler: Handler,
) {
    let active = Arc::new(AtomicUsize::new(0));
    let mut next_id = 0u64;
    loop {
        let stream = match next_connection(&listener, &wake, &stopping, "rpc", || {
            listener.accept().map(|(s, _)| s)
        }) {
            Accepted::Stop => return,
            Accepted::Retry => continue,
            Accepted::Stream(s) => s,
        };
        if stream.set_nonblocking(false).is_err() {
            continue;
        }
        let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
        let _ = stream.set_read_timeout(Some(IDLE_TIMEOUT));
        if active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            active.fetch_sub(1, Ordering::SeqCst);
            let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
            let err = RpcError::internal(format!("too many connections (max {MAX_CONNECTIONS})"));
            let _ = write_reply(&stream, &error_reply(Value::Null, &err));
            continue;
        }
        let id = next_id;
        next_id += 1;
        if let Ok(clone) = stream.try_clone() {
            conns
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(id, clone);
        }
        let (handler, conns2, active2) = (
            Arc::clone(&handler),
            Arc::clone(&conns),
            Arc::clone(&active),
        );
        let spawned = std::thread::Builder::new()
            .name("kiln-rpc-conn".into())
            .spawn(move || {
                serve_connection(&stream, &handler);
                conns2.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
                active2.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            tracing::warn!("cannot spawn rpc connection thread: {e}");
            conns.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
            active.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Reader that fails once more than [`MAX_REQUEST_BYTES`] are consumed past `boundary`
/// (the end of the previous request).
struct LimitedReader<R> {
    inner: R,
    consumed: u64,
    boundary: Arc<AtomicU64>,
}

impl<R: Read> Read for LimitedReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let limit = self.boundary.load(Ordering::Relaxed) + MAX_REQUEST_BYTES;
        let allowed = limit.saturating_sub(self.consumed);
        if allowed == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "request too large",
            ));
        }
        let want = buf
            .len()
            .min(usize::try_from(allowed).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        self.consumed += n as u64;
        Ok(n)
    }
}

fn serve_connection(stream: &UnixStream, handler: &Handler) {
    let boundary = Arc::new(AtomicU64::new(0));
    let reader = LimitedReader {
        inner: BufReader::new(stream),
        consumed: 0,
        boundary: Arc::clone(&boundary),
    };
    let mut values = serde_json::Deserializer::from_reader(reader).into_iter::<Value>();
    loop {
        let request = match values.next() {
            None => return,
            Some(Ok(v)) => v,
            Some(Err(e)) => {
                let too_large = e.io_error_kind() == Some(io::ErrorKind::InvalidData);
                if e.is_syntax() || too_large {
                    let err = if e.is_syntax() {
                        RpcError::parse_error(format!("Parse error: {e}"))
                    } else {
                        RpcError::invalid_request(format!(
                            "request exceeds {MAX_REQUEST_BYTES} bytes"
                        ))
                    };
                    let _ = write_reply(stream, &error_reply(Value::Null, &err));
                }
                // EOF mid-value, I/O error or idle timeout: just close.
                tracing::debug!("rpc connection closed: {e}");
                return;
            }
        };
        boundary.store(values.byte_offset() as u64, Ordering::Relaxed);
        if let Some(reply) = dispatch(request, handler) {
            if let Err(e) = write_reply(stream, &reply) {
                tracing::debug!("rpc reply write failed: {e}");
                return;
            }
        }
    }
}

fn write_reply(mut stream: &UnixStream, reply: &Value) -> io::Result<()> {
    let mut buf = serde_json::to_vec(reply)?;
    buf.push(b'\n');
    stream.write_all(&buf)?;
    stream.flush()
}

fn error_reply(id: Value, err: &RpcError) -> Value {
    json!({ "jsonrpc": "2.0", "id": id, "error": err.to_json() })
}

/// Handle one top-level value (single request or batch); `None` means send nothing.
fn dispatch(request: Value, handler: &Handler) -> Option<Value> {
    match request {
        Value::Array(items) if items.is_empty() => Some(error_reply(
            Value::Null,
            &RpcError::invalid_request("Invalid Request: empty batch"),
        )),
        Value::Array(items) => {
            let replies: Vec<Value> = items
                .into_iter()
                .filter_map(|r| dispatch_one(r, handler))
                .collect();
            (!replies.is_empty()).then_some(Value::Array(replies))
        }
        other => dispatch_one(other, handler),
    }
}

fn dispatch_one(request: Value, handler: &Handler) -> Option<Value> {
    let Value::Object(mut obj) = request else {
        let err = RpcError::invalid_request("Invalid Request: expected an object");
        return Some(error_reply(Value::Null, &err));
    };
    let id = obj.remove("id");
    match validate(&mut obj, id.as_ref()) {
        Ok((method, params)) => {
            let result = catch_unwind(AssertUnwindSafe(|| handler(&method, params)))
                .unwrap_or_else(|_| {
                    tracing::error!("rpc handler panicked in method '{method}'");
                    Err(RpcError::internal(format!("internal error in '{method}'")))
                });
            let id = id?; // notification: no reply
            Some(match result {
                Ok(v) => json!({ "jsonrpc": "2.0", "id": id, "result": v }),
                Err(e) => error_reply(id, &e),
            })
        }
        Err(e) => {
            // An invalid request gets a reply even without id; use null if the id is unusable.
            let id = id.filter(valid_id).unwrap_or(Value::Null);
            Some(error_reply(id, &e))
        }
    }
}

fn valid_id(id: &Value) -> bool {
    matches!(id, Value::Null | Value::String(_) | Value::Number(_))
}

/// Check the request envelope; returns `(method, params)`.
fn validate(obj: &mut Map<String, Value>, id: Option<&Value>) -> Result<(String, Value), RpcError> {
    if obj.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return Err(RpcError::invalid_request(
            "Invalid Request: jsonrpc must be \"2.0\"",
        ));
    }
    if id.is_some_and(|id| !valid_id(id)) {
        return Err(RpcError::invalid_request("Invalid Request: bad id"));
    }
    let method = match obj.remove("method") {
        Some(Value::String(m)) => m,
        _ => {
            return Err(RpcError::invalid_request(
                "Invalid Request: method must be a string",
            ))
        }
    };
    let params = match obj.remove("params") {
        None => Value::Null,
        Some(p @ (Value::Object(_) | Value::Array(_))) => p,
        Some(_) => {
            return Err(RpcError::invalid_request(
                "Invalid Request: params must be an object or array",
            ))
        }
    };
    Ok((method, params))
}

/// Reader that enforces an overall deadline across reads.
struct DeadlineReader<'a> {
    stream: &'a UnixStream,
    deadline: Instant,
}

impl Read for DeadlineReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let remaining = self.deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "deadline reached"));
        }
        self.stream.set_read_timeout(Some(remaining))?;
        let mut s = self.stream;
        s.read(buf)
    }
}

/// Call `method` on the kiln listening at `path` and return its `result`.
///
/// `timeout` bounds the whole exchange (connect excluded; unix connects do not block).
/// Errors are human-readable: `"rpc error -32602: volume 'x' not found"` for a server error,
/// ``"cannot connect to /path (is `kiln serve` running?)"`` when nothing listens there.
pub fn call(
    path: &Path,
    method: &str,
    params: Option<serde_json::Value>,
    timeout: Duration,
) -> Result<serde_json::Value, String> {
    let stream = UnixStream::connect(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
            format!(
                "cannot connect to {} (is `kiln serve` running?)",
                path.display()
            )
        }
        _ => format!("cannot connect to {}: {e}", path.display()),
    })?;
    let timeout = timeout.max(Duration::from_millis(1));
    let deadline = Instant::now() + timeout;
    let timed_out = || {
        format!(
            "timed out after {timeout:?} waiting for {method} on {}",
            path.display()
        )
    };

    let mut request = json!({ "jsonrpc": "2.0", "id": 1, "method": method });
    if let Some(p) = params {
        request["params"] = p;
    }
    let body = serde_json::to_vec(&request).map_err(|e| format!("cannot encode request: {e}"))?;
    stream
        .set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    (&stream).write_all(&body).map_err(|e| match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => timed_out(),
        _ => format!("cannot send request to {}: {e}", path.display()),
    })?;

    let reader = BufReader::new(DeadlineReader {
        stream: &stream,
        deadline,
    });
    let reply = match serde_json::Deserializer::from_reader(reader)
        .into_iter::<Value>()
        .next()
    {
        Some(Ok(v)) => v,
        None => {
            return Err(format!(
                "{} closed the connection without replying",
                path.display()
            ))
        }
        Some(Err(e)) if e.is_io() => {
            let timed = Instant::now() >= deadline
                || matches!(
                    e.io_error_kind(),
                    Some(io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock)
                );
            return Err(if timed {
                timed_out()
            } else {
                format!("rpc read failed: {e}")
            });
        }
        Some(Err(e)) if e.is_eof() => {
            return Err(format!(
                "{} closed the connection mid-reply",
                path.display()
            ))
        }
        Some(Err(e)) => return Err(format!("malformed reply from server: {e}")),
    };
    parse_reply(reply)
}

fn parse_reply(mut reply: Value) -> Result<Value, String> {
    let Some(obj) = reply.as_object_mut() else {
        return Err(format!("malformed reply from server: {reply}"));
    };
    if let Some(err) = obj.get("error") {
        let code = err
            .get("code")
            .and_then(Value::as_i64)
            .unwrap_or(RpcError::INTERNAL_ERROR);
        let message = err
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or("(no message)");
        return Err(RpcError::new(code, message).to_string());
    }
    if obj.get("id") != Some(&json!(1)) {
        return Err(format!("reply id mismatch: {reply}"));
    }
    obj.remove("result")
        .ok_or_else(|| format!("malformed reply from server: {reply}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            static N: AtomicU64 = AtomicU64::new(0);
            let n = N.fetch_add(1, Ordering::Relaxed);
            let p = std::env::temp_dir().join(format!("kiln-rpc-{tag}-{}-{n}", std::process::id()));
            let _ = fs::remove_dir_all(&p);
            fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    const T: Duration = Duration::from_secs(5);

    fn handler() -> Handler {
        Arc::new(|method: &str, params: Value| match method {
            "echo" => Ok(params),
            "get_volume" => {
                let name = params.get("name").and_then(Value::as_str).unwrap_or("");
                Err(RpcError::invalid_params(format!(
                    "volume '{name}' not found"
                )))
            }
            "boom" => panic!("handler bug"),
            other => Err(RpcError::method_not_found(other)),
        })
    }

    fn start(tag: &str) -> (TempDir, RpcServer, PathBuf) {
        let dir = TempDir::new(tag);
        let path = dir.0.join("kiln.sock");
        let srv = RpcServer::start(&path, handler()).unwrap();
        (dir, srv, path)
    }

    /// Read JSON values from a raw connection until `n` have arrived.
    fn read_values(s: &UnixStream, n: usize) -> Vec<Value> {
        s.set_read_timeout(Some(T)).unwrap();
        serde_json::Deserializer::from_reader(BufReader::new(s))
            .into_iter::<Value>()
            .take(n)
            .map(Result::unwrap)
            .collect()
    }

    #[test]
    fn call_success_and_errors() {
        let (_dir, srv, path) = start("call");
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(fs::metadata(&path).unwrap().file_type().is_socket());

        let v = call(&path, "echo", Some(json!({"a": [1, 2]})), T).unwrap();
        assert_eq!(v, json!({"a": [1, 2]}));
        assert_eq!(call(&path, "echo", None, T).unwrap(), Value::Null);

        let e = call(&path, "nope", None, T).unwrap_err();
        assert_eq!(e, "rpc error -32601: Method not found: nope");
        let e = call(&path, "get_volume", Some(json!({"name": "x"})), T).unwrap_err();
        assert_eq!(e, "rpc error -32602: volume 'x' not found");
        let e = call(&path, "boom", None, T).unwrap_err();
        assert!(e.starts_with("rpc error -32603: "), "{e}");
        // Still serving after a handler panic.
        assert_eq!(
            call(&path, "echo", Some(json!([7])), T).unwrap(),
            json!([7])
        );
        drop(srv);
        assert!(!path.exists(), "socket file removed on drop");
        let e = call(&path, "echo", None, T).unwrap_err();
        assert_eq!(
            e,
            format!(
                "cannot connect to {} (is `kiln serve` running?)",
                path.display()
            )
        );
    }

    #[test]
    fn back_to_back_requests_without_newline() {
        let (_dir, _srv, path) = start("b2b");
        let mut s = UnixStream::connect(&path).unwrap();
        // SPDK style: objects back to back, no separator, then a newline-delimited one and a
        // notification that must produce no reply.
        let wire = concat!(
            r#"{"jsonrpc":"2.0","id":1,"method":"echo","params":[1]}"#,
            r#"{"jsonrpc":"2.0","id":"two","method":"echo","params":{"x":2}}"#,
            "\n",
            r#"{"jsonrpc":"2.0","method":"echo","params":[0]}"#,
            "\n  ",
            r#"{"jsonrpc":"2.0","id":3,"method":"nope"}"#,
        );
        s.write_all(wire.as_bytes()).unwrap();
        let got = read_values(&s, 3);
        assert_eq!(got[0], json!({"jsonrpc":"2.0","id":1,"result":[1]}));
        assert_eq!(got[1], json!({"jsonrpc":"2.0","id":"two","result":{"x":2}}));
        assert_eq!(got[2]["id"], json!(3));
        assert_eq!(got[2]["error"]["code"], json!(-32601));

        // A single request with no trailing newline gets its reply before more data arrives.
        s.write_all(br#"{"jsonrpc":"2.0","id":4,"method":"echo","params":[4]}"#)
            .unwrap();
        assert_eq!(read_values(&s, 1)[0]["result"], json!([4]));
    }

    #[test]
    fn batch_requests() {
        let (_dir, _srv, path) = start("batch");
        let s = UnixStream::connect(&path).unwrap();
        (&s).write_all(
            br#"[{"jsonrpc":"2.0","id":1,"method":"echo","params":["a"]},
                {"jsonrpc":"2.0","method":"echo","params":["notify"]},
                {"jsonrpc":"2.0","id":2,"method":"get_volume","params":{"name":"v"}},
                {"jsonrpc":"1.0","id":3,"method":"echo"},
                42]"#,
        )
        .unwrap();
        (&s).write_all(br#"[]"#).unwrap();
        (&s).write_all(br#"[{"jsonrpc":"2.0","method":"echo"}]"#)
            .unwrap(); // all notifications
        (&s).write_all(br#"{"jsonrpc":"2.0","id":9,"method":"echo","params":"bad"}"#)
            .unwrap();
        let got = read_values(&s, 3);
        let batch = got[0].as_array().unwrap();
        assert_eq!(batch.len(), 4);
        assert_eq!(batch[0], json!({"jsonrpc":"2.0","id":1,"result":["a"]}));
        assert_eq!(batch[1]["error"]["code"], json!(-32602));
        assert_eq!(batch[1]["id"], json!(2));
        assert_eq!(batch[2]["error"]["code"], json!(-32600));
        assert_eq!(batch[2]["id"], json!(3));
        assert_eq!(batch[3]["error"]["code"], json!(-32600));
        assert_eq!(batch[3]["id"], Value::Null);
        assert_eq!(got[1]["error"]["code"], json!(-32600)); // empty batch
        assert_eq!(got[2]["error"]["code"], json!(-32600)); // the notification batch was silent
        assert_eq!(got[2]["id"], json!(9));
    }

    #[test]
    fn malformed_json_closes_only_that_connection() {
        let (_dir, _srv, path) = start("malformed");
        let other = UnixStream::connect(&path).unwrap();
        let bad = UnixStream::connect(&path).unwrap();
        (&bad)
            .write_all(br#"{"jsonrpc":"2.0","id":1,"method":"echo"}{"jsonrpc": oops}"#)
            .unwrap();
        let got = read_values(&bad, 2);
        assert_eq!(got[0]["id"], json!(1));
        assert_eq!(got[1]["error"]["code"], json!(-32700));
        assert_eq!(got[1]["id"], Value::Null);
        let mut rest = Vec::new();
        (&bad).read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "connection closed after parse error");

        (&other)
            .write_all(br#"{"jsonrpc":"2.0","id":5,"method":"echo","params":[5]}"#)
            .unwrap();
        assert_eq!(read_values(&other, 1)[0]["result"], json!([5]));
        assert_eq!(
            call(&path, "echo", Some(json!([6])), T).unwrap(),
            json!([6])
        );
    }

    #[test]
    fn oversized_request_rejected() {
        let (_dir, _srv, path) = start("big");
        let s = UnixStream::connect(&path).unwrap();
        let writer = s.try_clone().unwrap();
        let t = std::thread::spawn(move || {
            let mut w = &writer;
            let _ = w.write_all(b"[\"");
            let chunk = vec![b'a'; 1 << 20];
            for _ in 0..17 {
                if w.write_all(&chunk).is_err() {
                    break;
                }
            }
        });
        let got = read_values(&s, 1);
        assert_eq!(got[0]["error"]["code"], json!(-32600));
        t.join().unwrap();
        assert_eq!(call(&path, "echo", None, T).unwrap(), Value::Null);
    }

    #[test]
    fn stale_socket_is_replaced_live_one_is_not() {
        let dir = TempDir::new("stale");
        let path = dir.0.join("kiln.sock");
        // A bound-then-dropped listener leaves a socket file nobody listens on.
        drop(UnixListener::bind(&path).unwrap());
        assert!(fs::symlink_metadata(&path).unwrap().file_type().is_socket());
        let mut srv = RpcServer::start(&path, handler()).unwrap();
        assert_eq!(
            call(&path, "echo", Some(json!([1])), T).unwrap(),
            json!([1])
        );

        let err = RpcServer::start(&path, handler()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        assert!(err.to_string().contains("another kiln is running"), "{err}");
        assert_eq!(
            call(&path, "echo", Some(json!([2])), T).unwrap(),
            json!([2])
        );
        srv.stop();
        srv.stop();
        assert!(!path.exists());

        fs::write(&path, b"not a socket").unwrap();
        let err = RpcServer::start(&path, handler()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read(&path).unwrap(), b"not a socket");
    }

    #[test]
    fn stop_closes_open_connections_and_timeouts_work() {
        let (_dir, mut srv, path) = start("stop");
        let idle = UnixStream::connect(&path).unwrap();
        // Make sure the connection has been accepted before stopping.
        (&idle)
            .write_all(br#"{"jsonrpc":"2.0","id":1,"method":"echo"}"#)
            .unwrap();
        assert_eq!(read_values(&idle, 1)[0]["id"], json!(1));
        srv.stop();
        let mut rest = Vec::new();
        idle.set_read_timeout(Some(T)).unwrap();
        (&idle).read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());

        // A server that never replies makes `call` time out.
        let silent = UnixListener::bind(&path).unwrap();
        let e = call(&path, "echo", None, Duration::from_millis(200)).unwrap_err();
        assert!(e.starts_with("timed out after"), "{e}");
        drop(silent);
    }
}
