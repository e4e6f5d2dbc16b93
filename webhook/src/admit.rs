//! Pure admission logic: what a Service needs (a [`Plan`]), and the JSON
//! patch that writes what was assigned.
//!
//! Input: the operation, the new and old Service, the cluster's IP families.
//! Output: a [`Plan`] (values to claim, static or dynamic) or a [`Denial`]
//! naming the field; then [`build_patch`]. No I/O, no allocator: the handler
//! runs the plan against the allocator (`allocator.rs`).
//!
//! Rules follow kube-apiserver's `alloc.go` (v1.37): ExternalName and
//! headless Services get no IPs; NodePort and LoadBalancer ports get
//! nodePorts unless `allocateLoadBalancerNodePorts: false`; LoadBalancer with
//! `externalTrafficPolicy: Local` gets a healthCheckNodePort. On UPDATE the
//! apiserver copies allocated values forward, so only genuine transitions
//! allocate (ExternalName → other, ClusterIP → NodePort, single → dual stack,
//! new ports) and nothing already held is re-allocated.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Service, ServiceSpec};
use kube::ResourceExt;
use serde_json::{Value as Json, json};
use svcplane_ipam::{
    FieldError, FieldErrorKind, IpFamily, IpFamilyPolicy, NodePortAssignment, NodePortNeeds, Protocol,
    ServiceIpFields, ServicePort, plan_ip_families,
};

use crate::claim::{Owner, Value};

/// Which admission call this is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// The mutating call: fill in missing values.
    Mutate,
    /// The validating call, after every mutation and the apiserver's own
    /// allocation: make sure every new value is claimed for this Service.
    Validate,
}

/// The admission operation (DELETE and CONNECT are not registered).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    /// CREATE.
    Create,
    /// UPDATE.
    Update,
}

/// A refusal, naming the field when there is one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Denial {
    /// `spec.ports[1].nodePort`, or empty for a whole-object problem.
    pub field: String,
    /// What is wrong, e.g. `30080 is already allocated to default/web`.
    pub message: String,
    /// HTTP code reported to the user: 422 for invalid or taken values, 500
    /// when recording the claim failed.
    pub code: u16,
}

impl Denial {
    /// A 422 for `field`.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { field: field.into(), message: message.into(), code: 422 }
    }

    /// A fixed name for metric labels.
    pub fn reason(&self) -> &'static str {
        if self.code >= 500 {
            "StoreError"
        } else if self.message.contains("already allocated") {
            "AlreadyAllocated"
        } else if self.message.contains("is full") {
            "Full"
        } else if self.message.contains("not in range") {
            "NotInRange"
        } else if self.message.contains("no new ClusterIP is allocated") {
            "ServiceCIDRDraining"
        } else {
            "Invalid"
        }
    }
}

impl fmt::Display for Denial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.field, self.message)
        }
    }
}

/// One ClusterIP to claim.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpNeed {
    /// `spec.clusterIPs[i]`: the field a denial names.
    pub field: String,
    /// The family to allocate from.
    pub family: IpFamily,
    /// The IP the user (or the apiserver) set, or `None` to pick one.
    pub requested: Option<IpAddr>,
}

/// The IP fields the patch writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpFields {
    /// IPs the Service keeps, before the newly assigned ones.
    pub kept: Vec<String>,
    /// `spec.ipFamilies`, in `clusterIPs` order.
    pub families: Vec<IpFamily>,
    /// `spec.ipFamilyPolicy`.
    pub policy: IpFamilyPolicy,
}

/// The NodePorts to claim.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortNeeds {
    /// Index into `spec.ports` of each entry of `ports`.
    pub spec_index: Vec<usize>,
    /// The entries needing a nodePort, for ipam's `assign_node_ports`.
    pub ports: Vec<ServicePort>,
    /// Whether to allocate missing nodePorts, and the health check.
    pub needs: NodePortNeeds,
}

