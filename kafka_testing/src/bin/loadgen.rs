//! `kt-loadgen`: produces a configurable stream of messages to any Kafka broker, at a fixed
//! rate or as fast as the broker takes them, with progress on stderr and a JSON summary on
//! stdout.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use clap::{Parser, ValueEnum};
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer as _, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;

/// How often progress is printed.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// How long to wait at the end for outstanding acknowledgements.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Parser, Debug)]
#[command(
    name = "kt-loadgen",
    about = "Produce test load to a Kafka topic",
    long_about = "Produce test load to a Kafka topic: COUNT messages at RATE msg/s over KEYS \
                  distinct keys. Progress goes to stderr every second; a JSON summary to stdout \
                  at the end. Exits non-zero if any message was not acknowledged."
)]
struct Args {
    /// Bootstrap servers (host:port,...)
    #[arg(long, env = "KT_LOADGEN_BROKERS", default_value = "127.0.0.1:9092")]
    brokers: String,

    /// Topic to produce to (must exist unless the broker auto-creates topics)
    #[arg(long, env = "KT_LOADGEN_TOPIC")]
    topic: String,

    /// Number of messages to produce
    #[arg(long, env = "KT_LOADGEN_COUNT", default_value_t = 10_000)]
    count: u64,

    /// Messages per second; 0 = as fast as possible
    #[arg(long, env = "KT_LOADGEN_RATE", default_value_t = 0)]
    rate: u64,

    /// Number of distinct keys (key-0 .. key-N-1, round robin); 0 = unkeyed messages
    #[arg(long, env = "KT_LOADGEN_KEYS", default_value_t = 0)]
    keys: u64,

    /// Payload size in bytes (JSON payloads grow past it when it is too small for the fields)
    #[arg(long, env = "KT_LOADGEN_PAYLOAD_SIZE", default_value_t = 256)]
    payload_size: usize,

    /// Payload kind
    #[arg(long, env = "KT_LOADGEN_PAYLOAD_KIND", value_enum, default_value_t = PayloadKind::Json)]
    payload_kind: PayloadKind,

    /// Header added to every message, as key=value (repeatable)
    #[arg(long = "header", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    headers: Vec<(String, String)>,

    /// Extra librdkafka producer property, as key=value (repeatable), e.g.
    /// -X security.protocol=SASL_PLAINTEXT -X sasl.mechanism=PLAIN
    #[arg(short = 'X', long = "producer-config", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    producer_config: Vec<(String, String)>,

    /// Seconds of silence (no progress at all) after which to give up
    #[arg(long, env = "KT_LOADGEN_STALL_TIMEOUT", default_value_t = 60)]
    stall_timeout: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum PayloadKind {
    /// A JSON object with the sequence number, key, timestamp and padding
    Json,
    /// Arbitrary bytes (not UTF-8)
    Binary,
    /// Printable ASCII text
    Text,
}

fn parse_key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}

/// Counts acknowledgements from librdkafka's delivery callbacks.
#[derive(Default)]
struct Counters {
    acked: AtomicU64,
    failed: AtomicU64,
    first_error: std::sync::Mutex<Option<String>>,
}

struct LoadgenContext(Arc<Counters>);

impl ClientContext for LoadgenContext {}

impl ProducerContext for LoadgenContext {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => {
                self.0.acked.fetch_add(1, Ordering::Relaxed);
            }
            Err((err, _)) => {
                self.0.failed.fetch_add(1, Ordering::Relaxed);
                let mut first = self.0.first_error.lock().unwrap_or_else(|e| e.into_inner());
                first.get_or_insert_with(|| err.to_string());
            }
        }
    }
}

