//! Running the `kt` binary as a process against a sandboxed stack: a
//! control plane on port 0 and its own database, optionally a data-plane
//! node, the mock Kafka cluster and a webhook receiver.

use std::fmt;
use std::process::Stdio;
use std::time::Duration;

use kt_kafka_testing::mock::MockKafka;
use kt_tests::webhook::WebhookReceiver;
use kt_tests::{wait_for, ControlPlaneOptions, TestControlPlane, TestDb, TestNode};
use serde_json::Value;
use tokio::io::AsyncWriteExt as _;
use tokio::process::Command;

/// How long any condition may take to come true.
pub const WAIT: Duration = Duration::from_secs(60);

/// Environment that would change what `kt` does; each test says what it wants.
const SCRUBBED_ENV: &[&str] = &[
    "KT_SERVER",
    "KT_API_TOKEN",
    "KT_OUTPUT",
    "KT_TIMEOUT",
    "KT_TLS_CA",
    "KT_TLS_CERT",
    "KT_TLS_KEY",
    "KT_TLS_DOMAIN",
];

pub fn kt_binary() -> &'static str {
    env!("CARGO_BIN_EXE_kt")
}

/// `kt` with a clean environment, talking to `server`.
pub fn kt_command(server: &str, args: &[&str]) -> Command {
    let mut command = Command::new(kt_binary());
    for var in SCRUBBED_ENV {
        command.env_remove(var);
    }
    command
        .env("KT_SERVER", server)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

/// What one run of `kt` did.
pub struct Out {
    pub args: Vec<String>,
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl fmt::Display for Out {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "`kt {}` exited {}\n--- stdout ---\n{}--- stderr ---\n{}",
            self.args.join(" "),
            self.code,
            self.stdout,
            self.stderr
        )
    }
}

impl Out {
    /// Asserts success.
    #[track_caller]
    pub fn ok(self) -> Self {
        assert_eq!(self.code, 0, "{self}");
        self
    }

    /// Asserts the exit code.
    #[track_caller]
    pub fn code(self, code: i32) -> Self {
        assert_eq!(self.code, code, "{self}");
        self
    }

    /// stdout as one JSON document.
    #[track_caller]
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {self}"))
    }

    /// stdout as one JSON document per line.
    #[track_caller]
    pub fn json_lines(&self) -> Vec<Value> {
        self.stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("line not JSON ({e}): {l}\n{self}")))
            .collect()
    }
}

/// Runs `command` to completion (at most [`WAIT`]), feeding it `stdin`.
pub async fn run(mut command: Command, args: &[&str], stdin: Option<&str>) -> Out {
    if stdin.is_some() {
        command.stdin(Stdio::piped());
    }
    let mut child = command.spawn().expect("kt starts");
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("piped stdin");
        pipe.write_all(input.as_bytes()).await.expect("kt reads stdin");
        drop(pipe);
    }
    let output = tokio::time::timeout(WAIT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("`kt {}` did not finish in {WAIT:?}", args.join(" ")))
        .expect("kt runs");
    Out {
        args: args.iter().map(|a| a.to_string()).collect(),
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

pub struct Stack {
    pub db: TestDb,
    pub cp: TestControlPlane,
    pub kafka: MockKafka,
    pub receiver: WebhookReceiver,
    pub node: Option<TestNode>,
    pub token: Option<String>,
}

impl Stack {
    /// A control plane (no node): enough for the trigger API and events.
    pub async fn api_only(opts: ControlPlaneOptions) -> Self {
        let db = TestDb::create().await.unwrap();
        let token = opts.api_token.clone();
        let cp = TestControlPlane::start(&db, opts).await.unwrap();
        let kafka = MockKafka::new(1).unwrap();
        let receiver = WebhookReceiver::start("127.0.0.1:0".parse().unwrap()).await.unwrap();
        Self { db, cp, kafka, receiver, node: None, token }
    }

    /// Control plane, one node, the mock cluster with `topic` and a webhook.
    pub async fn full(topic: &str, partitions: i32) -> Self {
        let mut stack = Self::api_only(ControlPlaneOptions::default()).await;
        stack.kafka.create_topic(topic, partitions).unwrap();
        stack.node = Some(TestNode::start(&stack.db, &stack.cp.url(), |_| {}).await);
        stack
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = kt_command(&self.cp.url(), args);
        if let Some(token) = &self.token {
            command.env("KT_API_TOKEN", token);
        }
        command
    }

    pub async fn kt(&self, args: &[&str]) -> Out {
        run(self.command(args), args, None).await
    }

    pub async fn kt_stdin(&self, args: &[&str], stdin: &str) -> Out {
        run(self.command(args), args, Some(stdin)).await
    }

    /// A trigger file (YAML) consuming `topic` on the mock cluster and
    /// delivering to the receiver, retrying twice, quickly.
    pub fn trigger_yaml(&self, name: &str, topic: &str) -> String {
        format!(
            "name: {name}\nkafka:\n  hosts: [\"{}\"]\n  topics: [{topic}]\n  initialOffsetResetPolicy: earliest\n\
             webhook:\n  url: {}\n  timeoutMs: 2000\nretry:\n  maxAttempts: 2\n  initialBackoffMs: 20\n  maxBackoffMs: 100\n",
            self.kafka.bootstrap_servers(),
            self.receiver.url()
        )
    }

    /// Polls `kt args` (JSON) until `check` accepts its output.
    pub async fn wait_for_kt(&self, what: &str, args: &[&str], check: impl Fn(&Value) -> bool) -> Value {
        wait_for(what, WAIT, || async {
            let out = self.kt(args).await;
            if out.code != 0 {
                return None;
            }
            let json = out.json();
            check(&json).then_some(json)
        })
        .await
        .unwrap()
    }
}

/// A file in a fresh temporary directory of its own.
pub fn temp_file(name: &str, contents: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("kt-cli-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

/// Lines of a table whose first column is `first`.
pub fn rows<'a>(table: &'a str, first: &str) -> Vec<Vec<&'a str>> {
    table
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|cells| cells.first() == Some(&first))
        .collect()
}