/// What one admission call must claim.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Plan {
    /// The Service the values are for.
    pub owner: Owner,
    /// ClusterIPs to claim, in `clusterIPs` order after `ip_fields.kept`.
    pub ips: Vec<IpNeed>,
    /// How to write the IP fields; `None` leaves them alone.
    pub ip_fields: Option<IpFields>,
    /// NodePorts to claim; `None` when there are none.
    pub ports: Option<PortNeeds>,
    /// The mutating call of a CREATE: values this replica claimed for the
    /// same namespace/name in an earlier request that no Service holds (a
    /// create the apiserver rejected after admission, now retried) are
    /// released first, so a retry loop does not drain the pool.
    pub supersede: bool,
    /// The object has no `spec` (the apiserver defaults one, so only a request
    /// from elsewhere lacks it): the patch adds one before writing into it.
    pub add_spec: bool,
    /// The Service's labels, which ServiceIPPools' serviceSelectors match.
    pub labels: BTreeMap<String, String>,
    /// The validating call: its values were set by a mutating call, maybe
    /// another replica's handing them out from its block.
    pub validating: bool,
}

impl Plan {
    /// Whether nothing needs claiming.
    pub fn is_empty(&self) -> bool {
        self.ips.is_empty() && self.ports.is_none()
    }
}

/// What the allocator assigned for a [`Plan`].
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Assigned {
    /// One IP per [`Plan::ips`] entry.
    pub ips: Vec<IpAddr>,
    /// The NodePorts, indexed like [`PortNeeds::ports`].
    pub node_ports: Option<NodePortAssignment>,
}

/// The request as [`plan_admission`] reads it.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    /// CREATE or UPDATE.
    pub operation: Operation,
    /// Mutating or validating call.
    pub mode: Mode,
    /// The request's namespace.
    pub namespace: &'a str,
    /// The new object.
    pub service: &'a Service,
    /// The object before an UPDATE.
    pub old: Option<&'a Service>,
    /// The cluster's families, the default first.
    pub families: &'a [IpFamily],
}

const NONE: &str = "None";

/// Decides what to claim for one admission call.
pub fn plan_admission(request: &Request<'_>) -> Result<Plan, Denial> {
    let meta = &request.service.metadata;
    let name = match (&meta.name, &meta.generate_name) {
        (Some(name), _) if !name.is_empty() => name.clone(),
        (_, Some(prefix)) => format!("{prefix}*"),
        _ => String::new(),
    };
    let owner = Owner { namespace: request.namespace.to_owned(), name };
    let supersede = request.operation == Operation::Create && request.mode == Mode::Mutate;
    let add_spec = request.service.spec.is_none();
    let labels = request.service.labels().clone();
    let validating = request.mode == Mode::Validate;
    let mut plan = Plan { owner, supersede, add_spec, labels, validating, ..Plan::default() };
    let default_spec = ServiceSpec::default();
    let spec = request.service.spec.as_ref().unwrap_or(&default_spec);
    let kind = service_type(spec);
    if kind == "ExternalName" {
        return Ok(plan);
    }
    let old_spec =
        request.old.and_then(|old| old.spec.as_ref()).filter(|old| service_type(old) != "ExternalName");

    plan_ips(request, spec, old_spec, &mut plan)?;
    plan.ports = plan_ports(spec, old_spec, kind);
    Ok(plan)
}

