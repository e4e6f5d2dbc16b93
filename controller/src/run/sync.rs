//! One sync per controller: read the stores, plan (pure), hand the plan to
//! [`apply`]. Nothing here decides what to write.

use std::sync::Arc;

use k8s_openapi::{
    api::core::v1::{ObjectReference, Service},
    apimachinery::pkg::apis::meta::v1::Time,
};
use kube::{Resource, runtime::reflector::ObjectRef};

use super::{
    Context, Error, Key,
    apply::{Observed, apply, observed},
    service,
    state::TriggerTimes,
};
use crate::{
    endpoints::desired_endpoints, endpointslice::plan_slices, metrics::ControllerKind,
    mirroring::plan_mirrored_slices, stored_pod::StoredPod,
};

/// Syncs the EndpointSlices of Service `key`.
#[tracing::instrument(skip(ctx), fields(service = %key))]
pub async fn slices(key: &Key, ctx: &Context) -> Result<(), Error> {
    let kind = ControllerKind::endpointslice;
    let mut timer = ctx.metrics.sync(kind.clone());
    let existing = ctx.indexes.slices_of(&ctx.stores, key, &ctx.slice_config.managed_by);
    let observed = observed(&existing);
    if behind(ctx, &kind, key, &observed, &mut timer) {
        return Err(Error::Stale(key.clone()));
    }
    let svc = service(ctx, key);
    let (pods, trigger) = members(ctx, key, svc.as_ref(), &ctx.slice_trigger_times);
    let plan = plan_slices(svc.as_deref(), &pods, &ctx.stores.nodes, &existing, trigger, &ctx.slice_config);
    apply(ctx, kind, key, &observed, plan, svc.map(|svc| svc.object_ref(&()))).await?;
    timer.success();
    Ok(())
}

/// Syncs the Endpoints of Service `key`.
#[tracing::instrument(skip(ctx), fields(service = %key))]
pub async fn endpoints(key: &Key, ctx: &Context) -> Result<(), Error> {
    let kind = ControllerKind::endpoints;
    let mut timer = ctx.metrics.sync(kind.clone());
    let existing = ctx.stores.endpoints.get(&ObjectRef::new(&key.name).within(&key.namespace));
    let observed = observed(existing.as_slice());
    if behind(ctx, &kind, key, &observed, &mut timer) {
        return Err(Error::Stale(key.clone()));
    }
    let svc = service(ctx, key);
    let (pods, trigger) = members(ctx, key, svc.as_ref(), &ctx.endpoints_trigger_times);
    let plan = desired_endpoints(key, svc.as_deref(), &pods, trigger, existing.as_deref());
    apply(ctx, kind, key, &observed, plan, Some(endpoints_ref(key))).await?;
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
    let endpoints = ctx.stores.endpoints.get(&ObjectRef::new(&key.name).within(&key.namespace));
    let plan = plan_mirrored_slices(svc.as_deref(), endpoints.as_deref(), &existing, &ctx.mirroring_config);
    apply(ctx, kind, key, &observed, plan, endpoints.map(|ep| ep.object_ref(&()))).await?;
    timer.success();
    Ok(())
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
