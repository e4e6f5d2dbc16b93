//! `NoReadyEndpoints` Events: a Warning on a Service whose selector has had no
//! ready endpoint for longer than `--no-ready-endpoints-grace`, noting why in
//! `svcplane explain`'s terms ([`summarize`]), again only when that note changes,
//! and a Normal `ReadyEndpoints` once it has one again.
//!
//! A task of the leader, run with the endpointslice controller: it sweeps the
//! Service store periodically, reads the stores and writes only Events, at most
//! [`EVENTS_PER_SECOND`] on average over all Services. The timing rules are the
//! pure [`NoReadyTracker`]. A sweep decodes and summarizes only the Services
//! without ready endpoints and those the endpointslice controller synced since
//! the last sweep (every change of a Service, its Pods or their Nodes syncs
//! it): a quiet cluster of 10 000 Services and 50 000 Pods would otherwise
//! decode all of them every 10 s.

use std::{
    collections::{HashMap, HashSet},
    num::NonZeroU32,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use k8s_openapi::api::{core::v1::Service, events};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::{Api, Resource, api::PostParams};

use super::{Context, Key};
use crate::eligibility::summary::{ReadySummary, summarize};

/// Warning Event reason: no ready endpoint for longer than the grace period.
pub const REASON_NO_READY: &str = "NoReadyEndpoints";

/// Normal Event reason: a ready endpoint again after a `NoReadyEndpoints`.
pub const REASON_READY: &str = "ReadyEndpoints";

/// Average Events per second over all Services (a token bucket)...
const EVENTS_PER_SECOND: u32 = 5;
/// ...and how many may go at once after a quiet spell.
const EVENT_BURST: u32 = 50;

/// An Event due for one Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Notice {
    /// Warning `NoReadyEndpoints` with this note.
    NoReady(String),
    /// Normal `ReadyEndpoints` with this note.
    Recovered(String),
}

/// Since when a Service has had no ready endpoint, and the note last published.
#[derive(Debug)]
struct Outage {
    since: Instant,
    warned: Option<String>,
}

/// Which Services lack ready endpoints and what was said about them, and which
/// need no look until they change. Pure: the clock is passed in.
#[derive(Debug)]
pub struct NoReadyTracker {
    grace: Duration,
    outages: HashMap<Key, Outage>,
    /// Services whose last look found ready endpoints and nothing due, or
    /// nothing to track (no selector, being deleted).
    settled: HashSet<Key>,
}

impl NoReadyTracker {
    /// A tracker warning after `grace` without a ready endpoint.
    pub fn new(grace: Duration) -> Self {
        Self { grace, outages: HashMap::new(), settled: HashSet::new() }
    }

    /// Whether the sweep must look at `key`: not settled, or synced (changed)
    /// since the last sweep.
    pub fn needs_look(&self, key: &Key, synced: &HashSet<Key>) -> bool {
        !self.settled.contains(key) || synced.contains(key)
    }

    /// Records a look that found nothing to track: a Service without a
    /// selector, or being deleted. Its outage, if any, is forgotten.
    pub fn quiet(&mut self, key: &Key) {
        self.outages.remove(key);
        self.settled.insert(key.clone());
    }

    /// Records one look at Service `key`; returns the Event now due, if
    /// `may_publish` (asked only then) allows it. When it does not, nothing
    /// changes and the Event is due again at the next look.
    pub fn observe(
        &mut self,
        key: &Key,
        summary: &ReadySummary,
        now: Instant,
        may_publish: impl FnOnce() -> bool,
    ) -> Option<Notice> {
        let notice = self.notice(key, summary, now, may_publish);
        if summary.ready > 0 && !self.outages.contains_key(key) {
            self.settled.insert(key.clone());
        } else {
            self.settled.remove(key);
        }
        notice
    }

    fn notice(
        &mut self,
        key: &Key,
        summary: &ReadySummary,
        now: Instant,
        may_publish: impl FnOnce() -> bool,
    ) -> Option<Notice> {
        if summary.ready > 0 {
            let outage = self.outages.get(key)?;
            if outage.warned.is_some() && !may_publish() {
                return None;
            }
            let outage = self.outages.remove(key)?;
            outage.warned.as_ref()?;
            let without = Duration::from_secs(now.saturating_duration_since(outage.since).as_secs());
            let s = if summary.ready == 1 { "" } else { "s" };
            let without = humantime::format_duration(without).to_string().replace(' ', "");
            return Some(Notice::Recovered(format!(
                "{} ready endpoint{s} after {without} without",
                summary.ready
            )));
        }
        let outage = self.outages.entry(key.clone()).or_insert(Outage { since: now, warned: None });
        let due = now.saturating_duration_since(outage.since) >= self.grace
            && outage.warned.as_deref() != Some(summary.note.as_str());
        if !due || !may_publish() {
            return None;
        }
        outage.warned = Some(summary.note.clone());
        Some(Notice::NoReady(summary.note.clone()))
    }

