//! End to end: `keel dev` supervises its nodes instead of giving up on the first death. A node
//! SIGKILLed through `keel dev kill` is reported and the others keep serving; `keel dev restart`
//! brings it back; a control socket left by a dead supervisor does not stop a new one, and a
//! second supervisor on the same directory is refused; stopping the supervisor leaves no node
//! behind, a SIGSTOPped one included.

#![allow(clippy::unwrap_used, clippy::expect_used)]
// Real processes run on real time.
#![allow(clippy::disallowed_methods)]

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The loopback address of this test's cluster: the other end-to-end tests (which run at once,
/// in one binary) use 127.0.0.20-22, 30-32, 36, 40-42, 45, 48, 60-62 and 70-72, and a user's own
/// `keel dev` 127.0.0.1.
const IP: &str = "127.0.0.50";

/// A port P with P, P+1 and P+2 free on `IP` (`keel dev` puts node N on port + N - 1), and the
/// same 100 above (node N's metrics listener, by default) and 1000 above (its peer listener).
fn free_ports() -> u16 {
    for _ in 0..100 {
        let first = std::net::TcpListener::bind((IP, 0)).unwrap();
        let port = first.local_addr().unwrap().port();
        let free = |p: u16| std::net::TcpListener::bind((IP, p)).is_ok();
        if port <= u16::MAX - 1002 && [1, 2, 100, 101, 102, 1000, 1001, 1002].iter().all(|d| free(port + d)) {
            return port;
        }
    }
    panic!("no three consecutive free ports (and their metrics ports) on {IP}");
}

