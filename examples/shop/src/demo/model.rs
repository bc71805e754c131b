//! What a demo run found: the data behind the terminal report and `demo-report.html`.

use serde::Serialize;

/// The whole result of one run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// `embedded` or `scale-out`.
    pub shape: String,
    pub seed: u64,
    pub orders: usize,
    pub clients: usize,
    /// Wall time of the load phase and of the whole run, seconds.
    pub load_seconds: f64,
    pub total_seconds: f64,
    /// What the run injected, in the order it is printed: `("card declines", 12)`, ...
    pub injected: Vec<Count>,
    /// What happened: completed, compensated, retried, deduplicated, ...
    pub outcomes: Vec<Count>,
    /// One line per invariant.
    pub invariants: Vec<Invariant>,
    /// The steps of one saga, for the timeline.
    pub timeline: Option<Timeline>,
}

impl Report {
    /// Every invariant holds.
    #[must_use]
    pub fn passed(&self) -> bool {
        !self.invariants.is_empty() && self.invariants.iter().all(|i| i.passed)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Count {
    pub label: String,
    pub value: u64,
}

impl Count {
    pub fn new(label: impl Into<String>, value: u64) -> Self {
        Self {
            label: label.into(),
            value,
        }
    }
}

/// One invariant and what the checker saw.
#[derive(Debug, Clone, Serialize)]
pub struct Invariant {
    pub name: String,
    pub passed: bool,
    /// The figures compared, or the first violations found.
    pub detail: String,
}

/// The attempts of one saga in time order.
#[derive(Debug, Clone, Serialize)]
pub struct Timeline {
    pub saga_id: String,
    /// `completed`, `compensated`, ...
    pub status: String,
    pub entries: Vec<TimelineEntry>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TimelineEntry {
    pub step: String,
    /// `action` or `compensation`.
    pub op: String,
    pub attempt: u32,
    /// Milliseconds since the saga's first attempt started.
    pub start_ms: f64,
    pub duration_ms: f64,
    /// `succeeded`, `refused` or `failed`.
    pub outcome: String,
    pub error: Option<String>,
}
