//! Builders for Service and EndpointSlice manifests, as the proxy's `--manifests` reads
//! them: for end-to-end tests, the demo and the scale benchmarks.

use std::fmt::Write as _;
use std::net::IpAddr;

/// One port of a Service.
#[derive(Debug, Clone)]
pub struct PortSpec {
    pub name: String,
    /// `TCP`, `UDP` or `SCTP`.
    pub protocol: String,
    pub port: u16,
    pub target_port: u16,
    pub node_port: Option<u16>,
}

impl PortSpec {
    pub fn new(name: &str, protocol: &str, port: u16, target_port: u16) -> Self {
        PortSpec {
            name: name.into(),
            protocol: protocol.into(),
            port,
            target_port,
            node_port: None,
        }
    }

    pub fn node_port(mut self, node_port: u16) -> Self {
        self.node_port = Some(node_port);
        self
    }
}

/// A Service with its endpoints, rendered as a Service plus one EndpointSlice per family.
#[derive(Debug, Clone)]
pub struct ServiceSpec {
    pub namespace: String,
    pub name: String,
    /// `ClusterIP`, `NodePort` or `LoadBalancer`.
    pub type_: String,
    pub cluster_ips: Vec<IpAddr>,
    pub external_ips: Vec<IpAddr>,
    pub load_balancer_ips: Vec<IpAddr>,
    pub ports: Vec<PortSpec>,
    /// Endpoint address and whether it is ready.
    pub endpoints: Vec<(IpAddr, bool)>,
    /// `nodeName` of each endpoint, in the order of `endpoints`; none when empty.
    pub endpoint_nodes: Vec<String>,
    /// Extra `spec` lines, already indented by two spaces (e.g. `  sessionAffinity: ClientIP`).
    pub extra_spec: Vec<String>,
}

impl ServiceSpec {
    pub fn new(namespace: &str, name: &str, cluster_ips: &[IpAddr], ports: Vec<PortSpec>) -> Self {
        ServiceSpec {
            namespace: namespace.into(),
            name: name.into(),
            type_: "ClusterIP".into(),
            cluster_ips: cluster_ips.to_vec(),
            external_ips: vec![],
            load_balancer_ips: vec![],
            ports,
            endpoints: vec![],
            endpoint_nodes: vec![],
            extra_spec: vec![],
        }
    }

    pub fn endpoints(mut self, ips: &[IpAddr]) -> Self {
        self.endpoints = ips.iter().map(|ip| (*ip, true)).collect();
        self
    }

    /// Renders the Service and its EndpointSlices as a multi-document YAML string.
    pub fn to_yaml(&self) -> String {
        let mut y = String::new();
        let _ = writeln!(
            y,
            "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: {}\n  namespace: {}\nspec:\n  type: {}",
            self.name, self.namespace, self.type_
        );
        if let Some(first) = self.cluster_ips.first() {
            let _ = writeln!(y, "  clusterIP: \"{first}\"");
        }
        let _ = writeln!(y, "  clusterIPs: [{}]", quoted(&self.cluster_ips));
        if !self.external_ips.is_empty() {
            let _ = writeln!(y, "  externalIPs: [{}]", quoted(&self.external_ips));
        }
        y.push_str("  ports:\n");
        for p in &self.ports {
            let _ = writeln!(
                y,
                "    - name: {}\n      protocol: {}\n      port: {}\n      targetPort: {}",
                p.name, p.protocol, p.port, p.target_port
            );
            if let Some(np) = p.node_port {
                let _ = writeln!(y, "      nodePort: {np}");
            }
        }
        for line in &self.extra_spec {
            let _ = writeln!(y, "{line}");
        }
        if !self.load_balancer_ips.is_empty() {
            y.push_str("status:\n  loadBalancer:\n    ingress:\n");
            for ip in &self.load_balancer_ips {
                let _ = writeln!(y, "      - ip: \"{ip}\"");
            }
        }
        for (family, v4) in [("IPv4", true), ("IPv6", false)] {
            let eps: Vec<_> = self
                .endpoints
                .iter()
                .enumerate()
                .filter(|(_, (ip, _))| ip.is_ipv4() == v4)
                .collect();
            if eps.is_empty() {
                continue;
            }
            let _ = writeln!(
                y,
                "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {}-{}\n  namespace: {}\n  labels:\n    kubernetes.io/service-name: {}\naddressType: {family}\nports:",
                self.name,
                family.to_lowercase(),
                self.namespace,
                self.name
            );
            for p in &self.ports {
                let _ = writeln!(
                    y,
                    "  - name: {}\n    protocol: {}\n    port: {}",
                    p.name, p.protocol, p.target_port
                );
            }
            y.push_str("endpoints:\n");
            for (i, (ip, ready)) in eps {
                let _ = writeln!(y, "  - addresses: [\"{ip}\"]");
                if let Some(node) = self.endpoint_nodes.get(i) {
                    let _ = writeln!(y, "    nodeName: {node}");
                }
                let _ = writeln!(y, "    conditions: {{ready: {ready}}}");
            }
        }
        y
    }
}

fn quoted(ips: &[IpAddr]) -> String {
    ips.iter()
        .map(|ip| format!("\"{ip}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Renders several Services into one manifest file's content.
pub fn render(services: &[ServiceSpec]) -> String {
    services.iter().map(ServiceSpec::to_yaml).collect()
}
