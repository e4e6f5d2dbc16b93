//! One sync per controller: read the stores, plan (pure), hand the plan to
//! [`apply`]. Nothing here decides what to write.

use std::sync::Arc;

use k8s_openapi::{
    api::{
        core::v1::{ObjectReference, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::Time,
};
use kube::{Resource, ResourceExt};

use super::{
    Context, Error, Key,
    apply::{Observed, apply, observed},
    service,
    state::{TriggerTimes, read},
};
use crate::{
    endpoints::desired_endpoints,
    endpointslice::plan_slices,
    labels,
    metrics::ControllerKind,
    migration::{self, Migration},
    mirroring::plan_mirrored_slices,
    plan::{Plan, Warning},
    stored_pod::StoredPod,
};

/// Syncs the EndpointSlices of Service `key`.
#[tracing::instrument(skip(ctx), fields(service = %key))]
pub async fn slices(key: &Key, ctx: &Context) -> Result<(), Error> {
    let kind = ControllerKind::endpointslice;
    let mut timer = ctx.metrics.sync(kind.clone());
    ctx.synced_since_sweep.record(key);
    let existing = ctx.indexes.slices_of(&ctx.stores, key, &ctx.slice_config.managed_by);
    let observed = observed(&existing);
    if behind(ctx, &kind, key, &observed, &mut timer) {
        return Err(Error::Stale(key.clone()));
    }
    let svc = service(ctx, key);
    let (pods, trigger) = members(ctx, key, svc.as_ref(), &ctx.slice_trigger_times);
    let events_on = svc.as_ref().map(|svc| svc.object_ref(&()));
    // The Node index is read-locked while planning only: never across a write.
    let plan = {
        let nodes = read(&ctx.indexes.nodes);
        let plan = plan_slices(svc.as_deref(), &pods, &*nodes, &existing, trigger, &ctx.slice_config);
        let from_scratch = || plan_slices(svc.as_deref(), &pods, &*nodes, &[], None, &ctx.slice_config);
        migrate(ctx, &kind, key, plan, &existing, from_scratch, events_on.is_some())
    };
    if let Some(plan) = plan {
        apply(ctx, kind, key, &observed, plan, events_on).await?;
    }
    timer.success();
    Ok(())
}

/// Syncs the Endpoints of Service `key`.
#[tracing::instrument(skip(ctx), fields(service = %key))]
pub async fn endpoints(key: &Key, ctx: &Context) -> Result<(), Error> {
    let kind = ControllerKind::endpoints;
    let mut timer = ctx.metrics.sync(kind.clone());
    let existing = ctx.stores.endpoints_of(key);
    let observed = observed(existing.as_slice());
    if behind(ctx, &kind, key, &observed, &mut timer) {
        return Err(Error::Stale(key.clone()));
    }
    let svc = service(ctx, key);
    let (pods, trigger) = members(ctx, key, svc.as_ref(), &ctx.endpoints_trigger_times);
    let plan = desired_endpoints(key, svc.as_deref(), &pods, trigger, existing.as_deref());
    if ctx.migration == Migration::Shadow {
        // The Endpoints object is shared: kube-controller-manager's is the one
        // svcplane would update in place.
        let verdict = migration::endpoints_agreement(svc.is_some(), &plan, existing.as_deref());
        record_shadow(ctx, &kind, key, verdict);
    } else {
        apply(ctx, kind, key, &observed, plan, Some(endpoints_ref(key))).await?;
    }
    timer.success();
    Ok(())
}

/// Syncs the mirrored slices of `key`: a selectorless Service plus the
/// hand-written Endpoints of the same name.
#[tracing::instrument(skip(ctx), fields(endpoints = %key))]
pub async fn mirrored_slices(key: &Key, ctx: &Context) -> Result<(), Error> {
    let kind = ControllerKind::mirroring;
    let mut timer = ctx.metrics.sync(kind.clone());
    let existing = ctx.indexes.slices_of(&ctx.stores, key, &ctx.mirroring_config.managed_by);
    let observed = observed(&existing);
    if behind(ctx, &kind, key, &observed, &mut timer) {
        return Err(Error::Stale(key.clone()));
    }
    let svc = service(ctx, key);
    let endpoints = ctx.stores.endpoints_of(key);
    let config = &ctx.mirroring_config;
    let plan = plan_mirrored_slices(svc.as_deref(), endpoints.as_deref(), &existing, config);
    let from_scratch = || plan_mirrored_slices(svc.as_deref(), endpoints.as_deref(), &[], config);
    if let Some(plan) = migrate(ctx, &kind, key, plan, &existing, from_scratch, svc.is_some()) {
        apply(ctx, kind, key, &observed, plan, endpoints.map(|ep| ep.object_ref(&()))).await?;
    }
    timer.success();
    Ok(())
}

/// svcplane's slice plan for `key` turned into what `--migration` asks for:
/// unchanged when off, `None` (nothing to write; the comparison is recorded)
/// in shadow mode, with kube-controller-manager's slices (`theirs`) deleted
/// once svcplane's are written in take-over, or svcplane's (`ours`) once theirs
/// agree in hand-back. `from_scratch` plans from no slices: what svcplane would
/// hold; `exists` says whether the Service (the owner) exists.
fn migrate(
    ctx: &Context,
    kind: &ControllerKind,
    key: &Key,
    plan: Plan<EndpointSlice>,
    ours: &[Arc<EndpointSlice>],
    from_scratch: impl FnOnce() -> Plan<EndpointSlice>,
    exists: bool,
) -> Option<Plan<EndpointSlice>> {
    let Some(upstream) = migration::upstream_manager(kind).filter(|_| ctx.migration != Migration::Off) else {
        return Some(plan);
    };
    let theirs = ctx.indexes.slices_of(&ctx.stores, key, upstream);
    match ctx.migration {
        Migration::Off => Some(plan),
        Migration::Shadow => {
            let verdict =
                exists.then(|| migration::slices_agreement(&from_scratch().create, &theirs)).flatten();
            record_shadow(ctx, kind, key, verdict);
            None
        }
        Migration::TakeOver => {
            let owner = (kind.clone(), key);
            let (blocked, newly) = ctx.takeover_guard.check(owner.clone(), &theirs);
            let mut plan = migration::take_over(plan, &theirs, blocked.is_some());
            if let Some(why) = blocked.filter(|_| newly) {
                tracing::error!(service = %key, "{why}");
                ctx.metrics.set_takeover_blocked(true);
                plan.warnings.push(Warning { reason: migration::REASON_STILL_RUNNING, message: why });
            }
            let deleting: Vec<String> =
                plan.delete.iter().filter(|s| is_theirs(s, upstream)).map(|s| s.name_any()).collect();
            if !deleting.is_empty() {
                ctx.takeover_guard.deleted(owner, deleting);
            }
            Some(plan)
        }
        Migration::HandBack => {
            let agree = exists && migration::agreement(&from_scratch().create, &theirs).is_ok();
            Some(migration::hand_back(plan, ours, agree))
        }
    }
}

fn is_theirs(slice: &EndpointSlice, upstream: &str) -> bool {
    slice.metadata.labels.as_ref().and_then(|l| l.get(labels::MANAGED_BY)).is_some_and(|m| m == upstream)
}

/// Records a shadow verdict: the gauges, and the first difference of a Service
/// in the log once.
fn record_shadow(ctx: &Context, kind: &ControllerKind, key: &Key, verdict: Option<Result<(), String>>) {
    if let Some(difference) = ctx.shadow.record((kind.clone(), key), verdict) {
        tracing::info!(controller = ?kind, service = %key, %difference, "shadow: svcplane and kube-controller-manager differ");
    }
    let (agree, differ) = ctx.shadow.counts(kind);
    ctx.metrics.set_shadow(kind.clone(), agree, differ);
}

/// True when the store (`observed`) has not caught up with svcplane's own
/// writes for `key`: planning on it would write an older state back, or a slice
/// twice. The sync then counts as "stale".
fn behind(
    ctx: &Context,
    kind: &ControllerKind,
    key: &Key,
    observed: &Observed,
    timer: &mut crate::metrics::SyncTimer<'_>,
) -> bool {
    let stale = ctx.tracker.is_stale((kind.clone(), key), observed);
    if stale {
        timer.result("stale");
    }
    stale
}

/// The Pods the Service selects and the trigger time to write, from the stores
/// and this controller's trigger-time tracker; none once the Service is gone.
fn members(
    ctx: &Context,
    key: &Key,
    svc: Option<&Arc<Service>>,
    times: &TriggerTimes,
) -> (Vec<Arc<StoredPod>>, Option<Time>) {
    let Some(svc) = svc else {
        times.forget(key);
        return (Vec::new(), None);
    };
    let pods = ctx.indexes.members(&ctx.stores, key);
    let trigger = times.compute(key, svc, &pods).map(Time);
    (pods, trigger)
}

/// The Endpoints named `key`, whether or not it exists yet: upstream records the
/// Endpoints controller's Events on the object it tried to write.
fn endpoints_ref(key: &Key) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Endpoints".into()),
        namespace: Some(key.namespace.clone()),
        name: Some(key.name.clone()),
        ..ObjectReference::default()
    }
}
