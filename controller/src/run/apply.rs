//! The only writer of EndpointSlices: applies a planner's [`SlicePlan`].

use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, PostParams},
};

use super::{Context, Error, FIELD_MANAGER};
use crate::{metrics::ControllerKind, plan::SlicePlan};

/// Writes `plan` in upstream's order: creates, then updates, then deletes, so an
/// endpoint moving between slices is never absent from all of them. Each write's
/// result is recorded in the tracker under `owner` so the next reconcile can tell
/// whether the store has caught up.
pub async fn apply_slices(
    ctx: &Context,
    owner: &str,
    namespace: &str,
    plan: SlicePlan,
    kind: ControllerKind,
) -> Result<(), Error> {
    let SlicePlan { create, update, delete, endpoints_added, endpoints_removed, endpoints_desired: _ } = plan;
    let api: Api<EndpointSlice> = Api::namespaced(ctx.client.clone(), namespace);
    let pp = PostParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
    let failed = |verb: &'static str, name: String, source: kube::Error| Error::Write {
        verb,
        kind: "EndpointSlice",
        namespace: namespace.to_string(),
        name,
        source,
    };

    for slice in create {
        ctx.limits.until_ready(&kind).await;
        let created = api
            .create(&pp, &slice)
            .await
            .map_err(|e| failed("create", slice.metadata.generate_name.clone().unwrap_or_default(), e))?;
        ctx.tracker.wrote(owner, &created.name_any(), created.metadata.generation.unwrap_or(1));
        ctx.metrics.changed(kind.clone(), "create", 1);
    }
    for slice in update {
        let name = slice.name_any();
        ctx.limits.until_ready(&kind).await;
        let updated = api.replace(&name, &pp, &slice).await.map_err(|e| failed("update", name.clone(), e))?;
        ctx.tracker.wrote(owner, &name, updated.metadata.generation.unwrap_or(1));
        ctx.metrics.changed(kind.clone(), "update", 1);
    }
    for slice in delete {
        let name = slice.name_any();
        ctx.limits.until_ready(&kind).await;
        match api.delete(&name, &DeleteParams::default()).await {
            Ok(_) => ctx.metrics.changed(kind.clone(), "delete", 1),
            // Already gone (e.g. the garbage collector followed the ownerReference).
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(failed("delete", name, e)),
        }
        ctx.tracker.deleted(owner, &name);
    }
    ctx.metrics.churn(kind, endpoints_added, endpoints_removed);
    Ok(())
}

/// Name → generation of `slices`, for the tracker's stale check.
pub fn observed(slices: &[std::sync::Arc<EndpointSlice>]) -> std::collections::HashMap<String, i64> {
    slices.iter().map(|s| (s.name_any(), s.metadata.generation.unwrap_or(0))).collect()
}
