//! The device-spec grammar, one for the CLI, the config and RPC.
//!
//! ```text
//! null:SIZE                               completes at once, stores nothing
//! malloc:SIZE                             RAM
//! file:PATH[?size=SIZE][&direct=0|1][&sqpoll=0|1][&iopoll=0|1]
//!                                         file or block device through io_uring
//! delay:READ_US,WRITE_US,MIB_S:INNER      adds latency and a bandwidth cap (0 = no cap)
//! error:RATE,SEED[,mode=eio|torn|corrupt][,lba=FIRST-LAST][,enabled=0|1]:INNER
//!                                         injects faults with probability RATE
//! mirror:SPEC_A|SPEC_B                    RAID-1 over two devices, failover and resync
//! nvme:PCI_BDF[?ns=N][&timeout_ms=MS]     NVMe controller bound to vfio-pci (user-space driver)
//! ng:/dev/ngXnY                           NVMe namespace through io_uring passthrough
//! nvmf://HOST:PORT/NQN/NSID[?hdgst=1][&ddgst=1][&hostnqn=NQN]
//!                                         a namespace on an NVMe/TCP target
//! s3://BUCKET/PREFIX[?endpoint=URL][&region=R]
//!                                         S3-compatible object storage (cold tier only)
//! ```
//! SIZE reads like `4GiB`, `512M` or `4096`. INNER is any spec, so wrappers nest.

use std::path::PathBuf;
use std::sync::Arc;

use super::{BlockDevice, DeviceError};
use crate::units::parse_size;

/// What the `error` device injects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultMode {
    /// The request fails with EIO.
    Eio,
    /// A write completes successfully but only its first half reaches the media.
    Torn,
    /// A read completes successfully with one byte flipped (silent corruption).
    Corrupt,
}

/// A parsed device spec.
#[derive(Clone, Debug, PartialEq)]
pub enum DeviceSpec {
    Null {
        size_bytes: u64,
    },
    Malloc {
        size_bytes: u64,
    },
    File {
        path: PathBuf,
        create_size_bytes: Option<u64>,
        direct: bool,
        sqpoll: bool,
        iopoll: bool,
    },
    Delay {
        read_us: u64,
        write_us: u64,
        mib_s: u64,
        inner: Box<DeviceSpec>,
    },
    Error {
        rate: f64,
        seed: u64,
        mode: FaultMode,
        lba_range: Option<(u64, u64)>,
        /// Whether injection starts switched on (`bdev_error_inject` flips it).
        enabled: bool,
        inner: Box<DeviceSpec>,
    },
    Mirror {
        legs: [Box<DeviceSpec>; 2],
    },
    /// An NVMe controller bound to vfio-pci, driven from user space.
    Nvme {
        /// PCI address `DDDD:BB:DD.F`.
        bdf: String,
        /// Namespace id; the first active namespace if absent.
        nsid: Option<u32>,
        timeout_ms: Option<u64>,
    },
    /// An NVMe generic char device (`/dev/ngXnY`) through io_uring passthrough.
    NvmePassthru {
        path: PathBuf,
    },
    Nvmf(super::nvmf::NvmfTarget),
    Object(super::object::ObjectSpec),
}

/// Checks a PCI address; `BB:DD.F` gets the `0000:` domain.
fn parse_bdf(spec: &str, text: &str) -> Result<String, DeviceError> {
    let full = if text.matches(':').count() == 1 {
        format!("0000:{text}")
    } else {
        text.to_string()
    };
    let ok = full.len() == 12
        && full.char_indices().all(|(i, c)| match i {
            4 | 7 => c == ':',
            10 => c == '.',
            11 => ('0'..='7').contains(&c),
            _ => c.is_ascii_hexdigit(),
        });
    if !ok {
        return Err(bad(
            spec,
            format!("'{text}' is not a PCI address DDDD:BB:DD.F (e.g. 0000:00:04.0)"),
        ));
    }
    Ok(full.to_ascii_lowercase())
}

fn bad(spec: &str, why: impl std::fmt::Display) -> DeviceError {
    DeviceError::BadSpec(format!("'{spec}': {why}"))
}

