//! Planner tests: named cases mirroring upstream `reconciler_test.go` (with their
//! write counts) and property tests over random Pods and prior states.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::jiff::Timestamp;
use proptest::prelude::*;

use super::meta::build_slice;
use super::*;
use crate::ip::IpFamily;
use crate::labels::{HEADLESS, LAST_CHANGE_TRIGGER_TIME, MANAGED_BY, SERVICE_NAME};
use crate::plan::{NO_SLICES, applied as apply_plan};
use crate::pod::{find_port, is_pod_ready, is_terminating, pod_ips_of_family};
use crate::slice_keys::{EndpointIdentity, PortSet};
use crate::stored_pod::StoredPod;

const NS: &str = "test";
const SVC_UID: &str = "svc-uid";

fn mk_service(name: &str) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(NS.into()),
            uid: Some(SVC_UID.into()),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            selector: Some(BTreeMap::from([("app".into(), "web".into())])),
            cluster_ip: Some("10.96.0.10".into()),
            ip_families: Some(vec!["IPv4".into()]),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: 80,
                protocol: Some("TCP".into()),
                target_port: Some(IntOrString::Int(8080)),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        status: None,
    }
}

fn mk_pod(i: usize, ready: bool) -> StoredPod {
    let ips = vec![format!("10.1.{}.{}", i / 250, i % 250 + 1)];
    mk_pod_with_ips(i, ready, ips)
}

fn mk_pod_with_ips(i: usize, ready: bool, ips: Vec<String>) -> StoredPod {
    crate::test_pods::stored(crate::test_pods::TestPod {
        name: format!("pod{i}"),
        namespace: NS,
        uid: Some(format!("uid-{i}")),
        resource_version: None,
        labels: &[("app", "web")],
        node: "node-1",
        container: "main",
        port: ("http", 8080),
        ips,
        phase: "Running",
        ready,
    })
}

fn mk_pods(n: usize) -> Vec<Arc<StoredPod>> {
    (0..n).map(|i| Arc::new(mk_pod(i, i % 3 != 0))).collect()
}

fn mk_nodes() -> BTreeMap<String, NodeInfo> {
    BTreeMap::from([("node-1".to_owned(), NodeInfo { zone: Some("zone-a".into()), ..NodeInfo::default() })])
}

fn arcs(slices: Vec<EndpointSlice>) -> Vec<Arc<EndpointSlice>> {
    slices.into_iter().map(Arc::new).collect()
}

fn plan(svc: &Service, pods: &[Arc<StoredPod>], existing: &[Arc<EndpointSlice>]) -> Plan<EndpointSlice> {
    plan_slices(Some(svc), pods, &mk_nodes(), existing, None, &SliceConfig::default())
}

/// (creates, updates, deletes), as upstream tests count client actions.
fn writes(plan: &Plan<EndpointSlice>) -> (usize, usize, usize) {
    (plan.create.len(), plan.update.len(), plan.delete.len())
}

/// Plans from nothing and applies: the state a first sync leaves.
fn synced(svc: &Service, pods: &[Arc<StoredPod>]) -> Vec<Arc<EndpointSlice>> {
    arcs(apply_plan(NO_SLICES, &plan(svc, pods, &[])))
}

/// A named slice of `svc` holding the given Pods' endpoints, as a prior sync wrote it.
fn mk_slice(name: &str, svc: &Service, pods: &[Arc<StoredPod>]) -> Arc<EndpointSlice> {
    let ports =
        super::desired::endpoint_ports(svc, &crate::eligibility::for_slices(svc, &pods[0], true).ports);
    let mut slice = build_slice(svc, &ports, IpFamily::V4, &SliceConfig::default().managed_by);
    slice.metadata.name = Some(name.into());
    let nodes = mk_nodes();
    let refs: Vec<&StoredPod> = pods.iter().map(Arc::as_ref).collect();
    let groups = super::desired::desired_groups(svc, &refs, &nodes, IpFamily::V4, &mut Default::default());
    slice.endpoints = Some(groups.into_values().flat_map(|g| g.endpoints.into_values()).collect());
    Arc::new(slice)
}

fn sorted_lengths(slices: &[EndpointSlice]) -> Vec<usize> {
    let mut lengths: Vec<usize> = slices.iter().map(|s| s.endpoints.as_ref().map_or(0, Vec::len)).collect();
    lengths.sort_unstable();
    lengths
}

fn endpoints_of(slices: &[EndpointSlice]) -> Vec<&Endpoint> {
    slices.iter().flat_map(|s| s.endpoints.iter().flatten()).collect()
}

#[test]
fn service_without_pods_gets_one_placeholder_slice() {
    let svc = mk_service("foo");
    let plan = plan(&svc, &[], &[]);
    assert_eq!(writes(&plan), (1, 0, 0));
    let slice = &plan.create[0];
    assert_eq!(slice.endpoints.as_deref(), Some(&[][..]));
    assert_eq!(slice.ports.as_deref(), Some(&[][..]));
    assert_eq!(slice.metadata.generate_name.as_deref(), Some("foo-"));
    assert_eq!(slice.address_type, "IPv4");
}

#[test]
fn existing_placeholder_is_kept_without_writes() {
    let svc = mk_service("foo");
    let state = synced(&svc, &[]);
    assert!(plan(&svc, &[], &state).is_empty());
}

#[test]
fn placeholder_of_a_recreated_service_is_kept_because_owner_refs_are_not_compared() {
    let svc = mk_service("foo");
    let state = synced(&svc, &[]);
    let mut recreated = svc.clone();
    recreated.metadata.uid = Some("new-uid".into());
    assert!(plan(&recreated, &[], &state).is_empty());
}

