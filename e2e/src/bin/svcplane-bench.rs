//! `make bench`: svcplane against kube-controller-manager on the same scenario, each on
//! a freshly started control plane of the pinned version. Scenario A: S Services of
//! P Pods each are created not ready; then every Pod turns Ready. Measured: time from
//! the first Ready patch until every endpoint is ready in both EndpointSlices and
//! Endpoints, writes on endpointslices/endpoints counted by the apiserver itself,
//! controller CPU seconds during the change, and peak RSS from /proc.
//!
//! Usage: svcplane-bench [SERVICES] [PODS_PER_SERVICE]   (default 200 10)

use std::{sync::Arc, time::Duration};

use k8s_openapi::api::{core::v1::Endpoints, discovery::v1::EndpointSlice};
use kube::{Api, api::ListParams};
use svcplane_e2e::{
    ControlPlane, ControlPlaneOptions, TestNamespace,
    fixtures::{ensure_node, mk_pod, mk_port, mk_service, set_pod_ready},
};
use tokio::sync::Semaphore;

/// User + system CPU seconds and peak RSS (MiB) of a process, from /proc.
fn proc_usage(pid: u32) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name: utime is the 14th, stime the 15th.
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    let cpu = (ticks(11) + ticks(12)) / 100.0;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let hwm = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0;
    (cpu, hwm)
}

struct Result {
    name: &'static str,
    converge_s: f64,
    slice_writes: f64,
    endpoints_writes: f64,
    cpu_s: f64,
    rss_mib: f64,
}

#[derive(Clone, Copy)]
enum Who {
    Upstream { qps: u32, burst: u32 },
    Svcplane,
}

async fn ready_count(client: &kube::Client, ns: &str, managed_by: &str) -> (usize, usize) {
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), ns);
    let lp = ListParams::default().labels(&format!("endpointslice.kubernetes.io/managed-by={managed_by}"));
    let ready_slices = slices
        .list(&lp)
        .await
        .map(|l| {
            l.items
                .iter()
                .flat_map(|s| s.endpoints.iter().flatten())
                .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true))
                .count()
        })
        .unwrap_or(0);
    let eps: Api<Endpoints> = Api::namespaced(client.clone(), ns);
    let ready_eps = eps
        .list(&ListParams::default())
        .await
        .map(|l| {
            l.items
                .iter()
                .flat_map(|e| e.subsets.iter().flatten())
                .map(|s| s.addresses.as_ref().map_or(0, Vec::len))
                .sum()
        })
        .unwrap_or(0);
    (ready_slices, ready_eps)
}