fn parse_bool(spec: &str, key: &str, value: &str) -> Result<bool, DeviceError> {
    match value {
        "1" | "true" | "on" | "yes" => Ok(true),
        "0" | "false" | "off" | "no" => Ok(false),
        _ => Err(bad(
            spec,
            format!("option '{key}' wants 0 or 1, not '{value}'"),
        )),
    }
}

/// `nvmf://HOST:PORT/NQN/NSID[?hdgst=1][&ddgst=1][&hostnqn=NQN]` (after the scheme).
fn parse_nvmf(text: &str, rest: &str) -> Result<DeviceSpec, DeviceError> {
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    let mut parts = path.splitn(3, '/');
    let addr = parts.next().unwrap_or("");
    let nqn = parts.next().unwrap_or("");
    let nsid = parts.next().unwrap_or("");
    if addr.is_empty() || nqn.is_empty() || nsid.is_empty() {
        return Err(bad(text, "nvmf wants nvmf://HOST:PORT/NQN/NSID"));
    }
    if addr
        .rsplit_once(':')
        .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
    {
        return Err(bad(text, format!("'{addr}' is not HOST:PORT")));
    }
    crate::config::check_nqn(nqn).map_err(|e| bad(text, e))?;
    let nsid: u32 = match nsid.parse() {
        Ok(n) if n > 0 && n < 0xffff_ffff => n,
        _ => {
            return Err(bad(
                text,
                format!("NSID '{nsid}' is not a number 1..0xfffffffe"),
            ))
        }
    };
    let mut t = super::nvmf::NvmfTarget {
        addr: addr.to_string(),
        subnqn: nqn.to_string(),
        nsid,
        digests: Default::default(),
        hostnqn: super::nvmf::DEFAULT_HOSTNQN.to_string(),
    };
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| bad(text, format!("option '{pair}' is not KEY=VALUE")))?;
        match key {
            "hdgst" => t.digests.header = parse_bool(text, key, value)?,
            "ddgst" => t.digests.data = parse_bool(text, key, value)?,
            "hostnqn" => {
                crate::config::check_nqn(value).map_err(|e| bad(text, e))?;
                t.hostnqn = value.to_string();
            }
            _ => {
                return Err(bad(
                    text,
                    format!("unknown nvmf option '{key}' (hdgst, ddgst, hostnqn)"),
                ))
            }
        }
    }
    Ok(DeviceSpec::Nvmf(t))
}

