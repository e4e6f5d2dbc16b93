//! The repair loop (run by the leader only): reconciles claims with the
//! Services that really exist.
//!
//! Each pass LISTs claims, *then* Services (so a claim whose Service
//! committed before the claim list is seen), and with a pure
//! [`plan_repair`]:
//! - releases a claim no Service holds once it is older than the grace
//!   period (the reservation's request was rejected after admission, or the
//!   Service changed type or was deleted while no replica watched), or,
//!   when it is retained for a deleted Service, once its window ended;
//! - adopts a value a Service holds without a claim (created while the
//!   webhook was down or bypassed);
//! - reports duplicates and out-of-range values as Warning Events on the
//!   Service and as `repair_findings{type}`; those cannot be fixed here
//!   (upstream says "please recreate service");
//! - counts each pool's usage as a replica's index does and records the
//!   Events [`UsageAlerts`] calls for: on the ServiceIPPool of a tenant pool,
//!   on the ServiceCIDR of an IP range, and on the `default/kubernetes`
//!   Service (the apiserver's own) for the NodePort range and ranges from
//!   flags, which have no object.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ObjectReference, Service};
use k8s_openapi::api::networking::v1::ServiceCIDR;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, PostParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tracing::{info, warn};

use crate::Error;
use crate::admit::{service_owner, value_fields};
use crate::allocator::delete_claim;
use crate::blocks::BlockRecord;
use crate::claim::{AllocationClaim, Owner, Value, build_claim};
use crate::index::Index;
use crate::metrics::Metrics;
use crate::pools::{PoolConfig, pools_from};
use crate::retention;
use crate::service_ip_pools::ServiceIPPool;
use crate::usage_alerts::{Alert, UsageAlerts};

/// What one pass should do.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RepairPlan {
    /// Claims to delete: value and claim uid.
    pub release: Vec<(Value, Option<String>)>,
    /// Values to claim for the Service holding them.
    pub adopt: Vec<(Value, Owner)>,
    /// Values held by more than one Service: value and `(owner, field)`s.
    pub duplicates: Vec<(Value, Vec<(Owner, String)>)>,
    /// Values outside every pool (a ServiceCIDR being deleted still counts
    /// until it is gone, as upstream): value, owner, field.
    pub out_of_range: Vec<(Value, Owner, String)>,
}

/// Decides a repair pass. `in_range` says whether a value lies in a pool;
/// `now_ms` and `grace` decide whether an unheld claim is old enough.
pub fn plan_repair(
    claims: &[AllocationClaim],
    services: &[Service],
    in_range: impl Fn(Value) -> bool,
    now_ms: i64,
    grace: Duration,
) -> RepairPlan {
    let mut held: BTreeMap<Value, Vec<(Owner, String)>> = BTreeMap::new();
    for service in services {
        let owner = service_owner(service);
        let mut seen = BTreeSet::new();
        for (value, field) in value_fields(service) {
            // Two ports of one Service sharing a nodePort is one holder.
            if seen.insert(value) {
                held.entry(value).or_default().push((owner.clone(), field));
            }
        }
    }
    let claimed: BTreeMap<Value, &AllocationClaim> =
        claims.iter().filter_map(|c| Value::from_spec(&c.spec).map(|v| (v, c))).collect();
    let grace_ms = i64::try_from(grace.as_millis()).unwrap_or(i64::MAX);
    let mut plan = RepairPlan::default();
    for (value, claim) in &claimed {
        if held.contains_key(value) {
            continue;
        }
        let created =
            claim.metadata.creation_timestamp.as_ref().map(|t| t.0.as_millisecond()).unwrap_or(now_ms);
        if now_ms >= retention::release_due_ms(claim, created, grace_ms) {
            plan.release.push((*value, claim.uid()));
        }
    }
    for (value, holders) in held {
        if !in_range(value) {
            for (owner, field) in &holders {
                plan.out_of_range.push((value, owner.clone(), field.clone()));
            }
        } else if !claimed.contains_key(&value)
            && let Some((owner, _)) = holders.first()
        {
            plan.adopt.push((value, owner.clone()));
        }
        if holders.len() > 1 {
            plan.duplicates.push((value, holders));
        }
    }
    plan
}

