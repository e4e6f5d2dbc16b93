//! The claim object: one cluster-scoped `AllocationClaim` per
//! allocated value, named after the value.
//!
//! Input: a [`Value`] (an IP or a NodePort). Output: the claim's object name
//! and spec. No API calls here; `allocator.rs` creates and deletes claims.
//!
//! Because the name is a function of the value, two replicas that pick the
//! same value race on the *same* object name and the apiserver lets exactly
//! one create succeed: the other gets 409 AlreadyExists, which is the lock.

use std::fmt;
use std::net::IpAddr;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of svcplane's own objects.
pub const GROUP: &str = "svcplane.dev";

/// Spec of an `AllocationClaim`: which value, for which Service.
#[derive(CustomResource, Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[kube(
    group = "svcplane.dev",
    version = "v1alpha1",
    kind = "AllocationClaim",
    plural = "allocationclaims",
    shortname = "svcclaim",
    printcolumn = r#"{"name":"Value","type":"string","jsonPath":".spec.value"}"#,
    printcolumn = r#"{"name":"Namespace","type":"string","jsonPath":".spec.namespace"}"#,
    printcolumn = r#"{"name":"Service","type":"string","jsonPath":".spec.service"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct AllocationClaimSpec {
    /// `ClusterIP` or `NodePort`.
    pub kind: String,
    /// The IP or port, as text.
    pub value: String,
    /// Namespace of the Service holding the value.
    pub namespace: String,
    /// Name of the Service; `<generateName>*` when the name was not known yet.
    pub service: String,
}

/// One allocatable value: a ClusterIP or a NodePort (health-check NodePorts
/// come from the same pool).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Value {
    /// A ClusterIP.
    Ip(IpAddr),
    /// A NodePort.
    Port(u16),
}

impl Value {
    /// The claim object's name: `ip-10-96-0-5`, `ip6-fd00-0010-…-0005` (all
    /// eight groups, so the name is unambiguous), `nodeport-30080`.
    pub fn claim_name(&self) -> String {
        match self {
            Value::Ip(IpAddr::V4(ip)) => {
                let [a, b, c, d] = ip.octets();
                format!("ip-{a}-{b}-{c}-{d}")
            }
            Value::Ip(IpAddr::V6(ip)) => {
                let groups: Vec<String> = ip.segments().iter().map(|s| format!("{s:04x}")).collect();
                format!("ip6-{}", groups.join("-"))
            }
            Value::Port(port) => format!("nodeport-{port}"),
        }
    }

    /// `ClusterIP` or `NodePort`: the claim's `spec.kind`.
    pub fn kind(&self) -> &'static str {
        match self {
            Value::Ip(_) => "ClusterIP",
            Value::Port(_) => "NodePort",
        }
    }

    /// Parses a claim's spec back into a value.
    pub fn from_spec(spec: &AllocationClaimSpec) -> Option<Value> {
        match spec.kind.as_str() {
            "ClusterIP" => spec.value.parse().ok().map(Value::Ip),
            "NodePort" => spec.value.parse().ok().map(Value::Port),
            _ => None,
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Ip(ip) => write!(f, "{ip}"),
            Value::Port(port) => write!(f, "{port}"),
        }
    }
}

/// The Service a value belongs to: `namespace/name`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Owner {
    /// The Service's namespace.
    pub namespace: String,
    /// The Service's name, or `<generateName>*` before the apiserver named it.
    pub name: String,
}

impl Owner {
    /// Whether `other` is this owner, counting a `prefix*` placeholder as a
    /// match for any name with that prefix (a generateName create is named
    /// only after mutating admission).
    pub fn matches(&self, other: &Owner) -> bool {
        if self.namespace != other.namespace {
            return false;
        }
        let glob = |pattern: &str, name: &str| pattern.strip_suffix('*').is_some_and(|p| name.starts_with(p));
        self.name == other.name || glob(&self.name, &other.name) || glob(&other.name, &self.name)
    }
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Builds the claim object for `value` held by `owner`.
pub fn build_claim(value: Value, owner: &Owner) -> AllocationClaim {
    let mut claim = AllocationClaim::new(
        &value.claim_name(),
        AllocationClaimSpec {
            kind: value.kind().to_owned(),
            value: value.to_string(),
            namespace: owner.namespace.clone(),
            service: owner.name.clone(),
        },
    );
    claim.metadata.labels = Some(
        [("app.kubernetes.io/managed-by".to_owned(), "svcplane-webhook".to_owned())].into_iter().collect(),
    );
    claim
}

/// The owner recorded in a claim.
pub fn claim_owner(claim: &AllocationClaim) -> Owner {
    Owner { namespace: claim.spec.namespace.clone(), name: claim.spec.service.clone() }
}

#[cfg(test)]
mod tests {
    use kube::CustomResourceExt;

    use super::*;

    #[test]
    fn claim_names_are_valid_and_unambiguous() {
        let v4 = Value::Ip("10.96.0.5".parse().unwrap());
        let v6 = Value::Ip("fd00:10:96::5".parse().unwrap());
        assert_eq!(v4.claim_name(), "ip-10-96-0-5");
        assert_eq!(v6.claim_name(), "ip6-fd00-0010-0096-0000-0000-0000-0000-0005");
        assert_eq!(Value::Port(30080).claim_name(), "nodeport-30080");
    }

    #[test]
    fn spec_round_trips_to_the_value() {
        for value in [Value::Ip("fd00::1".parse().unwrap()), Value::Port(31000)] {
            let claim = build_claim(value, &Owner { namespace: "ns".into(), name: "web".into() });
            assert_eq!(Value::from_spec(&claim.spec), Some(value));
        }
    }

    #[test]
    fn generate_name_placeholder_matches_the_named_service() {
        let placeholder = Owner { namespace: "ns".into(), name: "web-*".into() };
        assert!(placeholder.matches(&Owner { namespace: "ns".into(), name: "web-x7k2".into() }));
        assert!(!placeholder.matches(&Owner { namespace: "other".into(), name: "web-x7k2".into() }));
        assert!(!placeholder.matches(&Owner { namespace: "ns".into(), name: "api".into() }));
    }

    #[test]
    fn committed_crd_manifest_is_current() {
        let crd = AllocationClaim::crd();
        let yaml = serde_yaml::to_string(&crd).unwrap();
        let path =
            concat!(env!("CARGO_MANIFEST_DIR"), "/../manifests/crds/allocationclaims.svcplane.dev.yaml");
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