impl DeviceSpec {
    /// Parses `text`; errors name the part of the spec that is wrong.
    pub fn parse(text: &str) -> Result<DeviceSpec, DeviceError> {
        let text = text.trim();
        if let Some(rest) = text.strip_prefix("nvmf://") {
            return parse_nvmf(text, rest);
        }
        let (kind, rest) = text.split_once(':').ok_or_else(|| {
            bad(
                text,
                "expected KIND:ARGS, where KIND is null, malloc, file, delay, error, mirror, nvme, ng or s3, or nvmf://HOST:PORT/NQN/NSID",
            )
        })?;
        match kind {
            "s3" => Ok(DeviceSpec::Object(
                super::object::ObjectSpec::parse(rest).map_err(|e| bad(text, e))?,
            )),
            "null" | "malloc" => {
                let size_bytes = parse_size(rest).map_err(|e| bad(text, e))?;
                if size_bytes == 0 || size_bytes % 4096 != 0 {
                    return Err(bad(text, "size must be a non-zero multiple of 4KiB"));
                }
                Ok(if kind == "null" {
                    DeviceSpec::Null { size_bytes }
                } else {
                    DeviceSpec::Malloc { size_bytes }
                })
            }
            "file" => {
                let (path, query) = match rest.split_once('?') {
                    Some((p, q)) => (p, q),
                    None => (rest, ""),
                };
                if path.is_empty() {
                    return Err(bad(text, "file spec needs a path"));
                }
                let mut spec = DeviceSpec::File {
                    path: PathBuf::from(path),
                    create_size_bytes: None,
                    direct: true,
                    sqpoll: false,
                    iopoll: false,
                };
                if let DeviceSpec::File {
                    create_size_bytes,
                    direct,
                    sqpoll,
                    iopoll,
                    ..
                } = &mut spec
                {
                    for pair in query.split('&').filter(|p| !p.is_empty()) {
                        let (key, value) = pair.split_once('=').ok_or_else(|| {
                            bad(text, format!("option '{pair}' is not KEY=VALUE"))
                        })?;
                        match key {
                            "size" => {
                                let size = parse_size(value).map_err(|e| bad(text, e))?;
                                if size == 0 || size % 4096 != 0 {
                                    return Err(bad(
                                        text,
                                        "size must be a non-zero multiple of 4KiB",
                                    ));
                                }
                                *create_size_bytes = Some(size);
                            }
                            "direct" => *direct = parse_bool(text, key, value)?,
                            "sqpoll" => *sqpoll = parse_bool(text, key, value)?,
                            "iopoll" => *iopoll = parse_bool(text, key, value)?,
                            _ => {
                                return Err(bad(
                                    text,
                                    format!(
                                    "unknown file option '{key}' (size, direct, sqpoll, iopoll)"
                                ),
                                ))
                            }
                        }
                    }
                }
                Ok(spec)
            }
            "delay" => {
                let (params, inner) = rest
                    .split_once(':')
                    .ok_or_else(|| bad(text, "delay wants READ_US,WRITE_US,MIB_S:INNER"))?;
                let nums: Vec<&str> = params.split(',').collect();
                if nums.len() != 3 {
                    return Err(bad(
                        text,
                        "delay wants three numbers READ_US,WRITE_US,MIB_S",
                    ));
                }
                let num = |i: usize, what: &str| -> Result<u64, DeviceError> {
                    nums[i]
                        .trim()
                        .parse()
                        .map_err(|_| bad(text, format!("{what} '{}' is not a number", nums[i])))
                };
                Ok(DeviceSpec::Delay {
                    read_us: num(0, "READ_US")?,
                    write_us: num(1, "WRITE_US")?,
                    mib_s: num(2, "MIB_S")?,
                    inner: Box::new(DeviceSpec::parse(inner)?),
                })
            }
            "error" => {
                let (params, inner) = rest
                    .split_once(':')
                    .ok_or_else(|| bad(text, "error wants RATE,SEED[,mode=..][,lba=A-B]:INNER"))?;
                let mut parts = params.split(',');
                let rate_text = parts.next().unwrap_or("");
                let rate: f64 = rate_text
                    .trim()
                    .parse()
                    .map_err(|_| bad(text, format!("RATE '{rate_text}' is not a number")))?;
                if !(0.0..=1.0).contains(&rate) {
                    return Err(bad(text, format!("RATE {rate} must be between 0 and 1")));
                }
                let seed_text = parts
                    .next()
                    .ok_or_else(|| bad(text, "error wants a SEED after RATE"))?;
                let seed: u64 = seed_text
                    .trim()
                    .parse()
                    .map_err(|_| bad(text, format!("SEED '{seed_text}' is not a number")))?;
                let mut mode = FaultMode::Eio;
                let mut lba_range = None;
                let mut enabled = true;
                for opt in parts {
                    let (key, value) = opt
                        .split_once('=')
                        .ok_or_else(|| bad(text, format!("option '{opt}' is not KEY=VALUE")))?;
                    match key {
                        "mode" => {
                            mode = match value {
                                "eio" => FaultMode::Eio,
                                "torn" => FaultMode::Torn,
                                "corrupt" => FaultMode::Corrupt,
                                _ => {
                                    return Err(bad(
                                        text,
                                        format!("mode '{value}' is not eio, torn or corrupt"),
                                    ))
                                }
                            }
                        }
                        "lba" => {
                            let (a, b) = value.split_once('-').ok_or_else(|| {
                                bad(text, format!("lba '{value}' is not FIRST-LAST"))
                            })?;
                            let a: u64 = a.parse().map_err(|_| {
                                bad(text, format!("lba '{value}' is not FIRST-LAST"))
                            })?;
                            let b: u64 = b.parse().map_err(|_| {
                                bad(text, format!("lba '{value}' is not FIRST-LAST"))
                            })?;
                            if a > b {
                                return Err(bad(text, format!("lba range {a}-{b} is empty")));
                            }
                            lba_range = Some((a, b));
                        }
                        "enabled" => enabled = parse_bool(text, key, value)?,
                        _ => {
                            return Err(bad(
                                text,
                                format!("unknown error option '{key}' (mode, lba, enabled)"),
                            ))
                        }
                    }
                }
                Ok(DeviceSpec::Error {
                    rate,
                    seed,
                    mode,
                    lba_range,
                    enabled,
                    inner: Box::new(DeviceSpec::parse(inner)?),
                })
            }
            "mirror" => {
                let (a, b) = rest
                    .split_once('|')
                    .ok_or_else(|| bad(text, "mirror wants SPEC_A|SPEC_B"))?;
                if b.contains('|') {
                    return Err(bad(text, "mirror takes exactly two legs"));
                }
                Ok(DeviceSpec::Mirror {
                    legs: [
                        Box::new(DeviceSpec::parse(a)?),
                        Box::new(DeviceSpec::parse(b)?),
                    ],
                })
            }
            "nvme" => {
                let (addr, query) = rest.split_once('?').unwrap_or((rest, ""));
                let bdf = parse_bdf(text, addr)?;
                let mut nsid = None;
                let mut timeout_ms = None;
                for pair in query.split('&').filter(|p| !p.is_empty()) {
                    let (key, value) = pair
                        .split_once('=')
                        .ok_or_else(|| bad(text, format!("option '{pair}' is not KEY=VALUE")))?;
                    let number = |what: &str| -> Result<u64, DeviceError> {
                        value
                            .parse()
                            .map_err(|_| bad(text, format!("{what} '{value}' is not a number")))
                    };
                    match key {
                        "ns" => match number("ns")? {
                            n @ 1..=0xffff_fffe => nsid = Some(n as u32),
                            _ => return Err(bad(text, "ns must be 1..4294967294")),
                        },
                        "timeout_ms" => timeout_ms = Some(number("timeout_ms")?.max(1)),
                        _ => {
                            return Err(bad(
                                text,
                                format!("unknown nvme option '{key}' (ns, timeout_ms)"),
                            ))
                        }
                    }
                }
                Ok(DeviceSpec::Nvme {
                    bdf,
                    nsid,
                    timeout_ms,
                })
            }
            "ng" => {
                if rest.is_empty() {
                    return Err(bad(text, "ng spec needs a path such as /dev/ng0n1"));
                }
                Ok(DeviceSpec::NvmePassthru {
                    path: PathBuf::from(rest),
                })
            }
            _ => Err(bad(
                text,
                format!(
                    "unknown device kind '{kind}' (null, malloc, file, delay, error, mirror, nvme, ng, s3)"
                ),
            )),
        }
    }

