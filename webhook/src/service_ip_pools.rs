//! ServiceIPPools (issue #19 item 1): ranges inside the ServiceCIDRs that
//! only the Services a pool selects get their ClusterIPs from.
//!
//! Input: `ServiceIPPool` objects, the ServiceCIDRs' CIDRs, Namespace labels
//! and the Service's namespace and labels. Output: which pools are usable
//! (and why not: the `Ready` condition), and in which order a Service tries
//! them. No I/O: `pool_watches.rs` feeds the index, the repair leader writes
//! the conditions.
//!
//! Selection follows MetalLB's `IPAddressPool.spec.serviceAllocation`
//! (metallb.io/configuration/_advanced_ipaddresspool_configuration):
//! - a pool selects a Service when its namespace is in `namespaces` *or*
//!   matches one of `namespaceSelectors` (when either is given), *and* its
//!   labels match one of `serviceSelectors` (when given);
//! - `priority`: a lower number is a higher priority; a pool without one (or
//!   with 0, MetalLB's unset value) comes after those with one; ties by name
//!   (MetalLB picks at random; a fixed order is predictable);
//! - a pool without `serviceAllocation` is open to every Service, after the
//!   pools that select it.
//!
//! svcplane's own rules, for ClusterIPs: a Service some usable pool of the
//! family selects gets its IP from those pools only, and is denied naming
//! them when they are full (no fallback to the ServiceCIDRs: a tenant's
//! pool is its quota). Every other Service gets its IP from the ServiceCIDRs
//! outside every usable pool (the pools are reserved). A requested IP inside
//! a pool is accepted only for a Service that pool selects (MetalLB: a
//! requested address must be in a pool the Service may use). A pool is
//! usable when each CIDR lies inside a ServiceCIDR and overlaps no older pool.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use ipnetwork::IpNetwork;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
use kube::core::{Selector, SelectorExt};
use kube::{CustomResource, ResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use svcplane_ipam::{ClusterIpAllocator, IpFamily};

/// Spec of a `ServiceIPPool`: CIDRs inside the ServiceCIDRs, and which
/// Services may use them.
#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[kube(
    group = "svcplane.dev",
    version = "v1alpha1",
    kind = "ServiceIPPool",
    plural = "serviceippools",
    shortname = "sippool",
    status = "ServiceIPPoolStatus",
    printcolumn = r#"{"name":"CIDRs","type":"string","jsonPath":".spec.cidrs"}"#,
    printcolumn = r#"{"name":"Priority","type":"integer","jsonPath":".spec.serviceAllocation.priority"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ServiceIPPoolSpec {
    /// CIDRs (either family), each inside a ServiceCIDR.
    pub cidrs: Vec<String>,
    /// Which Services may use the pool, as MetalLB's
    /// `IPAddressPool.spec.serviceAllocation`; absent: every Service, after
    /// the pools that select it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_allocation: Option<ServiceAllocation>,
}

/// What a pool's `serviceAllocation` selects, in one line for `svcplane ipam
/// status`: `priority=1 namespaces=a,b namespaceSelectors=[tenant=b]`, or
/// `every Service` without one.
pub fn describe_allocation(allocation: Option<&ServiceAllocation>) -> String {
    let Some(allocation) = allocation else { return "every Service".to_owned() };
    let selectors = |selectors: &[PoolLabelSelector]| {
        let one = |s: &PoolLabelSelector| {
            let labels = s.match_labels.iter().map(|(k, v)| format!("{k}={v}"));
            let expressions = s
                .match_expressions
                .iter()
                .map(|e| format!("{} {} ({})", e.key, e.operator, e.values.join(",")));
            labels.chain(expressions).collect::<Vec<_>>().join(",")
        };
        selectors.iter().map(|s| format!("[{}]", one(s))).collect::<Vec<_>>().join("")
    };
    let parts = [
        allocation.priority.map(|p| format!("priority={p}")),
        (!allocation.namespaces.is_empty())
            .then(|| format!("namespaces={}", allocation.namespaces.join(","))),
        (!allocation.namespace_selectors.is_empty())
            .then(|| format!("namespaceSelectors={}", selectors(&allocation.namespace_selectors))),
        (!allocation.service_selectors.is_empty())
            .then(|| format!("serviceSelectors={}", selectors(&allocation.service_selectors))),
    ];
    let text = parts.into_iter().flatten().collect::<Vec<_>>().join(" ");
    if text.is_empty() { "every Service".to_owned() } else { text }
}

