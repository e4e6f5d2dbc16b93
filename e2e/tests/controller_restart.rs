//! A controller restart with nothing changed writes nothing: the new process rebuilds
//! its caches, reconciles every Service, and finds every slice and Endpoints already
//! as desired. Its own binary: it counts the apiserver's writes cluster-wide.

use std::time::Duration;

use k8s_openapi::api::core::v1::Endpoints;
use svcplane_e2e::{
    TestNamespace,
    fixtures::{ensure_node, mk_pod, mk_port, mk_service},
    shared,
    slices::{SVCPLANE, normalize, slices_of},
    wait::{eventually, poll_until},
};

#[tokio::test]
async fn restart_with_nothing_changed_writes_nothing() {
    let cp = shared();
    let client = cp.client().await;
    ensure_node(&client, "node-a", "192.0.2.1", Some("zone-a")).await;
    let ns = TestNamespace::new(&client, "restart").await;
    let first = cp.svcplane("restart-1", &[]).await;

    // 20 Services of 12 Pods each, some not ready, one headless, one dual-stack.
    for s in 0..20 {
        let mut svc =
            mk_service(&format!("s{s}"), &[("app", &format!("s{s}"))], vec![mk_port("http", 80, "http")]);
        if s == 0 {
            svc.spec.as_mut().expect("spec").cluster_ip = Some("None".into());
        }
        if s == 1 {
            svc.spec.as_mut().expect("spec").ip_family_policy = Some("RequireDualStack".into());
        }
        ns.create(&svc).await;
        for p in 0..12 {
            let ips = [format!("10.30.{s}.{}", p + 1), format!("fd00:30:{s}::{}", p + 1)];
            let ips: Vec<&str> = ips.iter().map(String::as_str).collect();
            ns.running_pod(
                mk_pod(&format!("s{s}-p{p}"), &[("app", &format!("s{s}"))], "node-a", &[("http", 8080)]),
                &ips,
                p % 5 != 0,
            )
            .await;
        }
    }
    for s in 0..20 {
        let name = format!("s{s}");
        let want = if s == 1 { 24 } else { 12 };
        eventually(&format!("{name} converged"), Duration::from_secs(60), || {
            let (api, name) = (ns.api(), name.clone());
            async move {
                let n = normalize(&slices_of(&api, &name, SVCPLANE).await);
                if n.endpoint_count() == want { Ok(()) } else { Err(n.endpoint_count()) }
            }
        })
        .await;
        eventually(&format!("Endpoints {name}"), Duration::from_secs(60), || {
            let (api, name) = (ns.api::<Endpoints>(), name.clone());
            async move { api.get_opt(&name).await.map_err(|e| e.to_string())?.ok_or("missing".to_string()) }
        })
        .await;
    }
    // Let the first process drain its queue before stopping it.
    poll_until(Duration::from_secs(30), Duration::from_millis(100), || async {
        Ok(first.metric_sum("svcplane_queue_depth", &[]).await == 0.0)
    })
    .await
    .expect("first process idle");
    let status = first.terminate(Duration::from_secs(15)).await;
    assert!(status.is_some_and(|s| s.success()), "graceful shutdown on SIGTERM exits 0: {status:?}");

    let slices_before = cp.apiserver_writes(&client, "endpointslices").await;
    let endpoints_before = cp.apiserver_writes(&client, "endpoints").await;
    assert!(
        slices_before >= 20.0 && endpoints_before >= 20.0,
        "the first run did write: {slices_before} {endpoints_before}"
    );

    // Every Service of the cluster (default/kubernetes too) is synced by each
    // controller of the new process.
    let services = kube::Api::<k8s_openapi::api::core::v1::Service>::all(client.clone())
        .list(&Default::default())
        .await
        .expect("list Services")
        .items
        .len() as f64;
    let second = cp.svcplane("restart-2", &[]).await;
    // Every Service reconciled by both controllers, and nothing left in the queues
    // (svcplane_queue_depth counts delayed keys too).
    poll_until(Duration::from_secs(60), Duration::from_millis(100), || async {
        let text = second.metrics_text().await;
        let synced = |c: &str| {
            svcplane_e2e::svcplane::sum_metric(
                &text,
                "svcplane_syncs_total",
                &[&format!("controller=\"{c}\"")],
            )
        };
        let idle = svcplane_e2e::svcplane::sum_metric(&text, "svcplane_queue_depth", &[]) == 0.0;
        Ok(idle && synced("endpointslice") >= services && synced("endpoints") >= services)
    })
    .await
    .expect("second process reconciled every Service");

    assert_eq!(second.metric_sum("svcplane_changes_total", &[]).await, 0.0, "svcplane counted no writes");
    assert_eq!(
        cp.apiserver_writes(&client, "endpointslices").await,
        slices_before,
        "no EndpointSlice writes"
    );
    assert_eq!(cp.apiserver_writes(&client, "endpoints").await, endpoints_before, "no Endpoints writes");
}
