//! The `quorumkv-bench` binary: parses the command line and hands it to the library (see the
//! crate docs of `quorumkv_bench` for the modes).
//!
//! Ctrl-C stops the run without a report; every process the run started is stopped by its
//! guard as the run is dropped.

use clap::Parser as _;
use quorumkv_bench::cli::Cli;
use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let json = cli.json;
    tokio::select! {
        result = quorumkv_bench::main_with(cli) => match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                if json {
                    let message = serde_json::json!({ "error": format!("{error:#}") });
                    eprintln!("{message}");
                } else {
                    eprintln!("error: {error:#}");
                }
                ExitCode::FAILURE
            }
        },
        _ = tokio::signal::ctrl_c() => {
            eprintln!("interrupted");
            ExitCode::from(130)
        }
    }
}
