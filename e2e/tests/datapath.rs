//! svcplane's EndpointSlices drive the real consumers (issue #10): kube-proxy in
//! nftables mode and CoreDNS's kubernetes plugin, both built from their Go modules,
//! on a real kube-apiserver with svcplane's controllers and no
//! kube-controller-manager. Traffic goes from the node namespace through the
//! ClusterIP/NodePort rules kube-proxy programmed to echo servers in per-Pod network
//! namespaces (see `svcplane_e2e::datapath` for the network).
//!
//! Needs root, `ip netns`, nftables and dig: `make test-datapath` installs and builds
//! what it needs and runs it (`make test` calls it), hence `#[ignore]` here so that a
//! plain `cargo test --workspace` does not run it twice.

use std::{collections::BTreeMap, sync::OnceLock, time::Duration};

use k8s_openapi::{
    api::core::v1::{ContainerPort, EndpointAddress, EndpointPort, EndpointSubset, Endpoints, Pod, Service},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use svcplane_e2e::{
    ControlPlane, ControlPlaneOptions, TestNamespace,
    datapath::{
        COREDNS_PORT, Network, PodNet, dig, http_get_from, ipvs_unavailable_reason, socket_addr,
        udp_query_from,
    },
    fixtures::{ensure_node, mk_pod, mk_port, mk_service, set_pod_ready},
    shared_with,
    slices::{SVCPLANE_MIRROR, slices_of},
    wait::eventually,
};

const NODE: &str = "dp-node";
const TIMEOUT: Duration = Duration::from_secs(30);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

struct World {
    net: Network,
    cp: &'static ControlPlane,
}

/// The network, a control plane bound to the root end of its link, kube-proxy and
/// CoreDNS in the node namespace, and svcplane: started once per test binary.
fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        std::thread::spawn(|| {
            let net = Network::create().unwrap_or_else(|e| panic!("building the test network: {e}"));
            let root_ip = net.root_ip.clone();
            let cp = shared_with(move || ControlPlaneOptions::default().with_bind_address(&root_ip));
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async {
                let client = cp.client().await;
                ensure_node(&client, NODE, &net.node_ip, None).await;
                net.start_kube_proxy("kube-proxy", &cp.kubeconfig_path, NODE).await.expect("kube-proxy");
                net.start_coredns("coredns", &cp.kubeconfig_path).await.expect("coredns");
            });
            svcplane_e2e::svcplane::shared_svcplane(
                "datapath",
                &["--controllers=endpointslice,endpoints,mirroring"],
            );
            World { net, cp }
        })
        .join()
        .unwrap_or_else(|_| panic!("data-path set-up failed (see the panic above)"))
    })
}

/// A Pod `name` bound to the node, with a running echo server in its own network
/// namespace answering on `ports` (`(port name, number, protocol)`), and status.podIPs
/// set to that namespace's addresses.
async fn pod_with_server(
    ns: &TestNamespace,
    name: &str,
    labels: &[(&str, &str)],
    ports: &[(&str, u16, &str)],
    ready: bool,
    tweak: impl FnOnce(&mut Pod),
) -> PodNet {
    let w = world();
    let podnet = w.net.add_pod().expect("pod namespace");
    let tcp: Vec<u16> = ports.iter().filter(|p| p.2 == "TCP").map(|p| p.1).collect();
    let udp: Vec<u16> = ports.iter().filter(|p| p.2 == "UDP").map(|p| p.1).collect();
    w.net
        .start_echo_server(std::path::Path::new(env!("CARGO_BIN_EXE_echo-server")), &podnet, name, &tcp, &udp)
        .await
        .expect("echo server");
    let mut pod = mk_pod(name, labels, NODE, &[]);
    if let Some(spec) = pod.spec.as_mut() {
        spec.containers[0].ports = Some(
            ports
                .iter()
                .map(|(n, p, proto)| ContainerPort {
                    name: (!n.is_empty()).then(|| n.to_string()),
                    container_port: i32::from(*p),
                    protocol: Some(proto.to_string()),
                    ..Default::default()
                })
                .collect(),
        );
    }
    tweak(&mut pod);
    let ips = podnet.ips();
    let ips: Vec<&str> = ips.iter().map(String::as_str).collect();
    ns.running_pod(pod, &ips, ready).await;
    podnet
}

async fn setup(prefix: &str) -> TestNamespace {
    let w = world();
    let client = w.cp.client().await;
    TestNamespace::new(&client, prefix).await
}

/// The Service's ClusterIPs, as allocated by the apiserver.
async fn cluster_ips(ns: &TestNamespace, name: &str) -> Vec<String> {
    let svc = ns.api::<Service>().get(name).await.expect("get service");
    svc.spec.and_then(|s| s.cluster_ips).unwrap_or_default()
}

