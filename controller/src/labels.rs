//! Label and annotation keys svcplane reads and writes, and its own managed-by values.
//!
//! svcplane never uses kube-controller-manager's managed-by values, so the two can run
//! on one cluster (for differential tests) without touching each other's slices.

/// `endpointslice.kubernetes.io/managed-by`: which controller owns a slice.
pub const MANAGED_BY: &str = "endpointslice.kubernetes.io/managed-by";
/// svcplane's managed-by value for slices computed from Pods.
pub const SVCPLANE_SLICE_CONTROLLER: &str = "endpointslice-controller.svcplane.io";
/// svcplane's managed-by value for slices mirrored from hand-written Endpoints.
pub const SVCPLANE_MIRRORING_CONTROLLER: &str = "endpointslicemirroring-controller.svcplane.io";
/// kube-controller-manager's value: svcplane never touches these slices.
pub const UPSTREAM_SLICE_CONTROLLER: &str = "endpointslice-controller.k8s.io";
/// kube-controller-manager's mirroring value: svcplane never touches these slices.
pub const UPSTREAM_MIRRORING_CONTROLLER: &str = "endpointslicemirroring-controller.k8s.io";
/// `kubernetes.io/service-name`: the Service a slice belongs to.
pub const SERVICE_NAME: &str = "kubernetes.io/service-name";
/// `service.kubernetes.io/headless`: set (empty value) on slices/Endpoints of headless Services.
pub const HEADLESS: &str = "service.kubernetes.io/headless";
/// `endpoints.kubernetes.io/last-change-trigger-time`.
pub const LAST_CHANGE_TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";
/// `endpoints.kubernetes.io/over-capacity`: set to "truncated" when an Endpoints was cut.
pub const OVER_CAPACITY: &str = "endpoints.kubernetes.io/over-capacity";
/// `endpointslice.kubernetes.io/skip-mirror`: "true" on an Endpoints opts it out of mirroring.
pub const SKIP_MIRROR: &str = "endpointslice.kubernetes.io/skip-mirror";
/// `kubectl.kubernetes.io/last-applied-configuration`: never copied onto derived objects.
pub const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";
/// `control-plane.alpha.kubernetes.io/leader`: Endpoints used as leader-election
/// locks carry it; they are never mirrored.
pub const LEADER_ELECTION: &str = "control-plane.alpha.kubernetes.io/leader";
/// `endpoints.kubernetes.io/managed-by`: which controller wrote an Endpoints object.
pub const ENDPOINTS_MANAGED_BY: &str = "endpoints.kubernetes.io/managed-by";
/// The Endpoints controller's managed-by value. svcplane writes upstream's value on
/// purpose: an Endpoints is named after its Service, so both controllers would write
/// the same object, and a different value would make them overwrite each other forever.
pub const UPSTREAM_ENDPOINTS_CONTROLLER: &str = "endpoint-controller";

/// Sets `endpoints.kubernetes.io/last-change-trigger-time` to `time`, or removes
/// it when there is none (upstream `addTriggerTimeAnnotation`, and the same in the
/// Endpoints controller). The value is Go's `time.RFC3339Nano` in UTC: fractional
/// seconds only when non-zero, trailing zeros trimmed, a `Z` suffix.
pub fn set_trigger_time(
    annotations: &mut std::collections::BTreeMap<String, String>,
    time: Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
) {
    match time {
        Some(time) => {
            let value = time.0.strftime("%Y-%m-%dT%H:%M:%S%.fZ").to_string();
            annotations.insert(LAST_CHANGE_TRIGGER_TIME.to_owned(), value);
        }
        None => {
            annotations.remove(LAST_CHANGE_TRIGGER_TIME);
        }
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use k8s_openapi::jiff::Timestamp;

    #[test]
    fn the_trigger_time_is_written_in_go_rfc3339_nano() {
        let value = |seconds, nanos| {
            let mut annotations = std::collections::BTreeMap::new();
            let time = Time(Timestamp::new(seconds, nanos).expect("valid"));
            super::set_trigger_time(&mut annotations, Some(&time));
            annotations.remove(super::LAST_CHANGE_TRIGGER_TIME).expect("set")
        };
        assert_eq!(value(0, 0), "1970-01-01T00:00:00Z");
        assert_eq!(value(1_700_000_000, 0), "2023-11-14T22:13:20Z");
        assert_eq!(value(1_700_000_000, 120_000_000), "2023-11-14T22:13:20.12Z");
        assert_eq!(value(1_700_000_000, 1), "2023-11-14T22:13:20.000000001Z");
    }
}
