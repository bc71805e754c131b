//! Flow control per participant host: limits an operator sets (how many calls at once, how many
//! per second), a hold a participant asks for (`Retry-After`), and a circuit breaker that stops
//! calls to a host that keeps failing. One [`HostState`] per host, shared by every node through
//! the store; the decisions here are pure, so the store only has to read, change and write a
//! host's state under its lock.

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The most calls at once a limit may allow.
pub const MAX_CONCURRENCY: u32 = 100_000;
/// The highest rate a limit may allow, per second.
pub const MAX_PER_S: f64 = 1_000_000.0;
/// The lowest: one call in 1,000 s. A lower rate would push calls out of any useful time.
pub const MIN_PER_S: f64 = 0.001;

/// What an operator set for a host; none of either: no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct HostLimits {
    pub max_concurrency: Option<u32>,
    pub max_per_s: Option<f64>,
}

impl HostLimits {
    /// # Errors
    /// A limit of zero, a rate that is not a positive finite number, or one over the bounds.
    pub fn new(max_concurrency: Option<u32>, max_per_s: Option<f64>) -> Result<Self, String> {
        if let Some(n) = max_concurrency
            && !(1..=MAX_CONCURRENCY).contains(&n)
        {
            return Err(format!("max_concurrency must be between 1 and {MAX_CONCURRENCY}"));
        }
        if let Some(r) = max_per_s
            && !(r.is_finite() && (MIN_PER_S..=MAX_PER_S).contains(&r))
        {
            return Err(format!("max_per_s must be between {MIN_PER_S} and {MAX_PER_S}"));
        }
        Ok(Self {
            max_concurrency,
            max_per_s,
        })
    }

    #[must_use]
    pub fn is_none(&self) -> bool {
        self.max_concurrency.is_none() && self.max_per_s.is_none()
    }
}

/// A host as allow-lists write it: `payments` (every port) or `payments:8082`, an IPv6 address
/// in brackets (`[::1]:9000`). Lower case.
///
/// # Errors
/// Anything else: empty, a scheme or path, a bad port, characters a host name does not have.
pub fn parse_host(s: &str) -> Result<String, String> {
    let s = s.trim().to_ascii_lowercase();
    if let Some(rest) = s.strip_prefix('[') {
        let (addr, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("{s:?} opens a bracket it does not close"))?;
        if addr.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(format!("{s:?} is not an IPv6 address in brackets"));
        }
        return match after {
            "" => Ok(s),
            p if p
                .strip_prefix(':')
                .is_some_and(|p| p.parse::<u16>().is_ok_and(|p| p > 0)) =>
            {
                Ok(s)
            }
            _ => Err(format!("{s:?} has a port that is not 1-65535")),
        };
    }
    let (name, port) = match s.rsplit_once(':') {
        Some((n, p)) if !n.contains(':') => (n, Some(p)),
        _ => (s.as_str(), None),
    };
    let name_ok = !name.is_empty()
        && name.len() <= 253
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_');
    if !name_ok {
        return Err(format!(
            "{s:?} is not a host name (write it as an allow-list does: name or name:port)"
        ));
    }
    if let Some(p) = port
        && !p.parse::<u16>().is_ok_and(|p| p > 0)
    {
        return Err(format!("{s:?} has a port that is not 1-65535"));
    }
    Ok(s)
}

/// The circuit breaker of a host.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Breaker {
    /// Calls go out.
    #[default]
    Closed,
    /// Calls wait until `open_until`; then one call probes.
    Open,
    /// One probe is out; the others wait for its result.
    HalfOpen,
}

impl Breaker {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
        }
    }
}

/// A call that holds a place in a host's count of calls at once, until it reports or `until`
/// passes (its node died mid-call).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallLease {
    pub id: Uuid,
    pub until: DateTime<Utc>,
}

