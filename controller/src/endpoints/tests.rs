//! Table and property tests of the Endpoints planner. Named cases follow upstream's
//! `endpoints_controller_test.go` (`TestSyncEndpoints*`, `TestSyncServiceOverCapacity`,
//! `TestPodToEndpointAddressForService`, `TestLastTriggerChangeTimeAnnotation*`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{
    EndpointAddress, EndpointPort, EndpointSubset, Endpoints, ObjectReference, Service, ServicePort,
    ServiceSpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::jiff::Timestamp;
use proptest::prelude::*;

use super::*;
use crate::ip;
use crate::stored_pod::StoredPod;

/// The planner for the Endpoints of the test Service `NS/NAME`.
fn desired_endpoints(
    svc: Option<&Service>,
    pods: &[Arc<StoredPod>],
    trigger_time: Option<Time>,
    existing: Option<&Endpoints>,
) -> Plan<Endpoints> {
    super::desired_endpoints(
        &Key { namespace: NS.into(), name: NAME.into() },
        svc,
        pods,
        trigger_time,
        existing,
    )
}

/// The plan that writes nothing.
fn nothing() -> Plan<Endpoints> {
    Plan::default()
}

const NS: &str = "default";
const NAME: &str = "foo";

fn svc_port(name: &str, port: i32, target: IntOrString, protocol: &str) -> ServicePort {
    ServicePort {
        name: Some(name.to_owned()),
        port,
        target_port: Some(target),
        protocol: Some(protocol.to_owned()),
        ..ServicePort::default()
    }
}

