//! Copying a message out of librdkafka's buffers into what is stored: key,
//! value and header values as raw bytes, whatever they contain.

use std::panic::{catch_unwind, AssertUnwindSafe};

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
    }
}

/// The headers in order; `None` if they cannot be read. The rdkafka crate
/// panics on a header name that is not UTF-8 (the protocol allows any
/// bytes); such a message must become a recorded ingest failure, not a
/// pipeline crash that would redeliver it forever.
fn read_headers(m: &BorrowedMessage<'_>) -> Option<Vec<Header>> {
    let Some(headers) = m.headers() else {
        return Some(Vec::new());
    };
    catch_unwind(AssertUnwindSafe(|| {
        headers.iter().map(|h| Header { name: h.key.to_owned(), value: h.value.map(<[u8]>::to_vec) }).collect()
    }))
    .ok()
}
