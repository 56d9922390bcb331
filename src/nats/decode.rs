//! How the JetStream inbox turns a message's payload into a receipt: as the accepted event type,
//! or, written by another version of it, as it is.

use std::sync::Arc;

use futures_util::future::BoxFuture;

use crate::bus::EventBus;
use crate::error::Error;
use crate::event::Event;
use crate::message::MessageId;
use crate::receive::Received;
use crate::store::Backend;
use crate::transaction::Transaction;

/// What a message's payload is to this inbox: an event of its type's version, or a payload
/// another version wrote, kept as it is (JSON all the same).
enum Payload<E> {
    Current(E),
    Stored(String, u32),
}

/// Decodes `payload`, written by `version` of `E` (the sender's header; the same as ours when
/// it has none).
fn decode<E: Event>(payload: &[u8], version: Option<u32>) -> Result<Payload<E>, serde_json::Error> {
    match version {
        Some(version) if version != E::VERSION => {
            let value: serde_json::Value = serde_json::from_slice(payload)?;
            Ok(Payload::Stored(value.to_string(), version))
        }
        _ => serde_json::from_slice(payload).map(Payload::Current),
    }
}

pub(super) fn receive<'a, B: Backend, E: Event>(
    bus: &'a EventBus<B>,
    id: MessageId,
    payload: &'a [u8],
    version: Option<u32>,
    trace: Option<Arc<str>>,
) -> Result<BoxFuture<'a, Result<Received, Error>>, serde_json::Error> {
    Ok(match decode::<E>(payload, version)? {
        Payload::Current(event) => Box::pin(bus.receive_traced(id, event, trace)),
        Payload::Stored(payload, version) => {
            Box::pin(bus.receive_stored::<E>(id, payload, version, trace))
        }
    })
}

pub(super) fn receive_among<'t, 'c, B: Backend, E: Event>(
    tx: &'t mut Transaction<'c, B>,
    id: MessageId,
    payload: &'t [u8],
    version: Option<u32>,
    trace: Option<Arc<str>>,
) -> BoxFuture<'t, Result<Received, Error>> {
    Box::pin(async move {
        match decode::<E>(payload, version)
            .map_err(|error| Error::Invalid(format!("its payload does not deserialize: {error}")))?
        {
            Payload::Current(event) => tx.receive_traced(id, &event, trace).await,
            Payload::Stored(payload, version) => {
                tx.receive_stored::<E>(id, payload, version, trace).await
            }
        }
    })
}
