//! Reconcile of one Service's EndpointSlices: gather from stores, plan (pure), apply.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{
    Resource,
    runtime::events::{Event, EventType},
};

use super::{Context, Error, Key, apply, service};
use crate::{
    endpointslice::{missing_nodes, plan_slices},
    metrics::ControllerKind,
    plan::SlicePlan,
};

/// Syncs the slices of Service `key`.
#[tracing::instrument(skip(ctx), fields(service = %key))]
pub async fn reconcile(key: &Key, ctx: &Context) -> Result<(), Error> {
    let mut timer = ctx.metrics.sync(ControllerKind::endpointslice);
    let owner = super::tracker_owner(&ControllerKind::endpointslice, key);
    let existing = ctx.indexes.slices_of(&ctx.stores, key, &ctx.slice_config.managed_by);
    if ctx.tracker.is_stale(&owner, &apply::observed(&existing)) {
        timer.result("stale");
        return Err(Error::Stale(key.clone()));
    }

    let Some(svc) = service(ctx, key) else {
        // Service deleted. The garbage collector would remove the slices through
        // their ownerReference; deleting them here leaves none orphaned where no
        // collector runs, and costs the same writes.
        ctx.slice_trigger_times.forget(key);
        let plan =
            SlicePlan { delete: existing.iter().map(|s| s.as_ref().clone()).collect(), ..Default::default() };
        apply::apply_slices(ctx, &owner, &key.namespace, plan, ControllerKind::endpointslice).await?;
        ctx.tracker.forget(&owner);
        timer.success();
        return Ok(());
    };

    let pods = ctx.indexes.members(&ctx.stores, key);
    let trigger = ctx.slice_trigger_times.compute(key, &svc, &pods).map(Time);
    let mut plan = plan_slices(&svc, &pods, &ctx.stores.nodes, &existing, trigger, &ctx.slice_config);
    if svc.metadata.deletion_timestamp.is_some() {
        // Never create slices for a Service being deleted (upstream finalize).
        plan.create.clear();
    }
    let (added, removed, writes) = (
        plan.endpoints_added,
        plan.endpoints_removed,
        plan.create.len() + plan.update.len() + plan.delete.len(),
    );
    if let Err(e) =
        apply::apply_slices(ctx, &owner, &key.namespace, plan, ControllerKind::endpointslice).await
    {
        publish(
            ctx,
            svc.as_ref(),
            "FailedToUpdateEndpointSlices",
            format!("Error updating Endpoint Slices for Service {key}: {e}"),
        )
        .await;
        return Err(e);
    }
    tracing::debug!(added, removed, writes, "synced slices");

    // Upstream skips Pods on missing Nodes and fails the sync so it is retried
    // with backoff until the Node appears.
    let missing = missing_nodes(&svc, &pods, &ctx.stores.nodes);
    if !missing.is_empty() {
        let list: Vec<String> = missing.iter().map(|m| format!("{} (node {})", m.pod, m.node)).collect();
        return Err(Error::NodesMissing(format!(
            "skipped Pods on Nodes that do not exist: {}",
            list.join(", ")
        )));
    }
    timer.success();
    Ok(())
}

/// A Warning Event on `obj`; failures to publish are logged, never fatal.
pub(super) async fn publish<K: Resource<DynamicType = ()>>(
    ctx: &Context,
    obj: &K,
    reason: &str,
    note: String,
) {
    let event = Event {
        type_: EventType::Warning,
        reason: reason.to_string(),
        note: Some(note),
        action: "Sync".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &obj.object_ref(&())).await {
        tracing::warn!(error = %e, reason, "failed to publish event");
    }
}
