//! The two connection loops every command uses: a publisher (paced, with a
//! QoS 1/2 in-flight cap and an optional closed-loop window) and a
//! subscriber (acks QoS 1/2 at once, hands each PUBLISH to a [`Sink`]).
//!
//! One task per connection, no socket split: the loops wait on the socket's
//! read and write readiness together (`readable()` / `writable()` are
//! cancel-safe) and use `try_read` / `try_write`, so a blocked write never
//! stops acks from being read. Writes are batched: everything produced in a
//! loop turn goes out in one `write`.

use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use shardmq::codec::{Packet, Publish, QoS};
use tokio::sync::{watch, Notify};
use tokio::time::{sleep_until, Instant};

use crate::mqtt::{ack, kind, Conn, PubTemplate};
use crate::stats::{instant_at, now_ns, Counters};

/// Messages encoded per loop turn at most (then the task yields).
const BATCH: u64 = 64;
/// Stop producing while this much is waiting for the socket.
const WBUF_HIGH: usize = 256 * 1024;
/// A closed-loop publisher blocked this long without progress sends one
/// message anyway (its last messages may have been dropped by the broker).
const STALL: Duration = Duration::from_secs(1);

/// Closed-loop pacing: the publisher stays at most `window` messages ahead
/// of the slowest of its subscribers.
pub struct Window {
    pub window: u64,
    /// Per link: next sequence the subscriber expects (highest seen + 1).
    pub progress: Arc<[AtomicU64]>,
    /// This publisher's links into `progress`.
    pub links: Vec<usize>,
    /// Subscribers notify it when they advance.
    pub notify: Arc<Notify>,
}

impl Window {
    fn slowest(&self) -> u64 {
        self.links
            .iter()
            .map(|&l| self.progress[l].load(Relaxed))
            .min()
            .unwrap_or(0)
    }
}

/// What one publisher sends.
pub struct PubPlan {
    pub pub_id: u32,
    pub template: PubTemplate,
    pub qos: QoS,
    /// Nanoseconds between two messages; `None`: as fast as allowed.
    pub interval_ns: Option<f64>,
    /// When message 0 is due (`now_ns` scale).
    pub first_due_ns: u64,
    /// Messages to send; `u64::MAX` = until stopped.
    pub limit: u64,
    pub inflight_max: usize,
    pub window: Option<Window>,
}

/// How a publisher ended.
#[derive(Debug, Default)]
pub struct PubOutcome {
    pub sent: u64,
    pub acked: u64,
    pub stalls: u64,
    pub error: Option<String>,
}