/// Sends `n` HTTP requests, each on a new connection, from the node namespace to
/// `ip:port`; counts answers by Pod name (failures as "<error: why>").
async fn spread(ip: &str, port: u16, n: usize) -> BTreeMap<String, usize> {
    let addr = socket_addr(ip, port).expect("address");
    let mut seen = BTreeMap::new();
    for _ in 0..n {
        let who = http_get_from(&world().net.node_netns, addr, REQUEST_TIMEOUT)
            .await
            .unwrap_or_else(|e| format!("<error: {e}>"));
        *seen.entry(who).or_insert(0) += 1;
    }
    seen
}

/// Waits until `n` requests to `ip:port` are answered by exactly the Pods `expected`.
async fn eventually_served_by(ip: &str, port: u16, n: usize, expected: &[&str]) -> BTreeMap<String, usize> {
    let want: Vec<String> = expected.iter().map(|s| s.to_string()).collect();
    eventually(&format!("{ip}:{port} served by exactly {expected:?}"), TIMEOUT, || async {
        let seen = spread(ip, port, n).await;
        if seen.keys().cloned().collect::<Vec<_>>() == want { Ok(seen) } else { Err(seen) }
    })
    .await
}

async fn dig_eventually(query: &[&str], ok: impl Fn(&[String]) -> bool) -> Vec<String> {
    let node = &world().net.node_netns;
    eventually(&format!("dig {query:?}"), TIMEOUT, || async {
        let lines = dig(node, "127.0.0.1", COREDNS_PORT, query).await?;
        if ok(&lines) { Ok(lines) } else { Err(format!("{lines:?}")) }
    })
    .await
}

#[tokio::test]
#[ignore = "data path: needs root, ip netns, nftables; run by `make test-datapath`"]
async fn ipvs_is_reported_missing_and_nftables_mode_serves() {
    let w = world();
    match ipvs_unavailable_reason() {
        Some(reason) => println!("IPVS: not available, IPVS cases skipped; nftables cases run: {reason}"),
        None => {
            println!("IPVS: /proc/net/ip_vs exists, but this suite only exercises kube-proxy's nftables mode")
        }
    }
    let tables =
        svcplane_e2e::datapath::run("ip", &["netns", "exec", &w.net.node_netns, "nft", "list", "tables"])
            .expect("nft list tables");
    assert!(tables.contains("table ip kube-proxy"), "kube-proxy programmed no nftables table: {tables}");
}

#[tokio::test]
#[ignore = "data path: needs root, ip netns, nftables; run by `make test-datapath`"]
async fn cluster_ip_spreads_over_ready_pods_and_never_reaches_a_not_ready_one() {
    let ns = setup("dp-spread").await;
    let mut udp = mk_port("dns", 5353, "5353");
    udp.protocol = Some("UDP".into());
    ns.create(&mk_service("web", &[("app", "web")], vec![mk_port("http", 80, "8080"), udp])).await;
    for (name, ready) in [("web-0", true), ("web-1", true), ("web-2", true), ("web-cold", false)] {
        pod_with_server(
            &ns,
            name,
            &[("app", "web")],
            &[("http", 8080, "TCP"), ("dns", 5353, "UDP")],
            ready,
            |_| {},
        )
        .await;
    }
    let ip = cluster_ips(&ns, "web").await[0].clone();
    eventually_served_by(&ip, 80, 30, &["web-0", "web-1", "web-2"]).await;
    let seen = spread(&ip, 80, 60).await;
    assert_eq!(seen.keys().collect::<Vec<_>>(), ["web-0", "web-1", "web-2"], "60 requests: {seen:?}");

    let addr = socket_addr(&ip, 5353).expect("address");
    for _ in 0..10 {
        let who = udp_query_from(&world().net.node_netns, addr, REQUEST_TIMEOUT).await.expect("UDP answer");
        assert!(["web-0", "web-1", "web-2"].contains(&who.as_str()), "UDP answered by {who}");
    }
}

#[tokio::test]
#[ignore = "data path: needs root, ip netns, nftables; run by `make test-datapath`"]
async fn a_pod_turning_not_ready_stops_receiving_new_connections() {
    let ns = setup("dp-unready").await;
    ns.create(&mk_service("api", &[("app", "api")], vec![mk_port("http", 80, "8080")])).await;
    for name in ["api-0", "api-1"] {
        pod_with_server(&ns, name, &[("app", "api")], &[("http", 8080, "TCP")], true, |_| {}).await;
    }
    let ip = cluster_ips(&ns, "api").await[0].clone();
    eventually_served_by(&ip, 80, 20, &["api-0", "api-1"]).await;
    set_pod_ready(&ns.api(), "api-1", false).await;
    eventually_served_by(&ip, 80, 20, &["api-0"]).await;
    let seen = spread(&ip, 80, 40).await;
    assert_eq!(seen.keys().collect::<Vec<_>>(), ["api-0"], "after api-1 went not ready: {seen:?}");
}

