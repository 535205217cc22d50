//! `/debug/services` (issue #16): the programmed state, readable. Every Service port with
//! its destinations, the endpoints internal (cluster IP) and external (NodePort,
//! external and load-balancer IPs) traffic uses per family (after topology,
//! the terminating fallback and the traffic policies: the same selection the backends
//! program), affinity, source ranges and when it was last programmed.
//!
//! The observer records each successfully programmed state (an `Arc`, no copy); a port's
//! "last programmed" time moves only when its Service or endpoints changed, found by
//! pointer comparison with the previous state (the tracker replaces what changed).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::SystemTime;

use proxy_core::model::{
    Endpoint, IpFamily, ProxyState, ServicePort, ServicePortName, TrafficPolicy,
};
use proxy_core::select::select;
use serde_json::{json, Value};

use crate::gotime;
use crate::metrics::ip_family;
use crate::service_traffic::TrafficReader;

struct Snapshot {
    state: Arc<ProxyState>,
    changed_at: HashMap<ServicePortName, SystemTime>,
}

/// The last state a sync programmed, shared by the observer (writer) and the metrics
/// server (reader); and, with `--service-counters`, the reader of its ports' counters.
#[derive(Default)]
pub struct ProgrammedState(Mutex<Option<Snapshot>>, OnceLock<TrafficReader>);

/// Which Service ports to show: `namespace` and `name` match exactly when given.
#[derive(Debug, Default, Clone, serde::Deserialize)]
pub struct Filter {
    pub namespace: Option<String>,
    pub name: Option<String>,
}

impl Filter {
    fn keeps(&self, port: &ServicePortName) -> bool {
        self.namespace
            .as_deref()
            .is_none_or(|ns| ns == &*port.service.namespace)
            && self
                .name
                .as_deref()
                .is_none_or(|n| n == &*port.service.name)
    }
}

impl ProgrammedState {
    /// A successful sync programmed `state` at `at`. On the sync loop: only ports whose
    /// Service or endpoints were replaced get a new time (no copy of unchanged ones).
    /// Whether `state` is the one recorded last (the runner hands the same state on when
    /// nothing changed).
    pub fn record(&self, state: &Arc<ProxyState>, at: SystemTime) -> bool {
        let mut guard = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let (previous, mut changed_at) = match guard.take() {
            // A node change can change every port's selection.
            Some(p) if p.state.node == state.node => (Some(p.state), p.changed_at),
            _ => (None, HashMap::new()),
        };
        let same_state = previous.as_ref().is_some_and(|old| Arc::ptr_eq(old, state));
        if !same_state {
            // An unchanged port of the previous state has its entry already.
            for name in state.ports_replaced_since(previous.as_deref()) {
                changed_at.insert(name.clone(), at);
            }
        }
        // Every port of the state has an entry; more entries means some are gone.
        if changed_at.len() != state.services.len() {
            changed_at.retain(|name, _| state.services.contains_key(name));
        }
        *guard = Some(Snapshot {
            state: Arc::clone(state),
            changed_at,
        });
        same_state
    }

    /// The last programmed state (`None` before the first successful sync).
    pub fn state(&self) -> Option<Arc<ProxyState>> {
        let guard = self.0.lock().unwrap_or_else(|e| e.into_inner());
        guard.as_ref().map(|snap| Arc::clone(&snap.state))
    }

    /// `--service-counters`: how to read the counters of the programmed ports.
    pub fn set_traffic_reader(&self, reader: TrafficReader) {
        let _ = self.1.set(reader);
    }

    /// The counters of the last programmed state's ports; `None` without a reader.
    /// The kernel is read outside the lock, so a sync never waits for it.
    pub fn traffic(&self) -> Option<Vec<proxy_core::proxier::ServiceTraffic>> {
        let reader = self.1.get()?;
        Some(self.state().map(|s| reader(&s)).unwrap_or_default())
    }

