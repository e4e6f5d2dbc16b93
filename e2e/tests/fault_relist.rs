//! Deletions missed during a re-list (issue 18, item 2). svcplane reaches the
//! apiserver through a [`FaultProxy`]; the test cuts it off, deletes an object with
//! the admin client, and waits until etcd has compacted the history svcplane's
//! watch would resume from, so that once restored the watch must re-list
//! (410 Gone) instead of replaying the Delete event. The deleted object is then
//! simply absent from the new list: svcplane must treat it as deleted, as
//! upstream's informer does with a tombstone.
//!
//! Its own binary: the apiserver serves EndpointSlice and Endpoints watches from
//! etcd (no watch cache) and compacts every second, and the tests must not share
//! the cluster with another svcplane (one that was not cut off would repair what the
//! test checks).

use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::{core::v1::Endpoints, discovery::v1::EndpointSlice};
use kube::{
    Api,
    api::{DeleteParams, ListParams, WatchEvent, WatchParams},
};
use svcplane_e2e::{
    ControlPlane, ControlPlaneOptions, TestNamespace,
    fault::FaultProxy,
    fixtures::{ensure_node, mk_pod, mk_port, mk_service},
    shared_with,
    slices::{SVCPLANE, normalize, slices_of},
    wait::eventually,
};

/// Held by each test: one svcplane at a time (another, not cut off, would repair
/// what the test checks).
static ONE_SVCPLANE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn control_plane() -> &'static ControlPlane {
    shared_with(|| ControlPlaneOptions {
        apiserver_args: vec![
            // Watches of these go to etcd, so one resumed from a compacted revision
            // is answered 410 Gone and the client re-lists.
            "--watch-cache-sizes=endpointslices.discovery.k8s.io#0,endpoints#0".into(),
            "--etcd-compaction-interval=1s".into(),
        ],
        ..Default::default()
    })
}

/// Whether a watch of `api` from `resource_version` is answered 410 Gone: etcd has
/// compacted past it, so any watch resumed from it or from an older one must re-list.
async fn watch_expired<K>(api: &Api<K>, resource_version: &str) -> Result<(), String>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let stream = match api.watch(&WatchParams::default().timeout(1), resource_version).await {
        Err(kube::Error::Api(s)) if s.code == 410 => return Ok(()),
        Err(e) => return Err(e.to_string()),
        Ok(stream) => stream,
    };
    let mut stream = std::pin::pin!(stream);
    while let Some(event) = stream.next().await {
        match event {
            Ok(WatchEvent::Error(e)) if e.code == 410 => return Ok(()),
            Ok(_) => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    Err(format!("a watch from {resource_version} is still served"))
}

/// Cuts svcplane off, deletes `name` with the admin client, waits until etcd has
/// compacted past every revision svcplane has seen (so its watch must re-list),
/// and restores the connection.
async fn delete_while_cut_off<K>(proxy: &FaultProxy, api: &Api<K>, name: &str)
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let cut = proxy.cut().await;
    assert!(cut >= 1, "svcplane's watches went through the proxy");
    // Every revision svcplane has seen is at most this one.
    let seen = api.list_metadata(&ListParams::default()).await.expect("list").metadata.resource_version;
    let seen = seen.expect("list resourceVersion");
    api.delete(name, &DeleteParams::default()).await.unwrap_or_else(|e| panic!("delete {name}: {e}"));
    eventually("etcd compacts past what svcplane has seen", Duration::from_secs(30), || {
        watch_expired(api, &seen)
    })
    .await;
    proxy.restore();
}

