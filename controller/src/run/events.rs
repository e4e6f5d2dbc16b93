//! Warning Events whose note says what happened last.
//!
//! kube-runtime's [`Recorder`] makes every later Event of one object, reason
//! and action a series of the first and keeps the first note (client-go's
//! events.k8s.io broadcaster does the same), so `kubectl describe` would show
//! a failure or a hint refusal that no longer holds. kube-controller-manager's
//! endpoint controllers record through the core/v1 recorder, whose correlator
//! counts an identical message on one Event and starts a new Event for a new
//! message: this does the same, with one [`Recorder`] per object and reason,
//! replaced when the note changes.

use std::collections::HashMap;
use std::sync::Mutex;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::Client;
use kube::runtime::events::{Event, Recorder, Reporter};

/// Subjects remembered at most; beyond, the map starts again (a note repeated
/// after that only starts a new Event).
const MAX_SUBJECTS: usize = 10_000;

/// The object (kind/namespace/name) and reason an Event is about.
type Subject = (String, String);

/// Publishes Events: an identical note is a repeat, a new note a new Event.
pub struct Events {
    client: Client,
    reporter: Reporter,
    /// The last note of each subject and the Recorder that published it.
    last: Mutex<HashMap<Subject, (Option<String>, Recorder)>>,
}

impl Events {
    /// Events reported by `reporter`.
    pub fn new(client: Client, reporter: Reporter) -> Self {
        Self { client, reporter, last: Mutex::default() }
    }

    /// Publishes `event` on `on`.
    pub async fn publish(&self, event: &Event, on: &ObjectReference) -> Result<(), kube::Error> {
        let recorder = {
            let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
            if last.len() >= MAX_SUBJECTS {
                last.clear();
            }
            let subject = format!(
                "{}/{}/{}",
                on.kind.as_deref().unwrap_or_default(),
                on.namespace.as_deref().unwrap_or_default(),
                on.name.as_deref().unwrap_or_default()
            );
            let entry = last
                .entry((subject, event.reason.clone()))
                .or_insert_with(|| (event.note.clone(), self.fresh()));
            if entry.0 != event.note {
                *entry = (event.note.clone(), self.fresh());
            }
            entry.1.clone()
        };
        recorder.publish(event, on).await
    }

    fn fresh(&self) -> Recorder {
        Recorder::new(self.client.clone(), self.reporter.clone())
    }
}
