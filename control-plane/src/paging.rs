//! Page size and token of the listings whose rows have UUID v7 ids, read in
//! id order: the token is the last id of the previous page.

use kt_proto::status::FieldViolation;
use uuid::Uuid;

pub const DEFAULT_PAGE_SIZE: i64 = 100;
pub const MAX_PAGE_SIZE: i64 = 1_000;

/// The page's row limit and the id it starts after (the nil UUID sorts
/// before every v7 id).
pub fn uuid_page(page_size: i32, page_token: &str) -> Result<(i64, Uuid), FieldViolation> {
    let limit = match i64::from(page_size) {
        0 => DEFAULT_PAGE_SIZE,
        n if (1..=MAX_PAGE_SIZE).contains(&n) => n,
        _ => return Err(FieldViolation::new("page_size", format!("must be 0 (default) or 1-{MAX_PAGE_SIZE}"))),
    };
    let after = match page_token {
        "" => Uuid::nil(),
        token => Uuid::parse_str(token)
            .map_err(|_| FieldViolation::new("page_token", "is not a token from a previous page"))?,
    };
    Ok((limit, after))
}

/// Cuts `rows` (read with `limit + 1`) to the page and returns the next
/// page's token, empty on the last page.
pub fn next_token<T>(rows: &mut Vec<T>, limit: i64, id: impl Fn(&T) -> Uuid) -> String {
    if rows.len() as i64 > limit {
        rows.truncate(limit as usize);
        rows.last().map(|r| id(r).to_string()).unwrap_or_default()
    } else {
        String::new()
    }
}
