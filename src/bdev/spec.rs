//! The device-spec grammar, one for the CLI, the config and RPC.
//!
//! ```text
//! null:SIZE                               completes at once, stores nothing
//! malloc:SIZE                             RAM
//! file:PATH[?size=SIZE][&direct=0|1][&sqpoll=0|1][&iopoll=0|1]
//!                                         file or block device through io_uring
//! delay:READ_US,WRITE_US,MIB_S:INNER      adds latency and a bandwidth cap (0 = no cap)
//! error:RATE,SEED[,mode=eio|torn|corrupt][,lba=FIRST-LAST]:INNER
//!                                         injects faults with probability RATE
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
        inner: Box<DeviceSpec>,
    },
    Object(super::object::ObjectSpec),
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

impl DeviceSpec {
    /// Parses `text`; errors name the part of the spec that is wrong.
    pub fn parse(text: &str) -> Result<DeviceSpec, DeviceError> {
        let text = text.trim();
        let (kind, rest) = text.split_once(':').ok_or_else(|| {
            bad(
                text,
                "expected KIND:ARGS, where KIND is null, malloc, file, delay, error or s3",
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
                        _ => {
                            return Err(bad(
                                text,
                                format!("unknown error option '{key}' (mode, lba)"),
                            ))
                        }
                    }
                }
                Ok(DeviceSpec::Error {
                    rate,
                    seed,
                    mode,
                    lba_range,
                    inner: Box::new(DeviceSpec::parse(inner)?),
                })
            }
            _ => Err(bad(
                text,
                format!("unknown device kind '{kind}' (null, malloc, file, delay, error, s3)"),
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
            DeviceSpec::Error {
                rate,
                seed,
                mode,
                lba_range,
                inner,
            } => Arc::new(super::error::ErrorDevice::new(
                name,
                inner.open()?,
                *rate,
                *seed,
                *mode,
                *lba_range,
            )),
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
    }
}
