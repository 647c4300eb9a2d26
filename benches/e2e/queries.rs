//! Section 14 (`EVENTSTAGE_E2E_ONLY=queries`): interactive queries (issue 26).
//!
//! 1. The flow's throughput (N commands, as section 1) three ways, round by round in the same run:
//!    the plain bank flow; the same flow queryable (its committed view kept) with no query; and
//!    queryable under [`QUERY_RATE`] queries a second at random accounts over HTTP.
//! 2. Two queryable instances in one group, deposits paced at half the plain flow's median rate
//!    for `EVENTSTAGE_E2E_LATENCY_SECS`: once without queries, once with [`QUERY_RATE`] queries a
//!    second sent to one instance. The commands' latency both times, and the queries' latency
//!    split by where they were answered: locally, or forwarded to the other instance (the key's
//!    partition is there).

use super::*;
use eventstage::query::Queries;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::sync::Mutex;

/// Queries a second of the query load.
const QUERY_RATE: f64 = 1000.0;

pub(crate) struct QueriesReport {
    plain: Rounds<FlowRun>,
    idle: Rounds<FlowRun>,
    loaded: Rounds<(FlowRun, Load)>,
    quiet: Paced,
    busy: (Paced, Load),
    rate: f64,
}

/// What a query load did: answers by kind and latencies (sorted µs).
#[derive(Default)]
pub(crate) struct Load {
    local: Vec<u64>,
    routed: Vec<u64>,
    /// Answers other than 200 and "no state" 404s, by status (0: no answer), with one body each.
    other: BTreeMap<u16, (u64, String)>,
    achieved: f64,
    /// Queries sent a second.
    sent: f64,
}

impl QueriesReport {
    pub(crate) fn print(&self) {
        println!("interactive queries (issue 26): the bank flow's throughput with and without queries, same run ({PARTITIONS} partitions, commits every {COMMIT_INTERVAL:?}, {ACCOUNTS} accounts)");
        let plain = self.plain.median.run.window_rate();
        let line = |what: &str, rate: f64, rates: String, extra: String| {
            println!(
                "  {what:<44} {rate:>8.0} commands/s ({:.3}x the plain flow; rounds {rates}){extra}",
                rate / plain
            );
        };
        line("plain flow", plain, self.plain.rates(), String::new());
        line("queryable, no queries", self.idle.median.run.window_rate(), self.idle.rates(), String::new());
        let (run, load) = &self.loaded.median;
        line(
            &format!("queryable, {QUERY_RATE:.0} queries/s"),
            run.run.window_rate(),
            self.loaded.rates(),
            format!("; {:.0} queries/s sent, {:.0} answered (200, or 404: no state)", load.sent, load.achieved),
        );
        for (status, (n, body)) in &load.other {
            println!("    {n} queries answered {status} during that run, e.g. {}", body.trim());
        }
        println!("  two queryable instances, deposits paced at {:.0}/s (half the plain flow's median):", self.rate);
        let lat = |p: &Paced| {
            let at = |q| Duration::from_micros(percentile(&p.micros, q));
            format!("p50 {}, p99 {}, max {}", ms(at(0.5)), ms(at(0.99)), ms(at(1.0)))
        };
        println!(
            "    commands' latency without queries:   {} ({:.0} commands/s)",
            lat(&self.quiet),
            self.quiet.achieved
        );
        let (paced, load) = &self.busy;
        println!("    commands' latency with queries:      {} ({:.0} commands/s)", lat(paced), paced.achieved);
        let q = |v: &[u64]| {
            if v.is_empty() {
                return "none".to_string();
            }
            let at = |q| percentile(v, q);
            format!("p50 {} µs, p99 {} µs, max {} µs ({} queries)", at(0.5), at(0.99), at(1.0), v.len())
        };
        println!("    query latency, answered locally:     {}", q(&load.local));
        println!("    query latency, forwarded to owner:   {}", q(&load.routed));
        println!("    {:.0} queries/s sent, {:.0} answered (200, or 404: no state)", load.sent, load.achieved);
        for (status, (n, body)) in &load.other {
            println!("    {n} answered {status}, e.g. {}", body.trim());
        }
    }
}

