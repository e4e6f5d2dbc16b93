//! Fuzz target of the request path (`make fuzz`; a few hundred inputs in
//! `make test`): body bytes → AdmissionReview → admission plan → allocator →
//! patch, through the `/mutate` and `/validate` handlers, against an index
//! over small pools and no apiserver (see [`no_apiserver`]).
//!
//! Inputs: AdmissionReviews of Services shaped like real ones with fields
//! replaced by arbitrary JSON, and their bytes truncated, flipped or random.
//! Every answer must be a review: a 400 naming what is malformed, an allowed
//! one whose patch applies to the object, or a denial naming a field.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use k8s_openapi::api::core::v1::Service;
use kube::core::admission::AdmissionReview;
use proptest::prelude::*;
use serde_json::{Value as Json, json};
use svcplane_fuzz::Body as RawBody;
use svcplane_fuzz::{Outcome, bytes, mutated, run, word};

use crate::claim::{Owner, Value};
use crate::handler::{AppState, mutate, validate};
use crate::index::{ClaimRecord, Index};
use crate::metrics::Metrics;
use crate::pools::{PoolConfig, parse_cidrs};

/// A client of an address nothing listens on: there is no apiserver here,
/// and no fake of one. A dry-run request must be answered without it (the
/// allocator only picks); any other that needs a claim gets the 500 a failed
/// claim create gives, so the allocator's path up to its first write is what
/// this target covers, and the real apiserver's e2e suites cover the rest.
fn no_apiserver() -> kube::Client {
    let config = kube::Config::new("http://127.0.0.1:1".parse().expect("a URL"));
    kube::Client::try_from(config).expect("a client")
}

/// A fresh, ready index over dual-stack /28 and /124 pools and 8 NodePorts,
/// with 10.96.0.10 and 30001 held by `ns/db`.
fn state(client: kube::Client) -> AppState {
    let cidrs = parse_cidrs("10.96.0.0/28,fd00::/124").unwrap();
    let mut index = Index::new(PoolConfig::new(cidrs, "30000-30007".parse().unwrap())).unwrap();
    let db = Owner { namespace: "ns".into(), name: "db".into() };
    for value in [Value::Ip([10, 96, 0, 10].into()), Value::Port(30001)] {
        index.apply_claim(value, ClaimRecord { owner: db.clone(), uid: None });
    }
    let metrics = Arc::new(Metrics::new());
    let (_, ready) = tokio::sync::watch::channel(true);
    let allocator =
        crate::allocator::Allocator::new(client, Arc::new(Mutex::new(index)), metrics.clone(), ready);
    AppState { allocator, metrics }
}

fn service() -> impl Strategy<Value = Json> {
    let ip =
        prop::sample::select(vec!["", "None", "10.96.0.3", "10.96.0.10", "10.97.0.1", "fd00::3", "fd01::1"]);
    let node_port = prop::option::of(prop::sample::select(vec![0, 30000, 30001, 30005, 29999, 70000, -1]));
    let port = (prop::sample::select(vec![80, 443, 0]), word(), node_port)
        .prop_map(|(port, name, node_port)| json!({"port": port, "name": name, "protocol": "TCP", "nodePort": node_port}));
    let kind = prop::sample::select(vec!["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"]);
    let policy =
        prop::option::of(prop::sample::select(vec!["SingleStack", "PreferDualStack", "RequireDualStack"]));
    let families = prop::sample::subsequence(vec!["IPv4", "IPv6"], 0..=2);
    let lb = (
        prop::option::of(any::<bool>()),
        prop::sample::select(vec!["Local", "Cluster"]),
        prop::option::of(prop::sample::select(vec![30002, 30001, 0])),
    );
    (kind, prop::collection::vec(ip, 0..3), policy, families, prop::collection::vec(port, 0..3), lb).prop_map(
        |(kind, ips, policy, families, ports, (allocate, traffic, health))| {
            json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": {"name": "web", "namespace": "ns"},
                "spec": {
                    "type": kind, "selector": {"app": "web"}, "clusterIP": ips.first(), "clusterIPs": ips,
                    "ipFamilyPolicy": policy, "ipFamilies": families, "ports": ports,
                    "allocateLoadBalancerNodePorts": allocate, "externalTrafficPolicy": traffic,
                    "healthCheckNodePort": health,
                },
            })
        },
    )
}

fn review() -> impl Strategy<Value = Json> {
    let operation = prop::sample::select(vec!["CREATE", "UPDATE", "DELETE", "CONNECT"]);
    let old = prop_oneof![Just(Json::Null), service()];
    (operation, service(), old, any::<bool>()).prop_map(|(operation, object, old, dry_run)| {
        json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {
                "uid": "req-1", "kind": {"group": "", "version": "v1", "kind": "Service"},
                "resource": {"group": "", "version": "v1", "resource": "services"},
                "name": "web", "namespace": "ns", "operation": operation, "userInfo": {},
                "object": object, "oldObject": old, "dryRun": dry_run,
            },
        })
    })
}

