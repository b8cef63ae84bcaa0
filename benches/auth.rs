//! What authentication and authorization cost: a PUBLISH's ACL check
//! (cached, and the first time a topic is seen) against a 10,000-rule
//! file, and a password verification per hash format.
//!
//! Run briefly: `cargo bench --bench auth -- --warm-up-time 1 --measurement-time 2`.

use std::hint::black_box;

use criterion::{criterion_group, Criterion};
use shardmq::auth::passwd::{hash_pbkdf2, Passwords};
use shardmq::auth::{Acl, Want};

/// One user with 10,000 `topic` rules, plus patterns every client gets.
fn acl_file() -> String {
    let mut text = String::from("user gw\n");
    for i in 0..10_000 {
        text.push_str(&format!("topic readwrite site/{i}/#\n"));
    }
    text.push_str("pattern readwrite devices/%c/#\npattern deny devices/%c/locked\n");
    text
}

fn acl(c: &mut Criterion) {
    let acl = Acl::parse(&acl_file()).expect("valid");
    let client = acl.for_client("dev1", Some("gw"));
    c.bench_function("acl: publish check, topic seen before", |b| {
        b.iter(|| black_box(client.allows(black_box("site/9999/dev/1/temp"), Want::Write)))
    });
    let topics: Vec<String> = (0..1024)
        .map(|i| format!("site/{}/dev/{i}/t", i * 7))
        .collect();
    let mut n = 0;
    c.bench_function(
        "acl: publish check, a new topic each time (cache over 256)",
        |b| {
            b.iter(|| {
                n = (n + 1) % topics.len();
                black_box(client.allows(&topics[n], Want::Write))
            })
        },
    );
    c.bench_function("acl: a client's rules at CONNECT (10,000-rule file)", |b| {
        b.iter(|| black_box(acl.for_client(black_box("dev2"), Some("gw"))))
    });
}

fn passwords(c: &mut Criterion) {
    let file = format!(
        "p7:{}\np6:$6$c2FsdHNhbHRzYWx0$3yUZn1yS7G2ZzWmZ3d3RcB3q8I0b2PmUaQe6qI0ZfUeVwCXaXcJv4yYp1Q9OQvZ2mP4w1+6j1kQx2d1S3d0tbA==\n",
        hash_pbkdf2(b"secret", b"saltsaltsalt")
    );
    let p = Passwords::parse(&file).expect("valid");
    c.bench_function("password: $7$ PBKDF2-SHA512, 101 iterations", |b| {
        b.iter(|| black_box(p.verify("p7", black_box(b"secret"))))
    });
    c.bench_function("password: $6$ SHA-512", |b| {
        b.iter(|| black_box(p.verify("p6", black_box(b"secret"))))
    });
}

criterion_group!(benches, acl, passwords);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
}
