//! One sync per controller: read the stores, plan (pure), hand the plan to
//! [`apply`]. Nothing here decides what to write.

use k8s_openapi::{api::core::v1::ObjectReference, apimachinery::pkg::apis::meta::v1::Time};
use kube::{Resource, runtime::reflector::ObjectRef};

use super::{
    Context, Error, Key,
    apply::{apply, observed},
    service,
};
use crate::{
    endpoints::desired_endpoints, endpointslice::plan_slices, metrics::ControllerKind,
    mirroring::plan_mirrored_slices,
};

/// Syncs the EndpointSlices of Service `key`.
#[tracing::instrument(skip(ctx), fields(service = %key))]
pub async fn slices(key: &Key, ctx: &Context) -> Result<(), Error> {
    let kind = ControllerKind::endpointslice;
    let mut timer = ctx.metrics.sync(kind.clone());
    let existing = ctx.indexes.slices_of(&ctx.stores, key, &ctx.slice_config.managed_by);
    let observed = observed(&existing);
    if ctx.tracker.is_stale((kind.clone(), key), &observed) {
        timer.result("stale");
        return Err(Error::Stale(key.clone()));
    }
    let svc = service(ctx, key);
    let (pods, trigger) = match &svc {
        Some(svc) => {
            let pods = ctx.indexes.members(&ctx.stores, key);
            let trigger = ctx.slice_trigger_times.compute(key, svc, &pods).map(Time);
            (pods, trigger)
        }
        None => {
            ctx.slice_trigger_times.forget(key);
            (Vec::new(), None)
        }
    };
    let plan = plan_slices(svc.as_deref(), &pods, &ctx.stores.nodes, &existing, trigger, &ctx.slice_config);
    let events_on = svc.map(|svc| svc.object_ref(&()));
    apply(ctx, kind, key, &observed, plan, events_on).await?;
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
    if ctx.tracker.is_stale((kind.clone(), key), &observed) {
        timer.result("stale");
        return Err(Error::Stale(key.clone()));
    }
    let svc = service(ctx, key);
    let (pods, trigger) = match &svc {
        Some(svc) => {
            let pods = ctx.indexes.members(&ctx.stores, key);
            let trigger = ctx.endpoints_trigger_times.compute(key, svc, &pods).map(Time);
            (pods, trigger)
        }
        None => {
            ctx.endpoints_trigger_times.forget(key);
            (Vec::new(), None)
        }
    };
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
    if ctx.tracker.is_stale((kind.clone(), key), &observed) {
        timer.result("stale");
        return Err(Error::Stale(key.clone()));
    }
    let svc = service(ctx, key);
    let endpoints = ctx.stores.endpoints.get(&ObjectRef::new(&key.name).within(&key.namespace));
    let plan = plan_mirrored_slices(svc.as_deref(), endpoints.as_deref(), &existing, &ctx.mirroring_config);
    let events_on = endpoints.map(|ep| ep.object_ref(&()));
    apply(ctx, kind, key, &observed, plan, events_on).await?;
    timer.success();
    Ok(())
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
