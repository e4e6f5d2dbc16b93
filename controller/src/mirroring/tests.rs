//! Table and property tests of the mirroring planner. The table mirrors upstream's
//! `TestReconcile` in `endpointslicemirroring/reconciler_test.go`; writes and
//! metric counts are checked as upstream's `expectedClientActions` and
//! `expectedMetrics` do.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{
    EndpointAddress, EndpointPort, EndpointSubset, Endpoints, ObjectReference, Service, ServiceSpec,
};
use k8s_openapi::api::discovery::v1::{
    Endpoint, EndpointConditions, EndpointPort as SlicePort, EndpointSlice,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};
use proptest::prelude::*;

use super::*;
use crate::plan::Warning;

const NS: &str = "test";
const NAME: &str = "test-ep";
const UID: &str = "uid-1";

fn mk_service(selector: Option<&[(&str, &str)]>) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some(NAME.to_owned()),
            namespace: Some(NS.to_owned()),
            ..ObjectMeta::default()
        },
        spec: Some(ServiceSpec {
            selector: selector
                .map(|pairs| pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

fn mk_endpoints(subsets: Vec<EndpointSubset>) -> Endpoints {
    Endpoints {
        metadata: ObjectMeta {
            name: Some(NAME.to_owned()),
            namespace: Some(NS.to_owned()),
            uid: Some(UID.to_owned()),
            ..ObjectMeta::default()
        },
        subsets: Some(subsets),
    }
}

fn port(name: &str, number: i32, protocol: &str) -> EndpointPort {
    EndpointPort {
        name: Some(name.to_owned()),
        port: number,
        protocol: Some(protocol.to_owned()),
        app_protocol: None,
    }
}

fn addr(ip: &str) -> EndpointAddress {
    EndpointAddress { ip: ip.to_owned(), ..EndpointAddress::default() }
}

fn pod_addr(ip: &str, hostname: &str, node: &str) -> EndpointAddress {
    EndpointAddress {
        ip: ip.to_owned(),
        hostname: Some(hostname.to_owned()),
        node_name: Some(node.to_owned()),
        target_ref: None,
    }
}

fn subset(
    ports: Vec<EndpointPort>,
    ready: Vec<EndpointAddress>,
    not_ready: Vec<EndpointAddress>,
) -> EndpointSubset {
    EndpointSubset { addresses: Some(ready), not_ready_addresses: Some(not_ready), ports: Some(ports) }
}

/// Port http 80/TCP and the ready address of pod-1: upstream's one-subset fixture.
fn http_80_of_pod_1() -> EndpointSubset {
    subset(vec![port("http", 80, "TCP")], vec![pod_addr("10.0.0.1", "pod-1", "node-1")], vec![])
}

/// The two-subset fixture most upstream cases share.
fn two_subsets() -> Vec<EndpointSubset> {
    two_subsets_with(["10.0.0.1", "10.0.0.2"], ["10.0.1.1", "10.0.1.2", "10.0.1.3"])
}

/// Upstream's two-subset fixture with other addresses: pod-1 and pod-2 on
/// http 80 / https 443, pod-11 to pod-13 on 3000 / 3001, all ready.
fn two_subsets_with(first: [&str; 2], second: [&str; 3]) -> Vec<EndpointSubset> {
    let addresses = |ips: &[&str], pods: &[&str]| {
        let on = |i: usize| format!("node-{}", i + 1);
        ips.iter().zip(pods).enumerate().map(|(i, (ip, pod))| pod_addr(ip, pod, &on(i))).collect()
    };
    vec![
        subset(
            vec![port("http", 80, "TCP"), port("https", 443, "UDP")],
            addresses(&first, &["pod-1", "pod-2"]),
            vec![],
        ),
        subset(
            vec![port("http", 3000, "TCP"), port("https", 3001, "UDP")],
            addresses(&second, &["pod-11", "pod-12", "pod-13"]),
            vec![],
        ),
    ]
}

fn slice_port(name: &str, number: i32, protocol: &str) -> SlicePort {
    SlicePort {
        name: Some(name.to_owned()),
        port: Some(number),
        protocol: Some(protocol.to_owned()),
        app_protocol: None,
    }
}

fn mk_slice(
    name: &str,
    address_type: &str,
    ports: Vec<SlicePort>,
    endpoints: Vec<Endpoint>,
) -> EndpointSlice {
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(NS.to_owned()),
            resource_version: Some("1".to_owned()),
            labels: Some(BTreeMap::from([
                (labels::SERVICE_NAME.to_owned(), NAME.to_owned()),
                (labels::MANAGED_BY.to_owned(), labels::SVCPLANE_MIRRORING_CONTROLLER.to_owned()),
            ])),
            owner_references: Some(vec![OwnerReference {
                api_version: "v1".to_owned(),
                kind: "Endpoints".to_owned(),
                name: NAME.to_owned(),
                uid: UID.to_owned(),
                controller: Some(true),
                block_owner_deletion: Some(true),
            }]),
            ..ObjectMeta::default()
        },
        address_type: address_type.to_owned(),
        ports: Some(ports),
        endpoints: Some(endpoints),
    }
}

fn slice_endpoint(ips: &[&str], hostname: Option<&str>, node: Option<&str>, ready: Option<bool>) -> Endpoint {
    Endpoint {
        addresses: ips.iter().map(|s| (*s).to_owned()).collect(),
        hostname: hostname.map(str::to_owned),
        node_name: node.map(str::to_owned),
        conditions: ready.map(|r| EndpointConditions { ready: Some(r), ..EndpointConditions::default() }),
        ..Endpoint::default()
    }
}

fn http_https_80() -> Vec<SlicePort> {
    vec![slice_port("http", 80, "TCP"), slice_port("https", 443, "UDP")]
}

fn plan(endpoints: &Endpoints, existing: &[EndpointSlice], max: usize) -> Plan<EndpointSlice> {
    let existing: Vec<Arc<EndpointSlice>> = existing.iter().cloned().map(Arc::new).collect();
    let config = MirroringConfig { max_endpoints_per_subset: max, ..MirroringConfig::default() };
    plan_mirrored_slices(Some(&mk_service(None)), Some(endpoints), &existing, &config)
}

use crate::plan::{NO_SLICES, applied as apply};

/// One row of upstream's table; `max` 0 is the default maximum per subset.
#[derive(Default)]
struct Case {
    name: &'static str,
    subsets: Vec<EndpointSubset>,
    existing: Vec<EndpointSlice>,
    max: usize,
    deletion_pending: bool,
    want_slices: usize,
    want_writes: usize,
    want_desired: usize,
    want_added: usize,
    want_updated: usize,
    want_removed: usize,
    want_skipped: usize,
    want_created: usize,
    want_updates: usize,
}

#[test]
fn reconcile_matches_upstream_table() {
    let cases = vec![
        Case { name: "Endpoints with no subsets", ..Case::default() },
        Case {
            name: "Endpoints with no addresses",
            subsets: vec![subset(vec![port("http", 80, "TCP")], vec![], vec![])],
            ..Case::default()
        },
        Case {
            name: "Endpoints with 1 subset, port, and address",
            subsets: vec![http_80_of_pod_1()],
            want_slices: 1,
            want_writes: 1,
            want_desired: 1,
            want_added: 1,
            want_created: 1,
            ..Case::default()
        },
        Case {
            name: "Endpoints with 2 subset, different port and address",
            subsets: vec![
                http_80_of_pod_1(),
                subset(
                    vec![port("https", 443, "TCP")],
                    vec![pod_addr("10.0.0.2", "pod-2", "node-1")],
                    vec![],
                ),
            ],
            want_slices: 2,
            want_writes: 2,
            want_desired: 2,
            want_added: 2,
            want_created: 2,
            ..Case::default()
        },
        Case {
            name: "Endpoints with 2 subset, different port and same address",
            subsets: vec![
                http_80_of_pod_1(),
                subset(
                    vec![port("https", 443, "TCP")],
                    vec![pod_addr("10.0.0.1", "pod-1", "node-1")],
                    vec![],
                ),
            ],
            want_slices: 1,
            want_writes: 1,
            want_desired: 1,
            want_added: 1,
            want_created: 1,
            ..Case::default()
        },
        Case {
            name: "Endpoints with 2 subset, different address and same port",
            subsets: vec![
                http_80_of_pod_1(),
                subset(vec![port("http", 80, "TCP")], vec![pod_addr("10.0.0.2", "pod-2", "node-1")], vec![]),
            ],
            want_slices: 1,
            want_writes: 1,
            want_desired: 2,
            want_added: 2,
            want_created: 1,
            ..Case::default()
        },
        Case {
            name: "Endpoints with 1 subset, port, and address, pending deletion",
            subsets: vec![http_80_of_pod_1()],
            deletion_pending: true,
            want_desired: 1,
            want_added: 1,
            ..Case::default()
        },
        Case {
            name: "Endpoints with 1 subset, port, and address and existing slice with same fields",
            subsets: vec![http_80_of_pod_1()],
            existing: vec![mk_slice(
                "test-ep-1",
                "IPv4",
                vec![slice_port("http", 80, "TCP")],
                vec![slice_endpoint(&["10.0.0.1"], Some("pod-1"), Some("node-1"), Some(true))],
            )],
            want_slices: 1,
            want_desired: 1,
            ..Case::default()
        },
        Case {
            name: "Endpoints with 1 subset, port, and address and existing slice with same fields but different OwnerReferences",
            subsets: vec![http_80_of_pod_1()],
            existing: vec![{
                let mut s = mk_slice(
                    "test-ep-1",
                    "IPv4",
                    vec![slice_port("http", 80, "TCP")],
                    vec![slice_endpoint(&["10.0.0.1"], Some("pod-1"), Some("node-1"), Some(true))],
                );
                if let Some(owners) = s.metadata.owner_references.as_mut() {
                    owners[0].uid = "uid-of-a-deleted-endpoints".to_owned();
                }
                s
            }],
            want_slices: 1,
            want_writes: 1,
            want_desired: 1,
            want_updates: 1,
            ..Case::default()
        },
        Case {
            name: "Endpoints with 1 subset, port, and address and existing slice with an additional annotation",
            subsets: vec![http_80_of_pod_1()],
            existing: vec![{
                let mut s = mk_slice(
                    "test-ep-1",
                    "IPv4",
                    vec![slice_port("http", 80, "TCP")],
                    vec![slice_endpoint(&["10.0.0.1"], Some("pod-1"), Some("node-1"), Some(true))],
                );
                s.metadata.annotations = Some(BTreeMap::from([("foo".to_owned(), "bar".to_owned())]));
                s
            }],
            want_slices: 1,
            want_writes: 1,
            want_desired: 1,
            want_updates: 1,
            ..Case::default()
        },
        Case {
            name: "Endpoints with 1 subset, 2 ports, and 2 ready and 2 not ready addresses",
            subsets: vec![subset(
                vec![port("http", 80, "TCP"), port("https", 443, "UDP")],
                vec![pod_addr("10.0.0.1", "pod-1", "node-1"), pod_addr("10.0.0.2", "pod-2", "node-2")],
                vec![pod_addr("10.0.0.11", "pod-11", "node-1"), pod_addr("10.0.0.12", "pod-12", "node-2")],
            )],
            want_slices: 1,
            want_writes: 1,
            want_desired: 4,
            want_added: 4,
            want_created: 1,
            ..Case::default()
        },
        Case {
            name: "Endpoints with 2 subsets, multiple ports and addresses",
            subsets: two_subsets(),
            want_slices: 2,
            want_writes: 2,
            want_desired: 5,
            want_added: 5,
            want_created: 2,
            ..Case::default()
        },
        Case {
            name: "Endpoints with 2 subsets, multiple ports and addresses, existing empty EndpointSlice",
            subsets: two_subsets(),
            existing: vec![mk_slice("test-ep-1", "IPv4", http_https_80(), vec![])],
            want_slices: 2,
            want_writes: 2,
            want_desired: 5,
            want_added: 5,
            want_created: 1,
            want_updates: 1,
            ..Case::default()
        },
        Case {
            name: "Endpoints with 2 subsets, multiple ports and addresses, existing EndpointSlice with some addresses",
            subsets: two_subsets(),
            existing: vec![mk_slice(
                "test-ep-1",
                "IPv4",
                http_https_80(),
                vec![
                    slice_endpoint(&["10.0.0.2"], Some("pod-2"), None, None),
                    slice_endpoint(&["10.0.0.1", "10.0.0.3"], Some("pod-1"), None, None),
                ],
            )],
            want_slices: 2,
            want_writes: 2,
            want_desired: 5,
            want_added: 4,
            want_updated: 1,
            want_removed: 1,
            want_created: 1,
            want_updates: 1,
            ..Case::default()
        },
        Case {
            name: "Endpoints with 2 subsets, multiple ports and addresses, existing EndpointSlice identical to subset",
            subsets: two_subsets(),
            existing: vec![mk_slice(
                "test-ep-1",
                "IPv4",
                http_https_80(),
                vec![
                    slice_endpoint(&["10.0.0.1"], Some("pod-1"), Some("node-1"), Some(true)),
                    slice_endpoint(&["10.0.0.2"], Some("pod-2"), Some("node-2"), Some(true)),
                ],
            )],
            want_slices: 2,
            want_writes: 1,
            want_desired: 5,
            want_added: 3,
            want_created: 1,
            ..Case::default()
        },
        Case {
            name: "Endpoints with 2 subsets, multiple ports, and dual stack addresses",
            subsets: two_subsets_with(
                ["2001:db8:2222:3333:4444:5555:6666:7777", "10.0.0.2"],
                ["10.0.1.1", "10.0.1.2", "2001:db8:3333:4444:5555:6666:7777:8888"],
            ),
            want_slices: 4,
            want_writes: 4,
            want_desired: 5,
            want_added: 5,
            want_created: 4,
            ..Case::default()
        },
        Case {
            name: "Endpoints with 2 subsets, multiple ports, some invalid addresses",
            subsets: two_subsets_with(
                ["2001:db8:2222:3333:4444:5555:6666:7777", "this-is-not-an-ip"],
                [
                    "this-is-also-not-an-ip",
                    "2001:db8:4444:3333:4444:5555:6666:7777",
                    "2001:db8:5555:3333:4444:5555:6666:7777",
                ],
            ),
            want_slices: 2,
            want_writes: 2,
            want_desired: 3,
            want_added: 3,
            want_skipped: 2,
            want_created: 2,
            ..Case::default()
        },
        Case {
            name: "Endpoints with 2 subsets, multiple ports, all invalid addresses",
            subsets: two_subsets_with(
                ["this-is-not-an-ip1", "this-is-not-an-ip12"],
                ["this-is-not-an-ip11", "this-is-not-an-ip12", "this-is-not-an-ip3"],
            ),
            want_skipped: 5,
            ..Case::default()
        },
        Case {
            name: "Endpoints with 2 subsets, 1 exceeding maxEndpointsPerSubset",
            subsets: two_subsets(),
            max: 2,
            want_slices: 2,
            want_writes: 2,
            want_desired: 4,
            want_added: 4,
            want_skipped: 1,
            want_created: 2,
            ..Case::default()
        },
    ];

    for mut case in cases {
        if case.max == 0 {
            case.max = DEFAULT_MAX_ENDPOINTS_PER_SUBSET;
        }
        let mut endpoints = mk_endpoints(case.subsets.clone());
        if case.deletion_pending {
            endpoints.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
        }
        let got = plan(&endpoints, &case.existing, case.max);
        let s = &got;
        let name = case.name;
        assert_eq!(
            s.create.len() + s.update.len() + s.delete.len(),
            case.want_writes,
            "{name}: writes {got:#?}"
        );
        assert_eq!(s.create.len(), case.want_created, "{name}: creates");
        assert_eq!(s.update.len(), case.want_updates, "{name}: updates");
        assert_eq!(s.endpoints.desired, case.want_desired, "{name}: desired");
        assert_eq!(s.endpoints.added, case.want_added, "{name}: added");
        assert_eq!(s.endpoints.updated, case.want_updated, "{name}: updated");
        assert_eq!(s.endpoints.removed, case.want_removed, "{name}: removed");
        assert_eq!(s.endpoints.skipped, case.want_skipped, "{name}: skipped");

        let after = apply(&case.existing, s);
        assert_eq!(after.len(), case.want_slices, "{name}: slices after apply");
        for slice in &after {
            assert_mirrored_shape(&endpoints, slice, case.max, name);
        }
        if !case.deletion_pending {
            let again = plan(&endpoints, &after, case.max);
            assert!(again.is_empty(), "{name}: second plan not empty: {again:#?}");
        }
    }
}

/// Upstream `expectEndpointSlices`: labels, annotations, ownerRef, size and ready
/// condition of every mirrored slice.
fn assert_mirrored_shape(endpoints: &Endpoints, slice: &EndpointSlice, max: usize, case: &str) {
    let slice_labels = slice.metadata.labels.clone().unwrap_or_default();
    assert_eq!(slice_labels.get(labels::SERVICE_NAME).map(String::as_str), Some(NAME), "{case}");
    assert_eq!(
        slice_labels.get(labels::MANAGED_BY).map(String::as_str),
        Some(labels::SVCPLANE_MIRRORING_CONTROLLER),
        "{case}"
    );
    let owners = slice.metadata.owner_references.clone().unwrap_or_default();
    assert_eq!(owners.len(), 1, "{case}");
    assert_eq!((owners[0].kind.as_str(), owners[0].uid.as_str()), ("Endpoints", UID), "{case}");
    assert_eq!(owners[0].controller, Some(true), "{case}");
    let list = slice.endpoints.clone().unwrap_or_default();
    assert!(list.len() <= max, "{case}: slice over the limit");
    assert!(!list.is_empty(), "{case}: mirrored slices are never empty");
    for endpoint in &list {
        let conditions = endpoint.conditions.clone().unwrap_or_default();
        assert!(conditions.ready.is_some(), "{case}");
        assert_eq!((conditions.serving, conditions.terminating), (None, None), "{case}");
    }
    assert_eq!(slice.metadata.namespace, endpoints.metadata.namespace, "{case}");
}

fn one_address() -> Endpoints {
    mk_endpoints(vec![http_80_of_pod_1()])
}

fn annotated(pairs: &[(&str, &str)]) -> Endpoints {
    let mut endpoints = one_address();
    endpoints.metadata.annotations =
        Some(pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect());
    endpoints
}

#[test]
fn last_applied_and_trigger_time_are_not_mirrored() {
    let endpoints = annotated(&[
        (labels::LAST_APPLIED, "{}"),
        (labels::LAST_CHANGE_TRIGGER_TIME, "2020-01-01T00:00:00Z"),
        ("foo", "bar"),
    ]);
    let got = plan(&endpoints, &[], 1000);
    let annotations = got.create[0].metadata.annotations.clone().unwrap_or_default();
    assert_eq!(annotations, BTreeMap::from([("foo".to_owned(), "bar".to_owned())]));
}

#[test]
fn last_applied_is_removed_from_an_existing_slice() {
    let endpoints = annotated(&[("foo", "bar")]);
    let mut existing = mk_slice(
        "test-ep-1",
        "IPv4",
        vec![slice_port("http", 80, "TCP")],
        vec![slice_endpoint(&["10.0.0.1"], Some("pod-1"), Some("node-1"), Some(true))],
    );
    existing.metadata.annotations = Some(BTreeMap::from([
        (labels::LAST_APPLIED.to_owned(), "{}".to_owned()),
        ("foo".to_owned(), "bar".to_owned()),
    ]));
    let got = plan(&endpoints, &[existing], 1000);
    assert_eq!(got.update.len(), 1);
    let annotations = got.update[0].metadata.annotations.clone().unwrap_or_default();
    assert!(!annotations.contains_key(labels::LAST_APPLIED));
}

#[test]
fn a_trigger_time_change_alone_writes_nothing() {
    let endpoints = annotated(&[(labels::LAST_CHANGE_TRIGGER_TIME, "2020-01-01T00:00:00Z")]);
    let after = apply(NO_SLICES, &plan(&endpoints, &[], 1000));
    let changed = annotated(&[(labels::LAST_CHANGE_TRIGGER_TIME, "2021-01-01T00:00:00Z")]);
    assert!(plan(&changed, &after, 1000).is_empty());
}

#[test]
fn labels_are_copied_and_a_label_change_updates_the_slice() {
    let mut endpoints = one_address();
    endpoints.metadata.labels = Some(BTreeMap::from([("foo".to_owned(), "bar".to_owned())]));
    let created = plan(&endpoints, &[], 1000);
    let slice_labels = created.create[0].metadata.labels.clone().unwrap_or_default();
    assert_eq!(slice_labels.get("foo").map(String::as_str), Some("bar"));
    let after = apply(NO_SLICES, &created);

    endpoints.metadata.labels = Some(BTreeMap::from([("foo".to_owned(), "baz".to_owned())]));
    let relabelled = plan(&endpoints, &after, 1000);
    assert_eq!(relabelled.update.len(), 1);
    assert!(relabelled.create.is_empty() && relabelled.delete.is_empty());
}

#[test]
fn endpoints_carrying_a_reserved_label_rewrite_their_slice_every_sync() {
    // Upstream quirk: the slice's managed-by always differs from the Endpoints' one.
    let mut endpoints = one_address();
    endpoints.metadata.labels = Some(BTreeMap::from([(labels::SERVICE_NAME.to_owned(), "other".to_owned())]));
    let after = apply(NO_SLICES, &plan(&endpoints, &[], 1000));
    let slice_labels = after[0].metadata.labels.clone().unwrap_or_default();
    assert_eq!(slice_labels.get(labels::SERVICE_NAME).map(String::as_str), Some(NAME));
    assert_eq!(plan(&endpoints, &after, 1000).update.len(), 1);
}

#[test]
fn ready_and_not_ready_addresses_set_the_ready_condition() {
    let endpoints = mk_endpoints(vec![subset(
        vec![port("http", 80, "TCP")],
        vec![addr("10.0.0.1")],
        vec![addr("10.0.0.2")],
    )]);
    let got = plan(&endpoints, &[], 1000);
    let readiness: BTreeMap<String, Option<bool>> = got.create[0]
        .endpoints
        .iter()
        .flatten()
        .map(|e| (e.addresses[0].clone(), e.conditions.as_ref().and_then(|c| c.ready)))
        .collect();
    assert_eq!(
        readiness,
        BTreeMap::from([("10.0.0.1".to_owned(), Some(true)), ("10.0.0.2".to_owned(), Some(false))])
    );
}

#[test]
fn an_address_listed_ready_and_not_ready_is_mirrored_not_ready_once() {
    let endpoints = mk_endpoints(vec![
        subset(vec![port("http", 80, "TCP")], vec![addr("10.0.0.1")], vec![]),
        subset(vec![port("http", 80, "TCP")], vec![], vec![addr("10.0.0.1")]),
    ]);
    let got = plan(&endpoints, &[], 1000);
    let list = got.create[0].endpoints.clone().unwrap_or_default();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].conditions.as_ref().and_then(|c| c.ready), Some(false));
}

