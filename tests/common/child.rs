//! The broker as a child process, for tests that kill it with SIGKILL and
//! start it again on the same data directory.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A fresh, empty directory for one test, removed with everything in it
/// when the test ends, passed or failed: a broker's logs take their blocks
/// when they are created (two 4 MiB segments per shard here, 64 MiB each
/// by default), and a suite that leaves them behind fills the disk of the
/// machine that runs it again. `SHARDMQ_KEEP_TEST_DIRS=1` keeps them, for
/// looking into a failure.
pub struct TestDir(PathBuf);

/// [`TestDir`] `shardmq-test-NAME-PID` under the system's temporary
/// directory.
pub fn temp_dir(name: &str) -> TestDir {
    let dir = std::env::temp_dir().join(format!("shardmq-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    TestDir(dir)
}

impl TestDir {
    /// Remove `path` with everything in it when the test ends.
    pub fn adopt(path: PathBuf) -> TestDir {
        TestDir(path)
    }
}

impl std::ops::Deref for TestDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for TestDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::env::var_os("SHARDMQ_KEEP_TEST_DIRS").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// The config every child broker starts from (as `SHARDMQ_CONFIG`; a
/// test's own `--config` replaces it): 4 MiB log segments instead of the
/// default 64 MiB, so that a three-node test takes 48 MiB of disk rather
/// than 768 MiB. Tests about segment sizes give their own config.
fn harness_config() -> &'static Path {
    static PATH: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PATH.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
        let path = dir.join("shardmq-test-harness.toml");
        // Written whole under another name and renamed: test binaries
        // running at once may write it together.
        let part = dir.join(format!("shardmq-test-harness.{}", std::process::id()));
        std::fs::write(&part, "[storage]\nsegment_bytes = 4194304\n").unwrap();
        std::fs::rename(&part, &path).unwrap();
        path
    })
}

/// A running `shardmq` child process.
pub struct ChildBroker {
    child: Option<Child>,
    /// The address it listens on.
    pub addr: SocketAddr,
    /// Everything it logged so far (stderr), line by line.
    pub log: Arc<Mutex<Vec<String>>>,
}

impl ChildBroker {
    /// Start `shardmq` with `args` (plus `--listen 127.0.0.1:0`) and wait
    /// until it listens. Panics with its log if it exits first.
    pub fn start(args: &[&str]) -> ChildBroker {
        Self::try_start(args).unwrap_or_else(|log| panic!("broker did not start:\n{log}"))
    }

    /// As `start`, but returns the log if the broker exits instead.
    pub fn try_start(args: &[&str]) -> Result<ChildBroker, String> {
        Self::try_start_on("127.0.0.1:0", args)
    }

    /// As `try_start`, listening on `listen`.
    pub fn try_start_on(listen: &str, args: &[&str]) -> Result<ChildBroker, String> {
        Self::try_start_env(listen, args, &[])
    }

