//! End-to-end tests of `kiln serve` over NBD with real clients (nbdinfo, qemu-img, fio, curl)
//! and a raw protocol client built from `kiln::target::nbd_proto::client`.
//!
//! Each test starts its own server in its own temp dir with its own ports and sockets.
//! Missing tools skip the test loudly, or fail it under `CI=true`.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use kiln::target::nbd_proto::client::*;
use kiln::target::nbd_proto::*;
use serde_json::Value;

const MIB: u64 = 1 << 20;

fn run_ok(cmd: &mut Command) -> std::process::Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn nbdinfo_size(uri: &str) -> u64 {
    let out = run_ok(Command::new("nbdinfo").arg("--json").arg(uri));
    let v: Value = serde_json::from_slice(&out.stdout).expect("nbdinfo --json output");
    v["exports"][0]["export-size"]
        .as_u64()
        .unwrap_or_else(|| panic!("no export-size in {v}"))
}

#[test]
fn nbdinfo_shows_configured_size() {
    if !require_tool("nbdinfo") {
        return;
    }
    let k = Kiln::start(
        "info",
        Opts {
            volume: "768MiB",
            ..Opts::default()
        },
    );
    assert_eq!(nbdinfo_size(&k.tcp_uri()), 768 * MIB);
    assert_eq!(nbdinfo_size(&k.unix_uri()), 768 * MIB);
}

#[test]
fn qemu_img_roundtrip_64mib() {
    if !require_tool("qemu-img") {
        return;
    }
    let k = Kiln::start(
        "qemu",
        Opts {
            volume: "256MiB",
            ..Opts::default()
        },
    );
    let seed = seed_from_env("KILN_TEST_SEED");
    eprintln!("qemu_img_roundtrip_64mib: seed {seed}");
    let mut data = vec![0u8; 64 * MIB as usize];
    Rng::new(seed).fill(&mut data);
    let src = k.dir.join("in.raw");
    let dst = k.dir.join("out.raw");
    std::fs::write(&src, &data).unwrap();
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&src)
            .arg(k.tcp_uri()),
    );
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw"])
            .arg(k.tcp_uri())
            .arg(&dst),
    );
    let back = std::fs::read(&dst).unwrap();
    assert_eq!(back.len() as u64, k.volume_size, "exported image size");
    if let Some(i) = (0..data.len()).find(|&i| data[i] != back[i]) {
        panic!("first differing byte at offset {i}");
    }
}

fn fio_randwrite_verify(k: &Kiln, size: &str, extra: &[&str]) -> FioRun {
    let mut a = args(&[
        "--name=verify",
        "--ioengine=nbd",
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=32",
        "--verify=crc32c",
        "--do_verify=1",
    ]);
    a.push(format!("--uri={}", k.unix_uri()));
    a.push(format!("--size={size}"));
    a.extend(extra.iter().map(|s| s.to_string()));
    fio(&k.dir.path, &a, Duration::from_secs(300))
}

#[test]
fn fio_randwrite_crc32c_verify_over_unix_socket() {
    if !require_tool("fio") {
        return;
    }
    let k = Kiln::start("fio", Opts::default());
    let r = fio_randwrite_verify(&k, "256m", &[]);
    assert!(r.status.success(), "{}", r.describe());
    assert_eq!(r.job_error(), 0, "{}", r.describe());
    assert!(r.verify_errors().is_empty(), "{}", r.describe());
    assert_eq!(r.total_ios("write"), 65536, "{}", r.describe());
    assert_eq!(
        r.total_ios("read"),
        65536,
        "every block verified: {}",
        r.describe()
    );
}