#[test]
fn one_ready_pod_gets_a_full_endpoint() {
    let svc = mk_service("foo");
    let pods = vec![Arc::new(mk_pod(1, true))];
    let plan = plan(&svc, &pods, &[]);
    assert_eq!(writes(&plan), (1, 0, 0));
    let slice = &plan.create[0];
    let labels = slice.metadata.labels.as_ref().unwrap();
    assert_eq!(labels.get(SERVICE_NAME).map(String::as_str), Some("foo"));
    assert_eq!(labels.get(MANAGED_BY).map(String::as_str), Some(crate::labels::SVCPLANE_SLICE_CONTROLLER));
    assert!(!labels.contains_key(HEADLESS));
    let owner = &slice.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!((owner.kind.as_str(), owner.uid.as_str()), ("Service", SVC_UID));
    assert_eq!((owner.controller, owner.block_owner_deletion), (Some(true), Some(true)));
    let port = &slice.ports.as_ref().unwrap()[0];
    assert_eq!(
        (port.name.as_deref(), port.port, port.protocol.as_deref()),
        (Some("http"), Some(8080), Some("TCP"))
    );
    let endpoint = &slice.endpoints.as_ref().unwrap()[0];
    assert_eq!(endpoint.addresses, ["10.1.0.2"]);
    let conditions = endpoint.conditions.as_ref().unwrap();
    assert_eq!(
        (conditions.ready, conditions.serving, conditions.terminating),
        (Some(true), Some(true), Some(false))
    );
    assert_eq!(endpoint.node_name.as_deref(), Some("node-1"));
    assert_eq!(endpoint.zone.as_deref(), Some("zone-a"));
    assert_eq!(endpoint.hostname, None);
    assert_eq!(endpoint.hints, None);
    let target = endpoint.target_ref.as_ref().unwrap();
    assert_eq!(
        (target.kind.as_deref(), target.name.as_deref(), target.uid.as_deref()),
        (Some("Pod"), Some("pod1"), Some("uid-1"))
    );
    assert_eq!(plan.endpoints.added, 1);
}

#[test]
fn conditions_follow_readiness_termination_and_publish_not_ready() {
    let cases = [
        // (ready, terminating, pnra) -> (ready, serving, terminating)
        ((true, false, false), (true, true, false)),
        ((false, false, false), (false, false, false)),
        ((true, true, false), (false, true, true)),
        ((false, true, false), (false, false, true)),
        ((false, false, true), (true, false, false)),
        ((true, true, true), (true, true, true)),
    ];
    for ((ready, terminating, pnra), expected) in cases {
        let mut svc = mk_service("foo");
        svc.spec.as_mut().unwrap().publish_not_ready_addresses = Some(pnra);
        let mut pod = mk_pod(1, ready);
        if terminating {
            pod.metadata.deletion_timestamp = Some(Time(Timestamp::UNIX_EPOCH));
        }
        let plan = plan(&svc, &[Arc::new(pod)], &[]);
        let c = plan.create[0].endpoints.as_ref().unwrap()[0].conditions.clone().unwrap();
        let got = (c.ready.unwrap(), c.serving.unwrap(), c.terminating.unwrap());
        assert_eq!(got, expected, "ready={ready} terminating={terminating} pnra={pnra}");
    }
}

#[test]
fn terminal_ipless_and_unselected_pods_are_not_endpoints() {
    let svc = mk_service("foo");
    let mut failed = mk_pod(1, true);
    failed.status.as_mut().unwrap().phase = Some("Succeeded".into());
    let ipless = mk_pod_with_ips(2, true, vec![]);
    let mut other_app = mk_pod(3, true);
    other_app.metadata.labels = Some(BTreeMap::from([("app".into(), "db".into())]));
    let mut other_ns = mk_pod(4, true);
    other_ns.metadata.namespace = Some("elsewhere".into());
    let pods: Vec<Arc<StoredPod>> =
        [failed, ipless, other_app, other_ns, mk_pod(5, true)].into_iter().map(Arc::new).collect();
    let plan = plan(&svc, &pods, &[]);
    let names: Vec<_> = endpoints_of(&plan.create)
        .iter()
        .map(|e| e.target_ref.as_ref().unwrap().name.clone().unwrap())
        .collect();
    assert_eq!(names, ["pod5"]);
}

#[test]
fn pod_on_a_missing_node_is_skipped_unless_publish_not_ready() {
    let mut svc = mk_service("foo");
    let mut lost = mk_pod(1, true);
    lost.spec.as_mut().unwrap().node_name = Some("gone".into());
    let pods = vec![Arc::new(lost), Arc::new(mk_pod(2, true))];
    let skipped = plan(&svc, &pods, &[]);
    assert_eq!(endpoints_of(&skipped.create).len(), 1);
    assert_eq!(skipped.retry.as_deref(), Some("skipped Pods on Nodes that do not exist: pod1 (node gone)"));
    svc.spec.as_mut().unwrap().publish_not_ready_addresses = Some(true);
    let kept = plan(&svc, &pods, &[]);
    let endpoints = endpoints_of(&kept.create);
    assert_eq!(endpoints.len(), 2);
    assert!(endpoints.iter().any(|e| e.node_name.as_deref() == Some("gone") && e.zone.is_none()));
    assert_eq!(kept.retry, None);
}

#[test]
fn hostname_is_set_only_for_the_subdomain_service() {
    let svc = mk_service("foo");
    let mut pod = mk_pod(1, true);
    let spec = pod.spec.as_mut().unwrap();
    spec.hostname = Some("db-0".into());
    spec.subdomain = Some("foo".into());
    let mut other = mk_pod(2, true);
    let spec = other.spec.as_mut().unwrap();
    spec.hostname = Some("db-1".into());
    spec.subdomain = Some("bar".into());
    let plan = plan(&svc, &[Arc::new(pod), Arc::new(other)], &[]);
    let hostnames: BTreeMap<_, _> = endpoints_of(&plan.create)
        .iter()
        .map(|e| (e.target_ref.as_ref().unwrap().name.clone().unwrap(), e.hostname.clone()))
        .collect();
    assert_eq!(hostnames["pod1"].as_deref(), Some("db-0"));
    assert_eq!(hostnames["pod2"], None);
}

