//! The `shardmq` binary as an operator uses it: flags, config errors, and a
//! clean stop on SIGTERM with DISCONNECT 0x8B to 5.0 clients.

mod common;

use std::io::{BufRead, BufReader, Lines};
use std::process::{Child, ChildStderr, Command, Stdio};

use common::*;
use shardmq::codec::Version;

fn shardmq() -> Command {
    Command::new(env!("CARGO_BIN_EXE_shardmq"))
}

/// The broker's stderr, read up to and including its "listening on" line;
/// that line, and the rest (keep it: a closed pipe would fail its writes).
fn listening_line(child: &mut Child) -> (String, Lines<BufReader<ChildStderr>>) {
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let line = lines
        .by_ref()
        .map(|l| l.expect("a log line"))
        .find(|l| l.contains("listening on"))
        .expect("broker logs its address");
    (line, lines)
}

#[test]
fn print_default_config_prints_the_embedded_toml() {
    let out = shardmq().arg("--print-default-config").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text, shardmq::config::DEFAULT_CONFIG);
    shardmq::Config::from_toml(&text).unwrap();
}

#[test]
fn a_bad_config_value_is_refused_with_its_key() {
    let dir = std::env::temp_dir().join(format!("shardmq-bad-config-{}", std::process::id()));
    std::fs::write(&dir, "[mqtt]\ninflight_max = 0\n").unwrap();
    let out = shardmq().arg("--config").arg(&dir).output().unwrap();
    std::fs::remove_file(&dir).unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("mqtt.inflight_max = 0: must be in 1..=65535"),
        "{err}"
    );
}

