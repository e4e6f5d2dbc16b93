//! The shipped manifests against a real kube-apiserver:
//! - each role of svcplane runs with nothing but the manifests' RBAC (a
//!   ServiceAccount token, no admin) and does its real work with no denial in its
//!   log: the controllers write slices and Endpoints and take the Lease; the
//!   webhook makes the shared CA, sets the caBundle and allocates; the repair loop
//!   leads, adopts, releases and publishes a Warning Event;
//! - the rules are least-privilege (no wildcards; of Secrets only the webhook's
//!   CA, which it may create and read by name);
//! - `kubectl kustomize manifests/base` is accepted by server-side dry-run and
//!   matches the committed manifests/rendered/svcplane.yaml.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use k8s_openapi::api::{
    authentication::v1::{TokenRequest, TokenRequestSpec},
    coordination::v1::Lease,
    core::v1::{
        EndpointAddress, EndpointPort, EndpointSubset, Endpoints, Namespace, Secret, Service, ServiceAccount,
        ServicePort, ServiceSpec,
    },
    discovery::v1::EndpointSlice,
    rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding},
};
use kube::{
    Api, Client, Resource,
    api::{ListParams, PostParams},
    core::ObjectMeta,
};
use serde::{Serialize, de::DeserializeOwned};
use svcplane_e2e::{
    KubeconfigAuth, TestNamespace, bin_dir,
    fixtures::{ensure_node, labels, mk_pod},
    shared,
    slices::{SVCPLANE, SVCPLANE_MIRROR, slices_of},
    svcplane::Svcplane,
    wait::eventually,
    webhook,
};
use svcplane_webhook::{AllocationClaim, Owner, Value, claim::build_claim};

const NAMESPACE: &str = "svcplane-system";
const TIMEOUT: Duration = Duration::from_secs(30);

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The documents of manifests/rendered/svcplane.yaml.
fn rendered_documents() -> Vec<serde_yaml::Value> {
    let path = repo_root().join("manifests/rendered/svcplane.yaml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| serde_yaml::Value::deserialize(doc).expect("YAML document"))
        .filter(|doc| !doc.is_null())
        .collect()
}

use serde::Deserialize as _;

/// Every rendered object of `kind`, typed.
fn objects_of<K: DeserializeOwned>(kind: &str) -> Vec<K> {
    rendered_documents()
        .into_iter()
        .filter(|doc| doc["kind"].as_str() == Some(kind))
        .map(|doc| serde_yaml::from_value(doc).unwrap_or_else(|e| panic!("{kind}: {e}")))
        .collect()
}

/// Creates `obj` through `api`, tolerating "already exists" (tests share the apiserver).
async fn create<K>(api: &Api<K>, obj: &K)
where
    K: Resource + Clone + DeserializeOwned + Serialize + std::fmt::Debug,
{
    match api.create(&PostParams::default(), obj).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => panic!("create {:?}: {e}", obj.meta().name),
    }
}

/// Applies the manifests' Namespace, ServiceAccount and RBAC with the admin client.
async fn apply_rbac(admin: &Client) {
    for ns in objects_of::<Namespace>("Namespace") {
        create(&Api::all(admin.clone()), &ns).await;
    }
    for sa in objects_of::<ServiceAccount>("ServiceAccount") {
        create(&Api::namespaced(admin.clone(), NAMESPACE), &sa).await;
    }
    for role in objects_of::<ClusterRole>("ClusterRole") {
        create(&Api::all(admin.clone()), &role).await;
    }
    for binding in objects_of::<ClusterRoleBinding>("ClusterRoleBinding") {
        create(&Api::all(admin.clone()), &binding).await;
    }
    for role in objects_of::<Role>("Role") {
        create(&Api::namespaced(admin.clone(), NAMESPACE), &role).await;
    }
    for binding in objects_of::<RoleBinding>("RoleBinding") {
        create(&Api::namespaced(admin.clone(), NAMESPACE), &binding).await;
    }
}

