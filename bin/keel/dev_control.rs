//! The control channel of `keel dev`: the running supervisor serves `<dir>/control.sock`, and
//! `keel dev kill|restart|status` are its clients. One request per connection, one JSON object
//! per line: the client writes one `Request` line; the supervisor answers with zero or more
//! `{"progress": "…"}` lines, then one final line (`{"nodes": […]}`, `{"node": {…}}` or
//! `{"error": "…"}`), and closes.
//!
//! Which supervisor owns a directory is decided by an flock on `<dir>/supervisor.lock`, never by
//! the socket file: the kernel drops the lock when its holder dies, however it dies (SIGKILL
//! included). So a `keel dev` that gets the lock knows any socket file there is stale and
//! replaces it, and one that does not get it refuses to start before it spawns anything. A
//! client that finds the socket but cannot connect was left behind by a dead supervisor, and
//! says so.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand, ValueEnum};
use comfy_table::Table;
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::Output;
use crate::clock::Stopwatch;
use crate::dev::{self, Shared};

/// The directory `keel dev` and its subcommands use when `--dir` is not given.
pub const DIR_DEFAULT: &str = "keel-dev";
/// How long a client may take to send its request line before the supervisor hangs up.
const REQUEST_WAIT: Duration = Duration::from_secs(5);
/// Longest request line the supervisor reads (requests are tens of bytes).
const REQUEST_BYTES_MAX: u64 = 4 * 1024;
/// Most bytes a client reads in answer to one request (nine nodes' status is a few KiB).
const REPLY_BYTES_MAX: u64 = 1024 * 1024;
/// How long the supervisor waits for a client to take one reply line; a client that stopped
/// reading must not hold a restart's task forever.
const REPLY_WRITE_WAIT: Duration = Duration::from_secs(5);
/// Requests served at once; more are answered "busy" instead of queueing without bound.
const CONNECTIONS_MAX: usize = 8;
/// Slack a client grants the supervisor on top of the longest wait its request implies.
const ANSWER_SLACK: Duration = Duration::from_secs(10);

/// `keel dev kill|restart|status`: talk to the `keel dev` running on `--dir`.
#[derive(Debug, Subcommand)]
pub enum DevCommand {
    /// Restart a node of the running `keel dev` (stopped first if it runs) with the same
    /// arguments and data, and wait until it serves.
    Restart {
        /// The node's id (1 to --nodes).
        node_id: u64,
        #[command(flatten)]
        dir: DirArg,
        /// Give up waiting if the node does not serve after this many seconds.
        #[arg(long, default_value_t = 60)]
        wait_secs: u64,
    },
    /// Send a signal to a node of the running `keel dev`: kill = a crash (SIGKILL), term = a
    /// clean stop (SIGTERM), stop/cont = a stall and its end (SIGSTOP/SIGCONT).
    Kill {
        /// The node's id (1 to --nodes).
        node_id: u64,
        /// Which signal.
        #[arg(long, value_enum, default_value_t = Signal::Kill)]
        signal: Signal,
        #[command(flatten)]
        dir: DirArg,
    },
    /// List the nodes of the running `keel dev`: address, pid, state, whether they serve.
    Status {
        #[command(flatten)]
        dir: DirArg,
    },
}

/// Where the running `keel dev` keeps its data (its control socket is there).
#[derive(Debug, Args)]
pub struct DirArg {
    /// The --dir the cluster was started with.
    #[arg(long, default_value = DIR_DEFAULT)]
    dir: PathBuf,
}

/// The signals `keel dev kill` sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Signal {
    Kill,
    Term,
    Stop,
    Cont,
}

impl Signal {
    pub fn number(self) -> libc::c_int {
        match self {
            Signal::Kill => libc::SIGKILL,
            Signal::Term => libc::SIGTERM,
            Signal::Stop => libc::SIGSTOP,
            Signal::Cont => libc::SIGCONT,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Signal::Kill => "SIGKILL",
            Signal::Term => "SIGTERM",
            Signal::Stop => "SIGSTOP",
            Signal::Cont => "SIGCONT",
        }
    }
}

/// What a client asks the supervisor (`{"op": "kill", "node_id": 2, "signal": "kill"}`).
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Request {
    Status,
    Kill { node_id: u64, signal: Signal },
    Restart { node_id: u64, wait_secs: u64 },
}