async fn run(who: Who, services: usize, pods: usize) -> Result {
    let (options, managed_by, name) = match who {
        Who::Upstream { qps, burst } => (
            ControlPlaneOptions {
                controller_manager_args: vec![
                    format!("--kube-api-qps={qps}"),
                    format!("--kube-api-burst={burst}"),
                ],
                ..ControlPlaneOptions::default()
                    .with_controller_manager(&["endpointslice-controller", "endpoints-controller"])
            },
            "endpointslice-controller.k8s.io",
            if qps == 20 {
                "kube-controller-manager (QPS 20/30)"
            } else {
                "kube-controller-manager (QPS 1000/2000)"
            },
        ),
        Who::Svcplane => (ControlPlaneOptions::default(), "endpointslice-controller.svcplane.io", "svcplane"),
    };
    let cp = ControlPlane::start(options).await.unwrap_or_else(|e| panic!("{e}"));
    let client = cp.client().await;
    let svcplane = match who {
        Who::Svcplane => Some(cp.svcplane("bench", &["--controllers=endpointslice,endpoints"]).await),
        Who::Upstream { .. } => None,
    };
    let pid = match &svcplane {
        Some(s) => s.pid(),
        None => {
            cp.pids().into_iter().find(|(n, _)| n == "kube-controller-manager").map(|(_, p)| p).unwrap_or(0)
        }
    };
    ensure_node(&client, "node-a", "192.0.2.1", None).await;
    let ns = TestNamespace::new(&client, "bench").await;
    let limit = Arc::new(Semaphore::new(32));
    let mut tasks = Vec::new();
    for s in 0..services {
        let (ns, limit) = (ns.clone(), limit.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = limit.acquire().await;
            let app = format!("s{s}");
            ns.create(&mk_service(&app, &[("app", &app)], vec![mk_port("http", 80, "8080")])).await;
            for p in 0..pods {
                let ip = format!("10.{}.{}.{}", 100 + s / 250, s % 250, p + 1);
                ns.running_pod(mk_pod(&format!("{app}-{p}"), &[("app", &app)], "node-a", &[]), &[&ip], false)
                    .await;
            }
        }));
    }
    for t in tasks {
        t.await.expect("create");
    }
    // Wait until the controller has written the not-ready state everywhere.
    let total = services * pods;
    loop {
        let slices: Api<EndpointSlice> = ns.api();
        let lp =
            ListParams::default().labels(&format!("endpointslice.kubernetes.io/managed-by={managed_by}"));
        let n: usize = slices
            .list(&lp)
            .await
            .map(|l| l.items.iter().map(|s| s.endpoints.as_ref().map_or(0, Vec::len)).sum())
            .unwrap_or(0);
        if n == total {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let slices0 = cp.apiserver_writes(&client, "endpointslices").await;
    let eps0 = cp.apiserver_writes(&client, "endpoints").await;
    let (cpu0, _) = proc_usage(pid);

    let start = tokio::time::Instant::now();
    let mut tasks = Vec::new();
    for s in 0..services {
        let (ns, limit) = (ns.clone(), limit.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = limit.acquire().await;
            for p in 0..pods {
                set_pod_ready(&ns.api(), &format!("s{s}-{p}"), true).await;
            }
        }));
    }
    loop {
        let (a, b) = ready_count(&client, &ns.name, managed_by).await;
        if a == total && b == total {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let converge_s = start.elapsed().as_secs_f64();
    for t in tasks {
        t.await.expect("patch");
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (cpu1, rss_mib) = proc_usage(pid);
    Result {
        name,
        converge_s,
        slice_writes: cp.apiserver_writes(&client, "endpointslices").await - slices0,
        endpoints_writes: cp.apiserver_writes(&client, "endpoints").await - eps0,
        cpu_s: cpu1 - cpu0,
        rss_mib,
    }
}

#[tokio::main]
async fn main() {
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let services = args.first().copied().unwrap_or(200);
    let pods = args.get(1).copied().unwrap_or(10);
    println!("Scenario A: {services} Services x {pods} Pods turn Ready (fresh control plane each)\n");
    let mut results = Vec::new();
    for who in [Who::Upstream { qps: 20, burst: 30 }, Who::Upstream { qps: 1000, burst: 2000 }, Who::Svcplane]
    {
        let r = run(who, services, pods).await;
        eprintln!("  {} done: {:.1} s", r.name, r.converge_s);
        results.push(r);
    }
    println!(
        "| controller | converged after first Ready patch (s) | EndpointSlice writes | Endpoints writes | CPU during change (s) | peak RSS (MiB) |"
    );
    println!("|---|---|---|---|---|---|");
    for r in &results {
        println!(
            "| {} | {:.1} | {:.0} | {:.0} | {:.2} | {:.0} |",
            r.name, r.converge_s, r.slice_writes, r.endpoints_writes, r.cpu_s, r.rss_mib
        );
    }
    let s = &results[2];
    println!("\nRatios svcplane / upstream:");
    for u in &results[..2] {
        println!(
            "  vs {}: convergence {:.2}x, slice writes {:.2}x, Endpoints writes {:.2}x, CPU {:.2}x, RSS {:.2}x",
            u.name,
            s.converge_s / u.converge_s,
            s.slice_writes / u.slice_writes.max(1.0),
            s.endpoints_writes / u.endpoints_writes.max(1.0),
            s.cpu_s / u.cpu_s.max(0.01),
            s.rss_mib / u.rss_mib.max(1.0)
        );
    }
}
