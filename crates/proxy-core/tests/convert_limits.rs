//! Limits on what the API can hand us: oversized EndpointSlices are clamped with a
//! warning naming the slice; a Service spread over many slices keeps all its endpoints.

use k8s_openapi::api::discovery::v1::{Endpoint, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use proxy_core::convert::{service_endpoints, MAX_ENDPOINTS_PER_SLICE};
use proxy_core::model::Protocol;

fn slice(name: &str, first: usize, count: usize) -> EndpointSlice {
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("ns".into()),
            ..ObjectMeta::default()
        },
        address_type: "IPv4".into(),
        endpoints: (first..first + count)
            .map(|i| Endpoint {
                addresses: vec![format!("10.{}.{}.{}", i / 65536, (i / 256) % 256, i % 256)],
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

fn count(slices: &[EndpointSlice], warnings: &mut Vec<String>) -> usize {
    service_endpoints(slices, "node", warnings)
        .get(&("http".into(), Protocol::Tcp))
        .map_or(0, |eps| eps.len())
}

#[test]
fn one_slice_over_the_api_limit_is_clamped_with_its_name() {
    let mut warnings = Vec::new();
    let n = count(&[slice("huge", 0, 10_000)], &mut warnings);
    assert_eq!(n, MAX_ENDPOINTS_PER_SLICE);
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains("huge") && warnings[0].contains("10000"),
        "{warnings:?}"
    );
}

#[test]
fn ten_thousand_endpoints_over_ten_slices_are_all_kept() {
    let slices: Vec<_> = (0..10)
        .map(|k| slice(&format!("s{k}"), k * 1000, 1000))
        .collect();
    let mut warnings = Vec::new();
    assert_eq!(count(&slices, &mut warnings), 10_000);
    assert!(warnings.is_empty(), "{warnings:?}");
}

/// A port only one slice has takes that slice's list as it is (one copy of 100,000
/// endpoints in memory, not two); ports of several slices are merged, duplicates once.
#[test]
fn one_slice_is_shared_and_several_are_merged() {
    use proxy_core::convert::{merge_endpoints, slice_endpoints};
    let key = ("http".into(), Protocol::Tcp);
    let mut warnings = Vec::new();
    let one = slice_endpoints(&slice("a", 0, 3), "node", &mut warnings);
    let merged = merge_endpoints([&one]);
    assert!(std::sync::Arc::ptr_eq(
        merged.get(&key).unwrap(),
        one.get(&key).unwrap()
    ));
    // Overlapping slices (one being replaced by another): each endpoint once, in order.
    let other = slice_endpoints(&slice("b", 2, 3), "node", &mut warnings);
    let merged = merge_endpoints([&one, &other]);
    let ips: Vec<String> = merged
        .get(&key)
        .unwrap()
        .iter()
        .map(|e| e.ip.to_string())
        .collect();
    assert_eq!(
        ips,
        ["10.0.0.0", "10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"]
    );
    assert!(warnings.is_empty(), "{warnings:?}");
}