#[test]
fn headless_service_without_ports_is_stable_and_labelled() {
    let mut svc = mk_service("foo");
    let spec = svc.spec.as_mut().unwrap();
    spec.cluster_ip = Some("None".into());
    spec.ports = None;
    let pods = mk_pods(3);
    let first = plan(&svc, &pods, &[]);
    assert_eq!(writes(&first), (1, 0, 0));
    let slice = &first.create[0];
    assert_eq!(slice.ports.as_deref(), Some(&[][..]));
    assert_eq!(slice.metadata.labels.as_ref().unwrap().get(HEADLESS).map(String::as_str), Some(""));
    let mut state = apply_plan(NO_SLICES, &first);
    // The apiserver returns an empty list as absent (kubernetes#133474).
    state[0].ports = None;
    assert!(plan(&svc, &pods, &arcs(state)).is_empty());
}

#[test]
fn many_pods_fill_three_slices() {
    // upstream TestReconcileManyPods
    let svc = mk_service("foo");
    let plan = plan(&svc, &mk_pods(250), &[]);
    assert_eq!(writes(&plan), (3, 0, 0));
    assert_eq!(sorted_lengths(&plan.create), [50, 100, 100]);
    assert_eq!((plan.endpoints.added, plan.endpoints.desired), (250, 250));
}

#[test]
fn new_endpoints_are_placed_in_numeric_address_order() {
    // Pods 0..250 get 10.1.0.1 ..= 10.1.0.250 (`mk_pod`), a Node's range handed
    // out in sequence. In string order `10.1.0.1`, `10.1.0.10`, `10.1.0.100`
    // come first and each slice would hold Pods from all over the range.
    let svc = mk_service("foo");
    let slices = synced(&svc, &mk_pods(250));
    let mut ranges: Vec<(u32, u32)> = slices
        .iter()
        .map(|slice| {
            let last_octets: Vec<u32> = slice
                .endpoints
                .iter()
                .flatten()
                .map(|e| e.addresses[0].rsplit('.').next().unwrap().parse().unwrap())
                .collect();
            assert!(last_octets.is_sorted(), "placed in order within a slice: {last_octets:?}");
            (last_octets[0], *last_octets.last().unwrap())
        })
        .collect();
    ranges.sort_unstable();
    assert_eq!(ranges, [(1, 100), (101, 200), (201, 250)]);
}

#[test]
fn some_preexisting_slices_get_one_filled_and_one_created() {
    // upstream TestReconcileEndpointSlicesSomePreexisting
    let svc = mk_service("foo");
    let pods = mk_pods(250);
    let first: Vec<_> = (1..246).step_by(4).map(|i| pods[i].clone()).collect();
    let second: Vec<_> = (3..246).step_by(4).map(|i| pods[i].clone()).collect();
    let existing = vec![mk_slice("foo-1", &svc, &first), mk_slice("foo-2", &svc, &second)];
    let plan = plan(&svc, &pods, &existing);
    assert_eq!(writes(&plan), (1, 1, 0));
    assert_eq!(plan.update[0].metadata.name.as_deref(), Some("foo-1"));
    let state = apply_plan(&existing, &plan);
    assert_eq!(sorted_lengths(&state), [61, 89, 100]);
    assert_eq!((plan.endpoints.added, plan.endpoints.removed), (127, 0));
}

#[test]
fn worse_allocation_is_not_rebalanced() {
    // upstream TestReconcileEndpointSlicesSomePreexistingWorseAllocation
    let svc = mk_service("foo");
    let pods = mk_pods(300);
    let first: Vec<_> = (1..296).step_by(4).map(|i| pods[i].clone()).collect();
    let second: Vec<_> = (3..296).step_by(4).map(|i| pods[i].clone()).collect();
    let existing = vec![mk_slice("foo-1", &svc, &first), mk_slice("foo-2", &svc, &second)];
    let plan = plan(&svc, &pods, &existing);
    assert_eq!(writes(&plan), (2, 0, 0));
    assert_eq!(sorted_lengths(&apply_plan(&existing, &plan)), [52, 74, 74, 100]);
}

#[test]
fn small_remainder_goes_to_a_new_slice_when_no_unchanged_slice_fits() {
    // research §5.3 example: 95 unchanged + 10 new -> a new slice of 10
    let svc = mk_service("foo");
    let pods = mk_pods(105);
    let existing = vec![mk_slice("foo-1", &svc, &pods[..95])];
    let plan = plan(&svc, &pods, &existing);
    assert_eq!(writes(&plan), (1, 0, 0));
    assert_eq!(sorted_lengths(&plan.create), [10]);
}

#[test]
fn removed_and_added_pod_update_the_same_slice() {
    let svc = mk_service("foo");
    let pods = mk_pods(101);
    let existing = vec![mk_slice("foo-1", &svc, &pods[..100])];
    let plan = plan(&svc, &pods[1..], &existing);
    assert_eq!(writes(&plan), (0, 1, 0));
    assert_eq!(sorted_lengths(&plan.update), [100]);
    assert_eq!((plan.endpoints.added, plan.endpoints.removed), (1, 1));
}

#[test]
fn changed_endpoints_are_updated_and_fuller_slice_takes_new_ones() {
    // upstream TestReconcileEndpointSlicesUpdatePacking
    let svc = mk_service("foo");
    let mut pods: Vec<Arc<StoredPod>> = (0..80).chain(100..120).map(|i| Arc::new(mk_pod(i, true))).collect();
    let existing = vec![mk_slice("foo-1", &svc, &pods[..80]), mk_slice("foo-2", &svc, &pods[80..])];
    for (i, pod) in pods.iter_mut().enumerate() {
        if i % 10 == 0 {
            *pod = Arc::new(mk_pod(if i < 80 { i } else { i + 20 }, false));
        }
    }
    pods.extend((200..215).map(|i| Arc::new(mk_pod(i, true))));
    let plan = plan(&svc, &pods, &existing);
    assert_eq!(writes(&plan), (0, 2, 0));
    assert_eq!(sorted_lengths(&apply_plan(&existing, &plan)), [20, 95]);
}

