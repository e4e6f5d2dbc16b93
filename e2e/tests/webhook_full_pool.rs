//! Issue #7: a full pool gives a denial that names the pool, on a cluster
//! with a tiny Service CIDR and NodePort range.

use k8s_openapi::api::core::v1::Service;
use kube::api::PostParams;
use svcplane_e2e::webhook::*;
use svcplane_e2e::{ControlPlaneOptions, shared_with};

#[tokio::test]
async fn a_full_pool_is_denied_naming_the_pool() {
    let cp = shared_with(|| ControlPlaneOptions {
        service_cidrs: "10.97.0.0/28".into(),
        node_port_range: "30000-30003".into(),
        ..Default::default()
    });
    let client = cp.client().await;
    install_crd(&client).await;
    let (_certs, mut args) = serving_cert(cp);
    args.node_port_range = "30000-30003".into();
    let (server, ns) = replica_for_scope(cp, &client, &args, "full").await;

    // Four NodePorts fit; the fifth finds the range full.
    for i in 0..4 {
        ns.create(&mk_service(&format!("np-{i}"), "NodePort", &[(80, None)])).await;
    }
    let err = ns
        .api::<Service>()
        .create(&PostParams::default(), &mk_service("np-4", "NodePort", &[(80, None)]))
        .await
        .expect_err("port pool is full");
    assert!(
        err.to_string().contains("spec.ports: failed to allocate a NodePort: pool 30000-30003 is full"),
        "{err}"
    );

    // A /28 has 14 addresses, the kubernetes Service holds one; fill the rest.
    let mut last = None;
    for i in 0..14 {
        match ns
            .api::<Service>()
            .create(&PostParams::default(), &mk_service(&format!("ip-{i}"), "ClusterIP", &[(80, None)]))
            .await
        {
            Ok(_) => {}
            Err(e) => {
                last = Some(e.to_string());
                break;
            }
        }
    }
    let text = last.expect("the IP pool fills up");
    assert!(
        text.contains("spec.clusterIPs[0]: failed to allocate a ClusterIP: pool 10.97.0.0/28 is full"),
        "{text}"
    );
    server.kill();
}
