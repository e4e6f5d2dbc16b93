//! A sorted set of names for the indexes, kept as a sorted `Vec`.
//!
//! Most of the index's sets hold one name or a few: the Services a Pod is in,
//! the slices of a Service, the Pods of a small Service. A `BTreeSet` allocates
//! a node of eleven entries for even one name (about 290 bytes); this set
//! allocates what it holds. Inserting and removing shift the names after the
//! position, which stays cheap for the sets a Service's size bounds (a 10 000-Pod
//! Service moves at most 240 KB).

/// Names in ascending order, each once.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NameSet(Vec<String>);

impl NameSet {
    fn position(&self, name: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|n| n.as_str().cmp(name))
    }

    /// Adds `name`; false when it was there already.
    pub fn insert(&mut self, name: &str) -> bool {
        match self.position(name) {
            Ok(_) => false,
            Err(at) => {
                // Exact growth while small: a set of one name then takes 24
                // bytes, not the four slots Vec reserves first.
                if self.0.len() < 4 && self.0.len() == self.0.capacity() {
                    self.0.reserve_exact(1);
                }
                self.0.insert(at, name.to_owned());
                true
            }
        }
    }

    /// Removes `name`; false when it was not there.
    pub fn remove(&mut self, name: &str) -> bool {
        match self.position(name) {
            Ok(at) => {
                self.0.remove(at);
                if self.0.is_empty() {
                    // An emptied set keeps no allocation.
                    self.0 = Vec::new();
                }
                true
            }
            Err(_) => false,
        }
    }

    /// Whether `name` is in the set.
    pub fn contains(&self, name: &str) -> bool {
        self.position(name).is_ok()
    }

    /// Whether the set holds no name.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The names in ascending order.
    pub fn iter(&self) -> std::slice::Iter<'_, String> {
        self.0.iter()
    }
}

impl FromIterator<String> for NameSet {
    fn from_iter<I: IntoIterator<Item = String>>(names: I) -> Self {
        let mut names: Vec<String> = names.into_iter().collect();
        names.sort_unstable();
        names.dedup();
        names.shrink_to_fit();
        NameSet(names)
    }
}

impl IntoIterator for NameSet {
    type Item = String;
    type IntoIter = std::vec::IntoIter<String>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl<'a> IntoIterator for &'a NameSet {
    type Item = &'a String;
    type IntoIter = std::slice::Iter<'a, String>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Any sequence of inserts and removes leaves the names a BTreeSet would
        /// hold, in the same order, and reports the same outcomes.
        #[test]
        fn a_name_set_behaves_as_a_btree_set(ops in proptest::collection::vec((any::<bool>(), "[a-e]{1,2}"), 0..60)) {
            let (mut set, mut reference) = (NameSet::default(), BTreeSet::new());
            for (insert, name) in ops {
                if insert {
                    prop_assert_eq!(set.insert(&name), reference.insert(name.clone()));
                } else {
                    prop_assert_eq!(set.remove(&name), reference.remove(&name));
                }
                prop_assert_eq!(set.contains(&name), reference.contains(&name));
                prop_assert_eq!(set.iter().collect::<Vec<_>>(), reference.iter().collect::<Vec<_>>());
                prop_assert_eq!(set.is_empty(), reference.is_empty());
            }
        }
    }

    #[test]
    fn collecting_sorts_and_drops_repeats() {
        let set: NameSet = ["b", "a", "b", "c"].into_iter().map(String::from).collect();
        assert_eq!(set.into_iter().collect::<Vec<_>>(), ["a", "b", "c"]);
    }

    #[test]
    fn an_emptied_set_holds_no_allocation() {
        let mut set = NameSet::default();
        set.insert("a");
        set.remove("a");
        assert_eq!(set.0.capacity(), 0);
    }
}
