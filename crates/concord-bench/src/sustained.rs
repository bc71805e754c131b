//! `concord bench events --sustained`: appends at full speed for the whole run on the embedded
//! SQLite store, with an SSE subscriber and a polling reader attached, sampling the database and
//! its write-ahead log every second. The run passes when the log stayed within twice its bound,
//! the database and log together ended within twice the size of the data (or, while the data is
//! smaller than the log's bound, within the data plus twice the bound), and the subscriber
//! received every event; the last window's throughput is reported beside the first's (the
//! baseline of the same run).

use crate::{BenchArgs, BenchServer, Figure, Report, round};
use concord_sdk::{EventInput, ExpectedVersion};
use serde_json::json;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy)]
struct Sample {
    second: u64,
    appended: u64,
    wal: u64,
    db: u64,
}

fn file_len(path: &PathBuf) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

/// The run and whether it passed.
pub(crate) async fn sustained(args: &BenchArgs, database_url: &str) -> anyhow::Result<(Report, bool)> {
    let path = PathBuf::from(
        database_url
            .strip_prefix("sqlite://")
            .filter(|p| !p.contains(":memory:"))
            .ok_or_else(|| anyhow::anyhow!("--sustained runs on a SQLite file (--backend sqlite)"))?,
    );
    let wal = PathBuf::from(format!("{}-wal", path.display()));
    let limit = concord_server::config::Settings::default().sqlite_wal_limit_bytes;
    let server = BenchServer::start(args, database_url).await?;
    let client = server.client.clone();
    let duration = Duration::from_secs(args.seconds);
    let stop = Arc::new(AtomicBool::new(false));
    let appended = Arc::new(AtomicU64::new(0));
    eprintln!(
        "bench: {} clients append for {}s with an SSE subscriber and a polling reader; WAL bound {} MiB ...",
        args.clients,
        args.seconds,
        limit / (1024 * 1024)
    );

    let mut subscription = client.subscribe(0, None).await?;
    let received = Arc::new(AtomicU64::new(0));
    let subscriber = {
        let received = received.clone();
        tokio::spawn(async move {
            while let Some(event) = subscription.next().await {
                event?;
                received.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(())
        })
    };
    let polled = Arc::new(AtomicU64::new(0));
    let poller = {
        let (client, stop, polled) = (client.clone(), stop.clone(), polled.clone());
        tokio::spawn(async move {
            let mut after = 0;
            while !stop.load(Ordering::Relaxed) {
                let page = client.read_log(after, 500, None).await?;
                polled.fetch_add(page.events.len() as u64, Ordering::Relaxed);
                match page.events.last() {
                    Some(last) => after = last.position,
                    None => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
            anyhow::Ok(())
        })
    };
    let payload = json!({"customer": "c-0001", "items": [{"sku": "sku-1", "qty": 2}], "total_cents": 12_345, "note": "x".repeat(120)});
    let appenders: Vec<_> = (0..args.clients)
        .map(|c| {
            let (client, stop, appended, payload) = (client.clone(), stop.clone(), appended.clone(), payload.clone());
            tokio::spawn(async move {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let event = EventInput {
                        id: None,
                        event_type: "OrderPlaced".into(),
                        data: payload.clone(),
                        metadata: None,
                    };
                    client
                        .append(&format!("sus{c}-{}", i / 1000), ExpectedVersion::Any, vec![event])
                        .await?;
                    appended.fetch_add(1, Ordering::Relaxed);
                    i += 1;
                }
                anyhow::Ok(())
            })
        })
        .collect();

    let start = Instant::now();
    let mut samples = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    while start.elapsed() < duration {
        tick.tick().await;
        samples.push(Sample {
            second: start.elapsed().as_secs(),
            appended: appended.load(Ordering::Relaxed),
            wal: file_len(&wal),
            db: file_len(&path),
        });
    }
    stop.store(true, Ordering::Relaxed);
    for a in appenders {
        a.await??;
    }
    poller.await??;
    let total = appended.load(Ordering::Relaxed);
    // The subscriber catches up with everything appended (it started at position 0).
    let deadline = Instant::now() + Duration::from_secs(30);
    while received.load(Ordering::Relaxed) < total && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let got = received.load(Ordering::Relaxed);
    subscriber.abort();
    let under_load = samples.last().copied().unwrap_or(Sample {
        second: 0,
        appended: 0,
        wal: 0,
        db: 0,
    });
    server.stop().await;
    // The data at rest: the database with its log copied in and truncated.
    let pool = sqlx::SqlitePool::connect(database_url).await?;
    sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)").execute(&pool).await?;
    pool.close().await;
    let data = file_len(&path).max(1);

    // The first and the last window: a sixth of the run, at least a second, at most a minute.
    let window = (samples.len() / 6).clamp(1, 60);
    #[allow(clippy::cast_precision_loss)]
    let rate =
        |from: Sample, to: Sample| (to.appended - from.appended) as f64 / (to.second - from.second).max(1) as f64;
    let zero = Sample {
        second: 0,
        appended: 0,
        wal: 0,
        db: 0,
    };
    let first = samples.get(window - 1).map_or(0.0, |&s| rate(zero, s));
    let last = match samples.len().checked_sub(window + 1) {
        Some(i) => rate(samples[i], under_load),
        None => first,
    };
    let wal_max = samples.iter().map(|s| s.wal).max().unwrap_or(0);
    #[allow(clippy::cast_precision_loss)]
    let size_ratio = (under_load.db + under_load.wal) as f64 / data as f64;
    // Twice the data; while the data is still smaller than the log's bound, the data plus twice
    // the bound (a short run cannot have more log than data to show).
    let files_bounded = size_ratio <= 2.0 || under_load.db + under_load.wal <= data + 2 * limit;
    let passed = wal_max <= 2 * limit && files_bounded && got >= total;
    let figure = |name, ops| Figure {
        name,
        ops_per_s: round(ops),
        p50_ms: 0.0,
        p99_ms: 0.0,
    };
    let ours = figure("appends/s, last window", last);
    let baseline = figure("appends/s, first window", first);
    let extra = json!({
        "mode": "sustained",
        "passed": passed,
        "events": total,
        "wal_limit_bytes": limit,
        "wal_max_bytes": wal_max,
        "wal_max_over_limit": round(wal_max as f64 / limit as f64),
        "database_and_wal_end_bytes": under_load.db + under_load.wal,
        "data_bytes": data,
        "size_ratio": round(size_ratio),
        "subscriber_received": got,
        "poller_read": polled.load(Ordering::Relaxed),
        "window_s": window,
        "samples": samples
            .iter()
            .step_by(samples.len().div_ceil(30).max(1))
            .map(|s| json!([s.second, s.appended, s.wal, s.db]))
            .collect::<Vec<_>>(),
        "samples_columns": ["second", "events", "wal_bytes", "db_bytes"],
    });
    let ratio = if first > 0.0 { round(last / first) } else { 0.0 };
    eprintln!(
        "bench: WAL at most {wal_max} bytes (bound {limit}); database and WAL {} bytes for {data} bytes of data \
         ({size_ratio:.2}x); subscriber received {got} of {total}; {}",
        under_load.db + under_load.wal,
        if passed { "PASS" } else { "FAIL" }
    );
    Ok((
        Report {
            area: "events --sustained",
            backend: args.backend,
            clients: args.clients,
            seconds: args.seconds,
            ours,
            baseline,
            ratio,
            extra,
        },
        passed,
    ))
}
