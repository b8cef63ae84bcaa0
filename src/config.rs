//! Broker configuration: TOML with an embedded default, validated at start.
//!
//! Node-wide and read-only once the broker runs: each shard gets its own
//! copy. A file given with `--config` is merged over the embedded default, so
//! it only names what it changes; unknown keys and out-of-range values are
//! refused with a message naming the key.

use std::net::SocketAddr;
use std::path::Path;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::session::{OverflowPolicy, SessionLimits};

/// The embedded default configuration (what `--print-default-config` prints).
pub const DEFAULT_CONFIG: &str = include_str!("default.toml");

/// A configuration that cannot be used, with the key at fault.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Not TOML, an unknown key, or a value of the wrong type.
    #[error("config: {0}")]
    Parse(String),
    /// A value outside its allowed range, or limits that contradict each other.
    #[error("config: {key} = {value}: {why}")]
    Invalid {
        /// Dotted key, e.g. `mqtt.receive_maximum`.
        key: String,
        /// The value given.
        value: String,
        /// The allowed range or relationship.
        why: String,
    },
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Listeners, shards, connection limits.
    pub server: ServerConfig,
    /// MQTT limits.
    pub mqtt: MqttConfig,
    /// Shard-to-shard lanes.
    pub mesh: MeshConfig,
    /// The per-shard logs.
    pub storage: StorageConfig,
    /// Several nodes as one broker.
    pub cluster: ClusterConfig,
    /// Who may connect, and what they may read and write.
    pub auth: AuthConfig,
    /// The operator's HTTP listener (metrics).
    pub http: HttpConfig,
    /// Listeners with their transports; when any is given they replace
    /// `server.listen`.
    #[serde(default)]
    pub listeners: Vec<ListenerConfig>,
    /// Subscriptions clients get at CONNECT (`[[auto_subscribe]]`).
    #[serde(default)]
    pub auto_subscribe: Vec<AutoSubscribe>,
}

/// Rules in `[[auto_subscribe]]`, at most.
pub const AUTO_SUBSCRIBE_MAX: usize = 100;

/// One `[[auto_subscribe]]` rule: a subscription a client gets at every
/// CONNECT, as if it had sent SUBSCRIBE (no SUBACK; retained messages as
/// `retain_handling` says; the ACL still decides what it may read).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AutoSubscribe {
    /// The client ids it is for: `*` matches any run of characters; empty:
    /// every client id.
    #[serde(default)]
    pub client_id: String,
    /// The user name it is for; empty: any login, anonymous included.
    #[serde(default)]
    pub username: String,
    /// The topic filter, `$share/{group}/...` allowed; `%c` is replaced by
    /// the client id and `%u` by the user name. A client whose id or user
    /// name holds `+`, `#` or `/`, or would make the filter start with `$`
    /// where the rule's does not, does not get a rule that uses it, nor
    /// does a client without a user name a rule with `%u`.
    pub filter: String,
    /// Maximum QoS, 0 to 2.
    #[serde(default)]
    pub qos: u8,
    /// 5.0 No Local.
    #[serde(default)]
    pub no_local: bool,
    /// 5.0 Retain As Published.
    #[serde(default)]
    pub retain_as_published: bool,
    /// Retain Handling: 0 retained messages at every CONNECT, 1 only
    /// when the subscription is new, 2 none.
    #[serde(default)]
    pub retain_handling: u8,
}

impl AutoSubscribe {
    /// True when the rule is for this client.
    pub fn applies(&self, client_id: &str, username: Option<&str>) -> bool {
        (self.client_id.is_empty() || crate::auth::clients::glob(&self.client_id, client_id))
            && (self.username.is_empty() || username == Some(self.username.as_str()))
    }

    /// The filter with `%c` and `%u` filled in; None when a value is
    /// missing or could widen the filter (`+`, `#`, `/`).
    pub fn filter_for(&self, client_id: &str, username: Option<&str>) -> Option<String> {
        let unsafe_value = |v: &str| v.is_empty() || v.contains(['+', '#', '/']);
        // One pass: a `%u` inside the client id stays as it is.
        let mut filter = String::with_capacity(self.filter.len() + client_id.len());
        let mut rest = self.filter.as_str();
        while let Some(i) = rest.find('%') {
            filter.push_str(&rest[..i]);
            let value = match rest[i..].get(..2) {
                Some("%c") => Some(client_id),
                Some("%u") => Some(username?),
                _ => None,
            };
            match value {
                Some(v) if unsafe_value(v) => return None,
                Some(v) => {
                    filter.push_str(v);
                    rest = &rest[i + 2..];
                }
                None => {
                    filter.push('%');
                    rest = &rest[i + 1..];
                }
            }
        }
        filter.push_str(rest);
        // A value must not change what kind of filter it is: a client id
        // "$share" in "%c/inbox/#" would make a shared subscription to
        // every topic, "$SYS" one to the broker's topics.
        let sample = self.filter.replace("%c", "c").replace("%u", "u");
        let kind = |f: &str| (f.starts_with('$'), f.starts_with("$share/"));
        (kind(&filter) == kind(&sample)).then_some(filter)
    }

    /// Its options.
    pub fn options(&self) -> crate::codec::SubOptions {
        crate::codec::SubOptions {
            qos: match self.qos {
                0 => crate::codec::QoS::AtMostOnce,
                1 => crate::codec::QoS::AtLeastOnce,
                _ => crate::codec::QoS::ExactlyOnce,
            },
            no_local: self.no_local,
            retain_as_published: self.retain_as_published,
            retain_handling: self.retain_handling,
        }
    }

