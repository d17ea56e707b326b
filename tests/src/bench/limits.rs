//! The limits every delivery scenario is compared with, measured in the
//! same run (DESIGN §6): how fast the node's own webhook client POSTs to the
//! bench's target at the node's concurrency with no database
//! (`limit_post_per_s`), and how fast the server takes the rows of delivered
//! work orders when the production statement writes them in batches with no
//! HTTP (`limit_db_work_orders_per_s`). A delivery path can go no faster
//! than the slower of the two; `ratio_to_limit` says how close it gets.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use chrono::Utc;
use kt_common::dispatch::grant::{self, Room};
use kt_common::dispatch::round::{self, AfterSuccess, Posted, Success};
use kt_common::dispatch::{Attempt, Candidate};
use kt_common::trigger::{TriggerSecrets, WebhookTarget};
use kt_common::webhook_policy::WebhookPolicy;
use kt_data_plane::delivery::{build_body, DeliveryOutcome, MessageForBody, Payload, WebhookClient};
use serde_json::{json, Map, Value};
use uuid::Uuid;

use super::copy::{key_of, value_of};
use super::report::{per_second, round};
use super::{stack, Options};
use crate::webhook::WebhookReceiver;
use crate::TestDb;

/// How long the POST limit runs: long enough for the connection pool and
/// the target to reach a steady state, short beside any scenario.
pub const POST_SECONDS: Duration = Duration::from_secs(3);
/// Work orders the database limit writes: 40 statements of [`DB_BATCH`].
pub const DB_WORK_ORDERS: usize = 20_000;
/// Work orders per statement, about what a node's group commit holds when
/// it is saturated.
pub const DB_BATCH: usize = 500;
/// Concurrent statements, as a node has group commits in flight at once.
pub const DB_CLIENTS: usize = 2;

/// Both limits of one scenario run; a limit that could not be measured is
/// reported as null with its error, and the ratio is then null too.
pub struct Limits {
    pub post: Result<f64, String>,
    pub db: Result<f64, String>,
    pub concurrency: usize,
}

impl Limits {
    /// Measures both, one after the other (never concurrently with each
    /// other or with the system under test).
    pub async fn measure(scenario: &str, opts: &Options) -> Self {
        let concurrency = node_concurrency(opts);
        let post = limit_post(concurrency, POST_SECONDS).await.map_err(|e| format!("{e:#}"));
        match &post {
            Ok(rate) => {
                crate::progress!(scenario, "limit: webhook client POSTed {rate:.0}/s at concurrency {concurrency}")
            }
            Err(e) => crate::progress!(scenario, "limit: POST limit failed: {e}"),
        }
        let db =
            limit_db(&opts.postgres.admin_url, opts.partitions, DB_WORK_ORDERS).await.map_err(|e| format!("{e:#}"));
        match &db {
            Ok(rate) => crate::progress!(scenario, "limit: commit_successes wrote {rate:.0} work orders/s"),
            Err(e) => crate::progress!(scenario, "limit: database limit failed: {e}"),
        }
        Self { post, db, concurrency }
    }

    /// `ratio_to_limit` of `rate`.
    pub fn ratio(&self, rate: f64) -> Option<f64> {
        ratio_to_limit(rate, &[self.post.as_ref().ok().copied(), self.db.as_ref().ok().copied()])
    }

    /// Adds the limits and `ratio_to_limit` of `rate` to a result line.
    pub fn report(&self, o: &mut Map<String, Value>, rate: f64) {
        o.insert("limit_post_per_s".into(), self.post.as_ref().ok().copied().into());
        o.insert("limit_db_work_orders_per_s".into(), self.db.as_ref().ok().copied().into());
        o.insert("ratio_to_limit".into(), self.ratio(rate).map(|r| round(r, 3)).into());
        let mut detail = json!({
            "post": format!(
                "kt_data_plane WebhookClient, {} concurrent POSTs of a typical work-order body to the bench's \
                 webhook target for {} s, no database",
                self.concurrency,
                POST_SECONDS.as_secs()
            ),
            "db": format!(
                "kt_common::dispatch::round::commit_successes on {DB_WORK_ORDERS} stored, claimed keyless sets \
                 (work order insert, message delete, set delete, one event each), {DB_BATCH} per statement, \
                 {DB_CLIENTS} clients, a throwaway database on the same server, no HTTP"
            ),
        });
        if let Err(e) = &self.post {
            detail["post_error"] = e.as_str().into();
        }
        if let Err(e) = &self.db {
            detail["db_error"] = e.as_str().into();
        }
        o.insert("limits".into(), detail);
    }
}

