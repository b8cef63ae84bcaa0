//! Which side of a partition a node is on: the cluster's members, which
//! of them are up, and whether that is a majority.
//!
//! Sans-IO, node-wide; shard 0's membership runtime keeps the one value
//! (`shard::runtime::membership`), writes the member list to the data
//! directory's `MEMBERS` file and tells every shard when the answer
//! changes. A member is every node ever seen up, this one included, until
//! an operator forgets it (`DELETE /api/v1/cluster/members/{name}`): a
//! node stopped in order or dead stays a member, as in RabbitMQ's
//! `pause_minority`, so that the side of a partition that sees fewer than
//! half the members can tell it is the minority. A majority is more than
//! half of the members up (this node included): of 3, 2; of 2, both; of 1,
//! itself.
//!
//! What the minority does is `cluster.on_minority`: `refuse_connects` (the
//! default) answers new CONNECTs with 0x88 (3.1.1: return code 3) and
//! keeps serving the clients already connected; `serve` goes on as if the
//! partition were not there.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use thiserror::Error;

use super::membership::MemberEvent;
use super::node::{Node, NodeName};

/// Members a node keeps at most, itself included (a file with more is
/// refused; a node seen beyond it is not made a member, and counted).
pub const MEMBERS_MAX: usize = 1024;

/// The `MEMBERS` file's first line.
pub const MEMBERS_FILE_HEADER: &str = "shardmq-members 1";

/// What a node on the minority side does (`cluster.on_minority`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnMinority {
    /// Refuse new CONNECTs (0x88); serve the connected clients.
    RefuseConnects,
    /// Serve as usual.
    Serve,
}

impl OnMinority {
    /// The configuration value's meaning; None for an unknown one.
    pub fn parse(value: &str) -> Option<OnMinority> {
        match value {
            "refuse_connects" => Some(OnMinority::RefuseConnects),
            "serve" => Some(OnMinority::Serve),
            _ => None,
        }
    }

    /// The configuration value.
    pub fn as_str(self) -> &'static str {
        match self {
            OnMinority::RefuseConnects => "refuse_connects",
            OnMinority::Serve => "serve",
        }
    }
}

/// One member other than this node, as this node sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Its run while it is up.
    pub up: Option<Node>,
    /// The address it was last seen at in this process (None: known only
    /// from the file).
    pub addr: Option<SocketAddr>,
}

/// What a change did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Change {
    /// The member list changed: write the file.
    pub members: bool,
    /// Whether new CONNECTs are refused changed to this.
    pub refuse: Option<bool>,
}

/// A member could not be forgotten.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ForgetError {
    /// Not a member.
    #[error("node {0} is not a member")]
    Unknown(String),
    /// This node.
    #[error("node {0} is this node")]
    Me(String),
    /// Up now: only a node that is down can be forgotten.
    #[error("node {0} is up; stop it first")]
    Up(String),
}

/// The members and the majority rule; see the module docs.
#[derive(Debug, Clone)]
pub struct Members {
    me: NodeName,
    others: BTreeMap<NodeName, Member>,
    policy: OnMinority,
    /// Nodes seen up that were not made members ([`MEMBERS_MAX`]).
    pub beyond_max: u64,
}

impl Members {
    /// Node `me` with the members `known` (from the file; `me` among
    /// them or not), none of them up yet.
    pub fn new(me: NodeName, known: Vec<NodeName>, policy: OnMinority) -> Members {
        let others = known
            .into_iter()
            .filter(|n| *n != me)
            .take(MEMBERS_MAX - 1)
            .map(|n| {
                (
                    n,
                    Member {
                        up: None,
                        addr: None,
                    },
                )
            })
            .collect();
        Members {
            me,
            others,
            policy,
            beyond_max: 0,
        }
    }

    /// This node's name.
    pub fn me(&self) -> &NodeName {
        &self.me
    }

    /// The policy in force.
    pub fn policy(&self) -> OnMinority {
        self.policy
    }

    /// Every member but this node, by name.
    pub fn others(&self) -> impl Iterator<Item = (&NodeName, &Member)> {
        self.others.iter()
    }

    /// Members, this node included.
    pub fn size(&self) -> usize {
        self.others.len() + 1
    }

