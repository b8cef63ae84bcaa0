//! The admin API (`/api/v1/...` on the HTTP listener), JSON in and out:
//! status, clients (paged, one, kick), subscriptions (paged), publish,
//! retained messages (read, delete).
//!
//! Runs on the HTTP listener's client threads, never on a shard. Each
//! request becomes one or a few [`AdminRequest`]s to the shard that holds
//! the client, owns the retained topic, or (pages) the shards in turn;
//! each shard answers at its next tick, so the API never stalls one.
//! Pages use a cursor (`next` in the answer, `cursor=` in the next
//! request) of the form `{shard}.{slot}`: like Redis's SCAN, a page may
//! hold fewer entries than asked for and still have a `next`, and a
//! client that comes and goes during the walk may be left out or listed
//! twice (a new session takes a freed slot, which may lie ahead).

use std::sync::Arc;
use std::time::Instant;

use base64::Engine;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::cluster::quorum::ForgetError;
use crate::codec::QoS;
use crate::router::topic::validate_topic_name;
use crate::shard::admin::{AdminAnswer, AdminRequest, PAGE_MAX};
use crate::shard::runtime::quorum::Quorum;
use crate::shard::runtime::{gather_reports, Control, SCRAPE_WAIT};
use crate::shard::{home_shard, ShardReport};

/// Shard requests one page may take (a page with few matches among many
/// sessions ends early, with a cursor).
pub const PAGE_ASKS_MAX: usize = 8;
/// Entries in a page when the request does not say.
pub const PAGE_DEFAULT: usize = 100;

/// What the API needs of the broker.
pub(crate) struct Api {
    /// One control channel per shard.
    pub(crate) controls: Vec<crossbeam_channel::Sender<Control>>,
    /// When the broker started.
    pub(crate) started: Instant,
    /// `mqtt.topic_levels_max`: a published topic is checked against it.
    pub(crate) topic_levels_max: usize,
    /// `mqtt.packet_size_max_bytes`: the largest payload one may publish.
    pub(crate) payload_bytes_max: usize,
    /// A cluster node's members and majority (None: not a cluster node).
    pub(crate) cluster: Option<Arc<Quorum>>,
}

/// An answer: status and JSON body.
pub type Answer = (u16, Value);

fn error(status: u16, why: impl Into<String>) -> Answer {
    (status, json!({ "error": why.into() }))
}

/// The JSON body of `POST /api/v1/publish`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishBody {
    topic: String,
    #[serde(default)]
    payload: String,
    /// "plain" (the default: `payload` is the bytes, UTF-8) or "base64".
    #[serde(default)]
    payload_encoding: Option<String>,
    #[serde(default)]
    qos: u8,
    #[serde(default)]
    retain: bool,
}

