//! The workload, producing it, and reading outputs with read_committed.

use super::*;

pub(crate) fn account(i: usize) -> String {
    format!("acct-{i:04}")
}

pub(crate) fn wire(id: String, op: &str, amount: Option<u64>) -> Vec<u8> {
    serde_json::to_vec(&WireCommand { id, op: op.into(), amount }).unwrap_or_default()
}

/// `n` commands as (key, value): an `open` per account, then deposits to random accounts.
pub(crate) fn commands(n: usize, seed: u64) -> Vec<(String, Vec<u8>)> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|i| {
            if i < ACCOUNTS {
                (account(i), wire(format!("open-{i}"), "open", None))
            } else {
                let key = account(rng.random_range(0..ACCOUNTS));
                (key, wire(format!("cmd-{i}"), "deposit", Some(rng.random_range(1..100))))
            }
        })
        .collect()
}

pub(crate) fn producer(brokers: &str, linger_ms: u32) -> Result<ThreadedProducer<DefaultProducerContext>> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("linger.ms", linger_ms.to_string())
        .create()?)
}

/// Sends one record, waiting while the producer's queue is full.
pub(crate) fn send_record<'a>(
    p: &ThreadedProducer<DefaultProducerContext>,
    mut rec: BaseRecord<'a, [u8], [u8]>,
) -> Result<(), KafkaError> {
    let end = Instant::now() + TXN_TIMEOUT;
    loop {
        match p.send(rec) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) if Instant::now() < end => {
                rec = r;
                std::thread::sleep(Duration::from_millis(1));
            }
            Err((e, _)) => return Err(e),
        }
    }
}

pub(crate) fn send(p: &ThreadedProducer<DefaultProducerContext>, topic: &str, key: &str, value: &[u8]) -> Result<()> {
    send_record(p, BaseRecord::to(topic).key(key.as_bytes()).payload(value))
        .with_context(|| format!("produce to {topic}"))
}

/// Produces `cmds` to `topic` and waits until the broker has them all; returns the time taken.
pub(crate) fn feed(brokers: &str, topic: &str, cmds: &[(String, Vec<u8>)]) -> Result<Duration> {
    let started = Instant::now();
    let p = producer(brokers, 5)?;
    for (key, value) in cmds {
        send(&p, topic, key, value)?;
    }
    p.flush(Duration::from_secs(60)).context("flush the input producer")?;
    Ok(started.elapsed())
}

#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct ReadStats {
    /// Records read (all of them: a duplicate in the topic is counted again).
    pub(crate) records: u64,
    /// When `done` first held.
    pub(crate) done_at: Option<Instant>,
}

/// Reads every partition of `topic` from the beginning with read_committed, calling `on_record`
/// with each value, until `done(records read)` holds (then reads on for `settle`, to catch
/// duplicates) or `deadline` passes (an error).
pub(crate) fn read_committed(
    brokers: &str,
    topic: &str,
    deadline: Instant,
    settle: Duration,
    mut on_record: impl FnMut(&[u8]),
    mut done: impl FnMut(u64) -> bool,
) -> Result<ReadStats> {
    let consumer: BaseConsumer = eventstage_testkafka::read_committed_reader(brokers)
        // A reader measuring latency should not sit in the broker's fetch wait.
        .set("fetch.wait.max.ms", "10")
        .create()?;
    // Every partition the topic has (the scaling runs' topics have more than PARTITIONS).
    let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let partitions = md.topics().iter().find(|t| t.name() == topic).map_or(0, |t| t.partitions().len() as i32);
    if partitions == 0 {
        bail!("topic {topic} has no partitions in the broker's metadata");
    }
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let mut stats = ReadStats::default();
    loop {
        let now = Instant::now();
        match stats.done_at {
            Some(at) if now >= at + settle => return Ok(stats),
            Some(_) => {}
            None => {
                if done(stats.records) {
                    stats.done_at = Some(now);
                    continue;
                }
                if now >= deadline {
                    bail!("timed out reading {topic}: {} records so far", stats.records);
                }
            }
        }
        match consumer.poll(Duration::from_millis(5)) {
            Some(Ok(m)) => {
                stats.records += 1;
                on_record(m.payload().unwrap_or_default());
            }
            Some(Err(e)) => tracing::debug!(error = %e, "reader error"),
            None => {}
        }
    }
}

/// A reader counting committed records on a thread of its own.
pub(crate) struct Counter {
    pub(crate) handle: JoinHandle<Result<ReadStats>>,
    /// Records seen so far.
    pub(crate) seen: Arc<AtomicU64>,
}

/// Counts committed records of `topic` on a thread of its own until `n` are visible.
/// A read_committed consumer of `topic` positioned at its end now: it reads only what is written
/// from now on.
pub(crate) fn reader_at_end(brokers: &str, topic: &str) -> Result<BaseConsumer> {
    let reader: BaseConsumer =
        eventstage_testkafka::read_committed_reader(brokers).set("fetch.wait.max.ms", "10").create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        let (_, high) = reader.fetch_watermarks(topic, p, Duration::from_secs(10))?;
        tpl.add_partition_offset(topic, p, Offset::Offset(high))?;
    }
    reader.assign(&tpl)?;
    Ok(reader)
}

pub(crate) fn count_committed(brokers: &str, topic: &str, n: u64) -> Counter {
    let (brokers, topic) = (brokers.to_string(), topic.to_string());
    let seen = Arc::new(AtomicU64::new(0));
    let counted = seen.clone();
    let handle = std::thread::spawn(move || {
        let deadline = Instant::now() + RUN_DEADLINE;
        read_committed(
            &brokers,
            &topic,
            deadline,
            Duration::from_millis(500),
            |_| {},
            |c| {
                counted.store(c, Ordering::Relaxed);
                c >= n
            },
        )
    });
    Counter { handle, seen }
}

pub(crate) fn join<T>(h: JoinHandle<Result<T>>) -> Result<T> {
    h.join().map_err(|_| anyhow!("a benchmark thread panicked"))?
}
