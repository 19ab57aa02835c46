//! Shared helpers for the end-to-end tests: temp dirs, free ports, a `kiln serve` guard that
//! writes its own config and is killed on drop, readiness polling over the RPC socket, fio and
//! metrics helpers, and `require_tool`.
//!
//! Every server gets its own directory, ports and unix sockets, so tests can run in parallel.
#![allow(dead_code)]

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod s3;

/// The binary under test.
pub const KILN: &str = env!("CARGO_BIN_EXE_kiln");

/// The current test's name (libtest names each test thread after its test).
pub fn test_name() -> String {
    std::thread::current()
        .name()
        .unwrap_or("unknown-test")
        .to_string()
}

fn on_path(tool: &str) -> bool {
    let Some(path) = std::env::var_os("PATH") else {
        return false;
    };
    std::env::split_paths(&path).any(|d| {
        let p = d.join(tool);
        std::fs::metadata(&p)
            .map(|m| {
                use std::os::unix::fs::PermissionsExt;
                m.is_file() && m.permissions().mode() & 0o111 != 0
            })
            .unwrap_or(false)
    })
}

/// Returns true if `tool` is on PATH. If not: panics under `CI=true`, otherwise prints a loud
/// `SKIPPED: <test> needs <tool>` line to stderr and returns false (the test should return).
pub fn require_tool(tool: &str) -> bool {
    require(on_path(tool), tool, "which is not on PATH")
}

/// A missing prerequisite: panics under `CI=true`, otherwise prints a loud SKIPPED line and
/// returns false.
fn missing(what: &str, why: &str) -> bool {
    require(false, what, why)
}

/// `require_tool` for anything else a test needs (a built library, prepared headers):
/// true if `present`; otherwise panics under `CI=true`, or prints a loud
/// `SKIPPED: <test> needs <what>` line (with `why`) and returns false.
pub fn require(present: bool, what: &str, why: &str) -> bool {
    if present {
        return true;
    }
    let test = test_name();
    if std::env::var("CI").map(|v| v == "true").unwrap_or(false) {
        panic!("{test} needs {what}, {why} (CI=true: missing tools are failures)");
    }
    eprintln!("\n**********\nSKIPPED: {test} needs {what}, {why}\n**********\n");
    false
}

/// The QEMU guest lab's directory (`LAB_DIR`, default `target/lab`) if `ci/lab/prepare.sh` has
/// prepared it; otherwise `None` after [`require_tool`]'s treatment (panic under `CI=true`,
/// SKIPPED line elsewhere).
pub fn require_lab() -> Option<PathBuf> {
    let dir = match std::env::var_os("LAB_DIR") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("target/lab"),
    };
    if dir.join("ready").is_file() {
        return Some(dir);
    }
    let why = format!("{} is not prepared: run ci/lab/prepare.sh", dir.display());
    missing("the QEMU guest lab", &why);
    None
}

/// Checks several tools; false (after printing SKIPPED lines) if any is missing.
pub fn require_tools(tools: &[&str]) -> bool {
    // Check every tool (no short-circuit) so all missing ones are reported.
    tools.iter().filter(|t| !require_tool(t)).count() == 0
}

/// A TCP port that was free a moment ago, never handed out twice by this process.
pub fn free_port() -> u16 {
    static USED: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    loop {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = l.local_addr().unwrap().port();
        let mut used = USED.lock().unwrap();
        if used.get_or_insert_with(HashSet::new).insert(port) {
            return port;
        }
    }
}

/// A small deterministic PRNG (splitmix64) so failures can be replayed from a printed seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `lo..hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo).max(1)
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// A seed from the environment variable `var` or from the clock.
pub fn seed_from_env(var: &str) -> u64 {
    match std::env::var(var) {
        Ok(s) => s
            .parse()
            .unwrap_or_else(|_| panic!("{var}={s} is not a u64")),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    }
}