    fn validate(&self, i: usize, levels: usize) -> Result<(), ConfigError> {
        let key = |k: &str| format!("auto_subscribe[{i}].{k}");
        if self.qos > 2 {
            return Err(invalid(&key("qos"), &self.qos.to_string(), "0, 1 or 2"));
        }
        if self.retain_handling > 2 {
            let v = self.retain_handling.to_string();
            return Err(invalid(&key("retain_handling"), &v, "0, 1 or 2"));
        }
        let sample = self.filter.replace("%c", "c").replace("%u", "u");
        let inner = match crate::router::topic::parse_shared(&sample) {
            Ok(Some(_)) if self.no_local => {
                let why = "no_local is not allowed on a shared subscription";
                return Err(invalid(&key("no_local"), "true", why));
            }
            Ok(Some((_, inner))) => inner,
            Ok(None) => sample.as_str(),
            Err(e) => return Err(invalid(&key("filter"), &self.filter, &e.to_string())),
        };
        if let Err(e) = crate::router::topic::validate_topic_filter(inner, levels) {
            return Err(invalid(&key("filter"), &self.filter, &e.to_string()));
        }
        Ok(())
    }
}

/// One `[[listeners]]` entry.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// Address to listen on.
    pub bind: SocketAddr,
    /// `tcp`, `tls`, `ws` or `wss`.
    #[serde(default = "tcp")]
    pub transport: String,
    /// `ws` / `wss`: the HTTP path of the upgrade.
    #[serde(default = "mqtt_path")]
    pub ws_path: String,
    /// TLS: the certificate chain, PEM, leaf first.
    #[serde(default)]
    pub tls_cert_file: std::path::PathBuf,
    /// TLS: the private key, PEM (PKCS#8, PKCS#1 or SEC1).
    #[serde(default)]
    pub tls_key_file: std::path::PathBuf,
    /// TLS: CA certificates (PEM) client certificates are checked
    /// against; empty: no client certificates asked for.
    #[serde(default)]
    pub tls_client_ca_file: std::path::PathBuf,
    /// TLS: a client without a certificate is refused (needs
    /// `tls_client_ca_file`).
    #[serde(default)]
    pub tls_client_cert_required: bool,
    /// TLS: `none`, or the client certificate's identity becomes the
    /// user name (no password checked): `cn` its subject's common name,
    /// `dn` its whole subject (RFC 2253, as Mosquitto's
    /// `use_subject_as_username`). A client without a certificate is then
    /// refused.
    #[serde(default = "none")]
    pub username_from_cert: String,
}

fn none() -> String {
    "none".into()
}

fn mqtt_path() -> String {
    "/mqtt".into()
}

fn tcp() -> String {
    "tcp".into()
}

/// How a listener's connections are carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Plain TCP.
    Tcp,
    /// TLS 1.2 / 1.3 over TCP.
    Tls,
    /// WebSocket over TCP.
    Ws,
    /// WebSocket over TLS.
    Wss,
}

impl ListenerConfig {
    /// A plain TCP listener on `bind`.
    pub fn tcp(bind: SocketAddr) -> ListenerConfig {
        ListenerConfig {
            bind,
            transport: tcp(),
            ws_path: mqtt_path(),
            tls_cert_file: Default::default(),
            tls_key_file: Default::default(),
            tls_client_ca_file: Default::default(),
            tls_client_cert_required: false,
            username_from_cert: none(),
        }
    }

    /// Its transport (validated).
    pub fn transport(&self) -> Transport {
        match self.transport.as_str() {
            "tls" => Transport::Tls,
            "ws" => Transport::Ws,
            "wss" => Transport::Wss,
            _ => Transport::Tcp,
        }
    }

    fn validate(&self, i: usize) -> Result<(), ConfigError> {
        let key = |k: &str| format!("listeners[{i}].{k}");
        match self.transport.as_str() {
            "tcp" | "tls" | "ws" | "wss" => {}
            other => return Err(invalid(&key("transport"), other, "tcp, tls, ws or wss")),
        }
        if !self.ws_path.starts_with('/') || self.ws_path.contains([' ', '?', '#']) {
            return Err(invalid(
                &key("ws_path"),
                &self.ws_path,
                "a path: /, then no space, ? or #",
            ));
        }
        let tls = matches!(self.transport(), Transport::Tls | Transport::Wss);
        let empty = |p: &std::path::Path| p.as_os_str().is_empty();
        if tls && (empty(&self.tls_cert_file) || empty(&self.tls_key_file)) {
            return Err(invalid(
                &key("tls_cert_file"),
                "\"\"",
                "a tls listener needs tls_cert_file and tls_key_file",
            ));
        }
        let tls_files = [
            &self.tls_cert_file,
            &self.tls_key_file,
            &self.tls_client_ca_file,
        ]
        .iter()
        .any(|p| !empty(p));
        if !tls && tls_files {
            return Err(invalid(
                &key("transport"),
                &self.transport,
                "TLS files given for a listener that is not tls",
            ));
        }
        match self.username_from_cert.as_str() {
            "none" => {}
            "cn" | "dn" if tls && !empty(&self.tls_client_ca_file) => {}
            "cn" | "dn" => {
                return Err(invalid(
                    &key("username_from_cert"),
                    &self.username_from_cert,
                    "needs a tls listener with tls_client_ca_file (only a checked certificate names a user)",
                ))
            }
            other => return Err(invalid(&key("username_from_cert"), other, "none, cn or dn")),
        }
        if self.tls_client_cert_required && empty(&self.tls_client_ca_file) {
            return Err(invalid(
                &key("tls_client_cert_required"),
                "true",
                "needs tls_client_ca_file to check the certificates against",
            ));
        }
        Ok(())
    }
}