#[test]
fn emptied_slices_are_recycled_into_updates() {
    // upstream TestReconcileEndpointSlicesRecycling: 10 slices of 30, then a new
    // target port moves every Pod to a new port set.
    let mut svc = mk_service("foo");
    let pods = mk_pods(300);
    let existing: Vec<_> =
        (0..10).map(|n| mk_slice(&format!("foo-{n}"), &svc, &pods[n * 30..(n + 1) * 30])).collect();
    assert!(plan(&svc, &pods, &existing).is_empty());
    svc.spec.as_mut().unwrap().ports.as_mut().unwrap()[0].target_port = Some(IntOrString::Int(81));
    let plan = plan(&svc, &pods, &existing);
    assert_eq!(writes(&plan), (0, 3, 7));
    let state = apply_plan(&existing, &plan);
    assert_eq!(sorted_lengths(&state), [100, 100, 100]);
    assert!(state.iter().all(|s| s.ports.as_ref().unwrap()[0].port == Some(81)));
}

#[test]
fn service_label_changes_update_every_slice_and_reserved_labels_are_ignored() {
    // upstream TestReconcileEndpointSlicesServicesLabelsUpdating / ReservedLabels
    let mut svc = mk_service("foo");
    let pods = mk_pods(250);
    let state = synced(&svc, &pods);
    svc.metadata.labels = Some(BTreeMap::from([(SERVICE_NAME.into(), "other".into())]));
    assert!(plan(&svc, &pods, &state).is_empty());
    svc.metadata.labels =
        Some(BTreeMap::from([("team".into(), "a".into()), (SERVICE_NAME.into(), "other".into())]));
    let plan = plan(&svc, &pods, &state);
    assert_eq!(writes(&plan), (0, 3, 0));
    for slice in &plan.update {
        let labels = slice.metadata.labels.as_ref().unwrap();
        assert_eq!(labels.get("team").map(String::as_str), Some("a"));
        assert_eq!(labels.get(SERVICE_NAME).map(String::as_str), Some("foo"));
    }
}

#[test]
fn user_label_on_a_slice_is_removed() {
    let svc = mk_service("foo");
    let pods = mk_pods(3);
    let mut state = apply_plan(NO_SLICES, &plan(&svc, &pods, &[]));
    state[0].metadata.labels.as_mut().unwrap().insert("mine".into(), "x".into());
    let plan = plan(&svc, &pods, &arcs(state));
    assert_eq!(writes(&plan), (0, 1, 0));
    assert!(!plan.update[0].metadata.labels.as_ref().unwrap().contains_key("mine"));
}

#[test]
fn slices_of_a_deleted_service_with_the_same_name_are_replaced() {
    // upstream TestReconcileEndpointSlicesRecreation
    let svc = mk_service("foo");
    let pods = mk_pods(3);
    let state = synced(&svc, &pods);
    let mut recreated = svc.clone();
    recreated.metadata.uid = Some("new-uid".into());
    let plan = plan(&recreated, &pods, &state);
    // Not owned: deleted, and not recyclable into the new Service's slice.
    assert_eq!(writes(&plan), (1, 0, 1));
}

#[test]
fn named_ports_resolving_to_different_numbers_make_separate_slices() {
    // upstream TestReconcileEndpointSlicesNamedPorts
    let mut svc = mk_service("named-port-example");
    svc.spec.as_mut().unwrap().ports = Some(vec![ServicePort {
        port: 80,
        protocol: Some("TCP".into()),
        target_port: Some(IntOrString::String("http".into())),
        ..Default::default()
    }]);
    let pods: Vec<Arc<StoredPod>> = (0..300)
        .map(|i| {
            let mut pod = mk_pod(i, i % 3 != 0);
            let port = &mut pod.spec.as_mut().unwrap().containers[0].ports.as_mut().unwrap()[0];
            port.container_port = 8080 + (i % 5) as i32;
            Arc::new(pod)
        })
        .collect();
    let plan = plan(&svc, &pods, &[]);
    assert_eq!(writes(&plan), (5, 0, 0));
    assert_eq!(sorted_lengths(&plan.create), [60, 60, 60, 60, 60]);
    let mut ports: Vec<i32> =
        plan.create.iter().map(|s| s.ports.as_ref().unwrap()[0].port.unwrap()).collect();
    ports.sort_unstable();
    assert_eq!(ports, [8080, 8081, 8082, 8083, 8084]);
    assert!(plan.create.iter().all(|s| s.ports.as_ref().unwrap()[0].name.as_deref() == Some("")));
}

#[test]
fn pod_without_the_named_port_lands_in_the_empty_port_set() {
    let mut svc = mk_service("foo");
    svc.spec.as_mut().unwrap().ports.as_mut().unwrap()[0].target_port =
        Some(IntOrString::String("grpc".into()));
    let plan = plan(&svc, &mk_pods(2), &[]);
    assert_eq!(writes(&plan), (1, 0, 0));
    assert_eq!(plan.create[0].ports.as_deref(), Some(&[][..]));
    assert_eq!(plan.create[0].endpoints.as_ref().unwrap().len(), 2);
}

#[test]
fn max_endpoints_per_slice_is_respected() {
    // upstream TestReconcileMaxEndpointsPerSlice
    let svc = mk_service("foo");
    let pods = mk_pods(250);
    for (max, expected) in [(50, vec![50; 5]), (80, vec![10, 80, 80, 80]), (1000, vec![250])] {
        let config = SliceConfig { max_endpoints_per_slice: max, ..SliceConfig::default() };
        let plan = plan_slices(Some(&svc), &pods, &mk_nodes(), &[], None, &config);
        assert_eq!(sorted_lengths(&plan.create), expected, "max {max}");
    }
}