#[test]
fn irregular_ip_text_is_mirrored_canonically() {
    let endpoints = mk_endpoints(vec![subset(
        vec![port("http", 80, "TCP")],
        vec![addr("010.000.000.001"), addr("2001:DB8:0:0:0:0:0:1"), addr("::ffff:10.0.0.2")],
        vec![],
    )]);
    let got = plan(&endpoints, &[], 1000);
    let mut mirrored: Vec<(String, String)> = got
        .create
        .iter()
        .flat_map(|s| s.endpoints.iter().flatten().map(|e| (s.address_type.clone(), e.addresses[0].clone())))
        .collect();
    mirrored.sort();
    assert_eq!(
        mirrored,
        [
            ("IPv4".to_owned(), "10.0.0.1".to_owned()),
            ("IPv4".to_owned(), "10.0.0.2".to_owned()),
            ("IPv6".to_owned(), "2001:db8::1".to_owned()),
        ]
    );
}

#[test]
fn invalid_and_over_cap_addresses_produce_both_warnings() {
    let mut ready: Vec<EndpointAddress> = (1..=4).map(|i| addr(&format!("10.0.0.{i}"))).collect();
    // Sorts first after repacking (byte order), so it is seen before the cap.
    ready.insert(0, addr("0-not-an-ip"));
    let endpoints = mk_endpoints(vec![subset(vec![port("http", 80, "TCP")], ready, vec![])]);
    let got = plan(&endpoints, &[], 3);
    assert_eq!(got.endpoints.skipped, 2);
    let mirrored = got.create[0].endpoints.iter().flatten().flat_map(|e| e.addresses.clone());
    assert_eq!(mirrored.collect::<Vec<_>>(), ["10.0.0.1", "10.0.0.2", "10.0.0.3"], "the invalid one skipped");
    assert_eq!(
        got.warnings,
        [
            Warning {
                reason: REASON_INVALID_IP_ADDRESS,
                message: "Skipped 1 invalid IP addresses when mirroring to EndpointSlices".to_owned(),
            },
            Warning {
                reason: REASON_TOO_MANY_ADDRESSES,
                message: "A max of 3 addresses can be mirrored to EndpointSlices per Endpoints subset. 2 addresses were skipped".to_owned(),
            },
        ]
    );
}

