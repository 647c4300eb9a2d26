//! Section 9: the bank flow scaled out: 1, 2 and 4 instances in one consumer group over topics of
//! 8 partitions, in this process. The commands are fed once every instance has its partitions, so
//! no rebalance falls in the window. On a machine of 2 cores the total rate cannot grow much; what
//! shows whether anything serializes across instances is the CPU per command (the flow threads'
//! summed, and the process's), which should stay flat, and how evenly the instances share the work.

use super::*;

/// Partitions of the scaling runs' topics.
const SCALING_PARTITIONS: i32 = 8;

/// One run of a group: its timing, and each instance's metrics.
type GroupRun = (Run, Vec<FlowMetrics>);

pub(crate) struct ScalingRow {
    pub(crate) instances: usize,
    pub(crate) runs: Rounds<GroupRun>,
}

pub(crate) struct ScalingReport {
    pub(crate) rows: Vec<ScalingRow>,
}

/// CPU microseconds per command of `cores` used over `run`'s processing window.
fn micros_per_command(run: &Run, cores: Option<f64>) -> Option<f64> {
    Some(cores? * run.window().as_secs_f64() * 1e6 / run.n as f64)
}

impl ScalingReport {
    pub(crate) fn print(&self) {
        println!(
            "bank flow scaled out: instances in one group over {SCALING_PARTITIONS} partitions (commands/s over the processing window, median round)"
        );
        let base = self.rows.first().map_or(1.0, |r| r.runs.median.0.window_rate());
        let us = |v: Option<f64>| v.map_or("n/a".to_string(), |v| format!("{v:.1} µs"));
        for row in &self.rows {
            let (run, metrics) = &row.runs.median;
            let shares: Vec<String> = metrics.iter().map(|m| m.records_in.to_string()).collect();
            println!(
                "  {} instance(s): {:>8.0} commands/s ({:.2}x one; rounds {}); per command: flow threads {}, process {}; commands per instance {}",
                row.instances,
                run.window_rate(),
                run.window_rate() / base,
                row.runs.rates(),
                us(micros_per_command(run, run.cores.worker)),
                us(micros_per_command(run, run.cores.process)),
                shares.join(" / ")
            );
        }
    }
}

pub(crate) fn run(
    rt: &tokio::runtime::Runtime,
    broker: &Broker,
    cmds: &[(String, Vec<u8>)],
    rounds: usize,
    instances: &[u64],
) -> Result<ScalingReport> {
    let mut rows: Vec<(usize, Vec<GroupRun>)> = instances.iter().map(|&k| (k.max(1) as usize, Vec::new())).collect();
    for round in 0..rounds {
        let mut line = Vec::new();
        for (k, runs) in &mut rows {
            let group = unique("scale-group");
            let run = group_run(rt, broker, cmds, *k, SCALING_PARTITIONS, true, |b, topics, journal| {
                with_properties(bank_flow(b, &group, topics)).journal_topic(journal)
            })?;
            line.push(format!("{k}: {:.0}", run.0.window_rate()));
            runs.push(run);
        }
        progress(&format!("    round {}: commands/s by instances {}", round + 1, line.join(", ")));
    }
    Ok(ScalingReport {
        rows: rows
            .into_iter()
            .map(|(instances, runs)| ScalingRow { instances, runs: Rounds::of(runs, |r| r.0.window_rate()) })
            .collect(),
    })
}
