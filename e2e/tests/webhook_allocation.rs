//! Issue #7: the webhook allocates ClusterIPs and NodePorts for Services on a
//! real kube-apiserver, which calls it over HTTPS on 127.0.0.1.

use std::collections::BTreeSet;
use std::time::Duration;

use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use svcplane_e2e::webhook::*;
use svcplane_e2e::{shared, wait::eventually};
use svcplane_webhook::metrics::AdmissionLabels;
use svcplane_webhook::{Value, WebhookArgs};

fn node_ports(svc: &Service) -> Vec<i32> {
    svc.spec
        .as_ref()
        .and_then(|s| s.ports.clone())
        .unwrap_or_default()
        .iter()
        .filter_map(|p| p.node_port)
        .collect()
}

fn claim_of(value: &str) -> String {
    let value = match value.parse::<std::net::IpAddr>() {
        Ok(ip) => Value::Ip(ip),
        Err(_) => Value::Port(value.parse().expect("port")),
    };
    value.claim_name()
}

async fn repair_until(
    client: &kube::Client,
    args: &WebhookArgs,
    what: &str,
    done: impl Fn(&[String]) -> bool,
) {
    eventually(what, Duration::from_secs(30), || async {
        repair_pass(client, args, &mut args.usage_alerts().expect("thresholds")).await?;
        let names = claim_names(client).await;
        if done(&names) { Ok(()) } else { Err(format!("{} claims", names.len())) }
    })
    .await;
}

#[tokio::test]
async fn node_port_service_gets_its_values_from_the_webhook_and_denials_name_the_holder() {
    let cp = shared();
    let client = cp.client().await;
    install_crd(&client).await;
    let (_certs, mut args) = serving_cert(cp);
    args.block_size = 32;
    let (server, ns) = replica_for_scope(cp, &client, &args, "create").await;

    let mut svc = mk_service("web", "NodePort", &[(53, None), (53, None), (80, None)]);
    let ports = svc.spec.as_mut().and_then(|s| s.ports.as_mut()).expect("ports");
    ports[0].name = Some("dns-tcp".into());
    ports[1].name = Some("dns-udp".into());
    ports[1].protocol = Some("UDP".into());
    let created = ns.create(&svc).await;
    let spec = created.spec.clone().expect("spec");
    let ip = spec.cluster_ip.clone().expect("clusterIP");
    let got = node_ports(&created);
    assert_eq!(got.len(), 3);
    assert_eq!(got[0], got[1], "same port number across protocols shares one nodePort");
    assert_ne!(got[0], got[2]);
    // Dynamic values come from the replica's blocks; their claims are
    // written right after the answer.
    let claims = eventually("a claim for each value", Duration::from_secs(10), || async {
        let claims = claim_names_in(&client, &ns.name).await;
        let values = [ip.clone(), got[0].to_string(), got[2].to_string()];
        match values.iter().find(|value| !claims.contains(&claim_of(value))) {
            Some(missing) => Err(format!("no claim for {missing} in {claims:?}")),
            None => Ok(claims),
        }
    })
    .await;
    assert!(server.metrics.allocations.get() >= 3);
    assert!(server.metrics.block_handouts.get() >= 2, "the IP and the nodePort came from blocks");

    // A user-given nodePort that is taken: the denial names field and holder.
    let taken = mk_service("second", "NodePort", &[(81, None), (82, Some(got[2]))]);
    let err = ns.api::<Service>().create(&PostParams::default(), &taken).await.expect_err("must be denied");
    let text = err.to_string();
    assert!(
        text.contains(&format!("spec.ports[1].nodePort: {} is already allocated to {}/web", got[2], ns.name)),
        "{text}"
    );
    // The denied request left nothing claimed behind.
    let after = claim_names_in(&client, &ns.name).await;
    assert_eq!(after.iter().filter(|c| !claims.contains(c)).count(), 0, "{after:?}");

    // Deletion releases, from the watch.
    ns.api::<Service>().delete("web", &DeleteParams::default()).await.expect("delete");
    eventually("claims released after delete", Duration::from_secs(20), || async {
        let names = claim_names(&client).await;
        if names.contains(&claim_of(&ip)) || names.contains(&claim_of(&got[0].to_string())) {
            Err(names.len())
        } else {
            Ok(())
        }
    })
    .await;
    server.kill();
}

