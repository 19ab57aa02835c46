//! The TOML configuration: tiers, volumes, listeners, reactors.
//!
//! Unknown keys are errors, and every check names the file, the key and what
//! is wrong, e.g. `kiln.toml: tier[1].capacity: 16GiB is larger than the
//! device (8GiB)`. The embedded default is `configs/default.toml`.

use std::path::Path;

use serde::Deserialize;

use crate::reactor::PollMode;
use crate::units::{format_size, parse_size};

/// The embedded default configuration.
pub const DEFAULT_TOML: &str = include_str!("../configs/default.toml");

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierConfig {
    pub name: String,
    pub device: String,
    pub capacity: String,
    pub cost_per_gib_month: f64,
    pub read_latency_us: u64,
    pub write_latency_us: u64,
    pub bandwidth_mib_s: u64,
    /// Request prices (object tiers): dollars per 1000 GETs and per 1000 PUTs.
    #[serde(default)]
    pub cost_per_1k_get: f64,
    #[serde(default)]
    pub cost_per_1k_put: f64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeConfig {
    pub name: String,
    pub size: String,
    /// Allocation unit of the volume's map (a partition's default size).
    #[serde(default = "default_chunk")]
    pub chunk_size: String,
}

fn default_chunk() -> String {
    "1MiB".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NbdConfig {
    #[serde(default = "default_nbd_listen")]
    pub listen: Vec<String>,
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Requests in flight per connection before the server stops reading.
    #[serde(default = "default_queue_depth")]
    pub max_queue_depth: usize,
    /// Largest READ/WRITE payload (advertised as the maximum block size).
    #[serde(default = "default_max_payload")]
    pub max_payload: String,
    /// READ/WRITE payload bytes one connection may have in flight before the server
    /// stops reading its requests.
    #[serde(default = "default_max_inflight")]
    pub max_inflight: String,
    /// NBD over TLS (`NBD_OPT_STARTTLS`).
    #[serde(default)]
    pub tls: NbdTls,
    /// PEM certificate chain (server certificate first), needed unless `tls = "off"`.
    #[serde(default)]
    pub tls_cert: Option<String>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of `tls_cert`.
    #[serde(default)]
    pub tls_key: Option<String>,
}

/// Whether NBD clients may or must upgrade to TLS.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NbdTls {
    /// `STARTTLS` is refused (`NBD_REP_ERR_UNSUP`).
    #[default]
    Off,
    /// `STARTTLS` is offered; plain clients are served too.
    Optional,
    /// Every option before `STARTTLS` is refused with `NBD_REP_ERR_TLS_REQD`.
    Required,
}

fn default_nbd_listen() -> Vec<String> {
    vec!["127.0.0.1:10809".into()]
}
fn default_max_connections() -> usize {
    64
}
fn default_queue_depth() -> usize {
    128
}
fn default_max_payload() -> String {
    "1MiB".into()
}
fn default_max_inflight() -> String {
    "64MiB".into()
}

impl Default for NbdConfig {
    fn default() -> Self {
        NbdConfig {
            listen: default_nbd_listen(),
            max_connections: default_max_connections(),
            max_queue_depth: default_queue_depth(),
            max_payload: default_max_payload(),
            max_inflight: default_max_inflight(),
            tls: NbdTls::Off,
            tls_cert: None,
            tls_key: None,
        }
    }
}

/// Limits of the NVMe/TCP target (`[nvmf]`). Queue entries (128), in-capsule data (8 KiB)
/// and MAXH2CDATA (128 KiB) are fixed; the largest transfer (MDTS) is `nbd.max_payload`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NvmfConfig {
    /// Connections (admin and I/O queues) over all subsystems and listeners.
    #[serde(default = "default_nvmf_connections")]
    pub max_connections: usize,
}

/// The most `nvmf.max_connections` may be.
pub const NVMF_CONNECTIONS_MAX: usize = 1024;

fn default_nvmf_connections() -> usize {
    256
}

impl Default for NvmfConfig {
    fn default() -> Self {
        NvmfConfig {
            max_connections: default_nvmf_connections(),
        }
    }
}

