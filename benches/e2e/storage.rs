//! Section 8: the bank flow's throughput with each place its state can live, in the same rounds:
//! the Kafka journal alone, the Kafka journal with a local state store (`state_dir`), and the
//! sled-only journal.

use super::*;

pub(crate) struct StorageReport {
    pub(crate) kafka: Rounds<FlowRun>,
    pub(crate) store: Rounds<FlowRun>,
    pub(crate) sled: Rounds<FlowRun>,
}

impl StorageReport {
    pub(crate) fn print(&self) {
        let base = self.kafka.median.run.window_rate();
        println!("bank flow throughput by storage (commands/s, processing window; median of the rounds)");
        for (what, r) in
            [("Kafka journal", &self.kafka), ("Kafka journal + local store", &self.store), ("sled journal", &self.sled)]
        {
            let rate = r.median.run.window_rate();
            println!("  {what:<28} {rate:>9.0}  ({:.2}x the Kafka journal; rounds {})", rate / base, r.rates());
        }
    }
}

pub(crate) fn run(
    rt: &tokio::runtime::Runtime,
    broker: &Broker,
    cmds: &[(String, Vec<u8>)],
    rounds: usize,
) -> Result<StorageReport> {
    let (mut kafka, mut store, mut sled) = (Vec::new(), Vec::new(), Vec::new());
    let bank = |b: &str, topics| with_properties(bank_flow(b, &unique("group"), topics));
    for round in 0..rounds {
        kafka.push(flow_run(rt, broker, cmds, |b, topics, journal| bank(b, topics).journal_topic(journal))?);
        let dir = tempfile::tempdir()?;
        store.push(flow_run(rt, broker, cmds, |b, topics, journal| {
            bank(b, topics).journal_topic(journal).state_dir(dir.path())
        })?);
        let dir = tempfile::tempdir()?;
        sled.push(flow_run(rt, broker, cmds, |b, topics, _| bank(b, topics).sled_journal(dir.path()))?);
        progress(&format!(
            "    round {}: Kafka journal {:.0}, with local store {:.0}, sled journal {:.0} commands/s",
            round + 1,
            kafka[round].run.window_rate(),
            store[round].run.window_rate(),
            sled[round].run.window_rate()
        ));
    }
    let rate = |f: &FlowRun| f.run.window_rate();
    Ok(StorageReport { kafka: Rounds::of(kafka, rate), store: Rounds::of(store, rate), sled: Rounds::of(sled, rate) })
}
