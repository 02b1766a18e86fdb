//! `keel dev`: a local cluster in one command. Starts N nodes (`keel server`) as child processes
//! on 127.0.0.1, waits until every one is healthy, prints where they are, and supervises them
//! until Ctrl-C. A node that dies is reported and the others keep running, so that faults can
//! be tried locally; `keel dev kill|restart|status` reach the supervisor through its control
//! socket (`dev_control.rs`). Data and logs stay under `--dir`, so a second run resumes the same
//! cluster.

use std::io::{Read, Seek, SeekFrom};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::ThreadId;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use comfy_table::Table;
use indicatif::{ProgressBar, ProgressStyle};

use crate::Output;
use crate::clock::Stopwatch;
use crate::dev_control::{self, ControlSocket, DevCommand, DirLock, NodeStatus, Replies, Signal, State, command_hint};

/// How long a node may take to stop after SIGTERM before it gets SIGKILL: a node's own grace
/// period for open requests (`shutdown_grace_ms`, 10 s by default) and some slack.
pub const STOP_WAIT: Duration = Duration::from_secs(15);
/// How long a node may take to be gone after SIGKILL (or to stop or resume after SIGSTOP or
/// SIGCONT): only the kernel is involved.
pub const KILL_WAIT: Duration = Duration::from_secs(5);
/// How often the supervisor looks for nodes that exited; a death is reported within this.
const REAP_EVERY: Duration = Duration::from_millis(200);
/// How often a waiting request looks again.
const POLL: Duration = Duration::from_millis(50);
/// Error messages quote the end of a node's log: at most this many bytes, and lines of them.
const LOG_TAIL_BYTES: u64 = 4096;
const LOG_TAIL_LINES: usize = 12;

/// `keel dev`: start a cluster, or, with a subcommand, act on the running one.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct DevArgs {
    #[command(subcommand)]
    command: Option<DevCommand>,
    #[command(flatten)]
    start: StartArgs,
}

/// Flags of `keel dev` itself (starting the cluster).
#[derive(Debug, Args)]
struct StartArgs {
    /// How many nodes.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=9))]
    nodes: u64,
    /// How many of them (the first ones) start as metadata voters; the others hold partitions
    /// only until `keel partition move __meta/0 --replicas ...` makes them voters. Defaults to
    /// every node. A dev cluster admits new nodes (`keel server --admit-new-nodes`), so a node
    /// started by hand with the cluster's `--voters` joins it.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=9))]
    voters: Option<u64>,
    /// Where data and logs go (and the control socket of `keel dev kill|restart|status`).
    #[arg(long, default_value = dev_control::DIR_DEFAULT)]
    dir: PathBuf,
    /// Address the nodes listen on; another loopback address (127.0.0.2, …) runs a second
    /// cluster beside the first.
    #[arg(long, default_value_t = IpAddr::V4(Ipv4Addr::LOCALHOST))]
    ip: IpAddr,
    /// Port of node 1; node N listens on port + N - 1.
    #[arg(long, default_value_t = 9091)]
    port: u16,
    /// Port of node 1's `/metrics` listener; node N's is this + N - 1. Defaults to --port + 100.
    #[arg(long)]
    metrics_port: Option<u16>,
    /// Give up if the cluster is not healthy after this many seconds.
    #[arg(long, default_value_t = 60)]
    wait_secs: u64,
    /// Run the nodes in plaintext, without TLS (by default `keel dev` makes a CA and node
    /// certificates in DIR/tls and serves TLS).
    #[arg(long)]
    insecure: bool,
    /// A node config file (TOML, as `keel server --config`) every node reads, for settings that
    /// have no flag here (`flush_scope`, `raft_quiesce`, timings, limits…); the addresses, data
    /// directories and TLS files `keel dev` passes as flags win over the file's.
    #[arg(long, value_name = "FILE")]
    node_config: Option<PathBuf>,
}

/// Where `keel dev` keeps its CA and certificates.
pub fn tls_dir(dir: &Path) -> PathBuf {
    dir.join("tls")
}