    /// Records that the Warning for `key` could not be written: it is due again.
    pub fn unsent(&mut self, key: &Key) {
        if let Some(outage) = self.outages.get_mut(key) {
            outage.warned = None;
        }
    }

    /// Forgets every Service `live` rejects (deleted).
    pub fn retain(&mut self, live: impl Fn(&Key) -> bool) {
        self.outages.retain(|key, _| live(key));
        self.settled.retain(|key| live(key));
    }
}

/// The Services the endpointslice controller has synced since the sweep last
/// took them; records nothing until the sweep runs.
#[derive(Debug, Default)]
pub struct SyncedSinceSweep(Mutex<Option<HashSet<Key>>>);

impl SyncedSinceSweep {
    /// Records a sync of `key`.
    pub fn record(&self, key: &Key) {
        if let Some(synced) = self.lock().as_mut() {
            synced.insert(key.clone());
        }
    }

    /// The Services synced since the last call; from the first call on, syncs
    /// are recorded.
    fn take(&self) -> HashSet<Key> {
        self.lock().replace(HashSet::new()).unwrap_or_default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<HashSet<Key>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// How often the Services are looked at: half the grace, within 0.5–10 s.
fn sweep_period(grace: Duration) -> Duration {
    (grace / 2).clamp(Duration::from_millis(500), Duration::from_secs(10))
}

/// Sweeps the Service store every [`sweep_period`] until aborted.
pub(super) async fn run(ctx: Arc<Context>, grace: Duration) {
    let mut tracker = NoReadyTracker::new(grace);
    let quota = governor::Quota::per_second(NonZeroU32::new(EVENTS_PER_SECOND).unwrap_or(NonZeroU32::MIN))
        .allow_burst(NonZeroU32::new(EVENT_BURST).unwrap_or(NonZeroU32::MIN));
    let limiter = governor::RateLimiter::direct(quota);
    let mut tick = tokio::time::interval(sweep_period(grace));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = Instant::now();
        let synced = ctx.synced_since_sweep.take();
        let mut present = HashSet::new();
        for packed in ctx.stores.services.state() {
            let key = Key::of(packed.as_ref());
            if !tracker.needs_look(&key, &synced) {
                present.insert(key);
                continue;
            }
            let svc = packed.unpack();
            let summary = match svc.metadata.deletion_timestamp {
                Some(_) => None,
                None => {
                    let pods = ctx.indexes.members(&ctx.stores, &key);
                    summarize(&svc, &pods, &*super::state::read(&ctx.indexes.nodes))
                }
            };
            match summary {
                None => tracker.quiet(&key),
                Some(summary) => {
                    if let Some(notice) = tracker.observe(&key, &summary, now, || limiter.check().is_ok())
                        && !publish(&ctx, &svc, notice).await
                    {
                        tracker.unsent(&key);
                    }
                }
            }
            present.insert(key);
        }
        tracker.retain(|key| present.contains(key));
    }
}

/// Creates one Event on the Service; false (and a log line) when that failed. Not through
/// the shared `Recorder`: it folds an Event with the same reason into the first
/// one's series, note and all, so a changed note would never show.
async fn publish(ctx: &Context, svc: &Service, notice: Notice) -> bool {
    let (type_, reason, note) = match notice {
        Notice::NoReady(note) => ("Warning", REASON_NO_READY, note),
        Notice::Recovered(note) => ("Normal", REASON_READY, note),
    };
    let key = Key::of(svc);
    tracing::info!(service = %key, reason, note, "endpoint readiness event");
    let now = Timestamp::now();
    let reporter = super::reporter();
    let event = events::v1::Event {
        metadata: ObjectMeta {
            // As client-go's recorder names Events: regarding name, then time.
            name: Some(format!("{}.{:x}", key.name, now.as_nanosecond())),
            namespace: Some(key.namespace.clone()),
            ..ObjectMeta::default()
        },
        event_time: Some(MicroTime(now)),
        type_: Some(type_.into()),
        reason: Some(reason.into()),
        note: Some(note),
        action: Some("CheckEndpoints".into()),
        regarding: Some(svc.object_ref(&())),
        reporting_controller: Some(reporter.controller),
        reporting_instance: reporter.instance,
        ..events::v1::Event::default()
    };
    let api = Api::<events::v1::Event>::namespaced(ctx.client.clone(), &key.namespace);
    let result = api.create(&PostParams::default(), &event).await;
    if let Err(e) = &result {
        tracing::warn!(service = %key, error = %e, reason, "failed to publish event");
    }
    result.is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> Key {
        Key { namespace: "ns".into(), name: "web".into() }
    }

    fn none(note: &str) -> ReadySummary {
        ReadySummary { ready: 0, note: note.into() }
    }

    #[test]
    fn warns_once_after_the_grace_and_again_only_when_the_note_changes() {
        let (mut t, t0) = (NoReadyTracker::new(Duration::from_secs(60)), Instant::now());
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert_eq!(t.observe(&key(), &none("a"), at(0), || true), None);
        assert_eq!(t.observe(&key(), &none("a"), at(59), || true), None);
        assert_eq!(t.observe(&key(), &none("a"), at(60), || false), None, "rate-limited: still due");
        assert_eq!(t.observe(&key(), &none("a"), at(61), || true), Some(Notice::NoReady("a".into())));
        assert_eq!(t.observe(&key(), &none("a"), at(70), || true), None);
        t.unsent(&key());
        assert_eq!(
            t.observe(&key(), &none("a"), at(75), || true),
            Some(Notice::NoReady("a".into())),
            "retried"
        );
        assert_eq!(t.observe(&key(), &none("b"), at(80), || true), Some(Notice::NoReady("b".into())));
        let ready = ReadySummary { ready: 2, note: String::new() };
        assert_eq!(
            t.observe(&key(), &ready, at(190), || true),
            Some(Notice::Recovered("2 ready endpoints after 3m10s without".into()))
        );
        assert_eq!(t.observe(&key(), &ready, at(200), || true), None);
    }

    #[test]
    fn a_service_is_looked_at_again_only_after_a_sync_while_it_has_ready_endpoints() {
        let (mut t, t0) = (NoReadyTracker::new(Duration::from_secs(60)), Instant::now());
        let (quiet, synced) = (HashSet::new(), HashSet::from([key()]));
        assert!(t.needs_look(&key(), &quiet), "never looked at");
        let ready = ReadySummary { ready: 1, note: String::new() };
        assert_eq!(t.observe(&key(), &ready, t0, || true), None);
        assert!(!t.needs_look(&key(), &quiet), "ready and unchanged: settled");
        assert!(t.needs_look(&key(), &synced), "synced since: looked at");
        assert_eq!(t.observe(&key(), &none("a"), t0, || true), None);
        assert!(t.needs_look(&key(), &quiet), "without ready endpoints: looked at every sweep");
        let due = t.observe(&key(), &none("a"), t0 + Duration::from_secs(60), || true);
        assert_eq!(due, Some(Notice::NoReady("a".into())), "the grace runs on unsynced looks");
        let recovered = t.observe(&key(), &ready, t0 + Duration::from_secs(70), || false);
        assert_eq!(recovered, None, "rate-limited");
        assert!(t.needs_look(&key(), &quiet), "the ReadyEndpoints Event is still due");
        assert!(t.observe(&key(), &ready, t0 + Duration::from_secs(80), || true).is_some());
        assert!(!t.needs_look(&key(), &quiet));
        t.observe(&key(), &none("a"), t0 + Duration::from_secs(90), || true);
        t.quiet(&key());
        assert!(!t.needs_look(&key(), &quiet), "no selector any more: settled");
        let later = t.observe(&key(), &none("a"), t0 + Duration::from_secs(200), || true);
        assert_eq!(later, None, "its outage was forgotten: the grace starts again");
        t.retain(|_| false);
        assert!(t.needs_look(&key(), &quiet), "deleted: forgotten");
    }

    #[test]
    fn syncs_are_recorded_once_the_sweep_runs() {
        let synced = SyncedSinceSweep::default();
        synced.record(&key());
        assert!(synced.take().is_empty(), "not recorded before the first sweep");
        synced.record(&key());
        assert_eq!(synced.take(), HashSet::from([key()]));
        assert!(synced.take().is_empty(), "taken");
    }

    #[test]
    fn a_short_outage_or_a_forgotten_service_says_nothing() {
        let (mut t, t0) = (NoReadyTracker::new(Duration::from_secs(60)), Instant::now());
        let ready = ReadySummary { ready: 1, note: String::new() };
        assert_eq!(t.observe(&key(), &none("a"), t0, || true), None);
        assert_eq!(t.observe(&key(), &ready, t0 + Duration::from_secs(30), || panic!("nothing due")), None);
        assert_eq!(t.observe(&key(), &none("a"), t0 + Duration::from_secs(40), || true), None);
        t.retain(|_| false);
        assert_eq!(
            t.observe(&key(), &none("a"), t0 + Duration::from_secs(100), || true),
            None,
            "clock restarted"
        );
    }
}
