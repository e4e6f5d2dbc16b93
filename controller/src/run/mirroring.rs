//! Reconcile of one name's mirrored slices: a selectorless Service plus the
//! hand-written Endpoints of the same name. Gather, plan (pure), apply, report.

use kube::runtime::reflector::ObjectRef;

use super::{Context, Error, Key, apply, service, slices::publish};
use crate::{metrics::ControllerKind, mirroring::plan_mirrored_slices};

/// Syncs the mirrored slices of `key`.
#[tracing::instrument(skip(ctx), fields(endpoints = %key))]
pub async fn reconcile(key: &Key, ctx: &Context) -> Result<(), Error> {
    let mut timer = ctx.metrics.sync(ControllerKind::mirroring);
    let owner = super::tracker_owner(&ControllerKind::mirroring, key);
    let existing = ctx.indexes.slices_of(&ctx.stores, key, &ctx.mirroring_config.managed_by);
    if ctx.tracker.is_stale(&owner, &apply::observed(&existing)) {
        timer.result("stale");
        return Err(Error::Stale(key.clone()));
    }
    let svc = service(ctx, key);
    let endpoints = ctx.stores.endpoints.get(&ObjectRef::new(&key.name).within(&key.namespace));
    let plan = plan_mirrored_slices(svc.as_deref(), endpoints.as_deref(), &existing, &ctx.mirroring_config);
    if let Some(ep) = &endpoints {
        for warning in plan.warnings() {
            publish(ctx, ep.as_ref(), warning.reason, warning.message).await;
        }
    }
    let slices = plan.slices;
    let nothing_left =
        slices.create.is_empty() && slices.update.is_empty() && existing.len() == slices.delete.len();
    apply::apply_slices(ctx, &owner, &key.namespace, slices, ControllerKind::mirroring).await?;
    if nothing_left && svc.is_none() && endpoints.is_none() {
        ctx.tracker.forget(&owner);
    }
    timer.success();
    Ok(())
}