#[test]
fn volume_map_and_write_metrics_grow() {
    if !require_tools(&["fio", "curl"]) {
        return;
    }
    let k = Kiln::start("map", Opts::default());
    let curl_writes = |k: &Kiln| -> f64 {
        let out = run_ok(
            Command::new("curl")
                .args(["-sS", "--max-time", "10"])
                .arg(format!("http://127.0.0.1:{}/metrics", k.metrics_port)),
        );
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        metric_value(
            &text,
            "kiln_io_total",
            &[("volume", "vol0"), ("op", "write")],
        )
        .unwrap_or_else(|| panic!("no kiln_io_total for vol0 writes in:\n{text:.3000}"))
    };
    // The metrics endpoint starts just after RPC; wait for it through the std scraper.
    let _ = k.scrape();
    let before = curl_writes(&k);
    let map0 = k.rpc("volume_get_map", Some(r#"{"volume":"vol0"}"#));
    let mapped0 = mapped_chunks(&map0);
    assert!(
        mapped0.is_empty(),
        "fresh volume has mapped chunks: {mapped0:?}"
    );

    let mut a = args(&[
        "--name=metrics",
        "--ioengine=nbd",
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=16",
        "--size=64m",
        "--time_based",
        "--runtime=3",
    ]);
    a.push(format!("--uri={}", k.unix_uri()));
    let f = spawn_fio(&k.dir.path, &a);
    // Scrape while fio runs: the counter must grow between two scrapes.
    let t0 = Instant::now();
    let mut seen = vec![before];
    while t0.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(400));
        seen.push(curl_writes(&k));
    }
    let r = f.finish(Duration::from_secs(60));
    assert!(r.status.success(), "{}", r.describe());
    let after = curl_writes(&k);
    seen.push(after);
    assert!(
        seen.windows(2).all(|w| w[1] >= w[0]),
        "write counter went backwards: {seen:?}"
    );
    assert!(
        seen[1..seen.len() - 1].windows(2).any(|w| w[1] > w[0]),
        "write counter did not grow between two scrapes during the run: {seen:?}"
    );
    let fio_writes = r.total_ios("write") as f64;
    assert!(
        after - before >= fio_writes,
        "metrics count {} writes, fio completed {fio_writes}",
        after - before
    );

    let map = k.rpc("volume_get_map", Some(r#"{"volume":"vol0"}"#));
    let chunks = mapped_chunks(&map);
    assert!(!chunks.is_empty(), "no chunks mapped after writes: {map}");
    let mapped: u64 = chunks.iter().map(|(_, len, _)| len).sum();
    // fio's random map visits every block of the 64 MiB before repeating one, so after a few
    // thousand writes every 1 MiB chunk has been written.
    if fio_writes >= 4000.0 {
        assert!(
            mapped >= 64 * MIB,
            "fio wrote all over 64 MiB but only {mapped} bytes are mapped: {map}"
        );
    }
    for (_, _, tier) in &chunks {
        assert!(
            tier == "fast" || tier == "capacity",
            "chunk on unknown tier {tier}"
        );
    }
}

/// (offset, length, tier) of every mapped run.
fn mapped_chunks(map: &Value) -> Vec<(u64, u64, String)> {
    map["chunks"]
        .as_array()
        .unwrap_or_else(|| panic!("no chunks array in {map}"))
        .iter()
        .filter_map(|c| {
            let tier = c["tier"].as_str()?;
            Some((
                c["offset"].as_u64().unwrap(),
                c["length"].as_u64().unwrap(),
                tier.to_string(),
            ))
        })
        .collect()
}

const TIER_TEMPLATE: &str = r#"
[[tier]]
name = "fast"
device = "DEVICE"
capacity = "CAPACITY"
cost_per_gib_month = 0.10
read_latency_us = 100
write_latency_us = 100
bandwidth_mib_s = 2000
EXTRA
"#;

#[test]
fn bad_configs_give_one_line_errors() {
    let dir = TempDir::new("badcfg");
    let d = dir.path.display().to_string();
    let tail = format!(
        "\n[[volume]]\nname = \"vol0\"\nsize = \"16MiB\"\n\n[nbd]\nlisten = [\"unix:{d}/nbd.sock\"]\n\n[rpc]\nsocket = \"{d}/kiln.sock\"\n"
    );
    let tier = |device: &str, capacity: &str, extra: &str| {
        TIER_TEMPLATE
            .replace("DEVICE", device)
            .replace("CAPACITY", capacity)
            .replace("EXTRA", extra)
    };
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        (
            "unknown-key",
            tier(
                &format!("file:{d}/a.img?size=128MiB"),
                "128MiB",
                "colour = \"red\"",
            ) + &tail,
            vec!["unknown-key.toml", "unknown field `colour`"],
        ),
        (
            "too-big",
            tier(&format!("file:{d}/small.img?size=64MiB"), "128MiB", "") + &tail,
            vec!["too-big.toml", "tier[0].capacity", "larger than the device"],
        ),
        (
            "no-tier",
            tail.clone(),
            vec!["no-tier.toml", "at least one [[tier]]"],
        ),
    ];
    for (name, text, needles) in cases {
        let path = dir.join(&format!("{name}.toml"));
        std::fs::write(&path, &text).unwrap();
        for check in [false, true] {
            let mut cmd = Command::new(KILN);
            cmd.arg("serve").arg("--config").arg(&path);
            if check {
                cmd.arg("--check");
            }
            let out = cmd.env("NO_COLOR", "1").output().unwrap();
            let stderr = strip_ansi(&String::from_utf8_lossy(&out.stderr));
            let what = format!(
                "{name} (--check: {check}): exit {}, stderr:\n{stderr}",
                out.status
            );
            assert!(!out.status.success(), "{what}");
            let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
            assert_eq!(lines.len(), 1, "want exactly one line: {what}");
            for n in &needles {
                assert!(lines[0].contains(n), "missing {n:?}: {what}");
            }
            assert!(
                !dir.join("kiln.sock").exists(),
                "{name}: the server started anyway"
            );
        }
    }
    // The same tier with a fitting capacity is valid.
    let ok = dir.join("ok.toml");
    std::fs::write(
        &ok,
        tier(&format!("file:{d}/ok.img?size=128MiB"), "128MiB", "") + &tail,
    )
    .unwrap();
    let out = Command::new(KILN)
        .args(["serve", "--check", "--config"])
        .arg(&ok)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "valid config rejected: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn read_past_end_is_einval_and_connection_survives() {
    let k = Kiln::start("pastend", Opts::default());
    let size = k.volume_size;
    let mut a = RawClient::tcp(k.tcp_port, false);
    let mut b = RawClient::tcp(k.tcp_port, true);
    assert_eq!((a.size, b.size), (size, size));

    let pattern: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
    assert_eq!(a.write(size - 4096, &pattern), 0, "write of the last block");

    // Simple replies: EINVAL, no payload, and the stream stays in sync.
    assert_eq!(a.read(size, 4096), Err(NBD_EINVAL), "read at offset = size");
    assert_eq!(
        a.read(size - 512, 4096),
        Err(NBD_EINVAL),
        "read across the end"
    );
    assert_eq!(a.read(size - 4096, 4096).unwrap(), pattern);
    // A WRITE past the end is refused too, after its payload has been consumed.
    assert_eq!(
        a.write(size, &[0xee; 4096]),
        NBD_EINVAL,
        "write at offset = size"
    );
    assert_eq!(a.read(size - 4096, 4096).unwrap(), pattern);
    // The other client is unaffected, and gets the same error as a structured chunk.
    assert_eq!(b.read(size - 4096, 4096).unwrap(), pattern);
    assert_eq!(
        b.read(size, 4096),
        Err(NBD_EINVAL),
        "structured read at size"
    );
    assert_eq!(b.read(0, 4096).unwrap(), vec![0; 4096]);
    assert_eq!(a.read(0, 512).unwrap(), vec![0; 512]);
    a.disconnect();
    assert_eq!(b.read(size - 4096, 4096).unwrap(), pattern);
    b.disconnect();
    // Refused requests are logged but do not close connections.
    let log = k.log_text();
    assert!(
        !log.contains("closing NBD connection"),
        "a connection was closed:\n{log}"
    );
}

#[test]
fn garbage_handshake_closes_only_that_connection() {
    if !require_tool("nbdinfo") {
        return;
    }
    let k = Kiln::start("garbage", Opts::default());
    let seed = seed_from_env("KILN_TEST_SEED");
    eprintln!("garbage_handshake: seed {seed}");
    let mut garbage = [0u8; 64];
    Rng::new(seed).fill(&mut garbage);

    // A well-behaved raw client connected before the garbage must keep working.
    let mut good = RawClient::tcp(k.tcp_port, false);

    let mut s = TcpStream::connect(("127.0.0.1", k.tcp_port)).unwrap();
    let peer = s.local_addr().unwrap().to_string();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    parse_greeting(&read_exact(&mut s, GREETING_BYTES)).unwrap();
    s.write_all(&garbage).unwrap();
    let mut rest = Vec::new();
    match s.read_to_end(&mut rest) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("connection not closed after garbage: {e}"),
    }
    // Fixed newstyle: a server may answer unknown options, but garbage flags or magic close it.
    assert!(
        rest.len() < 64,
        "server answered garbage with {} bytes",
        rest.len()
    );

    let log = k.log_text();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(&peer) || l.contains("closing NBD connection"))
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "want one log line about {peer}, got {lines:?}\nfull log:\n{log}"
    );
    assert!(
        lines[0].contains("protocol error") && lines[0].contains(&peer),
        "{lines:?}"
    );

    assert_eq!(nbdinfo_size(&k.tcp_uri()), k.volume_size);
    assert_eq!(good.read(0, 4096).unwrap(), vec![0; 4096]);
    good.disconnect();
}