    /// Members up, this node included.
    pub fn up(&self) -> usize {
        1 + self.others.values().filter(|m| m.up.is_some()).count()
    }

    /// More than half of the members are up.
    pub fn majority(&self) -> bool {
        2 * self.up() > self.size()
    }

    /// New CONNECTs are refused now.
    pub fn refuses_connects(&self) -> bool {
        self.policy == OnMinority::RefuseConnects && !self.majority()
    }

    /// Take the membership's events of one step, and say what they
    /// changed as a whole: a node replaced by its next run is one change,
    /// not a refusal and its end.
    pub fn apply(&mut self, events: &[MemberEvent]) -> Change {
        self.changing(|m| {
            let mut members = false;
            for e in events {
                let changes = match e {
                    MemberEvent::Up(n) => [m.node_up(n), Change::default()],
                    MemberEvent::Down(n) => [m.node_down(n), Change::default()],
                    MemberEvent::Replaced { old, new } => [m.node_down(old), m.node_up(new)],
                    _ => [Change::default(); 2],
                };
                members |= changes.iter().any(|c| c.members);
            }
            members
        })
    }

    /// Run `f` and say what it changed.
    fn changing(&mut self, f: impl FnOnce(&mut Self) -> bool) -> Change {
        let before = self.refuses_connects();
        let members = f(self);
        let after = self.refuses_connects();
        Change {
            members,
            refuse: (before != after).then_some(after),
        }
    }

    /// `node` is up (a new member, or one back).
    pub fn node_up(&mut self, node: &Node) -> Change {
        if node.name == self.me || node.name.is_unknown() {
            return Change::default();
        }
        if !self.others.contains_key(&node.name) && self.others.len() >= MEMBERS_MAX - 1 {
            self.beyond_max += 1;
            return Change::default();
        }
        self.changing(|m| {
            let member = Member {
                up: Some(node.clone()),
                addr: Some(node.addr),
            };
            m.others.insert(node.name.clone(), member).is_none()
        })
    }

    /// Run `node` is down (a later run of the same name that is up stays
    /// up).
    pub fn node_down(&mut self, node: &Node) -> Change {
        self.changing(|m| {
            if let Some(member) = m.others.get_mut(&node.name) {
                if member.up.as_ref() == Some(node) {
                    member.up = None;
                }
            }
            false
        })
    }

    /// Forget member `name`, which must be down.
    pub fn forget(&mut self, name: &str) -> Result<Change, ForgetError> {
        if name == self.me.as_str() {
            return Err(ForgetError::Me(name.to_string()));
        }
        let key = NodeName::new(name).map_err(|_| ForgetError::Unknown(name.to_string()))?;
        match self.others.get(&key) {
            None => return Err(ForgetError::Unknown(name.to_string())),
            Some(m) if m.up.is_some() => return Err(ForgetError::Up(name.to_string())),
            Some(_) => {}
        }
        Ok(self.changing(|m| m.others.remove(&key).is_some()))
    }

    /// The `MEMBERS` file's text: the header, then one name a line, this
    /// node's first.
    pub fn file_text(&self) -> String {
        let mut text = format!("{MEMBERS_FILE_HEADER}\n{}\n", self.me);
        for name in self.others.keys() {
            text.push_str(name.as_str());
            text.push('\n');
        }
        text
    }
}

