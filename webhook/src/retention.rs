//! Sticky values (issue #19 item 2): a deleted Service's ClusterIPs and
//! NodePorts stay claimed for its namespace/name for `--webhook-retention`,
//! so re-creating it gives them back.
//!
//! The retention lives in the cluster, on the claim itself: the two
//! annotations below on an `AllocationClaim` whose owner is the deleted
//! Service, so every replica (and one started later) sees it. A retained
//! claim keeps its value taken like any claim; it is
//! - preferred by the next create of the same namespace/name (same family
//!   for an IP, same `spec.ports[i]` for a nodePort);
//! - confirmed (annotations removed) once the Service watch sees a Service of
//!   that name holding it, or released when that Service holds it no longer;
//! - released, oldest first, when a dynamic pick finds its pool otherwise
//!   full: a delete with uid *and* resourceVersion preconditions, so exactly
//!   one replica releases it and a confirmation racing it wins or loses as a
//!   whole; the freed value is then claimed by create (409 is the lock);
//! - released by the repair pass once the window ends.
//!
//! [`Retained`] and the decisions are pure; [`retain_claims`],
//! [`confirm_claims`] and [`release_claim`] call the API.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;

use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, PostParams, Preconditions};
use kube::{Resource, ResourceExt};
use svcplane_ipam::{IpFamily, NodePortNeeds, ServicePort};
use tracing::{debug, warn};

use crate::admit::PortNeeds;
use crate::claim::{AllocationClaim, Owner, Value, claim_owner};

/// Annotation on a claim: until when (RFC 3339) its value waits for its
/// deleted owner to come back.
pub const RETAINED_UNTIL: &str = "svcplane.dev/retained-until";

/// Annotation on a retained claim: the field that carried the value
/// (`spec.ports[1].nodePort`), so a re-created Service gets each nodePort
/// back on the same port.
pub const RETAINED_FIELD: &str = "svcplane.dev/retained-field";

/// One retained claim, as the index keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Retention {
    /// The deleted Service the value waits for.
    pub owner: Owner,
    /// End of the window, in Unix milliseconds.
    pub until_ms: i64,
    /// The field that carried the value.
    pub field: String,
    /// The claim's uid and resourceVersion: the preconditions of a release,
    /// so a claim confirmed (or re-made) meanwhile is not released.
    pub uid: Option<String>,
    /// See `uid`.
    pub resource_version: Option<String>,
}

impl Retention {
    /// The retention a claim object records, if any.
    pub fn of(claim: &AllocationClaim) -> Option<Retention> {
        let annotations = claim.meta().annotations.as_ref()?;
        let until = annotations.get(RETAINED_UNTIL)?.parse::<Timestamp>().ok()?;
        Some(Retention {
            owner: claim_owner(claim),
            until_ms: until.as_millisecond(),
            field: annotations.get(RETAINED_FIELD).cloned().unwrap_or_default(),
            uid: claim.uid(),
            resource_version: claim.resource_version(),
        })
    }

    /// How a denial names the holder of a retained value.
    pub fn describe(&self) -> String {
        let until = Timestamp::from_millisecond(self.until_ms).map(|t| t.to_string()).unwrap_or_default();
        format!("{} (deleted; retained for its re-creation until {until})", self.owner)
    }
}

/// The retained claims one replica knows of, by value and by owner (fed by
/// the claim watch; no I/O). The owner index keeps the look-ups of every
/// Service event and admission request at the size of one Service's values,
/// however many Services wait in their windows.
#[derive(Clone, Debug, Default)]
pub struct Retained {
    by_value: HashMap<Value, Retention>,
    by_owner: HashMap<Owner, BTreeSet<Value>>,
}

impl Retained {
    /// Records what the claim of `value` says now (a claim without the
    /// annotations, e.g. a confirmed or re-made one, is not retained).
    pub fn observe(&mut self, value: Value, claim: &AllocationClaim) {
        match Retention::of(claim) {
            Some(retention) => self.insert(value, retention),
            None => self.forget(value),
        }
    }

    /// Records the retention [`retain_claims`] is about to write for the
    /// deleted `owner`'s `values`, until the claim watch brings the claims
    /// (without their resourceVersion: a release meanwhile checks the uid).
    pub fn expect(&mut self, owner: &Owner, values: &[(Value, Option<String>, String)], until_ms: i64) {
        for (value, uid, field) in values {
            if self.by_value.contains_key(value) {
                continue;
            }
            let retention = Retention {
                owner: owner.clone(),
                until_ms,
                field: field.clone(),
                uid: uid.clone(),
                resource_version: None,
            };
            self.insert(*value, retention);
        }
    }

