//! `concord saga`: define, start, inspect, operate (cancel, pause, resume, retry now) and retry
//! sagas, waiting for them to finish, and
//! their text output (the timeline of a saga, the list of sagas).

use super::Remote;
use anyhow::Context as _;
use chrono::{DateTime, SecondsFormat, Utc};
use clap::Subcommand;
use concord_api::sagas::{
    BatchActionIn, BatchFilterIn, BatchIn, BatchOut, ParticipantHostOut, ParticipantLimitsIn, SagaOut, SagaPage,
    SagaStatusIn, StartSagaBody,
};
use concord_core::domain::saga::SagaStatus;
use concord_sdk::Client;
use serde_json::Value;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The longest single `wait_ms` asked of the server, which caps it (`saga_max_wait_ms`, 60 s by
/// default): a longer `--wait` is several waits.
const WAIT_CHUNK: Duration = Duration::from_secs(30);
/// Longest output or error shown on one line of a timeline; `--json` shows them whole.
const MAX_SHOWN_CHARS: usize = 160;

#[derive(Debug, Subcommand)]
pub enum SagaCommand {
    /// Put a definition from a JSON file; one that differs from the latest becomes a new version.
    Define {
        /// `{"name"?, "steps": [...], "compensation_retry"?: {...}}`.
        file: PathBuf,
        /// The definition's name [default: the file's "name", else the file's stem].
        #[arg(long)]
        name: Option<String>,
    },
    /// Start a saga of a definition's latest version; print its id and status.
    Start {
        definition: String,
        /// The saga's input, JSON.
        #[arg(long, default_value = "{}")]
        input: String,
        /// A caller-chosen id; starting an existing id again answers that saga.
        #[arg(long)]
        id: Option<String>,
        /// Wait up to this many seconds for the saga to finish, then print it as `show` does.
        #[arg(long, value_name = "SECONDS", value_parser = parse_wait)]
        wait: Option<Duration>,
    },
    /// A saga's steps, then every attempt in time order: when it started, how long it took, how it
    /// ended.
    Show { id: String },
    /// Sagas by id, a page at a time.
    List {
        /// `running`, `compensating`, `completed`, `compensated`, `failed` or `cancelled`.
        #[arg(long)]
        status: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Start after this id (the `next` of the previous page).
        #[arg(long)]
        after: Option<String>,
    },
    /// Send a signal to a saga; its JSON body becomes the output of the wait step that takes it.
    Signal {
        id: String,
        signal: String,
        /// The signal's body, JSON.
        #[arg(long, default_value = "{}")]
        body: String,
        /// Sent as `Idempotency-Key`: a retry with the same key sends nothing twice.
        #[arg(long)]
        idempotency_key: Option<String>,
    },
    /// Cancel a running saga: it compensates what ran and ends `cancelled`.
    Cancel(OperationArgs),
    /// Pause a saga: no attempt starts until `resume`.
    Pause(OperationArgs),
    /// Resume a paused saga.
    Resume(OperationArgs),
    /// Start a saga's next attempt now instead of after its backoff.
    RetryNow(OperationArgs),
    /// Apply `cancel`, `pause`, `resume` or `retry` to every saga a filter matches, server-side.
    Batch {
        action: String,
        /// `running`, `compensating`, `completed`, `compensated`, `failed` or `cancelled`.
        #[arg(long)]
        status: Option<String>,
        #[arg(long)]
        definition: Option<String>,
        /// RFC 3339.
        #[arg(long)]
        started_before: Option<DateTime<Utc>>,
        /// RFC 3339.
        #[arg(long)]
        started_after: Option<DateTime<Utc>>,
        /// Only count the sagas it matches now.
        #[arg(long)]
        dry_run: bool,
        /// Wait up to this many seconds for the batch to finish.
        #[arg(long, value_name = "SECONDS", value_parser = parse_wait)]
        wait: Option<Duration>,
    },
    /// A batch and how far it got.
    BatchShow { id: String },
    /// Set how many calls at once, and a second, every node together sends a participant host
    /// (`payments`: every port of it, or `payments:8082`); neither: no limit.
    Limit {
        host: String,
        #[arg(long)]
        max_concurrency: Option<u32>,
        #[arg(long)]
        max_per_s: Option<f64>,
    },
    /// Participant hosts' limits, `Retry-After` holds and breakers: one host, or every host with
    /// a state.
    Hosts { host: Option<String> },
    /// Resume a failed saga.
    Retry {
        id: String,
        /// Wait up to this many seconds for the saga to finish, then print it as `show` does.
        #[arg(long, value_name = "SECONDS", value_parser = parse_wait)]
        wait: Option<Duration>,
    },
}

/// The saga an operation is asked of.
#[derive(Debug, clap::Args)]
pub struct OperationArgs {
    pub id: String,
    /// Sent as `Idempotency-Key`: a retry with the same key asks nothing twice.
    #[arg(long)]
    pub idempotency_key: Option<String>,
}

/// Runs a saga command.
///
/// # Errors
/// Bad arguments or an error answer.
pub async fn run_saga(remote: &Remote, json: bool, command: SagaCommand) -> anyhow::Result<()> {
    let client = remote.client()?;
    match command {
        SagaCommand::Define { file, name } => {
            let text = std::fs::read_to_string(&file).with_context(|| format!("cannot read {}", file.display()))?;
            let definition = serde_json::from_str(&text).with_context(|| format!("{} is not JSON", file.display()))?;
            let (name, definition) = named_definition(&file, name, definition)?;
            let put = client.put_saga_definition_created(&name, &definition).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&put.value)?);
            } else {
                let unchanged = if put.created { "" } else { " (unchanged)" };
                println!("defined {} version {}{unchanged}", put.value.name, put.value.version);
            }
        }
        SagaCommand::Start {
            definition,
            input,
            id,
            wait,
        } => {
            let input = serde_json::from_str(&input).context("--input must be JSON")?;
            let body = StartSagaBody { definition, input, id };
            let deadline = wait.map(|w| Instant::now() + w);
            let started = client
                .start_saga_created(&body, wait.map(|w| w.min(WAIT_CHUNK)))
                .await?;
            let existing = if started.created { "" } else { " (existing)" };
            let saga = match deadline {
                Some(deadline) => wait_finished(&client, started.value, deadline).await?,
                None => started.value,
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&saga)?);
            } else if wait.is_some() {
                print!("{}", timeline(&saga));
            } else {
                println!("{}  {}{existing}", saga.id, saga.status);
            }
        }
        SagaCommand::Show { id } => print_saga(&client.saga(&id, None).await?, json)?,
        SagaCommand::List { status, limit, after } => {
            let page = client.list_sagas(status.as_deref(), after.as_deref(), limit).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&page)?);
            } else {
                print!("{}", saga_list(&page));
            }
        }
        SagaCommand::Signal {
            id,
            signal,
            body,
            idempotency_key,
        } => {
            let body = serde_json::from_str(&body).context("--body must be JSON")?;
            let sent = client
                .signal_saga(&id, &signal, &body, idempotency_key.as_deref())
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&sent)?);
            } else {
                println!("{}  signal {} #{} kept", sent.saga_id, sent.signal, sent.sequence);
            }
        }
        SagaCommand::Cancel(a) => operate(&client, json, "cancel", a).await?,
        SagaCommand::Pause(a) => operate(&client, json, "pause", a).await?,
        SagaCommand::Resume(a) => operate(&client, json, "resume", a).await?,
        SagaCommand::RetryNow(a) => operate(&client, json, "retry-now", a).await?,
        SagaCommand::Batch {
            action,
            status,
            definition,
            started_before,
            started_after,
            dry_run,
            wait,
        } => {
            let action = BatchActionIn::parse(&action)
                .with_context(|| format!("no batch action {action:?}: cancel, pause, resume or retry"))?;
            let status = status
                .map(|s| {
                    SagaStatusIn::parse(&s).with_context(|| {
                        format!("no status {s:?}: running, compensating, completed, compensated, failed or cancelled")
                    })
                })
                .transpose()?;
            let body = BatchIn {
                filter: BatchFilterIn {
                    status,
                    definition,
                    started_before,
                    started_after,
                },
                action,
                dry_run,
            };
            if dry_run {
                let counted = client.count_saga_batch(&body).await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&counted)?);
                } else {
                    println!("{} sagas match", counted.matched);
                }
                return Ok(());
            }
            let mut batch = client.start_saga_batch(&body).await?;
            if let Some(w) = wait {
                let deadline = Instant::now() + w;
                while batch.status != "finished" && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    batch = client.saga_batch(&batch.id).await?;
                }
            }
            print_batch(&batch, json)?;
        }
        SagaCommand::BatchShow { id } => print_batch(&client.saga_batch(&id).await?, json)?,
        SagaCommand::Limit {
            host,
            max_concurrency,
            max_per_s,
        } => {
            let limits = ParticipantLimitsIn {
                max_concurrency,
                max_per_s,
            };
            let out = client.set_participant_limits(&host, &limits).await?;
            print_hosts(std::slice::from_ref(&out), json)?;
        }
        SagaCommand::Hosts { host } => {
            let hosts = match host {
                Some(h) => vec![client.participant(&h).await?],
                None => client.participants().await?.participants,
            };
            print_hosts(&hosts, json)?;
        }
        SagaCommand::Retry { id, wait } => {
            let deadline = wait.map(|w| Instant::now() + w);
            let saga = client.retry_saga(&id, wait.map(|w| w.min(WAIT_CHUNK))).await?;
            let saga = match deadline {
                Some(deadline) => wait_finished(&client, saga, deadline).await?,
                None => saga,
            };
            print_saga(&saga, json)?;
        }
    }
    Ok(())
}

