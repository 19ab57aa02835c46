//! A local S3 server for the object-tier tests: `moto_server` on a free 127.0.0.1 port with
//! one bucket, listed through its own ListObjectsV2 API.

use std::collections::BTreeSet;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{free_port, Kiln, Opts};

pub const BUCKET: &str = "kiln-test";
pub const SECRET: &str = "kiln-secret-7f3a";

/// A `moto_server` on its own port, with one bucket. Killed on drop.
pub struct S3Server {
    pub port: u16,
    child: Child,
}

impl S3Server {
    pub fn start(dir: &std::path::Path) -> S3Server {
        let port = free_port();
        let log = std::fs::File::create(dir.join("moto.log")).unwrap();
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn moto_server");
        let s = S3Server { port, child };
        let t0 = Instant::now();
        while s.http(&["-o", "/dev/null", "-w", "%{http_code}", &s.url("")]) != "200" {
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "moto_server did not answer on port {port}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let code = s.http(&[
            "-X",
            "PUT",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &s.url(BUCKET),
        ]);
        assert_eq!(code, "200", "create bucket");
        s
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}/{path}", self.port)
    }

    pub fn http(&self, a: &[&str]) -> String {
        let out = Command::new("curl")
            .arg("-s")
            .args(a)
            .output()
            .expect("curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Object keys under `prefix/`, through the server's own ListObjectsV2 API.
    pub fn keys(&self, prefix: &str) -> BTreeSet<String> {
        let mut keys = BTreeSet::new();
        let mut token = String::new();
        loop {
            let mut url = self.url(&format!("{BUCKET}?list-type=2&prefix={prefix}/"));
            if !token.is_empty() {
                url.push_str(&format!("&continuation-token={token}"));
            }
            let xml = self.http(&[&url]);
            assert!(xml.contains("ListBucketResult"), "ListObjectsV2: {xml}");
            for part in xml.split("<Key>").skip(1) {
                keys.insert(part.split("</Key>").next().unwrap().to_string());
            }
            match xml.split("<NextContinuationToken>").nth(1) {
                Some(t) => token = t.split('<').next().unwrap().to_string(),
                None => return keys,
            }
        }
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, sig) }, 0);
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.signal(libc::SIGCONT);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Three tiers: the test harness's fast and capacity files, then the bucket.
/// `timeout_ms`: per S3 request (short where the test stops the server on purpose).
pub fn opts(
    s3: &S3Server,
    prefix: &str,
    fast: &'static str,
    volume: &'static str,
    timeout_ms: u64,
) -> Opts {
    let mut o = Opts {
        fast,
        capacity: "512MiB",
        volume,
        ..Opts::default()
    };
    o.reactor.push_str(&format!(
        r#"
[policy]
policy = "static"
interval_ms = 200

[[tier]]
name = "cold"
device = "s3://{BUCKET}/{prefix}?endpoint=http://127.0.0.1:{port}&region=us-east-1&timeout_ms={timeout_ms}&retries=2&access_key_id=test&secret_access_key={SECRET}"
capacity = "64GiB"
cost_per_gib_month = 0.004
cost_per_1k_get = 0.0004
cost_per_1k_put = 0.005
read_latency_us = 20000
write_latency_us = 40000
bandwidth_mib_s = 100
"#,
        port = s3.port
    ));
    o
}

/// The map's object generations (tier_offset / 64 MiB of chunks on "cold"), and whether
/// every chunk is there.
pub fn cold_gens(k: &Kiln) -> (BTreeSet<u64>, bool) {
    let map = k.rpc("volume_get_map", Some(r#"{"volume":"vol0"}"#));
    let mut gens = BTreeSet::new();
    let mut all = true;
    for c in map["chunks"].as_array().unwrap() {
        match c["tier"].as_str() {
            Some("cold") => {
                let first = c["tier_offset"].as_u64().unwrap() >> 26;
                let last =
                    (c["tier_offset"].as_u64().unwrap() + c["length"].as_u64().unwrap() - 1) >> 26;
                gens.extend(first..=last);
            }
            Some(_) => all = false,
            None => {}
        }
    }
    (gens, all)
}

pub fn key_gens(keys: &BTreeSet<String>, prefix: &str) -> BTreeSet<u64> {
    keys.iter()
        .map(|k| {
            let hex = k
                .strip_prefix(&format!("{prefix}/kiln-obj-"))
                .unwrap_or_else(|| panic!("unexpected key {k}"));
            u64::from_str_radix(hex, 16).unwrap()
        })
        .collect()
}
