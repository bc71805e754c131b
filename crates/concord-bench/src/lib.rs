//! `concord-bench <area>` (also `concord bench <area>`): our figure beside a baseline measured in the same run, on the same
//! database, at the same concurrency. With `--json` the last line is one JSON object.

use anyhow::Context as _;
use clap::{Args, ValueEnum};
use concord_sdk::{Client, EventInput, ExpectedVersion};
use concord_server::config::Settings;
use concord_server::startup::Application;
use serde::Serialize;
use serde_json::json;
use sqlx::Executor as _;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

pub mod bank;
mod outbox;
mod sustained;
mod vault;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchArea {
    /// Appends over HTTP against raw single-row INSERT transactions; append→subscriber latency.
    Events,
    /// 2-step sagas end to end against the same participant calls made directly.
    Sagas,
    /// Two-phase-commit transfers between two PostgreSQL participant services against the same
    /// two local transactions committed directly.
    #[value(name = "2pc")]
    TwoPc,
    /// Tokenize and detokenize (single items and batches of 100) against AES-GCM plus the same
    /// rows written or read straight to the vault's database.
    Vault,
    /// Outbox → relay → NATS JetStream → consumer with inbox, end to end, against direct
    /// JetStream publish-with-ack from one client; also the idempotency layer's added latency.
    Outbox,
    /// Every area above in turn; with `--json`, one object holding each area's report.
    All,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BenchBackend {
    Sqlite,
    Postgres,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    pub area: BenchArea,
    #[arg(long, value_enum, default_value = "sqlite")]
    pub backend: BenchBackend,
    /// For postgres: the server to create a scratch database on [default: CONCORD_TEST_POSTGRES_URL].
    /// For sqlite: the file to use [default: a fresh file in a temporary directory].
    #[arg(long)]
    pub database_url: Option<String>,
    /// Concurrent clients.
    #[arg(long, default_value_t = 32)]
    pub clients: usize,
    /// Seconds for each throughput measurement.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Rate of the append→subscriber latency measurement, events per second.
    #[arg(long, default_value_t = 1000)]
    pub rate: u64,
    /// Print one JSON object as the last line.
    #[arg(long)]
    pub json: bool,
    /// `events` only, on SQLite: append at full speed for the whole run with an SSE subscriber
    /// and a polling reader attached, sampling the database and its write-ahead log every second;
    /// exit 1 when the log passed twice its bound, the files ended over twice the data, or the
    /// subscriber missed an event.
    #[arg(long)]
    pub sustained: bool,
    /// `events` only: server nodes in this process on the one database, the clients spread over
    /// them, so appends of several nodes race for the log (PostgreSQL).
    #[arg(long, default_value_t = 1)]
    pub nodes: usize,
    /// `sagas` only: sagas parked on a one-hour timer before the sagas are measured again beside
    /// them (0: no parked-saga case).
    #[arg(long, default_value_t = 10_000)]
    pub parked: u64,
    /// NATS server of `bench outbox`.
    #[arg(long, env = "CONCORD_TEST_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
}

#[derive(Debug, Serialize)]
struct Figure {
    name: &'static str,
    ops_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    area: &'static str,
    backend: BenchBackend,
    clients: usize,
    seconds: u64,
    ours: Figure,
    baseline: Figure,
    ratio: f64,
    extra: serde_json::Value,
}

/// Runs a benchmark and prints its report.
///
/// # Errors
/// When the database or the server cannot be set up.
pub async fn run(args: BenchArgs) -> anyhow::Result<std::process::ExitCode> {
    anyhow::ensure!(
        args.clients > 0 && args.seconds > 0 && args.rate > 0,
        "clients, seconds and rate must be positive"
    );
    anyhow::ensure!(
        !args.sustained || (args.area == BenchArea::Events && args.backend == BenchBackend::Sqlite),
        "--sustained is a mode of `bench events` on SQLite"
    );
    if args.area == BenchArea::All {
        return all(&args).await;
    }
    let (report, passed) = one(args.area, &args).await?;
    print_report(&report, args.json)?;
    Ok(if passed {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    })
}

/// Every area in turn, each on a database of its own; with `--json`, one object holding each
/// area's report as the last line.
async fn all(args: &BenchArgs) -> anyhow::Result<std::process::ExitCode> {
    let mut reports = serde_json::Map::new();
    let mut passed = true;
    for area in [
        BenchArea::Events,
        BenchArea::Sagas,
        BenchArea::TwoPc,
        BenchArea::Vault,
        BenchArea::Outbox,
    ] {
        let (report, ok) = one(area, args).await?;
        passed &= ok;
        print_report(&report, false)?;
        reports.insert(report.area.to_owned(), serde_json::to_value(&report)?);
    }
    if args.json {
        let all = json!({
            "backend": args.backend,
            "clients": args.clients,
            "seconds": args.seconds,
            "areas": reports,
        });
        println!("{}", serde_json::to_string(&all)?);
    }
    Ok(if passed {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    })
}

/// One area on a fresh database (a scratch database on PostgreSQL, a file in a temporary
/// directory on SQLite unless `--database-url` names one); its report and whether it passed.
async fn one(area: BenchArea, args: &BenchArgs) -> anyhow::Result<(Report, bool)> {
    let mut scratch = None;
    let (database_url, _dir) = match args.backend {
        BenchBackend::Sqlite => match &args.database_url {
            Some(url) => (url.clone(), None),
            None => {
                let dir = tempfile::tempdir()?;
                (format!("sqlite://{}", dir.path().join("bench.db").display()), Some(dir))
            }
        },
        BenchBackend::Postgres => {
            let base = args
                .database_url
                .clone()
                .or_else(|| std::env::var("CONCORD_TEST_POSTGRES_URL").ok())
                .context("--database-url (a PostgreSQL server) is needed for --backend postgres")?;
            let url = concord_store_postgres::create_scratch_database(&base, "concord_bench").await?;
            scratch = Some(base);
            (url, None)
        }
    };
    let mut passed = true;
    let report = match area {
        BenchArea::Events if args.sustained => sustained::sustained(args, &database_url).await.map(|(r, ok)| {
            passed = ok;
            r
        }),
        BenchArea::Events => events(args, &database_url).await,
        BenchArea::Sagas => sagas(args, &database_url).await,
        BenchArea::TwoPc => two_phase_commit(args, &database_url).await,
        BenchArea::Vault => vault::vault(args, &database_url).await,
        BenchArea::Outbox => outbox::outbox(args, &database_url).await,
        BenchArea::All => unreachable!("`all` runs each area through this function"),
    };
    if let Some(base) = scratch {
        concord_store_postgres::drop_scratch_database(&base, &database_url).await?;
    }
    Ok((report?, passed))
}

/// A server of this process on port 0, with the defaults a user gets.
struct BenchServer {
    client: Client,
    /// The server's event store, for the figure without HTTP.
    events: std::sync::Arc<dyn concord_core::ports::EventStore>,
    /// What the coordinator shows transaction participants.
    tx_token: String,
    http: reqwest::Client,
    /// The vault's database, beside the event store's.
    vault_url: String,
    address: String,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl BenchServer {
    async fn start(args: &BenchArgs, database_url: &str) -> anyhow::Result<Self> {
        let vault_key = concord_core::domain::vault::SecretKey::generate()?.to_base64();
        let admin = concord_core::domain::auth::generate_key();
        Self::start_node(args, database_url, vault_key.as_str(), &admin).await
    }

    /// One node of several on one database: they share the vault's master key and the admin key.
    async fn start_node(args: &BenchArgs, database_url: &str, vault_key: &str, admin: &str) -> anyhow::Result<Self> {
        let admin = admin.to_owned();
        let tx_token = concord_core::domain::auth::generate_key();
        let settings = Settings {
            tx_participant_token: Some(tx_token.clone().into()),
            tx_participant_token_hosts: vec!["127.0.0.1".into()],
            listen: "127.0.0.1:0".into(),
            // The participants are on loopback, which the outbound policy refuses unless named.
            saga_allowed_hosts: vec!["127.0.0.1".into()],
            tx_allowed_hosts: vec!["127.0.0.1".into()],
            database_url: database_url.to_owned(),
            admin_key: Some(admin.clone().into()),
            db_connections: u32::try_from(args.clients.clamp(4, 32)).unwrap_or(16),
            sqlite_synchronous_full: true,
            vault_master_key: Some(vault_key.into()),
            // The vault benchmark measures throughput; the limit is a policy, set per deployment.
            vault_detokenize_per_s: 0.0,
            ..Settings::default()
        };
        let vault_url = settings.vault_url();
        let app = Application::build(settings).await?;
        let address = format!("http://{}", app.local_addr()?);
        let events = app.state().events.clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(app.run_until(async {
            let _ = stopped.await;
        }));
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(args.clients)
            .tcp_nodelay(true)
            .build()?;
        let client = Client::with_http(address.clone(), admin, http.clone());
        Ok(Self {
            client,
            events,
            tx_token,
            http,
            vault_url,
            address,
            stop,
            task,
        })
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

async fn events(args: &BenchArgs, database_url: &str) -> anyhow::Result<Report> {
    anyhow::ensure!(
        args.nodes <= 1 || args.backend == BenchBackend::Postgres,
        "--nodes above 1 needs --backend postgres: an embedded SQLite database has one node"
    );
    let vault_key = concord_core::domain::vault::SecretKey::generate()?.to_base64();
    let admin = concord_core::domain::auth::generate_key();
    let server = BenchServer::start_node(args, database_url, vault_key.as_str(), &admin).await?;
    let mut others = Vec::new();
    for _ in 1..args.nodes.max(1) {
        others.push(BenchServer::start_node(args, database_url, vault_key.as_str(), &admin).await?);
    }
    let client = server.client.clone();
    let clients: Vec<Client> = std::iter::once(&server)
        .chain(&others)
        .map(|s| s.client.clone())
        .collect();
    let duration = Duration::from_secs(args.seconds);
    let payload = json!({"customer": "c-0001", "items": [{"sku": "sku-1", "qty": 2}], "total_cents": 12_345, "note": "x".repeat(120)});

    eprintln!(
        "bench: {} clients append over HTTP to {} node(s) for {}s ...",
        args.clients,
        clients.len(),
        args.seconds
    );
    let (c2, p2) = (clients.clone(), payload.clone());
    let ours = run_clients(args.clients, duration, move |c, i| {
        let client = c2[c % c2.len()].clone();
        let payload = p2.clone();
        async move {
            let event = EventInput {
                id: None,
                event_type: "OrderPlaced".into(),
                data: payload,
                metadata: None,
            };
            client
                .append(&format!("bench{c}-{}", i / 1000), ExpectedVersion::Any, vec![event])
                .await
                .map(|_| ())
                .map_err(anyhow::Error::from)
        }
    })
    .await?;

    eprintln!(
        "bench: {} clients run raw single-row INSERT transactions for {}s ...",
        args.clients, args.seconds
    );
    let raw = RawInserts::open(database_url, args.clients).await?;
    let body = payload.to_string();
    let raw2 = raw.clone();
    let baseline = run_clients(args.clients, duration, move |c, _| {
        let raw = raw2.clone();
        let body = body.clone();
        async move { raw.insert(&format!("raw{c}"), &body).await }
    })
    .await?;
    raw.close().await;

    eprintln!(
        "bench: {} clients append through the event store, without HTTP, for {}s ...",
        args.clients, args.seconds
    );
    let stores: Vec<_> = std::iter::once(&server)
        .chain(&others)
        .map(|s| s.events.clone())
        .collect();
    let p3 = payload.clone();
    let direct = run_clients(args.clients, duration, move |c, i| {
        let store = stores[c % stores.len()].clone();
        let payload = p3.clone();
        async move {
            let event = concord_core::domain::event::UncheckedEvent {
                id: None,
                event_type: "OrderPlaced".into(),
                data: payload,
                metadata: None,
            };
            let stream = concord_core::domain::StreamName::parse(&format!("direct{c}-{}", i / 1000))?;
            let request = concord_core::domain::AppendRequest::new(
                stream,
                concord_core::domain::ExpectedVersion::Any,
                vec![event],
                &concord_core::domain::Limits::default(),
            )?;
            store.append(request).await.map(|_| ()).map_err(anyhow::Error::from)
        }
    })
    .await?;
    let direct = figure("append via the event store", &direct, duration);

    eprintln!("bench: append→subscriber latency at {} events/s ...", args.rate);
    let latency = subscriber_latency(&client, args.rate, duration.min(Duration::from_secs(5))).await?;

    let mut latency = latency;
    if let Some(extra) = latency.as_object_mut() {
        extra.insert("store_append_ops_per_s".into(), json!(round(direct.ops_per_s)));
        extra.insert("store_append_p50_ms".into(), json!(direct.p50_ms));
        extra.insert("store_append_p99_ms".into(), json!(direct.p99_ms));
        extra.extend(group_commit_figures());
        extra.insert("nodes".into(), json!(clients.len()));
    }
    server.stop().await;
    for s in others {
        s.stop().await;
    }
    let ours = figure("append via HTTP", &ours, duration);
    let baseline = figure("raw single-row INSERT", &baseline, duration);
    if let Some(extra) = latency.as_object_mut() {
        extra.insert(
            "ratio_store_vs_raw_insert".into(),
            json!(round(ratio(&direct, &baseline))),
        );
    }
    let ratio = ratio(&ours, &baseline);
    Ok(Report {
        area: "events",
        backend: args.backend,
        clients: args.clients,
        seconds: args.seconds,
        ours,
        baseline,
        ratio,
        extra: latency,
    })
}

/// How long the `/slow` participant takes to answer.
const SLOW_PARTICIPANT: Duration = Duration::from_millis(20);

/// A participant that answers every call at once, as fast as this process can (`/a`, `/b`), or
/// after [`SLOW_PARTICIPANT`] (`/slow`).
async fn instant_participant() -> anyhow::Result<String> {
    use axum::routing::post;
    let ok = || async { axum::Json(json!({"ok": true})) };
    // A participant that takes its time: what a parallel group saves.
    let slow = || async {
        tokio::time::sleep(SLOW_PARTICIPANT).await;
        axum::Json(json!({"ok": true}))
    };
    let app = axum::Router::new()
        .route("/a", post(ok))
        .route("/b", post(ok))
        .route("/slow", post(slow));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(url)
}

async fn sagas(args: &BenchArgs, database_url: &str) -> anyhow::Result<Report> {
    const STEPS: f64 = 2.0;
    let server = BenchServer::start(args, database_url).await?;
    let participant = instant_participant().await?;
    let step = |name: &str, path: &str| {
        json!({"name": name,
               "action": {"method": "POST", "url": format!("{participant}{path}"), "body": {"order": "{{input.order}}"}},
               "compensation": {"method": "POST", "url": format!("{participant}{path}"), "body": {"undo": "{{saga.id}}"}}})
    };
    let definition = json!({"steps": [step("reserve", "/a"), step("charge", "/b")]});
    server.client.put_saga_definition("bench", &definition).await?;
    let duration = Duration::from_secs(args.seconds);
    let not_completed = Arc::new(std::sync::atomic::AtomicU64::new(0));

    let saga_op = |client: Client, nc: Arc<std::sync::atomic::AtomicU64>| {
        move |c: usize, i: usize| {
            let client = client.clone();
            let nc = nc.clone();
            async move {
                let body = concord_api::sagas::StartSagaBody {
                    definition: "bench".into(),
                    input: json!({"order": format!("o-{c}-{i}")}),
                    id: None,
                };
                let saga = client.start_saga(&body, Some(Duration::from_secs(30))).await?;
                if saga.status != "completed" {
                    nc.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                Ok(())
            }
        }
    };
    let direct_op = |http: reqwest::Client, base: String| {
        move |c: usize, i: usize| {
            let http = http.clone();
            let base = base.clone();
            async move {
                for path in ["/a", "/b"] {
                    let r = http
                        .post(format!("{base}{path}"))
                        .header("idempotency-key", format!("o-{c}-{i}:{path}"))
                        .json(&json!({"order": format!("o-{c}-{i}")}))
                        .send()
                        .await?;
                    anyhow::ensure!(r.status().is_success(), "participant answered {}", r.status());
                    r.bytes().await?;
                }
                Ok(())
            }
        }
    };

    eprintln!(
        "bench: {} clients run 2-step sagas for {}s ...",
        args.clients, args.seconds
    );
    let ours = run_clients(
        args.clients,
        duration,
        saga_op(server.client.clone(), not_completed.clone()),
    )
    .await?;
    eprintln!(
        "bench: {} clients make the same two participant calls directly for {}s ...",
        args.clients, args.seconds
    );
    let baseline = run_clients(
        args.clients,
        duration,
        direct_op(server.http.clone(), participant.clone()),
    )
    .await?;
    // Unloaded: one client, so the latencies hold no queueing, only the orchestration itself.
    let short = duration.min(Duration::from_secs(5));
    eprintln!(
        "bench: one client, sagas then direct calls, {}s each ...",
        short.as_secs()
    );
    let ours_one = run_clients(1, short, saga_op(server.client.clone(), not_completed.clone())).await?;
    let baseline_one = run_clients(1, short, direct_op(server.http.clone(), participant.clone())).await?;
    let parallel = parallel_case(&server, &participant, short).await?;
    let parked = if args.parked > 0 {
        Some(
            parked_case(
                args,
                &server,
                duration,
                saga_op(server.client.clone(), not_completed.clone()),
            )
            .await?,
        )
    } else {
        None
    };
    server.stop().await;
    let ours = figure("2-step saga via HTTP, start to completed", &ours, duration);
    let baseline = figure("the same 2 participant calls, direct", &baseline, duration);
    let ratio = ratio(&ours, &baseline);
    let ours_one = figure("one client: saga", &ours_one, short);
    let baseline_one = figure("one client: direct calls", &baseline_one, short);
    let extra = json!({
        "steps": 2,
        "overhead_per_step_p50_ms": round((ours.p50_ms - baseline.p50_ms) / STEPS),
        "overhead_per_step_p99_ms": round((ours.p99_ms - baseline.p99_ms) / STEPS),
        "one_client": {
            "saga_p50_ms": ours_one.p50_ms,
            "saga_p99_ms": ours_one.p99_ms,
            "direct_p50_ms": baseline_one.p50_ms,
            "direct_p99_ms": baseline_one.p99_ms,
            "overhead_per_step_p50_ms": round((ours_one.p50_ms - baseline_one.p50_ms) / STEPS),
            "overhead_per_step_p99_ms": round((ours_one.p99_ms - baseline_one.p99_ms) / STEPS),
        },
        "not_completed": not_completed.load(std::sync::atomic::Ordering::Relaxed),
        "parallel_group": parallel,
        "parked": parked.map(|(n, start_s, with)| json!({
            "sagas_parked": n,
            "parking_seconds": round(start_s),
            "what": "sagas parked on a one-hour timer (no lease, no worker), then the 2-step sagas again beside them",
            "sagas_per_s_beside_them": with.ops_per_s,
            "p50_ms": with.p50_ms,
            "p99_ms": with.p99_ms,
            "ratio_to_without": round(with.ops_per_s / ours.ops_per_s.max(f64::MIN_POSITIVE)),
        })),
    });
    Ok(Report {
        area: "sagas",
        backend: args.backend,
        clients: args.clients,
        seconds: args.seconds,
        ours,
        baseline,
        ratio,
        extra,
    })
}

/// One client, for `duration` each: a saga whose two steps call a participant that takes 20 ms,
/// once as a parallel group and once in sequence, and that call made directly. The group's
/// latency should be near one call's, the sequence's near two.
async fn parallel_case(
    server: &BenchServer,
    participant: &str,
    duration: Duration,
) -> anyhow::Result<serde_json::Value> {
    let branch = |name: &str| json!({"name": name, "action": {"method": "POST", "url": format!("{participant}/slow"), "body": {"saga": "{{saga.id}}"}}});
    let group = json!({"steps": [{"name": "both", "parallel": [branch("east"), branch("west")]}]});
    let sequence = json!({"steps": [branch("east"), branch("west")]});
    server.client.put_saga_definition("bench-group", &group).await?;
    server.client.put_saga_definition("bench-sequence", &sequence).await?;
    let op = |definition: &'static str| {
        let client = server.client.clone();
        move |_: usize, _: usize| {
            let client = client.clone();
            async move {
                let body = concord_api::sagas::StartSagaBody {
                    definition: definition.into(),
                    input: json!({}),
                    id: None,
                };
                let saga = client.start_saga(&body, Some(Duration::from_secs(30))).await?;
                anyhow::ensure!(saga.status == "completed", "saga {}: {}", saga.id, saga.status);
                Ok(())
            }
        }
    };
    eprintln!(
        "bench: one client, a two-branch parallel group, the same two steps in sequence, one direct call, {}s each ...",
        duration.as_secs()
    );
    let grouped = figure(
        "parallel group of two 20 ms calls",
        &run_clients(1, duration, op("bench-group")).await?,
        duration,
    );
    let sequenced = figure(
        "the same two calls in sequence",
        &run_clients(1, duration, op("bench-sequence")).await?,
        duration,
    );
    let http = server.http.clone();
    let url = format!("{participant}/slow");
    let direct = run_clients(1, duration, move |_, _| {
        let http = http.clone();
        let url = url.clone();
        async move {
            let r = http.post(&url).json(&json!({})).send().await?;
            anyhow::ensure!(r.status().is_success(), "participant answered {}", r.status());
            r.bytes().await?;
            Ok(())
        }
    })
    .await?;
    let direct = figure("one 20 ms call, direct", &direct, duration);
    Ok(json!({
        "what": "one client; two branches against a participant that takes 20 ms",
        "group_p50_ms": grouped.p50_ms,
        "group_p99_ms": grouped.p99_ms,
        "sequence_p50_ms": sequenced.p50_ms,
        "sequence_p99_ms": sequenced.p99_ms,
        "one_call_direct_p50_ms": direct.p50_ms,
        "ratio_group_to_sequence_p50": round(grouped.p50_ms / sequenced.p50_ms.max(f64::MIN_POSITIVE)),
    }))
}

/// Parks `args.parked` sagas on a one-hour timer (32 starts in flight), checks one is parked, then
/// measures `op` again beside them: whether parked sagas cost the running ones anything.
async fn parked_case<F, Fut>(
    args: &BenchArgs,
    server: &BenchServer,
    duration: Duration,
    op: F,
) -> anyhow::Result<(u64, f64, Figure)>
where
    F: Fn(usize, usize) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    use futures::{StreamExt as _, TryStreamExt as _};
    let definition = json!({"steps": [{"name": "hold", "sleep_ms": 3_600_000}]});
    server.client.put_saga_definition("bench-parked", &definition).await?;
    eprintln!("bench: parking {} sagas on a one-hour timer ...", args.parked);
    let start = Instant::now();
    let run = uuid::Uuid::new_v4().simple().to_string();
    futures::stream::iter(0..args.parked)
        .map(|i| {
            let client = server.client.clone();
            let id = format!("parked-{}-{i}", &run[..8]);
            async move {
                let body = concord_api::sagas::StartSagaBody {
                    definition: "bench-parked".into(),
                    input: json!({}),
                    id: Some(id),
                };
                client
                    .start_saga(&body, None)
                    .await
                    .map(drop)
                    .map_err(anyhow::Error::from)
            }
        })
        .buffer_unordered(32)
        .try_collect::<Vec<()>>()
        .await?;
    let parking = start.elapsed().as_secs_f64();
    // The last one started is parked: running, its timer's end as its next attempt.
    let last = format!("parked-{}-{}", &run[..8], args.parked - 1);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let saga = server.client.saga(&last, None).await?;
        if saga.status == "running" && saga.next_attempt_at.is_some() {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "saga {last} did not park: {}", saga.status);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "bench: {} clients run 2-step sagas for {}s beside the parked ones ...",
        args.clients, args.seconds
    );
    let with = run_clients(args.clients, duration, op).await?;
    Ok((
        args.parked,
        parking,
        figure("2-step saga beside parked sagas", &with, duration),
    ))
}

/// Accounts per bank in the 2PC benchmark: enough that concurrent transfers seldom meet on one.
const BANK_ACCOUNTS: u64 = 10_000;

async fn two_phase_commit(args: &BenchArgs, database_url: &str) -> anyhow::Result<Report> {
    use crate::bank::Bank;
    let base = std::env::var("CONCORD_TEST_POSTGRES_URL")
        .ok()
        .or_else(|| args.database_url.clone().filter(|u| u.starts_with("postgres")))
        .context("the participants need PostgreSQL: set CONCORD_TEST_POSTGRES_URL or --database-url")?;
    let (db_a, db_b) = (
        concord_store_postgres::create_scratch_database(&base, "concord_bench").await?,
        concord_store_postgres::create_scratch_database(&base, "concord_bench").await?,
    );
    let result = async {
        let server = BenchServer::start(args, database_url).await?;
        let names: Vec<String> = (0..BANK_ACCOUNTS).map(|i| format!("acct-{i}")).collect();
        let accounts: Vec<(&str, i64)> = names.iter().map(|n| (n.as_str(), 1_000_000)).collect();
        let auth = concord_sdk::tx::CoordinatorAuth::Token(server.tx_token.clone());
        let a = Bank::start(&db_a, "bench-a", &accounts, "127.0.0.1:0", 0, auth.clone()).await?;
        let b = Bank::start(&db_b, "bench-b", &accounts, "127.0.0.1:0", 0, auth).await?;
        let duration = Duration::from_secs(args.seconds);
        let pick = |c: usize, i: usize| ((c * 7919 + i * 104_729) as u64) % BANK_ACCOUNTS;

        eprintln!(
            "bench: {} clients run 2PC transfers for {}s ...",
            args.clients, args.seconds
        );
        let (client, a_url, b_url) = (server.client.clone(), a.url.clone(), b.url.clone());
        let ours = run_clients(args.clients, duration, move |c, i| {
            let (client, a_url, b_url) = (client.clone(), a_url.clone(), b_url.clone());
            async move {
                let account = format!("acct-{}", pick(c, i));
                let body = concord_api::tx::BeginTxBody {
                    participants: vec![
                        concord_api::tx::ParticipantIn {
                            name: "bank-a".into(),
                            url: a_url,
                            payload: json!({"account": account, "delta": -1}),
                        },
                        concord_api::tx::ParticipantIn {
                            name: "bank-b".into(),
                            url: b_url,
                            payload: json!({"account": account, "delta": 1}),
                        },
                    ],
                    timeout_ms: 10_000,
                };
                let d = client.begin_transaction(&body).await?;
                anyhow::ensure!(d.outcome == "committed", "transaction {} {}", d.xid, d.outcome);
                Ok(())
            }
        })
        .await?;
        // Phase 2 runs after the answer: let it finish before the baseline shares the databases.
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            let page = server.client.list_transactions(None, Some(true), None, 1).await?;
            if page.transactions.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        eprintln!(
            "bench: {} clients commit the same two local transactions directly for {}s ...",
            args.clients, args.seconds
        );
        let (pa, pb) = (a.pool.clone(), b.pool.clone());
        let baseline = run_clients(args.clients, duration, move |c, i| {
            let (pa, pb) = (pa.clone(), pb.clone());
            async move {
                let account = format!("acct-{}", pick(c, i));
                for (pool, delta) in [(&pa, -1_i64), (&pb, 1)] {
                    sqlx::query("UPDATE accounts SET balance = balance + $2 WHERE id = $1")
                        .bind(&account)
                        .bind(delta)
                        .execute(pool)
                        .await?;
                }
                Ok(())
            }
        })
        .await?;
        eprintln!(
            "bench: {} clients run the same transfer as PREPARE TRANSACTION and COMMIT PREPARED on both databases, \
             directly, for {}s ...",
            args.clients, args.seconds
        );
        let (pa, pb) = (a.pool.clone(), b.pool.clone());
        let direct_2pc = run_clients(args.clients, duration, move |c, i| {
            let (pa, pb) = (pa.clone(), pb.clone());
            async move {
                let account = format!("acct-{}", pick(c, i));
                let gid = format!("bench-direct-{}", uuid::Uuid::now_v7());
                // Phase 1 on both at once, as a coordinator would; then phase 2 on both.
                // Transaction identifiers are per cluster, and both databases may share one.
                let prepare = |pool: sqlx::PgPool, delta: i64| {
                    let (account, gid) = (account.clone(), format!("{gid}-{delta}"));
                    async move {
                        let mut conn = pool.acquire().await?;
                        sqlx::query("BEGIN").execute(&mut *conn).await?;
                        sqlx::query("UPDATE accounts SET balance = balance + $2 WHERE id = $1")
                            .bind(&account)
                            .bind(delta)
                            .execute(&mut *conn)
                            .await?;
                        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("PREPARE TRANSACTION '{gid}'")))
                            .execute(&mut *conn)
                            .await?;
                        anyhow::Ok(())
                    }
                };
                let prepared = tokio::join!(prepare(pa.clone(), -1), prepare(pb.clone(), 1));
                if let (Err(e), _) | (_, Err(e)) = prepared {
                    for (pool, delta) in [(&pa, -1), (&pb, 1)] {
                        let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!("ROLLBACK PREPARED '{gid}-{delta}'")))
                            .execute(pool)
                            .await;
                    }
                    return Err(e.context("direct PREPARE TRANSACTION"));
                }
                let commit = |pool: sqlx::PgPool, delta: i64| {
                    let gid = format!("{gid}-{delta}");
                    async move {
                        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("COMMIT PREPARED '{gid}'")))
                            .execute(&pool)
                            .await?;
                        anyhow::Ok(())
                    }
                };
                tokio::try_join!(commit(pa, -1), commit(pb, 1))?;
                Ok(())
            }
        })
        .await?;
        let prepared_left = a.prepared().await? + b.prepared().await?;
        a.stop().await;
        b.stop().await;
        server.stop().await;
        let ours = figure("2PC transfer via HTTP, until the durable decision", &ours, duration);
        let baseline = figure("the same 2 local transactions, direct", &baseline, duration);
        let ratio = ratio(&ours, &baseline);
        let direct_2pc = figure(
            "the same transfer as PREPARE + COMMIT PREPARED, direct",
            &direct_2pc,
            duration,
        );
        let ratio_2pc = round(self::ratio(&ours, &direct_2pc));
        anyhow::Ok(Report {
            area: "2pc",
            backend: args.backend,
            clients: args.clients,
            seconds: args.seconds,
            ours,
            baseline,
            ratio,
            // The cost of two-phase commit itself, with no coordinator log: the ratio against it
            // is what the coordinator adds.
            extra: json!({
                "participants": 2,
                "prepared_left_after_phase_2": prepared_left,
                "baseline_2pc_direct": direct_2pc,
                "ratio_vs_2pc_direct": ratio_2pc,
            }),
        })
    }
    .await;
    // The run's own error first: a failed run may leave what keeps a database from dropping.
    let result = result?;
    concord_store_postgres::drop_scratch_database(&base, &db_a).await?;
    concord_store_postgres::drop_scratch_database(&base, &db_b).await?;
    Ok(result)
}

