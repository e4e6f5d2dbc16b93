//! Differential suite: kube-controller-manager's endpointslice, endpoints and
//! mirroring controllers and svcplane's run on one apiserver over the same objects;
//! after every step both results must match (normalised), and each step's own
//! expectation must hold so that "both empty" cannot pass by accident.
//!
//! EndpointSlices and mirrored slices are compared controller to controller.
//! Endpoints are compared between kube-controller-manager's object and svcplane's
//! planner run on the same live objects (one Endpoints object per Service can exist).

use std::time::Duration;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Endpoints, Pod, Service};
use kube::api::{DeleteParams, Patch, PatchParams};
use serde_json::json;
use svcplane_e2e::{
    ControlPlaneOptions, TestNamespace,
    differential::{
        CONVERGE, converge_endpoints, converge_mirrored, converge_slices, converge_slices_nudged,
    },
    fixtures::{ensure_node, mk_pod, mk_port, mk_service, set_pod_phase, set_pod_ready},
    shared_with,
    slices::Normalized,
    svcplane::shared_svcplane,
    wait::eventually,
};

fn options() -> ControlPlaneOptions {
    ControlPlaneOptions::default().with_controller_manager(&[
        "endpointslice-controller",
        "endpoints-controller",
        "endpointslice-mirroring-controller",
        "garbage-collector-controller",
    ])
}

async fn setup(prefix: &str) -> TestNamespace {
    let cp = shared_with(options);
    shared_svcplane("differential", &["--controllers=endpointslice,mirroring"]);
    let client = cp.client().await;
    ensure_node(&client, "node-a", "192.0.2.1", Some("zone-a")).await;
    ensure_node(&client, "node-b", "192.0.2.2", Some("zone-b")).await;
    TestNamespace::new(&client, prefix).await
}

fn count(n: usize) -> impl Fn(&Normalized) -> bool {
    move |x| x.endpoint_count() == n
}

fn has(needle: &'static str, n: usize) -> impl Fn(&Normalized) -> bool {
    move |x| x.endpoints.iter().filter(|e| e.contains(needle)).count() == n
}

/// Both slice controllers and the Endpoints comparison, for one step.
async fn check(ns: &TestNamespace, svc: &str, expect: impl Fn(&Normalized) -> bool) -> Normalized {
    let pair = converge_slices(ns, svc, expect).await;
    converge_endpoints(ns, svc, |_| true).await;
    pair.upstream
}

async fn pod(
    ns: &TestNamespace,
    name: &str,
    app: &str,
    node: &str,
    ports: &[(&str, i32)],
    ips: &[&str],
    ready: bool,
) {
    ns.running_pod(mk_pod(name, &[("app", app)], node, ports), ips, ready).await;
}

// ---- EndpointSlices (+ Endpoints) ------------------------------------------------

#[tokio::test]
async fn d01_single_ready_pod() {
    let ns = setup("d01").await;
    ns.create(&mk_service("s", &[("app", "s")], vec![mk_port("http", 80, "8080")])).await;
    pod(&ns, "p0", "s", "node-a", &[], &["10.20.1.1"], true).await;
    check(&ns, "s", count(1)).await;
}

#[tokio::test]
async fn d02_mixed_readiness() {
    let ns = setup("d02").await;
    ns.create(&mk_service("s", &[("app", "s")], vec![mk_port("http", 80, "8080")])).await;
    for i in 0..4 {
        pod(
            &ns,
            &format!("p{i}"),
            "s",
            if i % 2 == 0 { "node-a" } else { "node-b" },
            &[],
            &[&format!("10.20.2.{}", i + 1)],
            i % 2 == 0,
        )
        .await;
    }
    check(&ns, "s", has("ready=false", 2)).await;
}

#[tokio::test]
async fn d03_not_ready_turns_ready_and_back() {
    let ns = setup("d03").await;
    ns.create(&mk_service("s", &[("app", "s")], vec![mk_port("http", 80, "8080")])).await;
    pod(&ns, "p0", "s", "node-a", &[], &["10.20.3.1"], false).await;
    check(&ns, "s", has("ready=false", 1)).await;
    set_pod_ready(&ns.api(), "p0", true).await;
    check(&ns, "s", has("ready=true", 1)).await;
    set_pod_ready(&ns.api(), "p0", false).await;
    check(&ns, "s", has("ready=false", 1)).await;
}

async fn headless(ns: &TestNamespace, publish: bool) {
    let mut svc = mk_service(
        "zk",
        &[("app", "zk")],
        vec![mk_port("peer", 2888, "2888"), mk_port("election", 3888, "3888")],
    );
    let spec = svc.spec.as_mut().expect("spec");
    spec.cluster_ip = Some("None".into());
    spec.publish_not_ready_addresses = Some(publish);
    ns.create(&svc).await;
    for i in 0..3 {
        let mut p = mk_pod(&format!("zk-{i}"), &[("app", "zk")], "node-a", &[]);
        let ps = p.spec.as_mut().expect("spec");
        ps.hostname = Some(format!("zk-{i}"));
        ps.subdomain = Some("zk".into());
        ns.running_pod(p, &[&format!("10.20.4.{}", i + 1)], i == 0).await;
    }
}

#[tokio::test]
async fn d04_headless_statefulset_publish_not_ready() {
    let ns = setup("d04").await;
    headless(&ns, true).await;
    check(&ns, "zk", has("ready=true", 3)).await;
}

#[tokio::test]
async fn d05_headless_without_publish_not_ready() {
    let ns = setup("d05").await;
    headless(&ns, false).await;
    check(&ns, "zk", has("ready=false", 2)).await;
}

