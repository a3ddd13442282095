//! Kubernetes Events (`events.k8s.io/v1`) about Services and pools, as `kubectl describe`
//! shows them.
//!
//! - [`Notice`]: what to say (type, reason, note), built by the pure reconciler.
//! - [`Recorder`]: publishes notices. The same notice about the same object within
//!   [`SERIES_WINDOW`] updates the earlier Event's `series` (count, last seen) instead of
//!   creating another one, as the API server's own recorders do. Unlike kube's
//!   `runtime::events::Recorder`, the note is part of what makes two notices "the same", so a
//!   new message is never hidden in the series of an older one.
//!
//! - [`EventSink`]: a [`Recorder`] on a task of its own, for callers that must never wait for
//!   the API server (the sync loop); what cannot be published is logged and dropped.
//!
//! Events about cluster-scoped objects (pools) go to the `default` namespace.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::{
        core::v1::ObjectReference,
        events::v1::{Event, EventSeries},
    },
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
};
use serde_json::json;

/// `reportingController` of every Event.
pub const REPORTING_CONTROLLER: &str = "xdp-lb.io/lb-agent";

/// Namespace of Events about cluster-scoped objects.
pub const CLUSTER_EVENT_NAMESPACE: &str = "default";

/// A repeated notice within this window counts into the earlier Event.
pub const SERIES_WINDOW: Duration = Duration::from_secs(6 * 60);

/// `type` of an Event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum EventType {
    Normal,
    Warning,
}

impl EventType {
    pub const fn as_str(self) -> &'static str {
        match self {
            EventType::Normal => "Normal",
            EventType::Warning => "Warning",
        }
    }
}

/// One thing to tell about an object.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Notice {
    pub type_: EventType,
    /// CamelCase, e.g. `IPAllocated`.
    pub reason: String,
    /// What the controller did or tried, CamelCase, e.g. `Allocate`.
    pub action: String,
    /// The message `kubectl describe` shows.
    pub note: String,
}

impl Notice {
    pub fn normal(reason: &str, action: &str, note: impl Into<String>) -> Self {
        Self {
            type_: EventType::Normal,
            reason: reason.into(),
            action: action.into(),
            note: note.into(),
        }
    }

    pub fn warning(reason: &str, action: &str, note: impl Into<String>) -> Self {
        Self {
            type_: EventType::Warning,
            ..Self::normal(reason, action, note)
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("publishing Event {reason} about {kind} {object}: {source}")]
pub struct EventError {
    kind: String,
    object: String,
    reason: String,
    #[source]
    source: kube::Error,
}

/// The object an Event is about, for de-duplication (the uid when known).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Regarding {
    kind: Option<String>,
    namespace: Option<String>,
    name: Option<String>,
    uid: Option<String>,
}

impl Regarding {
    fn of(r: &ObjectReference) -> Self {
        Self {
            kind: r.kind.clone(),
            namespace: r.namespace.clone(),
            name: r.name.clone(),
            uid: r.uid.clone(),
        }
    }
}

/// An Event already published, to count repeats into.
#[derive(Clone, Debug)]
struct Published {
    namespace: String,
    name: String,
    count: i32,
    last: Instant,
}

/// The namespace an Event about `regarding` lives in.
pub fn event_namespace(regarding: &ObjectReference) -> String {
    regarding
        .namespace
        .clone()
        .filter(|ns| !ns.is_empty())
        .unwrap_or_else(|| CLUSTER_EVENT_NAMESPACE.to_string())
}

/// The reference to a Service an Event is about.
pub fn service_reference(svc: &crate::state::ServiceRef) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Service".into()),
        namespace: Some(svc.namespace.clone()),
        name: Some(svc.name.clone()),
        uid: svc.uid.clone(),
        ..ObjectReference::default()
    }
}

/// A new Event object for `notice` about `regarding`, from reporting instance `instance`.
pub fn new_event(
    regarding: &ObjectReference,
    notice: &Notice,
    instance: &str,
    now: Timestamp,
) -> Event {
    let object = regarding.name.as_deref().unwrap_or("object");
    Event {
        metadata: ObjectMeta {
            // The convention of the API server's own recorders: object name and a unique suffix.
            name: Some(format!("{object}.{:x}", now.as_nanosecond())),
            namespace: Some(event_namespace(regarding)),
            ..ObjectMeta::default()
        },
        event_time: Some(MicroTime(now)),
        type_: Some(notice.type_.as_str().to_string()),
        reason: Some(notice.reason.clone()),
        action: Some(notice.action.clone()),
        note: Some(truncate(&notice.note, 1024)),
        regarding: Some(regarding.clone()),
        reporting_controller: Some(REPORTING_CONTROLLER.to_string()),
        reporting_instance: Some(truncate(instance, 128)),
        ..Event::default()
    }
}

/// At most `max` bytes, cut at a character boundary (the API server rejects longer notes).
fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// Publishes Events, counting repeats into series.
pub struct Recorder {
    client: Client,
    instance: String,
    published: HashMap<(Regarding, Notice), Published>,
}

