//! `svcplane ipam status` and `svcplane ipam who` against a real kube-apiserver
//! (dual-stack Service CIDRs, so a `kubernetes` ServiceCIDR object exists).

use std::time::SystemTime;

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use kube::{Api, api::ListParams, core::ObjectMeta};
use serde_json::Value;
use svcplane_e2e::{TestNamespace, fixtures::labels, shared, svcplane::svcplane_bin, webhook::install_crd};
use svcplane_webhook::blocks::{BlockId, build_block};
use svcplane_webhook::{AllocationClaim, Owner, Value as Held, claim::build_claim};

fn json(args: &[&str]) -> Value {
    let (ok, stdout, stderr) = shared().run_cli(&svcplane_bin(), args);
    assert!(ok, "{args:?} failed: {stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

fn service(name: &str, type_: &str, node_port: Option<i32>) -> Service {
    Service {
        metadata: ObjectMeta { name: Some(name.into()), ..Default::default() },
        spec: Some(ServiceSpec {
            type_: Some(type_.into()),
            selector: Some(labels(&[("app", name)])),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: 80,
                node_port,
                ..Default::default()
            }]),
            external_traffic_policy: (type_ == "LoadBalancer").then(|| "Local".into()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[tokio::test]
async fn status_counts_every_service_and_who_finds_each_holder() {
    let client = shared().client().await;
    let ns = TestNamespace::new(&client, "cli-ipam").await;
    let web = ns.create(&service("web", "ClusterIP", None)).await;
    let np = ns.create(&service("np", "NodePort", Some(30080))).await;
    let lb = ns.create(&service("lb", "LoadBalancer", None)).await;
    // A claim no Service carries (a leak, or a request in flight): counted as
    // used, as the webhook counts it, and shown.
    install_crd(&client).await;
    let leaked = Held::Ip("10.96.255.253".parse().expect("ip"));
    let owner = Owner { namespace: ns.name.clone(), name: "gone".into() };
    Api::<AllocationClaim>::all(client.clone())
        .create(&Default::default(), &build_claim(leaked, &owner))
        .await
        .expect("create a claim");
    // A webhook replica's block (--webhook-block-size): its free values are
    // reserved ahead, still free, and its claim is not a claim without a Service.
    let block = BlockId { first: Held::Ip("10.96.254.224".parse().expect("ip")), size: 32 };
    Api::<AllocationClaim>::all(client.clone())
        .create(&Default::default(), &build_block(block, "svcplane-replica-x", SystemTime::now()))
        .await
        .expect("create a block");

    // status: pools from the `kubernetes` ServiceCIDR; used = what Services hold.
    let all = Api::<Service>::all(client.clone()).list(&ListParams::default()).await.expect("list").items;
    let v4_used = all
        .iter()
        .flat_map(|s| s.spec.clone().and_then(|s| s.cluster_ips).unwrap_or_default())
        .filter(|ip| ip.starts_with("10.96."))
        .count();
    let node_ports_used = all
        .iter()
        .filter_map(|s| s.spec.clone())
        .map(|s| {
            s.ports.unwrap_or_default().iter().filter(|p| p.node_port.is_some()).count()
                + usize::from(s.health_check_node_port.is_some())
        })
        .sum::<usize>();
    let status = json(&["ipam", "status", "-o", "json"]);
    let pools = status.as_array().expect("array");
    let pool = |kind: &str, range: &str| {
        pools
            .iter()
            .find(|p| p["kind"] == kind && p["range"] == range)
            .unwrap_or_else(|| panic!("no {kind} pool {range}: {status:#}"))
    };
    let v4 = pool("ClusterIP", "10.96.0.0/16");
    assert_eq!(v4["source"], "kubernetes", "the ServiceCIDR object, not the flag");
    assert_eq!(v4["size"], 65534);
    assert_eq!(v4["used"], v4_used + 1, "the Services' IPs and the leaked claim's");
    assert_eq!(v4["free"], 65534 - v4_used - 1);
    assert_eq!(v4["claimsWithoutService"], 1);
    let carried_in_block = all
        .iter()
        .flat_map(|s| s.spec.clone().and_then(|s| s.cluster_ips).unwrap_or_default())
        .filter_map(|ip| ip.parse().ok())
        .filter(|ip| block.contains(Held::Ip(*ip)))
        .count();
    assert_eq!(v4["reservedAhead"], 32 - carried_in_block, "the block's free values");
    pool("ClusterIP", "fd00:10:96::/112");
    let ports = pool("NodePort", "30000-32767");
    assert_eq!((ports["size"].as_u64(), ports["used"].as_u64()), (Some(2768), Some(node_ports_used as u64)));
    assert!(node_ports_used >= 3, "np's nodePort, lb's nodePort and healthCheckNodePort");

    let (ok, table, _) = shared().run_cli(&svcplane_bin(), &["ipam", "status"]);
    assert!(ok && table.starts_with("SOURCE") && table.contains("CLAIMS WITHOUT SERVICE"), "{table}");
    assert!(table.contains("RESERVED AHEAD"), "{table}");
    println!("{table}");

    // who: an IP, a nodePort, a healthCheckNodePort.
    let web_ip = web.spec.and_then(|s| s.cluster_ip).expect("clusterIP");
    let holders = json(&["ipam", "who", &web_ip, "-o", "json"]);
    assert_eq!(holders[0]["service"], "web");
    assert_eq!(holders[0]["namespace"], ns.name.as_str());
    assert_eq!(holders[0]["field"], "spec.clusterIPs[0]");
    let np_port = np.spec.and_then(|s| s.ports).expect("ports")[0].node_port.expect("nodePort");
    assert_eq!(np_port, 30080);
    let holders = json(&["ipam", "who", "30080", "-o", "json"]);
    assert_eq!(
        (&holders[0]["service"], &holders[0]["field"]),
        (&Value::from("np"), &Value::from("spec.ports[0].nodePort"))
    );
    let health = lb.spec.and_then(|s| s.health_check_node_port).expect("healthCheckNodePort");
    let holders = json(&["ipam", "who", &health.to_string(), "-o", "json"]);
    assert_eq!(
        (&holders[0]["service"], &holders[0]["field"]),
        (&Value::from("lb"), &Value::from("spec.healthCheckNodePort"))
    );
    let (ok, table, _) = shared().run_cli(&svcplane_bin(), &["ipam", "who", &web_ip]);
    assert!(ok && table.contains("spec.clusterIPs[0]"), "{table}");
    println!("{table}");

    // A value only a claim names.
    let holders = json(&["ipam", "who", "10.96.255.253", "-o", "json"]);
    assert_eq!(
        (&holders[0]["service"], &holders[0]["holder"], holders.as_array().map(Vec::len)),
        (&Value::from("gone"), &Value::from("AllocationClaim/ip-10-96-255-253"), Some(1))
    );
    assert_eq!(holders[0]["namespace"], ns.name.as_str());

    // Nobody, and nonsense.
    let (ok, _, stderr) = shared().run_cli(&svcplane_bin(), &["ipam", "who", "10.96.255.254"]);
    assert!(!ok && stderr.contains("no Service holds 10.96.255.254"), "{stderr}");
    let (ok, _, stderr) = shared().run_cli(&svcplane_bin(), &["ipam", "who", "not-an-ip"]);
    assert!(!ok && stderr.contains("neither an IP address nor a port"), "{stderr}");
}
