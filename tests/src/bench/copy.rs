//! Synthetic messages and Postgres binary `COPY`: the rows the scenarios
//! produce to Kafka or store directly, encoded in the binary COPY format
//! (<https://www.postgresql.org/docs/current/sql-copy.html#id-1.9.3.55.9.4>).

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

/// Size every synthetic value is padded to.
pub const VALUE_BYTES: usize = 100;
/// Bytes sent per COPY data message.
const CHUNK_BYTES: usize = 1 << 20;

const TEXT_OID: i32 = 25;
const BYTEA_OID: i32 = 17;
/// 2000-01-01T00:00:00Z, Postgres's timestamp epoch, in Unix microseconds.
const PG_EPOCH_UNIX_MICROS: i64 = 946_684_800_000_000;

/// The key of message `i` over `keys` keys (`None` when keyless).
pub fn key_of(i: usize, keys: usize) -> Option<String> {
    (keys > 0).then(|| format!("key-{}", i % keys))
}

/// A JSON value of about [`VALUE_BYTES`] bytes; `sent_at_us` is embedded
/// when given (latency).
pub fn value_of(i: usize, key: Option<&str>, sent_at_us: Option<u64>) -> Vec<u8> {
    let head = match sent_at_us {
        Some(us) => format!(r#"{{"seq":{i},"key":"{}","sent_at_us":{us},"pad":""#, key.unwrap_or("")),
        None => format!(r#"{{"seq":{i},"key":"{}","pad":""#, key.unwrap_or("")),
    };
    let pad = VALUE_BYTES.saturating_sub(head.len() + 2).max(1);
    let mut v = head.into_bytes();
    v.extend(std::iter::repeat_n(b'x', pad));
    v.extend_from_slice(b"\"}");
    v
}

/// One stored message, as ingest writes it.
pub struct Row {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Vec<u8>,
    pub ts: DateTime<Utc>,
}

/// Builds a binary COPY stream.
struct Encoder {
    buf: Vec<u8>,
}

impl Encoder {
    fn new() -> Self {
        let mut buf = Vec::with_capacity(CHUNK_BYTES + 4096);
        buf.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
        buf.extend_from_slice(&0i32.to_be_bytes()); // flags
        buf.extend_from_slice(&0i32.to_be_bytes()); // header extension
        Self { buf }
    }

    fn tuple(&mut self, fields: i16) {
        self.buf.extend_from_slice(&fields.to_be_bytes());
    }

    fn bytes(&mut self, b: &[u8]) {
        self.buf.extend_from_slice(&(b.len() as i32).to_be_bytes());
        self.buf.extend_from_slice(b);
    }

    fn opt_bytes(&mut self, b: Option<&[u8]>) {
        match b {
            Some(b) => self.bytes(b),
            None => self.buf.extend_from_slice(&(-1i32).to_be_bytes()),
        }
    }

    fn i32(&mut self, v: i32) {
        self.bytes(&v.to_be_bytes());
    }

    fn i64(&mut self, v: i64) {
        self.bytes(&v.to_be_bytes());
    }

    fn timestamptz(&mut self, ts: DateTime<Utc>) {
        self.i64(ts.timestamp_micros() - PG_EPOCH_UNIX_MICROS);
    }

    /// An empty one-dimensional array of `oid` elements.
    fn empty_array(&mut self, oid: i32) {
        let mut b = [0u8; 12];
        b[8..].copy_from_slice(&oid.to_be_bytes());
        self.bytes(&b);
    }

    fn trailer(&mut self) {
        self.buf.extend_from_slice(&(-1i16).to_be_bytes());
    }

    fn full(&self) -> bool {
        self.buf.len() >= CHUNK_BYTES
    }

    fn take(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.buf)
    }
}

/// Which table a COPY fills.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Table {
    /// `messages`, every column ingest writes (no headers: empty arrays).
    Messages,
    /// `message_records`, the dedup records.
    MessageRecords,
}

