//! Pure functions from Kubernetes objects to the proxy's model.
//!
//! Every source goes through here, so every source gets the same validation. Objects come
//! from users (manifests) or from an API server that may be older or newer than us: treat
//! every field as hostile. Names end up in kernel rule comments, so they are checked against
//! the API's own syntax rules and a Service that breaks them is refused as a whole.
//!
//! IPs and CIDRs are read with the legacy grammar the API stores (leading zeros in IPv4;
//! see [`crate::ipparse`]), in exactly the fields where upstream reads them that way.
//! Whitespace is trimmed only where upstream trims: `loadBalancerSourceRanges` (its
//! validation let padding through) and the node's pod CIDRs.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::ServiceCIDR;

use crate::ipparse::{parse_cidr_sloppy, parse_ip_sloppy};
use crate::model::{
    Endpoint, Hints, IpFamily, NodeInfo, Protocol, ServiceName, ServicePort, ServicePortName,
    TrafficPolicy,
};

/// Upstream's default `sessionAffinityConfig.clientIP.timeoutSeconds` (3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT_SECONDS: u32 = 10_800;
/// Upstream's maximum for the affinity timeout (one day).
pub const MAX_AFFINITY_TIMEOUT_SECONDS: u32 = 86_400;
/// Label tying an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// The API server's limit on endpoints per EndpointSlice (upstream `maxEndpoints`): a
/// slice claiming more did not come from a conforming server; the rest is ignored.
pub const MAX_ENDPOINTS_PER_SLICE: usize = 1000;
/// Label of the zone a node runs in.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// Why an object was refused. Names the object and the offending field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConvertError {
    /// The object has no usable name or namespace.
    #[error("{kind} has an invalid {field} {value:?}: {reason}")]
    InvalidName {
        kind: &'static str,
        field: &'static str,
        value: String,
        reason: &'static str,
    },
    /// A field of a Service that makes the whole Service unusable.
    #[error("Service {service}: {field}: {message}")]
    InvalidService {
        service: String,
        field: String,
        message: String,
    },
}

/// A Service converted to its ports, plus the problems that were skipped over.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConvertedService {
    pub ports: Vec<ServicePort>,
    /// Fields that were ignored (e.g. one invalid externalIP); the rest still applies.
    pub warnings: Vec<String>,
}

/// Checks a DNS-1123 label (namespaces, port names): lower-case alphanumerics and '-',
/// starting and ending with an alphanumeric, at most 63 characters.
pub fn check_dns_label(value: &str) -> Result<(), &'static str> {
    if value.is_empty() {
        return Err("must not be empty");
    }
    if value.len() > 63 {
        return Err("must be at most 63 characters");
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err("must consist of lower-case letters, digits and '-'");
    }
    if value.starts_with('-') || value.ends_with('-') {
        return Err("must start and end with a letter or digit");
    }
    Ok(())
}

/// Checks a DNS-1123 subdomain (EndpointSlice names): labels joined by '.', at most 253.
pub fn check_dns_subdomain(value: &str) -> Result<(), &'static str> {
    if value.len() > 253 {
        return Err("must be at most 253 characters");
    }
    value.split('.').try_for_each(check_dns_label)
}

fn name_error(
    kind: &'static str,
    field: &'static str,
    value: &str,
    reason: &'static str,
) -> ConvertError {
    ConvertError::InvalidName {
        kind,
        field,
        value: value.chars().take(80).collect(),
        reason,
    }
}

/// The validated `namespace/name` of a Service.
pub fn service_name(svc: &Service) -> Result<ServiceName, ConvertError> {
    let namespace = svc.metadata.namespace.as_deref().unwrap_or("default");
    let name = svc.metadata.name.as_deref().unwrap_or("");
    check_dns_label(namespace)
        .map_err(|r| name_error("Service", "metadata.namespace", namespace, r))?;
    // Service names are DNS-1035 labels: a DNS label that starts with a letter.
    check_dns_label(name).map_err(|r| name_error("Service", "metadata.name", name, r))?;
    if !name.starts_with(|c: char| c.is_ascii_lowercase()) {
        return Err(name_error(
            "Service",
            "metadata.name",
            name,
            "must start with a letter",
        ));
    }
    Ok(ServiceName::new(namespace, name))
}

