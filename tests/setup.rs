//! A flow's start is bounded: an unreachable cluster stops it with one clear error.

use eventstage::stages::bank_flow::{bank_flow, BankTopics};
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_cluster_stops_the_setup_with_one_error_naming_the_brokers() {
    crate::util::init_tracing();
    let started = Instant::now();
    let flow = bank_flow("127.0.0.1:1", "setup-timeout", BankTopics::default())
        .setup_timeout(Duration::from_secs(3))
        .run()
        .expect("run() returns at once; setup errors come through wait()");
    let err = tokio::time::timeout(Duration::from_secs(20), flow.wait())
        .await
        .expect("the setup gives up after its timeout instead of retrying for ever")
        .expect_err("nothing listens on 127.0.0.1:1");
    let took = started.elapsed();
    assert!(took >= Duration::from_secs(3), "gave up before the setup timeout: {took:?}");
    // The error and its causes, as an application printing it with anyhow shows them.
    let text = format!("{:#}", anyhow::Error::new(err));
    assert!(text.contains("127.0.0.1:1"), "names the brokers: {text}");
    assert!(text.contains("setup_timeout"), "names the fix: {text}");
    assert!(text.contains("metadata"), "says what it was doing: {text}");
    // librdkafka's message (and every other part) appears once, also in the cause chain.
    let parts: Vec<&str> = text.split(": ").map(str::trim).filter(|p| p.len() > 8).collect();
    for p in &parts {
        assert_eq!(text.matches(p).count(), 1, "`{p}` repeats in: {text}");
    }
}