/// `rate` over the lowest limit; `None` when a limit is missing or not
/// positive (a ratio against a limit that was not measured would mislead).
pub fn ratio_to_limit(rate: f64, limits: &[Option<f64>]) -> Option<f64> {
    let lowest = limits.iter().try_fold(f64::INFINITY, |low, l| l.map(|l| low.min(l)))?;
    (lowest.is_finite() && lowest > 0.0 && rate.is_finite()).then(|| rate / lowest)
}

/// The node's work-order concurrency: `--workers`, else the node's default.
pub fn node_concurrency(opts: &Options) -> usize {
    opts.workers.unwrap_or_else(|| kt_data_plane::Config::new("", "").workers)
}

/// `items` cut into batches of at most `batch`, dealt round robin to
/// `clients` lists, so the clients get the same work.
pub fn deal<T>(items: Vec<T>, batch: usize, clients: usize) -> Vec<Vec<Vec<T>>> {
    let mut out: Vec<Vec<Vec<T>>> = (0..clients.max(1)).map(|_| Vec::new()).collect();
    let mut items = items.into_iter().peekable();
    let mut turn = 0;
    while items.peek().is_some() {
        let chunk: Vec<T> = items.by_ref().take(batch.max(1)).collect();
        let n = out.len();
        out[turn % n].push(chunk);
        turn += 1;
    }
    out
}

/// A body like the scenarios' messages: a ~100-byte JSON value with a key,
/// built by the node's own body builder.
fn typical_body() -> String {
    let key = key_of(0, 1_000);
    build_body(&MessageForBody {
        topic: "bench-limit".into(),
        partition: 0,
        offset: 0,
        value: Some(value_of(0, key.as_deref(), None)),
        key: key.map(String::into_bytes),
        ts_ms: Some(Utc::now().timestamp_millis()),
        headers: Vec::new(),
    })
}

/// `concurrency` loops, each POSTing and awaiting the answer before the
/// next, for `duration`: what the node's workers do when the database costs
/// nothing. Every request must succeed.
async fn limit_post(concurrency: usize, duration: Duration) -> anyhow::Result<f64> {
    let receiver = WebhookReceiver::start("127.0.0.1:0".parse()?).await?;
    let client = WebhookClient::new(WebhookPolicy::default())?;
    let target =
        Arc::new(WebhookTarget { url: receiver.url(), headers: Vec::new(), timeout_ms: 0, format: Default::default() });
    let secrets = Arc::new(TriggerSecrets::default());
    let body = Payload::json(typical_body());
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let (client, target, secrets, body) = (client.clone(), target.clone(), secrets.clone(), body.clone());
        tasks.spawn(async move {
            let mut done = 0usize;
            while Instant::now() < deadline {
                let key = Uuid::new_v4().to_string();
                match client.deliver(&target, &secrets, body.clone(), &key).await {
                    DeliveryOutcome::Succeeded => done += 1,
                    other => anyhow::bail!("a POST to the bench's target did not succeed: {other:?}"),
                }
            }
            Ok(done)
        });
    }
    let mut done = 0;
    while let Some(joined) = tasks.join_next().await {
        done += joined.context("a POST loop panicked")??;
    }
    Ok(per_second(done, started.elapsed()))
}

/// A throwaway database on `admin_url`'s server with `n` keyless messages
/// stored and announced as the ordered scenario stores them, every set
/// claimed as the scheduler claims them and its candidate read as a worker
/// reads it; then the clock runs over the group commits alone.
async fn limit_db(admin_url: &str, partitions: i32, n: usize) -> anyhow::Result<f64> {
    let db = TestDb::create_on(admin_url).await?;
    let result = async {
        let pool = kt_common::db::connect(&db.url, DB_CLIENTS as u32).await?;
        kt_common::db::migrate(&pool).await.context("failed to migrate the limit's database")?;
        let trigger = Uuid::now_v7();
        sqlx::query(
            "INSERT INTO triggers (id, name, enabled, generation, group_id, spec)
             VALUES ($1, 'bench-limit-db', true, 1, $2, '{}')",
        )
        .bind(trigger)
        .bind(format!("kt-bench-limit-{trigger}"))
        .execute(&pool)
        .await?;
        let topic = "bench-limit-db";
        stack::store_messages(&pool, trigger, topic, n, 0, partitions).await?;
        stack::announce_sets(&pool, trigger, topic, false).await?;
        let room = Room { trigger_id: trigger, sets: n as i32, lease_secs: 3_600.0 };
        let claims = grant::claim_grantable(&pool, &[room], n as i64).await?;
        anyhow::ensure!(claims.len() == n, "claimed {} of {n} sets", claims.len());
        let mut successes = Vec::with_capacity(n);
        for chunk in claims.chunks(DB_BATCH) {
            let pairs: Vec<(i64, Uuid)> = chunk.iter().map(|c| (c.set_id, c.lock_id)).collect();
            for c in round::read_candidates(&pool, &pairs).await? {
                successes.push(delivered(c)?);
            }
        }
        anyhow::ensure!(successes.len() == n, "read {} of {n} candidates", successes.len());

        let started = Instant::now();
        let mut clients = tokio::task::JoinSet::new();
        for batches in deal(successes, DB_BATCH, DB_CLIENTS) {
            let pool = pool.clone();
            clients.spawn(async move {
                let mut written = 0usize;
                for batch in batches {
                    let after = round::commit_successes(&pool, &batch).await?;
                    written += after.iter().filter(|(_, a)| !matches!(a, AfterSuccess::Lost)).count();
                }
                anyhow::Ok(written)
            });
        }
        let mut written = 0;
        while let Some(joined) = clients.join_next().await {
            written += joined.context("a commit client panicked")??;
        }
        let elapsed = started.elapsed();
        anyhow::ensure!(written == n, "committed {written} of {n} work orders");
        pool.close().await;
        Ok(per_second(written, elapsed))
    }
    .await;
    // Dropped now so its autovacuum does not run during the scenario.
    drop(db);
    result
}

