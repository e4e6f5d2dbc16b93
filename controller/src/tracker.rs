//! What svcplane last wrote, so a reconcile can tell whether its store has caught
//! up with its own writes. One design for slices and Endpoints. Pure bookkeeping,
//! no client.
//!
//! Without this, a second sync that runs before the watch delivers the slice the
//! first sync created sees no slice and creates another: upstream's duplicate-slice
//! problem (kubernetes#92928), which its EndpointSliceTracker guards against by
//! generation; its Endpoints controller keeps a second tracker, by the
//! resourceVersion an update replaced. Endpoints carry no generation, so here both
//! use resourceVersions, compared only for equality as the API asks: the store is
//! behind while it lacks an object svcplane created, still shows the version
//! svcplane replaced or deleted, or still has an object svcplane deleted.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::metrics::ControllerKind;
use crate::plan::Key;

/// Per owner (a controller and a Service or Endpoints key): the objects written
/// whose result the store has not shown yet.
#[derive(Debug, Default)]
pub struct WriteTracker {
    owners: Mutex<HashMap<(ControllerKind, Key), Owner>>,
}

#[derive(Debug, Default)]
struct Owner {
    expected: HashMap<String, Expected>,
    /// A sync found the store behind and returned: the watch event that
    /// catches it up must queue the owner again.
    waiting: bool,
}

/// What the store must show before it has caught up with one write.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Expected {
    /// Created or updated: the object exists and is not at `superseded` (the
    /// version the update replaced; `None` for a create). `written` is the
    /// version the write returned.
    Written { superseded: Option<String>, written: Option<String> },
    /// Deleted: the object is gone, or at least not at the version deleted
    /// (`None`: any version).
    Deleted { version: Option<String> },
}

impl WriteTracker {
    /// Records a create (`replaced` is `None`) or an update of `name` that
    /// replaced version `replaced` with `written`. An update the apiserver found
    /// to change nothing (the same version back) expects nothing.
    pub fn wrote(
        &self,
        owner: (ControllerKind, &Key),
        name: &str,
        replaced: Option<&str>,
        written: Option<&str>,
    ) {
        if replaced.is_some() && replaced == written {
            return;
        }
        let expected = Expected::Written {
            superseded: replaced.map(str::to_owned),
            written: written.map(str::to_owned),
        };
        self.lock().entry((owner.0, owner.1.clone())).or_default().expected.insert(name.to_owned(), expected);
    }

    /// Records a delete of `name` at `version` (`None` when not known).
    pub fn deleted(&self, owner: (ControllerKind, &Key), name: &str, version: Option<&str>) {
        let expected = Expected::Deleted { version: version.map(str::to_owned) };
        self.lock().entry((owner.0, owner.1.clone())).or_default().expected.insert(name.to_owned(), expected);
    }

    /// Whether the store lags svcplane's own writes for `owner`; `observed` gives
    /// the resourceVersion of each of the owner's objects in the store, by name.
    /// Expectations the store has met are forgotten.
    pub fn is_stale(
        &self,
        owner: (ControllerKind, &Key),
        observed: &HashMap<String, Option<String>>,
    ) -> bool {
        let mut owners = self.lock();
        let id = (owner.0, owner.1.clone());
        let Some(owner) = owners.get_mut(&id) else { return false };
        owner.expected.retain(|name, e| match (e, observed.get(name)) {
            (Expected::Written { .. }, None) => true,
            (Expected::Written { superseded, .. }, Some(seen)) => superseded.is_some() && seen == superseded,
            (Expected::Deleted { .. }, None) => false,
            (Expected::Deleted { version }, Some(seen)) => version.is_none() || seen == version,
        });
        let stale = !owner.expected.is_empty();
        if stale {
            owner.waiting = true;
        } else {
            owners.remove(&id);
        }
        stale
    }