/// Read a `MEMBERS` file's text: the names it holds. Err: what is wrong
/// with it.
pub fn parse_members(text: &str) -> Result<Vec<NodeName>, String> {
    let mut lines = text.lines();
    if lines.next() != Some(MEMBERS_FILE_HEADER) {
        return Err(format!("no {MEMBERS_FILE_HEADER:?} line first"));
    }
    let mut names = Vec::new();
    for (i, line) in lines.enumerate() {
        if names.len() == MEMBERS_MAX {
            return Err(format!("more than {MEMBERS_MAX} members"));
        }
        let name = NodeName::new(line).map_err(|e| format!("line {}: {e}", i + 2))?;
        names.push(name);
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> NodeName {
        NodeName::new(s).unwrap()
    }

    fn node(s: &str, incarnation: u64) -> Node {
        Node::new(name(s), "127.0.0.1:7946".parse().unwrap(), incarnation, 2)
    }

    #[test]
    fn a_node_alone_is_its_own_majority_and_each_member_counts_until_forgotten() {
        let mut m = Members::new(name("a"), vec![], OnMinority::RefuseConnects);
        assert!(m.majority() && !m.refuses_connects());
        // b joins: 2 of 2.
        assert_eq!(
            m.node_up(&node("b", 1)),
            Change {
                members: true,
                refuse: None
            }
        );
        // c joins: 3 of 3; b goes: 2 of 3 is still a majority.
        m.node_up(&node("c", 1));
        assert_eq!(m.node_down(&node("b", 1)), Change::default());
        assert!(m.majority());
        // c goes too: 1 of 3.
        assert_eq!(
            m.node_down(&node("c", 1)),
            Change {
                members: false,
                refuse: Some(true)
            }
        );
        assert_eq!((m.up(), m.size()), (1, 3));
        // An operator forgets b: 1 of 2 is still not a majority (half is
        // not more than half), forgetting c too: 1 of 1.
        assert_eq!(
            m.forget("b"),
            Ok(Change {
                members: true,
                refuse: None
            })
        );
        assert_eq!(
            m.forget("c"),
            Ok(Change {
                members: true,
                refuse: Some(false)
            })
        );
    }

    #[test]
    fn a_restart_seen_as_down_then_up_is_one_change_and_members_are_bounded() {
        let mut m = Members::new(name("a"), vec![], OnMinority::RefuseConnects);
        m.node_up(&node("b", 1));
        let c = m.apply(&[MemberEvent::Replaced {
            old: node("b", 1),
            new: node("b", 2),
        }]);
        assert_eq!(c, Change::default());
        for i in 0..MEMBERS_MAX + 5 {
            m.node_up(&node(&format!("n{i}"), 1));
        }
        assert_eq!(m.size(), MEMBERS_MAX);
        assert_eq!(m.beyond_max, 7);
        let back = parse_members(&m.file_text()).unwrap();
        assert_eq!(back.len(), MEMBERS_MAX);
    }

    #[test]
    fn a_stale_down_does_not_take_a_newer_run_down() {
        let mut m = Members::new(name("a"), vec![name("b")], OnMinority::RefuseConnects);
        assert!(m.refuses_connects(), "1 of 2 members up");
        m.node_up(&node("b", 2));
        assert!(!m.refuses_connects());
        assert_eq!(m.node_down(&node("b", 1)), Change::default());
        assert_eq!(m.up(), 2);
    }

    #[test]
    fn serve_never_refuses_and_forget_checks_its_member() {
        let mut m = Members::new(name("a"), vec![name("b"), name("c")], OnMinority::Serve);
        assert!(!m.majority() && !m.refuses_connects());
        m.node_up(&node("b", 1));
        assert_eq!(m.forget("a"), Err(ForgetError::Me("a".into())));
        assert_eq!(m.forget("b"), Err(ForgetError::Up("b".into())));
        assert_eq!(m.forget("zz"), Err(ForgetError::Unknown("zz".into())));
        assert_eq!(
            m.forget("bad name"),
            Err(ForgetError::Unknown("bad name".into()))
        );
        assert!(m.forget("c").is_ok());
    }

    #[test]
    fn the_file_reads_back_and_a_bad_one_says_where() {
        let mut m = Members::new(name("b"), vec![name("a")], OnMinority::RefuseConnects);
        m.node_up(&node("c", 1));
        let text = m.file_text();
        assert_eq!(text, "shardmq-members 1\nb\na\nc\n");
        assert_eq!(
            parse_members(&text).unwrap(),
            [name("b"), name("a"), name("c")]
        );
        assert!(parse_members("").unwrap_err().contains("shardmq-members 1"));
        let bad = parse_members("shardmq-members 1\na\nno good\n").unwrap_err();
        assert!(bad.starts_with("line 3:"), "{bad}");
        let many: String = (0..=MEMBERS_MAX).map(|i| format!("n{i}\n")).collect();
        let err = parse_members(&format!("{MEMBERS_FILE_HEADER}\n{many}")).unwrap_err();
        assert!(err.contains("more than 1024"), "{err}");
    }
}
