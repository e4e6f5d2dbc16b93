//! svcplane's legacy Endpoints controller on a real apiserver (no
//! kube-controller-manager): addresses and notReadyAddresses, publishNotReadyAddresses,
//! deletion with the Service, and user Endpoints of selectorless Services left alone.

use std::time::Duration;

use k8s_openapi::api::core::v1::{Endpoints, Service};
use kube::api::{DeleteParams, PostParams};
use serde_json::json;
use svcplane_e2e::{
    TestNamespace,
    differential::normalize_endpoints,
    fixtures::{ensure_node, mk_pod, mk_port, mk_service},
    shared,
    svcplane::shared_svcplane,
    wait::eventually,
};

async fn setup(prefix: &str) -> TestNamespace {
    // One worker and no batching: keys are synced one at a time in the order the
    // watch delivered them, which `caught_up` relies on.
    shared_svcplane(
        "endpoints",
        &["--controllers=endpoints", "--concurrency=1", "--min-sync-interval=0s", "--burst-batch-delay=0s"],
    );
    let client = shared().client().await;
    ensure_node(&client, "node-a", "192.0.2.1", None).await;
    TestNamespace::new(&client, prefix).await
}

/// Creates a selector Service `marker` and waits for its Endpoints: once they
/// exist, the controller has processed every earlier event of the namespace
/// (one worker takes keys in the order the Service watch delivered them, and a
/// sync completes before the next starts).
async fn caught_up(ns: &TestNamespace, marker: &str) {
    ns.create(&mk_service(marker, &[("app", "m")], vec![mk_port("http", 80, "80")])).await;
    wait_endpoints(
        ns,
        marker,
        &["label endpoints.kubernetes.io/managed-by=endpoint-controller", "label team=e2e"],
    )
    .await;
}

async fn wait_endpoints(ns: &TestNamespace, name: &str, want: &[&str]) {
    let want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
    eventually(&format!("Endpoints {name}"), Duration::from_secs(30), || {
        let (api, want) = (ns.api::<Endpoints>(), want.clone());
        async move {
            let got = normalize_endpoints(api.get_opt(name).await.map_err(|e| vec![e.to_string()])?.as_ref());
            if got == want { Ok(()) } else { Err(got) }
        }
    })
    .await;
}

#[tokio::test]
async fn ready_and_not_ready_pods_land_in_addresses_and_not_ready_addresses() {
    let ns = setup("ep-basic").await;
    ns.create(&mk_service("web", &[("app", "web")], vec![mk_port("http", 80, "http")])).await;
    ns.running_pod(mk_pod("a", &[("app", "web")], "node-a", &[("http", 8080)]), &["10.50.0.1"], true).await;
    ns.running_pod(mk_pod("b", &[("app", "web")], "node-a", &[("http", 8080)]), &["10.50.0.2"], false).await;
    wait_endpoints(
        &ns,
        "web",
        &[
            "[http:8080/TCP] notready 10.50.0.2 host= node=node-a target=b",
            "[http:8080/TCP] ready 10.50.0.1 host= node=node-a target=a",
            "label endpoints.kubernetes.io/managed-by=endpoint-controller",
            "label team=e2e",
        ],
    )
    .await;
    ns.api::<Service>().delete("web", &DeleteParams::default()).await.expect("delete service");
    wait_endpoints(&ns, "web", &["<none>"]).await;
}

#[tokio::test]
async fn publish_not_ready_headless_service_lists_every_pod_as_ready() {
    let ns = setup("ep-headless").await;
    let mut svc = mk_service("zk", &[("app", "zk")], vec![mk_port("peer", 2888, "2888")]);
    let spec = svc.spec.as_mut().expect("spec");
    spec.cluster_ip = Some("None".into());
    spec.publish_not_ready_addresses = Some(true);
    ns.create(&svc).await;
    let mut pod = mk_pod("zk-0", &[("app", "zk")], "node-a", &[]);
    let ps = pod.spec.as_mut().expect("spec");
    ps.hostname = Some("zk-0".into());
    ps.subdomain = Some("zk".into());
    ns.running_pod(pod, &["10.50.1.1"], false).await;
    wait_endpoints(
        &ns,
        "zk",
        &[
            "[peer:2888/TCP] ready 10.50.1.1 host=zk-0 node=node-a target=zk-0",
            "label endpoints.kubernetes.io/managed-by=endpoint-controller",
            "label service.kubernetes.io/headless=",
            "label team=e2e",
        ],
    )
    .await;
}

#[tokio::test]
async fn hand_written_endpoints_of_a_selectorless_service_are_left_alone() {
    let ns = setup("ep-selectorless").await;
    ns.create(&mk_service("db", &[], vec![mk_port("sql", 5432, "5432")])).await;
    let ep: Endpoints = serde_json::from_value(json!({
        "metadata": {"name": "db"},
        "subsets": [{"addresses": [{"ip": "192.0.2.50"}], "ports": [{"name": "sql", "port": 5432}]}]
    }))
    .expect("endpoints");
    let created = ns.api::<Endpoints>().create(&PostParams::default(), &ep).await.expect("create");
    // A selector Service created afterwards: once its Endpoints appear, the
    // controller has processed the earlier events too.
    caught_up(&ns, "marker-1").await;
    let after = ns.api::<Endpoints>().get("db").await.expect("db endpoints");
    assert_eq!(after.metadata.resource_version, created.metadata.resource_version, "untouched");
}

#[tokio::test]
async fn hand_written_endpoints_created_before_their_service_are_kept() {
    let ns = setup("ep-early").await;
    let ep: Endpoints = serde_json::from_value(json!({
        "metadata": {"name": "early"},
        "subsets": [{"addresses": [{"ip": "192.0.2.60"}], "ports": [{"name": "sql", "port": 5432}]}]
    }))
    .expect("endpoints");
    let created = ns.api::<Endpoints>().create(&PostParams::default(), &ep).await.expect("create");
    // Once a later selector Service has its Endpoints, the controller has seen the
    // earlier events; the hand-written object, whose Service does not exist yet,
    // must still be there (upstream only syncs Endpoints on deletion).
    caught_up(&ns, "marker-1").await;
    let after =
        ns.api::<Endpoints>().get_opt("early").await.expect("get").expect("hand-written Endpoints kept");
    assert_eq!(after.metadata.resource_version, created.metadata.resource_version, "untouched");
    ns.create(&mk_service("early", &[], vec![mk_port("sql", 5432, "5432")])).await;
    caught_up(&ns, "marker-2").await;
    assert!(
        ns.api::<Endpoints>().get_opt("early").await.expect("get").is_some(),
        "kept once the Service exists"
    );
}
