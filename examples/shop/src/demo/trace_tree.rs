//! The span tree of one trace, for the terminal. Every process of the demo appends its finished
//! spans to its own file (`CONCORD_TRACE_FILE`, one JSON object per line); this module reads those
//! files back and draws one trace across all of them as an indented tree.
//!
//! A process killed with SIGKILL leaves at most a torn last line and loses the spans it still had
//! open, so reading skips lines that do not parse, and a span whose parent is in no file is drawn
//! as a root rather than dropped with its whole subtree.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt::Write as _;
use std::path::PathBuf;

use serde::{Deserialize, Deserializer};

/// One finished span, as a line of a span file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct SpanRecord {
    /// 32 lower-case hex digits.
    pub trace_id: String,
    /// 16 lower-case hex digits.
    pub span_id: String,
    /// `None` for a root span (`null`, `""` or all zeros in the file).
    #[serde(default, deserialize_with = "parent_id")]
    pub parent_span_id: Option<String>,
    pub name: String,
    /// The process kind that recorded it (`OTEL_SERVICE_NAME`).
    pub service: String,
    pub start_unix_nanos: u64,
    pub end_unix_nanos: u64,
    /// Values as strings; a non-string value in the file is kept as its JSON text.
    #[serde(default, deserialize_with = "string_values")]
    pub attributes: BTreeMap<String, String>,
    /// `unset`, `ok` or `error`.
    #[serde(default)]
    pub status: String,
}

fn parent_id<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let id = Option::<String>::deserialize(d)?;
    Ok(id.filter(|id| !id.is_empty() && id.bytes().any(|b| b != b'0')))
}

fn string_values<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    let raw = Option::<BTreeMap<String, serde_json::Value>>::deserialize(d)?.unwrap_or_default();
    Ok(raw
        .into_iter()
        .map(|(k, v)| match v {
            serde_json::Value::String(s) => (k, s),
            other => (k, other.to_string()),
        })
        .collect())
}

/// Every span in `paths`, in file order. A file that cannot be read and a line that is not a span
/// (a torn last line, a blank line) are skipped; a span present twice (the same file given twice)
/// is kept once.
#[must_use]
pub fn load_spans(paths: &[PathBuf]) -> Vec<SpanRecord> {
    let mut seen = HashSet::new();
    let mut spans = Vec::new();
    for path in paths {
        // Bytes, not a string: a torn write may cut a character in half, which must cost only
        // its own line.
        let Ok(bytes) = std::fs::read(path) else {
            continue;
        };
        for line in bytes.split(|&b| b == b'\n') {
            let Ok(span) = serde_json::from_slice::<SpanRecord>(line) else {
                continue;
            };
            if seen.insert((span.trace_id.clone(), span.span_id.clone())) {
                spans.push(span);
            }
        }
    }
    spans
}

/// The services that recorded at least one span of `trace_id`.
#[must_use]
pub fn services_in_trace(spans: &[SpanRecord], trace_id: &str) -> BTreeSet<String> {
    spans
        .iter()
        .filter(|s| s.trace_id == trace_id)
        .map(|s| s.service.clone())
        .collect()
}

/// The spans of `trace_id` as a tree, one line per span:
///
/// ```text
/// POST /orders [orders] +0.0ms 41.2ms
/// ├─ POST /v1/sagas [concord] +1.3ms 2.0ms
/// └─ saga reserve action [concord] +4.1ms 12.5ms
///    └─ POST /reservations [inventory] +4.9ms 10.8ms
/// ```
///
/// `+start` is counted from the trace's first span, followed by the span's duration. Children
/// are sorted by start time. A span whose parent is not among `spans` is drawn as a root. Empty
/// when no span has that trace id.
#[must_use]
pub fn render_tree(spans: &[SpanRecord], trace_id: &str) -> String {
    let mut trace: Vec<&SpanRecord> = spans.iter().filter(|s| s.trace_id == trace_id).collect();
    trace.sort_by(|a, b| (a.start_unix_nanos, &a.name, &a.span_id).cmp(&(b.start_unix_nanos, &b.name, &b.span_id)));
    let Some(t0) = trace.iter().map(|s| s.start_unix_nanos).min() else {
        return String::new();
    };
    let ids: HashSet<&str> = trace.iter().map(|s| s.span_id.as_str()).collect();
    let mut children: HashMap<&str, Vec<&SpanRecord>> = HashMap::new();
    let mut roots = Vec::new();
    for span in &trace {
        match span.parent_span_id.as_deref() {
            Some(parent) if parent != span.span_id && ids.contains(parent) => {
                children.entry(parent).or_default().push(span);
            }
            _ => roots.push(*span),
        }
    }

    let tree = Tree { t0, children };
    let mut out = String::new();
    let mut drawn = HashSet::new();
    for root in roots {
        tree.draw(root, "", None, &mut drawn, &mut out);
    }
    // Spans whose parents form a loop (a corrupt file) reach no root; draw them anyway.
    for span in &trace {
        if !drawn.contains(span.span_id.as_str()) {
            tree.draw(span, "", None, &mut drawn, &mut out);
        }
    }
    out
}