/// The settings of every host's breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerSettings {
    /// Consecutive failures that open the breaker.
    pub failures: u32,
    /// How long it stays open before a probe.
    pub open_for: Duration,
    /// The longest hold a `Retry-After` may ask for; a longer one is cut to this.
    pub max_hold: Duration,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        Self {
            failures: 5,
            open_for: Duration::seconds(5),
            max_hold: Duration::minutes(5),
        }
    }
}

/// One host's shared state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HostState {
    #[serde(default)]
    pub limits: HostLimits,
    /// Calls out now, when a concurrency limit is set (and the probe, when half open).
    #[serde(default)]
    pub in_flight: Vec<CallLease>,
    /// The rate limit's next free moment (the theoretical arrival time of a cell rate).
    #[serde(default)]
    pub next_free_at: Option<DateTime<Utc>>,
    /// The last moment handed to a call the rate held back: each one held back is given its own
    /// moment, one interval after the previous, so they do not all come back at once.
    #[serde(default)]
    pub rate_tail: Option<DateTime<Utc>>,
    /// No call before this: the host asked for it with `Retry-After`.
    #[serde(default)]
    pub hold_until: Option<DateTime<Utc>>,
    /// Consecutive failures since the last success.
    #[serde(default)]
    pub failures: u32,
    #[serde(default)]
    pub breaker: Breaker,
    #[serde(default)]
    pub opened_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub open_until: Option<DateTime<Utc>>,
    /// The half-open probe, while it is out.
    #[serde(default)]
    pub probe: Option<CallLease>,
    /// How many times the breaker opened, ever.
    #[serde(default)]
    pub opened: u64,
    /// Counts the writes of this state: of two copies, the higher is the newer.
    #[serde(default)]
    pub version: u64,
}

/// Why a call may not go out yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockReason {
    BreakerOpen,
    /// Half open: another call is the probe.
    Probing,
    RetryAfter,
    Rate,
    Concurrency,
}

impl BlockReason {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BreakerOpen => "breaker_open",
            Self::Probing => "breaker_probing",
            Self::RetryAfter => "retry_after",
            Self::Rate => "rate_limit",
            Self::Concurrency => "concurrency_limit",
        }
    }

    /// Whether the saga waits for the host to come back (it is woken when the breaker closes),
    /// rather than for a moment it knows.
    #[must_use]
    pub fn waits_for_recovery(self) -> bool {
        matches!(self, Self::BreakerOpen | Self::Probing)
    }
}

/// What [`HostState::admit`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// The call may go out; `tracked`: it holds a place (report it), `probe`: it is the probe.
    Admitted { tracked: bool, probe: bool },
    /// Not before `until` (at the earliest).
    Blocked { until: DateTime<Utc>, reason: BlockReason },
}

/// What a call told about its host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostSignal {
    /// It answered: the host is up (a success, a refusal, an accepted call).
    Healthy,
    /// It failed as a host that is down fails: a connection error, a timeout, a 5xx.
    Failing,
    /// It asked callers to slow down (429, or 503 with `Retry-After`): hold calls this long.
    Throttled(Option<std::time::Duration>),
    /// The call never went out.
    NotSent,
}

/// A change of a breaker's state (a failed probe opens it again: `Opened` too), for logs,
/// metrics and the breaker journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Opened,
    Closed,
}

impl HostState {
    /// Whether a call may go out without touching the shared state: no limit, nothing held, the
    /// breaker closed with no failure counted.
    #[must_use]
    pub fn is_free(&self, now: DateTime<Utc>) -> bool {
        self.limits.is_none()
            && self.breaker == Breaker::Closed
            && self.failures == 0
            && self.hold_until.is_none_or(|h| h <= now)
    }

