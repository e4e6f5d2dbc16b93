//! `make cluster` / `make cluster-down`: a real cluster on this machine (kubelet nodes
//! in network namespaces, svcplane deployed from its own image), left running.
//!
//! `svcplane-cluster up` starts it (removing whatever an earlier one left) and prints
//! how to use and stop it; `svcplane-cluster down` removes it and everything it made
//! on the machine; `svcplane-cluster rss` prints the resident memory of every
//! process of the cluster, by program. The folder is `$SVCPLANE_CLUSTER_DIR` (default
//! /tmp/svcplane-cluster); `$SVCPLANE_CLUSTER_NODES` sets the node count (2).

use svcplane_e2e::cluster::{Cluster, ClusterOptions, default_root, host};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    match std::env::args().nth(1).as_deref() {
        Some("up") => {
            let options = ClusterOptions::default();
            match Cluster::start(&options, None).await {
                Ok(cluster) => {
                    println!(
                        "A {}-node cluster is running, svcplane deployed in svcplane-system.",
                        cluster.nodes.len()
                    );
                    println!("  export KUBECONFIG={}", cluster.kubeconfig_path.display());
                    println!("  kubectl get nodes,pods -A -o wide");
                    println!(
                        "Logs: {}/logs and {}/controlplane/logs",
                        cluster.root.display(),
                        cluster.root.display()
                    );
                    println!(
                        "Stop it (removes every process, mount, namespace and route): make cluster-down"
                    );
                    // The processes belong to the cluster's folder, not to this one.
                    std::process::exit(0);
                }
                Err(e) => {
                    let _ = std::fs::write(options.root.join("KEEP"), "start-up failed\n");
                    let kept = host::teardown(&options.root);
                    eprintln!("svcplane-cluster up: {e}");
                    if let Some(kept) = kept {
                        eprintln!("logs kept in {}", kept.display());
                    }
                    std::process::exit(1);
                }
            }
        }
        Some("down") => {
            let root = default_root();
            if let Some(kept) = host::teardown(&root) {
                eprintln!("cluster logs kept in {}", kept.display());
            }
            println!("cluster in {} removed", root.display());
        }
        Some("rss") => {
            let rows = host::rss_by_program(&default_root());
            println!("{:<28} {:>9} {:>10}", "PROGRAM", "PROCESSES", "RSS (MiB)");
            for (name, count, kib) in &rows {
                println!("{name:<28} {count:>9} {:>10.1}", *kib as f64 / 1024.0);
            }
            let total: u64 = rows.iter().map(|r| r.2).sum();
            println!(
                "{:<28} {:>9} {:>10.1}",
                "total",
                rows.iter().map(|r| r.1).sum::<usize>(),
                total as f64 / 1024.0
            );
        }
        _ => {
            eprintln!("usage: svcplane-cluster up|down|rss");
            std::process::exit(2);
        }
    }
}
