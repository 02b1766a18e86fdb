//! `keel`: one binary for the node, the local dev cluster and the user tools.

mod bench;
mod clock;
mod dev;
mod health;
mod server;

use clap::{Parser, Subcommand, ValueEnum};

/// Keel: a replicated log whose acknowledged records are never lost.
#[derive(Debug, Parser)]
#[command(name = "keel", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Output format: human-readable text, or JSON for scripts.
    #[arg(long, global = true, value_enum, default_value_t = Output::Text)]
    output: Output,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run one Keel node.
    Server(server::ServerArgs),
    /// Run a local cluster (3 nodes on 127.0.0.1) until Ctrl-C: the quick start.
    Dev(dev::DevArgs),
    /// Measure Keel's speed.
    Bench {
        #[command(subcommand)]
        what: bench::BenchCommand,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // A node logs its life at info; the user tools only speak up when something is wrong.
    let default = if matches!(cli.command, Command::Server(_)) { "info,openraft=warn" } else { "warn" };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("KEEL_LOG").unwrap_or_else(|_| default.into()))
        .init();
    let result = match cli.command {
        Command::Bench { what } => bench::run(what, cli.output),
        Command::Server(args) => server::run(args),
        Command::Dev(args) => dev::run(args, cli.output),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