fn payload(kind: PayloadKind, size: usize, seq: u64, key: Option<&str>, rng: &mut u64) -> Vec<u8> {
    match kind {
        PayloadKind::Json => {
            let ts = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or_default();
            let mut value = serde_json::json!({ "seq": seq, "key": key, "ts": ts, "pad": "" });
            let bare = value.to_string().len();
            if size > bare {
                value["pad"] = serde_json::Value::String("x".repeat(size - bare));
            }
            value.to_string().into_bytes()
        }
        PayloadKind::Binary => {
            // xorshift: cheap, and almost never valid UTF-8.
            let mut bytes = Vec::with_capacity(size);
            while bytes.len() < size {
                *rng ^= *rng << 13;
                *rng ^= *rng >> 7;
                *rng ^= *rng << 17;
                bytes.extend_from_slice(&rng.to_le_bytes());
            }
            bytes.truncate(size);
            if let Some(first) = bytes.first_mut() {
                *first = 0xff; // never valid UTF-8
            }
            bytes
        }
        PayloadKind::Text => {
            let head = format!("message {seq} ");
            let filler = "lorem ipsum dolor sit amet ";
            let mut text = head;
            while text.len() < size {
                text.push_str(filler);
            }
            text.truncate(size.max(1));
            text.into_bytes()
        }
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.count == 0 {
        bail!("--count must be at least 1");
    }

    let counters = Arc::new(Counters::default());
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &args.brokers)
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", "200000")
        .set("message.timeout.ms", "60000");
    for (k, v) in &args.producer_config {
        config.set(k, v);
    }
    let producer: ThreadedProducer<LoadgenContext> =
        config.create_with_context(LoadgenContext(counters.clone())).context("failed to create producer")?;

    let keys: Vec<String> = (0..args.keys).map(|k| format!("key-{k}")).collect();
    let mut rng: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut bytes_sent: u64 = 0;
    let start = Instant::now();
    let mut next_report = start + PROGRESS_EVERY;
    let mut last_report = (start, 0_u64);
    let mut last_progress = (start, 0_u64);
    let stall_timeout = Duration::from_secs(args.stall_timeout.max(1));

    eprintln!(
        "kt-loadgen: {} messages to {} on {} (rate {}, keys {}, {} bytes {:?})",
        args.count,
        args.topic,
        args.brokers,
        if args.rate == 0 { "max".to_owned() } else { format!("{}/s", args.rate) },
        args.keys,
        args.payload_size,
        args.payload_kind
    );

    let mut report = |sent: u64| {
        let now = Instant::now();
        if now < next_report {
            return;
        }
        let acked = counters.acked.load(Ordering::Relaxed);
        let failed = counters.failed.load(Ordering::Relaxed);
        let window = now.duration_since(last_report.0).as_secs_f64().max(1e-9);
        let rate = (acked - last_report.1) as f64 / window;
        eprintln!(
            "kt-loadgen: {:>6.1}s sent {sent} acked {acked} failed {failed} ({rate:.0} acks/s)",
            now.duration_since(start).as_secs_f64()
        );
        last_report = (now, acked);
        next_report = now + PROGRESS_EVERY;
    };

    for seq in 0..args.count {
        if args.rate > 0 {
            let due = start + Duration::from_secs_f64(seq as f64 / args.rate as f64);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
        }
        let key = (!keys.is_empty()).then(|| keys[(seq % keys.len() as u64) as usize].as_str());
        let body = payload(args.payload_kind, args.payload_size, seq, key, &mut rng);
        let headers = (!args.headers.is_empty()).then(|| {
            args.headers
                .iter()
                .fold(OwnedHeaders::new(), |h, (k, v)| h.insert(Header { key: k, value: Some(v.as_str()) }))
        });
        loop {
            let mut record: BaseRecord<'_, str, [u8]> = BaseRecord::to(&args.topic).payload(&body);
            if let Some(key) = key {
                record = record.key(key);
            }
            if let Some(headers) = headers.clone() {
                record = record.headers(headers);
            }
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    // The local queue is full: let deliveries catch up.
                    std::thread::sleep(Duration::from_millis(5));
                    let acked = counters.acked.load(Ordering::Relaxed) + counters.failed.load(Ordering::Relaxed);
                    if acked != last_progress.1 {
                        last_progress = (Instant::now(), acked);
                    } else if last_progress.0.elapsed() > stall_timeout {
                        bail!("no acknowledgement for {stall_timeout:?}; is {} reachable?", args.brokers);
                    }
                    report(seq);
                }
                Err((err, _)) => return Err(err).context(format!("failed to queue message {seq}")),
            }
        }
        bytes_sent += body.len() as u64;
        report(seq + 1);
    }

    // Wait for outstanding acknowledgements, reporting as they come in.
    let flush_deadline = Instant::now() + FLUSH_TIMEOUT;
    while producer.in_flight_count() > 0 && Instant::now() < flush_deadline {
        std::thread::sleep(Duration::from_millis(50));
        report(args.count);
    }
    let _ = producer.flush(Duration::from_secs(1));

    let elapsed = start.elapsed().as_secs_f64();
    let acked = counters.acked.load(Ordering::Relaxed);
    let failed = counters.failed.load(Ordering::Relaxed);
    eprintln!(
        "kt-loadgen: done in {elapsed:.1}s: sent {} acked {acked} failed {failed} ({:.0} acks/s)",
        args.count,
        acked as f64 / elapsed.max(1e-9)
    );
    let unacked = args.count.saturating_sub(acked + failed);
    let first_error = counters.first_error.lock().unwrap_or_else(|e| e.into_inner()).clone();
    println!(
        "{}",
        serde_json::json!({
            "topic": args.topic,
            "sent": args.count,
            "acked": acked,
            "failed": failed,
            "unacked": unacked,
            "bytes": bytes_sent,
            "elapsed_s": (elapsed * 1000.0).round() / 1000.0,
            "msgs_per_s": (acked as f64 / elapsed.max(1e-9)).round(),
            "first_error": first_error,
        })
    );
    if failed > 0 || unacked > 0 {
        bail!(
            "{failed} messages failed and {unacked} were not acknowledged{}",
            first_error.map(|e| format!(" (first error: {e})")).unwrap_or_default()
        );
    }
    Ok(())
}
