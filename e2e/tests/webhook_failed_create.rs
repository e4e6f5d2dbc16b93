//! Issue #19 (item 0): a create the apiserver rejects after the mutating
//! call (a name clash, its own validation) does not keep the values the
//! webhook claimed for it, so a retry loop on a bad manifest does not drain a
//! small pool: as with kube-apiserver alone, the next good Service is admitted.

use std::time::Duration;

use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, DeleteParams, PostParams};
use kube::core::ObjectMeta;
use svcplane_e2e::webhook::*;
use svcplane_e2e::{ControlPlaneOptions, TestNamespace, shared_with, wait::eventually};

const NODE_PORTS: &str = "30100-30103";
const ATTEMPTS: usize = 6;

fn bad_session_affinity(svc: &mut Service) {
    svc.spec.as_mut().expect("spec").session_affinity = Some("Bogus".into());
}

/// `np` exists; `ATTEMPTS` creates of `np` again (409 after admission) and
/// of an invalid `bad` (422 from the apiserver's validation, after the
/// mutating call); then a good Service. Returns each failure's code and
/// message in order.
async fn retry_bad_manifests(ns: &TestNamespace) -> Vec<(u16, String)> {
    let api: Api<Service> = ns.api();
    ns.create(&mk_service("np", "NodePort", &[(80, None)])).await;
    let mut failures = Vec::new();
    let mut bad = mk_service("bad", "NodePort", &[(80, None)]);
    bad_session_affinity(&mut bad);
    for _ in 0..ATTEMPTS {
        for svc in [&mk_service("np", "NodePort", &[(80, None)]), &bad] {
            match api.create(&PostParams::default(), svc).await {
                Ok(_) => panic!("a bad create was accepted in {}", ns.name),
                Err(kube::Error::Api(status)) => failures.push((status.code, status.message)),
                Err(other) => panic!("{other}"),
            }
        }
    }
    ns.create(&mk_service("good", "NodePort", &[(80, None)])).await;
    failures
}

#[tokio::test]
async fn a_retry_loop_of_rejected_creates_does_not_drain_a_small_pool() {
    let cp = shared_with(|| ControlPlaneOptions {
        service_cidrs: "10.98.0.0/28".into(),
        node_port_range: NODE_PORTS.into(),
        ..Default::default()
    });
    let client = cp.client().await;
    install_crd(&client).await;
    let (_certs, mut args) = serving_cert(cp);
    args.node_port_range = NODE_PORTS.into();
    args.unconfirmed_grace = Duration::from_secs(2);
    let (server, ns) = replica_for_scope(cp, &client, &args, "failedcreate").await;

    // kube-apiserver alone: every attempt fails for its own reason, nothing leaks.
    let plain = TestNamespace::new(&client, "plain-failedcreate").await;
    let oracle = retry_bad_manifests(&plain).await;
    for name in ["np", "good"] {
        plain.api::<Service>().delete(name, &DeleteParams::default()).await.expect("delete");
    }
    eventually("the index sees the oracle's Services gone", Duration::from_secs(10), || async {
        let used = server.allocator.index().usage().last().map(|u| u.used).unwrap_or_default();
        if used == 0 { Ok(()) } else { Err(used) }
    })
    .await;

    // With the webhook: the same codes, never "pool is full".
    let webhook = retry_bad_manifests(&ns).await;
    let codes = |failures: &[(u16, String)]| failures.iter().map(|f| f.0).collect::<Vec<_>>();
    assert_eq!(codes(&webhook), codes(&oracle), "with the webhook: {webhook:?}");
    assert!(webhook.iter().all(|(_, message)| !message.contains("is full")), "{webhook:?}");

    // The last attempt of each name holds its values until the replica's
    // short bound, then they are released without the repair loop (which
    // this replica does not run): only np's and good's nodePorts stay.
    let node_port_claims_are = |wanted: usize| {
        let client = client.clone();
        async move {
            let names = claim_names(&client).await;
            let ports = names.iter().filter(|n| n.starts_with("nodeport-")).count();
            if ports == wanted { Ok(()) } else { Err(names) }
        }
    };
    eventually("the last attempts' claims released", Duration::from_secs(15), || node_port_claims_are(2))
        .await;

    // generateName attempts cannot be told apart from new Services, so each
    // holds its values until that bound too.
    let api: Api<Service> = ns.api();
    let mut gen_bad = mk_service("", "NodePort", &[(80, None)]);
    gen_bad.metadata = ObjectMeta { generate_name: Some("gen-".into()), ..Default::default() };
    bad_session_affinity(&mut gen_bad);
    for _ in 0..2 {
        let err = api.create(&PostParams::default(), &gen_bad).await.expect_err("invalid");
        assert!(err.to_string().contains("sessionAffinity"), "{err}");
    }
    eventually("the generateName attempts' claims released", Duration::from_secs(15), || {
        node_port_claims_are(2)
    })
    .await;
    ns.create(&mk_service("good-2", "NodePort", &[(80, None)])).await;
    server.kill();
}