/// A temporary directory, removed on drop unless the test is failing (then kept and printed).
pub struct TempDir {
    pub path: PathBuf,
}

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        // Short: unix socket paths must stay under 108 bytes.
        let path = std::env::temp_dir().join(format!(
            "kiln-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir { path }
    }
    pub fn join(&self, p: &str) -> PathBuf {
        self.path.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::thread::panicking() || std::env::var_os("KILN_TEST_KEEP").is_some() {
            eprintln!("kept test directory {}", self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Sizes of a test server's tiers and volume.
#[derive(Clone, Debug)]
pub struct Opts {
    /// The fast tier's file and capacity (includes the 64 MiB metadata region).
    pub fast: &'static str,
    pub capacity: &'static str,
    pub volume: &'static str,
    /// Extra TOML appended verbatim (e.g. a `[reactor]` override must then replace `reactor`).
    pub reactor: String,
    /// The fast tier's device spec instead of a plain file; `{d}` is the test directory.
    pub fast_device: Option<String>,
    /// Extra keys of the `[nbd]` section (e.g. `tls = "required"`); `{d}` is the test directory.
    pub nbd_extra: String,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            fast: "256MiB",
            capacity: "1GiB",
            volume: "512MiB",
            reactor: default_reactor(),
            fast_device: None,
            nbd_extra: String::new(),
        }
    }
}

/// Spreads servers of concurrently running tests over the first two cores.
fn default_reactor() -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let core = N.fetch_add(1, Ordering::Relaxed) % cores.min(2);
    format!("[reactor]\ncores = [{core}]\npoll_mode = \"adaptive\"\n")
}

/// Parses "512MiB"-style sizes used in `Opts`.
pub fn size_bytes(s: &str) -> u64 {
    let (num, mult) = if let Some(n) = s.strip_suffix("GiB") {
        (n, 1u64 << 30)
    } else if let Some(n) = s.strip_suffix("MiB") {
        (n, 1u64 << 20)
    } else {
        (s, 1)
    };
    num.parse::<u64>().expect("size") * mult
}

/// Strips ANSI colour escapes from log text.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// A running (or stopped) `kiln serve` in its own directory. Killed with SIGKILL on drop.
pub struct Kiln {
    pub config: PathBuf,
    pub log: PathBuf,
    pub rpc_sock: PathBuf,
    pub nbd_sock: PathBuf,
    pub tcp_port: u16,
    pub metrics_port: u16,
    pub volume_size: u64,
    pub opts: Opts,
    child: Option<Child>,
    /// Dropped last (after the server is dead).
    pub dir: TempDir,
}

impl Kiln {
    /// Writes a config into a fresh temp dir and starts the server; waits until it answers RPC.
    pub fn start(tag: &str, opts: Opts) -> Kiln {
        let mut k = Kiln::configure(tag, opts);
        k.spawn();
        k
    }

    /// Writes the config without starting.
    pub fn configure(tag: &str, opts: Opts) -> Kiln {
        let dir = TempDir::new(tag);
        let tcp_port = free_port();
        let metrics_port = free_port();
        let d = dir.path.display().to_string();
        let fast_device = match &opts.fast_device {
            Some(spec) => spec.replace("{d}", &d),
            None => format!("file:{d}/fast.img?size={}", opts.fast),
        };
        let toml = format!(
            r#"# written by {test}
[[tier]]
name = "fast"
device = "{fast_device}"
capacity = "{fast}"
cost_per_gib_month = 0.10
read_latency_us = 100
write_latency_us = 100
bandwidth_mib_s = 2000

[[tier]]
name = "capacity"
device = "file:{d}/capacity.img?size={cap}"
capacity = "{cap}"
cost_per_gib_month = 0.02
read_latency_us = 2000
write_latency_us = 2000
bandwidth_mib_s = 200

[[volume]]
name = "vol0"
size = "{vol}"

[nbd]
listen = ["127.0.0.1:{tcp_port}", "unix:{d}/nbd.sock"]
{nbd_extra}

[rpc]
socket = "{d}/kiln.sock"

[metrics]
listen = "127.0.0.1:{metrics_port}"

{reactor}"#,
            test = test_name(),
            fast = opts.fast,
            cap = opts.capacity,
            vol = opts.volume,
            reactor = opts.reactor,
            nbd_extra = opts.nbd_extra.replace("{d}", &d),
        );
        let config = dir.join("kiln.toml");
        std::fs::write(&config, toml).unwrap();
        Kiln {
            config,
            log: dir.join("kiln.log"),
            rpc_sock: dir.join("kiln.sock"),
            nbd_sock: dir.join("nbd.sock"),
            tcp_port,
            metrics_port,
            volume_size: size_bytes(opts.volume),
            opts,
            child: None,
            dir,
        }
    }

    /// Starts the server (appending to its log) and waits for RPC readiness.
    pub fn spawn(&mut self) {
        self.spawn_env(&[]);
        self.wait_ready(Duration::from_secs(60));
    }

    /// Starts the server with extra environment variables; does not wait for readiness.
    pub fn spawn_env(&mut self, env: &[(&str, &str)]) {
        assert!(self.child.is_none(), "server already running");
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        writeln!(&log, "=== test harness: starting kiln serve").unwrap();
        let child = Command::new(KILN)
            .arg("serve")
            .arg("--config")
            .arg(&self.config)
            .current_dir(&self.dir.path)
            .env("NO_COLOR", "1")
            .env("KILN_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn kiln serve");
        self.child = Some(child);
    }

    /// Waits until the server answers RPC (Ok) or exits (Err with its status, reaped).
    pub fn ready_or_exit(&mut self, limit: Duration) -> Result<(), ExitStatus> {
        let t0 = Instant::now();
        loop {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                return Err(st);
            }
            let out = Command::new(KILN)
                .args(["rpc", "kiln_get_version", "--timeout", "2", "-s"])
                .arg(&self.rpc_sock)
                .output()
                .expect("run kiln rpc");
            if out.status.success() && String::from_utf8_lossy(&out.stdout).contains("\"kiln\"") {
                return Ok(());
            }
            assert!(
                t0.elapsed() < limit,
                "kiln serve neither ready nor exited after {limit:?}; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits (at most `limit`) for the server to exit by itself and reaps it.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let st = wait_timeout(self.child.as_mut().expect("server running"), limit)?;
        self.child = None;
        Some(st)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("server running").id()
    }

    fn wait_ready(&mut self, limit: Duration) {
        if let Err(st) = self.ready_or_exit(limit) {
            panic!(
                "kiln serve exited during startup ({st}); log:\n{}",
                self.log_text()
            );
        }
    }

    /// The server log with colours removed.
    pub fn log_text(&self) -> String {
        strip_ansi(&std::fs::read_to_string(&self.log).unwrap_or_default())
    }

    /// `kiln rpc METHOD PARAMS`; panics on failure.
    pub fn rpc(&self, method: &str, params: Option<&str>) -> Value {
        self.try_rpc(method, params)
            .unwrap_or_else(|e| panic!("kiln rpc {method} failed: {e}"))
    }

    /// `kiln rpc METHOD PARAMS`: the result, or the client's error text (for calls that are
    /// expected to fail).
    pub fn try_rpc(&self, method: &str, params: Option<&str>) -> Result<Value, String> {
        let mut cmd = Command::new(KILN);
        cmd.args(["rpc", method]);
        if let Some(p) = params {
            cmd.arg(p);
        }
        let out = cmd
            .arg("-s")
            .arg(&self.rpc_sock)
            .arg("--timeout")
            .arg("30")
            .output()
            .unwrap();
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        serde_json::from_slice(&out.stdout).map_err(|e| format!("rpc output is not JSON: {e}"))
    }

    pub fn tcp_uri(&self) -> String {
        format!("nbd://127.0.0.1:{}/vol0", self.tcp_port)
    }

    pub fn unix_uri(&self) -> String {
        format!("nbd+unix:///vol0?socket={}", self.nbd_sock.display())
    }

    /// Sends a signal to the server.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on the pid of a child we own and have not reaped.
        let rc = unsafe { libc::kill(self.pid() as libc::pid_t, sig) };
        assert_eq!(rc, 0, "kill({sig}) failed");
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait (at most `limit`) for the exit status.
    pub fn terminate(&mut self, limit: Duration) -> ExitStatus {
        self.signal(libc::SIGTERM);
        let mut c = self.child.take().unwrap();
        match wait_timeout(&mut c, limit) {
            Some(st) => st,
            None => {
                let _ = c.kill();
                let _ = c.wait();
                panic!(
                    "kiln serve did not exit within {limit:?} of SIGTERM; log:\n{}",
                    self.log_text()
                );
            }
        }
    }

    /// Scrapes `/metrics` (retrying while the endpoint comes up).
    pub fn scrape(&self) -> String {
        scrape_metrics(self.metrics_port)
    }
}

impl Drop for Kiln {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- kiln log ({}) ---\n{}",
                self.log.display(),
                self.log_text()
            );
        }
        self.kill9();
    }
}

