//! Issue #7: a full pool gives a denial that names the pool, on a cluster
//! with a tiny Service CIDR and NodePort range. Issue #19 item 3: the repair
//! leader warns once per usage threshold reached, on the pool's object.

use k8s_openapi::api::core::v1::Service;
use kube::api::{DeleteParams, PostParams};
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

    let mut alerts = args.usage_alerts().expect("default thresholds 80,95");
    // A /28 has 14 addresses, the kubernetes Service and the four NodePort
    // Services hold five; fill the rest, with a repair pass at 12 of 14 (85 %).
    let mut last = None;
    for i in 0..14 {
        if i == 7 {
            repair_pass(&client, &args, &mut alerts).await.expect("repair pass");
            let events = usage_events(&client).await;
            let ips: Vec<_> = events.iter().filter(|e| e.0 == "ServiceCIDR/kubernetes").collect();
            assert_eq!(ips.len(), 1, "one Warning for 80 %: {events:?}");
            assert!(ips[0].2.starts_with("pool 10.97.0.0/28 is 85% used (12 of 14), over 80%"), "{events:?}");
            let ports: Vec<_> = events.iter().filter(|e| e.0 == "Service/kubernetes").collect();
            assert_eq!(ports.len(), 1, "a full NodePort range warns once, for 95 %: {events:?}");
            assert!(
                ports[0].2.starts_with("NodePort range 30000-30003 is 100% used (4 of 4), over 95%"),
                "{events:?}"
            );
        }
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

    // Full: one more Warning (95 %) for the IP pool, a new Event with its own
    // note; none for the ports; a second pass repeats nothing.
    repair_pass(&client, &args, &mut alerts).await.expect("repair pass");
    repair_pass(&client, &args, &mut alerts).await.expect("repair pass");
    let events = usage_events(&client).await;
    let seen: Vec<(&str, &str, &str, i32)> = events
        .iter()
        .map(|(o, r, n, times)| (o.as_str(), r.as_str(), n.split(',').next().unwrap_or(""), *times))
        .collect();
    assert_eq!(
        seen,
        [
            ("Service/kubernetes", "PoolUsageHigh", "NodePort range 30000-30003 is 100% used (4 of 4)", 1),
            ("ServiceCIDR/kubernetes", "PoolUsageHigh", "pool 10.97.0.0/28 is 100% used (14 of 14)", 1),
            ("ServiceCIDR/kubernetes", "PoolUsageHigh", "pool 10.97.0.0/28 is 85% used (12 of 14)", 1),
        ],
        "{events:?}"
    );

    // Back under 80 %: one Normal.
    for i in 0..8 {
        let deleted = ns.api::<Service>().delete(&format!("ip-{i}"), &DeleteParams::default()).await;
        deleted.expect("delete a ClusterIP Service");
    }
    // The replica releases their claims as its watch sees the deletes: pass
    // until the pool is counted under 80 %.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let events = loop {
        repair_pass(&client, &args, &mut alerts).await.expect("repair pass");
        let events = usage_events(&client).await;
        if events.iter().any(|e| e.1 == "PoolUsageNormal") || std::time::Instant::now() > deadline {
            break events;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    let normal: Vec<_> = events.iter().filter(|e| e.1 == "PoolUsageNormal").collect();
    assert_eq!(normal.len(), 1, "one Normal within 30 s: {events:?}");
    assert!(normal[0].2.starts_with("pool 10.97.0.0/28 is "), "{events:?}");
    assert!(normal[0].2.ends_with("under 80% again"), "{events:?}");
    server.kill();
}
