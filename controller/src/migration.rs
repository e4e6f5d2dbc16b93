//! Handing endpoint ownership between kube-controller-manager and svcplane one
//! Service at a time, without a gap: shadow (compare, write nothing), take-over
//! and hand-back. The decisions are here and pure; the shell reads the other
//! manager's slices from its store and applies the plans.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::ResourceExt;

use k8s_openapi::api::core::v1::Endpoints;

use crate::compare::{first_line_difference, normalize, normalize_endpoints};
use crate::labels;
use crate::metrics::ControllerKind;
use crate::plan::{Key, Plan};

/// What svcplane does about kube-controller-manager's endpoint objects.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Migration {
    /// Never touch them (the two managers' slices would both be served).
    #[default]
    Off,
    /// Write nothing; compare what svcplane would write with what they hold.
    Shadow,
    /// Write svcplane's slices; per Service, delete kube-controller-manager's once
    /// svcplane's are up to date in the apiserver.
    TakeOver,
    /// Keep svcplane's slices up to date; per Service, delete them once
    /// kube-controller-manager's agree with them.
    HandBack,
}

/// kube-controller-manager's managed-by value for the slices of `controller`
/// (`None`: the Endpoints controller writes one shared object).
pub fn upstream_manager(controller: &ControllerKind) -> Option<&'static str> {
    match controller {
        ControllerKind::endpointslice => Some(labels::UPSTREAM_SLICE_CONTROLLER),
        ControllerKind::mirroring => Some(labels::UPSTREAM_MIRRORING_CONTROLLER),
        ControllerKind::endpoints => None,
    }
}

/// Whether `theirs` (kube-controller-manager's slices of one Service) hold what
/// svcplane would write (`desired`: a plan's creates from no slices at all),
/// compared as the differential suite compares them. `Err`: the first difference.
pub fn agreement(desired: &[EndpointSlice], theirs: &[Arc<EndpointSlice>]) -> Result<(), String> {
    let (ours, theirs) = (normalize(desired), normalize(theirs.iter().map(Arc::as_ref)));
    match ours.first_difference(&theirs, "svcplane", "kube-controller-manager") {
        None => Ok(()),
        Some(difference) => Err(difference),
    }
}

/// The shadow verdict of one Service's slices: `None` when neither svcplane
/// (`desired`, a plan's creates from no slices) nor kube-controller-manager
/// (`theirs`) has any: not a Service this controller manages.
pub fn slices_agreement(
    desired: &[EndpointSlice],
    theirs: &[Arc<EndpointSlice>],
) -> Option<Result<(), String>> {
    (!desired.is_empty() || !theirs.is_empty()).then(|| agreement(desired, theirs))
}

/// The shadow verdict of one Service's Endpoints: `plan` is svcplane's plan
/// against the object kube-controller-manager wrote (`theirs`); it agrees when
/// svcplane would write nothing. `None` for a Service that is gone, or whose
/// Endpoints neither controller writes (selectorless, ExternalName).
pub fn endpoints_agreement(
    service_exists: bool,
    plan: &Plan<Endpoints>,
    theirs: Option<&Endpoints>,
) -> Option<Result<(), String>> {
    if !service_exists {
        return None;
    }
    let Some(ours) = plan.create.first().or(plan.update.first()) else {
        let managed = theirs
            .and_then(|e| e.metadata.labels.as_ref())
            .and_then(|l| l.get(labels::ENDPOINTS_MANAGED_BY))
            .is_some_and(|m| m == labels::UPSTREAM_ENDPOINTS_CONTROLLER);
        return managed.then_some(Ok(()));
    };
    let difference = first_line_difference(
        &normalize_endpoints(Some(ours)),
        &normalize_endpoints(theirs),
        "svcplane",
        "kube-controller-manager",
    );
    Some(Err(difference.unwrap_or_else(|| "annotations or metadata only".to_owned())))
}

/// Event reason when a take-over stops because kube-controller-manager still
/// runs its endpoint controllers (Warning, on the Service).
pub const REASON_STILL_RUNNING: &str = "KubeControllerManagerStillRunning";

/// Take-over: once svcplane's own slices are up to date (`plan`, svcplane's plan
/// for its own slices, writes nothing), kube-controller-manager's slices of the
/// Service are deleted, so traffic never lacks an endpoint; while svcplane's
/// are being written, or when the take-over is `blocked`, they stay.
pub fn take_over(
    mut plan: Plan<EndpointSlice>,
    theirs: &[Arc<EndpointSlice>],
    blocked: bool,
) -> Plan<EndpointSlice> {
    if plan.is_empty() && !blocked {
        plan.delete.extend(theirs.iter().map(|s| EndpointSlice::clone(s)));
    }
    plan
}