/// Checks one answer to `body`.
fn check_answer(body: &[u8], status: StatusCode, answer: &[u8]) -> Result<Outcome, String> {
    let text = String::from_utf8_lossy(answer);
    let review: AdmissionReview<Service> =
        serde_json::from_slice(answer).map_err(|e| format!("the answer is not a review ({e}): {text}"))?;
    let response = review.response.ok_or_else(|| format!("a review without a response: {text}"))?;
    let message = &response.result.message;
    if status == StatusCode::BAD_REQUEST {
        let says_what =
            message.strip_prefix("malformed AdmissionReview: ").is_some_and(|why| !why.is_empty());
        return match (response.allowed, says_what) {
            (false, true) => Ok(Outcome::Refused),
            _ => Err(format!("a 400 must deny and say what is malformed: {text}")),
        };
    }
    if status != StatusCode::OK {
        return Err(format!("answered {status}: {text}"));
    }
    let request: Option<Json> = serde_json::from_str(&String::from_utf8_lossy(body)).ok();
    let dry_run = request.as_ref().is_some_and(|r| r["request"]["dryRun"] == json!(true));
    if !response.allowed && response.result.code == 500 {
        return match (dry_run, message.contains("failed to record the allocation")) {
            (false, true) => Ok(Outcome::Reached),
            (true, _) => Err(format!("a dry-run request must not call the apiserver: {text}")),
            (false, false) => Err(format!("a 500 other than a failed claim write: {text}")),
        };
    }
    if !response.allowed {
        // 422: the user's values; a field is named (`spec.…: why`, or the
        // apiserver's `[spec.…: why, spec.…: why]` for several).
        if response.result.code != 422 || !message.contains("spec.") || !message.contains(": ") {
            return Err(format!("a denial must name the field and why: {text}"));
        }
        return Ok(Outcome::Reached);
    }
    if let Some(patch) = &response.patch {
        let patch: json_patch::Patch =
            serde_json::from_slice(patch).map_err(|e| format!("bad patch ({e}): {text}"))?;
        // Lossy: serde skips unknown fields without checking their UTF-8.
        let request = request.ok_or("accepted a body that is not JSON")?;
        let mut object = request["request"]["object"].clone();
        json_patch::patch(&mut object, &patch)
            .map_err(|e| format!("the patch does not apply ({e}): {text}"))?;
        serde_json::from_value::<Service>(object)
            .map_err(|e| format!("the patched object is no Service: {e}"))?;
        check_written(&patch)?;
    }
    Ok(Outcome::Reached)
}

/// What the patch writes are values from the pools: IPs (distinct in
/// `clusterIPs`) and NodePorts in 30000-30007.
fn check_written(patch: &json_patch::Patch) -> Result<(), String> {
    for op in &patch.0 {
        let json_patch::PatchOperation::Add(add) = op else { return Err(format!("unexpected {op}")) };
        let (path, value) = (add.path.to_string(), &add.value);
        let ip = |v: &Json| v.as_str().and_then(|s| s.parse::<std::net::IpAddr>().ok());
        let fine = match path.as_str() {
            "/spec/clusterIP" => ip(value).is_some(),
            "/spec/clusterIPs" => value.as_array().is_some_and(|ips| {
                let parsed: Option<BTreeSet<_>> = ips.iter().map(ip).collect();
                parsed.is_some_and(|set| set.len() == ips.len())
            }),
            "/spec" => value == &json!({}),
            "/spec/ipFamilies" | "/spec/ipFamilyPolicy" => true,
            _ => value.as_u64().is_some_and(|port| (30000..=30007).contains(&port)),
        };
        if !fine {
            return Err(format!("patched {path} to {value}"));
        }
    }
    Ok(())
}

#[test]
fn fuzz_webhook() {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    // One client for every input (building its TLS connector is slow); its
    // buffer task needs the runtime.
    let client = runtime.block_on(async { no_apiserver() });
    let body = prop_oneof![3 => mutated(review()).prop_map(|json| RawBody(json.to_string().into_bytes())), 1 => bytes(review())];
    run("webhook", (any::<bool>(), body), |(mutating, body)| {
        let body = Bytes::from(body.0.clone());
        let answer = runtime.block_on(async {
            let state = State(state(client.clone()));
            let response = if *mutating {
                mutate(state, body.clone()).await
            } else {
                validate(state, body.clone()).await
            };
            let status = response.status();
            (status, axum::body::to_bytes(response.into_body(), usize::MAX).await)
        });
        let (status, Ok(answer)) = answer else { return Err("unreadable answer".into()) };
        check_answer(&body, status, &answer)
    });
}
