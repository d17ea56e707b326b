//! `kt events --follow`: replays, follows live, prints the cursor to resume
//! from when interrupted, and resuming from it neither repeats nor misses an
//! event.

use std::process::Stdio;

use kt_tests::ControlPlaneOptions;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, BufReader, Lines};
use tokio::process::ChildStdout;

use crate::support::{Stack, WAIT};

async fn next_event(lines: &mut Lines<BufReader<ChildStdout>>) -> Value {
    let line = tokio::time::timeout(WAIT, lines.next_line())
        .await
        .expect("an event in time")
        .unwrap()
        .expect("kt still following");
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
}

async fn create(s: &Stack, name: &str) -> String {
    let out = s.kt_stdin(&["triggers", "create", "-f", "-"], &s.trigger_yaml(name, "orders")).await.ok();
    out.json()["id"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn test_follow_prints_the_cursor_on_interrupt_and_resumes_from_it() {
    let s = Stack::api_only(ControlPlaneOptions::default()).await;
    let first = create(&s, "first").await;

    let args = ["events", "--follow", "--after", "0-0", "--kind", "trigger_created", "-o", "json"];
    let mut follower = s.command(&args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut lines = BufReader::new(follower.stdout.take().unwrap()).lines();
    let replayed = next_event(&mut lines).await;
    assert_eq!(replayed["kind"], "EVENT_KIND_TRIGGER_CREATED");
    assert_eq!(replayed["triggerId"], first, "replayed from the start");

    // Live: an event that happens while following.
    let second = create(&s, "second").await;
    let live = next_event(&mut lines).await;
    assert_eq!(live["triggerId"], second);
    let live_cursor = live["cursor"].as_str().unwrap().to_owned();

    // Ctrl-C: the cursor of the last event printed, on stderr.
    let pid = follower.id().unwrap().to_string();
    assert!(tokio::process::Command::new("kill").args(["-INT", &pid]).status().await.unwrap().success());
    let status = tokio::time::timeout(WAIT, follower.wait()).await.expect("stops on SIGINT").unwrap();
    assert!(status.success(), "{status:?}");
    let mut stderr = String::new();
    follower.stderr.take().unwrap().read_to_string(&mut stderr).await.unwrap();
    let resume = stderr
        .split("resume with: kt events --after ")
        .nth(1)
        .unwrap_or_else(|| panic!("no cursor printed: {stderr}"))
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();
    assert_eq!(resume, live_cursor, "{stderr}");
    assert!(stderr.contains("--follow"), "{stderr}");

    // Missed while not following, then resumed: exactly what came after.
    let third = create(&s, "third").await;
    let fourth = create(&s, "fourth").await;
    let resumed = s.kt(&["events", "--after", &resume, "--kind", "trigger_created"]).await.ok().json_lines();
    let ids: Vec<&str> = resumed.iter().map(|e| e["triggerId"].as_str().unwrap()).collect();
    assert_eq!(ids, [third.as_str(), fourth.as_str()], "{resumed:?}");

    // --follow from the cursor does the same, then keeps following.
    let args = ["events", "--follow", "--after", &resume, "--kind", "trigger_created", "-o", "json"];
    let mut follower = s.command(&args).stdout(Stdio::piped()).spawn().unwrap();
    let mut lines = BufReader::new(follower.stdout.take().unwrap()).lines();
    assert_eq!(next_event(&mut lines).await["triggerId"], third);
    assert_eq!(next_event(&mut lines).await["triggerId"], fourth);
    let fifth = create(&s, "fifth").await;
    assert_eq!(next_event(&mut lines).await["triggerId"], fifth);
    follower.kill().await.unwrap();

    // One line per event in a table too, its cursor in the second column.
    let table = s.kt(&["-o", "table", "events", "--kind", "trigger_created"]).await.ok();
    let lines: Vec<Vec<&str>> = table.stdout.lines().map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(lines.len(), 5, "{table}");
    assert!(lines.iter().all(|l| l[2] == "trigger_created"), "{table}");
    assert_eq!(lines[1][1], live_cursor, "{table}");
    assert_eq!(lines[1][3], "trigger=second", "{table}");
}
