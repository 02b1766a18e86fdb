//! What a process costs the machine, read from Linux `/proc/PID`: CPU time, resident memory,
//! open files and threads. `keel bench idle` samples the nodes with it; the kernel's own
//! accounting needs nothing from the nodes, so it works on any build and costs them nothing.

use std::path::PathBuf;

use anyhow::{Context, bail};

/// One look at a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    /// User plus system CPU time since the process started, in clock ticks (`clock_ticks_per_sec`).
    pub cpu_ticks: u64,
    /// When the process started, in clock ticks after boot: a pid that now names another process
    /// (the node restarted, or the pid was reused) has another start time.
    pub start_ticks: u64,
    pub rss_bytes: u64,
    pub open_files: u64,
    pub threads: u64,
}

/// `sysconf(_SC_CLK_TCK)`: the unit of the CPU times in `/proc/PID/stat`.
pub fn clock_ticks_per_sec() -> anyhow::Result<u64> {
    // SAFETY: sysconf reads a constant of the C library; it takes no pointers and has no
    // preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks <= 0 {
        bail!("sysconf(_SC_CLK_TCK) answered {ticks}");
    }
    Ok(ticks as u64)
}

/// Reads `/proc/<pid>/{stat,status,fd}`. A process that is gone, or a zombie (it exited and its
/// parent has not reaped it), is an error naming the pid: its figures would be zeros, which
/// would read as a very cheap node.
pub fn sample(pid: u32) -> anyhow::Result<Sample> {
    let dir = PathBuf::from(format!("/proc/{pid}"));
    let read = |name: &str| -> anyhow::Result<String> {
        match std::fs::read_to_string(dir.join(name)) {
            Ok(text) => Ok(text),
            // ESRCH shows up when the process exits between opening and reading the file.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ESRCH) => {
                bail!("process {pid} is not running (it exited, or the pid is wrong)")
            }
            Err(e) => Err(e).with_context(|| format!("reading /proc/{pid}/{name}")),
        }
    };
    let stat = parse_stat(&read("stat")?).with_context(|| format!("/proc/{pid}/stat is not as expected"))?;
    if stat.state == 'Z' || stat.state == 'X' {
        bail!("process {pid} has exited (it is a zombie waiting for its parent)");
    }
    let status = parse_status(&read("status")?).with_context(|| format!("/proc/{pid}/status is not as expected"))?;
    let open_files = count_open_files(pid)?;
    Ok(Sample {
        cpu_ticks: stat.cpu_ticks,
        start_ticks: stat.start_ticks,
        rss_bytes: status.rss_bytes,
        open_files,
        threads: status.threads,
    })
}

fn count_open_files(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/fd");
    let entries = match std::fs::read_dir(&path) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("process {pid} is not running (it exited, or the pid is wrong)")
        }
        // Another user's process: the kernel lets only its owner (or root) list its files.
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            bail!("listing {path}: permission denied (run as the user that runs the node)")
        }
        Err(e) => return Err(e).with_context(|| format!("listing {path}")),
    };
    let mut count = 0u64;
    for entry in entries {
        // An entry that vanishes while it is listed was a file closed meanwhile: not counted.
        if entry.is_ok() {
            count += 1;
        }
    }
    Ok(count)
}

/// The fields of `/proc/PID/stat` that `sample` uses.
#[derive(Debug, PartialEq, Eq)]
struct Stat {
    state: char,
    cpu_ticks: u64,
    start_ticks: u64,
}

/// `/proc/PID/stat` is `pid (comm) state ppid …`; comm is the program's name as the process set
/// it, and may hold spaces and parentheses (`(a) b)`), so the fields start after the last `)`.
/// There, field 3 (state) is the first; utime and stime are 14 and 15, starttime is 22.
fn parse_stat(text: &str) -> Option<Stat> {
    let (_, rest) = text.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| -> Option<u64> { fields.get(n - 3)?.parse().ok() };
    let state = fields.first()?.chars().next()?;
    let cpu_ticks = field(14)?.checked_add(field(15)?)?;
    Some(Stat { state, cpu_ticks, start_ticks: field(22)? })
}

/// The fields of `/proc/PID/status` that `sample` uses.
#[derive(Debug, PartialEq, Eq)]
struct Status {
    rss_bytes: u64,
    threads: u64,
}