    /// Opens (and for `file:...?size=`, creates) the device.
    pub fn open(&self) -> Result<Arc<dyn BlockDevice>, DeviceError> {
        let name = self.to_string();
        Ok(match self {
            DeviceSpec::Null { size_bytes } => {
                Arc::new(super::null::NullDevice::new(name, *size_bytes))
            }
            DeviceSpec::Malloc { size_bytes } => {
                Arc::new(super::malloc::MallocDevice::new(name, *size_bytes)?)
            }
            DeviceSpec::File {
                path,
                create_size_bytes,
                direct,
                sqpoll,
                iopoll,
            } => Arc::new(super::uring::UringDevice::open(
                name,
                path,
                *create_size_bytes,
                *direct,
                *sqpoll,
                *iopoll,
            )?),
            DeviceSpec::Delay {
                read_us,
                write_us,
                mib_s,
                inner,
            } => Arc::new(super::delay::DelayDevice::new(
                name,
                inner.open()?,
                *read_us,
                *write_us,
                *mib_s,
            )),
            DeviceSpec::Nvmf(t) => Arc::new(super::nvmf::NvmfDevice::open(name, t)?),
            DeviceSpec::Error {
                rate,
                seed,
                mode,
                lba_range,
                enabled,
                inner,
            } => {
                let dev = Arc::new(super::error::ErrorDevice::new(
                    name,
                    inner.open()?,
                    *rate,
                    *seed,
                    *mode,
                    *lba_range,
                ));
                dev.set_enabled(*enabled);
                super::error::register(&dev);
                dev
            }
            DeviceSpec::Mirror { legs } => Arc::new(super::mirror::MirrorDevice::open(
                name,
                legs[0].open()?,
                legs[1].open()?,
                super::mirror::DEFAULT_TIMEOUT,
            )?),
            DeviceSpec::Nvme {
                bdf,
                nsid,
                timeout_ms,
            } => Arc::new(super::vfio_nvme::VfioNvmeDevice::open(
                name,
                bdf,
                *nsid,
                *timeout_ms,
            )?),
            DeviceSpec::NvmePassthru { path } => {
                Arc::new(super::nvme_passthru::NvmePassthruDevice::open(name, path)?)
            }
            DeviceSpec::Object(o) => Arc::new(super::object::ObjectDevice::open(o)?),
        })
    }

