//! Fuzz targets of the three planners (`make fuzz`; a few hundred inputs in
//! `make test`): Services, Pods, Endpoints and slices shaped like real objects,
//! with fields replaced by arbitrary JSON, deserialized as the watch does.
//!
//! JSON that does not deserialize is refused: the watch would never hand it to
//! a planner. Everything else must plan without panicking, write only slices
//! within the size limit whose addresses are IPs of the slice's family, and
//! leave a state on which planning again writes nothing.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Endpoints, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use proptest::prelude::*;
use serde::de::DeserializeOwned;
use serde_json::{Value as Json, json};
use svcplane_fuzz::{Outcome, mutated, run, word};

use crate::endpoints::{MAX_CAPACITY, desired_endpoints};
use crate::endpointslice::{NodeInfo, SliceConfig, plan_slices};
use crate::ip::IpFamily;
use crate::labels::{MANAGED_BY, SERVICE_NAME, SVCPLANE_MIRRORING_CONTROLLER, SVCPLANE_SLICE_CONTROLLER};
use crate::mirroring::{MirroringConfig, plan_mirrored_slices};
use crate::plan::{Key, Plan, applied, endpoint_count};
use crate::stored_pod::StoredPod;

const NS: &str = "ns";
const NAME: &str = "web";
const SVC_UID: &str = "svc-uid";

fn ip() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => (1u8..6).prop_map(|d| format!("10.1.0.{d}")),
        2 => (1u8..6).prop_map(|d| format!("fd00::{d}")),
        1 => word(),
    ]
}

fn ips() -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec(ip(), 0..3)
}

