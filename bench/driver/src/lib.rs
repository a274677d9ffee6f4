//! The load generator shared by `keel bench` and the etcd driver
//! (`bench/etcd-load`): the same options, the same closed (or rate-limited)
//! loop of clients, the same HdrHistogram percentiles and the same JSON
//! report, so two systems are measured by one yardstick. Only the operation
//! itself (an HTTP request to keel, a gRPC call to etcd) differs.
//!
//! Latency is measured from the moment an operation was due: when a target
//! `--rate` is set, an operation that starts late because the previous one
//! was slow counts its wait (no coordinated omission); one whose client was
//! idle counts from when its timer woke it (`measured_from`). Without a rate
//! each client sends its next request as soon as the previous one answered.

use std::future::Future;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::time::Duration;
use std::time::Instant;
use std::time::SystemTime;

use clap::Args;
use clap::ValueEnum;
use hdrhistogram::Histogram;
use serde::Deserialize;
use serde::Serialize;

/// What the clients do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Workload {
    /// Write a value to a key of the key space.
    Put,
    /// Linearizable read of a key of the (preloaded) key space.
    Get,
    /// Stale (serializable) read from the node the client talks to.
    StaleGet,
    /// `--read-fraction` linearizable reads, the rest writes.
    Mixed,
    /// Take one token of a rate limit (a write through the log).
    Acquire,
    /// `--clients` watchers on one prefix; one writer puts at `--rate`;
    /// latency is from the write being sent to each watcher receiving it.
    Watch,
}

impl Workload {
    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Workload::Put => "put",
            Workload::Get => "get",
            Workload::StaleGet => "stale-get",
            Workload::Mixed => "mixed",
            Workload::Acquire => "acquire",
            Workload::Watch => "watch",
        }
    }

    /// True when the key space must hold every key before the clock starts.
    pub fn needs_preload(self) -> bool {
        matches!(self, Workload::Get | Workload::StaleGet | Workload::Mixed)
    }
}

/// The load options common to every driver.
#[derive(Debug, Clone, Args)]
pub struct LoadArgs {
    /// Workload.
    #[arg(long, value_enum, default_value = "put")]
    pub workload: Workload,
    /// Concurrent clients, each with one request in flight (watchers for `watch`).
    #[arg(long, default_value_t = 1)]
    pub clients: usize,
    /// Connections (HTTP/2 or gRPC), spread over the endpoints; clients share
    /// them round-robin. Default: one per client, at most 100.
    #[arg(long)]
    pub connections: Option<usize>,
    /// Key length in bytes.
    #[arg(long, default_value_t = 8)]
    pub key_size: usize,
    /// Value length in bytes.
    #[arg(long, default_value_t = 256)]
    pub value_size: usize,
    /// Number of distinct keys (written in turn, read at random).
    #[arg(long, default_value_t = 1000)]
    pub keys: u64,
    /// Total operations (all clients together; writes for `watch`).
    #[arg(long, conflicts_with = "duration")]
    pub count: Option<u64>,
    /// Run for this many seconds instead of a count.
    #[arg(long)]
    pub duration: Option<f64>,
    /// Target rate in operations per second, all clients together
    /// (default: as fast as they go; 100 writes/s for `watch`).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Share of reads in `mixed`, 0 to 1.
    #[arg(long, default_value_t = 0.5)]
    pub read_fraction: f64,
    /// Print the report as one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// How long a client waits after a failed operation before its next one.
pub const ERROR_PAUSE: Duration = Duration::from_millis(10);

/// Default count when neither `--count` nor `--duration` is given.
pub const DEFAULT_COUNT: u64 = 10_000;

impl LoadArgs {
    /// Checks the options; call before connecting.
    pub fn validate(&self) -> Result<(), String> {
        if self.clients == 0 {
            return Err("--clients must be at least 1".into());
        }
        if self.keys == 0 {
            return Err("--keys must be at least 1".into());
        }
        if self.key_size < 2 || self.value_size < 2 {
            return Err("--key-size and --value-size must be at least 2".into());
        }
        let digits = self.keys.saturating_sub(1).max(1).ilog10() as usize + 1;
        if self.key_size < digits + 1 {
            return Err(format!(
                "--key-size {} is too short for {} keys",
                self.key_size, self.keys
            ));
        }
        if let Some(r) = self.rate
            && !(r.is_finite() && r > 0.0)
        {
            return Err("--rate must be positive".into());
        }
        if let Some(d) = self.duration
            && !(d.is_finite() && d > 0.0)
        {
            return Err("--duration must be positive".into());
        }
        if !(0.0..=1.0).contains(&self.read_fraction) {
            return Err("--read-fraction must be 0-1".into());
        }
        Ok(())
    }

