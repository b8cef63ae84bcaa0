//! The node's members and majority ([`Members`]) as the running broker
//! keeps them: one value for the whole node, changed by shard 0's
//! membership (nodes up and down) and by the admin API's threads (an
//! operator forgetting a member), read by the API and `/metrics`.
//!
//! Each change logs a line and tells every shard's bridge when new
//! CONNECTs start or stop being refused ([`PeerEvent::Quorum`]), under the
//! lock so the bridges hear the changes in order; when the member list
//! changed, a thread of its own writes the data directory's `MEMBERS` file
//! (synced, renamed into place; the latest list wins), so no shard waits
//! for a disk. Not on any data path: a lock is fine here.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};

use super::bridge::PeerEvent;
use crate::cluster::membership::MemberEvent;
use crate::cluster::node::NodeName;
use crate::cluster::quorum::{
    parse_members, Change, ForgetError, Members, OnMinority, MEMBERS_MAX,
};
use crate::log::dir::DataDir;
use crate::log::disk::Disk;

const MEMBERS_FILE: &str = "MEMBERS";

/// Where the member list is kept (none in `memory` durability).
pub(crate) struct MembersFile {
    disk: Arc<dyn Disk>,
    root: PathBuf,
}

impl MembersFile {
    /// The data directory's `MEMBERS` file.
    pub(crate) fn of(dir: &DataDir) -> MembersFile {
        MembersFile {
            disk: dir.disk().clone(),
            root: dir.root().to_path_buf(),
        }
    }