async fn operate(client: &Client, json: bool, operation: &str, a: OperationArgs) -> anyhow::Result<()> {
    let asked = client
        .operate_saga(&a.id, operation, a.idempotency_key.as_deref())
        .await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&asked)?);
    } else {
        println!("{}  {} #{} kept", asked.saga_id, asked.operation, asked.sequence);
    }
    Ok(())
}

fn print_batch(batch: &BatchOut, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(batch)?);
    } else {
        println!(
            "{}  {}  {}  matched {}  applied {}  refused {}",
            batch.id,
            batch.action.as_str(),
            batch.status,
            batch.matched,
            batch.applied,
            batch.refused
        );
    }
    Ok(())
}

fn print_hosts(hosts: &[ParticipantHostOut], json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(hosts)?);
        return Ok(());
    }
    for h in hosts {
        println!("{}", host_line(h));
    }
    Ok(())
}

/// One line per host: limits, calls out, breaker, hold.
fn host_line(h: &ParticipantHostOut) -> String {
    let limit = |v: Option<String>| v.unwrap_or_else(|| "-".to_owned());
    let mut line = format!(
        "{}  max_concurrency {}  max_per_s {}  in_flight {}  breaker {} ({} failures, opened {}x)",
        h.host,
        limit(h.max_concurrency.map(|n| n.to_string())),
        limit(h.max_per_s.map(|r| r.to_string())),
        h.in_flight,
        h.breaker,
        h.failures,
        h.opened
    );
    if let Some(until) = h.open_until.filter(|_| h.breaker != "closed") {
        let _ = write!(line, "  probe at {}", until.to_rfc3339());
    }
    if let Some(until) = h.held_until {
        let _ = write!(line, "  held until {}", until.to_rfc3339());
    }
    line
}

