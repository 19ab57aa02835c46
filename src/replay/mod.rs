//! `kiln replay`: trace-driven, virtual-time evaluation of fast-tier placement policies.
//!
//! The same policy code runs here as in the engine's policy thread, without devices. Traces are
//! remapped to dense page ids in a pre-pass (see [`trace`]), so policies use flat arrays.

pub mod kiln;
pub mod policy;
pub mod predictors;
pub mod sim;
pub mod trace;

use policy::Policy;
use sim::{fast_pages_for, ReplayReport, TierLatency};
use std::io::IsTerminal;
use std::path::PathBuf;
use trace::{Trace, TraceFormat};

/// Policies `--policy` accepts.
pub const POLICY_NAMES: [&str; 9] = [
    "lru", "arc", "lirs", "s3fifo", "sieve", "belady", "ewma", "markov", "kiln",
];

/// Arguments of `kiln replay`.
#[derive(clap::Args, Debug, Clone)]
pub struct ReplayArgs {
    /// Trace file (`.xz` and `.zst` are decompressed on the fly).
    #[arg(long)]
    pub trace: Option<PathBuf>,
    /// Trace format.
    #[arg(long, value_enum, default_value = "u32")]
    pub format: TraceFormat,
    /// Fast-tier size as a fraction of the working set (unique 4 KiB pages); a comma list runs
    /// each.
    #[arg(long, value_delimiter = ',', default_value = "0.05")]
    pub fast_ratio: Vec<f64>,
    /// Policy: lru, arc, lirs, s3fifo, sieve, belady, ewma, markov, kiln, or `all`; a comma list
    /// runs each.
    #[arg(long, value_delimiter = ',', default_value = "kiln")]
    pub policy: Vec<String>,
    /// Print JSON (one array of reports) instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Every page is its own request (multi-page requests are split).
    #[arg(long)]
    pub object_level: bool,
    /// Modelled fast-tier latency per request.
    #[arg(long, default_value_t = 100.0)]
    pub fast_latency_us: f64,
    /// Modelled capacity-tier latency per request.
    #[arg(long, default_value_t = 2000.0)]
    pub capacity_latency_us: f64,
    /// Prefetch budget of the `kiln` and `markov` policies, in pages per request.
    #[arg(long, default_value_t = 2)]
    pub prefetch_budget_pages: u32,
    /// Pages per heat partition (256 = 1 MiB).
    #[arg(long, default_value_t = 256)]
    pub partition_pages: u32,
    /// Requests per heat window (0: requests / 400, at least 1000).
    #[arg(long, default_value_t = 0)]
    pub window_requests: u64,
    /// kiln: prefetch only into partitions with at least this predicted access probability.
    #[arg(long, default_value_t = 0.0)]
    pub kiln_prefetch_min_prob: f32,
    /// kiln: admit a missed page without recent reuse only into partitions with at least this
    /// predicted probability.
    #[arg(long, default_value_t = 0.9)]
    pub kiln_admit_min_prob: f32,
    /// Also report precision@k of next-window hot-partition prediction (LSTM, EWMA, Markov).
    #[arg(long)]
    pub report_precision: bool,
    /// Run the LSTM inference/training cost micro-benchmarks (no trace needed).
    #[arg(long)]
    pub bench_predict: bool,
    /// Compare object-level LRU/ARC/LIRS/S3-FIFO/SIEVE/Belady against a reference table given as
    /// `name=.202/.143/.082,...` for the ratios 0.01/0.05/0.10; fails when off by > 0.005.
    #[arg(long)]
    pub check_reference: Option<String>,
}

