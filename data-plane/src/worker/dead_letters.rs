//! Producing dead letters to a trigger's `dead_letter_topic`: one idempotent
//! producer per trigger (built from the trigger's own connection settings,
//! rebuilt when its configuration changes), and the record: the original
//! key, value and headers plus `kt-*` headers saying where it came from and
//! why it failed.
//!
//! The produce is acknowledged before the dead letter is committed; a crash
//! between the two leaves the set with its head, whose next holder produces
//! it again: the topic can receive a dead letter twice, never zero times.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use kt_common::dispatch::dead_letter::Produced;
use kt_common::trigger::TriggerSecrets;
use kt_proto::ids::TriggerId;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;

use crate::assignment::AssignedTrigger;
use crate::consumer::{scrub, KafkaConfig};

/// How long a produce may take before it counts as failed.
pub const PRODUCE_TIMEOUT: Duration = Duration::from_secs(30);
const CLIENT_ID: &str = "kafka-triggers-dead-letters";

/// The dead-letter producers of the triggers this node worked on, by
/// trigger id and the generation they were built for.
#[derive(Default)]
pub struct Producers {
    by_trigger: Mutex<HashMap<TriggerId, (i64, FutureProducer)>>,
}

impl Producers {
    /// The trigger's producer, built on first use and again after the
    /// trigger changed. The lock is never held across an await.
    pub fn get(&self, trigger: &AssignedTrigger) -> Result<FutureProducer, String> {
        let mut map = self.by_trigger.lock().expect("producers lock poisoned");
        if let Some((generation, producer)) = map.get(&trigger.id) {
            if *generation == trigger.generation {
                return Ok(producer.clone());
            }
        }
        let config = KafkaConfig::for_dead_letters(&trigger.spec, &trigger.secrets, CLIENT_ID, PRODUCE_TIMEOUT);
        let producer: FutureProducer = config
            .client_config()
            .create()
            .map_err(|e| scrub(&format!("cannot create the dead-letter producer: {e}"), &trigger.secrets))?;
        map.insert(trigger.id, (trigger.generation, producer.clone()));
        Ok(producer)
    }
}

/// What is produced for one dead letter.
pub struct Letter {
    pub trigger_id: uuid::Uuid,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
    pub attempts: u32,
    pub error: String,
}

impl Letter {
    /// The original headers, then ours.
    fn headers(&self) -> OwnedHeaders {
        let ours = [
            ("kt-error", self.error.clone()),
            ("kt-attempts", self.attempts.to_string()),
            ("kt-trigger-id", self.trigger_id.to_string()),
            ("kt-original-topic", self.topic.clone()),
            ("kt-original-partition", self.partition.to_string()),
            ("kt-original-offset", self.offset.to_string()),
        ];
        let original = self
            .headers
            .iter()
            .fold(OwnedHeaders::new(), |h, (key, value)| h.insert(Header { key, value: value.as_deref() }));
        ours.iter().fold(original, |h, (key, value)| h.insert(Header { key, value: Some(value.as_bytes()) }))
    }
}

/// Produces `letter` to `topic` and waits for the acknowledgement.
pub async fn produce(
    producer: &FutureProducer,
    topic: &str,
    letter: &Letter,
    secrets: &TriggerSecrets,
) -> Result<Produced, String> {
    let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).headers(letter.headers());
    if let Some(key) = &letter.key {
        record = record.key(key.as_slice());
    }
    if let Some(value) = &letter.value {
        record = record.payload(value.as_slice());
    }
    match producer.send(record, Timeout::After(PRODUCE_TIMEOUT)).await {
        Ok((partition, offset)) => Ok(Produced { topic: topic.to_owned(), partition, offset }),
        Err((e, _)) => Err(scrub(&format!("cannot produce the dead letter to `{topic}`: {e}"), secrets)),
    }
}