/// The TLS a client of the `keel dev` cluster in `dir` needs: its CA, if it made one and its
/// nodes serve TLS.
pub fn client_tls(dir: &Path) -> Option<tonic::transport::ClientTlsConfig> {
    let ca = std::fs::read(tls_dir(dir).join("ca.pem")).ok()?;
    Some(tonic::transport::ClientTlsConfig::new().ca_certificate(tonic::transport::Certificate::from_pem(ca)))
}

pub fn run(args: DevArgs, output: Output) -> anyhow::Result<()> {
    match args.command {
        Some(command) => dev_control::run(command, output),
        None => start(args.start, output),
    }
}

/// The supervisor, shared by its main loop and the control requests it serves. Everything runs
/// on one thread (see `Supervisor::start_node`); the lock is never held across an await.
pub type Shared = Arc<Mutex<Supervisor>>;

/// Locks the supervisor. A panic while it was held is a bug that was already printed; the node
/// table is still good enough to stop the nodes, which matters more, so poisoning is ignored.
fn lock(shared: &Shared) -> MutexGuard<'_, Supervisor> {
    shared.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One node: how it is started, and its current process.
struct Slot {
    id: u64,
    addr: String,
    /// The node's peer listener (HOST:PORT): the client port + 1000.
    peer_addr: String,
    /// The node's `/metrics` listener (HOST:PORT).
    metrics_addr: String,
    data_dir: PathBuf,
    log: PathBuf,
    /// The running process; `None` once it exited and was reaped.
    child: Option<Child>,
    /// The pid of the current process, or of the last one.
    pid: u32,
    /// How the last process ended; `None` also when waiting for it failed.
    last_exit: Option<ExitStatus>,
    restarts: u64,
    /// A restart is under way; a second one is refused.
    restarting: bool,
    /// The supervisor itself is stopping this process for a restart: its exit is no death.
    stopping: bool,
}

/// The nodes of one `keel dev` and how to start them.
pub struct Supervisor {
    exe: PathBuf,
    voters: String,
    dir: PathBuf,
    /// The nodes serve TLS with the certificates in `tls_dir(dir)`; `None`: plaintext.
    tls: Option<tonic::transport::ClientTlsConfig>,
    /// The config file every node reads (`--node-config`).
    node_config: Option<PathBuf>,
    nodes: Vec<Slot>,
    /// The cluster was healthy once. Before that, a node exiting fails the start (the cause is
    /// likely to hit every node: a port in use, a bad data dir) instead of being reported.
    started: bool,
    /// The thread every node is forked from (see `start_node`).
    thread: ThreadId,
}

/// Worker threads per node of a dev cluster of `nodes`: the machine's cores shared out, at
/// least one each.
fn dev_worker_threads(nodes: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    (cores / nodes.max(1)).max(1)
}

/// The absolute path of `--node-config` (nodes may run in another directory), checked to exist
/// before any node starts.
fn node_config(file: Option<&Path>) -> anyhow::Result<Option<PathBuf>> {
    let Some(file) = file else { return Ok(None) };
    let path = std::fs::canonicalize(file).with_context(|| format!("--node-config {}", file.display()))?;
    Ok(Some(path))
}

