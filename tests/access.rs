//! Access control with real clients: NBD over TLS (`nbdinfo`, fio's nbd engine through
//! libnbd with a CA made at test time by `openssl`), plain clients refused when TLS is
//! required, certificate errors, the NBD connection cap, and the RPC socket's mode.

mod common;

use std::io::Read;
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

fn text(o: &Output) -> String {
    format!(
        "exit {}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn openssl(dir: &Path, args: &[&str]) {
    let o = run(Command::new("openssl").current_dir(dir).args(args));
    assert!(o.status.success(), "openssl {args:?}: {}", text(&o));
}

/// A CA (`ca-cert.pem`, the name libnbd looks for in `tls-certificates=DIR`) and a server
/// certificate for 127.0.0.1/localhost signed by it (`server-cert.pem`, `server-key.pem`).
fn make_pki(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend(["-keyout", "ca-key.pem", "-out", "ca-cert.pem"]);
    ca.extend(["-days", "2", "-subj", "/CN=kiln test CA"]);
    openssl(dir, &ca);
    let mut csr = vec!["req"];
    csr.extend(ec);
    csr.extend(["-keyout", "server-key.pem", "-out", "server.csr"]);
    csr.extend(["-subj", "/CN=localhost"]);
    openssl(dir, &csr);
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName = IP:127.0.0.1, DNS:localhost\nbasicConstraints = CA:FALSE\n\
         keyUsage = digitalSignature\nextendedKeyUsage = serverAuth\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca-cert.pem",
            "-CAkey",
            "ca-key.pem",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "server.ext",
            "-out",
            "server-cert.pem",
        ],
    );
}

fn tls_opts(mode: &str) -> Opts {
    Opts {
        volume: "256MiB",
        nbd_extra: format!(
            "tls = \"{mode}\"\ntls_cert = \"{{d}}/pki/server-cert.pem\"\n\
             tls_key = \"{{d}}/pki/server-key.pem\"\n"
        ),
        ..Opts::default()
    }
}

/// `Kiln::start` with the PKI written into the server's directory first.
fn start_tls(tag: &str, mode: &str) -> Kiln {
    let mut k = Kiln::configure(tag, tls_opts(mode));
    make_pki(&k.dir.join("pki"));
    k.spawn();
    k
}

fn tls_uri(k: &Kiln) -> String {
    format!(
        "nbds://127.0.0.1:{}/vol0?tls-certificates={}",
        k.tcp_port,
        k.dir.join("pki").display()
    )
}

fn nbdinfo_json(uri: &str) -> Result<Value, String> {
    // LIBNBD_DEBUG shows the server's option error messages on stderr.
    let o = run(Command::new("nbdinfo")
        .arg("--json")
        .arg(uri)
        .env("LIBNBD_DEBUG", "1"));
    if !o.status.success() {
        return Err(text(&o));
    }
    serde_json::from_slice(&o.stdout).map_err(|e| format!("{e}: {}", text(&o)))
}

#[test]
fn tls_required_serves_nbds_and_refuses_plain() {
    if !require_tools(&["openssl", "nbdinfo", "fio"]) {
        return;
    }
    let k = start_tls("tls-req", "required");
    let uri = tls_uri(&k);
    let info = nbdinfo_json(&uri).unwrap_or_else(|e| panic!("nbdinfo {uri}: {e}"));
    assert_eq!(info["TLS"], Value::Bool(true), "{info}");
    assert_eq!(
        info["exports"][0]["export-size"].as_u64(),
        Some(k.volume_size),
        "{info}"
    );

    // Plain text is refused with the TLS-required error (NBD_REP_ERR_TLS_REQD and kiln's
    // message), over TCP and the unix socket.
    for plain in [k.tcp_uri(), k.unix_uri()] {
        let err = nbdinfo_json(&plain).expect_err("plain NBD must be refused");
        assert!(
            err.contains("server error message: TLS is required: send STARTTLS"),
            "{plain}: {err}"
        );
        assert!(
            err.contains("nbd_opt_go: server replied with error"),
            "{plain}: {err}"
        );
    }
    // A client that trusts another CA fails the TLS handshake.
    let other = k.dir.join("other-pki");
    make_pki(&other);
    let wrong = format!(
        "nbds://127.0.0.1:{}/vol0?tls-certificates={}",
        k.tcp_port,
        other.display()
    );
    assert!(
        nbdinfo_json(&wrong).is_err(),
        "a certificate from another CA was accepted"
    );

    // Data through TLS: fio's nbd engine (libnbd) writes and verifies 32 MiB. libnbd refuses
    // `tls-certificates` in URIs from fio, so the CA goes where libnbd looks by default
    // ($HOME/.pki/libnbd/ca-cert.pem).
    let home = k.dir.join("home");
    std::fs::create_dir_all(home.join(".pki/libnbd")).unwrap();
    std::fs::copy(
        k.dir.join("pki/ca-cert.pem"),
        home.join(".pki/libnbd/ca-cert.pem"),
    )
    .unwrap();
    let fio_args = args(&[
        "--name=tls",
        "--ioengine=nbd",
        &format!("--uri=nbds://127.0.0.1:{}/vol0", k.tcp_port),
        "--rw=randwrite",
        "--bs=64k",
        "--size=32m",
        "--iodepth=16",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
    ]);
    let run = fio_with_env(
        &k.dir.path,
        &fio_args,
        &[("HOME", &home)],
        Duration::from_secs(120),
    );
    assert_eq!(run.job_error(), 0, "{}", run.describe());
    assert!(run.verify_errors().is_empty(), "{}", run.describe());
    assert_eq!(run.total_ios("write"), 512, "{}", run.describe());
    assert!(run.total_ios("read") >= 512, "{}", run.describe());
    // The server is still healthy for the next client.
    assert!(nbdinfo_json(&uri).is_ok());
}