/// Runs `clients` loops of `op` until `duration` passes; answers every operation's latency.
async fn run_clients<F, Fut>(clients: usize, duration: Duration, op: F) -> anyhow::Result<Vec<Duration>>
where
    F: Fn(usize, usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let start = Instant::now();
    let op = Arc::new(op);
    let loops: Vec<_> = (0..clients)
        .map(|c| {
            let op = Arc::clone(&op);
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut i = 0;
                while start.elapsed() < duration {
                    let t = Instant::now();
                    op(c, i).await?;
                    latencies.push(t.elapsed());
                    i += 1;
                }
                anyhow::Ok(latencies)
            })
        })
        .collect();
    let mut all = Vec::new();
    for l in loops {
        all.extend(l.await??);
    }
    Ok(all)
}

/// Average batch size and transaction time of the group committer over the whole run, read from
/// this process's own metrics.
fn group_commit_figures() -> serde_json::Map<String, serde_json::Value> {
    let text = concord_server::telemetry::metrics_handle().render();
    let value = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse::<f64>().ok()))
            .unwrap_or(0.0)
    };
    let batches = value("concord_group_commit_batch_appends_count ");
    let mut out = serde_json::Map::new();
    if batches > 0.0 {
        out.insert("group_commits".into(), json!(batches));
        out.insert(
            "group_commit_avg_appends".into(),
            json!(round(value("concord_group_commit_batch_appends_sum ") / batches)),
        );
        out.insert(
            "group_commit_avg_ms".into(),
            json!(round(
                1000.0 * value("concord_group_commit_duration_seconds_sum ") / batches
            )),
        );
    }
    out
}