fn start(args: StartArgs, output: Output) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("finding the keel binary")?;
    std::fs::create_dir_all(&args.dir).with_context(|| format!("creating {}", args.dir.display()))?;
    // `nodes` is at most 9 (clap checks it).
    let port_last = u64::from(args.port) + args.nodes - 1;
    if port_last > u64::from(u16::MAX) {
        bail!(
            "--port {} leaves no room for {} nodes (the last would listen on port {port_last})",
            args.port,
            args.nodes
        );
    }
    let metrics_port = match args.metrics_port {
        Some(port) => u64::from(port),
        None => u64::from(args.port) + 100,
    };
    let metrics_last = metrics_port + args.nodes - 1;
    if metrics_last > u64::from(u16::MAX) {
        bail!("the metrics ports {metrics_port}..={metrics_last} do not fit; pass another --metrics-port");
    }
    if metrics_port <= port_last && u64::from(args.port) <= metrics_last {
        bail!(
            "the metrics ports {metrics_port}..={metrics_last} overlap the node ports {}..={port_last}; \
             pass another --metrics-port",
            args.port
        );
    }
    let peer_port = u64::from(args.port) + u64::from(crate::server::PEER_PORT_OFFSET);
    let peer_last = peer_port + args.nodes - 1;
    if peer_last > u64::from(u16::MAX) {
        bail!("the peer ports {peer_port}..={peer_last} (client port + 1000) do not fit; pass another --port");
    }
    if metrics_port <= peer_last && peer_port <= metrics_last {
        bail!(
            "the metrics ports {metrics_port}..={metrics_last} overlap the peer ports {peer_port}..={peer_last}; \
             pass another --metrics-port"
        );
    }
    // Before anything is started: a second `keel dev` on this directory stops here.
    let dir_lock = DirLock::acquire(&args.dir)?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let socket = {
        let _context = runtime.enter();
        ControlSocket::bind(&args.dir, &dir_lock)?
    };
    let addrs: Vec<String> =
        (0..args.nodes).map(|i| SocketAddr::new(args.ip, args.port + i as u16).to_string()).collect();
    // Checked above: every peer port fits in a u16.
    let peer_addrs: Vec<String> = (0..args.nodes)
        .map(|i| SocketAddr::new(args.ip, u16::try_from(peer_port + i).unwrap_or(u16::MAX)).to_string())
        .collect();
    let voter_count = args.voters.unwrap_or(args.nodes);
    if voter_count > args.nodes {
        bail!("--voters {voter_count} is more than the {} nodes", args.nodes);
    }
    let voters = peer_addrs
        .iter()
        .take(voter_count as usize)
        .enumerate()
        .map(|(i, a)| format!("{}@{a}", i + 1))
        .collect::<Vec<_>>()
        .join(",");
    let nodes = addrs
        .iter()
        .enumerate()
        .map(|(i, addr)| {
            let id = i as u64 + 1;
            // Checked above: every metrics port fits in a u16.
            let port = u16::try_from(metrics_port + i as u64).unwrap_or(u16::MAX);
            Slot {
                id,
                addr: addr.clone(),
                peer_addr: peer_addrs[i].clone(),
                metrics_addr: SocketAddr::new(args.ip, port).to_string(),
                data_dir: args.dir.join(format!("node-{id}")),
                log: args.dir.join(format!("node-{id}.log")),
                child: None,
                pid: 0,
                last_exit: None,
                restarts: 0,
                restarting: false,
                stopping: false,
            }
        })
        .collect();
    let tls = if args.insecure {
        // A CA left from an earlier TLS run would make `keel dev status` speak TLS to these.
        let _ = std::fs::remove_dir_all(tls_dir(&args.dir));
        None
    } else {
        let tls = tls_dir(&args.dir);
        if !tls.join("ca.pem").exists() {
            crate::cert::create_ca(&tls)?;
        }
        let hosts = [args.ip.to_string(), "localhost".to_owned()];
        for id in 1..=args.nodes {
            crate::cert::issue_node(&tls, id, &hosts)?;
        }
        // The `dev` superuser's token, kept for the next run (the tokens file holds its hash).
        if !tls.join("dev.token").exists() {
            let (token, line) = crate::access::new_token("dev")?;
            crate::access::append_line(&tls.join("tokens"), &line)?;
            crate::cert::write_secret(&tls.join("dev.token"), &token)?;
        }
        client_tls(&args.dir)
    };

    let supervisor = Supervisor {
        exe,
        voters,
        dir: args.dir.clone(),
        tls,
        node_config: node_config(args.node_config.as_deref())?,
        nodes,
        started: false,
        thread: std::thread::current().id(),
    };
    // Dropping the supervisor stops the nodes, so an error or a panic never leaves them behind.
    let shared: Shared = Arc::new(Mutex::new(supervisor));
    for i in 0..addrs.len() {
        lock(&shared).start_node(i)?;
    }
    let result = runtime.block_on(supervise(&shared, &socket, &args, output));
    // The control requests in flight hold the supervisor too: dropping the runtime cancels them,
    // and the last reference, dropped here, stops the nodes before the socket and the lock go.
    drop(runtime);
    drop(shared);
    drop(socket);
    drop(dir_lock);
    result
}