#[tokio::test]
async fn d06_hostname_with_other_subdomain_is_not_published() {
    let ns = setup("d06").await;
    ns.create(&mk_service("db", &[("app", "db")], vec![mk_port("sql", 5432, "5432")])).await;
    let mut p = mk_pod("db-0", &[("app", "db")], "node-a", &[]);
    let ps = p.spec.as_mut().expect("spec");
    ps.hostname = Some("db-0".into());
    ps.subdomain = Some("not-db".into());
    ns.running_pod(p, &["10.20.6.1"], true).await;
    check(&ns, "db", has("host=-", 1)).await;
}

#[tokio::test]
async fn d07_named_port_two_templates_two_groups() {
    let ns = setup("d07").await;
    ns.create(&mk_service("s", &[("app", "s")], vec![mk_port("http", 80, "http")])).await;
    pod(&ns, "a", "s", "node-a", &[("http", 8080)], &["10.20.7.1"], true).await;
    pod(&ns, "b", "s", "node-a", &[("http", 9090)], &["10.20.7.2"], true).await;
    let n = check(&ns, "s", count(2)).await;
    assert_eq!(n.slices_per_group.len(), 2, "{:?}", n.slices_per_group);
}

#[tokio::test]
async fn d08_named_port_missing_in_pod() {
    let ns = setup("d08").await;
    ns.create(&mk_service(
        "s",
        &[("app", "s")],
        vec![mk_port("http", 80, "http"), mk_port("metrics", 9100, "metrics")],
    ))
    .await;
    pod(&ns, "full", "s", "node-a", &[("http", 8080), ("metrics", 9100)], &["10.20.8.1"], true).await;
    pod(&ns, "half", "s", "node-a", &[("http", 8080)], &["10.20.8.2"], true).await;
    check(&ns, "s", count(2)).await;
}

#[tokio::test]
async fn d09_multiple_ports() {
    let ns = setup("d09").await;
    ns.create(&mk_service(
        "s",
        &[("app", "s")],
        vec![mk_port("http", 80, "8080"), mk_port("https", 443, "8443")],
    ))
    .await;
    pod(&ns, "p", "s", "node-a", &[], &["10.20.9.1"], true).await;
    check(&ns, "s", count(1)).await;
}

#[tokio::test]
async fn d10_tcp_and_udp_on_one_port() {
    let ns = setup("d10").await;
    let mut udp = mk_port("dns-udp", 53, "53");
    udp.protocol = Some("UDP".into());
    ns.create(&mk_service("dns", &[("app", "dns")], vec![mk_port("dns-tcp", 53, "53"), udp])).await;
    pod(&ns, "p", "dns", "node-a", &[], &["10.20.10.1"], true).await;
    check(&ns, "dns", count(1)).await;
}

#[tokio::test]
async fn d11_dual_stack() {
    let ns = setup("d11").await;
    let mut svc = mk_service("s", &[("app", "s")], vec![mk_port("http", 80, "8080")]);
    svc.spec.as_mut().expect("spec").ip_family_policy = Some("RequireDualStack".into());
    ns.create(&svc).await;
    pod(&ns, "p", "s", "node-a", &[], &["10.20.11.1", "fd00:20:11::1"], true).await;
    check(&ns, "s", count(2)).await;
}

#[tokio::test]
async fn d12_ipv6_single_stack() {
    let ns = setup("d12").await;
    let mut svc = mk_service("s", &[("app", "s")], vec![mk_port("http", 80, "8080")]);
    svc.spec.as_mut().expect("spec").ip_families = Some(vec!["IPv6".into()]);
    ns.create(&svc).await;
    pod(&ns, "p", "s", "node-a", &[], &["10.20.12.1", "fd00:20:12::1"], true).await;
    check(&ns, "s", has("IPv6", 1)).await;
}

#[tokio::test]
async fn d13_prefer_dual_stack_with_v4_only_pods() {
    let ns = setup("d13").await;
    let mut svc = mk_service("s", &[("app", "s")], vec![mk_port("http", 80, "8080")]);
    svc.spec.as_mut().expect("spec").ip_family_policy = Some("PreferDualStack".into());
    ns.create(&svc).await;
    pod(&ns, "p", "s", "node-a", &[], &["10.20.13.1"], true).await;
    check(&ns, "s", count(1)).await;
}

#[tokio::test]
async fn d14_pod_without_ip_then_with() {
    let ns = setup("d14").await;
    ns.create(&mk_service("s", &[("app", "s")], vec![mk_port("http", 80, "8080")])).await;
    pod(&ns, "p", "s", "node-a", &[], &[], true).await;
    pod(&ns, "q", "s", "node-a", &[], &["10.20.14.2"], true).await;
    check(&ns, "s", count(1)).await;
    svcplane_e2e::fixtures::set_pod_status(&ns.api(), "p", &["10.20.14.1"], true).await;
    check(&ns, "s", count(2)).await;
}

#[tokio::test]
async fn d15_failed_and_succeeded_pods() {
    let ns = setup("d15").await;
    ns.create(&mk_service("s", &[("app", "s")], vec![mk_port("http", 80, "8080")])).await;
    for (i, phase) in ["Failed", "Succeeded", "Running"].iter().enumerate() {
        pod(&ns, &format!("p{i}"), "s", "node-a", &[], &[&format!("10.20.15.{}", i + 1)], true).await;
        if *phase != "Running" {
            set_pod_phase(&ns.api(), &format!("p{i}"), phase).await;
        }
    }
    check(&ns, "s", count(1)).await;
}

#[tokio::test]
async fn d16_pod_on_missing_node() {
    let ns = setup("d16").await;
    ns.create(&mk_service("s", &[("app", "s")], vec![mk_port("http", 80, "8080")])).await;
    pod(&ns, "lost", "s", "node-missing-d16", &[], &["10.20.16.1"], true).await;
    pod(&ns, "ok", "s", "node-a", &[], &["10.20.16.2"], true).await;
    check(&ns, "s", count(1)).await;
}

