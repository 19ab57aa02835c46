//! `kiln migrate --volume vol0 --to <spec> [--follow]`: starts a whole-volume
//! migration over JSON-RPC and, with `--follow`, draws its progress (bytes,
//! rate, ETA) by polling `volume_migrate_status`.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Value};

#[derive(clap::Args, Debug)]
pub struct MigrateArgs {
    /// The volume to move.
    #[arg(long)]
    pub volume: String,
    /// Destination: a device spec (e.g. `file:/data/new.img?size=8GiB`) or an existing tier name.
    #[arg(long)]
    pub to: String,
    /// naive (1 MiB sequential), fixed (--chunk sequential), adaptive (heat-adaptive + prefetch).
    #[arg(long, default_value = "adaptive")]
    pub mode: String,
    /// Name of the new tier (default `<volume>-dstN`).
    #[arg(long)]
    pub name: Option<String>,
    /// Chunk bounds and the fixed mode's chunk size.
    #[arg(long, default_value = "64KiB")]
    pub chunk_min: String,
    #[arg(long, default_value = "64MiB")]
    pub chunk_max: String,
    #[arg(long, default_value = "8MiB")]
    pub chunk: String,
    /// Copy rate cap in MiB/s (0: none).
    #[arg(long, default_value_t = 0)]
    pub rate_mib_s: u64,
    /// Follow the migration with a progress bar until it ends.
    #[arg(long)]
    pub follow: bool,
    /// The server's RPC socket.
    #[arg(long, short = 's', default_value = "./kiln-data/kiln.sock")]
    pub socket: PathBuf,
}

fn call(args: &MigrateArgs, method: &str, params: Value) -> Result<Value, String> {
    crate::rpc::call(&args.socket, method, Some(params), Duration::from_secs(120))
        .map_err(|e| e.to_string())
}

/// Runs the command; returns the exit code.
pub fn run(args: &MigrateArgs) -> i32 {
    match run_inner(args) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("kiln migrate: error: {e}");
            1
        }
    }
}

fn run_inner(args: &MigrateArgs) -> Result<(), String> {
    let mut params = json!({
        "volume": args.volume, "destination": args.to, "mode": args.mode,
        "chunk_min": args.chunk_min, "chunk_max": args.chunk_max, "chunk": args.chunk,
        "rate_mib_s": args.rate_mib_s,
    });
    if let Some(n) = &args.name {
        params["name"] = json!(n);
    }
    let started = call(args, "volume_migrate", params)?;
    println!(
        "migrating volume '{}' to tier '{}' ({} mode)",
        args.volume,
        started["destination"].as_str().unwrap_or("?"),
        started["mode"].as_str().unwrap_or("?")
    );
    if !args.follow {
        return Ok(());
    }
    let bar = indicatif::ProgressBar::new(1);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] [{wide_bar}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta} {msg}",
        )
        .map_err(|e| e.to_string())?
        .progress_chars("=> "),
    );
    loop {
        let st = call(
            args,
            "volume_migrate_status",
            json!({"volume": args.volume}),
        )?;
        let n = |k: &str| st[k].as_u64().unwrap_or(0);
        bar.set_length(n("total_bytes").max(1));
        bar.set_position(n("done_bytes"));
        bar.set_message(format!(
            "hot {} chunks, queue {}",
            n("hot_chunks"),
            n("prefetch_queue")
        ));
        match st["state"].as_str() {
            Some("done") => {
                bar.finish();
                println!(
                    "done: {} bytes moved in {:.1} s, source trimmed {} bytes",
                    n("moved_bytes"),
                    st["elapsed_s"].as_f64().unwrap_or(0.0),
                    n("source_trimmed_bytes")
                );
                return Ok(());
            }
            Some("failed") | Some("interrupted") => {
                bar.abandon();
                return Err(format!(
                    "migration {}: {}",
                    st["state"].as_str().unwrap_or("?"),
                    st["error"].as_str().unwrap_or("no reason given")
                ));
            }
            _ => std::thread::sleep(Duration::from_millis(250)),
        }
    }
}