#[tokio::test]
#[ignore = "data path: needs root, ip netns, nftables; run by `make test-datapath`"]
async fn node_port_is_served_at_the_node_address() {
    let ns = setup("dp-nodeport").await;
    let mut svc = mk_service("np", &[("app", "np")], vec![mk_port("http", 80, "8080")]);
    if let Some(spec) = svc.spec.as_mut() {
        spec.type_ = Some("NodePort".into());
    }
    let svc = ns.create(&svc).await;
    let node_port = svc.spec.and_then(|s| s.ports).and_then(|p| p[0].node_port).expect("nodePort allocated");
    pod_with_server(&ns, "np-0", &[("app", "np")], &[("http", 8080, "TCP")], true, |_| {}).await;
    let node_ip = world().net.node_ip.clone();
    eventually_served_by(&node_ip, u16::try_from(node_port).expect("port"), 5, &["np-0"]).await;
}

#[tokio::test]
#[ignore = "data path: needs root, ip netns, nftables; run by `make test-datapath`"]
async fn a_named_target_port_resolves_per_pod() {
    let ns = setup("dp-named").await;
    ns.create(&mk_service("mixed", &[("app", "mixed")], vec![mk_port("http", 80, "web")])).await;
    pod_with_server(&ns, "mixed-a", &[("app", "mixed")], &[("web", 8080, "TCP")], true, |_| {}).await;
    pod_with_server(&ns, "mixed-b", &[("app", "mixed")], &[("web", 9090, "TCP")], true, |_| {}).await;
    let ip = cluster_ips(&ns, "mixed").await[0].clone();
    eventually_served_by(&ip, 80, 30, &["mixed-a", "mixed-b"]).await;
}

#[tokio::test]
#[ignore = "data path: needs root, ip netns, nftables; run by `make test-datapath`"]
async fn headless_service_dns_returns_the_ready_pod_ips() {
    let ns = setup("dp-headless").await;
    let mut svc = mk_service("hl", &[("app", "hl")], vec![mk_port("http", 80, "8080")]);
    if let Some(spec) = svc.spec.as_mut() {
        spec.cluster_ip = Some("None".into());
    }
    ns.create(&svc).await;
    let mut ready_ips = Vec::new();
    for (name, ready) in [("hl-0", true), ("hl-1", true), ("hl-cold", false)] {
        let p = pod_with_server(&ns, name, &[("app", "hl")], &[("http", 8080, "TCP")], ready, |_| {}).await;
        if ready {
            ready_ips.push(p.ipv4.clone());
        }
    }
    ready_ips.sort();
    let name = format!("hl.{}.svc.cluster.local", ns.name);
    let got = dig_eventually(&[&name, "A"], |l| l == ready_ips.as_slice()).await;
    assert_eq!(got, ready_ips);
    // Each answer is a Pod that serves.
    for ip in &got {
        let who =
            http_get_from(&world().net.node_netns, socket_addr(ip, 8080).expect("addr"), REQUEST_TIMEOUT)
                .await
                .expect("request to a headless answer");
        assert!(who == "hl-0" || who == "hl-1", "{ip} answered {who}");
    }
}

#[tokio::test]
#[ignore = "data path: needs root, ip netns, nftables; run by `make test-datapath`"]
async fn stateful_pod_hostname_resolves_while_not_ready_with_publish_not_ready_and_srv_lists_named_ports() {
    let ns = setup("dp-sts").await;
    let mut udp = mk_port("dns", 53, "dns");
    udp.protocol = Some("UDP".into());
    let mut svc = mk_service("db", &[("app", "db")], vec![mk_port("sql", 5432, "sql"), udp]);
    if let Some(spec) = svc.spec.as_mut() {
        spec.cluster_ip = Some("None".into());
        spec.publish_not_ready_addresses = Some(true);
    }
    ns.create(&svc).await;
    let mut pods = Vec::new();
    for (name, ready) in [("db-0", true), ("db-1", false)] {
        let p = pod_with_server(
            &ns,
            name,
            &[("app", "db")],
            &[("sql", 5432, "TCP"), ("dns", 5353, "UDP")],
            ready,
            |pod| {
                if let Some(spec) = pod.spec.as_mut() {
                    spec.hostname = Some(name.to_string());
                    spec.subdomain = Some("db".into());
                }
            },
        )
        .await;
        pods.push(p);
    }
    let host = format!("db-1.db.{}.svc.cluster.local", ns.name);
    let got = dig_eventually(&[&host, "A"], |l| l == [pods[1].ipv4.clone()]).await;
    let who =
        http_get_from(&world().net.node_netns, socket_addr(&got[0], 5432).expect("addr"), REQUEST_TIMEOUT)
            .await
            .expect("request to db-1 by its DNS name's address");
    assert_eq!(who, "db-1");

    // SRV: one record per endpoint for each named port, with the Pod's port.
    let srv = format!("_sql._tcp.db.{}.svc.cluster.local", ns.name);
    let want_sql: Vec<String> =
        ["db-0", "db-1"].iter().map(|h| format!("0 50 5432 {h}.db.{}.svc.cluster.local.", ns.name)).collect();
    dig_eventually(&[&srv, "SRV"], |l| l == want_sql.as_slice()).await;
    let srv = format!("_dns._udp.db.{}.svc.cluster.local", ns.name);
    let want_dns: Vec<String> =
        ["db-0", "db-1"].iter().map(|h| format!("0 50 5353 {h}.db.{}.svc.cluster.local.", ns.name)).collect();
    dig_eventually(&[&srv, "SRV"], |l| l == want_dns.as_slice()).await;
}

