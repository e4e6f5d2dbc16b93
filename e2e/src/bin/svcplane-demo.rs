//! `make demo`: svcplane on a real cluster. Two kubelet nodes on this machine
//! (e2e/src/cluster), svcplane deployed from its own image as the cluster's only
//! endpoint controller and Service IPAM webhook, CoreDNS behind kube-dns; then the
//! examples/ objects with real Pods whose readiness the kubelet probes, the tables
//! kubectl and svcplane's CLI print, and requests answered through a ClusterIP, a
//! NodePort and a DNS name.
//!
//! The examples' agnhost image cannot be pulled here (no registry): the test workload
//! image, which implements the two agnhost commands they use, stands in for it. A
//! cluster `make cluster` left running is used and kept; otherwise the demo's own
//! cluster is removed at the end.

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{Api, PostParams};
use svcplane_e2e::{
    bin_dir,
    cluster::{
        Cluster, ClusterOptions, host,
        workload::{
            TESTPOD_IMAGE, client_pod, endpoint_conditions, fetch_through, http_get, ready_pods, resolve_in,
        },
    },
    wait::eventually,
};

const NAMESPACE: &str = "demo";
const AGNHOST: &str = "registry.k8s.io/e2e-test-images/agnhost:2.53";

fn banner(title: &str) {
    println!("\n=== {title} {}", "=".repeat(70usize.saturating_sub(title.len())));
}

/// Runs `program args` with the cluster's kubeconfig; stdout then stderr.
fn run(program: &Path, cluster: &Cluster, args: &[&str], stdin: Option<&str>) -> String {
    let mut child = Command::new(program)
        .arg(format!("--kubeconfig={}", cluster.kubeconfig_path.display()))
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{} {args:?}: {e}", program.display()));
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        let _ = pipe.write_all(text.as_bytes());
    }
    let out = child.wait_with_output().unwrap_or_else(|e| panic!("{} {args:?}: {e}", program.display()));
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    text
}

fn kubectl(cluster: &Cluster, args: &[&str]) -> String {
    run(&bin_dir().join("kubectl"), cluster, args, None)
}

fn svcplane_cli(cluster: &Cluster, args: &[&str]) -> String {
    run(&svcplane_e2e::svcplane::svcplane_bin(), cluster, args, None)
}

/// The examples as one YAML stream, with the stand-in image.
fn examples() -> String {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
        .iter()
        .map(|f| std::fs::read_to_string(f).unwrap_or_else(|e| panic!("{}: {e}", f.display())))
        .collect::<Vec<_>>()
        .join("\n---\n")
        .replace(AGNHOST, TESTPOD_IMAGE)
}

