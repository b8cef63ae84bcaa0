//! What authentication and authorization cost: a PUBLISH's ACL check
//! (cached, and the first time a topic is seen) against a 10,000-rule
//! file, a password verification per hash format, and a login token
//! (JWT) verification per algorithm.
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

fn tokens(c: &mut Criterion) {
    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
    use shardmq::auth::TokenKeys;
    let claims = serde_json::json!({"clientid": "dev-1", "exp": 4_000_000_000u64,
        "acl": {"sub": ["down/%c/#"], "pub": ["up/%c"]}});
    // The client id claim bound, as a deployment does, so the ACL claim's
    // %c is filled in.
    let bound: std::collections::BTreeMap<String, String> =
        [("clientid".to_string(), "%c".to_string())].into();
    let secret = b"0123456789abcdef0123456789abcdef";
    let hs = encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(secret),
    )
    .unwrap();
    let keys = TokenKeys::from_parts(Some(secret), None, bound.clone(), "acl").unwrap();
    c.bench_function("token: HS256 with an ACL claim", |b| {
        b.iter(|| black_box(keys.verify(black_box(hs.as_bytes()), "dev-1", None, 1)))
    });
    let ec = rcgen::KeyPair::generate().unwrap();
    let es = encode(
        &Header::new(Algorithm::ES256),
        &claims,
        &EncodingKey::from_ec_pem(ec.serialize_pem().as_bytes()).unwrap(),
    )
    .unwrap();
    let pem = ec.public_key_pem();
    let keys = TokenKeys::from_parts(None, Some(pem.as_bytes()), bound.clone(), "acl").unwrap();
    c.bench_function("token: ES256 with an ACL claim", |b| {
        b.iter(|| black_box(keys.verify(black_box(es.as_bytes()), "dev-1", None, 1)))
    });
    let private = include_str!("../src/auth/testdata/rsa-private.pem");
    let public = include_str!("../src/auth/testdata/rsa-public.pem");
    let rs = encode(
        &Header::new(Algorithm::RS256),
        &claims,
        &EncodingKey::from_rsa_pem(private.as_bytes()).unwrap(),
    )
    .unwrap();
    let keys = TokenKeys::from_parts(None, Some(public.as_bytes()), bound.clone(), "acl").unwrap();
    c.bench_function("token: RS256 (2048-bit) with an ACL claim", |b| {
        b.iter(|| black_box(keys.verify(black_box(rs.as_bytes()), "dev-1", None, 1)))
    });
}

criterion_group!(benches, acl, passwords, tokens);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
}