    /// Decides whether a call may go out now; when it may and is tracked, `lease` holds its place.
    pub fn admit(&mut self, now: DateTime<Utc>, lease: CallLease) -> Admission {
        self.in_flight.retain(|l| l.until > now);
        let mut probe = false;
        match self.breaker {
            Breaker::Closed => {}
            Breaker::Open => {
                let until = self.open_until.unwrap_or(now);
                if until > now {
                    return Admission::Blocked {
                        until,
                        reason: BlockReason::BreakerOpen,
                    };
                }
                probe = true;
            }
            Breaker::HalfOpen => match self.probe {
                Some(p) if p.until > now => {
                    return Admission::Blocked {
                        until: p.until,
                        reason: BlockReason::Probing,
                    };
                }
                // The probe's node died mid-call: another call probes.
                _ => probe = true,
            },
        }
        if let Some(h) = self.hold_until
            && h > now
        {
            return Admission::Blocked {
                until: h,
                reason: BlockReason::RetryAfter,
            };
        }
        if let Some(max) = self.limits.max_concurrency
            && self.in_flight.len() >= max as usize
        {
            let until = self.in_flight.iter().map(|l| l.until).min().unwrap_or(now);
            return Admission::Blocked {
                until,
                reason: BlockReason::Concurrency,
            };
        }
        if let Some(rate) = self.limits.max_per_s {
            let interval = interval(rate);
            let next = self.next_free_at.unwrap_or(now);
            if next > now {
                let slot = self.rate_tail.filter(|t| *t > next).unwrap_or(next);
                self.rate_tail = Some(later(slot, interval));
                return Admission::Blocked {
                    until: slot,
                    reason: BlockReason::Rate,
                };
            }
            self.next_free_at = Some(later(next.max(now), interval));
        }
        let tracked = self.limits.max_concurrency.is_some();
        if tracked {
            self.in_flight.push(lease);
        }
        if probe {
            self.breaker = Breaker::HalfOpen;
            self.probe = Some(lease);
        }
        Admission::Admitted {
            tracked: tracked || probe,
            probe,
        }
    }

    /// Records what a call (admitted with `lease`, or untracked) told about the host.
    pub fn report(
        &mut self,
        now: DateTime<Utc>,
        lease: Option<Uuid>,
        signal: HostSignal,
        settings: &BreakerSettings,
    ) -> Option<Transition> {
        let was_probe = lease.is_some() && self.probe.map(|p| p.id) == lease;
        if let Some(id) = lease {
            self.in_flight.retain(|l| l.id != id && l.until > now);
        }
        if was_probe {
            self.probe = None;
        }
        match signal {
            HostSignal::NotSent => None,
            HostSignal::Healthy => {
                self.failures = 0;
                self.close()
            }
            HostSignal::Throttled(after) => {
                // The host answered: it is up, only busy.
                self.failures = 0;
                if let Some(after) = after {
                    let after = Duration::from_std(after)
                        .unwrap_or(settings.max_hold)
                        .min(settings.max_hold);
                    let until = later(now, after);
                    self.hold_until = Some(self.hold_until.map_or(until, |h| h.max(until)));
                }
                self.close()
            }
            HostSignal::Failing => {
                self.failures = self.failures.saturating_add(1);
                let reopen = self.breaker == Breaker::HalfOpen && (was_probe || self.probe.is_none());
                let trip = self.breaker == Breaker::Closed && self.failures >= settings.failures.max(1);
                if reopen || trip {
                    self.breaker = Breaker::Open;
                    self.opened_at = Some(now);
                    self.open_until = Some(later(now, settings.open_for));
                    self.probe = None;
                    self.opened += 1;
                    return Some(Transition::Opened);
                }
                None
            }
        }
    }

    fn close(&mut self) -> Option<Transition> {
        if self.breaker == Breaker::Closed {
            return None;
        }
        self.breaker = Breaker::Closed;
        self.open_until = None;
        self.probe = None;
        Some(Transition::Closed)
    }

    /// Replaces the limits; calls out now keep their places. A new rate starts afresh.
    pub fn set_limits(&mut self, limits: HostLimits) {
        if limits.max_per_s != self.limits.max_per_s {
            self.next_free_at = None;
            self.rate_tail = None;
        }
        self.limits = limits;
        if limits.max_concurrency.is_none() {
            let probe = self.probe.map(|p| p.id);
            self.in_flight.retain(|l| Some(l.id) == probe);
        }
    }
}