/// An NVMe-oF subsystem exported over NVMe/TCP (`[[subsystem]]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubsystemConfig {
    pub nqn: String,
    #[serde(default = "default_serial")]
    pub serial: String,
    #[serde(default = "default_model")]
    pub model: String,
    /// Volume names; NSIDs are 1, 2, ... in this order.
    pub namespaces: Vec<String>,
    #[serde(default = "default_nvmf_listeners")]
    pub listeners: Vec<String>,
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
    #[serde(default)]
    pub allow_any_host: bool,
}

fn default_serial() -> String {
    "KILN00000000".into()
}
fn default_model() -> String {
    "kiln volume".into()
}
fn default_nvmf_listeners() -> Vec<String> {
    vec!["127.0.0.1:4420".into()]
}

/// Namespaces one subsystem may hold (Identify Controller NN).
pub const NAMESPACES_MAX: usize = 32;

/// Checks an NQN: "nqn." prefix, at most 223 bytes, no spaces or control characters.
pub fn check_nqn(nqn: &str) -> Result<(), String> {
    if !nqn.starts_with("nqn.") {
        return Err(format!("'{nqn}' is not an NQN (must start with 'nqn.')"));
    }
    if nqn.len() > 223 {
        return Err(format!("NQN '{nqn}' is longer than 223 bytes"));
    }
    if nqn.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(format!("NQN '{nqn}' contains spaces or control characters"));
    }
    Ok(())
}