/// One line of the supervisor's answer.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reply {
    /// What a long request is doing now; more lines follow.
    Progress(String),
    /// The final answer to `status`.
    Nodes(Vec<NodeStatus>),
    /// The final answer to `kill` and `restart`: the node afterwards.
    Node(NodeStatus),
    /// The request failed; the message is for the user.
    Error(String),
}

/// A node's process as the supervisor sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Running,
    /// Stopped by SIGSTOP: alive, holding its ports, answering nothing.
    Stopped,
    Exited,
}

/// One node of a `keel dev` cluster.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeStatus {
    pub node_id: u64,
    pub addr: String,
    /// Where Prometheus scrapes the node (`http://HOST:PORT/metrics`); empty from a supervisor
    /// older than the metrics.
    #[serde(default)]
    pub metrics: String,
    /// The current process, or the last one once it exited.
    pub pid: u32,
    pub state: State,
    /// How the last process ended (`signal: 9 (SIGKILL)`, `exit status: 1`), once one did.
    pub last_exit: Option<String>,
    pub last_exit_code: Option<i32>,
    pub last_exit_signal: Option<i32>,
    /// Restarts through `keel dev restart` since the supervisor started.
    pub restarts: u64,
    /// A `keel dev restart` of this node is under way.
    pub restarting: bool,
    pub data_dir: String,
    pub log: String,
}

impl NodeStatus {
    /// The state for a table cell: `running`, `stopped (SIGSTOP)`, `exited (signal: 9 (SIGKILL))`.
    fn state_text(&self) -> String {
        let state = match self.state {
            State::Running => "running".to_string(),
            State::Stopped => "stopped (SIGSTOP)".to_string(),
            State::Exited => format!("exited ({})", self.last_exit.as_deref().unwrap_or("status unknown")),
        };
        if self.restarting { format!("{state}, restarting") } else { state }
    }
}

pub fn socket_path(dir: &Path) -> PathBuf {
    dir.join("control.sock")
}

/// The exact command that runs `keel dev <rest>` (`restart 2`; empty: start the cluster) on the
/// cluster in `dir`, for hints: the program as this process was called (`keel`,
/// `target/release/keel`), and `--dir` unless it is the default.
pub fn command_hint(dir: &Path, rest: &str) -> String {
    let program = std::env::args_os()
        .next()
        .map(|p| p.to_string_lossy().into_owned())
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "keel".to_string());
    let dir_flag = if dir == Path::new(DIR_DEFAULT) {
        String::new()
    } else {
        format!(" --dir {}", shell_word(&dir.to_string_lossy()))
    };
    let rest = if rest.is_empty() { String::new() } else { format!(" {rest}") };
    format!("{} dev{rest}{dir_flag}", shell_word(&program))
}

/// `word` quoted for a POSIX shell if it needs it, so hints can be pasted as they are.
fn shell_word(word: &str) -> String {
    let plain = !word.is_empty() && word.chars().all(|c| c.is_ascii_alphanumeric() || "_-./:@%+=,".contains(c));
    if plain { word.to_string() } else { format!("'{}'", word.replace('\'', r"'\''")) }
}

/// Holds `<dir>/supervisor.lock` for the supervisor's life: the proof that this process owns
/// the directory. The kernel releases it when the process dies.
pub struct DirLock {
    _file: File,
}

impl DirLock {
    /// Takes the lock, or says which supervisor holds it.
    pub fn acquire(dir: &Path) -> anyhow::Result<DirLock> {
        let path = dir.join("supervisor.lock");
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: flock(2) on a descriptor this function owns; no memory is involved.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let error = std::io::Error::last_os_error();
            if error.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(error).with_context(|| format!("locking {}", path.display()));
            }
            let mut holder = String::new();
            // The pid is only for the message: the lock already answered the question.
            let holder = match file.read_to_string(&mut holder) {
                Ok(_) if !holder.trim().is_empty() => format!(" (pid {})", holder.trim()),
                _ => String::new(),
            };
            bail!(
                "another `keel dev`{holder} is already running on {}: stop it (Ctrl-C in its shell) or pass \
                 another --dir; `{}` lists its nodes",
                dir.display(),
                command_hint(dir, "status")
            );
        }
        file.set_len(0)
            .and_then(|()| file.seek(SeekFrom::Start(0)))
            .with_context(|| format!("writing {}", path.display()))?;
        writeln!(file, "{}", std::process::id()).with_context(|| format!("writing {}", path.display()))?;
        Ok(DirLock { _file: file })
    }
}