/// `VmRSS:    1234 kB` and `Threads:  7`. A kernel thread has no VmRSS line: 0.
fn parse_status(text: &str) -> Option<Status> {
    let mut rss_bytes = 0;
    let mut threads = None;
    for line in text.lines() {
        if let Some(value) = line.strip_prefix("VmRSS:") {
            let kib: u64 = value.trim().strip_suffix("kB")?.trim().parse().ok()?;
            rss_bytes = kib.checked_mul(1024)?;
        } else if let Some(value) = line.strip_prefix("Threads:") {
            threads = Some(value.trim().parse().ok()?);
        }
    }
    Some(Status { rss_bytes, threads: threads? })
}

/// CPU used over `seconds` of wall time as a percentage of one core (two busy cores = 200).
pub fn cpu_percent(ticks: u64, ticks_per_sec: u64, seconds: f64) -> f64 {
    if ticks_per_sec == 0 || seconds <= 0.0 {
        return 0.0;
    }
    ticks as f64 / ticks_per_sec as f64 / seconds * 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines() {
        // A real line's shape (fields 3..=22 and beyond), with the awkward names comm may have.
        let tail = "S 1 2 3 0 -1 4194560 100 0 0 0 250 37 0 0 20 0 9 0 12345 1000000 500 18446744073709551615";
        let expected = Some(Stat { state: 'S', cpu_ticks: 287, start_ticks: 12345 });
        for comm in ["keel", "keel server", "(a) b)", ")", "a (b) c"] {
            assert_eq!(parse_stat(&format!("4242 ({comm}) {tail}\n")), expected, "{comm:?}");
        }
        assert_eq!(parse_stat(&format!("1 (x) Z{}", &tail[1..])).map(|s| s.state), Some('Z'));
        // Cut short, or no comm at all: not a stat line.
        assert_eq!(parse_stat("4242 (keel) S 1 2 3"), None);
        assert_eq!(parse_stat("4242 keel S 1 2 3 0 -1 4194560 100 0 0 0 250 37 0 0 20 0 9 0 12345"), None);
        assert_eq!(parse_stat(""), None);
    }

    #[test]
    fn status_lines() {
        let text = "Name:\tkeel\nState:\tS (sleeping)\nVmRSS:\t   51200 kB\nRssAnon:\t 40000 kB\nThreads:\t17\n";
        assert_eq!(parse_status(text), Some(Status { rss_bytes: 51200 * 1024, threads: 17 }));
        // A kernel thread: no memory of its own.
        assert_eq!(parse_status("Name:\tkthreadd\nThreads:\t1\n"), Some(Status { rss_bytes: 0, threads: 1 }));
        assert_eq!(parse_status("Name:\tkeel\nVmRSS:\t1 kB\n"), None);
        assert_eq!(parse_status("VmRSS:\tlots\nThreads:\t1\n"), None);
    }

    #[test]
    fn percent_of_one_core() {
        assert_eq!(cpu_percent(100, 100, 1.0), 100.0);
        assert_eq!(cpu_percent(50, 100, 2.0), 25.0);
        assert_eq!(cpu_percent(400, 100, 2.0), 200.0);
        assert_eq!(cpu_percent(5, 0, 1.0), 0.0);
        assert_eq!(cpu_percent(5, 100, 0.0), 0.0);
    }

    /// The test process itself: alive, with memory, files and a thread, and its CPU time grows
    /// while it works.
    #[test]
    fn samples_this_process() {
        let pid = std::process::id();
        let first = sample(pid).unwrap();
        assert!(first.rss_bytes > 0, "{first:?}");
        assert!(first.threads >= 1, "{first:?}");
        // The directory being listed is an open file itself.
        assert!(first.open_files >= 1, "{first:?}");
        assert!(clock_ticks_per_sec().unwrap() > 0);
        // Spin until the kernel charges a tick (10 ms at 100 Hz), bounded so a starved test
        // machine fails instead of hanging.
        let mut spins = 0u64;
        let mut last = first;
        while last.cpu_ticks == first.cpu_ticks && spins < 1_000_000 {
            for i in 0..10_000u64 {
                std::hint::black_box(i.wrapping_mul(i));
            }
            spins += 1;
            last = sample(pid).unwrap();
        }
        assert!(last.cpu_ticks > first.cpu_ticks, "no CPU time charged after {spins} rounds");
        assert_eq!(last.start_ticks, first.start_ticks);
    }

    #[test]
    fn a_missing_process_is_named() {
        // Above the largest pid_max Linux allows (2^22), so no process has it.
        let pid = 0x7fff_fff0;
        let error = sample(pid).unwrap_err().to_string();
        assert!(error.contains(&pid.to_string()) && error.contains("not running"), "{error}");
    }
}