/// A Service `ns/web`: selecting `app=web` or selectorless, any type, ports
/// by number or name.
fn service() -> impl Strategy<Value = Json> {
    let port = (word(), prop::sample::select(vec![80, 443, 53]), word(), prop_oneof![
        Just(json!(8080)),
        Just(json!("http")),
        word().prop_map(Json::from)
    ])
    .prop_map(|(name, port, protocol, target)| {
        json!({"name": name, "port": port, "protocol": protocol, "targetPort": target})
    });
    let selector = prop_oneof![3 => Just(json!({"app": "web"})), 1 => Just(json!({})), 1 => Just(Json::Null)];
    let families = prop::sample::subsequence(vec!["IPv4", "IPv6"], 0..=2);
    let kind = prop::sample::select(vec!["ClusterIP", "NodePort", "ExternalName", "LoadBalancer"]);
    let headless = prop_oneof![Just("10.96.0.10"), Just("None"), Just("fd00::10")];
    (selector, families, kind, headless, prop::collection::vec(port, 0..3), any::<bool>(), any::<bool>())
        .prop_map(|(selector, families, kind, cluster_ip, ports, publish, deleting)| {
            let mut svc = json!({
                "metadata": {"name": NAME, "namespace": NS, "uid": SVC_UID, "labels": {"team": "a"}},
                "spec": {
                    "selector": selector, "type": kind, "clusterIP": cluster_ip, "ipFamilies": families,
                    "ports": ports, "publishNotReadyAddresses": publish,
                    "trafficDistribution": "PreferClose",
                },
            });
            if deleting {
                svc["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
            }
            svc
        })
}

/// Pod `ns/pod<i>` labelled `app=web`, on node-1 (known) or node-2 (not).
fn pod(i: usize) -> impl Strategy<Value = Json> {
    let node = prop::sample::select(vec!["node-1", "node-2"]);
    let phase = prop::sample::select(vec!["Running", "Pending", "Succeeded"]);
    (ips(), node, phase, any::<bool>(), prop::option::of(word())).prop_map(
        move |(ips, node, phase, ready, hostname)| {
            let pod_ips: Vec<Json> = ips.iter().map(|ip| json!({"ip": ip})).collect();
            json!({
                "metadata": {"name": format!("pod{i}"), "namespace": NS, "uid": format!("uid-{i}"),
                             "labels": {"app": "web"}},
                "spec": {
                    "nodeName": node, "hostname": hostname, "subdomain": NAME,
                    "containers": [{"name": "main", "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]}],
                },
                "status": {
                    "phase": phase, "podIP": ips.first(), "podIPs": pod_ips,
                    "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}],
                },
            })
        },
    )
}

fn pods() -> impl Strategy<Value = Vec<Json>> {
    (0usize..5).prop_flat_map(|n| (0..n).map(|i| mutated(pod(i))).collect::<Vec<_>>())
}

/// Slice `web-<i>` of the Service, managed by `managed_by` (or another
/// controller), owned by it (or an older Service of the same name).
fn slice(i: usize, managed_by: &'static str) -> impl Strategy<Value = Json> {
    let endpoint = (ip(), any::<bool>(), prop::sample::select(vec!["pod0", "pod1", "pod2"])).prop_map(
        |(address, ready, pod)| {
            json!({"addresses": [address], "conditions": {"ready": ready}, "nodeName": "node-1",
                   "targetRef": {"kind": "Pod", "namespace": NS, "name": pod}})
        },
    );
    let address_type = prop::sample::select(vec!["IPv4", "IPv6", "FQDN"]);
    let manager = prop_oneof![4 => Just(managed_by), 1 => Just("other-controller")];
    let owner = prop::sample::select(vec![SVC_UID, "older-uid"]);
    let ports = prop_oneof![
        Just(json!([{"name": "http", "port": 8080, "protocol": "TCP"}])),
        Just(json!([])),
        Just(json!([{"name": "", "port": 80, "protocol": "UDP"}])),
    ];
    (address_type, manager, owner, ports, prop::collection::vec(endpoint, 0..4)).prop_map(
        move |(address_type, manager, owner, ports, endpoints)| {
            json!({
                "metadata": {
                    "name": format!("web-{i}"), "namespace": NS, "resourceVersion": "1",
                    "labels": {SERVICE_NAME: NAME, MANAGED_BY: manager},
                    "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": NAME, "uid": owner,
                                         "controller": true, "blockOwnerDeletion": true}],
                },
                "addressType": address_type, "endpoints": endpoints, "ports": ports,
            })
        },
    )
}

fn slices(managed_by: &'static str) -> impl Strategy<Value = Vec<Json>> {
    (0usize..4).prop_flat_map(move |n| (0..n).map(|i| mutated(slice(i, managed_by))).collect::<Vec<_>>())
}

/// Endpoints `ns/web` (existing, with a resourceVersion) with subsets of
/// ready and not-ready addresses.
fn endpoints() -> impl Strategy<Value = Json> {
    let address = || {
        (ip(), prop::option::of(word())).prop_map(|(ip, hostname)| {
            json!({"ip": ip, "hostname": hostname, "nodeName": "node-1",
                   "targetRef": {"kind": "Pod", "namespace": NS, "name": "pod0"}})
        })
    };
    let port = (word(), prop::sample::select(vec![80, 8080, 0, 65536]), word())
        .prop_map(|(name, port, protocol)| json!({"name": name, "port": port, "protocol": protocol}));
    let subset = (
        prop::collection::vec(address(), 0..4),
        prop::collection::vec(address(), 0..3),
        prop::collection::vec(port, 0..3),
    )
        .prop_map(|(ready, not_ready, ports)| {
            json!({"addresses": ready, "notReadyAddresses": not_ready, "ports": ports})
        });
    (prop::collection::vec(subset, 0..3), any::<bool>()).prop_map(|(subsets, skip)| {
        let labels =
            if skip { json!({"endpointslice.kubernetes.io/skip-mirror": "true"}) } else { json!({}) };
        json!({
            "metadata": {"name": NAME, "namespace": NS, "resourceVersion": "1", "labels": labels},
            "subsets": subsets,
        })
    })
}

/// The object `json` deserializes to; `Ok(None)` for `null` (absent from the
/// store). `Err` also when it is not `ns/web`: the shell looks the Service and
/// the Endpoints up by the key.
fn object<T: DeserializeOwned + kube::Resource>(json: &Json) -> Result<Option<T>, ()> {
    let key = Key { namespace: NS.into(), name: NAME.into() };
    match json {
        Json::Null => Ok(None),
        json => serde_json::from_value(json.clone())
            .map_err(|_| ())
            .and_then(|object: T| if Key::of(&object) == key { Ok(Some(object)) } else { Err(()) }),
    }
}

fn objects<T: DeserializeOwned>(list: &[Json]) -> Result<Vec<Arc<T>>, ()> {
    list.iter().map(|json| serde_json::from_value(json.clone()).map(Arc::new).map_err(|_| ())).collect()
}

/// Pods as the store keeps them: deserialized, then trimmed.
fn stored_pods(list: &[Json]) -> Result<Vec<Arc<StoredPod>>, ()> {
    let pods: Vec<Arc<StoredPod>> = objects(list)?;
    Ok(pods
        .into_iter()
        .map(|mut pod| {
            Arc::make_mut(&mut pod).trim();
            pod
        })
        .collect())
}

/// The slices the shell hands a planner: those of `ns` labelled with the
/// name; `None` when two share a name, which the apiserver never holds.
fn listed(slices: Vec<Arc<EndpointSlice>>) -> Option<Vec<Arc<EndpointSlice>>> {
    let mut names = std::collections::BTreeSet::new();
    let listed: Vec<Arc<EndpointSlice>> = slices
        .into_iter()
        .filter(|s| s.metadata.namespace.as_deref() == Some(NS))
        .filter(|s| {
            s.metadata.labels.as_ref().and_then(|l| l.get(SERVICE_NAME)).map(String::as_str) == Some(NAME)
        })
        .collect();
    let unique = listed.iter().all(|s| s.metadata.name.as_ref().is_some_and(|n| names.insert(n.clone())));
    unique.then_some(listed)
}

fn trigger(set: bool) -> Option<Time> {
    set.then(|| Time(Timestamp::from_second(1_767_225_600).unwrap_or(Timestamp::UNIX_EPOCH)))
}

/// What every written slice must be: within `max`, IP addresses of its
/// family, creates by generateName, no two creates alike.
fn check_written(plan: &Plan<EndpointSlice>, max: usize) -> Result<(), String> {
    for slice in plan.create.iter().chain(&plan.update) {
        let name = slice.metadata.name.as_deref().or(slice.metadata.generate_name.as_deref()).unwrap_or("?");
        if endpoint_count(slice) > max {
            return Err(format!("slice {name} holds {} endpoints, more than {max}", endpoint_count(slice)));
        }
        let family = IpFamily::from_name(&slice.address_type);
        for address in slice.endpoints.iter().flatten().flat_map(|e| &e.addresses) {
            let ip = address.parse::<IpAddr>().ok();
            if family.is_some() && ip.map(IpFamily::of) != family {
                return Err(format!("slice {name} ({}) holds address {address:?}", slice.address_type));
            }
        }
    }
    if plan.create.iter().any(|c| c.metadata.name.is_some() || c.metadata.generate_name.is_none()) {
        return Err("a create without generateName".into());
    }
    for (i, a) in plan.create.iter().enumerate() {
        if plan.create[i + 1..].contains(a) {
            return Err(format!("two identical creates: {a:?}"));
        }
    }
    Ok(())
}

/// Whether the apiserver would store these Endpoints ports (1..=65535, a
/// protocol). Repacking drops ports below 1 (upstream `RepackSubsets`), so
/// two subsets can then share a port set and overfill a mirrored slice that
/// every sync rewrites, upstream too; only valid objects must converge.
fn valid_ports(endpoints: Option<&Endpoints>) -> bool {
    let ports =
        endpoints.iter().flat_map(|e| e.subsets.iter().flatten()).flat_map(|s| s.ports.iter().flatten());
    ports.into_iter().all(|p| {
        (1..=65535).contains(&p.port) && matches!(p.protocol.as_deref(), Some("TCP" | "UDP" | "SCTP"))
    })
}

/// Plans and checks what it writes; with `converge`, applies and plans
/// again: the second plan must be empty.
fn check_converges(
    existing: &[Arc<EndpointSlice>],
    max: usize,
    converge: bool,
    planner: impl Fn(&[Arc<EndpointSlice>]) -> Plan<EndpointSlice>,
) -> Result<Outcome, String> {
    let first = planner(existing);
    check_written(&first, max)?;
    if !converge {
        return Ok(Outcome::Reached);
    }
    let state: Vec<Arc<EndpointSlice>> = applied(existing, &first).into_iter().map(Arc::new).collect();
    let second = planner(&state);
    if !second.is_empty() {
        return Err(format!("planning on the applied state writes again: {second:#?}"));
    }
    Ok(Outcome::Reached)
}

#[test]
fn fuzz_endpointslice_planner() {
    let input = (mutated(service()), pods(), slices(SVCPLANE_SLICE_CONTROLLER), 1usize..4, any::<bool>());
    run("endpointslice", input, |(svc, pods, slices, max, trigger_set)| {
        let (Ok(svc), Ok(pods), Ok(slices)) = (object::<Service>(svc), stored_pods(pods), objects(slices))
        else {
            return Ok(Outcome::Refused);
        };
        let Some(existing) = listed(slices) else { return Ok(Outcome::Refused) };
        let nodes = BTreeMap::from([(
            "node-1".to_owned(),
            NodeInfo {
                zone: Some("zone-a".into()),
                ready: true,
                allocatable_milli_cpu: 4000,
                control_plane: false,
            },
        )]);
        let config = SliceConfig { max_endpoints_per_slice: *max, ..SliceConfig::default() };
        check_converges(&existing, *max, true, |existing| {
            plan_slices(svc.as_ref(), &pods, &nodes, existing, trigger(*trigger_set), &config)
        })
    });
}

#[test]
fn fuzz_endpoints_planner() {
    let existing = prop_oneof![1 => Just(Json::Null), 3 => mutated(endpoints())];
    let input = (mutated(service()), pods(), existing, any::<bool>());
    run("endpoints", input, |(svc, pods, existing, trigger_set)| {
        let (Ok(svc), Ok(pods), Ok(existing)) =
            (object::<Service>(svc), stored_pods(pods), object::<Endpoints>(existing))
        else {
            return Ok(Outcome::Refused);
        };
        let key = Key { namespace: NS.into(), name: NAME.into() };
        let plan = desired_endpoints(&key, svc.as_ref(), &pods, trigger(*trigger_set), existing.as_ref());
        let written: Vec<&Endpoints> = plan.create.iter().chain(&plan.update).collect();
        if plan.create.len() + plan.update.len() + plan.delete.len() > 1 {
            return Err(format!("more than one write: {plan:#?}"));
        }
        for endpoints in &written {
            let addresses: Vec<&str> = endpoints
                .subsets
                .iter()
                .flatten()
                .flat_map(|s| s.addresses.iter().flatten().chain(s.not_ready_addresses.iter().flatten()))
                .map(|a| a.ip.as_str())
                .collect();
            if addresses.len() > MAX_CAPACITY {
                return Err(format!("{} addresses, more than {MAX_CAPACITY}", addresses.len()));
            }
            if let Some(bad) = addresses.iter().find(|a| a.parse::<IpAddr>().is_err()) {
                return Err(format!("wrote address {bad:?}"));
            }
        }
        // Once the Service is gone every sync deletes, by design.
        if svc.is_some()
            && let Some(mut stored) = written.first().map(|e| (*e).clone())
        {
            stored.metadata.resource_version = Some("w1".into());
            let again = desired_endpoints(&key, svc.as_ref(), &pods, trigger(*trigger_set), Some(&stored));
            if !again.is_empty() {
                return Err(format!("planning on the written Endpoints writes again: {again:#?}"));
            }
        }
        Ok(Outcome::Reached)
    });
}

#[test]
fn fuzz_mirroring_planner() {
    let endpoints = prop_oneof![1 => Just(Json::Null), 4 => mutated(endpoints())];
    let input = (mutated(service()), endpoints, slices(SVCPLANE_MIRRORING_CONTROLLER), 1usize..4);
    run("mirroring", input, |(svc, endpoints, slices, max)| {
        let (Ok(svc), Ok(endpoints), Ok(slices)) =
            (object::<Service>(svc), object::<Endpoints>(endpoints), objects(slices))
        else {
            return Ok(Outcome::Refused);
        };
        let Some(existing) = listed(slices) else { return Ok(Outcome::Refused) };
        let config = MirroringConfig { max_endpoints_per_subset: *max, ..MirroringConfig::default() };
        check_converges(&existing, *max, valid_ports(endpoints.as_ref()), |existing| {
            plan_mirrored_slices(svc.as_ref(), endpoints.as_ref(), existing, &config)
        })
    });
}