/// The bound control socket; its file is removed when the supervisor stops.
pub struct ControlSocket {
    pub listener: UnixListener,
    path: PathBuf,
}

impl ControlSocket {
    /// Binds `<dir>/control.sock`. Only call with the `DirLock` held: any file there is then
    /// stale and is replaced. Needs a tokio runtime.
    pub fn bind(dir: &Path, _lock: &DirLock) -> anyhow::Result<ControlSocket> {
        let path = socket_path(dir);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing the stale {}", path.display())),
        }
        // Unix socket paths are limited to about 100 bytes; say so rather than EINVAL.
        let listener = UnixListener::bind(&path).with_context(|| {
            format!(
                "creating the control socket {} (a Unix socket path must be short: try a shorter --dir)",
                path.display()
            )
        })?;
        // Whoever can connect can kill the nodes: only this user.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("restricting {}", path.display()))?;
        Ok(ControlSocket { listener, path })
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        // A file left behind is harmless (the next supervisor replaces it, clients call it stale),
        // so a failure here is not worth reporting on the way out.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The supervisor's side: serves requests until the runtime stops.
pub async fn serve(listener: &UnixListener, shared: Shared) {
    let permits = Arc::new(tokio::sync::Semaphore::new(CONNECTIONS_MAX));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // EMFILE and friends pass; a pause keeps a persistent error from spinning.
                eprintln!("keel dev: control socket: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            // One short line fits the socket buffer, so try_write does not block; if it fails
            // the client sees the connection close, which it also reports.
            let line = reply_line(&Reply::Error("the supervisor is busy with other requests; try again".into()));
            let _ = stream.try_write(line.as_bytes());
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            serve_one(stream, &shared).await;
            drop(permit);
        });
    }
}

async fn serve_one(stream: UnixStream, shared: &Shared) {
    let (read, write) = stream.into_split();
    let mut replies = Replies { write };
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(REQUEST_BYTES_MAX));
    let request = match tokio::time::timeout(REQUEST_WAIT, reader.read_line(&mut line)).await {
        Err(_) => {
            let message = format!("no request within {} s", REQUEST_WAIT.as_secs());
            return replies.send(&Reply::Error(message)).await;
        }
        Ok(Err(e)) => return replies.send(&Reply::Error(format!("reading the request: {e}"))).await,
        Ok(Ok(_)) => serde_json::from_str::<Request>(&line),
    };
    let reply = match request {
        Err(e) => Reply::Error(format!("bad request {:?}: {e}", line.trim_end())),
        Ok(Request::Status) => Reply::Nodes(dev::status(shared)),
        Ok(Request::Kill { node_id, signal }) => match dev::kill(shared, node_id, signal).await {
            Ok(node) => Reply::Node(node),
            Err(e) => Reply::Error(e),
        },
        Ok(Request::Restart { node_id, wait_secs }) => {
            match dev::restart(shared, node_id, Duration::from_secs(wait_secs), &mut replies).await {
                Ok(node) => Reply::Node(node),
                Err(e) => Reply::Error(e),
            }
        }
    };
    replies.send(&reply).await;
}

fn reply_line(reply: &Reply) -> String {
    // Serializing these plain structs cannot fail; an empty object would still end the answer.
    let mut line = serde_json::to_string(reply).unwrap_or_else(|_| "{}".into());
    line.push('\n');
    line
}

/// The supervisor's end of one connection.
pub struct Replies {
    write: tokio::net::unix::OwnedWriteHalf,
}

impl Replies {
    /// Tells the client what a long request is doing.
    pub async fn progress(&mut self, message: String) {
        self.send(&Reply::Progress(message)).await;
    }