struct Tree<'a> {
    t0: u64,
    /// Sorted by start time, as the spans of the trace were.
    children: HashMap<&'a str, Vec<&'a SpanRecord>>,
}

impl<'a> Tree<'a> {
    /// Draws `span` and its subtree. `prefix` continues the lines of the ancestors; `last` is
    /// `None` for a root, else whether `span` is its parent's last child.
    fn draw(
        &self,
        span: &'a SpanRecord,
        prefix: &str,
        last: Option<bool>,
        drawn: &mut HashSet<&'a str>,
        out: &mut String,
    ) {
        if !drawn.insert(span.span_id.as_str()) {
            return;
        }
        let (branch, below) = match last {
            None => ("", String::new()),
            Some(false) => ("├─ ", format!("{prefix}│  ")),
            Some(true) => ("└─ ", format!("{prefix}   ")),
        };
        let start = millis(span.start_unix_nanos.saturating_sub(self.t0));
        let duration = millis(span.end_unix_nanos.saturating_sub(span.start_unix_nanos));
        let _ = writeln!(
            out,
            "{prefix}{branch}{} [{}] +{start:.1}ms {duration:.1}ms",
            span.name, span.service
        );
        let kids = self.children.get(span.span_id.as_str()).map_or(&[][..], Vec::as_slice);
        for (i, kid) in kids.iter().enumerate() {
            self.draw(kid, &below, Some(i + 1 == kids.len()), drawn, out);
        }
    }
}