#[tokio::test]
async fn d17_pod_on_missing_node_with_publish_not_ready() {
    let ns = setup("d17").await;
    let mut svc = mk_service("s", &[("app", "s")], vec![mk_port("http", 80, "8080")]);
    svc.spec.as_mut().expect("spec").publish_not_ready_addresses = Some(true);
    ns.create(&svc).await;
    pod(&ns, "lost", "s", "node-missing-d17", &[], &["10.20.17.1"], false).await;
    check(&ns, "s", count(1)).await;
}

#[tokio::test]
async fn d18_terminating_pod() {
    let ns = setup("d18").await;
    ns.create(&mk_service("s", &[("app", "s")], vec![mk_port("http", 80, "8080")])).await;
    pod(&ns, "p", "s", "node-a", &[], &["10.20.18.1"], true).await;
    check(&ns, "s", count(1)).await;
    ns.delete_pod("p").await;
    check(&ns, "s", has("terminating=true", 1)).await;
    set_pod_ready(&ns.api(), "p", false).await;
    check(&ns, "s", has("serving=false terminating=true", 1)).await;
    ns.finish_pod_deletion("p").await;
    check(&ns, "s", count(0)).await;
}

#[tokio::test]
async fn d19_250_pods_three_slices() {
    let ns = setup("d19").await;
    ns.create(&mk_service("big", &[("app", "big")], vec![mk_port("http", 80, "8080")])).await;
    for i in 0..250 {
        pod(
            &ns,
            &format!("p{i}"),
            "big",
            "node-a",
            &[],
            &[&format!("10.21.{}.{}", i / 200, i % 200 + 1)],
            true,
        )
        .await;
    }
    let pair = converge_slices(&ns, "big", count(250)).await;
    assert_eq!(pair.upstream.slices_per_group, pair.svcplane.slices_per_group, "same number of slices");
    converge_endpoints(&ns, "big", |_| true).await;
}

#[tokio::test]
async fn d20_scale_up_then_down() {
    let ns = setup("d20").await;
    ns.create(&mk_service("s", &[("app", "s")], vec![mk_port("http", 80, "8080")])).await;
    for i in 0..12 {
        pod(&ns, &format!("p{i}"), "s", "node-a", &[], &[&format!("10.20.20.{}", i + 1)], true).await;
    }
    check(&ns, "s", count(12)).await;
    for i in 0..9 {
        ns.finish_pod_deletion(&format!("p{i}")).await;
    }
    check(&ns, "s", count(3)).await;
}

#[tokio::test]
async fn d21_label_change_moves_pod() {
    let ns = setup("d21").await;
    ns.create(&mk_service("blue", &[("app", "blue")], vec![mk_port("http", 80, "8080")])).await;
    ns.create(&mk_service("green", &[("app", "green")], vec![mk_port("http", 80, "8080")])).await;
    pod(&ns, "p", "blue", "node-a", &[], &["10.20.21.1"], true).await;
    check(&ns, "blue", count(1)).await;
    ns.api::<Pod>()
        .patch("p", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"labels": {"app": "green"}}})))
        .await
        .expect("relabel");
    check(&ns, "green", count(1)).await;
    check(&ns, "blue", count(0)).await;
}

#[tokio::test]
async fn d22_service_selector_change() {
    let ns = setup("d22").await;
    ns.create(&mk_service("s", &[("app", "v1")], vec![mk_port("http", 80, "8080")])).await;
    pod(&ns, "a", "v1", "node-a", &[], &["10.20.22.1"], true).await;
    pod(&ns, "b", "v2", "node-a", &[], &["10.20.22.2"], true).await;
    check(&ns, "s", has("Pod/a", 1)).await;
    ns.api::<Service>()
        .patch("s", &PatchParams::default(), &Patch::Merge(json!({"spec": {"selector": {"app": "v2"}}})))
        .await
        .expect("selector");
    check(&ns, "s", has("Pod/b", 1)).await;
}

#[tokio::test]
async fn d23_service_without_pods_has_placeholder() {
    let ns = setup("d23").await;
    ns.create(&mk_service("empty", &[("app", "nothing")], vec![mk_port("http", 80, "8080")])).await;
    let pair = converge_slices(&ns, "empty", |n| n.slices_per_group.len() == 1).await;
    assert_eq!(pair.upstream.slices_per_group, pair.svcplane.slices_per_group);
    converge_endpoints(&ns, "empty", |e| e.is_some()).await;
}

#[tokio::test]
async fn d24_target_port_change() {
    let ns = setup("d24").await;
    ns.create(&mk_service("s", &[("app", "s")], vec![mk_port("http", 80, "8080")])).await;
    pod(&ns, "p", "s", "node-a", &[("web", 9999)], &["10.20.24.1"], true).await;
    check(&ns, "s", has("8080", 1)).await;
    ns.api::<Service>()
        .patch(
            "s",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"ports": [{"name": "http", "port": 80, "targetPort": "web"}]}})),
        )
        .await
        .expect("ports");
    check(&ns, "s", has("9999", 1)).await;
}

#[tokio::test]
async fn d25_service_labels_copied_and_changed() {
    let ns = setup("d25").await;
    ns.create(&mk_service("s", &[("app", "s")], vec![mk_port("http", 80, "8080")])).await;
    pod(&ns, "p", "s", "node-a", &[], &["10.20.25.1"], true).await;
    check(&ns, "s", count(1)).await;
    ns.api::<Service>()
        .patch(
            "s",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"team": "other", "tier": "web"}}})),
        )
        .await
        .expect("labels");
    converge_slices(&ns, "s", |n| n.labels.iter().all(|l| l.contains("tier=web"))).await;
    converge_endpoints(&ns, "s", |e| {
        e.and_then(|e| e.metadata.labels.as_ref()).is_some_and(|l| l.contains_key("tier"))
    })
    .await;
}

