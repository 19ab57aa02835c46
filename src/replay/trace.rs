//! Trace readers: every format is turned into a list of requests over dense 4 KiB page ids.
//!
//! Page ids are remapped in a pre-pass to `0..unique_pages` by *rank* of the raw page number, so
//! the dense order keeps the address order (dense `d + 1` is the next touched page above `d`) and
//! policies can use flat arrays instead of a hash map per page.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;

/// Bytes per page of the fast/capacity tiers.
pub const PAGE_BYTES: u64 = 4096;

/// Input format of a trace file.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum TraceFormat {
    /// Little-endian `u32` block ids, one 4 KiB block per reference.
    U32,
    /// ARC paper text: `start nblocks ignore reqno`, 512 B blocks.
    Arc,
    /// MSR Cambridge CSV: `timestamp,host,disk,Read|Write,offset_bytes,size_bytes,response_time`.
    Msr,
    /// libCacheSim oracleGeneral: packed `u32 clock, u64 obj_id, u32 obj_size, i64 next_vtime`.
    Oracle,
    /// Generic CSV: `time,offset_bytes,size_bytes,op` (op `R`/`W`/`read`/`write`).
    Csv,
}

/// One raw request before remapping: first raw page, page count, write flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawRequest {
    pub page_first: u64,
    pub page_count: u32,
    pub is_write: bool,
}

/// A trace over dense page ids.
#[derive(Debug, Clone, Default)]
pub struct Trace {
    /// Request `i` touches `pages[req_start[i]..req_start[i + 1]]`.
    pub req_start: Vec<u32>,
    /// Dense page ids, in request order.
    pub pages: Vec<u32>,
    /// `raw_pages[dense]` is the raw page number; sorted ascending, unique.
    pub raw_pages: Vec<u64>,
    /// Write flag per request.
    pub writes: Vec<bool>,
}

impl Trace {
    /// Number of requests.
    pub fn requests(&self) -> usize {
        self.req_start.len().saturating_sub(1)
    }

    /// Number of unique pages (the working set).
    pub fn unique_pages(&self) -> usize {
        self.raw_pages.len()
    }

    /// Pages of request `i`.
    #[inline]
    pub fn request(&self, i: usize) -> &[u32] {
        &self.pages[self.req_start[i] as usize..self.req_start[i + 1] as usize]
    }

    /// Builds a trace from raw requests; with `object_level` every page is its own request.
    pub fn from_raw(raw: &[RawRequest], object_level: bool) -> Trace {
        let total: usize = raw.iter().map(|r| r.page_count as usize).sum();
        assert!(total < u32::MAX as usize, "trace too long for u32 offsets");
        let mut flat: Vec<u64> = Vec::with_capacity(total);
        for r in raw {
            flat.extend(r.page_first..r.page_first + u64::from(r.page_count));
        }
        let mut uniq = flat.clone();
        uniq.sort_unstable();
        uniq.dedup();
        assert!(uniq.len() < u32::MAX as usize, "too many unique pages");
        let pages: Vec<u32> = flat
            .iter()
            .map(|p| uniq.binary_search(p).expect("page is in its own set") as u32)
            .collect();
        let mut req_start = Vec::with_capacity(if object_level {
            total + 1
        } else {
            raw.len() + 1
        });
        let mut writes = Vec::with_capacity(req_start.capacity());
        let mut at = 0u32;
        req_start.push(0);
        for r in raw {
            if object_level {
                for _ in 0..r.page_count {
                    at += 1;
                    req_start.push(at);
                    writes.push(r.is_write);
                }
            } else {
                at += r.page_count;
                req_start.push(at);
                writes.push(r.is_write);
            }
        }
        assert_eq!(at as usize, pages.len());
        Trace {
            req_start,
            pages,
            raw_pages: uniq,
            writes,
        }
    }
}

/// Opens `path`, transparently decompressing `.xz` / `.zst` (by extension or magic bytes).
pub fn open_maybe_compressed(path: &Path) -> Result<Box<dyn Read>, String> {
    let mut file =
        std::fs::File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let mut magic = [0u8; 6];
    let got = read_fully(&mut file, &mut magic).map_err(|e| e.to_string())?;
    let head = std::io::Cursor::new(magic[..got].to_vec());
    let chained = head.chain(file);
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let is_xz = ext == "xz" || magic[..got].starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]);
    let is_zst = ext == "zst" || magic[..got].starts_with(&[0x28, 0xb5, 0x2f, 0xfd]);
    if is_xz {
        Ok(Box::new(xz2::read::XzDecoder::new_multi_decoder(chained)))
    } else if is_zst {
        let dec = zstd::stream::read::Decoder::new(chained).map_err(|e| e.to_string())?;
        Ok(Box::new(dec))
    } else {
        Ok(Box::new(chained))
    }
}

fn read_fully(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..])? {
            0 => break,
            n => got += n,
        }
    }
    Ok(got)
}