/// Waits for a child at most `limit`; None on timeout (the child is left running).
pub fn wait_timeout(c: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let t0 = Instant::now();
    loop {
        if let Some(st) = c.try_wait().unwrap() {
            return Some(st);
        }
        if t0.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `GET /metrics` with std only; retries for up to 10 s while the endpoint starts.
pub fn scrape_metrics(port: u16) -> String {
    let t0 = Instant::now();
    loop {
        match try_scrape(port) {
            Ok(body) => return body,
            Err(e) if t0.elapsed() > Duration::from_secs(10) => {
                panic!("GET http://127.0.0.1:{port}/metrics failed: {e}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

fn try_scrape(port: u16) -> std::io::Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    match resp.split_once("\r\n\r\n") {
        Some((head, body)) if head.contains(" 200") => Ok(body.to_string()),
        _ => Err(std::io::Error::other(format!("bad response: {resp:.200}"))),
    }
}

/// The value of one exposition line whose series is exactly `series`, e.g.
/// `kiln_io_total{volume="vol0",op="write"}` (label order as the server prints it is tried,
/// then any order).
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .find(|(series, _)| {
            let Some(rest) = series.strip_prefix(name) else {
                return false;
            };
            let Some(inner) = rest.strip_prefix('{').and_then(|r| r.strip_suffix('}')) else {
                return labels.is_empty() && rest.is_empty();
            };
            let mut have: Vec<&str> = inner.split(',').collect();
            have.sort();
            let mut want: Vec<String> =
                labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
            want.sort();
            have == want
        })
        .and_then(|(_, v)| v.trim().parse().ok())
}

/// Writes acknowledged on vol0 according to `/metrics`.
pub fn writes_total(k: &Kiln) -> f64 {
    metric_value(
        &k.scrape(),
        "kiln_io_total",
        &[("volume", "vol0"), ("op", "write")],
    )
    .unwrap_or(0.0)
}

/// A finished fio run: exit status, parsed JSON (if any) and raw output.
#[derive(Debug)]
pub struct FioRun {
    pub status: ExitStatus,
    pub json: Option<Value>,
    pub stdout: String,
    pub stderr: String,
}

impl FioRun {
    pub fn job(&self) -> &Value {
        &self
            .json
            .as_ref()
            .unwrap_or_else(|| panic!("fio printed no JSON: {self:?}"))["jobs"][0]
    }
    /// `jobs[0].error`.
    pub fn job_error(&self) -> i64 {
        self.job()["error"].as_i64().unwrap_or(-1)
    }
    pub fn total_ios(&self, dir: &str) -> u64 {
        self.job()[dir]["total_ios"].as_u64().unwrap_or(0)
    }
    /// Lines of output that mention verification failures.
    pub fn verify_errors(&self) -> Vec<String> {
        let before_json = self.stdout.split("\n{").next().unwrap_or("");
        before_json
            .lines()
            .chain(self.stderr.lines())
            .filter(|l| {
                let l = l.to_ascii_lowercase();
                l.contains("verify") && (l.contains("bad") || l.contains("fail"))
                    || l.contains("crc32c")
                        && (l.contains("wanted") || l.contains("mismatch") || l.contains("bad"))
            })
            .map(str::to_string)
            .collect()
    }
    pub fn describe(&self) -> String {
        format!(
            "fio exit {}\n--- stderr ---\n{}\n--- stdout (first 4000 bytes) ---\n{:.4000}",
            self.status, self.stderr, self.stdout
        )
    }
}

/// A fio started in the background; output goes to files in `cwd`.
pub struct FioChild {
    pub child: Child,
    out: PathBuf,
    err: PathBuf,
}

/// Starts `fio --output-format=json ARGS` with `cwd` as working directory (state files land
/// there).
pub fn spawn_fio(cwd: &Path, args: &[String]) -> FioChild {
    // Jobs as threads of one process, so killing fio kills its jobs too (a forked job
    // process would outlive a SIGKILLed parent).
    spawn_fio_mode(cwd, args, true, &[])
}

/// Runs fio (jobs as threads) to completion with extra environment variables.
pub fn fio_with_env(cwd: &Path, args: &[String], env: &[(&str, &Path)], limit: Duration) -> FioRun {
    spawn_fio_mode(cwd, args, true, env).finish(limit)
}

/// Runs fio to completion with each job in its own process (fio's default; no `--thread`).
pub fn fio_processes(cwd: &Path, args: &[String], limit: Duration) -> FioRun {
    spawn_fio_mode(cwd, args, false, &[]).finish(limit)
}

fn spawn_fio_mode(cwd: &Path, args: &[String], threads: bool, env: &[(&str, &Path)]) -> FioChild {
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let out = cwd.join(format!("fio-{n}.out"));
    let err = cwd.join(format!("fio-{n}.err"));
    let child = Command::new("fio")
        .arg("--output-format=json")
        .args(threads.then_some("--thread"))
        .args(args)
        .envs(env.iter().copied())
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(File::create(&out).unwrap())
        .stderr(File::create(&err).unwrap())
        .spawn()
        .expect("spawn fio");
    FioChild { child, out, err }
}

impl FioChild {
    /// After the server was killed: fio's nbd engine sometimes keeps polling a dead
    /// connection ("nothing to poll for in state DEAD") instead of failing the job. Give it
    /// `grace` to exit, then SIGINT it (fio still writes its verify state and logs when
    /// interrupted); when it ignores SIGINT too, SIGKILL it and return None: the run
    /// left no verify state, so the caller must not count it as a verified trial. The waits
    /// are short on purpose: a spinning fio writes its error line to stderr hundreds of MB
    /// per second.
    pub fn finish_or_abandon(mut self, grace: Duration) -> Option<FioRun> {
        if wait_timeout(&mut self.child, grace).is_none() {
            eprintln!("fio still running {grace:?} after the server died: sending SIGINT");
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
            if wait_timeout(&mut self.child, Duration::from_secs(2)).is_none() {
                eprintln!("fio ignored SIGINT: killing it; this trial is inconclusive");
                let _ = self.child.kill();
                let _ = self.child.wait();
                return None;
            }
        }
        Some(self.finish(Duration::from_secs(60)))
    }

    /// Waits (at most `limit`, then kills and panics) and collects the result.
    pub fn finish(mut self, limit: Duration) -> FioRun {
        let Some(status) = wait_timeout(&mut self.child, limit) else {
            let _ = self.child.kill();
            let _ = self.child.wait();
            panic!(
                "fio did not finish within {limit:?}: {}",
                std::fs::read_to_string(&self.err).unwrap_or_default()
            );
        };
        let stdout = std::fs::read_to_string(&self.out).unwrap_or_default();
        let stderr = std::fs::read_to_string(&self.err).unwrap_or_default();
        // The nbd engine prints "fio: connected to NBD server" before the JSON document.
        let json = stdout
            .find("\n{")
            .map(|i| i + 1)
            .or_else(|| stdout.starts_with('{').then_some(0))
            .and_then(|i| serde_json::from_str(&stdout[i..]).ok());
        FioRun {
            status,
            json,
            stdout,
            stderr,
        }
    }
}

/// Runs fio to completion.
pub fn fio(cwd: &Path, args: &[String], limit: Duration) -> FioRun {
    spawn_fio(cwd, args).finish(limit)
}

/// Builds an argument vector from string slices.
pub fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

// ---------------------------------------------------------------------------------------------
// A raw NBD client (TCP or unix socket) built from `kiln::target::nbd_proto::client`.
// ---------------------------------------------------------------------------------------------

use kiln::target::nbd_proto::client::*;
use kiln::target::nbd_proto::*;

/// A byte stream the raw client can drive.
pub trait Stream: Read + Write + Send {
    fn try_clone_box(&self) -> std::io::Result<Box<dyn Stream>>;
    fn shutdown_both(&self);
}

impl Stream for TcpStream {
    fn try_clone_box(&self) -> std::io::Result<Box<dyn Stream>> {
        Ok(Box::new(self.try_clone()?))
    }
    fn shutdown_both(&self) {
        let _ = self.shutdown(std::net::Shutdown::Both);
    }
}

impl Stream for std::os::unix::net::UnixStream {
    fn try_clone_box(&self) -> std::io::Result<Box<dyn Stream>> {
        Ok(Box::new(self.try_clone()?))
    }
    fn shutdown_both(&self) {
        let _ = self.shutdown(std::net::Shutdown::Both);
    }
}

pub fn read_exact(s: &mut dyn Stream, n: usize) -> Vec<u8> {
    let mut b = vec![0; n];
    s.read_exact(&mut b).expect("read from server");
    b
}

/// An NBD connection after a fixed newstyle handshake that ended with NBD_OPT_GO.
pub struct RawClient {
    pub s: Box<dyn Stream>,
    pub structured: bool,
    pub size: u64,
    pub cookie: u64,
}

impl RawClient {
    pub fn tcp(port: u16, structured: bool) -> RawClient {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        RawClient::handshake(Box::new(s), structured)
    }

    pub fn unix(path: &Path, structured: bool) -> RawClient {
        let s = std::os::unix::net::UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        RawClient::handshake(Box::new(s), structured)
    }

    /// Greeting, client flags, optionally NBD_OPT_STRUCTURED_REPLY, then NBD_OPT_GO "vol0".
    pub fn handshake(mut s: Box<dyn Stream>, structured: bool) -> RawClient {
        let greeting = read_exact(s.as_mut(), GREETING_BYTES);
        let flags = parse_greeting(&greeting).unwrap();
        assert_ne!(flags & NBD_FLAG_FIXED_NEWSTYLE, 0);
        let mut out = Vec::new();
        push_client_flags(&mut out, flags & NBD_FLAG_NO_ZEROES != 0);
        if structured {
            push_option(&mut out, NBD_OPT_STRUCTURED_REPLY, &[]);
        }
        push_info_or_go(&mut out, NBD_OPT_GO, "vol0", &[NBD_INFO_BLOCK_SIZE]);
        s.write_all(&out).unwrap();
        let mut size = None;
        loop {
            let mut raw = read_exact(s.as_mut(), OPTION_REPLY_HEADER_BYTES);
            let len = u32::from_be_bytes(raw[16..20].try_into().unwrap()) as usize;
            raw.extend(read_exact(s.as_mut(), len));
            let (reply, used) = parse_option_reply(&raw).unwrap().expect("complete reply");
            assert_eq!(used, raw.len());
            assert_eq!(
                reply.reply_type & NBD_REP_FLAG_ERROR,
                0,
                "option {} refused: {reply:?}",
                reply.option
            );
            match (reply.option, reply.reply_type) {
                (NBD_OPT_STRUCTURED_REPLY, NBD_REP_ACK) => {}
                (NBD_OPT_GO, NBD_REP_INFO) => {
                    if let Info::Export { size_bytes, .. } = parse_info(reply.data).unwrap() {
                        size = Some(size_bytes);
                    }
                }
                (NBD_OPT_GO, NBD_REP_ACK) => break,
                other => panic!("unexpected option reply {other:?}"),
            }
        }
        RawClient {
            s,
            structured,
            size: size.expect("NBD_INFO_EXPORT"),
            cookie: 0,
        }
    }

    /// Sends one request (with its payload); returns its cookie.
    pub fn send(&mut self, kind: u16, offset: u64, length: u32, payload: &[u8]) -> u64 {
        self.cookie += 1;
        send_request(self.s.as_mut(), kind, self.cookie, offset, length, payload)
            .expect("send request");
        self.cookie
    }

    /// Reads one reply to a READ of `length` bytes: Ok(data) or Err(NBD errno).
    pub fn read_reply(&mut self, cookie: u64, offset: u64, length: u32) -> Result<Vec<u8>, u32> {
        if !self.structured {
            let hdr = read_exact(self.s.as_mut(), SIMPLE_REPLY_BYTES);
            let (err, c) = parse_simple_reply(hdr[..].try_into().unwrap()).unwrap();
            assert_eq!(c, cookie, "reply cookie");
            if err != 0 {
                return Err(err);
            }
            return Ok(read_exact(self.s.as_mut(), length as usize));
        }
        let mut data = vec![0u8; length as usize];
        let mut error = 0;
        loop {
            let hdr = read_exact(self.s.as_mut(), STRUCTURED_CHUNK_HEADER_BYTES);
            let h = parse_structured_chunk_header(hdr[..].try_into().unwrap()).unwrap();
            assert_eq!(h.cookie, cookie, "chunk cookie");
            let body = read_exact(self.s.as_mut(), h.length as usize);
            let at = || (u64::from_be_bytes(body[..8].try_into().unwrap()) - offset) as usize;
            match h.kind {
                NBD_REPLY_TYPE_OFFSET_DATA => {
                    data[at()..at() + body.len() - 8].copy_from_slice(&body[8..]);
                }
                NBD_REPLY_TYPE_OFFSET_HOLE => {
                    let n = u32::from_be_bytes(body[8..12].try_into().unwrap()) as usize;
                    data[at()..at() + n].fill(0);
                }
                NBD_REPLY_TYPE_NONE => {}
                k if k & NBD_REPLY_TYPE_ERROR_BIT != 0 => {
                    error = u32::from_be_bytes(body[..4].try_into().unwrap());
                }
                k => panic!("unexpected chunk type {k}"),
            }
            if h.flags & NBD_REPLY_FLAG_DONE != 0 {
                break;
            }
        }
        if error != 0 {
            Err(error)
        } else {
            Ok(data)
        }
    }

    pub fn read(&mut self, offset: u64, length: u32) -> Result<Vec<u8>, u32> {
        let c = self.send(NBD_CMD_READ, offset, length, &[]);
        self.read_reply(c, offset, length)
    }

    /// A WRITE; returns the NBD error (0 on success).
    pub fn write(&mut self, offset: u64, data: &[u8]) -> u32 {
        let c = self.send(NBD_CMD_WRITE, offset, data.len() as u32, data);
        let hdr = read_exact(self.s.as_mut(), SIMPLE_REPLY_BYTES);
        let (err, rc) = parse_simple_reply(hdr[..].try_into().unwrap()).unwrap();
        assert_eq!(rc, c);
        err
    }

    /// NBD_CMD_DISC, then expects the server to close without a reply.
    pub fn disconnect(mut self) {
        self.send(NBD_CMD_DISC, 0, 0, &[]);
        let mut b = [0u8; 1];
        assert_eq!(
            self.s.read(&mut b).unwrap_or(0),
            0,
            "no reply to NBD_CMD_DISC"
        );
    }
}

/// Encodes and sends one request header plus payload.
pub fn send_request(
    s: &mut dyn Stream,
    kind: u16,
    cookie: u64,
    offset: u64,
    length: u32,
    payload: &[u8],
) -> std::io::Result<()> {
    let req = Request {
        flags: 0,
        kind,
        cookie,
        offset,
        length,
    };
    let mut hdr = [0; REQUEST_HEADER_BYTES];
    req.encode(&mut hdr);
    s.write_all(&hdr)?;
    s.write_all(payload)
}

/// Offsets of the writes fio saw complete, from its completion log (`--write_lat_log
/// --log_offset=1`: `time, latency, ddir, bs, offset, prio` per line).
pub fn acked_offsets(path: &std::path::Path) -> HashSet<u64> {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("fio completion log {}: {e}", path.display()));
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(',').map(str::trim).collect();
            (f.len() >= 5 && f[2] == "1").then(|| f[4].parse().unwrap())
        })
        .collect()
}

/// Block offsets fio reported as failing verification.
pub fn bad_offsets(stderr: &str) -> Vec<u64> {
    stderr
        .lines()
        .filter_map(|l| {
            let rest = l.split_once("requested block: offset=")?.1;
            let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
            digits.parse().ok()
        })
        .collect()
}
