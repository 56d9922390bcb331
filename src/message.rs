//! The identity of a message received from outside.

use std::fmt;

use sha2::{Digest, Sha256};

use crate::error::Error;

/// The longest source or key a message id may have, in bytes (it is part of a database key).
const MAX_PART: usize = 255;

/// The identity of a message received from outside: where it comes from, and its key there.
///
/// A message received twice with the same id within the dedup window is accepted once
/// ([`EventBus::receive`](crate::EventBus::receive)).
///
/// ```
/// use txbus::MessageId;
///
/// // A source with its own ids: a broker stream and its message id, a webhook and its delivery id.
/// let id = MessageId::new("stripe-webhooks", "evt_1NXj2dB4");
/// assert_eq!(id.to_string(), "stripe-webhooks/evt_1NXj2dB4");
///
/// // A source without ids: the content is the identity.
/// let a = MessageId::content_hash("csv-import", b"42,alice,100");
/// let b = MessageId::content_hash("csv-import", b"42,alice,100");
/// assert_eq!(a, b);
/// assert_ne!(a, MessageId::content_hash("csv-import", b"43,bob,7"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MessageId {
    source: String,
    key: String,
}

impl MessageId {
    /// The message `key` of `source`. Both must be non-empty and at most 255 bytes; a receive
    /// refuses the id otherwise.
    pub fn new(source: impl Into<String>, key: impl Into<String>) -> Self {
        Self {
            source: source.into(),
            key: key.into(),
        }
    }

    /// An id for a source without message ids: the key is `sha256:` and the SHA-256 of
    /// `content` in hex. SHA-256 because it is stable across versions, platforms and processes
    /// (unlike `std`'s hashers) and collision-resistant: no crafted payload can pass for another
    /// one and have it dropped as a duplicate.
    pub fn content_hash(source: impl Into<String>, content: &[u8]) -> Self {
        Self {
            source: source.into(),
            key: format!("sha256:{:x}", Sha256::digest(content)),
        }
    }

    /// Where the message comes from.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The message's key in its source.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Refuses an id the database cannot store: an empty or too long part.
    pub(crate) fn validate(&self) -> Result<(), Error> {
        for (part, value) in [("source", &self.source), ("key", &self.key)] {
            if value.is_empty() {
                return Err(Error::Invalid(format!(
                    "message id {self:?} has an empty {part}"
                )));
            }
            if value.len() > MAX_PART {
                return Err(Error::Invalid(format!(
                    "the {part} of a message id is at most {MAX_PART} bytes, got {}",
                    value.len()
                )));
            }
        }
        Ok(())
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.source, self.key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_or_long_parts_are_refused() {
        assert!(MessageId::new("s", "k").validate().is_ok());
        let empty = MessageId::new("", "k").validate().unwrap_err().to_string();
        assert!(empty.contains("empty source"), "{empty}");
        assert!(MessageId::new("s", "").validate().is_err());
        let long = MessageId::new("s", "k".repeat(256))
            .validate()
            .unwrap_err()
            .to_string();
        assert!(long.contains("at most 255 bytes"), "{long}");
    }

    #[test]
    fn content_hash_keys_are_stable() {
        let id = MessageId::content_hash("import", b"abc");
        assert_eq!(
            id.key(),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(id.source(), "import");
        assert_eq!(
            MessageId::content_hash("import", b"").key(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