#[test]
fn dual_stack_service_gets_one_slice_per_family() {
    let mut svc = mk_service("foo");
    svc.spec.as_mut().unwrap().ip_families = Some(vec!["IPv4".into(), "IPv6".into()]);
    let pods: Vec<Arc<StoredPod>> = (0..3)
        .map(|i| {
            let ips = vec![format!("10.0.0.{i}"), format!("fd00::{i}")];
            Arc::new(mk_pod_with_ips(i, true, ips))
        })
        .collect();
    let plan = plan(&svc, &pods, &[]);
    assert_eq!(writes(&plan), (2, 0, 0));
    let types: Vec<_> = plan.create.iter().map(|s| s.address_type.as_str()).collect();
    assert_eq!(types, ["IPv4", "IPv6"]);
    assert_eq!(plan.create[1].endpoints.as_ref().unwrap()[0].addresses, ["fd00::"]);
}

#[test]
fn dual_stack_service_with_ipv4_pods_gets_an_ipv6_placeholder() {
    let mut svc = mk_service("foo");
    svc.spec.as_mut().unwrap().ip_families = Some(vec!["IPv4".into(), "IPv6".into()]);
    let plan = plan(&svc, &mk_pods(3), &[]);
    assert_eq!(writes(&plan), (2, 0, 0));
    let v6 = &plan.create[1];
    assert_eq!(v6.address_type, "IPv6");
    assert_eq!(v6.ports.as_deref(), Some(&[][..]));
    assert_eq!(v6.endpoints.as_deref(), Some(&[][..]));
}

#[test]
fn single_stack_downgrade_deletes_the_removed_family() {
    let mut svc = mk_service("foo");
    svc.spec.as_mut().unwrap().ip_families = Some(vec!["IPv4".into(), "IPv6".into()]);
    let pods = mk_pods(3);
    let state = synced(&svc, &pods);
    svc.spec.as_mut().unwrap().ip_families = Some(vec!["IPv4".into()]);
    let plan = plan(&svc, &pods, &state);
    assert_eq!(writes(&plan), (0, 0, 1));
    assert_eq!(plan.delete[0].address_type, "IPv6");
}

#[test]
fn legacy_service_without_ip_families_uses_cluster_ip_or_both_when_headless() {
    let mut svc = mk_service("foo");
    let spec = svc.spec.as_mut().unwrap();
    spec.ip_families = None;
    spec.cluster_ip = Some("fd00::10".into());
    assert_eq!(service_address_families(&svc), [IpFamily::V6]);
    svc.spec.as_mut().unwrap().cluster_ip = Some("None".into());
    assert_eq!(service_address_families(&svc), [IpFamily::V4, IpFamily::V6]);
}

#[test]
fn selectorless_and_external_name_services_are_left_alone_by_default() {
    let svc = mk_service("foo");
    let pods = mk_pods(3);
    let state = synced(&svc, &pods);
    let mut selectorless = svc.clone();
    selectorless.spec.as_mut().unwrap().selector = None;
    // `selector: {}` is stored as nil (selector.rs): selectorless too, not "every Pod".
    let mut empty_selector = svc.clone();
    empty_selector.spec.as_mut().unwrap().selector = Some(BTreeMap::new());
    let mut external = svc.clone();
    external.spec.as_mut().unwrap().type_ = Some("ExternalName".into());
    for svc in [&selectorless, &empty_selector, &external] {
        assert!(plan(svc, &pods, &state).is_empty());
        let config = SliceConfig { delete_when_unselected: true, ..SliceConfig::default() };
        let plan = plan_slices(Some(svc), &pods, &mk_nodes(), &state, None, &config);
        assert_eq!(writes(&plan), (0, 0, 1));
    }
}

#[test]
fn slices_of_other_controllers_are_never_touched() {
    let svc = mk_service("foo");
    let mut foreign = build_slice(&svc, &[], IpFamily::V4, crate::labels::UPSTREAM_SLICE_CONTROLLER);
    foreign.metadata.name = Some("foo-kcm".into());
    let mut terminating = build_slice(&svc, &[], IpFamily::V4, &SliceConfig::default().managed_by);
    terminating.metadata.name = Some("foo-dying".into());
    terminating.metadata.deletion_timestamp = Some(Time(Timestamp::UNIX_EPOCH));
    let existing = arcs(vec![foreign, terminating]);
    let plan = plan(&svc, &mk_pods(2), &existing);
    assert_eq!(writes(&plan), (1, 0, 0));
}

#[test]
fn service_pending_deletion_gets_no_creates() {
    // upstream TestReconcilerFinalizeSvcDeletionTimestamp
    let mut svc = mk_service("foo");
    svc.metadata.deletion_timestamp = Some(Time(Timestamp::UNIX_EPOCH));
    assert!(plan(&svc, &mk_pods(3), &[]).is_empty());
}

#[test]
fn trigger_time_is_set_on_written_slices_and_removed_when_absent() {
    let svc = mk_service("foo");
    let pods = mk_pods(3);
    let at = Time(Timestamp::new(1_700_000_000, 120_000_000).unwrap());
    let config = SliceConfig::default();
    let plan1 = plan_slices(Some(&svc), &pods, &mk_nodes(), &[], Some(at), &config);
    let annotations = plan1.create[0].metadata.annotations.as_ref().unwrap();
    assert_eq!(
        annotations.get(LAST_CHANGE_TRIGGER_TIME).map(String::as_str),
        Some("2023-11-14T22:13:20.12Z")
    );
    let state = arcs(apply_plan(NO_SLICES, &plan1));
    // Annotations are not compared: nothing to write.
    assert!(plan(&svc, &pods, &state).is_empty());
    let plan2 = plan(&svc, &pods[..2], &state);
    let annotations = plan2.update[0].metadata.annotations.as_ref().unwrap();
    assert!(!annotations.contains_key(LAST_CHANGE_TRIGGER_TIME));
}