/// `[auth]`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Clients without a user name: true allowed, false refused; absent,
    /// allowed only on a loopback address and only without a password
    /// file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_anonymous: Option<bool>,
    /// Mosquitto password file; empty: none (any user name accepted).
    pub password_file: std::path::PathBuf,
    /// Mosquitto ACL file; empty: none (every topic allowed).
    pub acl_file: std::path::PathBuf,
    /// Client id patterns (`*`: any run of characters) a client may use;
    /// empty: any.
    #[serde(default)]
    pub client_id_allow: Vec<String>,
    /// Client id patterns no client may use.
    #[serde(default)]
    pub client_id_deny: Vec<String>,
    /// Networks (CIDR) clients may connect from; empty: any.
    #[serde(default)]
    pub address_allow: Vec<ipnet::IpNet>,
    /// Networks clients may not connect from.
    #[serde(default)]
    pub address_deny: Vec<ipnet::IpNet>,
    /// Client id pattern → the only user who may connect with such an id.
    #[serde(default)]
    pub client_id_users: std::collections::BTreeMap<String, String>,
    /// HMAC secret for JSON Web Tokens as passwords; empty: none.
    pub jwt_secret_file: std::path::PathBuf,
    /// PEM public keys for JSON Web Tokens; empty: none.
    pub jwt_public_key_file: std::path::PathBuf,
    /// Claims a token must carry, with `%c` and `%u` filled in.
    #[serde(default)]
    pub jwt_verify_claims: std::collections::BTreeMap<String, String>,
    /// The claim holding a token's topics.
    pub jwt_acl_claim: String,
}

/// `[http]`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Where `GET /metrics` is served (host:port); empty: nowhere.
    pub bind: String,
    /// The bearer token the admin API asks for; empty: the API answers
    /// loopback clients only.
    pub api_token: String,
}

impl HttpConfig {
    /// The address to serve on, None when disabled; Err if `bind` is no
    /// address.
    pub fn addr(&self) -> Result<Option<SocketAddr>, String> {
        match self.bind.trim() {
            "" => Ok(None),
            b => b
                .parse()
                .map(Some)
                .map_err(|_| format!("{b:?} is not an address like 127.0.0.1:8080")),
        }
    }
}

/// `[cluster]`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// This node's name; empty: no cluster.
    pub node_id: String,
    /// The cluster's name.
    pub name: String,
    /// Where membership datagrams arrive.
    pub listen: SocketAddr,
    /// The address peers reach this node at; empty: `listen`.
    pub advertise: String,
    /// Addresses of existing members.
    pub join: Vec<SocketAddr>,
    /// How often a node probes one peer.
    pub probe_interval_ms: u64,
    /// How long a probe waits for the direct answer.
    pub probe_timeout_ms: u64,
    /// How long a suspected node has to refute before it is down.
    pub suspect_timeout_ms: u64,
    /// How often a node alone announces itself to `join`.
    pub join_interval_ms: u64,
    /// Bytes of messages one shard keeps for one peer node until it
    /// confirms them (a broken link is replayed from them); past it,
    /// messages for that node are dropped (counted).
    pub link_queue_bytes_max: usize,
    /// Routes (filters) taken from one peer node at most.
    pub routes_max: usize,
    /// Wills taken from one shard of a peer node at most.
    pub peer_wills_max: usize,
    /// Bytes of wills (topics, payloads, client ids) taken from one shard
    /// of a peer node at most.
    pub peer_wills_bytes_max: usize,
    /// How long a node remembers a deleted retained message, in seconds.
    pub retained_tombstone_s: u64,
    /// What a node that sees fewer than half the members up does:
    /// `refuse_connects` or `serve` (`cluster::quorum`).
    pub on_minority: String,
    /// A file holding the cluster's shared secret (`cluster::secret`);
    /// empty: none (membership and links unauthenticated).
    pub secret_file: String,
    /// Nodes whose logs hold what is acknowledged: this one and
    /// `replicas - 1` standbys, 1 to 3.
    pub replicas: usize,
}

/// How acknowledged messages and sessions are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// No log: everything is lost when the process ends.
    Memory,
    /// Acknowledge once the record is in the mapped log: survives `kill -9`
    /// (the kernel still holds the pages), not a power failure.
    KillSafe,
    /// Acknowledge only after `fdatasync` of the log (grouped): survives a
    /// power failure too.
    PowerSafe,
}

/// `[storage]`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// `memory`, `kill_safe` or `power_safe`.
    pub durability: String,
    /// Directory of the logs.
    pub data_dir: std::path::PathBuf,
    /// Size of one preallocated segment file.
    pub segment_bytes: usize,
    /// Power-safe: how long the group-commit task lets records gather
    /// after the first one waits, before it syncs them (0: at once).
    pub sync_interval_ms: u64,
    /// Delayed publishes (`$delayed/{seconds}/{topic}`) the broker holds.
    pub delayed_messages_max: usize,
    /// Bytes of delayed publishes (topic, payload, properties) the broker
    /// holds.
    pub delayed_bytes_max: u64,
    /// Bytes of log segments on disk, all shards together.
    pub log_bytes_max: u64,
    /// Bytes (topic, payload, properties) one persistent session's queue
    /// holds with a log: beyond the memory limits of `[mqtt]`, its QoS 1/2
    /// messages wait in the log. 0: they never do.
    pub session_queue_bytes_max: usize,
}

/// `[server]`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Addresses to listen on.
    pub listen: Vec<SocketAddr>,
    /// Number of shards; 0 = one per online CPU.
    pub shards: usize,
    /// Pin shard i to the i-th CPU the process may run on, when there are
    /// no more shards than such CPUs.
    pub pin_cpus: bool,
    /// Connections the broker accepts at once.
    pub connections_max: usize,
    /// Time a new connection has to send CONNECT.
    pub connect_timeout_ms: u64,
    /// Longest an orderly stop (SIGTERM, SIGINT) takes before the process
    /// exits anyway.
    pub shutdown_timeout_s: u64,
    /// After the broker closes a connection (DISCONNECT, refusing CONNACK):
    /// how long it reads and discards the client's input, so the client
    /// reads the reason code instead of a reset.
    pub close_drain_ms: u64,
    /// ... and how many bytes at most.
    pub close_drain_bytes: usize,
    /// Longest a socket write may wait for the client to read before the
    /// connection is closed.
    pub send_timeout_ms: u64,
    /// TLS connections per shard waiting for their handshake and CONNECT.
    pub tls_handshakes_max: usize,
    /// io_uring registered buffer memory per shard.
    pub io_memory_bytes: usize,
    /// Socket read size.
    pub read_buffer_bytes: usize,
    /// Encoded bytes buffered per connection before a write.
    pub write_buffer_bytes: usize,
}