/// Runs until SIGINT or SIGTERM: waits until the cluster is healthy, prints it, then reports
/// deaths and serves the control socket.
async fn supervise(shared: &Shared, socket: &ControlSocket, args: &StartArgs, output: Output) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let stop = async {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
    };
    tokio::pin!(stop);
    // Served from the start, so that `keel dev status` works while the cluster comes up.
    let serve = dev_control::serve(&socket.listener, shared.clone());
    tokio::pin!(serve);
    tokio::select! {
        biased;
        () = &mut stop => {
            eprintln!("stopping the cluster…");
            return Ok(());
        }
        () = &mut serve => bail!("the control socket stopped"),
        healthy = wait_healthy(shared, Duration::from_secs(args.wait_secs), output) => healthy?,
    }
    let nodes: Vec<NodeStatus> = {
        let mut supervisor = lock(shared);
        supervisor.started = true;
        (0..supervisor.nodes.len()).map(|i| supervisor.node_status(i)).collect()
    };
    let bootstrap = nodes.iter().map(|n| n.addr.clone()).collect::<Vec<_>>().join(",");
    let token = match args.insecure {
        true => None,
        false => Some(
            std::fs::read_to_string(tls_dir(&args.dir).join("dev.token"))
                .context("reading keel dev's token")?
                .trim()
                .to_owned(),
        ),
    };
    match output {
        Output::Json => {
            let control_socket = dev_control::socket_path(&args.dir).display().to_string();
            let ca_file = (!args.insecure).then(|| tls_dir(&args.dir).join("ca.pem").display().to_string());
            let started = serde_json::json!({
                "bootstrap": bootstrap, "nodes": nodes, "control_socket": control_socket, "ca_file": ca_file,
                "token": token,
            });
            println!("{}", serde_json::to_string(&started)?)
        }
        Output::Text => {
            let mut table = Table::new();
            table.load_preset(comfy_table::presets::UTF8_BORDERS_ONLY);
            table.set_header(["node", "address", "metrics", "pid", "data", "log"]);
            for n in &nodes {
                table.add_row([
                    n.node_id.to_string(),
                    n.addr.clone(),
                    n.metrics.clone(),
                    n.pid.to_string(),
                    n.data_dir.clone(),
                    n.log.clone(),
                ]);
            }
            println!("{table}");
            println!("Keel is running. In another shell:\n");
            println!("export KEEL_BOOTSTRAP={bootstrap}");
            if let Some(token) = &token {
                println!("export KEEL_CA_FILE={}", tls_dir(&args.dir).join("ca.pem").display());
                println!("export KEEL_TOKEN={token}");
            }
            if let Some(first) = nodes.first() {
                println!("\nMetrics (Prometheus text): curl -s {}", first.metrics);
            }
            let victim = args.nodes.min(2);
            println!(
                "\nTry a node failure: `{}` (--signal kill|term|stop|cont), then `{}`; `{}` lists the nodes.",
                command_hint(&args.dir, &format!("kill {victim}")),
                command_hint(&args.dir, &format!("restart {victim}")),
                command_hint(&args.dir, "status")
            );
            println!("Press Ctrl-C to stop the cluster.");
        }
    }
    let reap = async {
        loop {
            tokio::time::sleep(REAP_EVERY).await;
            lock(shared).reap();
        }
    };
    tokio::select! {
        biased;
        () = &mut stop => {}
        () = &mut serve => bail!("the control socket stopped"),
        _ = reap => {}
    }
    eprintln!("stopping the cluster…");
    Ok(())
}

