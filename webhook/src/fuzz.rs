//! Fuzz target of the request path (`make fuzz`; a few hundred inputs in
//! `make test`): body bytes → AdmissionReview → admission plan → allocator →
//! patch, through the `/mutate` and `/validate` handlers, against an index
//! over small pools and a fake apiserver that accepts every claim.
//!
//! Inputs: AdmissionReviews of Services shaped like real ones with fields
//! replaced by arbitrary JSON, and their bytes truncated, flipped or random.
//! Every answer must be a review: a 400 naming what is malformed, an allowed
//! one whose patch applies to the object, or a denial naming a field.

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{Method, Request, Response, StatusCode};
use k8s_openapi::api::core::v1::Service;
use kube::client::Body;
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

/// A claims API that creates every claim (201, with a uid) and finds nothing
/// else (404), so the allocator runs its real path without an apiserver.
fn fake_apiserver() -> kube::Client {
    let service = tower::service_fn(|request: Request<Body>| async move {
        let (parts, body) = request.into_parts();
        let (status, object) = if parts.method == Method::POST {
            let posted = body.collect_bytes().await.unwrap_or_default();
            let mut claim: Json = serde_json::from_slice(&posted).unwrap_or_default();
            claim["metadata"]["uid"] = json!("claim-uid");
            (StatusCode::CREATED, claim)
        } else {
            let status = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404});
            (StatusCode::NOT_FOUND, status)
        };
        let body = Body::from(serde_json::to_vec(&object).unwrap_or_default());
        Ok::<_, Infallible>(Response::builder().status(status).body(body).unwrap())
    });
    kube::Client::new(service, "default")
}

/// A fresh, ready index over dual-stack /28 and /124 pools and 8 NodePorts,
/// with 10.96.0.10 and 30001 held by `ns/db`.
fn state() -> AppState {
    let cidrs = parse_cidrs("10.96.0.0/28,fd00::/124").unwrap();
    let mut index = Index::new(PoolConfig::new(cidrs, "30000-30007".parse().unwrap())).unwrap();
    let db = Owner { namespace: "ns".into(), name: "db".into() };
    for value in [Value::Ip([10, 96, 0, 10].into()), Value::Port(30001)] {
        index.apply_claim(value, ClaimRecord { owner: db.clone(), uid: None });
    }
    let metrics = Arc::new(Metrics::new());
    let (_, ready) = tokio::sync::watch::channel(true);
    let allocator = crate::allocator::Allocator::new(
        fake_apiserver(),
        Arc::new(Mutex::new(index)),
        metrics.clone(),
        ready,
    );
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
        let request: Json = serde_json::from_str(&String::from_utf8_lossy(body))
            .map_err(|e| format!("accepted a body that is not JSON: {e}"))?;
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
    let body = prop_oneof![3 => mutated(review()).prop_map(|json| RawBody(json.to_string().into_bytes())), 1 => bytes(review())];
    run("webhook", (any::<bool>(), body), |(mutating, body)| {
        let body = Bytes::from(body.0.clone());
        let answer = runtime.block_on(async {
            // The client's buffer task needs the runtime.
            let state = State(state());
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
