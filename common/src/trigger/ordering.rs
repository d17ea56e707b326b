//! The ordering mode of a trigger: which of its messages wait for each
//! other. Ingest derives each stored message's set from it (see
//! `dispatch::announce`); a set is delivered one message at a time, in
//! order, and sets run in parallel.

use kt_proto::v1;
use serde::{Deserialize, Serialize};

use super::validate::Checker;

/// `Trigger.ordering`, validated. Stored in the spec (and read there by the
/// ingest statement); triggers stored before the mode existed are `Key`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Ordering {
    /// One set per (topic, key); an unkeyed message is a set of its own.
    #[default]
    Key,
    /// One set per (topic, partition).
    Partition,
    /// Every message a set of its own.
    Unordered,
}

impl Ordering {
    /// The name stored in the spec (`spec->>'ordering'`).
    pub fn as_str(self) -> &'static str {
        match self {
            Ordering::Key => "key",
            Ordering::Partition => "partition",
            Ordering::Unordered => "unordered",
        }
    }
}

pub(super) fn check_ordering(c: &mut Checker, t: &v1::Trigger) -> Ordering {
    match v1::Ordering::try_from(t.ordering) {
        Ok(v1::Ordering::Unspecified | v1::Ordering::Key) => Ordering::Key,
        Ok(v1::Ordering::Partition) => Ordering::Partition,
        Ok(v1::Ordering::Unordered) => Ordering::Unordered,
        Err(_) => {
            c.bad("ordering", format!("unknown ordering mode {}", t.ordering));
            Ordering::Key
        }
    }
}

pub(super) fn ordering_to_proto(ordering: Ordering) -> v1::Ordering {
    match ordering {
        Ordering::Key => v1::Ordering::Key,
        Ordering::Partition => v1::Ordering::Partition,
        Ordering::Unordered => v1::Ordering::Unordered,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_modes_round_trip_and_unknown_values_are_violations() {
        let checked = |t: &v1::Trigger| {
            let mut c = Checker::new("trigger.");
            let mode = check_ordering(&mut c, t);
            (
                mode,
                c.into_violations().into_iter().map(|v| format!("{}: {}", v.field, v.description)).collect::<Vec<_>>(),
            )
        };
        for (wire, mode) in [
            (v1::Ordering::Unspecified, Ordering::Key),
            (v1::Ordering::Key, Ordering::Key),
            (v1::Ordering::Partition, Ordering::Partition),
            (v1::Ordering::Unordered, Ordering::Unordered),
        ] {
            let t = v1::Trigger { ordering: wire.into(), ..Default::default() };
            assert_eq!(checked(&t), (mode, vec![]));
            assert_ne!(ordering_to_proto(mode), v1::Ordering::Unspecified);
        }
        let (_, violations) = checked(&v1::Trigger { ordering: 9, ..Default::default() });
        assert_eq!(violations, ["trigger.ordering: unknown ordering mode 9"]);
        assert_eq!(serde_json::to_string(&Ordering::Partition).unwrap(), "\"partition\"");
    }
}