/// Which Services a pool selects, and its precedence.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ServiceAllocation {
    /// Lower is tried first; absent or 0 after every pool with a priority.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,
    /// Namespaces whose Services the pool selects (or, with
    /// `namespaceSelectors`, those matching one of them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    /// Namespace label selectors; a Service's namespace must match one (or
    /// be in `namespaces`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespace_selectors: Vec<PoolLabelSelector>,
    /// Service label selectors; a Service must match one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_selectors: Vec<PoolLabelSelector>,
}

/// A label selector (`metav1.LabelSelector`'s shape; k8s-openapi's type has
/// no JSON schema here).
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PoolLabelSelector {
    /// Labels that must all be equal.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
    /// Requirements that must all hold.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<PoolSelectorRequirement>,
}

/// One `matchExpressions` entry.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub struct PoolSelectorRequirement {
    /// The label key.
    pub key: String,
    /// `In`, `NotIn`, `Exists` or `DoesNotExist`.
    pub operator: String,
    /// The values of `In` / `NotIn`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

/// Status of a `ServiceIPPool`: its `Ready` condition, written by the
/// webhook's repair leader.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub struct ServiceIPPoolStatus {
    /// `Ready`: True when the webhook allocates from the pool.
    #[serde(default)]
    pub conditions: Vec<PoolCondition>,
}

/// A condition (`metav1.Condition`'s shape).
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PoolCondition {
    /// `Ready`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True` or `False`.
    pub status: String,
    /// `Allocating`, `Invalid`, `OutsideServiceCIDR` or `Overlaps`.
    pub reason: String,
    /// Why, naming the ServiceCIDRs or the other pool.
    pub message: String,
    /// RFC 3339.
    pub last_transition_time: String,
    /// The pool's generation the condition was computed for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Why a pool is usable or not: its `Ready` condition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Allocating from it.
    Ready,
    /// A CIDR or selector cannot be parsed.
    Invalid(String),
    /// A CIDR lies in no ServiceCIDR.
    OutsideServiceCidr {
        /// The CIDR.
        cidr: IpNetwork,
        /// The cluster's ServiceCIDRs, comma-separated.
        service_cidrs: String,
    },
    /// A CIDR overlaps an older pool's.
    Overlaps {
        /// The CIDR.
        cidr: IpNetwork,
        /// The other pool and its CIDR.
        other: String,
        /// The other pool's CIDR.
        other_cidr: IpNetwork,
    },
}

impl Verdict {
    /// The `Ready` condition's reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Verdict::Ready => "Allocating",
            Verdict::Invalid(_) => "Invalid",
            Verdict::OutsideServiceCidr { .. } => "OutsideServiceCIDR",
            Verdict::Overlaps { .. } => "Overlaps",
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Ready => f.write_str("ClusterIPs are allocated from this pool"),
            Verdict::Invalid(why) => f.write_str(why),
            Verdict::OutsideServiceCidr { cidr, service_cidrs } => {
                write!(f, "{cidr} is not inside any ServiceCIDR ({service_cidrs})")
            }
            Verdict::Overlaps { cidr, other, other_cidr } => {
                write!(f, "{cidr} overlaps pool {other} ({other_cidr})")
            }
        }
    }
}

/// A pool as the index uses it: parsed, with its selectors compiled.
#[derive(Clone, Debug)]
pub struct PoolDef {
    /// The object's name.
    pub name: String,
    /// Its CIDRs.
    pub cidrs: Vec<IpNetwork>,
    /// `None`: open to every Service.
    pub allocation: Option<Selection>,
    /// Whether it may be used, and why not.
    pub verdict: Verdict,
    /// Creation time (RFC 3339) then name: the older pool of two that
    /// overlap keeps its range.
    age: (String, String),
}

