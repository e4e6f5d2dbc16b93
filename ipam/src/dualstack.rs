//! kube-apiserver's dual-stack decision for a Service create.
//!
//! Input: the Service's `clusterIP`, `clusterIPs`, `ipFamilies`,
//! `ipFamilyPolicy` (as plain strings, exactly as received) and whether it
//! has a selector, plus the cluster's configured families in order (the first
//! is the default). Output: the policy, the families in allocation order and
//! the IP requested for each, or the apiserver's field errors with its
//! wording. Pure; no Kubernetes types.
//!
//! Reproduces, in order, `normalizeClusterIPs` (create),
//! `initIPFamilyFields` and the `ValidateServiceClusterIPsRelatedFields`
//! pre-validation it calls (pkg/registry/core/service/storage/alloc.go,
//! pkg/apis/core/validation/validation.go, v1.37.2, StrictIPCIDRValidation
//! on as by default). Tested against every case of upstream's
//! `TestCreateInitIPFields` (tests/dualstack_upstream_table.rs). Update
//! transitions (upgrade/downgrade, PreferDualStack stickiness) are not
//! covered here.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// An IP family, spelled as the API does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IpFamily {
    /// `IPv4`.
    IPv4,
    /// `IPv6`.
    IPv6,
}

impl IpFamily {
    /// The API spelling, `IPv4` or `IPv6`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::IPv4 => "IPv4",
            Self::IPv6 => "IPv6",
        }
    }

    /// The other family.
    pub fn other(self) -> Self {
        match self {
            Self::IPv4 => Self::IPv6,
            Self::IPv6 => Self::IPv4,
        }
    }

    /// The family of an address.
    pub fn of(ip: IpAddr) -> Self {
        if ip.is_ipv4() { Self::IPv4 } else { Self::IPv6 }
    }
}

impl fmt::Display for IpFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for IpFamily {
    type Err = ();

    /// Parses the exact API spelling; anything else is unsupported.
    fn from_str(text: &str) -> Result<Self, ()> {
        match text {
            "IPv4" => Ok(Self::IPv4),
            "IPv6" => Ok(Self::IPv6),
            _ => Err(()),
        }
    }
}

/// `spec.ipFamilyPolicy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IpFamilyPolicy {
    /// One family only.
    SingleStack,
    /// Two families when the cluster has two, else one.
    PreferDualStack,
    /// Two families, or an error on a single-stack cluster.
    RequireDualStack,
}

impl IpFamilyPolicy {
    /// The API spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SingleStack => "SingleStack",
            Self::PreferDualStack => "PreferDualStack",
            Self::RequireDualStack => "RequireDualStack",
        }
    }
}

impl fmt::Display for IpFamilyPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for IpFamilyPolicy {
    type Err = ();

    /// Parses the exact API spelling; anything else is unsupported.
    fn from_str(text: &str) -> Result<Self, ()> {
        match text {
            "SingleStack" => Ok(Self::SingleStack),
            "PreferDualStack" => Ok(Self::PreferDualStack),
            "RequireDualStack" => Ok(Self::RequireDualStack),
            _ => Err(()),
        }
    }
}

/// The Service fields the decision reads, as received.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceIpFields {
    /// `spec.clusterIP`; empty when unset, `None` for headless.
    pub cluster_ip: String,
    /// `spec.clusterIPs`.
    pub cluster_ips: Vec<String>,
    /// `spec.ipFamilies`.
    pub ip_families: Vec<String>,
    /// `spec.ipFamilyPolicy`.
    pub ip_family_policy: Option<String>,
    /// Whether `spec.selector` is non-empty.
    pub has_selector: bool,
}