#[tokio::test]
async fn dry_run_reserves_nothing_and_updates_allocate_only_transitions() {
    let cp = shared();
    let client = cp.client().await;
    install_crd(&client).await;
    let (_certs, args) = serving_cert(cp);
    let (server, ns) = replica_for_scope(cp, &client, &args, "update").await;
    let api: Api<Service> = ns.api();

    let dry = api
        .create(
            &PostParams { dry_run: true, ..Default::default() },
            &mk_service("dry", "NodePort", &[(80, None)]),
        )
        .await
        .expect("dry-run create");
    assert!(dry.spec.as_ref().and_then(|s| s.cluster_ip.clone()).is_some());
    let dry_ports = node_ports(&dry);
    assert_eq!(dry_ports.len(), 1);
    assert!(!claim_names(&client).await.contains(&claim_of(&dry_ports[0].to_string())));
    assert_eq!(server.allocator.index().claim(Value::Port(dry_ports[0] as u16)), None);

    let created = ns.create(&mk_service("svc", "ClusterIP", &[(80, None)])).await;
    let ip = created.spec.clone().and_then(|s| s.cluster_ip).expect("ip");
    assert!(claim_names(&client).await.contains(&claim_of(&ip)));

    // ClusterIP -> NodePort allocates a port; the IP is kept.
    let patch = serde_json::json!({"spec": {"type": "NodePort"}});
    let updated =
        api.patch("svc", &PatchParams::default(), &Patch::Merge(&patch)).await.expect("to NodePort");
    assert_eq!(updated.spec.clone().and_then(|s| s.cluster_ip), Some(ip.clone()));
    let port = node_ports(&updated)[0];
    assert!(claim_names(&client).await.contains(&claim_of(&port.to_string())));

    // Re-applying without the nodePort does not re-allocate.
    let again = api
        .patch(
            "svc",
            &PatchParams::default(),
            &Patch::Merge(&serde_json::json!({"metadata": {"labels": {"x": "y"}}})),
        )
        .await
        .expect("touch");
    assert_eq!(node_ports(&again), vec![port]);

    // NodePort -> ClusterIP drops the port; the Service watch releases its claim.
    let patch = serde_json::json!({"spec": {"type": "ClusterIP", "ports": [{"name": "p80", "port": 80, "nodePort": null}]}});
    let back = api.patch("svc", &PatchParams::default(), &Patch::Merge(&patch)).await.expect("to ClusterIP");
    assert!(node_ports(&back).is_empty());
    let port_claim = claim_of(&port.to_string());
    repair_until(&client, &args, "port claim released", |names| !names.contains(&port_claim)).await;
    assert!(claim_names(&client).await.contains(&claim_of(&ip)), "the IP stays claimed");

    // -> ExternalName releases the IP (the watch again; repair finds nothing left).
    let patch = serde_json::json!({"spec": {"type": "ExternalName", "externalName": "example.com", "clusterIP": "", "clusterIPs": null, "ipFamilies": null, "ipFamilyPolicy": null}});
    api.patch("svc", &PatchParams::default(), &Patch::Merge(&patch)).await.expect("to ExternalName");
    let ip_claim = claim_of(&ip);
    repair_until(&client, &args, "ip claim released", |names| !names.contains(&ip_claim)).await;
    server.kill();
}

#[tokio::test]
async fn load_balancer_local_gets_a_health_check_port_and_no_node_ports_when_disabled() {
    let cp = shared();
    let client = cp.client().await;
    install_crd(&client).await;
    let (_certs, args) = serving_cert(cp);
    let (server, ns) = replica_for_scope(cp, &client, &args, "lb").await;

    let mut svc = mk_service("lb", "LoadBalancer", &[(80, None)]);
    let spec = svc.spec.as_mut().expect("spec");
    spec.external_traffic_policy = Some("Local".into());
    spec.allocate_load_balancer_node_ports = Some(false);
    let created = ns.create(&svc).await;
    assert!(node_ports(&created).is_empty());
    let health = created.spec.and_then(|s| s.health_check_node_port).expect("healthCheckNodePort");
    eventually("a claim for the health check port", Duration::from_secs(10), || async {
        let names = claim_names(&client).await;
        if names.contains(&claim_of(&health.to_string())) { Ok(()) } else { Err(names) }
    })
    .await;

    let mut headless = mk_service("headless", "ClusterIP", &[(80, None)]);
    headless.spec.as_mut().expect("spec").cluster_ip = Some("None".into());
    let created = ns.create(&headless).await;
    assert_eq!(created.spec.and_then(|s| s.cluster_ip).as_deref(), Some("None"));
    server.kill();
}