/// A compiled `serviceAllocation`.
#[derive(Clone, Debug, Default)]
pub struct Selection {
    /// Lower first; `None` last.
    pub priority: Option<i32>,
    namespaces: Vec<String>,
    namespace_selectors: Vec<Selector>,
    service_selectors: Vec<Selector>,
}

/// The Service a pick is for: what pools select on.
#[derive(Clone, Copy, Debug)]
pub struct ServiceRef<'a> {
    /// Its namespace.
    pub namespace: &'a str,
    /// Its labels.
    pub labels: &'a BTreeMap<String, String>,
}

impl Selection {
    /// MetalLB's match: (namespaces or namespaceSelectors) and serviceSelectors.
    fn selects(&self, service: ServiceRef<'_>, namespace_labels: &BTreeMap<String, String>) -> bool {
        let namespace_given = !self.namespaces.is_empty() || !self.namespace_selectors.is_empty();
        let namespace_ok = !namespace_given
            || self.namespaces.iter().any(|n| n == service.namespace)
            || self.namespace_selectors.iter().any(|s| s.matches(namespace_labels));
        let service_ok = self.service_selectors.is_empty()
            || self.service_selectors.iter().any(|s| s.matches(service.labels));
        namespace_ok && service_ok
    }
}

impl PoolDef {
    /// Whether the pool selects `service` (a pool without serviceAllocation
    /// selects every Service).
    pub fn selects(&self, service: ServiceRef<'_>, namespace_labels: &BTreeMap<String, String>) -> bool {
        self.allocation.as_ref().is_none_or(|a| a.selects(service, namespace_labels))
    }

    /// `tenant-a (10.96.8.0/24)`: how denials and metrics name one CIDR of it.
    pub fn label(&self, cidr: IpNetwork) -> String {
        format!("{} ({cidr})", self.name)
    }

    /// Precedence: selecting pools by priority (unset last), then open
    /// pools; ties by name.
    fn precedence(&self) -> (bool, bool, i32, &str) {
        let priority = self.allocation.as_ref().and_then(|a| a.priority).filter(|p| *p != 0);
        (self.allocation.is_none(), priority.is_none(), priority.unwrap_or(0), &self.name)
    }
}

fn compile(selector: &PoolLabelSelector) -> Result<Selector, String> {
    let requirements = selector.match_expressions.iter().map(|r| LabelSelectorRequirement {
        key: r.key.clone(),
        operator: r.operator.clone(),
        values: Some(r.values.clone()),
    });
    let selector = LabelSelector {
        match_labels: Some(selector.match_labels.clone()),
        match_expressions: Some(requirements.collect()),
    };
    Selector::try_from(selector).map_err(|e| format!("invalid selector: {e}"))
}

/// Parses one object; a bad CIDR or selector gives an `Invalid` pool.
fn parse_pool(pool: &ServiceIPPool) -> PoolDef {
    let age = (
        pool.metadata.creation_timestamp.as_ref().map(|t| t.0.to_string()).unwrap_or_default(),
        pool.name_any(),
    );
    let mut def =
        PoolDef { name: pool.name_any(), cidrs: Vec::new(), allocation: None, verdict: Verdict::Ready, age };
    let parsed: Result<Vec<IpNetwork>, String> =
        pool.spec.cidrs.iter().map(|c| c.parse().map_err(|e| format!("spec.cidrs: {c}: {e}"))).collect();
    let allocation = pool.spec.service_allocation.as_ref().map(|a| {
        let compile_all = |s: &[PoolLabelSelector]| s.iter().map(compile).collect::<Result<Vec<_>, _>>();
        Ok::<_, String>(Selection {
            priority: a.priority,
            namespaces: a.namespaces.clone(),
            namespace_selectors: compile_all(&a.namespace_selectors)?,
            service_selectors: compile_all(&a.service_selectors)?,
        })
    });
    match (parsed, allocation.transpose()) {
        (Ok(cidrs), Ok(allocation)) if !cidrs.is_empty() => {
            def.cidrs = cidrs;
            def.allocation = allocation;
        }
        (Ok(_), Ok(_)) => def.verdict = Verdict::Invalid("spec.cidrs is empty".into()),
        (Err(why), _) | (_, Err(why)) => def.verdict = Verdict::Invalid(why),
    }
    def
}