/// Builds the policy `name` for `trace` with a fast tier of `fast_pages`.
pub fn make_policy(
    name: &str,
    trace: &Trace,
    fast_pages: usize,
    args: &ReplayArgs,
) -> Result<Box<dyn Policy>, String> {
    let n = trace.unique_pages();
    Ok(match name {
        "lru" => Box::new(policy::Lru::new(n, fast_pages)),
        "arc" => Box::new(policy::Arc::new(n, fast_pages)),
        "lirs" => Box::new(policy::Lirs::new(n, fast_pages)),
        "s3fifo" => Box::new(policy::S3Fifo::new(n, fast_pages)),
        "sieve" => Box::new(policy::Sieve::new(n, fast_pages)),
        "belady" => Box::new(policy::Belady::new(trace, fast_pages, true)),
        "ewma" => Box::new(predictors::EwmaPolicy::new(n, fast_pages)),
        "markov" => Box::new(predictors::MarkovPolicy::new(
            n,
            fast_pages,
            args.prefetch_budget_pages,
        )),
        "kiln" => Box::new(kiln::KilnPolicy::new(
            trace,
            fast_pages,
            &kiln_config(trace, args),
        )),
        other => {
            return Err(format!(
                "unknown policy {other:?} (one of {POLICY_NAMES:?} or all)"
            ))
        }
    })
}

/// The kiln policy configuration the CLI arguments select.
pub fn kiln_config(trace: &Trace, args: &ReplayArgs) -> kiln::KilnConfig {
    kiln::KilnConfig {
        prefetch_budget_pages: args.prefetch_budget_pages,
        partition_pages: args.partition_pages,
        window_requests: window_requests_for(trace, args.window_requests),
        prefetch_min_prob: args.kiln_prefetch_min_prob,
        admit_min_prob: args.kiln_admit_min_prob,
        ..kiln::KilnConfig::default()
    }
}

/// Requests per heat window: explicit, or requests / 400 (at least 1000).
pub fn window_requests_for(trace: &Trace, explicit: u64) -> u64 {
    if explicit > 0 {
        explicit
    } else {
        (trace.requests() as u64 / 400).max(1000)
    }
}

fn progress_bar(total: usize, label: String) -> Option<indicatif::ProgressBar> {
    if !std::io::stderr().is_terminal() || total < 1_000_000 {
        return None;
    }
    let pb = indicatif::ProgressBar::new(total as u64);
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("{msg:>22} [{bar:40}] {pos}/{len} requests ({eta})")
    {
        pb.set_style(style.progress_chars("=> "));
    }
    pb.set_message(label);
    Some(pb)
}

/// Runs one policy at one ratio.
pub fn run_one(
    trace: &Trace,
    name: &str,
    fast_ratio: f64,
    args: &ReplayArgs,
) -> Result<ReplayReport, String> {
    let fast_pages = fast_pages_for(trace.unique_pages(), fast_ratio);
    let mut pol = make_policy(name, trace, fast_pages, args)?;
    let lat = TierLatency {
        fast_us: args.fast_latency_us,
        capacity_us: args.capacity_latency_us,
    };
    let pb = progress_bar(trace.requests(), format!("{name} @ {fast_ratio}"));
    let mut tick = |r: usize| {
        if let Some(pb) = &pb {
            pb.set_position(r as u64);
        }
    };
    let rep = sim::replay(trace, pol.as_mut(), fast_ratio, lat, &mut tick);
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    Ok(rep)
}

fn expand_policies(list: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for p in list {
        if p == "all" {
            out.extend(POLICY_NAMES.iter().map(|s| s.to_string()));
        } else {
            out.push(p.clone());
        }
    }
    out
}

/// Formats reports as a fixed-width table.
pub fn format_table(reports: &[ReplayReport]) -> String {
    let mut s = format!(
        "{:<8} {:>6} {:>9} {:>10} {:>9} {:>10} {:>13} {:>11} {:>10}\n",
        "policy",
        "ratio",
        "fast_pg",
        "requests",
        "unique",
        "miss_ratio",
        "pages_migr",
        "mean_us",
        "p99_us"
    );
    for r in reports {
        s += &format!(
            "{:<8} {:>6.2} {:>9} {:>10} {:>9} {:>10.4} {:>13} {:>11.1} {:>10.1}\n",
            r.policy,
            r.fast_ratio,
            r.fast_pages,
            r.requests,
            r.unique_pages,
            r.miss_ratio,
            r.pages_migrated,
            r.latency_us_mean,
            r.latency_us_p99
        );
    }
    s
}

