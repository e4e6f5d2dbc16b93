//! Reading EndpointSlices back and normalising them so two controllers' results
//! compare: names, order, generation and managed-by are ignored, and so is how
//! endpoints are distributed across slices of one (address type, port set), which
//! upstream does not make deterministic either.

use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::{Api, api::ListParams};

pub use svcplane_controller::labels::{
    SVCPLANE_MIRRORING_CONTROLLER as SVCPLANE_MIRROR, SVCPLANE_SLICE_CONTROLLER as SVCPLANE,
    UPSTREAM_MIRRORING_CONTROLLER as UPSTREAM_MIRROR, UPSTREAM_SLICE_CONTROLLER as UPSTREAM,
};

/// Slices of `service` in the API's namespace written by `managed_by`.
pub async fn slices_of(api: &Api<EndpointSlice>, service: &str, managed_by: &str) -> Vec<EndpointSlice> {
    let lp = ListParams::default().labels(&format!(
        "kubernetes.io/service-name={service},endpointslice.kubernetes.io/managed-by={managed_by}"
    ));
    api.list(&lp).await.map(|l| l.items).unwrap_or_else(|e| panic!("list slices of {service}: {e}"))
}

pub use svcplane_controller::compare::{Normalized, normalize};