/// What the apiserver will allocate for the Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FamilyPlan {
    /// The effective `spec.ipFamilyPolicy`.
    pub policy: IpFamilyPolicy,
    /// The effective `spec.ipFamilies`; their order is the order of
    /// `clusterIPs`, and the first one gives `clusterIP`.
    pub families: Vec<IpFamily>,
    /// Headless (`clusterIP: None`): nothing is allocated.
    pub headless: bool,
    /// For each family, the IP the user asked for (a static allocation) or
    /// `None` for a dynamic one. Empty when headless.
    pub requested_ips: Vec<Option<IpAddr>>,
}

/// The kind of a field error, rendered as the apiserver does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FieldErrorKind {
    /// `Invalid value: <value>`.
    Invalid,
    /// `Unsupported value: <value>`.
    NotSupported,
    /// `Duplicate value: <value>`.
    Duplicate,
    /// `Required value`.
    Required,
}

/// One apiserver field error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// The field path, e.g. `spec.ipFamilyPolicy` or `spec.clusterIPs[1]`.
    pub field: String,
    /// The error type.
    pub kind: FieldErrorKind,
    /// The bad value already rendered as Go does (`"x"`, `["a","b"]`).
    pub value: String,
    /// The detail sentence.
    pub detail: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            FieldErrorKind::Invalid => "Invalid value",
            FieldErrorKind::NotSupported => "Unsupported value",
            FieldErrorKind::Duplicate => "Duplicate value",
            FieldErrorKind::Required => "Required value",
        };
        write!(f, "{}: {kind}", self.field)?;
        if self.kind != FieldErrorKind::Required {
            write!(f, ": {}", self.value)?;
        }
        if !self.detail.is_empty() {
            write!(f, ": {}", self.detail)?;
        }
        Ok(())
    }
}

/// The Service is invalid: one or more field errors, displayed like the
/// apiserver's aggregate (`a` alone, or `[a, b]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceInvalid {
    /// The errors in the apiserver's order.
    pub errors: Vec<FieldError>,
}

impl ServiceInvalid {
    /// The full apiserver message: `Service "<name>" is invalid: <errors>`.
    pub fn message_for(&self, name: &str) -> String {
        format!("Service {} is invalid: {self}", quote(name))
    }
}

impl fmt::Display for ServiceInvalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Go's aggregate drops duplicate messages and brackets several.
        let mut messages: Vec<String> = Vec::new();
        for error in &self.errors {
            let message = error.to_string();
            if !messages.contains(&message) {
                messages.push(message);
            }
        }
        match messages.as_slice() {
            [one] => f.write_str(one),
            many => write!(f, "[{}]", many.join(", ")),
        }
    }
}

impl std::error::Error for ServiceInvalid {}

