//! Every case of upstream's `TestCreateInitIPFields` (kubernetes v1.37.2,
//! pkg/registry/core/service/storage/storage_test.go), derived into
//! `fixtures/init_ip_fields.tsv` by `fixtures/extract_init_ip_fields.py`.
//! Upstream runs each case through a full create; an ERROR row means the
//! create failed there, so the plan must fail here.

use svcplane_ipam::{IpFamily, ServiceIpFields, plan_ip_families};

const TABLE: &str = include_str!("fixtures/init_ip_fields.tsv");

fn families(cell: &str) -> Vec<IpFamily> {
    cell.split(',').map(|f| f.parse().expect("a family in the fixture")).collect()
}

fn list(cell: &str) -> Vec<String> {
    if cell == "-" { Vec::new() } else { cell.split(',').map(str::to_owned).collect() }
}

#[test]
fn plan_matches_every_upstream_create_init_ip_fields_case() {
    let mut checked = 0;
    let mut failures = Vec::new();
    for line in TABLE.lines().filter(|l| !l.starts_with('#')) {
        let cells: Vec<&str> = line.split('\t').collect();
        let [cluster, name, policy, fams, ips, headless, selector, want_policy, want_fams, want_headless] =
            cells[..]
        else {
            panic!("bad row {line:?}");
        };
        let mut cluster_ips = list(ips);
        if headless == "true" {
            cluster_ips = vec!["None".to_owned()];
        }
        let service = ServiceIpFields {
            cluster_ip: cluster_ips.first().cloned().unwrap_or_default(),
            cluster_ips,
            ip_families: list(fams),
            ip_family_policy: (policy != "-").then(|| policy.to_owned()),
            has_selector: selector == "true",
        };
        let got = plan_ip_families(&service, &families(cluster));
        let ok = match (&got, want_policy) {
            (Err(_), "ERROR") => true,
            (Ok(plan), want) if want != "ERROR" => {
                plan.policy.as_str() == want
                    && plan.families == families(want_fams)
                    && plan.headless == (want_headless == "true")
                    && (plan.headless || plan.requested_ips.len() == plan.families.len())
            }
            _ => false,
        };
        if !ok {
            failures
                .push(format!("cluster {cluster} case {name}: want {want_policy} {want_fams}, got {got:?}"));
        }
        checked += 1;
    }
    assert_eq!(checked, 520, "the fixture should hold all upstream cases");
    assert!(failures.is_empty(), "{} mismatches:\n{}", failures.len(), failures.join("\n"));
}
