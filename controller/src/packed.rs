//! Objects kept in a reflector store as their JSON, decoded when read.
//!
//! Services, svcplane's own slices, the Endpoints and the Pods are read once per
//! sync of their Service and otherwise only held. As structs they take about
//! 2.1 KiB (a Service), 3.1 KiB (a slice of one endpoint: 31 allocations, its
//! labels alone a BTreeMap node of eleven entries), 1.9 KiB (Endpoints) and 2 KiB
//! (a `StoredPod`); their JSON takes a third to a half of that in one allocation. Decoding one on each read
//! costs microseconds, against the tens of milliseconds of the write a sync
//! makes.
//!
//! Why not kube-runtime's store as is: it keeps the deserialized object.
//! [`Packed`] is still a [`Resource`], so the store, the watcher and the
//! relist handling stay kube-runtime's: its metadata holds what they read (name,
//! namespace, resourceVersion) and nothing else.

use std::{borrow::Cow, fmt, marker::PhantomData};

use k8s_openapi::{
    api::{
        core::v1::{Endpoints, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::Resource;
use serde::{Deserialize, Deserializer, Serialize, de::DeserializeOwned};

use crate::{stored_pod::StoredPod, trim};

/// A type a store keeps packed, with what to drop before packing it.
pub trait Packable: Resource<DynamicType = ()> + Serialize + DeserializeOwned {
    /// Drops what no reader needs.
    fn trim(&mut self);
}

impl Packable for Service {
    fn trim(&mut self) {
        trim::trim_service(self);
    }
}

impl Packable for EndpointSlice {
    fn trim(&mut self) {
        trim::trim_slice(self);
    }
}

impl Packable for Endpoints {
    fn trim(&mut self) {
        trim::trim_endpoints(self);
    }
}

impl Packable for StoredPod {
    fn trim(&mut self) {
        StoredPod::trim(self);
    }
}

/// A `T` as its JSON, after [`Packable::trim`]; deserializes from the API's JSON
/// of a `T`, so a watch of `Packed<T>` stores it packed from the start.
pub struct Packed<T> {
    /// Name, namespace and resourceVersion only: the store's key and the
    /// watch's resume point.
    metadata: ObjectMeta,
    json: Box<[u8]>,
    kind: PhantomData<fn() -> T>,
}

impl<T: Packable> Packed<T> {
    /// Packs `object` as it is (trimmed or not).
    pub fn pack(object: &T) -> Self {
        let meta = object.meta();
        let metadata = ObjectMeta {
            name: meta.name.clone(),
            namespace: meta.namespace.clone(),
            resource_version: meta.resource_version.clone(),
            ..ObjectMeta::default()
        };
        // Serializing a `k8s_openapi` object into memory cannot fail: every
        // field is a string, number, bool, list or string-keyed map.
        let json = serde_json::to_vec(object).unwrap_or_default().into_boxed_slice();
        Packed { metadata, json, kind: PhantomData }
    }

    /// The object as it was packed.
    pub fn unpack(&self) -> T {
        serde_json::from_slice(&self.json).unwrap_or_else(|e| {
            // Unreachable: the bytes are `pack`'s encoding of a `T`.
            panic!("a packed {} does not decode: {e}", T::kind(&()))
        })
    }
}

impl<'de, T: Packable> Deserialize<'de> for Packed<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let mut object = T::deserialize(deserializer)?;
        object.trim();
        Ok(Packed::pack(&object))
    }
}

impl<T: Packable> Resource for Packed<T> {
    type DynamicType = ();
    type Scope = T::Scope;

    fn kind(dt: &()) -> Cow<'_, str> {
        T::kind(dt)
    }

    fn group(dt: &()) -> Cow<'_, str> {
        T::group(dt)
    }

    fn version(dt: &()) -> Cow<'_, str> {
        T::version(dt)
    }

    fn plural(dt: &()) -> Cow<'_, str> {
        T::plural(dt)
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

impl<T> Clone for Packed<T> {
    fn clone(&self) -> Self {
        Packed { metadata: self.metadata.clone(), json: self.json.clone(), kind: PhantomData }
    }
}

