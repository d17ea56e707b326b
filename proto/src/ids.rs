//! Strongly typed ids. On the wire every id is a UUID string; parsing a bad
//! one is a client error that names the field.

use std::fmt;
use std::str::FromStr;

use uuid::Uuid;

/// An id string that is not a UUID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{value}` is not a valid UUID")]
pub struct InvalidId {
    pub value: String,
}

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub Uuid);

        impl $name {
            /// A fresh, time-ordered (v7) id.
            pub fn new() -> Self {
                Self(Uuid::now_v7())
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl FromStr for $name {
            type Err = InvalidId;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s.trim())
                    .map(Self)
                    .map_err(|_| InvalidId { value: s.to_owned() })
            }
        }

        impl From<Uuid> for $name {
            fn from(u: Uuid) -> Self {
                Self(u)
            }
        }

        impl From<$name> for Uuid {
            fn from(id: $name) -> Self {
                id.0
            }
        }
    };
}

uuid_id!(
    /// Identifies a trigger.
    TriggerId
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_ids_round_trip_through_strings() {
        let id = TriggerId::new();
        let parsed: TriggerId = id.to_string().parse().unwrap();
        assert_eq!(parsed, id);
    }

    #[test]
    fn test_malformed_ids_are_rejected_with_the_value() {
        for bad in ["", "123", "not-a-uuid", "0190b4c8-9c1e-7000-8000-00000000000g"] {
            let err = bad.parse::<TriggerId>().unwrap_err();
            assert_eq!(err.value, bad);
        }
    }

    #[test]
    fn test_new_ids_are_time_ordered() {
        let a = TriggerId::new();
        let b = TriggerId::new();
        assert!(a < b);
        assert_eq!(a.0.get_version_num(), 7);
    }
}