#[tokio::test]
async fn a_restart_reallocates_nothing_and_malformed_reviews_get_400() {
    let cp = shared();
    let client = cp.client().await;
    install_crd(&client).await;
    let (_certs, args) = serving_cert(cp);
    let (server, ns) = replica_for_scope(cp, &client, &args, "restart").await;
    let api: Api<Service> = ns.api();
    for i in 0..5 {
        ns.create(&mk_service(&format!("s{i}"), "NodePort", &[(80, None)])).await;
    }
    let before: BTreeSet<String> = claim_names(&client).await.into_iter().collect();
    // Claims are cluster-scoped and other tests of this binary make and release
    // their own meanwhile: compare only this namespace's.
    let mine_before: BTreeSet<String> = server
        .allocator
        .index()
        .claims()
        .filter(|(_, record)| record.owner.namespace == ns.name)
        .map(|(value, _)| value.claim_name())
        .collect();
    assert!(!mine_before.is_empty());
    server.kill();

    let mut args = args.clone();
    args.bind_address = "127.0.0.1:0".parse().expect("addr");
    let restarted = start_replica(&args, &client).await;
    register(&client, cp, "svcplane-restart", restarted.addr, "restart").await;
    wait_webhook_active(&ns, &restarted).await;
    let mine_after: BTreeSet<String> = restarted
        .allocator
        .index()
        .claims()
        .filter(|(_, record)| record.owner.namespace == ns.name)
        .map(|(value, _)| value.claim_name())
        .collect();
    assert_eq!(mine_after, mine_before, "index rebuilt from the store");
    let new = ns.create(&mk_service("after", "NodePort", &[(80, None)])).await;
    let ip = new.spec.clone().and_then(|s| s.cluster_ip).expect("ip");
    assert!(!before.contains(&claim_of(&ip)), "a new Service never gets a held IP");
    assert!(!before.contains(&claim_of(&node_ports(&new)[0].to_string())));
    let list = api.list(&Default::default()).await.expect("list");
    assert_eq!(list.items.len(), 6);

    // Malformed bodies: 400, and the server keeps answering.
    let ca = ca_file(cp);
    for body in ["not json", "{\"kind\":\"AdmissionReview\"}", "{\"request\": 5}"] {
        assert_eq!(post_to_mutate(ca.path(), restarted.addr, &[], body).await, "400", "body {body:?}");
    }
    let health = tokio::process::Command::new("curl")
        .args(["-s", "--cacert"])
        .arg(ca.path())
        .arg(format!("https://{}/healthz", restarted.addr))
        .output()
        .await
        .expect("curl");
    assert_eq!(String::from_utf8_lossy(&health.stdout), "ok");
    ns.create(&mk_service("still-up", "ClusterIP", &[(80, None)])).await;
    restarted.kill();
}

