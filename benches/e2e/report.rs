//! Printing the report.

use super::*;

pub(crate) fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

pub(crate) fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

pub(crate) fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "MISSED"
    }
}

pub(crate) fn cores(c: Option<f64>) -> String {
    c.map_or_else(|| "n/a".into(), |c| format!("{c:.2}"))
}

pub(crate) struct Report {
    pub(crate) n: u64,
    pub(crate) throughput: Throughput,
    pub(crate) flow_latency: Latency,
    pub(crate) pass_latency: Latency,
    pub(crate) pass_drained_latency: Latency,
    pub(crate) restore: Restore,
    pub(crate) table: table::TableReport,
    pub(crate) patterns: patterns::PatternsReport,
    pub(crate) total: Duration,
    pub(crate) broker_rss: Option<u64>,
}

impl Report {
    pub(crate) fn run(name: &str, worker: &str, r: &Run, rates: String) {
        println!("  {name}");
        println!("    rounds: {rates} records/s; the median round:");
        println!(
            "    committed throughput {:>9.0} records/s   ({} records in {}, first record consumed -> last output visible)",
            r.window_rate(),
            r.n,
            secs(r.window())
        );
        println!(
            "    incl. startup        {:>9.0} records/s   (startup {}: group join, restore, first fetch)",
            r.total_rate(),
            secs(r.first.saturating_duration_since(r.start))
        );
        println!(
            "    all consumed after {}, all visible {} later; {} transactions ({} aborted), commit latency {}max {}",
            secs(r.processed.saturating_duration_since(r.first)),
            ms(r.visible.saturating_duration_since(r.processed)),
            r.transactions,
            r.aborts,
            r.commit_mean.map_or_else(String::new, |m| format!("mean {}, ", ms(m))),
            ms(r.commit_max)
        );
        println!(
            "    cores used: {worker} thread {}, whole bench process {}, broker {}; reader saw {} records; input produced in {}",
            cores(r.cores.worker),
            cores(r.cores.process),
            cores(r.cores.broker),
            r.read,
            secs(r.feed)
        );
    }

    pub(crate) fn latency(name: &str, l: &Latency) {
        let budget = l.commit_interval + Duration::from_millis(50);
        println!(
            "  {name}, commits every {}: p50 {}  p90 {}  p99 {}  p99.9 {}  max {}   (p50 <= {}: {}; p99 <= {}: {})",
            ms(l.commit_interval),
            ms(l.at(0.5)),
            ms(l.at(0.9)),
            ms(l.at(0.99)),
            ms(l.at(0.999)),
            ms(l.at(1.0)),
            ms(l.commit_interval),
            verdict(l.at(0.5) <= l.commit_interval),
            ms(budget),
            verdict(l.at(0.99) <= budget)
        );
        let commits = if l.commits.is_empty() {
            String::new()
        } else {
            format!(
                ", commit latency p50 {} p90 {} max {} ({} sampled)",
                ms(percentile(&l.commits, 0.5)),
                ms(percentile(&l.commits, 0.9)),
                ms(percentile(&l.commits, 1.0)),
                l.commits.len()
            )
        };
        println!(
            "    {} outputs at {:.0}/s (target {:.0}/s); {} transactions ({} aborted){commits}",
            l.micros.len(),
            l.achieved_rate,
            l.target_rate,
            l.transactions,
            l.aborts
        );
    }