/// Converts a Service to its ports. ExternalName and headless Services have none.
pub fn service_ports(svc: &Service) -> Result<ConvertedService, ConvertError> {
    let service = service_name(svc)?;
    let invalid = |field: &str, message: String| ConvertError::InvalidService {
        service: service.to_string(),
        field: field.to_string(),
        message,
    };
    let mut out = ConvertedService::default();
    let Some(spec) = &svc.spec else {
        return Ok(out);
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        return Ok(out);
    }

    // clusterIPs is authoritative when present; clusterIP is its first element.
    let raw_ips: Vec<&str> = match (&spec.cluster_ips, &spec.cluster_ip) {
        (Some(ips), _) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
        (_, Some(ip)) => vec![ip.as_str()],
        _ => vec![],
    };
    if raw_ips.is_empty() || raw_ips.iter().any(|ip| ip.is_empty() || *ip == "None") {
        // Headless, or not allocated yet: nothing to program.
        return Ok(out);
    }
    let mut cluster_ips = Vec::new();
    for raw in &raw_ips {
        let ip = parse_ip_sloppy(raw)
            .ok_or_else(|| invalid("spec.clusterIPs", format!("{raw:?} is not an IP address")))?;
        if cluster_ips
            .iter()
            .any(|other| IpFamily::of(other) == IpFamily::of(&ip))
        {
            return Err(invalid(
                "spec.clusterIPs",
                "more than one IP of the same family".into(),
            ));
        }
        cluster_ips.push(ip);
    }

    let mut external_ips = Vec::new();
    for raw in spec.external_ips.iter().flatten() {
        match parse_ip_sloppy(raw) {
            Some(ip) => external_ips.push(ip),
            None => out.warnings.push(format!(
                "Service {service}: spec.externalIPs: {raw:?} is not an IP address; ignored"
            )),
        }
    }
    let is_load_balancer = spec.type_.as_deref() == Some("LoadBalancer");
    let mut load_balancer_ips = Vec::new();
    if is_load_balancer {
        let ingress = svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref());
        for entry in ingress.into_iter().flatten() {
            // ipMode Proxy means the load balancer delivers to the node, not to the VIP.
            if entry.ip_mode.as_deref() == Some("Proxy") {
                continue;
            }
            if let Some(raw) = &entry.ip {
                match parse_ip_sloppy(raw) {
                    Some(ip) => load_balancer_ips.push(ip),
                    None => out.warnings.push(format!(
                        "Service {service}: status.loadBalancer.ingress: {raw:?} is not an IP address; ignored"
                    )),
                }
            }
        }
    }
    let mut source_ranges = Vec::new();
    for raw in spec.load_balancer_source_ranges.iter().flatten() {
        match parse_cidr_sloppy(raw.trim()) {
            Some(net) => source_ranges.push(net),
            None => out.warnings.push(format!(
                "Service {service}: spec.loadBalancerSourceRanges: {raw:?} is not a CIDR; ignored"
            )),
        }
    }
    let session_affinity_timeout = match spec.session_affinity.as_deref() {
        Some("ClientIP") => {
            let configured = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds);
            Some(match configured {
                None => DEFAULT_AFFINITY_TIMEOUT_SECONDS,
                Some(t) if t >= 1 && t as u32 <= MAX_AFFINITY_TIMEOUT_SECONDS => t as u32,
                Some(t) => {
                    return Err(invalid(
                        "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                        format!("{t} is outside 1..={MAX_AFFINITY_TIMEOUT_SECONDS}"),
                    ))
                }
            })
        }
        None | Some("None") | Some("") => None,
        Some(other) => {
            return Err(invalid(
                "spec.sessionAffinity",
                format!("unknown value {other:?}"),
            ))
        }
    };
    let policy = |field: &str, value: Option<&str>| match value {
        None | Some("") | Some("Cluster") => Ok(TrafficPolicy::Cluster),
        Some("Local") => Ok(TrafficPolicy::Local),
        Some(other) => Err(invalid(field, format!("unknown value {other:?}"))),
    };
    let is_external = is_load_balancer || spec.type_.as_deref() == Some("NodePort");
    let external_traffic_policy = if is_external || !external_ips.is_empty() {
        policy(
            "spec.externalTrafficPolicy",
            spec.external_traffic_policy.as_deref(),
        )?
    } else {
        TrafficPolicy::Cluster
    };
    let internal_traffic_policy = policy(
        "spec.internalTrafficPolicy",
        spec.internal_traffic_policy.as_deref(),
    )?;
    let health_check_node_port = match spec.health_check_node_port {
        Some(p) if is_load_balancer && external_traffic_policy == TrafficPolicy::Local => {
            Some(port_number(p).ok_or_else(|| {
                invalid(
                    "spec.healthCheckNodePort",
                    format!("{p} is not a valid port"),
                )
            })?)
        }
        _ => None,
    };
    let ports = spec.ports.as_deref().unwrap_or(&[]);
    let mut seen = BTreeSet::new();
    for (i, p) in ports.iter().enumerate() {
        let field = format!("spec.ports[{i}]");
        let port_name = p.name.clone().unwrap_or_default();
        if !port_name.is_empty() {
            check_dns_label(&port_name)
                .map_err(|r| invalid(&format!("{field}.name"), format!("{port_name:?} {r}")))?;
        } else if ports.len() > 1 {
            return Err(invalid(
                &format!("{field}.name"),
                "required when a Service has several ports".into(),
            ));
        }
        let protocol = Protocol::from_api(p.protocol.as_deref()).ok_or_else(|| {
            invalid(
                &format!("{field}.protocol"),
                format!("unsupported protocol {:?}", p.protocol),
            )
        })?;
        let port = port_number(p.port).ok_or_else(|| {
            invalid(
                &format!("{field}.port"),
                format!("{} is not a valid port", p.port),
            )
        })?;
        let node_port = match p.node_port {
            None | Some(0) => None,
            Some(np) => Some(port_number(np).ok_or_else(|| {
                invalid(
                    &format!("{field}.nodePort"),
                    format!("{np} is not a valid port"),
                )
            })?),
        };
        let name = ServicePortName {
            service: service.clone(),
            port: port_name.into(),
            protocol,
        };
        if !seen.insert((name.port.clone(), protocol)) {
            return Err(invalid(
                &format!("{field}.name"),
                format!("duplicate port {:?}/{protocol}", name.port),
            ));
        }
        out.ports.push(ServicePort {
            name,
            cluster_ips: cluster_ips.clone(),
            port,
            node_port: if is_external { node_port } else { None },
            external_ips: external_ips.clone(),
            load_balancer_ips: load_balancer_ips.clone(),
            load_balancer_source_ranges: source_ranges.clone(),
            session_affinity_timeout,
            external_traffic_policy,
            internal_traffic_policy,
            health_check_node_port,
        });
    }
    Ok(out)
}

