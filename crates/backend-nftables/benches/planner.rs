//! Planner micro-benchmarks (no kernel): `cargo bench -p backend-nftables`.
//! A full plan of a synthetic cluster, and the delta of one endpoint change in it.

use std::collections::BTreeSet;
use std::sync::Arc;

use backend_nftables::apply::RecordingRunner;
use backend_nftables::plan::NftConfig;
use backend_nftables::NftablesProxier;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use proxy_core::model::ProxyState;
use proxy_core::proxier::{Proxier, SyncRequest};
use testkit::synth;

fn request(
    state: Arc<ProxyState>,
    changed: BTreeSet<proxy_core::model::ServiceName>,
) -> SyncRequest {
    SyncRequest {
        full: changed.is_empty(),
        periodic: false,
        state,
        changed,
        node_changed: false,
    }
}

fn full_plan(c: &mut Criterion) {
    let mut group = c.benchmark_group("full_plan");
    group.sample_size(10);
    for services in [1_000, 10_000] {
        let state = Arc::new(synth::state(&synth::cluster(services, 1..=10)));
        group.bench_function(format!("{services}_services"), |b| {
            b.iter(|| {
                let mut p = NftablesProxier::new(NftConfig::default(), RecordingRunner::default());
                p.sync(&request(Arc::clone(&state), BTreeSet::new()))
                    .expect("plan")
            })
        });
    }
    group.finish();
}

fn endpoint_change(c: &mut Criterion) {
    let cluster = synth::cluster(10_000, 1..=10);
    let state = synth::state(&cluster);
    let mut changed_state = state.clone();
    let s = &cluster[5_000];
    let mut eps = synth::endpoints(s);
    eps[0].ip = synth::endpoint_ip(s.index, synth::MAX_ENDPOINTS - 1).into();
    changed_state.endpoints.insert(s.port_name(), Arc::new(eps));
    let (state, changed_state) = (Arc::new(state), Arc::new(changed_state));
    let changed = BTreeSet::from([s.port_name().service]);

    c.bench_function("endpoint_change_10000_services", |b| {
        b.iter_batched(
            || {
                let mut p = NftablesProxier::new(NftConfig::default(), RecordingRunner::default());
                p.sync(&request(Arc::clone(&state), BTreeSet::new()))
                    .expect("full");
                p
            },
            |mut p| {
                p.sync(&request(Arc::clone(&changed_state), changed.clone()))
                    .expect("delta")
            },
            BatchSize::LargeInput,
        )
    });
}

criterion_group!(benches, full_plan, endpoint_change);
criterion_main!(benches);
