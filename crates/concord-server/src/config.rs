//! Settings: defaults, then `concord.toml` (or `--config FILE`), then `CONCORD_*` variables,
//! then command-line flags. Every limit lives here, explicit and configurable.

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

/// All server settings. `Debug` shows what serializes, so the secrets (marked
/// `skip_serializing`: the master keys, the admin key, the 2PC token, the saga secrets) never
/// reach a log or a panic message; only whether each is set.
#[derive(Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    /// Address to listen on.
    pub listen: String,
    /// `sqlite://PATH` or `postgres://...`.
    pub database_url: String,
    /// The vault's own database, separate so the card-data environment can be segmented. Empty:
    /// a SQLite file beside a SQLite event store (`concord.db` -> `concord-vault.db`); with a
    /// PostgreSQL event store, its own tables in that database, shared by every node (set this
    /// to segment it).
    pub vault_database_url: String,
    /// The vault's master key, 32 bytes in base64 (`CONCORD_VAULT_MASTER_KEY`). A secret: never
    /// logged or serialized.
    #[serde(skip_serializing)]
    pub vault_master_key: Option<Secret>,
    /// A file holding the master key in base64, when `vault_master_key` is unset. Unset too: the
    /// file beside a SQLite vault (`concord-vault.key`), generated (mode 0600) when a new vault
    /// is created; keep a copy somewhere safe, since without it no token can be revealed.
    pub vault_master_key_file: Option<String>,
    /// Master keys (base64) this vault used before `vault_master_key`: the keyring is re-wrapped
    /// under the new key at start (`CONCORD_VAULT_PREVIOUS_MASTER_KEYS='["..."]'`). Secrets:
    /// never logged or serialized.
    #[serde(skip_serializing)]
    pub vault_previous_master_keys: Vec<Secret>,
    /// Most items in one tokenize or detokenize request.
    pub vault_max_batch: usize,
    /// Largest value the vault takes, bytes.
    pub vault_max_value_bytes: usize,
    /// Largest metadata of one token, bytes of JSON.
    pub vault_max_metadata_bytes: usize,
    /// Longest `ttl_s` of a token.
    pub vault_max_ttl_s: u64,
    /// Most fields in one category's tokenized-field rules.
    pub vault_max_rule_fields: usize,
    /// How long a node seals new tokens of a subject with the data key it looked up, ms.
    pub vault_key_cache_ms: u64,
    /// How long a node trusts the tokenized-field rules it looked up, ms: rules put on another
    /// node apply here within this time.
    pub vault_rules_cache_ms: u64,
    /// Tokens one API key may detokenize per second on one node (0: no limit), and the burst
    /// above it.
    pub vault_detokenize_per_s: f64,
    pub vault_detokenize_burst: f64,
    /// Audit records of refused detokenize calls one key leaves per minute on one node (0: every
    /// one); past it they are counted into the key's next record. A key with no detokenize scope
    /// at all is refused before anything is recorded.
    pub vault_refused_audit_per_min: f64,
    /// Most token records written in one statement; concurrent tokenizations share it.
    pub vault_write_batch: usize,
    /// Bootstrap admin key; when unset and no admin key exists, one is generated and printed once.
    #[serde(skip_serializing)]
    pub admin_key: Option<Secret>,
    /// JSON log lines instead of human-readable ones.
    pub log_json: bool,
    /// Largest `data` + `metadata` of one event, bytes.
    pub max_event_bytes: usize,
    /// Most events in one append.
    pub max_events_per_append: usize,
    /// Largest request body, bytes; above it the answer is 413 before parsing.
    pub max_body_bytes: usize,
    /// Most events one read returns.
    pub max_read_limit: usize,
    /// Most bytes of events (`data` and `metadata`) one page or event-stream batch holds; a page
    /// stops before the event that would cross it (it always holds one event). The events after
    /// are read on the next page.
    pub max_read_bytes: usize,
    /// Longest long-poll of a consumer group read, milliseconds.
    pub max_wait_ms: u64,
    /// Most events written in one group-commit transaction.
    pub max_batch_events: usize,
    /// How long a completed idempotent request is replayed, seconds.
    pub idempotency_ttl_s: u64,
    /// How long an in-flight idempotency key is held before another request may take it over.
    pub idempotency_lock_s: u64,
    /// Longest time a client may take to send a request's head (request line and headers), ms;
    /// then the connection is closed.
    pub header_read_timeout_ms: u64,
    /// Longest time one request may take, ms (answered 503 `request_timed_out`); at least 10 s
    /// over the longest wait a request may ask (`max_wait_ms`, `saga_max_wait_ms`,
    /// `tx_max_timeout_ms`). An event stream's body is not bound by it.
    pub request_timeout_ms: u64,
    /// Most connections served at once; beyond it, new ones wait in the listen backlog.
    pub max_connections: usize,
    /// Most requests one API key may have in progress at once (429
    /// `too_many_concurrent_requests` beyond it).
    pub max_concurrent_requests_per_key: usize,
    /// Most event streams (`GET /v1/subscribe`) served at once (503 `too_many_subscribers`).
    pub max_subscribers: usize,
    /// Most event streams one API key holds open at once (429 `too_many_concurrent_requests`
    /// beyond it), so one key cannot take every place of `max_subscribers`.
    pub max_subscribers_per_key: usize,
    /// How long a node keeps serving after SIGTERM with readiness false (`GET /ready` 503
    /// `draining`) before it stops accepting, ms: time for a load balancer to take it out (set it
    /// to a few readiness periods behind Kubernetes). 0: stop accepting at once.
    pub drain_ms: u64,
    /// How long shutdown waits for in-flight requests, seconds.
    pub shutdown_grace_s: u64,
    /// Database connections (PostgreSQL pool size; SQLite readers).
    pub db_connections: u32,
    /// How long a verified API key is trusted without asking the database again, milliseconds
    /// (0: always ask). Bounds how long a key revoked on another node still works here.
    pub auth_cache_ttl_ms: u64,
    /// SQLite `synchronous=FULL` (an acknowledged append survives power loss). Off: NORMAL.
    pub sqlite_synchronous_full: bool,
    /// The bound of SQLite's write-ahead log, bytes: past it the log is checkpointed and
    /// truncated between two commits (README, "SQLite's write-ahead log").
    pub sqlite_wal_limit_bytes: u64,
    /// The longest that truncation waits for readers still in the log, milliseconds; appends wait
    /// meanwhile, then it tries again half a second later.
    pub sqlite_wal_reader_wait_ms: u64,
    /// Run the background workers (sagas, transactions) on this node; off: it only serves the API.
    pub workers: bool,
    /// How long a node holds a saga or transaction before another node may take it over,
    /// milliseconds (longer when a step's or a prepare's timeout needs it).
    pub lease_ms: u64,
    /// How often the workers look for due work in the database, milliseconds.
    pub poll_ms: u64,
    /// Most sagas one node drives at a time.
    pub saga_max_concurrent: usize,
    /// Most items a worker takes in one claim.
    pub claim_batch: usize,
    /// Longest `wait_ms` of a saga request, milliseconds.
    pub saga_max_wait_ms: u64,
    pub saga_max_steps: usize,
    pub saga_max_definition_bytes: usize,
    pub saga_max_input_bytes: usize,
    /// Largest participant answer kept as a step output, bytes.
    pub saga_max_output_bytes: usize,
    /// Highest `max_attempts` a retry policy may set.
    pub saga_max_attempts: u32,
    /// Longest step timeout, milliseconds.
    pub saga_max_timeout_ms: u64,
    /// Longest backoff between attempts, milliseconds.
    pub saga_max_backoff_ms: u64,
    /// Longest `sleep_ms` of a timer step, milliseconds (31 days).
    pub saga_max_sleep_ms: u64,
    /// Where saga definitions may call: hosts (`name`, `name:port`) and networks (`10.0.0.0/8`),
    /// each called whatever it resolves to, and nothing else. Empty: public addresses only (no
    /// loopback, private, link-local or metadata address). Checked at every call.
    pub saga_allowed_hosts: Vec<String>,
    /// How long a node trusts the latest definition version it looked up, milliseconds: a new
    /// version put on another node reaches new sagas here within this time.
    pub saga_definition_cache_ms: u64,
    /// How often a node driving a saga looks for operations asked of it (cancel, pause, ...)
    /// between its calls, milliseconds; always before it puts the saga away to wait.
    pub saga_operations_poll_ms: u64,
    /// Sagas a bulk operation (`/v1/saga-batches`) does per page, each page recorded.
    pub saga_batch_page: usize,
    /// How often a node looks for a batch whose node stopped (nothing recorded for `lease_ms`)
    /// to take it over, milliseconds.
    pub saga_batch_resume_ms: u64,
    /// At most this many sagas a second per batch (0: no limit).
    pub saga_batch_per_s: u32,
    /// How long the row of a saga that finished for good (`completed`, `compensated`,
    /// `cancelled`) stays in the work table, seconds; 0 keeps it forever. Its log stays: the saga
    /// is still shown by `GET /v1/sagas/{id}` and a start with its id still finds it, but lists
    /// and batches no longer see it.
    pub saga_retention_s: u64,
    /// The same for decided transactions with nothing left to do, seconds; 0 keeps them.
    pub tx_retention_s: u64,
    /// How often a node removes rows past their retention, milliseconds.
    pub retention_sweep_ms: u64,
    /// Rows removed per statement; a sweep repeats until fewer are left.
    pub retention_batch: usize,
    /// Consecutive failures of a participant host (connection errors, timeouts, 5xx) that open
    /// its circuit breaker: sagas that call it then wait, spending no attempt, until a probe
    /// succeeds.
    pub participant_breaker_failures: u32,
    /// How long a participant's breaker stays open before one call probes, milliseconds (at
    /// most a day).
    pub participant_breaker_open_ms: u64,
    /// The longest hold a participant's `Retry-After` may ask for, milliseconds (at most a day).
    pub participant_max_hold_ms: u64,
    /// How old a node's copy of the participant hosts' state may be, milliseconds: a limit set
    /// or a breaker opened on another node applies here within this time (a host with a limit,
    /// or a breaker not closed, is asked of the database on every call).
    pub participant_refresh_ms: u64,
    /// How long a saga held back by a host's concurrency limit waits before asking again,
    /// milliseconds.
    pub participant_slot_wait_ms: u64,
    /// How participants reach this server (`https://concord.internal:7400`): the base of the
    /// completion URLs asynchronous actions are given (`Concord-Callback`). Unset: the address
    /// the server listens on, `https://` with TLS, which only reaches it when that address is
    /// one participants can route to (not `0.0.0.0`).
    pub public_url: Option<String>,
    /// Credentials for saga participants by name, used in definitions as `{{secrets.<name>}}`
    /// in header values, each sent only to its hosts (`[saga_secrets.<name>]` in the file, or
    /// `CONCORD_SAGA_SECRETS='{name={value="...",hosts=["payments"]}}'`). Never stored, shown
    /// or logged.
    #[serde(skip_serializing)]
    pub saga_secrets: std::collections::BTreeMap<String, SagaSecretSetting>,
    /// Most participants in one transaction.
    pub tx_max_participants: usize,
    /// Largest payload for one participant, bytes.
    pub tx_max_payload_bytes: usize,
    /// Longest prepare timeout a transaction may ask, milliseconds.
    pub tx_max_timeout_ms: u64,
    /// Longest wait for one phase-2 answer, milliseconds.
    pub tx_phase2_timeout_ms: u64,
    /// First and longest delay between phase-2 rounds, milliseconds.
    pub tx_retry_backoff_ms: u64,
    pub tx_max_retry_backoff_ms: u64,
    /// Most transactions one node delivers phase 2 for at a time.
    pub tx_max_concurrent: usize,
    /// Where transaction participants may be, as `saga_allowed_hosts` says for sagas. Empty:
    /// public addresses only.
    pub tx_allowed_hosts: Vec<String>,
    /// Sent as `Authorization: Bearer` on every call to a transaction participant, which checks
    /// it (`concord_sdk::tx::CoordinatorAuth::Token`), so only the coordinator can prepare,
    /// commit or abort. A secret: never logged.
    #[serde(skip_serializing)]
    pub tx_participant_token: Option<Secret>,
    /// The participants (`name`, `name:port`, or a network for participants called by address)
    /// `tx_participant_token` is sent to; to any other the call goes without it. Required with a
    /// token: the server does not start with a token bound to nothing.
    pub tx_participant_token_hosts: Vec<String>,
    /// The server's certificate chain, PEM (`CONCORD_TLS_CERT`). Set with `tls_key`, the server
    /// speaks only TLS; a renewed file is served from the next handshake on, without a restart.
    pub tls_cert: Option<String>,
    /// The certificate's private key, PEM (`CONCORD_TLS_KEY`).
    pub tls_key: Option<String>,
    /// A PEM bundle of certificate authorities (`CONCORD_TLS_CLIENT_CA`): set, every client must
    /// show a certificate one of them signed (mutual TLS). Needs `tls_cert`.
    pub tls_client_ca: Option<String>,
    /// Certificate authorities the server's own calls (saga steps, 2PC participants) trust beyond
    /// the system's roots, PEM (`CONCORD_TLS_CA`, as every Concord client reads it).
    pub tls_ca: Option<String>,
    /// The certificate those calls show a participant that asks for one, PEM
    /// (`CONCORD_TLS_CLIENT_CERT`), with its key `tls_client_key` (`CONCORD_TLS_CLIENT_KEY`).
    pub tls_client_cert: Option<String>,
    pub tls_client_key: Option<String>,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown = serde_json::to_value(self).unwrap_or_default();
        let set = |v: bool| if v { "<set>" } else { "<unset>" };
        f.debug_struct("Settings")
            .field("settings", &format_args!("{shown}"))
            .field("vault_master_key", &set(self.vault_master_key.is_some()))
            .field("vault_previous_master_keys", &self.vault_previous_master_keys.len())
            .field("admin_key", &set(self.admin_key.is_some()))
            .field("tx_participant_token", &set(self.tx_participant_token.is_some()))
            .field("saga_secrets", &self.saga_secrets.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// A secret of the configuration (a key, a token, a password): wiped from memory when dropped,
/// printed as `[secret]`, never serialized.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(zeroize::Zeroizing<String>);

impl Secret {
    /// The secret's text, for the one place that uses it.
    #[must_use]
    pub fn expose(&self) -> &str {
        self.0.as_str()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[secret]")
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Self {
        Self(zeroize::Zeroizing::new(s))
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Self {
        Self(zeroize::Zeroizing::new(s.to_owned()))
    }
}

/// One saga secret: its value and where it may be sent: hosts (`name` or `name:port`),
/// methods (empty: any) and a path prefix (unset: `/`).
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SagaSecretSetting {
    pub value: Secret,
    pub hosts: Vec<String>,
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub path_prefix: Option<String>,
}

impl std::fmt::Debug for SagaSecretSetting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SagaSecretSetting")
            .field("value", &"[secret]")
            .field("hosts", &self.hosts)
            .field("methods", &self.methods)
            .field("path_prefix", &self.path_prefix)
            .finish()
    }
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:7400".into(),
            database_url: "sqlite://concord.db".into(),
            vault_database_url: String::new(),
            vault_master_key: None,
            vault_master_key_file: None,
            vault_previous_master_keys: Vec::new(),
            vault_max_batch: 1000,
            vault_max_value_bytes: 4096,
            vault_max_metadata_bytes: 4096,
            vault_max_ttl_s: 10 * 365 * 24 * 3600,
            vault_max_rule_fields: 64,
            vault_key_cache_ms: 1000,
            vault_rules_cache_ms: 1000,
            vault_detokenize_per_s: 1000.0,
            vault_detokenize_burst: 2000.0,
            vault_refused_audit_per_min: 60.0,
            vault_write_batch: 1000,
            admin_key: None,
            log_json: false,
            max_event_bytes: 1024 * 1024,
            max_events_per_append: 1000,
            max_body_bytes: 16 * 1024 * 1024,
            max_read_limit: 1000,
            max_read_bytes: 8 * 1024 * 1024,
            max_wait_ms: 30_000,
            max_batch_events: 2000,
            idempotency_ttl_s: 24 * 3600,
            idempotency_lock_s: 120,
            header_read_timeout_ms: 10_000,
            request_timeout_ms: 90_000,
            max_connections: 4096,
            max_concurrent_requests_per_key: 256,
            max_subscribers: 1024,
            max_subscribers_per_key: 64,
            drain_ms: 0,
            shutdown_grace_s: 30,
            db_connections: 16,
            auth_cache_ttl_ms: 1000,
            sqlite_synchronous_full: true,
            sqlite_wal_limit_bytes: 64 * 1024 * 1024,
            sqlite_wal_reader_wait_ms: 100,
            workers: true,
            lease_ms: 10_000,
            poll_ms: 100,
            saga_max_concurrent: 512,
            claim_batch: 64,
            saga_max_wait_ms: 60_000,
            saga_max_steps: 32,
            saga_max_definition_bytes: 64 * 1024,
            saga_max_input_bytes: 64 * 1024,
            saga_max_output_bytes: 64 * 1024,
            saga_max_attempts: 100,
            saga_max_timeout_ms: 300_000,
            saga_max_backoff_ms: 3_600_000,
            saga_max_sleep_ms: concord_core::domain::saga::definition::DEFAULT_MAX_SLEEP_MS,
            saga_allowed_hosts: Vec::new(),
            saga_definition_cache_ms: 1000,
            saga_operations_poll_ms: 100,
            saga_batch_page: 100,
            saga_batch_resume_ms: 5_000,
            saga_batch_per_s: 1_000,
            saga_retention_s: 30 * 86_400,
            tx_retention_s: 30 * 86_400,
            retention_sweep_ms: 60_000,
            retention_batch: 1_000,
            participant_breaker_failures: 5,
            participant_breaker_open_ms: 5_000,
            participant_max_hold_ms: 300_000,
            participant_refresh_ms: 500,
            participant_slot_wait_ms: 100,
            public_url: None,
            saga_secrets: std::collections::BTreeMap::new(),
            tx_max_participants: 16,
            tx_max_payload_bytes: 64 * 1024,
            tx_max_timeout_ms: 60_000,
            tx_phase2_timeout_ms: 5_000,
            tx_retry_backoff_ms: 100,
            tx_max_retry_backoff_ms: 30_000,
            tx_max_concurrent: 512,
            tx_allowed_hosts: Vec::new(),
            tx_participant_token: None,
            tx_participant_token_hosts: Vec::new(),
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            tls_ca: None,
            tls_client_cert: None,
            tls_client_key: None,
        }
    }
}