fn plan_ips(
    request: &Request<'_>,
    spec: &ServiceSpec,
    old_spec: Option<&ServiceSpec>,
    plan: &mut Plan,
) -> Result<(), Denial> {
    let old_ips = old_spec.map(cluster_ips).unwrap_or_default();
    if !old_ips.is_empty() {
        // The apiserver copies old IPs forward; only an upgrade to dual
        // stack adds one (the secondary family).
        let new_ips = cluster_ips(spec);
        let dual = matches!(spec.ip_family_policy.as_deref(), Some("PreferDualStack" | "RequireDualStack"));
        let Some(first) = old_ips.first().and_then(|ip| ip.parse::<IpAddr>().ok()) else { return Ok(()) };
        let primary = IpFamily::of(first);
        let secondary = primary.other();
        if old_ips.len() == 1 && dual && request.families.contains(&secondary) {
            let requested: Option<IpAddr> = new_ips.get(1).and_then(|ip| ip.parse().ok());
            // The apiserver validates before it allocates: a second IP of the
            // primary's family is refused, not claimed.
            if requested.is_some_and(|ip| IpFamily::of(ip) != secondary) {
                let error = FieldError {
                    field: "spec.clusterIPs".to_owned(),
                    kind: FieldErrorKind::Invalid,
                    value: json!(new_ips).to_string(),
                    detail: "may specify no more than one IP for each IP family".to_owned(),
                };
                return Err(Denial::invalid("", error.to_string()));
            }
            plan.ips.push(IpNeed { field: "spec.clusterIPs[1]".to_owned(), family: secondary, requested });
            let policy = spec.ip_family_policy.as_deref().and_then(|p| p.parse().ok());
            plan.ip_fields = Some(IpFields {
                kept: vec![old_ips[0].clone()],
                families: vec![primary, secondary],
                policy: policy.unwrap_or(IpFamilyPolicy::PreferDualStack),
            });
        } else if request.mode == Mode::Validate {
            // A value changed after the mutating call must still be claimed.
            for (index, ip) in new_ips.iter().enumerate() {
                if !old_ips.contains(ip)
                    && let Ok(ip) = ip.parse::<IpAddr>()
                {
                    let field = format!("spec.clusterIPs[{index}]");
                    plan.ips.push(IpNeed { field, family: IpFamily::of(ip), requested: Some(ip) });
                }
            }
        }
        return Ok(());
    }
    if spec.cluster_ip.as_deref() == Some(NONE) {
        return Ok(());
    }
    let fields = ServiceIpFields {
        cluster_ip: spec.cluster_ip.clone().unwrap_or_default(),
        cluster_ips: spec.cluster_ips.clone().unwrap_or_default(),
        ip_families: spec.ip_families.clone().unwrap_or_default(),
        ip_family_policy: spec.ip_family_policy.clone(),
        has_selector: spec.selector.as_ref().is_some_and(|s| !s.is_empty()),
    };
    let family_plan = plan_ip_families(&fields, request.families)
        .map_err(|invalid| Denial::invalid("", invalid.to_string()))?;
    if family_plan.headless {
        return Ok(());
    }
    for (index, (family, requested)) in
        family_plan.families.iter().zip(&family_plan.requested_ips).enumerate()
    {
        plan.ips.push(IpNeed {
            field: format!("spec.clusterIPs[{index}]"),
            family: *family,
            requested: *requested,
        });
    }
    plan.ip_fields =
        Some(IpFields { kept: Vec::new(), families: family_plan.families, policy: family_plan.policy });
    Ok(())
}

fn plan_ports(spec: &ServiceSpec, old_spec: Option<&ServiceSpec>, kind: &str) -> Option<PortNeeds> {
    if kind != "NodePort" && kind != "LoadBalancer" {
        return None;
    }
    let allocate = kind == "NodePort" || spec.allocate_load_balancer_node_ports != Some(false);
    let old_needed = old_spec.is_some_and(|old| matches!(service_type(old), "NodePort" | "LoadBalancer"));
    let old_ports = old_spec.and_then(|old| old.ports.clone()).unwrap_or_default();
    let old_values: BTreeSet<i32> =
        old_ports.iter().filter_map(|p| p.node_port).filter(|p| *p != 0).collect();
    // patchAllocatedValues: an omitted nodePort is refilled from the old
    // port of the same name, while both old and new need nodePorts.
    let old_by_name: BTreeMap<String, i32> = old_ports
        .iter()
        .filter_map(|p| Some((p.name.clone().unwrap_or_default(), p.node_port.filter(|n| *n != 0)?)))
        .collect();

    let mut spec_index = Vec::new();
    let mut ports = Vec::new();
    for (index, port) in spec.ports.iter().flatten().enumerate() {
        let requested = match port.node_port.filter(|n| *n != 0) {
            Some(value) if old_values.contains(&value) => continue,
            Some(value) => Some(value),
            None if old_needed
                && allocate
                && old_by_name.contains_key(&port.name.clone().unwrap_or_default()) =>
            {
                continue;
            }
            None if !allocate => continue,
            None => None,
        };
        spec_index.push(index);
        ports.push(ServicePort {
            port: u16::try_from(port.port).unwrap_or(0),
            protocol: protocol(port.protocol.as_deref()),
            // Out-of-u16 values can never be in range: map them to 0, which
            // the allocator reports as not in range.
            requested_node_port: requested.map(|n| u16::try_from(n).unwrap_or(0)),
        });
    }
    let local = kind == "LoadBalancer" && spec.external_traffic_policy.as_deref() == Some("Local");
    let old_health = old_spec
        .filter(|old| {
            service_type(old) == "LoadBalancer" && old.external_traffic_policy.as_deref() == Some("Local")
        })
        .and_then(|old| old.health_check_node_port)
        .filter(|n| *n != 0);
    let health_check = match (local, spec.health_check_node_port.filter(|n| *n != 0)) {
        (false, _) => None,
        (true, Some(value)) if Some(value) == old_health => None,
        (true, Some(value)) => Some(Some(u16::try_from(value).unwrap_or(0))),
        (true, None) if old_health.is_some() => None,
        (true, None) => Some(None),
    };
    if ports.is_empty() && health_check.is_none() {
        return None;
    }
    Some(PortNeeds {
        spec_index,
        ports,
        needs: NodePortNeeds { allocate_node_ports: allocate, health_check },
    })
}

