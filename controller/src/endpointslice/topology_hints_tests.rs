//! `topology-mode: Auto` hint cases, after upstream `topologycache_test.go`
//! (`TestAddHints`, `TestGetAllocations`): each case names what upstream does.

use std::collections::BTreeMap;

use k8s_openapi::api::discovery::v1::{EndpointConditions, EndpointHints, ForZone};

use super::*;

fn mk_endpoint(ip: &str, zone: Option<&str>, ready: bool, hint: Option<&str>) -> Endpoint {
    Endpoint {
        addresses: vec![ip.into()],
        zone: zone.map(Into::into),
        conditions: Some(EndpointConditions { ready: Some(ready), ..Default::default() }),
        hints: hint
            .map(|z| EndpointHints { for_zones: Some(vec![ForZone { name: z.into() }]), for_nodes: None }),
        ..Default::default()
    }
}

/// Ready endpoints, one per listed zone.
fn mk_slice(name: &str, zones: &[&str]) -> EndpointSlice {
    let endpoints = zones
        .iter()
        .enumerate()
        .map(|(i, z)| mk_endpoint(&format!("10.0.0.{i}"), Some(z), true, None))
        .collect();
    EndpointSlice {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        address_type: "IPv4".into(),
        endpoints: Some(endpoints),
        ..Default::default()
    }
}

fn shares(pairs: &[(&str, f64)]) -> ZoneShares {
    pairs.iter().map(|(z, s)| (z.to_string(), *s)).collect()
}

/// Hinted zone → number of endpoints, over `slices`.
fn hint_counts(slices: &[EndpointSlice]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for endpoint in slices.iter().flat_map(endpoints) {
        for zone in endpoint.hints.iter().flat_map(|h| h.for_zones.iter().flatten()) {
            *counts.entry(zone.name.clone()).or_default() += 1;
        }
    }
    counts
}

fn no_hints(slices: &[EndpointSlice]) -> bool {
    slices.iter().flat_map(endpoints).all(|e| e.hints.is_none())
}

fn counts(pairs: &[(&str, usize)]) -> BTreeMap<String, usize> {
    pairs.iter().map(|(z, n)| (z.to_string(), *n)).collect()
}

#[test]
fn balanced_zones_hint_every_ready_endpoint_for_its_own_zone() {
    let mut create = vec![mk_slice("s", &["a", "a", "b", "b"])];
    let warning =
        add_hints(Some(&shares(&[("a", 0.5), ("b", 0.5)])), IpFamily::V4, &mut create, &mut vec![], &[]);
    assert_eq!(warning, None);
    for endpoint in endpoints(&create[0]) {
        let hinted = &endpoint.hints.as_ref().unwrap().for_zones.as_ref().unwrap()[0].name;
        assert_eq!(Some(hinted), endpoint.zone.as_ref());
    }
}

#[test]
fn a_zone_with_more_than_its_share_gives_endpoints_to_a_zone_with_less() {
    // 3 endpoints in a, 1 in b, equal CPU: desired 2 each, so one of a's goes to b.
    let mut create = vec![mk_slice("s", &["a", "a", "a", "b"])];
    let warning =
        add_hints(Some(&shares(&[("a", 0.5), ("b", 0.5)])), IpFamily::V4, &mut create, &mut vec![], &[]);
    assert_eq!(warning, None);
    assert_eq!(hint_counts(&create), counts(&[("a", 2), ("b", 2)]));
}

#[test]
fn not_ready_endpoints_are_neither_counted_nor_hinted() {
    let mut slice = mk_slice("s", &["a", "b"]);
    slice.endpoints.as_mut().unwrap().push(mk_endpoint("10.0.1.1", Some("a"), false, None));
    let mut create = vec![slice];
    let warning =
        add_hints(Some(&shares(&[("a", 0.5), ("b", 0.5)])), IpFamily::V4, &mut create, &mut vec![], &[]);
    assert_eq!(warning, None);
    assert_eq!(hint_counts(&create), counts(&[("a", 1), ("b", 1)]));
    assert_eq!(endpoints(&create[0])[2].hints, None);
}