fn print_saga(saga: &SagaOut, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(saga)?);
    } else {
        print!("{}", timeline(saga));
    }
    Ok(())
}

/// `--wait SECONDS`: at least a millisecond, since `wait_ms=0` asks for no wait at all.
fn parse_wait(raw: &str) -> Result<Duration, String> {
    let seconds: f64 = raw
        .parse()
        .map_err(|e| format!("{raw:?} is not a number of seconds: {e}"))?;
    match Duration::try_from_secs_f64(seconds) {
        Ok(wait) if wait >= Duration::from_millis(1) => Ok(wait),
        _ => Err(format!("{raw:?}: the wait must be at least 0.001 seconds")),
    }
}

/// Asks for the saga again, one bounded server-side wait at a time, until it is terminal or the
/// deadline passed; answers its last view.
async fn wait_finished(client: &Client, mut saga: SagaOut, deadline: Instant) -> anyhow::Result<SagaOut> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let terminal = SagaStatus::parse(&saga.status).is_some_and(SagaStatus::is_terminal);
        if terminal || left < Duration::from_millis(1) {
            return Ok(saga);
        }
        saga = client.saga(&saga.id, Some(left.min(WAIT_CHUNK))).await?;
    }
}

/// The definition's name and the body to put: `flag` wins, else the file's top-level `"name"`
/// (which the server would refuse as an unknown field, so it is always taken out), else the
/// file's stem.
fn named_definition(file: &Path, flag: Option<String>, mut definition: Value) -> anyhow::Result<(String, Value)> {
    let in_file = match definition.as_object_mut().and_then(|o| o.remove("name")) {
        None => None,
        Some(Value::String(name)) => Some(name),
        Some(other) => anyhow::bail!("{}: \"name\" must be a string, not {other}", file.display()),
    };
    let stem = || file.file_stem().map(|s| s.to_string_lossy().into_owned());
    let name = flag
        .or(in_file)
        .or_else(stem)
        .with_context(|| format!("{}: no name; use --name", file.display()))?;
    Ok((name, definition))
}

