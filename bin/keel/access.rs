//! `keel token create` and `keel acl add|remove|list` (README, "Security").

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use base64::Engine;
use clap::{Args, Subcommand};
use comfy_table::Table;
use keel_client::Admin;
use keel_proto::v1 as pb;

use crate::Output;
use crate::tools::Connection;

/// `keel token …`
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Make a token for principal NAME: prints the token (give it to the client) and appends
    /// `NAME SHA256` to the tokens file (or prints that line when no file is given).
    Create {
        /// The principal (`User:NAME` in ACLs).
        name: String,
        /// The nodes' tokens file to append to (created with mode 0600).
        #[arg(long)]
        file: Option<PathBuf>,
    },
}

/// Runs a `keel token` command.
pub fn token(command: TokenCommand) -> anyhow::Result<()> {
    match command {
        TokenCommand::Create { name, file } => {
            let (token, line) = new_token(&name)?;
            match file {
                Some(path) => {
                    append_line(&path, &line)?;
                    eprintln!("added {name}'s token hash to {}", path.display());
                }
                None => eprintln!("add this line to the nodes' tokens file:\n{line}"),
            }
            println!("{token}");
        }
    }
    Ok(())
}

/// A fresh token for `name` and the tokens-file line that admits it.
pub fn new_token(name: &str) -> anyhow::Result<(String, String)> {
    if name.is_empty() || name.len() > 255 || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c)) {
        anyhow::bail!("a principal name is 1 to 255 letters, digits and - _ . @");
    }
    let bytes: [u8; 32] = rand::random();
    let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let line = format!("{name} {}", keel_broker::auth::token_hash(&token));
    Ok((token, line))
}

/// Appends `line` to the tokens file at `path` (created 0600).
pub fn append_line(path: &std::path::Path, line: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    writeln!(file, "{line}").with_context(|| format!("writing {}", path.display()))
}

/// `keel acl …`
#[derive(Debug, Subcommand)]
pub enum AclCommand {
    /// Allow a principal an operation on a topic, group or the cluster.
    Add(RuleArgs),
    /// Remove a rule (the same arguments as it was added with).
    Remove(RuleArgs),
    /// List the rules (of one principal, with --principal).
    List {
        /// `User:NAME`.
        #[arg(long)]
        principal: Option<String>,
    },
}

/// One rule on the command line.
#[derive(Debug, Args)]
pub struct RuleArgs {
    /// `User:NAME`, or `*` for every authenticated principal.
    #[arg(long)]
    principal: String,
    /// A topic name (or prefix, with --prefix).
    #[arg(long, conflicts_with_all = ["group", "cluster"])]
    topic: Option<String>,
    /// A group name (or prefix, with --prefix).
    #[arg(long, conflicts_with_all = ["topic", "cluster"])]
    group: Option<String>,
    /// The cluster itself (operations admin, describe).
    #[arg(long, conflicts_with_all = ["topic", "group"])]
    cluster: bool,
    /// The name is a prefix (an empty one: every topic or group).
    #[arg(long)]
    prefix: bool,
    /// produce, consume, describe, create, delete, alter (topics); join, describe, delete
    /// (groups); admin, describe (cluster).
    #[arg(long)]
    operation: String,
}

impl RuleArgs {
    fn rule(self) -> anyhow::Result<pb::AclRule> {
        let principal = if self.principal == "*" || self.principal.starts_with("User:") {
            self.principal
        } else {
            format!("User:{}", self.principal)
        };
        let (resource_type, name) = match (self.topic, self.group, self.cluster) {
            (Some(t), None, false) => ("topic", t),
            (None, Some(g), false) => ("group", g),
            (None, None, true) => ("cluster", String::new()),
            _ => anyhow::bail!("name one of --topic, --group or --cluster"),
        };
        Ok(pb::AclRule {
            principal,
            resource_type: resource_type.into(),
            name,
            prefix: self.prefix,
            operation: self.operation.to_lowercase(),
        })
    }
}

/// Runs a `keel acl` command.
pub fn acl(command: AclCommand, connection: &Connection, output: Output) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let admin = Admin::new(connection.config()?)?;
        match command {
            AclCommand::Add(args) => admin.add_acl(args.rule()?).await?,
            AclCommand::Remove(args) => admin.remove_acl(args.rule()?).await?,
            AclCommand::List { principal } => {
                let rules = admin.list_acls(principal.as_deref()).await?;
                print_rules(&rules, output)?;
            }
        }
        Ok(())
    })
}

fn print_rules(rules: &[pb::AclRule], output: Output) -> anyhow::Result<()> {
    match output {
        Output::Json => {
            let rules: Vec<_> = rules
                .iter()
                .map(|r| {
                    serde_json::json!({
                        "principal": r.principal, "resource_type": r.resource_type, "name": r.name,
                        "prefix": r.prefix, "operation": r.operation,
                    })
                })
                .collect();
            println!("{}", serde_json::to_string(&rules)?);
        }
        Output::Text => {
            let mut table = Table::new();
            table.load_preset(comfy_table::presets::UTF8_BORDERS_ONLY);
            table.set_header(["principal", "resource", "name", "match", "operation"]);
            for r in rules {
                let matching = if r.prefix { "prefix" } else { "literal" };
                table.add_row([&r.principal, &r.resource_type, &r.name, matching, &r.operation]);
            }
            println!("{table}");
        }
    }
    Ok(())
}