/// A file setting: unset when absent or empty (an empty `CONCORD_...=` clears it).
fn path_setting(value: &Option<String>) -> Option<std::path::PathBuf> {
    value.as_deref().filter(|s| !s.is_empty()).map(std::path::PathBuf::from)
}

impl Settings {
    /// Loads defaults, the config file and the environment. A file named explicitly must exist;
    /// `concord.toml` in the working directory is read when present.
    ///
    /// # Errors
    /// A missing explicit file or a value of the wrong type.
    pub fn load(config_file: Option<&str>) -> anyhow::Result<Self> {
        let mut fig = Figment::from(Serialized::defaults(Settings::default()));
        match config_file {
            Some(path) => {
                anyhow::ensure!(std::path::Path::new(path).exists(), "config file {path} not found");
                fig = fig.merge(Toml::file_exact(path));
            }
            // Only this directory's file: a plain `Toml::file` would also search parent directories.
            None if std::path::Path::new("concord.toml").exists() => fig = fig.merge(Toml::file_exact("concord.toml")),
            None => {}
        }
        let settings: Settings = fig
            .merge(Env::prefixed("CONCORD_").ignore(&["url", "key"]))
            .extract()
            .map_err(|e| anyhow::anyhow!("configuration: {e}"))?;
        Ok(settings)
    }