    /// Forgets a claim that is gone.
    pub fn forget(&mut self, value: Value) {
        let Some(old) = self.by_value.remove(&value) else { return };
        if let Some(values) = self.by_owner.get_mut(&old.owner) {
            values.remove(&value);
            if values.is_empty() {
                self.by_owner.remove(&old.owner);
            }
        }
    }

    fn insert(&mut self, value: Value, retention: Retention) {
        self.forget(value);
        self.by_owner.entry(retention.owner.clone()).or_default().insert(value);
        self.by_value.insert(value, retention);
    }

    /// The values retained for exactly `owner` with their retentions.
    fn of_owner<'a>(&'a self, owner: &Owner) -> impl Iterator<Item = (Value, &'a Retention)> + 'a {
        let values = self.by_owner.get(owner).into_iter().flatten();
        values.filter_map(|value| self.by_value.get(value).map(|r| (*value, r)))
    }

    /// The retention of `value`, if its claim is retained.
    pub fn get(&self, value: Value) -> Option<&Retention> {
        self.by_value.get(&value)
    }

    /// The values retained for exactly `owner`, with their claims' uids.
    pub fn for_owner(&self, owner: &Owner) -> Vec<(Value, Option<String>)> {
        self.of_owner(owner).map(|(value, r)| (value, r.uid.clone())).collect()
    }

    /// The retained IP of `family` waiting for exactly `owner` (never a
    /// `prefix*` placeholder: a generateName create is a new Service).
    pub fn preferred_ip(&self, owner: &Owner, family: IpFamily) -> Option<IpAddr> {
        self.of_owner(owner).find_map(|(value, _)| match value {
            Value::Ip(ip) if IpFamily::of(ip) == family => Some(ip),
            _ => None,
        })
    }

    /// The retained nodePort that `field` (`spec.ports[i].nodePort`,
    /// `spec.healthCheckNodePort`) of exactly `owner` carried.
    pub fn preferred_port(&self, owner: &Owner, field: &str) -> Option<u16> {
        self.of_owner(owner).find_map(|(value, r)| match value {
            Value::Port(port) if r.field == field => Some(port),
            _ => None,
        })
    }

    /// The retained value `wanted` accepts whose window ends first (the
    /// owner deleted longest ago): what a full pool gives up first.
    pub fn oldest(&self, wanted: impl Fn(Value) -> bool) -> Option<(Value, Retention)> {
        let candidates = self.by_value.iter().filter(|(value, _)| wanted(**value));
        let oldest = candidates.min_by_key(|(value, r)| (r.until_ms, **value));
        oldest.map(|(value, r)| (*value, r.clone()))
    }
}

/// The ports of `needs` with the nodePorts retained for `owner` filled in
/// where the request names none (same `spec.ports[i]`, and the
/// healthCheckNodePort), for [`assign_node_ports`](svcplane_ipam::assign_node_ports).
pub fn with_retained_ports(
    retained: &Retained,
    owner: &Owner,
    needs: &PortNeeds,
) -> (Vec<ServicePort>, NodePortNeeds) {
    let mut ports = needs.ports.clone();
    if needs.needs.allocate_node_ports {
        for (port, spec_index) in ports.iter_mut().zip(&needs.spec_index) {
            let field = format!("spec.ports[{spec_index}].nodePort");
            port.requested_node_port = port.requested_node_port.or(retained.preferred_port(owner, &field));
        }
    }
    let mut with_retained = needs.needs;
    if with_retained.health_check == Some(None) {
        with_retained.health_check = Some(retained.preferred_port(owner, "spec.healthCheckNodePort"));
    }
    (ports, with_retained)
}

/// When the repair pass may release a claim no Service holds: at the end of
/// its retention window, else `grace` after its creation.
pub fn release_due_ms(claim: &AllocationClaim, created_ms: i64, grace_ms: i64) -> i64 {
    match Retention::of(claim) {
        Some(retention) => retention.until_ms,
        None => created_ms.saturating_add(grace_ms),
    }
}

/// The claim with the retention annotations set (`until`, `field`).
pub fn build_retained(mut claim: AllocationClaim, until: Timestamp, field: &str) -> AllocationClaim {
    let annotations = claim.annotations_mut();
    annotations.insert(RETAINED_UNTIL.to_owned(), until.to_string());
    annotations.insert(RETAINED_FIELD.to_owned(), field.to_owned());
    claim
}

/// The claim without the retention annotations.
pub fn build_confirmed(mut claim: AllocationClaim) -> AllocationClaim {
    let annotations = claim.annotations_mut();
    annotations.remove(RETAINED_UNTIL);
    annotations.remove(RETAINED_FIELD);
    claim
}

