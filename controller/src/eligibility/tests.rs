//! Eligibility cases, and the property that ties it to both planners: a Pod is
//! an endpoint in the plan exactly when `explain` lists no reason that drops it,
//! and it is published not-ready exactly when `explain` says `NotReady`.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{ContainerPort, Service, ServicePort};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use proptest::prelude::*;

use super::*;
use crate::endpoints::desired_endpoints;
use crate::endpointslice::{NodeInfo, SliceConfig, plan_slices};
use crate::plan::Key;

use crate::test_pods::web_pod as mk_pod;

fn mk_service(target: IntOrString) -> Service {
    crate::test_pods::web_service(target, "TCP")
}

#[test]
fn slices_list_every_reason_and_publish_a_degraded_pod() {
    let mut pod = mk_pod("p", &["fd00::1", "10.0.0.1"]);
    pod.status.as_mut().unwrap().conditions = None;
    let mut svc = mk_service(IntOrString::String("grpc".into()));
    svc.spec.as_mut().unwrap().ip_families = Some(vec!["IPv4".into(), "IPv6".into()]);
    let got = for_slices(&svc, &pod, true);
    let error = PortError::NamedPortNotFound { name: "grpc".into(), protocol: "TCP".into() };
    assert_eq!(
        got.reasons,
        [Exclusion::NotReady, Exclusion::PortNotFound { service_port: "http".into(), error }]
    );
    assert_eq!((got.is_endpoint(), got.standing(), got.serves()), (true, Standing::Partial, false));
    assert_eq!(got.ports, [None]);
    assert_eq!(got.addresses.len(), 2);
}

#[test]
fn a_pod_without_an_ip_of_any_service_family_is_no_endpoint() {
    let pod = mk_pod("p", &["fd00::1"]);
    let svc = mk_service(IntOrString::Int(8080));
    for got in [for_slices(&svc, &pod, true), for_endpoints(&svc, &pod)] {
        assert_eq!(got.reasons, [Exclusion::NoIpOfFamily { family: IpFamily::V4 }, Exclusion::NoUsableIp]);
        assert_eq!(got.standing(), Standing::Excluded);
        assert!(got.addresses.is_empty());
    }
}

#[test]
fn endpoints_drop_a_pod_with_no_resolved_port_or_a_portless_service_unless_headless() {
    let pod = mk_pod("p", &["10.0.0.1"]);
    let svc = mk_service(IntOrString::String("grpc".into()));
    assert!(for_endpoints(&svc, &pod).reasons.contains(&Exclusion::NoPortResolved));
    assert!(for_slices(&svc, &pod, true).is_endpoint(), "slices publish it in a port-less group");
    let mut portless = mk_service(IntOrString::Int(1));
    portless.spec.as_mut().unwrap().ports = None;
    assert_eq!(for_endpoints(&portless, &pod).reasons, [Exclusion::NoServicePorts]);
    portless.spec.as_mut().unwrap().cluster_ip = Some("None".into());
    assert!(for_endpoints(&portless, &pod).reasons.is_empty());
}

/// One random Pod: every input eligibility looks at.
#[derive(Clone, Debug)]
struct PodCase {
    app: Option<&'static str>,
    other_namespace: bool,
    phase: &'static str,
    v4: bool,
    v6: bool,
    pod_ip_only: bool,
    ready: bool,
    terminating: bool,
    named_port: bool,
    node: &'static str,
}

fn pod_case() -> impl Strategy<Value = PodCase> {
    (
        prop_oneof![Just(Some("web")), Just(Some("db")), Just(None)],
        prop::bool::weighted(0.1),
        prop_oneof![Just("Running"), Just("Pending"), Just("Succeeded"), Just("Failed")],
        (any::<bool>(), any::<bool>(), prop::bool::weighted(0.1)),
        (any::<bool>(), prop::bool::weighted(0.3), any::<bool>()),
        prop_oneof![Just("node-1"), Just("gone"), Just("")],
    )
        .prop_map(
            |(app, other_namespace, phase, (v4, v6, pod_ip_only), (ready, terminating, named_port), node)| {
                PodCase {
                    app,
                    other_namespace,
                    phase,
                    v4,
                    v6,
                    pod_ip_only,
                    ready,
                    terminating,
                    named_port,
                    node,
                }
            },
        )
}

