//! Two replicas with --leader-elect: one holds the Lease and writes; when it is
//! killed (a node loss), the other takes over and keeps Services converging.
//! When it is stopped (SIGTERM), it first reports not ready while its webhook
//! still answers, then releases the Lease so the standby takes over at once.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use svcplane_e2e::{
    TestNamespace,
    fixtures::{ensure_node, mk_pod, mk_port, mk_service},
    shared,
    slices::{SVCPLANE, normalize, slices_of},
    svcplane::{Svcplane, http_get},
    wait::eventually,
    webhook::{install_crd, serving_cert},
};

async fn holder(api: &Api<Lease>) -> Option<String> {
    // `POD_NAME_<per-process suffix>`: the Pod (here, the process's POD_NAME).
    let identity = api.get_opt("svcplane").await.ok().flatten()?.spec?.holder_identity?;
    Some(identity.split('_').next().unwrap_or_default().to_owned())
}

#[tokio::test]
async fn standby_takes_over_when_the_leader_is_killed() {
    let cp = shared();
    let client = cp.client().await;
    ensure_node(&client, "node-a", "192.0.2.1", None).await;
    let ns = TestNamespace::new(&client, "leader").await;
    let lease_args = ["--leader-elect", "--controllers=endpointslice"];
    let ns_flag = format!("--leader-election-namespace={}", ns.name);
    let a = cp.svcplane("leader-a", &[lease_args[0], lease_args[1], &ns_flag]).await;
    let b = cp.svcplane("leader-b", &[lease_args[0], lease_args[1], &ns_flag]).await;
    let leases: Api<Lease> = ns.api();
    let first = eventually("a lease holder", Duration::from_secs(30), || async {
        holder(&leases).await.ok_or("no holder")
    })
    .await;

    ns.create(&mk_service("s", &[("app", "s")], vec![mk_port("http", 80, "8080")])).await;
    ns.running_pod(mk_pod("p0", &[("app", "s")], "node-a", &[]), &["10.40.0.1"], true).await;
    eventually("slice from the leader", Duration::from_secs(30), || async {
        let n = normalize(&slices_of(&ns.api(), "s", SVCPLANE).await);
        if n.endpoint_count() == 1 { Ok(()) } else { Err(n) }
    })
    .await;
    // Only the leader wrote.
    let (leader, standby) = if first == "svcplane-leader-a" { (a, b) } else { (b, a) };
    wrote(&leader, "the leader").await;
    assert_eq!(standby.metric_sum("svcplane_changes_total", &[]).await, 0.0, "the standby never writes");

    leader.kill();
    let second = eventually("the standby to take the lease", Duration::from_secs(60), || async {
        match holder(&leases).await {
            Some(h) if h != first => Ok(h),
            other => Err(other),
        }
    })
    .await;
    assert_ne!(second, first);
    ns.running_pod(mk_pod("p1", &[("app", "s")], "node-a", &[]), &["10.40.0.2"], true).await;
    eventually("the new leader adds the new Pod", Duration::from_secs(30), || async {
        let n = normalize(&slices_of(&ns.api(), "s", SVCPLANE).await);
        if n.endpoint_count() == 2 { Ok(()) } else { Err(n) }
    })
    .await;
    wrote(&standby, "the new leader").await;
}

/// Waits until `replica` counts a write: the counter moves just after the apiserver
/// answers, so a test that has already seen the object may read it a moment early.
async fn wrote(replica: &Svcplane, who: &str) {
    eventually(&format!("{who} to count its writes"), Duration::from_secs(10), || async {
        let changes = replica.metric_sum("svcplane_changes_total", &[]).await;
        if changes > 0.0 { Ok(()) } else { Err(changes) }
    })
    .await;
}