#[test]
fn the_cap_counts_ready_addresses_before_not_ready_ones() {
    let endpoints = mk_endpoints(vec![subset(
        vec![port("http", 80, "TCP")],
        vec![addr("10.0.0.1"), addr("10.0.0.2")],
        vec![addr("10.0.0.3")],
    )]);
    let got = plan(&endpoints, &[], 2);
    let list = got.create[0].endpoints.clone().unwrap_or_default();
    assert!(list.iter().all(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true)));
    assert_eq!(got.warnings.len(), 1);
}

#[test]
fn target_ref_node_and_hostname_are_copied() {
    let target = ObjectReference {
        kind: Some("Pod".to_owned()),
        name: Some("pod-1".to_owned()),
        namespace: Some(NS.to_owned()),
        uid: Some("pod-uid".to_owned()),
        resource_version: Some("7".to_owned()),
        ..ObjectReference::default()
    };
    let mut address = pod_addr("10.0.0.1", "pod-1", "node-1");
    address.target_ref = Some(target.clone());
    let endpoints = mk_endpoints(vec![subset(vec![port("http", 80, "TCP")], vec![address], vec![])]);
    let got = plan(&endpoints, &[], 1000);
    let endpoint = &got.create[0].endpoints.as_ref().map(|l| l[0].clone()).unwrap_or_default();
    assert_eq!(endpoint.target_ref, Some(target));
    assert_eq!(endpoint.hostname.as_deref(), Some("pod-1"));
    assert_eq!(endpoint.node_name.as_deref(), Some("node-1"));
    assert_eq!(endpoint.zone, None);
}