/// Whether `inner` lies wholly inside `outer`.
fn inside(inner: IpNetwork, outer: IpNetwork) -> bool {
    outer.prefix() <= inner.prefix() && outer.contains(inner.network())
}

fn overlap(a: IpNetwork, b: IpNetwork) -> bool {
    a.contains(b.network()) || b.contains(a.network())
}

/// Parses `pools` and decides each one's verdict against `service_cidrs`:
/// each CIDR must lie inside one of them, and overlap no older usable pool
/// (the older keeps its range, so adding a pool never takes one away).
/// Sorted in precedence order.
pub fn plan_pools(
    pools: &[impl std::borrow::Borrow<ServiceIPPool>],
    service_cidrs: &[IpNetwork],
) -> Vec<PoolDef> {
    let mut defs: Vec<PoolDef> = pools.iter().map(|p| parse_pool(p.borrow())).collect();
    defs.sort_by(|a, b| a.age.cmp(&b.age));
    let listed = service_cidrs.iter().map(ToString::to_string).collect::<Vec<_>>().join(",");
    let mut usable: Vec<(String, IpNetwork)> = Vec::new();
    for def in defs.iter_mut().filter(|d| d.verdict == Verdict::Ready) {
        let outside = def.cidrs.iter().find(|c| !service_cidrs.iter().any(|s| inside(**c, *s)));
        let overlapping = def
            .cidrs
            .iter()
            .find_map(|c| usable.iter().find(|(_, u)| overlap(*c, *u)).map(|(name, u)| (*c, name, *u)));
        if let Some(cidr) = outside {
            def.verdict = Verdict::OutsideServiceCidr { cidr: *cidr, service_cidrs: listed.clone() };
        } else if let Some((cidr, other, other_cidr)) = overlapping {
            def.verdict = Verdict::Overlaps { cidr, other: other.clone(), other_cidr };
        } else {
            usable.extend(def.cidrs.iter().map(|c| (def.name.clone(), *c)));
        }
    }
    defs.sort_by(|a, b| a.precedence().cmp(&b.precedence()));
    defs
}

/// The usable pools' bitmaps, in precedence order, and the Namespace labels
/// they select on. Lives in the index, which marks every taken IP in the
/// pool bitmaps that contain it as well as in the ServiceCIDRs'.
#[derive(Debug, Default)]
pub struct PoolSet {
    /// The objects, as the watch last listed them.
    pub objects: Vec<ServiceIPPool>,
    /// Every pool, usable or not, in precedence order.
    pub defs: Vec<PoolDef>,
    /// One bitmap per CIDR of a usable pool: index into `defs`, allocator.
    pub bitmaps: Vec<(usize, ClusterIpAllocator)>,
    /// Namespace name → labels.
    pub namespace_labels: BTreeMap<String, BTreeMap<String, String>>,
}

/// Why no ClusterIP could be picked for a Service.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IpPickError {
    /// The ServiceCIDRs (outside the pools) are full.
    #[error(transparent)]
    Range(svcplane_ipam::IpamError),
    /// Every pool that selects the Service is full.
    #[error(transparent)]
    Pools(PoolsFull),
}

/// Why no pool IP could be picked for a Service its pools select.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}", .0.join("; "))]
pub struct PoolsFull(pub Vec<String>);

impl PoolSet {
    /// Re-plans the pools of `objects` against `service_cidrs`, with empty
    /// bitmaps: the caller marks the taken IPs again.
    pub fn rebuild(&mut self, service_cidrs: &[IpNetwork]) {
        let namespace_labels = std::mem::take(&mut self.namespace_labels);
        let objects = std::mem::take(&mut self.objects);
        *self = Self::new(plan_pools(&objects, service_cidrs), namespace_labels);
        self.objects = objects;
    }

