//! What both relays share: configuration, and publishing a claimed batch in per-key waves.

use crate::broker::{Broker, BrokerError, BrokerMessage};
use std::collections::{HashMap, VecDeque};
use std::time::Duration;

/// How a relay works. Every field has a default ([`RelayConfig::default`]).
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Rows claimed per round (default 500).
    pub batch_size: usize,
    /// Rejections of one message before it moves to the dead-letter table (default 5).
    pub max_attempts: u32,
    /// Wait after the first failed publish of a message; it doubles per attempt (default 200 ms).
    pub backoff_initial: Duration,
    /// The longest wait between attempts (default 30 s).
    pub backoff_max: Duration,
    /// How often the relay looks for rows without a wake-up signal (default 1 s).
    pub poll_interval: Duration,
    /// On PostgreSQL, how soon a round that held rows back (their key's older rows were another
    /// relay's, or waiting for a retry) looks again; it doubles while rounds keep holding rows,
    /// up to `poll_interval` (default 20 ms).
    pub held_retry: Duration,
    /// Claim rounds one relay runs at once (default 2; PostgreSQL only, SQLite runs one).
    pub workers: usize,
    /// How long a SQLite relay's lease on its outbox lasts without renewal (default 10 s).
    pub lease: Duration,
    /// The first key of the PostgreSQL advisory locks that guard keys (default 0x0c0c).
    pub lock_namespace: i32,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            batch_size: 500,
            max_attempts: 5,
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
            poll_interval: Duration::from_secs(1),
            held_retry: Duration::from_millis(20),
            workers: 2,
            lease: Duration::from_secs(10),
            lock_namespace: 0x0c0c,
        }
    }
}

impl RelayConfig {
    pub(crate) fn check(&self) -> Result<(), RelayError> {
        if self.batch_size == 0 || self.batch_size > 10_000 {
            return Err(RelayError::Config("batch_size must be 1 to 10000".into()));
        }
        if self.max_attempts == 0 {
            return Err(RelayError::Config("max_attempts must be at least 1".into()));
        }
        if self.workers == 0 || self.workers > 64 {
            return Err(RelayError::Config("workers must be 1 to 64".into()));
        }
        if self.poll_interval.is_zero() || self.lease.is_zero() || self.held_retry.is_zero() {
            return Err(RelayError::Config(
                "poll_interval, held_retry and lease must be positive".into(),
            ));
        }
        Ok(())
    }
}

/// Failures of a relay round. The relay's loop logs them and tries again.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("outbox database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("invalid relay configuration: {0}")]
    Config(String),
    /// A row that cannot be read back as a message (edited by hand?).
    #[error("corrupt outbox row {seq}: {reason}")]
    Corrupt { seq: i64, reason: String },
    /// Another relay holds the SQLite outbox's lease.
    #[error("another relay holds the outbox lease until {until_ms} (unix ms)")]
    LeaseHeld { until_ms: i64 },
}

/// What one round did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RelayRound {
    /// Rows claimed.
    pub claimed: usize,
    /// Rows published and removed.
    pub published: usize,
    /// Rows whose publish failed and that wait for a retry.
    pub retried: usize,
    /// Rows moved to the dead-letter table.
    pub dead: usize,
    /// Rows left for a later round because an older row of their key was not in this batch.
    pub held: usize,
    /// Whether the broker was unavailable this round.
    pub broker_down: bool,
}

/// One claimed row.
#[derive(Debug, Clone)]
pub(crate) struct Row {
    pub seq: i64,
    pub attempts: u32,
    pub message: BrokerMessage,
}

/// A failed publish of one row.
#[derive(Debug)]
pub(crate) struct Failure {
    pub seq: i64,
    pub attempts: u32,
    pub error: BrokerError,
    /// The rows of its key after it, in this batch: they wait as long as it does. Only
    /// PostgreSQL relays, which share an outbox, hold them back by row.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub behind: Vec<i64>,
}

/// The outcome of publishing a batch.
#[derive(Debug, Default)]
pub(crate) struct Published {
    pub done: Vec<i64>,
    pub failed: Vec<Failure>,
}

/// Publishes `rows` (in seq order) wave by wave: wave `i` holds the `i`-th message of every key
/// still going, so a key's next message leaves only after its previous one was acknowledged.
pub(crate) async fn publish_waves(broker: &dyn Broker, rows: Vec<Row>) -> Published {
    let mut order: Vec<String> = Vec::new();
    let mut by_key: HashMap<String, VecDeque<Row>> = HashMap::new();
    for row in rows {
        let key = row.message.key.clone();
        by_key
            .entry(key.clone())
            .or_insert_with(|| {
                order.push(key);
                VecDeque::new()
            })
            .push_back(row);
    }
    let mut out = Published::default();
    loop {
        let wave: Vec<Row> = order
            .iter()
            .filter_map(|k| by_key.get_mut(k).and_then(VecDeque::pop_front))
            .collect();
        if wave.is_empty() {
            break;
        }
        let messages: Vec<BrokerMessage> = wave.iter().map(|r| r.message.clone()).collect();
        let results = broker.publish(&messages).await;
        for (row, result) in wave.into_iter().zip(results) {
            match result {
                Ok(()) => out.done.push(row.seq),
                Err(error) => {
                    let behind = by_key
                        .remove(&row.message.key)
                        .map(|rest| rest.into_iter().map(|r| r.seq).collect())
                        .unwrap_or_default();
                    out.failed.push(Failure {
                        seq: row.seq,
                        attempts: row.attempts,
                        error,
                        behind,
                    });
                }
            }
        }
        order.retain(|k| by_key.get(k).is_some_and(|q| !q.is_empty()));
    }
    out
}

/// What becomes of a row whose publish failed.
pub(crate) enum Next {
    /// Rejected too often: move it to the dead-letter table.
    Dead,
    /// Publish it again after `wait`, with `attempts` recorded.
    Retry { attempts: u32, wait: std::time::Duration },
}

/// Decides what becomes of a failed row, and counts it in `round`. Only rejections count
/// towards the dead-letter limit; an unavailable broker backs off at the first step each time.
pub(crate) fn next_step(f: &Failure, config: &RelayConfig, round: &mut RelayRound) -> Next {
    let rejected = f.error.is_rejection();
    round.broker_down |= !rejected;
    if rejected && f.attempts + 1 >= config.max_attempts {
        round.dead += 1;
        return Next::Dead;
    }
    round.retried += 1;
    let attempts = if rejected { f.attempts + 1 } else { f.attempts.max(1) };
    Next::Retry {
        attempts,
        wait: super::backoff(config, attempts),
    }
}

impl RelayRound {
    /// Counts the round in the process's metrics (`concord_outbox_published_total`,
    /// `concord_outbox_retried_total`, `concord_outbox_dead_total`, labelled by `backend`) and
    /// logs it at debug level.
    pub(crate) fn record(&self, backend: &'static str) {
        metrics::counter!("concord_outbox_published_total", "backend" => backend).increment(self.published as u64);
        metrics::counter!("concord_outbox_retried_total", "backend" => backend).increment(self.retried as u64);
        metrics::counter!("concord_outbox_dead_total", "backend" => backend).increment(self.dead as u64);
        tracing::debug!(round = ?self, backend, "outbox relay round");
    }
}
