//! The listeners of this process, collected at link time by `#[listener]`.

use std::collections::HashMap;
use std::sync::Arc;

use crate::BuildError;
use crate::listener::ListenerDef;

/// Every `#[txbus::listener]` in the binary. Listeners in a crate that nothing in the binary
/// refers to are not linked; `use that_crate as _;` links them.
#[linkme::distributed_slice]
#[doc(hidden)]
pub static LISTENERS: [ListenerDef];

/// The listeners of this process, by event name and by id.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    by_event: HashMap<&'static str, EventListeners>,
    by_id: HashMap<&'static str, &'static ListenerDef>,
}

/// The listeners of one event, shared by every emit of it without copying.
#[derive(Debug, Clone, Default)]
pub(crate) struct EventListeners {
    pub(crate) defs: Arc<[&'static ListenerDef]>,
    pub(crate) ids: Arc<[&'static str]>,
}

impl Registry {
    /// Indexes `defs`, refusing two listeners with one id.
    pub(crate) fn new(
        defs: impl IntoIterator<Item = &'static ListenerDef>,
    ) -> Result<Self, BuildError> {
        let mut by_id = HashMap::new();
        let mut by_event: HashMap<&'static str, Vec<&'static ListenerDef>> = HashMap::new();
        for def in defs {
            if let Some(first) = by_id.insert(def.id, def) {
                // Report in a stable order, whatever order the linker chose.
                let (a, b) = sorted_pair(first.location(), def.location());
                return Err(BuildError::DuplicateListener {
                    id: def.id,
                    first: a,
                    second: b,
                });
            }
            by_event.entry(def.event).or_default().push(def);
        }
        let by_event = by_event
            .into_iter()
            .map(|(event, mut defs)| {
                defs.sort_by_key(|def| def.id);
                let ids = defs.iter().map(|def| def.id).collect();
                (
                    event,
                    EventListeners {
                        defs: defs.into(),
                        ids,
                    },
                )
            })
            .collect();
        Ok(Self { by_event, by_id })
    }

    /// The listeners of the event named `event`, sorted by id.
    pub(crate) fn for_event(&self, event: &str) -> EventListeners {
        self.by_event.get(event).cloned().unwrap_or_default()
    }

    /// The listener with this id.
    pub(crate) fn get(&self, id: &str) -> Option<&'static ListenerDef> {
        self.by_id.get(id).copied()
    }

    /// Every listener id, sorted.
    pub(crate) fn ids(&self) -> Vec<&'static str> {
        let mut ids: Vec<_> = self.by_id.keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// Whether any listener is transactional.
    pub(crate) fn has_transactional(&self) -> bool {
        self.by_id.values().any(|def| def.transactional().is_some())
    }

    pub(crate) fn len(&self) -> usize {
        self.by_id.len()
    }
}

fn sorted_pair(a: String, b: String) -> (String, String) {
    if a <= b { (a, b) } else { (b, a) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::listener::{Context, ListenerCall, ListenerKind};

    fn never(_: &str, _: Context) -> ListenerCall {
        Err("not called".into())
    }

    const fn def(id: &'static str, event: &'static str, line: u32) -> ListenerDef {
        ListenerDef {
            id,
            event,
            event_type: || "T",
            kind: ListenerKind::Plain(never),
            file: "src/x.rs",
            line,
        }
    }

    static A: ListenerDef = def("b", "e1", 1);
    static B: ListenerDef = def("a", "e1", 2);
    static C: ListenerDef = def("c", "e2", 3);
    static DUP: ListenerDef = def("a", "e2", 4);

    #[test]
    fn groups_by_event_sorted_by_id() {
        let registry = Registry::new([&A, &B, &C]).unwrap();
        let listeners = registry.for_event("e1");
        let ids: Vec<_> = listeners.defs.iter().map(|d| d.id).collect();
        assert_eq!(ids, ["a", "b"]);
        assert_eq!(&*listeners.ids, ["a", "b"]);
        assert!(registry.for_event("nothing").defs.is_empty());
        assert_eq!(registry.ids(), ["a", "b", "c"]);
        assert_eq!(registry.get("c").map(|d| d.event), Some("e2"));
    }

    #[test]
    fn duplicate_ids_are_refused_with_both_places() {
        let err = Registry::new([&DUP, &A, &B]).unwrap_err();
        let message = err.to_string();
        assert!(
            message.contains("`a` (src/x.rs:2 and src/x.rs:4)"),
            "{message}"
        );
    }
}
