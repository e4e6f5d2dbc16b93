//! The only writer: applies a planner's [`Plan`] for one owner, whatever the
//! object: rate limit, write, record in the tracker, count, report.

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::Arc;

use k8s_openapi::{NamespaceResourceScope, api::core::v1::ObjectReference};
use kube::{
    Api, Resource, ResourceExt,
    api::{DeleteParams, PostParams},
    runtime::events::{Event, EventType},
};
use serde::{Serialize, de::DeserializeOwned};

use super::{Context, Error, FIELD_MANAGER, Key};
use crate::{metrics::ControllerKind, plan::Plan, upstream_metrics::ServiceTotals};

/// resourceVersion of each object of one owner in the store, by name: what the
/// plan was made on, and what the tracker compares the store with.
pub type Observed = HashMap<String, Option<String>>;

/// What the one writer writes: a namespaced API object (slices, Endpoints).
pub trait Written:
    Resource<DynamicType = (), Scope = NamespaceResourceScope>
    + k8s_openapi::Resource
    + Clone
    + Serialize
    + DeserializeOwned
    + Debug
    + Send
    + Sync
    + 'static
{
}

impl<K> Written for K where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + k8s_openapi::Resource
        + Clone
        + Serialize
        + DeserializeOwned
        + Debug
        + Send
        + Sync
        + 'static
{
}

/// [`Observed`] of `objects`.
pub fn observed<K: Resource>(objects: &[Arc<K>]) -> Observed {
    objects.iter().map(|o| (o.name_any(), o.resource_version())).collect()
}

/// Writes `plan` for `key` in upstream's order: creates, then updates, then
/// deletes. Each write is recorded in the tracker so the next sync can tell
/// whether the store has caught up. `events_on` is the object this controller's
/// Events go on (upstream's choice per controller); `None` records none.
///
/// Fails after the writes when the plan asks for a retry.
pub async fn apply<K: Written>(
    ctx: &Context,
    kind: ControllerKind,
    key: &Key,
    observed: &Observed,
    plan: Plan<K>,
    events_on: Option<ObjectReference>,
) -> Result<(), Error> {
    let Plan { create, update, delete, endpoints, warnings, retry } = plan;
    if let Some(on) = &events_on {
        for warning in warnings {
            publish(ctx, on, warning.reason, warning.message).await;
        }
    }
    let writes = create.len() + update.len() + delete.len();
    let own_deletes = delete.iter().filter(|o| observed.contains_key(&o.name_any())).count();
    let slices_after = (observed.len() + create.len()).saturating_sub(own_deletes);
    let result = write(ctx, kind.clone(), key, observed, create, update, delete).await;
    if let Err(error) = &result
        && let (Some(on), Some((reason, note))) = (&events_on, failure_event(&kind, key, error))
        && ctx.failure_events.allow(&kind, key, std::time::Instant::now())
    {
        publish(ctx, on, reason, note).await;
    }
    result?;
    let totals = (slices_after > 0 || endpoints.desired > 0).then_some(ServiceTotals {
        endpoints: endpoints.desired,
        slices: slices_after,
        desired_slices: endpoints.desired_slices,
    });
    ctx.metrics.applied(kind, key, &endpoints, writes, totals);
    match retry {
        Some(why) => Err(Error::Retry(why)),
        None => Ok(()),
    }
}

async fn write<K: Written>(
    ctx: &Context,
    kind: ControllerKind,
    key: &Key,
    observed: &Observed,
    create: Vec<K>,
    update: Vec<K>,
    delete: Vec<K>,
) -> Result<(), Error> {
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &key.namespace);
    let request = kube::core::Request::new(K::url_path(&(), Some(&key.namespace)));
    let pp = PostParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
    let owner = (kind.clone(), key);
    let failed = |verb: &'static str, name: String, source: kube::Error| Error::Write {
        verb,
        kind: <K as k8s_openapi::Resource>::KIND,
        namespace: key.namespace.clone(),
        name,
        source,
    };
    for object in create {
        ctx.limits.until_ready(&kind).await;
        match send(ctx, "create", &object, |body| request.create(&pp, body)).await {
            Ok(created) => {
                let meta = created.metadata;
                ctx.tracker.wrote(owner.clone(), &meta.name, None, meta.resource_version.as_deref());
                ctx.metrics.changed(kind.clone(), "create");
            }
            // Creates keep failing while the namespace is deleted: upstream drops
            // the whole sync, without an Event.
            Err(kube::Error::Api(s)) if namespace_terminating(&s) => return Ok(()),
            Err(e) => return Err(failed("create", object.name_any(), e)),
        }
    }
    for object in update {
        let name = object.name_any();
        ctx.limits.until_ready(&kind).await;
        let updated = send(ctx, "replace", &object, |body| request.replace(&name, &pp, body))
            .await
            .map_err(|e| failed("update", name.clone(), e))?;
        let replaced = observed.get(&name).cloned().flatten();
        let version = updated.metadata.resource_version;
        ctx.tracker.wrote(owner.clone(), &name, replaced.as_deref(), version.as_deref());
        ctx.metrics.changed(kind.clone(), "update");
    }
    for object in delete {
        let name = object.name_any();
        ctx.limits.until_ready(&kind).await;
        match api.delete(&name, &DeleteParams::default()).await {
            Ok(_) => {
                let version = observed.get(&name).cloned().flatten();
                ctx.tracker.deleted(owner.clone(), &name, version.as_deref());
                ctx.metrics.changed(kind.clone(), "delete");
            }
            // Already gone (e.g. the garbage collector followed the ownerReference).
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(failed("delete", name, e)),
        }
    }
    Ok(())
}