/// A subsystem after validation.
#[derive(Debug, Clone)]
pub struct SubsystemPlan {
    pub nqn: String,
    pub serial: String,
    pub model: String,
    pub namespaces: Vec<String>,
    pub listeners: Vec<std::net::SocketAddr>,
    pub allowed_hosts: Vec<String>,
    pub allow_any_host: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RpcConfig {
    pub socket: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    pub listen: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReactorSection {
    #[serde(default = "default_cores")]
    pub cores: Vec<usize>,
    #[serde(default = "default_poll_mode")]
    pub poll_mode: PollMode,
    #[serde(default = "default_idle_spin")]
    pub idle_spin_us: u64,
}

fn default_cores() -> Vec<usize> {
    vec![0]
}
fn default_poll_mode() -> PollMode {
    PollMode::Adaptive
}
fn default_idle_spin() -> u64 {
    20
}

impl Default for ReactorSection {
    fn default() -> Self {
        ReactorSection {
            cores: default_cores(),
            poll_mode: default_poll_mode(),
            idle_spin_us: default_idle_spin(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(rename = "tier", default)]
    pub tiers: Vec<TierConfig>,
    #[serde(rename = "volume", default)]
    pub volumes: Vec<VolumeConfig>,
    #[serde(default)]
    pub nbd: NbdConfig,
    #[serde(rename = "subsystem", default)]
    pub subsystems: Vec<SubsystemConfig>,
    #[serde(default)]
    pub nvmf: NvmfConfig,
    pub rpc: Option<RpcConfig>,
    pub metrics: Option<MetricsConfig>,
    #[serde(default)]
    pub reactor: ReactorSection,
    #[serde(default)]
    pub policy: crate::policy::PolicyConfig,
}

/// A tier after validation, sizes in bytes.
#[derive(Debug, Clone)]
pub struct TierPlan {
    pub name: String,
    pub device: String,
    pub capacity_bytes: u64,
    pub cost_per_gib_month: f64,
    pub read_latency_us: u64,
    pub write_latency_us: u64,
    pub bandwidth_mib_s: u64,
    pub cost_per_1k_get: f64,
    pub cost_per_1k_put: f64,
}

/// A volume after validation.
#[derive(Debug, Clone)]
pub struct VolumePlan {
    pub name: String,
    pub size_bytes: u64,
    pub chunk_bytes: u64,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Plan {
    pub source: String,
    pub tiers: Vec<TierPlan>,
    pub volumes: Vec<VolumePlan>,
    pub nbd: NbdConfig,
    pub nbd_max_payload_bytes: u32,
    pub nbd_max_inflight_bytes: u64,
    pub subsystems: Vec<SubsystemPlan>,
    pub nvmf: NvmfConfig,
    pub rpc_socket: Option<String>,
    pub metrics_listen: Option<String>,
    pub reactor: ReactorSection,
    pub policy: crate::policy::PolicyConfig,
}

/// Escapes control characters (a newline in a quoted value, say), so that an error message
/// echoing the config stays one line.
fn one_line(what: &str) -> String {
    let mut out = String::with_capacity(what.len());
    for c in what.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
}

impl Config {
    /// Parses TOML text; `source` names the file in messages.
    pub fn parse(source: &str, text: &str) -> Result<Config, String> {
        toml::from_str(text)
            .map_err(|e| format!("{source}: {}", e.to_string().trim_end().replace('\n', " ")))
    }

    /// Loads a file, or the embedded default when `path` is None.
    pub fn load(path: Option<&Path>) -> Result<(String, Config), String> {
        match path {
            None => Ok((
                "configs/default.toml (embedded)".into(),
                Config::parse("configs/default.toml", DEFAULT_TOML)?,
            )),
            Some(p) => {
                let source = p.display().to_string();
                let text = std::fs::read_to_string(p)
                    .map_err(|e| format!("{source}: cannot read: {e}"))?;
                Ok((source.clone(), Config::parse(&source, &text)?))
            }
        }
    }

    /// Checks everything that can be checked without opening devices.
    pub fn validate(&self, source: &str) -> Result<Plan, String> {
        let err = |key: String, what: String| Err(format!("{source}: {key}: {}", one_line(&what)));
        if self.tiers.is_empty() {
            return err("tier".into(), "at least one [[tier]] is required".into());
        }
        let mut tiers = Vec::new();
        for (i, t) in self.tiers.iter().enumerate() {
            let key = |k: &str| format!("tier[{i}].{k}");
            if !is_name(&t.name) {
                return err(
                    key("name"),
                    format!("'{}' is not a valid name (letters, digits, - _ .)", t.name),
                );
            }
            if tiers.iter().any(|x: &TierPlan| x.name == t.name) {
                return err(key("name"), format!("duplicate tier name '{}'", t.name));
            }
            if let Err(e) = crate::bdev::spec::DeviceSpec::parse(&t.device) {
                return err(key("device"), e.to_string());
            }
            let capacity_bytes = match parse_size(&t.capacity) {
                Ok(0) => return err(key("capacity"), "must be above zero".into()),
                Ok(c) => c,
                Err(e) => return err(key("capacity"), e),
            };
            if !(t.cost_per_gib_month.is_finite() && t.cost_per_gib_month >= 0.0) {
                return err(
                    key("cost_per_gib_month"),
                    format!("{} is not a non-negative number", t.cost_per_gib_month),
                );
            }
            for (k, v) in [
                ("cost_per_1k_get", t.cost_per_1k_get),
                ("cost_per_1k_put", t.cost_per_1k_put),
            ] {
                if !(v.is_finite() && v >= 0.0) {
                    return err(key(k), format!("{v} is not a non-negative number"));
                }
            }
            if t.bandwidth_mib_s == 0 {
                return err(key("bandwidth_mib_s"), "must be above zero".into());
            }
            tiers.push(TierPlan {
                name: t.name.clone(),
                device: t.device.clone(),
                capacity_bytes,
                cost_per_gib_month: t.cost_per_gib_month,
                read_latency_us: t.read_latency_us,
                write_latency_us: t.write_latency_us,
                bandwidth_mib_s: t.bandwidth_mib_s,
                cost_per_1k_get: t.cost_per_1k_get,
                cost_per_1k_put: t.cost_per_1k_put,
            });
        }
        let mut volumes: Vec<VolumePlan> = Vec::new();
        for (i, v) in self.volumes.iter().enumerate() {
            let key = |k: &str| format!("volume[{i}].{k}");
            if !is_name(&v.name) {
                return err(
                    key("name"),
                    format!("'{}' is not a valid name (letters, digits, - _ .)", v.name),
                );
            }
            if volumes.iter().any(|x| x.name == v.name) {
                return err(key("name"), format!("duplicate volume name '{}'", v.name));
            }
            let chunk_bytes = match parse_size(&v.chunk_size) {
                Ok(c) if (64 << 10..=64 << 20).contains(&c) && c.is_power_of_two() => c,
                Ok(c) => {
                    return err(
                        key("chunk_size"),
                        format!(
                            "{} must be a power of two between 64KiB and 64MiB",
                            format_size(c)
                        ),
                    )
                }
                Err(e) => return err(key("chunk_size"), e),
            };
            let size_bytes = match parse_size(&v.size) {
                Ok(s) if s > 0 && s % chunk_bytes == 0 => s,
                Ok(s) => {
                    return err(
                        key("size"),
                        format!(
                            "{} must be a non-zero multiple of the chunk size {}",
                            format_size(s),
                            format_size(chunk_bytes)
                        ),
                    )
                }
                Err(e) => return err(key("size"), e),
            };
            volumes.push(VolumePlan {
                name: v.name.clone(),
                size_bytes,
                chunk_bytes,
            });
        }
        for (i, l) in self.nbd.listen.iter().enumerate() {
            if let Err(e) = parse_listen(l) {
                return err(format!("nbd.listen[{i}]"), e);
            }
        }
        if self.nbd.max_connections == 0 {
            return err("nbd.max_connections".into(), "must be above zero".into());
        }
        if self.nbd.max_queue_depth == 0 || self.nbd.max_queue_depth > 1024 {
            return err("nbd.max_queue_depth".into(), "must be 1..=1024".into());
        }
        let nbd_max_payload_bytes = match parse_size(&self.nbd.max_payload) {
            Ok(p) if (4096..=32 << 20).contains(&p) && p.is_power_of_two() => p as u32,
            Ok(_) => {
                return err(
                    "nbd.max_payload".into(),
                    "must be a power of two between 4KiB and 32MiB".into(),
                )
            }
            Err(e) => return err("nbd.max_payload".into(), e),
        };
        let nbd_max_inflight_bytes = match parse_size(&self.nbd.max_inflight) {
            Ok(b) if b >= u64::from(nbd_max_payload_bytes) => b,
            Ok(_) => {
                return err(
                    "nbd.max_inflight".into(),
                    format!(
                        "must be at least nbd.max_payload ({})",
                        format_size(u64::from(nbd_max_payload_bytes))
                    ),
                )
            }
            Err(e) => return err("nbd.max_inflight".into(), e),
        };
        if self.nbd.tls != NbdTls::Off {
            let mode = if self.nbd.tls == NbdTls::Required {
                "required"
            } else {
                "optional"
            };
            for (name, v) in [
                ("tls_cert", &self.nbd.tls_cert),
                ("tls_key", &self.nbd.tls_key),
            ] {
                if v.as_deref().is_none_or(str::is_empty) {
                    return err(
                        format!("nbd.{name}"),
                        format!("a PEM file path is needed with nbd.tls = \"{mode}\""),
                    );
                }
            }
        }
        let subsystems = self.validate_subsystems(source, &volumes)?;
        if !(1..=NVMF_CONNECTIONS_MAX).contains(&self.nvmf.max_connections) {
            return err(
                "nvmf.max_connections".into(),
                format!("must be 1..={NVMF_CONNECTIONS_MAX}"),
            );
        }
        if self.reactor.cores.is_empty() {
            return err(
                "reactor.cores".into(),
                "at least one core is required".into(),
            );
        }
        let available = core_affinity::get_core_ids()
            .map(|v| v.len())
            .unwrap_or(usize::MAX);
        for &c in &self.reactor.cores {
            if c >= available.max(1) {
                return err(
                    "reactor.cores".into(),
                    format!("core {c} does not exist (this machine has {available})"),
                );
            }
        }
        Ok(Plan {
            source: source.to_string(),
            tiers,
            volumes,
            nbd: self.nbd.clone(),
            nbd_max_payload_bytes,
            nbd_max_inflight_bytes,
            subsystems,
            nvmf: self.nvmf.clone(),
            rpc_socket: self.rpc.as_ref().map(|r| r.socket.clone()),
            metrics_listen: self.metrics.as_ref().map(|m| m.listen.clone()),
            reactor: self.reactor.clone(),
            policy: self.policy.clone(),
        })
    }
}

impl Config {
    fn validate_subsystems(
        &self,
        source: &str,
        volumes: &[VolumePlan],
    ) -> Result<Vec<SubsystemPlan>, String> {
        let mut out: Vec<SubsystemPlan> = Vec::new();
        for (i, s) in self.subsystems.iter().enumerate() {
            let err = |k: &str, what: String| {
                Err(format!("{source}: subsystem[{i}].{k}: {}", one_line(&what)))
            };
            if let Err(e) = check_nqn(&s.nqn) {
                return err("nqn", e);
            }
            if s.nqn == crate::target::nvmf_proto::DISCOVERY_NQN {
                return err(
                    "nqn",
                    "is the discovery NQN, which kiln serves itself".into(),
                );
            }
            if out.iter().any(|o| o.nqn == s.nqn) {
                return err("nqn", format!("duplicate subsystem '{}'", s.nqn));
            }
            if s.serial.is_empty() || s.serial.len() > 20 || !s.serial.is_ascii() {
                return err(
                    "serial",
                    format!("'{}' must be 1 to 20 ASCII characters", s.serial),
                );
            }
            if s.model.is_empty() || s.model.len() > 40 || !s.model.is_ascii() {
                return err(
                    "model",
                    format!("'{}' must be 1 to 40 ASCII characters", s.model),
                );
            }
            if s.namespaces.len() > NAMESPACES_MAX {
                return err(
                    "namespaces",
                    format!("at most {} namespaces", NAMESPACES_MAX),
                );
            }
            for (j, v) in s.namespaces.iter().enumerate() {
                if !volumes.iter().any(|x| &x.name == v) {
                    return err(
                        &format!("namespaces[{j}]"),
                        format!("no volume named '{v}'"),
                    );
                }
                if s.namespaces[..j].contains(v) {
                    return err(
                        &format!("namespaces[{j}]"),
                        format!("volume '{v}' is listed twice"),
                    );
                }
            }
            let mut listeners = Vec::new();
            for (j, l) in s.listeners.iter().enumerate() {
                match l.parse::<std::net::SocketAddr>() {
                    Ok(a) => listeners.push(a),
                    Err(_) => {
                        return err(&format!("listeners[{j}]"), format!("'{l}' is not IP:PORT"))
                    }
                }
            }
            for (j, h) in s.allowed_hosts.iter().enumerate() {
                if let Err(e) = check_nqn(h) {
                    return err(&format!("allowed_hosts[{j}]"), e);
                }
            }
            out.push(SubsystemPlan {
                nqn: s.nqn.clone(),
                serial: s.serial.clone(),
                model: s.model.clone(),
                namespaces: s.namespaces.clone(),
                listeners,
                allowed_hosts: s.allowed_hosts.clone(),
                allow_any_host: s.allow_any_host,
            });
        }
        Ok(out)
    }
}

/// Where an NBD listener binds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    Tcp(std::net::SocketAddr),
    Unix(std::path::PathBuf),
}

pub fn parse_listen(s: &str) -> Result<Listen, String> {
    if let Some(p) = s.strip_prefix("unix:") {
        if p.is_empty() {
            return Err("unix: needs a path".into());
        }
        return Ok(Listen::Unix(p.into()));
    }
    s.parse()
        .map(Listen::Tcp)
        .map_err(|_| format!("'{s}' is not HOST:PORT or unix:PATH"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_is_valid() {
        let c = Config::parse("default", DEFAULT_TOML).unwrap();
        let p = c.validate("default").unwrap();
        assert_eq!(p.tiers.len(), 2);
        assert_eq!(p.volumes[0].size_bytes, 4 << 30);
        assert_eq!(p.nbd.listen.len(), 2);
    }

    /// Found by the `config_toml` fuzz target's one-line check: values echoed in messages
    /// kept their newlines.
    #[test]
    fn errors_stay_one_line() {
        let text = "[[tier]]\nname='a'\ndevice=\"malloc:64M\\nx\"\ncapacity='64M'\ncost_per_gib_month=0.1\nread_latency_us=1\nwrite_latency_us=1\nbandwidth_mib_s=1\n";
        let e = Config::parse("k.toml", text)
            .unwrap()
            .validate("k.toml")
            .unwrap_err();
        assert!(
            e.starts_with("k.toml: tier[0].device: ") && !e.contains('\n'),
            "{e}"
        );
        assert!(e.contains("malloc:64M\\nx"), "{e}");
        let e = Config::parse("k.toml", &text.replace("name='a'", "name=\"a\\nb\""))
            .unwrap()
            .validate("k.toml")
            .unwrap_err();
        assert_eq!(
            e,
            "k.toml: tier[0].name: 'a\\nb' is not a valid name (letters, digits, - _ .)"
        );
    }

    #[test]
    fn errors_name_file_key_and_problem() {
        let e = Config::parse("k.toml", "[[tier]]\nname='a'\ncolour='red'\n").unwrap_err();
        assert!(
            e.starts_with("k.toml:") && e.contains("unknown field `colour`"),
            "{e}"
        );
        let base = |extra: &str| {
            format!(
                "[[tier]]\nname='fast'\ndevice='malloc:64M'\ncapacity='64M'\ncost_per_gib_month=0.1\nread_latency_us=1\nwrite_latency_us=1\nbandwidth_mib_s=100\n{extra}"
            )
        };
        let v = |t: &str| {
            Config::parse("k.toml", t)
                .unwrap()
                .validate("k.toml")
                .unwrap_err()
        };
        assert!(v(&base("[[volume]]\nname='v'\nsize='3500K'\n")).contains("volume[0].size"));
        assert!(
            v(&base("[[volume]]\nname='v'\nsize='4M'\nchunk_size='3K'\n")).contains("chunk_size")
        );
        assert!(v(&base("[nbd]\nlisten=['nowhere']\n")).contains("nbd.listen[0]"));
        assert!(v("").contains("at least one [[tier]]"));
        let sub = |extra: &str| {
            base(&format!(
                "[[volume]]\nname='v'\nsize='4M'\n[[subsystem]]\nnqn='nqn.2024-01.io.kiln:v'\nnamespaces=['v']\n{extra}"
            ))
        };
        let ok = Config::parse("k.toml", &sub(""))
            .unwrap()
            .validate("k.toml")
            .unwrap();
        assert_eq!(ok.subsystems[0].listeners[0].to_string(), "127.0.0.1:4420");
        assert!(!ok.subsystems[0].allow_any_host);
        assert!(v(&sub("").replace("namespaces=['v']", "namespaces=['w']"))
            .contains("subsystem[0].namespaces[0]: no volume named 'w'"));
        assert!(v(&sub("listeners=['localhost']")).contains("subsystem[0].listeners[0]"));
        assert!(v(&sub("allowed_hosts=['bob']")).contains("subsystem[0].allowed_hosts[0]"));
        assert!(v(&sub("").replace("nqn.2024-01.io.kiln:v", "iqn.x")).contains("subsystem[0].nqn"));
        let e = Config::parse("k.toml", &sub("colour='red'")).unwrap_err();
        assert!(e.contains("unknown field `colour`"), "{e}");
        let e = v(&base("").replace("malloc:64M", "mallocc:64M"));
        assert!(
            e.contains("tier[0].device") && e.contains("unknown device kind"),
            "{e}"
        );
    }

    #[test]
    fn limits_and_tls_keys() {
        let base = |extra: &str| {
            format!(
                "[[tier]]\nname='fast'\ndevice='malloc:64M'\ncapacity='64M'\ncost_per_gib_month=0.1\nread_latency_us=1\nwrite_latency_us=1\nbandwidth_mib_s=100\n[[volume]]\nname='v'\nsize='4M'\n{extra}"
            )
        };
        let plan = |t: &str| {
            Config::parse("k.toml", &base(t))
                .unwrap()
                .validate("k.toml")
        };
        let p = plan("").unwrap();
        assert_eq!(p.nbd_max_inflight_bytes, 64 << 20);
        assert_eq!(p.nbd.tls, NbdTls::Off);
        assert_eq!(p.nvmf.max_connections, 256);
        let e = plan("[nbd]\nmax_inflight='512KiB'\n").unwrap_err();
        assert!(
            e.contains("nbd.max_inflight: must be at least nbd.max_payload (1MiB)"),
            "{e}"
        );
        let e = plan("[nbd]\ntls='required'\ntls_key='k.pem'\n").unwrap_err();
        assert!(
            e.contains("nbd.tls_cert: a PEM file path is needed with nbd.tls = \"required\""),
            "{e}"
        );
        let e = plan("[nbd]\ntls='optional'\ntls_cert='c.pem'\n").unwrap_err();
        assert!(e.contains("nbd.tls_key: a PEM file path is needed"), "{e}");
        let e = Config::parse("k.toml", &base("[nbd]\ntls='yes'\n")).unwrap_err();
        assert!(e.contains("unknown variant `yes`"), "{e}");
        let p = plan("[nbd]\ntls='required'\ntls_cert='c.pem'\ntls_key='k.pem'\n").unwrap();
        assert_eq!(p.nbd.tls, NbdTls::Required);
        let e = plan("[nvmf]\nmax_connections=0\n").unwrap_err();
        assert!(e.contains("nvmf.max_connections: must be 1..=1024"), "{e}");
    }
}