/// A replica running every role (the webhook on a free loopback port), as the
/// Deployment does, competing for the Lease in `lease_namespace`.
async fn controller_and_webhook(
    name: &str,
    lease_namespace: &str,
    cert: &std::path::Path,
    key: &std::path::Path,
) -> (Svcplane, std::net::SocketAddr) {
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let flags = [
        "--roles=controller,webhook,repair".to_owned(),
        "--controllers=endpointslice".to_owned(),
        "--leader-elect".to_owned(),
        format!("--leader-election-namespace={lease_namespace}"),
        format!("--webhook-bind-address={addr}"),
        format!("--webhook-tls-cert-file={}", cert.display()),
        format!("--webhook-tls-key-file={}", key.display()),
        "--shutdown-drain=5s".to_owned(),
    ];
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    (shared().svcplane(name, &flags).await, addr)
}

#[tokio::test]
async fn a_stopped_leader_drains_then_hands_the_lease_to_the_standby_at_once() {
    let cp = shared();
    let client = cp.client().await;
    install_crd(&client).await;
    let (_certs, webhook) = serving_cert(cp);
    let (cert, key) = (webhook.tls_cert_file.expect("cert"), webhook.tls_key_file.expect("key"));
    let ns = TestNamespace::new(&client, "handover").await;
    let a = controller_and_webhook("handover-a", &ns.name, &cert, &key).await;
    let b = controller_and_webhook("handover-b", &ns.name, &cert, &key).await;
    let leases: Api<Lease> = ns.api();
    let first = eventually("a lease holder", Duration::from_secs(30), || async {
        holder(&leases).await.ok_or("no holder")
    })
    .await;
    let ((leader, leader_webhook), (standby, _)) =
        if first == "svcplane-handover-a" { (a, b) } else { (b, a) };
    let second = if first == "svcplane-handover-a" { "svcplane-handover-b" } else { "svcplane-handover-a" };
    // Every role's metrics on the one metrics address.
    let metrics = leader.metrics_text().await;
    for family in [
        "# TYPE svcplane_syncs counter",
        "svcplane_webhook_admission_duration_seconds_count",
        "svcplane_webhook_allocations_total",
        "svcplane_webhook_pool_available{pool=\"30000-32767\"}",
    ] {
        assert!(metrics.contains(family), "{family} missing from the metrics address:\n{metrics}");
    }

    let sigterm = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(leader.pid().to_string())
        .status()
        .expect("kill -TERM");
    assert!(sigterm.success());
    eventually("the stopping leader to report not ready", Duration::from_secs(10), || async {
        match http_get(&leader.health, "/readyz").await {
            Some((503, body)) if body.contains("shutting down") => Ok(()),
            other => Err(other),
        }
    })
    .await;
    // Still draining: the webhook answers while the kubelet takes it out of the Service.
    let ca = tempfile::NamedTempFile::new().expect("ca file");
    std::fs::write(ca.path(), cp.ca_pem()).expect("write ca");
    let health = tokio::process::Command::new("curl")
        .args(["-s", "--cacert"])
        .arg(ca.path())
        .arg(format!("https://{leader_webhook}/healthz"))
        .output()
        .await
        .expect("curl");
    assert_eq!(String::from_utf8_lossy(&health.stdout), "ok", "the webhook serves during the drain");

    // A second SIGTERM ends the drain; the process stops cleanly.
    let status = leader.terminate(Duration::from_secs(30)).await.expect("the leader exits");
    assert!(status.success(), "a graceful stop exits 0: {status}");
    // Released before exiting: the Lease no longer names the stopped leader.
    let after = holder(&leases).await;
    assert_ne!(after.as_deref(), Some(first.as_str()), "the Lease was released");
    // The standby notices within its 2 s poll, far sooner than the 15 s expiry.
    eventually("the standby to take the released lease", Duration::from_secs(10), || async {
        match holder(&leases).await {
            Some(h) if h == second => Ok(()),
            other => Err(other),
        }
    })
    .await;
    assert_eq!(
        http_get(&standby.health, "/readyz").await.map(|(code, _)| code),
        Some(200),
        "the new leader stays ready"
    );

    // A standby that never led stops cleanly too, and leaves the Lease alone.
    let (third, _) = controller_and_webhook("handover-c", &ns.name, &cert, &key).await;
    let status = third.terminate(Duration::from_secs(30)).await.expect("the standby exits");
    assert!(status.success(), "a graceful stop of a standby exits 0: {status}");
    assert_eq!(holder(&leases).await.as_deref(), Some(second));
}