    /// The ports `filter` keeps, as JSON (`null` before the first successful sync).
    pub fn json(&self, filter: &Filter) -> Value {
        let mut traffic: HashMap<ServicePortName, Value> = HashMap::new();
        for t in self.traffic().into_iter().flatten() {
            let counts = json!({ "packets": t.packets, "bytes": t.bytes });
            let entry = traffic.entry(t.port).or_insert_with(|| json!({}));
            entry[t.destination.label()] = counts;
        }
        let counting = self.1.get().is_some();
        let guard = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let Some(snap) = guard.as_ref() else {
            return Value::Null;
        };
        let ports: Vec<Value> = snap
            .state
            .services
            .iter()
            .filter(|(name, _)| filter.keeps(name))
            .map(|(name, port)| {
                let mut v = port_json(&snap.state, port, snap.changed_at.get(name));
                if counting {
                    v["newConnections"] = traffic.remove(name).unwrap_or_else(|| json!({}));
                }
                v
            })
            .collect();
        json!({ "servicePorts": ports })
    }

    /// The same as a text table, one line per port and family.
    pub fn text(&self, filter: &Filter) -> String {
        let value = self.json(filter);
        let Some(ports) = value["servicePorts"].as_array() else {
            return "no sync has succeeded yet\n".into();
        };
        let counting = self.1.get().is_some();
        let mut out = String::from(
            "SERVICE PORT\tFAMILY\tDESTINATIONS\tINTERNAL ENDPOINTS (cluster IP)\tEXTERNAL ENDPOINTS (NodePort, external, LB)\tAFFINITY\tPROGRAMMED",
        );
        out.push_str(if counting {
            "\tNEW CONNECTIONS (packets/bytes, all families)\n"
        } else {
            "\n"
        });
        for p in ports {
            let list = |v: &Value| -> String {
                let items: Vec<&str> = v
                    .as_array()
                    .map(|a| a.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                if items.is_empty() {
                    "-".into()
                } else {
                    items.join(",")
                }
            };
            let counts = counting.then(|| traffic_text(&p["newConnections"]));
            for (family, f) in p["families"].as_object().into_iter().flatten() {
                out.push_str(&format!(
                    "{}\t{family}\t{}\t{}\t{}\t{}\t{}{}\n",
                    p["name"].as_str().unwrap_or("?"),
                    list(&f["destinations"]),
                    list(&f["internalEndpoints"]),
                    list(&f["externalEndpoints"]),
                    p["sessionAffinitySeconds"]
                        .as_u64()
                        .map_or_else(|| "-".into(), |s| format!("{s}s")),
                    p["lastProgrammed"].as_str().unwrap_or("-"),
                    counts
                        .as_deref()
                        .map_or_else(String::new, |c| format!("\t{c}")),
                ));
            }
        }
        out
    }
}

/// `cluster_ip=3/180B,node_port=1/60B`, or `-`.
fn traffic_text(counts: &Value) -> String {
    let items: Vec<String> = counts
        .as_object()
        .into_iter()
        .flatten()
        .map(|(kind, c)| format!("{kind}={}/{}B", c["packets"], c["bytes"]))
        .collect();
    if items.is_empty() {
        "-".into()
    } else {
        items.join(",")
    }
}

fn policy(p: TrafficPolicy) -> &'static str {
    match p {
        TrafficPolicy::Cluster => "Cluster",
        TrafficPolicy::Local => "Local",
    }
}

fn endpoint_text(e: &Endpoint) -> String {
    let mut s = SocketAddr::new(e.ip, e.port).to_string();
    if !e.ready {
        s.push_str(" (terminating)");
    }
    s
}

