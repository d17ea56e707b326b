//! `kt top` in a pseudo-terminal, read back through a terminal emulator
//! (vt100): the screen shows a trigger's numbers, and `q` quits.

use std::io::{Read as _, Write as _};
use std::sync::{Arc, Mutex};

use kt_kafka_testing::produce::{produce_to, TestMessage};
use portable_pty::{native_pty_system, CommandBuilder, PtySize};

use crate::support::{kt_binary, Stack, WAIT};

const ROWS: u16 = 30;
const COLS: u16 = 220;

/// The columns of `name`'s row, by header.
fn row_of(screen: &str, name: &str) -> Option<Vec<(String, String)>> {
    let header: Vec<&str> = screen.lines().find(|l| l.starts_with("TRIGGER "))?.split_whitespace().collect();
    let row: Vec<&str> = screen.lines().find(|l| l.starts_with(&format!("{name} ")))?.split_whitespace().collect();
    Some(header.iter().zip(row).map(|(h, v)| (h.to_string(), v.to_owned())).collect())
}

fn cell<'a>(row: &'a [(String, String)], column: &str) -> &'a str {
    row.iter().find(|(h, _)| h == column).map(|(_, v)| v.as_str()).unwrap_or("")
}

#[tokio::test]
async fn test_top_shows_a_triggers_numbers_in_a_terminal() {
    let s = Stack::full("orders", 1).await;
    s.receiver.set_failing("user-1", true);
    s.kt_stdin(&["triggers", "create", "-f", "-"], &s.trigger_yaml("shop", "orders")).await.ok();
    let messages = vec![
        TestMessage::new("1").key("user-1"),
        TestMessage::new("2").key("user-1"),
        TestMessage::new("3").key("user-2"),
        TestMessage::new("4").key("user-2"),
    ];
    produce_to(&s.kafka.bootstrap_servers(), "orders", messages).await.unwrap();
    s.wait_for_kt("user-1 blocked", &["sets", "list", "--state", "blocked"], |j| {
        j["messageSets"].as_array().is_some_and(|a| a.len() == 1)
    })
    .await;

    let pair = native_pty_system()
        .openpty(PtySize { rows: ROWS, cols: COLS, pixel_width: 0, pixel_height: 0 })
        .expect("a pseudo-terminal");
    let mut command = CommandBuilder::new(kt_binary());
    command.args(["top", "--interval", "0.3"]);
    for var in ["KT_API_TOKEN", "KT_OUTPUT", "KT_TLS_CA", "KT_TLS_CERT", "KT_TLS_KEY", "KT_TLS_DOMAIN"] {
        command.env_remove(var);
    }
    command.env("KT_SERVER", s.cp.url());
    command.env("TERM", "xterm-256color");
    let mut child = pair.slave.spawn_command(command).expect("kt top starts");
    drop(pair.slave);
    let mut reader = pair.master.try_clone_reader().unwrap();
    let mut writer = pair.master.take_writer().unwrap();
    let terminal = Arc::new(Mutex::new(vt100::Parser::new(ROWS, COLS, 0)));
    let feed = terminal.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        while let Ok(n @ 1..) = reader.read(&mut buf) {
            feed.lock().unwrap().process(&buf[..n]);
        }
    });
    let screen = || terminal.lock().unwrap().screen().contents();

    // Two frames at least (rates need two), everything consumed, user-1
    // blocked with its second message waiting behind it.
    let row = kt_tests::wait_for("kt top to show shop's numbers", WAIT, || {
        let row = row_of(&screen(), "shop");
        async move {
            row.filter(|r| {
                cell(r, "STATE") == "running"
                    && cell(r, "LAG") == "0"
                    && cell(r, "BLOCKED") == "1"
                    && cell(r, "WAITING") == "1"
                    && cell(r, "IN/S") != "-"
            })
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}; the screen:\n{}", screen()));
    assert_eq!(cell(&row, "IN-FLIGHT"), "0", "{row:?}");
    assert!(cell(&row, "OLDEST").ends_with('s'), "oldest blocked age: {row:?}");
    assert!(cell(&row, "OUT/S").parse::<f64>().is_ok(), "{row:?}");
    assert!(cell(&row, "IN/S").parse::<f64>().is_ok(), "{row:?}");
    let text = screen();
    assert!(text.starts_with("kt top  http://"), "{text}");
    assert!(text.contains("events: live"), "the event stream is followed: {text}");

    // q quits, and the terminal gets its screen back.
    writer.write_all(b"q").unwrap();
    writer.flush().unwrap();
    let status = kt_tests::wait_for("kt top to quit", WAIT, || {
        let exited = child.try_wait().unwrap();
        async move { exited }
    })
    .await
    .unwrap();
    assert!(status.success(), "{status:?}");
    assert!(row_of(&screen(), "shop").is_none(), "left the alternate screen:\n{}", screen());
}

#[tokio::test]
async fn test_top_needs_a_terminal() {
    let s = Stack::api_only(kt_tests::ControlPlaneOptions::default()).await;
    let out = s.kt(&["top"]).await.code(2);
    assert!(out.stderr.contains("needs a terminal"), "{out}");
}
