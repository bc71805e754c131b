//! Every size limit of the event store, in one place, so that each one is explicit and configurable.

/// Limits applied at the edge, before anything is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest serialized `data` + `metadata` of one event, in bytes.
    pub max_event_bytes: usize,
    /// Most events in one append request.
    pub max_events_per_append: usize,
    /// Most events one read may return.
    pub max_read_limit: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_event_bytes: 1024 * 1024,
            max_events_per_append: 1000,
            max_read_limit: 1000,
        }
    }
}