/// Wait for a watch flag; a dropped sender counts as set.
async fn flagged(rx: &mut watch::Receiver<bool>) {
    loop {
        if *rx.borrow_and_update() {
            return;
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// Publish per `plan` until `stop` (or the limit), then keep reading acks
/// until nothing is in flight or `finish`. `sent` mirrors the count for
/// other tasks.
pub async fn run_publisher(
    conn: &mut Conn,
    plan: &PubPlan,
    counters: &Counters,
    sent: Option<&AtomicU64>,
    mut stop: watch::Receiver<bool>,
    mut finish: watch::Receiver<bool>,
) -> PubOutcome {
    let mut out = PubOutcome::default();
    if let Err(e) =
        publisher_loop(conn, plan, counters, sent, &mut stop, &mut finish, &mut out).await
    {
        out.error = Some(e);
    }
    conn.disconnect();
    out
}

#[allow(clippy::too_many_arguments)]
async fn publisher_loop(
    conn: &mut Conn,
    plan: &PubPlan,
    counters: &Counters,
    sent: Option<&AtomicU64>,
    stop: &mut watch::Receiver<bool>,
    finish: &mut watch::Receiver<bool>,
    out: &mut PubOutcome,
) -> Result<(), String> {
    let qos1 = plan.qos != QoS::AtMostOnce;
    let inflight_max = plan
        .inflight_max
        .min(conn.server_receive_max as usize)
        .max(1);
    let mut seq: u64 = 0;
    let mut inflight: usize = 0;
    let mut next_pid: u16 = 1;
    let mut sending = true;
    let ka = conn.keepalive;
    let mut next_ping = Instant::now() + ka;
    let mut blocked_since: Option<(Instant, u64)> = None;
    let mut timer = pin!(sleep_until(Instant::now() + Duration::from_secs(3600)));
    let mut timer_at = Instant::now() + Duration::from_secs(3600);
    loop {
        if *finish.borrow() {
            return Ok(());
        }
        if sending && (*stop.borrow() || seq >= plan.limit) {
            sending = false;
        }
        // Acks.
        let mut reads = 0;
        while reads < 4 && conn.try_fill()? {
            reads += 1;
            let mut acked = 0;
            while let Some(p) = conn.decode()? {
                match p {
                    Packet::PubAck(_) | Packet::PubComp(_) => {
                        inflight = inflight.saturating_sub(1);
                        acked += 1;
                    }
                    Packet::PubRec(r) => {
                        if r.reason >= 0x80 {
                            inflight = inflight.saturating_sub(1);
                            counters.error(format!("pubrec: reason 0x{:02x}", r.reason));
                        } else {
                            conn.queue(&ack(Packet::PubRel, r.packet_id));
                        }
                    }
                    Packet::PingResp => {}
                    Packet::Disconnect(d) => {
                        return Err(format!(
                            "disconnected by the broker, reason 0x{:02x}",
                            d.reason
                        ))
                    }
                    Packet::Publish(p) if p.qos != QoS::AtMostOnce => {
                        // Not subscribed, but be a correct client.
                        let make = if p.qos == QoS::AtLeastOnce {
                            Packet::PubAck
                        } else {
                            Packet::PubRec
                        };
                        conn.queue(&ack(make, p.packet_id));
                    }
                    Packet::PubRel(r) => conn.queue(&ack(Packet::PubComp, r.packet_id)),
                    _ => {}
                }
            }
            if acked > 0 {
                out.acked += acked;
                counters.acked.fetch_add(acked, Relaxed);
            }
        }
        // Produce.
        let mut produced = 0;
        let mut wake: Option<Instant> = None;
        let mut window_blocked = false;
        if sending {
            let now = now_ns();
            let mut allowed = plan.limit - seq;
            if let Some(iv) = plan.interval_ns {
                let due = if now >= plan.first_due_ns {
                    ((now - plan.first_due_ns) as f64 / iv) as u64 + 1
                } else {
                    0
                };
                allowed = allowed.min(due.saturating_sub(seq));
                if allowed == 0 {
                    wake = Some(instant_at(plan.first_due_ns + (seq as f64 * iv) as u64).into());
                }
            }
            if qos1 {
                allowed = allowed.min((inflight_max - inflight.min(inflight_max)) as u64);
            }
            if let Some(w) = &plan.window {
                if w.window > 0 {
                    let slowest = w.slowest();
                    let ahead = seq.saturating_sub(slowest);
                    let room = w.window.saturating_sub(ahead);
                    if room == 0 && allowed > 0 {
                        let t = Instant::now();
                        match blocked_since {
                            Some((since, at)) if at == slowest => {
                                if t - since >= STALL {
                                    out.stalls += 1;
                                    blocked_since = Some((t, slowest));
                                    allowed = 1;
                                } else {
                                    window_blocked = true;
                                    wake = Some(since + STALL);
                                    allowed = 0;
                                }
                            }
                            _ => {
                                blocked_since = Some((t, slowest));
                                window_blocked = true;
                                wake = Some(t + STALL);
                                allowed = 0;
                            }
                        }
                    } else {
                        if room > 0 {
                            blocked_since = None;
                        }
                        allowed = allowed.min(room);
                    }
                }
            }
            if conn.wbuf.len() >= WBUF_HIGH {
                allowed = 0;
            }
            produced = allowed.min(BATCH);
            if produced > 0 {
                conn.wbuf.reserve(produced as usize * plan.template.len());
                for _ in 0..produced {
                    let pid = if qos1 {
                        let p = next_pid;
                        next_pid = if next_pid == u16::MAX {
                            1
                        } else {
                            next_pid + 1
                        };
                        inflight += 1;
                        p
                    } else {
                        0
                    };
                    plan.template
                        .write(&mut conn.wbuf, pid, plan.pub_id, seq, now);
                    seq += 1;
                }
                out.sent = seq;
                counters.sent.fetch_add(produced, Relaxed);
                if let Some(s) = sent {
                    s.store(seq, Relaxed);
                }
            }
        }
        conn.try_flush()?;
        if !sending && inflight == 0 && conn.wbuf.is_empty() {
            return Ok(());
        }
        if produced > 0 && conn.wbuf.len() < WBUF_HIGH {
            // More may be allowed right away; let the other tasks run first.
            tokio::task::yield_now().await;
            continue;
        }
        // Wait for something to change.
        if !ka.is_zero() {
            let t = Instant::now();
            if t >= next_ping {
                conn.queue(&Packet::PingReq);
                next_ping = t + ka;
                continue;
            }
            wake = Some(wake.map_or(next_ping, |w| w.min(next_ping)));
        }
        let wake_at = wake.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        if wake_at != timer_at {
            timer.as_mut().reset(wake_at);
            timer_at = wake_at;
        }
        let notify = plan.window.as_ref().map(|w| w.notify.clone());
        tokio::select! {
            biased;
            _ = flagged(finish) => return Ok(()),
            _ = flagged(stop), if sending => {}
            r = conn.stream.readable() => r.map_err(|e| format!("read: {e}"))?,
            r = conn.stream.writable(), if conn.wants_write() => r.map_err(|e| format!("write: {e}"))?,
            _ = async { notify.unwrap().notified().await }, if window_blocked => {}
            _ = &mut timer => {}
        }
    }
}

/// What a subscriber does with each PUBLISH.
pub trait Sink {
    fn on_publish(&mut self, p: &Publish);
    /// After the PUBLISHes of one read; `n` of them.
    fn after_batch(&mut self, n: u64);
}

/// Read and ack until `stop`; errors end the loop.
pub async fn run_subscriber<S: Sink>(
    conn: &mut Conn,
    sink: &mut S,
    counters: &Counters,
    mut stop: watch::Receiver<bool>,
) -> Result<(), String> {
    let r = subscriber_loop(conn, sink, counters, &mut stop).await;
    conn.disconnect();
    r
}

async fn subscriber_loop<S: Sink>(
    conn: &mut Conn,
    sink: &mut S,
    counters: &Counters,
    stop: &mut watch::Receiver<bool>,
) -> Result<(), String> {
    let ka = conn.keepalive;
    let far = Duration::from_secs(1 << 30);
    let mut ping = pin!(sleep_until(
        Instant::now() + if ka.is_zero() { far } else { ka }
    ));
    loop {
        if *stop.borrow() {
            return Ok(());
        }
        if conn.try_fill()? {
            let mut n = 0;
            while let Some(p) = conn.decode()? {
                match p {
                    Packet::Publish(p) => {
                        n += 1;
                        sink.on_publish(&p);
                        match p.qos {
                            QoS::AtMostOnce => {}
                            QoS::AtLeastOnce => conn.queue(&ack(Packet::PubAck, p.packet_id)),
                            QoS::ExactlyOnce => conn.queue(&ack(Packet::PubRec, p.packet_id)),
                        }
                    }
                    Packet::PubRel(r) => conn.queue(&ack(Packet::PubComp, r.packet_id)),
                    Packet::PingResp | Packet::SubAck(_) => {}
                    Packet::Disconnect(d) => {
                        return Err(format!(
                            "disconnected by the broker, reason 0x{:02x}",
                            d.reason
                        ))
                    }
                    other => return Err(format!("subscriber got an unexpected {}", kind(&other))),
                }
            }
            if n > 0 {
                sink.after_batch(n);
                counters.recv.fetch_add(n, Relaxed);
            }
            conn.try_flush()?;
        }
        tokio::select! {
            biased;
            _ = flagged(stop) => return Ok(()),
            r = conn.stream.readable() => r.map_err(|e| format!("read: {e}"))?,
            r = conn.stream.writable(), if conn.wants_write() => {
                r.map_err(|e| format!("write: {e}"))?;
                conn.try_flush()?;
            }
            _ = &mut ping => {
                conn.queue(&Packet::PingReq);
                conn.try_flush()?;
                ping.as_mut().reset(Instant::now() + ka);
            }
        }
    }
}

/// Hold an idle connection: answer nothing, ping on keepalive, until `stop`.
pub async fn hold(conn: &mut Conn, mut stop: watch::Receiver<bool>) -> Result<(), String> {
    struct Nothing;
    impl Sink for Nothing {
        fn on_publish(&mut self, _: &Publish) {}
        fn after_batch(&mut self, _: u64) {}
    }
    let counters = Counters::default();
    subscriber_loop(conn, &mut Nothing, &counters, &mut stop).await?;
    conn.disconnect();
    Ok(())
}