#[tokio::test]
async fn d26_traffic_distribution_prefer_close() {
    let ns = setup("d26").await;
    let mut svc = mk_service("s", &[("app", "s")], vec![mk_port("http", 80, "8080")]);
    svc.spec.as_mut().expect("spec").traffic_distribution = Some("PreferClose".into());
    ns.create(&svc).await;
    pod(&ns, "a", "s", "node-a", &[], &["10.20.26.1"], true).await;
    pod(&ns, "b", "s", "node-b", &[], &["10.20.26.2"], true).await;
    check(&ns, "s", has("hints=zones=", 2)).await;
}

#[tokio::test]
async fn d27_sidecar_init_container_named_port() {
    let ns = setup("d27").await;
    ns.create(&mk_service("s", &[("app", "s")], vec![mk_port("proxy", 80, "proxy")])).await;
    let mut p = mk_pod("p", &[("app", "s")], "node-a", &[]);
    let side: k8s_openapi::api::core::v1::Container = serde_json::from_value(json!({
        "name": "sidecar", "image": "registry.invalid/proxy:1", "restartPolicy": "Always",
        "ports": [{"name": "proxy", "containerPort": 15001}]
    }))
    .expect("container");
    p.spec.as_mut().expect("spec").init_containers = Some(vec![side]);
    ns.running_pod(p, &["10.20.27.1"], true).await;
    check(&ns, "s", has("15001", 1)).await;
}

#[tokio::test]
async fn d28_readiness_churn() {
    let ns = setup("d28").await;
    ns.create(&mk_service("s", &[("app", "s")], vec![mk_port("http", 80, "8080")])).await;
    for i in 0..5 {
        pod(&ns, &format!("p{i}"), "s", "node-a", &[], &[&format!("10.20.28.{}", i + 1)], true).await;
    }
    for round in 0..3 {
        for i in 0..5 {
            set_pod_ready(&ns.api(), &format!("p{i}"), (i + round) % 2 == 0).await;
        }
    }
    let expected_not_ready = (0..5).filter(|i| (i + 2) % 2 != 0).count();
    check(&ns, "s", has("ready=false", expected_not_ready)).await;
}

#[tokio::test]
async fn d29_app_protocol_and_node_port_service() {
    let ns = setup("d29").await;
    let mut port = mk_port("grpc", 9000, "9000");
    port.app_protocol = Some("kubernetes.io/h2c".into());
    let mut svc = mk_service("s", &[("app", "s")], vec![port]);
    svc.spec.as_mut().expect("spec").type_ = Some("NodePort".into());
    ns.create(&svc).await;
    pod(&ns, "p", "s", "node-b", &[], &["10.20.29.1"], true).await;
    check(&ns, "s", has("(kubernetes.io/h2c)", 1)).await;
}

#[tokio::test]
async fn d30_service_deleted_and_recreated() {
    let ns = setup("d30").await;
    ns.create(&mk_service("s", &[("app", "s")], vec![mk_port("http", 80, "8080")])).await;
    pod(&ns, "p", "s", "node-a", &[], &["10.20.30.1"], true).await;
    check(&ns, "s", count(1)).await;
    ns.api::<Service>().delete("s", &DeleteParams::default()).await.expect("delete");
    converge_slices(&ns, "s", |n| n.slices_per_group.is_empty()).await;
    ns.create(&mk_service("s", &[("app", "s")], vec![mk_port("http", 8080, "8080")])).await;
    check(&ns, "s", count(1)).await;
}

#[tokio::test]
async fn d31_no_ports_headless() {
    let ns = setup("d31").await;
    let mut svc = mk_service("h", &[("app", "h")], vec![]);
    let spec = svc.spec.as_mut().expect("spec");
    spec.cluster_ip = Some("None".into());
    spec.ports = None;
    ns.create(&svc).await;
    pod(&ns, "p", "h", "node-a", &[], &["10.20.31.1"], true).await;
    check(&ns, "h", count(1)).await;
}

#[tokio::test]
async fn d32_pods_across_zones() {
    let ns = setup("d32").await;
    ns.create(&mk_service("s", &[("app", "s")], vec![mk_port("http", 80, "8080")])).await;
    for i in 0..6 {
        pod(
            &ns,
            &format!("p{i}"),
            "s",
            if i < 3 { "node-a" } else { "node-b" },
            &[],
            &[&format!("10.20.32.{}", i + 1)],
            true,
        )
        .await;
    }
    check(&ns, "s", has("zone=zone-b", 3)).await;
}

#[tokio::test]
async fn d33_endpoints_over_capacity_and_eleven_slices() {
    let ns = setup("d33").await;
    ns.create(&mk_service("big", &[("app", "big")], vec![mk_port("http", 80, "8080")])).await;
    let names: Vec<(String, String)> =
        (0..1001).map(|i| (format!("p{i}"), format!("10.33.{}.{}", i / 250, i % 250 + 1))).collect();
    futures::stream::iter(&names)
        .for_each_concurrent(16, |(name, ip)| {
            let ns = &ns;
            async move { pod(ns, name, "big", "node-a", &[], &[ip], true).await }
        })
        .await;
    let n = converge_slices(&ns, "big", count(1001)).await.upstream;
    assert_eq!(n.slices_per_group.values().sum::<usize>(), 11, "{:?}", n.slices_per_group);
    // Endpoints keep 1000 addresses and say they were truncated.
    converge_endpoints(&ns, "big", |e| {
        let over = e
            .and_then(|e| e.metadata.annotations.as_ref())
            .and_then(|a| a.get("endpoints.kubernetes.io/over-capacity"))
            .map(String::as_str);
        let addresses: usize = e
            .and_then(|e| e.subsets.as_ref())
            .map(|ss| ss.iter().map(|s| s.addresses.as_ref().map_or(0, Vec::len)).sum())
            .unwrap_or(0);
        over == Some("truncated") && addresses == 1000
    })
    .await;
}