/// Hand-back: once kube-controller-manager's slices of the Service agree with
/// what svcplane would write, svcplane's own (`ours`) are deleted; until then
/// svcplane keeps them up to date (`plan`).
pub fn hand_back(
    plan: Plan<EndpointSlice>,
    ours: &[Arc<EndpointSlice>],
    theirs_agree: bool,
) -> Plan<EndpointSlice> {
    if theirs_agree { Plan::delete_all(ours.iter().map(|s| EndpointSlice::clone(s))) } else { plan }
}

/// Tells a kube-controller-manager that still runs its endpoint controllers
/// during a take-over, so svcplane never fights it: it remembers which of a
/// Service's kube-controller-manager slices svcplane deleted; a slice of that
/// Service under a name svcplane never saw can only have been written since, by
/// a live controller (a stopped one writes nothing). Names, not timestamps: no
/// clock of svcplane's is compared with the apiserver's. The first one blocks
/// every further delete until svcplane restarts.
#[derive(Debug, Default)]
pub struct TakeOverGuard {
    /// Per owner: the kube-controller-manager slices svcplane deleted.
    deleted: Mutex<HashMap<(ControllerKind, Key), BTreeSet<String>>>,
    blocked: Mutex<Option<String>>,
}

impl TakeOverGuard {
    /// Records that svcplane deleted `names` of `owner`.
    pub fn deleted(&self, owner: (ControllerKind, &Key), names: impl IntoIterator<Item = String>) {
        lock(&self.deleted).entry((owner.0, owner.1.clone())).or_default().extend(names);
    }

    /// Checks `theirs` (the slices of `owner` kube-controller-manager holds now):
    /// returns why the take-over is blocked, if it is, and whether this check
    /// found it.
    pub fn check(
        &self,
        owner: (ControllerKind, &Key),
        theirs: &[Arc<EndpointSlice>],
    ) -> (Option<String>, bool) {
        let mut blocked = lock(&self.blocked);
        let before = blocked.is_some();
        if blocked.is_none()
            && let Some(names) = lock(&self.deleted).get(&(owner.0, owner.1.clone()))
        {
            let recreated = theirs.iter().find(|s| !names.contains(&s.name_any()));
            if let Some(slice) = recreated {
                *blocked = Some(format!(
                    "kube-controller-manager recreated EndpointSlice {}/{} after svcplane deleted its slices of {}: \
                     its endpoint controllers still run. Take-over stopped; restart kube-controller-manager with \
                     --controllers=*,-endpointslice-controller,-endpoints-controller,-endpointslice-mirroring-controller, \
                     then restart svcplane",
                    owner.1.namespace,
                    slice.name_any(),
                    owner.1
                ));
            }
        }
        (blocked.clone(), !before && blocked.is_some())
    }

