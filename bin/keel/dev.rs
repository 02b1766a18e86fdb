//! `keel dev`: a local cluster in one command. Starts N nodes (`keel server`) as child processes
//! on 127.0.0.1, waits until every one is healthy, prints where they are, and stops them on
//! Ctrl-C. Data and logs stay under `--dir`, so a second run resumes the same cluster.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use comfy_table::Table;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::Output;
use crate::clock::Stopwatch;

/// Flags of `keel dev`.
#[derive(Debug, Args)]
pub struct DevArgs {
    /// How many nodes (all of them metadata voters).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=9))]
    nodes: u64,
    /// Where data and logs go.
    #[arg(long, default_value = "keel-dev")]
    dir: PathBuf,
    /// Port of node 1; node N listens on port + N - 1.
    #[arg(long, default_value_t = 9091)]
    port: u16,
    /// Give up if the cluster is not healthy after this many seconds.
    #[arg(long, default_value_t = 60)]
    wait_secs: u64,
}

#[derive(Debug, Serialize)]
struct DevNode {
    node_id: u64,
    addr: String,
    pid: u32,
    data_dir: String,
    log: String,
}

/// Kills the children when dropped, so an error or a panic never leaves nodes behind.
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for child in &mut self.0 {
            // SAFETY: kill(2) on our own child's pid has no memory effects.
            unsafe {
                libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
            }
        }
        for child in &mut self.0 {
            let _ = child.wait();
        }
    }
}

pub fn run(args: DevArgs, output: Output) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("finding the keel binary")?;
    std::fs::create_dir_all(&args.dir).with_context(|| format!("creating {}", args.dir.display()))?;
    let addrs: Vec<String> =
        (0..args.nodes).map(|i| format!("127.0.0.1:{}", u64::from(args.port) + i)).collect::<Vec<_>>();
    let voters = addrs.iter().enumerate().map(|(i, a)| format!("{}@{a}", i + 1)).collect::<Vec<_>>().join(",");
    let mut children = Children(Vec::new());
    let mut nodes = Vec::new();
    for (i, addr) in addrs.iter().enumerate() {
        let id = i as u64 + 1;
        let data_dir = args.dir.join(format!("node-{id}"));
        let log_path = args.dir.join(format!("node-{id}.log"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        let mut command = Command::new(&exe);
        // SAFETY: prctl(2) is async-signal-safe and touches no memory of the parent; it runs in
        // the forked child before exec. It makes the node stop if `keel dev` itself dies, even
        // by SIGKILL, so no orphaned nodes keep the ports.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut command, || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command
            .arg("server")
            .args(["--node-id", &id.to_string(), "--listen", addr, "--voters", &voters])
            .arg("--data-dir")
            .arg(&data_dir)
            .env_remove("KEEL_CONFIG")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting node {id}"))?;
        nodes.push(DevNode {
            node_id: id,
            addr: addr.clone(),
            pid: child.id(),
            data_dir: data_dir.display().to_string(),
            log: log_path.display().to_string(),
        });
        children.0.push(child);
    }
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(wait_healthy(&addrs, &mut children, Duration::from_secs(args.wait_secs), output))?;
    let bootstrap = addrs.join(",");
    match output {
        Output::Json => {
            println!("{}", serde_json::to_string(&serde_json::json!({ "bootstrap": bootstrap, "nodes": nodes }))?)
        }
        Output::Text => {
            let mut table = Table::new();
            table.load_preset(comfy_table::presets::UTF8_BORDERS_ONLY);
            table.set_header(["node", "address", "pid", "data", "log"]);
            for n in &nodes {
                table.add_row([
                    n.node_id.to_string(),
                    n.addr.clone(),
                    n.pid.to_string(),
                    n.data_dir.clone(),
                    n.log.clone(),
                ]);
            }
            println!("{table}");
            println!("Keel is running. In another shell:\n");
            println!("export KEEL_BOOTSTRAP={bootstrap}");
            println!("\nPress Ctrl-C to stop the cluster.");
        }
    }
    runtime.block_on(watch(&mut children))
}

/// Waits until every node answers SERVING on grpc.health.v1, failing early if one exits.
async fn wait_healthy(addrs: &[String], children: &mut Children, wait: Duration, output: Output) -> anyhow::Result<()> {
    let bar = if output == Output::Text { ProgressBar::new_spinner() } else { ProgressBar::hidden() };
    bar.set_style(ProgressStyle::with_template("{spinner} {msg}")?);
    bar.enable_steady_tick(Duration::from_millis(120));
    let started = Stopwatch::start();
    loop {
        for (i, child) in children.0.iter_mut().enumerate() {
            if let Some(status) = child.try_wait()? {
                bar.finish_and_clear();
                bail!("node {} exited during startup ({status}); see its log", i + 1);
            }
        }
        let mut healthy = 0;
        for addr in addrs {
            if crate::health::serving(addr).await {
                healthy += 1;
            }
        }
        bar.set_message(format!("waiting for the cluster: {healthy}/{} nodes healthy", addrs.len()));
        if healthy == addrs.len() {
            bar.finish_and_clear();
            return Ok(());
        }
        if started.elapsed() > wait {
            bar.finish_and_clear();
            bail!("the cluster was not healthy after {} s; see the node logs", wait.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Runs until Ctrl-C (then stops the nodes) or until a node dies (then stops the rest).
async fn watch(children: &mut Children) -> anyhow::Result<()> {
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {
                eprintln!("stopping the cluster…");
                return Ok(());
            }
            _ = tokio::time::sleep(Duration::from_millis(500)) => {
                for (i, child) in children.0.iter_mut().enumerate() {
                    if let Some(status) = child.try_wait()? {
                        bail!("node {} exited ({status}); stopping the others", i + 1);
                    }
                }
            }
        }
    }
}