#[tokio::test]
async fn d34_named_port_only_in_a_plain_init_container_is_not_resolved() {
    let ns = setup("d34").await;
    ns.create(&mk_service(
        "s",
        &[("app", "s")],
        vec![mk_port("http", 80, "http"), mk_port("setup", 81, "setup")],
    ))
    .await;
    let mut p = mk_pod("p", &[("app", "s")], "node-a", &[("http", 8080)]);
    // Only restartable (sidecar) init containers serve ports.
    let init: k8s_openapi::api::core::v1::Container = serde_json::from_value(json!({
        "name": "setup", "image": "registry.invalid/setup:1",
        "ports": [{"name": "setup", "containerPort": 9999}]
    }))
    .expect("container");
    p.spec.as_mut().expect("spec").init_containers = Some(vec![init]);
    ns.running_pod(p, &["10.20.34.1"], true).await;
    let n = check(&ns, "s", count(1)).await;
    assert!(n.endpoints.iter().all(|e| !e.contains("9999")), "{:?}", n.endpoints);
}

#[tokio::test]
async fn d35_terminating_pods_with_publish_not_ready_addresses() {
    let ns = setup("d35").await;
    let mut svc = mk_service("s", &[("app", "s")], vec![mk_port("http", 80, "8080")]);
    svc.spec.as_mut().expect("spec").publish_not_ready_addresses = Some(true);
    ns.create(&svc).await;
    pod(&ns, "ready", "s", "node-a", &[], &["10.20.35.1"], true).await;
    pod(&ns, "unready", "s", "node-a", &[], &["10.20.35.2"], false).await;
    check(&ns, "s", has("ready=true", 2)).await;
    ns.delete_pod("ready").await;
    ns.delete_pod("unready").await;
    check(&ns, "s", has("terminating=true", 2)).await;
    set_pod_ready(&ns.api(), "ready", false).await;
    check(&ns, "s", has("serving=false terminating=true", 2)).await;
    ns.finish_pod_deletion("ready").await;
    ns.finish_pod_deletion("unready").await;
    check(&ns, "s", count(0)).await;
}

#[tokio::test]
async fn d36_ipv4_service_and_a_pod_with_only_an_ipv6_address() {
    let ns = setup("d36").await;
    ns.create(&mk_service("s", &[("app", "s")], vec![mk_port("http", 80, "8080")])).await;
    pod(&ns, "v6", "s", "node-a", &[], &["fd00:36::1"], true).await;
    pod(&ns, "v4", "s", "node-a", &[], &["10.20.36.1"], true).await;
    let n = check(&ns, "s", count(1)).await;
    assert!(n.endpoints[0].contains("10.20.36.1"), "{:?}", n.endpoints);
}

#[tokio::test]
async fn d37_pending_pod_with_an_ip_is_a_not_ready_endpoint() {
    let ns = setup("d37").await;
    ns.create(&mk_service("s", &[("app", "s")], vec![mk_port("http", 80, "8080")])).await;
    pod(&ns, "p", "s", "node-a", &[], &["10.20.37.1"], false).await;
    set_pod_phase(&ns.api(), "p", "Pending").await;
    pod(&ns, "marker", "s", "node-a", &[], &["10.20.37.2"], true).await;
    check(&ns, "s", |n| n.endpoint_count() == 2 && has("ready=false", 1)(n)).await;
    set_pod_phase(&ns.api(), "p", "Succeeded").await;
    // Upstream's Pod handler (podEndpointsChanged) ignores a phase change that
    // leaves readiness, IPs and deletion as they were, so kube-controller-manager
    // keeps the finished Pod until its Service syncs for another reason; svcplane
    // syncs on any change of a member and drops it at once (a deliberate
    // difference). A Service label change makes both sync; then they agree.
    let touches = std::sync::atomic::AtomicUsize::new(0);
    let touch = || {
        let services = ns.api::<Service>();
        let n = touches.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        async move {
            services
                .patch(
                    "s",
                    &PatchParams::default(),
                    &Patch::Merge(json!({"metadata": {"labels": {"sync": n.to_string()}}})),
                )
                .await
                .expect("touch the Service");
        }
    };
    // The Service and Pod watches are separate streams: the sync for a touch may
    // read the Pod cache before the phase change arrived, and then nothing syncs
    // the Service again (CI runs saw this for both controllers): touched again
    // until the slices agree.
    converge_slices_nudged(&ns, "s", Duration::from_secs(5), touch, count(1)).await;
    // The slices were planned from kube-controller-manager's shared Pod cache
    // with the Pod finished, so the Endpoints controller's sync for one more
    // touch reads it too.
    touch().await;
    converge_endpoints(&ns, "s", |_| true).await;
}

async fn with_traffic_distribution(ns: &TestNamespace, value: &str, base: u8) {
    let mut svc = mk_service("s", &[("app", "s")], vec![mk_port("http", 80, "8080")]);
    svc.spec.as_mut().expect("spec").traffic_distribution = Some(value.into());
    ns.create(&svc).await;
    pod(ns, "a", "s", "node-a", &[], &[&format!("10.20.{base}.1")], true).await;
    pod(ns, "b", "s", "node-b", &[], &[&format!("10.20.{base}.2")], true).await;
    pod(ns, "c", "s", "node-b", &[], &[&format!("10.20.{base}.3")], false).await;
}

#[tokio::test]
async fn d38_traffic_distribution_prefer_same_zone() {
    let ns = setup("d38").await;
    with_traffic_distribution(&ns, "PreferSameZone", 38).await;
    // Ready endpoints get their own zone only; the not-ready one gets nothing.
    check(&ns, "s", |n| {
        has("hints=zones=zone-a nodes=", 1)(n)
            && has("hints=zones=zone-b nodes=", 1)(n)
            && has("hints=-", 1)(n)
    })
    .await;
}

