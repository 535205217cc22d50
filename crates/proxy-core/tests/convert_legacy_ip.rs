//! Conversion of API objects whose IPs are written in the legacy forms the API stores
//! (IPv4 with leading zeros, IPv4-mapped IPv6): every field upstream reads with
//! `ParseIPSloppy` / `ParseCIDRSloppy` means the plain address, and a value that is not an
//! IP at all is still reported with its field.

use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{
    LoadBalancerIngress, LoadBalancerStatus, Node, NodeAddress, NodeSpec, NodeStatus, Service,
    ServicePort as ApiServicePort, ServiceSpec, ServiceStatus,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use proxy_core::convert::{node_info, service_ports, slice_endpoints, ConvertError};
use proxy_core::model::Protocol;

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

fn cidr(text: &str) -> IpNet {
    text.parse().unwrap()
}

fn strings(values: &[&str]) -> Option<Vec<String>> {
    Some(values.iter().map(|v| v.to_string()).collect())
}

fn service(
    cluster_ips: &[&str],
    external_ips: &[&str],
    ingress: &[&str],
    ranges: &[&str],
) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some("web".into()),
            namespace: Some("default".into()),
            ..ObjectMeta::default()
        },
        spec: Some(ServiceSpec {
            type_: Some("LoadBalancer".into()),
            cluster_ip: cluster_ips.first().map(|s| s.to_string()),
            cluster_ips: strings(cluster_ips),
            external_ips: strings(external_ips),
            load_balancer_source_ranges: strings(ranges),
            ports: Some(vec![ApiServicePort {
                name: Some("http".into()),
                port: 80,
                protocol: Some("TCP".into()),
                ..ApiServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        status: Some(ServiceStatus {
            load_balancer: Some(LoadBalancerStatus {
                ingress: Some(
                    ingress
                        .iter()
                        .map(|i| LoadBalancerIngress {
                            ip: Some(i.to_string()),
                            ..LoadBalancerIngress::default()
                        })
                        .collect(),
                ),
            }),
            ..ServiceStatus::default()
        }),
    }
}

fn slice(address_type: &str, addresses: &[&str]) -> EndpointSlice {
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some("web-1".into()),
            namespace: Some("default".into()),
            ..ObjectMeta::default()
        },
        address_type: address_type.into(),
        endpoints: addresses
            .iter()
            .map(|a| Endpoint {
                addresses: vec![a.to_string()],
                ..Endpoint::default()
            })
            .collect(),
        ports: Some(vec![EndpointPort {
            name: Some("http".into()),
            port: Some(8080),
            protocol: Some("TCP".into()),
            ..EndpointPort::default()
        }]),
    }
}

fn endpoint_ips(slice: &EndpointSlice, warnings: &mut Vec<String>) -> Vec<IpAddr> {
    slice_endpoints(slice, "node-a", warnings)
        .get(&("http".into(), Protocol::Tcp))
        .map(|eps| eps.iter().map(|e| e.ip).collect())
        .unwrap_or_default()
}

#[test]
fn service_fields_in_legacy_forms_mean_the_plain_addresses() {
    let svc = service(
        &["010.096.000.041", "fd00:96::0000041"],
        &["192.168.200.041", "::ffff:192.168.200.42"],
        &["0203.0.113.007"],
        &[" 010.244.000.000/016 ", "::ffff:203.0.113.0/120"],
    );
    let converted = service_ports(&svc).expect("converted");
    assert_eq!(converted.warnings, Vec::<String>::new());
    let port = &converted.ports[0];
    assert_eq!(port.cluster_ips, vec![ip("10.96.0.41"), ip("fd00:96::41")]);
    assert_eq!(
        port.external_ips,
        vec![ip("192.168.200.41"), ip("192.168.200.42")]
    );
    assert_eq!(port.load_balancer_ips, vec![ip("203.0.113.7")]);
    assert_eq!(
        port.load_balancer_source_ranges,
        vec![cidr("10.244.0.0/16"), cidr("203.0.113.0/24")]
    );
}

#[test]
fn a_v4_mapped_cluster_ip_is_the_ipv4_one() {
    // Upstream files it under IPv4 (To4() is non-nil), so it clashes with a real IPv4.
    let svc = service(&["::ffff:10.96.0.41"], &[], &[], &[]);
    let converted = service_ports(&svc).expect("converted");
    assert_eq!(converted.ports[0].cluster_ips, vec![ip("10.96.0.41")]);
    let both = service(&["10.96.0.41", "::ffff:10.96.0.42"], &[], &[], &[]);
    assert!(service_ports(&both).is_err());
}

#[test]
fn values_that_are_not_ips_are_still_reported_by_field() {
    // Upstream does not trim these, and neither zones nor octal-looking junk are IPs.
    let err = service_ports(&service(&["10.96.0.256"], &[], &[], &[])).unwrap_err();
    assert!(
        matches!(&err, ConvertError::InvalidService { field, .. } if field == "spec.clusterIPs"),
        "{err}"
    );
    let err = service_ports(&service(&[" 10.96.0.41"], &[], &[], &[])).unwrap_err();
    assert!(err.to_string().contains("spec.clusterIPs"), "{err}");

    let svc = service(
        &["10.96.0.41"],
        &["fe80::1%eth0", " 192.168.200.41", "0x0a.0.0.1"],
        &["1.2.3"],
        &["10.0.0.0/33", "10.0.0.0"],
    );
    let converted = service_ports(&svc).expect("the rest still converts");
    let port = &converted.ports[0];
    assert!(port.external_ips.is_empty());
    assert!(port.load_balancer_ips.is_empty());
    assert!(port.load_balancer_source_ranges.is_empty());
    let fields: Vec<&str> = converted
        .warnings
        .iter()
        .map(|w| w.split(": ").nth(1).unwrap_or_default())
        .collect();
    assert_eq!(
        fields,
        [
            "spec.externalIPs",
            "spec.externalIPs",
            "spec.externalIPs",
            "status.loadBalancer.ingress",
            "spec.loadBalancerSourceRanges",
            "spec.loadBalancerSourceRanges",
        ],
        "{:?}",
        converted.warnings
    );
}

#[test]
fn endpoint_addresses_in_legacy_forms_mean_the_plain_addresses() {
    let mut warnings = Vec::new();
    let v4 = slice(
        "IPv4",
        &[
            "010.244.001.002",
            "10.244.1.2",
            "::ffff:10.244.2.2",
            "10.244.3.2 ",
        ],
    );
    // The same endpoint written twice is kept once; a padded address is not an IP.
    assert_eq!(
        endpoint_ips(&v4, &mut warnings),
        vec![ip("10.244.1.2"), ip("10.244.2.2")]
    );
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].contains("10.244.3.2 "), "{warnings:?}");

    // Upstream would program a v4-mapped address as IPv4 in its IPv6 rules; it is not
    // an IPv6 endpoint, so it is skipped like any address of the wrong family.
    let mut warnings = Vec::new();
    let v6 = slice("IPv6", &["fd00:244:1::0002", "::ffff:10.244.2.2"]);
    assert_eq!(endpoint_ips(&v6, &mut warnings), vec![ip("fd00:244:1::2")]);
    assert_eq!(warnings.len(), 1, "{warnings:?}");
}

#[test]
fn node_addresses_and_pod_cidrs_in_legacy_forms() {
    let node = Node {
        metadata: ObjectMeta {
            name: Some("node-a".into()),
            ..ObjectMeta::default()
        },
        spec: Some(NodeSpec {
            pod_cidrs: strings(&["010.244.001.000/024", " fd00:244:1::/064 "]),
            pod_cidr: Some("10.244.1.0/24".into()),
            ..NodeSpec::default()
        }),
        status: Some(NodeStatus {
            addresses: Some(vec![
                NodeAddress {
                    type_: "InternalIP".into(),
                    address: "192.168.100.001".into(),
                },
                NodeAddress {
                    type_: "ExternalIP".into(),
                    address: "not-an-ip".into(),
                },
            ]),
            ..NodeStatus::default()
        }),
    };
    let info = node_info("node-a", Some(&node));
    assert_eq!(info.addresses, vec![ip("192.168.100.1")]);
    assert_eq!(
        info.pod_cidrs,
        vec![cidr("10.244.1.0/24"), cidr("fd00:244:1::/64")]
    );
}
