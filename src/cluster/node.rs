//! Who a node is: its name, the address its peers reach it at, and the
//! incarnation that tells this run of it from every earlier one.
//!
//! Node-wide values, built once at start (`broker`) and carried by
//! membership on shard 0. The incarnation is kept in the data directory's
//! `NODE` file and bumped, synced, at every start, so a peer that still
//! holds state from an earlier run of the node can tell it is stale.

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::log::dir::DataDir;

/// Longest node name, in bytes.
pub const NODE_NAME_MAX: usize = 64;

/// A node's name (`cluster.node_id`): 1 to [`NODE_NAME_MAX`] bytes of
/// ASCII letters, digits, `.`, `_` and `-`. The empty name only stands for
/// a join address whose node is not known yet; a peer claiming it is
/// refused by the membership codec.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NodeName(String);

/// A node name that breaks the rules of [`NodeName`].
#[derive(Debug, Error, PartialEq, Eq)]
#[error(
    "a node id is 1 to {NODE_NAME_MAX} ASCII letters, digits, '.', '_' or '-' (got {0} bytes \
     or another character)"
)]
pub struct BadNodeName(pub usize);

impl NodeName {
    /// Check `name` against the rules.
    pub fn new(name: &str) -> Result<NodeName, BadNodeName> {
        if name.is_empty() || name.len() > NODE_NAME_MAX || !name.bytes().all(name_byte) {
            return Err(BadNodeName(name.len()));
        }
        Ok(NodeName(name.to_string()))
    }

    /// The placeholder for a join address whose node is not known yet.
    pub fn unknown() -> NodeName {
        NodeName(String::new())
    }

    /// Whether this is [`NodeName::unknown`].
    pub fn is_unknown(&self) -> bool {
        self.0.is_empty()
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')
}

impl TryFrom<String> for NodeName {
    type Error = BadNodeName;
    fn try_from(s: String) -> Result<NodeName, BadNodeName> {
        if s.is_empty() {
            return Ok(NodeName::unknown());
        }
        NodeName::new(&s)
    }
}

impl From<NodeName> for String {
    fn from(n: NodeName) -> String {
        n.0
    }
}

impl fmt::Display for NodeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_unknown() {
            f.write_str("?")
        } else {
            f.write_str(&self.0)
        }
    }
}

impl fmt::Debug for NodeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// One run of one node, as the membership protocol knows it.
///
/// Two values count up: `incarnation` at every start of the process
/// (persisted), and `rejoin` each time the running node finds the others
/// declared it down and comes back (in memory). A newer (incarnation,
/// rejoin) wins over an older one at the same address. (SWIM has an
/// incarnation number of its own, for refuting suspicion; foca keeps it
/// apart from this identity.)
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Node {
    /// `cluster.node_id`.
    pub name: NodeName,
    /// The address peers send membership datagrams to.
    pub addr: SocketAddr,
    /// Bumped at every start of the process.
    pub incarnation: u64,
    /// Bumped when this run rejoins after being declared down.
    pub rejoin: u32,
    /// Its shards: shard `j` takes bridge links on TCP port
    /// `addr.port() + j` (0 for a join address not known yet).
    pub shards: u16,
}

impl Node {
    /// This node, freshly started, with `shards` shards.
    pub fn new(name: NodeName, addr: SocketAddr, incarnation: u64, shards: u16) -> Node {
        Node {
            name,
            addr,
            incarnation,
            rejoin: 0,
            shards,
        }
    }

    /// Whatever node listens at a join address.
    pub fn at(addr: SocketAddr) -> Node {
        Node::new(NodeName::unknown(), addr, 0, 0)
    }

    /// Where shard `j` of this node takes bridge links (TCP): the
    /// membership port plus `j`; None past its shards or the port range.
    pub fn bridge_addr(&self, j: u16) -> Option<SocketAddr> {
        if j >= self.shards {
            return None;
        }
        let port = self.addr.port().checked_add(j)?;
        Some(SocketAddr::new(self.addr.ip(), port))
    }
}

impl fmt::Debug for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}#{}", self.name, self.addr, self.incarnation)?;
        if self.rejoin > 0 {
            write!(f, ".{}", self.rejoin)?;
        }
        Ok(())
    }
}

impl fmt::Display for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

impl foca::Identity for Node {
    type Addr = SocketAddr;

    fn renew(&self) -> Option<Node> {
        Some(Node {
            rejoin: self.rejoin.checked_add(1)?,
            ..self.clone()
        })
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn win_addr_conflict(&self, other: &Node) -> bool {
        // Two configured names at one address is a mistake the log shows
        // (a name seen at two addresses); the order only has to be total.
        (self.incarnation, self.rejoin, &self.name) > (other.incarnation, other.rejoin, &other.name)
    }
}

/// Whether two membership addresses are the same (IP and port: an IPv6
/// scope or flow label a peer's copy may have lost does not count).
pub fn same_addr(a: SocketAddr, b: SocketAddr) -> bool {
    (a.ip(), a.port()) == (b.ip(), b.port())
}

/// The data directory's `NODE` file could not be used.
#[derive(Debug, Error)]
pub enum IncarnationError {
    /// Reading or writing it failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// It is not a file this broker wrote.
    #[error("{path}: not a shardmq NODE file ({why}); move it away if the directory is yours")]
    Damaged {
        /// The file.
        path: String,
        /// What is wrong.
        why: String,
    },
    /// It belongs to another node.
    #[error(
        "{path}: this data directory belongs to node {owner}, not \"{name}\": start it with \
         --node-id {owner}, or give node \"{name}\" a data directory of its own"
    )]
    OtherNode {
        /// The file.
        path: String,
        /// The node it names.
        owner: String,
        /// The node starting.
        name: String,
    },
}