#[allow(clippy::cast_precision_loss)] // nanoseconds of one trace are far below 2^52
fn millis(nanos: u64) -> f64 {
    nanos as f64 / 1_000_000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const BASE: u64 = 1_764_000_000_000_000_000;

    /// A span of trace `T` starting `start_ms` after `BASE` and lasting `ms`.
    fn span(id: &str, parent: Option<&str>, name: &str, service: &str, start_ms: u64, ms: u64) -> SpanRecord {
        SpanRecord {
            trace_id: T.into(),
            span_id: id.into(),
            parent_span_id: parent.map(Into::into),
            name: name.into(),
            service: service.into(),
            start_unix_nanos: BASE + start_ms * 1_000_000,
            end_unix_nanos: BASE + (start_ms + ms) * 1_000_000,
            attributes: BTreeMap::new(),
            status: "unset".into(),
        }
    }

    fn line(s: &SpanRecord) -> String {
        let parent = s
            .parent_span_id
            .as_ref()
            .map_or(serde_json::Value::Null, |p| p.as_str().into());
        serde_json::json!({
            "trace_id": s.trace_id, "span_id": s.span_id, "parent_span_id": parent,
            "name": s.name, "service": s.service,
            "start_unix_nanos": s.start_unix_nanos, "end_unix_nanos": s.end_unix_nanos,
            "attributes": s.attributes, "status": s.status,
        })
        .to_string()
    }

    /// A fresh directory under the system's temporary one, removed on drop.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Self {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos();
            let dir = std::env::temp_dir().join(format!("trace-tree-{name}-{}-{nanos}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn children_are_drawn_under_their_parent_in_start_order() {
        // Files list spans as they end: children before parents, and out of start order.
        let spans = vec![
            span("s4", Some("s3"), "POST /reservations", "inventory", 5, 10),
            span("s3", Some("s1"), "saga reserve action", "concord", 4, 12),
            span("s2", Some("s1"), "POST /v1/sagas", "concord", 1, 2),
            span("s5", Some("s2"), "append", "concord", 2, 1),
            span("s1", None, "POST /orders", "orders", 0, 41),
        ];
        assert_eq!(
            render_tree(&spans, T),
            "POST /orders [orders] +0.0ms 41.0ms\n\
             ├─ POST /v1/sagas [concord] +1.0ms 2.0ms\n\
             │  └─ append [concord] +2.0ms 1.0ms\n\
             └─ saga reserve action [concord] +4.0ms 12.0ms\n\
             \u{20}  └─ POST /reservations [inventory] +5.0ms 10.0ms\n"
        );
    }

    #[test]
    fn a_span_whose_parent_was_lost_is_a_root_with_its_subtree() {
        // The payments process died before its request span ended: its children survive.
        let spans = vec![
            span("a1", None, "POST /orders", "orders", 0, 30),
            span("b2", Some("ff"), "charge", "payments", 10, 5),
            span("b3", Some("b2"), "POST /charges", "provider", 11, 3),
        ];
        assert_eq!(
            render_tree(&spans, T),
            "POST /orders [orders] +0.0ms 30.0ms\n\
             charge [payments] +10.0ms 5.0ms\n\
             └─ POST /charges [provider] +11.0ms 3.0ms\n"
        );
    }

    #[test]
    fn other_traces_are_left_out_and_times_count_from_the_first_span() {
        let mut other = span("s9", None, "GET /health", "orders", 0, 1);
        other.trace_id = "0af7651916cd43dd8448eb211c80319c".into();
        let spans = vec![other, span("s1", None, "late root", "query", 1500, 250)];
        assert_eq!(render_tree(&spans, T), "late root [query] +0.0ms 250.0ms\n");
        assert_eq!(render_tree(&spans, "00000000000000000000000000000001"), "");
        assert_eq!(services_in_trace(&spans, T), BTreeSet::from(["query".to_owned()]));
    }

    #[test]
    fn a_parent_loop_in_a_corrupt_file_is_still_drawn_once() {
        let spans = vec![
            span("s1", Some("s2"), "a", "x", 0, 1),
            span("s2", Some("s1"), "b", "x", 1, 1),
            span("s3", Some("s3"), "self", "x", 2, 1),
        ];
        assert_eq!(
            render_tree(&spans, T),
            "self [x] +2.0ms 1.0ms\na [x] +0.0ms 1.0ms\n└─ b [x] +1.0ms 1.0ms\n"
        );
    }

    #[test]
    fn loading_skips_unreadable_files_torn_lines_and_repeats() {
        let dir = Scratch::new("load");
        let root = span("s1", None, "POST /orders", "orders", 0, 20);
        let child = span("s2", Some("s1"), "POST /v1/sagas", "concord", 1, 2);
        let mut with_attributes = span("s3", Some(""), "reserve", "inventory", 3, 1);
        with_attributes.attributes.insert("status".into(), "200".into());

        let orders = dir.0.join("orders.jsonl");
        std::fs::write(
            &orders,
            format!("{}\n\nnot json\n{{\"trace_id\":\"{T}\"}}\n", line(&root)),
        )
        .unwrap();
        // Killed mid-write: the last line stops halfway, inside a multi-byte character.
        let concord = dir.0.join("concord.jsonl");
        let torn = line(&span("s4", None, "gone é", "concord", 9, 1));
        let cut = torn.find('é').unwrap() + 1;
        let mut bytes = format!("{}\n", line(&child)).into_bytes();
        bytes.extend_from_slice(&torn.as_bytes()[..cut]);
        std::fs::write(&concord, bytes).unwrap();
        let inventory = dir.0.join("inventory.jsonl");
        let raw = line(&with_attributes).replace(r#""status":"200""#, r#""status":200"#);
        std::fs::write(&inventory, format!("{raw}\n")).unwrap();

        let spans = load_spans(&[
            orders.clone(),
            dir.0.join("never-written.jsonl"),
            concord,
            orders,
            inventory,
        ]);
        let mut expected = with_attributes.clone();
        expected.parent_span_id = None;
        assert_eq!(spans, vec![root, child, expected]);
        assert_eq!(spans[2].attributes["status"], "200");
        assert_eq!(
            services_in_trace(&spans, T),
            BTreeSet::from(["concord".to_owned(), "inventory".to_owned(), "orders".to_owned()])
        );
    }

    #[test]
    fn null_empty_and_zero_parents_all_mean_root() {
        let json = |parent: &str| {
            format!(
                r#"{{"trace_id":"{T}","span_id":"s1","parent_span_id":{parent},"name":"n","service":"s","start_unix_nanos":1,"end_unix_nanos":2,"attributes":{{}},"status":"unset"}}"#
            )
        };
        for parent in ["null", r#""""#, r#""0000000000000000""#] {
            let span: SpanRecord = serde_json::from_str(&json(parent)).unwrap();
            assert_eq!(span.parent_span_id, None, "{parent}");
        }
        let span: SpanRecord = serde_json::from_str(&json(r#""00f067aa0ba902b7""#)).unwrap();
        assert_eq!(span.parent_span_id.as_deref(), Some("00f067aa0ba902b7"));
    }
}
