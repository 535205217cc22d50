//! `--service-counters` (ours, nftables mode): new connections per Service port and
//! destination kind, counted in the kernel and read when scraped, through a reader the
//! application passes in (this crate needs no netlink). Registered only with the flag,
//! so the default metric set stays upstream's.
//!
//! The series follow the last programmed state ([`ProgrammedState`]): a Service that is
//! gone has no series, since its counters are looked up by its ports.

use std::sync::Arc;

use prometheus::core::{Collector, Desc};
use prometheus::proto::{Counter, LabelPair, Metric, MetricFamily, MetricType};
use prometheus::Registry;
use proxy_core::model::ProxyState;
use proxy_core::proxier::ServiceTraffic;

use crate::debug::ProgrammedState;
use crate::metrics::MetricsError;

/// Reads the kernel's counters of the ports of a programmed state.
pub type TrafficReader = Arc<dyn Fn(&ProxyState) -> Vec<ServiceTraffic> + Send + Sync>;

pub const PACKETS: &str = "kubeproxy_service_new_connection_packets_total";
pub const BYTES: &str = "kubeproxy_service_new_connection_bytes_total";
const PACKETS_HELP: &str = "Packets that opened new connections to a Service port, by destination kind (in nftables mode one per connection: the rules see each connection's first packet). Ours, not upstream's; with --service-counters.";
const BYTES_HELP: &str = "Bytes of the packets that opened new connections to a Service port, by destination kind. Ours, not upstream's; with --service-counters.";
const LABELS: [&str; 5] = ["namespace", "service", "port", "protocol", "destination"];

/// The two counters, read at scrape time.
struct ServiceTrafficCollector {
    packets: Desc,
    bytes: Desc,
    programmed: Arc<ProgrammedState>,
}

/// Registers the `kubeproxy_service_*` counters, which read through `programmed`'s
/// traffic reader.
pub fn register(registry: &Registry, programmed: Arc<ProgrammedState>) -> Result<(), MetricsError> {
    let desc = |name: &str, help: &str| {
        Desc::new(
            name.into(),
            help.into(),
            LABELS.iter().map(|l| (*l).to_string()).collect(),
            Default::default(),
        )
    };
    registry.register(Box::new(ServiceTrafficCollector {
        packets: desc(PACKETS, PACKETS_HELP)?,
        bytes: desc(BYTES, BYTES_HELP)?,
        programmed,
    }))?;
    Ok(())
}

fn label(name: &str, value: &str) -> LabelPair {
    let mut pair = LabelPair::default();
    pair.set_name(name.into());
    pair.set_value(value.into());
    pair
}

fn family(
    name: &str,
    help: &str,
    samples: &[ServiceTraffic],
    value: fn(&ServiceTraffic) -> u64,
) -> MetricFamily {
    let mut mf = MetricFamily::default();
    mf.set_name(name.into());
    mf.set_help(help.into());
    mf.set_field_type(MetricType::COUNTER);
    for t in samples {
        let mut counter = Counter::default();
        counter.set_value(value(t) as f64);
        let mut metric = Metric::default();
        // The API's spelling of the protocol, as upstream labels protocols.
        let protocol = t.port.protocol.as_str().to_uppercase();
        metric.set_label(vec![
            label("namespace", &t.port.service.namespace),
            label("service", &t.port.service.name),
            label("port", &t.port.port),
            label("protocol", &protocol),
            label("destination", t.destination.label()),
        ]);
        metric.set_counter(counter);
        mf.mut_metric().push(metric);
    }
    mf
}

impl Collector for ServiceTrafficCollector {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.packets, &self.bytes]
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let samples = self.programmed.traffic().unwrap_or_default();
        if samples.is_empty() {
            return Vec::new();
        }
        vec![
            family(PACKETS, PACKETS_HELP, &samples, |t| t.packets),
            family(BYTES, BYTES_HELP, &samples, |t| t.bytes),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proxy_core::model::{Protocol, ServiceName, ServicePort, ServicePortName};
    use proxy_core::proxier::DestinationKind;

    fn web() -> ServicePortName {
        ServicePortName {
            service: ServiceName::new("demo", "web"),
            port: "http".into(),
            protocol: Protocol::Tcp,
        }
    }

    /// The reader sees the programmed state: a port that is gone from it has no series.
    #[test]
    fn series_follow_the_programmed_ports() {
        let programmed = Arc::new(ProgrammedState::default());
        let reader: TrafficReader = Arc::new(|state: &ProxyState| {
            state
                .services
                .keys()
                .map(|port| ServiceTraffic {
                    port: port.clone(),
                    destination: DestinationKind::NodePort,
                    packets: 3,
                    bytes: 180,
                })
                .collect()
        });
        programmed.set_traffic_reader(reader);
        let registry = Registry::new();
        register(&registry, Arc::clone(&programmed)).unwrap();
        assert_eq!(crate::textfmt::encode(&registry.gather()), "");

        let mut state = ProxyState::default();
        let port = ServicePort::new(web(), vec!["10.96.0.10".parse().unwrap()], 80);
        state.services.insert(web(), Arc::new(port));
        programmed.record(&Arc::new(state), std::time::SystemTime::now());
        let text = crate::textfmt::encode(&registry.gather());
        for line in [
            "# TYPE kubeproxy_service_new_connection_packets_total counter",
            "kubeproxy_service_new_connection_packets_total{destination=\"node_port\",namespace=\"demo\",port=\"http\",protocol=\"TCP\",service=\"web\"} 3",
            "kubeproxy_service_new_connection_bytes_total{destination=\"node_port\",namespace=\"demo\",port=\"http\",protocol=\"TCP\",service=\"web\"} 180",
        ] {
            assert!(text.contains(line), "{line} missing in\n{text}");
        }
        let json = programmed.json(&crate::debug::Filter::default());
        assert_eq!(
            json["servicePorts"][0]["newConnections"]["node_port"],
            serde_json::json!({"packets": 3, "bytes": 180})
        );
        assert!(programmed
            .text(&crate::debug::Filter::default())
            .contains("\tnode_port=3/180B\n"));

        programmed.record(
            &Arc::new(ProxyState::default()),
            std::time::SystemTime::now(),
        );
        assert_eq!(crate::textfmt::encode(&registry.gather()), "");
    }
}