#[test]
fn zone_change_updates_the_endpoint_in_place() {
    let svc = mk_service("foo");
    let pods = mk_pods(3);
    let state = synced(&svc, &pods);
    let nodes = BTreeMap::from([(
        "node-1".to_owned(),
        NodeInfo { zone: Some("zone-b".into()), ..NodeInfo::default() },
    )]);
    let plan = plan_slices(Some(&svc), &pods, &nodes, &state, None, &SliceConfig::default());
    assert_eq!(writes(&plan), (0, 1, 0));
    assert_eq!((plan.endpoints.added, plan.endpoints.removed), (0, 0));
}

#[test]
fn prefer_close_hints_ready_endpoints_with_their_zone() {
    // upstream TestReconcile_TrafficDistribution
    let mut svc = mk_service("foo");
    let pods = mk_pods(3);
    let state = synced(&svc, &pods);
    svc.spec.as_mut().unwrap().traffic_distribution = Some("PreferClose".into());
    let plan1 = plan(&svc, &pods, &state);
    assert_eq!(writes(&plan1), (0, 1, 0));
    for endpoint in plan1.update[0].endpoints.as_ref().unwrap() {
        let ready = endpoint.conditions.as_ref().unwrap().ready == Some(true);
        let zones = endpoint.hints.as_ref().and_then(|h| h.for_zones.clone());
        assert_eq!(zones.map(|z| z[0].name.clone()), ready.then(|| "zone-a".to_owned()));
        assert!(endpoint.hints.as_ref().is_none_or(|h| h.for_nodes.is_none()));
    }
    let hinted = arcs(apply_plan(&state, &plan1));
    assert!(plan(&svc, &pods, &hinted).is_empty());
    svc.spec.as_mut().unwrap().traffic_distribution = Some("PreferSameNode".into());
    let plan2 = plan(&svc, &pods, &hinted);
    assert_eq!(writes(&plan2), (0, 1, 0));
    let ready = plan2.update[0]
        .endpoints
        .iter()
        .flatten()
        .find(|e| e.conditions.as_ref().unwrap().ready == Some(true))
        .unwrap();
    let for_nodes = ready.hints.as_ref().unwrap().for_nodes.as_ref().unwrap();
    assert_eq!(for_nodes[0].name, "node-1");
    // Removing the field removes the hints.
    svc.spec.as_mut().unwrap().traffic_distribution = None;
    let plan3 = plan(&svc, &pods, &hinted);
    assert_eq!(writes(&plan3), (0, 1, 0));
    assert!(endpoints_of(&plan3.update).iter().all(|e| e.hints.is_none()));
    // The topology annotation wins over the field; without Node CPU data it means no hints.
    let mut auto = svc.clone();
    auto.spec.as_mut().unwrap().traffic_distribution = Some("PreferClose".into());
    auto.metadata.annotations =
        Some(BTreeMap::from([("service.kubernetes.io/topology-mode".into(), "Auto".into())]));
    assert_eq!(writes(&plan(&auto, &pods, &hinted)), (0, 1, 0));
}

// ---- properties ----

/// One Pod shape the generator picks from.
#[derive(Clone, Debug)]
struct PodShape {
    ready: bool,
    terminating: bool,
    phase: &'static str,
    has_v4: bool,
    has_v6: bool,
    /// 0: declares `http` as 8080, 1: as 9090, 2: does not declare it.
    template: u8,
    node_known: bool,
}

fn pod_shape() -> impl Strategy<Value = PodShape> {
    (
        any::<bool>(),
        prop::bool::weighted(0.2),
        prop::sample::select(vec!["Running", "Running", "Running", "Pending", "Failed"]),
        prop::bool::weighted(0.9),
        any::<bool>(),
        0u8..3,
        prop::bool::weighted(0.9),
    )
        .prop_map(|(ready, terminating, phase, has_v4, has_v6, template, node_known)| PodShape {
            ready,
            terminating,
            phase,
            has_v4,
            has_v6,
            template,
            node_known,
        })
}

fn build_pod(i: usize, shape: &PodShape) -> StoredPod {
    let mut ips = Vec::new();
    if shape.has_v4 {
        ips.push(format!("10.{}.{}.{}", i / 62500, i / 250 % 250, i % 250 + 1));
    }
    if shape.has_v6 {
        ips.push(format!("fd00::{:x}", i + 1));
    }
    let mut pod = mk_pod_with_ips(i, shape.ready, ips);
    if shape.terminating {
        pod.metadata.deletion_timestamp = Some(Time(Timestamp::UNIX_EPOCH));
    }
    pod.status.as_mut().unwrap().phase = Some(shape.phase.into());
    let spec = pod.spec.as_mut().unwrap();
    match shape.template {
        0 => {}
        1 => spec.containers[0].ports.as_mut().unwrap()[0].container_port = 9090,
        _ => spec.containers[0].ports = None,
    }
    if !shape.node_known {
        spec.node_name = Some("gone".into());
    }
    pod
}

#[derive(Clone, Debug)]
struct Scenario {
    families: Vec<String>,
    pnra: bool,
    traffic: Option<String>,
    max: usize,
    /// The state before was written for another trafficDistribution and labels.
    traffic_before: Option<String>,
    team_label: Option<String>,
    before: Vec<PodShape>,
    after: Vec<PodShape>,
    seed: u64,
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (
        prop::sample::select(vec![vec!["IPv4"], vec!["IPv6"], vec!["IPv4", "IPv6"]]),
        any::<bool>(),
        prop::sample::select(vec![None, Some("PreferClose"), Some("PreferSameNode")]),
        1usize..40,
        (
            prop::sample::select(vec![None, Some("PreferSameZone"), Some("PreferSameNode")]),
            prop::option::of(prop::sample::select(vec!["a", "b"])),
        ),
        prop::collection::vec(pod_shape(), 0..120),
        prop::collection::vec(pod_shape(), 0..120),
        any::<u64>(),
    )
        .prop_map(|(families, pnra, traffic, max, (traffic_before, team), before, after, seed)| {
            Scenario {
                families: families.into_iter().map(str::to_owned).collect(),
                pnra,
                traffic: traffic.map(str::to_owned),
                max,
                traffic_before: traffic_before.map(str::to_owned),
                team_label: team.map(str::to_owned),
                before,
                after,
                seed,
            }
        })
}

