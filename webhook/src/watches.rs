//! Keeps this replica's [`Index`] in step with the cluster. Calls the API:
//! watches claims, Services and ServiceCIDRs; deletes the claims of values a
//! Service dropped or was deleted with, and of requests that never persisted;
//! re-keys `prefix*` placeholder claims to the Service the apiserver named.
//!
//! Each watch is kube-runtime's watcher (with its default backoff, so an
//! apiserver outage does not spin) through a reflector, seen as [`Change`]s:
//! a (re-)list reaches the index only once complete, from the reflector's
//! store. The folds into the index are pure.

use std::fmt::Debug;
use std::hash::Hash;
use std::pin::pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt, future};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::networking::v1::ServiceCIDR;
use kube::api::{Api, PostParams};
use kube::runtime::reflector::{self, store::Writer};
use kube::runtime::watcher::{self, Event};
use kube::runtime::{WatchStreamExt, watcher::watcher};
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use k8s_openapi::jiff::Timestamp;

use crate::admit::{service_owner, service_values, value_fields};
use crate::allocator::{delete_claim, release_claims};
use crate::blocks::{BlockId, BlockRecord};
use crate::claim::{AllocationClaim, Owner, Value, build_claim};
use crate::index::{ClaimRecord, Index, lock};
use crate::pools::{PoolConfig, pools_from};
use crate::retention::{self, Retained};

/// How often the unconfirmed claims are checked against `unconfirmed_grace`.
const UNCONFIRMED_CHECK_INTERVAL: Duration = Duration::from_millis(500);

/// Every how many checks the placeholder claims are swept (every 10 s): the
/// Service watch re-keys at once, the sweep only catches what it missed.
const PLACEHOLDER_SWEEP_EVERY: u32 = 20;

/// Keeps `index` in step with claims, Services and ServiceCIDRs until the
/// streams end; sets `ready` once all three have listed. With
/// `release_on_change`, deletes the claims of a Service's values when the
/// watch sees them dropped or the Service deleted; releases the claims this
/// replica made that no Service took up after `unconfirmed_grace`; re-keys a
/// `prefix*` placeholder claim to the Service the apiserver named.
pub async fn run_watches(
    client: Client,
    index: Arc<Mutex<Index>>,
    fallback: PoolConfig,
    ready: watch::Sender<bool>,
    release_on_change: bool,
    unconfirmed_grace: Duration,
    retention: Duration,
) {
    let listed = AtomicU8::new(0);
    let mark = |which: u8| {
        if listed.fetch_or(1 << which, Ordering::SeqCst) | (1 << which) == 0b111 {
            let _ = ready.send(true);
        }
    };
    let claims: Api<AllocationClaim> = Api::all(client.clone());
    let on_claims = async {
        let mut changes = pin!(watch(claims.clone(), Writer::default()));
        while let Some(change) = changes.next().await {
            if fold_claims(&mut lock(&index), change) {
                mark(0);
            }
        }
    };
    let on_services = async {
        let mut changes = pin!(watch(Api::<Service>::all(client.clone()), Writer::default()));
        while let Some(change) = changes.next().await {
            let until = retention_end(retention).filter(|_| release_on_change);
            let folded = {
                let mut index = lock(&index);
                let follow_up = fold_service(&mut index, change);
                // Under the same lock as the delete's fold: a create of the
                // same name finds the values retained from now on, not only
                // once the claim watch echoes the write below.
                if let (Some(follow_up), Some(until)) = (&follow_up, until) {
                    index.retained.expect(&follow_up.owner, &follow_up.retain, until.as_millisecond());
                }
                follow_up
            };
            let Some(FollowUp { owner, mut release, rekey, retain, confirm }) = folded else {
                mark(1);
                continue;
            };
            if release_on_change {
                match until {
                    Some(until) => retention::retain_claims(&claims, retain, until).await,
                    None => release.extend(retain.into_iter().map(|(value, uid, _)| (value, uid))),
                }
                for (value, uid) in release {
                    match delete_claim(&claims, value, uid).await {
                        Ok(_) => debug!(%owner, %value, "released on Service update or delete"),
                        Err(error) => warn!(%owner, %value, %error, "release failed; repair will retry"),
                    }
                }
            }
            for (value, uid) in rekey {
                rekey_claim(&claims, value, uid, &owner).await;
            }
            retention::confirm_claims(&claims, confirm).await;
        }
    };
    let on_cidrs = async {
        let (cidrs, writer) = reflector::store();
        let mut changes = pin!(watch(Api::<ServiceCIDR>::all(client.clone()), writer));
        // Every change re-derives the pools from the whole (complete) store.
        while changes.next().await.is_some() {
            let pools = pools_from(&cidrs.state(), &fallback);
            if let Err(error) = lock(&index).set_pools(pools.clone()) {
                warn!(%error, "ignoring unusable Service CIDRs");
            } else {
                info!(cidrs = ?pools.cidrs, draining = ?pools.draining, node_ports = %pools.node_ports, "pools");
            }
            mark(2);
        }
    };
    let unconfirmed = release_unconfirmed(&claims, &index, unconfirmed_grace);
    tokio::join!(on_claims, on_services, on_cidrs, unconfirmed);
}

