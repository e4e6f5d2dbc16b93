//! The harness itself, on a real kube-apiserver + etcd: Services get ClusterIPs from
//! the configured range, Nodes and Pods with patched status list back, and a missing
//! build is a clear error rather than a skip.

use std::{net::IpAddr, time::Duration};

use k8s_openapi::api::core::v1::{Node, Pod, Service, ServicePort, ServiceSpec};
use kube::{Api, api::ListParams, core::ObjectMeta};
use svcplane_e2e::{
    ControlPlane, ControlPlaneOptions, HarnessError, TestNamespace,
    fixtures::{ensure_node, labels, mk_pod},
    shared,
};

fn in_cidr(ip: &str, cidr: &str) -> bool {
    let (net, bits) = cidr.split_once('/').expect("cidr");
    let bits: u32 = bits.parse().expect("prefix");
    match (ip.parse::<IpAddr>().expect("ip"), net.parse::<IpAddr>().expect("net")) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = u32::MAX.checked_shl(32 - bits).unwrap_or(0);
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

#[tokio::test]
async fn created_service_gets_a_cluster_ip_in_the_configured_ranges() {
    let cp = shared();
    let client = cp.client().await;
    let ns = TestNamespace::new(&client, "foundation-clusterip").await;
    let svc = Service {
        metadata: ObjectMeta { name: Some("web".into()), ..Default::default() },
        spec: Some(ServiceSpec {
            selector: Some(labels(&[("app", "web")])),
            ip_family_policy: Some("RequireDualStack".into()),
            ports: Some(vec![ServicePort { port: 80, ..Default::default() }]),
            ..Default::default()
        }),
        ..Default::default()
    };
    let created = ns.create(&svc).await;
    let ips = created.spec.and_then(|s| s.cluster_ips).expect("clusterIPs set");
    assert_eq!(ips.len(), 2, "dual-stack Service gets two ClusterIPs: {ips:?}");
    let (v4, v6) = cp.options.service_cidrs.split_once(',').expect("two CIDRs");
    assert!(in_cidr(&ips[0], v4), "{} in {v4}", ips[0]);
    assert!(in_cidr(&ips[1], v6), "{} in {v6}", ips[1]);
}

#[tokio::test]
async fn nodes_and_pods_with_patched_status_list_back() {
    let cp = shared();
    let client = cp.client().await;
    let ns = TestNamespace::new(&client, "foundation-pods").await;
    ensure_node(&client, "foundation-node-a", "192.0.2.10", Some("zone-a")).await;

    let node = Api::<Node>::all(client.clone()).get("foundation-node-a").await.expect("node");
    let addresses = node.status.and_then(|s| s.addresses).expect("addresses");
    assert_eq!(addresses[0].address, "192.0.2.10");
    assert_eq!(
        node.metadata.labels.expect("labels").get("topology.kubernetes.io/zone").map(String::as_str),
        Some("zone-a")
    );

    ns.running_pod(
        mk_pod("ready-0", &[("app", "x")], "foundation-node-a", &[("http", 8080)]),
        &["10.0.0.1"],
        true,
    )
    .await;
    ns.running_pod(
        mk_pod("unready-0", &[("app", "x")], "foundation-node-a", &[("http", 8080)]),
        &["10.0.0.2", "fd00::2"],
        false,
    )
    .await;

    let pods = ns.api::<Pod>().list(&ListParams::default().labels("app=x")).await.expect("list pods");
    let mut seen: Vec<(String, Vec<String>, String)> = pods
        .items
        .into_iter()
        .map(|p| {
            let status = p.status.expect("status");
            let ready = status
                .conditions
                .unwrap_or_default()
                .into_iter()
                .find(|c| c.type_ == "Ready")
                .map(|c| c.status)
                .unwrap_or_default();
            let ips = status.pod_ips.unwrap_or_default().into_iter().map(|i| i.ip).collect();
            (p.metadata.name.expect("name"), ips, ready)
        })
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        vec![
            ("ready-0".into(), vec!["10.0.0.1".into()], "True".into()),
            ("unready-0".into(), vec!["10.0.0.2".into(), "fd00::2".into()], "False".into()),
        ]
    );
}

#[tokio::test]
async fn missing_binaries_are_a_clear_error_not_a_skip() {
    let empty = tempfile::tempdir().expect("tempdir");
    let options = ControlPlaneOptions { bin_dir: Some(empty.path().to_path_buf()), ..Default::default() };
    let err = match ControlPlane::start(options).await {
        Ok(_) => panic!("a control plane started from an empty binary folder"),
        Err(e) => e,
    };
    assert!(matches!(err, HarnessError::MissingBinary { ref binary, .. } if binary == "etcd"), "{err:?}");
    let message = err.to_string();
    assert!(message.contains("e2e/controlplane/build.sh"), "message says how to fix it: {message}");
    assert!(message.contains(&empty.path().display().to_string()), "message names the path: {message}");
}

#[tokio::test]
async fn apiserver_answers_with_the_pinned_version() {
    let cp = shared();
    let client = cp.client().await;
    let version = tokio::time::timeout(Duration::from_secs(10), client.apiserver_version())
        .await
        .expect("in time")
        .expect("version");
    assert_eq!(version.git_version, svcplane_e2e::kubernetes_version());
}
