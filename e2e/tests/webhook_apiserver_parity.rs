//! Issue #19 (item 0): where a user notices, the webhook agrees with
//! kube-apiserver v1.37 alone. Each test runs the same requests in a
//! namespace the webhook does not cover (the oracle) and in one it does.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::core::ObjectMeta;
use svcplane_e2e::webhook::*;
use svcplane_e2e::{TestNamespace, shared, wait::eventually};
use svcplane_webhook::{AllocationClaim, Value};

/// How long a freed value may take to be reusable with the webhook: the
/// Service watch's lag, far below the repair loop's 90 s grace (and the
/// in-process replica runs no repair loop at all).
const RELEASE_DEADLINE: Duration = Duration::from_secs(10);

fn with_node_port(name: &str, node_port: i32) -> Service {
    mk_service(name, "NodePort", &[(80, Some(node_port))])
}

fn with_cluster_ip(name: &str, ip: &str) -> Service {
    let mut svc = mk_service(name, "ClusterIP", &[(80, None)]);
    svc.spec.as_mut().expect("spec").cluster_ip = Some(ip.to_owned());
    svc
}

/// Creates `svc`, retrying until `deadline`; returns how long it took.
async fn create_within(api: &Api<Service>, svc: &Service, deadline: Duration) -> Result<Duration, String> {
    let started = Instant::now();
    loop {
        match api.create(&PostParams::default(), svc).await {
            Ok(_) => return Ok(started.elapsed()),
            Err(error) if started.elapsed() > deadline => return Err(error.to_string()),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// NodePort -> ClusterIP frees the nodePort, -> ExternalName frees the
/// ClusterIP; then a new Service asks for the freed value.
async fn type_change_then_reuse(ns: &TestNamespace, port: i32, ip: &str) -> (Duration, Duration) {
    let api: Api<Service> = ns.api();
    ns.create(&with_node_port("np", port)).await;
    let to_cluster_ip = serde_json::json!({"spec": {"type": "ClusterIP", "ports": [{"name": "p80", "port": 80, "nodePort": null}]}});
    api.patch("np", &PatchParams::default(), &Patch::Merge(&to_cluster_ip)).await.expect("to ClusterIP");
    let port_again = create_within(&api, &with_node_port("np-again", port), RELEASE_DEADLINE)
        .await
        .unwrap_or_else(|e| panic!("nodePort {port} not reusable in {}: {e}", ns.name));

    ns.create(&with_cluster_ip("ip", ip)).await;
    let to_external = serde_json::json!({"spec": {"type": "ExternalName", "externalName": "example.com",
        "clusterIP": "", "clusterIPs": null, "ipFamilies": null, "ipFamilyPolicy": null}});
    api.patch("ip", &PatchParams::default(), &Patch::Merge(&to_external)).await.expect("to ExternalName");
    let ip_again = create_within(&api, &with_cluster_ip("ip-again", ip), RELEASE_DEADLINE)
        .await
        .unwrap_or_else(|e| panic!("clusterIP {ip} not reusable in {}: {e}", ns.name));
    (port_again, ip_again)
}

#[tokio::test]
async fn a_value_freed_by_a_type_change_is_reusable_at_once_as_without_the_webhook() {
    let cp = shared();
    let client = cp.client().await;
    install_crd(&client).await;
    let (_certs, args) = serving_cert(cp);
    let (server, ns) = replica_for_scope(cp, &client, &args, "typechange").await;
    let plain = TestNamespace::new(&client, "plain-typechange").await;

    let oracle = type_change_then_reuse(&plain, 31901, "10.96.201.1").await;
    assert_eq!(oracle.0.as_secs(), 0, "kube-apiserver frees the nodePort at once");
    assert_eq!(oracle.1.as_secs(), 0, "kube-apiserver frees the clusterIP at once");
    let webhook = type_change_then_reuse(&ns, 31902, "10.96.201.2").await;
    println!("reuse after a type change: apiserver alone {oracle:?}, with the webhook {webhook:?}");
    assert_eq!(
        server.allocator.index().claim(Value::Port(31902)).map(|c| c.owner.name.clone()),
        Some("np-again".into())
    );
    server.kill();
}

#[tokio::test]
async fn a_generate_name_service_is_named_in_its_claims_and_denials() {
    let cp = shared();
    let client = cp.client().await;
    install_crd(&client).await;
    let (_certs, args) = serving_cert(cp);
    let (server, ns) = replica_for_scope(cp, &client, &args, "genname").await;
    let api: Api<Service> = ns.api();

    let mut svc = mk_service("", "NodePort", &[(80, None)]);
    svc.metadata = ObjectMeta { generate_name: Some("gen-".into()), ..Default::default() };
    let created = ns.create(&svc).await;
    let name = created.metadata.name.clone().expect("generated name");
    let spec = created.spec.clone().expect("spec");
    let ip = spec.cluster_ip.clone().expect("clusterIP");
    let port = spec.ports.unwrap_or_default()[0].node_port.expect("nodePort");

    let claims: Api<AllocationClaim> = Api::all(client.clone());
    for value in [Value::Ip(ip.parse().expect("ip")), Value::Port(port as u16)] {
        eventually("claim names the generated Service", Duration::from_secs(10), || async {
            let claim = claims.get(&value.claim_name()).await.map_err(|e| e.to_string())?;
            if claim.spec.service == name { Ok(()) } else { Err(claim.spec.service) }
        })
        .await;
    }

    // A Service sharing the prefix is another holder: denied, naming the real one.
    eventually("denial names the generated Service", Duration::from_secs(10), || async {
        match api.create(&PostParams::default(), &with_cluster_ip("gen-other", &ip)).await {
            Err(kube::Error::Api(s))
                if s.message.contains(&format!(
                    "spec.clusterIPs[0]: {ip} is already allocated to {}/{name}",
                    ns.name
                )) =>
            {
                Ok(())
            }
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let err = api
        .create(&PostParams::default(), &with_node_port("gen-other", port))
        .await
        .expect_err("the nodePort is taken");
    assert!(err.to_string().contains(&format!("{port} is already allocated to {}/{name}", ns.name)), "{err}");

    // A placeholder claim the Service watch never re-keys (as a replica that
    // died after claiming would leave it) is re-keyed by the periodic sweep.
    let port_claim = Value::Port(port as u16).claim_name();
    claims.delete(&port_claim, &Default::default()).await.expect("delete claim");
    let placeholder = svcplane_webhook::claim::build_claim(
        Value::Port(port as u16),
        &svcplane_webhook::Owner { namespace: ns.name.clone(), name: "gen-*".into() },
    );
    eventually("placeholder claim recreated", Duration::from_secs(10), || async {
        claims.create(&PostParams::default(), &placeholder).await.map(|_| ())
    })
    .await;
    eventually("the sweep re-keys the placeholder", Duration::from_secs(30), || async {
        let claim = claims.get(&port_claim).await.map_err(|e| e.to_string())?;
        if claim.spec.service == name { Ok(()) } else { Err(claim.spec.service) }
    })
    .await;
    server.kill();
}

#[tokio::test]
async fn an_out_of_range_cluster_ip_is_denied_naming_every_range() {
    let cp = shared();
    let client = cp.client().await;
    install_crd(&client).await;
    let (_certs, args) = serving_cert(cp);
    let (server, ns) = replica_for_scope(cp, &client, &args, "range").await;
    let plain = TestNamespace::new(&client, "plain-range").await;

    let outside = with_cluster_ip("outside", "10.200.0.1");
    let oracle =
        plain.api::<Service>().create(&PostParams::default(), &outside).await.expect_err("out of range");
    let err = ns.api::<Service>().create(&PostParams::default(), &outside).await.expect_err("out of range");
    println!("out of range: apiserver alone: {oracle}\nwith the webhook: {err}");
    let text = err.to_string();
    assert!(text.contains("spec.clusterIPs[0]"), "{text}");
    assert!(text.contains("10.96.0.0/16") && text.contains("fd00:10:96::/112"), "{text}");
    server.kill();
}