/// When a Service deleted now stops waiting for its values; `None` when
/// retention is off (`--webhook-retention=0s`).
fn retention_end(retention: Duration) -> Option<Timestamp> {
    let window = i64::try_from(retention.as_millis()).ok().filter(|ms| *ms > 0)?;
    Timestamp::from_millisecond(Timestamp::now().as_millisecond().saturating_add(window)).ok()
}

/// One watch's news, after the reflector folded the watcher's events.
pub(crate) enum Change<K> {
    /// A complete (re-)list: every object, never a half-listed state.
    Listed(Vec<Arc<K>>),
    Applied(K),
    Deleted(K),
}

/// Watches every `K` with kube-runtime's default backoff, through the
/// reflector `writer`, as [`Change`]s.
pub(crate) fn watch<K>(api: Api<K>, writer: Writer<K>) -> impl Stream<Item = Change<K>>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    K::DynamicType: Default + Eq + Hash + Clone,
{
    let events = watcher(api, watcher::Config::default())
        .default_backoff()
        .modify(|object| object.managed_fields_mut().clear());
    changes(events, writer)
}

/// Folds watcher `events` into `writer`'s store and reports each complete
/// list from that store; a failed watch is logged (the backoff retries it).
fn changes<K>(
    events: impl Stream<Item = watcher::Result<Event<K>>>,
    writer: Writer<K>,
) -> impl Stream<Item = Change<K>>
where
    K: Resource + Clone + 'static,
    K::DynamicType: Default + Eq + Hash + Clone,
{
    let store = writer.as_reader();
    events.reflect(writer).filter_map(move |event| {
        future::ready(match event {
            Ok(Event::InitDone) => Some(Change::Listed(store.state())),
            Ok(Event::Apply(object)) => Some(Change::Applied(object)),
            Ok(Event::Delete(object)) => Some(Change::Deleted(object)),
            Ok(Event::Init | Event::InitApply(_)) => None,
            Err(error) => {
                warn!(%error, kind = %K::kind(&K::DynamicType::default()), "watch failed; retrying");
                None
            }
        })
    })
}

/// Folds a claim change into `index`; true when it was a complete list.
fn fold_claims(index: &mut Index, change: Change<AllocationClaim>) -> bool {
    match change {
        Change::Listed(claims) => {
            index.replace_claims(claims.iter().filter_map(|claim| ClaimRecord::of(claim)));
            index.replace_blocks(claims.iter().filter_map(|claim| BlockRecord::of(claim)));
            for claim in &claims {
                Value::from_spec(&claim.spec).into_iter().for_each(|v| index.echo(v, claim.uid()));
            }
            index.retained = Retained::default();
            for claim in &claims {
                Value::from_spec(&claim.spec).into_iter().for_each(|v| index.retained.observe(v, claim));
            }
            return true;
        }
        Change::Applied(claim) => {
            ClaimRecord::of(&claim).into_iter().for_each(|(v, r)| index.apply_claim(v, r));
            Value::from_spec(&claim.spec).into_iter().for_each(|v| index.echo(v, claim.uid()));
            BlockRecord::of(&claim).into_iter().for_each(|(id, r)| index.apply_block(id, r));
            Value::from_spec(&claim.spec).into_iter().for_each(|v| index.retained.observe(v, &claim));
        }
        Change::Deleted(claim) => {
            Value::from_spec(&claim.spec).into_iter().for_each(|v| index.delete_claim(v));
            BlockId::of_claim(&claim.spec).into_iter().for_each(|id| index.delete_block(id));
        }
    }
    false
}

/// What the Service watch does after folding a change into the index.
#[derive(Debug, PartialEq, Eq)]
struct FollowUp {
    /// The Service the claims below belong to.
    owner: Owner,
    /// Its claims on values it dropped (and no other Service holds), or on
    /// every value when it was deleted: released if the policy says so.
    release: Vec<(Value, Option<String>)>,
    /// Its placeholder claims (`prefix*`), to re-key to its real name.
    rekey: Vec<(Value, Option<String>)>,
    /// It was deleted: its claims, with the field that carried each value,
    /// to retain for its re-creation (or release when retention is off).
    retain: Vec<(Value, Option<String>, String)>,
    /// It is back: its retained claims it holds again, to confirm.
    confirm: Vec<(Value, Option<String>)>,
}

