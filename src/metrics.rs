//! Prometheus text (exposition format 0.0.4) from the shards' reports:
//! each shard's counters under a `shard` label, and the broker's totals
//! where a sum is what an operator reads.
//!
//! Sans-IO: reports in, text out. The shards' counters are plain integers
//! each shard keeps for itself; a scrape asks every shard for a copy
//! (`ShardCore::report`, constant time) at its next tick, so it never
//! stalls one.

use std::fmt::Write;

use crate::shard::{ConnectRefusal, ShardReport};

/// One metric: name, type, help, and its value in a report.
struct Metric {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
    /// A label besides `shard` and its values; None: `shard` only.
    label: Option<(&'static str, &'static [&'static str])>,
    /// The value for the label's value at that index (0 without a label);
    /// None: not measured on this shard (no log, say).
    value: fn(&ShardReport, usize) -> Option<u64>,
}

const QOS: Option<(&str, &[&str])> = Some(("qos", &["0", "1", "2"]));

/// The `reason` label of `shardmq_connects_refused_total`, in the order of
/// [`ConnectRefusal::ALL`].
const REFUSED: [&str; ConnectRefusal::ALL.len()] = {
    let mut labels = [""; ConnectRefusal::ALL.len()];
    let mut i = 0;
    while i < labels.len() {
        labels[i] = ConnectRefusal::ALL[i].label();
        i += 1;
    }
    labels
};

/// The `reason` label of `shardmq_messages_dropped_total`, in the order
/// of [`dropped_by_reason`].
const DROPPED: &[&str; 7] = &[
    "queue_full",
    "expired",
    "offline_qos0",
    "too_large",
    "not_authorized",
    "no_subscribers",
    "unreadable",
];

/// A shard's dropped messages by reason, in the order of [`DROPPED`]
/// (`$SYS` sums them).
pub(crate) fn dropped_by_reason(r: &ShardReport) -> [u64; 7] {
    let s = &r.messages;
    [
        s.dropped_queue_full,
        s.dropped_expired,
        s.dropped_offline_qos0,
        s.dropped_too_large,
        s.denied_publish + s.denied_delivery,
        r.stats.no_subscribers,
        s.lost_unreadable,
    ]
}

const METRICS: &[Metric] = &[
    Metric {
        name: "shardmq_connections",
        kind: "gauge",
        help: "MQTT connections attached to a session now.",
        label: None,
        value: |r, _| Some(r.stats.connections as u64),
    },
    Metric {
        name: "shardmq_sessions",
        kind: "gauge",
        help: "Sessions held, connected or offline.",
        label: None,
        value: |r, _| Some(r.sessions as u64),
    },
    Metric {
        name: "shardmq_subscriptions",
        kind: "gauge",
        help: "Subscriptions of the sessions held.",
        label: None,
        value: |r, _| Some(r.subscriptions as u64),
    },
    Metric {
        name: "shardmq_routes",
        kind: "gauge",
        help: "Entries of the shard's route replica: (filter, shard or node) pairs, \
               and (filter, shard) pairs with persistent subscribers.",
        label: None,
        value: |r, _| Some(r.routes as u64),
    },
    Metric {
        name: "shardmq_retained_messages",
        kind: "gauge",
        help: "Retained messages stored.",
        label: None,
        value: |r, _| Some(r.retained as u64),
    },
    Metric {
        name: "shardmq_retained_bytes",
        kind: "gauge",
        help: "Bytes of the retained messages stored (topic, payload, properties).",
        label: None,
        value: |r, _| Some(r.retained_bytes),
    },
    Metric {
        name: "shardmq_delayed_messages",
        kind: "gauge",
        help: "Delayed publishes ($delayed/...) held.",
        label: None,
        value: |r, _| Some(r.delayed as u64),
    },
    Metric {
        name: "shardmq_delayed_bytes",
        kind: "gauge",
        help: "Bytes of the delayed publishes held.",
        label: None,
        value: |r, _| Some(r.delayed_bytes),
    },
    Metric {
        name: "shardmq_mesh_batches_total",
        kind: "counter",
        help: "Batches the shard handed to its lanes to other shards.",
        label: None,
        value: |r, _| Some(r.mesh.0),
    },
    Metric {
        name: "shardmq_mesh_messages_total",
        kind: "counter",
        help: "Messages in those batches.",
        label: None,
        value: |r, _| Some(r.mesh.1),
    },
    Metric {
        name: "shardmq_mesh_lane_stalls_total",
        kind: "counter",
        help: "Batches that waited for room on a full lane to another shard (mesh.lane_capacity).",
        label: None,
        value: |r, _| Some(r.mesh.2),
    },
    Metric {
        name: "shardmq_mesh_pauses_total",
        kind: "counter",
        help: "Times a connection's reading paused: the outbox to other shards held more than mesh.outbox_messages_max.",
        label: None,
        value: |r, _| Some(r.stats.mesh_pauses),
    },
    Metric {
        name: "shardmq_publisher_holds_total",
        kind: "counter",
        help: "Times a connection's reading paused: a connected subscriber it publishes to had half of mqtt.queue_messages_max or queue_bytes_max waiting.",
        label: None,
        value: |r, _| Some(r.stats.publisher_holds),
    },
    Metric {
        name: "shardmq_publisher_holds_expired_total",
        kind: "counter",
        help: "Times a held connection was read again after mqtt.publisher_hold_ms, its subscriber still behind.",
        label: None,
        value: |r, _| Some(r.stats.publisher_holds_expired),
    },
    Metric {
        name: "shardmq_messages_routed_total",
        kind: "counter",
        help: "Messages routed from this shard's publishers.",
        label: None,
        value: |r, _| Some(r.stats.routed),
    },
    Metric {
        name: "shardmq_deliveries_total",
        kind: "counter",
        help: "Deliveries into this shard's sessions (queued or sent).",
        label: None,
        value: |r, _| Some(r.stats.delivered),
    },
    Metric {
        name: "shardmq_connects_accepted_total",
        kind: "counter",
        help: "CONNECTs accepted (a session attached).",
        label: None,
        value: |r, _| Some(r.stats.connects_accepted),
    },
    Metric {
        name: "shardmq_connects_refused_total",
        kind: "counter",
        help: "Connections refused before their session attached, by reason.",
        label: Some(("reason", &REFUSED)),
        value: |r, i| Some(r.stats.connects_refused[i]),
    },
    Metric {
        name: "shardmq_messages_received_total",
        kind: "counter",
        help: "PUBLISHes accepted from clients, by QoS.",
        label: QOS,
        value: |r, q| Some(r.messages.received[q]),
    },
    Metric {
        name: "shardmq_message_bytes_received_total",
        kind: "counter",
        help: "Payload bytes of the PUBLISHes accepted from clients, by QoS.",
        label: QOS,
        value: |r, q| Some(r.messages.received_bytes[q]),
    },
    Metric {
        name: "shardmq_messages_sent_total",
        kind: "counter",
        help: "PUBLISHes sent to clients (first transmissions), by the QoS sent with.",
        label: QOS,
        value: |r, q| Some(r.messages.sent[q]),
    },
    Metric {
        name: "shardmq_message_bytes_sent_total",
        kind: "counter",
        help: "Payload bytes of the PUBLISHes sent to clients, by QoS.",
        label: QOS,
        value: |r, q| Some(r.messages.sent_bytes[q]),
    },
    Metric {
        name: "shardmq_messages_dropped_total",
        kind: "counter",
        help: "Messages dropped, by reason: a full queue, expiry, QoS 0 to an offline session, larger than the client takes, the ACL, no subscriber, unreadable from the log.",
        label: Some(("reason", DROPPED)),
        value: |r, reason| Some(dropped_by_reason(r)[reason]),
    },
    Metric {
        name: "shardmq_publishes_refused_total",
        kind: "counter",
        help: "PUBLISHes refused for room: a full log (QoS 1/2; 5.0: 0x97), or the delayed-publish budget.",
        label: Some(("reason", &["store_full", "delayed_full"])),
        value: |r, i| {
            let s = &r.messages;
            Some([s.refused_store_full, s.refused_delayed_full][i])
        },
    },
    Metric {
        name: "shardmq_bytes_received_total",
        kind: "counter",
        help: "MQTT bytes read from clients (inside TLS and WebSocket).",
        label: None,
        value: |r, _| Some(r.stats.bytes_received),
    },
    Metric {
        name: "shardmq_bytes_sent_total",
        kind: "counter",
        help: "MQTT bytes written to clients (inside TLS and WebSocket).",
        label: None,
        value: |r, _| Some(r.stats.bytes_sent),
    },
    Metric {
        name: "shardmq_queued_messages",
        kind: "gauge",
        help: "Messages waiting in the sessions' queues (not in flight).",
        label: None,
        value: |r, _| Some(r.stats.queued),
    },
    Metric {
        name: "shardmq_inflight_messages",
        kind: "gauge",
        help: "Messages sent at QoS 1 or 2 and not yet acknowledged.",
        label: None,
        value: |r, _| Some(r.stats.inflight),
    },
    Metric {
        name: "shardmq_retained_dropped_total",
        kind: "counter",
        help: "Retained messages not kept: the store was full or the message too large.",
        label: None,
        value: |r, _| Some(r.stats.retained_dropped),
    },
    Metric {
        name: "shardmq_delayed_bytes_full_total",
        kind: "counter",
        help: "Times the shard's share of storage.delayed_bytes_max was reached.",
        label: None,
        value: |r, _| Some(r.stats.delayed_bytes_full),
    },
    Metric {
        name: "shardmq_log_appends_failed_total",
        kind: "counter",
        help: "Log records that could not be written (log full, record too large).",
        label: None,
        value: |r, _| Some(r.stats.log_appends_failed),
    },
    Metric {
        name: "shardmq_send_timeouts_total",
        kind: "counter",
        help: "Connections closed because the client took no byte for server.send_timeout_ms.",
        label: None,
        value: |r, _| Some(r.stats.send_timeouts),
    },
    Metric {
        name: "shardmq_tls_handshakes_refused_total",
        kind: "counter",
        help: "TLS connections closed at accept: server.tls_handshakes_max were waiting.",
        label: None,
        value: |r, _| Some(r.stats.tls_handshakes_refused),
    },
    Metric {
        name: "shardmq_log_used_bytes",
        kind: "gauge",
        help: "Bytes written in the log's segments on disk (durable modes only).",
        label: None,
        value: |r, _| r.log.map(|l| l.used_bytes),
    },
    Metric {
        name: "shardmq_log_live_bytes",
        kind: "gauge",
        help: "Of those, bytes of records still live.",
        label: None,
        value: |r, _| r.log.map(|l| l.live_bytes),
    },
    Metric {
        name: "shardmq_log_sealed_segments",
        kind: "gauge",
        help: "Sealed log segments (besides the one written and the spare).",
        label: None,
        value: |r, _| r.log.map(|l| l.sealed_segments as u64),
    },
    Metric {
        name: "shardmq_log_compactions_total",
        kind: "counter",
        help: "Log segments compacted (live records copied forward, the segment freed).",
        label: None,
        value: |r, _| r.log.map(|l| l.compactions),
    },
    Metric {
        name: "shardmq_log_full",
        kind: "gauge",
        help: "1 while the log has no spare segment: QoS 1/2 publishes and new persistent sessions are refused.",
        label: None,
        value: |r, _| r.log.map(|l| u64::from(l.full || l.others_full > 0)),
    },
    Metric {
        name: "shardmq_cluster_links",
        kind: "gauge",
        help: "Bridge links of the shard: to peers (out, up or in their handshake) and from them (in, handshake done).",
        label: Some(("direction", &["out", "in"])),
        value: |r, i| {
            r.cluster
                .map(|c| [c.bridge.links_out, c.bridge.links_in][i] as u64)
        },
    },
    Metric {
        name: "shardmq_cluster_link_closes_total",
        kind: "counter",
        help: "Bridge links closed: broken, refused, or their peer's run ended.",
        label: None,
        value: |r, _| r.cluster.map(|c| c.bridge.link_closes),
    },
    Metric {
        name: "shardmq_cluster_messages_dropped_total",
        kind: "counter",
        help: "Messages between nodes lost: for a peer (out: not up, past cluster.link_queue_bytes_max, or unconfirmed when its run ended or it was declared down; shared picks are served again) or from one (in: expired on the way, the log could not take them, or a passed-on shared pick without a member).",
        label: Some(("direction", &["out", "in"])),
        value: |r, i| {
            r.cluster
                .map(|c| [c.bridge.messages_dropped, c.core.remote_dropped][i])
        },
    },
    Metric {
        name: "shardmq_cluster_messages_replayed_total",
        kind: "counter",
        help: "Messages written again on a new link because the peer had not confirmed them on one that broke.",
        label: None,
        value: |r, _| r.cluster.map(|c| c.bridge.messages_replayed),
    },
    Metric {
        name: "shardmq_cluster_acks_unconfirmed_total",
        kind: "counter",
        help: "Publishers' acknowledgements sent after waiting 10 s for a peer to confirm the message (its link not up, or that far behind); the message is still sent.",
        label: None,
        value: |r, _| r.cluster.map(|c| c.bridge.acks_unconfirmed),
    },
    Metric {
        name: "shardmq_cluster_confirms_after_sync_total",
        kind: "counter",
        help: "Confirmations of messages to peers that waited for this shard's log to be synced first (power_safe: what this node confirmed survives a power cut here).",
        label: None,
        value: |r, _| r.cluster.map(|c| c.bridge.confirms_after_sync),
    },
    Metric {
        name: "shardmq_cluster_link_pauses_total",
        kind: "counter",
        help: "Times a connection's reading paused because a peer node had half of cluster.link_queue_bytes_max or more of this shard's messages unconfirmed (publishers wait rather than have messages dropped).",
        label: None,
        value: |r, _| r.cluster.map(|_| r.stats.link_pauses),
    },
    Metric {
        name: "shardmq_cluster_duplicates_skipped_total",
        kind: "counter",
        help: "Messages from peers skipped because they had come already (a replay after a broken link).",
        label: None,
        value: |r, _| r.cluster.map(|c| c.bridge.duplicates_skipped),
    },
    Metric {
        name: "shardmq_cluster_unconfirmed_bytes",
        kind: "gauge",
        help: "Bytes of messages (and of sessions' moves and answers) sent to peers and not yet confirmed by them (kept to be written again if a link breaks).",
        label: None,
        value: |r, _| r.cluster.map(|c| c.bridge.unconfirmed_bytes as u64),
    },
    Metric {
        name: "shardmq_cluster_peer_wills",
        kind: "gauge",
        help: "Wills held for peers' clients, published here if their node's run ends.",
        label: None,
        value: |r, _| r.cluster.map(|c| c.core.peer_wills_held as u64),
    },
    Metric {
        name: "shardmq_cluster_peer_wills_total",
        kind: "counter",
        help: "Wills of peers' ended runs: published here, cancelled (the client came back in time), or dropped (more than cluster.peer_wills_max waiting).",
        label: Some(("outcome", &["published", "cancelled", "dropped"])),
        value: |r, i| {
            r.cluster.map(|c| {
                let w = &c.core;
                [
                    w.peer_wills_published,
                    w.peer_wills_cancelled,
                    w.peer_wills_dropped,
                ][i]
            })
        },
    },
    Metric {
        name: "shardmq_cluster_retained_stale_total",
        kind: "counter",
        help: "Retained versions from peers not kept: older than this node's.",
        label: None,
        value: |r, _| r.cluster.map(|c| c.core.retained_stale),
    },
    Metric {
        name: "shardmq_cluster_tombstones_forgotten_early_total",
        kind: "counter",
        help: "Retained deletes forgotten before cluster.retained_tombstone_s: more of them than the shard keeps retained messages.",
        label: None,
        value: |r, _| r.cluster.map(|c| c.core.tombstones_forgotten_early),
    },
    Metric {
        name: "shardmq_cluster_claims_unanswered_total",
        kind: "counter",
        help: "CONNACKs sent after waiting 2 s for a peer's acknowledgement of the client id's claim.",
        label: None,
        value: |r, _| r.cluster.map(|c| c.core.claims_unanswered),
    },
    Metric {
        name: "shardmq_cluster_takeovers_total",
        kind: "counter",
        help: "Connections closed here (DISCONNECT 0x8E; refused 0x88 before their CONNACK) because their client connected later on another node.",
        label: None,
        value: |r, _| r.cluster.map(|c| c.core.connections_taken_over),
    },
    Metric {
        name: "shardmq_cluster_sessions_discarded_total",
        kind: "counter",
        help: "Sessions ended here because their client connected with Clean Start on another node.",
        label: None,
        value: |r, _| r.cluster.map(|c| c.core.sessions_discarded),
    },
    Metric {
        name: "shardmq_cluster_log_standbys",
        kind: "gauge",
        help: "Standby nodes the shards' logs are copied to (cluster.replicas - 1 per shard while that many peers are up).",
        label: None,
        value: |r, _| r.cluster.map(|c| c.core.replication.standbys as u64),
    },
    Metric {
        name: "shardmq_cluster_log_standbys_waited",
        kind: "gauge",
        help: "Of those, the ones acknowledgements wait for (not behind for 10 s, not refusing).",
        label: None,
        value: |r, _| r.cluster.map(|c| c.core.replication.standbys_waited as u64),
    },
    Metric {
        name: "shardmq_cluster_log_records_behind",
        kind: "gauge",
        help: "Log records not yet held by the slowest standby waited for, summed over shards.",
        label: None,
        value: |r, _| r.cluster.map(|c| c.core.replication.records_behind),
    },
    Metric {
        name: "shardmq_cluster_log_standbys_given_up_total",
        kind: "counter",
        help: "Times a standby stopped being waited for: it held nothing new for 10 s, or refused to keep a copy.",
        label: None,
        value: |r, _| r.cluster.map(|c| c.core.replication.standbys_given_up),
    },
    Metric {
        name: "shardmq_cluster_log_copies",
        kind: "gauge",
        help: "Copies of peers' shard logs kept here (storage.data_dir/replicas).",
        label: None,
        value: |r, _| r.cluster.map(|c| c.core.replication.copies as u64),
    },
    Metric {
        name: "shardmq_cluster_log_copy_bytes",
        kind: "gauge",
        help: "Bytes of their segment files.",
        label: None,
        value: |r, _| r.cluster.map(|c| c.core.replication.copy_bytes),
    },
    Metric {
        name: "shardmq_cluster_log_copies_started_total",
        kind: "counter",
        help: "Copies of peers' shard logs started from the beginning (a new standby, a new run of the peer, or a copy too far behind).",
        label: None,
        value: |r, _| r.cluster.map(|c| c.core.replication.copies_started),
    },
    Metric {
        name: "shardmq_cluster_log_copy_syncs_total",
        kind: "counter",
        help: "power_safe: group commits that synced peers' log copies before answering for them.",
        label: None,
        value: |r, _| r.cluster.map(|c| c.core.replication.copy_syncs),
    },
    Metric {
        name: "shardmq_cluster_log_chunks_refused_total",
        kind: "counter",
        help: "Chunks of peers' logs refused (records that do not check out); each closes its link.",
        label: None,
        value: |r, _| r.cluster.map(|c| c.core.replication.chunks_refused),
    },
    Metric {
        name: "shardmq_cluster_sessions_moved_in_total",
        kind: "counter",
        help: "Sessions that moved here from another node with their client.",
        label: None,
        value: |r, _| r.cluster.map(|c| c.core.sessions_moved_in),
    },
    Metric {
        name: "shardmq_cluster_sessions_adopted_total",
        kind: "counter",
        help: "Sessions taken over from the log copy of a node declared down.",
        label: None,
        value: |r, _| r.cluster.map(|c| c.core.sessions_adopted),
    },
    Metric {
        name: "shardmq_cluster_sessions_adopted_merged_total",
        kind: "counter",
        help: "Adopted sessions taken into a session of the same client id here.",
        label: None,
        value: |r, _| r.cluster.map(|c| c.core.sessions_adopted_merged),
    },
    Metric {
        name: "shardmq_cluster_adopted_deliveries_total",
        kind: "counter",
        help: "Queued and in-flight deliveries of adopted sessions.",
        label: None,
        value: |r, _| r.cluster.map(|c| c.core.adopted_deliveries),
    },
    Metric {
        name: "shardmq_cluster_adopted_given_back_total",
        kind: "counter",
        help: "Adopted sessions ended because the run they came from came back (a partition healed).",
        label: None,
        value: |r, _| r.cluster.map(|c| c.core.adopted_given_back),
    },
    Metric {
        name: "shardmq_cluster_adopted_given_back_deliveries_total",
        kind: "counter",
        help: "Deliveries queued in adopted sessions that were dropped when they were given back.",
        label: None,
        value: |r, _| r.cluster.map(|c| c.core.adopted_given_back_deliveries),
    },
    Metric {
        name: "shardmq_cluster_adopted_stale_total",
        kind: "counter",
        help: "Sessions of a dead node dropped, not taken over: their client came back first and was told its session is new.",
        label: None,
        value: |r, _| r.cluster.map(|c| c.core.adopted_stale),
    },
    Metric {
        name: "shardmq_cluster_adopted_stale_deliveries_total",
        kind: "counter",
        help: "Deliveries of those sessions.",
        label: None,
        value: |r, _| r.cluster.map(|c| c.core.adopted_stale_deliveries),
    },
    Metric {
        name: "shardmq_cluster_adopted_messages_total",
        kind: "counter",
        help: "Messages routed to a node declared down before it confirmed them, given to the sessions taken over from it here.",
        label: None,
        value: |r, _| r.cluster.map(|c| c.core.adopted_messages),
    },
    Metric {
        name: "shardmq_cluster_adopted_messages_dropped_total",
        kind: "counter",
        help: "Such messages that found no session taken over here (none of that node's, or 10 s without a decision).",
        label: None,
        value: |r, _| r.cluster.map(|c| c.core.adopted_messages_dropped),
    },
    Metric {
        name: "shardmq_cluster_sessions_kept",
        kind: "gauge",
        help: "Sessions that moved to another node, kept here until that node says its standbys' copies hold them.",
        label: None,
        value: |r, _| r.cluster.map(|c| c.core.sessions_kept),
    },
    Metric {
        name: "shardmq_cluster_kept_confirmed_total",
        kind: "counter",
        help: "Kept sessions that the node they moved to said its standbys' copies hold.",
        label: None,
        value: |r, _| r.cluster.map(|c| c.core.kept_confirmed),
    },
    Metric {
        name: "shardmq_cluster_kept_unconfirmed_total",
        kind: "counter",
        help: "Kept sessions dropped without that word: after 60 s, past 256 MiB kept, or a newer run of that node recovered its log.",
        label: None,
        value: |r, _| r.cluster.map(|c| c.core.kept_unconfirmed),
    },
    Metric {
        name: "shardmq_cluster_sessions_orphaned_total",
        kind: "counter",
        help: "Kept sessions sent to the node taking over from the node they moved to, declared down before its standbys held them.",
        label: None,
        value: |r, _| r.cluster.map(|c| c.core.sessions_orphaned),
    },
    Metric {
        name: "shardmq_cluster_orphan_parts_taken_total",
        kind: "counter",
        help: "Parts of orphaned sessions taken in here as sessions taken over.",
        label: None,
        value: |r, _| r.cluster.map(|c| c.core.orphan_parts_taken),
    },
    Metric {
        name: "shardmq_cluster_orphan_parts_superseded_total",
        kind: "counter",
        help: "Parts of orphaned sessions not taken: the copy of the dead node's log taken over here held their whole move.",
        label: None,
        value: |r, _| r.cluster.map(|c| c.core.orphan_parts_superseded),
    },
    Metric {
        name: "shardmq_cluster_orphan_parts_dropped_total",
        kind: "counter",
        help: "Parts of orphaned sessions dropped: no decision on the dead node within 10 s, or past 64 MiB waiting.",
        label: None,
        value: |r, _| r.cluster.map(|c| c.core.orphan_parts_dropped),
    },
    Metric {
        name: "shardmq_cluster_adopted_refused_total",
        kind: "counter",
        help: "Sessions of a dead node not taken over: limits.sessions_max reached.",
        label: None,
        value: |r, _| r.cluster.map(|c| c.core.adopted_refused),
    },
    Metric {
        name: "shardmq_cluster_sessions_moved_out_total",
        kind: "counter",
        help: "Sessions that moved from here to the node their client connected to.",
        label: None,
        value: |r, _| r.cluster.map(|c| c.core.sessions_moved_out),
    },
    Metric {
        name: "shardmq_cluster_moves_given_up_total",
        kind: "counter",
        help: "Session moves here given up: the other node down, or 60 s passed (what it held stays there; parts that come later are dropped).",
        label: None,
        value: |r, _| r.cluster.map(|c| c.core.moves_given_up),
    },
    Metric {
        name: "shardmq_cluster_moves_stayed_total",
        kind: "counter",
        help: "Session moves here that found the session staying on the other node (its client went back there first, or it ended or gave the move up there).",
        label: None,
        value: |r, _| r.cluster.map(|c| c.core.moves_stayed),
    },
    Metric {
        name: "shardmq_cluster_moves_declined_total",
        kind: "counter",
        help: "Sessions offered here after their client's CONNACK went without them (they stay on the other node).",
        label: None,
        value: |r, _| r.cluster.map(|c| c.core.moves_declined),
    },
    Metric {
        name: "shardmq_cluster_stale_deliveries_dropped_total",
        kind: "counter",
        help: "Deliveries of a session's older copy from another node, dropped here: a partition let two copies live, and the client was told about this one.",
        label: None,
        value: |r, _| r.cluster.map(|c| c.core.stale_deliveries_dropped),
    },
    Metric {
        name: "shardmq_cluster_move_deliveries_lost_total",
        kind: "counter",
        help: "Deliveries lost in session moves: past 64 MiB per move, unreadable from the log, or their session gone first.",
        label: None,
        value: |r, _| r.cluster.map(|c| c.core.move_deliveries_lost),
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
        let (label, label_values) = m.label.unwrap_or(("", &[""]));
        let mut lines = String::new();
        for r in &reports {
            for (i, lv) in label_values.iter().enumerate() {
                let Some(v) = (m.value)(r, i) else {
                    continue; // not measured here (the log metrics in memory mode)
                };
                let shard = r.shard;
                let _ = match m.label {
                    None => writeln!(lines, "{}{{shard=\"{shard}\"}} {v}", m.name),
                    Some(_) => writeln!(
                        lines,
                        "{}{{shard=\"{shard}\",{label}=\"{lv}\"}} {v}",
                        m.name
                    ),
                };
            }
        }
        if lines.is_empty() {
            continue;
        }
        let _ = writeln!(out, "# HELP {} {}", m.name, m.help);
        let _ = writeln!(out, "# TYPE {} {}", m.name, m.kind);
        out.push_str(&lines);
    }
    let mut merged = crate::shard::latency::Latencies::default();
    for r in &reports {
        merged.add(&r.latency);
    }
    let histograms = [
        (
            "shardmq_delivery_latency_seconds",
            "From routing a PUBLISH on its publisher's shard to handing it to a subscriber shard's sessions (0 on the same shard; in power_safe a logged message crosses after its group commit).",
            &merged.delivery,
            true,
        ),
        (
            "shardmq_log_sync_seconds",
            "One fdatasync of the log (power_safe).",
            &merged.log_sync,
            reports.iter().any(|r| r.log.is_some()),
        ),
        (
            "shardmq_log_commit_seconds",
            "From the first record waiting for a sync to the sync done: the longest a PUBACK or PUBREC of that group was held (power_safe).",
            &merged.log_commit,
            reports.iter().any(|r| r.log.is_some()),
        ),
    ];
    // A shard that did not answer would make the merged counts go down
    // (read as a reset): the histograms are left out of such a scrape.
    let all = reports.len() == shards;
    for (name, help, h, shown) in histograms {
        if shown && all {
            histogram(&mut out, name, help, h);
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

/// Bucket bounds of the latency histograms, seconds.
const BOUNDS_S: [f64; 18] = [
    0.00001, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
    0.5, 1.0, 2.5, 5.0, 10.0,
];

/// `h` (nanoseconds) as a Prometheus histogram in seconds: cumulative
/// buckets at [`BOUNDS_S`] (at the histogram's two significant figures),
/// sum and count.
fn histogram(out: &mut String, name: &str, help: &str, h: &hdrhistogram::Histogram<u64>) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} histogram");
    for le in BOUNDS_S {
        let below = h.count_between(0, (le * 1e9) as u64);
        let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {below}");
    }
    let count = h.len();
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
    let sum = h.mean() * count as f64 / 1e9;
    let _ = writeln!(out, "{name}_sum {sum}");
    let _ = writeln!(out, "{name}_count {count}");
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
        crate::shard::latency::record(
            &mut a.latency.delivery,
            std::time::Duration::from_micros(300),
        );
        let mut c = b.clone();
        crate::shard::latency::record(
            &mut c.latency.delivery,
            std::time::Duration::from_millis(20),
        );
        c.shard = 2;
        let text = render(&[a, b.clone(), c], 3);
        assert!(text.contains("shardmq_messages_routed_total{shard=\"1\"} 7\n"));
        assert!(text.contains("shardmq_sessions{shard=\"0\"} 0\n"));
        assert!(text.contains("shardmq_scrape_shards_missing 0\n"));
        let partial = render(std::slice::from_ref(&b), 2);
        assert!(partial.contains("shardmq_scrape_shards_missing 1\n"));
        assert!(
            !partial.contains("_bucket"),
            "no merged histogram of some shards"
        );
        for m in METRICS.iter().filter(|m| (m.value)(&b, 0).is_some()) {
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
            let per_shard = m.label.map_or(1, |(_, values)| values.len());
            assert_eq!(lines.count(), 3 * per_shard, "{}", m.name);
        }
        assert!(!text.contains("shardmq_log_used_bytes"), "no log: left out");
        assert!(
            !text.contains("shardmq_log_sync_seconds"),
            "no log: left out"
        );
        // The shards' histograms merged: 300 µs and 20 ms.
        let d = "shardmq_delivery_latency_seconds";
        assert!(
            text.contains(&format!("{d}_bucket{{le=\"0.00025\"}} 0\n")),
            "{text}"
        );
        assert!(
            text.contains(&format!("{d}_bucket{{le=\"0.0005\"}} 1\n")),
            "{text}"
        );
        assert!(
            text.contains(&format!("{d}_bucket{{le=\"0.025\"}} 2\n")),
            "{text}"
        );
        assert!(
            text.contains(&format!("{d}_bucket{{le=\"+Inf\"}} 2\n")),
            "{text}"
        );
        assert!(text.contains(&format!("{d}_count 2\n")), "{text}");
        // Shard 0 comes first.
        assert!(text.find("{shard=\"0\"}").unwrap() < text.find("{shard=\"1\"}").unwrap());
    }

    #[test]
    fn the_cluster_metrics_show_on_a_cluster_node_only() {
        let alone = render(&[ShardReport::default()], 1);
        assert!(!alone.contains("shardmq_cluster_"), "{alone}");
        let mut r = ShardReport::default();
        let mut c = crate::shard::ClusterReport::default();
        c.bridge.links_out = 2;
        c.bridge.messages_dropped = 3;
        c.core.remote_dropped = 4;
        c.core.peer_wills_cancelled = 5;
        c.core.connections_taken_over = 6;
        r.cluster = Some(c);
        let text = render(&[r], 1);
        for line in [
            "shardmq_cluster_links{shard=\"0\",direction=\"out\"} 2\n",
            "shardmq_cluster_links{shard=\"0\",direction=\"in\"} 0\n",
            "shardmq_cluster_messages_dropped_total{shard=\"0\",direction=\"out\"} 3\n",
            "shardmq_cluster_messages_dropped_total{shard=\"0\",direction=\"in\"} 4\n",
            "shardmq_cluster_peer_wills_total{shard=\"0\",outcome=\"cancelled\"} 5\n",
            "shardmq_cluster_takeovers_total{shard=\"0\"} 6\n",
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
    }
}