/// The success a worker would commit for candidate `c`: the body it POSTs
/// and a one-attempt log.
fn delivered(c: Candidate) -> anyhow::Result<Success> {
    let (partition, offset) = c.head.position().context("a claimed set of the limit's backlog has no message")?;
    let body = build_body(&MessageForBody {
        topic: c.topic.clone(),
        partition,
        offset,
        key: c.head.key.clone(),
        value: c.head.value.clone(),
        ts_ms: c.head.ts.map(|t| t.timestamp_millis()),
        headers: c.head.headers(),
    });
    let attempt = Attempt { at: Utc::now(), ms: 1, outcome: "success", error: None };
    let posted = Posted {
        set_id: c.set_id,
        lock_id: c.lock_id,
        trigger_id: c.trigger_id,
        topic: c.topic,
        set_key: c.set_key,
        partition,
        offset,
        body,
        attempt: Some(attempt),
    };
    Ok(Success { posted, keep: false })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_ratio_is_against_the_lower_limit() {
        assert_eq!(ratio_to_limit(500.0, &[Some(1_000.0), Some(2_000.0)]), Some(0.5));
        assert_eq!(ratio_to_limit(500.0, &[Some(4_000.0), Some(1_000.0)]), Some(0.5));
    }

    #[test]
    fn test_ratio_is_null_without_a_usable_limit() {
        assert_eq!(ratio_to_limit(500.0, &[Some(1_000.0), None]), None);
        assert_eq!(ratio_to_limit(500.0, &[Some(0.0), Some(1_000.0)]), None);
        assert_eq!(ratio_to_limit(500.0, &[]), None);
        assert_eq!(ratio_to_limit(f64::NAN, &[Some(1_000.0)]), None);
    }

    #[test]
    fn test_deal_gives_every_item_once_in_bounded_batches() {
        let dealt = deal((0..1_234).collect(), 500, 2);
        assert_eq!(dealt.len(), 2);
        let sizes: Vec<Vec<usize>> = dealt.iter().map(|c| c.iter().map(Vec::len).collect()).collect();
        assert_eq!(sizes, vec![vec![500, 234], vec![500]]);
        let mut all: Vec<i32> = dealt.into_iter().flatten().flatten().collect();
        all.sort_unstable();
        assert_eq!(all, (0..1_234).collect::<Vec<_>>());
        assert!(deal(Vec::<i32>::new(), 500, 2).iter().all(Vec::is_empty));
    }

    #[test]
    fn test_node_concurrency_defaults_to_the_node_default() {
        let mut opts = crate::bench::tests::options();
        assert_eq!(node_concurrency(&opts), kt_data_plane::Config::new("", "").workers);
        opts.workers = Some(7);
        assert_eq!(node_concurrency(&opts), 7);
    }

    #[tokio::test]
    async fn test_db_limit_commits_every_work_order_of_its_backlog() {
        // Two batches and a partial one: every work order is written (the
        // limit fails otherwise) and the rate is a number.
        let rate = limit_db(&crate::admin_database_url(), 3, 2 * DB_BATCH + 7).await.unwrap();
        assert!(rate > 0.0);
    }

    #[test]
    fn test_typical_body_is_the_scenarios_message_shape() {
        let body: Value = serde_json::from_str(&typical_body()).unwrap();
        assert_eq!(body["request"]["key"], "key-0");
        assert_eq!(body["data"]["seq"], 0);
    }
}
