//! Renders a demo run's [`Report`]: the terminal report and the self-contained `demo-report.html`.
//!
//! Both renderers are pure functions of the report; writing them out is the caller's job. The page
//! loads nothing from anywhere (inline CSS and SVG only), so it reads the same opened from disk,
//! attached to a ticket or archived by CI.

use std::fmt::Write as _;

use super::model::{Count, Invariant, Report, Timeline, TimelineEntry};

// ---------------------------------------------------------------------------------------------
// Terminal report
// ---------------------------------------------------------------------------------------------

/// A detail at most this many characters long, and on one line, stays beside the invariant name.
const INLINE_DETAIL_MAX: usize = 72;

/// Lines a long detail up under the invariant name (`"  PASS  "` is eight columns).
const DETAIL_INDENT: &str = "        ";

/// Renders the report printed at the end of a demo run.
///
/// A header line with the run's facts, then the sections "Injected" and "What happened" with one
/// aligned line per count, then "Invariants" with one `PASS`/`FAIL` line per invariant, and last
/// the verdict: `all N invariants hold` or `K of N invariants FAILED`. Plain text, no colour codes,
/// so it reads the same in a terminal, a log file and a CI summary.
#[must_use]
pub fn render_text(report: &Report) -> String {
    let mut out = String::new();
    out.push_str(&text_header(report));
    out.push('\n');
    text_counts(&mut out, "Injected", &report.injected);
    text_counts(&mut out, "What happened", &report.outcomes);
    text_invariants(&mut out, &report.invariants);
    out.push('\n');
    out.push_str(&verdict(&report.invariants));
    out.push('\n');
    out
}

fn text_header(report: &Report) -> String {
    format!(
        "Concord shop demo: shape {}, seed {}, {} orders, {} clients, load {:.1} s, total {:.1} s",
        report.shape, report.seed, report.orders, report.clients, report.load_seconds, report.total_seconds
    )
}

fn text_counts(out: &mut String, title: &str, counts: &[Count]) {
    let _ = writeln!(out, "\n{title}");
    if counts.is_empty() {
        out.push_str("  (none)\n");
        return;
    }
    let label_w = counts.iter().map(|c| c.label.chars().count()).max().unwrap_or(0);
    let value_w = counts.iter().map(|c| c.value.to_string().len()).max().unwrap_or(0);
    for count in counts {
        let _ = writeln!(out, "  {:<label_w$}  {:>value_w$}", count.label, count.value);
    }
}

fn text_invariants(out: &mut String, invariants: &[Invariant]) {
    out.push_str("\nInvariants\n");
    if invariants.is_empty() {
        out.push_str("  (none checked)\n");
        return;
    }
    let name_w = invariants.iter().map(|i| i.name.chars().count()).max().unwrap_or(0);
    for invariant in invariants {
        let mark = pass_fail(invariant.passed);
        let detail = invariant.detail.trim_end();
        if detail.is_empty() {
            let _ = writeln!(out, "  {mark}  {}", invariant.name);
        } else if fits_inline(detail) {
            let _ = writeln!(out, "  {mark}  {:<name_w$} — {detail}", invariant.name);
        } else {
            let _ = writeln!(out, "  {mark}  {}", invariant.name);
            for line in detail.lines() {
                if line.is_empty() {
                    out.push('\n');
                } else {
                    let _ = writeln!(out, "{DETAIL_INDENT}{line}");
                }
            }
        }
    }
}

fn fits_inline(detail: &str) -> bool {
    !detail.contains('\n') && detail.chars().count() <= INLINE_DETAIL_MAX
}

const fn pass_fail(passed: bool) -> &'static str {
    if passed { "PASS" } else { "FAIL" }
}

/// The last line of both reports. No invariants checked is not a pass, as in [`Report::passed`].
fn verdict(invariants: &[Invariant]) -> String {
    let total = invariants.len();
    let failed = invariants.iter().filter(|i| !i.passed).count();
    match (total, failed) {
        (0, _) => "no invariants were checked".to_owned(),
        (n, 0) => format!("all {n} invariants hold"),
        (n, k) => format!("{k} of {n} invariants FAILED"),
    }
}

// ---------------------------------------------------------------------------------------------
// HTML page
// ---------------------------------------------------------------------------------------------