#[test]
fn created_slices_use_generate_name_and_the_endpoints_owner() {
    let got = plan(&one_address(), &[], 1000);
    let created = &got.create[0];
    assert_eq!(created.metadata.generate_name.as_deref(), Some("test-ep-"));
    assert_eq!(created.metadata.name, None);
    assert_eq!(created.metadata.namespace.as_deref(), Some(NS));
}

fn existing_one_address_slice() -> EndpointSlice {
    mk_slice(
        "test-ep-1",
        "IPv4",
        vec![slice_port("http", 80, "TCP")],
        vec![slice_endpoint(&["10.0.0.1"], Some("pod-1"), Some("node-1"), Some(true))],
    )
}

fn plan_with(
    svc: Option<&Service>,
    endpoints: Option<&Endpoints>,
    existing: &[EndpointSlice],
) -> Plan<EndpointSlice> {
    let existing: Vec<Arc<EndpointSlice>> = existing.iter().cloned().map(Arc::new).collect();
    plan_mirrored_slices(svc, endpoints, &existing, &MirroringConfig::default())
}

#[test]
fn mirrored_slices_are_deleted_when_mirroring_must_stop() {
    let slice = existing_one_address_slice();
    let endpoints = one_address();
    let mut skip = one_address();
    skip.metadata.labels = Some(BTreeMap::from([(labels::SKIP_MIRROR.to_owned(), "true".to_owned())]));
    let mut leader = one_address();
    leader.metadata.annotations =
        Some(BTreeMap::from([(labels::LEADER_ELECTION.to_owned(), "{}".to_owned())]));
    let with_selector = mk_service(Some(&[("app", "x")]));
    let selectorless = mk_service(None);
    let cases: [(&str, Option<&Service>, Option<&Endpoints>); 5] = [
        ("Endpoints gone", Some(&selectorless), None),
        ("Service gone", None, Some(&endpoints)),
        ("Service has a selector", Some(&with_selector), Some(&endpoints)),
        ("skip-mirror label", Some(&selectorless), Some(&skip)),
        ("leader-election annotation", Some(&selectorless), Some(&leader)),
    ];
    for (name, svc, endpoints) in cases {
        let got = plan_with(svc, endpoints, std::slice::from_ref(&slice));
        assert_eq!(got.delete, std::slice::from_ref(&slice), "{name}");
        assert!(got.create.is_empty() && got.update.is_empty(), "{name}");
    }
}

