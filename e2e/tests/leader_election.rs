//! Two replicas with --leader-elect: one holds the Lease and writes; when it is
//! killed (a node loss), the other takes over and keeps Services converging.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use svcplane_e2e::{
    TestNamespace,
    fixtures::{ensure_node, mk_pod, mk_port, mk_service},
    shared,
    slices::{SVCPLANE, normalize, slices_of},
    svcplane::Svcplane,
    wait::eventually,
};

async fn holder(api: &Api<Lease>) -> Option<String> {
    api.get_opt("svcplane").await.ok().flatten()?.spec?.holder_identity
}

#[tokio::test]
async fn standby_takes_over_when_the_leader_is_killed() {
    let cp = shared();
    let client = cp.client().await;
    ensure_node(&client, "node-a", "192.0.2.1", None).await;
    let ns = TestNamespace::new(&client, "leader").await;
    let lease_args = ["--leader-elect", "--controllers=endpointslice"];
    let ns_flag = format!("--leader-election-namespace={}", ns.name);
    let a = cp.svcplane("leader-a", &[lease_args[0], lease_args[1], &ns_flag]).await;
    let b = cp.svcplane("leader-b", &[lease_args[0], lease_args[1], &ns_flag]).await;
    let leases: Api<Lease> = ns.api();
    let first = eventually("a lease holder", Duration::from_secs(30), || async {
        holder(&leases).await.ok_or("no holder")
    })
    .await;

    ns.create(&mk_service("s", &[("app", "s")], vec![mk_port("http", 80, "8080")])).await;
    ns.running_pod(mk_pod("p0", &[("app", "s")], "node-a", &[]), &["10.40.0.1"], true).await;
    eventually("slice from the leader", Duration::from_secs(30), || async {
        let n = normalize(&slices_of(&ns.api(), "s", SVCPLANE).await);
        if n.endpoint_count() == 1 { Ok(()) } else { Err(n) }
    })
    .await;
    // Only the leader wrote.
    let (leader, standby) = if first == "svcplane-leader-a" { (a, b) } else { (b, a) };
    wrote(&leader, "the leader").await;
    assert_eq!(standby.metric_sum("svcplane_changes_total", &[]).await, 0.0, "the standby never writes");

    leader.kill();
    let second = eventually("the standby to take the lease", Duration::from_secs(60), || async {
        match holder(&leases).await {
            Some(h) if h != first => Ok(h),
            other => Err(other),
        }
    })
    .await;
    assert_ne!(second, first);
    ns.running_pod(mk_pod("p1", &[("app", "s")], "node-a", &[]), &["10.40.0.2"], true).await;
    eventually("the new leader adds the new Pod", Duration::from_secs(30), || async {
        let n = normalize(&slices_of(&ns.api(), "s", SVCPLANE).await);
        if n.endpoint_count() == 2 { Ok(()) } else { Err(n) }
    })
    .await;
    wrote(&standby, "the new leader").await;
}

/// Waits until `replica` counts a write: the counter moves just after the apiserver
/// answers, so a test that has already seen the object may read it a moment early.
async fn wrote(replica: &Svcplane, who: &str) {
    eventually(&format!("{who} to count its writes"), Duration::from_secs(10), || async {
        let changes = replica.metric_sum("svcplane_changes_total", &[]).await;
        if changes > 0.0 { Ok(()) } else { Err(changes) }
    })
    .await;
}