fn scenario_service(s: &Scenario) -> Service {
    let mut svc = mk_service("foo");
    let spec = svc.spec.as_mut().unwrap();
    spec.ip_families = Some(s.families.clone());
    spec.publish_not_ready_addresses = Some(s.pnra);
    spec.traffic_distribution = s.traffic.clone();
    spec.ports.as_mut().unwrap()[0].target_port = Some(IntOrString::String("http".into()));
    svc
}

/// Deterministic Fisher-Yates with a tiny LCG, so shuffles are reproducible.
fn shuffled<T: Clone>(items: &[T], seed: u64) -> Vec<T> {
    let mut out = items.to_vec();
    let mut state = seed | 1;
    for i in (1..out.len()).rev() {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let j = (state >> 33) as usize % (i + 1);
        out.swap(i, j);
    }
    out
}

/// The endpoints a model of upstream's rules expects: (family, ports, pod, ready,
/// serving, terminating), built without the planner's code.
fn expected_entries(
    svc: &Service,
    pods: &[Arc<StoredPod>],
    nodes: &BTreeMap<String, NodeInfo>,
) -> Vec<String> {
    let pnra = svc.spec.as_ref().unwrap().publish_not_ready_addresses == Some(true);
    let mut entries = Vec::new();
    for family in service_address_families(svc) {
        for pod in pods {
            let phase = pod.status.as_ref().unwrap().phase.as_deref().unwrap();
            let node = pod.spec.as_ref().unwrap().node_name.clone().unwrap();
            if matches!(phase, "Failed" | "Succeeded") || (!nodes.contains_key(&node) && !pnra) {
                continue;
            }
            let ips = pod_ips_of_family(pod, family);
            if ips.is_empty() {
                continue;
            }
            let svc_port = &svc.spec.as_ref().unwrap().ports.as_ref().unwrap()[0];
            let ports = find_port(pod, svc_port).map(|p| vec![p]).unwrap_or_default();
            let serving = is_pod_ready(pod);
            let terminating = is_terminating(pod);
            let ready = pnra || (serving && !terminating);
            entries.push(format!(
                "{family} {ports:?} {} {ips:?} {ready} {serving} {terminating}",
                pod.metadata.name.as_deref().unwrap()
            ));
        }
    }
    entries.sort();
    entries
}

/// The slice ports a model of upstream's rules expects for `pod`, built without
/// the planner's code: the Service's one port with the number the Pod resolves,
/// none when it resolves none.
fn expected_ports(svc: &Service, pod: &StoredPod) -> Vec<EndpointPort> {
    let svc_port = &svc.spec.as_ref().unwrap().ports.as_ref().unwrap()[0];
    find_port(pod, svc_port)
        .map(|port| {
            vec![EndpointPort {
                name: Some(svc_port.name.clone().unwrap_or_default()),
                port: Some(port),
                protocol: Some(svc_port.protocol.clone().unwrap_or_else(|| "TCP".into())),
                app_protocol: svc_port.app_protocol.clone(),
            }]
        })
        .unwrap_or_default()
}

