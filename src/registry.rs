//! The listeners of this process, collected at link time by `#[listener]`.

use std::collections::HashMap;
use std::sync::Arc;

use crate::error::BuildError;
use crate::listener::ListenerDef;

/// Every `#[txbus::listener]` in the binary. Listeners in a crate that nothing in the binary
/// refers to are not linked; `use that_crate as _;` links them.
#[linkme::distributed_slice]
#[doc(hidden)]
pub static LISTENERS: [ListenerDef];

/// The listeners of this process, by event name and by the names their deliveries are stored
/// under (ids and aliases).
#[derive(Debug, Default)]
pub(crate) struct Registry {
    by_event: HashMap<&'static str, EventListeners>,
    by_name: HashMap<&'static str, &'static ListenerDef>,
    /// Every listener, sorted by id.
    defs: Vec<&'static ListenerDef>,
}

/// The listeners of one event, shared by every emit of it without copying.
#[derive(Debug, Clone, Default)]
pub(crate) struct EventListeners {
    pub(crate) defs: Arc<[&'static ListenerDef]>,
    pub(crate) ids: Arc<[&'static str]>,
}

impl Registry {
    /// Indexes `defs`, refusing two listeners with one id, and an alias that is the id or alias
    /// of another listener.
    pub(crate) fn new(
        defs: impl IntoIterator<Item = &'static ListenerDef>,
    ) -> Result<Self, BuildError> {
        let mut defs: Vec<&'static ListenerDef> = defs.into_iter().collect();
        // Checked and reported in a stable order, whatever order the linker chose.
        defs.sort_by_key(|def| (def.id, def.file, def.line));
        let mut by_name = HashMap::new();
        for def in &defs {
            if let Some(first) = by_name.insert(def.id, *def) {
                let (a, b) = sorted_pair(first.location(), def.location());
                return Err(BuildError::DuplicateListener {
                    id: def.id,
                    first: a,
                    second: b,
                });
            }
        }
        for def in &defs {
            for &alias in def.aliases {
                if let Some(other) = by_name.insert(alias, *def) {
                    return Err(BuildError::AliasConflict {
                        alias,
                        listener: def.id,
                        location: def.location(),
                        other: other.id,
                    });
                }
            }
        }
        let mut by_event: HashMap<&'static str, Vec<&'static ListenerDef>> = HashMap::new();
        for def in &defs {
            by_event.entry(def.event).or_default().push(def);
        }
        let by_event = by_event
            .into_iter()
            .map(|(event, defs)| {
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
        Ok(Self {
            by_event,
            by_name,
            defs,
        })
    }

    /// The listeners of the event named `event`, sorted by id.
    pub(crate) fn for_event(&self, event: &str) -> EventListeners {
        self.by_event.get(event).cloned().unwrap_or_default()
    }

    /// The listener whose deliveries are stored under `name` (its id or an alias).
    pub(crate) fn get(&self, name: &str) -> Option<&'static ListenerDef> {
        self.by_name.get(name).copied()
    }

    /// The listener whose deliveries are stored under `name`, with that name as a static string.
    pub(crate) fn resolve(&self, name: &str) -> Option<(&'static str, &'static ListenerDef)> {
        self.by_name.get_key_value(name).map(|(k, v)| (*k, *v))
    }

    /// Every listener id, sorted.
    pub(crate) fn ids(&self) -> Vec<&'static str> {
        self.defs.iter().map(|def| def.id).collect()
    }

    /// Every name deliveries of these listeners are stored under (ids and aliases), sorted.
    pub(crate) fn names(&self) -> Vec<&'static str> {
        let mut names: Vec<_> = self.by_name.keys().copied().collect();
        names.sort_unstable();
        names
    }

    /// The version of its event's type each name knows, as a JSON object (`{"name": 2, ...}`):
    /// claims skip deliveries stored at a newer version.
    pub(crate) fn versions(&self) -> String {
        let versions: serde_json::Map<String, serde_json::Value> = self
            .by_name
            .iter()
            .map(|(name, def)| ((*name).to_owned(), def.version.into()))
            .collect();
        serde_json::Value::Object(versions).to_string()
    }

    /// Every listener, sorted by id.
    pub(crate) fn defs(&self) -> &[&'static ListenerDef] {
        &self.defs
    }

    /// Whether any listener is transactional.
    pub(crate) fn has_transactional(&self) -> bool {
        self.defs.iter().any(|def| def.transactional().is_some())
    }

    pub(crate) fn len(&self) -> usize {
        self.defs.len()
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
        aliased(id, &[], event, line)
    }

    const fn aliased(
        id: &'static str,
        aliases: &'static [&'static str],
        event: &'static str,
        line: u32,
    ) -> ListenerDef {
        ListenerDef {
            id,
            aliases,
            event,
            event_type: || "T",
            version: 1,
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

    static RENAMED: ListenerDef = aliased("new", &["old", "older"], "e1", 5);
    static CLASHES_WITH_ID: ListenerDef = aliased("x", &["a"], "e1", 6);
    static CLASHES_WITH_ALIAS: ListenerDef = aliased("y", &["old"], "e1", 7);

    #[test]
    fn aliases_resolve_to_their_listener() {
        let registry = Registry::new([&A, &RENAMED]).unwrap();
        assert_eq!(registry.get("old").map(|d| d.id), Some("new"));
        assert_eq!(
            registry.resolve("older").map(|(n, d)| (n, d.id)),
            Some(("older", "new"))
        );
        assert_eq!(registry.ids(), ["b", "new"]);
        assert_eq!(registry.names(), ["b", "new", "old", "older"]);
        assert_eq!(registry.len(), 2);
        assert_eq!(&*registry.for_event("e1").ids, ["b", "new"]);
    }

    #[test]
    fn an_alias_that_names_another_listener_is_refused() {
        for (defs, alias, other) in [
            (vec![&B, &CLASHES_WITH_ID], "a", "a"),
            (vec![&RENAMED, &CLASHES_WITH_ALIAS], "old", "new"),
        ] {
            let err = Registry::new(defs).unwrap_err();
            let BuildError::AliasConflict {
                alias: a, other: o, ..
            } = &err
            else {
                panic!("{err:?}");
            };
            assert_eq!((*a, *o), (alias, other), "{err}");
        }
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