    /// Bitmaps for the usable pools of `defs` (a CIDR too large for a
    /// bitmap makes its pool unusable).
    pub fn new(mut defs: Vec<PoolDef>, namespace_labels: BTreeMap<String, BTreeMap<String, String>>) -> Self {
        let mut bitmaps = Vec::new();
        for (i, def) in defs.iter_mut().enumerate().filter(|(_, d)| d.verdict == Verdict::Ready) {
            let built: Result<Vec<_>, _> = def.cidrs.iter().map(|c| ClusterIpAllocator::new(*c)).collect();
            match built {
                Ok(built) => bitmaps.extend(built.into_iter().map(|b| (i, b))),
                Err(error) => def.verdict = Verdict::Invalid(error.to_string()),
            }
        }
        Self { objects: Vec::new(), defs, bitmaps, namespace_labels }
    }

    /// The usable pool containing `ip`, if any (usable pools do not overlap).
    pub fn pool_of(&self, ip: IpAddr) -> Option<&PoolDef> {
        let usable = self.defs.iter().filter(|d| d.verdict == Verdict::Ready);
        usable.into_iter().find(|d| d.cidrs.iter().any(|c| c.contains(ip)))
    }

    /// Whether some usable pool of `family` selects `service`: its IPs of
    /// that family come from pools only.
    pub fn selects(&self, family: IpFamily, service: ServiceRef<'_>) -> bool {
        self.bitmaps.iter().any(|(i, b)| b.family() == family && self.selected(*i, service))
    }

    fn selected(&self, def: usize, service: ServiceRef<'_>) -> bool {
        let empty = BTreeMap::new();
        let labels = self.namespace_labels.get(service.namespace).unwrap_or(&empty);
        self.defs[def].selects(service, labels)
    }

    /// Picks a free IP of `family` from the pools that select `service`, in
    /// precedence order; `Err` names each full one with its usage.
    pub fn pick(&mut self, family: IpFamily, service: ServiceRef<'_>) -> Result<IpAddr, PoolsFull> {
        let mut full = Vec::new();
        for n in 0..self.bitmaps.len() {
            let def = self.bitmaps[n].0;
            if self.bitmaps[n].1.family() != family || !self.selected(def, service) {
                continue;
            }
            let bitmap = &mut self.bitmaps[n].1;
            match bitmap.allocate_next() {
                Ok(ip) => return Ok(ip),
                Err(_) => full.push(format!(
                    "pool {} is full; {} of {} used",
                    self.defs[def].label(bitmap.cidr()),
                    bitmap.used(),
                    bitmap.size()
                )),
            }
        }
        Err(PoolsFull(full))
    }