pub(crate) fn run(
    rt: &tokio::runtime::Runtime,
    broker: &Broker,
    cmds: &[(String, Vec<u8>)],
    rounds: usize,
    latency_secs: Duration,
) -> Result<QueriesReport> {
    let (mut plain, mut idle, mut loaded) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let p = flow_throughput(rt, broker, cmds, Guarantee::ExactlyOnce)?;
        let (i, _) = queryable_run(rt, broker, cmds, false)?;
        let (l, load) = queryable_run(rt, broker, cmds, true)?;
        progress(&format!(
            "    round {}: plain {:.0}, queryable {:.0}, queryable under {:.0} queries/s {:.0} commands/s",
            round + 1,
            p.run.window_rate(),
            i.run.window_rate(),
            load.achieved,
            l.run.window_rate()
        ));
        plain.push(p);
        idle.push(i);
        loaded.push((l, load));
    }
    let plain = Rounds::of(plain, |f| f.run.window_rate());
    let rate = 0.5 * plain.median.run.window_rate();
    progress(&format!(
        "    two instances at {rate:.0} commands/s for {} s, without then with queries",
        latency_secs.as_secs()
    ));
    let (quiet, _) = two_instances(rt, broker, rate, latency_secs, false)?;
    let busy = two_instances(rt, broker, rate, latency_secs, true)?;
    Ok(QueriesReport {
        plain,
        idle: Rounds::of(idle, |f| f.run.window_rate()),
        loaded: Rounds::of(loaded, |(f, _)| f.run.window_rate()),
        quiet,
        busy,
        rate,
    })
}

/// An HTTP server answering `queries` on a free port of 127.0.0.1.
fn serve(rt: &tokio::runtime::Runtime) -> Result<(Queries, String)> {
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let addr = listener.local_addr()?.to_string();
    let queries = Queries::new(addr.clone());
    let q = queries.clone();
    rt.spawn(async move { eventstage::query::serve(listener, q, axum::Router::new()).await });
    Ok((queries, addr))
}

/// The bank flow made queryable, with a query load on its server while it runs (`load`).
fn queryable_run(
    rt: &tokio::runtime::Runtime,
    broker: &Broker,
    cmds: &[(String, Vec<u8>)],
    load: bool,
) -> Result<(FlowRun, Load)> {
    let (queries, addr) = serve(rt)?;
    let stop = Arc::new(AtomicBool::new(false));
    let driver = load.then(|| query_load(rt, vec![addr.clone()], addr.clone(), stop.clone()));
    let run = flow_run(rt, broker, cmds, |b, topics, journal| {
        with_properties(bank_flow(b, &unique("group"), topics)).journal_topic(journal).queryable(&queries)
    });
    stop.store(true, Ordering::SeqCst);
    let load = match driver {
        Some(d) => rt.block_on(d)?,
        None => Load::default(),
    };
    Ok((run?, load))
}