#[tokio::test]
async fn d39_traffic_distribution_prefer_same_node() {
    let ns = setup("d39").await;
    with_traffic_distribution(&ns, "PreferSameNode", 39).await;
    check(&ns, "s", |n| {
        has("hints=zones=zone-a nodes=node-a", 1)(n)
            && has("hints=zones=zone-b nodes=node-b", 1)(n)
            && has("hints=-", 1)(n)
    })
    .await;
    // Back to PreferSameZone: the node hints go.
    ns.api::<Service>()
        .patch(
            "s",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"trafficDistribution": "PreferSameZone"}})),
        )
        .await
        .expect("patch trafficDistribution");
    check(&ns, "s", |n| has("hints=zones=zone-a nodes=", 1)(n) && has("hints=zones=zone-b nodes=", 1)(n))
        .await;
}

/// A Service `s` with `service.kubernetes.io/topology-mode: Auto` (and, if given,
/// a `trafficDistribution` the annotation overrides) and `per_zone` ready Pods on
/// each of node-a (zone-a) and node-b (zone-b), which have 4 CPUs each.
async fn topology_auto(ns: &TestNamespace, traffic_distribution: Option<&str>, per_zone: u8, base: u8) {
    let mut svc = mk_service("s", &[("app", "s")], vec![mk_port("http", 80, "8080")]);
    svc.metadata.annotations =
        Some([("service.kubernetes.io/topology-mode".to_string(), "Auto".to_string())].into());
    svc.spec.as_mut().expect("spec").traffic_distribution = traffic_distribution.map(Into::into);
    ns.create(&svc).await;
    for i in 0..per_zone {
        pod(ns, &format!("a{i}"), "s", "node-a", &[], &[&format!("10.20.{base}.{}", i + 1)], true).await;
        pod(ns, &format!("b{i}"), "s", "node-b", &[], &[&format!("10.20.{base}.{}", i + 101)], true).await;
    }
}

#[tokio::test]
async fn d40_topology_auto_hints_then_removed_when_too_few_endpoints() {
    // Issue 18 item 4: svcplane used to remove every topology-mode Auto hint.
    let ns = setup("d40").await;
    topology_auto(&ns, None, 2, 40).await;
    // Two zones of 4 CPUs each, two ready endpoints per zone: every endpoint is
    // hinted for its own zone (asserted on kube-controller-manager's slices, so
    // that this cannot pass with no hints on either side).
    check(&ns, "s", |n| has("hints=zones=zone-a nodes=", 2)(n) && has("hints=zones=zone-b nodes=", 2)(n))
        .await;
    // Down to one endpoint for two zones: upstream removes the hints
    // ("Insufficient number of endpoints").
    for name in ["a1", "b0", "b1"] {
        ns.finish_pod_deletion(name).await;
    }
    check(&ns, "s", |n| n.endpoint_count() == 1 && has("hints=-", 1)(n)).await;
    let message = "Insufficient number of endpoints (1 endpoints, 2 zones), addressType: IPv4";
    hints_disabled_event_from_both(&ns, message).await;
}

#[tokio::test]
async fn d41_topology_auto_overrides_traffic_distribution() {
    // The annotation wins over trafficDistribution: with one endpoint per zone
    // Auto hints each for its own zone; with one endpoint left Auto gives none,
    // although PreferClose alone would hint it for zone-a.
    let ns = setup("d41").await;
    topology_auto(&ns, Some("PreferClose"), 1, 41).await;
    check(&ns, "s", |n| has("hints=zones=zone-a nodes=", 1)(n) && has("hints=zones=zone-b nodes=", 1)(n))
        .await;
    ns.finish_pod_deletion("b0").await;
    check(&ns, "s", |n| n.endpoint_count() == 1 && has("hints=-", 1)(n)).await;
}

/// Waits until kube-controller-manager and svcplane each recorded a
/// `TopologyAwareHintsDisabled` Warning with `message` on Service `s` (an
/// earlier sync's Event with another note may be there too, on both sides).
async fn hints_disabled_event_from_both(ns: &TestNamespace, message: &str) {
    use k8s_openapi::api::core::v1::Event;
    let events: kube::Api<Event> = ns.api();
    eventually(&format!("TopologyAwareHintsDisabled from both controllers in {}", ns.name), CONVERGE, || {
        let events = events.clone();
        async move {
            let list = events.list(&Default::default()).await.map_err(|e| e.to_string())?;
            let disabled = |e: &&Event| e.reason.as_deref() == Some("TopologyAwareHintsDisabled");
            let upstream = list.items.iter().filter(disabled).any(|e| {
                e.source.as_ref().and_then(|s| s.component.as_deref()) == Some("endpoint-slice-controller")
                    && e.message.as_deref() == Some(message)
            });
            let svcplane = list.items.iter().filter(disabled).any(|e| {
                e.reporting_component.as_deref() == Some("svcplane") && e.message.as_deref() == Some(message)
            });
            let notes: Vec<_> =
                list.items.iter().map(|e| (&e.reason, &e.message, &e.reporting_component)).collect();
            match (upstream, svcplane) {
                (true, true) => Ok(()),
                seen => Err(format!("(kube-controller-manager, svcplane): {seen:?}; events: {notes:?}")),
            }
        }
    })
    .await;
}

// ---- Mirroring (selectorless Service + hand-written Endpoints) --------------------

fn endpoints(name: &str, subsets: serde_json::Value, labels: serde_json::Value) -> Endpoints {
    serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}, "subsets": subsets}))
        .expect("endpoints")
}

async fn selectorless(ns: &TestNamespace, name: &str) {
    ns.create(&mk_service(name, &[], vec![mk_port("sql", 5432, "5432")])).await;
}

#[tokio::test]
async fn m01_external_database() {
    let ns = setup("m01").await;
    selectorless(&ns, "db").await;
    ns.create(&endpoints(
        "db",
        json!([{"addresses": [{"ip": "192.0.2.50"}], "ports": [{"name": "sql", "port": 5432}]}]),
        json!({}),
    ))
    .await;
    converge_mirrored(&ns, "db", count(1)).await;
}