/// Decides families, their order and the requested IPs for a Service create
/// on a cluster with `cluster_families` (one or two, the first is the
/// default), or returns the apiserver's errors. ExternalName Services are the
/// caller's to skip: upstream does nothing for them.
pub fn plan_ip_families(
    service: &ServiceIpFields,
    cluster_families: &[IpFamily],
) -> Result<FamilyPlan, ServiceInvalid> {
    let default_family = cluster_families.first().copied().unwrap_or(IpFamily::IPv4);
    let configured = |family: IpFamily| cluster_families.contains(&family);
    let dual_stack_cluster = configured(IpFamily::IPv4) && configured(IpFamily::IPv6);

    // normalizeClusterIPs on create: an old client sets only the singular.
    let mut cluster_ips = service.cluster_ips.clone();
    if !service.cluster_ip.is_empty() && cluster_ips.is_empty() {
        cluster_ips.push(service.cluster_ip.clone());
    }
    let headless_selectorless = service.cluster_ip == NONE && !service.has_selector;

    let policy_text = match &service.ip_family_policy {
        Some(text) => text.clone(),
        None if headless_selectorless => IpFamilyPolicy::RequireDualStack.as_str().to_owned(),
        None => IpFamilyPolicy::SingleStack.as_str().to_owned(),
    };

    let mut errors = pre_validate(service, &cluster_ips, &policy_text);
    if !errors.is_empty() {
        return Err(ServiceInvalid { errors });
    }
    // Pre-validation proved the policy and every family parse.
    let policy: IpFamilyPolicy = policy_text.parse().unwrap_or(IpFamilyPolicy::SingleStack);
    let mut families: Vec<IpFamily> =
        service.ip_families.iter().filter_map(|family| family.parse().ok()).collect();

    if policy == IpFamilyPolicy::SingleStack {
        if cluster_ips.len() == 2 {
            errors.push(invalid(
                "spec.ipFamilyPolicy",
                quote(policy.as_str()),
                "must be 'RequireDualStack' or 'PreferDualStack' when multiple cluster IPs are specified",
            ));
        }
        if families.len() == 2 {
            errors.push(invalid(
                "spec.ipFamilyPolicy",
                quote(policy.as_str()),
                "must be 'RequireDualStack' or 'PreferDualStack' when multiple IP families are specified",
            ));
        }
    }

    // Infer missing ipFamilies[i] from clusterIPs[i].
    for (index, ip) in cluster_ips.iter().enumerate() {
        if ip == NONE {
            break;
        }
        let Some(family) = family_of(ip) else { break };
        if index >= families.len() {
            if configured(family) {
                families.push(family);
            } else {
                errors.push(invalid(
                    &format!("spec.clusterIPs[{index}]"),
                    json_list(&cluster_ips),
                    &format!("{family} is not configured on this cluster"),
                ));
            }
        }
    }
    if !errors.is_empty() {
        return Err(ServiceInvalid { errors });
    }

    // Headless and selectorless may be dual-stack even on a single-stack
    // cluster, so it is decided before the cluster checks.
    if headless_selectorless {
        if families.is_empty() {
            families.push(default_family);
        }
        if families.len() < 2 && policy != IpFamilyPolicy::SingleStack {
            families.push(families[0].other());
        }
        return Ok(FamilyPlan { policy, families, headless: true, requested_ips: Vec::new() });
    }

    if policy == IpFamilyPolicy::RequireDualStack && !dual_stack_cluster {
        errors.push(invalid(
            "spec.ipFamilyPolicy",
            quote(policy.as_str()),
            "this cluster is not configured for dual-stack services",
        ));
    }
    for (index, family) in families.iter().enumerate() {
        if !configured(*family) {
            errors.push(invalid(
                &format!("spec.ipFamilies[{index}]"),
                quote(family.as_str()),
                "not configured on this cluster",
            ));
        }
    }
    if !errors.is_empty() {
        return Err(ServiceInvalid { errors });
    }

    if families.is_empty() {
        families.push(default_family);
    }
    if policy != IpFamilyPolicy::SingleStack && families.len() == 1 && dual_stack_cluster {
        families.push(families[0].other());
    }

    let headless = cluster_ips.first().is_some_and(|ip| ip == NONE);
    let requested_ips = if headless {
        Vec::new()
    } else {
        (0..families.len()).map(|index| cluster_ips.get(index).and_then(|ip| parse_ip(ip))).collect()
    };
    Ok(FamilyPlan { policy, families, headless, requested_ips })
}

/// The headless marker.
const NONE: &str = "None";