    /// Drops the secrets the server needs only to start (the master keys, the bootstrap admin
    /// key), wiping them from memory: the settings live as long as the process.
    pub fn forget_startup_secrets(&mut self) {
        self.vault_master_key = None;
        self.vault_previous_master_keys.clear();
        self.admin_key = None;
        self.tx_participant_token = None;
        self.saga_secrets.clear();
    }

    /// The server's TLS files: none when `tls_cert` and `tls_key` are unset.
    ///
    /// # Errors
    /// Only one of the certificate and its key set, or a client CA without them.
    pub fn server_tls(&self) -> anyhow::Result<Option<concord_sdk::serve::ServerTlsFiles>> {
        concord_sdk::serve::ServerTlsFiles::from_paths(
            path_setting(&self.tls_cert),
            path_setting(&self.tls_key),
            path_setting(&self.tls_client_ca),
        )
        .map_err(|e| anyhow::anyhow!("configuration: {e}"))
    }

    /// The TLS of the server's own calls to saga steps and 2PC participants.
    #[must_use]
    pub fn client_tls(&self) -> concord_sdk::ClientTls {
        concord_sdk::ClientTls {
            ca: path_setting(&self.tls_ca),
            client_cert: path_setting(&self.tls_client_cert),
            client_key: path_setting(&self.tls_client_key),
        }
    }

