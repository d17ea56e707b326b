//! `kt`: the operator command line over the public API. Presentation only:
//! every verb is one or a few calls of the generated client, shown as a
//! table, JSON or YAML; exit codes tell scripts what went wrong.

mod args;
mod client;
mod commands;
mod error;
mod input;
mod output;
mod proto_json;

use std::process::ExitCode;

use clap::Parser as _;

use crate::args::Cli;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // Usage errors exit 2, --help and --version 0 (clap's own choice).
        Err(e) => e.exit(),
    };
    match commands::run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            e.print();
            ExitCode::from(e.exit_code())
        }
    }
}