/// `[mqtt]`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    /// Largest packet accepted.
    pub packet_size_max_bytes: u32,
    /// Server Receive Maximum.
    pub receive_maximum: u16,
    /// Outbound in-flight cap.
    pub inflight_max: u16,
    /// Messages queued per session.
    pub queue_messages_max: usize,
    /// Bytes queued per session.
    pub queue_bytes_max: usize,
    /// How long a subscriber behind holds a connection publishing to it
    /// at most (`shard::pressure`); 0: never.
    pub publisher_hold_ms: u64,
    /// Overflow policy: `drop_new` or `drop_oldest`.
    pub queue_overflow: String,
    /// Queue QoS 0 for offline sessions.
    pub queue_qos0_offline: bool,
    /// Inbound Topic Alias Maximum.
    pub topic_alias_max: u16,
    /// Topic levels.
    pub topic_levels_max: usize,
    /// Subscriptions per session.
    pub subscriptions_max: usize,
    /// Sessions (connected or offline) in the whole broker.
    pub sessions_max: usize,
    /// Client id length.
    pub client_id_bytes_max: usize,
    /// Keepalive cap.
    pub keep_alive_s_max: u16,
    /// Session expiry cap.
    pub session_expiry_s_max: u32,
    /// Response Information prefix.
    pub response_topic_prefix: String,
    /// Retained messages in the whole broker.
    pub retained_messages_max: usize,
    /// Bytes of retained messages (topic, payload, properties) in the whole
    /// broker.
    pub retained_bytes_max: u64,
    /// Bytes of one retained message (topic, payload, properties).
    pub retained_message_bytes_max: usize,
    /// Bytes of user properties (names and values) one inbound packet may
    /// carry.
    pub user_properties_bytes_max: usize,
    /// Bytes of topics one session's outbound topic-alias map keeps.
    pub topic_alias_out_bytes_max: usize,
    /// Seconds between `$SYS` updates; 0: no `$SYS` topics.
    pub sys_interval_s: u64,
}

/// `[mesh]`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MeshConfig {
    /// Batches per lane.
    pub lane_capacity: usize,
    /// Messages buffered for other shards before reading pauses.
    pub outbox_messages_max: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config::from_toml("").expect("the embedded default config is valid")
    }
}