    /// The relations between settings that single values cannot express.
    ///
    /// # Errors
    /// A request timeout not above the longest wait a request may ask, or an idempotency lock
    /// that a live request could outlast (a retry would then run it a second time).
    pub fn check(&self) -> anyhow::Result<()> {
        const MARGIN_MS: u64 = 10_000;
        if let Some(url) = &self.public_url {
            anyhow::ensure!(
                (url.starts_with("http://") || url.starts_with("https://"))
                    && !url.contains(['?', '#', ' '])
                    && url.len() <= 512,
                "configuration: public_url must be an http:// or https:// base URL without query or fragment"
            );
        }
        let longest_wait = self.max_wait_ms.max(self.saga_max_wait_ms).max(self.tx_max_timeout_ms);
        anyhow::ensure!(
            self.request_timeout_ms >= longest_wait + MARGIN_MS,
            "configuration: request_timeout_ms ({}) must be at least 10 s over the longest wait a request may ask \
             ({longest_wait} ms, from max_wait_ms, saga_max_wait_ms and tx_max_timeout_ms)",
            self.request_timeout_ms
        );
        anyhow::ensure!(
            self.idempotency_lock_s.saturating_mul(1000) >= self.request_timeout_ms + MARGIN_MS,
            "configuration: idempotency_lock_s ({} s) must outlast request_timeout_ms ({} ms) by 10 s, \
             so no retry takes over the key of a request still running",
            self.idempotency_lock_s,
            self.request_timeout_ms
        );
        for (name, value) in [
            ("header_read_timeout_ms", self.header_read_timeout_ms),
            ("max_connections", self.max_connections as u64),
            (
                "max_concurrent_requests_per_key",
                self.max_concurrent_requests_per_key as u64,
            ),
            ("max_subscribers", self.max_subscribers as u64),
            ("max_subscribers_per_key", self.max_subscribers_per_key as u64),
            ("max_read_bytes", self.max_read_bytes as u64),
            ("sqlite_wal_limit_bytes", self.sqlite_wal_limit_bytes),
            ("sqlite_wal_reader_wait_ms", self.sqlite_wal_reader_wait_ms),
        ] {
            anyhow::ensure!(value > 0, "configuration: {name} must be above 0");
        }
        Ok(())
    }