/// `ValidateServiceClusterIPsRelatedFields` for a create.
fn pre_validate(service: &ServiceIpFields, cluster_ips: &[String], policy: &str) -> Vec<FieldError> {
    let mut errors = Vec::new();
    let ips_value = json_list(cluster_ips);

    if !service.cluster_ip.is_empty() {
        if cluster_ips.is_empty() {
            errors.push(FieldError {
                field: "spec.clusterIPs".to_owned(),
                kind: FieldErrorKind::Required,
                value: String::new(),
                detail: String::new(),
            });
        } else if cluster_ips[0] != service.cluster_ip {
            errors.push(invalid("spec.clusterIPs", ips_value.clone(), "first value must match `clusterIP`"));
        }
    } else if !cluster_ips.is_empty() {
        errors.push(invalid(
            "spec.clusterIPs",
            ips_value.clone(),
            "must be empty when `clusterIP` is not specified",
        ));
    }

    let mut seen: Vec<&str> = Vec::new();
    for (index, family) in service.ip_families.iter().enumerate() {
        if family.parse::<IpFamily>().is_err() {
            errors.push(FieldError {
                field: format!("spec.ipFamilies[{index}]"),
                kind: FieldErrorKind::NotSupported,
                value: quote(family),
                detail: r#"supported values: "IPv4", "IPv6""#.to_owned(),
            });
        }
        if seen.contains(&family.as_str()) {
            errors.push(FieldError {
                field: format!("spec.ipFamilies[{index}]"),
                kind: FieldErrorKind::Duplicate,
                value: quote(family),
                detail: String::new(),
            });
        }
        seen.push(family);
    }

    if service.ip_family_policy.is_some() && policy.parse::<IpFamilyPolicy>().is_err() {
        errors.push(FieldError {
            field: "spec.ipFamilyPolicy".to_owned(),
            kind: FieldErrorKind::NotSupported,
            value: quote(policy),
            detail: r#"supported values: "PreferDualStack", "RequireDualStack", "SingleStack""#.to_owned(),
        });
    }

    let mut has_invalid_ips = false;
    for (index, ip) in cluster_ips.iter().enumerate() {
        if index == 0 && ip == NONE {
            if cluster_ips.len() > 1 {
                has_invalid_ips = true;
                errors.push(invalid(
                    "spec.clusterIPs",
                    ips_value.clone(),
                    "'None' must be the first and only value",
                ));
            }
            continue;
        }
        let field = format!("spec.clusterIPs[{index}]");
        for detail in ip_format_errors(ip) {
            has_invalid_ips = true;
            errors.push(invalid(&field, quote(ip), detail));
        }
    }
    if cluster_ips.len() > 2 {
        errors.push(invalid("spec.clusterIPs", ips_value.clone(), "may only hold up to 2 values"));
    }
    // Further checks would only repeat the bad IPs.
    if has_invalid_ips {
        return errors;
    }

    if cluster_ips.len() > 1 {
        let has = |family| cluster_ips.iter().any(|ip| family_of(ip) == Some(family));
        if !(has(IpFamily::IPv4) && has(IpFamily::IPv6)) {
            errors.push(invalid(
                "spec.clusterIPs",
                ips_value,
                "may specify no more than one IP for each IP family",
            ));
        }
    }

    let headless = cluster_ips.len() == 1 && cluster_ips[0] == NONE;
    if !headless {
        for (index, (ip, family)) in cluster_ips.iter().zip(&service.ip_families).enumerate() {
            let is_v6 = family_of(ip) == Some(IpFamily::IPv6);
            let detail = match family.as_str() {
                "IPv4" if is_v6 => "IPv4",
                "IPv6" if !is_v6 => "IPv6",
                _ => continue,
            };
            errors.push(invalid(
                &format!("spec.clusterIPs[{index}]"),
                quote(ip),
                &format!("expected an {detail} value as indicated by `ipFamilies[{index}]`"),
            ));
        }
    }
    errors
}

/// Upstream's strict IP format checks (`parseIP` with strict validation).
fn ip_format_errors(text: &str) -> Vec<&'static str> {
    match text.parse::<IpAddr>() {
        Ok(IpAddr::V6(v6)) if v6.to_ipv4_mapped().is_some() => {
            vec!["must not be an IPv4-mapped IPv6 address"]
        }
        Ok(_) => Vec::new(),
        // Go's sloppy parser accepts leading zeros that the strict one (and
        // Rust's) refuses; tell the two failures apart.
        Err(_) if strip_leading_zeros(text).parse::<IpAddr>().is_ok() => {
            vec!["must not have leading 0s"]
        }
        Err(_) => vec!["must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)"],
    }
}