/// Marks the claims of a deleted Service retained until `until`: each is
/// read and written back with its resourceVersion, only if it is still the
/// claim with that uid and not retained yet. Every replica's watch sees the
/// delete; the first write wins, the others get 409 and leave it.
pub async fn retain_claims(
    claims: &Api<AllocationClaim>,
    values: Vec<(Value, Option<String>, String)>,
    until: Timestamp,
) {
    for (value, uid, field) in values {
        let name = value.claim_name();
        let current = match claims.get_opt(&name).await {
            Ok(Some(claim)) if claim.uid() == uid && Retention::of(&claim).is_none() => claim,
            Ok(_) => continue,
            Err(error) => {
                warn!(%value, %error, "could not read the claim to retain; repair will release it");
                continue;
            }
        };
        match claims.replace(&name, &PostParams::default(), &build_retained(current, until, &field)).await {
            Ok(_) => debug!(%value, %until, "retained for the deleted Service"),
            Err(kube::Error::Api(status)) if status.code == 409 => {}
            Err(error) => warn!(%value, %error, "could not retain the claim; repair will release it"),
        }
    }
}

/// Removes the retention of claims whose Service is back and holds them
/// (the same uid and resourceVersion checks as [`retain_claims`]).
pub async fn confirm_claims(claims: &Api<AllocationClaim>, values: Vec<(Value, Option<String>)>) {
    for (value, uid) in values {
        let name = value.claim_name();
        let current = match claims.get_opt(&name).await {
            Ok(Some(claim)) if claim.uid() == uid && Retention::of(&claim).is_some() => claim,
            Ok(_) => continue,
            Err(error) => return warn!(%value, %error, "could not read the retained claim to confirm"),
        };
        match claims.replace(&name, &PostParams::default(), &build_confirmed(current)).await {
            Ok(_) => debug!(%value, "retained value taken up again by its Service"),
            Err(kube::Error::Api(status)) if status.code == 409 => {}
            Err(error) => warn!(%value, %error, "could not confirm the retained claim"),
        }
    }
}