    /// The 2PC token with the participants it is bound to.
    ///
    /// # Errors
    /// A token bound to no participant, or a bad entry.
    pub fn tx_token(&self) -> anyhow::Result<Option<crate::tx::participants::BoundToken>> {
        let Some(token) = &self.tx_participant_token else {
            return Ok(None);
        };
        if self.tx_participant_token_hosts.is_empty() {
            anyhow::bail!(
                "configuration: tx_participant_token is set but tx_participant_token_hosts is empty: \
                 name the participants the token may be sent to"
            );
        }
        let hosts = concord_core::domain::outbound::OutboundPolicy::new(
            "tx_participant_token_hosts",
            &self.tx_participant_token_hosts,
        )
        .map_err(|e| anyhow::anyhow!("configuration: {e}"))?;
        Ok(Some(crate::tx::participants::BoundToken {
            token: zeroize::Zeroizing::new(token.expose().to_owned()),
            hosts,
        }))
    }

    /// The saga secrets, checked.
    ///
    /// # Errors
    /// A bad name, an empty value or a secret without hosts.
    pub fn saga_secrets(&self) -> anyhow::Result<concord_core::domain::saga::SagaSecrets> {
        concord_core::domain::saga::SagaSecrets::new(self.saga_secrets.iter().map(|(name, s)| {
            let binding = concord_core::domain::saga::SecretBinding {
                hosts: s.hosts.clone(),
                methods: s.methods.clone(),
                path_prefix: s.path_prefix.clone(),
            };
            (name.clone(), s.value.expose().to_owned(), binding)
        }))
        .map_err(|e| anyhow::anyhow!("configuration: {e}"))
    }