/// A saga as text: a header, each step's status, then every attempt across steps in time order.
fn timeline(saga: &SagaOut) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{}  {}@{}  {}{}  created {}  updated {}",
        saga.id,
        saga.definition,
        saga.version,
        saga.status,
        if saga.paused { " (paused)" } else { "" },
        stamp(saga.created_at),
        stamp(saga.updated_at)
    );
    let _ = writeln!(out, "  input {}", shown(&compact(&saga.input)));
    if let Some(at) = saga.next_attempt_at {
        let _ = writeln!(out, "  next attempt at {}", stamp(at));
    }
    if let Some(host) = &saga.waiting_for_host {
        let _ = writeln!(out, "  waiting for its host, spending no attempt: {}", host_line(host));
    }
    if saga.steps.is_empty() {
        return out;
    }
    let name_width = saga.steps.iter().map(|s| s.name.chars().count()).max().unwrap_or(0);
    let action_width = saga.steps.iter().map(|s| s.action.len()).max().unwrap_or(0);
    out.push_str("steps:\n");
    for step in &saga.steps {
        let _ = writeln!(
            out,
            "  {:name_width$}  action {:action_width$}  compensation {}",
            step.name, step.action, step.compensation
        );
        if let Some(output) = &step.output {
            let _ = writeln!(out, "      output {}", shown(&compact(output)));
        }
        if let Some(error) = &step.error {
            let _ = writeln!(out, "      error {}", shown(error));
        }
    }
    let mut attempts: Vec<_> = saga
        .steps
        .iter()
        .flat_map(|step| step.attempts.iter().map(move |a| (step.name.as_str(), a)))
        .collect();
    attempts.sort_by_key(|(_, a)| (a.started_at, a.finished_at));
    if attempts.is_empty() {
        return out;
    }
    let calls: Vec<String> = attempts
        .iter()
        .map(|(_, a)| format!("{} #{}", a.op, a.attempt))
        .collect();
    let call_width = calls.iter().map(String::len).max().unwrap_or(0);
    out.push_str("attempts:\n");
    for ((step, a), call) in attempts.iter().zip(&calls) {
        let took = format!("+{}", took(a.started_at, a.finished_at));
        let _ = write!(
            out,
            "  {}  {took:>7}  {step:name_width$}  {call:call_width$}  {}",
            a.started_at.format("%H:%M:%S%.3f"),
            a.outcome
        );
        if let Some(error) = &a.error {
            let _ = write!(out, "  {}", shown(error));
        }
        out.push('\n');
    }
    out
}

/// One line a saga, then the `--after` of the next page when there is one.
fn saga_list(page: &SagaPage) -> String {
    let id_width = page.sagas.iter().map(|s| s.id.chars().count()).max().unwrap_or(0);
    let status_width = page.sagas.iter().map(|s| s.status.len()).max().unwrap_or(0);
    let mut out = String::new();
    for saga in &page.sagas {
        let definition = format!("{}@{}", saga.definition, saga.version);
        let _ = writeln!(
            out,
            "{:id_width$}  {:status_width$}  {definition}  {}",
            saga.id,
            saga.status,
            stamp(saga.updated_at)
        );
    }
    if let Some(next) = &page.next {
        let _ = writeln!(out, "next: {next}");
    }
    out
}