    /// The members it names and its text (none when it does not exist).
    /// Err: a line for the start error.
    fn read(&self) -> Result<(Vec<NodeName>, Option<String>), String> {
        let path = self.root.join(MEMBERS_FILE);
        match self.disk.read_to_string(&path) {
            Ok(text) => match parse_members(&text) {
                Ok(names) => Ok((names, Some(text))),
                Err(why) => Err(format!(
                    "{}: not a shardmq MEMBERS file ({why}); move it away to start with no \
                     members known",
                    path.display()
                )),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok((Vec::new(), None)),
            Err(e) => Err(format!("{}: {e}", path.display())),
        }
    }

    fn write(&self, text: &str) -> std::io::Result<()> {
        self.disk
            .replace_synced(&self.root, MEMBERS_FILE, text.as_bytes())
    }
}

struct Inner {
    members: Members,
    bridges: Vec<crossbeam_channel::Sender<PeerEvent>>,
    /// The file's writer thread (none in `memory` durability).
    writer: Option<std::sync::mpsc::Sender<String>>,
    /// The membership's datagram counters, as of its last turn.
    datagrams: crate::cluster::membership::MembershipCounters,
}

/// See the module docs. Empty until the cluster starts.
#[derive(Default)]
pub(crate) struct Quorum {
    inner: Mutex<Option<Inner>>,
}

impl Quorum {
    /// The cluster started with `members`: changes go to `bridges` and
    /// `file`.
    pub(crate) fn start(
        &self,
        members: Members,
        bridges: Vec<crossbeam_channel::Sender<PeerEvent>>,
        file: Option<MembersFile>,
    ) {
        if members.refuses_connects() {
            log::warn!(
                "cluster: {} of {} members up (the MEMBERS file): new connections are refused \
                 until a majority is up (cluster.on_minority = refuse_connects)",
                members.up(),
                members.size()
            );
        }
        let writer = file.map(|f| {
            let (tx, rx) = std::sync::mpsc::channel::<String>();
            let spawned = std::thread::Builder::new()
                .name("shardmq-members".into())
                .spawn(move || {
                    while let Ok(mut text) = rx.recv() {
                        // Only the latest list matters.
                        while let Ok(newer) = rx.try_recv() {
                            text = newer;
                        }
                        if let Err(e) = f.write(&text) {
                            log::error!(
                                "cluster: cannot write the MEMBERS file: {e}; a restart will \
                                 not know the latest members"
                            );
                        }
                    }
                });
            if let Err(e) = &spawned {
                log::error!("cluster: cannot start the MEMBERS file's writer: {e}");
            }
            tx
        });
        let inner = Inner {
            members,
            bridges,
            writer,
            datagrams: Default::default(),
        };
        *self.lock() = Some(inner);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Inner>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Apply `f` to the members: write, log and tell what it changed.
    fn change<T>(&self, f: impl FnOnce(&mut Members) -> (Change, T)) -> Option<T> {
        let mut guard = self.lock();
        let inner = guard.as_mut()?;
        let beyond = inner.members.beyond_max;
        let (change, out) = f(&mut inner.members);
        let m = &inner.members;
        if m.beyond_max > beyond {
            log::warn!(
                "cluster: {} nodes seen up beyond the {MEMBERS_MAX} members a node keeps; not \
                 made members",
                m.beyond_max
            );
        }
        if change.members {
            if let Some(w) = &inner.writer {
                let _ = w.send(m.file_text());
            }
        }
        if let Some(refuse) = change.refuse {
            let (up, size) = (m.up(), m.size());
            if refuse {
                log::warn!(
                    "cluster: {up} of {size} members up, not a majority: new connections are \
                     refused until a majority is back (cluster.on_minority = refuse_connects); \
                     connected clients are served"
                );
            } else {
                log::info!("cluster: {up} of {size} members up: new connections are served again");
            }
            for b in &inner.bridges {
                let _ = b.send(PeerEvent::Quorum { refuse });
            }
        }
        Some(out)
    }

    /// Shard 0's membership: its datagram counters now (for `/metrics`).
    pub(crate) fn datagram_counters(&self, c: crate::cluster::membership::MembershipCounters) {
        if let Some(inner) = self.lock().as_mut() {
            inner.datagrams = c;
        }
    }

    /// Shard 0's membership: the events of one of its turns.
    pub(crate) fn member_events(&self, events: &[MemberEvent]) {
        self.change(|m| (m.apply(events), ()));
    }

    /// An operator forgets member `name`. None: the cluster has not
    /// started.
    pub(crate) fn forget(&self, name: &str) -> Option<Result<(), ForgetError>> {
        self.change(|m| match m.forget(name) {
            Ok(c) => (c, Ok(())),
            Err(e) => (Change::default(), Err(e)),
        })
        .inspect(|r| {
            if r.is_ok() {
                log::info!(
                    "cluster: node {} forgotten (an operator's request)",
                    crate::text::quote(name)
                );
            }
        })
    }

    /// `GET /api/v1/cluster`'s body; None before the cluster starts.
    pub(crate) fn view(&self) -> Option<Value> {
        let guard = self.lock();
        let m = &guard.as_ref()?.members;
        let mut nodes = vec![json!({ "name": m.me().as_str(), "up": true, "self": true })];
        for (name, member) in m.others() {
            nodes.push(json!({
                "name": name.as_str(),
                "up": member.up.is_some(),
                "addr": member.addr.map(|a| a.to_string()),
                "incarnation": member.up.as_ref().map(|n| n.incarnation),
            }));
        }
        Some(json!({
            "node": m.me().as_str(),
            "members": m.size(),
            "members_up": m.up(),
            "majority": m.majority(),
            "on_minority": m.policy().as_str(),
            "refusing_connects": m.refuses_connects(),
            "nodes": nodes,
        }))
    }

    /// The node-wide cluster gauges for `/metrics` (empty before the
    /// cluster starts).
    pub(crate) fn metrics(&self) -> String {
        let guard = self.lock();
        let Some(inner) = guard.as_ref() else {
            return String::new();
        };
        let m = &inner.members;
        let gauges = [
            (
                "shardmq_cluster_members",
                "Cluster members this node knows (every node seen, itself included, until forgotten).",
                m.size(),
            ),
            (
                "shardmq_cluster_members_up",
                "Cluster members up as this node sees them, itself included.",
                m.up(),
            ),
            (
                "shardmq_cluster_majority",
                "1 while more than half of the members are up (0: the minority side of a partition).",
                usize::from(m.majority()),
            ),
            (
                "shardmq_cluster_refusing_connects",
                "1 while new CONNECTs are refused for being on the minority side (cluster.on_minority).",
                usize::from(m.refuses_connects()),
            ),
        ];
        let mut out = String::new();
        for (name, help, v) in gauges {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}\n"
            ));
        }
        let d = &inner.datagrams;
        let name = "shardmq_cluster_datagrams_total";
        out.push_str(&format!(
            "# HELP {name} Membership datagrams read and sent.\n# TYPE {name} counter\n\
             {name}{{direction=\"in\"}} {}\n{name}{{direction=\"out\"}} {}\n",
            d.datagrams_in, d.datagrams_out
        ));
        let name = "shardmq_cluster_datagrams_refused_total";
        out.push_str(&format!(
            "# HELP {name} Membership datagrams ignored: not shardmq's, another protocol version, another cluster name, malformed, or without the cluster secret's tag.\n# TYPE {name} counter\n"
        ));
        for (reason, v) in [
            ("foreign", d.refused_foreign),
            ("version", d.refused_version),
            ("cluster", d.refused_cluster),
            ("malformed", d.refused_malformed),
            ("unauthenticated", d.refused_unauthenticated),
        ] {
            out.push_str(&format!("{name}{{reason=\"{reason}\"}} {v}\n"));
        }
        let name = "shardmq_cluster_duplicate_nodes_total";
        out.push_str(&format!(
            "# HELP {name} Nodes ignored for having the node id of another.\n# TYPE {name} counter\n{name} {}\n",
            d.duplicates
        ));
        out
    }
}

/// The members a node starts with: those of `file`, none up yet.
pub(crate) fn starting_members(
    me: NodeName,
    file: Option<&MembersFile>,
    policy: OnMinority,
) -> Result<Members, String> {
    let Some(file) = file else {
        return Ok(Members::new(me, Vec::new(), policy));
    };
    let (known, text) = file.read()?;
    let members = Members::new(me, known, policy);
    // A node's first start writes itself in, before it serves.
    let now = members.file_text();
    if text.as_deref() != Some(now.as_str()) {
        if let Err(e) = file.write(&now) {
            log::error!("cluster: cannot write the MEMBERS file: {e}");
        }
    }
    Ok(members)
}
