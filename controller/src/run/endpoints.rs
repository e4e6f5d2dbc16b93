//! Reconcile of one Service's legacy Endpoints object: gather, plan (pure), write.

use k8s_openapi::{api::core::v1::Endpoints, apimachinery::pkg::apis::meta::v1::Time};
use kube::{
    Api,
    api::{DeleteParams, PostParams},
    runtime::reflector::ObjectRef,
};

use super::{Context, Error, FIELD_MANAGER, Key, service, slices::publish, state::lock_map};
use crate::{
    endpoints::{EndpointsPlan, REASON_FAILED_TO_CREATE, REASON_FAILED_TO_UPDATE, desired_endpoints},
    metrics::ControllerKind,
};

/// Syncs the Endpoints of Service `key`.
#[tracing::instrument(skip(ctx), fields(service = %key))]
pub async fn reconcile(key: &Key, ctx: &Context) -> Result<(), Error> {
    let mut timer = ctx.metrics.sync(ControllerKind::endpoints);
    let existing = ctx.stores.endpoints.get(&ObjectRef::new(&key.name).within(&key.namespace));
    // Upstream's stale tracker: after an update, the store may still hold the
    // version we replaced; planning on it would write an older state back.
    if let Some(ep) = &existing
        && lock_map(&ctx.endpoints_tracker).get(key) == ep.metadata.resource_version.as_ref()
    {
        timer.result("stale");
        return Err(Error::Stale(key.clone()));
    }
    let svc = service(ctx, key);
    let pods = match &svc {
        Some(_) => ctx.indexes.members(&ctx.stores, key),
        None => Vec::new(),
    };
    let trigger = match &svc {
        Some(svc) => ctx.endpoints_trigger_times.compute(key, svc, &pods).map(Time),
        None => {
            ctx.endpoints_trigger_times.forget(key);
            None
        }
    };
    let plan = desired_endpoints(svc.as_deref(), &pods, trigger, existing.as_deref());
    let api: Api<Endpoints> = Api::namespaced(ctx.client.clone(), &key.namespace);
    let pp = PostParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
    let failed = |verb: &'static str, source: kube::Error| Error::Write {
        verb,
        kind: "Endpoints",
        namespace: key.namespace.clone(),
        name: key.name.clone(),
        source,
    };
    if !matches!(plan, EndpointsPlan::Nothing) {
        ctx.limits.until_ready(&ControllerKind::endpoints).await;
    }
    match plan {
        EndpointsPlan::Nothing => {}
        EndpointsPlan::Create(ep) => match api.create(&pp, &ep).await {
            Ok(_) => ctx.metrics.changed(ControllerKind::endpoints, "create", 1),
            // The namespace is being deleted: nothing to do (upstream drops the item).
            Err(kube::Error::Api(s)) if s.code == 403 && s.message.contains("being terminated") => {}
            Err(e) => {
                if let Some(svc) = &svc {
                    publish(
                        ctx,
                        svc.as_ref(),
                        REASON_FAILED_TO_CREATE,
                        format!("Failed to create endpoint for service {key}: {e}"),
                    )
                    .await;
                }
                return Err(failed("create", e));
            }
        },
        EndpointsPlan::Update(ep) => {
            let old_rv = existing.as_ref().and_then(|e| e.metadata.resource_version.clone());
            match api.replace(&key.name, &pp, &ep).await {
                Ok(updated) => {
                    ctx.metrics.changed(ControllerKind::endpoints, "update", 1);
                    if let Some(old) = old_rv
                        && updated.metadata.resource_version.as_ref() != Some(&old)
                    {
                        lock_map(&ctx.endpoints_tracker).insert(key.clone(), old);
                    }
                }
                Err(e) => {
                    if let Some(svc) = &svc {
                        publish(
                            ctx,
                            svc.as_ref(),
                            REASON_FAILED_TO_UPDATE,
                            format!("Failed to update endpoint {key}: {e}"),
                        )
                        .await;
                    }
                    return Err(failed("update", e));
                }
            }
        }
        EndpointsPlan::Delete => {
            match api.delete(&key.name, &DeleteParams::default()).await {
                Ok(_) => ctx.metrics.changed(ControllerKind::endpoints, "delete", 1),
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(failed("delete", e)),
            }
            lock_map(&ctx.endpoints_tracker).remove(key);
        }
    }
    timer.success();
    Ok(())
}
