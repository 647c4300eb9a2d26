//! Section 6: the at-least-once bank flow against the exactly-once one (the EOS overhead), and
//! async enrichment's speed-up: the bank stage behind a 10 ms "service" call per command, with 1
//! and with 16 calls in flight.

use super::*;
use eventstage::flow::EnrichSettings;
use eventstage::stages::bank::{Limited, LimitedBank};
use eventstage::stages::bank_flow::{decode, outputs};

/// Latency of the enrichment service.
pub(crate) const SERVICE_LATENCY: Duration = Duration::from_millis(10);

pub(crate) struct Enrichment {
    pub(crate) parallelism: usize,
    pub(crate) run: FlowRun,
}

/// The bank flow with an enrichment step that waits [`SERVICE_LATENCY`] per command.
pub(crate) fn enrichment(
    rt: &tokio::runtime::Runtime,
    broker: &Broker,
    cmds: &[(String, Vec<u8>)],
    parallelism: usize,
) -> Result<Enrichment> {
    let run = flow_run(rt, broker, cmds, |b, topics, journal| {
        let input = topics.input.clone();
        eventstage::flow::FlowBuilder::new(LimitedBank, b, unique("group"), [input.as_str()])
            .decoder(|r| decode(r).map(|(account, command)| (account, Limited { command, limit: None })))
            .enrich(EnrichSettings::parallelism(parallelism), |_account, command| async move {
                tokio::time::sleep(SERVICE_LATENCY).await;
                Ok::<_, std::convert::Infallible>(command)
            })
            .outputs(move |p| outputs(&topics, p))
            .journal_topic(journal)
    })?;
    Ok(Enrichment { parallelism, run })
}

pub(crate) struct PatternsReport {
    pub(crate) exactly_once: Rounds<FlowRun>,
    pub(crate) at_least_once: Rounds<FlowRun>,
    pub(crate) enrichment: Vec<Enrichment>,
}

impl PatternsReport {
    pub(crate) fn print(&self) {
        println!("6. at-least-once vs exactly-once, and async enrichment");
        let (eos, alo) = (&self.exactly_once.median.run, &self.at_least_once.median.run);
        Report::run("bank flow, exactly once (transactions)", "flow", eos, self.exactly_once.rates());
        Report::run(
            "bank flow, at least once (batched offset commits, no transactions)",
            "flow",
            alo,
            self.at_least_once.rates(),
        );
        let overhead = 1.0 - eos.window_rate() / alo.window_rate();
        println!(
            "  exactly-once overhead: {:.0}% of the at-least-once throughput (medians; Quix claims <= 10%)",
            overhead * 100.0
        );
        let base = self.enrichment.iter().find(|e| e.parallelism == 1).map(|e| e.run.run.window_rate());
        for e in &self.enrichment {
            let rate = e.run.run.window_rate();
            let speedup = base.map_or_else(String::new, |b| format!(", {:.1}x parallelism 1", rate / b));
            println!(
                "  enrichment ({} ms service) with parallelism {:>2}: {:>7.0} commands/s over {} commands{speedup}; at most {} calls in flight",
                SERVICE_LATENCY.as_millis(),
                e.parallelism,
                rate,
                e.run.run.n,
                e.run.metrics.max_enrich_in_flight
            );
        }
    }
}

/// Section 6.
pub(crate) fn run(
    rt: &tokio::runtime::Runtime,
    broker: &Broker,
    cmds: &[(String, Vec<u8>)],
    rounds: usize,
) -> Result<PatternsReport> {
    let (mut eos, mut alo) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        eos.push(flow_throughput(rt, broker, cmds, Guarantee::ExactlyOnce)?);
        alo.push(flow_throughput(rt, broker, cmds, Guarantee::AtLeastOnce)?);
        progress(&format!(
            "    round {}: exactly once {:.0}, at least once {:.0} commands/s",
            round + 1,
            eos[round].run.window_rate(),
            alo[round].run.window_rate()
        ));
    }
    let mut enrichment = Vec::new();
    // About 3 s of work each: 1 call in flight does ~100 commands/s.
    for (parallelism, n) in [(1, 300), (16, 4000)] {
        let e = self::enrichment(rt, broker, &cmds[..n.min(cmds.len())], parallelism)?;
        progress(&format!("    enrichment, parallelism {parallelism}: {:.0} commands/s", e.run.run.window_rate()));
        enrichment.push(e);
    }
    Ok(PatternsReport {
        exactly_once: Rounds::of(eos, |f| f.run.window_rate()),
        at_least_once: Rounds::of(alo, |f| f.run.window_rate()),
        enrichment,
    })
}
