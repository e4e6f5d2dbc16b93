//! The EndpointSlice planner: from a Service, its Pods, Node zones and the slices
//! svcplane already manages, compute the slices to create, update and delete.
//!
//! Pure: no client, no I/O, no clock. It reproduces kube-controller-manager
//! v1.37.2 (`k8s.io/endpointslice` `Reconciler.Reconcile`), with map iteration
//! replaced by sorted order so equal inputs always give equal plans. The shell
//! lists the inputs from reflector stores and applies the plan
//! (creates, then updates, then deletes).
//!
//! - [`desired`]: which endpoints each (address type, port set) group wants.
//! - [`meta`]: slice labels, ownership, the placeholder slice.
//! - [`reconcile`]: upstream's minimal-write packing and create→update recycling.
//! - [`hints`]: which hints, and `trafficDistribution` hints.
//! - [`topology_hints`]: `topology-mode: Auto` hints.
//! - [`nodes`]: what is read from Nodes (zone, and CPU per zone).

mod desired;
mod hints;
mod meta;
mod nodes;
mod reconcile;
#[cfg(test)]
mod tests;
mod topology_hints;

use std::sync::Arc;

use crate::stored_pod::StoredPod;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::labels::SVCPLANE_SLICE_CONTROLLER;
use crate::plan::Plan;

pub use desired::service_address_families;
pub use hints::topology_hints_enabled;
pub use nodes::{EXCLUDED_ROLE_LABELS, NodeInfo, NodeLookup, ZONE_LABEL, ZoneCpu, ZoneShares};
pub use topology_hints::REASON_HINTS_DISABLED;

/// Upstream `--max-endpoints-per-slice` default.
pub const DEFAULT_MAX_ENDPOINTS_PER_SLICE: usize = 100;

/// Static settings of the EndpointSlice planner.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceConfig {
    /// Most endpoints one slice holds (upstream flag, 1..=1000; 0 is read as 1).
    pub max_endpoints_per_slice: usize,
    /// The `endpointslice.kubernetes.io/managed-by` value written and the only one
    /// whose slices are ever touched.
    pub managed_by: String,
    /// What to do with managed slices when the Service loses its selector or
    /// becomes `ExternalName`. Upstream (`false`) leaves them untouched forever
    /// (kubernetes#91072, PR #120775 closed); `true` deletes them.
    pub delete_when_unselected: bool,
}

impl Default for SliceConfig {
    fn default() -> Self {
        SliceConfig {
            max_endpoints_per_slice: DEFAULT_MAX_ENDPOINTS_PER_SLICE,
            managed_by: SVCPLANE_SLICE_CONTROLLER.to_owned(),
            delete_when_unselected: false,
        }
    }
}

/// Plans the EndpointSlices of one Service.
///
/// - `pods`: Pods of the Service's namespace matching its selector. Others are
///   dropped here too, so passing the whole namespace is correct, only slower.
/// - `existing`: slices labelled `kubernetes.io/service-name=<svc>` in the
///   namespace; slices with another managed-by value or a deletionTimestamp are
///   ignored, as upstream's lister filter does.
/// - `trigger_time`: the `endpoints.kubernetes.io/last-change-trigger-time` to set
///   on every slice written; `None` removes the annotation from written slices.
///
/// `svc` is `None` when the Service is gone: every slice in `existing` with this
/// managed-by value is deleted. The garbage collector would remove them through
/// their ownerReference; deleting them here leaves none orphaned where no
/// collector runs, and costs the same writes.
///
/// Pods whose Node is missing are left out unless `publishNotReadyAddresses`, and
/// the plan asks for a retry ([`Plan::retry`]) after its writes, as upstream
/// fails such a sync so that it is retried with backoff until the Node appears.
pub fn plan_slices(
    svc: Option<&Service>,
    pods: &[Arc<StoredPod>],
    nodes: &impl NodeLookup,
    existing: &[Arc<EndpointSlice>],
    trigger_time: Option<Time>,
    config: &SliceConfig,
) -> Plan<EndpointSlice> {
    let Some(svc) = svc else {
        let managed = |slice: &&Arc<EndpointSlice>| {
            slice.metadata.labels.as_ref().and_then(|l| l.get(crate::labels::MANAGED_BY))
                == Some(&config.managed_by)
        };
        return Plan::delete_all(existing.iter().filter(managed).map(|slice| EndpointSlice::clone(slice)));
    };
    let mut managed: Vec<&EndpointSlice> = existing
        .iter()
        .map(Arc::as_ref)
        .filter(|slice| meta::is_managed(slice, svc, &config.managed_by))
        .collect();
    // Stable order so the plan does not depend on the store's iteration order.
    managed.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));

    if !desired::is_selected(svc) {
        let delete =
            if config.delete_when_unselected { managed.into_iter().cloned().collect() } else { Vec::new() };
        return Plan::delete_all(delete);
    }
    reconcile::reconcile(svc, pods, nodes, &managed, trigger_time, config)
}