fn stamp(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn compact(value: &Value) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

/// How long an attempt took, `35ms` or `2.5s`; clocks of two nodes may disagree, never below 0.
fn took(started: DateTime<Utc>, finished: DateTime<Utc>) -> String {
    let ms = (finished - started).num_milliseconds().max(0);
    if ms < 1000 {
        format!("{ms}ms")
    } else {
        format!("{}.{}s", ms / 1000, ms % 1000 / 100)
    }
}

/// Text from a participant on one line of a terminal: control characters (newlines, escape
/// sequences) become spaces, and it is cut at [`MAX_SHOWN_CHARS`].
fn shown(text: &str) -> String {
    let line: String = text
        .trim()
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    match line.char_indices().nth(MAX_SHOWN_CHARS) {
        Some((end, _)) => format!("{}…", &line[..end]),
        None => line,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use concord_api::sagas::{AttemptOut, StepOut};
    use serde_json::json;

    fn at(ms: i64) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(1_767_268_800_000 + ms).unwrap()
    }

    fn attempt(op: &str, attempt: u32, from: i64, to: i64, outcome: &str, error: Option<&str>) -> AttemptOut {
        AttemptOut {
            op: op.into(),
            attempt,
            started_at: at(from),
            finished_at: at(to),
            outcome: outcome.into(),
            error: error.map(Into::into),
        }
    }

    #[test]
    fn a_timeline_lists_steps_then_attempts_across_steps_in_time_order() {
        let saga = SagaOut {
            id: "order:1".into(),
            definition: "order".into(),
            version: 2,
            status: "compensated".into(),
            input: json!({"sku": "a"}),
            created_at: at(0),
            updated_at: at(2600),
            next_attempt_at: None,
            paused: false,
            waiting_for_host: None,
            steps: vec![
                StepOut {
                    name: "reserve".into(),
                    action: "succeeded".into(),
                    compensation: "succeeded".into(),
                    output: Some(json!({"id": "r1"})),
                    error: None,
                    waiting_for: None,
                    until: None,
                    attempts: vec![
                        attempt("action", 1, 100, 135, "succeeded", None),
                        attempt("compensation", 1, 2500, 2510, "succeeded", None),
                    ],
                },
                StepOut {
                    name: "pay".into(),
                    action: "refused".into(),
                    compensation: "not_needed".into(),
                    output: None,
                    error: Some("HTTP 409:\n\u{1b}[31mno funds".into()),
                    waiting_for: None,
                    until: None,
                    attempts: vec![
                        attempt("action", 1, 200, 1700, "failed", Some("HTTP 503")),
                        attempt("action", 2, 1800, 1850, "refused", Some("HTTP 409")),
                    ],
                },
            ],
        };
        let expected = "\
order:1  order@2  compensated  created 2026-01-01T12:00:00.000Z  updated 2026-01-01T12:00:02.600Z
  input {\"sku\":\"a\"}
steps:
  reserve  action succeeded  compensation succeeded
      output {\"id\":\"r1\"}
  pay      action refused    compensation not_needed
      error HTTP 409:  [31mno funds
attempts:
  12:00:00.100    +35ms  reserve  action #1        succeeded
  12:00:00.200    +1.5s  pay      action #1        failed  HTTP 503
  12:00:01.800    +50ms  pay      action #2        refused  HTTP 409
  12:00:02.500    +10ms  reserve  compensation #1  succeeded
";
        assert_eq!(timeline(&saga), expected);
    }

    #[test]
    fn long_participant_text_is_cut_on_a_char_boundary() {
        let text = "é".repeat(MAX_SHOWN_CHARS + 5);
        let cut = shown(&text);
        assert_eq!(cut.chars().count(), MAX_SHOWN_CHARS + 1);
        assert!(cut.ends_with('…'));
    }

    #[test]
    fn a_list_ends_with_the_next_page_hint() {
        let saga = |id: &str, status: &str| SagaOut {
            id: id.into(),
            definition: "order".into(),
            version: 1,
            status: status.into(),
            input: json!({}),
            created_at: at(0),
            updated_at: at(5),
            next_attempt_at: None,
            paused: false,
            waiting_for_host: None,
            steps: Vec::new(),
        };
        let page = SagaPage {
            sagas: vec![saga("a", "completed"), saga("bb", "failed")],
            next: Some("bb".into()),
        };
        assert_eq!(
            saga_list(&page),
            "a   completed  order@1  2026-01-01T12:00:00.005Z\n\
             bb  failed     order@1  2026-01-01T12:00:00.005Z\n\
             next: bb\n"
        );
    }

    #[test]
    fn the_name_comes_from_the_flag_then_the_file_then_the_stem() {
        let file = Path::new("defs/order.saga.json");
        let with_name = || json!({"name": "in-file", "steps": []});
        let (name, body) = named_definition(file, Some("flag".into()), with_name()).unwrap();
        assert_eq!((name.as_str(), body), ("flag", json!({"steps": []})));
        let (name, body) = named_definition(file, None, with_name()).unwrap();
        assert_eq!((name.as_str(), body), ("in-file", json!({"steps": []})));
        let (name, _) = named_definition(file, None, json!({"steps": []})).unwrap();
        assert_eq!(name, "order.saga");
        assert!(named_definition(file, None, json!({"name": 3})).is_err());
    }

    #[test]
    fn a_wait_is_at_least_a_millisecond() {
        assert_eq!(parse_wait("2.5"), Ok(Duration::from_millis(2500)));
        for bad in ["0", "-1", "x", "NaN", "0.0001"] {
            assert!(parse_wait(bad).is_err(), "{bad}");
        }
    }
}