    /// Flow control of participant hosts.
    #[must_use]
    pub fn gate_settings(&self) -> concord_core::app::flow::GateSettings {
        // At most a day: longer is no flow control, and the sums stay far inside the calendar.
        let ms = |v: u64| chrono::Duration::milliseconds(i64::try_from(v.min(86_400_000)).unwrap_or(86_400_000));
        concord_core::app::flow::GateSettings {
            breaker: concord_core::domain::flow::BreakerSettings {
                failures: self.participant_breaker_failures.max(1),
                open_for: ms(self.participant_breaker_open_ms.max(1)),
                max_hold: ms(self.participant_max_hold_ms),
            },
            refresh: std::time::Duration::from_millis(self.participant_refresh_ms),
            slot_wait: std::time::Duration::from_millis(self.participant_slot_wait_ms.max(1)),
            ..concord_core::app::flow::GateSettings::default()
        }
    }

    #[must_use]
    pub fn saga_limits(&self) -> concord_core::domain::saga::SagaLimits {
        concord_core::domain::saga::SagaLimits {
            max_steps: self.saga_max_steps,
            max_definition_bytes: self.saga_max_definition_bytes,
            // A saga's input and each step's output are stored as events, so they stay 4 KiB
            // (room for the rest of the event) under the event limit whatever is configured.
            max_input_bytes: self.saga_max_input_bytes.min(self.max_event_bytes.saturating_sub(4096)),
            max_output_bytes: self
                .saga_max_output_bytes
                .min(self.max_event_bytes.saturating_sub(4096)),
            max_attempts: self.saga_max_attempts,
            max_timeout_ms: self.saga_max_timeout_ms,
            max_backoff_ms: self.saga_max_backoff_ms,
            max_sleep_ms: self.saga_max_sleep_ms,
        }
    }

