//! The control-plane objects and their rules: workers with leases, health
//! and circuit breakers; session affinity; rate limits; counters.
//!
//! Every function here is deterministic: the only clock is the `time_ms`
//! of the command being applied. Objects are stored as JSON text so watches
//! and the API can hand them out unchanged.

use std::collections::BTreeMap;
use std::io;

use serde::Deserialize;
use serde::Serialize;

use super::Command;
use super::Object;
use super::Overlay;
use super::ReadState;
use super::Response;
use super::check;
use super::from_json;
use super::put_object;

/// Key prefix of workers.
pub const WORKERS: &str = "workers/";
/// Key prefix of session affinities.
pub const AFFINITY: &str = "affinity/";
/// Key prefix of rate limits.
pub const RATELIMITS: &str = "ratelimits/";
/// Key prefix of counters.
pub const COUNTERS: &str = "counters/";
/// Key prefix of routing policies.
pub const POLICIES: &str = "policies/";

/// Most workers or affinities one expiry sweep removes.
pub const EXPIRE_BATCH: usize = 1000;

/// What kind of work a worker does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum WorkerType {
    /// Prefill and decode.
    #[default]
    Regular,
    /// Prefill only (disaggregated serving).
    Prefill,
    /// Decode only (disaggregated serving).
    Decode,
}

/// Circuit-breaker thresholds of one worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerConfig {
    /// Consecutive failures that open the circuit.
    pub failure_threshold: u32,
    /// Consecutive successes in half-open that close it.
    pub success_threshold: u32,
    /// Time an open circuit waits before letting a probe through.
    pub cooldown_ms: u64,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failure_threshold: 3,
            success_threshold: 2,
            cooldown_ms: 30_000,
        }
    }
}

/// A worker as clients register it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerSpec {
    /// Unique id.
    pub id: String,
    /// Base URL of the worker.
    pub url: String,
    /// Model ids it serves.
    pub models: Vec<String>,
    /// Regular, prefill or decode.
    pub worker_type: WorkerType,
    /// Free-form labels.
    pub labels: BTreeMap<String, String>,
    /// Higher is preferred.
    pub priority: u32,
    /// Relative cost in integer units.
    pub cost: u64,
    /// Relative weight for weighted policies.
    pub weight: u32,
    /// Lease length; `None` means the worker never expires.
    pub lease_ttl_ms: Option<u64>,
    /// Circuit-breaker thresholds.
    pub breaker: BreakerConfig,
}

/// Health as last reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthStatus {
    /// No check reported yet.
    Unknown,
    /// Last check passed.
    Healthy,
    /// Last check failed, circuit still closed.
    Unhealthy,
}

/// Circuit-breaker state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CircuitState {
    /// Traffic flows.
    Closed,
    /// Traffic is cut off until the cool-down has passed.
    Open,
    /// Probing: a few successes close it, a failure opens it again.
    HalfOpen,
}

/// A stored worker: the spec plus replicated health, circuit and lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Worker {
    /// What the client registered.
    #[serde(flatten)]
    pub spec: WorkerSpec,
    /// Last reported health.
    pub health: HealthStatus,
    /// Failures in a row.
    pub consecutive_failures: u32,
    /// Successes in a row.
    pub consecutive_successes: u32,
    /// Command time of the last health report.
    pub last_check_ms: Option<u64>,
    /// Error of the last failed check.
    pub last_error: Option<String>,
    /// Circuit state.
    pub circuit: CircuitState,
    /// Command time of the last circuit transition.
    pub circuit_since_ms: u64,
    /// When the lease lapses (command time), if the worker has a lease.
    pub lease_expires_ms: Option<u64>,
}

/// Registers `spec`, keeping health and circuit of an existing worker.
pub fn put_worker(current: Option<Worker>, spec: WorkerSpec, time_ms: u64) -> Worker {
    let lease_expires_ms = spec.lease_ttl_ms.map(|t| time_ms.saturating_add(t));
    match current {
        Some(w) => Worker {
            spec,
            lease_expires_ms,
            ..w
        },
        None => Worker {
            spec,
            health: HealthStatus::Unknown,
            consecutive_failures: 0,
            consecutive_successes: 0,
            last_check_ms: None,
            last_error: None,
            circuit: CircuitState::Closed,
            circuit_since_ms: time_ms,
            lease_expires_ms,
        },
    }
}

