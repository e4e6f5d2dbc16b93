//! Issue #7: several webhook replicas serving at once share one claim store;
//! 500 concurrent creates across three replicas, one killed mid-run, end with
//! no duplicate IP or port and, after repair, no lost claim.
//!
//! Each replica serves its own labelled namespace (a webhook configuration
//! has one URL), and all draw from the same pools, so every pick races the
//! other replicas' picks through the AllocationClaim 409 lock. Replica 0 is a
//! real `svcplane run --roles=webhook` process, killed with SIGKILL mid-run;
//! replicas 1 and 2 run in-process. The in-process replicas hand dynamic values
//! out of their blocks (`--webhook-block-size=32`) and write their claims after
//! answering, beside a process that claims one value at a time.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use futures::future::join_all;
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, ListParams, PostParams};
use svcplane_e2e::webhook::*;
use svcplane_e2e::{shared, wait::eventually};
use svcplane_webhook::{AllocationClaim, Value};

const SERVICES: usize = 500;
const REPLICAS: usize = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_creates_across_replicas_never_duplicate_even_when_one_dies() {
    let cp = shared();
    let client = cp.client().await;
    install_crd(&client).await;
    let (_certs, mut args) = serving_cert(cp);
    // Replicas 1 and 2 hand values out of blocks; the process (replica 0)
    // claims one value at a time: both kinds run side by side.
    args.block_size = 32;
    // In-process replicas 1..REPLICAS, then replica 0 as a process.
    let ns0 = scoped_namespace(&client, "wh-rep-0", "replica-0").await;
    let mut servers = Vec::new();
    let mut namespaces = vec![ns0.clone()];
    for i in 1..REPLICAS {
        let server = start_replica(&args, &client).await;
        let scope = format!("replica-{i}");
        let ns = scoped_namespace(&client, &format!("wh-rep-{i}"), &scope).await;
        register(&client, cp, &format!("svcplane-replica-{i}"), server.addr, &scope).await;
        wait_webhook_active(&ns, &server).await;
        servers.push(server);
        namespaces.push(ns);
    }
    // A Service holding an IP lets the test see the process's webhook answer.
    let holder = namespaces[1].create(&mk_service("holder", "ClusterIP", &[(80, None)])).await;
    let held_ip = holder.spec.and_then(|s| s.cluster_ip).expect("holder IP");
    let (process, process_addr) = spawn_replica_process(cp, "webhook-replica-0", &args, "webhook").await;
    register(&client, cp, "svcplane-replica-0", process_addr, "replica-0").await;
    wait_webhook_denies_held_ip(&ns0, &held_ip, &format!("{}/holder", namespaces[1].name)).await;

    let started = Instant::now();
    let creates = (0..SERVICES).map(|i| {
        let ns = namespaces[i % REPLICAS].clone();
        async move {
            let svc = mk_service(&format!("svc-{i}"), "NodePort", &[(80, None)]);
            // A create whose replica died is retried, as a client would.
            for _ in 0..20 {
                match ns.api::<Service>().create(&PostParams::default(), &svc).await {
                    Ok(_) => return Ok(()),
                    Err(kube::Error::Api(s)) if s.code == 409 && s.reason == "AlreadyExists" => return Ok(()),
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
            Err(format!("svc-{i} never created"))
        }
    });
    // Kill replica 0 once a third of the creates are through.
    let killer = async {
        let api: Api<Service> = namespaces[0].api();
        eventually("some creates through", Duration::from_secs(120), || async {
            let n = api.list(&ListParams::default()).await.map(|l| l.items.len()).unwrap_or(0);
            if n >= SERVICES / (REPLICAS * 3) { Ok(()) } else { Err(n) }
        })
        .await;
        process.kill();
        // A surviving replica takes over namespace 0's URL.
        let survivor = servers[0].addr;
        register(&client, cp, "svcplane-replica-0", survivor, "replica-0").await;
    };
    let (results, ()) = tokio::join!(join_all(creates), killer);
    let elapsed = started.elapsed();
    let failed: Vec<String> = results.into_iter().filter_map(Result::err).collect();
    assert!(failed.is_empty(), "{failed:?}");
    println!("{SERVICES} creates across {REPLICAS} replicas (one killed) in {elapsed:?}");

    let services: Vec<Service> = Api::<Service>::all(client.clone())
        .list(&ListParams::default())
        .await
        .expect("list")
        .items
        .into_iter()
        .filter(|s| s.metadata.namespace.as_deref().is_some_and(|n| n.starts_with("wh-rep-")))
        .collect();
    // The creates plus the IP holder.
    assert_eq!(services.len(), SERVICES + 1);
    let seen = holders_of_values(&services);
    assert_eq!(seen.len(), SERVICES * 2 + 1, "one IP and one port each, and the holder's IP");

    // Repair: every held value ends up claimed by its Service.
    let claims: Api<AllocationClaim> = Api::all(client.clone());
    let repair_args = svcplane_webhook::WebhookArgs { repair_grace: Duration::from_secs(3), ..args.clone() };
    eventually("every value claimed by its holder", Duration::from_secs(60), || async {
        repair_pass(&client, &repair_args, &mut repair_args.usage_alerts().expect("thresholds")).await?;
        let by_value: BTreeMap<Value, String> = claims
            .list(&ListParams::default())
            .await
            .map_err(|e| e.to_string())?
            .items
            .into_iter()
            .filter_map(|c| {
                Value::from_spec(&c.spec).map(|v| (v, format!("{}/{}", c.spec.namespace, c.spec.service)))
            })
            .collect();
        let missing: BTreeSet<&Value> =
            seen.iter().filter(|(v, owner)| by_value.get(v) != Some(owner)).map(|(v, _)| v).collect();
        if missing.is_empty() { Ok(()) } else { Err(format!("{} values unclaimed", missing.len())) }
    })
    .await;
    // The surviving replicas handed values out of their blocks, and none of
    // those had been claimed by another request first.
    for server in &servers {
        let metrics = server.metrics.encode();
        let counter = |name: &str| -> u64 {
            let line = metrics.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("no {name}"));
            line.rsplit(' ').next().and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("{line}"))
        };
        assert!(counter("svcplane_webhook_block_handouts_total") > 0, "no value came from a block");
        assert_eq!(counter("svcplane_webhook_block_conflicts_total"), 0);
    }
    for server in servers {
        server.kill();
    }
}