/// Issue 18: a slice deleted while svcplane was cut off, and so missed by the
/// watch, which re-listed. Before the fix the re-list's InitDone was ignored: the
/// Service was never synced again (its slice stayed missing), and had svcplane's
/// own write of that slice not been seen yet, the write tracker would have held
/// the Service stale and re-queued it every 500ms for ever.
#[tokio::test]
async fn a_slice_deleted_during_a_relist_is_recreated_and_the_service_settles() {
    let _alone = ONE_SVCPLANE.lock().await;
    let cp = control_plane();
    let client = cp.client().await;
    ensure_node(&client, "node-a", "192.0.2.1", Some("zone-a")).await;
    let ns = TestNamespace::new(&client, "relist-slice").await;
    let proxy = FaultProxy::start(&cp.server).expect("fault proxy");
    let sp = cp.svcplane_through("relist-slice", &proxy, &[]).await;

    ns.create(&mk_service("web", &[("app", "web")], vec![mk_port("http", 80, "http")])).await;
    ns.running_pod(mk_pod("web-1", &[("app", "web")], "node-a", &[("http", 8080)]), &["10.40.0.1"], true)
        .await;
    let api: Api<EndpointSlice> = ns.api();
    let first = eventually("svcplane's slice of web", Duration::from_secs(30), || {
        let api = api.clone();
        async move {
            let slices = slices_of(&api, "web", SVCPLANE).await;
            match slices.as_slice() {
                [one] if normalize(&slices).endpoint_count() == 1 => Ok(one.clone()),
                _ => Err(slices.len()),
            }
        }
    })
    .await;
    let first_name = first.metadata.name.clone().expect("name");
    sp.metric_settles("endpointslice syncs", "svcplane_syncs_total", &[], Duration::from_secs(1)).await;

    delete_while_cut_off(&proxy, &api, &first_name).await;

    let second = eventually("web's slice written again", Duration::from_secs(60), || {
        let api = api.clone();
        async move {
            let slices = slices_of(&api, "web", SVCPLANE).await;
            match slices.as_slice() {
                [one] if normalize(&slices).endpoint_count() == 1 => Ok(one.clone()),
                _ => Err(slices),
            }
        }
    })
    .await;
    assert_ne!(second.metadata.name, Some(first_name), "a new slice, not the deleted one");

    // The Service settles: no more reconciles, no stale-cache retries.
    let endpointslice = "controller=\"endpointslice\"";
    sp.metric_settles(
        "stale-cache skips",
        "svcplane_stale_cache_skips_total",
        &[endpointslice],
        Duration::from_secs(2),
    )
    .await;
    sp.metric_settles(
        "endpointslice syncs",
        "svcplane_syncs_total",
        &[endpointslice],
        Duration::from_secs(2),
    )
    .await;
    assert_eq!(sp.metric_sum("svcplane_queue_depth", &[]).await, 0.0, "nothing left queued");
}

/// Issue 18, the Endpoints router: svcplane's own Endpoints object deleted while
/// svcplane was cut off. Before the fix the re-list's InitDone was ignored, so
/// the Endpoints controller never heard of the deletion and never wrote the
/// object again.
#[tokio::test]
async fn endpoints_deleted_during_a_relist_are_written_again() {
    let _alone = ONE_SVCPLANE.lock().await;
    let cp = control_plane();
    let client = cp.client().await;
    ensure_node(&client, "node-a", "192.0.2.1", Some("zone-a")).await;
    let ns = TestNamespace::new(&client, "relist-endpoints").await;
    let proxy = FaultProxy::start(&cp.server).expect("fault proxy");
    let sp = cp.svcplane_through("relist-endpoints", &proxy, &[]).await;

    ns.create(&mk_service("api", &[("app", "api")], vec![mk_port("http", 80, "http")])).await;
    ns.running_pod(mk_pod("api-1", &[("app", "api")], "node-a", &[("http", 8080)]), &["10.40.1.1"], true)
        .await;
    let api: Api<Endpoints> = ns.api();
    let addresses = || {
        let api = api.clone();
        async move {
            let ep = api.get_opt("api").await.map_err(|e| e.to_string())?.ok_or("no Endpoints")?;
            let ips: Vec<String> = ep
                .subsets
                .unwrap_or_default()
                .iter()
                .flat_map(|s| s.addresses.iter().flatten().map(|a| a.ip.clone()))
                .collect();
            if ips == ["10.40.1.1"] { Ok(()) } else { Err(format!("addresses {ips:?}")) }
        }
    };
    eventually("svcplane's Endpoints of api", Duration::from_secs(30), addresses).await;
    sp.metric_settles("syncs", "svcplane_syncs_total", &[], Duration::from_secs(1)).await;

    delete_while_cut_off(&proxy, &api, "api").await;

    eventually("api's Endpoints written again", Duration::from_secs(60), addresses).await;
    sp.metric_settles(
        "endpoints syncs",
        "svcplane_syncs_total",
        &["controller=\"endpoints\""],
        Duration::from_secs(2),
    )
    .await;
    assert_eq!(sp.metric_sum("svcplane_queue_depth", &[]).await, 0.0, "nothing left queued");
}