#[tokio::test]
async fn self_signed_replicas_share_one_ca_from_a_secret_and_the_bundle_is_exactly_it() {
    use k8s_openapi::api::admissionregistration::v1::{
        MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
    };
    use k8s_openapi::api::core::v1::Secret;
    let cp = shared();
    let client = cp.client().await;
    install_crd(&client).await;
    let (addr_a, addr_b) = (free_loopback_addr(), free_loopback_addr());
    let ns = scoped_namespace(&client, "wh-selfsigned", "selfsigned").await;
    // Registered with the test CA's bundle, which did not sign the replicas'
    // certificates: only the replicas' own caBundle makes them callable.
    register(&client, cp, "svcplane-selfsigned", addr_a, "selfsigned").await;
    let args = |addr| WebhookArgs {
        bind_address: addr,
        self_signed: true,
        self_signed_names: vec!["127.0.0.1".into()],
        ca_secret_namespace: Some(ns.name.clone()),
        mutating_configuration: Some("svcplane-selfsigned".into()),
        validating_configuration: Some("svcplane-selfsigned".into()),
        ..WebhookArgs::default()
    };
    let a = start_replica(&args(addr_a), &client).await;
    wait_webhook_active(&ns, &a).await;
    let mutating = Api::<MutatingWebhookConfiguration>::all(client.clone());
    let validating = Api::<ValidatingWebhookConfiguration>::all(client.clone());
    let versions = || async {
        let m = mutating.get("svcplane-selfsigned").await.expect("get mutating");
        let v = validating.get("svcplane-selfsigned").await.expect("get validating");
        let bundle = m.webhooks.unwrap_or_default()[0].client_config.ca_bundle.clone().expect("caBundle");
        (m.metadata.resource_version, v.metadata.resource_version, bundle)
    };
    let (mutating_version, validating_version, bundle) = versions().await;
    let ca_secret =
        |secret: Secret| secret.data.unwrap_or_default().get("tls.crt").cloned().expect("tls.crt");
    let secrets = ns.api::<Secret>();
    let ca = ca_secret(secrets.get(svcplane_webhook::DEFAULT_CA_SECRET).await.expect("the CA Secret"));
    assert_eq!(bundle, ca, "the caBundle is exactly the shared CA: the test CA it replaced is gone");

    // A second replica reads the same CA and finds the bundle already right.
    let b = start_replica(&args(addr_b), &client).await;
    let again = ca_secret(secrets.get(svcplane_webhook::DEFAULT_CA_SECRET).await.expect("the CA Secret"));
    assert_eq!(again, ca, "the second replica did not replace the CA");
    let (mutating_after, validating_after, _) = versions().await;
    assert_eq!(
        (mutating_after, validating_after),
        (mutating_version, validating_version),
        "the configurations were not written again"
    );
    // Each replica's own certificate chains to the shared CA.
    let ca_file = tempfile::NamedTempFile::new().expect("ca file");
    std::fs::write(ca_file.path(), &ca.0).expect("write ca");
    for addr in [a.addr, b.addr] {
        let health = tokio::process::Command::new("curl")
            .args(["-s", "--cacert"])
            .arg(ca_file.path())
            .arg(format!("https://{addr}/healthz"))
            .output()
            .await
            .expect("curl");
        assert_eq!(String::from_utf8_lossy(&health.stdout), "ok", "replica at {addr}");
    }
    let created = ns.create(&mk_service("web", "NodePort", &[(80, None)])).await;
    assert!(!node_ports(&created).is_empty(), "a real create goes through the self-signed replica");
    a.kill();
    b.kill();
}

#[tokio::test]
async fn a_malformed_ca_secret_stops_the_replica_with_an_error_naming_it() {
    use k8s_openapi::ByteString;
    use k8s_openapi::api::core::v1::Secret;
    let cp = shared();
    let client = cp.client().await;
    install_crd(&client).await;
    let ns = svcplane_e2e::TestNamespace::new(&client, "wh-badca").await;
    let broken = Secret {
        metadata: kube::core::ObjectMeta {
            name: Some(svcplane_webhook::DEFAULT_CA_SECRET.into()),
            ..Default::default()
        },
        type_: Some("kubernetes.io/tls".into()),
        data: Some(
            [("tls.crt", "not a certificate"), ("tls.key", "not a key")]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), ByteString(v.as_bytes().to_vec())))
                .collect(),
        ),
        ..Default::default()
    };
    ns.create(&broken).await;
    let args = WebhookArgs {
        bind_address: "127.0.0.1:0".parse().expect("addr"),
        self_signed: true,
        self_signed_names: vec!["127.0.0.1".into()],
        ca_secret_namespace: Some(ns.name.clone()),
        ..WebhookArgs::default()
    };
    let error = match svcplane_webhook::WebhookServer::start(&args, client.clone()).await {
        Ok(server) => {
            server.kill();
            panic!("a replica started with an unusable CA Secret");
        }
        Err(error) => error.to_string(),
    };
    let secret = format!("{}/{}", ns.name, svcplane_webhook::DEFAULT_CA_SECRET);
    assert!(error.contains(&secret) && error.contains("tls.key is not a private key"), "{error}");
    let kept = ns.api::<Secret>().get(svcplane_webhook::DEFAULT_CA_SECRET).await.expect("get");
    assert_eq!(kept.data, broken.data, "the Secret is never overwritten");
}

/// The test CA in a file, for curl.
fn ca_file(cp: &svcplane_e2e::ControlPlane) -> tempfile::NamedTempFile {
    let ca = tempfile::NamedTempFile::new().expect("ca file");
    std::fs::write(ca.path(), cp.ca_pem()).expect("write ca");
    ca
}

