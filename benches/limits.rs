//! The in-process limiter fallback under a flood of distinct names: each request
//! charges a name never seen before while the store is full of live buckets (an
//! attacker's dictionary against `/auth` while Redis is down). The cost per charge
//! must stay flat, whatever the store holds.

use chatgate::limits::gcra::{Charge, Rate};
use chatgate::limits::local::LocalBuckets;
use criterion::{criterion_group, criterion_main, Criterion};

/// Well past the store's bound, so every charge meets a full store.
const PREFILL: u64 = 250_000;

fn flood(c: &mut Criterion) {
    let buckets = LocalBuckets::new();
    let now = 1_000_000_000_000u64;
    // A day-long window: every bucket stays live for the whole run.
    let charge = |cost| {
        [Charge {
            bucket: "auth:fail".into(),
            rate: Rate {
                limit: 5,
                period: std::time::Duration::from_secs(86_400),
            },
            cost,
        }]
    };
    for i in 0..PREFILL {
        let _ = buckets.charge(&format!("name-{i}"), &charge(1), now);
    }
    let mut next = PREFILL;
    c.bench_function("local_limiter/new_name_in_full_store", |b| {
        b.iter(|| {
            next += 1;
            let _ = buckets.charge(
                std::hint::black_box(&format!("name-{next}")),
                &charge(1),
                now,
            );
        })
    });
    c.bench_function("local_limiter/known_name", |b| {
        b.iter(|| {
            let _ = buckets.charge(std::hint::black_box("name-7"), &charge(0), now);
        })
    });
}

criterion_group!(benches, flood);
criterion_main!(benches);