/// Runs one repair pass against the cluster; returns the plan it applied.
/// `alerts` carries the pools' usage levels from pass to pass.
pub async fn repair_once(
    client: &Client,
    fallback: &PoolConfig,
    grace: Duration,
    metrics: &Metrics,
    recorder: &Recorder,
    alerts: &mut UsageAlerts,
) -> Result<RepairPlan, Error> {
    let claims_api: Api<AllocationClaim> = Api::all(client.clone());
    let mut claims = list_all::<AllocationClaim>(client).await?;
    let services = list_all::<Service>(client).await?;
    let cidrs = list_all::<ServiceCIDR>(client).await?;
    let pools = Index::new(pools_from(&cidrs, fallback)).map_err(Error::Pools)?;
    let plan = plan_repair(&claims, &services, |v| pools.covers(v), Timestamp::now().as_millisecond(), grace);
    let service_ip_pools = crate::pool_status::update_pool_status(client, &pools.config().cidrs).await?;
    return_expired_blocks(&claims_api, &claims, metrics).await;

    for (value, uid) in &plan.release {
        match delete_claim(&claims_api, *value, uid.clone()).await {
            Ok(_) => {
                metrics.repair("leak");
                info!(%value, "released a claim no Service holds");
            }
            Err(error) => {
                metrics.repair("error");
                warn!(%value, %error, "could not release claim");
            }
        }
    }
    for (value, owner) in &plan.adopt {
        match claims_api.create(&PostParams::default(), &build_claim(*value, owner)).await {
            Ok(_) => {
                metrics.repair("adopted");
                info!(%value, %owner, "adopted a value held without a claim");
            }
            // A replica claimed it meanwhile: nothing to adopt.
            Err(kube::Error::Api(status)) if status.code == 409 => {}
            Err(error) => {
                metrics.repair("error");
                warn!(%value, %error, "could not adopt value");
            }
        }
    }
    let by_owner: BTreeMap<Owner, &Service> = services.iter().map(|s| (service_owner(s), s)).collect();
    for (value, owner, field) in &plan.out_of_range {
        metrics.repair("outOfRange");
        let reason = if matches!(value, Value::Ip(_)) { "ClusterIPOutOfRange" } else { "PortOutOfRange" };
        let note = format!("{field}: {value} is not within any configured pool; please recreate service");
        publish(recorder, by_owner.get(owner).copied(), reason, note).await;
    }
    for (value, holders) in &plan.duplicates {
        metrics.repair("duplicate");
        let reason =
            if matches!(value, Value::Ip(_)) { "ClusterIPAlreadyAllocated" } else { "PortAlreadyAllocated" };
        let names: Vec<String> = holders.iter().map(|(o, _)| o.to_string()).collect();
        for (owner, field) in holders {
            let note = format!(
                "{field}: {value} is held by more than one Service ({}); please recreate service",
                names.join(", ")
            );
            publish(recorder, by_owner.get(owner).copied(), reason, note).await;
        }
    }
    // Usage after this pass: the released claims are gone.
    claims.retain(|claim| !plan.release.iter().any(|(_, uid)| uid.is_some() && *uid == claim.uid()));
    let mut counted = Index::listed(pools.config().clone(), &claims, &services).map_err(Error::Pools)?;
    counted.set_service_ip_pools(service_ip_pools.clone());
    for alert in alerts.observe(&counted.usage()) {
        publish_usage(client, &alert, &cidrs, &service_ip_pools).await;
    }
    Ok(plan)
}

/// Deletes the blocks whose time is up: their holder crashed or lost its
/// connection before returning them (a live holder returns its own before).
/// Their values stay taken wherever a Service or a claim holds them.
async fn return_expired_blocks(
    claims_api: &Api<AllocationClaim>,
    claims: &[AllocationClaim],
    metrics: &Metrics,
) {
    let now = std::time::SystemTime::now();
    for (id, record) in claims.iter().filter_map(BlockRecord::of) {
        if record.expired_at(now) && crate::block_keeper::delete_block(claims_api, id, record.uid).await {
            metrics.repair("expiredBlock");
            info!(block = %id.spec_value(), holder = %record.holder, "returned an expired block");
        }
    }
}