/// Runs `keel dev <args> --dir <dir>` to its end, within `within`.
fn keel_dev(dir: &Path, args: &[&str], within: Duration) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_keel"))
        .arg("dev")
        .args(args)
        .arg("--dir")
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + within;
    // The outputs are a few lines: they fit the pipes while the command runs.
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().unwrap();
            let out = child.wait_with_output().unwrap();
            panic!("keel dev {args:?} did not finish in {within:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `keel dev status --output json`: the nodes.
fn status(dir: &Path) -> Vec<Value> {
    let out = keel_dev(dir, &["status", "--output", "json"], Duration::from_secs(20));
    assert!(out.status.success(), "keel dev status: {}", text(&out.stderr));
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    status["nodes"].as_array().unwrap().clone()
}

/// The supervisor under test; dropping it SIGKILLs it (and its nodes follow by
/// PR_SET_PDEATHSIG), so a failing test leaves nothing running.
struct Supervisor {
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Supervisor {
    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap()
    }

    fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("the supervisor exited ({status}):\n{}", self.stderr());
        }
    }

    /// Waits until the supervisor printed the cluster (it is healthy then).
    fn wait_started(&mut self, within: Duration) {
        let deadline = Instant::now() + within;
        while !std::fs::read_to_string(&self.stdout).unwrap().contains("export KEEL_BOOTSTRAP=") {
            self.assert_running();
            assert!(Instant::now() < deadline, "the cluster did not start in {within:?}:\n{}", self.stderr());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until the supervisor's stderr has a line containing every one of `parts`.
    fn wait_line(&self, parts: &[&str], within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let stderr = self.stderr();
            if let Some(line) = stderr.lines().find(|l| parts.iter().all(|p| l.contains(p))) {
                return line.to_string();
            }
            assert!(Instant::now() < deadline, "no line with {parts:?} in the supervisor's stderr:\n{stderr}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether process `pid` is gone (a zombie counts as gone: it runs nothing and holds no port).
fn gone(pid: u64) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

fn pids(nodes: &[Value]) -> Vec<u64> {
    nodes.iter().map(|n| n["pid"].as_u64().unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_is_reported_and_restarted_while_the_others_serve() {
    let started = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dev");
    std::fs::create_dir_all(&dir).unwrap();

    // A socket file left by a supervisor that died: clients say so, and it does not block a new
    // `keel dev`.
    drop(std::os::unix::net::UnixListener::bind(dir.join("control.sock")).unwrap());
    let out = keel_dev(&dir, &["status"], Duration::from_secs(10));
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("no `keel dev` is running"), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("left by one that stopped"), "{}", text(&out.stderr));

    let port = free_ports();
    let stdout = tmp.path().join("supervisor.out");
    let stderr = tmp.path().join("supervisor.err");
    let child = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(["dev", "--nodes", "3", "--ip", IP, "--port", &port.to_string(), "--wait-secs", "60", "--dir"])
        .arg(&dir)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout).unwrap())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .unwrap();
    let mut supervisor = Supervisor { child, stdout, stderr };
    supervisor.wait_started(Duration::from_secs(90));
    let printed = std::fs::read_to_string(&supervisor.stdout).unwrap();
    assert!(printed.contains("dev kill 2") && printed.contains("dev restart 2"), "{printed}");
    eprintln!("cluster up after {:?}", started.elapsed());
    // The quick start: the printed export lines are all a client needs (TLS and a token).
    let exports: Vec<(String, String)> = printed
        .lines()
        .filter_map(|l| l.strip_prefix("export "))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let names: Vec<&str> = exports.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(names, ["KEEL_BOOTSTRAP", "KEEL_CA_FILE", "KEEL_TOKEN"], "{printed}");
    let cli = |args: &[&str], stdin: &str, exported: bool| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_keel"));
        command.args(args).env_remove("KEEL_CA_FILE").env_remove("KEEL_TOKEN").stdin(Stdio::piped());
        command.stdout(Stdio::piped()).stderr(Stdio::piped());
        for (k, v) in exports.iter().filter(|(k, _)| exported || k == "KEEL_BOOTSTRAP") {
            command.env(k, v);
        }
        let mut child = command.spawn().unwrap();
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), stdin.as_bytes()).unwrap();
        child.wait_with_output().unwrap()
    };
    let created = cli(&["topic", "create", "orders", "-p", "1", "-r", "3"], "", true);
    assert!(created.status.success(), "{}", text(&created.stderr));
    let produced = cli(&["produce", "orders"], "a\nb\n", true);
    assert!(produced.status.success(), "{}", text(&produced.stderr));
    let consumed = cli(&["consume", "orders", "--from", "beginning", "-n", "2", "--format", "value"], "", true);
    assert_eq!(text(&consumed.stdout), "a\nb\n", "{}", text(&consumed.stderr));
    assert!(!cli(&["topic", "list"], "", false).status.success(), "a client without the exports got in");
    let ca = keel_client::Tls::from_files(&dir.join("tls").join("ca.pem"), None, None).unwrap();
    let serving = |addr: String| {
        let ca = ca.clone();
        async move { common::serving_with(&addr, Some(&ca)).await }
    };

    // A second supervisor on the same directory is refused, and disturbs nothing.
    let out = keel_dev(&dir, &["--nodes", "3", "--ip", IP, "--port", &port.to_string()], Duration::from_secs(20));
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("already running"), "{}", text(&out.stderr));

    let nodes = status(&dir);
    assert_eq!(nodes.len(), 3);
    assert!(nodes.iter().all(|n| n["state"] == "running" && n["serving"] == true), "{nodes:?}");
    let addrs: Vec<String> = nodes.iter().map(|n| n["addr"].as_str().unwrap().to_string()).collect();
    let first_pids = pids(&nodes);

    // Node 2 crashes.
    let out = keel_dev(&dir, &["kill", "2", "--signal", "kill"], Duration::from_secs(20));
    assert!(out.status.success(), "keel dev kill: {}", text(&out.stderr));
    assert!(text(&out.stdout).contains("exited"), "{}", text(&out.stdout));
    let killed_at = Instant::now();
    let report = supervisor.wait_line(&["node 2", "exited", "SIGKILL"], Duration::from_secs(5));
    assert!(report.contains("node-2.log") && report.contains("dev restart 2"), "{report}");
    assert!(gone(first_pids[1]), "node 2's process is gone");

    // The supervisor and the other nodes go on: still serving a few seconds later.
    tokio::time::sleep(Duration::from_secs(2)).await;
    supervisor.assert_running();
    for i in [0, 2] {
        assert!(serving(addrs[i].clone()).await, "node {} serves {:?} after node 2 died", i + 1, killed_at.elapsed());
    }
    assert!(!serving(addrs[1].clone()).await);
    let nodes = status(&dir);
    assert_eq!(nodes[1]["state"], "exited");
    assert_eq!(nodes[1]["last_exit_signal"], 9);
    assert_eq!(pids(&nodes)[0], first_pids[0]);
    assert_eq!(pids(&nodes)[2], first_pids[2]);

    // One command brings it back, with its data.
    let restart_at = Instant::now();
    let out = keel_dev(&dir, &["restart", "2"], Duration::from_secs(120));
    assert!(out.status.success(), "keel dev restart: {}", text(&out.stderr));
    assert!(text(&out.stdout).contains("node 2 is back"), "{}", text(&out.stdout));
    eprintln!("node 2 restarted in {:?}", restart_at.elapsed());
    assert!(serving(addrs[1].clone()).await, "node 2 serves after its restart");
    let nodes = status(&dir);
    assert!(nodes.iter().all(|n| n["state"] == "running" && n["serving"] == true), "{nodes:?}");
    assert_eq!(nodes[1]["restarts"], 1);
    assert_ne!(pids(&nodes)[1], first_pids[1]);
    supervisor.wait_line(&["node 2", "is back"], Duration::from_secs(5));

    // A stalled node (SIGSTOP) must not hang the supervisor's stop.
    let out = keel_dev(&dir, &["kill", "3", "--signal", "stop"], Duration::from_secs(20));
    assert!(out.status.success(), "keel dev kill --signal stop: {}", text(&out.stderr));
    let nodes = status(&dir);
    assert_eq!(nodes[2]["state"], "stopped", "{nodes:?}");
    let last_pids = pids(&nodes);

    // Stopping the supervisor stops every node.
    let stop_at = Instant::now();
    // SAFETY: kill(2) on our own child, not yet reaped.
    assert_eq!(unsafe { libc::kill(supervisor.child.id() as libc::pid_t, libc::SIGINT) }, 0);
    let deadline = Instant::now() + Duration::from_secs(30);
    let exit = loop {
        if let Some(status) = supervisor.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the supervisor did not stop in 30 s:\n{}", supervisor.stderr());
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(exit.success(), "a clean stop: {exit}\n{}", supervisor.stderr());
    eprintln!("supervisor stopped in {:?}", stop_at.elapsed());
    let deadline = Instant::now() + Duration::from_secs(5);
    while !last_pids.iter().all(|pid| gone(*pid)) {
        assert!(Instant::now() < deadline, "nodes outlived the supervisor: {last_pids:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    for addr in &addrs {
        assert!(!serving(addr.clone()).await, "{addr} still serves");
    }
    assert!(!dir.join("control.sock").exists(), "the supervisor removes its socket");
    eprintln!("test took {:?}", started.elapsed());
}