    /// Connections to open.
    pub fn connections(&self) -> usize {
        self.connections
            .unwrap_or(self.clients.min(100))
            .clamp(1, self.clients.max(1))
    }

    /// The target rate, with the watch workload's default.
    pub fn effective_rate(&self) -> Option<f64> {
        match (self.rate, self.workload) {
            (None, Workload::Watch) => Some(100.0),
            (r, _) => r,
        }
    }

    /// Key number `i` as exactly `key_size` bytes: `k0000042`.
    pub fn key(&self, i: u64) -> String {
        format!("k{:0width$}", i % self.keys, width = self.key_size - 1)
    }

    /// The key operation `seq` touches: writes walk the key space in turn,
    /// reads pick at random (a fixed hash of `seq`).
    pub fn key_for(&self, seq: u64, read: bool) -> String {
        if read {
            self.key(mix(seq) % self.keys)
        } else {
            self.key(seq)
        }
    }

    /// True if operation `seq` of `mixed` is a read.
    pub fn is_read(&self, seq: u64) -> bool {
        match self.workload {
            Workload::Get | Workload::StaleGet => true,
            Workload::Mixed => (mix(seq ^ 0x5eed) % 1_000_000) as f64 / 1_000_000.0 < self.read_fraction,
            _ => false,
        }
    }

    /// A value of exactly `value_size` bytes (`vvvv…`).
    pub fn value(&self) -> String {
        "v".repeat(self.value_size)
    }

    /// A value of `value_size` bytes that carries the wall-clock time in
    /// microseconds, for watch latency: `t=<micros>;` padded with `v`.
    pub fn stamped_value(&self, micros: u64) -> String {
        let mut s = format!("t={micros};");
        while s.len() < self.value_size {
            s.push('v');
        }
        s
    }
}

/// The time stamp [`LoadArgs::stamped_value`] put in a value.
pub fn parse_stamp(value: &str) -> Option<u64> {
    let rest = value.trim_start_matches('"').strip_prefix("t=")?;
    rest.split(';').next()?.parse().ok()
}

/// Wall-clock microseconds since the Unix epoch.
pub fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// splitmix64: a cheap, fixed scramble.
fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Latencies (microseconds), counts and a few error messages.
pub struct Recorder {
    hist: Histogram<u64>,
    /// Successful operations.
    pub ops: u64,
    /// Failed operations.
    pub errors: u64,
    samples: Vec<String>,
}

impl Default for Recorder {
    fn default() -> Self {
        Self::new()
    }
}

impl Recorder {
    /// An empty recorder (1 µs to 1 hour, 3 significant digits).
    pub fn new() -> Self {
        Self {
            hist: Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds"),
            ops: 0,
            errors: 0,
            samples: Vec::new(),
        }
    }

    /// A success that took `d`.
    pub fn record(&mut self, d: Duration) {
        self.record_micros(d.as_micros() as u64);
    }

    /// A success that took `micros`.
    pub fn record_micros(&mut self, micros: u64) {
        self.hist.saturating_record(micros.max(1));
        self.ops += 1;
    }

    /// A failure; the first few distinct messages are kept.
    pub fn error(&mut self, message: impl Into<String>) {
        self.errors += 1;
        let m = message.into();
        if self.samples.len() < 5 && !self.samples.contains(&m) {
            self.samples.push(m);
        }
    }