impl<T> fmt::Debug for Packed<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Packed")
            .field("metadata", &self.metadata)
            .field("json", &String::from_utf8_lossy(&self.json))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::EndpointSubset;
    use kube::ResourceExt;

    use super::*;
    use crate::labels;

    fn api_slice() -> serde_json::Value {
        serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {
                "name": "web-abcde", "generateName": "web-", "namespace": "shop",
                "uid": "3f1c2b7e-1111-4c2d-9a9a-0123456789ab", "resourceVersion": "42", "generation": 2,
                "creationTimestamp": "2026-12-07T10:00:00Z",
                "labels": {labels::MANAGED_BY: labels::SVCPLANE_SLICE_CONTROLLER, labels::SERVICE_NAME: "web"},
                "annotations": {labels::LAST_CHANGE_TRIGGER_TIME: "2026-12-07T10:00:00Z"},
                "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": "web",
                    "uid": "3f1c2b7e-1111-4c2d-9a9a-0123456789ab", "controller": true, "blockOwnerDeletion": true}],
                "managedFields": [{"manager": "svcplane", "operation": "Update", "apiVersion": "discovery.k8s.io/v1"}]
            },
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.244.1.23"], "conditions": {"ready": true, "serving": true, "terminating": false},
                "nodeName": "node-a", "zone": "a", "hints": {"forZones": [{"name": "a"}]},
                "targetRef": {"kind": "Pod", "namespace": "shop", "name": "web-0", "uid": "u"}}],
            "ports": [{"name": "http", "protocol": "TCP", "port": 8080, "appProtocol": "http"}]
        })
    }

    #[test]
    fn a_watched_slice_unpacks_to_the_slice_trimmed() {
        let packed: Packed<EndpointSlice> = serde_json::from_value(api_slice()).expect("packs");
        let mut expected: EndpointSlice = serde_json::from_value(api_slice()).expect("decodes");
        trim::trim_slice(&mut expected);
        assert_eq!(packed.unpack(), expected);
        assert_eq!(packed.unpack().metadata.managed_fields, None, "trimmed before packing");
        assert_eq!(packed.unpack().endpoints.map(|e| e.len()), Some(1));
    }

    #[test]
    fn the_metadata_holds_what_the_store_and_the_watch_read_and_nothing_else() {
        let packed: Packed<EndpointSlice> = serde_json::from_value(api_slice()).expect("packs");
        assert_eq!(packed.name_any(), "web-abcde");
        assert_eq!(packed.namespace().as_deref(), Some("shop"));
        assert_eq!(packed.resource_version().as_deref(), Some("42"));
        let only_those = ObjectMeta {
            name: Some("web-abcde".into()),
            namespace: Some("shop".into()),
            resource_version: Some("42".into()),
            ..ObjectMeta::default()
        };
        assert_eq!(packed.meta(), &only_those);
    }

    #[test]
    fn endpoints_pack_and_unpack_unchanged_but_for_the_trim() {
        let endpoints = Endpoints {
            metadata: ObjectMeta {
                name: Some("web".into()),
                namespace: Some("shop".into()),
                resource_version: Some("7".into()),
                annotations: Some([(labels::LEADER_ELECTION.to_string(), "x".to_string())].into()),
                ..ObjectMeta::default()
            },
            subsets: Some(vec![EndpointSubset { addresses: Some(vec![]), ..EndpointSubset::default() }]),
        };
        let json = serde_json::to_value(&endpoints).expect("encodes");
        let packed: Packed<Endpoints> = serde_json::from_value(json).expect("packs");
        assert_eq!(packed.unpack(), endpoints, "an empty list stays an empty list, not absent");
    }

    #[test]
    fn the_store_and_the_api_see_the_packed_type_as_the_object_kind() {
        assert_eq!(
            Packed::<EndpointSlice>::url_path(&(), Some("shop")),
            EndpointSlice::url_path(&(), Some("shop"))
        );
        assert_eq!(Packed::<Endpoints>::kind(&()), "Endpoints");
    }
}
