//! Metrics of nftables mode's localhost NodePorts (upstream v1.37, KEP-6032, alpha):
//! registered only when the feature is on, so the default set stays upstream v1.35's.
//!
//! The rejected-packet counts live in the kernel (named nftables counters); they are read
//! when scraped, through a reader the application passes in, so this crate needs no
//! netlink.

use std::sync::Arc;

use prometheus::core::{Collector, Desc};
use prometheus::proto::{Counter, LabelPair, Metric, MetricFamily, MetricType};
use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};
use proxy_core::model::{IpFamily, Protocol};
use proxy_core::proxier::LocalhostNodePortCounts;

use crate::metrics::{ip_family, MetricsError};

const ALPHA: &str = "[ALPHA] ";
const REJECTED: &str = "kubeproxy_nftables_localhost_nodeport_rejected_packets_total";
const REJECTED_HELP: &str = "Number of packets rejected on localhost NodePorts. UDP and SCTP are always rejected; TCP is rejected when the localhost NodePort proxy is not running";

/// Reads the kernel's rejected-packet counts: (family, protocol, packets).
pub type RejectedReader = Arc<dyn Fn() -> Vec<(IpFamily, Protocol, u64)> + Send + Sync>;

/// The listener gauge and failure counter, fed after each sync.
#[derive(Clone)]
pub struct LocalhostNodePortMetrics {
    listeners: IntGaugeVec,
    listener_creation_failures: IntCounterVec,
}

impl LocalhostNodePortMetrics {
    /// Registers the three metrics in `registry`.
    pub fn register(
        registry: &Registry,
        rejected: RejectedReader,
    ) -> Result<LocalhostNodePortMetrics, MetricsError> {
        let listeners = IntGaugeVec::new(
            Opts::new(
                "kubeproxy_nftables_localhost_nodeport_listeners",
                format!("{ALPHA}Number of localhost NodePort userspace proxy listeners."),
            ),
            &["ip_family"],
        )?;
        let listener_creation_failures = IntCounterVec::new(
            Opts::new(
                "kubeproxy_nftables_localhost_nodeport_listener_creation_failures_total",
                format!("{ALPHA}Number of localhost NodePort userspace proxy listener creation failures."),
            ),
            &["ip_family"],
        )?;
        registry.register(Box::new(listeners.clone()))?;
        registry.register(Box::new(listener_creation_failures.clone()))?;
        registry.register(Box::new(RejectedPackets::new(rejected)?))?;
        Ok(LocalhostNodePortMetrics {
            listeners,
            listener_creation_failures,
        })
    }

    /// What one sync left listening, and the listeners it failed to open.
    pub fn synced(&self, counts: &[LocalhostNodePortCounts]) {
        for c in counts {
            let family = [ip_family(c.family)];
            self.listeners
                .with_label_values(&family)
                .set(i64::try_from(c.listeners).unwrap_or(i64::MAX));
            self.listener_creation_failures
                .with_label_values(&family)
                .inc_by(c.failures);
        }
    }
}

/// The API's spelling, as upstream labels the protocol.
fn protocol_label(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::Tcp => "TCP",
        Protocol::Udp => "UDP",
        Protocol::Sctp => "SCTP",
    }
}

/// `kubeproxy_nftables_localhost_nodeport_rejected_packets_total`, read at scrape time.
struct RejectedPackets {
    desc: Desc,
    read: RejectedReader,
}

impl RejectedPackets {
    fn new(read: RejectedReader) -> Result<Self, MetricsError> {
        let desc = Desc::new(
            REJECTED.into(),
            format!("{ALPHA}{REJECTED_HELP}"),
            vec!["ip_family".into(), "protocol".into()],
            Default::default(),
        )?;
        Ok(RejectedPackets { desc, read })
    }
}

fn label(name: &str, value: &str) -> LabelPair {
    let mut pair = LabelPair::default();
    pair.set_name(name.into());
    pair.set_value(value.into());
    pair
}

impl Collector for RejectedPackets {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.desc]
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let samples = (self.read)();
        if samples.is_empty() {
            return Vec::new();
        }
        let mut mf = MetricFamily::default();
        mf.set_name(REJECTED.into());
        mf.set_help(format!("{ALPHA}{REJECTED_HELP}"));
        mf.set_field_type(MetricType::COUNTER);
        for (family, protocol, packets) in samples {
            let mut counter = Counter::default();
            counter.set_value(packets as f64);
            let mut metric = Metric::default();
            metric.set_label(vec![
                label("ip_family", ip_family(family)),
                label("protocol", protocol_label(protocol)),
            ]);
            metric.set_counter(counter);
            mf.mut_metric().push(metric);
        }
        vec![mf]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_kernel_readings_are_exported() {
        let registry = Registry::new();
        let read: RejectedReader = Arc::new(|| {
            vec![
                (IpFamily::V4, Protocol::Udp, 7),
                (IpFamily::V6, Protocol::Sctp, 3),
            ]
        });
        let m = LocalhostNodePortMetrics::register(&registry, read).unwrap();
        m.synced(&[LocalhostNodePortCounts {
            family: IpFamily::V4,
            listeners: 2,
            failures: 1,
        }]);
        let text = crate::textfmt::encode(&registry.gather());
        for line in [
            "kubeproxy_nftables_localhost_nodeport_listeners{ip_family=\"IPv4\"} 2",
            "kubeproxy_nftables_localhost_nodeport_listener_creation_failures_total{ip_family=\"IPv4\"} 1",
            "kubeproxy_nftables_localhost_nodeport_rejected_packets_total{ip_family=\"IPv4\",protocol=\"UDP\"} 7",
            "kubeproxy_nftables_localhost_nodeport_rejected_packets_total{ip_family=\"IPv6\",protocol=\"SCTP\"} 3",
            "# TYPE kubeproxy_nftables_localhost_nodeport_rejected_packets_total counter",
        ] {
            assert!(text.contains(line), "{line} missing in\n{text}");
        }
    }
}
