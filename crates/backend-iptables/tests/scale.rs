//! Scale figures, as root, in a throw-away network namespace (ignored by default):
//!
//! ```sh
//! cargo test --release -p backend-iptables --test scale -- --ignored --nocapture
//! ```
//!
//! 10,000 NodePort Services with two endpoints each are programmed with the real
//! `iptables-restore` (nft backend, then legacy); then one endpoint of one Service
//! changes and a partial sync runs. Prints the restore input size and the wall time.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Instant;

use backend_iptables::apply::{Backend, IptablesCommand};
use backend_iptables::plan::IptConfig;
use backend_iptables::IptablesProxier;
use proxy_core::model::{
    Endpoint, IpFamily, LocalDetector, Protocol, ProxyState, ServiceName, ServicePort,
    ServicePortName, TrafficPolicy,
};
use proxy_core::proxier::{Proxier, SyncRequest};

/// `SCALE_SERVICES` overrides the number of Services.
fn services() -> u32 {
    std::env::var("SCALE_SERVICES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000)
}

fn endpoint(i: u32, j: u32) -> Endpoint {
    Endpoint {
        ip: IpAddr::V4(Ipv4Addr::from(0x0af4_0000 + i * 4 + j)),
        port: 8080,
        ready: true,
        serving: true,
        terminating: false,
        is_local: false,
        hints: None,
    }
}

fn state() -> ProxyState {
    let mut state = ProxyState::default();
    for i in 0..services() {
        let name = ServicePortName {
            service: ServiceName::new("bench", format!("svc-{i}")),
            port: "http".into(),
            protocol: Protocol::Tcp,
        };
        let port = ServicePort {
            name: name.clone(),
            cluster_ips: vec![IpAddr::V4(Ipv4Addr::from(0x0a60_0000 + i))],
            port: 80,
            node_port: Some(30000 + (i % 2000) as u16),
            external_ips: vec![],
            load_balancer_ips: vec![],
            load_balancer_source_ranges: vec![],
            session_affinity_timeout: None,
            external_traffic_policy: TrafficPolicy::Cluster,
            internal_traffic_policy: TrafficPolicy::Cluster,
            health_check_node_port: None,
        };
        state.services.insert(name.clone(), Arc::new(port));
        state
            .endpoints
            .insert(name, Arc::new(vec![endpoint(i, 0), endpoint(i, 1)]));
    }
    state
}

#[test]
#[ignore = "scale figures: run by hand, as root"]
fn one_endpoint_change_at_10000_services() {
    if !testkit::root_or_skip("one_endpoint_change_at_10000_services") {
        return;
    }
    for backend in [Backend::Nft, Backend::Legacy] {
        let ns = testkit::Netns::new().expect("netns");
        ns.run(|| {
            let config = IptConfig {
                local: LocalDetector::ClusterCidr(vec!["10.244.0.0/16".parse().unwrap()]),
                families: vec![IpFamily::V4],
                ..IptConfig::default()
            };
            let mut proxier = IptablesProxier::new(config, IptablesCommand::new(backend));
            let mut state = state();
            let start = Instant::now();
            let outcome = proxier
                .sync(&SyncRequest {
                    state: Arc::new(state.clone()),
                    changed: BTreeSet::new(),
                    node_changed: false,
                    full: true,
                    periodic: false,
                })
                .expect("full sync");
            println!(
                "{backend:?}: full sync of {} Services: {} bytes, {:.0} ms",
                services(),
                outcome.transaction_bytes,
                start.elapsed().as_secs_f64() * 1e3
            );

            let i = services() / 2;
            let name = state.services.keys().nth(i as usize).cloned().expect("service");
            state
                .endpoints
                .insert(name.clone(), Arc::new(vec![endpoint(i, 0), endpoint(i, 3)]));
            let start = Instant::now();
            let outcome = proxier
                .sync(&SyncRequest {
                    state: Arc::new(state),
                    changed: BTreeSet::from([name.service.clone()]),
                    node_changed: false,
                    full: false,
                    periodic: false,
                })
                .expect("partial sync");
            let took = start.elapsed();
            assert!(!outcome.full);
            assert!(outcome.transaction_bytes < 2_000, "{outcome:?}");
            println!(
                "{backend:?}: one endpoint change: {} bytes of restore input, {:.1} ms (canary check + restore); counters {:?}",
                outcome.transaction_bytes,
                took.as_secs_f64() * 1e3,
                proxier.counters().snapshot()
            );
        })
        .expect("run in netns");
    }
}