    /// Adds another recorder's figures to this one.
    pub fn merge(&mut self, other: &Recorder) {
        self.hist.add(&other.hist).expect("same histogram bounds");
        self.ops += other.ops;
        self.errors += other.errors;
        for s in &other.samples {
            if self.samples.len() < 5 && !self.samples.contains(s) {
                self.samples.push(s.clone());
            }
        }
    }
}

/// The end of a watch fan-out run, the same for keel and etcd: waits up to
/// 5 s for `wrec.ops × clients` events to be `delivered`, stops the
/// watchers, and merges their figures; every event that never arrived and
/// every failed write counts as an error.
pub async fn finish_watch(
    wrec: &Recorder,
    clients: usize,
    delivered: &AtomicU64,
    stop: tokio::sync::watch::Sender<bool>,
    watchers: Vec<tokio::task::JoinHandle<Recorder>>,
) -> Recorder {
    let expected = wrec.ops * clients as u64;
    let grace = Instant::now() + Duration::from_secs(5);
    while delivered.load(Ordering::Relaxed) < expected && Instant::now() < grace {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop.send(true);
    let mut rec = Recorder::new();
    for w in watchers {
        if let Ok(r) = w.await {
            rec.merge(&r);
        }
    }
    for _ in rec.ops..expected {
        rec.error("an event never arrived");
    }
    if wrec.errors > 0 {
        rec.error(format!("{} writes failed", wrec.errors));
    }
    rec
}

/// Runs `args.clients` clients until the count or duration is reached.
/// `op(client, seq)` performs operation number `seq` for client `client`
/// and says whether it succeeded. Returns the merged figures and the
/// wall-clock time the run took.
pub async fn run<F, Fut>(args: &LoadArgs, op: F) -> (Recorder, Duration)
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    let op = Arc::new(op);
    let next = Arc::new(AtomicU64::new(0));
    let count = match (args.count, args.duration) {
        (Some(c), _) => Some(c),
        (None, None) => Some(DEFAULT_COUNT),
        (None, Some(_)) => None,
    };
    let start = Instant::now();
    let deadline = args.duration.map(|d| start + Duration::from_secs_f64(d));
    let rate = args.effective_rate();
    let total = Arc::new(Mutex::new(Recorder::new()));
    // Only a paced run needs the pacer's thread.
    let pacer = rate.map(|_| Arc::new(Pacer::start()));
    let mut tasks = Vec::new();
    for client in 0..args.clients {
        let (op, next, total, pacer) = (op.clone(), next.clone(), total.clone(), pacer.clone());
        tasks.push(tokio::spawn(async move {
            let mut rec = Recorder::new();
            loop {
                let seq = next.fetch_add(1, Ordering::Relaxed);
                if count.is_some_and(|c| seq >= c) {
                    break;
                }
                let due = match rate {
                    Some(r) => {
                        let due = start + Duration::from_secs_f64(seq as f64 / r);
                        if deadline.is_some_and(|d| due >= d) {
                            break;
                        }
                        let idle = Instant::now() < due;
                        if let (true, Some(pacer)) = (idle, &pacer) {
                            pacer.sleep_until(due).await;
                        }
                        measured_from(due, idle, Instant::now())
                    }
                    None => {
                        let now = Instant::now();
                        if deadline.is_some_and(|d| now >= d) {
                            break;
                        }
                        now
                    }
                };
                match op(client, seq).await {
                    Ok(()) => rec.record(due.elapsed()),
                    Err(e) => {
                        rec.error(e);
                        // A refused connection (a node killed in a failover
                        // trial) fails at once: do not spin on it.
                        tokio::time::sleep(ERROR_PAUSE).await;
                    }
                }
            }
            total.lock().expect("recorder lock").merge(&rec);
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let elapsed = start.elapsed();
    let rec = std::mem::take(&mut *total.lock().expect("recorder lock"));
    (rec, elapsed)
}

/// Where a rate-limited operation's latency is measured from. A client that
/// was behind schedule when the operation fell due (earlier operations were
/// slow) counts from `due`, so the wait they caused is not omitted. A client
/// that was idle and slept until `due` counts from when it woke: a timer
/// wakes it late, and that lateness is the load generator's, not the
/// server's.
fn measured_from(due: Instant, idle: bool, woke: Instant) -> Instant {
    if idle { woke.max(due) } else { due }
}

/// Wakes paced clients at their due instants, to within the operating
/// system's timer slack (some 50 µs on Linux) rather than tokio's
/// millisecond: a thread of its own sleeps until the earliest instant any
/// client waits for. tokio's timer woke clients up to about 1.5 ms late;
/// a client late by more than its period then fell behind schedule, where
/// the lateness counts as the server's.
struct Pacer {
    shared: Arc<PacerShared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Default)]
struct PacerShared {
    queue: Mutex<PacerQueue>,
}

#[derive(Default)]
struct PacerQueue {
    wakes: std::collections::BinaryHeap<std::cmp::Reverse<Wake>>,
    seq: u64,
    stopped: bool,
}

struct Wake {
    at: Instant,
    seq: u64,
    tx: tokio::sync::oneshot::Sender<()>,
}

impl PartialEq for Wake {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Wake {}
impl PartialOrd for Wake {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Wake {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

impl Pacer {
    fn start() -> Self {
        let shared = Arc::new(PacerShared::default());
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("bench-pacer".into())
            .spawn(move || {
                loop {
                    let mut q = s.queue.lock().expect("pacer lock");
                    if q.stopped {
                        return;
                    }
                    let now = Instant::now();
                    while q.wakes.peek().is_some_and(|w| w.0.at <= now) {
                        let w = q.wakes.pop().expect("peeked").0;
                        let _ = w.tx.send(());
                    }
                    let next = q.wakes.peek().map(|w| w.0.at - now);
                    drop(q);
                    match next {
                        Some(d) => std::thread::park_timeout(d),
                        None => std::thread::park(),
                    }
                }
            })
            .expect("starting the pacer thread");
        Pacer {
            shared,
            thread: Some(thread),
        }
    }

    /// Returns at `at` or soon after.
    async fn sleep_until(&self, at: Instant) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        {
            let mut q = self.shared.queue.lock().expect("pacer lock");
            q.seq += 1;
            let seq = q.seq;
            q.wakes.push(std::cmp::Reverse(Wake { at, seq, tx }));
        }
        if let Some(t) = &self.thread {
            t.thread().unpark();
        }
        // The sender is dropped only by a stopped pacer, after every client.
        let _ = rx.await;
    }
}

impl Drop for Pacer {
    fn drop(&mut self) {
        self.shared.queue.lock().expect("pacer lock").stopped = true;
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Latency {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p99_9: f64,
    /// Slowest.
    pub max: f64,
    /// Mean.
    pub mean: f64,
}

/// The result of one run; `keel bench --json` and `etcd-load --json` print
/// exactly this shape.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// `keel` or `etcd`.
    pub system: String,
    /// The workload's name.
    pub workload: Workload,
    /// Concurrent clients (watchers for `watch`).
    pub clients: usize,
    /// Connections opened.
    pub connections: usize,
    /// Endpoints the connections were spread over.
    pub endpoints: usize,
    /// Key length, bytes.
    pub key_size: usize,
    /// Value length, bytes.
    pub value_size: usize,
    /// Distinct keys.
    pub keys: u64,
    /// Target rate, operations per second (None: unthrottled).
    pub target_rate: Option<f64>,
    /// Successful operations (events delivered for `watch`).
    pub ops: u64,
    /// Failed operations (events missing for `watch`).
    pub errors: u64,
    /// Wall-clock seconds of the measured phase.
    pub elapsed_s: f64,
    /// Successful operations per second.
    pub throughput: f64,
    /// Latency of successful operations.
    pub latency_ms: Latency,
    /// A few distinct error messages.
    pub error_samples: Vec<String>,
}

impl Report {
    /// Builds the report of a run.
    pub fn new(system: &str, args: &LoadArgs, endpoints: usize, rec: &Recorder, elapsed: Duration) -> Self {
        let ms = |q: f64| rec.hist.value_at_quantile(q) as f64 / 1000.0;
        let secs = elapsed.as_secs_f64().max(1e-9);
        Report {
            system: system.to_string(),
            workload: args.workload,
            clients: args.clients,
            connections: args.connections(),
            endpoints,
            key_size: args.key_size,
            value_size: args.value_size,
            keys: args.keys,
            target_rate: args.effective_rate(),
            ops: rec.ops,
            errors: rec.errors,
            elapsed_s: secs,
            throughput: rec.ops as f64 / secs,
            latency_ms: Latency {
                p50: ms(0.5),
                p90: ms(0.9),
                p99: ms(0.99),
                p99_9: ms(0.999),
                max: rec.hist.max() as f64 / 1000.0,
                mean: rec.hist.mean() / 1000.0,
            },
            error_samples: rec.samples.clone(),
        }
    }

    /// Prints the report: one JSON line, or a short human summary.
    pub fn print(&self, json: bool) {
        if json {
            println!("{}", serde_json::to_string(self).expect("a report serializes"));
            return;
        }
        let l = &self.latency_ms;
        println!(
            "{} {}: {} clients, {} connections, {} endpoints, {}-byte keys, {}-byte values",
            self.system,
            self.workload.name(),
            self.clients,
            self.connections,
            self.endpoints,
            self.key_size,
            self.value_size
        );
        println!(
            "  {} ok, {} errors in {:.2} s: {:.0} ops/s",
            self.ops, self.errors, self.elapsed_s, self.throughput
        );
        println!(
            "  latency ms: p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}  mean {:.3}",
            l.p50, l.p90, l.p99, l.p99_9, l.max, l.mean
        );
        for e in &self.error_samples {
            println!("  error: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> LoadArgs {
        LoadArgs {
            workload: Workload::Put,
            clients: 4,
            connections: None,
            key_size: 8,
            value_size: 256,
            keys: 1000,
            count: Some(100),
            duration: None,
            rate: None,
            read_fraction: 0.5,
            json: true,
        }
    }

    #[tokio::test]
    async fn the_pacer_wakes_each_sleeper_at_its_instant_in_order() {
        let pacer = Arc::new(Pacer::start());
        let t0 = Instant::now();
        let woke = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        // Registered out of order; each must return at or after its instant.
        for ms in [30u64, 10, 20, 10] {
            let (pacer, woke) = (pacer.clone(), woke.clone());
            tasks.push(tokio::spawn(async move {
                let at = t0 + Duration::from_millis(ms);
                pacer.sleep_until(at).await;
                assert!(Instant::now() >= at);
                woke.lock().unwrap().push(ms);
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(*woke.lock().unwrap(), vec![10, 10, 20, 30]);
        // An instant already past returns at once.
        pacer.sleep_until(t0).await;
    }

    #[test]
    fn a_timers_lateness_is_not_counted_but_a_slow_servers_wait_is() {
        let due = Instant::now();
        let late = due + Duration::from_millis(2);
        // Idle, woken 2 ms late by the timer: counted from the wake-up.
        assert_eq!(measured_from(due, true, late), late);
        // Behind schedule (the previous operation ran past `due`): the
        // whole wait counts.
        assert_eq!(measured_from(due, false, late), due);
        // The start is never before `due`, whatever the clock read.
        assert_eq!(measured_from(late, true, due), late);
    }

    #[test]
    fn keys_and_values_have_the_requested_sizes() {
        let a = args();
        assert_eq!(a.key(42), "k0000042");
        assert_eq!(a.key_for(5, true).len(), 8);
        assert_eq!(a.value().len(), 256);
        let v = a.stamped_value(1_700_000_000_000_000);
        assert_eq!(v.len(), 256);
        assert_eq!(parse_stamp(&v), Some(1_700_000_000_000_000));
        assert!(a.validate().is_ok());
        let mut b = a.clone();
        b.keys = 100_000_000;
        assert!(b.validate().is_err(), "8-byte keys cannot number 10^8");
    }

    #[tokio::test]
    async fn run_counts_every_operation_once() {
        let a = args();
        let (rec, _) = run(&a, |_, seq| async move {
            if seq % 10 == 0 {
                Err("every tenth fails".to_string())
            } else {
                Ok(())
            }
        })
        .await;
        assert_eq!(rec.ops, 90);
        assert_eq!(rec.errors, 10);
        let r = Report::new("test", &a, 1, &rec, Duration::from_secs(1));
        let v: serde_json::Value = serde_json::to_value(&r).unwrap();
        assert_eq!(v["workload"], "put");
        assert_eq!(v["error_samples"][0], "every tenth fails");
    }
}
