//! `bench`: a closed-loop load generator. The clients share a few
//! connections and issue writes or linearizable reads back to back on random
//! keys until the deadline; successful operations' latencies go to one HDR
//! histogram. The leader is found (a warm-up write per connection) before the
//! clock starts, and a run in which nothing succeeded fails.

use std::time::Instant;

use anyhow::{Context, bail};
use bytes::Bytes;
use kuberaft_node::client::Client;

use super::{BenchArgs, Cli, client};

pub(super) async fn bench(cli: &Cli, b: &BenchArgs) -> anyhow::Result<()> {
    if b.clients == 0 {
        bail!("--clients must be at least 1");
    }
    if !(0.0..=1.0).contains(&b.read_ratio) {
        bail!("--read-ratio must be between 0 and 1");
    }
    let conns = b.connections.unwrap_or(b.clients.min(8)).max(1);
    let clients: Vec<Client> = (0..conns)
        .map(|_| client(cli))
        .collect::<anyhow::Result<_>>()?;
    // Find the leader before the clock starts.
    clients[0]
        .put(b"bench-warmup", b"x")
        .await
        .context("the cluster does not take writes")?;
    for c in &clients[1..] {
        c.put(b"bench-warmup", b"x").await?;
    }
    let value = Bytes::from(vec![b'v'; b.value_size]);
    let start = Instant::now();
    let end = start + b.duration;
    let mut tasks = Vec::new();
    for i in 0..b.clients {
        let c = clients[i % conns].clone();
        let value = value.clone();
        let (keys, ratio) = (b.keys.max(1), b.read_ratio);
        tasks.push(tokio::spawn(async move {
            let mut h =
                hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
            let (mut writes, mut reads, mut errors) = (0u64, 0u64, 0u64);
            let mut last_error = None;
            while Instant::now() < end {
                let key = format!("bench-{}", rand::random::<u64>() % keys);
                let read = ratio > 0.0 && rand::random::<f64>() < ratio;
                let t = Instant::now();
                let r = if read {
                    c.get(key.as_bytes()).await.map(|_| ())
                } else {
                    c.put(key.as_bytes(), &value).await.map(|_| ())
                };
                match r {
                    Ok(()) => {
                        let _ = h.record(t.elapsed().as_micros().max(1) as u64);
                        if read { reads += 1 } else { writes += 1 }
                    }
                    Err(e) => {
                        errors += 1;
                        last_error = Some(e.to_string());
                    }
                }
            }
            (h, writes, reads, errors, last_error)
        }));
    }
    let mut h = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
    let (mut writes, mut reads, mut errors) = (0, 0, 0);
    let mut last_error = None;
    for t in tasks {
        let (th, w, r, e, le) = t.await?;
        h.add(th).expect("same bounds");
        writes += w;
        reads += r;
        errors += e;
        last_error = last_error.or(le);
    }
    let secs = start.elapsed().as_secs_f64();
    let ops = writes + reads;
    let ops_per_sec = ops as f64 / secs;
    if b.json {
        let v = serde_json::json!({
            "clients": b.clients,
            "connections": conns,
            "duration_s": secs,
            "value_size": b.value_size,
            "read_ratio": b.read_ratio,
            "ops": ops,
            "writes": writes,
            "reads": reads,
            "ops_per_sec": ops_per_sec,
            "p50_us": h.value_at_quantile(0.5),
            "p90_us": h.value_at_quantile(0.9),
            "p99_us": h.value_at_quantile(0.99),
            "p999_us": h.value_at_quantile(0.999),
            "max_us": h.max(),
            "errors": errors,
        });
        println!("{v}");
    } else {
        println!(
            "{ops} ops in {secs:.1} s: {ops_per_sec:.0} ops/s ({writes} writes, {reads} reads), {errors} errors; {} clients, {} B values",
            b.clients, b.value_size
        );
        println!(
            "latency: p50 {:.3} ms  p90 {:.3} ms  p99 {:.3} ms  p99.9 {:.3} ms  max {:.3} ms",
            h.value_at_quantile(0.5) as f64 / 1000.0,
            h.value_at_quantile(0.9) as f64 / 1000.0,
            h.value_at_quantile(0.99) as f64 / 1000.0,
            h.value_at_quantile(0.999) as f64 / 1000.0,
            h.max() as f64 / 1000.0,
        );
        if let Some(e) = last_error {
            println!("last error: {e}");
        }
    }
    if ops == 0 {
        bail!("no operation succeeded");
    }
    Ok(())
}
