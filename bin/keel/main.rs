//! `keel`: one binary for the node, the local dev cluster and the user tools.

mod access;
mod audit;
mod bench;
mod bench_delayed;
mod bench_groups;
mod bench_idle;
mod bench_move;
mod bench_net;
mod cert;
mod clock;
mod dev;
mod dev_control;
mod dlq;
mod group;
mod health;
mod node;
mod partition;
mod procstat;
mod rebalance;
mod server;
mod tools;
mod txn;

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
    /// Run a local cluster (3 nodes on 127.0.0.1) until Ctrl-C: the quick start. `keel dev
    /// kill|restart|status` act on its nodes.
    Dev(dev::DevArgs),
    /// Create, list, describe, delete topics and add partitions.
    Topic {
        #[command(subcommand)]
        command: tools::TopicCommand,
        #[command(flatten)]
        connection: tools::Connection,
    },
    /// Produce stdin lines as records; prints each record's partition and offset once acknowledged.
    Produce {
        #[command(flatten)]
        args: tools::ProduceArgs,
        #[command(flatten)]
        connection: tools::Connection,
    },
    /// Cancel delayed records (by the timer ids `keel produce --delay` printed) before they are due.
    CancelDelayed {
        /// Timer ids.
        #[arg(required = true)]
        ids: Vec<String>,
        #[command(flatten)]
        connection: tools::Connection,
    },
    /// Print records of a topic (committed records only); with --group, as a consumer-group member.
    Consume {
        #[command(flatten)]
        args: tools::ConsumeArgs,
        #[command(flatten)]
        connection: tools::Connection,
    },
    /// Consumer groups: list, describe (members, lag), reset offsets, delete.
    Group {
        #[command(subcommand)]
        command: group::GroupCommand,
        #[command(flatten)]
        connection: tools::Connection,
    },
    /// Dead-letter topics of consumer groups: list, inspect, replay to the origin topic.
    Dlq {
        #[command(subcommand)]
        command: dlq::DlqCommand,
        #[command(flatten)]
        connection: tools::Connection,
    },
    /// Check a topic for lost or duplicated records: per idempotent producer, the sequences
    /// present, the gaps between them and the duplicates (exit status 1 when it finds either).
    Audit {
        #[command(flatten)]
        args: audit::AuditArgs,
        #[command(flatten)]
        connection: tools::Connection,
    },
    /// Nodes: `keel node replace N` after node N lost its data dir.
    Node {
        #[command(subcommand)]
        command: node::NodeCommand,
        #[command(flatten)]
        connection: tools::Connection,
    },
    /// Partitions: `keel partition move TOPIC/P --replicas a,b,c`.
    Partition {
        #[command(subcommand)]
        command: partition::PartitionCommand,
        #[command(flatten)]
        connection: tools::Connection,
    },
    /// The cluster's health.
    Cluster {
        #[command(subcommand)]
        command: tools::ClusterCommand,
        #[command(flatten)]
        connection: tools::Connection,
    },
    /// Client tokens: `keel token create NAME --file TOKENS` (README, "Security").
    Token {
        #[command(subcommand)]
        command: access::TokenCommand,
    },
    /// Access rules: `keel acl add|remove|list` (README, "Security").
    Acl {
        #[command(subcommand)]
        command: access::AclCommand,
        #[command(flatten)]
        connection: tools::Connection,
    },
    /// Transactional messages: `keel txn list|resume|commit|rollback` (README, "Transactional
    /// messages").
    Txn {
        #[command(subcommand)]
        command: txn::TxnCommand,
        #[command(flatten)]
        connection: tools::Connection,
    },
    /// Make a cluster CA and node or client certificates (README, "Security").
    Cert {
        #[command(subcommand)]
        command: cert::CertCommand,
    },
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
        Command::Cert { command } => cert::run(command),
        Command::Token { command } => access::token(command),
        Command::Acl { command, connection } => access::acl(command, &connection, cli.output),
        Command::Txn { command, connection } => txn::run(command, &connection, cli.output),
        Command::Topic { command, connection } => tools::topic(command, &connection, cli.output),
        Command::Produce { args, connection } => tools::produce(args, &connection, cli.output),
        Command::Consume { args, connection } => tools::consume(args, &connection),
        Command::CancelDelayed { ids, connection } => tools::cancel_delayed(ids, &connection, cli.output),
        Command::Group { command, connection } => group::run(command, &connection, cli.output),
        Command::Dlq { command, connection } => dlq::run(command, &connection, cli.output),
        Command::Partition { command, connection } => partition::run(command, &connection, cli.output),
        Command::Node { command, connection } => node::run(command, &connection, cli.output),
        Command::Audit { args, connection } => match audit::run(args, &connection, cli.output) {
            Ok(true) => Ok(()),
            Ok(false) => return std::process::ExitCode::FAILURE,
            Err(e) => Err(e),
        },
        Command::Cluster { command, connection } => match tools::cluster(command, &connection, cli.output) {
            Ok(true) => Ok(()),
            Ok(false) => return std::process::ExitCode::FAILURE,
            Err(e) => Err(e),
        },
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
