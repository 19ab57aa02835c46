//! The `kiln` command line.

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "kiln", version, about = "kiln: a polled-mode tiering block-storage engine", long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Serve tiered volumes over NBD (the embedded default config needs no arguments).
    Serve(crate::server::ServeArgs),
    /// Call a JSON-RPC method on a running server, e.g. `kiln rpc volume_get_map '{"volume":"vol0"}'`.
    Rpc(RpcArgs),
    /// Run a bdevperf-like load generator on the reactors against one device.
    Bench(crate::bench::BenchArgs),
    /// Measure an idle adaptive reactor's CPU and its first-I/O-after-idle latency.
    ProbeIdle(crate::bench::IdleProbeArgs),
    /// Replay a block I/O trace against tiering policies in virtual time.
    Replay(crate::replay::ReplayArgs),
    /// Move a whole volume to a new device while it stays online (`--follow` shows progress).
    Migrate(crate::migrate::volume_move_cli::MigrateArgs),
    /// Draw a volume's heat over time (LBA × windows, tier overlay) as SVG or PNG.
    Heatmap(crate::heatmap::HeatmapArgs),
    /// Run the shared block-device test bodies on a device (overwrites its data).
    DeviceTest(crate::bdev::tests::DeviceTestArgs),
    /// Seeded simulation: the real engine on simulated faulty devices, with crashes.
    Sim(crate::sim::SimArgs),
}

#[derive(clap::Args, Debug)]
pub struct RpcArgs {
    /// Method name, e.g. volume_list, volume_get_map, tier_list.
    pub method: String,
    /// Parameters as a JSON object.
    pub params: Option<String>,
    /// The server's RPC socket.
    #[arg(long, short = 's', default_value = "./kiln-data/kiln.sock")]
    pub socket: std::path::PathBuf,
    /// Seconds to wait for the answer.
    #[arg(long, default_value_t = 60)]
    pub timeout: u64,
}

fn run_rpc(args: &RpcArgs) -> i32 {
    let params = match args
        .params
        .as_deref()
        .map(serde_json::from_str::<serde_json::Value>)
    {
        None => None,
        Some(Ok(v)) => Some(v),
        Some(Err(e)) => {
            eprintln!("kiln rpc: parameters are not valid JSON: {e}");
            return 2;
        }
    };
    match crate::rpc::call(
        &args.socket,
        &args.method,
        params,
        std::time::Duration::from_secs(args.timeout),
    ) {
        Ok(v) => {
            use std::io::Write;
            // A closed pipe (`| head`) is not an error worth a panic.
            let _ = writeln!(
                std::io::stdout(),
                "{}",
                serde_json::to_string_pretty(&v).unwrap()
            );
            0
        }
        Err(e) => {
            eprintln!("kiln rpc: {e}");
            1
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KILN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Runs the CLI; returns the process exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    // The simulator injects faults on purpose: the engine's logs of them are noise
    // unless asked for.
    if !matches!(cli.command, Command::Sim(_)) || std::env::var_os("KILN_LOG").is_some() {
        init_tracing();
    }
    match cli.command {
        Command::Serve(args) => crate::server::serve(&args),
        Command::Rpc(args) => run_rpc(&args),
        Command::DeviceTest(args) => crate::bdev::tests::run_device_test(&args),
        Command::Migrate(args) => crate::migrate::volume_move_cli::run(&args),
        Command::Sim(args) => crate::sim::main(&args),
        Command::ProbeIdle(args) => match crate::bench::idle_probe(&args) {
            Ok(v) => {
                println!("{v}");
                0
            }
            Err(e) => {
                eprintln!("kiln probe-idle: error: {e}");
                1
            }
        },
        Command::Heatmap(args) => match crate::heatmap::run(&args) {
            Ok(msg) => {
                println!("{msg}");
                0
            }
            Err(e) => {
                eprintln!("kiln heatmap: error: {e}");
                1
            }
        },
        Command::Replay(args) => match crate::replay::run(&args) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("kiln replay: error: {e}");
                1
            }
        },
        Command::Bench(args) => match crate::bench::run_bench(&args) {
            Ok(report) => {
                if args.json {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&report.to_json()).unwrap()
                    );
                } else {
                    println!("{}", report.to_table());
                }
                let errors = report.read.errors + report.write.errors;
                if report.mismatches > 0 {
                    eprintln!(
                        "kiln bench: FAILED: {} verify mismatches",
                        report.mismatches
                    );
                    1
                } else if errors > 0 {
                    eprintln!("kiln bench: FAILED: {errors} I/O errors");
                    1
                } else {
                    0
                }
            }
            Err(e) => {
                eprintln!("kiln bench: error: {e}");
                2
            }
        },
    }
}
