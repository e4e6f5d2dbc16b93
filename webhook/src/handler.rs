//! Thin axum handlers: parse the AdmissionReview, run the pure plan, let the
//! allocator claim, answer with a patch or a denial. A body that is not an
//! AdmissionReview gets a 400.
//!
//! Calls the API only through [`Allocator::reserve`].

use std::sync::Arc;
use std::time::Instant;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use k8s_openapi::api::core::v1::Service;
use kube::core::admission::{
    AdmissionRequest, AdmissionResponse, AdmissionReview, Operation as KubeOperation,
};
use tracing::{debug, info};

use crate::admit::{Assigned, Denial, Mode, Operation, Plan, Request, build_patch, plan_admission};
use crate::allocator::Allocator;
use crate::metrics::Metrics;

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    /// The allocator and its index.
    pub allocator: Allocator,
    /// Metrics.
    pub metrics: Arc<Metrics>,
}

/// `POST /mutate`.
pub async fn mutate(State(state): State<AppState>, body: Bytes) -> Response {
    review(&state, Mode::Mutate, &body).await
}

/// `POST /validate`.
pub async fn validate(State(state): State<AppState>, body: Bytes) -> Response {
    review(&state, Mode::Validate, &body).await
}

async fn review(state: &AppState, mode: Mode, body: &[u8]) -> Response {
    let started = Instant::now();
    let webhook = if mode == Mode::Mutate { "mutate" } else { "validate" };
    let count = |result: &str, reason: &str| state.metrics.admission(webhook, result, reason);
    let request: AdmissionRequest<Service> = match serde_json::from_slice::<AdmissionReview<Service>>(body)
        .map_err(|e| e.to_string())
        .and_then(|review| {
            review.try_into().map_err(|e: kube::core::admission::ConvertAdmissionReviewError| e.to_string())
        }) {
        Ok(request) => request,
        Err(error) => {
            count("invalid", "MalformedReview");
            let answer =
                AdmissionResponse::invalid(format!("malformed AdmissionReview: {error}")).into_review();
            return (StatusCode::BAD_REQUEST, Json(answer)).into_response();
        }
    };
    let response = answer(state, mode, &request).await;
    let (result, reason) = match (&response.allowed, response.result.reason.as_str()) {
        (true, _) => ("allowed", String::new()),
        (false, reason) => ("denied", reason.to_owned()),
    };
    count(result, &reason);
    state.metrics.admission_seconds.observe(started.elapsed().as_secs_f64());
    (StatusCode::OK, Json(response.into_review())).into_response()
}

async fn answer(state: &AppState, mode: Mode, request: &AdmissionRequest<Service>) -> AdmissionResponse {
    let response = AdmissionResponse::from(request);
    let operation = match request.operation {
        KubeOperation::Create => Operation::Create,
        KubeOperation::Update => Operation::Update,
        _ => return response,
    };
    let Some(service) = request.object.as_ref() else { return response };
    if !state.allocator.is_ready() {
        return deny(
            response,
            &Denial { code: 503, ..Denial::invalid("", "allocation index not built yet") },
        );
    }
    let families = state.allocator.index().config().families();
    let namespace = request.namespace.as_deref().unwrap_or_default();
    let input = Request {
        operation,
        mode,
        namespace,
        service,
        old: request.old_object.as_ref(),
        families: &families,
    };
    let plan = match plan_admission(&input) {
        Ok(plan) if plan.is_empty() => return response,
        Ok(plan) => plan,
        Err(denial) => return deny(response, &denial),
    };
    match reserve_to_completion(&state.allocator, &plan, request.dry_run).await {
        Ok(assigned) if mode == Mode::Mutate => {
            debug!(owner = %plan.owner, ?assigned, dry_run = request.dry_run, "assigned");
            response.with_patch(build_patch(&plan, &assigned)).unwrap_or_else(|error| {
                let message = format!("could not encode the patch: {error}");
                deny(AdmissionResponse::from(request), &Denial { field: String::new(), message, code: 500 })
            })
        }
        Ok(_) => response,
        Err(denial) => {
            info!(owner = %plan.owner, %denial, dry_run = request.dry_run, "denied");
            deny(response, &denial)
        }
    }
}

/// Runs [`Allocator::reserve`] in its own task. hyper drops a handler's
/// future when the apiserver closes the connection (its `timeoutSeconds`, a
/// replica stopping): dropped between a claim create and its bookkeeping,
/// the pick would stay pending on this replica for ever and the claim would
/// not be tracked for release. A task finishes, and its claims are undone or
/// tracked as for any request.
async fn reserve_to_completion(
    allocator: &Allocator,
    plan: &Plan,
    dry_run: bool,
) -> Result<Assigned, Denial> {
    let (allocator, plan) = (allocator.clone(), plan.clone());
    tokio::spawn(async move { allocator.reserve(&plan, dry_run).await }).await.unwrap_or_else(|error| {
        Err(Denial { code: 500, ..Denial::invalid("", format!("allocation failed: {error}")) })
    })
}

fn deny(response: AdmissionResponse, denial: &Denial) -> AdmissionResponse {
    let mut response = response.deny(denial.to_string());
    response.result.code = denial.code;
    response.result.reason = denial.reason().to_owned();
    response
}
