//! What the simulators' clients share: the answers they send and the
//! topic matching they check deliveries against (independent of the
//! broker's own matcher).

use shardmq::codec::{Properties, PubResp, QoS, SubOptions};

/// A PUBACK, PUBREC, PUBREL or PUBCOMP of `packet_id`, reason 0.
pub fn resp(packet_id: u16) -> PubResp {
    PubResp {
        packet_id,
        reason: 0,
        properties: Properties::default(),
    }
}

/// Plain subscription options at `qos`.
#[allow(dead_code)] // not every simulator subscribes this way
pub fn sub_options(qos: QoS) -> SubOptions {
    SubOptions {
        qos,
        no_local: false,
        retain_as_published: false,
        retain_handling: 0,
    }
}

/// Whether `filter` (a shared one by its filter part) matches `topic`; a
/// wildcard first level does not match a `$` topic.
pub fn matches(filter: &str, topic: &str) -> bool {
    let filter = match filter.strip_prefix("$share/") {
        Some(rest) => rest.split_once('/').map_or(rest, |(_, f)| f),
        None => filter,
    };
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    let mut first = true;
    loop {
        match (f.next(), t.next()) {
            (Some("#" | "+"), _) if first && topic.starts_with('$') => return false,
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
        first = false;
    }
}