#[test]
fn skip_mirror_with_another_value_is_mirrored() {
    let mut endpoints = one_address();
    endpoints.metadata.labels = Some(BTreeMap::from([(labels::SKIP_MIRROR.to_owned(), "false".to_owned())]));
    assert!(should_mirror(&endpoints));
    assert_eq!(plan(&endpoints, &[], 1000).create.len(), 1);
}

#[test]
fn a_service_with_an_empty_selector_is_mirrored_like_a_selectorless_one() {
    // Upstream checks `Selector != nil`; the apiserver stores `{}` as nil (selector.rs).
    let svc = mk_service(Some(&[]));
    assert_eq!(plan_with(Some(&svc), Some(&one_address()), &[]).create.len(), 1);
}

#[test]
fn selectorless_external_name_services_are_mirrored() {
    let mut svc = mk_service(None);
    if let Some(spec) = svc.spec.as_mut() {
        spec.type_ = Some("ExternalName".to_owned());
        spec.external_name = Some("example.com".to_owned());
    }
    let got = plan_with(Some(&svc), Some(&one_address()), &[]);
    assert_eq!(got.create.len(), 1);
}

#[test]
fn slices_of_other_managers_or_names_are_never_touched() {
    let mut upstream = existing_one_address_slice();
    if let Some(l) = upstream.metadata.labels.as_mut() {
        l.insert(labels::MANAGED_BY.to_owned(), labels::UPSTREAM_MIRRORING_CONTROLLER.to_owned());
    }
    let mut other_name = existing_one_address_slice();
    other_name.metadata.name = Some("other-1".to_owned());
    if let Some(l) = other_name.metadata.labels.as_mut() {
        l.insert(labels::SERVICE_NAME.to_owned(), "other".to_owned());
    }
    let existing = [upstream, other_name];
    let got = plan(&one_address(), &existing, 1000);
    assert_eq!(got.create.len(), 1);
    assert!(got.update.is_empty() && got.delete.is_empty());
    let gone = plan_with(Some(&mk_service(Some(&[("a", "b")]))), Some(&one_address()), &existing);
    assert!(gone.is_empty());
}