    /// The vault's database URL: the configured one, or the default beside the event store.
    #[must_use]
    pub fn vault_url(&self) -> String {
        if !self.vault_database_url.is_empty() {
            return self.vault_database_url.clone();
        }
        match self.database_url.strip_prefix("sqlite://") {
            Some(rest) if !rest.contains(":memory:") => {
                let (path, query) = rest.split_once('?').map_or((rest, ""), |(p, q)| (p, q));
                let stem = path.strip_suffix(".db").unwrap_or(path);
                let query = if query.is_empty() {
                    String::new()
                } else {
                    format!("?{query}")
                };
                format!("sqlite://{stem}-vault.db{query}")
            }
            Some(_) => "sqlite::memory:".into(),
            None if self.database_url.starts_with("postgres") => self.database_url.clone(),
            None => "sqlite://concord-vault.db".into(),
        }
    }

    #[must_use]
    pub fn vault_config(&self) -> concord_core::app::vault::VaultConfig {
        concord_core::app::vault::VaultConfig {
            max_batch: self.vault_max_batch,
            max_value_bytes: self.vault_max_value_bytes,
            max_metadata_bytes: self.vault_max_metadata_bytes,
            max_ttl_s: self.vault_max_ttl_s,
            max_rule_fields: self.vault_max_rule_fields,
            key_cache_ttl: std::time::Duration::from_millis(self.vault_key_cache_ms),
            rules_cache_ttl: std::time::Duration::from_millis(self.vault_rules_cache_ms),
            detokenize_per_s: self.vault_detokenize_per_s,
            detokenize_burst: self.vault_detokenize_burst,
            refused_audit_per_min: self.vault_refused_audit_per_min,
            write_batch: self.vault_write_batch,
            event_limits: self.limits(),
            previous_master_keys: Vec::new(),
        }
    }