/// A kubeconfig named `name` holding a fresh token of the `svcplane`
/// ServiceAccount of `namespace`.
async fn service_account_kubeconfig(admin: &Client, namespace: &str, name: &str) -> PathBuf {
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: Some(vec!["https://kubernetes.default.svc".into()]),
            expiration_seconds: Some(3600),
            ..Default::default()
        }),
        ..Default::default()
    };
    let token = Api::<ServiceAccount>::namespaced(admin.clone(), namespace)
        .create_token_request("svcplane", &PostParams::default(), &request)
        .await
        .unwrap_or_else(|e| panic!("TokenRequest for {namespace}/svcplane: {e}"))
        .status
        .and_then(|s| s.token)
        .expect("token");
    shared().write_kubeconfig(name, &KubeconfigAuth::Token(token)).expect("write kubeconfig")
}

#[tokio::test]
async fn svcplane_works_with_only_the_manifests_rbac() {
    let admin = shared().client().await;
    apply_rbac(&admin).await;
    let kubeconfig = service_account_kubeconfig(&admin, NAMESPACE, "svcplane-sa").await;
    let leader_ns = format!("--leader-election-namespace={NAMESPACE}");
    let svcplane = shared()
        .svcplane_with_kubeconfig(
            "rbac",
            &kubeconfig,
            &["--controllers=endpointslice,endpoints,mirroring", "--leader-elect", &leader_ns],
        )
        .await;

    ensure_node(&admin, "node-a", "192.0.2.1", Some("zone-a")).await;
    let ns = TestNamespace::new(&admin, "rbac").await;
    let web = Service {
        metadata: ObjectMeta { name: Some("web".into()), ..Default::default() },
        spec: Some(ServiceSpec {
            selector: Some(labels(&[("app", "web")])),
            ports: Some(vec![ServicePort { name: Some("http".into()), port: 80, ..Default::default() }]),
            ..Default::default()
        }),
        ..Default::default()
    };
    ns.create(&web).await;
    ns.running_pod(mk_pod("web-0", &[("app", "web")], "node-a", &[]), &["10.244.1.1"], true).await;
    // Selectorless + hand-written Endpoints: the mirroring controller's path.
    let db = Service {
        metadata: ObjectMeta { name: Some("db".into()), ..Default::default() },
        spec: Some(ServiceSpec {
            ports: Some(vec![ServicePort { name: Some("sql".into()), port: 5432, ..Default::default() }]),
            ..Default::default()
        }),
        ..Default::default()
    };
    ns.create(&db).await;
    ns.create(&Endpoints {
        metadata: ObjectMeta { name: Some("db".into()), ..Default::default() },
        subsets: Some(vec![EndpointSubset {
            addresses: Some(vec![EndpointAddress { ip: "192.0.2.50".into(), ..Default::default() }]),
            ports: Some(vec![EndpointPort { name: Some("sql".into()), port: 5432, ..Default::default() }]),
            ..Default::default()
        }]),
    })
    .await;

    let slices = ns.api::<EndpointSlice>();
    eventually("svcplane's slice for web", TIMEOUT, || {
        let slices = slices.clone();
        async move {
            let found = format!("{:?}", slices_of(&slices, "web", SVCPLANE).await);
            if found.contains("10.244.1.1") { Ok(()) } else { Err(found) }
        }
    })
    .await;
    eventually("the mirrored slice for db", TIMEOUT, || {
        let slices = slices.clone();
        async move {
            let found = format!("{:?}", slices_of(&slices, "db", SVCPLANE_MIRROR).await);
            if found.contains("192.0.2.50") { Ok(()) } else { Err(found) }
        }
    })
    .await;
    let endpoints = ns.api::<Endpoints>();
    eventually("the legacy Endpoints of web", TIMEOUT, || {
        let endpoints = endpoints.clone();
        async move {
            let found = format!("{:?}", endpoints.get_opt("web").await);
            if found.contains("10.244.1.1") { Ok(()) } else { Err(found) }
        }
    })
    .await;
    let lease = Api::<Lease>::namespaced(admin.clone(), NAMESPACE).get("svcplane").await.expect("the Lease");
    let holder = lease.spec.and_then(|s| s.holder_identity).unwrap_or_default();
    // `POD_NAME_<per-process suffix>`.
    assert_eq!(holder.split('_').next(), Some("svcplane-rbac"), "holder {holder}");

    worked_without_denial(&svcplane, &["caches synced", "leading: starting workers"]).await;

    // Least privilege, seen from the ServiceAccount itself.
    let sa = Client::try_from(
        kube::Config::from_custom_kubeconfig(
            kube::config::Kubeconfig::read_from(&kubeconfig).expect("kubeconfig"),
            &Default::default(),
        )
        .await
        .expect("config"),
    )
    .expect("client");
    // The webhook's shared CA: the first call creates the Secret, the second
    // (another replica) gets 409 and reads the same CA.
    let names = ["127.0.0.1".to_owned()];
    let ca_secret = svcplane_webhook::DEFAULT_CA_SECRET;
    let (first, _) = svcplane_webhook::tls::self_signed_from_shared_ca(&sa, NAMESPACE, ca_secret, &names)
        .await
        .expect("create or read the CA Secret with the manifests' RBAC");
    let (second, _) = svcplane_webhook::tls::self_signed_from_shared_ca(&sa, NAMESPACE, ca_secret, &names)
        .await
        .expect("read the CA Secret with the manifests' RBAC");
    assert_eq!(first, second, "one CA for every replica");
    let denied = Api::<Secret>::namespaced(sa.clone(), NAMESPACE).list(&ListParams::default()).await;
    assert!(
        matches!(denied, Err(kube::Error::Api(ref e)) if e.code == 403),
        "listing Secrets must be denied: {denied:?}"
    );
    let denied = Api::<Secret>::namespaced(sa.clone(), NAMESPACE).get_opt("another-secret").await;
    assert!(
        matches!(denied, Err(kube::Error::Api(ref e)) if e.code == 403),
        "reading another Secret must be denied: {denied:?}"
    );
    let denied = Api::<Lease>::namespaced(sa, "default").get_opt("svcplane").await;
    assert!(matches!(denied, Err(kube::Error::Api(ref e)) if e.code == 403), "Leases elsewhere: {denied:?}");
}