#[test]
fn duplicate_slices_of_one_port_set_collapse_into_one() {
    let first = existing_one_address_slice();
    let mut second = existing_one_address_slice();
    second.metadata.name = Some("test-ep-2".to_owned());
    let got = plan(&one_address(), &[second.clone(), first], 1000);
    assert!(got.create.is_empty() && got.update.is_empty());
    assert_eq!(got.delete, [second]);
}

#[test]
fn a_port_change_recycles_the_old_slice_into_an_update() {
    let endpoints = mk_endpoints(vec![subset(
        vec![port("http", 8080, "TCP")],
        vec![pod_addr("10.0.0.1", "pod-1", "node-1")],
        vec![],
    )]);
    let got = plan(&endpoints, &[existing_one_address_slice()], 1000);
    assert!(got.create.is_empty() && got.delete.is_empty());
    assert_eq!(got.update.len(), 1);
    let updated = &got.update[0];
    assert_eq!(updated.metadata.name.as_deref(), Some("test-ep-1"));
    assert_eq!(updated.ports, Some(vec![slice_port("http", 8080, "TCP")]));
}

#[test]
fn recycling_never_crosses_address_types() {
    let endpoints = mk_endpoints(vec![subset(vec![port("http", 80, "TCP")], vec![addr("fd00::1")], vec![])]);
    let got = plan(&endpoints, &[existing_one_address_slice()], 1000);
    assert_eq!(got.create.len(), 1);
    assert_eq!(got.create[0].address_type, "IPv6");
    assert_eq!(got.delete.len(), 1);
    assert!(got.update.is_empty());
}