    /// A watch event showed `name` at `version`. Returns whether it only echoes
    /// svcplane's own write, so the owner need not be queued for it (upstream's
    /// EndpointSliceTracker.ShouldSync): the version is the one that write
    /// returned and no sync is waiting for the store to show it. An echo that
    /// arrives before the write's response is recorded is not recognised and
    /// queues as any event.
    ///
    /// The expectation the event meets is forgotten here, and an owner with none
    /// left is dropped: the tracker holds only writes still on their way, not one
    /// entry per object svcplane ever wrote (a Service synced once would
    /// otherwise keep its entry until its next sync).
    pub fn observed(&self, owner: (ControllerKind, &Key), name: &str, version: Option<&str>) -> bool {
        let Some(version) = version else { return false };
        let mut owners = self.lock();
        let id = (owner.0, owner.1.clone());
        let Some(owner) = owners.get_mut(&id) else { return false };
        let (echo, met) = match owner.expected.get(name) {
            Some(Expected::Written { superseded, written }) => (
                !owner.waiting && written.as_deref() == Some(version),
                superseded.as_deref() != Some(version),
            ),
            // Recreated, by someone else, after svcplane deleted it.
            Some(Expected::Deleted { version: deleted }) => {
                (false, deleted.as_deref().is_some_and(|d| d != version))
            }
            None => (false, false),
        };
        if met {
            owner.expected.remove(name);
            if owner.expected.is_empty() {
                owners.remove(&id);
            }
        }
        echo
    }

    /// The watch saw `name` deleted (by svcplane or anyone else, e.g. the garbage
    /// collector): no expectation about it can be met any more, so it is dropped
    /// (upstream's EndpointSliceTracker.HandleDeletion). Without this an object
    /// deleted by another actor right after svcplane wrote it would keep its owner
    /// stale forever; with it, an owner whose objects are all gone is forgotten.
    pub fn observed_deletion(&self, owner: (ControllerKind, &Key), name: &str) {
        let mut owners = self.lock();
        let id = (owner.0, owner.1.clone());
        if let Some(owner) = owners.get_mut(&id) {
            owner.expected.remove(name);
            if owner.expected.is_empty() {
                owners.remove(&id);
            }
        }
    }