fn mk_service(selector: Option<&[(&str, &str)]>, ports: Vec<ServicePort>) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some(NAME.to_owned()),
            namespace: Some(NS.to_owned()),
            ..ObjectMeta::default()
        },
        spec: Some(ServiceSpec {
            selector: selector
                .map(|pairs| pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()),
            ports: Some(ports),
            cluster_ip: Some("10.96.0.10".to_owned()),
            ip_families: Some(vec!["IPv4".to_owned()]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

fn selected_service() -> Service {
    mk_service(Some(&[("foo", "bar")]), vec![svc_port("", 80, IntOrString::Int(8080), "TCP")])
}

struct PodSpecArgs {
    ready: bool,
    phase: &'static str,
    ips: Vec<String>,
}

fn mk_pod(n: usize, args: PodSpecArgs) -> StoredPod {
    crate::test_pods::stored(crate::test_pods::TestPod {
        name: format!("pod{n}"),
        namespace: NS,
        uid: Some(format!("uid{n}")),
        resource_version: Some("1"),
        labels: &[("foo", "bar")],
        node: "node-1",
        container: "c",
        port: ("port-name", 8080),
        ips: args.ips,
        phase: args.phase,
        ready: args.ready,
    })
}

fn ready_pod(n: usize) -> StoredPod {
    mk_pod(n, PodSpecArgs { ready: true, phase: "Running", ips: vec![format!("1.2.3.{}", 4 + n)] })
}

fn not_ready_pod(n: usize) -> StoredPod {
    mk_pod(n, PodSpecArgs { ready: false, phase: "Running", ips: vec![format!("1.2.3.{}", 4 + n)] })
}

fn arcs(pods: Vec<StoredPod>) -> Vec<Arc<StoredPod>> {
    pods.into_iter().map(Arc::new).collect()
}

fn pod_address(n: usize) -> EndpointAddress {
    EndpointAddress {
        ip: format!("1.2.3.{}", 4 + n),
        hostname: None,
        node_name: Some("node-1".to_owned()),
        target_ref: Some(ObjectReference {
            kind: Some("Pod".to_owned()),
            namespace: Some(NS.to_owned()),
            name: Some(format!("pod{n}")),
            uid: Some(format!("uid{n}")),
            ..ObjectReference::default()
        }),
    }
}

fn tcp(name: &str, port: i32) -> EndpointPort {
    EndpointPort { name: Some(name.to_owned()), port, protocol: Some("TCP".to_owned()), app_protocol: None }
}

fn mk_endpoints(subsets: Option<Vec<EndpointSubset>>) -> Endpoints {
    Endpoints {
        metadata: ObjectMeta {
            name: Some(NAME.to_owned()),
            namespace: Some(NS.to_owned()),
            resource_version: Some("1".to_owned()),
            labels: Some(BTreeMap::from([(
                labels::ENDPOINTS_MANAGED_BY.to_owned(),
                labels::UPSTREAM_ENDPOINTS_CONTROLLER.to_owned(),
            )])),
            ..ObjectMeta::default()
        },
        subsets,
    }
}

fn written(plan: Plan<Endpoints>) -> Endpoints {
    match (plan.create.as_slice(), plan.update.as_slice(), plan.delete.as_slice()) {
        ([e], [], []) | ([], [e], []) => e.clone(),
        _ => panic!("expected one create or update, got {plan:?}"),
    }
}

/// The stored object after the apiserver accepted a write.
fn store(plan: Plan<Endpoints>) -> Endpoints {
    let mut stored = written(plan);
    stored.metadata.resource_version = Some("2".to_owned());
    stored
}

#[test]
fn service_not_found_deletes_the_endpoints() {
    let existing = mk_endpoints(None);
    for existing in [Some(&existing), None] {
        let plan = desired_endpoints(None, &[], None, existing);
        let deleted: Vec<_> = plan
            .delete
            .iter()
            .map(|e| (e.metadata.namespace.as_deref(), e.metadata.name.as_deref()))
            .collect();
        assert_eq!(deleted, [(Some(NS), Some(NAME))]);
        assert!(plan.create.is_empty() && plan.update.is_empty());
    }
}

#[test]
fn selectorless_and_external_name_services_are_never_touched() {
    let existing = mk_endpoints(Some(vec![EndpointSubset {
        addresses: Some(vec![pod_address(9)]),
        not_ready_addresses: None,
        ports: Some(vec![tcp("", 1000)]),
    }]));
    let selectorless = mk_service(None, vec![svc_port("", 80, IntOrString::Int(8080), "TCP")]);
    let mut external = selected_service();
    if let Some(spec) = external.spec.as_mut() {
        spec.type_ = Some("ExternalName".to_owned());
    }
    let pods = arcs(vec![ready_pod(0)]);
    for svc in [&selectorless, &external] {
        assert_eq!(desired_endpoints(Some(svc), &pods, None, Some(&existing)), nothing());
        assert_eq!(desired_endpoints(Some(svc), &pods, None, None), nothing());
    }
}

#[test]
fn existing_nil_or_empty_subsets_with_no_pods_write_nothing() {
    let svc = mk_service(Some(&[("foo", "bar")]), vec![svc_port("", 80, IntOrString::Int(80), "TCP")]);
    for subsets in [None, Some(vec![])] {
        let existing = mk_endpoints(subsets);
        assert_eq!(desired_endpoints(Some(&svc), &[], None, Some(&existing)), nothing());
    }
}

#[test]
fn new_endpoints_without_pods_are_created_empty() {
    let got = written(desired_endpoints(Some(&selected_service()), &[], None, None));
    assert_eq!(got.subsets, None);
    assert_eq!(got.metadata.name.as_deref(), Some(NAME));
    assert_eq!(got.metadata.resource_version, None);
}

#[test]
fn a_pod_resource_version_change_alone_writes_nothing() {
    let svc = selected_service();
    let pods = arcs(vec![ready_pod(0)]);
    let mut existing = store(desired_endpoints(Some(&svc), &pods, None, None));
    if let Some(subsets) = existing.subsets.as_mut()
        && let Some(addresses) = subsets[0].addresses.as_mut()
        && let Some(target) = addresses[0].target_ref.as_mut()
    {
        target.resource_version = Some("42".to_owned());
    }
    assert_eq!(desired_endpoints(Some(&svc), &pods, None, Some(&existing)), nothing());
}

#[test]
fn each_protocol_is_copied_to_the_endpoint_port() {
    for protocol in ["TCP", "UDP", "SCTP"] {
        let svc =
            mk_service(Some(&[("foo", "bar")]), vec![svc_port("", 80, IntOrString::Int(8080), protocol)]);
        let got = written(desired_endpoints(Some(&svc), &arcs(vec![ready_pod(0)]), None, None));
        let subsets = got.subsets.unwrap_or_default();
        assert_eq!(subsets[0].ports.as_ref().map(|p| p[0].protocol.clone()), Some(Some(protocol.to_owned())));
    }
}

#[test]
fn one_port_number_with_two_protocols_yields_two_ports_in_one_subset() {
    let svc = mk_service(
        Some(&[("foo", "bar")]),
        vec![
            svc_port("dns-tcp", 53, IntOrString::Int(53), "TCP"),
            svc_port("dns-udp", 53, IntOrString::Int(53), "UDP"),
        ],
    );
    let got = written(desired_endpoints(Some(&svc), &arcs(vec![ready_pod(0)]), None, None));
    let subsets = got.subsets.unwrap_or_default();
    assert_eq!(subsets.len(), 1);
    assert_eq!(subsets[0].ports.as_ref().map(Vec::len), Some(2));
}

#[test]
fn an_empty_selector_is_no_selector_and_the_endpoints_are_left_alone() {
    // The apiserver stores `selector: {}` as nil (selector.rs), which upstream's
    // syncService returns early on.
    let svc = mk_service(Some(&[]), vec![svc_port("", 80, IntOrString::Int(8080), "TCP")]);
    let pods = arcs(vec![ready_pod(0), not_ready_pod(1)]);
    assert_eq!(desired_endpoints(Some(&svc), &pods, None, None), nothing());
}

#[test]
fn pods_not_matching_the_selector_are_ignored() {
    let mut stranger = ready_pod(1);
    stranger.metadata.labels = Some(BTreeMap::from([("foo".to_owned(), "other".to_owned())]));
    let got = written(desired_endpoints(
        Some(&selected_service()),
        &arcs(vec![ready_pod(0), stranger]),
        None,
        None,
    ));
    assert_eq!(got.subsets.unwrap_or_default()[0].addresses, Some(vec![pod_address(0)]));
}

#[test]
fn preexisting_endpoints_are_updated_in_place() {
    let mut existing = mk_endpoints(Some(vec![EndpointSubset {
        addresses: Some(vec![EndpointAddress {
            ip: "6.7.8.9".to_owned(),
            node_name: Some("node-1".to_owned()),
            ..EndpointAddress::default()
        }]),
        not_ready_addresses: None,
        ports: Some(vec![tcp("", 1000)]),
    }]));
    existing.metadata.annotations = Some(BTreeMap::from([("keep".to_owned(), "me".to_owned())]));
    let got = desired_endpoints(Some(&selected_service()), &arcs(vec![ready_pod(0)]), None, Some(&existing));
    let [updated] = got.update.as_slice() else {
        panic!("expected an update, got {got:?}");
    };
    assert_eq!(updated.metadata.resource_version.as_deref(), Some("1"));
    assert_eq!(updated.metadata.annotations, Some(BTreeMap::from([("keep".to_owned(), "me".to_owned())])));
    assert_eq!(
        updated.subsets,
        Some(vec![EndpointSubset {
            addresses: Some(vec![pod_address(0)]),
            not_ready_addresses: None,
            ports: Some(vec![tcp("", 8080)]),
        }])
    );
}

#[test]
fn identical_preexisting_endpoints_write_nothing_even_unsorted() {
    let svc = mk_service(
        Some(&[("foo", "bar")]),
        vec![
            svc_port("a", 80, IntOrString::Int(8080), "TCP"),
            svc_port("b", 81, IntOrString::Int(8081), "TCP"),
        ],
    );
    let pods = arcs(vec![ready_pod(0), ready_pod(1), not_ready_pod(2)]);
    let mut existing = store(desired_endpoints(Some(&svc), &pods, None, None));
    assert_eq!(desired_endpoints(Some(&svc), &pods, None, Some(&existing)), nothing());
    // Stored in another order (e.g. Go's hash order): still nothing to do.
    if let Some(subsets) = existing.subsets.as_mut() {
        for subset in subsets.iter_mut() {
            if let Some(list) = subset.addresses.as_mut() {
                list.reverse();
            }
            if let Some(ports) = subset.ports.as_mut() {
                ports.reverse();
            }
        }
        subsets.reverse();
    }
    assert_eq!(desired_endpoints(Some(&svc), &pods, None, Some(&existing)), nothing());
}

#[test]
fn service_labels_are_copied_with_managed_by_and_without_headless() {
    let mut svc = selected_service();
    svc.metadata.labels = Some(BTreeMap::from([("foo".to_owned(), "bar".to_owned())]));
    let got = written(desired_endpoints(Some(&svc), &arcs(vec![ready_pod(0)]), None, None));
    assert_eq!(
        got.metadata.labels,
        Some(BTreeMap::from([
            ("foo".to_owned(), "bar".to_owned()),
            (labels::ENDPOINTS_MANAGED_BY.to_owned(), labels::UPSTREAM_ENDPOINTS_CONTROLLER.to_owned()),
        ]))
    );
}

#[test]
fn a_service_label_change_updates_and_replaces_the_labels() {
    let mut svc = selected_service();
    svc.metadata.labels = Some(BTreeMap::from([("foo".to_owned(), "bar".to_owned())]));
    let pods = arcs(vec![ready_pod(0)]);
    let mut existing = store(desired_endpoints(Some(&svc), &pods, None, None));
    if let Some(l) = existing.metadata.labels.as_mut() {
        l.insert("user".to_owned(), "added".to_owned());
    }
    svc.metadata.labels = Some(BTreeMap::from([("foo".to_owned(), "baz".to_owned())]));
    let updated = written(desired_endpoints(Some(&svc), &pods, None, Some(&existing)));
    let got = updated.metadata.labels.unwrap_or_default();
    assert_eq!(got.get("foo").map(String::as_str), Some("baz"));
    assert!(!got.contains_key("user"));
}

#[test]
fn endpoints_without_the_managed_by_label_are_rewritten_once() {
    let svc = selected_service();
    let pods = arcs(vec![ready_pod(0)]);
    let mut existing = store(desired_endpoints(Some(&svc), &pods, None, None));
    existing.metadata.labels = None;
    let rewritten = store(desired_endpoints(Some(&svc), &pods, None, Some(&existing)));
    assert_eq!(desired_endpoints(Some(&svc), &pods, None, Some(&rewritten)), nothing());
}

#[test]
fn a_service_carrying_the_headless_label_is_rewritten_every_sync() {
    // Upstream quirk of labelsCorrectForEndpoints' count check.
    let mut svc = selected_service();
    svc.metadata.labels = Some(BTreeMap::from([(labels::HEADLESS.to_owned(), String::new())]));
    let pods = arcs(vec![ready_pod(0)]);
    let existing = store(desired_endpoints(Some(&svc), &pods, None, None));
    assert!(desired_endpoints(Some(&svc), &pods, None, Some(&existing)).update.len() == 1);
}

#[test]
fn headless_services_get_the_headless_label() {
    for cluster_ip in ["None", ""] {
        let mut svc = selected_service();
        if let Some(spec) = svc.spec.as_mut() {
            spec.cluster_ip = Some(cluster_ip.to_owned());
        }
        let got = written(desired_endpoints(Some(&svc), &arcs(vec![ready_pod(0)]), None, None));
        assert_eq!(
            got.metadata.labels.unwrap_or_default().get(labels::HEADLESS).map(String::as_str),
            Some("")
        );
    }
}

#[test]
fn terminal_pods_are_excluded_even_when_ready() {
    for phase in ["Failed", "Succeeded"] {
        let pod = mk_pod(0, PodSpecArgs { ready: true, phase, ips: vec!["1.2.3.4".to_owned()] });
        let got = written(desired_endpoints(Some(&selected_service()), &arcs(vec![pod]), None, None));
        assert_eq!(got.subsets, None, "{phase}");
    }
}

#[test]
fn pods_without_an_ip_are_excluded() {
    let pod = mk_pod(0, PodSpecArgs { ready: true, phase: "Pending", ips: vec![] });
    let got = written(desired_endpoints(Some(&selected_service()), &arcs(vec![pod]), None, None));
    assert_eq!(got.subsets, None);
}

fn terminating(mut pod: StoredPod) -> StoredPod {
    pod.metadata.deletion_timestamp = Some(Time(Timestamp::UNIX_EPOCH));
    pod
}

#[test]
fn terminating_pods_appear_only_with_publish_not_ready_addresses_and_then_as_ready() {
    let pods = arcs(vec![terminating(ready_pod(0)), terminating(not_ready_pod(1))]);
    let got = written(desired_endpoints(Some(&selected_service()), &pods, None, None));
    assert_eq!(got.subsets, None);

    let mut svc = selected_service();
    if let Some(spec) = svc.spec.as_mut() {
        spec.publish_not_ready_addresses = Some(true);
    }
    let got = written(desired_endpoints(Some(&svc), &pods, None, None));
    let subsets = got.subsets.unwrap_or_default();
    assert_eq!(subsets[0].addresses, Some(vec![pod_address(0), pod_address(1)]));
    assert_eq!(subsets[0].not_ready_addresses, None);
}

#[test]
fn tolerate_unready_annotation_is_ignored() {
    let mut svc = selected_service();
    svc.metadata.annotations = Some(BTreeMap::from([(
        "service.alpha.kubernetes.io/tolerate-unready-endpoints".to_owned(),
        "true".to_owned(),
    )]));
    let got = written(desired_endpoints(Some(&svc), &arcs(vec![not_ready_pod(0)]), None, None));
    assert_eq!(got.subsets.unwrap_or_default()[0].addresses, None);
}

#[test]
fn headless_without_ports_gets_portless_subsets_and_headful_without_ports_gets_none() {
    let mut headless = mk_service(Some(&[("foo", "bar")]), vec![]);
    if let Some(spec) = headless.spec.as_mut() {
        spec.cluster_ip = Some("None".to_owned());
    }
    let got = written(desired_endpoints(Some(&headless), &arcs(vec![ready_pod(0)]), None, None));
    assert_eq!(
        got.subsets,
        Some(vec![EndpointSubset {
            addresses: Some(vec![pod_address(0)]),
            not_ready_addresses: None,
            ports: None
        }])
    );
    let headful = mk_service(Some(&[("foo", "bar")]), vec![]);
    let got = written(desired_endpoints(Some(&headful), &arcs(vec![ready_pod(0)]), None, None));
    assert_eq!(got.subsets, None);
}

#[test]
fn named_target_ports_resolve_per_pod_and_unresolved_ports_are_dropped() {
    let svc = mk_service(
        Some(&[("foo", "bar")]),
        vec![
            svc_port("named", 80, IntOrString::String("port-name".to_owned()), "TCP"),
            svc_port("missing", 81, IntOrString::String("nope".to_owned()), "TCP"),
            svc_port("udp-named", 82, IntOrString::String("port-name".to_owned()), "UDP"),
        ],
    );
    let mut other = ready_pod(1);
    if let Some(spec) = other.spec.as_mut()
        && let Some(ports) = spec.containers[0].ports.as_mut()
    {
        ports[0].container_port = 9090;
    }
    let got = written(desired_endpoints(Some(&svc), &arcs(vec![ready_pod(0), other]), None, None));
    let mut by_port: Vec<(i32, Vec<String>)> = got
        .subsets
        .unwrap_or_default()
        .iter()
        .map(|s| {
            let ports = s.ports.clone().unwrap_or_default();
            assert_eq!(ports.len(), 1);
            (ports[0].port, s.addresses.iter().flatten().map(|a| a.ip.clone()).collect())
        })
        .collect();
    by_port.sort();
    assert_eq!(by_port, [(8080, vec!["1.2.3.4".to_owned()]), (9090, vec!["1.2.3.5".to_owned()])]);
}

#[test]
fn hostname_is_set_only_when_the_subdomain_is_the_service_name() {
    let with_subdomain = |subdomain: &str| {
        let mut pod = ready_pod(0);
        if let Some(spec) = pod.spec.as_mut() {
            spec.hostname = Some("host".to_owned());
            spec.subdomain = Some(subdomain.to_owned());
        }
        let got = written(desired_endpoints(Some(&selected_service()), &arcs(vec![pod]), None, None));
        got.subsets.unwrap_or_default()[0].addresses.clone().unwrap_or_default()[0].hostname.clone()
    };
    assert_eq!(with_subdomain(NAME), Some("host".to_owned()));
    assert_eq!(with_subdomain("other"), None);
}

#[test]
fn app_protocol_is_copied() {
    let mut port = svc_port("web", 80, IntOrString::Int(8080), "TCP");
    port.app_protocol = Some("http".to_owned());
    let svc = mk_service(Some(&[("foo", "bar")]), vec![port]);
    let got = written(desired_endpoints(Some(&svc), &arcs(vec![ready_pod(0), ready_pod(1)]), None, None));
    let subsets = got.subsets.unwrap_or_default();
    assert_eq!(subsets.len(), 1);
    assert_eq!(subsets[0].ports.as_ref().map(|p| p[0].app_protocol.clone()), Some(Some("http".to_owned())));
}

/// Upstream `TestPodToEndpointAddressForService` and its empty-ipFamilies twin.
#[test]
fn the_address_is_the_pod_ip_of_the_services_primary_family() {
    let dual = |n: usize| {
        mk_pod(
            n,
            PodSpecArgs {
                ready: true,
                phase: "Running",
                ips: vec![format!("1.2.3.{}", 4 + n), format!("2000::{}", 4 + n)],
            },
        )
    };
    let v6_first = mk_pod(
        0,
        PodSpecArgs { ready: true, phase: "Running", ips: vec!["2000::4".to_owned(), "1.2.3.4".to_owned()] },
    );
    type Row<'a> = (&'a str, Option<Vec<&'a str>>, &'a str, StoredPod, Option<&'a str>);
    let rows: Vec<Row> = vec![
        ("v4 service, dual-stack pod", Some(vec!["IPv4"]), "10.0.0.1", dual(0), Some("1.2.3.4")),
        ("v6 service, dual-stack pod", Some(vec!["IPv6"]), "3000::1", dual(0), Some("2000::4")),
        ("dual-stack v6-primary service", Some(vec!["IPv6", "IPv4"]), "3000::1", dual(0), Some("2000::4")),
        ("v6 service, v4-only pod is skipped", Some(vec!["IPv6"]), "3000::1", ready_pod(0), None),
        ("no ipFamilies: family of the clusterIP", None, "3000::1", dual(0), Some("2000::4")),
        ("no ipFamilies, headless: family of podIP", None, "None", v6_first.clone(), Some("2000::4")),
        ("no ipFamilies, headless, v4 podIP", None, "None", dual(0), Some("1.2.3.4")),
    ];
    for (name, families, cluster_ip, pod, want) in rows {
        let mut svc = selected_service();
        if let Some(spec) = svc.spec.as_mut() {
            spec.ip_families = families.map(|f| f.into_iter().map(str::to_owned).collect());
            spec.cluster_ip = Some(cluster_ip.to_owned());
        }
        let got = crate::eligibility::for_endpoints(&svc, &pod).addresses.into_values().flatten().next();
        assert_eq!(got.as_deref(), want, "{name}");
    }
}

#[test]
fn irregular_pod_ips_are_written_canonically() {
    let pod =
        mk_pod(0, PodSpecArgs { ready: true, phase: "Running", ips: vec!["001.002.003.004".to_owned()] });
    let got = written(desired_endpoints(Some(&selected_service()), &arcs(vec![pod]), None, None));
    assert_eq!(got.subsets.unwrap_or_default()[0].addresses.clone().unwrap_or_default()[0].ip, "1.2.3.4");
}

fn at(seconds: i64, nanos: i32) -> Time {
    Time(Timestamp::new(seconds, nanos).unwrap_or(Timestamp::UNIX_EPOCH))
}

/// Upstream `TestLastTriggerChangeTimeAnnotation`, `_AnnotationOverridden`, `_AnnotationCleared`.
#[test]
fn trigger_time_annotation_is_set_overridden_and_cleared() {
    let svc = selected_service();
    let pods = arcs(vec![ready_pod(0)]);
    let annotation = |e: &Endpoints| {
        e.metadata.annotations.as_ref().and_then(|a| a.get(labels::LAST_CHANGE_TRIGGER_TIME).cloned())
    };
    let created = written(desired_endpoints(Some(&svc), &pods, Some(at(1_700_000_000, 0)), None));
    assert_eq!(annotation(&created).as_deref(), Some("2023-11-14T22:13:20Z"));

    let mut existing = mk_endpoints(None);
    existing.metadata.annotations = Some(BTreeMap::from([(
        labels::LAST_CHANGE_TRIGGER_TIME.to_owned(),
        "2018-01-01T00:00:00Z".to_owned(),
    )]));
    let overridden =
        written(desired_endpoints(Some(&svc), &pods, Some(at(1_700_000_000, 0)), Some(&existing)));
    assert_eq!(annotation(&overridden).as_deref(), Some("2023-11-14T22:13:20Z"));

    let cleared = written(desired_endpoints(Some(&svc), &pods, None, Some(&existing)));
    assert_eq!(annotation(&cleared), None);
}

#[test]
fn a_trigger_time_alone_never_causes_a_write() {
    let svc = selected_service();
    let pods = arcs(vec![ready_pod(0)]);
    let existing = store(desired_endpoints(Some(&svc), &pods, None, None));
    assert_eq!(desired_endpoints(Some(&svc), &pods, Some(at(1_800_000_000, 0)), Some(&existing)), nothing());
}

fn many_pods(ready: usize, not_ready: usize) -> Vec<Arc<StoredPod>> {
    let ip = |n: usize| vec![format!("10.{}.{}.{}", n / 65536, (n / 256) % 256, n % 256)];
    (0..ready + not_ready)
        .map(|n| mk_pod(n, PodSpecArgs { ready: n < ready, phase: "Running", ips: ip(n) }))
        .map(Arc::new)
        .collect()
}

fn counts(e: &Endpoints) -> (usize, usize) {
    e.subsets.iter().flatten().fold((0, 0), |(r, n), s| {
        (r + s.addresses.as_ref().map_or(0, Vec::len), n + s.not_ready_addresses.as_ref().map_or(0, Vec::len))
    })
}

fn over_capacity(e: &Endpoints) -> Option<String> {
    e.metadata.annotations.as_ref().and_then(|a| a.get(labels::OVER_CAPACITY).cloned())
}

/// Upstream `TestSyncServiceOverCapacity`.
#[test]
fn over_capacity_matches_upstream_table() {
    type Row = (&'static str, Option<&'static str>, usize, usize, usize, usize, usize, bool);
    let m = MAX_CAPACITY;
    let rows: [Row; 7] = [
        ("empty", None, 0, 0, 0, 0, 0, false),
        (
            "annotation added past capacity, < than maxCapacity of Ready Addresses",
            None,
            m - 1,
            m - 3,
            4,
            m - 3,
            3,
            true,
        ),
        ("annotation added past capacity, maxCapacity of Ready Addresses", None, m - 1, m, 10, m, 0, true),
        ("annotation removed below capacity", Some("truncated"), m - 1, m - 1, 0, m - 1, 0, false),
        (
            "annotation was set to warning previously, annotation removed at capacity",
            Some("warning"),
            m,
            m,
            0,
            m,
            0,
            false,
        ),
        (
            "annotation was set to warning previously but still over capacity",
            Some("warning"),
            m + 1,
            m + 1,
            0,
            m,
            0,
            true,
        ),
        ("annotation removed at capacity", Some("truncated"), m, m, 0, m, 0, false),
    ];
    let svc = selected_service();
    for (name, start, existing_n, ready, not_ready, want_ready, want_not_ready, want_annotation) in rows {
        let mut existing = store(desired_endpoints(Some(&svc), &many_pods(existing_n, 0), None, None));
        existing.metadata.annotations =
            start.map(|v| BTreeMap::from([(labels::OVER_CAPACITY.to_owned(), v.to_owned())]));
        let plan = desired_endpoints(Some(&svc), &many_pods(ready, not_ready), None, Some(&existing));
        let got = match plan {
            _ if plan.is_empty() => existing,
            other => written(other),
        };
        assert_eq!(counts(&got), (want_ready, want_not_ready), "{name}");
        assert_eq!(over_capacity(&got).is_some(), want_annotation, "{name}");
        if want_annotation {
            assert_eq!(over_capacity(&got).as_deref(), Some(TRUNCATED), "{name}");
        }
    }
}

#[test]
fn an_over_capacity_service_is_rewritten_every_sync_like_upstream() {
    let svc = selected_service();
    let pods = many_pods(MAX_CAPACITY + 5, 0);
    let stored = store(desired_endpoints(Some(&svc), &pods, None, None));
    assert_eq!(counts(&stored), (MAX_CAPACITY, 0));
    assert!(desired_endpoints(Some(&svc), &pods, None, Some(&stored)).update.len() == 1);
}

#[test]
fn truncation_keeps_the_first_addresses_in_sorted_order() {
    let svc = selected_service();
    let pods = many_pods(MAX_CAPACITY + 10, 0);
    let got = written(desired_endpoints(Some(&svc), &pods, None, None));
    let kept: Vec<String> =
        got.subsets.unwrap_or_default()[0].addresses.iter().flatten().map(|a| a.ip.clone()).collect();
    let mut all: Vec<String> =
        pods.iter().filter_map(|p| p.status.as_ref().and_then(|s| s.pod_ip.clone())).collect();
    all.sort();
    assert_eq!(kept, all[..MAX_CAPACITY]);
}

// ---------------------------------------------------------------------------
// Properties.

#[derive(Clone, Debug)]
struct ArbPod {
    ready: bool,
    phase: &'static str,
    terminating: bool,
    v4: Option<u8>,
    v6: Option<u8>,
    named_port: Option<i32>,
    matches: bool,
}

fn arb_pod() -> impl Strategy<Value = ArbPod> {
    (
        any::<bool>(),
        prop::sample::select(vec!["Running", "Running", "Running", "Pending", "Failed", "Succeeded"]),
        prop::bool::weighted(0.15),
        prop::option::weighted(0.9, 1u8..60),
        prop::option::weighted(0.4, 1u8..60),
        prop::option::weighted(0.8, prop::sample::select(vec![8080, 9090])),
        prop::bool::weighted(0.9),
    )
        .prop_map(|(ready, phase, terminating, v4, v6, named_port, matches)| ArbPod {
            ready,
            phase,
            terminating,
            v4,
            v6,
            named_port,
            matches,
        })
}

fn build_pods(specs: &[ArbPod]) -> Vec<Arc<StoredPod>> {
    specs
        .iter()
        .enumerate()
        .map(|(n, s)| {
            let mut ips = Vec::new();
            if let Some(d) = s.v4 {
                ips.push(format!("10.0.{n}.{d}"));
            }
            if let Some(d) = s.v6 {
                ips.push(format!("fd00::{n:x}:{d:x}"));
            }
            let mut pod = mk_pod(n, PodSpecArgs { ready: s.ready, phase: s.phase, ips });
            if s.terminating {
                pod = terminating(pod);
            }
            if let Some(spec) = pod.spec.as_mut() {
                match s.named_port {
                    Some(port) => {
                        if let Some(ports) = spec.containers[0].ports.as_mut() {
                            ports[0].container_port = port;
                        }
                    }
                    None => spec.containers[0].ports = None,
                }
            }
            if !s.matches {
                pod.metadata.labels = None;
            }
            Arc::new(pod)
        })
        .collect()
}

fn arb_service() -> impl Strategy<Value = Service> {
    (
        any::<bool>(),
        prop::sample::select(vec!["10.96.0.10", "None", "fd00::10"]),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(publish, cluster_ip, named, labelled)| {
            let mut ports = vec![svc_port("int", 80, IntOrString::Int(8080), "TCP")];
            if named {
                ports.push(svc_port("named", 81, IntOrString::String("port-name".to_owned()), "TCP"));
            }
            let mut svc = mk_service(Some(&[("foo", "bar")]), ports);
            if labelled {
                svc.metadata.labels = Some(BTreeMap::from([("team".to_owned(), "a".to_owned())]));
            }
            if let Some(spec) = svc.spec.as_mut() {
                spec.publish_not_ready_addresses = Some(publish);
                spec.cluster_ip = Some(cluster_ip.to_owned());
                spec.ip_families =
                    Some(vec![if cluster_ip.contains(':') { "IPv6" } else { "IPv4" }.to_owned()]);
            }
            svc
        })
}

/// An (IP, port name, port number, ready) fact.
type Fact = (String, String, i32, bool);

/// Every fact in an Endpoints.
fn facts(e: &Endpoints) -> Vec<Fact> {
    let mut out = Vec::new();
    for subset in e.subsets.iter().flatten() {
        for port in subset.ports.iter().flatten() {
            for a in subset.addresses.iter().flatten() {
                out.push((a.ip.clone(), port.name.clone().unwrap_or_default(), port.port, true));
            }
            for a in subset.not_ready_addresses.iter().flatten() {
                out.push((a.ip.clone(), port.name.clone().unwrap_or_default(), port.port, false));
            }
        }
    }
    out.sort();
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn planning_again_on_the_stored_object_writes_nothing(
        svc in arb_service(),
        specs in prop::collection::vec(arb_pod(), 0..25),
    ) {
        let pods = build_pods(&specs);
        let stored = store(desired_endpoints(Some(&svc), &pods, None, None));
        prop_assert_eq!(desired_endpoints(Some(&svc), &pods, None, Some(&stored)), nothing());
    }

    #[test]
    fn converges_from_any_earlier_state(
        svc in arb_service(),
        before in prop::collection::vec(arb_pod(), 0..20),
        now in prop::collection::vec(arb_pod(), 0..20),
    ) {
        let old = store(desired_endpoints(Some(&svc), &build_pods(&before), None, None));
        let pods = build_pods(&now);
        let plan = desired_endpoints(Some(&svc), &pods, None, Some(&old));
        let stored = match plan {
            _ if plan.is_empty() => old,
            other => store(other),
        };
        prop_assert_eq!(facts(&stored), facts(&written(desired_endpoints(Some(&svc), &pods, None, None))));
        prop_assert_eq!(desired_endpoints(Some(&svc), &pods, None, Some(&stored)), nothing());
    }

    #[test]
    fn shuffled_pods_give_the_same_endpoints(
        svc in arb_service(),
        specs in prop::collection::vec(arb_pod(), 0..25),
        seed in any::<u64>(),
    ) {
        let pods = build_pods(&specs);
        let mut shuffled = pods.clone();
        let mut rng = seed;
        for i in (1..shuffled.len()).rev() {
            rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let j = usize::try_from(rng >> 33).unwrap_or(0) % (i + 1);
            shuffled.swap(i, j);
        }
        prop_assert_eq!(
            desired_endpoints(Some(&svc), &pods, None, None),
            desired_endpoints(Some(&svc), &shuffled, None, None)
        );
    }

    #[test]
    fn every_eligible_pod_appears_once_per_resolved_port(
        svc in arb_service(),
        specs in prop::collection::vec(arb_pod(), 0..25),
    ) {
        let pods = build_pods(&specs);
        let got = written(desired_endpoints(Some(&svc), &pods, None, None));
        let spec = svc.spec.clone().unwrap_or_default();
        let publish = spec.publish_not_ready_addresses == Some(true);
        let want_v6 = spec.ip_families.unwrap_or_default().first().map(String::as_str) == Some("IPv6");
        let named = spec.ports.unwrap_or_default().len() > 1;
        let mut want = Vec::new();
        for (n, s) in specs.iter().enumerate() {
            let terminal = s.phase == "Failed" || s.phase == "Succeeded";
            let has_ip = s.v4.is_some() || s.v6.is_some();
            if !s.matches || terminal || !has_ip || (s.terminating && !publish) {
                continue;
            }
            let ip = if want_v6 { s.v6.map(|d| format!("fd00::{n:x}:{d:x}")) } else { s.v4.map(|d| format!("10.0.{n}.{d}")) };
            let Some(ip) = ip.and_then(|text| ip::canonicalize(&text)).map(|(_, text)| text) else {
                continue;
            };
            let ready = publish || s.ready;
            want.push((ip.clone(), "int".to_owned(), 8080, ready));
            if named && let Some(port) = s.named_port {
                want.push((ip, "named".to_owned(), port, ready));
            }
        }
        want.sort();
        let got_facts = facts(&got);
        let unique: BTreeSet<_> = got_facts.iter().cloned().collect();
        prop_assert_eq!(unique.len(), got_facts.len(), "an address is listed twice for one port");
        prop_assert_eq!(got_facts, want);
    }
}
