//! `svcplane dns` against a real kube-apiserver, with svcplane's EndpointSlice
//! controller writing the headless Services' slices: the records CoreDNS serves
//! for ClusterIP (single and dual-stack), headless (hostnames, dashed IPs,
//! publishNotReadyAddresses) and ExternalName Services.

use std::{collections::BTreeSet, process::Command, time::Duration};

use k8s_openapi::api::{
    core::v1::{Service, ServicePort, ServiceSpec},
    discovery::v1::EndpointSlice,
};
use kube::core::ObjectMeta;
use serde_json::Value;
use svcplane_e2e::{
    TestNamespace,
    fixtures::{ensure_node, labels, mk_pod},
    shared,
    slices::{SVCPLANE, slices_of},
    svcplane::{shared_svcplane, svcplane_bin},
    wait::eventually,
};

const TIMEOUT: Duration = Duration::from_secs(30);

fn controller() {
    shared_svcplane("cli-dns", &["--controllers=endpointslice"]);
}

/// `svcplane dns svc/<name> -n <ns> -o json <extra>` as (name, type, data) triples.
fn dns(ns: &str, name: &str, extra: &[&str]) -> BTreeSet<(String, String, String)> {
    let out = Command::new(svcplane_bin())
        .arg(format!("--kubeconfig={}", shared().kubeconfig_path.display()))
        .args(["dns", &format!("svc/{name}"), "-n", ns, "-o", "json"])
        .args(extra)
        .output()
        .expect("run svcplane dns");
    assert!(out.status.success(), "dns failed: {}", String::from_utf8_lossy(&out.stderr));
    let records: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    records
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            let field = |k: &str| r[k].as_str().unwrap_or_default().to_owned();
            (field("name"), field("type"), field("data"))
        })
        .collect()
}

fn record(name: &str, type_: &str, data: &str) -> (String, String, String) {
    (name.to_owned(), type_.to_owned(), data.to_owned())
}

fn port(name: &str, number: i32, protocol: &str) -> ServicePort {
    ServicePort {
        name: Some(name.into()),
        port: number,
        protocol: Some(protocol.into()),
        ..Default::default()
    }
}

fn service(name: &str, spec: ServiceSpec) -> Service {
    Service {
        metadata: ObjectMeta { name: Some(name.into()), ..Default::default() },
        spec: Some(spec),
        ..Default::default()
    }
}

async fn setup(prefix: &str) -> TestNamespace {
    controller();
    let client = shared().client().await;
    ensure_node(&client, "node-a", "192.0.2.1", Some("zone-a")).await;
    TestNamespace::new(&client, prefix).await
}

#[tokio::test]
async fn cluster_ip_service_has_its_address_and_one_srv_per_named_port() {
    let ns = setup("dns-clusterip").await;
    let svc = ns
        .create(&service(
            "web",
            ServiceSpec {
                selector: Some(labels(&[("app", "web")])),
                ports: Some(vec![port("http", 80, "TCP"), port("dns", 53, "UDP")]),
                ..Default::default()
            },
        ))
        .await;
    let ip = svc.spec.and_then(|s| s.cluster_ip).expect("clusterIP");
    let fqdn = format!("web.{}.svc.cluster.local.", ns.name);
    assert_eq!(
        dns(&ns.name, "web", &[]),
        BTreeSet::from([
            record(&fqdn, "A", &ip),
            record(&format!("_http._tcp.{fqdn}"), "SRV", &format!("0 100 80 {fqdn}")),
            record(&format!("_dns._udp.{fqdn}"), "SRV", &format!("0 100 53 {fqdn}")),
        ])
    );
    let custom = dns(&ns.name, "web", &["--cluster-domain", "corp.example"]);
    assert!(custom.contains(&record(&format!("web.{}.svc.corp.example.", ns.name), "A", &ip)), "{custom:?}");
}

#[tokio::test]
async fn dual_stack_service_has_a_and_aaaa() {
    let ns = setup("dns-dualstack").await;
    let svc = ns
        .create(&service(
            "dual",
            ServiceSpec {
                ip_family_policy: Some("RequireDualStack".into()),
                ip_families: Some(vec!["IPv4".into(), "IPv6".into()]),
                ports: Some(vec![port("http", 80, "TCP")]),
                ..Default::default()
            },
        ))
        .await;
    let ips = svc.spec.and_then(|s| s.cluster_ips).expect("clusterIPs");
    assert_eq!(ips.len(), 2, "{ips:?}");
    let fqdn = format!("dual.{}.svc.cluster.local.", ns.name);
    let records = dns(&ns.name, "dual", &[]);
    assert!(records.contains(&record(&fqdn, "A", &ips[0])), "{records:?}");
    assert!(records.contains(&record(&fqdn, "AAAA", &ips[1])), "{records:?}");
}