#[tokio::test]
async fn m02_ready_and_not_ready_addresses() {
    let ns = setup("m02").await;
    selectorless(&ns, "db").await;
    ns.create(&endpoints(
        "db",
        json!([{"addresses": [{"ip": "192.0.2.1"}, {"ip": "192.0.2.2"}], "notReadyAddresses": [{"ip": "192.0.2.3"}], "ports": [{"name": "sql", "port": 5432}]}]),
        json!({}),
    ))
    .await;
    converge_mirrored(&ns, "db", has("ready=false", 1)).await;
}

#[tokio::test]
async fn m03_skip_mirror_label() {
    let ns = setup("m03").await;
    selectorless(&ns, "db").await;
    selectorless(&ns, "marker").await;
    ns.create(&endpoints(
        "db",
        json!([{"addresses": [{"ip": "192.0.2.1"}], "ports": [{"port": 5432}]}]),
        json!({"endpointslice.kubernetes.io/skip-mirror": "true"}),
    ))
    .await;
    // A marker created after: once it is mirrored, the skipped one has been seen.
    ns.create(&endpoints(
        "marker",
        json!([{"addresses": [{"ip": "192.0.2.9"}], "ports": [{"port": 5432}]}]),
        json!({}),
    ))
    .await;
    converge_mirrored(&ns, "marker", count(1)).await;
    converge_mirrored(&ns, "db", |n| n.slices_per_group.is_empty()).await;
}

#[tokio::test]
async fn m04_mixed_families() {
    let ns = setup("m04").await;
    selectorless(&ns, "db").await;
    ns.create(&endpoints(
        "db",
        json!([{"addresses": [{"ip": "192.0.2.1"}, {"ip": "2001:db8::1"}], "ports": [{"port": 5432}]}]),
        json!({}),
    ))
    .await;
    converge_mirrored(&ns, "db", |n| n.slices_per_group.len() == 2).await;
}

#[tokio::test]
async fn m05_multiple_subsets_and_ports() {
    let ns = setup("m05").await;
    selectorless(&ns, "db").await;
    ns.create(&endpoints(
        "db",
        json!([
            {"addresses": [{"ip": "192.0.2.1"}], "ports": [{"name": "a", "port": 1000}]},
            {"addresses": [{"ip": "192.0.2.2"}], "ports": [{"name": "a", "port": 1000}, {"name": "b", "port": 2000}]}
        ]),
        json!({}),
    ))
    .await;
    // Upstream mirrors one endpoint per (address, port set) of the stored subsets: 3.
    converge_mirrored(&ns, "db", count(3)).await;
}

#[tokio::test]
async fn m06_endpoints_updated() {
    let ns = setup("m06").await;
    selectorless(&ns, "db").await;
    ns.create(&endpoints(
        "db",
        json!([{"addresses": [{"ip": "192.0.2.1"}], "ports": [{"port": 5432}]}]),
        json!({}),
    ))
    .await;
    converge_mirrored(&ns, "db", count(1)).await;
    ns.api::<Endpoints>()
        .patch("db", &PatchParams::default(), &Patch::Merge(json!({"subsets": [{"addresses": [{"ip": "192.0.2.1"}, {"ip": "192.0.2.2"}], "ports": [{"port": 5432}]}]})))
        .await
        .expect("patch");
    converge_mirrored(&ns, "db", count(2)).await;
}

#[tokio::test]
async fn m07_endpoints_deleted() {
    let ns = setup("m07").await;
    selectorless(&ns, "db").await;
    ns.create(&endpoints(
        "db",
        json!([{"addresses": [{"ip": "192.0.2.1"}], "ports": [{"port": 5432}]}]),
        json!({}),
    ))
    .await;
    converge_mirrored(&ns, "db", count(1)).await;
    ns.api::<Endpoints>().delete("db", &DeleteParams::default()).await.expect("delete");
    converge_mirrored(&ns, "db", |n| n.slices_per_group.is_empty()).await;
}

#[tokio::test]
async fn m08_labels_copied() {
    let ns = setup("m08").await;
    selectorless(&ns, "db").await;
    ns.create(&endpoints(
        "db",
        json!([{"addresses": [{"ip": "192.0.2.1"}], "ports": [{"port": 5432}]}]),
        json!({"owner": "dba"}),
    ))
    .await;
    converge_mirrored(&ns, "db", |n| n.labels.iter().all(|l| l.contains("owner=dba"))).await;
}

#[tokio::test]
async fn m09_invalid_address_skipped() {
    let ns = setup("m09").await;
    selectorless(&ns, "db").await;
    // The apiserver validates Endpoints IPs, so an "invalid for mirroring" address
    // is one it accepts but is not a Pod-style IP: mirrored as upstream does.
    ns.create(&endpoints("db", json!([{"addresses": [{"ip": "192.0.2.1"}, {"ip": "192.0.2.2", "hostname": "h2"}], "ports": [{"port": 5432}]}]), json!({}))).await;
    converge_mirrored(&ns, "db", count(2)).await;
}

#[tokio::test]
async fn m10_service_gains_selector() {
    let ns = setup("m10").await;
    selectorless(&ns, "db").await;
    ns.create(&endpoints(
        "db",
        json!([{"addresses": [{"ip": "192.0.2.1"}], "ports": [{"port": 5432}]}]),
        json!({}),
    ))
    .await;
    converge_mirrored(&ns, "db", count(1)).await;
    ns.api::<Service>()
        .patch("db", &PatchParams::default(), &Patch::Merge(json!({"spec": {"selector": {"app": "db"}}})))
        .await
        .expect("selector");
    converge_mirrored(&ns, "db", |n| n.slices_per_group.is_empty()).await;
}

#[tokio::test]
async fn m11_service_deleted() {
    let ns = setup("m11").await;
    selectorless(&ns, "db").await;
    ns.create(&endpoints(
        "db",
        json!([{"addresses": [{"ip": "192.0.2.1"}], "ports": [{"port": 5432}]}]),
        json!({}),
    ))
    .await;
    converge_mirrored(&ns, "db", count(1)).await;
    ns.api::<Service>().delete("db", &DeleteParams::default()).await.expect("delete");
    converge_mirrored(&ns, "db", |n| n.slices_per_group.is_empty()).await;
}