impl Api {
    /// Answer `method path?query` with `body` (already authorized).
    pub(crate) fn route(&self, method: &str, target: &str, body: &[u8]) -> Answer {
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        let query = |name: &str| {
            form_urlencoded::parse(query.as_bytes())
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.into_owned())
        };
        let Some(rest) = path.strip_prefix("/api/v1/") else {
            return error(404, "not found");
        };
        let (resource, tail) = match rest.split_once('/') {
            Some((r, t)) => (r, Some(t)),
            None => (rest, None),
        };
        let tail = match tail.map(decode).transpose() {
            Ok(t) => t,
            Err(why) => return error(400, why),
        };
        match (method, resource, tail) {
            ("GET", "status", None) => self.status(),
            ("GET", "clients", None) => {
                let prefix = query("prefix");
                let user = query("user");
                self.page(query("cursor"), query("limit"), |from, limit| {
                    AdminRequest::Clients {
                        from,
                        limit,
                        prefix: prefix.clone(),
                        user: user.clone(),
                    }
                })
            }
            ("GET", "clients", Some(id)) => {
                match self.ask(
                    home_shard(&id, self.controls.len()),
                    AdminRequest::Client {
                        client_id: id.clone(),
                    },
                ) {
                    Some(AdminAnswer::Client(Some(d))) => (200, json!(d)),
                    Some(AdminAnswer::Client(None)) => error(404, format!("no session {id:?}")),
                    _ => error(503, "the shard did not answer"),
                }
            }
            ("DELETE", "clients", Some(id)) => {
                let discard = query("discard").is_some_and(|v| v == "true" || v == "1");
                let shard = home_shard(&id, self.controls.len());
                let kick = AdminRequest::Kick {
                    client_id: id.clone(),
                    discard,
                };
                match self.ask(shard, kick) {
                    Some(AdminAnswer::Kicked(true)) => {
                        log::info!("api: kicked {}", crate::text::quote(&id));
                        (200, json!({ "kicked": id, "session_discarded": discard }))
                    }
                    Some(AdminAnswer::Kicked(false)) => error(
                        404,
                        format!("{id:?} is not connected (discard=true ends an offline session)"),
                    ),
                    _ => error(503, "the shard did not answer"),
                }
            }
            ("GET", "subscriptions", None) => {
                let prefix = query("prefix");
                self.page(query("cursor"), query("limit"), |from, limit| {
                    AdminRequest::Subscriptions {
                        from,
                        limit,
                        prefix: prefix.clone(),
                    }
                })
            }
            ("POST", "publish", None) => self.publish(body),
            ("GET", "retained", Some(topic)) => {
                if let Err(why) = validate_topic_name(&topic, self.topic_levels_max) {
                    return error(400, format!("topic {topic:?}: {why}"));
                }
                let shard = home_shard(&topic, self.controls.len());
                match self.ask(
                    shard,
                    AdminRequest::Retained {
                        topic: topic.clone(),
                    },
                ) {
                    Some(AdminAnswer::Retained(Some(r))) => {
                        let text = std::str::from_utf8(&r.payload).ok();
                        let b64 = base64::engine::general_purpose::STANDARD.encode(&r.payload);
                        let body = json!({
                            "topic": r.topic,
                            "qos": r.qos,
                            "payload": text,
                            "payload_base64": b64,
                            "bytes": r.payload.len(),
                        });
                        (200, body)
                    }
                    Some(AdminAnswer::Retained(None)) => {
                        error(404, format!("no retained message on {topic:?}"))
                    }
                    _ => error(503, "the shard did not answer"),
                }
            }
            ("DELETE", "retained", Some(topic)) => {
                if let Err(why) = validate_topic_name(&topic, self.topic_levels_max) {
                    return error(400, format!("topic {topic:?}: {why}"));
                }
                if topic.starts_with('$') {
                    return error(400, "topics that start with $ are the broker's");
                }
                let shard = home_shard(&topic, self.controls.len());
                let delete = AdminRequest::DeleteRetained {
                    topic: topic.clone(),
                };
                match self.ask(shard, delete) {
                    Some(AdminAnswer::RetainedDeleted(true)) => (200, json!({ "deleted": topic })),
                    Some(AdminAnswer::RetainedDeleted(false)) => {
                        error(404, format!("no retained message on {topic:?}"))
                    }
                    _ => error(503, "the shard did not answer"),
                }
            }
            ("GET", "cluster", None) => match &self.cluster {
                None => error(404, "not a cluster node (cluster.node_id is not set)"),
                Some(q) => match q.view() {
                    Some(v) => (200, v),
                    None => error(503, "the cluster has not started"),
                },
            },
            ("DELETE", "cluster", Some(t)) => {
                let Some(name) = t.strip_prefix("members/") else {
                    return error(404, "not found: DELETE /api/v1/cluster/members/{name}");
                };
                let Some(q) = &self.cluster else {
                    return error(404, "not a cluster node (cluster.node_id is not set)");
                };
                match q.forget(name) {
                    None => error(503, "the cluster has not started"),
                    Some(Ok(())) => (200, json!({ "forgotten": name })),
                    Some(Err(e @ ForgetError::Unknown(_))) => error(404, e.to_string()),
                    Some(Err(e)) => error(409, e.to_string()),
                }
            }
            (_, "status" | "clients" | "subscriptions" | "publish" | "retained" | "cluster", _) => {
                error(405, format!("{method} is not served here"))
            }
            _ => error(404, "not found"),
        }
    }

    /// `GET /api/v1/status`: 200 when every shard answers, else 503.
    fn status(&self) -> Answer {
        let reports = gather_reports(&self.controls);
        let all = reports.len() == self.controls.len();
        let sum = |f: fn(&ShardReport) -> usize| reports.iter().map(f).sum::<usize>();
        let body = json!({
            "status": if all { "ready" } else { "not_ready" },
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_s": self.started.elapsed().as_secs(),
            "shards": self.controls.len(),
            "shards_answered": reports.len(),
            "connections": sum(|r| r.stats.connections),
            "sessions": sum(|r| r.sessions),
        });
        (if all { 200 } else { 503 }, body)
    }

    fn publish(&self, body: &[u8]) -> Answer {
        let b: PublishBody = match serde_json::from_slice(body) {
            Ok(b) => b,
            Err(e) => return error(400, format!("body: {e}")),
        };
        if let Err(why) = validate_topic_name(&b.topic, self.topic_levels_max) {
            return error(400, format!("topic {:?}: {why}", b.topic));
        }
        if b.topic.starts_with('$') {
            return error(400, "topics that start with $ are the broker's");
        }
        let qos = match b.qos {
            0 => QoS::AtMostOnce,
            1 => QoS::AtLeastOnce,
            2 => QoS::ExactlyOnce,
            q => return error(400, format!("qos {q}: 0, 1 or 2")),
        };
        let payload = match b.payload_encoding.as_deref() {
            None | Some("plain") => Bytes::from(b.payload),
            Some("base64") => match base64::engine::general_purpose::STANDARD.decode(&b.payload) {
                Ok(p) => Bytes::from(p),
                Err(e) => return error(400, format!("payload: not base64: {e}")),
            },
            Some(other) => {
                return error(400, format!("payload_encoding {other:?}: plain or base64"))
            }
        };
        if payload.len() > self.payload_bytes_max {
            return error(
                413,
                format!("payload larger than {} bytes", self.payload_bytes_max),
            );
        }
        let shard = home_shard(&b.topic, self.controls.len());
        let request = AdminRequest::Publish {
            topic: b.topic.clone(),
            payload,
            qos,
            retain: b.retain,
        };
        match self.ask(shard, request) {
            Some(AdminAnswer::Published(true)) => (200, json!({ "published": b.topic })),
            Some(AdminAnswer::Published(false)) => {
                error(503, "not accepted: the log cannot take it now")
            }
            _ => error(503, "the shard did not answer"),
        }
    }

    /// One page over the shards in turn, from `cursor` (`{shard}.{slot}`;
    /// none: the start), of `limit` entries (default [`PAGE_DEFAULT`],
    /// at most [`PAGE_MAX`]).
    fn page(
        &self,
        cursor: Option<String>,
        limit: Option<String>,
        request: impl Fn(u32, usize) -> AdminRequest,
    ) -> Answer {
        let limit = match limit.map(|l| l.parse::<usize>()) {
            None => PAGE_DEFAULT,
            Some(Ok(l)) if (1..=PAGE_MAX).contains(&l) => l,
            Some(_) => return error(400, format!("limit: 1 to {PAGE_MAX}")),
        };
        let (mut shard, mut from) = match cursor.as_deref().map(parse_cursor) {
            None => (0, 0),
            Some(Some(c)) if c.0 < self.controls.len() => c,
            Some(_) => return error(400, "cursor: the next of an earlier page"),
        };
        let mut data: Vec<Value> = Vec::new();
        for _ in 0..PAGE_ASKS_MAX {
            if shard >= self.controls.len() || data.len() >= limit {
                break;
            }
            let (items, next) = match self.ask(shard, request(from, limit - data.len())) {
                Some(AdminAnswer::Clients(items, next)) => {
                    (items.into_iter().map(|c| json!(c)).collect(), next)
                }
                Some(AdminAnswer::Subscriptions(items, next)) => {
                    (items.into_iter().map(|s| json!(s)).collect(), next)
                }
                Some(_) => return error(500, "a shard answered another question"),
                None => return error(503, format!("shard {shard} did not answer")),
            };
            data.extend::<Vec<Value>>(items);
            match next {
                Some(n) => from = n,
                None => (shard, from) = (shard + 1, 0),
            }
        }
        let next = (shard < self.controls.len()).then(|| format!("{shard}.{from}"));
        (200, json!({ "data": data, "next": next }))
    }

    /// Ask `shard` and wait at most [`SCRAPE_WAIT`] for its answer; a
    /// shard that takes the request later drops it, so a request answered
    /// 503 has not been applied (and a retry does not apply it twice).
    fn ask(&self, shard: usize, request: AdminRequest) -> Option<AdminAnswer> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let deadline = Instant::now() + SCRAPE_WAIT;
        self.controls[shard]
            .send(Control::Admin(request, deadline, tx))
            .ok()?;
        // A request the shard took just before the deadline is answered
        // within microseconds: the margin keeps its answer from being lost.
        rx.recv_deadline(deadline + std::time::Duration::from_millis(200))
            .ok()
    }
}

/// `{shard}.{slot}`.
fn parse_cursor(c: &str) -> Option<(usize, u32)> {
    let (shard, slot) = c.split_once('.')?;
    Some((shard.parse().ok()?, slot.parse().ok()?))
}

/// A percent-decoded path segment (client ids and topics may hold any
/// UTF-8, `/` included as `%2F` or, for topics, as itself).
fn decode(s: &str) -> Result<String, String> {
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| "the path is not UTF-8 once decoded".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_and_paths_decode() {
        assert_eq!(parse_cursor("1.4096"), Some((1, 4096)));
        assert_eq!(parse_cursor("x.1"), None);
        assert_eq!(parse_cursor("1"), None);
        assert_eq!(decode("a%2Fb/c%20d").unwrap(), "a/b/c d");
        assert!(decode("%FF").is_err());
    }
}