#[test]
fn empty_endpoints_delete_all_slices_and_create_no_placeholder() {
    let got = plan(&mk_endpoints(vec![]), &[existing_one_address_slice()], 1000);
    assert_eq!(got.delete.len(), 1);
    assert!(got.create.is_empty() && got.update.is_empty());
}

#[test]
fn an_endpoint_change_beyond_identity_updates_in_place() {
    let mut slice = existing_one_address_slice();
    if let Some(list) = slice.endpoints.as_mut() {
        list[0].node_name = Some("node-old".to_owned());
    }
    let got = plan(&one_address(), &[slice], 1000);
    assert_eq!(got.update.len(), 1);
    assert_eq!(got.endpoints.updated, 1);
    assert_eq!(got.endpoints.added, 0);
}

#[test]
fn endpoint_order_in_the_existing_slice_does_not_matter() {
    let endpoints = mk_endpoints(vec![subset(
        vec![port("http", 80, "TCP")],
        vec![addr("10.0.0.1"), addr("10.0.0.2")],
        vec![],
    )]);
    let slice = mk_slice(
        "test-ep-1",
        "IPv4",
        vec![slice_port("http", 80, "TCP")],
        vec![
            slice_endpoint(&["10.0.0.2"], None, None, Some(true)),
            slice_endpoint(&["10.0.0.1"], None, None, Some(true)),
        ],
    );
    assert!(plan(&endpoints, &[slice], 1000).is_empty());
}

// ---------------------------------------------------------------------------
// Properties.

fn arb_address() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => (0u8..4, 1u8..40).prop_map(|(c, d)| format!("10.0.{c}.{d}")),
        2 => (1u16..30).prop_map(|d| format!("fd00::{d:x}")),
        1 => Just("not-an-ip".to_owned()),
        1 => (1u8..20).prop_map(|d| format!("010.0.0.{d:03}")),
    ]
}

fn arb_ports() -> impl Strategy<Value = Vec<EndpointPort>> {
    prop::sample::subsequence(vec![("http", 80), ("https", 443), ("dns", 53), ("metrics", 9090)], 0..=2)
        .prop_map(|list| list.into_iter().map(|(n, p)| port(n, p, "TCP")).collect())
}

fn arb_subset() -> impl Strategy<Value = EndpointSubset> {
    (arb_ports(), prop::collection::vec(arb_address(), 0..12), prop::collection::vec(arb_address(), 0..6))
        .prop_map(|(ports, ready, not_ready)| {
            subset(
                ports,
                ready.iter().map(|ip| addr(ip)).collect(),
                not_ready.iter().map(|ip| addr(ip)).collect(),
            )
        })
}

fn arb_endpoints() -> impl Strategy<Value = Endpoints> {
    prop::collection::vec(arb_subset(), 0..4).prop_map(mk_endpoints)
}

/// (address type, canonical IP, port set) of one mirrored endpoint.
type Triple = (String, String, Vec<(String, i32)>);

/// The triples in a set of slices, sorted.
fn mirrored_triples(slices: &[EndpointSlice]) -> Vec<Triple> {
    let mut triples = Vec::new();
    for slice in slices {
        let mut ports: Vec<(String, i32)> = slice
            .ports
            .iter()
            .flatten()
            .map(|p| (p.name.clone().unwrap_or_default(), p.port.unwrap_or_default()))
            .collect();
        ports.sort();
        for endpoint in slice.endpoints.iter().flatten() {
            triples.push((slice.address_type.clone(), endpoint.addresses[0].clone(), ports.clone()));
        }
    }
    triples.sort();
    triples
}

