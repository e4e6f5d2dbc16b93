//! svcplane's endpoint controllers.
//!
//! Each controller is split in two: a pure planner (no client, no I/O: given a
//! Service, its Pods or Endpoints and the slices that exist, it returns what to
//! create, update and delete) and a thin shell that reads reflector stores, calls
//! the planner and applies the plan. Most tests live on the planners.

pub mod compare;
pub mod eligibility;
pub mod endpoints;
pub mod endpointslice;
#[cfg(test)]
mod fuzz;
pub mod index;
pub mod ip;
pub mod labels;
pub mod metrics;
pub mod migration;
pub mod mirroring;
pub mod name_set;
pub mod node_index;
pub mod packed;
pub mod plan;
pub mod pod;
pub mod quantity;
pub mod run;
pub mod selector;
pub mod slice_keys;
pub mod stored_pod;
#[cfg(test)]
mod test_pods;
pub mod tracker;
pub mod trim;
pub mod upstream_metrics;