/// Applies one health-check result to a worker and its circuit breaker.
///
/// Closed: `failure_threshold` failures in a row open it. Open: reports are
/// recorded but the circuit stays open until `cooldown_ms` has passed; the
/// first report after that is a probe (half-open). Half-open:
/// `success_threshold` successes in a row close it; a failure opens it again.
pub fn health_report(mut w: Worker, ok: bool, error: Option<String>, time_ms: u64) -> Worker {
    let b = w.spec.breaker;
    w.last_check_ms = Some(time_ms);
    if ok {
        w.consecutive_successes = w.consecutive_successes.saturating_add(1);
        w.consecutive_failures = 0;
        w.health = HealthStatus::Healthy;
        w.last_error = None;
    } else {
        w.consecutive_failures = w.consecutive_failures.saturating_add(1);
        w.consecutive_successes = 0;
        w.health = HealthStatus::Unhealthy;
        w.last_error = error;
    }
    if w.circuit == CircuitState::Open && time_ms >= w.circuit_since_ms.saturating_add(b.cooldown_ms) {
        w.circuit = CircuitState::HalfOpen;
        w.circuit_since_ms = time_ms;
        // The probe is judged on its own.
        w.consecutive_successes = u32::from(ok);
    }
    let next = match (w.circuit, ok) {
        (CircuitState::Closed, false) if w.consecutive_failures >= b.failure_threshold => CircuitState::Open,
        (CircuitState::HalfOpen, false) => CircuitState::Open,
        (CircuitState::HalfOpen, true) if w.consecutive_successes >= b.success_threshold => CircuitState::Closed,
        (state, _) => state,
    };
    if next != w.circuit {
        w.circuit = next;
        w.circuit_since_ms = time_ms;
    }
    w
}

/// A session's sticky worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Affinity {
    /// The worker.
    pub worker_id: String,
    /// When the mapping vanishes (command time).
    pub expires_ms: u64,
}

/// A rate limit's kind and parameters. (Externally tagged: it travels in
/// log entries, whose bincode encoding cannot carry internally tagged enums.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum RateLimitSpec {
    /// Up to `capacity` tokens, refilled continuously.
    TokenBucket {
        /// Bucket size in tokens.
        capacity: u64,
        /// Refill rate in thousandths of a token per second.
        refill_milli_per_sec: u64,
    },
    /// At most `limit` tokens per fixed window.
    FixedWindow {
        /// Tokens per window.
        limit: u64,
        /// Window length.
        window_ms: u64,
    },
}

/// Per-key state of a rate limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bucket {
    /// Token bucket: thousandths of tokens left. Fixed window: tokens used.
    pub level_milli: u64,
    /// Token bucket: command time of the last refill. Fixed window: window start.
    pub at_ms: u64,
}

/// A stored rate limit with the state of each key ("" when no key is given).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateLimit {
    /// Kind and parameters.
    pub spec: RateLimitSpec,
    /// State per key.
    pub buckets: BTreeMap<String, Bucket>,
}

/// Takes `tokens` for `key` at `time_ms`; returns the new state and
/// `(granted, remaining, retry_after_ms)`.
pub fn acquire(mut rl: RateLimit, tokens: u64, key: &str, time_ms: u64) -> (RateLimit, (bool, u64, Option<u64>)) {
    let want = tokens.saturating_mul(1000);
    let out = match rl.spec {
        RateLimitSpec::TokenBucket {
            capacity,
            refill_milli_per_sec,
        } => {
            let cap = capacity.saturating_mul(1000);
            let b = rl.buckets.entry(key.to_string()).or_insert(Bucket {
                level_milli: cap,
                at_ms: time_ms,
            });
            // Proposers' clocks may disagree; time never runs backwards here.
            let elapsed = time_ms.saturating_sub(b.at_ms);
            let refill = (u128::from(elapsed) * u128::from(refill_milli_per_sec) / 1000).min(u128::from(cap)) as u64;
            b.level_milli = b.level_milli.saturating_add(refill).min(cap);
            b.at_ms = b.at_ms.max(time_ms);
            if b.level_milli >= want {
                b.level_milli -= want;
                (true, b.level_milli / 1000, None)
            } else {
                let retry = if want > cap || refill_milli_per_sec == 0 {
                    None
                } else {
                    Some(((want - b.level_milli) * 1000).div_ceil(refill_milli_per_sec))
                };
                (false, b.level_milli / 1000, retry)
            }
        }
        RateLimitSpec::FixedWindow { limit, window_ms } => {
            let start = time_ms - time_ms % window_ms.max(1);
            let b = rl.buckets.entry(key.to_string()).or_insert(Bucket {
                level_milli: 0,
                at_ms: start,
            });
            if start > b.at_ms {
                *b = Bucket {
                    level_milli: 0,
                    at_ms: start,
                };
            }
            let used = b.level_milli;
            if used.saturating_add(tokens) <= limit {
                b.level_milli = used + tokens;
                (true, limit - b.level_milli, None)
            } else {
                let retry = (tokens <= limit).then(|| b.at_ms.saturating_add(window_ms).saturating_sub(time_ms));
                (false, limit.saturating_sub(used), retry)
            }
        }
    };
    (rl, out)
}

fn get_json<T: serde::de::DeserializeOwned, S: ReadState + ?Sized>(
    ov: &Overlay<'_, S>,
    key: &str,
) -> io::Result<Option<(T, Object)>> {
    match ov.get(key)? {
        Some(o) => Ok(Some((from_json(&o.value)?, o))),
        None => Ok(None),
    }
}

fn json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("control-plane objects serialize")
}

