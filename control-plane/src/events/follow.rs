//! One subscriber's stream: what it asked for ([`Subscription`], validated
//! from the request), the replay of stored events after its cursor, then
//! the live events, with no gap and no repeat between the two (the live
//! subscription is taken before the replay starts, and live events at or
//! before the last replayed cursor are skipped).

use std::collections::HashSet;
use std::sync::Arc;

use kt_proto::status::FieldViolation;
use kt_proto::v1::EventKind;
use tokio::sync::{broadcast, mpsc};
use uuid::Uuid;

use super::stream::{is_from_the_future, read_after, Cursor, EventHub, EventRow, BROADCAST_CAPACITY, PAGE};

/// Events queued towards one client; when it stops reading, the broadcast
/// behind it overflows and the stream is cut off.
pub const CLIENT_CAPACITY: usize = 256;

/// Which events a subscriber gets, and from where.
#[derive(Debug, Clone, Default)]
pub struct Subscription {
    /// Empty: every trigger's (and those of no trigger).
    triggers: HashSet<Uuid>,
    /// Stored kind names; empty: every kind.
    kinds: HashSet<String>,
    /// Replay what came after this cursor first; `None`: live events only.
    after: Option<Cursor>,
}

impl Subscription {
    /// From a request's fields; each bad one is a violation.
    pub fn parse(trigger_ids: &[String], kinds: &[i32], after_cursor: &str) -> Result<Self, Vec<FieldViolation>> {
        let mut violations = Vec::new();
        let mut subscription = Self::default();
        for (i, id) in trigger_ids.iter().enumerate() {
            match Uuid::parse_str(id.trim()) {
                Ok(id) => {
                    subscription.triggers.insert(id);
                }
                Err(_) => violations
                    .push(FieldViolation::new(format!("trigger_ids[{i}]"), format!("`{id}` is not a valid UUID"))),
            }
        }
        for (i, kind) in kinds.iter().enumerate() {
            match EventKind::try_from(*kind) {
                Ok(EventKind::Unspecified) | Err(_) => {
                    violations.push(FieldViolation::new(format!("kinds[{i}]"), format!("unknown event kind {kind}")))
                }
                Ok(k) => {
                    subscription.kinds.insert(kind_name(k));
                }
            }
        }
        match after_cursor.trim() {
            "" => {}
            c => match c.parse::<Cursor>() {
                Ok(c) => subscription.after = Some(c),
                Err(()) => {
                    violations.push(FieldViolation::new("after_cursor", "is not a cursor from a previous event"))
                }
            },
        }
        if violations.is_empty() {
            Ok(subscription)
        } else {
            Err(violations)
        }
    }

    fn matches(&self, row: &EventRow) -> bool {
        (self.triggers.is_empty() || row.trigger_id.is_some_and(|t| self.triggers.contains(&t)))
            && (self.kinds.is_empty() || self.kinds.contains(&row.kind))
    }
}

/// Why a subscriber's stream ended (other than the client leaving).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamEnd {
    #[error("cannot read events; resume later with after_cursor")]
    ReplayFailed,
    #[error(
        "this control plane stopped serving; reconnect (to the active replica) with after_cursor = \"{resume}\" to resume"
    )]
    Stopped { resume: String },
    #[error(
        "client too slow: fell more than {BROADCAST_CAPACITY} events behind; reconnect with after_cursor = \"{resume}\" to resume"
    )]
    TooSlow { resume: String },
    #[error("control plane shutting down")]
    Closed,
}

/// What a subscriber receives, in order; the stream ends after an error.
pub type Delivery = Result<Arc<EventRow>, StreamEnd>;

/// Checks a subscription's cursor against the log: a cursor ahead of every
/// event is not one of this server's (another database, a typo) and would
/// silently skip events. `Ok(false)` when it is ahead.
pub async fn cursor_is_known(hub: &EventHub, subscription: &Subscription) -> Result<bool, sqlx::Error> {
    match subscription.after {
        Some(cursor) => Ok(!is_from_the_future(hub.pool(), cursor).await?),
        None => Ok(true),
    }
}

/// Subscribes now (so nothing falls between replay and live) and returns
/// the task that feeds `tx` until the client leaves or the stream ends.
pub fn follow(
    hub: EventHub,
    subscription: Subscription,
    tx: mpsc::Sender<Delivery>,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let live = hub.subscribe();
    async move {
        metrics::gauge!("kt_event_stream_subscribers").increment(1.0);
        feed(&hub, &subscription, live, &tx).await;
        metrics::gauge!("kt_event_stream_subscribers").decrement(1.0);
    }
}

async fn feed(
    hub: &EventHub,
    subscription: &Subscription,
    mut live: broadcast::Receiver<Arc<EventRow>>,
    tx: &mpsc::Sender<Delivery>,
) {
    let mut sent = subscription.after;
    if let Some(mut cursor) = subscription.after {
        loop {
            let rows = match read_after(hub.pool(), cursor, PAGE).await {
                Ok(rows) => rows,
                Err(error) => {
                    tracing::warn!(%error, "event replay failed");
                    let _ = tx.send(Err(StreamEnd::ReplayFailed)).await;
                    return;
                }
            };
            let full = rows.len() as i64 == PAGE;
            for row in rows {
                cursor = row.cursor();
                if subscription.matches(&row) && tx.send(Ok(Arc::new(row))).await.is_err() {
                    return;
                }
            }
            sent = Some(cursor);
            if !full {
                break;
            }
        }
    }
    let resume = |sent: Option<Cursor>| sent.map(|c| c.to_string()).unwrap_or_default();
    loop {
        let row = tokio::select! {
            _ = tx.closed() => return,
            _ = hub.stopped() => {
                // Not awaited: a client that does not read must not keep
                // this stream (and the server's drain) open.
                let _ = tx.try_send(Err(StreamEnd::Stopped { resume: resume(sent) }));
                return;
            }
            row = live.recv() => row,
        };
        match row {
            Ok(row) => {
                if sent.is_some_and(|s| row.cursor() <= s) {
                    continue;
                }
                sent = Some(row.cursor());
                if subscription.matches(&row) && tx.send(Ok(row)).await.is_err() {
                    return;
                }
            }
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                tracing::info!(missed, "event subscriber too slow; cut off");
                let _ = tx.send(Err(StreamEnd::TooSlow { resume: resume(sent) })).await;
                return;
            }
            Err(broadcast::error::RecvError::Closed) => {
                let _ = tx.send(Err(StreamEnd::Closed)).await;
                return;
            }
        }
    }
}

/// `EVENT_KIND_SET_BLOCKED` → `set_blocked`, the stored name.
fn kind_name(kind: EventKind) -> String {
    kind.as_str_name().trim_start_matches("EVENT_KIND_").to_ascii_lowercase()
}