    async fn send(&mut self, reply: &Reply) {
        // A client that went away or stopped reading (Ctrl-C on `keel dev restart`) does not stop
        // the work it asked for: the restart goes on and the supervisor's own output reports it.
        // So there is nobody to tell about a failed write.
        let _ = tokio::time::timeout(REPLY_WRITE_WAIT, self.write.write_all(reply_line(reply).as_bytes())).await;
    }
}

/// The client's side: `keel dev kill|restart|status`.
pub fn run(command: DevCommand, output: Output) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        match command {
            DevCommand::Status { dir } => status(&dir.dir, output).await,
            DevCommand::Kill { node_id, signal, dir } => kill(&dir.dir, node_id, signal, output).await,
            DevCommand::Restart { node_id, dir, wait_secs } => restart(&dir.dir, node_id, wait_secs, output).await,
        }
    })
}

async fn status(dir: &Path, output: Output) -> anyhow::Result<()> {
    let reply = call(dir, &Request::Status, Duration::ZERO, |_| {}).await?;
    let Reply::Nodes(nodes) = reply else { bail!("the supervisor answered {reply:?} to a status request") };
    // Whether a node serves is asked of the node itself, all at once: a stopped node takes the
    // probe's whole timeout to say nothing.
    let tls = crate::dev::client_tls(dir);
    let serving =
        futures_util::future::join_all(nodes.iter().map(|n| crate::health::serving(&n.addr, tls.as_ref()))).await;
    match output {
        Output::Json => {
            #[derive(Serialize)]
            struct Listed<'a> {
                #[serde(flatten)]
                node: &'a NodeStatus,
                serving: bool,
            }
            let listed: Vec<Listed> =
                nodes.iter().zip(&serving).map(|(node, &serving)| Listed { node, serving }).collect();
            println!("{}", serde_json::to_string(&serde_json::json!({ "nodes": listed }))?);
        }
        Output::Text => {
            let mut table = Table::new();
            table.load_preset(comfy_table::presets::UTF8_BORDERS_ONLY);
            table.set_header(["node", "address", "metrics", "pid", "state", "serving", "restarts", "log"]);
            for (n, serving) in nodes.iter().zip(&serving) {
                table.add_row([
                    n.node_id.to_string(),
                    n.addr.clone(),
                    n.metrics.clone(),
                    n.pid.to_string(),
                    n.state_text(),
                    if *serving { "yes" } else { "no" }.to_string(),
                    n.restarts.to_string(),
                    n.log.clone(),
                ]);
            }
            println!("{table}");
            for n in nodes.iter().filter(|n| n.state == State::Exited && !n.restarting) {
                println!("Bring node {} back: {}", n.node_id, command_hint(dir, &format!("restart {}", n.node_id)));
            }
        }
    }
    Ok(())
}

async fn kill(dir: &Path, node_id: u64, signal: Signal, output: Output) -> anyhow::Result<()> {
    let request = Request::Kill { node_id, signal };
    let reply = call(dir, &request, dev::STOP_WAIT, |_| {}).await?;
    let Reply::Node(node) = reply else { bail!("the supervisor answered {reply:?} to a kill request") };
    match output {
        Output::Json => println!("{}", serde_json::to_string(&node)?),
        Output::Text => {
            let (id, pid) = (node.node_id, node.pid);
            match node.state {
                State::Exited => println!(
                    "node {id} (pid {pid}) got {} and exited ({}); the other nodes keep running. Bring it back: {}",
                    signal.name(),
                    node.last_exit.as_deref().unwrap_or("status unknown"),
                    command_hint(dir, &format!("restart {id}"))
                ),
                State::Stopped => println!(
                    "node {id} (pid {pid}) is stopped: it holds its ports but answers nothing{}. Resume it: {}",
                    if signal == Signal::Term { " (SIGTERM acts once it resumes)" } else { "" },
                    command_hint(dir, &format!("kill {id} --signal cont"))
                ),
                State::Running => println!("node {id} (pid {pid}) got {} and is running", signal.name()),
            }
        }
    }
    Ok(())
}

