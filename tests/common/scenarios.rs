//! Scenarios that read the same for MQTT 3.1.1 and 5.0, written once over
//! `client::Session`. `client_v311.rs` and `client_v5.rs` each keep a test
//! of the same name that runs the scenario with its version's client.

use std::time::Duration;

use crate::client::{Session, WAIT};
use crate::common::TestBroker;

/// A client whose session lives on `shard`.
pub async fn connect_on<C: Session>(b: &TestBroker, prefix: &str, shard: usize) -> C {
    C::connect_as(b.addr, &b.id_on_shard(prefix, shard)).await
}

/// Collect `n` publishes from two clients together (bounded overall).
async fn collect_two<C: Session>(a: &mut C, b: &mut C, n: usize) -> (Vec<String>, Vec<String>) {
    let (mut from_a, mut from_b) = (Vec::new(), Vec::new());
    let deadline = tokio::time::Instant::now() + WAIT * 2;
    while from_a.len() + from_b.len() < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of {n} messages arrived: {from_a:?} {from_b:?}",
            from_a.len() + from_b.len()
        );
        if let Some(m) = a.try_next_text(Duration::from_millis(50)).await {
            from_a.push(m);
        }
        if let Some(m) = b.try_next_text(Duration::from_millis(50)).await {
            from_b.push(m);
        }
    }
    a.expect_no_publish().await;
    b.expect_no_publish().await;
    (from_a, from_b)
}

fn assert_exactly_once(a: &[String], b: &[String], expected: &[String]) {
    let mut all: Vec<String> = a.iter().chain(b).cloned().collect();
    all.sort();
    let mut want = expected.to_vec();
    want.sort();
    assert_eq!(
        all, want,
        "each message exactly once overall: {a:?} / {b:?}"
    );
}

/// Two members of one shared subscription, one per shard, split 20 messages:
/// each message goes to exactly one of them, taking turns.
pub async fn shared_subscription_splits_across_shards<C: Session>() {
    let b = TestBroker::start(2);
    let mut m0: C = connect_on(&b, "member", 0).await;
    let mut m1: C = connect_on(&b, "member", 1).await;
    for m in [&mut m0, &mut m1] {
        assert_eq!(
            m.subscribe_qos1("$share/g/sh/#").await,
            vec![C::GRANTED_QOS1]
        );
    }
    let mut p: C = connect_on(&b, "pub", 0).await;
    let payloads: Vec<String> = (0..20).map(|i| format!("m{i}")).collect();
    for (i, pl) in payloads.iter().enumerate() {
        p.publish_acked(&format!("sh/{}", i % 3), pl.as_bytes())
            .await;
    }
    let (a, c) = collect_two(&mut m0, &mut m1, 20).await;
    assert_exactly_once(&a, &c, &payloads);
    assert_eq!(
        (a.len(), c.len()),
        (10, 10),
        "round-robin over the two shards: {a:?} / {c:?}"
    );
}

/// Once one of two shared-subscription members disconnects, every message
/// goes to the other.
pub async fn shared_subscription_member_disconnect_sends_all_to_other<C: Session>() {
    let b = TestBroker::start(2);
    let mut stays: C = connect_on(&b, "stays", 0).await;
    let mut leaves: C = connect_on(&b, "leaves", 1).await;
    stays.subscribe_qos1("$share/g/sd/#").await;
    leaves.subscribe_qos1("$share/g/sd/#").await;
    // The publisher shares the leaving member's shard, so once that member's
    // session has ended no route to it remains anywhere the publish starts.
    let mut p: C = connect_on(&b, "pub", 1).await;
    let first: Vec<String> = (0..20).map(|i| format!("a{i}")).collect();
    for pl in &first {
        p.publish_acked("sd/x", pl.as_bytes()).await;
    }
    let (a, c) = collect_two(&mut stays, &mut leaves, 20).await;
    assert_exactly_once(&a, &c, &first);

    leaves.disconnect().await;
    let second: Vec<String> = (0..20).map(|i| format!("b{i}")).collect();
    for pl in &second {
        p.publish_acked("sd/x", pl.as_bytes()).await;
    }
    let mut got = Vec::new();
    while got.len() < second.len() {
        got.push(stays.next_text().await);
    }
    got.sort();
    let mut want = second.clone();
    want.sort();
    assert_eq!(got, want, "every message goes to the remaining member");
    stays.expect_no_publish().await;
}
