//! `keel txn list|resume|commit|rollback` (README, "Transactional messages"): what the
//! transaction coordinators hold, and an operator's hand on a transaction whose producer never
//! answered.

use clap::Subcommand;
use keel_client::{Admin, Transactions, TxnState, TxnStatus};

use crate::Output;
use crate::tools::{Connection, runtime, table};

/// `keel txn …`
#[derive(Debug, Subcommand)]
pub enum TxnCommand {
    /// Transactions pending or expired (with --all, also those ended within the last hour).
    List {
        /// Only this producer group's.
        #[arg(long)]
        group: Option<String>,
        /// Also committed and rolled-back ones the coordinators still remember.
        #[arg(long)]
        all: bool,
    },
    /// Put a transaction the expiry policy rolled back back to pending: its producer group is
    /// checked again at once, and its answer (or a commit) then decides.
    Resume {
        /// The producer group.
        group: String,
        /// The transaction id.
        transaction_id: String,
    },
    /// Commit a transaction by hand (its producer's check-back answers are then moot).
    Commit {
        /// The producer group.
        group: String,
        /// The transaction id.
        transaction_id: String,
    },
    /// Roll a transaction back by hand (also drops an expired one for good).
    Rollback {
        /// The producer group.
        group: String,
        /// The transaction id.
        transaction_id: String,
    },
}

/// Runs a `keel txn` command.
pub fn run(command: TxnCommand, connection: &Connection, output: Output) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        let config = connection.config()?;
        let listed = match command {
            TxnCommand::List { group, all } => Admin::new(config)?.list_transactions(group.as_deref(), all).await?,
            TxnCommand::Resume { group, transaction_id } => {
                vec![Admin::new(config)?.resume_transaction(&group, &transaction_id).await?]
            }
            TxnCommand::Commit { group, transaction_id } => {
                vec![Transactions::new(config, group)?.commit(&transaction_id).await?]
            }
            TxnCommand::Rollback { group, transaction_id } => {
                vec![Transactions::new(config, group)?.rollback(&transaction_id).await?]
            }
        };
        print(&listed, output)
    })
}

fn state_name(t: &TxnStatus) -> &'static str {
    match t.state() {
        TxnState::TxnPending => "pending",
        TxnState::TxnCommitted => "committed",
        TxnState::TxnRolledBack => "rolled back",
        TxnState::TxnExpiredRolledBack => "expired (rolled back)",
        TxnState::TxnExpiredCommitted => "expired (committed)",
        TxnState::Unspecified => "?",
    }
}

fn print(listed: &[TxnStatus], output: Output) -> anyhow::Result<()> {
    match output {
        Output::Json => {
            let rows: Vec<_> = listed
                .iter()
                .map(|t| {
                    serde_json::json!({
                        "group": t.group, "transaction_id": t.transaction_id, "state": state_name(t),
                        "prepared_at_ms": t.prepared_at_ms, "ended_at_ms": t.ended_at_ms, "checks": t.checks,
                        "next_check_at_ms": t.next_check_at_ms, "records": t.records, "bytes": t.bytes,
                        "topics": t.topics,
                    })
                })
                .collect();
            println!("{}", serde_json::to_string(&rows)?);
        }
        Output::Text => {
            let mut t = table();
            t.set_header(["group", "transaction", "state", "checks", "records", "bytes", "topics", "prepared"]);
            for x in listed {
                let prepared = ago(x.prepared_at_ms);
                t.add_row([
                    x.group.clone(),
                    x.transaction_id.clone(),
                    state_name(x).to_owned(),
                    x.checks.to_string(),
                    x.records.to_string(),
                    x.bytes.to_string(),
                    x.topics.join(","),
                    prepared,
                ]);
            }
            println!("{t}");
        }
    }
    Ok(())
}

/// Milliseconds since the epoch as "N s ago" against this machine's clock.
fn ago(ms: i64) -> String {
    use keel_broker::Clock as _;
    let now = crate::clock::SystemClock.now_ms();
    format!("{} s ago", (now - ms).max(0) / 1_000)
}