/// Waits until `svcplane`'s log shows each of `proofs` (lines of the work its role
/// did), then checks that no line is an RBAC denial. A missing or empty log
/// proves nothing and fails.
async fn worked_without_denial(svcplane: &Svcplane, proofs: &[&str]) {
    let path = svcplane.log.display();
    let log = eventually(&format!("{proofs:?} in {path}"), TIMEOUT, || async {
        let log = std::fs::read_to_string(&svcplane.log).map_err(|e| e.to_string())?;
        let missing: Vec<&&str> = proofs.iter().filter(|p| !log.contains(**p)).collect();
        if missing.is_empty() && !log.is_empty() { Ok(log) } else { Err(format!("missing {missing:?}")) }
    })
    .await;
    let denials: Vec<&str> = log.lines().filter(|l| l.to_lowercase().contains("forbidden")).collect();
    assert!(denials.is_empty(), "RBAC denials in {path}: {denials:#?}");
}

/// The webhook role, self-signed as the Deployment runs it, with the manifests'
/// RBAC: it creates or reads the shared CA Secret, writes the caBundle of the
/// configurations named `svcplane` (the only ones it may touch), builds its index
/// from claims, Services and ServiceCIDRs, and allocates for a real create.
#[tokio::test]
async fn the_webhook_role_allocates_with_only_the_manifests_rbac() {
    let admin = shared().client().await;
    apply_rbac(&admin).await;
    webhook::install_crd(&admin).await;
    let scope = "rbac-webhook";
    let ns = webhook::scoped_namespace(&admin, scope, scope).await;
    let addr = webhook::free_loopback_addr();
    // Named as in manifests/base, scoped to the test's namespace; registered with
    // the test CA, which the webhook must replace with its own.
    webhook::register(&admin, shared(), "svcplane", addr, scope).await;
    let kubeconfig = service_account_kubeconfig(&admin, NAMESPACE, "svcplane-webhook-sa").await;
    let flags = [
        "--roles=webhook".to_owned(),
        format!("--webhook-bind-address={addr}"),
        "--webhook-self-signed".to_owned(),
        "--webhook-self-signed-names=127.0.0.1".to_owned(),
        "--webhook-mutating-configuration=svcplane".to_owned(),
        "--webhook-validating-configuration=svcplane".to_owned(),
        format!("--webhook-ca-secret-namespace={NAMESPACE}"),
    ];
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let svcplane = shared().svcplane_with_kubeconfig("rbac-webhook", &kubeconfig, &flags).await;
    webhook::wait_process_webhook_active(&ns, &svcplane).await;

    let web = ns.create(&webhook::mk_service("web", "NodePort", &[(80, None)])).await;
    let values = svcplane_webhook::admit::service_values(&web);
    assert_eq!(values.len(), 2, "a ClusterIP and a NodePort: {values:?}");
    let claims = Api::<AllocationClaim>::all(admin.clone());
    for value in values {
        // With blocks on, written right after the answer: poll.
        let claim = eventually(&format!("the claim of {value}"), Duration::from_secs(10), || async {
            claims.get(&value.claim_name()).await.map_err(|e| e.to_string())
        })
        .await;
        assert_eq!((claim.spec.namespace, claim.spec.service), (ns.name.clone(), "web".to_owned()));
    }
    assert!(svcplane.metric_sum("svcplane_webhook_allocations_total", &[]).await >= 2.0);
    worked_without_denial(&svcplane, &["set caBundle to the shared CA", "webhook serving"]).await;
}