#[tokio::test]
async fn headless_service_answers_per_endpoint_with_hostnames_and_not_ready_peers() {
    let ns = setup("dns-headless").await;
    ns.create(&service(
        "zk",
        ServiceSpec {
            cluster_ip: Some("None".into()),
            publish_not_ready_addresses: Some(true),
            selector: Some(labels(&[("app", "zk")])),
            ports: Some(vec![port("peer", 2888, "TCP")]),
            ..Default::default()
        },
    ))
    .await;
    for (i, ready) in [(0, true), (1, false)] {
        let mut pod = mk_pod(&format!("zk-{i}"), &[("app", "zk")], "node-a", &[]);
        let spec = pod.spec.as_mut().expect("spec");
        spec.hostname = Some(format!("zk-{i}"));
        spec.subdomain = Some("zk".into());
        ns.running_pod(pod, &[&format!("10.244.5.{}", i + 1)], ready).await;
    }
    // No hostname: CoreDNS names it by its dashed IP.
    ns.running_pod(mk_pod("zk-extra", &[("app", "zk")], "node-a", &[]), &["10.244.5.9"], true).await;
    wait_for_endpoints(&ns, "zk", 3).await;

    let fqdn = format!("zk.{}.svc.cluster.local.", ns.name);
    let srv = format!("_peer._tcp.{fqdn}");
    let expected = BTreeSet::from([
        record(&fqdn, "A", "10.244.5.1"),
        record(&fqdn, "A", "10.244.5.2"),
        record(&fqdn, "A", "10.244.5.9"),
        record(&format!("zk-0.{fqdn}"), "A", "10.244.5.1"),
        record(&format!("zk-1.{fqdn}"), "A", "10.244.5.2"),
        record(&format!("10-244-5-9.{fqdn}"), "A", "10.244.5.9"),
        record(&srv, "SRV", &format!("0 33 2888 zk-0.{fqdn}")),
        record(&srv, "SRV", &format!("0 33 2888 zk-1.{fqdn}")),
        record(&srv, "SRV", &format!("0 33 2888 10-244-5-9.{fqdn}")),
    ]);
    assert_eq!(dns(&ns.name, "zk", &[]), expected);

    // Without publishNotReadyAddresses only ready endpoints answer.
    ns.create(&service(
        "ready-only",
        ServiceSpec {
            cluster_ip: Some("None".into()),
            selector: Some(labels(&[("app", "zk")])),
            ports: Some(vec![port("peer", 2888, "TCP")]),
            ..Default::default()
        },
    ))
    .await;
    wait_for_endpoints(&ns, "ready-only", 3).await;
    let records = dns(&ns.name, "ready-only", &[]);
    let addresses: BTreeSet<&str> = records.iter().map(|(_, _, data)| data.as_str()).collect();
    assert!(addresses.contains("10.244.5.1") && !addresses.contains("10.244.5.2"), "{records:?}");
}

async fn wait_for_endpoints(ns: &TestNamespace, service: &str, count: usize) {
    let api = ns.api::<EndpointSlice>();
    eventually(&format!("{count} endpoints of {service}"), TIMEOUT, || {
        let api = api.clone();
        async move {
            let slices = slices_of(&api, service, SVCPLANE).await;
            let n: usize = slices.iter().map(|s| s.endpoints.as_ref().map_or(0, Vec::len)).sum();
            if n == count { Ok(()) } else { Err(n) }
        }
    })
    .await;
}

#[tokio::test]
async fn external_name_service_is_a_cname() {
    let ns = setup("dns-externalname").await;
    ns.create(&service(
        "upstream",
        ServiceSpec {
            type_: Some("ExternalName".into()),
            external_name: Some("db.example.com".into()),
            ..Default::default()
        },
    ))
    .await;
    assert_eq!(
        dns(&ns.name, "upstream", &[]),
        BTreeSet::from([record(
            &format!("upstream.{}.svc.cluster.local.", ns.name),
            "CNAME",
            "db.example.com."
        )])
    );
}
