//! Issue #19 items 2 and 5: sticky IPs on a real kube-apiserver. A Service
//! deleted and re-created under the same namespace/name within
//! `--webhook-retention` gets its ClusterIP and NodePort back; another
//! Service cannot have them within the window; the window ends; the
//! retention survives a replica restart; a full pool takes a retained value.
//!
//! A tiny Service CIDR and NodePort range, so a pool fills quickly; the tests
//! run one at a time, since they all draw from (and retain in) those pools.

use std::time::Duration;

use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, DeleteParams, PostParams};
use svcplane_e2e::webhook::*;
use svcplane_e2e::{ControlPlaneOptions, shared_with, wait::eventually};
use svcplane_webhook::retention::RETAINED_UNTIL;
use svcplane_webhook::{AllocationClaim, Value, WebhookArgs};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const NODE_PORTS: &str = "30000-30004";

fn control_plane() -> &'static svcplane_e2e::ControlPlane {
    shared_with(|| ControlPlaneOptions {
        service_cidrs: "10.97.0.0/28".into(),
        node_port_range: NODE_PORTS.into(),
        ..Default::default()
    })
}

/// One test's set-up: its turn, a replica with `retention` registered for a
/// namespace of its own (`scope`).
struct Sticky {
    _serial: tokio::sync::MutexGuard<'static, ()>,
    _certs: tempfile::TempDir,
    cp: &'static svcplane_e2e::ControlPlane,
    client: kube::Client,
    args: WebhookArgs,
    server: svcplane_webhook::WebhookServer,
    ns: svcplane_e2e::TestNamespace,
    api: Api<Service>,
}

async fn sticky(scope: &str, retention: Duration) -> Sticky {
    let _serial = SERIAL.lock().await;
    let cp = control_plane();
    let client = cp.client().await;
    install_crd(&client).await;
    let (_certs, base) = serving_cert(cp);
    let args = WebhookArgs { node_port_range: NODE_PORTS.into(), retention, ..base };
    let (server, ns) = replica_for_scope(cp, &client, &args, scope).await;
    let api = ns.api();
    Sticky { _serial, _certs, cp, client, args, server, ns, api }
}

/// The ClusterIP and first nodePort of a created Service.
fn values_of(svc: &Service) -> (Value, Value) {
    let spec = svc.spec.as_ref().expect("spec");
    let ip = spec.cluster_ip.as_deref().expect("clusterIP").parse().expect("an IP");
    let port = spec.ports.as_ref().and_then(|p| p[0].node_port).expect("nodePort");
    (Value::Ip(ip), Value::Port(u16::try_from(port).expect("port")))
}

/// Waits until the claims of `values` are retained for `owner`.
async fn wait_retained(client: &kube::Client, values: &[Value], owner: &str) {
    let claims: Api<AllocationClaim> = Api::all(client.clone());
    eventually("claims retained for the deleted Service", Duration::from_secs(20), || async {
        for value in values {
            let claim = claims.get_opt(&value.claim_name()).await.map_err(|e| e.to_string())?;
            let retained = claim.as_ref().is_some_and(|c| {
                format!("{}/{}", c.spec.namespace, c.spec.service) == owner
                    && c.metadata.annotations.as_ref().is_some_and(|a| a.contains_key(RETAINED_UNTIL))
            });
            if !retained {
                return Err(format!("{value}: {claim:?}"));
            }
        }
        Ok(())
    })
    .await;
}

/// Waits until the replica's Service watch has seen `name` holding its
/// values: a Service deleted within milliseconds of its create, before any
/// watch saw it, is not retained (see webhook/README.md).
async fn wait_seen(server: &svcplane_webhook::WebhookServer, namespace: &str, name: &str) {
    let owner = svcplane_webhook::Owner { namespace: namespace.into(), name: name.into() };
    eventually("the Service seen by the replica", Duration::from_secs(20), || async {
        let values = server.allocator.index().service_values(&owner);
        if values.len() >= 2 { Ok(()) } else { Err(values) }
    })
    .await;
}

/// Deletes the claims of `namespace`'s Services: the pools are shared by
/// the tests of this binary, and a replica started later sees no delete to
/// retain or release them by.
async fn release_claims_of(client: &kube::Client, namespace: &str) {
    let claims: Api<AllocationClaim> = Api::all(client.clone());
    for name in claim_names_in(client, namespace).await {
        claims.delete(&name, &DeleteParams::default()).await.expect("delete claim");
    }
}

async fn delete(api: &Api<Service>, name: &str) {
    api.delete(name, &DeleteParams::default()).await.expect("delete Service");
}

#[tokio::test]
async fn a_service_re_created_right_after_its_delete_keeps_its_cluster_ip_and_node_port() {
    let Sticky { _serial, _certs, cp: _, client, args: _, server, ns, api } =
        sticky("sticky-recreate", Duration::from_secs(600)).await;

    let first = values_of(&ns.create(&mk_service("web", "NodePort", &[(80, None)])).await);
    wait_seen(&server, &ns.name, "web").await;
    delete(&api, "web").await;
    // No wait: kube-apiserver frees the IPAddress and the nodePort in the
    // delete itself (afterDelete), so it accepts them again at once.
    let again = values_of(&ns.create(&mk_service("web", "NodePort", &[(80, None)])).await);
    assert_eq!(again, first, "the same ClusterIP and nodePort");
    // The claims are the Service's own again, not retained any more.
    let claims: Api<AllocationClaim> = Api::all(client.clone());
    eventually("retention removed once the Service holds its values", Duration::from_secs(20), || async {
        let claim = claims.get(&first.0.claim_name()).await.map_err(|e| e.to_string())?;
        let retained = claim.metadata.annotations.as_ref().is_some_and(|a| a.contains_key(RETAINED_UNTIL));
        if retained { Err(format!("{claim:?}")) } else { Ok(()) }
    })
    .await;
    delete(&api, "web").await;
    server.kill();
}