fn actual_entries(state: &[EndpointSlice]) -> Vec<String> {
    let mut entries = Vec::new();
    for slice in state {
        let ports: Vec<i32> = slice.ports.iter().flatten().filter_map(|p| p.port).collect();
        for e in slice.endpoints.iter().flatten() {
            let c = e.conditions.as_ref().unwrap();
            entries.push(format!(
                "{} {ports:?} {} {:?} {} {} {}",
                slice.address_type,
                e.target_ref.as_ref().unwrap().name.as_deref().unwrap(),
                e.addresses,
                c.ready.unwrap(),
                c.serving.unwrap(),
                c.terminating.unwrap()
            ));
        }
    }
    entries.sort();
    entries
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn planning_converges_to_the_desired_state_in_one_step(s in scenario()) {
        let svc = scenario_service(&s);
        let nodes = mk_nodes();
        let config = SliceConfig { max_endpoints_per_slice: s.max, ..SliceConfig::default() };
        let before: Vec<Arc<StoredPod>> = s.before.iter().enumerate().map(|(i, p)| Arc::new(build_pod(i, p))).collect();
        // Later Pods reuse some names of earlier ones (same identity, new state).
        let after: Vec<Arc<StoredPod>> = s.after.iter().enumerate().map(|(i, p)| Arc::new(build_pod(i * 2, p))).collect();
        let mut svc_before = svc.clone();
        svc_before.spec.as_mut().unwrap().traffic_distribution = s.traffic_before.clone();
        svc_before.metadata.labels =
            s.team_label.clone().map(|team| BTreeMap::from([("team".to_owned(), team)]));
        let mut state0 = apply_plan(NO_SLICES, &plan_slices(Some(&svc_before), &before, &nodes, &[], None, &config));
        // A slice of another controller for the same Service is never planned on.
        let mut foreign = build_slice(&svc, &[], IpFamily::V4, crate::labels::UPSTREAM_SLICE_CONTROLLER);
        foreign.metadata.name = Some("foo-kcm".into());
        state0.push(foreign.clone());
        let state0 = arcs(state0);

        let plan1 = plan_slices(Some(&svc), &after, &nodes, &state0, None, &config);
        let touched = plan1.create.iter().chain(&plan1.update).chain(&plan1.delete);
        prop_assert!(touched.clone().all(|sl| sl.metadata.name.as_deref() != Some("foo-kcm")));
        let mut state1 = apply_plan(&state0, &plan1);
        state1.retain(|sl| sl.metadata.name.as_deref() != Some("foo-kcm"));

        // Every eligible Pod exactly once per (family, port set), with the right conditions.
        prop_assert_eq!(actual_entries(&state1), expected_entries(&svc, &after, &nodes));
        // No slice over the limit, labels follow the Service, hints follow the field.
        for slice in &state1 {
            prop_assert!(slice.endpoints.as_ref().map_or(0, Vec::len) <= s.max);
            prop_assert!(!slice.metadata.labels.as_ref().unwrap().contains_key("team"));
            for e in slice.endpoints.iter().flatten() {
                let ready = e.conditions.as_ref().unwrap().ready == Some(true);
                let zone_hint = e.hints.as_ref().and_then(|h| h.for_zones.clone());
                if ready && s.traffic.is_some() {
                    prop_assert_eq!(zone_hint.map(|z| z[0].name.clone()), e.zone.clone());
                } else if s.traffic.is_none() {
                    prop_assert!(e.hints.is_none());
                }
            }
        }
        for family in service_address_families(&svc) {
            prop_assert!(state1.iter().any(|sl| sl.address_type == family.as_str()));
        }
        // No endpoint identity twice within a family.
        let mut keys: Vec<_> = state1.iter().flat_map(|sl| {
            sl.endpoints.iter().flatten().map(move |e| (sl.address_type.clone(), EndpointIdentity::of(e)))
        }).collect();
        let total = keys.len();
        keys.sort();
        keys.dedup();
        prop_assert_eq!(keys.len(), total);
        // Each slice holds one port set: every endpoint's Pod resolves exactly the
        // slice's ports (name, number, protocol; in any order). Addresses match
        // the slice's family.
        for slice in &state1 {
            let family = IpFamily::from_name(&slice.address_type).unwrap();
            let slice_ports = PortSet::of(slice.ports.as_deref().unwrap_or_default());
            for e in slice.endpoints.iter().flatten() {
                for a in &e.addresses {
                    prop_assert_eq!(IpFamily::of(a.parse().unwrap()), family);
                }
                let pod_name = e.target_ref.as_ref().unwrap().name.as_deref().unwrap();
                let pod = after.iter().find(|p| p.metadata.name.as_deref() == Some(pod_name)).unwrap();
                prop_assert_eq!(&PortSet::of(&expected_ports(&svc, pod)), &slice_ports, "{} in {:?}", pod_name, slice.metadata.name);
            }
        }

        // Idempotence: planning on the applied state writes nothing.
        let state1 = arcs(state1);
        let plan2 = plan_slices(Some(&svc), &after, &nodes, &state1, None, &config);
        prop_assert!(plan2.is_empty(), "second plan not empty: {:?}", (plan2.create.len(), plan2.update.len(), plan2.delete.len()));

        // Shuffled inputs give the same plan.
        let plan1_shuffled = plan_slices(
            Some(&svc),
            &shuffled(&after, s.seed),
            &nodes,
            &shuffled(&state0, s.seed.rotate_left(7)),
            None,
            &config,
        );
        prop_assert_eq!(plan1_shuffled, plan1);
    }
}

#[test]
fn topology_auto_hints_follow_the_cpu_per_zone_of_ready_nodes() {
    // Issue 18 item 4: `topology-mode: Auto` gets upstream's hints (before: removed).
    let mut svc = mk_service("foo");
    svc.metadata.annotations =
        Some(BTreeMap::from([("service.kubernetes.io/topology-mode".into(), "Auto".into())]));
    let pods: Vec<Arc<StoredPod>> = (0..4)
        .map(|i| {
            let mut pod = mk_pod(i, true);
            pod.spec.as_mut().unwrap().node_name = Some(if i < 2 { "node-1" } else { "node-2" }.into());
            Arc::new(pod)
        })
        .collect();
    let node = |zone: &str| NodeInfo {
        zone: Some(zone.into()),
        ready: true,
        allocatable_milli_cpu: 2000,
        control_plane: false,
    };
    let mut nodes =
        BTreeMap::from([("node-1".to_owned(), node("zone-a")), ("node-2".to_owned(), node("zone-b"))]);
    let first = plan_slices(Some(&svc), &pods, &nodes, &[], None, &SliceConfig::default());
    assert!(first.warnings.is_empty(), "{:?}", first.warnings);
    for endpoint in endpoints_of(&first.create) {
        let zones = endpoint.hints.as_ref().and_then(|h| h.for_zones.clone()).unwrap();
        assert_eq!(Some(&zones[0].name), endpoint.zone.as_ref());
    }
    let state = arcs(apply_plan(NO_SLICES, &first));
    assert!(plan_slices(Some(&svc), &pods, &nodes, &state, None, &SliceConfig::default()).is_empty());
    // One zone's Node not ready: one zone left, hints removed with upstream's reason.
    nodes.get_mut("node-2").unwrap().ready = false;
    let removed = plan_slices(Some(&svc), &pods, &nodes, &state, None, &SliceConfig::default());
    assert_eq!(writes(&removed), (0, 1, 0));
    assert!(endpoints_of(&removed.update).iter().all(|e| e.hints.is_none()));
    assert_eq!(removed.warnings[0].reason, "TopologyAwareHintsDisabled");
    // The deprecated annotation wins over the current one.
    svc.metadata
        .annotations
        .as_mut()
        .unwrap()
        .insert("service.kubernetes.io/topology-aware-hints".into(), "disabled".into());
    nodes.get_mut("node-2").unwrap().ready = true;
    let disabled = plan_slices(Some(&svc), &pods, &nodes, &state, None, &SliceConfig::default());
    assert!(disabled.warnings.is_empty());
    assert!(endpoints_of(&disabled.update).iter().all(|e| e.hints.is_none()));
    assert_eq!(writes(&disabled), (0, 1, 0));
}