/// What a create or update returns that the tracker needs: the name (a
/// create's is generated) and the new resourceVersion. Decoding the whole
/// returned object, managedFields and all, just for these cost a few percent of
/// the controller's CPU in `make bench` scenario B; serde skips the rest
/// without building it.
#[derive(serde::Deserialize)]
struct WriteResponse {
    metadata: WrittenMeta,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct WrittenMeta {
    name: String,
    resource_version: Option<String>,
}

/// Sends a write of `object` built by kube's request builder, as `Api`'s own
/// methods do (`verb` names it in kube's client traces).
async fn send<K: Serialize>(
    ctx: &Context,
    verb: &'static str,
    object: &K,
    build: impl FnOnce(Vec<u8>) -> Result<http::Request<Vec<u8>>, kube::core::request::Error>,
) -> Result<WriteResponse, kube::Error> {
    let body = serde_json::to_vec(object).map_err(kube::Error::SerdeError)?;
    let mut request = build(body).map_err(kube::Error::BuildRequest)?;
    request.extensions_mut().insert(verb);
    ctx.client.request::<WriteResponse>(request).await
}

/// Upstream `errors.HasStatusCause(err, NamespaceTerminatingCause)`.
fn namespace_terminating(status: &kube::core::Status) -> bool {
    status.details.as_ref().is_some_and(|d| d.causes.iter().any(|c| c.reason == "NamespaceTerminating"))
}

/// The Warning Event upstream records when a sync's write fails, per controller:
/// the EndpointSlice controller on the Service for any write, the Endpoints
/// controller on the Endpoints for a create or an update; mirroring none.
fn failure_event(kind: &ControllerKind, key: &Key, error: &Error) -> Option<(&'static str, String)> {
    let Error::Write { verb, source, .. } = error else { return None };
    match (kind, *verb) {
        (ControllerKind::endpointslice, _) => Some((
            "FailedToUpdateEndpointSlices",
            format!("Error updating Endpoint Slices for Service {key}: {error}"),
        )),
        (ControllerKind::endpoints, "create") => Some((
            crate::endpoints::REASON_FAILED_TO_CREATE,
            format!("Failed to create endpoint for service {key}: {source}"),
        )),
        (ControllerKind::endpoints, "update") => Some((
            crate::endpoints::REASON_FAILED_TO_UPDATE,
            format!("Failed to update endpoint {key}: {source}"),
        )),
        _ => None,
    }
}

/// At most one failure Event per controller and Service per
/// [`FAILURE_EVENT_INTERVAL`]: a Service that keeps failing while its retries
/// back off would otherwise write an Event per retry (upstream does).
#[derive(Debug, Default)]
pub struct FailureEvents {
    last: std::sync::Mutex<HashMap<(ControllerKind, Key), std::time::Instant>>,
}

/// See [`FailureEvents`].
pub const FAILURE_EVENT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);

impl FailureEvents {
    /// Whether an Event may be recorded for `key` at `now` (and if so, counts it).
    pub fn allow(&self, kind: &ControllerKind, key: &Key, now: std::time::Instant) -> bool {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if last.len() > 10_000 {
            last.retain(|_, at| now.duration_since(*at) < FAILURE_EVENT_INTERVAL);
        }
        let id = (kind.clone(), key.clone());
        match last.get(&id) {
            Some(at) if now.duration_since(*at) < FAILURE_EVENT_INTERVAL => false,
            _ => {
                last.insert(id, now);
                true
            }
        }
    }
}

/// A Warning Event on `on`; failures to publish are logged, never fatal.
async fn publish(ctx: &Context, on: &ObjectReference, reason: &str, note: String) {
    let event = Event {
        type_: EventType::Warning,
        reason: reason.to_string(),
        note: Some(note),
        action: "Sync".into(),
        secondary: None,
    };
    if let Err(e) = ctx.events.publish(&event, on).await {
        tracing::warn!(error = %e, reason, "failed to publish event");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_failure_event_per_service_and_minute() {
        let events = FailureEvents::default();
        let (web, api) = (
            Key { namespace: "ns".into(), name: "web".into() },
            Key { namespace: "ns".into(), name: "api".into() },
        );
        let t0 = std::time::Instant::now();
        assert!(events.allow(&ControllerKind::endpointslice, &web, t0));
        assert!(!events.allow(&ControllerKind::endpointslice, &web, t0 + std::time::Duration::from_secs(59)));
        assert!(events.allow(&ControllerKind::endpoints, &web, t0), "per controller");
        assert!(events.allow(&ControllerKind::endpointslice, &api, t0), "per Service");
        assert!(events.allow(&ControllerKind::endpointslice, &web, t0 + FAILURE_EVENT_INTERVAL));
    }
}