/// POSTs `data` (curl's `--data-binary`: a body, or `@file`) to the replica's
/// /mutate; returns the HTTP status code.
async fn post_to_mutate(
    ca: &std::path::Path,
    addr: std::net::SocketAddr,
    extra: &[&str],
    data: &str,
) -> String {
    let out = tokio::process::Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
        .arg(ca)
        .args(extra)
        .args(["-H", "Content-Type: application/json", "--data-binary", data])
        .arg(format!("https://{addr}/mutate"))
        .output()
        .await
        .expect("curl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The certificate a TLS server at `addr` presents, as base64 DER without line
/// breaks (what a PEM file holds between its markers).
async fn served_certificate(addr: std::net::SocketAddr) -> String {
    let out = tokio::process::Command::new("openssl")
        .args(["s_client", "-connect", &addr.to_string()])
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .expect("openssl s_client (make setup installs openssl)");
    pem_body(&String::from_utf8_lossy(&out.stdout))
}

fn pem_body(pem: &str) -> String {
    let begin = "-----BEGIN CERTIFICATE-----";
    pem.split_once(begin)
        .and_then(|(_, rest)| rest.split_once("-----END CERTIFICATE-----"))
        .map(|(body, _)| body.split_whitespace().collect())
        .unwrap_or_default()
}

#[tokio::test]
async fn renewed_certificate_files_are_served_without_a_restart_and_oversized_bodies_get_413() {
    let cp = shared();
    let client = cp.client().await;
    install_crd(&client).await;
    let (certs, mut args) = serving_cert(cp);
    args.cert_reload_interval = Duration::from_millis(200);
    args.max_body_bytes = 64 * 1024;
    let (server, ns) = replica_for_scope(cp, &client, &args, "reload").await;
    let cert_file = args.tls_cert_file.clone().expect("cert file");
    let first = pem_body(&std::fs::read_to_string(&cert_file).expect("read cert"));
    assert_eq!(served_certificate(server.addr).await, first);

    // A renewal as cert-manager or a Secret update does it: new files, same CA.
    let renewed = cp.ca.server(&["127.0.0.1"]).expect("renewed cert");
    let key_file = args.tls_key_file.clone().expect("key file");
    for (path, pem) in [(&key_file, &renewed.key_pem), (&cert_file, &renewed.cert_pem)] {
        let tmp = certs.path().join("renewing");
        std::fs::write(&tmp, pem).expect("write");
        std::fs::rename(&tmp, path).expect("rename");
    }
    let second = pem_body(&renewed.cert_pem);
    assert_ne!(second, first);
    eventually("the renewed certificate served", Duration::from_secs(20), || async {
        let served = served_certificate(server.addr).await;
        if served == second { Ok(()) } else { Err("still the old certificate".to_owned()) }
    })
    .await;
    // The apiserver still reaches the webhook, which still allocates.
    let created = ns.create(&mk_service("after-renewal", "NodePort", &[(80, None)])).await;
    assert_eq!(node_ports(&created).len(), 1, "allocated through the renewed certificate");

    // A body over --webhook-max-body-bytes is refused with 413; the server stays up.
    // `--http1.1` + `Expect: 100-continue`: curl waits for the server's word before
    // sending the body, so the 413 (decided from Content-Length) cannot race the
    // upload and be lost to a reset.
    let ca = ca_file(cp);
    let big = certs.path().join("big.json");
    std::fs::write(&big, format!("{{\"padding\":\"{}\"}}", "x".repeat(128 * 1024))).expect("write body");
    let body = format!("@{}", big.display());
    let status =
        post_to_mutate(ca.path(), server.addr, &["--http1.1", "-H", "Expect: 100-continue"], &body).await;
    assert_eq!(status, "413");
    // What an operator sees: a Service whose AdmissionReview is over the limit is
    // refused by the apiserver (failurePolicy Fail), and the message says why.
    let mut huge = mk_service("huge", "ClusterIP", &[(80, None)]);
    huge.metadata.annotations = Some([("example.com/blob".to_owned(), "x".repeat(100 * 1024))].into());
    let err =
        ns.api::<Service>().create(&PostParams::default(), &huge).await.expect_err("over the body limit");
    assert!(err.to_string().contains("larger than --webhook-max-body-bytes=65536"), "{err}");
    let too_large = AdmissionLabels {
        webhook: "mutate".into(),
        result: "invalid".into(),
        reason: "RequestEntityTooLarge".into(),
    };
    let counted = server.metrics.admissions.get_or_create(&too_large).get();
    assert_eq!(counted, 2, "the curl request and the apiserver's");
    ns.create(&mk_service("after-413", "ClusterIP", &[(80, None)])).await;
    server.kill();
}