fn port_json(state: &ProxyState, port: &ServicePort, changed: Option<&SystemTime>) -> Value {
    let mut families = serde_json::Map::new();
    for family in [IpFamily::V4, IpFamily::V6] {
        let Some(cluster_ip) = port.cluster_ip(family) else {
            continue;
        };
        let selection = select(port, state.endpoints_of(&port.name), family, &state.node);
        let mut destinations = vec![format!("{}", SocketAddr::new(cluster_ip, port.port))];
        destinations.extend(
            port.external_destinations(family)
                .map(|ip| SocketAddr::new(ip, port.port).to_string()),
        );
        if let Some(np) = port.node_port {
            destinations.push(format!("NodePort {np}"));
        }
        let texts =
            |eps: &[&Endpoint]| -> Vec<String> { eps.iter().map(|e| endpoint_text(e)).collect() };
        families.insert(
            ip_family(family).into(),
            json!({
                "destinations": destinations,
                "internalEndpoints": texts(selection.internal(port)),
                "externalEndpoints": texts(selection.external(port)),
                "hasEndpoints": selection.has_any,
            }),
        );
    }
    json!({
        "name": port.name.to_string(),
        "namespace": &*port.name.service.namespace,
        "service": &*port.name.service.name,
        "port": port.port,
        "protocol": port.protocol().as_str().to_uppercase(),
        "clusterIPs": port.cluster_ips,
        "nodePort": port.node_port,
        "externalIPs": port.external_ips,
        "loadBalancerIPs": port.load_balancer_ips,
        "loadBalancerSourceRanges": port.load_balancer_source_ranges.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "internalTrafficPolicy": policy(port.internal_traffic_policy),
        "externalTrafficPolicy": policy(port.external_traffic_policy),
        "sessionAffinitySeconds": port.session_affinity_timeout,
        "lastProgrammed": changed.map(|t| gotime::rfc3339_nano_in(*t, &jiff::tz::TimeZone::UTC)),
        "families": families,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proxy_core::model::{Protocol, ServiceName};

    fn state(endpoints: &[&str]) -> ProxyState {
        let mut s = ProxyState::default();
        for name in ["web", "api"] {
            let port_name = ServicePortName {
                service: ServiceName::new("default", name),
                port: "http".into(),
                protocol: Protocol::Tcp,
            };
            let ip = if name == "web" {
                "10.96.0.10"
            } else {
                "10.96.0.11"
            };
            let port = ServicePort::new(port_name.clone(), vec![ip.parse().unwrap()], 80);
            s.services.insert(port_name.clone(), Arc::new(port));
            let eps = endpoints
                .iter()
                .map(|e| Endpoint::ready(e.parse().unwrap(), 8080))
                .collect();
            s.endpoints.insert(port_name, Arc::new(eps));
        }
        s
    }

    #[test]
    fn shows_selected_endpoints_and_keeps_times_of_unchanged_ports() {
        let programmed = ProgrammedState::default();
        assert_eq!(programmed.json(&Filter::default()), Value::Null);
        let first = Arc::new(state(&["10.244.1.2"]));
        let t0 = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000);
        programmed.record(&first, t0);
        // Only `api`'s endpoints change.
        let mut second = (*first).clone();
        let api = second
            .endpoints
            .keys()
            .find(|k| &*k.service.name == "api")
            .cloned()
            .unwrap();
        second.endpoints.insert(
            api,
            Arc::new(vec![Endpoint::ready("10.244.2.2".parse().unwrap(), 8080)]),
        );
        let t1 = t0 + std::time::Duration::from_secs(60);
        programmed.record(&Arc::new(second), t1);
        let all = programmed.json(&Filter::default());
        let ports = all["servicePorts"].as_array().unwrap();
        let by_name = |n: &str| ports.iter().find(|p| p["service"] == n).unwrap();
        assert_eq!(
            by_name("web")["lastProgrammed"],
            gotime::rfc3339_nano_in(t0, &jiff::tz::TimeZone::UTC)
        );
        assert_eq!(
            by_name("api")["lastProgrammed"],
            gotime::rfc3339_nano_in(t1, &jiff::tz::TimeZone::UTC)
        );
        assert_eq!(
            by_name("api")["families"]["IPv4"]["internalEndpoints"],
            json!(["10.244.2.2:8080"])
        );
        let only_web = programmed.json(&Filter {
            namespace: Some("default".into()),
            name: Some("web".into()),
        });
        assert_eq!(only_web["servicePorts"].as_array().unwrap().len(), 1);
        let text = programmed.text(&Filter::default());
        assert!(
            text.contains("default/web:http/tcp\tIPv4\t10.96.0.10:80\t10.244.1.2:8080"),
            "{text}"
        );
    }
}