/// Records `alert` on its ServiceIPPool (a pool named `name (cidr)`), else on
/// the ServiceCIDR naming its CIDR (the `kubernetes` one first), else on the
/// `default/kubernetes` Service. Each alert is a new
/// Event: a long-lived Recorder would turn the 95 % Warning into a repeat of
/// the 80 % one and keep the 80 % note (kube-runtime's series keep the first
/// note), and alerts are rare (one per threshold crossed).
async fn publish_usage(
    client: &Client,
    alert: &Alert,
    cidrs: &[ServiceCIDR],
    service_ip_pools: &[ServiceIPPool],
) {
    let recorder = Recorder::new(client.clone(), repair_reporter());
    let tenant_pool =
        service_ip_pools.iter().find(|p| alert.pool.starts_with(&format!("{} (", p.name_any())));
    let names_pool =
        |c: &&ServiceCIDR| c.spec.iter().flat_map(|s| s.cidrs.iter().flatten()).any(|c| *c == alert.pool);
    let mut naming: Vec<&ServiceCIDR> = cidrs.iter().filter(names_pool).collect();
    naming.sort_by_key(|c| (c.name_any() != "kubernetes", c.name_any()));
    let reference = match (tenant_pool, naming.first()) {
        (Some(pool), _) => pool.object_ref(&()),
        (None, Some(service_cidr)) => service_cidr.object_ref(&()),
        (None, None) => ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Service".into()),
            namespace: Some("default".into()),
            name: Some("kubernetes".into()),
            ..ObjectReference::default()
        },
    };
    let type_ = if alert.reached.is_some() { EventType::Warning } else { EventType::Normal };
    let event = Event {
        type_,
        reason: alert.reason().into(),
        note: Some(alert.note()),
        action: "Allocate".into(),
        secondary: None,
    };
    match recorder.publish(&event, &reference).await {
        Ok(()) => info!(pool = %alert.pool, reason = alert.reason(), "pool usage Event"),
        Err(error) => warn!(%error, pool = %alert.pool, "could not publish a pool usage Event"),
    }
}

/// Every `K` in the cluster; the error names the kind ("list Services").
async fn list_all<K>(client: &Client) -> Result<Vec<K>, Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
{
    let list = Api::<K>::all(client.clone()).list(&ListParams::default()).await;
    list.map(|list| list.items)
        .map_err(|source| Error::Kube { what: format!("list {}s", K::kind(&())), source })
}

async fn publish(recorder: &Recorder, service: Option<&Service>, reason: &str, note: String) {
    let Some(service) = service else { return };
    let reference: ObjectReference = service.object_ref(&());
    let event = Event {
        type_: EventType::Warning,
        reason: reason.to_owned(),
        note: Some(note),
        action: "Repair".to_owned(),
        secondary: None,
    };
    if let Err(error) = recorder.publish(&event, &reference).await {
        warn!(%error, reason, "could not publish repair Event");
    }
}

/// Who records the repair pass's Events.
fn repair_reporter() -> Reporter {
    Reporter { controller: "svcplane-webhook-repair".to_owned(), instance: std::env::var("POD_NAME").ok() }
}