#[tokio::test]
async fn another_service_cannot_take_retained_values_within_the_window_and_can_after_it() {
    let Sticky { _serial, _certs, cp: _, client, args, server, ns, api } =
        sticky("sticky-others", Duration::from_secs(4)).await;

    let (ip, port) = values_of(&ns.create(&mk_service("web", "NodePort", &[(80, None)])).await);
    delete(&api, "web").await;
    wait_retained(&client, &[ip, port], &format!("{}/web", ns.name)).await;

    // Asked for explicitly: denied, naming the retention and its owner.
    let mut thief = mk_service("thief", "NodePort", &[(80, Some(i32::from(port_number(port))))]);
    thief.spec.as_mut().expect("spec").cluster_ip = Some(ip.to_string());
    let err = api.create(&PostParams::default(), &thief).await.expect_err("retained values are denied");
    let text = err.to_string();
    let owner = format!("{}/web (deleted; retained for its re-creation until ", ns.name);
    assert!(text.contains(&format!("{ip} is already allocated to {owner}")), "{text}");
    let ports_only = mk_service("thief", "NodePort", &[(80, Some(i32::from(port_number(port))))]);
    let err = api.create(&PostParams::default(), &ports_only).await.expect_err("retained port denied");
    assert!(err.to_string().contains(&format!("{port} is already allocated to {owner}")), "{err}");

    // After the window the repair pass releases them.
    eventually("retained claims released after the window", Duration::from_secs(30), || async {
        repair_pass(&client, &args, &mut args.usage_alerts().expect("thresholds")).await?;
        let names = claim_names(&client).await;
        let left: Vec<_> = [ip, port].into_iter().filter(|v| names.contains(&v.claim_name())).collect();
        if left.is_empty() { Ok(()) } else { Err(format!("still claimed: {left:?}")) }
    })
    .await;
    let taken = ns.create(&thief).await;
    assert_eq!(values_of(&taken), (ip, port), "free for anyone after the window");
    delete(&api, "thief").await;
    server.kill();
}

#[tokio::test]
async fn retention_survives_a_replica_restart() {
    let Sticky { _serial, _certs, cp, client, args, server, ns, api } =
        sticky("sticky-restart", Duration::from_secs(600)).await;

    let first = values_of(&ns.create(&mk_service("web", "NodePort", &[(80, None)])).await);
    delete(&api, "web").await;
    wait_retained(&client, &[first.0, first.1], &format!("{}/web", ns.name)).await;
    server.kill();

    // A new replica knows the retention only from the cluster.
    let restarted = start_replica(&args, &client).await;
    register(&client, cp, "svcplane-sticky-restart", restarted.addr, "sticky-restart").await;
    wait_webhook_active(&ns, &restarted).await;
    let again = values_of(&ns.create(&mk_service("web", "NodePort", &[(80, None)])).await);
    assert_eq!(again, first, "the same ClusterIP and nodePort after the restart");
    delete(&api, "web").await;
    restarted.kill();
}

#[tokio::test]
async fn a_full_pool_skips_retained_values_until_nothing_else_is_free_then_takes_one() {
    let Sticky { _serial, _certs, cp: _, client, args: _, server, ns, api } =
        sticky("sticky-full", Duration::from_secs(600)).await;

    let (ip, port) = values_of(&ns.create(&mk_service("old", "NodePort", &[(80, None)])).await);
    delete(&api, "old").await;
    wait_retained(&client, &[ip, port], &format!("{}/old", ns.name)).await;

    // Fill each pool. While it has a free value, no new Service gets a
    // retained one; once it has none, the retained value whose window ends
    // first is taken (other tests' retained values may come before ours).
    for (kind, wanted, pool) in [("NodePort", port, 1), ("ClusterIP", ip, 0)] {
        let mut taken = false;
        for i in 0..16 {
            let free = server.allocator.index().usage()[pool].free;
            let name = format!("{}-{i}", kind.to_lowercase());
            let created = api.create(&PostParams::default(), &mk_service(&name, kind, &[(80, None)])).await;
            let created = created.unwrap_or_else(|e| panic!("create {name} with {free} free: {e}"));
            let (new_ip, new_port) = values_of_any(&created);
            if [Some(new_ip), new_port].contains(&Some(wanted)) {
                assert_eq!(free, 0, "{name} took the retained {wanted} while its pool had free values");
                taken = true;
                break;
            }
        }
        assert!(taken, "the retained {wanted} was taken once its pool was full");
    }
    server.kill();
    api.delete_collection(&DeleteParams::default(), &Default::default()).await.expect("delete Services");
    release_claims_of(&client, &ns.name).await;
}

/// The ClusterIP and the first nodePort, if any, of a created Service.
fn values_of_any(svc: &Service) -> (Value, Option<Value>) {
    let spec = svc.spec.as_ref().expect("spec");
    let ip = spec.cluster_ip.as_deref().expect("clusterIP").parse().expect("an IP");
    let port = spec.ports.as_ref().and_then(|p| p[0].node_port).and_then(|p| u16::try_from(p).ok());
    (Value::Ip(ip), port.map(Value::Port))
}

fn port_number(value: Value) -> u16 {
    match value {
        Value::Port(port) => port,
        Value::Ip(_) => panic!("not a port"),
    }
}