/// Renders `demo-report.html`: one self-contained HTML5 page.
///
/// It holds the run's facts and verdict, the invariant table, the outcomes as an SVG bar chart,
/// the injected faults as a table and, when the report has one, the timeline of a saga as an SVG
/// Gantt chart whose bars carry the error of each attempt as a tooltip. Styles are inline and there
/// are no scripts, fonts, images or links to fetch. Every string taken from the report is escaped.
#[must_use]
pub fn render_html(report: &Report) -> String {
    let mut out = String::with_capacity(16 * 1024);
    html_head(&mut out, report);
    html_facts(&mut out, report);
    html_invariants(&mut out, &report.invariants);
    html_outcomes(&mut out, &report.outcomes);
    html_injected(&mut out, &report.injected);
    if let Some(timeline) = &report.timeline {
        html_timeline(&mut out, timeline);
    }
    out.push_str("</main>\n</body>\n</html>\n");
    out
}

const CSS: &str = r#"
:root { color-scheme: light; --pass: #2e7d32; --fail: #c62828; --ink: #1f2328; --muted: #59636e;
  --line: #d1d9e0; --bar: #3b6ea5; }
* { box-sizing: border-box; }
body { margin: 0; background: #f6f8fa; color: var(--ink);
  font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1000px; margin: 0 auto; padding: 24px 20px 48px; }
h1 { font-size: 1.6rem; margin: 0 0 12px; }
h2 { font-size: 1.15rem; margin: 0 0 12px; }
section { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 16px 20px; margin: 16px 0; }
code { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: .9em; }
.verdict { display: inline-block; margin: 0 0 16px; padding: 6px 14px; border-radius: 6px; color: #fff;
  font-weight: 600; }
.verdict.pass { background: var(--pass); }
.verdict.fail { background: var(--fail); }
dl.facts { display: grid; grid-template-columns: repeat(auto-fill, minmax(140px, 1fr)); gap: 8px 16px; margin: 0; }
dl.facts dt { color: var(--muted); font-size: .78rem; text-transform: uppercase; letter-spacing: .04em; }
dl.facts dd { margin: 0; font-size: 1.1rem; font-variant-numeric: tabular-nums; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: 6px 10px; border-bottom: 1px solid var(--line); vertical-align: top; }
th { color: var(--muted); font-size: .78rem; font-weight: 600; text-transform: uppercase; letter-spacing: .04em; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
td.detail { white-space: pre-wrap; overflow-wrap: anywhere; font-family: ui-monospace, SFMono-Regular, Menlo,
  Consolas, monospace; font-size: .85rem; }
table.compact { width: auto; min-width: 320px; }
.badge { display: inline-block; min-width: 3.4em; padding: 1px 8px; border-radius: 999px; color: #fff;
  font-size: .78rem; font-weight: 700; text-align: center; }
.badge.pass { background: var(--pass); }
.badge.fail { background: var(--fail); }
svg { display: block; max-width: 100%; height: auto; }
svg text { font-size: 13px; fill: var(--ink); }
svg text.muted { fill: var(--muted); font-size: 12px; }
svg .bar { fill: var(--bar); }
.legend { display: flex; flex-wrap: wrap; gap: 4px 18px; margin: 0 0 10px; color: var(--muted); font-size: .85rem; }
.swatch { display: inline-block; width: 16px; height: 10px; margin-right: 6px; border-radius: 2px;
  vertical-align: middle; }
.swatch.compensation { border: 1px solid #57606a;
  background: repeating-linear-gradient(45deg, #57606a 0 2px, #fff 2px 5px); }
.empty { color: var(--muted); font-style: italic; }
h3 { font-size: 1rem; margin: 16px 0 8px; }
"#;

fn html_head(out: &mut String, report: &Report) {
    let _ = write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>Concord shop demo: {} seed {}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n\
         <h1>Concord shop demo</h1>\n",
        escape(&report.shape),
        report.seed
    );
}

fn html_facts(out: &mut String, report: &Report) {
    let class = if report.passed() { "pass" } else { "fail" };
    let _ = writeln!(
        out,
        "<p class=\"verdict {class}\">{}</p>",
        escape(&verdict(&report.invariants))
    );
    out.push_str("<section id=\"run\">\n<h2>Run</h2>\n<dl class=\"facts\">\n");
    let facts = [
        ("Shape", escape(&report.shape)),
        ("Seed", report.seed.to_string()),
        ("Orders", report.orders.to_string()),
        ("Clients", report.clients.to_string()),
        ("Load phase", format!("{:.1} s", report.load_seconds)),
        ("Whole run", format!("{:.1} s", report.total_seconds)),
    ];
    for (term, value) in facts {
        let _ = writeln!(out, "<div><dt>{term}</dt><dd>{value}</dd></div>");
    }
    out.push_str("</dl>\n</section>\n");
}

fn html_invariants(out: &mut String, invariants: &[Invariant]) {
    out.push_str("<section id=\"invariants\">\n<h2>Invariants</h2>\n");
    if invariants.is_empty() {
        out.push_str("<p class=\"empty\">No invariants were checked.</p>\n</section>\n");
        return;
    }
    out.push_str("<table>\n<thead><tr><th>Invariant</th><th>Result</th><th>Detail</th></tr></thead>\n<tbody>\n");
    for invariant in invariants {
        let mark = pass_fail(invariant.passed);
        let _ = writeln!(
            out,
            "<tr><td>{}</td><td><span class=\"badge {}\">{mark}</span></td><td class=\"detail\">{}</td></tr>",
            escape(&invariant.name),
            mark.to_ascii_lowercase(),
            escape(invariant.detail.trim_end())
        );
    }
    out.push_str("</tbody>\n</table>\n</section>\n");
}

fn html_injected(out: &mut String, injected: &[Count]) {
    out.push_str("<section id=\"injected\">\n<h2>Injected</h2>\n");
    if injected.is_empty() {
        out.push_str("<p class=\"empty\">Nothing was injected.</p>\n</section>\n");
        return;
    }
    out.push_str(
        "<table class=\"compact\">\n<thead><tr><th>Fault</th><th class=\"num\">Count</th></tr></thead>\n<tbody>\n",
    );
    for count in injected {
        let _ = writeln!(
            out,
            "<tr><td>{}</td><td class=\"num\">{}</td></tr>",
            escape(&count.label),
            count.value
        );
    }
    out.push_str("</tbody>\n</table>\n</section>\n");
}

// --- Outcomes: horizontal bar chart ----------------------------------------------------------

/// The length of the bar of the largest count; the others are scaled to it.
const BAR_MAX_W: f64 = 460.0;
const BAR_VALUE_W: f64 = 90.0;
const BAR_ROW_H: f64 = 28.0;
const BAR_H: f64 = 18.0;
const CHART_PAD: f64 = 6.0;

fn html_outcomes(out: &mut String, outcomes: &[Count]) {
    out.push_str("<section id=\"outcomes\">\n<h2>What happened</h2>\n");
    if outcomes.is_empty() {
        out.push_str("<p class=\"empty\">No outcomes were recorded.</p>\n</section>\n");
        return;
    }
    outcomes_svg(out, outcomes);
    out.push_str("</section>\n");
}

fn outcomes_svg(out: &mut String, outcomes: &[Count]) {
    let max = outcomes.iter().map(|c| c.value).max().unwrap_or(0);
    let label_w = label_column_width(outcomes.iter().map(|c| c.label.as_str()));
    let width = label_w + BAR_MAX_W + BAR_VALUE_W;
    let height = 2.0 * CHART_PAD + len_f64(outcomes.len()) * BAR_ROW_H;
    svg_open(out, width, height, "Outcomes of the run");
    let _ = writeln!(
        out,
        "<line x1=\"{label_w:.1}\" y1=\"0\" x2=\"{label_w:.1}\" y2=\"{height:.1}\" stroke=\"#8c959f\"/>"
    );
    let mut y = CHART_PAD;
    for count in outcomes {
        let w = bar_width(count.value, max);
        let bar_y = y + (BAR_ROW_H - BAR_H) / 2.0;
        let text_y = y + BAR_ROW_H / 2.0 + 4.5;
        let label = escape(&count.label);
        let _ = writeln!(
            out,
            "<text x=\"{:.1}\" y=\"{text_y:.1}\" text-anchor=\"end\">{label}</text>\n\
             <rect class=\"bar\" x=\"{label_w:.1}\" y=\"{bar_y:.1}\" width=\"{w:.1}\" height=\"{BAR_H:.1}\" rx=\"2\">\
             <title>{label}: {}</title></rect>\n\
             <text x=\"{:.1}\" y=\"{text_y:.1}\">{}</text>",
            label_w - 8.0,
            count.value,
            label_w + w + 6.0,
            count.value
        );
        y += BAR_ROW_H;
    }
    out.push_str("</svg>\n");
}

/// The bar of `value` when the largest count is `max`. All-zero counts draw no bars rather than
/// dividing by zero.
fn bar_width(value: u64, max: u64) -> f64 {
    if max == 0 {
        0.0
    } else {
        count_f64(value) / count_f64(max) * BAR_MAX_W
    }
}

// --- Timeline: Gantt chart -------------------------------------------------------------------

const GANTT_PLOT_W: f64 = 640.0;
const GANTT_RIGHT_PAD: f64 = 24.0;
const GANTT_TOP: f64 = 6.0;
const GANTT_ROW_H: f64 = 26.0;
const GANTT_BAR_H: f64 = 16.0;
const GANTT_AXIS_H: f64 = 42.0;
/// An instantaneous attempt still shows as a sliver.
const GANTT_MIN_BAR_W: f64 = 3.0;
/// About this many ticks on the time axis.
const GANTT_TICKS: f64 = 6.0;

/// The colour of each attempt outcome; anything else is drawn grey as `other`.
const OUTCOME_COLOURS: [(&str, &str); 4] = [
    ("succeeded", "#2e7d32"),
    ("refused", "#ef6c00"),
    ("failed", "#c62828"),
    ("other", "#6e7781"),
];

fn html_timeline(out: &mut String, timeline: &Timeline) {
    let _ = writeln!(
        out,
        "<section id=\"timeline\">\n<h2>Timeline of saga <code>{}</code> ({})</h2>",
        escape(&timeline.saga_id),
        escape(&timeline.status)
    );
    if timeline.entries.is_empty() {
        out.push_str("<p class=\"empty\">No attempts were recorded.</p>\n</section>\n");
        return;
    }
    timeline_legend(out);
    gantt_svg(out, &timeline.entries);
    timeline_errors(out, &timeline.entries);
    out.push_str("</section>\n");
}

fn timeline_legend(out: &mut String) {
    out.push_str("<p class=\"legend\">");
    for (outcome, colour) in &OUTCOME_COLOURS[..3] {
        let _ = write!(
            out,
            "<span><span class=\"swatch\" style=\"background:{colour}\"></span>{outcome}</span>"
        );
    }
    out.push_str(
        "<span><span class=\"swatch compensation\"></span>compensation (hatched)</span>\
         <span>hover a bar for its error</span></p>\n",
    );
}

fn gantt_svg(out: &mut String, entries: &[TimelineEntry]) {
    let labels: Vec<String> = entries.iter().map(row_label).collect();
    let label_w = label_column_width(labels.iter().map(String::as_str));
    let axis = TimeAxis::fit(entries);
    let baseline = GANTT_TOP + len_f64(entries.len()) * GANTT_ROW_H;
    let width = label_w + GANTT_PLOT_W + GANTT_RIGHT_PAD;
    svg_open(out, width, baseline + GANTT_AXIS_H, "Timeline of the saga's attempts");
    gantt_defs(out);
    gantt_grid(out, &axis, label_w, baseline);
    let mut y = GANTT_TOP;
    for (entry, label) in entries.iter().zip(&labels) {
        gantt_row(out, entry, label, &axis, label_w, y);
        y += GANTT_ROW_H;
    }
    gantt_axis(out, &axis, label_w, baseline);
    out.push_str("</svg>\n");
}

/// One hatch pattern per outcome colour, for compensations.
fn gantt_defs(out: &mut String) {
    out.push_str("<defs>\n");
    for (outcome, colour) in OUTCOME_COLOURS {
        let _ = writeln!(
            out,
            "<pattern id=\"hatch-{outcome}\" width=\"6\" height=\"6\" patternUnits=\"userSpaceOnUse\" \
             patternTransform=\"rotate(45)\"><rect width=\"6\" height=\"6\" fill=\"#ffffff\"/>\
             <rect width=\"3\" height=\"6\" fill=\"{colour}\"/></pattern>"
        );
    }
    out.push_str("</defs>\n");
}

fn gantt_grid(out: &mut String, axis: &TimeAxis, label_w: f64, baseline: f64) {
    for tick in axis.ticks() {
        let x = axis.x(tick, label_w);
        let _ = writeln!(
            out,
            "<line x1=\"{x:.1}\" y1=\"{GANTT_TOP:.1}\" x2=\"{x:.1}\" y2=\"{baseline:.1}\" stroke=\"#eaeef2\"/>"
        );
    }
}

fn gantt_row(out: &mut String, entry: &TimelineEntry, label: &str, axis: &TimeAxis, label_w: f64, y: f64) {
    let text_y = y + GANTT_ROW_H / 2.0 + 4.5;
    let bar_y = y + (GANTT_ROW_H - GANTT_BAR_H) / 2.0;
    let start = finite_non_negative(entry.start_ms);
    let duration = finite_non_negative(entry.duration_ms);
    let x = axis.x(start, label_w);
    let w = (duration / axis.end * GANTT_PLOT_W).max(GANTT_MIN_BAR_W);
    let (key, colour) = outcome_colour(&entry.outcome);
    let fill = if is_compensation(entry) {
        format!("url(#hatch-{key})")
    } else {
        colour.to_owned()
    };
    let _ = writeln!(
        out,
        "<text x=\"{:.1}\" y=\"{text_y:.1}\" text-anchor=\"end\">{}</text>\n\
         <rect class=\"attempt {key}\" x=\"{x:.1}\" y=\"{bar_y:.1}\" width=\"{w:.1}\" height=\"{GANTT_BAR_H:.1}\" \
         rx=\"2\" fill=\"{fill}\" stroke=\"{colour}\"><title>{}</title></rect>",
        label_w - 8.0,
        escape(label),
        escape(&attempt_tooltip(entry, label, start, duration))
    );
}

fn gantt_axis(out: &mut String, axis: &TimeAxis, label_w: f64, baseline: f64) {
    let right = label_w + GANTT_PLOT_W;
    let _ = writeln!(
        out,
        "<line x1=\"{label_w:.1}\" y1=\"{baseline:.1}\" x2=\"{right:.1}\" y2=\"{baseline:.1}\" stroke=\"#57606a\"/>"
    );
    for tick in axis.ticks() {
        let x = axis.x(tick, label_w);
        let _ = writeln!(
            out,
            "<line x1=\"{x:.1}\" y1=\"{baseline:.1}\" x2=\"{x:.1}\" y2=\"{:.1}\" stroke=\"#57606a\"/>\
             <text class=\"muted\" x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            baseline + 4.0,
            baseline + 17.0,
            fmt_ms(tick)
        );
    }
    let _ = writeln!(
        out,
        "<text class=\"muted\" x=\"{right:.1}\" y=\"{:.1}\" text-anchor=\"end\">ms since the first attempt</text>",
        baseline + 34.0
    );
}

/// The attempts that report an error, as a table, so the errors can be read without hovering.
fn timeline_errors(out: &mut String, entries: &[TimelineEntry]) {
    let with_errors: Vec<&TimelineEntry> = entries.iter().filter(|e| e.error.is_some()).collect();
    if with_errors.is_empty() {
        return;
    }
    out.push_str(
        "<h3>Errors</h3>\n<table>\n<thead><tr><th>Attempt</th><th>Outcome</th><th class=\"num\">At (ms)</th>\
         <th>Error</th></tr></thead>\n<tbody>\n",
    );
    for entry in with_errors {
        let _ = writeln!(
            out,
            "<tr><td>{}</td><td>{}</td><td class=\"num\">{}</td><td class=\"detail\">{}</td></tr>",
            escape(&row_label(entry)),
            escape(&entry.outcome),
            fmt_ms(finite_non_negative(entry.start_ms)),
            escape(entry.error.as_deref().unwrap_or_default())
        );
    }
    out.push_str("</tbody>\n</table>\n");
}

fn row_label(entry: &TimelineEntry) -> String {
    format!("{} {} #{}", entry.step, entry.op, entry.attempt)
}

fn is_compensation(entry: &TimelineEntry) -> bool {
    entry.op.eq_ignore_ascii_case("compensation")
}

fn outcome_colour(outcome: &str) -> (&'static str, &'static str) {
    OUTCOME_COLOURS
        .iter()
        .copied()
        .find(|(key, _)| outcome.eq_ignore_ascii_case(key))
        .unwrap_or(OUTCOME_COLOURS[3])
}

fn attempt_tooltip(entry: &TimelineEntry, label: &str, start: f64, duration: f64) -> String {
    let mut tip = format!(
        "{label}: {} at {} ms, took {} ms",
        entry.outcome,
        fmt_ms(start),
        fmt_ms(duration)
    );
    if let Some(error) = &entry.error {
        let _ = write!(tip, "\n{error}");
    }
    tip
}

/// The time axis: from 0 to a round `end` at or past the last attempt's end, in steps of 1, 2 or 5
/// times a power of ten.
struct TimeAxis {
    end: f64,
    step: f64,
}

impl TimeAxis {
    fn fit(entries: &[TimelineEntry]) -> Self {
        let last = entries
            .iter()
            .map(|e| finite_non_negative(e.start_ms) + finite_non_negative(e.duration_ms))
            .fold(0.0, f64::max);
        let span = if last > 0.0 { last } else { 1.0 };
        let step = nice_step(span / GANTT_TICKS);
        Self {
            end: (span / step).ceil() * step,
            step,
        }
    }

    /// The x coordinate of time `ms` in a chart whose plot starts at `left`.
    fn x(&self, ms: f64, left: f64) -> f64 {
        left + ms / self.end * GANTT_PLOT_W
    }

    fn ticks(&self) -> Vec<f64> {
        // Multiplying a counter, not adding steps, keeps the last tick from drifting past `end`.
        let mut ticks = Vec::new();
        let mut k = 0_u32;
        loop {
            let tick = f64::from(k) * self.step;
            if tick > self.end + self.step * 1e-6 || k > 100 {
                return ticks;
            }
            ticks.push(tick);
            k += 1;
        }
    }
}

/// The smallest of 1, 2, 5 or 10 times a power of ten that is at least `raw` (which is positive).
fn nice_step(raw: f64) -> f64 {
    let base = 10_f64.powf(raw.log10().floor());
    let fraction = raw / base;
    let nice = if fraction <= 1.0 {
        1.0
    } else if fraction <= 2.0 {
        2.0
    } else if fraction <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * base
}

/// Milliseconds without trailing zeros: `40`, `12.5`, `0.25`.
fn fmt_ms(ms: f64) -> String {
    let text = format!("{ms:.3}");
    text.trim_end_matches('0').trim_end_matches('.').to_owned()
}

/// Times come from clocks and arithmetic; a negative, NaN or infinite one is drawn at 0 rather than
/// breaking the chart.
const fn finite_non_negative(ms: f64) -> f64 {
    if ms.is_finite() { ms.max(0.0) } else { 0.0 }
}

// --- Shared SVG and HTML helpers -------------------------------------------------------------

fn svg_open(out: &mut String, width: f64, height: f64, label: &str) {
    let _ = writeln!(
        out,
        "<svg viewBox=\"0 0 {width:.0} {height:.0}\" width=\"{width:.0}\" height=\"{height:.0}\" role=\"img\" \
         aria-label=\"{}\">",
        escape(label)
    );
}

/// Wide enough for the longest label at the chart's font size, within bounds.
fn label_column_width<'a>(labels: impl Iterator<Item = &'a str>) -> f64 {
    let longest = labels.map(|l| l.chars().count()).max().unwrap_or(0);
    (len_f64(longest) * 7.4 + 16.0).clamp(80.0, 360.0)
}

/// Escapes text for HTML element content and quoted attribute values.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

fn len_f64(n: usize) -> f64 {
    u32::try_from(n).map_or_else(|_| f64::from(u32::MAX), f64::from)
}

// Counts past 2^53 would lose precision, which a bar chart cannot show anyway.
#[allow(clippy::cast_precision_loss)]
const fn count_f64(n: u64) -> f64 {
    n as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn invariant(name: &str, passed: bool, detail: &str) -> Invariant {
        Invariant {
            name: name.to_owned(),
            passed,
            detail: detail.to_owned(),
        }
    }

    fn entry(step: &str, op: &str, attempt: u32, start_ms: f64, duration_ms: f64, outcome: &str) -> TimelineEntry {
        TimelineEntry {
            step: step.to_owned(),
            op: op.to_owned(),
            attempt,
            start_ms,
            duration_ms,
            outcome: outcome.to_owned(),
            error: None,
        }
    }

    fn report() -> Report {
        let mut declined = entry("charge-card", "action", 2, 31.0, 9.5, "refused");
        declined.error = Some("card declined".to_owned());
        Report {
            shape: "embedded".to_owned(),
            seed: 42,
            orders: 200,
            clients: 8,
            load_seconds: 12.34,
            total_seconds: 15.0,
            injected: vec![Count::new("card declines", 12), Count::new("broker drops", 3)],
            outcomes: vec![
                Count::new("completed", 180),
                Count::new("compensated", 20),
                Count::new("deduplicated", 45),
            ],
            invariants: vec![
                invariant("stock never negative", true, "0 violations in 200 orders"),
                invariant("money conserved", true, "charged 1840.00 = captured 1840.00"),
            ],
            timeline: Some(Timeline {
                saga_id: "order-17".to_owned(),
                status: "compensated".to_owned(),
                entries: vec![
                    entry("reserve-stock", "action", 1, 0.0, 12.0, "succeeded"),
                    entry("charge-card", "action", 1, 12.5, 8.0, "failed"),
                    declined,
                    entry("reserve-stock", "compensation", 1, 41.0, 6.0, "succeeded"),
                ],
            }),
        }
    }

    /// The `width` of every outcome bar, in order.
    fn bar_widths(html: &str) -> Vec<f64> {
        html.split("<rect class=\"bar\"")
            .skip(1)
            .filter_map(|rest| rest.split("width=\"").nth(1)?.split('"').next()?.parse().ok())
            .collect()
    }

    #[test]
    fn text_report_marks_every_invariant_pass_or_fail() {
        let mut report = report();
        report.invariants[1] = invariant("money conserved", false, "charged 1840.00, captured 1790.00");

        let text = render_text(&report);

        assert!(text.contains("PASS  stock never negative — 0 violations"), "{text}");
        assert!(text.contains("FAIL  money conserved      — charged 1840.00"), "{text}");
        assert!(text.ends_with("1 of 2 invariants FAILED\n"), "{text}");
    }

    #[test]
    fn text_report_says_all_hold_when_every_invariant_passes() {
        let text = render_text(&report());

        assert!(text.ends_with("all 2 invariants hold\n"), "{text}");
        assert!(!text.contains("FAIL"), "{text}");
    }

    #[test]
    fn text_report_has_the_header_and_aligned_sections() {
        let text = render_text(&report());

        assert!(text.starts_with(
            "Concord shop demo: shape embedded, seed 42, 200 orders, 8 clients, load 12.3 s, total 15.0 s\n"
        ));
        assert!(
            text.contains("\nInjected\n  card declines  12\n  broker drops    3\n"),
            "{text}"
        );
        assert!(text.contains("\nWhat happened\n  completed     180\n"), "{text}");
        assert!(!text.contains('\u{1b}'), "no colour codes");
    }

    #[test]
    fn text_report_puts_a_long_detail_on_the_next_line_indented() {
        let mut report = report();
        let long = "order-3 charged twice; order-9 charged twice; order-12 charged but never shipped to anyone";
        report.invariants[1] = invariant("charged exactly once", false, long);

        let text = render_text(&report);

        assert!(
            text.contains(&format!("  FAIL  charged exactly once\n{DETAIL_INDENT}{long}\n")),
            "{text}"
        );
    }

    #[test]
    fn text_report_without_invariants_is_not_a_pass() {
        let mut report = report();
        report.invariants.clear();

        let text = render_text(&report);

        assert!(text.ends_with("no invariants were checked\n"), "{text}");
    }

    #[test]
    fn html_escapes_a_script_in_an_invariant_detail() {
        let mut report = report();
        report.invariants[0] = invariant("stock <never> negative", false, "<script>alert('x')</script> & more");

        let html = render_html(&report);

        assert!(!html.contains("<script"), "{html}");
        assert!(html.contains("&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; more"));
        assert!(html.contains("stock &lt;never&gt; negative"));
    }

    #[test]
    fn html_escapes_a_script_in_a_timeline_error() {
        let mut report = report();
        if let Some(timeline) = report.timeline.as_mut() {
            timeline.entries[1].error = Some("<script>steal()</script> \"quoted\"".to_owned());
        }

        let html = render_html(&report);

        assert!(!html.contains("<script"), "{html}");
        assert!(html.contains("&lt;script&gt;steal()&lt;/script&gt; &quot;quoted&quot;"));
    }

    #[test]
    fn html_is_self_contained() {
        let html = render_html(&report());

        assert!(html.starts_with("<!DOCTYPE html>"));
        assert!(html.trim_end().ends_with("</html>"));
        assert!(
            !html.contains("http://") && !html.contains("https://"),
            "no network references"
        );
        assert!(!html.contains("<link") && !html.contains("<img") && !html.contains("@import"));
        assert!(html.contains("<svg"));
        assert!(html.contains("<span class=\"badge pass\">PASS</span>"));
    }

    #[test]
    fn html_has_a_gantt_row_per_attempt_with_the_error_as_tooltip() {
        let html = render_html(&report());

        assert_eq!(html.matches("<rect class=\"attempt ").count(), 4);
        assert!(html.contains(">reserve-stock action #1</text>"));
        assert!(html.contains(">charge-card action #2</text>"));
        assert!(html.contains("charge-card action #2: refused at 31 ms, took 9.5 ms\ncard declined</title>"));
        assert!(
            html.contains("fill=\"url(#hatch-succeeded)\""),
            "the compensation is hatched"
        );
    }

    #[test]
    fn empty_outcomes_and_no_timeline_render_without_panicking() {
        let mut report = report();
        report.outcomes.clear();
        report.injected.clear();
        report.timeline = None;

        let html = render_html(&report);
        let text = render_text(&report);

        assert!(html.contains("No outcomes were recorded."));
        assert!(!html.contains("id=\"timeline\""));
        assert!(text.contains("\nWhat happened\n  (none)\n"), "{text}");
    }

    #[test]
    fn all_zero_outcomes_draw_empty_bars() {
        let mut report = report();
        report.outcomes = vec![Count::new("completed", 0), Count::new("compensated", 0)];

        let widths = bar_widths(&render_html(&report));

        assert_eq!(widths, vec![0.0, 0.0]);
    }

    #[test]
    fn the_largest_outcome_gets_the_full_bar_width() {
        let widths = bar_widths(&render_html(&report()));

        assert_eq!(widths.len(), 3);
        assert!((widths[0] - BAR_MAX_W).abs() < 0.05, "{widths:?}");
        assert!((widths[1] - BAR_MAX_W * 20.0 / 180.0).abs() < 0.05, "{widths:?}");
        assert!((widths[2] - BAR_MAX_W * 45.0 / 180.0).abs() < 0.05, "{widths:?}");
    }

    #[test]
    fn a_zero_length_or_broken_attempt_still_shows_a_sliver() {
        let mut report = report();
        report.timeline = Some(Timeline {
            saga_id: "order-1".to_owned(),
            status: "completed".to_owned(),
            entries: vec![
                entry("reserve-stock", "action", 1, 0.0, 0.0, "succeeded"),
                entry("charge-card", "action", 1, f64::NAN, f64::INFINITY, "who knows"),
            ],
        });

        let html = render_html(&report);

        assert_eq!(
            html.matches(&format!("width=\"{GANTT_MIN_BAR_W:.1}\"")).count(),
            2,
            "{html}"
        );
        assert!(!html.contains("NaN") && !html.contains("=\"inf"), "{html}");
        assert!(html.contains("class=\"attempt other\""));
    }

    #[test]
    fn the_time_axis_ends_on_a_round_number() {
        let axis = TimeAxis::fit(&report().timeline.map(|t| t.entries).unwrap_or_default());

        assert!((axis.step - 10.0).abs() < 1e-9, "step {}", axis.step);
        assert!((axis.end - 50.0).abs() < 1e-9, "end {}", axis.end);
        assert_eq!(axis.ticks().len(), 6);
    }

    #[test]
    fn escape_replaces_the_five_special_characters() {
        assert_eq!(escape(r#"a&b<c>d"e'f"#), "a&amp;b&lt;c&gt;d&quot;e&#39;f");
        assert_eq!(escape("plain — text"), "plain — text");
    }
}
