//! Issue 17: why a Service has no ready endpoint reaches `kubectl describe svc`
//! as one Warning `NoReadyEndpoints` Event per distinct reason, and its recovery
//! as a Normal `ReadyEndpoints` Event.

use std::time::Duration;

use k8s_openapi::api::core::v1::Event;
use kube::api::ListParams;
use svcplane_e2e::{
    TestNamespace,
    fixtures::{ensure_node, mk_pod, mk_port, mk_service, set_pod_ready},
    shared,
    wait::eventually,
};

const TIMEOUT: Duration = Duration::from_secs(30);

fn controller() {
    svcplane_e2e::svcplane::shared_svcplane(
        "no-ready",
        &["--controllers=endpointslice", "--no-ready-endpoints-grace=2s"],
    );
}

/// (type, reason, message, repeated) of the Events svcplane recorded on Service
/// `svc`, oldest first; `repeated` is true when the recorder folded a repeat into
/// the Event. Only svcplane's: kube-apiserver's own repair loop may record
/// `ClusterIPNotAllocated` on a Service it sees before its allocation is visible to
/// it (seen once in CI), and that is not this test's subject.
async fn events_of(ns: &TestNamespace, svc: &str) -> Vec<(String, String, String, bool)> {
    let params =
        ListParams::default().fields(&format!("involvedObject.kind=Service,involvedObject.name={svc}"));
    let mut events = ns.api::<Event>().list(&params).await.expect("list Events").items;
    events.sort_by(|a, b| {
        (&a.event_time, &a.metadata.creation_timestamp).cmp(&(&b.event_time, &b.metadata.creation_timestamp))
    });
    events
        .into_iter()
        .filter(|e| e.reporting_component.as_deref() == Some("svcplane"))
        .map(|e| {
            let repeated = e.series.is_some() || e.count.unwrap_or(1) > 1;
            (
                e.type_.unwrap_or_default(),
                e.reason.unwrap_or_default(),
                e.message.unwrap_or_default(),
                repeated,
            )
        })
        .collect()
}

/// Polls until the Service's Events include a `reason` Event whose message `ok` accepts.
async fn wait_event(ns: &TestNamespace, svc: &str, reason: &str, ok: impl Fn(&str) -> bool) {
    eventually(&format!("a {reason} Event on {svc}"), TIMEOUT, || {
        let ok = &ok;
        async move {
            let events = events_of(ns, svc).await;
            if events.iter().any(|(_, r, m, _)| r == reason && ok(m)) { Ok(()) } else { Err(events) }
        }
    })
    .await;
}

#[tokio::test]
async fn no_ready_endpoints_is_explained_once_per_reason_and_recovery_is_recorded() {
    controller();
    let client = shared().client().await;
    ensure_node(&client, "node-a", "192.0.2.1", Some("zone-a")).await;
    let ns = TestNamespace::new(&client, "no-ready").await;
    let http = || vec![mk_port("http", 80, "http")];
    // Pods before Services, so the first look already sees them.
    ns.running_pod(mk_pod("ok-0", &[("app", "ok")], "node-a", &[("http", 8080)]), &["10.3.0.9"], true).await;
    for i in 0..2 {
        let pod = mk_pod(&format!("web-{i}"), &[("app", "web")], "node-a", &[("http", 8080)]);
        ns.running_pod(pod, &[&format!("10.3.0.{}", i + 1)], false).await;
    }
    ns.create(&mk_service("ok", &[("app", "ok")], http())).await;
    ns.create(&mk_service("web", &[("app", "web")], http())).await;

    let first = "selector app=web matches 2 Pods: 2 not ready";
    wait_event(&ns, "web", "NoReadyEndpoints", |m| m == first).await;
    let warning = |m: &str| ("Warning".to_owned(), "NoReadyEndpoints".to_owned(), m.to_owned(), false);
    assert_eq!(events_of(&ns, "web").await, [warning(first)]);

    // Another reason: a ready Pod that does not declare the target port.
    ns.running_pod(mk_pod("web-2", &[("app", "web")], "node-a", &[("metrics", 9090)]), &["10.3.0.3"], true)
        .await;
    let second = r#"selector app=web matches 3 Pods: 2 not ready, 1 has no container port named "http""#;
    wait_event(&ns, "web", "NoReadyEndpoints", |m| m == second).await;

    set_pod_ready(&ns.api(), "web-0", true).await;
    let recovered = |m: &str| m.starts_with("1 ready endpoint after ") && m.ends_with("s without");
    wait_event(&ns, "web", "ReadyEndpoints", recovered).await;
    let events = events_of(&ns, "web").await;
    assert_eq!(events.len(), 3, "{events:?}");
    assert_eq!(events[..2], [warning(first), warning(second)], "one Warning per note, never repeated");
    assert_eq!((events[2].0.as_str(), events[2].3), ("Normal", false), "{events:?}");

    // More than the grace has passed since "ok" was created with a ready endpoint.
    assert_eq!(events_of(&ns, "ok").await, []);
}