#[test]
fn unknown_flags_and_bad_addresses_are_refused() {
    let out = shardmq().arg("--frobnicate").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--frobnicate"));
    let out = shardmq().args(["--listen", "nowhere"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--listen nowhere"));
}

#[test]
fn a_port_in_use_is_refused_instead_of_shared() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = shardmq()
        .args(["--listen", &addr, "--shards", "2"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot listen on"));
}

#[test]
fn sigterm_disconnects_v5_clients_with_0x8b_and_exits_cleanly() {
    let data = std::env::temp_dir().join(format!("shardmq-sigterm-{}", std::process::id()));
    let mut child = shardmq()
        .args(["--listen", "127.0.0.1:0", "--http", "127.0.0.1:0"])
        .args(["--shards", "2", "--data-dir"])
        .arg(&data)
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (line, _log) = listening_line(&mut child);
    let rest = line.split("listening on ").nth(1).unwrap();
    let addr = rest
        .split_whitespace()
        .next()
        .unwrap()
        .trim_end_matches(',')
        .parse()
        .unwrap();
    let (mut client, ack) = Raw::connect(addr, Version::V5, "stop-me", true);
    assert_eq!(ack.reason, 0);
    common::child::signal(child.id(), libc::SIGTERM);
    assert_eq!(client.expect_close(), Some(0x8B));
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(data.join("CURRENT").exists(), "the log lives in --data-dir");
    let _ = std::fs::remove_dir_all(&data);
}

#[test]
fn a_bad_durability_is_refused_with_its_key() {
    let out = shardmq()
        .args(["--listen", "127.0.0.1:0", "--durability", "sometimes"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("storage.durability"), "{err}");
}

#[test]
fn help_lists_the_flags_the_subcommands_and_their_variables() {
    let out = shardmq().arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for needle in [
        "--config",
        "--listen",
        "--shards",
        "--data-dir",
        "--durability",
        "--print-default-config",
        "check-config",
        "completions",
        "SHARDMQ_SHARDS",
    ] {
        assert!(text.contains(needle), "{needle} in:\n{text}");
    }
    let out = shardmq().arg("-V").output().unwrap();
    let version = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        version.trim(),
        format!("shardmq {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn check_config_prints_the_merged_config_or_names_the_bad_key() {
    let dir = common::child::temp_dir("check-config");
    let good = dir.join("good.toml");
    std::fs::write(&good, "[server]\nshards = 3\n").unwrap();
    let out = shardmq().arg("check-config").arg(&good).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let merged = String::from_utf8(out.stdout).unwrap();
    assert!(merged.contains("shards = 3"), "{merged}");
    assert!(
        merged.contains("inflight_max = 128"),
        "defaults too:\n{merged}"
    );
    let again = shardmq::Config::from_toml(&merged).expect("the printed config loads");
    assert_eq!(again.server.shards, 3);

    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "[mqtt]\ninflight_max = 0\n").unwrap();
    let out = shardmq().arg("check-config").arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("mqtt.inflight_max"), "{err}");

    std::fs::write(&bad, "[mqtt]\ninflight_maximum = 5\n").unwrap();
    let out = shardmq().arg("check-config").arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("inflight_maximum"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn every_flag_reads_its_shardmq_variable() {
    let dir = common::child::temp_dir("env-vars");
    let mut child = shardmq()
        .env("SHARDMQ_SHARDS", "1")
        .env("SHARDMQ_LISTEN", "127.0.0.1:0")
        .env("SHARDMQ_DURABILITY", "kill_safe")
        .env("SHARDMQ_DATA_DIR", &*dir)
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (listening, _log) = listening_line(&mut child);
    assert!(listening.contains("with 1 shards"), "{listening}");
    assert!(listening.contains("127.0.0.1:"), "{listening}");
    common::child::signal(child.id(), libc::SIGTERM);
    assert!(child.wait().unwrap().success());
    assert!(
        dir.join("CURRENT").exists(),
        "SHARDMQ_DATA_DIR is the data dir"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn completions_are_printed_for_bash() {
    let out = shardmq().args(["completions", "bash"]).output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("check-config") && text.contains("--data-dir"));
}

/// Under systemd (`Type=notify`): READY=1 once every shard listens,
/// RELOADING=1 (with MONOTONIC_USEC) and READY=1 around a SIGHUP reload,
/// STOPPING=1 on SIGTERM; read from a datagram socket standing in for
/// systemd's `$NOTIFY_SOCKET`.
#[test]
fn systemd_hears_ready_reloading_and_stopping() {
    let dir = common::child::temp_dir("sd-notify");
    let path = dir.join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    socket
        .set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    let next = || {
        let mut buf = [0u8; 1024];
        let n = socket.recv(&mut buf).expect("a notification within 30 s");
        String::from_utf8_lossy(&buf[..n]).to_string()
    };
    let mut child = shardmq()
        .args(["--listen", "127.0.0.1:0", "--http", "127.0.0.1:0"])
        .args(["--durability", "memory"])
        .env("NOTIFY_SOCKET", &path)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let ready = next();
    assert!(
        ready.starts_with("READY=1\nSTATUS=listening on 127.0.0.1:"),
        "{ready:?}"
    );
    common::child::signal(child.id(), libc::SIGHUP);
    let reloading = next();
    assert!(
        reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="),
        "{reloading:?}"
    );
    assert!(next().starts_with("READY=1\n"));
    common::child::signal(child.id(), libc::SIGTERM);
    assert_eq!(next(), "STOPPING=1\n");
    assert!(child.wait().unwrap().success());
    let _ = std::fs::remove_dir_all(&dir);
}

/// Where the kernel refuses io_uring (here a seccomp filter answers
/// io_uring_setup with EPERM, as Docker's default profile does), the
/// broker does not start, and says what to change.
#[test]
fn without_io_uring_the_broker_refuses_to_start_and_names_the_fix() {
    use std::os::unix::process::CommandExt;
    let mut cmd = shardmq();
    cmd.args([
        "--listen",
        "127.0.0.1:0",
        "--http",
        "",
        "--durability",
        "memory",
    ]);
    // SAFETY: between fork and exec only async-signal-safe calls (prctl)
    // on data prepared before the fork.
    unsafe {
        cmd.pre_exec(|| {
            const IO_URING_SETUP: u32 = 425; // x86_64 and aarch64 alike
            let filter = [
                // A = the system call's number.
                libc::sock_filter {
                    code: 0x20,
                    jt: 0,
                    jf: 0,
                    k: 0,
                },
                // io_uring_setup: EPERM; anything else: allowed.
                libc::sock_filter {
                    code: 0x15,
                    jt: 0,
                    jf: 1,
                    k: IO_URING_SETUP,
                },
                libc::sock_filter {
                    code: 0x06,
                    jt: 0,
                    jf: 0,
                    k: 0x0005_0000 | libc::EPERM as u32,
                },
                libc::sock_filter {
                    code: 0x06,
                    jt: 0,
                    jf: 0,
                    k: 0x7fff_0000,
                },
            ];
            let program = libc::sock_fprog {
                len: filter.len() as u16,
                filter: filter.as_ptr() as *mut libc::sock_filter,
            };
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::prctl(libc::PR_SET_SECCOMP, 2, &program as *const libc::sock_fprog) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("io_uring is not available"), "{err}");
    assert!(
        err.contains("--security-opt seccomp=tuning/seccomp-io_uring.json"),
        "{err}"
    );
}

/// The HTTP listener answers while the logs are recovered: 503 and
/// "starting" (and `ctl status` exits 1) until every shard listens, then
/// 200. Debug builds stretch the recovery with
/// SHARDMQ_TEST_RECOVERY_DELAY_MS.
#[test]
fn status_is_503_while_the_logs_are_recovered_then_ready() {
    let data = common::child::temp_dir("recovering");
    let mut child = shardmq()
        .args([
            "--listen",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(&*data)
        .env("RUST_LOG", "info")
        .env("SHARDMQ_TEST_RECOVERY_DELAY_MS", "3000")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let http: std::net::SocketAddr = lines
        .by_ref()
        .map(|l| l.expect("a log line"))
        .find_map(|l| l.split("http: GET /metrics on ").nth(1).map(str::to_string))
        .expect("the HTTP address is logged before recovery")
        .trim()
        .parse()
        .unwrap();
    let (status, body) = common::http(http, "GET", "/api/v1/status", "", "");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("\"starting\""), "{body}");
    assert_eq!(common::http(http, "GET", "/metrics", "", "").0, 503);
    let ctl = shardmq()
        .args(["ctl", "--http", &http.to_string(), "status"])
        .output()
        .unwrap();
    assert_eq!(ctl.status.code(), Some(1));
    lines
        .by_ref()
        .map(|l| l.expect("a log line"))
        .find(|l| l.contains("listening on"))
        .expect("it starts");
    let (status, body) = common::http(http, "GET", "/api/v1/status", "", "");
    assert_eq!(status, 200, "{body}");
    common::child::signal(child.id(), libc::SIGTERM);
    assert!(child.wait().unwrap().success());
    let _ = std::fs::remove_dir_all(&data);
}