/// Writes the assigned values into the Service, as the apiserver would.
pub fn build_patch(plan: &Plan, assigned: &Assigned) -> json_patch::Patch {
    let mut ops: Vec<Json> = Vec::new();
    if plan.add_spec {
        ops.push(json!({"op": "add", "path": "/spec", "value": {}}));
    }
    if let Some(fields) = &plan.ip_fields {
        let ips: Vec<String> =
            fields.kept.iter().cloned().chain(assigned.ips.iter().map(IpAddr::to_string)).collect();
        if let Some(first) = ips.first() {
            ops.push(json!({"op": "add", "path": "/spec/clusterIP", "value": first}));
        }
        let families: Vec<&str> = fields.families.iter().map(|f| f.as_str()).collect();
        ops.push(json!({"op": "add", "path": "/spec/clusterIPs", "value": ips}));
        ops.push(json!({"op": "add", "path": "/spec/ipFamilies", "value": families}));
        ops.push(json!({"op": "add", "path": "/spec/ipFamilyPolicy", "value": fields.policy.as_str()}));
    }
    if let (Some(needs), Some(ports)) = (&plan.ports, &assigned.node_ports) {
        for (entry, node_port) in needs.spec_index.iter().zip(&ports.node_ports) {
            if let Some(node_port) = node_port {
                ops.push(
                    json!({"op": "add", "path": format!("/spec/ports/{entry}/nodePort"), "value": node_port}),
                );
            }
        }
        if let Some(port) = ports.health_check_node_port {
            ops.push(json!({"op": "add", "path": "/spec/healthCheckNodePort", "value": port}));
        }
    }
    // Every op above is well-formed, so this cannot fail.
    serde_json::from_value(Json::Array(ops)).unwrap_or_default()
}

/// Every value a Service carries: its ClusterIPs, nodePorts and
/// healthCheckNodePort.
pub fn service_values(service: &Service) -> BTreeSet<Value> {
    let external_name = service.spec.as_ref().is_some_and(|spec| service_type(spec) == "ExternalName");
    let values = value_fields(service).into_iter().map(|(value, _)| value);
    values.filter(|value| !(external_name && matches!(value, Value::Ip(_)))).collect()
}

/// The Service a value of `service` belongs to.
pub fn service_owner(service: &Service) -> Owner {
    Owner { namespace: service.namespace().unwrap_or_default(), name: service.name_any() }
}

/// Where each value sits in the Service (`spec.clusterIPs[0]`,
/// `spec.ports[1].nodePort`), for repair Events.
pub fn value_fields(service: &Service) -> Vec<(Value, String)> {
    let mut fields = Vec::new();
    let Some(spec) = &service.spec else { return fields };
    for (index, ip) in cluster_ips(spec).iter().enumerate() {
        if let Ok(ip) = ip.parse() {
            fields.push((Value::Ip(ip), format!("spec.clusterIPs[{index}]")));
        }
    }
    for (index, port) in spec.ports.iter().flatten().enumerate() {
        if let Some(node_port) = port.node_port.and_then(|n| u16::try_from(n).ok()).filter(|n| *n != 0) {
            fields.push((Value::Port(node_port), format!("spec.ports[{index}].nodePort")));
        }
    }
    if let Some(port) = spec.health_check_node_port.and_then(|n| u16::try_from(n).ok()).filter(|n| *n != 0) {
        fields.push((Value::Port(port), "spec.healthCheckNodePort".to_owned()));
    }
    fields
}

