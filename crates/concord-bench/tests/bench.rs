//! `concord-bench` end to end: each area prints the contract's JSON on its last line, with our
//! figure, the baseline measured in the same run and their ratio.

use serde_json::Value;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_concord-bench");

/// `concord-bench` in `dir`, without the caller's Concord settings.
fn bench(dir: &std::path::Path) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.current_dir(dir);
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if (name.starts_with("CONCORD_") && !name.starts_with("CONCORD_TEST_")) || name.starts_with("OTEL_") {
            cmd.env_remove(name.as_ref());
        }
    }
    cmd
}

fn json_line(line: &str) -> Value {
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
}

/// Runs a short `concord-bench AREA --json` and checks the contract's JSON on the last line;
/// returns it for the area's own checks.
fn bench_report(area: &str, backend: &str, database_url: Option<&str>) -> Value {
    bench_report_with(area, backend, database_url, &[])
}

fn bench_report_with(area: &str, backend: &str, database_url: Option<&str>, more: &[&str]) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = bench(dir.path());
    cmd.args([
        area,
        "--backend",
        backend,
        "--clients",
        "2",
        "--seconds",
        "1",
        "--rate",
        "100",
        "--json",
    ]);
    if let Some(url) = database_url {
        cmd.args(["--database-url", url]);
    }
    cmd.args(more);
    let out = cmd.output().expect("bench runs");
    assert!(
        out.status.success(),
        "bench failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let report = json_line(stdout.lines().last().expect("bench prints lines"));
    assert_eq!(report["area"], area);
    assert_eq!(report["backend"], backend);
    assert_eq!(report["clients"], 2);
    assert_eq!(report["seconds"], 1);
    for side in ["ours", "baseline"] {
        assert!(report[side]["name"].is_string(), "{report}");
        for field in ["ops_per_s", "p50_ms", "p99_ms"] {
            assert!(
                report[side][field].as_f64().is_some_and(|v| v >= 0.0),
                "{side}.{field} in {report}"
            );
        }
        assert!(
            report[side]["ops_per_s"].as_f64().unwrap() > 0.0,
            "{side} did some work"
        );
    }
    let ratio = report["ratio"].as_f64().unwrap();
    let expected = report["ours"]["ops_per_s"].as_f64().unwrap() / report["baseline"]["ops_per_s"].as_f64().unwrap();
    assert!((ratio - expected).abs() < 1e-6, "ratio is ours / baseline");
    report
}

fn bench_prints_the_contract_json(backend: &str, database_url: Option<&str>) {
    let report = bench_report("events", backend, database_url);
    assert_eq!(report["extra"]["subscriber_events"], 100);
    assert!(report["extra"]["append_to_subscriber_p99_ms"].as_f64().is_some());
}

#[test]
fn bench_vault_on_sqlite_prints_the_contract_json_with_every_phase() {
    let report = bench_report("vault", "sqlite", None);
    for phase in [
        "tokenize_batch_100",
        "tokenize_batch_100_baseline",
        "detokenize_1",
        "detokenize_1_baseline",
        "detokenize_batch_100",
        "detokenize_batch_100_baseline",
    ] {
        assert!(
            report["extra"][phase]["items_per_s"].as_f64().is_some_and(|v| v > 0.0),
            "{phase} in {report}"
        );
    }
}

#[test]
fn bench_outbox_on_postgres_prints_the_contract_json_with_every_phase() {
    let (Ok(pg), Ok(nats)) = (
        std::env::var("CONCORD_TEST_POSTGRES_URL"),
        std::env::var("CONCORD_TEST_NATS_URL"),
    ) else {
        eprintln!("skipped: CONCORD_TEST_POSTGRES_URL or CONCORD_TEST_NATS_URL is not set");
        return;
    };
    let report = bench_report_with("outbox", "postgres", Some(&pg), &["--nats-url", &nats]);
    let extra = &report["extra"];
    assert_eq!(extra["fixed_rate"]["messages"], 100, "{report}");
    assert!(
        extra["fixed_rate"]["p99_ms"].as_f64().is_some_and(|v| v > 0.0),
        "{report}"
    );
    assert_eq!(extra["drain_full_outbox"]["messages"], 1000, "{report}");
    assert!(
        extra["drain_full_outbox"]["messages_per_s"]
            .as_f64()
            .is_some_and(|v| v > 0.0)
    );
    for side in ["with", "without"] {
        assert!(
            extra["idempotency_layer"][side]["requests"]
                .as_u64()
                .is_some_and(|n| n > 0),
            "{report}"
        );
    }
    assert!(
        extra["idempotency_layer"]["added_p50_ms"].as_f64().is_some(),
        "{report}"
    );
}

#[test]
fn bench_events_on_sqlite_prints_the_contract_json() {
    bench_prints_the_contract_json("sqlite", None);
}

#[test]
fn bench_events_on_postgres_prints_the_contract_json() {
    let Ok(url) = std::env::var("CONCORD_TEST_POSTGRES_URL") else {
        eprintln!("skipped: CONCORD_TEST_POSTGRES_URL is not set");
        return;
    };
    bench_prints_the_contract_json("postgres", Some(&url));
}

#[test]
fn bench_sagas_on_sqlite_parks_sagas_and_measures_the_others_beside_them() {
    let report = bench_report_with("sagas", "sqlite", None, &["--parked", "200"]);
    let parked = &report["extra"]["parked"];
    assert_eq!(parked["sagas_parked"], 200, "{report}");
    assert!(
        parked["sagas_per_s_beside_them"].as_f64().is_some_and(|v| v > 0.0),
        "{report}"
    );
    assert!(parked["ratio_to_without"].as_f64().is_some_and(|v| v > 0.0), "{report}");
    assert_eq!(report["extra"]["not_completed"], 0, "{report}");
    // The parallel-group case ran both shapes and the direct call beside them (figures only:
    // how close the group comes to one call is for the benchmark to show, not for a test).
    let group = &report["extra"]["parallel_group"];
    for field in ["group_p50_ms", "sequence_p50_ms", "one_call_direct_p50_ms"] {
        assert!(group[field].as_f64().is_some_and(|v| v > 0.0), "{field}: {report}");
    }
}