    /// As `try_start_on`, with environment variables set for the broker.
    pub fn try_start_env(
        listen: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<ChildBroker, String> {
        let mut child = Command::new(env!("CARGO_BIN_EXE_shardmq"))
            .args(["--listen", listen, "--http", "127.0.0.1:0"])
            .args(args)
            .env("RUST_LOG", "info")
            .env("SHARDMQ_CONFIG", harness_config())
            .envs(env.iter().copied())
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn shardmq");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(rest) = line.split("listening on ").nth(1) {
                    let addr = rest.split([',', ' ']).next().unwrap_or("").to_string();
                    let _ = tx.send(addr);
                }
                sink.lock().unwrap().push(line);
            }
        });
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(addr) => Ok(ChildBroker {
                child: Some(child),
                addr: addr.parse().expect("a socket address"),
                log,
            }),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                // Its stderr is closed now: the reader has every line.
                let _ = reader.join();
                Err(log.lock().unwrap().join("\n"))
            }
        }
    }

    /// SIGKILL, and wait for the process to be gone. A broker that ended
    /// by itself before (a panic, a failed invariant check) fails the test:
    /// a crash test must not take a panic for the kill it meant.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            if let Ok(Some(status)) = c.try_wait() {
                if !std::thread::panicking() {
                    panic!(
                        "the broker had already exited ({status}) before it was killed:\n{}",
                        self.log_text()
                    );
                }
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) {
        self.terminate();
        self.wait_stopped();
    }

    /// Send SIGTERM (the broker starts its orderly stop).
    pub fn terminate(&self) {
        if let Some(pid) = self.pid() {
            signal(pid, libc::SIGTERM);
        }
    }

    /// Wait (at most 10 s) for the broker to exit, and assert it exited 0.
    pub fn wait_stopped(&mut self) {
        if let Some(mut c) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(status)) = c.try_wait() {
                    assert!(status.success(), "broker exited with {status:?}");
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            panic!(
                "broker did not stop within 10 s after SIGTERM:\n{}",
                self.log_text()
            );
        }
    }

    /// Wait (at most `wait`) for the process to exit; its exit code, or
    /// None if it still runs (or died by a signal).
    pub fn wait_exit(&mut self, wait: Duration) -> Option<i32> {
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                // Give the log reader a moment to take the last lines.
                std::thread::sleep(Duration::from_millis(100));
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Resident memory of the process now, in bytes (VmRSS).
    pub fn rss_bytes(&self) -> u64 {
        self.status_bytes("VmRSS:")
    }

    /// Its anonymous resident memory (RssAnon): what it holds in RAM
    /// itself, without the file pages of its mapped log segments, which
    /// the kernel may drop and read again.
    pub fn rss_anon_bytes(&self) -> u64 {
        self.status_bytes("RssAnon:")
    }

    /// A size line of /proc/PID/status, in bytes.
    fn status_bytes(&self, field: &str) -> u64 {
        let pid = self.pid().expect("running");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{field} in /proc/PID/status"));
        kib * 1024
    }

    /// Assert its resident memory is below `mib` MiB now.
    pub fn assert_rss_below(&self, mib: u64, when: &str) {
        let rss = self.rss_bytes();
        assert!(rss < mib << 20, "RSS {} MiB {when}", rss >> 20);
    }

    /// Where its HTTP listener took a port (from its log).
    pub fn http_addr(&self) -> std::net::SocketAddr {
        let log = self.log_text();
        let line = log
            .lines()
            .find_map(|l| l.split("http: GET /metrics on ").nth(1))
            .expect("the broker logs its HTTP address");
        line.trim().parse().expect("a socket address")
    }

    /// The log so far, joined.
    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Wait (at most 10 s) until the log holds `needle`; the log so far.
    pub fn wait_for_log(&self, needle: &str) -> Result<String, String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = self.log_text();
            if text.contains(needle) {
                return Ok(text);
            }
            if Instant::now() >= deadline {
                return Err(text);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Send `sig` to process `pid` (no external `kill` program needed).
pub fn signal(pid: u32, sig: i32) {
    let pid = i32::try_from(pid).expect("a pid fits an i32");
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    let rc = unsafe { libc::kill(pid, sig) };
    assert_eq!(
        rc,
        0,
        "kill({pid}, {sig}): {}",
        std::io::Error::last_os_error()
    );
}

/// SIGSTOP process `pid` and wait until every thread of it is stopped:
/// kill(2) returns before they all are, and a thread that runs on meanwhile
/// (on a busy machine, for milliseconds) may still answer its peers.
/// Panics after 10 s.
pub fn sigstop_and_wait(pid: u32) {
    signal(pid, libc::SIGSTOP);
    let start = std::time::Instant::now();
    // "PID (NAME) STATE ...": io_uring's worker threads (iou-wrk-*,
    // iou-sqp-*) never stop for a signal; a zombie has exited.
    let state = |stat: &str| {
        let (head, rest) = stat.rsplit_once(") ")?;
        let name = head.split_once(" (").map_or("", |(_, n)| n);
        Some((name.starts_with("iou-"), rest.chars().next()?))
    };
    loop {
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("the process's threads");
        let mut all = true;
        for t in tasks.flatten() {
            let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
            match state(&stat) {
                Some((true, _)) | Some((_, 'T' | 't')) => {}
                Some((_, 'Z' | 'X')) => panic!("process {pid} exited instead of stopping"),
                _ => all = false,
            }
        }
        if all {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "process {pid} did not stop"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

impl Drop for ChildBroker {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Write a config file for a durability test and return its path.
pub fn config_file(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("shardmq.toml");
    std::fs::write(&path, text).unwrap();
    path
}