const NODE_FILE: &str = "NODE";
const NODE_FILE_HEADER: &str = "shardmq-node 1";

/// Read the incarnation `dir` last ran `name` with, write the next one
/// (synced, atomically), and return it. The first start on a directory is
/// incarnation 1. A directory written by a node of another name is
/// refused: two nodes must never share one history.
pub fn bump_incarnation(dir: &DataDir, name: &NodeName) -> Result<u64, IncarnationError> {
    let path = dir.root().join(NODE_FILE);
    let shown = path.display().to_string();
    let io = |source| IncarnationError::Io {
        path: shown.clone(),
        source,
    };
    let last = match dir.disk().read_to_string(&path) {
        Ok(text) => parse_node_file(&text, name, &shown)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(io(e)),
    };
    let next = last
        .checked_add(1)
        .ok_or_else(|| IncarnationError::Damaged {
            path: shown.clone(),
            why: "incarnation at its maximum".into(),
        })?;
    let text = format!("{NODE_FILE_HEADER}\nnode_id {name}\nincarnation {next}\n");
    dir.disk()
        .replace_synced(dir.root(), NODE_FILE, text.as_bytes())
        .map_err(io)?;
    Ok(next)
}

/// The incarnation of a node that keeps no data directory (`memory`
/// durability): the wall clock in milliseconds, which grows from one start
/// to the next unless the clock is set back by more than the time between
/// them.
pub fn clock_incarnation() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_millis() as u64)
}

fn parse_node_file(text: &str, name: &NodeName, path: &str) -> Result<u64, IncarnationError> {
    let damaged = |why: &str| IncarnationError::Damaged {
        path: path.to_string(),
        why: why.to_string(),
    };
    let mut lines = text.lines();
    if lines.next() != Some(NODE_FILE_HEADER) {
        return Err(damaged("no header line"));
    }
    let owner = lines
        .next()
        .and_then(|l| l.strip_prefix("node_id "))
        .ok_or_else(|| damaged("no node_id line"))?;
    let incarnation = lines
        .next()
        .and_then(|l| l.strip_prefix("incarnation "))
        .and_then(|n| n.parse::<u64>().ok())
        .ok_or_else(|| damaged("no incarnation line"))?;
    if owner != name.as_str() {
        return Err(IncarnationError::OtherNode {
            path: path.to_string(),
            owner: crate::text::quote(owner).to_string(),
            name: name.to_string(),
        });
    }
    Ok(incarnation)
}

/// Where `path` is inside the data directory, for messages.
pub fn node_file(root: &Path) -> std::path::PathBuf {
    root.join(NODE_FILE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use foca::Identity;

    #[test]
    fn node_names_are_checked_at_their_bounds() {
        assert!(NodeName::new("a").is_ok());
        assert!(NodeName::new(&"n".repeat(NODE_NAME_MAX)).is_ok());
        assert_eq!(
            NodeName::new(&"n".repeat(NODE_NAME_MAX + 1)),
            Err(BadNodeName(NODE_NAME_MAX + 1))
        );
        assert!(NodeName::new("").is_err());
        assert!(NodeName::new("node 1").is_err());
        assert!(NodeName::new("nöde").is_err());
        assert!(NodeName::new("eu-west_1.b").is_ok());
    }

    #[test]
    fn a_later_run_wins_its_address() {
        let addr = "127.0.0.1:7946".parse().unwrap();
        let name = NodeName::new("a").unwrap();
        let old = Node::new(name.clone(), addr, 3, 2);
        let new = Node::new(name, addr, 4, 2);
        assert_eq!(new.bridge_addr(1), Some("127.0.0.1:7947".parse().unwrap()));
        assert_eq!(new.bridge_addr(2), None);
        assert!(new.win_addr_conflict(&old));
        assert!(!old.win_addr_conflict(&new));
        let rejoined = old.renew().unwrap();
        assert!(rejoined.win_addr_conflict(&old));
        assert!(new.win_addr_conflict(&rejoined));
    }

    #[test]
    fn the_incarnation_rises_at_every_start_and_the_directory_keeps_its_owner() {
        let root = std::env::temp_dir().join(format!("shardmq-node-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let a = NodeName::new("a").unwrap();
        {
            let dir = DataDir::open(&root).unwrap();
            assert_eq!(bump_incarnation(&dir, &a).unwrap(), 1);
            assert_eq!(bump_incarnation(&dir, &a).unwrap(), 2);
            let b = NodeName::new("b").unwrap();
            let err = bump_incarnation(&dir, &b).unwrap_err().to_string();
            assert!(err.contains("belongs to node \"a\", not \"b\""), "{err}");
        }
        std::fs::write(node_file(&root), "garbage").unwrap();
        let dir = DataDir::open(&root).unwrap();
        let err = bump_incarnation(&dir, &a).unwrap_err().to_string();
        assert!(err.contains("not a shardmq NODE file"), "{err}");
        drop(dir);
        let _ = std::fs::remove_dir_all(&root);
    }
}