/// Waits until every node answers SERVING on grpc.health.v1, failing early if one exits.
async fn wait_healthy(shared: &Shared, wait: Duration, output: Output) -> anyhow::Result<()> {
    let bar = if output == Output::Text { ProgressBar::new_spinner() } else { ProgressBar::hidden() };
    bar.set_style(ProgressStyle::with_template("{spinner} {msg}")?);
    bar.enable_steady_tick(Duration::from_millis(120));
    let addrs: Vec<String> = lock(shared).nodes.iter().map(|n| n.addr.clone()).collect();
    let tls = lock(shared).tls.clone();
    let started = Stopwatch::start();
    loop {
        let exited = {
            let mut supervisor = lock(shared);
            supervisor.reap();
            supervisor.nodes.iter().find(|n| n.child.is_none()).map(|n| {
                format!(
                    "node {} exited during startup ({}); the end of {}:\n{}",
                    n.id,
                    exit_text(n.last_exit),
                    n.log.display(),
                    log_tail(&n.log)
                )
            })
        };
        if let Some(exited) = exited {
            bar.finish_and_clear();
            bail!(exited);
        }
        let mut healthy = 0;
        for addr in &addrs {
            if crate::health::serving(addr, tls.as_ref()).await {
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

impl Supervisor {
    /// Starts node `i`'s process with the node's arguments, data dir and log (appended to).
    fn start_node(&mut self, i: usize) -> anyhow::Result<u32> {
        // PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, not the process.
        // So every node is forked on the thread that runs the supervisor (the current-thread
        // runtime's, for the supervisor's whole life), never on a pool thread that could exit
        // when idle and take its nodes with it.
        assert_eq!(std::thread::current().id(), self.thread, "nodes are forked on the supervisor's thread");
        let workers = dev_worker_threads(self.nodes.len());
        let slot = &mut self.nodes[i];
        assert!(slot.child.is_none(), "node {} is started while its process runs", slot.id);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&slot.log)
            .with_context(|| format!("opening {}", slot.log.display()))?;
        let parent = std::process::id();
        let mut command = Command::new(&self.exe);
        // A process group of its own: a Ctrl-C in the terminal reaches the supervisor alone,
        // which stops the nodes itself, instead of also reaching every node and making their
        // exits look like deaths.
        command.process_group(0);
        // SAFETY: prctl(2) and getppid(2) are async-signal-safe, and the closure neither
        // allocates nor touches the parent's memory; it runs in the forked child before exec. It
        // makes the node stop if `keel dev` itself dies, even by SIGKILL, so no orphaned nodes
        // keep the ports.
        unsafe {
            command.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The supervisor may have died between fork and prctl, and then no signal comes.
                if libc::getppid() as u32 != parent {
                    return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
        command
            .arg("server")
            .args(["--node-id", &slot.id.to_string(), "--listen", &slot.addr, "--voters", &self.voters])
            .args(["--peer-listen", &slot.peer_addr, "--metrics-listen", &slot.metrics_addr]);
        // Nodes beyond the voters, and any started by hand, join: a dev cluster is where one
        // tries adding a node.
        command.args(["--admit-new-nodes", "true"]);
        if self.tls.is_some() {
            let tls = tls_dir(&self.dir);
            command
                .arg("--tls-cert-file")
                .arg(tls.join(format!("node-{}.pem", slot.id)))
                .arg("--tls-key-file")
                .arg(tls.join(format!("node-{}.key", slot.id)))
                .arg("--tls-ca-file")
                .arg(tls.join("ca.pem"))
                .arg("--tokens-file")
                .arg(tls.join("tokens"))
                .args(["--superusers", "dev"]);
        } else {
            command.arg("--insecure");
        }
        if let Some(file) = &self.node_config {
            command.arg("--config").arg(file);
        }
        // The nodes share this machine's cores: a worker thread per core in each would make
        // every node's tasks wake each other's threads across cores for nothing (one record in
        // flight on 3 nodes and 2 cores: 40 -> 28 context switches per record, p50 0.92 -> 0.87
        // ms; README, "Performance"). A TOKIO_WORKER_THREADS set by the user wins.
        if std::env::var_os("TOKIO_WORKER_THREADS").is_none() {
            command.env("TOKIO_WORKER_THREADS", workers.to_string());
        }
        let child = command
            .arg("--data-dir")
            .arg(&slot.data_dir)
            .env_remove("KEEL_CONFIG")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting node {}", slot.id))?;
        slot.pid = child.id();
        slot.child = Some(child);
        slot.stopping = false;
        Ok(slot.pid)
    }

    /// Collects the nodes that exited and reports each death once.
    fn reap(&mut self) {
        let mut exited = Vec::new();
        for (i, slot) in self.nodes.iter_mut().enumerate() {
            let Some(child) = slot.child.as_mut() else { continue };
            slot.last_exit = match child.try_wait() {
                Ok(None) => continue,
                Ok(Some(status)) => Some(status),
                Err(e) => {
                    // Only if something else reaped our child (nothing in Keel does): it is gone
                    // either way, and its status is lost.
                    eprintln!("keel dev: waiting for node {} (pid {}): {e}", slot.id, slot.pid);
                    None
                }
            };
            slot.child = None;
            exited.push(i);
        }
        for i in exited {
            self.report_exit(i);
        }
    }

    fn report_exit(&mut self, i: usize) {
        let running: Vec<String> = self.nodes.iter().filter(|n| n.child.is_some()).map(|n| n.id.to_string()).collect();
        let slot = &mut self.nodes[i];
        let how = exit_text(slot.last_exit);
        if slot.stopping {
            slot.stopping = false;
            eprintln!("keel dev: node {} (pid {}) stopped for its restart ({how})", slot.id, slot.pid);
            return;
        }
        if !self.started {
            // `wait_healthy` fails the start with this node's log.
            return;
        }
        let others = match running.len() {
            0 => "no node is running now".to_string(),
            1 => format!("node {} keeps running", running[0]),
            _ => format!("nodes {} keep running", running.join(", ")),
        };
        eprintln!(
            "keel dev: node {} (pid {}) exited ({how}); {others}. Log: {}. Bring it back: {}",
            slot.id,
            slot.pid,
            slot.log.display(),
            command_hint(&self.dir, &format!("restart {}", slot.id))
        );
    }

    /// Sends `signal` to node `i`'s process; its pid.
    fn signal(&self, i: usize, signal: libc::c_int) -> Result<u32, String> {
        let slot = &self.nodes[i];
        let Some(child) = slot.child.as_ref() else {
            return Err(format!(
                "node {} is not running (its last process exited: {}); `{}` starts it",
                slot.id,
                exit_text(slot.last_exit),
                command_hint(&self.dir, &format!("restart {}", slot.id))
            ));
        };
        let pid = child.id();
        // SAFETY: kill(2) has no memory effects. The child is not reaped yet, so its pid cannot
        // have been reused by another process.
        if unsafe { libc::kill(pid as libc::pid_t, signal) } != 0 {
            return Err(format!("signalling node {} (pid {pid}): {}", slot.id, std::io::Error::last_os_error()));
        }
        Ok(pid)
    }

    fn node_status(&self, i: usize) -> NodeStatus {
        let slot = &self.nodes[i];
        let state = match slot.child {
            None => State::Exited,
            Some(_) if stopped(slot.pid) => State::Stopped,
            Some(_) => State::Running,
        };
        NodeStatus {
            node_id: slot.id,
            addr: slot.addr.clone(),
            metrics: format!("http://{}/metrics", slot.metrics_addr),
            pid: slot.pid,
            state,
            last_exit: slot.last_exit.map(|s| s.to_string()),
            last_exit_code: slot.last_exit.and_then(|s| s.code()),
            last_exit_signal: slot.last_exit.and_then(|s| std::os::unix::process::ExitStatusExt::signal(&s)),
            restarts: slot.restarts,
            restarting: slot.restarting,
            data_dir: slot.data_dir.display().to_string(),
            log: slot.log.display().to_string(),
        }
    }

    /// The index of node `node_id`, if requests may act on it.
    fn index(&self, node_id: u64) -> Result<usize, String> {
        if !self.started {
            return Err("the cluster is still starting; try again once `keel dev` printed its node table".into());
        }
        match usize::try_from(node_id) {
            Ok(id) if (1..=self.nodes.len()).contains(&id) => Ok(id - 1),
            _ => Err(format!("there is no node {node_id}: this cluster has nodes 1 to {}", self.nodes.len())),
        }
    }

    /// Stops every node: SIGTERM, then SIGKILL for those still there after `STOP_WAIT`.
    fn stop_all(&mut self) {
        for i in 0..self.nodes.len() {
            // SIGCONT too: a node stopped by `keel dev kill --signal stop` acts on SIGTERM only
            // once it runs again. A node that already exited cannot be signalled, and is reaped
            // below anyway.
            let _ = self.signal(i, libc::SIGTERM).and_then(|_| self.signal(i, libc::SIGCONT));
        }
        let clock = Stopwatch::start();
        while self.nodes.iter().any(|n| n.child.is_some()) && clock.elapsed() < STOP_WAIT {
            for slot in &mut self.nodes {
                if let Some(child) = slot.child.as_mut()
                    && !matches!(child.try_wait(), Ok(None))
                {
                    slot.child = None;
                }
            }
            std::thread::sleep(POLL);
        }
        for slot in &mut self.nodes {
            if let Some(mut child) = slot.child.take() {
                eprintln!(
                    "keel dev: node {} (pid {}) did not stop within {} s; killing it",
                    slot.id,
                    slot.pid,
                    STOP_WAIT.as_secs()
                );
                // On the way out there is nothing better to do if these fail; the node then
                // still gets SIGTERM from PR_SET_PDEATHSIG when this process exits.
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.stop_all();
    }
}

/// The nodes as they are now (the answer to `keel dev status`).
pub fn status(shared: &Shared) -> Vec<NodeStatus> {
    let mut supervisor = lock(shared);
    supervisor.reap();
    (0..supervisor.nodes.len()).map(|i| supervisor.node_status(i)).collect()
}

/// `keel dev kill`: sends `signal` to a node and waits (bounded) until it took effect: exited
/// after SIGKILL or SIGTERM, stopped after SIGSTOP, running after SIGCONT.
pub async fn kill(shared: &Shared, node_id: u64, signal: Signal) -> Result<NodeStatus, String> {
    let (i, pid) = {
        let mut supervisor = lock(shared);
        let i = supervisor.index(node_id)?;
        supervisor.reap();
        (i, supervisor.signal(i, signal.number())?)
    };
    eprintln!("keel dev: sent {} to node {node_id} (pid {pid}) as asked by `keel dev kill`", signal.name());
    let (within, done): (Duration, fn(State) -> bool) = match signal {
        Signal::Kill => (KILL_WAIT, |state| state == State::Exited),
        // A stopped node acts on SIGTERM only once resumed: no use waiting for it.
        Signal::Term => (STOP_WAIT, |state| state != State::Running),
        Signal::Stop => (KILL_WAIT, |state| state != State::Running),
        Signal::Cont => (KILL_WAIT, |state| state != State::Stopped),
    };
    Ok(wait_for(shared, i, within, done).await)
}

/// `keel dev restart`: stops the node if it runs (SIGTERM, then SIGKILL after `STOP_WAIT`),
/// starts it again with the same arguments and data, and waits until it serves.
pub async fn restart(
    shared: &Shared,
    node_id: u64,
    wait: Duration,
    replies: &mut Replies,
) -> Result<NodeStatus, String> {
    let (i, running) = {
        let mut supervisor = lock(shared);
        let i = supervisor.index(node_id)?;
        supervisor.reap();
        let slot = &mut supervisor.nodes[i];
        if slot.restarting {
            return Err(format!("node {node_id} is already being restarted"));
        }
        slot.restarting = true;
        (i, slot.child.as_ref().map(Child::id))
    };
    let _mark = RestartMark { shared, i };
    if let Some(pid) = running {
        replies.progress(format!("stopping node {node_id} (pid {pid})")).await;
        {
            let mut supervisor = lock(shared);
            // If the node exited meanwhile there is nothing to signal (its death was reported),
            // and the wait below sees it gone.
            if supervisor.signal(i, libc::SIGTERM).is_ok() {
                supervisor.nodes[i].stopping = true;
                // A node stopped by SIGSTOP acts on SIGTERM only once it runs again; if this
                // fails, the node exited between the two signals, which is what is wanted.
                let _ = supervisor.signal(i, libc::SIGCONT);
            }
        }
        let exited = |state| state == State::Exited;
        if wait_for(shared, i, STOP_WAIT, exited).await.state != State::Exited {
            replies.progress(format!("node {node_id} did not stop within {} s; killing it", STOP_WAIT.as_secs())).await;
            let _ = lock(shared).signal(i, libc::SIGKILL);
            if wait_for(shared, i, KILL_WAIT, exited).await.state != State::Exited {
                lock(shared).nodes[i].stopping = false;
                return Err(format!("node {node_id} (pid {pid}) is still there after SIGKILL; not restarting it"));
            }
        }
    }
    let (pid, addr, log, tls) = {
        let mut supervisor = lock(shared);
        let pid = supervisor.start_node(i).map_err(|e| format!("{e:#}"))?;
        let tls = supervisor.tls.clone();
        let slot = &mut supervisor.nodes[i];
        slot.restarts += 1;
        (pid, slot.addr.clone(), slot.log.clone(), tls)
    };
    eprintln!("keel dev: node {node_id} started again (pid {pid}) as asked by `keel dev restart`");
    replies.progress(format!("node {node_id} started (pid {pid}); waiting until it serves on {addr}")).await;
    let clock = Stopwatch::start();
    loop {
        let exited = {
            let mut supervisor = lock(shared);
            supervisor.reap();
            supervisor.nodes[i].child.is_none().then(|| exit_text(supervisor.nodes[i].last_exit))
        };
        if let Some(how) = exited {
            return Err(format!(
                "node {node_id} (pid {pid}) exited while starting ({how}); the end of {}:\n{}",
                log.display(),
                log_tail(&log)
            ));
        }
        if crate::health::serving(&addr, tls.as_ref()).await {
            break;
        }
        if clock.elapsed() >= wait {
            return Err(format!(
                "node {node_id} (pid {pid}) does not serve after {} s; it keeps running, see {}",
                wait.as_secs(),
                log.display()
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("keel dev: node {node_id} (pid {pid}) is back, serving on {addr}");
    Ok(lock(shared).node_status(i))
}

/// Clears a node's `restarting` mark however its restart ends: done, failed, or dropped with a
/// control connection when the supervisor stops.
struct RestartMark<'a> {
    shared: &'a Shared,
    i: usize,
}

impl Drop for RestartMark<'_> {
    fn drop(&mut self) {
        lock(self.shared).nodes[self.i].restarting = false;
    }
}

/// Polls node `i` until `done(state)` or `within` passed; the node's status then.
async fn wait_for(shared: &Shared, i: usize, within: Duration, done: impl Fn(State) -> bool) -> NodeStatus {
    let clock = Stopwatch::start();
    loop {
        let status = {
            let mut supervisor = lock(shared);
            supervisor.reap();
            supervisor.node_status(i)
        };
        if done(status.state) || clock.elapsed() >= within {
            return status;
        }
        tokio::time::sleep(POLL).await;
    }
}

fn exit_text(status: Option<ExitStatus>) -> String {
    status.map_or_else(|| "status unknown".to_string(), |s| s.to_string())
}

/// Whether process `pid` is stopped (SIGSTOP): its state in /proc/PID/stat is `T` (or `t` when
/// stopped by a debugger). The state follows the command name, which may contain anything, so
/// the last `)` is looked for.
fn stopped(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    let state = stat.rsplit_once(')').map(|(_, rest)| rest.trim_start());
    matches!(state.and_then(|s| s.chars().next()), Some('T' | 't'))
}

/// The last lines of a node's log, indented, for error messages. Reads only the file's end.
fn log_tail(path: &Path) -> String {
    let read = || -> std::io::Result<String> {
        let mut file = std::fs::File::open(path)?;
        let len = file.metadata()?.len();
        file.seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL_BYTES)))?;
        let mut bytes = Vec::new();
        file.take(LOG_TAIL_BYTES).read_to_end(&mut bytes)?;
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let mut lines: Vec<&str> = text.lines().collect();
        if len > LOG_TAIL_BYTES && !lines.is_empty() {
            // The first line was cut by the seek.
            lines.remove(0);
        }
        let from = lines.len().saturating_sub(LOG_TAIL_LINES);
        Ok(lines[from..].iter().map(|l| format!("  {l}")).collect::<Vec<_>>().join("\n"))
    };
    read().unwrap_or_else(|e| format!("  (cannot read it: {e})"))
}