fn service_type(spec: &ServiceSpec) -> &str {
    spec.type_.as_deref().unwrap_or("ClusterIP")
}

fn cluster_ips(spec: &ServiceSpec) -> Vec<String> {
    let mut ips = spec.cluster_ips.clone().unwrap_or_default();
    if ips.is_empty()
        && let Some(ip) = spec.cluster_ip.clone()
    {
        ips.push(ip);
    }
    ips.retain(|ip| !ip.is_empty() && ip != NONE);
    ips
}

fn protocol(text: Option<&str>) -> Protocol {
    match text {
        Some("UDP") => Protocol::Udp,
        Some("SCTP") => Protocol::Sctp,
        _ => Protocol::Tcp,
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::ServicePort as K8sPort;
    use kube::core::ObjectMeta;

    use super::*;

    const DUAL: &[IpFamily] = &[IpFamily::IPv4, IpFamily::IPv6];

    fn mk_service(kind: &str, ports: &[(i32, Option<i32>)]) -> Service {
        Service {
            metadata: ObjectMeta { name: Some("web".into()), ..Default::default() },
            spec: Some(ServiceSpec {
                type_: Some(kind.into()),
                selector: Some([("app".to_owned(), "web".to_owned())].into()),
                ports: Some(
                    ports
                        .iter()
                        .map(|(port, node_port)| K8sPort {
                            name: Some(format!("p{port}")),
                            port: *port,
                            node_port: *node_port,
                            ..Default::default()
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn plan(service: &Service, old: Option<&Service>, mode: Mode) -> Result<Plan, Denial> {
        let operation = if old.is_some() { Operation::Update } else { Operation::Create };
        plan_admission(&Request { operation, mode, namespace: "ns", service, old, families: DUAL })
    }

    #[test]
    fn node_port_service_create_needs_one_ip_and_its_ports() {
        let svc = mk_service("NodePort", &[(80, None), (443, Some(30443))]);
        let plan = plan(&svc, None, Mode::Mutate).unwrap();
        assert_eq!(plan.ips.len(), 1);
        assert_eq!(plan.ips[0].family, IpFamily::IPv4);
        let ports = plan.ports.unwrap();
        assert_eq!(ports.ports[1].requested_node_port, Some(30443));
        assert!(ports.needs.allocate_node_ports);
    }

    #[test]
    fn headless_and_external_name_need_nothing() {
        let mut headless = mk_service("ClusterIP", &[(80, None)]);
        headless.spec.as_mut().unwrap().cluster_ip = Some("None".into());
        assert!(plan(&headless, None, Mode::Mutate).unwrap().is_empty());
        let external = mk_service("ExternalName", &[(80, None)]);
        assert!(plan(&external, None, Mode::Mutate).unwrap().is_empty());
    }

    #[test]
    fn load_balancer_local_without_node_ports_needs_only_the_health_check() {
        let mut svc = mk_service("LoadBalancer", &[(80, None)]);
        let spec = svc.spec.as_mut().unwrap();
        spec.allocate_load_balancer_node_ports = Some(false);
        spec.external_traffic_policy = Some("Local".into());
        let ports = plan(&svc, None, Mode::Mutate).unwrap().ports.unwrap();
        assert!(ports.ports.is_empty());
        assert_eq!(ports.needs.health_check, Some(None));
    }

    #[test]
    fn update_keeps_existing_values_and_allocates_only_transitions() {
        let mut old = mk_service("ClusterIP", &[(80, None)]);
        old.spec.as_mut().unwrap().cluster_ips = Some(vec!["10.96.0.10".into()]);
        let mut new = mk_service("NodePort", &[(80, None)]);
        new.spec.as_mut().unwrap().cluster_ips = Some(vec!["10.96.0.10".into()]);
        let plan_up = plan(&new, Some(&old), Mode::Mutate).unwrap();
        assert!(plan_up.ips.is_empty(), "the IP is copied forward");
        assert_eq!(plan_up.ports.unwrap().ports.len(), 1, "ClusterIP -> NodePort allocates");

        let mut old_np = new.clone();
        old_np.spec.as_mut().unwrap().ports.as_mut().unwrap()[0].node_port = Some(30080);
        let reapplied = new.clone();
        assert!(
            plan(&reapplied, Some(&old_np), Mode::Mutate).unwrap().is_empty(),
            "omitted nodePort is copied"
        );
    }

    #[test]
    fn upgrade_to_dual_stack_allocates_the_secondary_family() {
        let mut old = mk_service("ClusterIP", &[(80, None)]);
        old.spec.as_mut().unwrap().cluster_ips = Some(vec!["10.96.0.10".into()]);
        let mut new = old.clone();
        new.spec.as_mut().unwrap().ip_family_policy = Some("PreferDualStack".into());
        let plan = plan(&new, Some(&old), Mode::Mutate).unwrap();
        assert_eq!(plan.ips.len(), 1);
        assert_eq!(plan.ips[0].family, IpFamily::IPv6);
        assert_eq!(plan.ip_fields.unwrap().kept, vec!["10.96.0.10".to_owned()]);
    }

    /// Found by `fuzz_webhook`: the upgrade claimed the primary's IP again as
    /// the secondary and patched `clusterIPs` to the same IP twice.
    #[test]
    fn upgrade_to_dual_stack_refuses_a_second_ip_of_the_primary_family() {
        let mut old = mk_service("ClusterIP", &[(80, None)]);
        old.spec.as_mut().unwrap().cluster_ips = Some(vec!["fd00::3".into()]);
        let mut new = old.clone();
        let spec = new.spec.as_mut().unwrap();
        spec.ip_family_policy = Some("PreferDualStack".into());
        spec.cluster_ips = Some(vec!["10.96.0.3".into(), "fd00::3".into()]);
        let denial = plan(&new, Some(&old), Mode::Mutate).unwrap_err();
        assert_eq!(
            denial.to_string(),
            r#"spec.clusterIPs: Invalid value: ["10.96.0.3","fd00::3"]: may specify no more than one IP for each IP family"#
        );
    }

    #[test]
    fn patch_sets_ip_fields_and_node_ports() {
        let svc = mk_service("NodePort", &[(80, None)]);
        let plan = plan(&svc, None, Mode::Mutate).unwrap();
        let assigned = Assigned {
            ips: vec!["10.96.3.4".parse().unwrap()],
            node_ports: Some(NodePortAssignment {
                node_ports: vec![Some(31000)],
                health_check_node_port: None,
            }),
        };
        let patch = serde_json::to_value(build_patch(&plan, &assigned)).unwrap();
        let text = patch.to_string();
        assert!(text.contains(r#""path":"/spec/clusterIP","value":"10.96.3.4""#), "{text}");
        assert!(text.contains(r#""path":"/spec/ipFamilies","value":["IPv4"]"#), "{text}");
        assert!(text.contains(r#""path":"/spec/ports/0/nodePort","value":31000"#), "{text}");
    }

    /// Found by `fuzz_webhook`: the patch wrote into a `/spec` the object
    /// did not have, so it did not apply.
    #[test]
    fn patch_of_a_service_without_spec_adds_the_spec_first() {
        let svc = Service {
            metadata: ObjectMeta { name: Some("web".into()), ..Default::default() },
            spec: None,
            status: None,
        };
        let plan = plan(&svc, None, Mode::Mutate).unwrap();
        let assigned = Assigned { ips: vec!["10.96.0.11".parse().unwrap()], node_ports: None };
        let mut object = serde_json::to_value(&svc).unwrap();
        json_patch::patch(&mut object, &build_patch(&plan, &assigned)).unwrap();
        assert_eq!(object["spec"]["clusterIPs"], json!(["10.96.0.11"]));
    }

    #[test]
    fn invalid_family_request_is_denied_with_the_apiserver_wording() {
        let mut svc = mk_service("ClusterIP", &[(80, None)]);
        svc.spec.as_mut().unwrap().ip_family_policy = Some("SingleStack".into());
        svc.spec.as_mut().unwrap().ip_families = Some(vec!["IPv4".into(), "IPv6".into()]);
        let denial = plan(&svc, None, Mode::Mutate).unwrap_err();
        assert!(denial.to_string().starts_with("spec.ipFamilyPolicy"), "{denial}");
    }
}