/// The (family, canonical IP, port) facts the Endpoints asks for, ignoring caps.
fn expected_triples(endpoints: &Endpoints) -> BTreeSet<(String, String, (String, i32))> {
    let mut expected = BTreeSet::new();
    for subset in endpoints.subsets.iter().flatten() {
        let addresses = subset.addresses.iter().flatten().chain(subset.not_ready_addresses.iter().flatten());
        for address in addresses {
            let Some((ip, text)) = crate::ip::canonicalize(&address.ip) else {
                continue;
            };
            let family = if ip.is_ipv4() { "IPv4" } else { "IPv6" };
            let ports: Vec<(String, i32)> = match subset.ports.as_deref() {
                None | Some([]) => vec![(String::new(), -1)],
                Some(list) => list.iter().map(|p| (p.name.clone().unwrap_or_default(), p.port)).collect(),
            };
            for port in ports {
                expected.insert((family.to_owned(), text.clone(), port));
            }
        }
    }
    expected
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn planning_again_on_the_applied_state_writes_nothing(endpoints in arb_endpoints(), max in 1usize..8) {
        let first = plan(&endpoints, &[], max);
        let after = apply(NO_SLICES, &first);
        let second = plan(&endpoints, &after, max);
        prop_assert!(second.is_empty(), "{:#?}", second);
    }

    #[test]
    fn converges_from_an_arbitrary_earlier_mirror(before in arb_endpoints(), now in arb_endpoints(), max in 1usize..8) {
        let old = apply(NO_SLICES, &plan(&before, &[], max));
        let step = plan(&now, &old, max);
        let after = apply(&old, &step);
        prop_assert_eq!(
            mirrored_triples(&after),
            mirrored_triples(&apply(NO_SLICES, &plan(&now, &[], max)))
        );
        prop_assert!(plan(&now, &after, max).is_empty());
    }

    #[test]
    fn shuffled_subsets_and_addresses_give_the_same_slices(
        endpoints in arb_endpoints(),
        seed in any::<u64>(),
    ) {
        let mut shuffled = endpoints.clone();
        let mut rng = seed;
        let mut next = move |n: usize| { rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407); usize::try_from(rng >> 33).unwrap_or(0) % n.max(1) };
        if let Some(subsets) = shuffled.subsets.as_mut() {
            for subset in subsets.iter_mut() {
                for list in [&mut subset.addresses, &mut subset.not_ready_addresses].into_iter().flatten() {
                    for i in (1..list.len()).rev() { list.swap(i, next(i + 1)); }
                }
                if let Some(ports) = subset.ports.as_mut() { ports.reverse(); }
            }
            for i in (1..subsets.len()).rev() { subsets.swap(i, next(i + 1)); }
        }
        prop_assert_eq!(plan(&endpoints, &[], 1000), plan(&shuffled, &[], 1000));
    }

    #[test]
    fn every_valid_address_is_mirrored_exactly_once_per_port_set(endpoints in arb_endpoints()) {
        // With the default cap no address of these small inputs is dropped.
        let got = plan(&endpoints, &[], 1000);
        let triples = mirrored_triples(&got.create);
        let mut seen = BTreeSet::new();
        for (family, ip, ports) in &triples {
            prop_assert!(seen.insert((family.clone(), ip.clone(), ports.clone())), "duplicate {ip}");
        }
        // Every (address, real port) pair of the input is mirrored; a port-less
        // subset's addresses may merge into a subset with ports (repacking), so
        // for them only presence is checked.
        let mut flattened = BTreeSet::new();
        let mut present = BTreeSet::new();
        for (family, ip, ports) in triples {
            present.insert((family.clone(), ip.clone()));
            for port in ports {
                flattened.insert((family.clone(), ip.clone(), port));
            }
        }
        let expected = expected_triples(&endpoints);
        let expected_present: BTreeSet<(String, String)> =
            expected.iter().map(|(f, ip, _)| (f.clone(), ip.clone())).collect();
        let expected_ported: BTreeSet<(String, String, (String, i32))> =
            expected.into_iter().filter(|(_, _, (_, p))| *p > 0).collect();
        prop_assert_eq!(flattened, expected_ported);
        prop_assert_eq!(present, expected_present);
        let invalid = endpoints.subsets.iter().flatten()
            .flat_map(|s| s.addresses.iter().flatten().chain(s.not_ready_addresses.iter().flatten()))
            .filter(|a| a.ip == "not-an-ip")
            .count();
        // Counted per repacked subset, as upstream: an invalid address backing two
        // port groups is reported twice, so only presence is compared.
        let warned = got.warnings.iter().any(|w| w.reason == REASON_INVALID_IP_ADDRESS);
        prop_assert_eq!(warned, invalid > 0);
    }

    #[test]
    fn no_slice_exceeds_the_cap(endpoints in arb_endpoints(), max in 1usize..5) {
        let got = plan(&endpoints, &[], max);
        for slice in &got.create {
            let count = slice.endpoints.as_ref().map_or(0, Vec::len);
            prop_assert!(count >= 1 && count <= max);
        }
    }
}
