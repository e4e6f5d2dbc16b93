//! The `Ready` condition of each ServiceIPPool, written by the repair leader
//! on each pass. Calls the API: lists ServiceIPPools and patches the status
//! subresource of those whose condition changed; [`desired_status`] is pure.
//!
//! The verdict is [`plan_pools`]'s, the same the replicas' indexes allocate
//! by: `Allocating`, `Invalid`, `OutsideServiceCIDR` (naming the
//! ServiceCIDRs) or `Overlaps` (naming the other pool).

use ipnetwork::IpNetwork;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use tracing::{info, warn};

use crate::Error;
use crate::service_ip_pools::{PoolCondition, ServiceIPPool, ServiceIPPoolStatus, Verdict, plan_pools};

/// The status `pool` should have for `verdict`, or `None` when it already
/// has it. The transition time moves only when the status flips.
pub fn desired_status(pool: &ServiceIPPool, verdict: &Verdict, now: &str) -> Option<ServiceIPPoolStatus> {
    let status = if *verdict == Verdict::Ready { "True" } else { "False" };
    let current = pool.status.iter().flat_map(|s| &s.conditions).find(|c| c.type_ == "Ready");
    let generation = pool.metadata.generation;
    if let Some(c) = current
        && c.status == status
        && c.reason == verdict.reason()
        && c.message == verdict.to_string()
        && c.observed_generation == generation
    {
        return None;
    }
    let last_transition_time = match current {
        Some(c) if c.status == status => c.last_transition_time.clone(),
        _ => now.to_owned(),
    };
    let ready = PoolCondition {
        type_: "Ready".into(),
        status: status.into(),
        reason: verdict.reason().into(),
        message: verdict.to_string(),
        last_transition_time,
        observed_generation: generation,
    };
    Some(ServiceIPPoolStatus { conditions: vec![ready] })
}

/// Writes every pool's `Ready` condition against `service_cidrs`; returns
/// the pools it listed. A cluster without the CRD has none.
pub async fn update_pool_status(
    client: &Client,
    service_cidrs: &[IpNetwork],
) -> Result<Vec<ServiceIPPool>, Error> {
    let api: Api<ServiceIPPool> = Api::all(client.clone());
    let pools = match api.list(&ListParams::default()).await {
        Ok(list) => list.items,
        Err(kube::Error::Api(status)) if status.code == 404 => return Ok(Vec::new()),
        Err(source) => return Err(Error::Kube { what: "list ServiceIPPools".into(), source }),
    };
    let now = Timestamp::now().to_string();
    for def in plan_pools(&pools, service_cidrs) {
        let Some(pool) = pools.iter().find(|p| p.name_any() == def.name) else { continue };
        let Some(status) = desired_status(pool, &def.verdict, &now) else { continue };
        let patch = Patch::Merge(json!({ "status": status }));
        match api.patch_status(&def.name, &PatchParams::default(), &patch).await {
            Ok(_) => info!(pool = %def.name, reason = def.verdict.reason(), "ServiceIPPool status"),
            Err(error) => warn!(pool = %def.name, %error, "could not write the ServiceIPPool status"),
        }
    }
    Ok(pools)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service_ip_pools::tests::mk_pool;

    #[test]
    fn the_condition_is_written_only_when_it_changes_and_keeps_its_transition_time() {
        let mut pool = mk_pool("p", "10.0.0.16/28", None);
        let outside = Verdict::OutsideServiceCidr {
            cidr: "10.0.0.16/28".parse().unwrap(),
            service_cidrs: "10.96.0.0/16".into(),
        };
        let first = desired_status(&pool, &outside, "t1").unwrap();
        let ready = &first.conditions[0];
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str(), ready.message.as_str()),
            ("False", "OutsideServiceCIDR", "10.0.0.16/28 is not inside any ServiceCIDR (10.96.0.0/16)")
        );
        pool.status = Some(first);
        assert_eq!(desired_status(&pool, &outside, "t2"), None, "unchanged: no write");
        let overlaps = Verdict::Overlaps {
            cidr: "10.0.0.16/28".parse().unwrap(),
            other: "q".into(),
            other_cidr: "10.0.0.0/24".parse().unwrap(),
        };
        let still_false = desired_status(&pool, &overlaps, "t3").unwrap();
        assert_eq!(still_false.conditions[0].last_transition_time, "t1", "still False");
        let now_ready = desired_status(&pool, &Verdict::Ready, "t4").unwrap();
        assert_eq!(
            (now_ready.conditions[0].status.as_str(), now_ready.conditions[0].last_transition_time.as_str()),
            ("True", "t4")
        );
    }
}
