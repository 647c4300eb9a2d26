//! Section 4: restore rate of the Kafka journal against bare consumers.

use super::*;

pub(crate) struct Restore {
    pub(crate) records: u64,
    /// Median wall time of `restore_partition` over all partitions, one after the other.
    pub(crate) restore: Duration,
    /// Median wall time of `restore_partitions` over all partitions at once (what a flow does).
    pub(crate) restore_all: Duration,
    /// Median wall time of one bare consumer over all partitions at once.
    pub(crate) bare: Duration,
    /// Median wall time of bare consumers, one per partition, one after the other (as restore does).
    pub(crate) bare_sequential: Duration,
}

pub(crate) fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

/// The bare consumers' context: reaching the end of a partition is how a read ends, not an error
/// worth logging (librdkafka reports some of those ends as global errors, outside `poll`).
pub(crate) struct QuietEof;

impl ClientContext for QuietEof {
    fn error(&self, error: KafkaError, reason: &str) {
        if !matches!(error, KafkaError::PartitionEOF(_) | KafkaError::Global(RDKafkaErrorCode::PartitionEOF)) {
            tracing::error!(%error, reason, "bare consumer error");
        }
    }
}

impl ConsumerContext for QuietEof {}

/// Reads `partitions` of `topic` with one read_committed consumer from the beginning to the end as
/// of the start, ending a partition the way `restore_partition` does (its high watermark reached,
/// or partition EOF); returns the records read.
pub(crate) fn bare_read(brokers: &str, topic: &str, partitions: &[i32]) -> Result<u64> {
    let consumer: BaseConsumer<QuietEof> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique("bare"))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("isolation.level", "read_committed")
        .set("auto.offset.reset", "earliest")
        .create_with_context(QuietEof)?;
    let mut open: BTreeMap<i32, i64> = BTreeMap::new();
    let mut tpl = TopicPartitionList::new();
    for p in partitions {
        let (low, high) = consumer.fetch_watermarks(topic, *p, Duration::from_secs(30))?;
        if high > low {
            open.insert(*p, high);
            tpl.add_partition_offset(topic, *p, Offset::Beginning)?;
        }
    }
    consumer.assign(&tpl)?;
    let mut records = 0u64;
    let mut last = Instant::now();
    while !open.is_empty() {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                records += 1;
                last = Instant::now();
                if open.get(&m.partition()).is_some_and(|high| m.offset() + 1 >= *high) {
                    open.remove(&m.partition());
                }
            }
            Some(Err(KafkaError::PartitionEOF(p))) => {
                open.remove(&p);
            }
            Some(Err(e)) => bail!("bare read of {topic}: {e}"),
            None if last.elapsed() > Duration::from_secs(10) => {
                bail!("bare read of {topic} stalled after {records} records (partitions {open:?} not at their end)")
            }
            None => {}
        }
    }
    Ok(records)
}

/// Writes `n` journal records as a flow writes them (per record: a `Deposited` event and the
/// account's state after it), over [`ACCOUNTS`] keys, to a new journal topic.
pub(crate) fn write_journal(rt: &tokio::runtime::Runtime, brokers: &str, topic: &str, n: u64) -> Result<()> {
    use eventstage::journal::{Envelope, JournalEntry, SeqNo};
    use eventstage::stages::bank::{Account, BankEvent};
    use eventstage::{Codec, EventSourced};
    create_journal_topic(rt, brokers, topic)?;
    let codec = Codec::Bincode;
    let p = producer(brokers, 5)?;
    let mut accounts = vec![(0u64, Account { open: true, balance: 0 }); ACCOUNTS];
    for i in 0..n {
        let a = (i as usize * 7919) % ACCOUNTS;
        let (seq, account) = &mut accounts[a];
        *seq += 1;
        account.balance += 10;
        let ts = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        let event = codec.encode(&BankEvent::Deposited { amount: 10 })?;
        let entry = JournalEntry {
            last_seq: SeqNo(*seq),
            events: vec![Envelope::event(codec.id(), eventstage::stages::bank::Bank::EVENT_VERSION, ts, event)],
            state: Some(Envelope::snapshot(
                codec.id(),
                eventstage::stages::bank::Bank::STATE_VERSION,
                ts,
                codec.encode(&*account)?,
            )),
            sources: Vec::new(),
        };
        send(&p, topic, &format!("acct-{a:06}"), &entry.encode())?;
    }
    p.flush(Duration::from_secs(60)).context("flush the journal producer")?;
    Ok(())
}

pub(crate) fn restore_rates(
    rt: &tokio::runtime::Runtime,
    brokers: &str,
    topic: &str,
    expected: u64,
) -> Result<Restore> {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", brokers);
    let journal = rt
        .block_on(async {
            tokio::time::timeout(Duration::from_secs(60), KafkaJournal::ensure(config, topic, PARTITIONS)).await
        })
        .context("connect to the journal: timed out")??;
    let all: Vec<i32> = (0..PARTITIONS).collect();
    let (mut restore, mut restore_all, mut bare, mut bare_sequential) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut records = 0;
    for _ in 0..RESTORE_ROUNDS {
        let started = Instant::now();
        let (mut read, mut entries) = (0u64, 0u64);
        for p in 0..PARTITIONS {
            let stats = journal.restore_partition(p, Duration::from_secs(10), |_key, entry| {
                entries += u64::from(entry.is_some());
            })?;
            read += stats.records;
        }
        restore.push(started.elapsed());
        if read != expected || entries != expected {
            bail!("restore read {read} records ({entries} entries); the journal should hold {expected}");
        }
        let started = Instant::now();
        let mut entries = 0u64;
        let stats = journal.restore_partitions(&all, Duration::from_secs(10), |_p, _key, entry| {
            entries += u64::from(entry.is_some());
        })?;
        restore_all.push(started.elapsed());
        if stats.records != expected || entries != expected {
            bail!(
                "restore_partitions read {} records ({entries} entries); the journal should hold {expected}",
                stats.records
            );
        }
        records = read;

        let started = Instant::now();
        let read = bare_read(brokers, topic, &all)?;
        bare.push(started.elapsed());
        if read != expected {
            bail!("the bare consumer read {read} records; the journal should hold {expected}");
        }

        let started = Instant::now();
        let mut read = 0;
        for p in 0..PARTITIONS {
            read += bare_read(brokers, topic, &[p])?;
        }
        bare_sequential.push(started.elapsed());
        if read != expected {
            bail!("the bare per-partition consumers read {read} records; the journal should hold {expected}");
        }
    }
    Ok(Restore {
        records,
        restore: median(restore),
        restore_all: median(restore_all),
        bare: median(bare),
        bare_sequential: median(bare_sequential),
    })
}
