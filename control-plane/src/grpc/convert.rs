//! Request parsing and row → wire conversions shared by the handlers.

use kt_common::trigger::spec_to_proto;
pub use kt_common::trigger::timestamp;
use kt_proto::status::{invalid_argument, FieldViolation};
use kt_proto::v1;
use tonic::Status;
use uuid::Uuid;

use crate::triggers::store::TriggerRow;

/// Parses the UUID in request field `field`.
pub fn parse_id(field: &str, value: &str) -> Result<Uuid, Status> {
    if value.trim().is_empty() {
        return Err(invalid_argument(&[FieldViolation::new(field, "is required")]));
    }
    Uuid::parse_str(value.trim())
        .map_err(|_| invalid_argument(&[FieldViolation::new(field, format!("`{value}` is not a valid UUID"))]))
}

/// The key filter of a listing: `key` (bytes) or `key_utf8` (text), at
/// most one of them.
pub fn key_filter(key: Option<Vec<u8>>, key_utf8: Option<String>) -> Result<Option<Vec<u8>>, FieldViolation> {
    match (key, key_utf8) {
        (Some(_), Some(_)) => Err(FieldViolation::new("key_utf8", "cannot be combined with key; set one of them")),
        (Some(key), None) => Ok(Some(key)),
        (None, text) => Ok(text.map(String::into_bytes)),
    }
}

pub fn required<T>(field: &str, value: Option<T>) -> Result<T, Status> {
    value.ok_or_else(|| invalid_argument(&[FieldViolation::new(field, "is required")]))
}

/// The public view of a trigger: no secret values.
pub fn trigger_to_proto(row: &TriggerRow) -> v1::Trigger {
    v1::Trigger {
        id: row.id.to_string(),
        enabled: Some(row.enabled),
        generation: row.generation,
        create_time: Some(timestamp(row.created_at)),
        update_time: Some(timestamp(row.updated_at)),
        ..spec_to_proto(&row.spec, None)
    }
}
