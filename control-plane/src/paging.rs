//! Page size and token of every listing. Rows are read in id order and the
//! token is the last id of the previous page, so a page costs an index range
//! scan however deep it is, and rows inserted meanwhile never shift a page.

use kt_proto::status::FieldViolation;
use uuid::Uuid;

pub const DEFAULT_PAGE_SIZE: i64 = 100;
pub const MAX_PAGE_SIZE: i64 = 1_000;

/// An id type listings page by.
pub trait PageKey: Sized + ToString {
    /// Sorts before every id: where the first page starts.
    const BEFORE_ALL: Self;
    fn from_token(token: &str) -> Option<Self>;
}

/// UUID v7 ids (triggers, work orders, dead letters): the nil UUID sorts
/// before all of them.
impl PageKey for Uuid {
    const BEFORE_ALL: Self = Uuid::nil();
    fn from_token(token: &str) -> Option<Self> {
        Uuid::parse_str(token).ok()
    }
}

/// Serial ids (message sets), which start at 1.
impl PageKey for i64 {
    const BEFORE_ALL: Self = 0;
    fn from_token(token: &str) -> Option<Self> {
        token.parse().ok().filter(|id| *id > 0)
    }
}

/// The page's row limit and the id it starts after.
pub fn page<K: PageKey>(page_size: i32, page_token: &str) -> Result<(i64, K), FieldViolation> {
    let limit = match i64::from(page_size) {
        0 => DEFAULT_PAGE_SIZE,
        n if (1..=MAX_PAGE_SIZE).contains(&n) => n,
        _ => return Err(FieldViolation::new("page_size", format!("must be 0 (default) or 1-{MAX_PAGE_SIZE}"))),
    };
    let after = match page_token {
        "" => K::BEFORE_ALL,
        token => K::from_token(token)
            .ok_or_else(|| FieldViolation::new("page_token", "is not a token from a previous page"))?,
    };
    Ok((limit, after))
}

/// Cuts `rows` (read with `limit + 1`) to the page and returns the next
/// page's token, empty on the last page.
pub fn next_token<T, K: ToString>(rows: &mut Vec<T>, limit: i64, id: impl Fn(&T) -> K) -> String {
    if rows.len() as i64 > limit {
        rows.truncate(limit as usize);
        rows.last().map(|r| id(r).to_string()).unwrap_or_default()
    } else {
        String::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_sizes_and_tokens() {
        assert_eq!(page::<i64>(0, ""), Ok((DEFAULT_PAGE_SIZE, 0)));
        assert_eq!(page::<i64>(7, "42"), Ok((7, 42)));
        assert_eq!(page::<Uuid>(MAX_PAGE_SIZE as i32, ""), Ok((MAX_PAGE_SIZE, Uuid::nil())));
        for (size, token, field) in
            [(-1, "", "page_size"), (1_001, "", "page_size"), (1, "0", "page_token"), (1, "x", "page_token")]
        {
            assert_eq!(page::<i64>(size, token).unwrap_err().field, field, "{size} {token}");
        }
        assert_eq!(page::<Uuid>(1, "42").unwrap_err().field, "page_token");
    }

    #[test]
    fn test_next_token_is_the_last_id_of_a_full_page() {
        let mut rows = vec![3_i64, 5, 8];
        assert_eq!(next_token(&mut rows, 2, |r| *r), "5");
        assert_eq!(rows, [3, 5]);
        assert_eq!(next_token(&mut rows, 2, |r| *r), "");
    }
}
