//! Prometheus text (exposition format 0.0.4) from the shards' reports:
//! each shard's counters under a `shard` label, and the broker's totals
//! where a sum is what an operator reads.
//!
//! Sans-IO: reports in, text out. The shards' counters are plain integers
//! each shard keeps for itself; a scrape asks every shard for a copy
//! (`ShardCore::report`, constant time) at its next tick, so it never
//! stalls one.

use std::fmt::Write;

use crate::shard::ShardReport;

/// One metric: name, type, help, and its value in a report.
struct Metric {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
    /// None: not measured on this shard (no log, say).
    value: fn(&ShardReport) -> Option<u64>,
}

const METRICS: &[Metric] = &[
    Metric {
        name: "shardmq_connections",
        kind: "gauge",
        help: "MQTT connections attached to a session now.",
        value: |r| Some(r.stats.connections as u64),
    },
    Metric {
        name: "shardmq_sessions",
        kind: "gauge",
        help: "Sessions held, connected or offline.",
        value: |r| Some(r.sessions as u64),
    },
    Metric {
        name: "shardmq_subscriptions",
        kind: "gauge",
        help: "Subscriptions of the sessions held.",
        value: |r| Some(r.subscriptions as u64),
    },
    Metric {
        name: "shardmq_retained_messages",
        kind: "gauge",
        help: "Retained messages stored.",
        value: |r| Some(r.retained as u64),
    },
    Metric {
        name: "shardmq_messages_routed_total",
        kind: "counter",
        help: "Messages routed from this shard's publishers.",
        value: |r| Some(r.stats.routed),
    },
    Metric {
        name: "shardmq_deliveries_total",
        kind: "counter",
        help: "Deliveries into this shard's sessions (queued or sent).",
        value: |r| Some(r.stats.delivered),
    },
    Metric {
        name: "shardmq_connects_refused_total",
        kind: "counter",
        help: "CONNECTs refused at the handshake (client id, login, address, will).",
        value: |r| Some(r.stats.connects_refused),
    },
    Metric {
        name: "shardmq_retained_dropped_total",
        kind: "counter",
        help: "Retained messages not kept: the store was full or the message too large.",
        value: |r| Some(r.stats.retained_dropped),
    },
    Metric {
        name: "shardmq_delayed_bytes_full_total",
        kind: "counter",
        help: "Times the shard's share of storage.delayed_bytes_max was reached.",
        value: |r| Some(r.stats.delayed_bytes_full),
    },
    Metric {
        name: "shardmq_log_appends_failed_total",
        kind: "counter",
        help: "Log records that could not be written (log full, record too large).",
        value: |r| Some(r.stats.log_appends_failed),
    },
    Metric {
        name: "shardmq_send_timeouts_total",
        kind: "counter",
        help: "Connections closed because the client took no byte for server.send_timeout_ms.",
        value: |r| Some(r.stats.send_timeouts),
    },
    Metric {
        name: "shardmq_tls_handshakes_refused_total",
        kind: "counter",
        help: "TLS connections closed at accept: server.tls_handshakes_max were waiting.",
        value: |r| Some(r.stats.tls_handshakes_refused),
    },
    Metric {
        name: "shardmq_log_used_bytes",
        kind: "gauge",
        help: "Bytes written in the log's segments on disk (durable modes only).",
        value: |r| r.log.map(|l| l.used_bytes),
    },
    Metric {
        name: "shardmq_log_live_bytes",
        kind: "gauge",
        help: "Of those, bytes of records still live.",
        value: |r| r.log.map(|l| l.live_bytes),
    },
    Metric {
        name: "shardmq_log_sealed_segments",
        kind: "gauge",
        help: "Sealed log segments (besides the one written and the spare).",
        value: |r| r.log.map(|l| l.sealed_segments as u64),
    },
    Metric {
        name: "shardmq_log_full",
        kind: "gauge",
        help: "1 while the log has no spare segment: QoS 1/2 publishes and new persistent sessions are refused.",
        value: |r| r.log.map(|l| u64::from(l.full || l.others_full > 0)),
    },
];

/// The text for `GET /metrics`: every metric per shard, `shards` the
/// broker's shard count (a shard missing from `reports` did not answer in
/// time and is counted in `shardmq_scrape_shards_missing`).
pub fn render(reports: &[ShardReport], shards: usize) -> String {
    let mut out = String::with_capacity(4096);
    let mut reports = reports.to_vec();
    reports.sort_by_key(|r| r.shard);
    for m in METRICS {
        let values: Vec<(usize, u64)> = reports
            .iter()
            .filter_map(|r| (m.value)(r).map(|v| (r.shard, v)))
            .collect();
        if values.is_empty() {
            continue; // not measured here (the log metrics in memory mode)
        }
        let _ = writeln!(out, "# HELP {} {}", m.name, m.help);
        let _ = writeln!(out, "# TYPE {} {}", m.name, m.kind);
        for (shard, v) in values {
            let _ = writeln!(out, "{}{{shard=\"{shard}\"}} {v}", m.name);
        }
    }
    let _ = writeln!(
        out,
        "# HELP shardmq_shards Shards (threads) of this broker."
    );
    let _ = writeln!(out, "# TYPE shardmq_shards gauge");
    let _ = writeln!(out, "shardmq_shards {shards}");
    let _ = writeln!(
        out,
        "# HELP shardmq_scrape_shards_missing Shards that did not answer this scrape in time."
    );
    let _ = writeln!(out, "# TYPE shardmq_scrape_shards_missing gauge");
    let _ = writeln!(
        out,
        "shardmq_scrape_shards_missing {}",
        shards.saturating_sub(reports.len())
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_has_help_type_and_one_line_per_shard() {
        let mut a = ShardReport {
            shard: 1,
            sessions: 3,
            ..Default::default()
        };
        a.stats.routed = 7;
        let b = ShardReport::default();
        let text = render(&[a, b], 3);
        assert!(text.contains("shardmq_messages_routed_total{shard=\"1\"} 7\n"));
        assert!(text.contains("shardmq_sessions{shard=\"0\"} 0\n"));
        assert!(text.contains("shardmq_scrape_shards_missing 1\n"));
        for m in METRICS.iter().filter(|m| (m.value)(&b).is_some()) {
            assert!(text.contains(&format!("# TYPE {} {}\n", m.name, m.kind)));
            assert_eq!(
                m.kind == "counter",
                m.name.ends_with("_total"),
                "{}",
                m.name
            );
            let lines = text
                .lines()
                .filter(|l| l.starts_with(&format!("{}{{", m.name)));
            assert_eq!(lines.count(), 2, "{}", m.name);
        }
        assert!(!text.contains("shardmq_log_used_bytes"), "no log: left out");
        // Shard 0 comes first.
        assert!(text.find("{shard=\"0\"}").unwrap() < text.find("{shard=\"1\"}").unwrap());
    }
}