#[test]
fn insufficient_node_information_removes_hints_from_unchanged_slices_too() {
    let mut hinted = mk_slice("hinted", &["a", "b"]);
    hinted
        .endpoints
        .as_mut()
        .unwrap()
        .iter_mut()
        .for_each(|e| e.hints = Some(zone_hint(e.zone.clone().unwrap())));
    let plain = mk_slice("plain", &["a"]);
    let mut update = vec![];
    let warning = add_hints(None, IpFamily::V4, &mut [], &mut update, &[&hinted, &plain]);
    let warning = warning.expect("a warning");
    assert_eq!(warning.reason, "TopologyAwareHintsDisabled");
    assert_eq!(
        warning.message,
        "Insufficient Node information: allocatable CPU or zone not specified on one or more nodes, addressType: IPv4"
    );
    assert_eq!(update.len(), 1, "only the slice that had hints is rewritten");
    assert_eq!(update[0].metadata.name.as_deref(), Some("hinted"));
    assert!(no_hints(&update));
}

#[test]
fn fewer_ready_endpoints_than_zones_gives_no_hints() {
    let mut create = vec![mk_slice("s", &["a", "b"])];
    let three = shares(&[("a", 0.4), ("b", 0.3), ("c", 0.3)]);
    let warning = add_hints(Some(&three), IpFamily::V6, &mut create, &mut vec![], &[]).expect("a warning");
    assert_eq!(warning.message, "Insufficient number of endpoints (2 endpoints, 3 zones), addressType: IPv6");
    assert!(no_hints(&create));
}

#[test]
fn a_small_zone_whose_minimum_cannot_be_met_gives_no_hints() {
    // a: desired 1.8, minimum ceil(1.8 / 1.2) = 2; b: minimum 1; 3 > 2 endpoints.
    let mut create = vec![mk_slice("s", &["a", "b"])];
    let warning =
        add_hints(Some(&shares(&[("a", 0.9), ("b", 0.1)])), IpFamily::V4, &mut create, &mut vec![], &[]);
    assert_eq!(
        warning.expect("a warning").message,
        "Unable to allocate minimum required endpoints to each zone without exceeding overload threshold \
         (2 endpoints, 2 zones), addressType: IPv4"
    );
    assert!(no_hints(&create));
}

#[test]
fn a_ready_endpoint_without_zone_removes_every_hint() {
    let mut slice = mk_slice("s", &["a", "a", "b", "b"]);
    slice.endpoints.as_mut().unwrap()[3].zone = None;
    let mut create = vec![slice];
    let warning =
        add_hints(Some(&shares(&[("a", 0.5), ("b", 0.5)])), IpFamily::V4, &mut create, &mut vec![], &[]);
    assert_eq!(
        warning.expect("a warning").message,
        "One or more endpoints do not have a zone specified, addressType: IPv4"
    );
    assert!(no_hints(&create));
}

#[test]
fn unchanged_slices_with_fitting_hints_are_not_rewritten() {
    let two = shares(&[("a", 0.5), ("b", 0.5)]);
    let mut create = vec![mk_slice("s", &["a", "a", "b", "b"])];
    add_hints(Some(&two), IpFamily::V4, &mut create, &mut vec![], &[]);
    let mut update = vec![];
    assert_eq!(add_hints(Some(&two), IpFamily::V4, &mut [], &mut update, &[&create[0]]), None);
    assert!(update.is_empty());
    // A hint for a zone with no CPU any more does not fit: the slice is rewritten.
    let other = shares(&[("a", 0.5), ("c", 0.5)]);
    let mut moved = create[0].clone();
    moved.endpoints.as_mut().unwrap().iter_mut().skip(2).for_each(|e| e.zone = Some("c".into()));
    let mut update = vec![];
    assert_eq!(add_hints(Some(&other), IpFamily::V4, &mut [], &mut update, &[&moved]), None);
    assert_eq!(hint_counts(&update), counts(&[("a", 2), ("c", 2)]));
}

#[test]
fn allocations_follow_upstream_get_allocations() {
    // upstream TestGetAllocations "2 zones, 20 endpoints, 40/60 CPU split"
    let got = allocations(Some(&shares(&[("a", 0.4), ("b", 0.6)])), 20).unwrap();
    assert_eq!(got["a"], Allocation { minimum: 7, maximum: 10, desired: 8.0 });
    assert_eq!(got["b"], Allocation { minimum: 10, maximum: 13, desired: 12.0 });
    assert_eq!(allocations(Some(&shares(&[("a", 1.0)])), 5).unwrap_err(), "Nodes only ready in one zone");
}