fn pages_of_bytes(offset_bytes: u64, size_bytes: u64) -> (u64, u32) {
    let first = offset_bytes / PAGE_BYTES;
    let last = (offset_bytes + size_bytes.max(1) - 1) / PAGE_BYTES;
    (first, (last - first + 1) as u32)
}

fn parse_op(s: &str) -> Result<bool, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "r" | "read" => Ok(false),
        "w" | "write" => Ok(true),
        other => Err(format!("unknown op {other:?}")),
    }
}

fn num<T: std::str::FromStr>(s: Option<&str>, line_no: usize, what: &str) -> Result<T, String> {
    s.map(str::trim)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("line {line_no}: bad or missing {what}"))
}

/// Parses a whole trace from a reader.
pub fn parse_reader(mut r: impl Read, format: TraceFormat) -> Result<Vec<RawRequest>, String> {
    let mut out = Vec::new();
    match format {
        TraceFormat::U32 => {
            let mut buf = Vec::new();
            r.read_to_end(&mut buf).map_err(|e| e.to_string())?;
            if buf.len() % 4 != 0 {
                return Err(format!(
                    "u32 trace length {} is not a multiple of 4",
                    buf.len()
                ));
            }
            out.reserve(buf.len() / 4);
            for c in buf.chunks_exact(4) {
                let block = u32::from_le_bytes(c.try_into().expect("4 bytes"));
                out.push(RawRequest {
                    page_first: u64::from(block),
                    page_count: 1,
                    is_write: false,
                });
            }
        }
        TraceFormat::Oracle => {
            let mut buf = Vec::new();
            r.read_to_end(&mut buf).map_err(|e| e.to_string())?;
            if buf.len() % 24 != 0 {
                return Err(format!(
                    "oracle trace length {} is not a multiple of 24",
                    buf.len()
                ));
            }
            for c in buf.chunks_exact(24) {
                let obj = u64::from_le_bytes(c[4..12].try_into().expect("8 bytes"));
                out.push(RawRequest {
                    page_first: obj,
                    page_count: 1,
                    is_write: false,
                });
            }
        }
        TraceFormat::Arc | TraceFormat::Msr | TraceFormat::Csv => {
            let reader = BufReader::with_capacity(1 << 20, r);
            for (i, line) in reader.lines().enumerate() {
                let line = line.map_err(|e| e.to_string())?;
                let line_no = i + 1;
                let t = line.trim();
                if t.is_empty() || t.starts_with('#') {
                    continue;
                }
                let req = match format {
                    TraceFormat::Arc => {
                        let mut f = t.split_ascii_whitespace();
                        let start: u64 = num(f.next(), line_no, "start block")?;
                        let n: u64 = num(f.next(), line_no, "block count")?;
                        let n = n.max(1);
                        let first = start / 8;
                        let last = (start + n - 1) / 8;
                        RawRequest {
                            page_first: first,
                            page_count: (last - first + 1) as u32,
                            is_write: false,
                        }
                    }
                    TraceFormat::Msr => {
                        let f: Vec<&str> = t.split(',').collect();
                        if f.len() < 6 {
                            return Err(format!("line {line_no}: expected 7 MSR fields"));
                        }
                        if f[0].trim().parse::<u64>().is_err() && line_no == 1 {
                            continue; // header
                        }
                        let is_write =
                            parse_op(f[3]).map_err(|e| format!("line {line_no}: {e}"))?;
                        let off: u64 = num(Some(f[4]), line_no, "offset")?;
                        let size: u64 = num(Some(f[5]), line_no, "size")?;
                        let (page_first, page_count) = pages_of_bytes(off, size);
                        RawRequest {
                            page_first,
                            page_count,
                            is_write,
                        }
                    }
                    _ => {
                        let f: Vec<&str> = t.split(',').collect();
                        if f.len() < 4 {
                            return Err(format!("line {line_no}: expected time,offset,size,op"));
                        }
                        if f[1].trim().parse::<u64>().is_err() && line_no == 1 {
                            continue; // header
                        }
                        let off: u64 = num(Some(f[1]), line_no, "offset")?;
                        let size: u64 = num(Some(f[2]), line_no, "size")?;
                        let is_write =
                            parse_op(f[3]).map_err(|e| format!("line {line_no}: {e}"))?;
                        let (page_first, page_count) = pages_of_bytes(off, size);
                        RawRequest {
                            page_first,
                            page_count,
                            is_write,
                        }
                    }
                };
                out.push(req);
            }
        }
    }
    Ok(out)
}

/// Reads and remaps a trace file.
pub fn load(path: &Path, format: TraceFormat, object_level: bool) -> Result<Trace, String> {
    let r = open_maybe_compressed(path)?;
    let raw = parse_reader(r, format)?;
    if raw.is_empty() {
        return Err(format!("{}: no requests", path.display()));
    }
    Ok(Trace::from_raw(&raw, object_level))
}