fn fio_seq(k: &Kiln, phase: &[&str]) -> FioRun {
    let mut a = args(&[
        "--name=persist",
        "--ioengine=nbd",
        "--rw=write",
        "--bs=64k",
        "--iodepth=8",
        "--size=48m",
        "--offset=16m",
        "--verify=crc32c",
    ]);
    a.push(format!("--uri={}", k.unix_uri()));
    a.extend(phase.iter().map(|s| s.to_string()));
    fio(&k.dir.path, &a, Duration::from_secs(120))
}

#[test]
fn sigterm_is_a_clean_shutdown_and_data_survives_restart() {
    if !require_tool("fio") {
        return;
    }
    let mut k = Kiln::start("shutdown", Opts::default());
    let w = fio_seq(&k, &["--do_verify=0"]);
    assert!(w.status.success(), "{}", w.describe());
    assert_eq!(w.job_error(), 0, "{}", w.describe());
    // A client still connected at shutdown must not stop it.
    let idle = TcpStream::connect(("127.0.0.1", k.tcp_port)).unwrap();

    let st = k.terminate(Duration::from_secs(60));
    assert_eq!(st.code(), Some(0), "exit status {st}:\n{}", k.log_text());
    let log = k.log_text();
    assert!(
        log.contains("clean shutdown"),
        "no 'clean shutdown':\n{log}"
    );
    drop(idle);

    k.spawn();
    let v = fio_seq(&k, &["--verify_only"]);
    assert!(v.status.success(), "{}", v.describe());
    assert_eq!(v.job_error(), 0, "{}", v.describe());
    assert!(v.verify_errors().is_empty(), "{}", v.describe());
    assert_eq!(v.total_ios("read"), 48 * 16, "{}", v.describe());
    // The restart found a checkpoint, so nothing needed replaying.
    let log = k.log_text();
    let last = log
        .lines()
        .rev()
        .find(|l| l.contains("journal open"))
        .unwrap();
    assert!(last.contains("replayed=0"), "{last}");
}