/// Folds a Service change into `index` and says what to release or re-key;
/// `None` for a complete list, which only rebuilds (repair handles what
/// changed while unwatched).
fn fold_service(index: &mut Index, change: Change<Service>) -> Option<FollowUp> {
    match change {
        Change::Listed(services) => {
            index.replace_services(services.iter().map(|s| (service_owner(s), service_values(s))));
            None
        }
        Change::Applied(service) => {
            let owner = service_owner(&service);
            let values = service_values(&service);
            let before = index.service_values(&owner);
            index.apply_service(owner.clone(), values.clone());
            // A type change (NodePort -> ClusterIP, -> ExternalName) or a
            // downgrade to single stack frees values at once, as in
            // kube-apiserver.
            let dropped = before.difference(&values).filter(|v| !index.is_held(**v));
            let mut release = claims_of(index, &owner, dropped);
            let placeholders =
                values.iter().filter(|v| index.claim(**v).is_some_and(|c| c.owner.name.ends_with('*')));
            let rekey = claims_of(index, &owner, placeholders);
            // Back under its name: what it holds is its own again, what it
            // did not take back waits for nobody.
            let (held, not_held): (Vec<_>, Vec<_>) = index
                .retained
                .for_owner(&owner)
                .into_iter()
                .filter(|(v, _)| !index.is_held(*v) || values.contains(v))
                .partition(|(v, _)| values.contains(v));
            release.extend(not_held);
            Some(FollowUp { owner, release, rekey, retain: Vec::new(), confirm: held })
        }
        Change::Deleted(service) => {
            let owner = service_owner(&service);
            index.delete_service(&owner);
            let fields = value_fields(&service).into_iter();
            let retain = fields
                .filter_map(|(value, field)| {
                    let claim = index.claim(value).filter(|c| c.owner.matches(&owner))?;
                    Some((value, claim.uid.clone(), field))
                })
                .collect();
            Some(FollowUp { owner, release: Vec::new(), rekey: Vec::new(), retain, confirm: Vec::new() })
        }
    }
}

/// The claims (value and uid) on `values` whose owner matches `owner`.
fn claims_of<'a>(
    index: &Index,
    owner: &Owner,
    values: impl Iterator<Item = &'a Value>,
) -> Vec<(Value, Option<String>)> {
    values
        .filter_map(|v| index.claim(*v).filter(|c| c.owner.matches(owner)).map(|c| (*v, c.uid.clone())))
        .collect()
}

