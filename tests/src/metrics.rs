//! Reading a Prometheus endpoint in tests: the text of a scrape and one
//! sample out of it.

/// The text a `/metrics` scrape of `addr` returns.
pub async fn scrape(addr: std::net::SocketAddr) -> String {
    let url = format!("http://{addr}/metrics");
    let out = tokio::process::Command::new("curl").args(["-s", &url]).output().await.unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The value of the first sample of `name` (any labels).
pub fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}