/// Releases a retained claim for a full pool: true when this call deleted
/// it. The resourceVersion precondition makes it lose to a confirmation
/// (its owner came back) and to another replica's release.
pub async fn release_claim(
    claims: &Api<AllocationClaim>,
    value: Value,
    retention: &Retention,
) -> Result<bool, kube::Error> {
    let preconditions =
        Preconditions { uid: retention.uid.clone(), resource_version: retention.resource_version.clone() };
    let params = DeleteParams { preconditions: Some(preconditions), ..DeleteParams::default() };
    match claims.delete(&value.claim_name(), &params).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => Ok(false),
        Err(error) => Err(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::claim::build_claim;
    use crate::index::tests::owner;

    fn mk_retained(value: Value, name: &str, until_ms: i64, field: &str) -> AllocationClaim {
        let until = Timestamp::from_millisecond(until_ms).unwrap();
        let mut claim = build_retained(build_claim(value, &owner(name)), until, field);
        claim.metadata.uid = Some(format!("u{value}"));
        claim.metadata.resource_version = Some("7".into());
        claim
    }

    fn mk_retained_set(claims: &[(Value, AllocationClaim)]) -> Retained {
        let mut retained = Retained::default();
        for (value, claim) in claims {
            retained.observe(*value, claim);
        }
        retained
    }

    #[test]
    fn a_retained_value_is_preferred_only_by_its_own_namespace_and_name() {
        let (ip4, ip6) = (Value::Ip("10.0.0.5".parse().unwrap()), Value::Ip("fd00::5".parse().unwrap()));
        let port = Value::Port(30001);
        let retained = mk_retained_set(&[
            (ip4, mk_retained(ip4, "web", 1_000, "spec.clusterIPs[0]")),
            (ip6, mk_retained(ip6, "web", 1_000, "spec.clusterIPs[1]")),
            (port, mk_retained(port, "web", 1_000, "spec.ports[1].nodePort")),
        ]);
        assert_eq!(retained.preferred_ip(&owner("web"), IpFamily::IPv4), Some("10.0.0.5".parse().unwrap()));
        assert_eq!(retained.preferred_ip(&owner("web"), IpFamily::IPv6), Some("fd00::5".parse().unwrap()));
        assert_eq!(retained.preferred_ip(&owner("api"), IpFamily::IPv4), None);
        assert_eq!(retained.preferred_ip(&owner("w*"), IpFamily::IPv4), None, "generateName: a new Service");
        assert_eq!(retained.preferred_port(&owner("web"), "spec.ports[1].nodePort"), Some(30001));
        assert_eq!(retained.preferred_port(&owner("web"), "spec.ports[0].nodePort"), None, "same port only");
    }

    #[test]
    fn a_confirmed_claim_is_no_longer_retained() {
        let port = Value::Port(30001);
        let claim = mk_retained(port, "web", 1_000, "spec.ports[0].nodePort");
        let mut retained = mk_retained_set(&[(port, claim.clone())]);
        assert_eq!(retained.get(port).map(|r| r.until_ms), Some(1_000));
        retained.observe(port, &build_confirmed(claim));
        assert_eq!(retained.get(port), None);
    }

    #[test]
    fn a_full_pool_gives_up_the_value_whose_window_ends_first_and_only_of_its_kind() {
        let values = [Value::Port(30001), Value::Port(30002), Value::Ip("10.0.0.5".parse().unwrap())];
        let retained = mk_retained_set(&[
            (values[0], mk_retained(values[0], "b", 3_000, "spec.ports[0].nodePort")),
            (values[1], mk_retained(values[1], "a", 2_000, "spec.ports[0].nodePort")),
            (values[2], mk_retained(values[2], "c", 1_000, "spec.clusterIPs[0]")),
        ]);
        let ports = |v: Value| matches!(v, Value::Port(_));
        let (value, retention) = retained.oldest(ports).unwrap();
        assert_eq!(
            (value, retention.owner, retention.resource_version),
            (values[1], owner("a"), Some("7".into()))
        );
        assert_eq!(retained.oldest(|v| matches!(v, Value::Ip(_))).map(|(v, _)| v), Some(values[2]));
        assert_eq!(retained.oldest(|_| false), None);
    }

    #[test]
    fn a_re_created_service_asks_for_its_retained_node_ports_on_the_same_ports() {
        use svcplane_ipam::Protocol;
        let (p0, health) = (Value::Port(30001), Value::Port(30009));
        let retained = mk_retained_set(&[
            (p0, mk_retained(p0, "web", 1_000, "spec.ports[2].nodePort")),
            (health, mk_retained(health, "web", 1_000, "spec.healthCheckNodePort")),
        ]);
        let port =
            |requested_node_port| ServicePort { port: 80, protocol: Protocol::Tcp, requested_node_port };
        let needs = PortNeeds {
            spec_index: vec![1, 2],
            ports: vec![port(None), port(None)],
            needs: NodePortNeeds { allocate_node_ports: true, health_check: Some(None) },
        };
        let (ports, with) = with_retained_ports(&retained, &owner("web"), &needs);
        let requested: Vec<_> = ports.iter().map(|p| p.requested_node_port).collect();
        assert_eq!((requested, with.health_check), (vec![None, Some(30001)], Some(Some(30009))));
        let (ports, with) = with_retained_ports(&retained, &owner("api"), &needs);
        assert_eq!((ports, with), (needs.ports.clone(), needs.needs), "another Service asks for nothing");
        let user_given = PortNeeds { ports: vec![port(None), port(Some(30005))], ..needs.clone() };
        let (ports, _) = with_retained_ports(&retained, &owner("web"), &user_given);
        assert_eq!(ports[1].requested_node_port, Some(30005), "the request's own value wins");
        let no_node_ports =
            PortNeeds { needs: NodePortNeeds { allocate_node_ports: false, health_check: None }, ..needs };
        let (ports, _) = with_retained_ports(&retained, &owner("web"), &no_node_ports);
        assert_eq!(ports[1].requested_node_port, None, "allocateLoadBalancerNodePorts: false");
    }

    #[test]
    fn another_service_is_denied_a_retained_value_naming_the_owner() {
        use crate::index::tests::mk_index;
        use crate::index::{ClaimRecord, Holder};
        let port = Value::Port(30001);
        let claim = mk_retained(port, "web", 0, "spec.ports[0].nodePort");
        let mut index = mk_index("10.0.0.0/24", "30000-30009");
        index.apply_claim(port, ClaimRecord::of(&claim).unwrap().1);
        index.retained.observe(port, &claim);
        let holder = index.other_holder(port, &owner("api"));
        assert!(matches!(&holder, Some(Holder::Retained(r)) if r.owner == owner("web")), "{holder:?}");
        assert_eq!(index.other_holder(port, &owner("web")), None, "its owner may have it");
        index.delete_claim(port);
        assert_eq!(index.retained.get(port), None);
    }

    #[test]
    fn repair_releases_a_retained_claim_at_the_end_of_its_window_not_after_the_grace() {
        let port = Value::Port(30001);
        let retained = mk_retained(port, "web", 600_000, "spec.ports[0].nodePort");
        assert_eq!(release_due_ms(&retained, 1_000, 90_000), 600_000);
        assert_eq!(release_due_ms(&build_claim(port, &owner("web")), 1_000, 90_000), 91_000);
    }

    #[test]
    fn a_denial_names_the_owner_and_the_end_of_the_window() {
        let claim = mk_retained(Value::Port(30001), "web", 0, "spec.ports[0].nodePort");
        assert_eq!(
            Retention::of(&claim).unwrap().describe(),
            "ns/web (deleted; retained for its re-creation until 1970-01-01T00:00:00Z)"
        );
    }
}