impl Config {
    /// Parse `text` merged over the embedded default, then validate.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let mut base: toml::Table = DEFAULT_CONFIG.parse().expect("embedded default is TOML");
        let user: toml::Table = text
            .parse()
            .map_err(|e| ConfigError::Parse(format!("{e}")))?;
        merge(&mut base, user);
        let config = Config::deserialize(base).map_err(|e| ConfigError::Parse(format!("{e}")))?;
        config.validate()?;
        Ok(config)
    }

    /// Read and parse a config file.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Config::from_toml(&text)
    }

    /// The whole config as TOML (every key, defaults included), as
    /// `shardmq check-config` prints it.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot print the config: {e}\n"))
    }

    /// Shards to run: the configured count, or one per online CPU.
    pub fn shard_count(&self) -> usize {
        if self.server.shards == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            self.server.shards
        }
    }

    /// The durability mode `storage.durability` names.
    pub fn durability(&self) -> Durability {
        match self.storage.durability.as_str() {
            "memory" => Durability::Memory,
            "power_safe" => Durability::PowerSafe,
            _ => Durability::KillSafe,
        }
    }

    /// Log segments one shard may keep on disk: its share of
    /// `storage.log_bytes_max`, in whole segments (the log keeps at least 3
    /// whatever this says: the one being written, the spare, one being
    /// compacted).
    pub fn log_segments_max(&self, shards: usize) -> usize {
        let share = self.storage.log_bytes_max / shards.max(1) as u64;
        let segments = share / self.storage.segment_bytes.max(1) as u64;
        usize::try_from(segments).unwrap_or(usize::MAX)
    }

    /// The session limits every shard hands its sessions.
    pub fn session_limits(&self) -> SessionLimits {
        let m = &self.mqtt;
        SessionLimits {
            receive_maximum: m.receive_maximum,
            inflight_max: m.inflight_max,
            queue_messages_max: m.queue_messages_max,
            queue_bytes_max: m.queue_bytes_max,
            queue_log_bytes_max: match self.durability() {
                Durability::Memory => 0,
                _ => self.storage.session_queue_bytes_max,
            },
            overflow: if m.queue_overflow == "drop_oldest" {
                OverflowPolicy::DropOldest
            } else {
                OverflowPolicy::DropNew
            },
            queue_qos0_offline: m.queue_qos0_offline,
            topic_alias_max: m.topic_alias_max,
            topic_alias_out_bytes_max: m.topic_alias_out_bytes_max,
            user_properties_bytes_max: m.user_properties_bytes_max,
            topic_levels_max: m.topic_levels_max,
            subscriptions_max: m.subscriptions_max,
            packet_size_max_bytes: m.packet_size_max_bytes,
            keep_alive_s_max: m.keep_alive_s_max,
            session_expiry_s_max: m.session_expiry_s_max,
            response_topic_prefix: m.response_topic_prefix.clone(),
            status: Default::default(),
        }
    }

    /// The listeners to open: `[[listeners]]`, or plain TCP on each
    /// `server.listen` address when there are none.
    pub fn effective_listeners(&self) -> Vec<ListenerConfig> {
        match self.listeners.is_empty() {
            true => self
                .server
                .listen
                .iter()
                .map(|&a| ListenerConfig::tcp(a))
                .collect(),
            false => self.listeners.clone(),
        }
    }

    /// Check every value's range and the relationships between limits.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.cluster.validate()?;
        let s = &self.server;
        let m = &self.mqtt;
        if s.listen.is_empty() && self.listeners.is_empty() {
            return Err(invalid("server.listen", "[]", "give at least one address"));
        }
        if self.auto_subscribe.len() > AUTO_SUBSCRIBE_MAX {
            let n = self.auto_subscribe.len().to_string();
            return Err(invalid("auto_subscribe", &n, "at most 100 rules"));
        }
        for (i, a) in self.auto_subscribe.iter().enumerate() {
            a.validate(i, m.topic_levels_max)?;
        }
        for (i, l) in self.listeners.iter().enumerate() {
            l.validate(i)?;
        }
        if let Err(why) = self.http.addr() {
            return Err(invalid("http.bind", &self.http.bind, &why));
        }
        let a = &self.auth;
        let patterns = [
            ("auth.client_id_allow", &a.client_id_allow),
            ("auth.client_id_deny", &a.client_id_deny),
        ];
        for (key, list) in patterns {
            if list.iter().any(String::is_empty) {
                return Err(invalid(
                    key,
                    "\"\"",
                    "an empty pattern matches only the empty id: use \"*\" or leave it out",
                ));
            }
        }
        for (pattern, user) in &a.client_id_users {
            if pattern.is_empty() || user.is_empty() {
                let value = format!("{pattern:?} = {user:?}");
                return Err(invalid(
                    "auth.client_id_users",
                    &value,
                    "a pattern and a user name",
                ));
            }
        }
        range("server.shards", s.shards, 0, 256)?;
        range("server.connections_max", s.connections_max, 1, 10_000_000)?;
        range(
            "server.connect_timeout_ms",
            s.connect_timeout_ms,
            100,
            600_000,
        )?;
        range("server.shutdown_timeout_s", s.shutdown_timeout_s, 1, 3600)?;
        range("server.close_drain_ms", s.close_drain_ms, 0, 60_000)?;
        range("server.close_drain_bytes", s.close_drain_bytes, 0, 64 << 20)?;
        range("server.send_timeout_ms", s.send_timeout_ms, 100, 3_600_000)?;
        range(
            "server.tls_handshakes_max",
            s.tls_handshakes_max,
            1,
            1_000_000,
        )?;
        range(
            "server.io_memory_bytes",
            s.io_memory_bytes,
            64 << 10,
            1 << 30,
        )?;
        range(
            "server.read_buffer_bytes",
            s.read_buffer_bytes,
            512,
            16 << 20,
        )?;
        range(
            "server.write_buffer_bytes",
            s.write_buffer_bytes,
            512,
            64 << 20,
        )?;
        // 255 MiB: below MQTT's largest packet by enough that a stored
        // message re-encoded with the properties the broker adds still fits.
        range(
            "mqtt.packet_size_max_bytes",
            m.packet_size_max_bytes,
            64,
            255 << 20,
        )?;
        range("mqtt.receive_maximum", m.receive_maximum, 1, u16::MAX)?;
        range("mqtt.inflight_max", m.inflight_max, 1, u16::MAX)?;
        range(
            "mqtt.queue_messages_max",
            m.queue_messages_max,
            1,
            100_000_000,
        )?;
        range("mqtt.queue_bytes_max", m.queue_bytes_max, 1024, 1 << 40)?;
        range("mqtt.publisher_hold_ms", m.publisher_hold_ms, 0, 60_000)?;
        range("mqtt.topic_levels_max", m.topic_levels_max, 1, 65_535)?;
        range("mqtt.subscriptions_max", m.subscriptions_max, 1, 10_000_000)?;
        range("mqtt.sessions_max", m.sessions_max, 1, 100_000_000)?;
        range(
            "mqtt.client_id_bytes_max",
            m.client_id_bytes_max,
            23,
            65_535,
        )?;
        range(
            "mqtt.retained_messages_max",
            m.retained_messages_max,
            0,
            1 << 40,
        )?;
        // Response Information is `{prefix}/{client id}`, one string field.
        let response_max = m.response_topic_prefix.len() + 1 + m.client_id_bytes_max;
        if response_max > 65_535 {
            return Err(invalid(
                "mqtt.response_topic_prefix",
                &m.response_topic_prefix.len().to_string(),
                "its length plus 1 plus mqtt.client_id_bytes_max must be at most 65535 \
                 (Response Information is one string field)",
            ));
        }
        range("mqtt.retained_bytes_max", m.retained_bytes_max, 0, 1 << 50)?;
        range(
            "mqtt.sys_interval_s",
            m.sys_interval_s,
            0,
            crate::sys::INTERVAL_S_MAX,
        )?;
        range(
            "mqtt.retained_message_bytes_max",
            m.retained_message_bytes_max,
            64,
            256 << 20,
        )?;
        range(
            "mqtt.user_properties_bytes_max",
            m.user_properties_bytes_max,
            0,
            256 << 20,
        )?;
        range(
            "mqtt.topic_alias_out_bytes_max",
            m.topic_alias_out_bytes_max,
            0,
            1 << 30,
        )?;
        range("mesh.lane_capacity", self.mesh.lane_capacity, 16, 1 << 20)?;
        range(
            "mesh.outbox_messages_max",
            self.mesh.outbox_messages_max,
            64,
            1 << 30,
        )?;
        let st = &self.storage;
        if !matches!(
            st.durability.as_str(),
            "memory" | "kill_safe" | "power_safe"
        ) {
            let v = format!("{:?}", st.durability);
            return Err(invalid(
                "storage.durability",
                &v,
                "must be \"memory\", \"kill_safe\" or \"power_safe\"",
            ));
        }
        range("storage.segment_bytes", st.segment_bytes, 1 << 20, 1 << 32)?;
        range("storage.sync_interval_ms", st.sync_interval_ms, 0, 1000)?;
        range(
            "storage.delayed_messages_max",
            st.delayed_messages_max,
            0,
            100_000_000,
        )?;
        range(
            "storage.delayed_bytes_max",
            st.delayed_bytes_max,
            0,
            1 << 50,
        )?;
        range(
            "storage.session_queue_bytes_max",
            st.session_queue_bytes_max,
            0,
            1 << 40,
        )?;
        let log_min = 3 * st.segment_bytes as u64;
        if st.log_bytes_max < log_min {
            let why = format!("must be at least 3 x storage.segment_bytes ({log_min})");
            return Err(invalid(
                "storage.log_bytes_max",
                &st.log_bytes_max.to_string(),
                &why,
            ));
        }
        let record_max = m.packet_size_max_bytes as usize * 2 + (64 << 10);
        if st.segment_bytes < record_max {
            let why = format!(
                "must be at least twice mqtt.packet_size_max_bytes plus 64 KiB ({record_max}), \
                 so the largest message fits a segment"
            );
            return Err(invalid(
                "storage.segment_bytes",
                &st.segment_bytes.to_string(),
                &why,
            ));
        }
        let frame = crate::shard::FRAME_OVERHEAD_BYTES;
        let link_min = 2 * (m.packet_size_max_bytes as usize + frame);
        let link = self.cluster.link_queue_bytes_max;
        if self.cluster.enabled() && !(link_min..=1 << 40).contains(&link) {
            let why = format!(
                "must be in {link_min}..={}: at least twice mqtt.packet_size_max_bytes (and \
                 64 bytes each), so that the largest message fits below the half where \
                 publishers are paused",
                1u64 << 40
            );
            return Err(invalid(
                "cluster.link_queue_bytes_max",
                &self.cluster.link_queue_bytes_max.to_string(),
                &why,
            ));
        }
        if st.data_dir.as_os_str().is_empty() {
            return Err(invalid("storage.data_dir", "\"\"", "give a directory"));
        }
        if !matches!(m.queue_overflow.as_str(), "drop_new" | "drop_oldest") {
            let v = format!("{:?}", m.queue_overflow);
            return Err(invalid(
                "mqtt.queue_overflow",
                &v,
                "must be \"drop_new\" or \"drop_oldest\"",
            ));
        }
        if m.response_topic_prefix.is_empty() || m.response_topic_prefix.contains(['+', '#']) {
            let v = format!("{:?}", m.response_topic_prefix);
            return Err(invalid(
                "mqtt.response_topic_prefix",
                &v,
                "must be a non-empty topic without wildcards",
            ));
        }
        if m.queue_bytes_max < m.packet_size_max_bytes as usize {
            let why = format!(
                "must be at least mqtt.packet_size_max_bytes ({}), or a largest message could never be queued",
                m.packet_size_max_bytes
            );
            return Err(invalid(
                "mqtt.queue_bytes_max",
                &m.queue_bytes_max.to_string(),
                &why,
            ));
        }
        Ok(())
    }
}