fn port_number(value: i32) -> Option<u16> {
    u16::try_from(value).ok().filter(|p| *p != 0)
}

/// The Service an EndpointSlice belongs to, from its `kubernetes.io/service-name` label.
pub fn slice_service(slice: &EndpointSlice) -> Option<ServiceName> {
    let namespace = slice.metadata.namespace.as_deref().unwrap_or("default");
    let name = slice.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
    Some(ServiceName::new(namespace, name.as_str()))
}

/// A port of an EndpointSlice: its name and protocol.
pub type PortKey = (Arc<str>, Protocol);

/// Endpoints per (port name, protocol), sorted by key. A slice has a port or two, so a
/// sorted vector (a B-tree's smallest node holds eleven). Each list is shared: the state
/// takes a Service's list from its only slice without copying it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EndpointsByPort(Vec<(PortKey, Arc<Vec<Endpoint>>)>);

impl EndpointsByPort {
    /// The endpoints of one port.
    pub fn get(&self, key: &PortKey) -> Option<&Arc<Vec<Endpoint>>> {
        self.0
            .binary_search_by(|(k, _)| k.cmp(key))
            .ok()
            .map(|i| &self.0[i].1)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&PortKey, &Arc<Vec<Endpoint>>)> {
        self.0.iter().map(|(k, eps)| (k, eps))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn from_sorted(map: BTreeMap<PortKey, Vec<Endpoint>>) -> Self {
        EndpointsByPort(map.into_iter().map(|(k, eps)| (k, Arc::new(eps))).collect())
    }
}

/// Endpoints of one Service, per (port name, protocol), merged over all its slices.
/// Duplicates (the same IP and port in two slices, as happens while a slice is being
/// replaced) are kept once. Invalid entries are skipped with a warning.
pub fn service_endpoints<'a>(
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    node_name: &str,
    warnings: &mut Vec<String>,
) -> EndpointsByPort {
    let per_slice: Vec<EndpointsByPort> = slices
        .into_iter()
        .map(|slice| slice_endpoints(slice, node_name, warnings))
        .collect();
    merge_endpoints(&per_slice)
}

