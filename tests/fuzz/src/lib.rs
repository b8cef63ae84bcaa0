//! The fuzz targets, shared by the AFL++ binaries (`src/bin/*.rs`) and by
//! `tests/fuzz_corpus.rs`, which replays the committed corpus and every
//! regression as an ordinary test.
//!
//! Each target takes arbitrary bytes and must never panic: a panic (an
//! assert, an overflow, an index out of bounds) is a finding.
//!
//! - [`decode`]: the decoder of each protocol version; what decodes must
//!   encode and decode again to the same packet.
//! - [`session`]: a session fed a CONNECT and then an arbitrary sequence of
//!   decoded packets, clock steps, deliveries, reconnects and takeovers on a
//!   virtual clock; every packet it sends must decode, and its invariants
//!   are checked after each step.
//! - [`log`]: a data directory built from the input (well-framed records
//!   with arbitrary bodies, or raw segment bytes), recovered.

use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use shardmq::codec::{self, Connect, Packet, Properties, QoS, Version};
use shardmq::log::dir::DataDir;
use shardmq::log::Log;
use shardmq::message::Message;
use shardmq::persist::recover::{recover, RecoverySettings};
use shardmq::session::{Action, Delivery, Session, SessionLimits, SubIds};

const VERSIONS: [Version; 3] = [Version::V3_1, Version::V3_1_1, Version::V5];

/// Decode `data` as a stream of packets of each version; every packet that
/// decodes must survive an encode/decode round trip unchanged.
pub fn decode(data: &[u8]) {
    for version in VERSIONS {
        let mut buf = BytesMut::from(data);
        // At most as many packets as bytes: each takes at least two.
        for _ in 0..data.len() {
            match codec::decode(&mut buf, version, 1 << 20) {
                Ok(Some(p)) => round_trip(&p, version),
                Ok(None) | Err(_) => break,
            }
        }
    }
}

fn round_trip(p: &Packet, version: Version) {
    let mut out = BytesMut::new();
    codec::encode(p, version, &mut out);
    assert_eq!(out.len(), codec::encoded_len(p, version), "encoded_len");
    let again = codec::decode(&mut out, version, u32::MAX as usize)
        .expect("what we encode decodes")
        .expect("a whole packet");
    assert_eq!(&again, p, "round trip");
}

/// Small limits, so that the fuzzer reaches every boundary quickly.
fn small_limits() -> Rc<SessionLimits> {
    Rc::new(SessionLimits {
        receive_maximum: 3,
        inflight_max: 4,
        queue_messages_max: 8,
        queue_bytes_max: 4096,
        // QoS 1/2 deliveries are "stored": past the limits above they page
        // out to the harness's log and are read back.
        queue_log_bytes_max: 8192,
        topic_alias_max: 4,
        subscriptions_max: 8,
        packet_size_max_bytes: 4096,
        keep_alive_s_max: 60,
        ..SessionLimits::default()
    })
}