impl ClusterConfig {
    /// Whether this node is part of a cluster (`node_id` is set).
    pub fn enabled(&self) -> bool {
        !self.node_id.is_empty()
    }

    /// The address peers reach this node at, once `listen` is bound to
    /// `bound` (which resolves a port 0).
    pub fn advertise_addr(&self, bound: SocketAddr) -> SocketAddr {
        match self.advertise.parse::<SocketAddr>() {
            Ok(a) => a,
            Err(_) => bound,
        }
    }

    /// What this node does on the minority side of a partition.
    pub fn on_minority(&self) -> crate::cluster::quorum::OnMinority {
        crate::cluster::quorum::OnMinority::parse(&self.on_minority)
            .unwrap_or(crate::cluster::quorum::OnMinority::RefuseConnects)
    }

    /// The failure detector's timings.
    pub fn membership_settings(&self) -> crate::cluster::membership::MembershipSettings {
        use std::time::Duration;
        crate::cluster::membership::MembershipSettings {
            probe_interval: Duration::from_millis(self.probe_interval_ms),
            probe_timeout: Duration::from_millis(self.probe_timeout_ms),
            suspect_timeout: Duration::from_millis(self.suspect_timeout_ms),
            join_interval: Duration::from_millis(self.join_interval_ms),
            cluster_name: self.name.clone(),
            secret: None,
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.enabled() {
            if let Err(e) = crate::cluster::node::NodeName::new(&self.node_id) {
                let v = format!("{:?}", crate::text::cut(&self.node_id, 80));
                return Err(invalid("cluster.node_id", &v, &e.to_string()));
            }
        }
        if self.name.is_empty() || self.name.len() > 255 {
            let v = format!("{:?}", crate::text::cut(&self.name, 80));
            return Err(invalid("cluster.name", &v, "must be 1 to 255 bytes"));
        }
        if !self.advertise.is_empty() {
            match self.advertise.parse::<SocketAddr>() {
                Ok(a) if a.port() != 0 && !a.ip().is_unspecified() => {}
                _ => {
                    let v = format!("{:?}", crate::text::cut(&self.advertise, 80));
                    return Err(invalid(
                        "cluster.advertise",
                        &v,
                        "must be an address peers can reach, ip:port, with a port other than 0",
                    ));
                }
            }
        } else if self.enabled() && self.listen.ip().is_unspecified() {
            return Err(invalid(
                "cluster.listen",
                &self.listen.to_string(),
                "listens on every address: set cluster.advertise to the one peers reach this \
                 node at (or listen on that address)",
            ));
        }
        range(
            "cluster.probe_interval_ms",
            self.probe_interval_ms,
            50,
            60_000,
        )?;
        range(
            "cluster.probe_timeout_ms",
            self.probe_timeout_ms,
            10,
            59_999,
        )?;
        if self.probe_timeout_ms >= self.probe_interval_ms {
            return Err(invalid(
                "cluster.probe_timeout_ms",
                &self.probe_timeout_ms.to_string(),
                "must be less than cluster.probe_interval_ms",
            ));
        }
        range(
            "cluster.suspect_timeout_ms",
            self.suspect_timeout_ms,
            100,
            600_000,
        )?;
        range(
            "cluster.join_interval_ms",
            self.join_interval_ms,
            100,
            600_000,
        )?;
        range("cluster.routes_max", self.routes_max, 1, 100_000_000)?;
        range("cluster.replicas", self.replicas, 1, 3)?;
        range(
            "cluster.peer_wills_max",
            self.peer_wills_max,
            1,
            100_000_000,
        )?;
        range(
            "cluster.peer_wills_bytes_max",
            self.peer_wills_bytes_max,
            1 << 20,
            1 << 40,
        )?;
        // At least a minute: a link that flaps must not forget a delete
        // it is still sending; at most ten years.
        range(
            "cluster.retained_tombstone_s",
            self.retained_tombstone_s,
            60,
            315_360_000,
        )?;
        if crate::cluster::quorum::OnMinority::parse(&self.on_minority).is_none() {
            let v = format!("{:?}", crate::text::cut(&self.on_minority, 80));
            return Err(invalid(
                "cluster.on_minority",
                &v,
                "must be \"refuse_connects\" or \"serve\"",
            ));
        }
        if self.join.len() > 256 {
            return Err(invalid(
                "cluster.join",
                &self.join.len().to_string(),
                "at most 256 addresses",
            ));
        }
        Ok(())
    }
}

fn invalid(key: &str, value: &str, why: &str) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        value: value.to_string(),
        why: why.to_string(),
    }
}