fn figure(name: &'static str, latencies: &[Duration], duration: Duration) -> Figure {
    let mut ms: Vec<f64> = latencies.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
    ms.sort_by(f64::total_cmp);
    Figure {
        name,
        ops_per_s: round(ms.len() as f64 / duration.as_secs_f64()),
        p50_ms: round(percentile(&ms, 0.50)),
        p99_ms: round(percentile(&ms, 0.99)),
    }
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// Ours / baseline by throughput, both measured in the same run (0 when the baseline did nothing).
fn ratio(ours: &Figure, baseline: &Figure) -> f64 {
    if baseline.ops_per_s > 0.0 {
        ours.ops_per_s / baseline.ops_per_s
    } else {
        0.0
    }
}

fn round(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// Appends at a fixed rate while an SSE subscriber receives; latency from the moment the append
/// is sent to the moment the subscriber has the event (commit and delivery included).
async fn subscriber_latency(client: &Client, rate: u64, duration: Duration) -> anyhow::Result<serde_json::Value> {
    // The position of a marker event is the head: subscribe right after it.
    let marker = EventInput {
        id: None,
        event_type: "Start".into(),
        data: json!({}),
        metadata: None,
    };
    let head = client
        .append("latmark-1", ExpectedVersion::Any, vec![marker])
        .await?
        .position;
    let mut sub = client.subscribe(head, Some("lat")).await?;
    let start = Instant::now();
    let total = (rate as f64 * duration.as_secs_f64()) as usize;
    let sender = {
        let client = client.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut inflight = Vec::with_capacity(total);
            for i in 0..total {
                tick.tick().await;
                let client = client.clone();
                let sent_us = start.elapsed().as_micros() as u64;
                inflight.push(tokio::spawn(async move {
                    let event = EventInput {
                        id: None,
                        event_type: "Tick".into(),
                        data: json!({"sent_us": sent_us}),
                        metadata: None,
                    };
                    client
                        .append(&format!("lat-{}", i % 64), ExpectedVersion::Any, vec![event])
                        .await?;
                    anyhow::Ok((start.elapsed().as_micros() as u64).saturating_sub(sent_us) as f64 / 1000.0)
                }));
            }
            let mut acked = Vec::with_capacity(total);
            for f in inflight {
                acked.push(f.await??);
            }
            acked.sort_by(f64::total_cmp);
            anyhow::Ok(acked)
        })
    };
    let mut lat_ms = Vec::with_capacity(total);
    while lat_ms.len() < total {
        let e = tokio::time::timeout(Duration::from_secs(10), sub.next())
            .await
            .context("the subscriber stalled")?
            .context("the subscription ended")??;
        let sent = e.data["sent_us"].as_u64().context("event without sent_us")?;
        let now = start.elapsed().as_micros() as u64;
        lat_ms.push(now.saturating_sub(sent) as f64 / 1000.0);
    }
    let acked = sender.await??;
    let achieved = total as f64 / start.elapsed().as_secs_f64();
    lat_ms.sort_by(f64::total_cmp);
    Ok(json!({
        "subscriber_rate_target": rate,
        "subscriber_rate_achieved": round(achieved),
        "subscriber_events": lat_ms.len(),
        "append_to_subscriber_p50_ms": round(percentile(&lat_ms, 0.50)),
        "append_to_subscriber_p99_ms": round(percentile(&lat_ms, 0.99)),
        "append_acknowledged_p50_ms": round(percentile(&acked, 0.50)),
        "append_acknowledged_p99_ms": round(percentile(&acked, 0.99)),
    }))
}

