//! Copying a message out of librdkafka's buffers into what is stored: key,
//! value and header values as raw bytes, whatever they contain.

use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Once;

use chrono::DateTime;
use rdkafka::message::{BorrowedMessage, Headers};
use rdkafka::Message;

use crate::store::{Header, IngestMessage};

pub fn to_ingest_message(m: &BorrowedMessage<'_>) -> IngestMessage {
    IngestMessage {
        topic: m.topic().to_owned(),
        partition: m.partition(),
        offset: m.offset(),
        key: m.key().map(<[u8]>::to_vec),
        value: m.payload().map(<[u8]>::to_vec),
        headers: read_headers(m),
        // A timestamp outside chrono's range (a broken producer) is dropped
        // rather than failing the message.
        timestamp: m.timestamp().to_millis().and_then(DateTime::from_timestamp_millis),
        filtered: false,
    }
}

thread_local! {
    /// Set while [`read_headers`] runs, so its expected panic is not logged.
    static READING_HEADERS: Cell<bool> = const { Cell::new(false) };
}

/// The headers in order; `None` if they cannot be read.
///
/// Why a caught panic rather than reading the names ourselves: the only
/// accessor is rdkafka's `BorrowedHeaders::try_get`, which turns the C
/// string librdkafka hands out into `&str` with `unwrap()`, so a name that
/// is not UTF-8 (the protocol allows any bytes) panics inside it. Reading
/// the name bytes without it takes `rd_kafka_header_get_all` through FFI,
/// i.e. `unsafe`, which this workspace forbids. The panic is therefore
/// caught (the message becomes a recorded ingest failure, not a pipeline
/// crash that would redeliver it forever) and kept out of the logs by
/// [`quiet_header_panics`]: it is an expected outcome, not a bug.
///
/// The same C string API ends a name at its first NUL byte and gives no
/// length, so a name `a\0b` reads as `a`; librdkafka offers no way to tell,
/// short of the FFI above. That limit is documented in the README.
fn read_headers(m: &BorrowedMessage<'_>) -> Option<Vec<Header>> {
    let Some(headers) = m.headers() else {
        return Some(Vec::new());
    };
    quiet_header_panics();
    READING_HEADERS.with(|r| r.set(true));
    let read = catch_unwind(AssertUnwindSafe(|| {
        headers.iter().map(|h| Header { name: h.key.to_owned(), value: h.value.map(<[u8]>::to_vec) }).collect()
    }));
    READING_HEADERS.with(|r| r.set(false));
    read.ok()
}

/// Wraps the panic hook (Sentry's, or the default printing a backtrace) so
/// that it stays silent for a panic inside [`read_headers`] on this thread.
fn quiet_header_panics() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !READING_HEADERS.with(Cell::get) {
                previous(info);
            }
        }));
    });
}
