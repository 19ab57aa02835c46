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
    /// Run a bdevperf-like load generator on the reactors against one device.
    Bench(crate::bench::BenchArgs),
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KILN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}

/// Runs the CLI; returns the process exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    init_tracing();
    match cli.command {
        Command::Bench(args) => match crate::bench::run_bench(&args) {
            Ok(report) => {
                if args.json {
                    println!("{}", serde_json::to_string_pretty(&report.to_json()).unwrap());
                } else {
                    println!("{}", report.to_table());
                }
                let errors = report.read.errors + report.write.errors;
                if report.mismatches > 0 {
                    eprintln!("kiln bench: FAILED: {} verify mismatches", report.mismatches);
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