/// The baseline: one INSERT of an event-sized row per transaction, straight to the same database.
#[derive(Clone)]
enum RawInserts {
    Sqlite(sqlx::SqlitePool),
    Postgres(sqlx::PgPool),
}

impl RawInserts {
    /// Pools straight to the database, durable as the stores are (WAL and `synchronous=FULL` on
    /// SQLite).
    async fn connect(url: &str, clients: usize) -> anyhow::Result<Self> {
        let max = u32::try_from(clients).unwrap_or(32);
        if url.starts_with("sqlite:") {
            use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
            use std::str::FromStr as _;
            let opts = SqliteConnectOptions::from_str(url)?
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Full)
                .busy_timeout(Duration::from_secs(30));
            Ok(Self::Sqlite(
                SqlitePoolOptions::new().max_connections(max).connect_with(opts).await?,
            ))
        } else {
            Ok(Self::Postgres(
                sqlx::postgres::PgPoolOptions::new()
                    .max_connections(max)
                    .connect(url)
                    .await?,
            ))
        }
    }

    /// Runs the statement written for this database.
    async fn execute(&self, sqlite: &'static str, postgres: &'static str) -> anyhow::Result<()> {
        match self {
            Self::Sqlite(pool) => {
                pool.execute(sqlite).await?;
            }
            Self::Postgres(pool) => {
                pool.execute(postgres).await?;
            }
        }
        Ok(())
    }

    async fn open(url: &str, clients: usize) -> anyhow::Result<Self> {
        let raw = Self::connect(url, clients).await?;
        raw.execute(
            "CREATE TABLE IF NOT EXISTS bench_raw (position INTEGER PRIMARY KEY, id BLOB NOT NULL UNIQUE, \
             stream TEXT NOT NULL, event_type TEXT NOT NULL, data TEXT NOT NULL, metadata TEXT NOT NULL, recorded_at TEXT NOT NULL)",
            "CREATE TABLE IF NOT EXISTS bench_raw (position BIGSERIAL PRIMARY KEY, id UUID NOT NULL UNIQUE, \
             stream TEXT NOT NULL, event_type TEXT NOT NULL, data JSONB NOT NULL, metadata JSONB NOT NULL, recorded_at TIMESTAMPTZ NOT NULL)",
        )
        .await?;
        Ok(raw)
    }

    async fn insert(&self, stream: &str, data: &str) -> anyhow::Result<()> {
        let id = uuid::Uuid::now_v7();
        match self {
            Self::Sqlite(pool) => {
                // BEGIN IMMEDIATE takes the write lock up front, as any correct SQLite writer must.
                let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
                sqlx::query(
                    "INSERT INTO bench_raw (id, stream, event_type, data, metadata, recorded_at) VALUES (?, ?, 'OrderPlaced', ?, '{}', ?)",
                )
                .bind(id)
                .bind(stream)
                .bind(data)
                .bind(chrono::Utc::now())
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
            }
            Self::Postgres(pool) => {
                sqlx::query(
                    "INSERT INTO bench_raw (id, stream, event_type, data, metadata, recorded_at) VALUES ($1, $2, 'OrderPlaced', $3::jsonb, '{}', now())",
                )
                .bind(id)
                .bind(stream)
                .bind(data)
                .execute(pool)
                .await?;
            }
        }
        Ok(())
    }

    async fn close(&self) {
        match self {
            Self::Sqlite(p) => p.close().await,
            Self::Postgres(p) => p.close().await,
        }
    }
}

fn print_report(r: &Report, json: bool) -> anyhow::Result<()> {
    println!(
        "area {} · backend {:?} · {} clients · {} s",
        r.area, r.backend, r.clients, r.seconds
    );
    println!("{:<24} {:>12} {:>10} {:>10}", "", "ops/s", "p50 ms", "p99 ms");
    for f in [&r.ours, &r.baseline] {
        println!(
            "{:<24} {:>12.1} {:>10.3} {:>10.3}",
            f.name, f.ops_per_s, f.p50_ms, f.p99_ms
        );
    }
    println!("ratio (ours / baseline): {:.2}", r.ratio);
    println!("{}", serde_json::to_string_pretty(&r.extra)?);
    if json {
        println!("{}", serde_json::to_string(r)?);
    }
    Ok(())
}