/// Merges the endpoints of a Service's slices; an endpoint listed twice is kept once
/// (the first). A port only one slice has keeps that slice's list (shared, not copied).
pub fn merge_endpoints<'a>(
    slices: impl IntoIterator<Item = &'a EndpointsByPort>,
) -> EndpointsByPort {
    let mut lists: BTreeMap<&PortKey, Vec<&Arc<Vec<Endpoint>>>> = BTreeMap::new();
    for slice in slices {
        for (key, eps) in slice.iter() {
            lists.entry(key).or_default().push(eps);
        }
    }
    let merged = lists.into_iter().map(|(key, lists)| {
        let eps = match lists.as_slice() {
            [only] => Arc::clone(only),
            _ => {
                let mut unique: BTreeMap<(IpAddr, u16), &Endpoint> = BTreeMap::new();
                for ep in lists.iter().flat_map(|l| l.iter()) {
                    unique.entry((ep.ip, ep.port)).or_insert(ep);
                }
                Arc::new(unique.into_values().cloned().collect())
            }
        };
        (key.clone(), eps)
    });
    EndpointsByPort(merged.collect())
}

/// The endpoints of one EndpointSlice, per (port name, protocol). Invalid entries are
/// skipped with a warning.
pub fn slice_endpoints(
    slice: &EndpointSlice,
    node_name: &str,
    warnings: &mut Vec<String>,
) -> EndpointsByPort {
    let mut out: BTreeMap<PortKey, BTreeMap<(IpAddr, u16), Endpoint>> = BTreeMap::new();
    // Collected and reported as one warning, so a slice of a thousand bad addresses is
    // one log line, not a thousand.
    let mut problems = Vec::new();
    {
        let family = match slice.address_type.as_str() {
            "IPv4" => IpFamily::V4,
            "IPv6" => IpFamily::V6,
            _ => return EndpointsByPort::default(), // FQDN slices are not proxied.
        };
        if slice.endpoints.len() > MAX_ENDPOINTS_PER_SLICE {
            problems.push(format!(
                "{} endpoints, more than the API allows; \
                 only the first {MAX_ENDPOINTS_PER_SLICE} are used",
                slice.endpoints.len()
            ));
        }
        for p in slice.ports.iter().flatten() {
            let Some(protocol) = Protocol::from_api(p.protocol.as_deref()) else {
                problems.push(format!(
                    "unsupported protocol {:?}; port skipped",
                    p.protocol
                ));
                continue;
            };
            let Some(port) = p.port.and_then(port_number) else {
                problems.push(format!("port {:?} is not valid; skipped", p.port));
                continue;
            };
            let key: PortKey = (p.name.as_deref().unwrap_or("").into(), protocol);
            let bucket = out.entry(key).or_default();
            for ep in slice.endpoints.iter().take(MAX_ENDPOINTS_PER_SLICE) {
                // Upstream programs the first address only.
                let Some(raw) = ep.addresses.first() else {
                    continue;
                };
                let Some(ip) = parse_ip_sloppy(raw).filter(|ip| IpFamily::of(ip) == family) else {
                    problems.push(format!(
                        "address {:?} is not an {family:?} address; skipped",
                        raw.chars().take(64).collect::<String>()
                    ));
                    continue;
                };
                let conditions = ep.conditions.as_ref();
                // Absent conditions mean ready (API semantics); serving defaults to ready.
                let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
                let serving = conditions.and_then(|c| c.serving).unwrap_or(ready);
                let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
                let hints = ep.hints.as_ref().map(|h| Hints {
                    zones: h
                        .for_zones
                        .iter()
                        .flatten()
                        .map(|z| z.name.clone())
                        .collect(),
                    nodes: h
                        .for_nodes
                        .iter()
                        .flatten()
                        .map(|n| n.name.clone())
                        .collect(),
                });
                bucket.entry((ip, port)).or_insert(Endpoint {
                    ip,
                    port,
                    ready,
                    serving,
                    terminating,
                    is_local: !node_name.is_empty() && ep.node_name.as_deref() == Some(node_name),
                    hints: hints.filter(|h| h != &Hints::default()).map(Box::new),
                });
            }
        }
    }
    if !problems.is_empty() {
        warnings.push(slice_warning(slice, &problems));
    }
    EndpointsByPort::from_sorted(
        out.into_iter()
            .map(|(k, eps)| (k, eps.into_values().collect()))
            .collect(),
    )
}