    /// Whether a take-over was blocked.
    pub fn is_blocked(&self) -> bool {
        lock(&self.blocked).is_some()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Per controller and Service, whether svcplane agrees with what
/// kube-controller-manager wrote (shadow mode). Pure bookkeeping.
#[derive(Debug, Default)]
pub struct ShadowBook {
    verdicts: Mutex<HashMap<(ControllerKind, Key), Result<(), String>>>,
    /// (agreeing, differing) per controller, kept with `verdicts` (each
    /// record moves them by one Service, never a walk over all of them).
    counts: Mutex<HashMap<ControllerKind, (usize, usize)>>,
}

impl ShadowBook {
    /// Records the verdict of one comparison (`None`: the Service is not one
    /// this controller manages, or is gone); returns the difference when it is
    /// new (the Service agreed, was unknown, or differed otherwise before).
    pub fn record(
        &self,
        owner: (ControllerKind, &Key),
        verdict: Option<Result<(), String>>,
    ) -> Option<String> {
        let mut verdicts = lock(&self.verdicts);
        let id = (owner.0.clone(), owner.1.clone());
        let before = match &verdict {
            None => verdicts.remove(&id),
            Some(v) => verdicts.insert(id, v.clone()),
        };
        let mut counts = lock(&self.counts);
        let (agree, differ) = counts.entry(owner.0).or_default();
        match &before {
            Some(Ok(())) => *agree -= 1,
            Some(Err(_)) => *differ -= 1,
            None => {}
        }
        match &verdict {
            Some(Ok(())) => *agree += 1,
            Some(Err(_)) => *differ += 1,
            None => {}
        }
        let new = before != verdict;
        verdict.and_then(Result::err).filter(|_| new)
    }

    /// (agreeing, differing) Services of `controller`.
    pub fn counts(&self, controller: &ControllerKind) -> (usize, usize) {
        lock(&self.counts).get(controller).copied().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::discovery::v1::Endpoint;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
    use k8s_openapi::jiff::Timestamp;

    fn slice(name: &str, ips: &[&str], created: i64) -> Arc<EndpointSlice> {
        Arc::new(EndpointSlice {
            address_type: "IPv4".into(),
            endpoints: Some(
                ips.iter()
                    .map(|ip| Endpoint { addresses: vec![ip.to_string()], ..Default::default() })
                    .collect(),
            ),
            metadata: ObjectMeta {
                name: Some(name.into()),
                creation_timestamp: Some(Time(Timestamp::from_second(created).expect("time"))),
                ..Default::default()
            },
            ..Default::default()
        })
    }

    fn key() -> Key {
        Key { namespace: "ns".into(), name: "web".into() }
    }

    #[test]
    fn take_over_deletes_theirs_only_once_ours_are_up_to_date_and_never_when_blocked() {
        let theirs = [slice("kcm-1", &["10.0.0.1"], 0)];
        let writing = Plan { create: vec![EndpointSlice::default()], ..Plan::default() };
        assert!(take_over(writing, &theirs, false).delete.is_empty(), "ours not written yet");
        let done = take_over(Plan::default(), &theirs, false);
        assert_eq!(done.delete.iter().map(|s| s.name_any()).collect::<Vec<_>>(), ["kcm-1"]);
        assert!(take_over(Plan::default(), &theirs, true).is_empty(), "blocked");
    }

    #[test]
    fn hand_back_deletes_ours_only_once_theirs_agree() {
        let ours = [slice("svcplane-1", &["10.0.0.1"], 0)];
        let update = Plan { update: vec![EndpointSlice::default()], ..Plan::default() };
        assert_eq!(hand_back(update.clone(), &ours, false), update);
        let handed = hand_back(update, &ours, true);
        assert_eq!((handed.update.len(), handed.delete.len()), (0, 1));
    }

    #[test]
    fn agreement_ignores_names_and_packing_and_names_the_first_difference() {
        let desired = [EndpointSlice::clone(&slice("", &["10.0.0.1", "10.0.0.2"], 0))];
        let same = [slice("a", &["10.0.0.2"], 0), slice("b", &["10.0.0.1"], 0)];
        assert_eq!(agreement(&desired, &same), Ok(()));
        let missing = [slice("a", &["10.0.0.2"], 0)];
        let difference = agreement(&desired, &missing).expect_err("differs");
        assert!(difference.starts_with("only svcplane: IPv4 [] | 10.0.0.1"), "{difference}");
    }

    #[test]
    fn a_slice_recreated_after_svcplane_deleted_theirs_blocks_the_take_over() {
        let guard = TakeOverGuard::default();
        let owner = (ControllerKind::endpointslice, &key());
        assert_eq!(
            guard.check(owner.clone(), &[slice("kcm-1", &[], 90)]),
            (None, false),
            "nothing deleted yet"
        );
        guard.deleted(owner.clone(), ["kcm-1".to_string()]);
        let kept = guard.check(owner.clone(), &[slice("kcm-1", &[], 90)]);
        assert_eq!(kept, (None, false), "the deleted one, not yet gone");
        let (why, newly) = guard.check(owner.clone(), &[slice("kcm-2", &[], 100)]);
        let why = why.expect("blocked");
        assert!(newly && why.contains("ns/kcm-2") && why.contains("still run"), "{why}");
        let other = Key { namespace: "ns".into(), name: "other".into() };
        let (still, newly) = guard.check((ControllerKind::endpointslice, &other), &[]);
        assert!(still.is_some() && !newly, "blocked everywhere, found once");
        assert!(guard.is_blocked());
    }

    #[test]
    fn the_shadow_book_counts_verdicts_and_reports_each_new_difference_once() {
        let book = ShadowBook::default();
        let owner = (ControllerKind::endpointslice, &key());
        assert_eq!(book.record(owner.clone(), Some(Ok(()))), None);
        assert_eq!(book.record(owner.clone(), Some(Err("x".into()))), Some("x".into()));
        assert_eq!(book.record(owner.clone(), Some(Err("x".into()))), None, "reported once");
        assert_eq!(book.counts(&ControllerKind::endpointslice), (0, 1));
        assert_eq!(book.counts(&ControllerKind::mirroring), (0, 0));
        book.record(owner, None);
        assert_eq!(book.counts(&ControllerKind::endpointslice), (0, 0));
    }
}