impl Table {
    fn statement(self) -> &'static str {
        match self {
            Table::Messages => {
                "COPY messages (trigger_id, topic, partition, \"offset\", key, value, header_names, header_values, ts) \
                 FROM STDIN (FORMAT binary)"
            }
            Table::MessageRecords => {
                "COPY message_records (trigger_id, topic, partition, \"offset\") FROM STDIN (FORMAT binary)"
            }
        }
    }
}

/// Streams `rows` into `table` with one binary COPY on `conn` (which may be
/// a transaction). Returns the rows copied.
pub async fn copy_rows(
    conn: &mut PgConnection,
    table: Table,
    trigger_id: Uuid,
    topic: &str,
    rows: impl IntoIterator<Item = Row>,
) -> Result<u64, sqlx::Error> {
    let mut copy = conn.copy_in_raw(table.statement()).await?;
    let mut enc = Encoder::new();
    let trigger = trigger_id.into_bytes();
    for row in rows {
        match table {
            Table::Messages => {
                enc.tuple(9);
                enc.bytes(&trigger);
                enc.bytes(topic.as_bytes());
                enc.i32(row.partition);
                enc.i64(row.offset);
                enc.opt_bytes(row.key.as_deref());
                enc.bytes(&row.value);
                enc.empty_array(TEXT_OID);
                enc.empty_array(BYTEA_OID);
                enc.timestamptz(row.ts);
            }
            Table::MessageRecords => {
                enc.tuple(4);
                enc.bytes(&trigger);
                enc.bytes(topic.as_bytes());
                enc.i32(row.partition);
                enc.i64(row.offset);
            }
        }
        if enc.full() {
            let sent = copy.send(enc.take()).await.map(|_| ());
            if let Err(e) = sent {
                let _ = copy.abort("bench: send failed").await;
                return Err(e);
            }
            enc.buf.reserve(CHUNK_BYTES + 4096);
        }
    }
    enc.trailer();
    let sent = copy.send(enc.take()).await.map(|_| ());
    if let Err(e) = sent {
        let _ = copy.abort("bench: send failed").await;
        return Err(e);
    }
    copy.finish().await
}

/// `n` messages over `keys` keys (0: keyless) spread over `partitions` the
/// way a producer would: a key always in the same partition (its index
/// modulo the partition count), keyless round robin; offsets increase per
/// partition from `first_offset`.
pub fn synthetic_rows(n: usize, keys: usize, partitions: i32, first_offset: i64) -> impl Iterator<Item = Row> {
    let mut next = vec![first_offset; partitions.max(1) as usize];
    let ts = Utc::now();
    (0..n).map(move |i| {
        let key = key_of(i, keys);
        let partition = if keys > 0 { (i % keys) % next.len() } else { i % next.len() };
        let offset = next[partition];
        next[partition] += 1;
        Row {
            partition: partition as i32,
            offset,
            value: value_of(i, key.as_deref(), None),
            key: key.map(String::into_bytes),
            ts,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_values_are_json_of_the_intended_size() {
        for i in [0, 7, 123_456_789] {
            let v = value_of(i, Some("key-999"), None);
            assert_eq!(v.len(), VALUE_BYTES);
            let json: serde_json::Value = serde_json::from_slice(&v).unwrap();
            assert_eq!(json["seq"], i);
        }
        let v = value_of(3, None, Some(42));
        assert_eq!(serde_json::from_slice::<serde_json::Value>(&v).unwrap()["sent_at_us"], 42);
    }

    #[test]
    fn test_synthetic_rows_keep_a_key_in_one_partition_with_increasing_offsets() {
        let rows: Vec<Row> = synthetic_rows(20, 3, 2, 0).collect();
        let mut last = std::collections::HashMap::new();
        for r in &rows {
            let k = r.key.clone().unwrap();
            let prev = last.insert(k, (r.partition, r.offset));
            if let Some((p, o)) = prev {
                assert_eq!(p, r.partition);
                assert!(o < r.offset);
            }
        }
        let keyless: Vec<Row> = synthetic_rows(4, 0, 2, 5).collect();
        assert_eq!(
            keyless.iter().map(|r| (r.partition, r.offset)).collect::<Vec<_>>(),
            [(0, 5), (1, 5), (0, 6), (1, 6)]
        );
    }
}