/// One line for all of a slice's problems: the first few, then how many more. The name
/// is quoted, as it may hold anything (a newline would forge a log line).
fn slice_warning(slice: &EndpointSlice, problems: &[String]) -> String {
    const SHOWN: usize = 3;
    let name = format!(
        "{}/{}",
        slice.metadata.namespace.as_deref().unwrap_or("default"),
        slice.metadata.name.as_deref().unwrap_or("<unnamed>")
    );
    let mut text = format!(
        "EndpointSlice {name:?}: {}",
        problems[..problems.len().min(SHOWN)].join("; ")
    );
    if problems.len() > SHOWN {
        text.push_str(&format!(" (and {} more)", problems.len() - SHOWN));
    }
    text
}

/// What the proxy keeps from its Node object.
pub fn node_info(name: &str, node: Option<&Node>) -> NodeInfo {
    let mut info = NodeInfo {
        name: name.to_string(),
        ..NodeInfo::default()
    };
    let Some(node) = node else { return info };
    info.zone = node
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(ZONE_LABEL))
        .cloned();
    if let Some(spec) = &node.spec {
        let cidrs = spec.pod_cidrs.iter().flatten().chain(spec.pod_cidr.iter());
        for raw in cidrs {
            if let Some(net) = parse_cidr_sloppy(raw.trim()) {
                if !info.pod_cidrs.contains(&net) {
                    info.pod_cidrs.push(net);
                }
            }
        }
    }
    if let Some(status) = &node.status {
        // InternalIPs before ExternalIPs, as upstream's node host IPs are ordered.
        for kind in ["InternalIP", "ExternalIP"] {
            for addr in status.addresses.iter().flatten() {
                if addr.type_ == kind {
                    if let Some(ip) = parse_ip_sloppy(&addr.address) {
                        info.addresses.push(ip);
                    }
                }
            }
        }
    }
    info
}

/// The Service IP ranges of a `ServiceCIDR` object; unparsable entries are reported and
/// skipped (the API validates them, so none is expected).
pub fn service_cidr_ranges(object: &ServiceCIDR, warnings: &mut Vec<String>) -> Vec<IpNet> {
    let name = object.metadata.name.as_deref().unwrap_or("");
    let mut out = Vec::new();
    for raw in object.spec.iter().flat_map(|s| s.cidrs.iter().flatten()) {
        match raw.parse::<IpNet>() {
            Ok(net) => out.push(net.trunc()),
            Err(_) => warnings.push(format!(
                "ServiceCIDR {name}: spec.cidrs: {raw:?} is not a CIDR; ignored"
            )),
        }
    }
    out
}