    /// The spec as it may be shown (secrets redacted), or the text itself if it does not parse.
    pub fn redacted(text: &str) -> String {
        match DeviceSpec::parse(text) {
            Ok(DeviceSpec::Object(o)) => o.to_string(),
            _ => text.to_string(),
        }
    }

    /// The file behind this spec, if any (for wrappers, the innermost).
    pub fn backing_file(&self) -> Option<&PathBuf> {
        match self {
            DeviceSpec::File { path, .. } => Some(path),
            DeviceSpec::Delay { inner, .. } | DeviceSpec::Error { inner, .. } => {
                inner.backing_file()
            }
            _ => None,
        }
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use crate::units::format_size;
        match self {
            DeviceSpec::Null { size_bytes } => write!(f, "null:{}", format_size(*size_bytes)),
            DeviceSpec::Malloc { size_bytes } => write!(f, "malloc:{}", format_size(*size_bytes)),
            DeviceSpec::File { path, .. } => write!(f, "file:{}", path.display()),
            DeviceSpec::Delay {
                read_us,
                write_us,
                mib_s,
                inner,
            } => {
                write!(f, "delay:{read_us},{write_us},{mib_s}:{inner}")
            }
            DeviceSpec::Error {
                rate, seed, inner, ..
            } => write!(f, "error:{rate},{seed}:{inner}"),
            DeviceSpec::Mirror { legs } => write!(f, "mirror:{}|{}", legs[0], legs[1]),
            DeviceSpec::Nvme { bdf, nsid, .. } => match nsid {
                Some(n) => write!(f, "nvme:{bdf}?ns={n}"),
                None => write!(f, "nvme:{bdf}"),
            },
            DeviceSpec::NvmePassthru { path } => write!(f, "ng:{}", path.display()),
            DeviceSpec::Nvmf(t) => write!(f, "nvmf://{}/{}/{}", t.addr, t.subnqn, t.nsid),
            DeviceSpec::Object(o) => write!(f, "{o}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grammar() {
        assert_eq!(
            DeviceSpec::parse("null:1G").unwrap(),
            DeviceSpec::Null {
                size_bytes: 1 << 30
            }
        );
        let f = DeviceSpec::parse("file:/tmp/x.img?size=4GiB&sqpoll=1").unwrap();
        assert!(
            matches!(f, DeviceSpec::File { create_size_bytes: Some(s), sqpoll: true, .. } if s == 4 << 30)
        );
        let d = DeviceSpec::parse("delay:2000,100,150:file:/tmp/a.img?size=1G").unwrap();
        assert!(matches!(
            d,
            DeviceSpec::Delay {
                read_us: 2000,
                write_us: 100,
                mib_s: 150,
                ..
            }
        ));
        let e = DeviceSpec::parse("error:0.01,7,mode=corrupt,lba=0-99:malloc:64M").unwrap();
        assert!(matches!(
            e,
            DeviceSpec::Error {
                mode: FaultMode::Corrupt,
                lba_range: Some((0, 99)),
                ..
            }
        ));
        assert_eq!(e.to_string(), "error:0.01,7:malloc:64MiB");
        let m = DeviceSpec::parse("mirror:malloc:8M|error:1,2,enabled=0:malloc:8M").unwrap();
        assert_eq!(m.to_string(), "mirror:malloc:8MiB|error:1,2:malloc:8MiB");
    }

    #[test]
    fn errors_are_precise() {
        let msg = |s: &str| DeviceSpec::parse(s).unwrap_err().to_string();
        assert!(msg("bogus:1G").contains("unknown device kind 'bogus'"));
        assert!(msg("malloc:12Q").contains("unknown unit"));
        assert!(msg("malloc").contains("expected KIND:ARGS"));
        assert!(msg("delay:1,2:null:1G").contains("three numbers"));
        assert!(msg("error:2,1:null:1G").contains("between 0 and 1"));
        assert!(msg("file:/x?color=red").contains("unknown file option 'color'"));
        assert!(msg("malloc:1000").contains("multiple of 4KiB"));
        assert!(msg("mirror:malloc:8M").contains("SPEC_A|SPEC_B"));
        assert!(msg("mirror:malloc:8M|malloc:8M|malloc:8M").contains("exactly two legs"));
        assert!(msg("error:1,1,enabled=maybe:null:1G").contains("wants 0 or 1"));
        assert!(msg("nvmf://127.0.0.1/nqn.x/1").contains("not HOST:PORT"));
        assert!(msg("nvmf://127.0.0.1:4420/iqn.x/1").contains("not an NQN"));
        assert!(msg("nvmf://127.0.0.1:4420/nqn.x/0").contains("NSID '0'"));
        assert!(msg("nvmf://127.0.0.1:4420/nqn.x/1?crc=1").contains("unknown nvmf option 'crc'"));
        let t = DeviceSpec::parse("nvmf://127.0.0.1:4420/nqn.2024-01.io.kiln:a/2?hdgst=1&ddgst=1")
            .unwrap();
        assert!(
            matches!(&t, DeviceSpec::Nvmf(n) if n.nsid == 2 && n.digests.header && n.digests.data)
        );
        assert_eq!(
            t.to_string(),
            "nvmf://127.0.0.1:4420/nqn.2024-01.io.kiln:a/2"
        );
    }

    #[test]
    fn nvme_specs() {
        assert_eq!(
            DeviceSpec::parse("nvme:0000:00:04.0").unwrap(),
            DeviceSpec::Nvme {
                bdf: "0000:00:04.0".into(),
                nsid: None,
                timeout_ms: None
            }
        );
        let s = DeviceSpec::parse("nvme:00:1F.7?ns=2&timeout_ms=500").unwrap();
        assert_eq!(
            s,
            DeviceSpec::Nvme {
                bdf: "0000:00:1f.7".into(),
                nsid: Some(2),
                timeout_ms: Some(500)
            }
        );
        assert_eq!(s.to_string(), "nvme:0000:00:1f.7?ns=2");
        let w = DeviceSpec::parse("delay:1,1,0:nvme:0000:00:04.0").unwrap();
        assert!(
            matches!(w, DeviceSpec::Delay { inner, .. } if matches!(*inner, DeviceSpec::Nvme { .. }))
        );
        let ng = DeviceSpec::parse("ng:/dev/ng0n1").unwrap();
        assert_eq!(
            ng,
            DeviceSpec::NvmePassthru {
                path: "/dev/ng0n1".into()
            }
        );
        assert_eq!(ng.to_string(), "ng:/dev/ng0n1");
        let msg = |s: &str| DeviceSpec::parse(s).unwrap_err().to_string();
        assert!(msg("nvme:0000:00:04").contains("not a PCI address"));
        assert!(msg("nvme:0000:00:04.8").contains("not a PCI address"));
        assert!(msg("nvme:zz:00:04.0").contains("not a PCI address"));
        assert!(msg("nvme:0000:00:04.0?ns=0").contains("ns must be"));
        assert!(msg("nvme:0000:00:04.0?ns=x").contains("ns 'x' is not a number"));
        assert!(msg("nvme:0000:00:04.0?queues=2").contains("unknown nvme option 'queues'"));
        assert!(msg("ng:").contains("needs a path"));
    }
}