    pub(crate) fn print(&self) {
        println!();
        println!(
            "eventstage end-to-end benchmark: N = {}, {PARTITIONS} partitions, commit interval {COMMIT_INTERVAL:?}",
            self.n
        );
        println!();
        self.throughput.print();
        let flow = &self.throughput.flow.median.run;
        println!();
        println!(
            "3. end-to-end latency, send -> output visible to read_committed, at 0.5 x {:.0} = {:.0} commands/s",
            flow.window_rate(),
            self.flow_latency.target_rate
        );
        Self::latency("bank flow", &self.flow_latency);
        Self::latency("pass-through (reference)", &self.pass_latency);
        Self::latency("pass-through awaiting deliveries (reference)", &self.pass_drained_latency);
        println!();
        let r = &self.restore;
        let rate = |d: Duration| r.records as f64 / d.as_secs_f64();
        println!("4. journal restore ({} records over {PARTITIONS} partitions, median of {RESTORE_ROUNDS})", r.records);
        println!(
            "  KafkaJournal::restore_partition, partition by partition {:>9.0} records/s ({})",
            rate(r.restore),
            ms(r.restore)
        );
        println!(
            "  KafkaJournal::restore_partitions, all at once (flows)  {:>9.0} records/s ({})",
            rate(r.restore_all),
            ms(r.restore_all)
        );
        println!(
            "  bare consumer, all partitions at once                  {:>9.0} records/s ({})",
            rate(r.bare),
            ms(r.bare)
        );
        println!(
            "  bare consumers, partition by partition                 {:>9.0} records/s ({})",
            rate(r.bare_sequential),
            ms(r.bare_sequential)
        );
        println!(
            "  ratio restore / bare: {:.2} all at once (as flows restore); {:.2} partition by partition",
            rate(r.restore_all) / rate(r.bare),
            rate(r.restore) / rate(r.bare_sequential)
        );
        println!();
        self.table.print();
        println!();
        self.patterns.print();
        println!();
        println!(
            "total benchmark time {}; broker resident memory at the end {}",
            secs(self.total),
            self.broker_rss.map_or_else(|| "n/a".into(), |m| format!("{m} MiB"))
        );
    }
}

/// Sections 1 and 2: the bank flow and the three pass-throughs, in interleaved rounds.
pub(crate) struct Throughput {
    pub(crate) flow: Rounds<FlowRun>,
    pub(crate) pass: Rounds<Run>,
    pub(crate) pass_drained: Rounds<Run>,
    /// Awaiting deliveries, two output records per input: the bank flow's output volume.
    pub(crate) pass_doubled: Rounds<Run>,
}

impl Throughput {
    pub(crate) fn measure(
        rt: &tokio::runtime::Runtime,
        broker: &Broker,
        cmds: &[(String, Vec<u8>)],
        rounds: usize,
    ) -> Result<Self> {
        let (mut flows, mut passes, mut drained, mut doubled) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for round in 0..rounds {
            flows.push(flow_throughput(rt, broker, cmds, Guarantee::ExactlyOnce)?);
            passes.push(pass_through_throughput(rt, broker, cmds, false, 1)?);
            drained.push(pass_through_throughput(rt, broker, cmds, true, 1)?);
            doubled.push(pass_through_throughput(rt, broker, cmds, true, 2)?);
            progress(&format!(
                "    round {}: {:.0} / {:.0} / {:.0} / {:.0} records/s",
                round + 1,
                flows[round].run.window_rate(),
                passes[round].window_rate(),
                drained[round].window_rate(),
                doubled[round].window_rate()
            ));
        }
        Ok(Self {
            flow: Rounds::of(flows, |f| f.run.window_rate()),
            pass: Rounds::of(passes, Run::window_rate),
            pass_drained: Rounds::of(drained, Run::window_rate),
            pass_doubled: Rounds::of(doubled, Run::window_rate),
        })
    }

    pub(crate) fn print(&self) {
        let ratio = |a: &Run, b: &Run| a.window_rate() / b.window_rate();
        println!("1+2. committed throughput (all outputs visible to read_committed)");
        let flow = &self.flow.median.run;
        let (pass, pass_drained) = (&self.pass.median, &self.pass_drained.median);
        Report::run("bank flow (per command: reply + event + journal record)", "flow", flow, self.flow.rates());
        let m = &self.flow.median.metrics;
        println!(
            "    flow metrics: records_in {}, records_out {}, dead letters {}",
            m.records_in, m.records_out, m.dead_letters
        );
        Report::run(
            "bare transactional pass-through (one output record per input)",
            "pass-through",
            pass,
            self.pass.rates(),
        );
        Report::run(
            "bare transactional pass-through, delivery reports awaited before commit_transaction",
            "pass-through",
            pass_drained,
            self.pass_drained.rates(),
        );
        Report::run(
            "bare transactional pass-through, deliveries awaited, two output records per input (the flow's reply + event volume)",
            "pass-through",
            &self.pass_doubled.median,
            self.pass_doubled.rates(),
        );
        let r = ratio(flow, pass);
        println!("  ratio flow / pass-through (medians): {r:.2} (target >= 0.8: {})", verdict(r >= 0.8));
        println!("  ratio flow / pass-through awaiting deliveries (medians): {:.2}", ratio(flow, pass_drained));
        println!(
            "  ratio flow / pass-through with the flow's output volume (medians): {:.2}",
            ratio(flow, &self.pass_doubled.median)
        );
    }
}