#[test]
fn flush_trim_zeroes_and_oversized_requests() {
    let k = Kiln::start("edges", Opts::default());
    let mut c = RawClient::tcp(k.tcp_port, false);
    let simple = |c: &mut RawClient, kind: u16, offset: u64, length: u32| -> u32 {
        let cookie = c.send(kind, offset, length, &[]);
        let hdr = read_exact(c.s.as_mut(), SIMPLE_REPLY_BYTES);
        let (err, got) = parse_simple_reply(hdr[..].try_into().unwrap()).unwrap();
        assert_eq!(got, cookie);
        err
    };
    let data = vec![0x5au8; 64 << 10];
    assert_eq!(c.write(1 << 20, &data), 0);
    assert_eq!(simple(&mut c, NBD_CMD_FLUSH, 0, 0), 0, "flush");
    assert_eq!(c.read(1 << 20, 64 << 10).unwrap(), data);
    assert_eq!(
        simple(&mut c, NBD_CMD_WRITE_ZEROES, 1 << 20, 4096),
        0,
        "write zeroes"
    );
    let back = c.read(1 << 20, 8192).unwrap();
    assert!(back[..4096].iter().all(|&b| b == 0), "zeroed block");
    assert!(back[4096..].iter().all(|&b| b == 0x5a), "neighbour kept");
    assert_eq!(simple(&mut c, NBD_CMD_TRIM, 1 << 20, 64 << 10), 0, "trim");
    // Unaligned and oversized reads are refused without a payload; the stream stays in sync.
    assert_eq!(c.read(1, 512), Err(NBD_EINVAL), "unaligned read");
    assert_eq!(
        c.read(0, 2 << 20),
        Err(NBD_EOVERFLOW),
        "read above max payload"
    );
    assert_eq!(c.read(0, 4096).unwrap(), vec![0; 4096]);
    // A write above the maximum payload cannot be skipped: the server closes the connection.
    c.send(NBD_CMD_WRITE, 0, 4 << 20, &[]);
    let mut rest = Vec::new();
    let _ = c.s.read_to_end(&mut rest);
    assert!(
        rest.len() < SIMPLE_REPLY_BYTES + 1,
        "got {} bytes after an oversized write",
        rest.len()
    );
    let log = k.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("closing NBD connection") && l.contains("byte limit")),
        "{log}"
    );
    // Others still work.
    let mut d = RawClient::unix(&k.nbd_sock, true);
    assert_eq!(d.read(0, 4096).unwrap(), vec![0; 4096]);
    d.disconnect();
}