/// Releases the claims this replica created for requests that never
/// persisted: no Service of their owner holds them after `grace`. Also
/// re-keys placeholder claims the Service watch's own re-key missed.
async fn release_unconfirmed(claims: &Api<AllocationClaim>, index: &Mutex<Index>, grace: Duration) {
    let mut tick = tokio::time::interval(UNCONFIRMED_CHECK_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sweeps = 0_u32;
    loop {
        tick.tick().await;
        sweeps = sweeps.wrapping_add(1);
        if sweeps.is_multiple_of(PLACEHOLDER_SWEEP_EVERY) {
            let placeholders = lock(index).held_placeholders();
            for (value, uid, owner) in placeholders {
                rekey_claim(claims, value, uid, &owner).await;
            }
        }
        let expired = lock(index).expired_unconfirmed(Instant::now(), grace);
        release_claims(claims, index, expired, "no Service took it up").await;
    }
}

/// Re-keys the placeholder claim of `value` (uid `uid`) to `owner`: delete
/// it with a uid precondition, then create it under the real name. Only the
/// replica whose delete succeeded creates, so replicas do not race.
async fn rekey_claim(claims: &Api<AllocationClaim>, value: Value, uid: Option<String>, owner: &Owner) {
    let created = match delete_claim(claims, value, uid).await {
        Ok(true) => claims.create(&PostParams::default(), &build_claim(value, owner)).await,
        Ok(false) => return,
        Err(error) => return warn!(%owner, %value, %error, "could not re-key the placeholder claim"),
    };
    match created {
        Ok(_) => debug!(%owner, %value, "claim re-keyed from its generateName placeholder"),
        // The Service still carries the value, so the index keeps it taken
        // and repair re-adopts it.
        Err(error) => warn!(%owner, %value, %error, "could not re-create the claim under the Service's name"),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use futures::{executor::block_on, stream};

    use super::*;
    use crate::index::tests::{mk_index, owner};
    use crate::repair::tests::mk_service;

    fn mk_claim(port: u16, name: &str) -> AllocationClaim {
        let mut claim = build_claim(Value::Port(port), &owner(name));
        claim.metadata.uid = Some(format!("u{port}"));
        claim
    }

    fn ports(ports: &[u16]) -> BTreeSet<Value> {
        ports.iter().map(|p| Value::Port(*p)).collect()
    }

    #[test]
    fn a_relist_reaches_the_index_only_complete_and_replaces_what_was_there() {
        let events = stream::iter([
            Event::Init,
            Event::InitApply(mk_claim(30001, "a")),
            Event::InitApply(mk_claim(30002, "b")),
            Event::InitDone,
            Event::Apply(mk_claim(30003, "c")),
            Event::Delete(mk_claim(30001, "a")),
            // A re-list after a watch failure: 30002 went away meanwhile.
            Event::Init,
            Event::InitApply(mk_claim(30003, "c")),
            Event::InitApply(mk_claim(30004, "d")),
            Event::InitDone,
        ]);
        let mut index = mk_index("10.0.0.0/24", "30000-30009");
        let seen: Vec<_> = block_on(changes(events.map(Ok), Writer::default()).collect::<Vec<_>>())
            .into_iter()
            .map(|change| (fold_claims(&mut index, change), index.claims().map(|(v, _)| *v).collect()))
            .collect();
        let expected: [(bool, &[u16]); 4] = [
            (true, &[30001, 30002]),
            (false, &[30001, 30002, 30003]),
            (false, &[30002, 30003]),
            (true, &[30003, 30004]),
        ];
        assert_eq!(seen, expected.map(|(listed, values)| (listed, ports(values))));
        assert_eq!(index.usage()[1].used, 2, "the dropped claim's bit is free again");
    }

    #[test]
    fn a_service_change_releases_only_its_own_claims_and_re_keys_its_placeholders() {
        let mut index = mk_index("10.0.0.0/24", "30000-30009");
        for (port, name) in [(30001, "web-1"), (30002, "web-1"), (30003, "other"), (30004, "web-*")] {
            fold_claims(&mut index, Change::Applied(mk_claim(port, name)));
        }
        let listed = Change::Listed(vec![Arc::new(mk_service("web-1", &[], &[30001, 30002, 30003]))]);
        assert_eq!(fold_service(&mut index, listed), None);
        let update = fold_service(&mut index, Change::Applied(mk_service("web-1", &[], &[30001, 30004])));
        let u = |port: u16| (Value::Port(port), Some(format!("u{port}")));
        let expected = FollowUp {
            owner: owner("web-1"),
            release: vec![u(30002)],
            rekey: vec![u(30004)],
            retain: vec![],
            confirm: vec![],
        };
        assert_eq!(update, Some(expected), "30003 is another Service's claim");
        assert_eq!(index.service_values(&owner("web-1")), ports(&[30001, 30004]));
        let deleted =
            fold_service(&mut index, Change::Deleted(mk_service("web-1", &[], &[30001, 30003]))).unwrap();
        let retained = (Value::Port(30001), Some("u30001".into()), "spec.ports[0].nodePort".into());
        assert_eq!(
            (deleted.release, deleted.retain, index.service_values(&owner("web-1"))),
            (vec![], vec![retained], BTreeSet::new()),
            "its own claims are retained (or released when retention is off), 30003 is not its own"
        );
    }

    #[test]
    fn a_re_created_service_confirms_the_retained_values_it_holds_and_releases_the_others() {
        let mut index = mk_index("10.0.0.0/24", "30000-30009");
        let until = k8s_openapi::jiff::Timestamp::from_millisecond(1_000).unwrap();
        for (port, name) in [(30001, "web"), (30002, "web"), (30003, "api")] {
            let claim = retention::build_retained(mk_claim(port, name), until, "spec.ports[0].nodePort");
            fold_claims(&mut index, Change::Applied(claim));
        }
        let back = fold_service(&mut index, Change::Applied(mk_service("web", &[], &[30001]))).unwrap();
        let u = |port: u16| (Value::Port(port), Some(format!("u{port}")));
        assert_eq!((back.confirm, back.release), (vec![u(30001)], vec![u(30002)]), "30003 waits for api");
        let unrelated = fold_service(&mut index, Change::Applied(mk_service("db", &[], &[]))).unwrap();
        assert_eq!((unrelated.confirm, unrelated.release), (vec![], vec![]));
    }

    #[test]
    fn retention_is_off_at_zero() {
        assert_eq!(retention_end(Duration::ZERO), None);
        let until = retention_end(Duration::from_secs(600)).unwrap();
        let ahead = until.as_millisecond() - k8s_openapi::jiff::Timestamp::now().as_millisecond();
        assert!((599_000..=600_000).contains(&ahead), "{ahead}");
    }
}
