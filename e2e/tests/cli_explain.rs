//! `svcplane explain` against a real kube-apiserver, with svcplane's
//! EndpointSlice controller running: one Pod per reason a Pod can fail to be an
//! endpoint, and the Service's slices from svcplane and from another manager.

use std::{collections::BTreeMap, time::Duration};

use k8s_openapi::{
    api::{
        core::v1::{Pod, Service, ServicePort, ServiceSpec},
        discovery::v1::{Endpoint, EndpointSlice},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use kube::core::ObjectMeta;
use serde_json::Value;
use svcplane_e2e::{
    TestNamespace,
    fixtures::{ensure_node, labels, mk_pod},
    shared,
    slices::{SVCPLANE, slices_of},
    svcplane::{shared_svcplane, svcplane_bin},
    wait::eventually,
};

const TIMEOUT: Duration = Duration::from_secs(30);

fn controller() {
    shared_svcplane("cli-explain", &["--controllers=endpointslice"]);
}

fn explain_json(ns: &str, service: &str) -> Value {
    let (ok, stdout, stderr) =
        shared().run_cli(&svcplane_bin(), &["explain", &format!("svc/{service}"), "-n", ns, "-o", "json"]);
    assert!(ok, "explain failed: {stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("explain -o json is not JSON ({e}): {stdout}"))
}

/// The report of one Pod, by name.
fn pod<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["pods"]
        .as_array()
        .and_then(|pods| pods.iter().find(|p| p["name"] == name))
        .unwrap_or_else(|| panic!("pod {name} not in report: {report:#}"))
}

/// The reasons of one Pod as `reason -> appliesTo`.
fn reasons(report: &Value, name: &str) -> BTreeMap<String, Vec<String>> {
    pod(report, name)["reasons"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            let consumers = r["appliesTo"].as_array().into_iter().flatten();
            (
                r["reason"].as_str().unwrap_or_default().to_owned(),
                consumers.map(|c| c.as_str().unwrap_or_default().to_owned()).collect(),
            )
        })
        .collect()
}

fn verdicts(report: &Value, name: &str) -> (String, String) {
    let p = pod(report, name);
    (
        p["endpointSlices"].as_str().unwrap_or_default().to_owned(),
        p["endpoints"].as_str().unwrap_or_default().to_owned(),
    )
}

fn web_service() -> Service {
    Service {
        metadata: ObjectMeta { name: Some("web".into()), ..Default::default() },
        spec: Some(ServiceSpec {
            selector: Some(labels(&[("app", "web"), ("tier", "front")])),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: 80,
                target_port: Some(IntOrString::String("http".into())),
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

const WEB: &[(&str, &str)] = &[("app", "web"), ("tier", "front")];

fn web_pod(name: &str, labels: &[(&str, &str)], node: &str) -> Pod {
    mk_pod(name, labels, node, &[("http", 8080)])
}

#[tokio::test]
async fn explain_names_every_reason_a_pod_is_not_an_endpoint() {
    controller();
    let client = shared().client().await;
    ensure_node(&client, "node-a", "192.0.2.1", Some("zone-a")).await;
    let ns = TestNamespace::new(&client, "cli-explain").await;
    ns.create(&web_service()).await;

    ns.running_pod(web_pod("ready", WEB, "node-a"), &["10.244.0.1"], true).await;
    ns.running_pod(
        web_pod("wrong-label", &[("app", "web"), ("tier", "back")], "node-a"),
        &["10.244.0.2"],
        true,
    )
    .await;
    ns.running_pod(web_pod("missing-label", &[("app", "web")], "node-a"), &["10.244.0.3"], true).await;
    ns.running_pod(web_pod("not-ready", WEB, "node-a"), &["10.244.0.4"], false).await;
    ns.running_pod(web_pod("terminating", WEB, "node-a"), &["10.244.0.5"], true).await;
    ns.delete_pod("terminating").await;
    ns.running_pod(web_pod("no-ip", WEB, "node-a"), &[], false).await;
    ns.running_pod(web_pod("node-gone", WEB, "node-that-does-not-exist"), &["10.244.0.7"], true).await;
    ns.running_pod(mk_pod("no-port", WEB, "node-a", &[("metrics", 9090)]), &["10.244.0.8"], true).await;
    ns.running_pod(web_pod("ipv6-only", WEB, "node-a"), &["fd00:244::9"], true).await;

    // A slice another controller manages: explain lists every managed-by.
    ns.create(&EndpointSlice {
        metadata: ObjectMeta {
            name: Some("web-by-hand".into()),
            labels: Some(labels(&[
                ("kubernetes.io/service-name", "web"),
                ("endpointslice.kubernetes.io/managed-by", "by-hand.example.com"),
            ])),
            ..Default::default()
        },
        address_type: "IPv4".into(),
        endpoints: Some(vec![Endpoint { addresses: vec!["192.0.2.77".into()], ..Default::default() }]),
        ports: None,
    })
    .await;
    eventually("svcplane's slice with the ready Pod", TIMEOUT, || {
        let api = ns.api::<EndpointSlice>();
        async move {
            let slices = slices_of(&api, "web", SVCPLANE).await;
            let text = format!("{slices:?}");
            if text.contains("10.244.0.1") { Ok(()) } else { Err(text) }
        }
    })
    .await;

    let report = explain_json(&ns.name, "web");
    assert_eq!(report["service"], "web");
    assert_eq!(report["type"], "ClusterIP");

    assert_eq!(verdicts(&report, "ready"), ("ready".into(), "ready".into()));
    assert!(reasons(&report, "ready").is_empty());

    let mismatch = &pod(&report, "wrong-label")["reasons"][0];
    assert_eq!(mismatch["reason"], "SelectorMismatch");
    assert_eq!(
        (&mismatch["key"], &mismatch["expected"], &mismatch["actual"]),
        (&Value::from("tier"), &Value::from("front"), &Value::from("back"))
    );
    assert_eq!(verdicts(&report, "wrong-label"), ("excluded".into(), "excluded".into()));
    let missing = &pod(&report, "missing-label")["reasons"][0];
    assert_eq!(
        (&missing["reason"], &missing["key"]),
        (&Value::from("SelectorMismatch"), &Value::from("tier"))
    );
    assert!(missing.get("actual").is_none(), "an absent label has no actual value: {missing}");

    assert_eq!(verdicts(&report, "not-ready"), ("not-ready".into(), "not-ready".into()));
    assert!(reasons(&report, "not-ready").contains_key("NotReady"));

    // Slices publish a terminating Pod as not ready; Endpoints drop it.
    let terminating = reasons(&report, "terminating");
    assert_eq!(terminating.get("Terminating"), Some(&vec!["Endpoints".to_owned()]), "{terminating:?}");
    assert_eq!(terminating.get("NotReady"), Some(&vec!["EndpointSlices".to_owned()]), "{terminating:?}");
    assert_eq!(verdicts(&report, "terminating"), ("not-ready".into(), "excluded".into()));

    assert!(reasons(&report, "no-ip").contains_key("NoIP"));
    assert_eq!(verdicts(&report, "no-ip").0, "excluded");

    // Only the EndpointSlice controller looks Nodes up.
    let node_gone = reasons(&report, "node-gone");
    assert_eq!(node_gone.get("NodeMissing"), Some(&vec!["EndpointSlices".to_owned()]), "{node_gone:?}");
    assert_eq!(verdicts(&report, "node-gone"), ("excluded".into(), "ready".into()));

    assert!(reasons(&report, "no-port").contains_key("PortNotFound"));
    assert_eq!(verdicts(&report, "no-port").0, "partial");
    let message = pod(&report, "no-port")["reasons"][0]["message"].as_str().unwrap_or_default().to_owned();
    assert!(message.contains("\"http\""), "names the missing port: {message}");

    // The Endpoints controller leaves out a Pod none of whose ports resolve.
    let no_port = reasons(&report, "no-port");
    assert_eq!(no_port.get("NoPortResolved"), Some(&vec!["Endpoints".to_owned()]), "{no_port:?}");
    assert_eq!(verdicts(&report, "no-port").1, "excluded");

    // An IPv6-only Pod of an IPv4 Service is no endpoint at all (issue 17).
    let ipv6_only = reasons(&report, "ipv6-only");
    assert!(ipv6_only.contains_key("NoIPOfFamily") && ipv6_only.contains_key("NoUsableIP"), "{ipv6_only:?}");
    assert_eq!(verdicts(&report, "ipv6-only"), ("excluded".into(), "excluded".into()));

    let managers: Vec<&str> =
        report["slices"].as_array().into_iter().flatten().filter_map(|s| s["managedBy"].as_str()).collect();
    assert!(managers.contains(&SVCPLANE), "{managers:?}");
    assert!(managers.contains(&"by-hand.example.com"), "{managers:?}");

    // The table: one line per Pod, reasons in words, then the slices.
    let (ok, table, stderr) = shared().run_cli(&svcplane_bin(), &["explain", "svc/web", "-n", &ns.name]);
    assert!(ok, "{stderr}");
    println!("{table}");
    assert!(table.lines().any(|l| l.starts_with("POD ") && l.contains("REASONS")), "{table}");
    assert!(table.contains("label tier=back, selector wants front"), "{table}");
    assert!(table.contains("pod is terminating [Endpoints only]"), "{table}");
    assert!(table.contains("by-hand.example.com"), "{table}");

    // YAML carries the same report.
    let (ok, yaml, _) =
        shared().run_cli(&svcplane_bin(), &["explain", "svc/web", "-n", &ns.name, "-o", "yaml"]);
    assert!(ok && yaml.contains("reason: SelectorMismatch"), "{yaml}");
}

#[tokio::test]
async fn kubectl_plugin_symlink_behaves_like_the_binary() {
    let client = shared().client().await;
    let ns = TestNamespace::new(&client, "cli-plugin").await;
    // Selectorless: no controller writes slices for it while the two runs compare.
    let mut svc = web_service();
    svc.spec.as_mut().expect("spec").selector = None;
    ns.create(&svc).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let plugin = dir.path().join("kubectl-svcplane");
    std::os::unix::fs::symlink(svcplane_bin(), &plugin).expect("symlink");
    let (ok, via_plugin, stderr) =
        shared().run_cli(&plugin, &["explain", "svc/web", "-n", &ns.name, "-o", "json"]);
    assert!(ok, "{stderr}");
    let (_, direct, _) =
        shared().run_cli(&svcplane_bin(), &["explain", "svc/web", "-n", &ns.name, "-o", "json"]);
    assert_eq!(via_plugin, direct);
    let (ok, _, stderr) = shared().run_cli(&plugin, &["explain", "pod/web", "-n", &ns.name]);
    assert!(!ok && stderr.contains("expected svc/NAME"), "{stderr}");
}