/// Sends [`QUERY_RATE`] queries a second for random accounts to `targets` in turn until `stop`,
/// each on a task of its own (keep-alive connections), recording each answer's latency as local
/// (answered by `local`) or routed.
fn query_load(
    rt: &tokio::runtime::Runtime,
    targets: Vec<String>,
    local: String,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Load> {
    rt.spawn(async move {
        let client: Client<HttpConnector, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
        let answers: Arc<Mutex<Load>> = Arc::default();
        let mut rng = StdRng::seed_from_u64(17);
        let start = Instant::now();
        let mut sent = 0u64;
        let mut tasks = Vec::new();
        while !stop.load(Ordering::SeqCst) {
            let due = (start.elapsed().as_secs_f64() * QUERY_RATE) as u64;
            while sent < due {
                let target = &targets[sent as usize % targets.len()];
                let uri: hyper::Uri =
                    match format!("http://{target}/state/bank/{}", account(rng.random_range(0..ACCOUNTS))).parse() {
                        Ok(u) => u,
                        Err(_) => continue,
                    };
                let (client, answers, local) = (client.clone(), answers.clone(), local.clone());
                tasks.push(tokio::spawn(async move {
                    let asked = Instant::now();
                    let answer = async {
                        let r = client.get(uri).await.ok()?;
                        let status = r.status().as_u16();
                        let body = r.into_body().collect().await.ok()?.to_bytes();
                        Some((status, body))
                    }
                    .await;
                    let micros = asked.elapsed().as_micros() as u64;
                    let mut a = answers.lock().unwrap_or_else(|p| p.into_inner());
                    match answer {
                        Some((200, body)) => {
                            let here = String::from_utf8_lossy(&body).contains(&format!("\"served_by\":\"{local}\""));
                            if here {
                                a.local.push(micros)
                            } else {
                                a.routed.push(micros)
                            }
                        }
                        Some((404, body)) if String::from_utf8_lossy(&body).contains("has no state") => {
                            a.local.push(micros)
                        }
                        Some((status, body)) => {
                            let e = a.other.entry(status).or_insert_with(|| (0, String::from_utf8_lossy(&body).into()));
                            e.0 += 1;
                        }
                        None => a.other.entry(0).or_insert_with(|| (0, "no answer".into())).0 += 1,
                    }
                }));
                sent += 1;
            }
            tasks.retain(|t| !t.is_finished());
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
        for t in tasks {
            let _ = t.await;
        }
        let elapsed = start.elapsed().as_secs_f64();
        let mut load = std::mem::take(&mut *answers.lock().unwrap_or_else(|p| p.into_inner()));
        load.local.sort_unstable();
        load.routed.sort_unstable();
        load.achieved = (load.local.len() + load.routed.len()) as f64 / elapsed;
        load.sent = sent as f64 / elapsed;
        load
    })
}

/// Two queryable instances of the bank flow in one group; deposits paced at `rate` for `secs`
/// (see [`paced`]), with a query load on the first instance (`load`).
fn two_instances(
    rt: &tokio::runtime::Runtime,
    broker: &Broker,
    rate: f64,
    secs: Duration,
    load: bool,
) -> Result<(Paced, Load)> {
    let b = broker.brokers.as_str();
    let topics = BankTopics { input: unique("q-cmds"), replies: unique("q-replies"), events: unique("q-events") };
    create_topics(rt, b, &[&topics.input, &topics.replies, &topics.events])?;
    let journal = unique("q-journal");
    create_journal_topic(rt, b, &journal)?;
    let group = unique("q-group");
    let servers = [serve(rt)?, serve(rt)?];
    let flows = rt.block_on(async {
        servers
            .iter()
            .map(|(q, _)| {
                bank_flow(b, &group, topics.clone())
                    .journal_topic(&journal)
                    .transactional_id(unique("q-txn"))
                    .commit_interval(COMMIT_INTERVAL)
                    .queryable(q)
                    .run()
            })
            .collect::<Result<Vec<_>, _>>()
    });
    let flows = flows.context("start the flows")?;
    // Both in the group with partitions before the pace starts.
    let joined = Instant::now() + Duration::from_secs(60);
    while !flows.iter().all(|f| f.metrics().assigned_partitions > 0) {
        if Instant::now() >= joined {
            bail!("the two instances did not both get partitions within 60 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let first = servers[0].1.clone();
    let mut driver = None;
    let result = paced(b, &topics.input, &topics.replies, rate, secs, || {
        // The load starts once both instances have restored their partitions.
        if load && driver.is_none() && flows.iter().all(|f| f.status().ready()) {
            driver = Some(query_load(rt, vec![first.clone()], first.clone(), stop.clone()));
        }
        Ok(())
    });
    stop.store(true, Ordering::SeqCst);
    let load = match driver {
        Some(d) => rt.block_on(d)?,
        None => Load::default(),
    };
    for flow in flows {
        stop_flow(rt, flow)?;
    }
    delete_topics(rt, b, &[&topics.input, &topics.replies, &topics.events, &journal]);
    Ok((result?, load))
}