/// `010.001.2.3` -> `10.1.2.3`; anything else unchanged.
fn strip_leading_zeros(text: &str) -> String {
    if !text.contains('.') || text.contains(':') {
        return text.to_owned();
    }
    text.split('.')
        .map(|octet| {
            let trimmed = octet.trim_start_matches('0');
            if trimmed.is_empty() && !octet.is_empty() { "0" } else { trimmed }
        })
        .collect::<Vec<_>>()
        .join(".")
}

/// A valid IP, IPv4-mapped IPv6 excluded (pre-validation already refused it).
fn parse_ip(text: &str) -> Option<IpAddr> {
    text.parse().ok()
}

/// The family of a textual IP, `None` if it does not parse.
fn family_of(text: &str) -> Option<IpFamily> {
    parse_ip(text).map(IpFamily::of)
}

fn invalid(field: &str, value: String, detail: &str) -> FieldError {
    FieldError { field: field.to_owned(), kind: FieldErrorKind::Invalid, value, detail: detail.to_owned() }
}

/// A Go-quoted / JSON string (the two agree for the values seen here).
fn quote(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A string slice as JSON, as Go renders slice values in field errors.
fn json_list(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|item| quote(item)).collect();
    format!("[{}]", quoted.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;
    use IpFamily::{IPv4, IPv6};

    fn mk_service() -> ServiceIpFields {
        ServiceIpFields { has_selector: true, ..ServiceIpFields::default() }
    }

    fn with_ips(ips: &[&str]) -> ServiceIpFields {
        ServiceIpFields {
            cluster_ip: ips[0].to_owned(),
            cluster_ips: ips.iter().map(|ip| ip.to_string()).collect(),
            ..mk_service()
        }
    }

    fn with_families(families: &[&str]) -> ServiceIpFields {
        ServiceIpFields { ip_families: families.iter().map(|f| f.to_string()).collect(), ..mk_service() }
    }

    fn with_policy(policy: &str) -> ServiceIpFields {
        ServiceIpFields { ip_family_policy: Some(policy.to_owned()), ..mk_service() }
    }

    fn error(service: &ServiceIpFields, cluster: &[IpFamily]) -> String {
        plan_ip_families(service, cluster).unwrap_err().to_string()
    }

    #[test]
    fn require_dual_stack_on_single_stack_cluster_names_the_policy_field() {
        let err = plan_ip_families(&with_policy("RequireDualStack"), &[IPv4]).unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"spec.ipFamilyPolicy: Invalid value: "RequireDualStack": this cluster is not configured for dual-stack services"#
        );
        assert_eq!(
            err.message_for("web"),
            r#"Service "web" is invalid: spec.ipFamilyPolicy: Invalid value: "RequireDualStack": this cluster is not configured for dual-stack services"#
        );
    }

    #[test]
    fn prefer_dual_stack_follows_the_requested_family_order() {
        let mut service = with_policy("PreferDualStack");
        service.ip_families = vec!["IPv6".into()];
        let plan = plan_ip_families(&service, &[IPv4, IPv6]).unwrap();
        assert_eq!(plan.families, vec![IPv6, IPv4]);
        assert_eq!(plan.requested_ips, vec![None, None]);
        let single = plan_ip_families(&with_policy("PreferDualStack"), &[IPv6]).unwrap();
        assert_eq!(single.families, vec![IPv6]);
    }

    #[test]
    fn cluster_ip_alone_is_normalised_and_requested() {
        let service = ServiceIpFields { cluster_ip: "10.0.0.10".into(), ..mk_service() };
        let plan = plan_ip_families(&service, &[IPv4, IPv6]).unwrap();
        assert_eq!(plan.families, vec![IPv4]);
        assert_eq!(plan.requested_ips, vec![Some("10.0.0.10".parse().unwrap())]);
    }

    #[test]
    fn headless_with_selector_allocates_nothing() {
        let plan = plan_ip_families(&with_ips(&["None"]), &[IPv4, IPv6]).unwrap();
        assert!(plan.headless);
        assert_eq!(plan.families, vec![IPv4]);
        assert!(plan.requested_ips.is_empty());
    }

    // The cases of upstream TestCreateInvalidClusterIPInputs, with the
    // substrings it expects.
    #[test]
    fn invalid_inputs_match_upstream_wording() {
        let cases: Vec<(ServiceIpFields, &[IpFamily], &[&str])> = vec![
            (with_policy("garbage"), &[IPv4], &["Unsupported value"]),
            (with_policy("RequireDualStack"), &[IPv4], &["cluster is not configured for dual-stack"]),
            (with_families(&["garbage"]), &[IPv4], &["Unsupported value"]),
            (with_families(&["IPv4", "garbage"]), &[IPv4], &["Unsupported value"]),
            (with_families(&["IPv4", "IPv6", "garbage"]), &[IPv4, IPv6], &["Unsupported value"]),
            (with_families(&["IPv6"]), &[IPv4], &["not configured on this cluster"]),
            (with_families(&["IPv4", "IPv6"]), &[IPv4], &["when multiple IP families are specified"]),
            (with_families(&["IPv4", "IPv4"]), &[IPv4], &["Duplicate value"]),
            (with_families(&["IPv4", "IPv6", "IPv6"]), &[IPv4, IPv6], &["Duplicate value"]),
            (with_ips(&["garbage"]), &[IPv4], &["must be a valid IP"]),
            (with_ips(&["2000::1"]), &[IPv4], &["not configured on this cluster"]),
            (
                ServiceIpFields { ip_families: vec!["IPv4".into()], ..with_ips(&["2000::1"]) },
                &[IPv4],
                &["expected an IPv4 value as indicated"],
            ),
            (with_ips(&["10.0.0.1", "10.0.0.2"]), &[IPv4], &["no more than one IP for each IP family"]),
            (with_ips(&["10.0.0.1", "2000::1", "10.0.0.2"]), &[IPv4, IPv6], &["only hold up to 2 values"]),
            (with_ips(&["10.0.0.1", "10.0.0.1"]), &[IPv4], &["no more than one IP for each IP family"]),
            (with_ips(&["10.0.0.1", "None"]), &[IPv4], &["must be a valid IP"]),
        ];
        for (service, cluster, expect) in cases {
            let message = error(&service, cluster);
            for want in expect {
                assert!(message.contains(want), "{service:?}: {message:?} lacks {want:?}");
            }
        }
        // empty_IP: clusterIPs [""] with clusterIP "" (SetClusterIPs("")).
        let empty = with_ips(&[""]);
        let message = error(&empty, &[IPv4]);
        assert!(message.contains("must be empty when"), "{message}");
        assert!(message.contains("must be a valid IP"), "{message}");
    }

    #[test]
    fn several_errors_render_as_a_bracketed_list() {
        let message = error(&with_ips(&["10.0.0.1", "2000::1"]), &[IPv4]);
        assert_eq!(
            message,
            r#"[spec.ipFamilyPolicy: Invalid value: "SingleStack": must be 'RequireDualStack' or 'PreferDualStack' when multiple cluster IPs are specified, spec.clusterIPs[1]: Invalid value: ["10.0.0.1","2000::1"]: IPv6 is not configured on this cluster]"#
        );
    }

    #[test]
    fn strict_ip_validation_messages() {
        assert!(error(&with_ips(&["010.0.0.1"]), &[IPv4]).contains("must not have leading 0s"));
        assert!(
            error(&with_ips(&["::ffff:10.0.0.1"]), &[IPv4])
                .contains("must not be an IPv4-mapped IPv6 address")
        );
    }
}