fn range<T>(key: &'static str, value: T, min: T, max: T) -> Result<(), ConfigError>
where
    T: PartialOrd + std::fmt::Display,
{
    if value < min || value > max {
        return Err(invalid(
            key,
            &value.to_string(),
            &format!("must be in {min}..={max}"),
        ));
    }
    Ok(())
}

/// Recursively lay `over` onto `base`: tables merge, other values replace.
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (key, value) in over {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(key, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `toml` is refused with an error that says `says`.
    #[track_caller]
    fn refused(toml: &str, says: &str) {
        let e = Config::from_toml(toml).unwrap_err();
        assert!(e.to_string().contains(says), "{e}");
    }

    #[test]
    fn embedded_default_is_valid() {
        let c = Config::default();
        assert_eq!(c.server.listen, vec!["0.0.0.0:1883".parse().unwrap()]);
        assert_eq!(c.mqtt.receive_maximum, 128);
    }

    #[test]
    fn auto_subscribe_rules_parse_check_and_fill_in() {
        let c = Config::from_toml(
            "[[auto_subscribe]]\nclient_id = \"dev-*\"\nfilter = \"d/%c/%u\"\nqos = 2\n",
        )
        .unwrap();
        let a = &c.auto_subscribe[0];
        assert!(a.applies("dev-1", None) && !a.applies("other", None));
        assert_eq!(
            a.filter_for("dev-1", Some("bob")).as_deref(),
            Some("d/dev-1/bob")
        );
        assert_eq!(a.filter_for("dev-1", None), None, "%u without a user");
        for widening in ["dev-#", "dev-+", "dev/x", ""] {
            assert_eq!(a.filter_for(widening, Some("bob")), None, "{widening}");
        }
        assert_eq!(a.filter_for("dev-1", Some("a/b")), None);
        assert_eq!(
            a.filter_for("dev-%u", Some("bob")).as_deref(),
            Some("d/dev-%u/bob")
        );
        let front = AutoSubscribe {
            filter: "%c/inbox/#".into(),
            ..a.clone()
        };
        assert_eq!(
            front.filter_for("$share", None),
            None,
            "a shared subscription to all"
        );
        assert_eq!(front.filter_for("$SYS", None), None);
        assert_eq!(front.filter_for("x$", None).as_deref(), Some("x$/inbox/#"));
        let percent = AutoSubscribe {
            filter: "a/100%/%c".into(),
            ..a.clone()
        };
        assert_eq!(percent.filter_for("d", None).as_deref(), Some("a/100%/d"));
        assert_eq!(a.options().qos, crate::codec::QoS::ExactlyOnce);
        refused(
            "[[auto_subscribe]]\nfilter = \"a\"\nqos = 3\n",
            "auto_subscribe[0].qos",
        );
        refused(
            "[[auto_subscribe]]\nfilter = \"$share/g/a\"\nno_local = true\n",
            "auto_subscribe[0].no_local",
        );
        refused("[[auto_subscribe]]\nfilter = \"a\"\ncolor = 1\n", "color");
    }

    #[test]
    fn partial_file_overrides_only_its_keys() {
        let c = Config::from_toml("[mqtt]\ninflight_max = 7\n").unwrap();
        assert_eq!(c.mqtt.inflight_max, 7);
        assert_eq!(c.mqtt.receive_maximum, 128);
    }

    #[test]
    fn bad_values_name_their_key() {
        refused("[mqtt]\nreceive_maximum = 0\n", "mqtt.receive_maximum = 0");
        refused(
            "[mqtt]\nqueue_overflow = \"lose_all\"\n",
            "mqtt.queue_overflow",
        );
        refused("[mqtt]\nno_such_key = 1\n", "no_such_key");
        refused("[server]\nlisten = [\"nonsense\"]\n", "listen");
        refused("[mqtt]\nreceive_maximum = 70000\n", "receive_maximum");
        refused("[server]\nsend_timeout_ms = 99\n", "server.send_timeout_ms");
        refused(
            "[server]\ntls_handshakes_max = 0\n",
            "server.tls_handshakes_max",
        );
        let c = Config::from_toml("[server]\nsend_timeout_ms = 100\n").unwrap();
        assert_eq!(c.server.send_timeout_ms, 100);
    }

    #[test]
    fn cluster_settings_are_checked_at_their_bounds() {
        use crate::cluster::quorum::OnMinority;
        let ok = |t: &str| Config::from_toml(t).map(|c| c.cluster);
        let c = ok("[cluster]\nnode_id = \"a\"\nlisten = \"127.0.0.1:7946\"\n").unwrap();
        assert!(c.enabled());
        assert!(!Config::default().cluster.enabled());
        refused(
            "[cluster]\nnode_id = \"a b\"\nlisten = \"127.0.0.1:1\"\n",
            "cluster.node_id",
        );
        // 0.0.0.0 needs an address peers can reach.
        refused("[cluster]\nnode_id = \"a\"\n", "cluster.advertise");
        ok("[cluster]\nnode_id = \"a\"\nadvertise = \"10.0.0.1:7946\"\n").unwrap();
        refused(
            "[cluster]\nadvertise = \"10.0.0.1:0\"\n",
            "cluster.advertise",
        );
        refused(
            "[cluster]\nprobe_interval_ms = 200\nprobe_timeout_ms = 200\n",
            "less than cluster.probe_interval_ms",
        );
        ok("[cluster]\nprobe_interval_ms = 200\nprobe_timeout_ms = 199\n").unwrap();
        refused(
            "[cluster]\non_minority = \"pause\"\n",
            "cluster.on_minority",
        );
        let serve = ok("[cluster]\non_minority = \"serve\"\n").unwrap();
        assert_eq!(serve.on_minority(), OnMinority::Serve);
        assert_eq!(
            Config::default().cluster.on_minority(),
            OnMinority::RefuseConnects
        );
        refused(
            "[cluster]\nprobe_interval_ms = 49\n",
            "cluster.probe_interval_ms = 49",
        );
        refused(
            "[cluster]\nsuspect_timeout_ms = 99\n",
            "cluster.suspect_timeout_ms",
        );
        refused("[cluster]\nname = \"\"\n", "cluster.name");
        refused(
            "[cluster]\npeer_wills_max = 0\n",
            "cluster.peer_wills_max = 0",
        );
        ok("[cluster]\npeer_wills_max = 1\n").unwrap();
        refused(
            "[cluster]\npeer_wills_bytes_max = 1048575\n",
            "cluster.peer_wills_bytes_max",
        );
        ok("[cluster]\npeer_wills_bytes_max = 1048576\n").unwrap();
        refused(
            "[cluster]\nretained_tombstone_s = 59\n",
            "cluster.retained_tombstone_s",
        );
        ok("[cluster]\nretained_tombstone_s = 60\n").unwrap();
        refused("[cluster]\nroutes_max = 0\n", "cluster.routes_max");
        let node = "[cluster]\nnode_id = \"a\"\nadvertise = \"127.0.0.1:7000\"\n";
        refused(
            &format!("{node}link_queue_bytes_max = 2097279\n"),
            "cluster.link_queue_bytes_max = 2097279",
        );
        let at_least =
            format!("[mqtt]\npacket_size_max_bytes = 65536\n{node}link_queue_bytes_max = 131200\n");
        assert!(Config::from_toml(&at_least).is_ok());
        // Alone, the setting is not used.
        let alone = "[mqtt]\npacket_size_max_bytes = 16777216\n\
                     [cluster]\nlink_queue_bytes_max = 1048576\n";
        assert!(Config::from_toml(alone).is_ok());
    }

    #[test]
    fn listeners_are_checked() {
        let c = Config::from_toml("[[listeners]]\nbind = \"127.0.0.1:8883\"\n").unwrap();
        assert_eq!(c.effective_listeners()[0].transport(), Transport::Tcp);
        assert_eq!(c.effective_listeners().len(), 1, "replaces server.listen");
        let c = Config::default();
        assert_eq!(c.effective_listeners()[0].bind, c.server.listen[0]);
        let l = |extra: &str| format!("[[listeners]]\nbind = \"127.0.0.1:8883\"\n{extra}");
        refused(&l("ws_path = \"mqtt\"\n"), "listeners[0].ws_path");
        Config::from_toml(&l("transport = \"ws\"\n")).unwrap();
        refused(&l("transport = \"wss\"\n"), "needs tls_cert_file");
        refused(&l("transport = \"quic\"\n"), "listeners[0].transport");
        refused(&l("transport = \"tls\"\n"), "needs tls_cert_file");
        refused(&l("tls_cert_file = \"a.pem\"\n"), "not tls");
        refused(
            &l("transport = \"tls\"\ntls_cert_file = \"a\"\ntls_key_file = \"b\"\ntls_client_cert_required = true\n"),
            "needs tls_client_ca_file",
        );
        Config::from_toml(&l(
            "transport = \"tls\"\ntls_cert_file = \"a\"\ntls_key_file = \"b\"\n",
        ))
        .unwrap();
    }

    #[test]
    fn client_rules_are_checked() {
        refused("[auth]\nclient_id_allow = [\"\"]\n", "auth.client_id_allow");
        refused(
            "[auth]\nclient_id_users = { \"gw-*\" = \"\" }\n",
            "auth.client_id_users",
        );
        refused(
            "[auth]\naddress_allow = [\"10.0.0.0/33\"]\n",
            "address_allow",
        );
        let c =
            Config::from_toml("[auth]\naddress_deny = [\"::1/128\", \"10.0.0.0/8\"]\n").unwrap();
        assert_eq!(c.auth.address_deny.len(), 2);
    }

    #[test]
    fn contradicting_limits_are_refused() {
        let text = "[mqtt]\npacket_size_max_bytes = 2000000\nqueue_bytes_max = 100000\n";
        refused(text, "mqtt.queue_bytes_max");
    }
}