    #[must_use]
    pub fn limits(&self) -> concord_core::domain::Limits {
        concord_core::domain::Limits {
            max_event_bytes: self.max_event_bytes,
            max_events_per_append: self.max_events_per_append,
            max_read_limit: self.max_read_limit,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lock_outlives_the_longest_request_and_that_the_longest_wait() {
        assert!(Settings::default().check().is_ok());
        let short_lock = Settings {
            idempotency_lock_s: 60,
            ..Settings::default()
        };
        let e = short_lock.check().unwrap_err().to_string();
        assert!(e.contains("idempotency_lock_s"), "{e}");
        let short_request = Settings {
            request_timeout_ms: 60_000,
            ..Settings::default()
        };
        let e = short_request.check().unwrap_err().to_string();
        assert!(e.contains("request_timeout_ms"), "{e}");
        let no_subscribers = Settings {
            max_subscribers: 0,
            ..Settings::default()
        };
        assert!(no_subscribers.check().is_err());
    }

    #[test]
    fn debug_shows_no_secret() {
        let s = Settings {
            vault_master_key: Some("master-key-text".into()),
            vault_previous_master_keys: vec!["previous-key-text".into()],
            admin_key: Some("admin-key-text".into()),
            tx_participant_token: Some("tx-token-text".into()),
            saga_secrets: [(
                "shop".to_owned(),
                SagaSecretSetting {
                    value: "saga-secret-text".into(),
                    hosts: vec!["orders".into()],
                    methods: Vec::new(),
                    path_prefix: None,
                },
            )]
            .into(),
            ..Settings::default()
        };
        let shown = format!("{s:?} {s:#?}");
        for secret in [
            "master-key-text",
            "previous-key-text",
            "admin-key-text",
            "tx-token-text",
            "saga-secret-text",
        ] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        assert!(shown.contains("127.0.0.1:7400") && shown.contains("shop"), "{shown}");
    }

    #[test]
    fn defaults_match_the_contract() {
        let s = Settings::default();
        assert_eq!(s.listen, "127.0.0.1:7400");
        assert_eq!(s.database_url, "sqlite://concord.db");
        assert_eq!(s.max_event_bytes, 1024 * 1024);
        assert!(
            s.max_body_bytes > s.max_event_bytes,
            "an oversized event must reach validation"
        );
    }

    #[test]
    fn the_vault_database_sits_beside_a_sqlite_event_store_by_default() {
        let mut s = Settings::default();
        assert_eq!(s.vault_url(), "sqlite://concord-vault.db");
        s.database_url = "sqlite:///var/lib/concord/events.db".into();
        assert_eq!(s.vault_url(), "sqlite:///var/lib/concord/events-vault.db");
        s.database_url = "postgres://db/concord".into();
        assert_eq!(s.vault_url(), "postgres://db/concord", "every node shares the vault");
        s.vault_database_url = "postgres://vault-db/vault".into();
        assert_eq!(s.vault_url(), "postgres://vault-db/vault");
    }

    #[test]
    fn saga_secrets_come_from_the_file_and_are_never_serialized() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("concord.toml");
        std::fs::write(
            &path,
            "[saga_secrets.shop]\nvalue = \"t0ken\"\nhosts = [\"orders\", \"payments:8082\"]\n",
        )
        .unwrap();
        let s = Settings::load(Some(path.to_str().unwrap())).unwrap();
        let shop = &s.saga_secrets["shop"];
        assert_eq!((shop.value.expose(), shop.hosts.len()), ("t0ken", 2));
        for shown in [serde_json::to_string(&s).unwrap(), format!("{s:?}")] {
            assert!(!shown.contains("t0ken"), "{shown}");
        }
    }

    #[test]
    fn an_explicit_missing_config_file_is_an_error() {
        assert!(Settings::load(Some("/nonexistent/concord.toml")).is_err());
    }
}