#[tokio::test]
async fn m12_endpoints_before_service() {
    let ns = setup("m12").await;
    ns.create(&endpoints(
        "db",
        json!([{"addresses": [{"ip": "192.0.2.1", "nodeName": "node-a"}], "ports": [{"port": 5432}]}]),
        json!({}),
    ))
    .await;
    selectorless(&ns, "db").await;
    converge_mirrored(&ns, "db", has("node=node-a", 1)).await;
}

#[tokio::test]
async fn m13_only_not_ready_addresses() {
    let ns = setup("m13").await;
    selectorless(&ns, "db").await;
    ns.create(&endpoints(
        "db",
        json!([{"notReadyAddresses": [{"ip": "192.0.2.1"}, {"ip": "192.0.2.2"}], "ports": [{"port": 5432}]}]),
        json!({}),
    ))
    .await;
    converge_mirrored(&ns, "db", has("ready=false", 2)).await;
}

#[tokio::test]
async fn m14_hostname_node_and_target_ref_copied() {
    let ns = setup("m14").await;
    selectorless(&ns, "db").await;
    ns.create(&endpoints(
        "db",
        json!([{"addresses": [{"ip": "192.0.2.1", "hostname": "db-0", "nodeName": "node-b",
            "targetRef": {"kind": "Pod", "name": "db-0", "namespace": ns.name}}], "ports": [{"port": 5432}]}]),
        json!({}),
    ))
    .await;
    converge_mirrored(&ns, "db", has("host=db-0 node=node-b", 1)).await;
}

#[tokio::test]
async fn m15_ipv6_only() {
    let ns = setup("m15").await;
    selectorless(&ns, "db").await;
    ns.create(&endpoints(
        "db",
        json!([{"addresses": [{"ip": "2001:db8::10"}, {"ip": "2001:db8::11"}], "ports": [{"port": 5432}]}]),
        json!({}),
    ))
    .await;
    converge_mirrored(&ns, "db", has("IPv6", 2)).await;
}

#[tokio::test]
async fn m16_ports_changed() {
    let ns = setup("m16").await;
    selectorless(&ns, "db").await;
    ns.create(&endpoints(
        "db",
        json!([{"addresses": [{"ip": "192.0.2.1"}], "ports": [{"name": "sql", "port": 5432}]}]),
        json!({}),
    ))
    .await;
    converge_mirrored(&ns, "db", has("5432", 1)).await;
    ns.api::<Endpoints>()
        .patch("db", &PatchParams::default(), &Patch::Merge(json!({"subsets": [{"addresses": [{"ip": "192.0.2.1"}], "ports": [{"name": "sql", "port": 6432}]}]})))
        .await
        .expect("patch");
    converge_mirrored(&ns, "db", has("6432", 1)).await;
}

#[tokio::test]
async fn m17_skip_mirror_added_later() {
    let ns = setup("m17").await;
    selectorless(&ns, "db").await;
    ns.create(&endpoints(
        "db",
        json!([{"addresses": [{"ip": "192.0.2.1"}], "ports": [{"port": 5432}]}]),
        json!({}),
    ))
    .await;
    converge_mirrored(&ns, "db", count(1)).await;
    ns.api::<Endpoints>()
        .patch(
            "db",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"labels": {"endpointslice.kubernetes.io/skip-mirror": "true"}}}),
            ),
        )
        .await
        .expect("label");
    converge_mirrored(&ns, "db", |n| n.slices_per_group.is_empty()).await;
}

#[tokio::test]
async fn m18_many_addresses_one_subset() {
    let ns = setup("m18").await;
    selectorless(&ns, "db").await;
    let addrs: Vec<serde_json::Value> =
        (0..150).map(|i| json!({"ip": format!("198.51.100.{}", i + 1)})).collect();
    ns.create(&endpoints("db", json!([{"addresses": addrs, "ports": [{"port": 5432}]}]), json!({}))).await;
    let pair = converge_mirrored(&ns, "db", count(150)).await;
    assert_eq!(pair.upstream.slices_per_group, pair.svcplane.slices_per_group, "same packing");
}

#[tokio::test]
async fn m19_external_name_without_selector_is_mirrored() {
    let ns = setup("m19").await;
    let mut svc = mk_service("ext", &[], vec![]);
    let spec = svc.spec.as_mut().expect("spec");
    spec.type_ = Some("ExternalName".into());
    spec.external_name = Some("db.example.com".into());
    spec.ports = None;
    ns.create(&svc).await;
    ns.create(&endpoints(
        "ext",
        json!([{"addresses": [{"ip": "192.0.2.7"}], "ports": [{"port": 5432}]}]),
        json!({}),
    ))
    .await;
    converge_mirrored(&ns, "ext", count(1)).await;
}

#[tokio::test]
async fn m20_leader_election_endpoints_not_mirrored() {
    let ns = setup("m20").await;
    selectorless(&ns, "lock").await;
    selectorless(&ns, "marker").await;
    let mut lock = endpoints(
        "lock",
        json!([{"addresses": [{"ip": "192.0.2.1"}], "ports": [{"port": 5432}]}]),
        json!({}),
    );
    lock.metadata.annotations =
        Some([("control-plane.alpha.kubernetes.io/leader".to_string(), "{}".to_string())].into());
    ns.create(&lock).await;
    ns.create(&endpoints(
        "marker",
        json!([{"addresses": [{"ip": "192.0.2.9"}], "ports": [{"port": 5432}]}]),
        json!({}),
    ))
    .await;
    converge_mirrored(&ns, "marker", count(1)).await;
    converge_mirrored(&ns, "lock", |n| n.slices_per_group.is_empty()).await;
}