/// A session driven by the operations `data` encodes (see the module docs).
pub fn session(data: &[u8]) {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let version = VERSIONS[usize::from(first % 3)];
    let mut input = BytesMut::from(rest);
    let t0 = Instant::now();
    let mut now = t0;
    let mut s = Session::new("fuzz".into(), small_limits(), now);
    let connect = match codec::decode(&mut input, version, 4096) {
        Ok(Some(Packet::Connect(c))) => sanitized(*c, version),
        _ => default_connect(version),
    };
    s.connect(now, connect.clone(), false, None);
    let mut generation = s.generation();
    let mut gathers = 0u32;
    // The shard's log as the session sees it: stored messages by id, each
    // forgotten when the session journals it done.
    let mut log = StoredLog::default();
    let mut out = BytesMut::new();
    for _ in 0..256 {
        if s.is_ended() || input.is_empty() {
            break;
        }
        let op = input[0];
        let _ = bytes::Buf::get_u8(&mut input);
        match op {
            0x00..=0x3F => match codec::decode(&mut input, version, 4096) {
                Ok(Some(p)) if s.is_connected() => s.handle_packet(now, p),
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => {
                    s.violation(now, e.reason_code(), &e.to_string());
                    break;
                }
            },
            0x40..=0x5F => {
                now += Duration::from_millis(250 * u64::from(op & 0x1F));
                s.handle_timeout(now);
            }
            0x60..=0x7F => deliver(&mut s, now, op, &mut input, &mut log),
            0x80..=0x8F => {
                s.connection_lost(now, generation);
                if !s.is_ended() {
                    generation = s.connect(now, connect.clone(), true, None).generation;
                }
            }
            0x90..=0x9F => {
                s.takeover(now);
                if !s.is_ended() {
                    generation = s.connect(now, connect.clone(), true, None).generation;
                }
            }
            0xA0..=0xAF => s.shutdown(now),
            // The shard's contracts: a gather ends only after it began, and
            // a session is discarded (clean start) only once taken over.
            0xB0..=0xBF => {
                s.begin_retained_gather();
                gathers += 1;
            }
            0xC0..=0xCF if gathers > 0 => {
                s.end_retained_gather(now);
                gathers -= 1;
            }
            0xC0..=0xCF => {}
            _ => {
                s.takeover(now);
                if !s.is_ended() {
                    s.discard(now);
                }
                if !s.is_ended() {
                    generation = s.connect(now, connect.clone(), false, None).generation;
                }
            }
        }
        settle(&mut s, now);
        log.follow(&mut s, now);
        out.clear();
        if let Some(v) = s.version() {
            s.encode_transmit(v, &mut out, 1 << 20);
            decodes_whole(&mut out, v);
        }
        while s.poll_transmit().is_some() {}
        log.follow(&mut s, now);
        s.check_invariants();
        // The session never asks the log for a message it is done with.
        assert_eq!(s.stats().lost_unreadable, 0, "a paged-out message was done");
    }
}

/// The stored messages of the fuzzed session, as the shard's log holds
/// them.
#[derive(Default)]
struct StoredLog {
    next_id: u64,
    messages: std::collections::HashMap<u64, Arc<Message>>,
}

impl StoredLog {
    /// Store `message`; its id.
    fn store(&mut self, message: &Arc<Message>) -> u64 {
        self.next_id += 1;
        self.messages.insert(self.next_id, message.clone());
        self.next_id
    }

    /// Do what the shard does after each step: forget what the session is
    /// done with, read back what it paged out when it wants it.
    fn follow(&mut self, s: &mut Session, now: Instant) {
        for _ in 0..8 {
            while let Some(j) = s.poll_journal() {
                if let shardmq::session::Journal::Done { id } = j {
                    assert!(self.messages.remove(&id).is_some(), "done twice: {id}");
                }
            }
            if !s.wants_page_in() {
                return;
            }
            let messages = &self.messages;
            s.page_in(now, |id| {
                messages
                    .get(&id)
                    .cloned()
                    .ok_or_else(|| format!("message {id} is not stored"))
            });
        }
    }
}

/// What the shard checks before a CONNECT reaches a session.
fn sanitized(mut c: Connect, version: Version) -> Connect {
    c.version = version;
    if let Some(w) = &c.will {
        let levels = SessionLimits::default().topic_levels_max;
        let bad_rt = w
            .properties
            .response_topic
            .as_deref()
            .is_some_and(|rt| shardmq::router::topic::validate_topic_name(rt, levels).is_err());
        if shardmq::router::topic::validate_topic_name(&w.topic, levels).is_err() || bad_rt {
            c.will = None;
        }
    }
    c.properties.authentication_method = None;
    c
}

fn default_connect(version: Version) -> Connect {
    Connect {
        version,
        clean_start: false,
        keep_alive: 10,
        client_id: "fuzz".into(),
        will: None,
        username: None,
        password: None,
        properties: Properties {
            session_expiry_interval: Some(60),
            maximum_packet_size: Some(200),
            topic_alias_maximum: Some(2),
            receive_maximum: Some(2),
            ..Properties::default()
        },
    }
}