#[tokio::main]
async fn main() {
    let options = ClusterOptions::default();
    let (cluster, owned) = match Cluster::attach(&options.root).await {
        Some(cluster) => {
            banner(&format!("using the cluster `make cluster` left running in {}", options.root.display()));
            (cluster, false)
        }
        None => {
            banner(
                "starting a real cluster: control plane, 2 kubelet nodes, svcplane from its image, CoreDNS",
            );
            // Removed even if the demo dies: svcplane-cluster sits beside this binary.
            let down = std::env::current_exe().ok().and_then(|p| Some(p.parent()?.join("svcplane-cluster")));
            if let Some(down) = down {
                let _ = svcplane_e2e::cluster::reap_when_gone(
                    std::process::id(),
                    &down.to_string_lossy(),
                    &options.root,
                );
            }
            match Cluster::start(&options, Some(std::process::id())).await {
                Ok(cluster) => (cluster, true),
                Err(e) => {
                    let _ = std::fs::write(options.root.join("KEEP"), "demo start-up failed\n");
                    let kept = host::teardown(&options.root);
                    panic!("{e} (logs kept in {kept:?})");
                }
            }
        }
    };
    let client = cluster.client().await;
    print!("{}", kubectl(&cluster, &["get", "nodes", "-o", "wide"]));
    print!("{}", kubectl(&cluster, &["get", "pods", "-n", "svcplane-system", "-o", "wide"]));

    banner("kubectl apply -f examples/ (agnhost -> the local test image)");
    let _ = kubectl(&cluster, &["delete", "namespace", NAMESPACE, "--ignore-not-found", "--wait=true"]);
    print!("{}", run(&bin_dir().join("kubectl"), &cluster, &["apply", "-f", "-"], Some(&examples())));
    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    pods.create(&PostParams::default(), &client_pod("client", &cluster.nodes[cluster.nodes.len() - 1].name))
        .await
        .unwrap_or_else(|e| panic!("client Pod: {e}"));
    ready_pods(&client, NAMESPACE, "app=web", 3).await;
    ready_pods(&client, NAMESPACE, "app=zk", 3).await;
    let client_pod = ready_pods(&client, NAMESPACE, "role=client", 1).await.remove(0);
    // Every Pod's endpoint is ready in svcplane's slices before the tables are printed.
    for service in ["web", "web-nodeport", "zk"] {
        eventually(
            &format!("svcplane published 3 ready endpoints of {service}"),
            Duration::from_secs(30),
            || async {
                let endpoints = endpoint_conditions(&client, NAMESPACE, service).await;
                let ready = endpoints.values().filter(|c| c.0).count();
                if ready == 3 { Ok(()) } else { Err(endpoints) }
            },
        )
        .await;
    }

    banner("kubectl get pods -n demo -o wide (real Pods, real probes)");
    print!("{}", kubectl(&cluster, &["get", "pods", "-n", NAMESPACE, "-o", "wide"]));
    banner("kubectl get services -n demo -o wide (ClusterIPs and NodePorts from svcplane's webhook)");
    print!("{}", kubectl(&cluster, &["get", "services", "-n", NAMESPACE, "-o", "wide"]));
    banner("kubectl get allocationclaims (svcplane's record of each value)");
    print!("{}", kubectl(&cluster, &["get", "allocationclaims"]));
    banner("kubectl get endpointslices -n demo (written by svcplane)");
    print!(
        "{}",
        kubectl(
            &cluster,
            &["get", "endpointslices", "-n", NAMESPACE, "-L", "endpointslice.kubernetes.io/managed-by"]
        )
    );
    banner("kubectl get endpoints -n demo");
    print!("{}", kubectl(&cluster, &["get", "endpoints", "-n", NAMESPACE]));
    banner("svcplane explain svc/web -n demo");
    print!("{}", svcplane_cli(&cluster, &["explain", "svc/web", "-n", NAMESPACE]));
    banner("svcplane dns svc/zk -n demo");
    print!("{}", svcplane_cli(&cluster, &["dns", "svc/zk", "-n", NAMESPACE]));
    banner("svcplane ipam status");
    print!("{}", svcplane_cli(&cluster, &["ipam", "status"]));

    let services: Api<Service> = Api::namespaced(client.clone(), NAMESPACE);
    let web = services.get("web").await.unwrap_or_else(|e| panic!("svc web: {e}"));
    let cluster_ip = web.spec.and_then(|s| s.cluster_ip).unwrap_or_default();
    let client_name = client_pod.metadata.name.clone().unwrap_or_default();
    banner(&format!("requests from Pod {client_name} through the ClusterIP {cluster_ip}:80"));
    for answer in fetch_through(&client_pod, &format!("{cluster_ip}:80"), 6).await {
        println!("  GET http://{cluster_ip}/ -> {answer:?}");
    }
    for node in &cluster.nodes {
        let mode = format!("{:?}", node.proxy_mode).to_lowercase();
        banner(&format!(
            "from outside the cluster through the NodePort {}:30080 (kube-proxy {mode})",
            node.ip
        ));
        // kube-proxy programs a new NodePort within its sync period: wait for it.
        let addr = format!("{}:30080", node.ip);
        let answer =
            eventually(&format!("the NodePort on {}", node.name), Duration::from_secs(30), || async {
                http_get(&addr, "/", Duration::from_secs(5)).await
            })
            .await;
        println!("  GET http://{addr}/ -> {} {}", answer.0, answer.1.trim());
    }
    let name = format!("web.{NAMESPACE}.svc.cluster.local");
    banner(&format!("DNS from Pod {client_name}: {name} and zk-0.zk.{NAMESPACE}.svc.cluster.local"));
    println!("  {name} -> {:?}", resolve_in(&client_pod, &name).await);
    let zk0 = format!("zk-0.zk.{NAMESPACE}.svc.cluster.local");
    println!("  {zk0} -> {:?}", resolve_in(&client_pod, &zk0).await);
    for answer in fetch_through(&client_pod, &format!("{name}:80"), 3).await {
        println!("  GET http://{name}/ -> {answer:?}");
    }

    if owned {
        banner("removing the demo's cluster");
        host::teardown(&cluster.root);
        println!("Done. `make cluster` starts one that stays up (then `make demo` uses it).");
    } else {
        println!("\nDone. The cluster keeps running (make cluster-down stops it).");
    }
}