/// The repair role as the Deployment runs it (only the Lease holder repairs) with
/// the manifests' RBAC, given one finding of each kind it writes for: a value
/// held without a claim (adopted), a claim no Service holds (released after the
/// grace period) and a NodePort outside its pool (a Warning Event on the Service).
#[tokio::test]
async fn the_repair_role_repairs_with_only_the_manifests_rbac() {
    use k8s_openapi::api::events::v1::Event;
    let admin = shared().client().await;
    apply_rbac(&admin).await;
    webhook::install_crd(&admin).await;
    // No webhook serves this namespace: the apiserver allocates.
    let ns = TestNamespace::new(&admin, "rbac-repair").await;
    let held = ns.create(&webhook::mk_service("held", "ClusterIP", &[(80, None)])).await;
    ns.create(&webhook::mk_service("outside", "NodePort", &[(80, Some(32500))])).await;
    let claims = Api::<AllocationClaim>::all(admin.clone());
    let gone = Owner { namespace: ns.name.clone(), name: "deleted-long-ago".into() };
    let leaked = build_claim(Value::Ip("10.96.250.250".parse().expect("IP")), &gone);
    claims.create(&PostParams::default(), &leaked).await.expect("create the leaked claim");

    let kubeconfig = service_account_kubeconfig(&admin, NAMESPACE, "svcplane-repair-sa").await;
    let leader_ns = format!("--leader-election-namespace={NAMESPACE}");
    let flags = [
        "--roles=repair",
        "--leader-elect",
        &leader_ns,
        // Its own Lease: the controller test holds `svcplane` meanwhile.
        "--leader-election-id=svcplane-rbac-repair",
        "--webhook-repair-interval=1s",
        // Longer than any admission-to-persist time of the other tests' Services.
        "--webhook-repair-grace=5s",
        // 32500 is outside: an out-of-range finding.
        "--webhook-node-port-range=30000-32000",
    ];
    let svcplane = shared().svcplane_with_kubeconfig("rbac-repair", &kubeconfig, &flags).await;

    let ip = held.spec.and_then(|s| s.cluster_ip).expect("held's ClusterIP");
    let adopted = Value::Ip(ip.parse().expect("IP")).claim_name();
    eventually("held's ClusterIP adopted", TIMEOUT, || async {
        match claims.get_opt(&adopted).await {
            Ok(Some(claim)) if claim.spec.service == "held" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let leaked = leaked.metadata.name.expect("name");
    eventually("the leaked claim released", TIMEOUT, || async {
        match claims.get_opt(&leaked).await {
            Ok(None) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let events = ns.api::<Event>();
    eventually("a PortOutOfRange Event on outside", TIMEOUT, || async {
        let events = events.list(&ListParams::default()).await.map_err(|e| e.to_string())?.items;
        let on_outside = |e: &Event| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("outside");
        match events.iter().find(|e| e.reason.as_deref() == Some("PortOutOfRange") && on_outside(e)) {
            Some(_) => Ok(()),
            None => Err(format!("{events:?}")),
        }
    })
    .await;
    let proofs = [
        "leading: starting the IPAM repair loop",
        "adopted a value held without a claim",
        "released a claim no Service holds",
    ];
    worked_without_denial(&svcplane, &proofs).await;
}

#[test]
fn rbac_rules_name_every_verb_resource_and_group() {
    let mut rules = Vec::new();
    for role in objects_of::<ClusterRole>("ClusterRole") {
        rules.extend(role.rules.unwrap_or_default());
    }
    for role in objects_of::<Role>("Role") {
        rules.extend(role.rules.unwrap_or_default());
    }
    assert!(!rules.is_empty());
    for rule in &rules {
        let words =
            rule.verbs.iter().chain(rule.resources.iter().flatten()).chain(rule.api_groups.iter().flatten());
        assert!(words.clone().all(|w| w != "*" && !w.contains('*')), "wildcard in {rule:?}");
        assert!(rule.non_resource_urls.is_none(), "{rule:?}");
    }
    let verbs_on = |resource: &str| -> Vec<String> {
        let mut verbs: Vec<String> = rules
            .iter()
            .filter(|r| r.resources.iter().flatten().any(|x| x == resource))
            .flat_map(|r| r.verbs.clone())
            .collect();
        verbs.sort();
        verbs.dedup();
        verbs
    };
    assert_eq!(verbs_on("pods"), ["list", "watch"]);
    assert_eq!(verbs_on("nodes"), ["list", "watch"]);
    assert_eq!(verbs_on("endpointslices"), ["create", "delete", "list", "update", "watch"]);
    assert_eq!(verbs_on("leases"), ["create", "get", "patch", "update"]);
    // Secrets: create the webhook's CA (create cannot be limited by name) and
    // get that one Secret only.
    assert_eq!(verbs_on("secrets"), ["create", "get"]);
    for rule in rules.iter().filter(|r| r.resources.iter().flatten().any(|x| x == "secrets")) {
        if rule.verbs.iter().any(|v| v == "get") {
            assert_eq!(
                rule.resource_names.as_deref(),
                Some(&["svcplane-webhook-ca".to_owned()][..]),
                "{rule:?}"
            );
        }
    }
    assert!(verbs_on("configmaps").is_empty());
}

fn kubectl() -> PathBuf {
    let kubectl = bin_dir().join("kubectl");
    assert!(kubectl.is_file(), "{} missing: run e2e/controlplane/build.sh --with-kubectl", kubectl.display());
    kubectl
}

fn kustomize(dir: &str) -> String {
    let out = Command::new(kubectl())
        .args(["kustomize", &repo_root().join(dir).display().to_string()])
        .output()
        .expect("kubectl kustomize");
    assert!(out.status.success(), "kustomize {dir}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn server_dry_run(yaml: &str) -> (bool, String) {
    use std::io::Write as _;
    let mut child = Command::new(kubectl())
        .args(["apply", "--server-side", "--dry-run=server", "--field-manager=svcplane-e2e", "-f", "-"])
        .arg(format!("--kubeconfig={}", shared().kubeconfig_path.display()))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl apply");
    child.stdin.take().expect("stdin").write_all(yaml.as_bytes()).expect("write manifests");
    let out = child.wait_with_output().expect("kubectl apply");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

#[tokio::test]
async fn kustomize_output_is_accepted_by_server_side_dry_run_and_matches_rendered() {
    let rendered =
        std::fs::read_to_string(repo_root().join("manifests/rendered/svcplane.yaml")).expect("rendered");
    assert_eq!(
        kustomize("manifests/base"),
        rendered,
        "manifests/rendered/svcplane.yaml is stale: run `kubectl kustomize manifests/base > manifests/rendered/svcplane.yaml`"
    );
    // Dry-run creates nothing, so namespaced objects need their Namespace for real.
    let admin = shared().client().await;
    for ns in objects_of::<Namespace>("Namespace") {
        create(&Api::all(admin.clone()), &ns).await;
    }
    // The webhook configurations point at a Service that does not answer: a
    // dry-run never calls them (and they do not match their own kinds).
    for dir in [
        "manifests/base",
        "manifests/overlays/controller-only",
        "manifests/overlays/kind",
        "manifests/overlays/local",
    ] {
        let (ok, output) = server_dry_run(&kustomize(dir));
        assert!(ok, "{dir} rejected by the apiserver:\n{output}");
        assert!(output.contains("(server dry run)"), "{output}");
    }
    // cert-manager's own kinds need cert-manager; everything else of that overlay
    // is checked, and its Certificate names the Secret the Deployment mounts.
    let cert_manager = kustomize("manifests/overlays/cert-manager");
    let (ours, theirs): (Vec<&str>, Vec<&str>) =
        cert_manager.split("\n---\n").partition(|doc| !doc.contains("apiVersion: cert-manager.io/"));
    assert_eq!(theirs.len(), 4, "two Issuers and two Certificates:\n{cert_manager}");
    assert!(theirs.iter().any(|d| d.contains("secretName: svcplane-webhook-tls")));
    assert!(
        ours.iter().any(|d| d.contains("secretName: svcplane-webhook-tls") && d.contains("kind: Deployment"))
    );
    assert!(!cert_manager.contains("--webhook-self-signed"), "cert-manager overlay still self-signs");
    let (ok, output) = server_dry_run(&ours.join("\n---\n"));
    assert!(ok, "overlays/cert-manager rejected by the apiserver:\n{output}");
}

#[tokio::test]
async fn examples_are_accepted_by_server_side_dry_run() {
    let admin = shared().client().await;
    let demo = Namespace {
        metadata: ObjectMeta { name: Some("demo".into()), ..Default::default() },
        ..Default::default()
    };
    create(&Api::all(admin), &demo).await;
    let mut yaml = String::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo_root().join("examples"))
        .expect("examples/")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    for file in &files {
        yaml.push_str(&std::fs::read_to_string(file).expect("example"));
        yaml.push_str("\n---\n");
    }
    assert!(files.len() >= 5, "{files:?}");
    let (ok, output) = server_dry_run(&yaml);
    assert!(ok, "examples rejected by the apiserver:\n{output}");
    for object in [
        "service/web",
        "service/web-nodeport",
        "service/zk",
        "statefulset.apps/zk",
        "service/external-db",
        "endpoints/external-db",
        "service/docs",
    ] {
        assert!(output.contains(object), "{object} missing from:\n{output}");
    }
}

// ---- manifests/overlays/shadow (issue 16) ---------------------------------------

const SHADOW_NAMESPACE: &str = "svcplane-shadow";

/// The objects of a rendered overlay, by kind.
fn overlay_objects<K: DeserializeOwned>(yaml: &str, kind: &str) -> Vec<K> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|doc| serde_yaml::Value::deserialize(doc).expect("YAML document"))
        .filter(|doc| doc["kind"].as_str() == Some(kind))
        .map(|doc| serde_yaml::from_value(doc).unwrap_or_else(|e| panic!("{kind}: {e}")))
        .collect()
}

/// Whether `user` may `verb` `resource` (of `group`) in `namespace`, as the
/// apiserver's authorizer answers a SubjectAccessReview.
async fn allowed(
    admin: &Client,
    user: &str,
    verb: &str,
    group: &str,
    resource: &str,
    namespace: &str,
) -> bool {
    use k8s_openapi::api::authorization::v1::{
        ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
    };
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(user.to_owned()),
            groups: Some(vec!["system:serviceaccounts".into(), "system:authenticated".into()]),
            resource_attributes: Some(ResourceAttributes {
                verb: Some(verb.to_owned()),
                group: Some(group.to_owned()),
                resource: Some(resource.to_owned()),
                namespace: (!namespace.is_empty()).then(|| namespace.to_owned()),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let answer = Api::<SubjectAccessReview>::all(admin.clone())
        .create(&PostParams::default(), &review)
        .await
        .unwrap_or_else(|e| panic!("SubjectAccessReview {verb} {resource}: {e}"));
    answer.status.is_some_and(|s| s.allowed)
}

/// Whether a log line (text or `--log-format=json`) has `field` = `value`.
fn has_field(line: &str, field: &str, value: &str) -> bool {
    line.contains(&format!("\"{field}\":\"{value}\"")) || line.contains(&format!("{field}={value} "))
}

/// The shadow overlay runs `svcplane run --migration=shadow` (its own flags) with
/// nothing but its own RBAC: every controller compares, and the ServiceAccount
/// can read what they read and write nothing they could write.
#[tokio::test]
async fn the_shadow_overlay_reads_what_shadow_mode_needs_and_can_write_nothing() {
    let admin = shared().client().await;
    let yaml = kustomize("manifests/overlays/shadow");
    for ns in overlay_objects::<Namespace>(&yaml, "Namespace") {
        create(&Api::all(admin.clone()), &ns).await;
    }
    let (ok, output) = server_dry_run(&yaml);
    assert!(ok, "overlays/shadow rejected by the apiserver:\n{output}");
    for kind in
        ["MutatingWebhookConfiguration", "ValidatingWebhookConfiguration", "Role", "RoleBinding", "Lease"]
    {
        assert!(!yaml.contains(&format!("kind: {kind}\n")), "overlays/shadow has a {kind}:\n{yaml}");
    }
    for sa in overlay_objects::<ServiceAccount>(&yaml, "ServiceAccount") {
        create(&Api::namespaced(admin.clone(), SHADOW_NAMESPACE), &sa).await;
    }
    for role in overlay_objects::<ClusterRole>(&yaml, "ClusterRole") {
        create(&Api::all(admin.clone()), &role).await;
    }
    for binding in overlay_objects::<ClusterRoleBinding>(&yaml, "ClusterRoleBinding") {
        create(&Api::all(admin.clone()), &binding).await;
    }

    // Least privilege, as the authorizer answers for the overlay's ServiceAccount.
    let user = format!("system:serviceaccount:{SHADOW_NAMESPACE}:svcplane");
    for (group, resource) in [
        ("", "services"),
        ("", "pods"),
        ("", "nodes"),
        ("", "endpoints"),
        ("discovery.k8s.io", "endpointslices"),
    ] {
        for verb in ["list", "watch"] {
            assert!(allowed(&admin, &user, verb, group, resource, "").await, "{verb} {resource} denied");
        }
    }
    for (group, resource) in [("", "endpoints"), ("discovery.k8s.io", "endpointslices")] {
        for verb in ["create", "update", "patch", "delete", "deletecollection"] {
            assert!(
                !allowed(&admin, &user, verb, group, resource, "default").await,
                "{verb} {resource} allowed"
            );
        }
    }
    for (group, resource, namespace) in [
        ("events.k8s.io", "events", "default"),
        ("", "events", "default"),
        ("coordination.k8s.io", "leases", SHADOW_NAMESPACE),
        ("", "secrets", SHADOW_NAMESPACE),
    ] {
        for verb in ["get", "create", "update", "patch"] {
            assert!(
                !allowed(&admin, &user, verb, group, resource, namespace).await,
                "{verb} {resource} allowed"
            );
        }
    }

    // svcplane with the overlay's own flags and that ServiceAccount's token.
    let deployment = overlay_objects::<k8s_openapi::api::apps::v1::Deployment>(&yaml, "Deployment");
    let args: Vec<String> = deployment
        .iter()
        .flat_map(|d| d.spec.template.spec.iter().flat_map(|s| s.containers.iter()))
        .flat_map(|c| c.args.clone().unwrap_or_default())
        // `run` and the addresses come from the harness.
        .filter(|a| a != "run" && !a.contains("-bind-address="))
        .collect();
    assert!(args.iter().any(|a| a == "--migration=shadow"), "{args:?}");
    assert!(!args.iter().any(|a| a.starts_with("--leader-elect")), "{args:?}");
    let kubeconfig = service_account_kubeconfig(&admin, SHADOW_NAMESPACE, "svcplane-shadow-sa").await;
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let svcplane = shared().svcplane_with_kubeconfig("shadow-rbac", &kubeconfig, &args).await;

    // One Service per controller; no kube-controller-manager runs here, so each
    // differs, which the log names once per Service and controller.
    ensure_node(&admin, "node-a", "192.0.2.1", Some("zone-a")).await;
    let ns = TestNamespace::new(&admin, "shadow-rbac").await;
    use svcplane_e2e::fixtures::{mk_port, mk_service};
    ns.create(&mk_service("web", &[("app", "web")], vec![mk_port("http", 80, "8080")])).await;
    ns.running_pod(mk_pod("web-0", &[("app", "web")], "node-a", &[]), &["10.244.9.1"], true).await;
    ns.create(&mk_service("db", &[], vec![mk_port("sql", 5432, "5432")])).await;
    let address = EndpointAddress { ip: "192.0.2.60".into(), ..Default::default() };
    let port = EndpointPort { name: Some("sql".into()), port: 5432, ..Default::default() };
    let subset =
        EndpointSubset { addresses: Some(vec![address]), ports: Some(vec![port]), ..Default::default() };
    let metadata = ObjectMeta { name: Some("db".into()), ..Default::default() };
    ns.create(&Endpoints { metadata, subsets: Some(vec![subset]) }).await;
    let log = svcplane.log.clone();
    let wanted = [
        ("endpointslice", format!("{}/web", ns.name)),
        ("endpoints", format!("{}/web", ns.name)),
        ("mirroring", format!("{}/db", ns.name)),
    ];
    eventually("a shadow verdict from each controller in the log", TIMEOUT, || {
        let (log, wanted) = (log.clone(), &wanted);
        async move {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().filter(|l| l.contains("shadow: svcplane")).collect();
            let missing: Vec<_> = wanted
                .iter()
                .filter(|(c, key)| {
                    !lines.iter().any(|l| has_field(l, "controller", c) && has_field(l, "service", key))
                })
                .collect();
            if missing.is_empty() { Ok(()) } else { Err(format!("missing {missing:?} in {lines:?}")) }
        }
    })
    .await;
    assert!(svcplane.metric_sum("svcplane_shadow_services", &["agreement=\"differs\""]).await >= 3.0);
    assert_eq!(svcplane.metric_sum("svcplane_changes_total", &[]).await, 0.0, "shadow mode wrote");
    worked_without_denial(&svcplane, &["shadow: svcplane"]).await;
    let slices = ns.api::<EndpointSlice>();
    for (svc, by) in [("web", SVCPLANE), ("db", SVCPLANE_MIRROR)] {
        assert!(
            slices_of(&slices, svc, by).await.is_empty(),
            "svcplane wrote a slice of {svc} in shadow mode"
        );
    }
}
