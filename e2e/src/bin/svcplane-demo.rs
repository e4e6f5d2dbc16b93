//! `make demo`: a real control plane (etcd, kube-apiserver, and kube-controller-manager
//! with only its workload controllers: its endpoint controllers stay off), svcplane,
//! and the examples/ objects; then prints what kubectl shows. There is no kubelet or
//! scheduler: the demo binds Pods to Nodes and reports their status as a kubelet
//! would (Running, a Pod IP, Ready), so svcplane has real Pods to work with.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use k8s_openapi::api::{
    apps::v1::{Deployment, StatefulSet},
    core::v1::{Binding, ObjectReference, Pod},
};
use kube::{
    Api,
    api::{ListParams, PostParams},
    core::ObjectMeta,
};
use svcplane_e2e::{
    ControlPlane, ControlPlaneOptions, bin_dir,
    fixtures::{ensure_node, set_pod_status},
    wait::poll_until,
};

const NAMESPACE: &str = "demo";
const NODES: [(&str, &str, &str); 2] =
    [("node-a", "192.0.2.11", "zone-a"), ("node-b", "192.0.2.12", "zone-b")];

/// Runs `program --kubeconfig=<admin> args…`; returns stdout then stderr.
fn run_with_kubeconfig(program: &Path, cp: &ControlPlane, args: &[&str]) -> String {
    let out = Command::new(program)
        .arg(format!("--kubeconfig={}", cp.kubeconfig_path.display()))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{} {args:?}: {e}", program.display()));
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    text
}

fn kubectl(cp: &ControlPlane, args: &[&str]) -> String {
    run_with_kubeconfig(&bin_dir().join("kubectl"), cp, args)
}

fn svcplane_cli(cp: &ControlPlane, args: &[&str]) -> String {
    run_with_kubeconfig(&svcplane_e2e::svcplane::svcplane_bin(), cp, args)
}

fn banner(title: &str) {
    println!("\n=== {title} {}", "=".repeat(70usize.saturating_sub(title.len())));
}

#[tokio::main]
async fn main() {
    let examples = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples");
    banner("starting a control plane (etcd, kube-apiserver, kube-controller-manager workload controllers)");
    let options = ControlPlaneOptions::default().with_controller_manager(&[
        "deployment-controller",
        "replicaset-controller",
        "statefulset-controller",
        "garbage-collector-controller",
    ]);
    let cp = ControlPlane::start(options).await.unwrap_or_else(|e| panic!("{e}"));
    println!(
        "kube-apiserver {} at {} (logs: {}/logs)",
        svcplane_e2e::kubernetes_version(),
        cp.server,
        cp.dir().display()
    );
    let client = cp.client().await;
    for (name, ip, zone) in NODES {
        ensure_node(&client, name, ip, Some(zone)).await;
    }

    banner("starting svcplane (controller: endpointslice, endpoints, mirroring)");
    let svcplane = cp.svcplane("demo", &[]).await;
    println!("svcplane ready; metrics at http://{}/metrics", svcplane.metrics);

    banner(&format!("kubectl apply -f {}", examples.display()));
    print!("{}", kubectl(&cp, &["apply", "-f", &examples.display().to_string()]));

    banner("playing kubelet: binding Pods to Nodes and reporting them Running and Ready");
    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    let mut next_ip = 10u8;
    let mut done: BTreeMap<String, String> = BTreeMap::new();
    // Every replica the examples' Deployments and StatefulSets ask for. The
    // StatefulSet creates zk-N only after zk-(N-1) is Ready, so Pods appear over time.
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), NAMESPACE);
    let statefulsets: Api<StatefulSet> = Api::namespaced(client.clone(), NAMESPACE);
    let lp = ListParams::default();
    let wanted: usize = deployments
        .list(&lp)
        .await
        .map(|l| l.items.iter().map(|d| d.spec.replicas.unwrap_or(1)).sum::<i32>())
        .unwrap_or(0) as usize
        + statefulsets
            .list(&lp)
            .await
            .map(|l| l.items.iter().map(|s| s.spec.replicas.unwrap_or(1)).sum::<i32>())
            .unwrap_or(0) as usize;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while done.len() < wanted && tokio::time::Instant::now() < deadline {
        let list = pods.list(&ListParams::default()).await.unwrap_or_else(|e| panic!("list pods: {e}"));
        for pod in list.items {
            let name = pod.metadata.name.clone().unwrap_or_default();
            if done.contains_key(&name) {
                continue;
            }
            let node = NODES[done.len() % NODES.len()].0;
            if pod.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_none() {
                let binding = Binding {
                    metadata: ObjectMeta { name: Some(name.clone()), ..Default::default() },
                    target: ObjectReference {
                        kind: Some("Node".into()),
                        name: Some(node.into()),
                        ..Default::default()
                    },
                };
                pods.create_subresource::<Binding, serde_json::Value>(
                    "binding",
                    &name,
                    &PostParams::default(),
                    &binding,
                )
                .await
                .unwrap_or_else(|e| panic!("bind {name}: {e}"));
            }
            let ip = format!("10.244.0.{next_ip}");
            next_ip += 1;
            // The last ZooKeeper member stays not ready, to show publishNotReadyAddresses.
            let ready = name != "zk-2";
            set_pod_status(&pods, &name, &[&ip], ready).await;
            println!("  {name:<28} -> {node}, {ip}, ready={ready}");
            done.insert(name, ip);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // Give the controller a moment to catch up with the last status change, by
    // waiting until svcplane's queue is empty.
    let _ = poll_until(Duration::from_secs(15), Duration::from_millis(100), || async {
        Ok(svcplane.metric_sum("svcplane_queue_depth", &[]).await == 0.0)
    })
    .await;

    banner("kubectl get services -n demo -o wide");
    print!("{}", kubectl(&cp, &["get", "services", "-n", NAMESPACE, "-o", "wide"]));
    banner("kubectl get endpointslices -n demo (written by svcplane)");
    print!(
        "{}",
        kubectl(
            &cp,
            &["get", "endpointslices", "-n", NAMESPACE, "-L", "endpointslice.kubernetes.io/managed-by"]
        )
    );
    banner("kubectl get endpoints -n demo");
    print!("{}", kubectl(&cp, &["get", "endpoints", "-n", NAMESPACE]));
    banner("svcplane explain svc/web -n demo");
    print!("{}", svcplane_cli(&cp, &["explain", "svc/web", "-n", NAMESPACE]));
    banner("svcplane explain svc/zk -n demo");
    print!("{}", svcplane_cli(&cp, &["explain", "svc/zk", "-n", NAMESPACE]));
    banner("svcplane dns svc/zk -n demo");
    print!("{}", svcplane_cli(&cp, &["dns", "svc/zk", "-n", NAMESPACE]));
    banner("svcplane ipam status");
    print!("{}", svcplane_cli(&cp, &["ipam", "status"]));
    banner("svcplane metrics (writes)");
    for line in svcplane.metrics_text().await.lines().filter(|l| l.starts_with("svcplane_changes_total")) {
        println!("  {line}");
    }
    println!("\nDone. The control plane stops now (set SVCPLANE_KEEP_CONTROLPLANE=1 to keep its folder).");
    svcplane.kill();
}
