//! Keeps the ServiceIPPools and the Namespace labels they select on in this
//! replica's [`Index`]. Calls the API: watches `ServiceIPPool`s and
//! Namespaces (metadata only); writes nothing.
//!
//! Ready once both have listed: before that a Service could be given an IP
//! inside a pool it may not use. A cluster without the ServiceIPPool CRD has
//! no pools (ready at once); the watch keeps retrying, so pools work as soon
//! as the CRD is installed.

use std::pin::pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, ListParams};
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{self, store::Writer};
use kube::{Client, ResourceExt};
use tokio::sync::watch;
use tracing::info;

use crate::index::{Index, lock};
use crate::service_ip_pools::ServiceIPPool;
use crate::watches::{Change, watch as watch_changes};

/// Keeps `index`'s pools and Namespace labels current until the streams
/// end; sets `ready` once both have listed.
pub async fn run_pool_watches(client: Client, index: Arc<Mutex<Index>>, ready: watch::Sender<bool>) {
    let listed = AtomicU8::new(0);
    let mark = |which: u8| {
        if listed.fetch_or(1 << which, Ordering::SeqCst) | (1 << which) == 0b11 {
            let _ = ready.send(true);
        }
    };
    let on_pools = async {
        let api: Api<ServiceIPPool> = Api::all(client.clone());
        if let Err(kube::Error::Api(status)) = api.list(&ListParams::default().limit(1)).await
            && status.code == 404
        {
            info!("the ServiceIPPool CRD is not installed: no pools until it is");
            mark(0);
        }
        let (store, writer) = reflector::store();
        let mut changes = pin!(watch_changes(api, writer));
        // Every change re-plans the pools from the whole (complete) store.
        while changes.next().await.is_some() {
            let pools: Vec<ServiceIPPool> = store.state().iter().map(|p| (**p).clone()).collect();
            let names: Vec<String> = pools.iter().map(|p| p.name_any()).collect();
            lock(&index).set_service_ip_pools(pools);
            info!(?names, "ServiceIPPools");
            mark(0);
        }
    };
    let on_namespaces = async {
        // Metadata only: labels are all a namespaceSelector reads.
        let api: Api<PartialObjectMeta<Namespace>> = Api::all(client.clone());
        let mut changes = pin!(watch_changes(api, Writer::default()));
        while let Some(change) = changes.next().await {
            let mut index = lock(&index);
            match change {
                Change::Listed(all) => index.replace_namespace_labels(
                    all.iter().map(|n| (n.name_any(), n.labels().clone())).collect(),
                ),
                Change::Applied(n) => index.set_namespace_labels(&n.name_any(), Some(n.labels().clone())),
                Change::Deleted(n) => index.set_namespace_labels(&n.name_any(), None),
            }
            drop(index);
            mark(1);
        }
    };
    tokio::join!(on_pools, on_namespaces);
}
