//! Differential checks: kube-controller-manager (the oracle) and svcplane run on the
//! same apiserver and the same objects; their results must match once normalised.
//!
//! - EndpointSlices: both controllers write slices (different managed-by values);
//!   compared with [`crate::slices::normalize`].
//! - Endpoints: only one object per Service can exist, so kube-controller-manager
//!   writes it and svcplane's pure planner is run on the same live objects; the
//!   two are compared after upstream's repacking (order-free).

use std::{sync::Arc, time::Duration};

use k8s_openapi::api::{
    core::v1::{Endpoints, Service},
    discovery::v1::EndpointSlice,
};
use kube::{Api, api::ListParams};
pub use svcplane_controller::compare::normalize_endpoints;
use svcplane_controller::stored_pod::StoredPod;
use svcplane_controller::{endpoints::desired_endpoints, plan::Key};

use crate::{
    TestNamespace,
    slices::{Normalized, SVCPLANE, SVCPLANE_MIRROR, UPSTREAM, UPSTREAM_MIRROR, normalize, slices_of},
    wait::eventually,
};

/// How long a scenario step may take to converge on both sides.
pub const CONVERGE: Duration = Duration::from_secs(45);

/// Both controllers' normalised slices of one Service.
#[derive(Debug)]
pub struct Pair {
    /// kube-controller-manager's.
    pub upstream: Normalized,
    /// svcplane's.
    pub svcplane: Normalized,
}

/// Waits until svcplane's slices of `svc` equal upstream's (endpoints and labels)
/// and `expect` holds on upstream's; panics with both views otherwise.
pub async fn converge_slices(ns: &TestNamespace, svc: &str, expect: impl Fn(&Normalized) -> bool) -> Pair {
    converge_with(ns, svc, UPSTREAM, SVCPLANE, expect).await
}

/// Same for mirrored slices.
pub async fn converge_mirrored(ns: &TestNamespace, svc: &str, expect: impl Fn(&Normalized) -> bool) -> Pair {
    converge_with(ns, svc, UPSTREAM_MIRROR, SVCPLANE_MIRROR, expect).await
}

async fn converge_with(
    ns: &TestNamespace,
    svc: &str,
    upstream_by: &str,
    svcplane_by: &str,
    expect: impl Fn(&Normalized) -> bool,
) -> Pair {
    let api: Api<EndpointSlice> = ns.api();
    eventually(&format!("svcplane's slices of {}/{svc} to equal upstream's", ns.name), CONVERGE, || {
        compare_slices(&api, svc, upstream_by, svcplane_by, &expect)
    })
    .await
}

/// One look: both controllers' slices of `svc` when they agree and `expect`
/// holds on upstream's, else the first difference.
async fn compare_slices(
    api: &Api<EndpointSlice>,
    svc: &str,
    upstream_by: &str,
    svcplane_by: &str,
    expect: &impl Fn(&Normalized) -> bool,
) -> Result<Pair, String> {
    let upstream = normalize(&slices_of(api, svc, upstream_by).await);
    let svcplane = normalize(&slices_of(api, svc, svcplane_by).await);
    if upstream.endpoints == svcplane.endpoints && upstream.labels == svcplane.labels && expect(&upstream) {
        Ok(Pair { upstream, svcplane })
    } else {
        Err(diff(&upstream, &svcplane))
    }
}

/// [`converge_slices`] for a change kube-controller-manager follows only when
/// the Service syncs for another reason: calls `nudge` (which should make both
/// controllers sync the Service), then polls for `settle`, and repeats until
/// [`CONVERGE`] has passed. A sync that read its Pod cache before the change
/// arrived there (the Service and Pod watches are separate streams) is not
/// followed by another one, so one nudge is not enough on a loaded machine.
pub async fn converge_slices_nudged<N, F>(
    ns: &TestNamespace,
    svc: &str,
    settle: Duration,
    mut nudge: N,
    expect: impl Fn(&Normalized) -> bool,
) -> Pair
where
    N: FnMut() -> F,
    F: std::future::Future<Output = ()>,
{
    let api: Api<EndpointSlice> = ns.api();
    let deadline = tokio::time::Instant::now() + CONVERGE;
    loop {
        nudge().await;
        let settled = tokio::time::Instant::now() + settle;
        loop {
            match compare_slices(&api, svc, UPSTREAM, SVCPLANE, &expect).await {
                Ok(pair) => return pair,
                Err(last) if tokio::time::Instant::now() >= deadline => {
                    panic!(
                        "timed out after {CONVERGE:?} of nudges waiting for svcplane's slices of {}/{svc} to equal upstream's; last observation: {last}",
                        ns.name
                    )
                }
                Err(_) if tokio::time::Instant::now() >= settled => break,
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
}

fn diff(upstream: &Normalized, svcplane: &Normalized) -> String {
    format!(
        "upstream {} endpoints, svcplane {}; first difference: {:?}",
        upstream.endpoints.len(),
        svcplane.endpoints.len(),
        upstream.first_difference(svcplane, "upstream", "svcplane"),
    )
}

/// Waits until kube-controller-manager's Endpoints of `svc` equals what svcplane's
/// Endpoints planner computes from the same live Service and Pods, and `expect`
/// holds on it; returns it.
pub async fn converge_endpoints(
    ns: &TestNamespace,
    svc: &str,
    expect: impl Fn(Option<&Endpoints>) -> bool,
) -> Option<Endpoints> {
    let (eps, svcs, pods): (Api<Endpoints>, Api<Service>, Api<StoredPod>) = (ns.api(), ns.api(), ns.api());
    eventually(
        &format!("svcplane's Endpoints plan for {}/{svc} to equal upstream's", ns.name),
        CONVERGE,
        || {
            let (eps, svcs, pods, expect) = (eps.clone(), svcs.clone(), pods.clone(), &expect);
            async move {
                let actual = eps.get_opt(svc).await.map_err(|e| e.to_string())?;
                let service = svcs.get_opt(svc).await.map_err(|e| e.to_string())?;
                let pods: Vec<Arc<StoredPod>> = pods
                    .list(&ListParams::default())
                    .await
                    .map_err(|e| e.to_string())?
                    .items
                    .into_iter()
                    .map(|mut pod| {
                        pod.trim();
                        Arc::new(pod)
                    })
                    .collect();
                let key = Key { namespace: ns.name.clone(), name: svc.to_owned() };
                let plan = desired_endpoints(&key, service.as_ref(), &pods, None, None);
                let planned = plan.create.into_iter().chain(plan.update).next();
                // For a selectorless Service the controller leaves user Endpoints alone.
                let selectorless = service
                    .as_ref()
                    .is_some_and(|s| s.spec.as_ref().and_then(|s| s.selector.as_ref()).is_none());
                let same = selectorless
                    || normalize_endpoints(actual.as_ref()) == normalize_endpoints(planned.as_ref());
                if same && expect(actual.as_ref()) {
                    Ok(actual)
                } else {
                    Err(format!(
                        "upstream: {:?}\nsvcplane plan: {:?}",
                        normalize_endpoints(actual.as_ref()),
                        normalize_endpoints(planned.as_ref())
                    ))
                }
            }
        },
    )
    .await
}