fn build_pod(i: usize, c: &PodCase) -> StoredPod {
    let mut ips = Vec::new();
    if c.v4 {
        ips.push(format!("10.0.0.{}", i + 1));
    }
    if c.v6 {
        ips.push(format!("fd00::{:x}", i + 1));
    }
    let labels: Vec<(&str, &str)> = c.app.map(|app| ("app", app)).into_iter().collect();
    let mut pod = crate::test_pods::stored(crate::test_pods::TestPod {
        name: format!("pod{i}"),
        namespace: if c.other_namespace { "other" } else { "ns" },
        uid: Some(format!("uid-{i}")),
        resource_version: None,
        labels: &labels,
        node: c.node,
        container: "main",
        port: ("http", 8080),
        ips,
        phase: c.phase,
        ready: c.ready,
    });
    let status = pod.status.as_mut().unwrap();
    if c.pod_ip_only {
        // podIP without podIPs: has an IP, yet no address (only podIPs is read).
        status.pod_ips = None;
        status.pod_ip = Some("10.9.9.9".into());
    }
    if c.terminating {
        pod.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
    }
    if !c.named_port {
        pod.spec.as_mut().unwrap().containers[0].ports =
            Some(vec![ContainerPort { container_port: 8080, ..Default::default() }]);
    }
    pod
}

fn service_case() -> impl Strategy<Value = Service> {
    (
        prop_oneof![Just(vec![]), Just(vec!["IPv4"]), Just(vec!["IPv6"]), Just(vec!["IPv6", "IPv4"])],
        prop_oneof![Just("10.96.0.1"), Just("fd00:96::1"), Just("None")],
        any::<bool>(),
        prop_oneof![Just(0usize), Just(1), Just(2)],
        prop::bool::weighted(0.05),
    )
        .prop_map(|(families, cluster_ip, pnra, ports, external)| {
            let mut svc = mk_service(IntOrString::String("http".into()));
            let spec = svc.spec.as_mut().unwrap();
            spec.ip_families = Some(families.into_iter().map(str::to_owned).collect());
            spec.cluster_ip = Some(cluster_ip.into());
            spec.publish_not_ready_addresses = Some(pnra);
            let named = spec.ports.clone().unwrap_or_default();
            let int = ServicePort {
                name: Some("int".into()),
                port: 81,
                target_port: Some(IntOrString::Int(9090)),
                ..Default::default()
            };
            spec.ports = Some(match ports {
                0 => vec![],
                1 => named,
                _ => [named, vec![int]].concat(),
            });
            if external {
                spec.type_ = Some("ExternalName".into());
            }
            svc
        })
}

proptest! {
    #[test]
    fn explain_and_both_planners_agree(svc in service_case(), cases in prop::collection::vec(pod_case(), 0..6)) {
        let pods: Vec<Arc<StoredPod>> = cases.iter().enumerate().map(|(i, c)| Arc::new(build_pod(i, c))).collect();
        let nodes = BTreeMap::from([("node-1".to_owned(), NodeInfo::default())]);

        // EndpointSlices: (pod name, ready) of every endpoint, per family.
        let config = SliceConfig::default();
        let plan = plan_slices(Some(&svc), &pods, &nodes, &[], None, &config);
        let slice_endpoints: Vec<(String, bool)> = plan.create.iter()
            .flat_map(|s| s.endpoints.iter().flatten())
            .map(|e| (
                e.target_ref.as_ref().and_then(|t| t.name.clone()).unwrap_or_default(),
                e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true),
            ))
            .collect();
        // Endpoints: (pod name, ready) of every address.
        let key = Key::of(&svc);
        let planned = desired_endpoints(&key, Some(&svc), &pods, None, None).create;
        let endpoints = planned.into_iter().next().and_then(|e| e.subsets).unwrap_or_default();
        let mut endpoint_addresses: Vec<(String, bool)> = Vec::new();
        for subset in &endpoints {
            for (list, ready) in [(&subset.addresses, true), (&subset.not_ready_addresses, false)] {
                for address in list.iter().flatten() {
                    let name = address.target_ref.as_ref().and_then(|t| t.name.clone()).unwrap_or_default();
                    endpoint_addresses.push((name, ready));
                }
            }
        }

        for pod in &pods {
            let name = pod.metadata.name.clone().unwrap_or_default();
            let node_found = pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some("node-1");
            for (consumer, verdict, published) in [
                ("EndpointSlices", for_slices(&svc, pod, node_found), &slice_endpoints),
                ("Endpoints", for_endpoints(&svc, pod), &endpoint_addresses),
            ] {
                let mine: Vec<bool> = published.iter().filter(|(n, _)| *n == name).map(|(_, r)| *r).collect();
                let dropped = verdict.reasons.iter().any(Exclusion::drops_pod);
                prop_assert_eq!(
                    mine.is_empty(), dropped,
                    "{} {}: published {:?}, reasons {:?}", consumer, name, mine, verdict.reasons
                );
                prop_assert_eq!(dropped, verdict.standing() == Standing::Excluded);
                let not_ready = verdict.reasons.contains(&Exclusion::NotReady);
                prop_assert!(
                    mine.iter().all(|ready| *ready != not_ready),
                    "{} {}: ready {:?}, reasons {:?}", consumer, name, mine, verdict.reasons
                );
            }
        }
    }
}
