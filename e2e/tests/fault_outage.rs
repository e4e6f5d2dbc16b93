//! An apiserver outage under a running svcplane (issue 18, items 1 and 3):
//! svcplane reaches the apiserver through a [`FaultProxy`] that the test cuts
//! for 30 s while a Service keeps failing (a Pod on a Node that does not exist
//! yet) and the cluster changes behind svcplane's back. svcplane must not spin
//! (its retries back off from 1 s) and must converge once the apiserver is back.

use std::time::Duration;

use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use svcplane_e2e::{
    TestNamespace,
    fault::FaultProxy,
    fixtures::{ensure_node, mk_pod, mk_port, mk_service},
    shared,
    slices::{SVCPLANE, normalize, slices_of},
    wait::eventually,
};

/// How long the apiserver is unreachable: the outage is the input of the test.
const OUTAGE: Duration = Duration::from_secs(30);

async fn endpoint_count(api: &Api<EndpointSlice>) -> usize {
    normalize(&slices_of(api, "web", SVCPLANE).await).endpoint_count()
}

#[tokio::test]
async fn a_30s_outage_causes_no_hot_loop_and_svcplane_converges_after_it() {
    let cp = shared();
    let client = cp.client().await;
    ensure_node(&client, "outage-node-a", "192.0.2.11", None).await;
    let ns = TestNamespace::new(&client, "outage").await;
    let proxy = FaultProxy::start(&cp.server).expect("fault proxy");
    let sp = cp.svcplane_through("outage", &proxy, &["--controllers=endpointslice"]).await;

    ns.create(&mk_service("web", &[("app", "web")], vec![mk_port("http", 80, "http")])).await;
    let pod = |name: &str, node: &str| mk_pod(name, &[("app", "web")], node, &[("http", 8080)]);
    ns.running_pod(pod("web-1", "outage-node-a"), &["10.41.0.1"], true).await;
    // Its Node does not exist yet: svcplane leaves it out and retries the Service.
    ns.running_pod(pod("web-2", "outage-node-late"), &["10.41.0.2"], true).await;
    let api: Api<EndpointSlice> = ns.api();
    eventually("web's slice with the Pod whose Node exists", Duration::from_secs(30), || {
        let api = api.clone();
        async move {
            match endpoint_count(&api).await {
                1 => Ok(()),
                n => Err(n),
            }
        }
    })
    .await;
    let retries = "workqueue_retries_total";
    let queue = "name=\"endpoint_slice\"";
    eventually("the Service is being retried", Duration::from_secs(10), || async {
        match sp.metric_sum(retries, &[queue]).await {
            n if n >= 1.0 => Ok(()),
            n => Err(n),
        }
    })
    .await;

    let cut = proxy.cut().await;
    assert!(cut >= 1, "svcplane's watches went through the proxy");
    let syncs = "svcplane_syncs_total";
    let endpointslice = "controller=\"endpointslice\"";
    let before = sp.metric_sum(syncs, &[endpointslice]).await;
    // Behind svcplane's back: the missing Node appears, one more Pod starts.
    ensure_node(&client, "outage-node-late", "192.0.2.12", None).await;
    ns.running_pod(pod("web-3", "outage-node-a"), &["10.41.0.3"], true).await;
    tokio::time::sleep(OUTAGE).await;
    let during = sp.metric_sum(syncs, &[endpointslice]).await - before;
    // Retries back off 1 s, 2 s, 4 s, 8 s, 16 s...: at most 5 in 30 s, plus a
    // margin for a sync under way at the cut. A hot loop would be dozens.
    assert!(during <= 7.0, "{during} syncs during a {OUTAGE:?} outage: svcplane spins");
    proxy.restore();

    // After it: the re-listed watches bring web-3, a retry finds the Node.
    eventually("web's slice with all three Pods", Duration::from_secs(120), || {
        let api = api.clone();
        async move {
            match endpoint_count(&api).await {
                3 => Ok(()),
                n => Err(n),
            }
        }
    })
    .await;
    let settled = sp.metric_sum(retries, &[queue]).await;
    eventually("no retry after convergence", Duration::from_secs(10), || async {
        // A retry already scheduled may still run once, find nothing missing and stop.
        match sp.metric_sum(retries, &[queue]).await - settled {
            n if n <= 1.0 => Ok(()),
            n => Err(n),
        }
    })
    .await;
    assert!(
        sp.metric_sum("svcplane_queue_depth", &[endpointslice]).await <= 1.0,
        "nothing but a last scheduled retry left queued"
    );
}