async fn restart(dir: &Path, node_id: u64, wait_secs: u64, output: Output) -> anyhow::Result<()> {
    let bar = if output == Output::Text { ProgressBar::new_spinner() } else { ProgressBar::hidden() };
    bar.set_style(ProgressStyle::with_template("{spinner} {msg}")?);
    bar.enable_steady_tick(Duration::from_millis(120));
    bar.set_message(format!("restarting node {node_id}"));
    let clock = Stopwatch::start();
    let request = Request::Restart { node_id, wait_secs };
    // The supervisor may first wait for the node to stop, then for it to serve.
    let longest = dev::STOP_WAIT + dev::KILL_WAIT + Duration::from_secs(wait_secs);
    let reply = call(dir, &request, longest, |message| bar.set_message(message.to_string())).await;
    bar.finish_and_clear();
    let reply = reply?;
    let Reply::Node(node) = reply else { bail!("the supervisor answered {reply:?} to a restart request") };
    match output {
        Output::Json => println!("{}", serde_json::to_string(&node)?),
        Output::Text => println!(
            "node {} is back: pid {}, serving on {} ({:.1} s)",
            node.node_id,
            node.pid,
            node.addr,
            clock.elapsed().as_secs_f64()
        ),
    }
    Ok(())
}

/// Sends one request to the supervisor of `dir` and returns its final answer, handing progress
/// lines to `progress`. Gives up after `longest` plus some slack.
pub(crate) async fn call(
    dir: &Path,
    request: &Request,
    longest: Duration,
    mut progress: impl FnMut(&str),
) -> anyhow::Result<Reply> {
    let path = socket_path(dir);
    let stream = match UnixStream::connect(&path).await {
        Ok(stream) => stream,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "no `keel dev` is running on {} ({} does not exist); start one with `{}`",
            dir.display(),
            path.display(),
            command_hint(dir, "")
        ),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => bail!(
            "no `keel dev` is running on {} ({} was left by one that stopped); start one with `{}`",
            dir.display(),
            path.display(),
            command_hint(dir, "")
        ),
        Err(e) => return Err(e).with_context(|| format!("connecting to {}", path.display())),
    };
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_string(request)?;
    line.push('\n');
    let answer = async {
        write.write_all(line.as_bytes()).await.context("sending the request to the supervisor")?;
        let mut lines = BufReader::new(read.take(REPLY_BYTES_MAX)).lines();
        loop {
            let Some(line) = lines.next_line().await.context("reading the supervisor's answer")? else {
                bail!("the supervisor closed the connection without an answer");
            };
            match serde_json::from_str::<Reply>(&line).with_context(|| format!("the supervisor's answer {line:?}"))? {
                Reply::Progress(message) => progress(&message),
                Reply::Error(message) => bail!("{message}"),
                reply => return Ok(reply),
            }
        }
    };
    let within = longest + ANSWER_SLACK;
    tokio::time::timeout(within, answer)
        .await
        .with_context(|| format!("the supervisor did not answer within {} s", within.as_secs()))?
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The protocol's lines as documented at the top of this file.
    #[test]
    fn protocol_lines() {
        let requests = [
            (Request::Status, r#"{"op":"status"}"#),
            (Request::Kill { node_id: 2, signal: Signal::Kill }, r#"{"op":"kill","node_id":2,"signal":"kill"}"#),
            (Request::Restart { node_id: 3, wait_secs: 60 }, r#"{"op":"restart","node_id":3,"wait_secs":60}"#),
        ];
        for (request, line) in requests {
            assert_eq!(serde_json::to_string(&request).unwrap(), line);
            assert_eq!(serde_json::from_str::<Request>(line).unwrap(), request);
        }
        assert_eq!(reply_line(&Reply::Progress("stopping".into())), "{\"progress\":\"stopping\"}\n");
        assert_eq!(reply_line(&Reply::Error("no".into())), "{\"error\":\"no\"}\n");
        assert!(matches!(serde_json::from_str::<Reply>(r#"{"nodes":[]}"#).unwrap(), Reply::Nodes(n) if n.is_empty()));
        assert!(serde_json::from_str::<Request>(r#"{"op":"kill","node_id":2,"signal":"hup"}"#).is_err());
    }

    #[test]
    fn shell_words() {
        let cases = [
            ("keel", "keel"),
            ("target/release/keel", "target/release/keel"),
            ("my dir", "'my dir'"),
            ("it's", r"'it'\''s'"),
            ("", "''"),
        ];
        for (word, quoted) in cases {
            assert_eq!(shell_word(word), quoted, "{word:?}");
        }
    }
}