/// Parses `name=.202/.143/.082,name=...`.
fn parse_reference(s: &str) -> Result<Vec<(String, [f64; 3])>, String> {
    let mut out = Vec::new();
    for item in s.split(',').filter(|x| !x.trim().is_empty()) {
        let (name, vals) = item
            .split_once('=')
            .ok_or_else(|| format!("bad reference item {item:?}"))?;
        let v: Vec<f64> = vals
            .split('/')
            .map(|x| x.trim().parse::<f64>().map_err(|e| format!("{x:?}: {e}")))
            .collect::<Result<_, _>>()?;
        if v.len() != 3 {
            return Err(format!("reference {name} needs 3 values"));
        }
        out.push((name.trim().to_ascii_lowercase(), [v[0], v[1], v[2]]));
    }
    Ok(out)
}

/// Entry point of `kiln replay`.
pub fn run(args: &ReplayArgs) -> Result<(), String> {
    if args.bench_predict {
        let rep = crate::predict::bench::run_default();
        if args.json {
            println!(
                "{}",
                serde_json::to_string_pretty(&rep).map_err(|e| e.to_string())?
            );
        } else {
            println!("{rep}");
        }
        if args.trace.is_none() {
            return Ok(());
        }
    }
    let path = args.trace.as_ref().ok_or("--trace is required")?;
    for &r in &args.fast_ratio {
        if !(r > 0.0 && r <= 1.0) {
            return Err(format!("--fast-ratio {r} is not in (0, 1]"));
        }
    }
    let t0 = std::time::Instant::now();
    let trace = trace::load(path, args.format, args.object_level)?;
    let load_s = t0.elapsed().as_secs_f64();
    if !args.json {
        println!(
            "# trace {} ({:?}{}): {} requests, {} page refs, {} unique pages, loaded in {:.2}s",
            path.display(),
            args.format,
            if args.object_level {
                ", object-level"
            } else {
                ""
            },
            trace.requests(),
            trace.pages.len(),
            trace.unique_pages(),
            load_s
        );
    }
    if let Some(reference) = &args.check_reference {
        return check_reference(&trace, reference, args);
    }
    let mut reports = Vec::new();
    for name in expand_policies(&args.policy) {
        for &ratio in &args.fast_ratio {
            reports.push(run_one(&trace, &name, ratio, args)?);
        }
    }
    let precision = if args.report_precision {
        let w = window_requests_for(&trace, args.window_requests);
        Some(predictors::precision_report(
            &trace,
            args.partition_pages,
            w,
        ))
    } else {
        None
    };
    if args.json {
        let v = serde_json::json!({ "reports": reports, "precision": precision });
        println!(
            "{}",
            serde_json::to_string_pretty(&v).map_err(|e| e.to_string())?
        );
    } else {
        print!("{}", format_table(&reports));
        if let Some(p) = precision {
            println!("{p}");
        }
    }
    Ok(())
}

fn check_reference(trace: &Trace, reference: &str, args: &ReplayArgs) -> Result<(), String> {
    let refs = parse_reference(reference)?;
    let ratios = [0.01, 0.05, 0.10];
    let mut worst = 0.0f64;
    let mut failed = Vec::new();
    let mut rows = Vec::new();
    println!(
        "{:<8} {:>24} {:>24} {:>8}",
        "policy", "kiln 1%/5%/10%", "reference", "max_err"
    );
    for (name, want) in &refs {
        let mut got = [0.0; 3];
        for (i, &r) in ratios.iter().enumerate() {
            got[i] = run_one(trace, name, r, args)?.miss_ratio;
        }
        let err = got
            .iter()
            .zip(want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        worst = worst.max(err);
        let tol_ok = err <= 0.005;
        println!(
            "{:<8} {:>8.3}/{:.3}/{:.3} {:>8.3}/{:.3}/{:.3} {:>8.4} {}",
            name,
            got[0],
            got[1],
            got[2],
            want[0],
            want[1],
            want[2],
            err,
            if tol_ok { "ok" } else { "OFF" }
        );
        rows.push((name.clone(), got, *want, err));
        if !tol_ok {
            failed.push(name.clone());
        }
    }
    if args.json {
        let v: Vec<_> = rows
            .iter()
            .map(|(n, g, w, e)| serde_json::json!({"policy": n, "got": g, "reference": w, "max_err": e}))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&v).map_err(|e| e.to_string())?
        );
    }
    println!("# worst abs error {worst:.4}");
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!("off the reference by more than 0.005: {failed:?}"))
    }
}