// Regression: a WRITE whose payload is still arriving when the server drains was counted
// in flight forever, so shutdown waited out the 30 s drain timeout.
#[test]
fn sigterm_with_a_half_sent_write_still_shuts_down_promptly() {
    let mut k = Kiln::start("halfwrite", Opts::default());
    let mut c = RawClient::tcp(k.tcp_port, false);
    assert_eq!(c.read(0, 4096).unwrap(), vec![0; 4096]);
    // A WRITE header announcing 64 KiB, followed by only 100 bytes of payload.
    send_request(c.s.as_mut(), NBD_CMD_WRITE, 99, 0, 64 << 10, &[7; 100]).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let t0 = Instant::now();
    let st = k.terminate(Duration::from_secs(60));
    let took = t0.elapsed();
    assert_eq!(st.code(), Some(0), "{}", k.log_text());
    assert!(k.log_text().contains("clean shutdown"), "{}", k.log_text());
    assert!(
        took < Duration::from_secs(10),
        "shutdown took {took:?} with a half-received write pending:\n{}",
        k.log_text()
    );
}

// Regression: a client leaving in the middle of a WRITE payload leaked its connection (fd,
// slot, DMA buffer, its place in `max_connections`) for the life of the server.
#[test]
fn client_disconnecting_mid_write_payload_is_cleaned_up() {
    let k = Kiln::start("midpayload", Opts::default());
    let conns = |k: &Kiln| metric_value(&k.scrape(), "kiln_nbd_connections", &[]).unwrap_or(-1.0);
    // Waits (up to 5 s; the gauge is refreshed every 500 ms) until the gauge reads `want`.
    let wait_for = |want: f64| {
        let t0 = Instant::now();
        let mut n = conns(&k);
        while n != want && t0.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(100));
            n = conns(&k);
        }
        n
    };
    let mut held = RawClient::tcp(k.tcp_port, false);
    assert_eq!(held.read(0, 4096).unwrap(), vec![0; 4096]);
    assert_eq!(wait_for(1.0), 1.0, "the gauge counts an open connection");
    for _ in 0..3 {
        let mut c = RawClient::tcp(k.tcp_port, false);
        assert_eq!(c.read(0, 4096).unwrap(), vec![0; 4096]);
        // A WRITE header announcing 64 KiB, 100 bytes of payload, then the client goes away.
        send_request(c.s.as_mut(), NBD_CMD_WRITE, 99, 0, 64 << 10, &[7; 100]).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        drop(c);
    }
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(
        wait_for(1.0),
        1.0,
        "connections whose clients left in the middle of a WRITE payload are still open"
    );
    assert_eq!(held.read(0, 4096).unwrap(), vec![0; 4096]);
    held.disconnect();
}
