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
        .env("SHARDMQ_DATA_DIR", &dir)
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
