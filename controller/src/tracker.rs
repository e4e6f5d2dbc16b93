//! What svcplane last wrote, so a reconcile can tell whether its slice store has
//! caught up with its own writes. Pure bookkeeping, no client.
//!
//! Without this, a second sync that runs before the watch delivers the slice the
//! first sync created sees no slice and creates another: upstream's duplicate-slice
//! problem (kubernetes#92928), which its EndpointSliceTracker guards against the same
//! way, by generation.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

/// Per owner (a Service or Endpoints key): slices written and their generation, and
/// slices deleted.
#[derive(Debug, Default)]
pub struct WriteTracker {
    owners: Mutex<HashMap<String, Expected>>,
}

#[derive(Debug, Default)]
struct Expected {
    /// Slice name → generation svcplane's write produced.
    written: HashMap<String, i64>,
    /// Slice names svcplane deleted.
    deleted: HashSet<String>,
}

impl WriteTracker {
    /// Records a create or update that produced `generation`.
    pub fn wrote(&self, owner: &str, slice: &str, generation: i64) {
        let mut owners = self.lock();
        let e = owners.entry(owner.to_string()).or_default();
        e.deleted.remove(slice);
        e.written.insert(slice.to_string(), generation);
    }

    /// Records a delete.
    pub fn deleted(&self, owner: &str, slice: &str) {
        let mut owners = self.lock();
        let e = owners.entry(owner.to_string()).or_default();
        e.written.remove(slice);
        e.deleted.insert(slice.to_string());
    }

    /// Whether the store (`observed`: name → generation of each slice of this owner
    /// in the store) lags svcplane's own writes. Expectations the store has met are
    /// forgotten.
    pub fn is_stale(&self, owner: &str, observed: &HashMap<String, i64>) -> bool {
        let mut owners = self.lock();
        let Some(e) = owners.get_mut(owner) else { return false };
        e.written.retain(|name, generation| observed.get(name).is_none_or(|seen| seen < generation));
        e.deleted.retain(|name| observed.contains_key(name));
        let stale = !e.written.is_empty() || !e.deleted.is_empty();
        if !stale {
            owners.remove(owner);
        }
        stale
    }

    /// The watch saw `slice` deleted (by svcplane or anyone else, e.g. the
    /// garbage collector): no expectation about it can be met any more, so it is
    /// dropped (upstream's EndpointSliceTracker.HandleDeletion). Without this a
    /// slice deleted by another actor right after svcplane wrote it would keep its
    /// owner "stale" forever.
    pub fn observed_deletion(&self, owner: &str, slice: &str) {
        let mut owners = self.lock();
        if let Some(e) = owners.get_mut(owner) {
            e.written.remove(slice);
            e.deleted.remove(slice);
            if e.written.is_empty() && e.deleted.is_empty() {
                owners.remove(owner);
            }
        }
    }

    /// Forgets an owner (it was deleted).
    pub fn forget(&self, owner: &str) {
        self.lock().remove(owner);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Expected>> {
        self.owners.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_slice_not_yet_seen_is_stale_until_observed() {
        let t = WriteTracker::default();
        t.wrote("ns/web", "web-abc", 1);
        assert!(t.is_stale("ns/web", &HashMap::new()));
        assert!(!t.is_stale("ns/web", &HashMap::from([("web-abc".to_string(), 1)])));
        assert!(!t.is_stale("ns/web", &HashMap::new()), "met expectations are forgotten");
    }

    #[test]
    fn a_written_slice_deleted_by_someone_else_stops_being_awaited() {
        let t = WriteTracker::default();
        t.wrote("o", "s", 1);
        assert!(t.is_stale("o", &HashMap::new()), "created, not seen yet");
        t.observed_deletion("o", "s");
        assert!(!t.is_stale("o", &HashMap::new()), "the watch saw it deleted: nothing left to wait for");
    }

    #[test]
    fn older_generation_is_stale_and_deleted_slice_still_present_is_stale() {
        let t = WriteTracker::default();
        t.wrote("o", "s", 3);
        assert!(t.is_stale("o", &HashMap::from([("s".to_string(), 2)])));
        assert!(!t.is_stale("o", &HashMap::from([("s".to_string(), 4)])));
        t.deleted("o", "s");
        assert!(t.is_stale("o", &HashMap::from([("s".to_string(), 4)])));
        assert!(!t.is_stale("o", &HashMap::new()));
    }
}
