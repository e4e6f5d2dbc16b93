//! The output of a slice planner: what to write, and counts for metrics. Pure data.

use k8s_openapi::api::discovery::v1::EndpointSlice;

/// What a planner wants written for one Service. Applying it to the existing
/// slices yields the desired state; planning again on that state yields an empty plan.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SlicePlan {
    /// Slices to create (no `metadata.name`; `generateName` is set).
    pub create: Vec<EndpointSlice>,
    /// Existing slices (name and resourceVersion kept) with new content.
    pub update: Vec<EndpointSlice>,
    /// Existing slices to delete.
    pub delete: Vec<EndpointSlice>,
    /// Endpoints that are in the desired state but were in no existing slice.
    pub endpoints_added: usize,
    /// Endpoints that were in an existing slice but are not desired any more.
    pub endpoints_removed: usize,
    /// Endpoints in the desired state.
    pub endpoints_desired: usize,
}

impl SlicePlan {
    /// True when nothing needs writing.
    pub fn is_empty(&self) -> bool {
        self.create.is_empty() && self.update.is_empty() && self.delete.is_empty()
    }
}