    /// Owners with a write still on its way.
    #[cfg(test)]
    fn owners(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(ControllerKind, Key), Owner>> {
        self.owners.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SLICES: ControllerKind = ControllerKind::endpointslice;

    fn key() -> Key {
        Key { namespace: "ns".into(), name: "web".into() }
    }

    fn seen(objects: &[(&str, &str)]) -> HashMap<String, Option<String>> {
        objects.iter().map(|(n, v)| (n.to_string(), Some(v.to_string()))).collect()
    }

    #[test]
    fn a_created_object_not_yet_seen_is_stale_until_observed() {
        let t = WriteTracker::default();
        t.wrote((SLICES, &key()), "web-abc", None, Some("5"));
        assert!(t.is_stale((SLICES, &key()), &seen(&[])));
        assert!(!t.is_stale((SLICES, &key()), &seen(&[("web-abc", "5")])));
        assert!(!t.is_stale((SLICES, &key()), &seen(&[])), "met expectations are forgotten");
    }

    #[test]
    fn an_update_is_stale_while_the_store_shows_the_version_it_replaced() {
        let t = WriteTracker::default();
        t.wrote((SLICES, &key()), "s", Some("3"), Some("4"));
        assert!(t.is_stale((SLICES, &key()), &seen(&[("s", "3")])));
        assert!(!t.is_stale((SLICES, &key()), &seen(&[("s", "9")])), "a later write by anyone counts");
        t.wrote((SLICES, &key()), "s", Some("4"), Some("4"));
        assert!(!t.is_stale((SLICES, &key()), &seen(&[("s", "4")])), "a no-op update expects nothing");
    }

    #[test]
    fn a_delete_is_stale_while_the_store_still_has_the_version_deleted() {
        let t = WriteTracker::default();
        t.deleted((SLICES, &key()), "s", Some("4"));
        assert!(t.is_stale((SLICES, &key()), &seen(&[("s", "4")])));
        assert!(!t.is_stale((SLICES, &key()), &seen(&[("s", "8")])), "recreated by someone else");
        t.deleted((SLICES, &key()), "s", None);
        assert!(t.is_stale((SLICES, &key()), &seen(&[("s", "8")])));
        assert!(!t.is_stale((SLICES, &key()), &seen(&[])));
    }

    #[test]
    fn an_owner_is_kept_only_while_one_of_its_writes_is_on_its_way() {
        let t = WriteTracker::default();
        t.wrote((SLICES, &key()), "a", None, Some("1"));
        t.wrote((SLICES, &key()), "b", Some("1"), Some("2"));
        t.deleted((SLICES, &key()), "c", Some("3"));
        t.wrote((ControllerKind::endpoints, &key()), "web", Some("1"), Some("2"));
        assert_eq!(t.owners(), 2);
        t.observed((SLICES, &key()), "a", Some("1"));
        t.observed((SLICES, &key()), "b", Some("2"));
        assert!(t.is_stale((SLICES, &key()), &seen(&[("a", "1"), ("b", "2"), ("c", "3")])), "c not yet gone");
        t.observed((SLICES, &key()), "c", Some("3"));
        assert_eq!(t.owners(), 2, "the version deleted, seen again, meets nothing");
        t.observed((SLICES, &key()), "c", Some("8"));
        t.observed((ControllerKind::endpoints, &key()), "web", Some("2"));
        assert_eq!(t.owners(), 0, "every write seen: nothing left to hold");
    }

    #[test]
    fn a_written_object_deleted_by_someone_else_stops_being_awaited() {
        let t = WriteTracker::default();
        t.wrote((SLICES, &key()), "s", None, Some("1"));
        t.observed_deletion((SLICES, &key()), "s");
        assert!(!t.is_stale((SLICES, &key()), &seen(&[])));
    }

    #[test]
    fn the_event_of_its_own_write_is_an_echo_unless_a_sync_waits_for_it() {
        let t = WriteTracker::default();
        t.wrote((SLICES, &key()), "s", Some("3"), Some("4"));
        assert!(!t.observed((SLICES, &key()), "other", Some("4")));
        assert!(!t.observed((ControllerKind::mirroring, &key()), "s", Some("4")));
        assert!(!t.observed((SLICES, &key()), "s", None));
        assert!(!t.observed((SLICES, &key()), "s", Some("3")), "the version it replaced");
        assert!(t.observed((SLICES, &key()), "s", Some("4")));
        assert!(!t.observed((SLICES, &key()), "s", Some("4")), "forgotten once seen");
        t.wrote((SLICES, &key()), "s", Some("4"), Some("5"));
        assert!(!t.observed((SLICES, &key()), "s", Some("6")), "a later write by someone else");
        t.wrote((SLICES, &key()), "s", Some("6"), Some("7"));
        // A sync that found the store behind returned and waits for this event.
        assert!(t.is_stale((SLICES, &key()), &seen(&[("s", "6")])));
        assert!(!t.observed((SLICES, &key()), "s", Some("7")), "the waiting sync needs the event");
        assert!(!t.is_stale((SLICES, &key()), &seen(&[("s", "7")])));
    }

    #[test]
    fn a_delete_has_no_echo_to_skip() {
        let t = WriteTracker::default();
        t.deleted((SLICES, &key()), "s", Some("4"));
        assert!(!t.observed((SLICES, &key()), "s", Some("4")));
    }

    #[test]
    fn owners_are_told_apart_by_controller() {
        let t = WriteTracker::default();
        t.wrote((SLICES, &key()), "s", None, Some("1"));
        assert!(!t.is_stale((ControllerKind::mirroring, &key()), &seen(&[])));
        assert!(t.is_stale((SLICES, &key()), &seen(&[])));
    }
}
