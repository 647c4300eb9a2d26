//! A word count as an at-least-once flow (Alpakka Kafka's committable source → `Committer.sink`):
//! each record of `words` (key = a word) adds one to that word's count, kept by a persistent
//! stage with a Kafka journal, and the new count goes to `word-counts` (key = word, value = count).
//!
//! ```sh
//! cargo run --example word_count -- 127.0.0.1:9092 "the quick brown fox jumps over the lazy dog"
//! ```
//!
//! The text (if given) is split into words and produced to `words` first. At least once: after a
//! crash a count may be published twice, but the journal never counts an input twice (its records
//! carry the input positions they include, and inputs delivered again are skipped).

mod util;

use eventstage::flow::{CommitterSettings, FlowBuilder, Guarantee, OutputRecord};
use eventstage::{Effect, EventSourced};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::ClientConfig;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Counts per word.
struct WordCount;

#[derive(Debug, Serialize, Deserialize)]
enum Counted {
    Seen,
}

impl EventSourced for WordCount {
    const NAME: &'static str = "word-count";
    type Key = String;
    type Command = ();
    type Event = Counted;
    type State = u64;
    type Reply = u64;
    type Rejection = std::convert::Infallible;

    fn handle(&self, _count: &u64, (): ()) -> Result<Effect<Self>, Self::Rejection> {
        Ok(Effect::persist([Counted::Seen]).then_reply(|count| *count))
    }

    fn apply(count: &mut u64, Counted::Seen: &Counted) {
        *count += 1;
    }
}

fn produce_words(brokers: &str, text: &str) -> anyhow::Result<()> {
    let producer: ThreadedProducer<DefaultProducerContext> =
        ClientConfig::new().set("bootstrap.servers", brokers).create()?;
    for word in text.split_whitespace().map(str::to_lowercase) {
        producer.send(BaseRecord::to("words").key(&word).payload("")).map_err(|(e, _)| e)?;
    }
    producer.flush(Duration::from_secs(10))?;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    util::init_tracing();
    let mut args = std::env::args().skip(1);
    let brokers = args.next().unwrap_or_else(|| "127.0.0.1:9092".into());
    if let Some(text) = args.next() {
        produce_words(&brokers, &text)?;
    }
    let flow = FlowBuilder::new(WordCount, &brokers, "eventstage-word-count", ["words"])
        .guarantee(Guarantee::AtLeastOnce)
        .committer(CommitterSettings::default().max_batch(500).max_interval(Some(Duration::from_millis(200))))
        .journal_topic("word-count-journal")
        .decoder(|record| {
            let word = record.key.as_deref().ok_or("a word record needs a key (the word)")?;
            Ok::<_, &str>((String::from_utf8_lossy(word).into_owned(), ()))
        })
        .outputs(|p| match p.outcome {
            Ok(count) => vec![OutputRecord::new("word-counts", p.key.as_bytes(), count.to_string())],
            Err(never) => match *never {},
        })
        .run()?;
    println!("counting words of `words` into `word-counts` at {brokers}; Ctrl-C drains and stops");
    let stopper = flow.stopper();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        stopper.drain();
    });
    let (result, metrics) = flow.wait_with_metrics().await;
    println!(
        "{} words counted, {} delivered again and skipped, {} batches committed",
        metrics.records_in, metrics.skipped_redeliveries, metrics.transactions
    );
    Ok(result?)
}