/// Runs [`repair_once`] every `interval` until `shutdown`; `grace` as there.
pub async fn repair_loop(
    client: Client,
    fallback: PoolConfig,
    mut alerts: UsageAlerts,
    (interval, grace): (Duration, Duration),
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) {
    let recorder = Recorder::new(client.clone(), repair_reporter());
    let passes = async {
        loop {
            if let Err(error) = repair_once(&client, &fallback, grace, &metrics, &recorder, &mut alerts).await
            {
                metrics.repair("error");
                warn!(%error, "repair pass failed");
            }
            tokio::time::sleep(interval).await;
        }
    };
    tokio::select! {
        () = passes => {}
        () = shutdown => {}
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use k8s_openapi::api::core::v1::{ServicePort, ServiceSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use kube::core::ObjectMeta;

    use super::*;

    /// The Service `ns/name` with `ips` and one port per nodePort.
    pub(crate) fn mk_service(name: &str, ips: &[&str], node_ports: &[i32]) -> Service {
        let ports = node_ports.iter().map(|n| ServicePort { node_port: Some(*n), ..Default::default() });
        let ips = ips.iter().map(|ip| (*ip).to_owned()).collect();
        let meta = ObjectMeta { name: Some(name.into()), namespace: Some("ns".into()), ..Default::default() };
        let spec = ServiceSpec { cluster_ips: Some(ips), ports: Some(ports.collect()), ..Default::default() };
        Service { metadata: meta, spec: Some(spec), ..Default::default() }
    }

    fn mk_claim(value: Value, owner: &str, created_ms: i64) -> AllocationClaim {
        let mut claim = build_claim(value, &Owner { namespace: "ns".into(), name: owner.into() });
        claim.metadata.creation_timestamp = Some(Time(Timestamp::from_millisecond(created_ms).unwrap()));
        claim.metadata.uid = Some(format!("uid-{owner}"));
        claim
    }

    #[test]
    fn unheld_claims_are_released_only_after_the_grace_period() {
        let port = Value::Port(30001);
        let claims = [mk_claim(port, "gone", 1_000), mk_claim(Value::Port(30002), "young", 9_500)];
        let plan = plan_repair(&claims, &[], |_| true, 10_000, Duration::from_secs(5));
        assert_eq!(plan.release, vec![(port, Some("uid-gone".into()))]);
    }

    #[test]
    fn a_service_in_a_service_cidr_being_deleted_is_not_out_of_range_until_it_is_gone() {
        // Issue 18 item 5: repair said "please recreate service" at once.
        let mk = |name: &str, cidr: &str, deleting: bool| {
            let mut c = ServiceCIDR {
                metadata: ObjectMeta { name: Some(name.into()), ..Default::default() },
                spec: Some(k8s_openapi::api::networking::v1::ServiceCIDRSpec {
                    cidrs: Some(vec![cidr.into()]),
                }),
                ..Default::default()
            };
            c.metadata.deletion_timestamp = deleting.then_some(Time(Timestamp::UNIX_EPOCH));
            c
        };
        let flags = PoolConfig::new(Vec::new(), "30000-30001".parse().unwrap());
        let services = [mk_service("old", &["10.1.0.5"], &[])];
        let out_of_range = |cidrs: &[ServiceCIDR]| {
            let pools = Index::new(pools_from(cidrs, &flags)).unwrap();
            plan_repair(&[], &services, |v| pools.covers(v), 0, Duration::ZERO).out_of_range.len()
        };
        let kubernetes = mk("kubernetes", "10.0.0.0/24", false);
        assert_eq!(out_of_range(&[kubernetes.clone(), mk("doomed", "10.1.0.0/24", true)]), 0);
        assert_eq!(out_of_range(std::slice::from_ref(&kubernetes)), 1, "gone");
        assert_eq!(out_of_range(&[kubernetes, mk("wide", "10.0.0.0/15", false)]), 0, "another covers it");
    }

    #[test]
    fn held_values_without_claims_are_adopted_and_duplicates_reported() {
        let services = [mk_service("a", &["10.96.0.7"], &[30005]), mk_service("b", &["10.96.0.7"], &[])];
        let plan = plan_repair(&[], &services, |v| v != Value::Port(30005), 0, Duration::ZERO);
        assert_eq!(plan.adopt.len(), 1, "{plan:?}");
        assert_eq!(plan.duplicates.len(), 1);
        assert_eq!(plan.duplicates[0].1.len(), 2);
        assert_eq!(plan.out_of_range.len(), 1);
        assert_eq!(plan.out_of_range[0].2, "spec.ports[0].nodePort");
    }
}