/// `t + d`, or the latest time there is.
fn later(t: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    t.checked_add_signed(d).unwrap_or(DateTime::<Utc>::MAX_UTC)
}

fn interval(rate: f64) -> Duration {
    // At least a microsecond: the rate is bounded above, so this never rounds to nothing.
    #[allow(clippy::cast_possible_truncation)]
    let micros = (1_000_000.0 / rate).round().max(1.0) as i64;
    Duration::microseconds(micros)
}

/// The key a call to `host` on `port` is counted under: the most specific entry with limits
/// (`host:port`, then `host`), else `host:port`.
#[must_use]
pub fn host_key(host: &str, port: u16, has_limits: impl Fn(&str) -> bool) -> String {
    let host = host.to_ascii_lowercase();
    let with_port = format!("{host}:{port}");
    if has_limits(&with_port) {
        with_port
    } else if has_limits(&host) {
        host
    } else {
        with_port
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: i64) -> DateTime<Utc> {
        DateTime::<Utc>::UNIX_EPOCH + Duration::milliseconds(ms)
    }

    fn lease(n: u128, until: i64) -> CallLease {
        CallLease {
            id: Uuid::from_u128(n),
            until: at(until),
        }
    }

    #[test]
    fn hosts_are_written_as_allow_lists_write_them() {
        assert_eq!(parse_host("Payments").unwrap(), "payments");
        assert_eq!(parse_host("payments:8082").unwrap(), "payments:8082");
        for bad in ["", "http://x", "a/b", "x:0", "x:99999", "x:y", "a b"] {
            assert!(parse_host(bad).is_err(), "{bad}");
        }
        assert!(HostLimits::new(Some(0), None).is_err());
        assert!(HostLimits::new(None, Some(0.0)).is_err());
        assert!(HostLimits::new(None, Some(f64::NAN)).is_err());
        assert!(HostLimits::new(None, Some(1e-9)).is_err());
        assert!(HostLimits::new(Some(3), Some(2.5)).is_ok());
        assert_eq!(parse_host("[::1]:9000").unwrap(), "[::1]:9000");
        assert_eq!(parse_host("[FE80::1]").unwrap(), "[fe80::1]");
        for bad in ["[::1", "[nope]:1", "[::1]:0", "[::1]x"] {
            assert!(parse_host(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_concurrency_limit_holds_places_until_calls_report_or_their_leases_pass() {
        let mut s = HostState::default();
        s.set_limits(HostLimits::new(Some(2), None).unwrap());
        assert!(matches!(
            s.admit(at(0), lease(1, 1000)),
            Admission::Admitted { tracked: true, .. }
        ));
        assert!(matches!(s.admit(at(0), lease(2, 2000)), Admission::Admitted { .. }));
        assert_eq!(
            s.admit(at(10), lease(3, 1000)),
            Admission::Blocked {
                until: at(1000),
                reason: BlockReason::Concurrency
            }
        );
        s.report(
            at(20),
            Some(Uuid::from_u128(1)),
            HostSignal::Healthy,
            &BreakerSettings::default(),
        );
        assert!(matches!(s.admit(at(20), lease(3, 1000)), Admission::Admitted { .. }));
        // Lease 2 never reported: it stops counting when it passes.
        assert!(matches!(s.admit(at(2001), lease(4, 3000)), Admission::Admitted { .. }));
    }

    #[test]
    fn a_rate_spaces_calls_evenly() {
        let mut s = HostState::default();
        s.set_limits(HostLimits::new(None, Some(10.0)).unwrap());
        assert!(matches!(
            s.admit(at(0), lease(1, 0)),
            Admission::Admitted { tracked: false, .. }
        ));
        assert_eq!(
            s.admit(at(50), lease(2, 0)),
            Admission::Blocked {
                until: at(100),
                reason: BlockReason::Rate
            }
        );
        // The next one held back is given the moment after, not the same one.
        assert_eq!(
            s.admit(at(60), lease(3, 0)),
            Admission::Blocked {
                until: at(200),
                reason: BlockReason::Rate
            }
        );
        assert!(matches!(s.admit(at(100), lease(2, 0)), Admission::Admitted { .. }));
        assert!(matches!(s.admit(at(200), lease(3, 0)), Admission::Admitted { .. }));
        // Idle time is not saved up into a burst.
        assert!(matches!(s.admit(at(5000), lease(3, 0)), Admission::Admitted { .. }));
        assert!(matches!(s.admit(at(5001), lease(4, 0)), Admission::Blocked { .. }));
    }

    #[test]
    fn a_retry_after_holds_every_call_to_the_host() {
        let settings = BreakerSettings::default();
        let mut s = HostState::default();
        assert!(s.is_free(at(0)));
        s.report(
            at(0),
            None,
            HostSignal::Throttled(Some(std::time::Duration::from_secs(2))),
            &settings,
        );
        assert!(!s.is_free(at(1999)));
        assert_eq!(
            s.admit(at(1999), lease(1, 0)),
            Admission::Blocked {
                until: at(2000),
                reason: BlockReason::RetryAfter
            }
        );
        assert!(s.is_free(at(2000)));
        // A longer hold than allowed is cut.
        s.report(
            at(0),
            None,
            HostSignal::Throttled(Some(std::time::Duration::from_secs(86_400))),
            &settings,
        );
        assert_eq!(s.hold_until, Some(at(300_000)));
    }

    #[test]
    fn the_breaker_opens_probes_once_and_closes_on_the_first_success() {
        let settings = BreakerSettings {
            failures: 3,
            open_for: Duration::seconds(1),
            max_hold: Duration::seconds(60),
        };
        let mut s = HostState::default();
        for _ in 0..2 {
            assert_eq!(s.report(at(0), None, HostSignal::Failing, &settings), None);
        }
        // A success in between starts the count again.
        s.report(at(0), None, HostSignal::Healthy, &settings);
        for _ in 0..2 {
            s.report(at(0), None, HostSignal::Failing, &settings);
        }
        assert_eq!(
            s.report(at(5), None, HostSignal::Failing, &settings),
            Some(Transition::Opened)
        );
        assert_eq!(
            s.admit(at(500), lease(1, 0)),
            Admission::Blocked {
                until: at(1005),
                reason: BlockReason::BreakerOpen
            }
        );
        // Time is up: one call probes, the next waits for it.
        assert_eq!(
            s.admit(at(1005), lease(1, 3000)),
            Admission::Admitted {
                tracked: true,
                probe: true
            }
        );
        assert_eq!(
            s.admit(at(1006), lease(2, 3000)),
            Admission::Blocked {
                until: at(3000),
                reason: BlockReason::Probing
            }
        );
        // The probe fails: open again.
        s.report(at(1100), Some(Uuid::from_u128(1)), HostSignal::Failing, &settings);
        assert_eq!(s.breaker, Breaker::Open);
        assert_eq!(s.open_until, Some(at(2100)));
        // A probe whose node died frees the way for another.
        assert!(matches!(
            s.admit(at(2100), lease(3, 2200)),
            Admission::Admitted { probe: true, .. }
        ));
        assert!(matches!(
            s.admit(at(2201), lease(4, 4000)),
            Admission::Admitted { probe: true, .. }
        ));
        assert_eq!(
            s.report(at(2300), Some(Uuid::from_u128(4)), HostSignal::Healthy, &settings),
            Some(Transition::Closed)
        );
        assert!(s.is_free(at(2300)));
        assert_eq!(s.opened, 2);
    }

    #[test]
    fn the_most_specific_entry_with_limits_counts_a_call() {
        let limited = |k: &str| k == "payments";
        assert_eq!(host_key("Payments", 8082, limited), "payments");
        assert_eq!(host_key("payments", 8082, |k| k == "payments:8082"), "payments:8082");
        assert_eq!(host_key("inventory", 80, limited), "inventory:80");
    }
}