#[tokio::test]
#[ignore = "data path: needs root, ip netns, nftables; run by `make test-datapath`"]
async fn external_name_service_is_answered_as_a_cname() {
    let ns = setup("dp-extname").await;
    let mut svc = mk_service("ext", &[], vec![]);
    if let Some(spec) = svc.spec.as_mut() {
        spec.type_ = Some("ExternalName".into());
        spec.external_name = Some("backend.example.test".into());
        spec.ports = None;
    }
    ns.create(&svc).await;
    let name = format!("ext.{}.svc.cluster.local", ns.name);
    dig_eventually(&[&name, "CNAME"], |l| l == ["backend.example.test."]).await;
}

#[tokio::test]
#[ignore = "data path: needs root, ip netns, nftables; run by `make test-datapath`"]
async fn selectorless_service_with_hand_written_endpoints_reaches_a_server_in_another_namespace() {
    let backend_ns = setup("dp-backend").await;
    let backend =
        pod_with_server(&backend_ns, "legacy", &[("app", "legacy")], &[("", 7070, "TCP")], true, |_| {})
            .await;
    let ns = setup("dp-mirror").await;
    ns.create(&mk_service("legacy", &[], vec![mk_port("http", 80, "7070")])).await;
    ns.create(&Endpoints {
        metadata: ObjectMeta { name: Some("legacy".into()), ..Default::default() },
        subsets: Some(vec![EndpointSubset {
            addresses: Some(vec![EndpointAddress { ip: backend.ipv4.clone(), ..Default::default() }]),
            ports: Some(vec![EndpointPort {
                name: Some("http".into()),
                port: 7070,
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            ..Default::default()
        }]),
    })
    .await;
    // What kube-proxy follows is svcplane's mirrored slice (nothing else writes slices
    // here). The observation says whether the hand-written Endpoints is still there.
    eventually("svcplane's mirrored slice of legacy", TIMEOUT, || async {
        let mirrored = slices_of(&ns.api(), "legacy", SVCPLANE_MIRROR).await;
        if mirrored.len() == 1 {
            return Ok(());
        }
        let endpoints = ns.api::<Endpoints>().get_opt("legacy").await.map(|e| e.is_some());
        Err(format!("{} mirrored slices; hand-written Endpoints still exists: {endpoints:?}", mirrored.len()))
    })
    .await;
    let ip = cluster_ips(&ns, "legacy").await[0].clone();
    eventually_served_by(&ip, 80, 5, &["legacy"]).await;
}

#[tokio::test]
#[ignore = "data path: needs root, ip netns, nftables; run by `make test-datapath`"]
async fn dual_stack_service_is_served_over_both_families() {
    // A missing capability fails the case: a skip would pass without testing.
    if let Err(reason) = &world().net.ipv6 {
        panic!("dual-stack needs IPv6 in the network namespaces, which failed: {reason}");
    }
    let ns = setup("dp-dual").await;
    let mut svc = mk_service("dual", &[("app", "dual")], vec![mk_port("http", 80, "8080")]);
    if let Some(spec) = svc.spec.as_mut() {
        spec.ip_family_policy = Some("RequireDualStack".into());
    }
    ns.create(&svc).await;
    for name in ["dual-0", "dual-1"] {
        pod_with_server(&ns, name, &[("app", "dual")], &[("http", 8080, "TCP")], true, |_| {}).await;
    }
    let ips = cluster_ips(&ns, "dual").await;
    assert_eq!(ips.len(), 2, "two ClusterIPs: {ips:?}");
    for ip in &ips {
        eventually_served_by(ip, 80, 20, &["dual-0", "dual-1"]).await;
    }
    let name = format!("dual.{}.svc.cluster.local", ns.name);
    let v6 = ips.iter().find(|ip| ip.contains(':')).cloned().expect("IPv6 ClusterIP");
    dig_eventually(&[&name, "AAAA"], |l| l == [v6.clone()]).await;
}
