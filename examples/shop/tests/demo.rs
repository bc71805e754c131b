//! `concord-shop demo` end to end: the shop under faults keeps every invariant, and the checker does
//! fail when a part is broken on purpose.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_concord-shop");

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn demo(dir: &std::path::Path, extra: &[&str]) -> Run {
    let mut cmd = Command::new(BIN);
    cmd.current_dir(dir).arg("demo").arg("--dir").arg(dir.join("run"));
    cmd.arg("--report").arg(dir.join("demo-report.html"));
    cmd.args(extra);
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if name.starts_with("CONCORD_") || name.starts_with("OTEL_") {
            cmd.env_remove(name.as_ref());
        }
    }
    let out = cmd.output().expect("the demo runs");
    let mut stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        // What each process said last, so a failure can be read from the test's output alone.
        let mut logs: Vec<_> = std::fs::read_dir(dir.join("run").join("logs"))
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        logs.sort();
        for log in logs {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            stderr.push_str(&format!("\n--- last lines of {}:\n", log.display()));
            stderr.push_str(&lines[lines.len().saturating_sub(15)..].join("\n"));
        }
    }
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr,
    }
}

/// The figure on the report line that starts with `label`.
fn count(stdout: &str, label: &str) -> u64 {
    stdout
        .lines()
        .find_map(|l| l.trim_start().strip_prefix(label))
        .and_then(|rest| rest.trim().parse().ok())
        .unwrap_or_else(|| panic!("no line {label:?} in\n{stdout}"))
}

fn invariant_lines(stdout: &str) -> Vec<&str> {
    stdout
        .lines()
        .filter(|l| l.trim_start().starts_with("PASS") || l.trim_start().starts_with("FAIL"))
        .collect()
}

/// The run exited 0 with all 10 invariants PASS.
fn assert_every_invariant_holds(run: &Run) {
    assert_eq!(run.code, Some(0), "stdout:\n{}\nstderr:\n{}", run.stdout, run.stderr);
    let lines = invariant_lines(&run.stdout);
    assert_eq!(lines.len(), 10, "{}", run.stdout);
    assert!(
        lines.iter().all(|l| l.trim_start().starts_with("PASS")),
        "{}",
        run.stdout
    );
}

#[test]
fn the_embedded_shop_keeps_every_invariant_under_faults_and_kills() {
    let dir = tempfile::tempdir().unwrap();
    let run = demo(
        dir.path(),
        &["--orders", "60", "--clients", "8", "--seed", "3", "--trace"],
    );
    assert_every_invariant_holds(&run);
    assert_eq!(count(&run.stdout, "SIGKILL + restart"), 2, "{}", run.stdout);
    for what in [
        "compensated (rejected)",
        "transfers aborted",
        "transfers committed",
        "sagas retried",
        "reserved in both warehouses at once",
        "couriers booked (express)",
        "review holds cleared by the operator",
        "review holds ended by their timeout",
        "charges confirmed later by webhook",
    ] {
        assert!(count(&run.stdout, what) > 0, "no {what}:\n{}", run.stdout);
    }

    let html = std::fs::read_to_string(dir.path().join("demo-report.html")).unwrap();
    assert!(html.contains("<svg"), "the report has its charts");
    assert!(html.contains("every 2PC transfer is applied on both sides or neither"));

    // One order, one trace, spans from every service it touched.
    let services = run
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("services in this trace: "))
        .unwrap_or_else(|| panic!("no trace printed:\n{}", run.stdout));
    for service in ["orders", "concord", "inventory", "payments", "provider"] {
        assert!(
            services.split(", ").any(|s| s == service),
            "{service} missing from the trace: {services}\n{}",
            run.stdout
        );
    }
}

#[test]
fn the_checker_fails_when_payments_charges_without_the_barrier() {
    let dir = tempfile::tempdir().unwrap();
    let run = demo(
        dir.path(),
        &[
            "--orders",
            "60",
            "--clients",
            "8",
            "--seed",
            "3",
            "--no-kill",
            "--sabotage",
            "payments-barrier",
        ],
    );
    assert_eq!(run.code, Some(1), "stdout:\n{}\nstderr:\n{}", run.stdout, run.stderr);
    let lines = invariant_lines(&run.stdout);
    let failed: Vec<&&str> = lines.iter().filter(|l| l.trim_start().starts_with("FAIL")).collect();
    assert!(
        failed.iter().any(|l| l.contains("no card was charged twice")),
        "the double charges went unseen:\n{}\nstderr:\n{}",
        run.stdout,
        run.stderr
    );
    assert!(
        failed.iter().any(|l| l.contains("money is conserved")),
        "the extra money went unseen:\n{}\nstderr:\n{}",
        run.stdout,
        run.stderr
    );
}

#[test]
fn the_shop_over_mutual_tls_keeps_every_invariant() {
    let dir = tempfile::tempdir().unwrap();
    let run = demo(
        dir.path(),
        &["--orders", "40", "--clients", "8", "--seed", "5", "--tls"],
    );
    assert_every_invariant_holds(&run);
    assert!(run.stdout.contains("every call over mutual TLS"), "{}", run.stdout);
    // Every process served over TLS: each says so when it starts listening.
    for service in ["concord", "orders", "inventory", "payments", "query", "provider"] {
        let log = std::fs::read_to_string(dir.path().join("run").join("logs").join(format!("{service}.log"))).unwrap();
        let listening: Vec<&str> = log.lines().filter(|l| l.contains("listening")).collect();
        assert!(!listening.is_empty(), "{service} never listened:\n{log}");
        assert!(
            listening.iter().all(|l| l.contains("tls=true")),
            "{service} served without TLS:\n{}",
            listening.join("\n")
        );
    }
}
