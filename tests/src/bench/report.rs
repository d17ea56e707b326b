//! What every scenario reports besides its own numbers: the process's peak
//! resident memory, the clock all latencies are measured on, and rounding.

use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};

/// Everything runs in the bench process, so its peak RSS covers all of it.
pub const RSS_SCOPE: &str =
    "bench process (control plane + node + broker + webhook target + load generator in process)";

static START: OnceLock<(Instant, SystemTime)> = OnceLock::new();
static POSTGRES: OnceLock<Value> = OnceLock::new();
static POSTGRES_SERVER: OnceLock<&'static str> = OnceLock::new();

/// Server settings that change what the numbers mean, read once from the
/// first database the bench creates.
pub const POSTGRES_SETTINGS: &[&str] = &[
    "autovacuum",
    "autovacuum_naptime",
    "checkpoint_timeout",
    "fsync",
    "full_page_writes",
    "max_connections",
    "max_wal_size",
    "server_version",
    "shared_buffers",
    "shared_preload_libraries",
    "synchronous_commit",
    "wal_level",
    "work_mem",
];

/// Records the Postgres settings reported with every scenario.
pub fn set_postgres_settings(settings: Value) {
    let _ = POSTGRES.set(settings);
}

/// Records whether the bench runs on its own cluster (`bench-owned`) or an
/// existing server (`external`), reported with every scenario.
pub fn set_postgres_server(kind: &'static str) {
    let _ = POSTGRES_SERVER.set(kind);
}

/// The process-wide reference instant: produce timestamps embedded in
/// messages and delivery times are both measured from it.
pub fn start() -> Instant {
    START.get_or_init(|| (Instant::now(), SystemTime::now())).0
}

/// Unix microseconds (wall clock) of `micros` after [`start`]: to compare
/// with timestamps Postgres wrote on the same machine.
pub fn unix_micros(micros: u64) -> i64 {
    start();
    let base = START.get().map_or(0, |(_, wall)| wall.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64));
    base + micros as i64
}

pub fn since_start() -> Duration {
    start().elapsed()
}

/// Microseconds since [`start`] at `at`.
pub fn micros_at(at: Instant) -> u64 {
    at.saturating_duration_since(start()).as_micros() as u64
}

/// `VmHWM` of /proc/self/status in MiB (the peak since the last reset), or
/// `None` where there is no procfs.
pub fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(round(kb / 1024.0, 1))
}

/// The 1-minute load average (/proc/loadavg).
pub fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg").ok()?.split_whitespace().next()?.parse().ok()
}

/// Resets the peak so each scenario of `all` reports its own (Linux: writing
/// 5 to /proc/self/clear_refs). Returns whether it worked.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

pub fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

/// Per second, rounded to one decimal.
pub fn per_second(count: usize, elapsed: Duration) -> f64 {
    round(count as f64 / elapsed.as_secs_f64().max(1e-9), 1)
}

/// Adds the memory fields to a scenario's object.
pub fn with_memory(mut object: Map<String, Value>) -> Value {
    object.insert("peak_rss_mb".into(), peak_rss_mb().map_or(Value::Null, Value::from));
    object.insert("rss_scope".into(), RSS_SCOPE.into());
    // Other work on the machine skews every number: say how busy it was.
    object.insert("loadavg_1m".into(), load_average().map_or(Value::Null, Value::from));
    if let Some(kind) = POSTGRES_SERVER.get() {
        object.insert("postgres_server".into(), (*kind).into());
    }
    if let Some(pg) = POSTGRES.get() {
        object.insert("postgres".into(), pg.clone());
    }
    Value::Object(object)
}

/// The `p`-th percentile (0–100) of sorted values, nearest rank.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_percentile_is_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        assert_eq!(percentile(&[3.0], 99.0), 3.0);
    }

    #[test]
    fn test_peak_rss_is_read() {
        assert!(peak_rss_mb().is_some_and(|mb| mb > 0.0));
    }
}