/// A routed message for the session: QoS from `op`, topic and payload
/// sizes from the next input byte.
fn deliver(s: &mut Session, now: Instant, op: u8, input: &mut BytesMut, log: &mut StoredLog) {
    let size = input.first().copied().unwrap_or(0);
    let qos = match op & 3 {
        1 => QoS::AtLeastOnce,
        2 => QoS::ExactlyOnce,
        _ => QoS::AtMostOnce,
    };
    let message = Arc::new(Message {
        topic: format!("t/{}", size % 5).into(),
        payload: Bytes::from(vec![b'p'; usize::from(size) * 4]),
        qos,
        retain: op & 4 != 0,
        properties: Default::default(),
        expires_at: (op & 8 != 0).then(|| now + Duration::from_secs(u64::from(size % 3))),
        publisher: None,
        id: 0,
        late: false,
    });
    let mut subscription_ids = SubIds::new();
    if op & 0x10 != 0 {
        subscription_ids.push(u32::from(size) + 1);
    }
    // A QoS 1/2 delivery to a persistent session is stored, as the shard
    // does (clean sessions: never).
    let stored = (qos != QoS::AtMostOnce && size & 1 == 1).then(|| log.store(&message));
    let delivery = Delivery {
        qos,
        retain: op & 4 != 0,
        subscription_ids,
        stored,
    };
    if op & 0x20 != 0 {
        s.deliver_retained(now, &message, delivery);
    } else {
        s.deliver(now, &message, delivery);
    }
}

/// Apply the session's actions as the shard would: publishes are accepted
/// (or, for some packet ids, refused as by a full log).
fn settle(s: &mut Session, now: Instant) {
    for _ in 0..1024 {
        let Some(action) = s.poll_action() else {
            return;
        };
        if let Action::Publish {
            message,
            packet_id: Some(pid),
            delay_s: None,
            ..
        } = action
        {
            s.publish_done(now, message.qos, pid, pid % 7 != 0);
        }
    }
}

/// Every byte the session encoded is whole packets that decode.
fn decodes_whole(out: &mut BytesMut, version: Version) {
    while !out.is_empty() {
        match codec::decode(out, version, u32::MAX as usize) {
            Ok(Some(_)) => {}
            other => panic!("the session sent bytes that do not decode: {other:?}"),
        }
    }
}

/// A data directory of its own for this process (under /dev/shm when
/// there is one: no disk writes per run).
fn scratch_dir() -> PathBuf {
    let base = if std::path::Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    base.join(format!("shardmq-fuzz-log-{}", std::process::id()))
}

/// Build a data directory from `data` and recover it (see the module docs).
pub fn log(data: &[u8]) {
    let _ = recover_input(data);
}

/// As [`log`]; the recovery's summary, or why it failed (None when the
/// input builds no data directory).
pub fn recover_input(data: &[u8]) -> Option<Result<String, String>> {
    let (&mode, rest) = data.split_first()?;
    let root = scratch_dir();
    let _ = std::fs::remove_dir_all(&root);
    let shards_then = usize::from(mode & 3) + 1;
    let shards_now = usize::from((mode >> 2) & 3) + 1;
    {
        let dir = DataDir::open(&root).ok()?;
        if mode & 0x80 != 0 {
            raw_segment(&dir, rest);
        } else if !framed_records(&dir, rest, shards_then) {
            return None;
        }
        dir.set_current(1).ok()?;
    }
    let settings = RecoverySettings {
        data_dir: root.clone(),
        shards: shards_now,
        segment_bytes: 1 << 20,
        clock: None,
        disk: None,
    };
    let result = recover(&settings)
        .map(|r| r.summary)
        .map_err(|e| e.to_string());
    let _ = std::fs::remove_dir_all(&root);
    Some(result)
}

/// `data` as the bytes of shard 0's first segment.
fn raw_segment(dir: &DataDir, data: &[u8]) {
    let shard = dir.shard_dir(1, 0);
    if std::fs::create_dir_all(&shard).is_ok() {
        let _ = std::fs::write(shard.join(shardmq::log::file_name(0)), data);
    }
}

/// `data` as records `[shard+kind][len u16 le][body]`, framed and
/// checksummed by the log itself, so the fuzzer explores what the bodies
/// mean rather than the checksum.
fn framed_records(dir: &DataDir, mut data: &[u8], shards: usize) -> bool {
    let mut logs = Vec::new();
    for shard in 0..shards {
        match Log::create(&dir.shard_dir(1, shard), 1 << 20, 0, 0) {
            Ok(l) => logs.push(l),
            Err(_) => return false,
        }
    }
    while data.len() >= 3 {
        let head = data[0];
        let len = usize::from(u16::from_le_bytes([data[1], data[2]]));
        let body = &data[3..(3 + len).min(data.len())];
        data = &data[(3 + len).min(data.len())..];
        let log = &mut logs[usize::from(head >> 6) % shards];
        if log.append(head & 0x3F, body).is_err() {
            break;
        }
    }
    true
}