/// Runs a control-plane command (everything but plain put/delete and txn).
pub(crate) fn run(
    ov: &mut Overlay<'_, dyn ReadState + '_>,
    cmd: &Command,
    time_ms: u64,
    index: u64,
) -> io::Result<Response> {
    match cmd {
        Command::PutWorker { spec, expect } => {
            let key = format!("{WORKERS}{}", spec.id);
            let current = get_json::<Worker, _>(ov, &key)?;
            if let Some(c) = check(expect, current.as_ref().map(|(_, o)| o)) {
                return Ok(c);
            }
            let (w, o) = match current {
                Some((w, o)) => (Some(w), Some(o)),
                None => (None, None),
            };
            let worker = put_worker(w, spec.clone(), time_ms);
            Ok(put_object(ov, &key, json(&worker), o.as_ref(), index))
        }
        Command::Heartbeat { id } => {
            let key = format!("{WORKERS}{id}");
            let Some((mut w, o)) = get_json::<Worker, _>(ov, &key)? else {
                return Ok(Response::NotFound);
            };
            w.lease_expires_ms = w.spec.lease_ttl_ms.map(|t| time_ms.saturating_add(t));
            Ok(put_object(ov, &key, json(&w), Some(&o), index))
        }
        Command::HealthReport { id, ok, error } => {
            let key = format!("{WORKERS}{id}");
            let Some((w, o)) = get_json::<Worker, _>(ov, &key)? else {
                return Ok(Response::NotFound);
            };
            let w = health_report(w, *ok, error.clone(), time_ms);
            Ok(put_object(ov, &key, json(&w), Some(&o), index))
        }
        Command::PutAffinity {
            session,
            worker_id,
            ttl_ms,
            expect,
        } => {
            let key = format!("{AFFINITY}{session}");
            let current = ov.get(&key)?;
            if let Some(c) = check(expect, current.as_ref()) {
                return Ok(c);
            }
            let a = Affinity {
                worker_id: worker_id.clone(),
                expires_ms: time_ms.saturating_add(*ttl_ms),
            };
            Ok(put_object(ov, &key, json(&a), current.as_ref(), index))
        }
        Command::PutRateLimit { name, spec, expect } => {
            let key = format!("{RATELIMITS}{name}");
            let current = ov.get(&key)?;
            if let Some(c) = check(expect, current.as_ref()) {
                return Ok(c);
            }
            let rl = RateLimit {
                spec: *spec,
                buckets: BTreeMap::new(),
            };
            Ok(put_object(ov, &key, json(&rl), current.as_ref(), index))
        }
        Command::Acquire { name, tokens, key } => {
            let k = format!("{RATELIMITS}{name}");
            let Some((rl, o)) = get_json::<RateLimit, _>(ov, &k)? else {
                return Ok(Response::NotFound);
            };
            let (rl, (granted, remaining, retry_after_ms)) =
                acquire(rl, *tokens, key.as_deref().unwrap_or(""), time_ms);
            put_object(ov, &k, json(&rl), Some(&o), index);
            Ok(Response::Acquired {
                granted,
                remaining,
                retry_after_ms,
                revision: index,
            })
        }
        Command::CounterAdd { name, delta } => {
            let k = format!("{COUNTERS}{name}");
            let current = get_json::<i64, _>(ov, &k)?;
            let old = current.as_ref().map(|(v, _)| *v).unwrap_or(0);
            let Some(value) = old.checked_add(*delta) else {
                return Ok(Response::Invalid(format!(
                    "counter {name} would overflow: {old} + {delta}"
                )));
            };
            put_object(ov, &k, json(&value), current.as_ref().map(|(_, o)| o), index);
            Ok(Response::Counter { value, revision: index })
        }
        Command::Expire => {
            let mut workers = Vec::new();
            for (k, o) in ov.scan(WORKERS, usize::MAX)? {
                let w: Worker = from_json(&o.value)?;
                if w.lease_expires_ms.is_some_and(|t| t <= time_ms) && workers.len() < EXPIRE_BATCH {
                    workers.push(w.spec.id.clone());
                    ov.delete(&k);
                }
            }
            let mut affinities = Vec::new();
            for (k, o) in ov.scan(AFFINITY, usize::MAX)? {
                let a: Affinity = from_json(&o.value)?;
                if a.expires_ms <= time_ms && affinities.len() < EXPIRE_BATCH {
                    affinities.push(k[AFFINITY.len()..].to_string());
                    ov.delete(&k);
                }
            }
            for (k, o) in ov.scan(super::IDEM_PREFIX, EXPIRE_BATCH)? {
                let rec: super::IdemRecord = from_json(&o.value)?;
                if rec.time_ms.saturating_add(super::IDEM_TTL_MS) <= time_ms {
                    ov.delete(&k);
                }
            }
            Ok(Response::Expired { workers, affinities })
        }
        Command::Put { .. } | Command::Delete { .. } | Command::Txn(_) => {
            Ok(Response::Invalid("not a control-plane command".into()))
        }
    }
}
