//! Times the planner alone (no kernel) on a synthetic cluster:
//! `cargo run --release -p backend-nftables --example plan_timing -- 10000 10`.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Instant;

use backend_nftables::apply::RecordingRunner;
use backend_nftables::plan::NftConfig;
use backend_nftables::NftablesProxier;
use proxy_core::model::{
    Endpoint, Protocol, ProxyState, ServiceName, ServicePort, ServicePortName, TrafficPolicy,
};
use proxy_core::proxier::{Proxier, SyncRequest};

fn main() {
    let mut args = std::env::args().skip(1);
    let services: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let per: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(10);
    let mut state = ProxyState::default();
    for i in 0..services {
        let name = ServicePortName {
            service: ServiceName::new("bench", format!("s{i}")),
            port: "http".into(),
            protocol: Protocol::Tcp,
        };
        let ip = std::net::Ipv4Addr::from(0x0a60_0000u32 + i as u32 + 1);
        state.services.insert(
            name.clone(),
            Arc::new(ServicePort {
                name: name.clone(),
                cluster_ips: vec![ip.into()],
                port: 80,
                node_port: Some(30000 + (i % 2700) as u16),
                external_ips: vec![],
                load_balancer_ips: vec![],
                load_balancer_source_ranges: vec![],
                session_affinity_timeout: None,
                external_traffic_policy: TrafficPolicy::Cluster,
                internal_traffic_policy: TrafficPolicy::Cluster,
                health_check_node_port: None,
                prefer_close: false,
            }),
        );
        let eps = (0..per)
            .map(|e| Endpoint {
                ip: std::net::Ipv4Addr::from(0x0af4_0000u32 + (i * per + e) as u32).into(),
                port: 8080,
                ready: true,
                serving: true,
                terminating: false,
                is_local: false,
                zone_hints: vec![],
            })
            .collect();
        state.endpoints.insert(name, Arc::new(eps));
    }
    let mut proxier = NftablesProxier::new(NftConfig::default(), RecordingRunner::default());
    let state = Arc::new(state);
    let t = Instant::now();
    proxier
        .sync(&SyncRequest {
            state: Arc::clone(&state),
            changed: BTreeSet::new(),
            node_changed: false,
            full: true,
        })
        .expect("full");
    println!(
        "full plan+render: {:?} ({} bytes)",
        t.elapsed(),
        proxier.runner().scripts[0].len()
    );
    let mut next = (*state).clone();
    let name = next.services.keys().next().cloned().expect("a service");
    let mut eps = (*next.endpoints[&name]).clone();
    eps[0].port = 9999;
    next.endpoints.insert(name.clone(), Arc::new(eps));
    let t = Instant::now();
    proxier
        .sync(&SyncRequest {
            state: Arc::new(next),
            changed: BTreeSet::from([name.service.clone()]),
            node_changed: false,
            full: false,
        })
        .expect("delta");
    println!(
        "one endpoint change plan+render: {:?} ({} bytes)",
        t.elapsed(),
        proxier.runner().scripts[1].len()
    );
}