#[test]
fn tls_optional_serves_both() {
    if !require_tools(&["openssl", "nbdinfo"]) {
        return;
    }
    let k = start_tls("tls-opt", "optional");
    let secure = nbdinfo_json(&tls_uri(&k)).unwrap();
    assert_eq!(secure["TLS"], Value::Bool(true), "{secure}");
    let plain = nbdinfo_json(&k.tcp_uri()).unwrap();
    assert_eq!(plain["TLS"], Value::Bool(false), "{plain}");
    assert_eq!(
        plain["exports"][0]["export-size"].as_u64(),
        Some(k.volume_size)
    );
}

#[test]
fn tls_certificate_errors_are_one_line() {
    if !require_tool("openssl") {
        return;
    }
    let k = Kiln::configure("tls-bad", tls_opts("required"));
    let pki = k.dir.join("pki");
    let check = |needles: &[&str]| {
        let o = run(Command::new(KILN)
            .args(["serve", "--check", "--config"])
            .arg(&k.config)
            .env("NO_COLOR", "1"));
        let stderr = strip_ansi(&String::from_utf8_lossy(&o.stderr));
        assert!(!o.status.success(), "accepted: {}", text(&o));
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "want one line: {stderr}");
        for n in needles {
            assert!(lines[0].contains(n), "missing {n:?}: {stderr}");
        }
    };
    check(&["nbd.tls_cert", "server-cert.pem", "No such file"]);
    make_pki(&pki);
    std::fs::write(pki.join("server-key.pem"), "not a key\n").unwrap();
    check(&["nbd.tls_key", "server-key.pem", "no usable private key"]);
    // A valid key of another certificate.
    let other = k.dir.join("other");
    make_pki(&other);
    std::fs::copy(other.join("server-key.pem"), pki.join("server-key.pem")).unwrap();
    check(&["nbd.tls_key", "does not fit nbd.tls_cert"]);
    std::fs::write(pki.join("server-cert.pem"), "").unwrap();
    check(&["nbd.tls_cert", "no CERTIFICATE"]);
    // tls without paths.
    let text_cfg = std::fs::read_to_string(&k.config).unwrap();
    let stripped: String = text_cfg
        .lines()
        .filter(|l| !l.starts_with("tls_key"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&k.config, stripped).unwrap();
    check(&["nbd.tls_key", "needed with nbd.tls = \"required\""]);
}

#[test]
fn rpc_socket_is_0600() {
    let k = Kiln::start("rpc-mode", Opts::default());
    let mode = std::fs::metadata(&k.rpc_sock).unwrap().permissions().mode();
    assert_eq!(
        mode & 0o777,
        0o600,
        "{} has mode {:o}",
        k.rpc_sock.display(),
        mode
    );
}

/// True when the server closed `s` without sending its greeting.
fn refused(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut b = [0u8; 18];
    match s.read(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => true,
        Err(e) => panic!("read greeting: {e}"),
    }
}

#[test]
fn nbd_connection_cap_refuses_the_extra_client() {
    let k = Kiln::start(
        "conncap",
        Opts {
            nbd_extra: "max_connections = 2\n".into(),
            ..Opts::default()
        },
    );
    let a = RawClient::tcp(k.tcp_port, true);
    let mut b = RawClient::tcp(k.tcp_port, false);
    let mut c = TcpStream::connect(("127.0.0.1", k.tcp_port)).unwrap();
    assert!(refused(&mut c), "a third connection was served");
    assert!(k.log_text().contains("connection limit reached"));
    // The two admitted clients still work.
    assert_eq!(b.write(0, &[7u8; 4096]), 0);
    assert_eq!(b.read(0, 4096).unwrap(), vec![7u8; 4096]);
    // Once one leaves, a new client gets its place (the server frees it asynchronously).
    a.disconnect();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut s = TcpStream::connect(("127.0.0.1", k.tcp_port)).unwrap();
        if !refused(&mut s) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the freed place was never reused"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn nvmf_connection_cap_refuses_the_extra_connection() {
    let port = free_port();
    let mut opts = Opts::default();
    opts.reactor.push_str(&format!(
        "\n[nvmf]\nmax_connections = 2\n\n[[subsystem]]\nnqn = \"nqn.2024-01.io.kiln.cap\"\n\
         namespaces = [\"vol0\"]\nlisteners = [\"127.0.0.1:{port}\"]\nallow_any_host = true\n"
    ));
    let k = Kiln::start("nvmfcap", opts);
    let mut admitted: Vec<TcpStream> = (0..2)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();
    let mut extra = TcpStream::connect(("127.0.0.1", port)).unwrap();
    assert!(refused(&mut extra), "a third NVMe/TCP connection was kept");
    let log = k.log_text();
    assert!(
        log.contains("NVMe/TCP connection refused: 2 connections open (nvmf.max_connections)"),
        "{log}"
    );
    // The admitted ones are still open (waiting for their ICReq), not closed.
    for s in &mut admitted {
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut b = [0u8; 8];
        match s.read(&mut b) {
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            other => panic!("an admitted connection ended: {other:?}"),
        }
    }
}