    /// Whether `service` may have `ip`: `Err` names the pool that holds it
    /// and does not select the Service.
    pub fn check_access(&self, ip: IpAddr, service: ServiceRef<'_>) -> Result<(), String> {
        let Some(def) = self.pool_of(ip) else { return Ok(()) };
        let empty = BTreeMap::new();
        let labels = self.namespace_labels.get(service.namespace).unwrap_or(&empty);
        if def.selects(service, labels) {
            return Ok(());
        }
        let cidr = def.cidrs.iter().find(|c| c.contains(ip)).copied().unwrap_or(def.cidrs[0]);
        Err(format!("{ip} is in pool {}, which does not select this Service", def.label(cidr)))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use kube::CustomResourceExt;

    use super::*;
    use crate::claim::Value;
    use crate::index::tests::{mk_index, owner};

    pub(crate) fn mk_pool(name: &str, cidrs: &str, allocation: Option<ServiceAllocation>) -> ServiceIPPool {
        let spec = ServiceIPPoolSpec {
            cidrs: cidrs.split(',').map(str::to_owned).collect(),
            service_allocation: allocation,
        };
        let mut pool = ServiceIPPool::new(name, spec);
        pool.metadata.creation_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
        pool
    }

    fn in_namespaces(names: &[&str], priority: Option<i32>) -> Option<ServiceAllocation> {
        let namespaces = names.iter().map(|n| (*n).to_owned()).collect();
        Some(ServiceAllocation { priority, namespaces, ..Default::default() })
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    fn cidrs(text: &str) -> Vec<IpNetwork> {
        crate::pools::parse_cidrs(text).unwrap()
    }

    fn names(defs: &[PoolDef]) -> Vec<&str> {
        defs.iter().map(|d| d.name.as_str()).collect()
    }

    #[test]
    fn pools_are_tried_by_priority_lower_first_unset_after_open_pools_last() {
        let pools = [
            mk_pool("open", "10.0.0.64/28", None),
            mk_pool("unset", "10.0.0.48/28", in_namespaces(&["a"], None)),
            mk_pool("zero", "10.0.0.80/28", in_namespaces(&["a"], Some(0))),
            mk_pool("two", "10.0.0.32/28", in_namespaces(&["a"], Some(2))),
            mk_pool("one", "10.0.0.16/28", in_namespaces(&["a"], Some(1))),
        ];
        let defs = plan_pools(&pools, &cidrs("10.0.0.0/24"));
        assert_eq!(names(&defs), ["one", "two", "unset", "zero", "open"]);
        let mut set = PoolSet::new(defs, BTreeMap::new());
        let none = BTreeMap::new();
        let ip = set.pick(IpFamily::IPv4, ServiceRef { namespace: "a", labels: &none }).unwrap();
        assert!(cidrs("10.0.0.16/28")[0].contains(ip), "{ip} from pool one");
        let other = set.pick(IpFamily::IPv4, ServiceRef { namespace: "b", labels: &none }).unwrap();
        assert!(cidrs("10.0.0.64/28")[0].contains(other), "{other}: only the open pool selects b");
    }

    #[test]
    fn a_pool_selects_by_namespace_name_or_namespace_labels_and_by_service_labels() {
        let selector =
            |pairs: &[(&str, &str)]| PoolLabelSelector { match_labels: labels(pairs), ..Default::default() };
        let allocation = ServiceAllocation {
            namespaces: vec!["a".into()],
            namespace_selectors: vec![selector(&[("tenant", "b")])],
            service_selectors: vec![selector(&[("tier", "gold")])],
            ..Default::default()
        };
        let defs = plan_pools(&[mk_pool("p", "10.0.0.16/28", Some(allocation))], &cidrs("10.0.0.0/24"));
        let gold = labels(&[("tier", "gold")]);
        let plain = labels(&[]);
        let tenant_b = labels(&[("tenant", "b")]);
        let cases = [
            ("a", &plain, &gold, true),
            ("x", &tenant_b, &gold, true),
            ("x", &plain, &gold, false),
            ("a", &plain, &plain, false),
        ];
        for (namespace, namespace_labels, service_labels, expected) in cases {
            let service = ServiceRef { namespace, labels: service_labels };
            assert_eq!(
                defs[0].selects(service, namespace_labels),
                expected,
                "{namespace} {service_labels:?}"
            );
        }
    }

    #[test]
    fn a_pool_outside_every_service_cidr_or_overlapping_an_older_one_is_not_used_and_says_why() {
        let mut newer = mk_pool("newer", "10.0.0.20/30", None);
        newer.metadata.creation_timestamp =
            Some(Time(k8s_openapi::jiff::Timestamp::from_second(60).unwrap()));
        let pools = [
            newer,
            mk_pool("outside", "10.9.0.0/28", None),
            mk_pool("older", "10.0.0.16/28", None),
            mk_pool("bad", "10.0.0.0/33", None),
        ];
        let defs = plan_pools(&pools, &cidrs("10.0.0.0/24,fd00::/112"));
        let verdicts: BTreeMap<&str, String> = defs
            .iter()
            .map(|d| (d.name.as_str(), format!("{}: {}", d.verdict.reason(), d.verdict)))
            .collect();
        assert_eq!(verdicts["older"], "Allocating: ClusterIPs are allocated from this pool");
        assert_eq!(verdicts["newer"], "Overlaps: 10.0.0.20/30 overlaps pool older (10.0.0.16/28)");
        assert_eq!(
            verdicts["outside"],
            "OutsideServiceCIDR: 10.9.0.0/28 is not inside any ServiceCIDR (10.0.0.0/24,fd00::/112)"
        );
        assert!(verdicts["bad"].starts_with("Invalid: spec.cidrs: 10.0.0.0/33: "), "{verdicts:?}");
    }

    #[test]
    fn a_full_pool_is_named_with_its_usage_and_a_requested_ip_needs_a_selecting_pool() {
        let pools = [mk_pool("tenant-a", "10.0.0.16/30", in_namespaces(&["a"], None))];
        let mut set = PoolSet::new(plan_pools(&pools, &cidrs("10.0.0.0/24")), BTreeMap::new());
        let none = BTreeMap::new();
        let a = ServiceRef { namespace: "a", labels: &none };
        let picks = [(); 3].map(|()| set.pick(IpFamily::IPv4, a).map_err(|e| e.to_string()));
        assert_eq!(picks[2], Err("pool tenant-a (10.0.0.16/30) is full; 2 of 2 used".into()));
        let b = ServiceRef { namespace: "b", labels: &none };
        assert!(!set.selects(IpFamily::IPv4, b) && set.selects(IpFamily::IPv4, a));
        assert!(!set.selects(IpFamily::IPv6, a), "no IPv6 pool: the ServiceCIDRs give a's IPv6");
        let inside: IpAddr = "10.0.0.17".parse().unwrap();
        assert_eq!(
            set.check_access(inside, b),
            Err("10.0.0.17 is in pool tenant-a (10.0.0.16/30), which does not select this Service".into())
        );
        assert_eq!(set.check_access(inside, a), Ok(()));
        assert_eq!(set.check_access("10.0.0.99".parse().unwrap(), b), Ok(()));
    }

    /// Issue #19 item 1: one bitmap truth. A pool's IP is taken in the pool
    /// and in its ServiceCIDR; a Service no pool selects never gets one.
    #[test]
    fn a_pool_ip_is_marked_in_both_bitmaps_and_reserved_from_other_services() {
        let mut index = mk_index("10.0.0.0/28", "30000-30001");
        let pools = vec![mk_pool("tenant-a", "10.0.0.8/29", in_namespaces(&["a"], None))];
        index.set_service_ip_pools(pools);
        let none = BTreeMap::new();
        let a = ServiceRef { namespace: "a", labels: &none };
        let from_pool = index.pick_ip_for(IpFamily::IPv4, a).unwrap();
        assert!(cidrs("10.0.0.8/29")[0].contains(from_pool), "{from_pool}");
        let used = |index: &crate::index::Index| -> Vec<(String, usize)> {
            index.usage().into_iter().map(|u| (u.pool, u.used)).collect()
        };
        let expected = |n: usize| {
            vec![("10.0.0.0/28".into(), n), ("30000-30001".into(), 0), ("tenant-a (10.0.0.8/29)".into(), 1)]
        };
        assert_eq!(used(&index), expected(1));
        let b = ServiceRef { namespace: "b", labels: &none };
        let mut others = Vec::new();
        let full = loop {
            match index.pick_ip_for(IpFamily::IPv4, b) {
                Ok(ip) => others.push(ip),
                Err(error) => break error.to_string(),
            }
        };
        // 10.0.0.1-7: the /28 minus the pool's /29 (8-15, 15 the broadcast).
        assert_eq!(others.len(), 7, "{others:?}");
        assert!(others.iter().all(|ip| !cidrs("10.0.0.8/29")[0].contains(*ip)), "{others:?}");
        assert_eq!(full, "range 10.0.0.0/28 is full");
        assert_eq!(used(&index), expected(8), "the set-aside pool IPs were freed again");
        // The pool goes away: its IP stays taken, the range is open to all.
        index.apply_service(owner("a"), [Value::Ip(from_pool)].into());
        index.release_pending(Value::Ip(from_pool));
        index.set_service_ip_pools(Vec::new());
        assert_eq!(index.usage()[0].used, 8);
        assert!(index.pick_ip_for(IpFamily::IPv4, b).is_ok());
    }

    #[test]
    fn committed_crd_manifest_is_current() {
        let yaml = serde_yaml::to_string(&ServiceIPPool::crd()).unwrap();
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../manifests/crds/serviceippools.svcplane.dev.yaml");
        if std::env::var_os("SVCPLANE_WRITE_CRDS").is_some() {
            std::fs::write(path, &yaml).unwrap();
        }
        let committed = std::fs::read_to_string(path).unwrap_or_default();
        assert_eq!(
            committed, yaml,
            "manifests/crds is stale: run SVCPLANE_WRITE_CRDS=1 cargo test -p svcplane-webhook committed_crd"
        );
    }
}