impl Recorder {
    /// `instance`: `reportingInstance`, this agent's identity.
    pub fn new(client: Client, instance: impl Into<String>) -> Self {
        Self {
            client,
            instance: instance.into(),
            published: HashMap::new(),
        }
    }

    /// Publish `notice` about `regarding`: a new Event, or a repeat of one published within
    /// [`SERIES_WINDOW`].
    pub async fn publish(
        &mut self,
        regarding: &ObjectReference,
        notice: &Notice,
    ) -> Result<(), EventError> {
        let now = Instant::now();
        self.published
            .retain(|_, p| now.saturating_duration_since(p.last) < SERIES_WINDOW);
        let key = (Regarding::of(regarding), notice.clone());
        let err = |source| EventError {
            kind: regarding.kind.clone().unwrap_or_default(),
            object: match &regarding.namespace {
                Some(ns) if !ns.is_empty() => {
                    format!("{ns}/{}", regarding.name.as_deref().unwrap_or_default())
                }
                _ => regarding.name.clone().unwrap_or_default(),
            },
            reason: notice.reason.clone(),
            source,
        };
        let wall = Timestamp::now();
        if let Some(p) = self.published.get_mut(&key) {
            let count = p.count.saturating_add(1);
            let series = EventSeries {
                count,
                last_observed_time: MicroTime(wall),
            };
            let api: Api<Event> = Api::namespaced(self.client.clone(), &p.namespace);
            api.patch(
                &p.name,
                &PatchParams::default(),
                &Patch::Merge(json!({ "series": series })),
            )
            .await
            .map_err(err)?;
            p.count = count;
            p.last = now;
            return Ok(());
        }
        let event = new_event(regarding, notice, &self.instance, wall);
        let namespace = event_namespace(regarding);
        let api: Api<Event> = Api::namespaced(self.client.clone(), &namespace);
        let created = api
            .create(&PostParams::default(), &event)
            .await
            .map_err(err)?;
        self.published.insert(
            key,
            Published {
                namespace,
                name: created.metadata.name.unwrap_or_default(),
                count: 1,
                last: now,
            },
        );
        Ok(())
    }
}

/// Publishes notices from a task of its own: [`EventSink::send`] never waits, so a slow or
/// absent API server does not hold the caller up. Dropping it stops the task.
pub struct EventSink {
    tx: tokio::sync::mpsc::UnboundedSender<(ObjectReference, Notice)>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for EventSink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl EventSink {
    /// Start publishing as `instance` (the node name) on the current tokio runtime; `what`
    /// names the Events in the log line of one that could not be published.
    pub fn start(client: Client, instance: &str, what: &'static str) -> EventSink {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(ObjectReference, Notice)>();
        let mut recorder = Recorder::new(client, instance.to_string());
        let task = tokio::spawn(async move {
            while let Some((regarding, notice)) = rx.recv().await {
                if let Err(e) = recorder.publish(&regarding, &notice).await {
                    tracing::warn!(error = %e, "{what} Event not published");
                }
            }
        });
        EventSink { tx, task }
    }

    /// Queue a notice about `regarding`.
    pub fn send(&self, regarding: ObjectReference, notice: Notice) {
        // The task ends only when the sink is dropped.
        let _ = self.tx.send((regarding, notice));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_fields_for_a_service_and_a_pool() {
        let svc = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Service".into()),
            namespace: Some("web".into()),
            name: Some("shop".into()),
            uid: Some("u-1".into()),
            ..ObjectReference::default()
        };
        let now = Timestamp::from_second(1_700_000_000).unwrap();
        let n = Notice::warning("AllocationFailed", "Allocate", "no free IPv4 address");
        let e = new_event(&svc, &n, "node-a", now);
        assert_eq!(e.metadata.namespace.as_deref(), Some("web"));
        assert!(e.metadata.name.as_deref().unwrap().starts_with("shop."));
        assert_eq!(e.type_.as_deref(), Some("Warning"));
        assert_eq!(e.reason.as_deref(), Some("AllocationFailed"));
        assert_eq!(e.action.as_deref(), Some("Allocate"));
        assert_eq!(e.note.as_deref(), Some("no free IPv4 address"));
        assert_eq!(
            e.reporting_controller.as_deref(),
            Some(REPORTING_CONTROLLER)
        );
        assert_eq!(e.reporting_instance.as_deref(), Some("node-a"));
        assert_eq!(e.regarding.as_ref(), Some(&svc));
        assert_eq!(e.event_time, Some(MicroTime(now)));

        let pool = ObjectReference {
            kind: Some("IPAddressPool".into()),
            name: Some("public".into()),
            ..ObjectReference::default()
        };
        let e = new_event(&pool, &n, "node-a", now);
        assert_eq!(
            e.metadata.namespace.as_deref(),
            Some(CLUSTER_EVENT_NAMESPACE)
        );
    }

    #[test]
    fn long_notes_are_cut_at_a_character_boundary() {
        let long = "é".repeat(600);
        let cut = truncate(&long, 1024);
        assert_eq!(cut.len(), 1024);
        assert_eq!(truncate(&"é".repeat(3), 5), "éé");
        assert_eq!(truncate("short", 1024), "short");
    }
}
