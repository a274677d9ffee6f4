//! Recorded clients and the checks run after a fault scenario.
//!
//! Each client works on its own node (as a gateway replica would), with a
//! short per-request timeout, until told to stop or its operation budget is
//! spent. Every operation is recorded with its invocation and return time;
//! a write with no definite answer is recorded as unknown. After the faults
//! heal, [`Workload::finish`] checks:
//! - every register key's history is linearizable ([`super::lin`]);
//! - every acknowledged write of a unique ledger key is on every node;
//! - the rate limit granted no more tokens than it held, counting
//!   unanswered acquires as possibly granted;
//! - all nodes hold the same state hash at the same applied index;
//! - no term had two leaders (from every node's role-change log lines);
//! - service came back within [`RECOVERY_BOUND`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::time::Duration;
use std::time::Instant;

use serde_json::Value;
use serde_json::json;

use super::lin;
use super::lin::Op;
use super::lin::RegIn;
use super::lin::RegOut;
use crate::common::TestCluster;
use crate::common::strip_ansi;

/// After the last fault heals, a leader must be in place and every node must
/// take a write within this bound (30 election timeouts of the test
/// clusters' 1 s minimum: generous, for a busy 2-core machine; the measured
/// time is printed).
pub const RECOVERY_BOUND: Duration = Duration::from_secs(30);
/// The error of a request that never left the client.
const NOT_SENT: &str = "not sent: could not connect";
/// Per-request timeout of the recorded clients.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(4);
/// Register keys under test.
const KEYS: u64 = 4;
/// Tokens in the rate-limit bucket (no refill).
const BUCKET: u64 = 150;
/// Search bound of the checker per key.
const MAX_STEPS: u64 = 20_000_000;

#[derive(Default)]
struct Record {
    registers: BTreeMap<u64, Vec<Op<RegIn, RegOut>>>,
    ledger_acked: Vec<String>,
    ledger_unknown: usize,
    grants: u64,
    denials: u64,
    acquires_unknown: u64,
    errors: Vec<String>,
    /// Why outcomes were unknown: reason → count.
    unknown_why: BTreeMap<String, usize>,
}

impl Record {
    fn unknown(&mut self, r: &Result<(u16, Value), String>) {
        let why = match r {
            Ok((st, b)) => format!("{st} {}", b["error"]["code"].as_str().unwrap_or("")),
            Err(e) if e.contains("timed out") => "timeout".to_string(),
            Err(e) => e.chars().take(60).collect(),
        };
        *self.unknown_why.entry(why).or_default() += 1;
    }
}

pub struct Workload {
    epoch: Instant,
    record: Arc<Mutex<Record>>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    next_value: Arc<AtomicU64>,
    pub name: String,
    pub faults: usize,
}

#[derive(Debug)]
pub struct Outcome {
    pub ops_checked: usize,
    pub verdicts: BTreeMap<u64, lin::Verdict>,
    pub lost: usize,
    pub overgranted: bool,
}

impl Outcome {
    pub fn linearizable(&self) -> bool {
        self.verdicts.values().all(|v| *v == lin::Verdict::Ok)
    }
}

fn micros(epoch: Instant) -> u64 {
    epoch.elapsed().as_micros() as u64
}

/// A client for one node, with the suite's short timeout.
async fn call(
    c: &TestCluster,
    node: u64,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
    if_match: Option<u64>,
) -> Result<(u16, Value), String> {
    let mut req = c.client.request(method, c.url(node, path)).timeout(REQUEST_TIMEOUT);
    if let Some(b) = body {
        req = req.json(&b);
    }
    if let Some(r) = if_match {
        req = req.header("If-Match", r.to_string());
    }
    // A connection that could not be made carried no request: the
    // operation certainly did not happen (callers drop it).
    let r = req.send().await.map_err(|e| {
        if e.is_connect() {
            NOT_SENT.to_string()
        } else {
            e.to_string()
        }
    })?;
    let status = r.status().as_u16();
    let text = r.text().await.map_err(|e| e.to_string())?;
    Ok((status, serde_json::from_str(&text).unwrap_or(Value::Null)))
}

impl Workload {
    /// Creates the rate limit, then starts `clients` register/ledger clients
    /// and one acquiring client per node, spread over `nodes`.
    pub async fn start(c: &Arc<TestCluster>, name: &str, nodes: &[u64], clients: usize) -> Workload {
        let leader = c.wait_leader().await;
        let (st, b) = call(
            c,
            leader,
            reqwest::Method::PUT,
            "/v1/ratelimits/fault-bucket",
            Some(json!({"kind": "token_bucket", "capacity": BUCKET, "refill_per_sec": 0})),
            None,
        )
        .await
        .expect("create the rate limit");
        assert!(st == 200 || st == 201, "create the rate limit: {st} {b}");
        let w = Workload {
            epoch: Instant::now(),
            record: Arc::new(Mutex::new(Record::default())),
            stop: Arc::new(AtomicBool::new(false)),
            tasks: Vec::new(),
            next_value: Arc::new(AtomicU64::new(1)),
            name: name.to_string(),
            faults: 0,
        };
        let mut w = w;
        for i in 0..clients {
            let node = nodes[i % nodes.len()];
            w.tasks.push(tokio::spawn(register_client(
                c.clone(),
                i,
                node,
                w.epoch,
                w.record.clone(),
                w.stop.clone(),
                w.next_value.clone(),
            )));
        }
        for (i, &node) in nodes.iter().enumerate() {
            w.tasks.push(tokio::spawn(acquire_client(
                c.clone(),
                1000 + i,
                node,
                w.record.clone(),
                w.stop.clone(),
            )));
        }
        w
    }

    fn register_ops(&self) -> usize {
        self.record.lock().unwrap().registers.values().map(Vec::len).sum()
    }

    /// Counts a fault injected (for the report).
    pub fn fault(&mut self, what: &str) {
        self.faults += 1;
        eprintln!("[{}] fault {}: {what}", self.name, self.faults);
    }

    /// Stops the clients, waits for service to return, and runs every check.
    pub async fn finish(mut self, c: &TestCluster) -> Outcome {
        // Liveness first, while the clients still run: a leader, and every
        // running node takes a write.
        let healed = Instant::now();
        let ids = c.running();
        let mut probe = 0u64;
        loop {
            let mut ok = true;
            for &id in &ids {
                probe += 1;
                let r = call(
                    c,
                    id,
                    reqwest::Method::PUT,
                    &format!("/v1/kv/probe/{}-{probe}", self.name),
                    Some(json!(probe)),
                    None,
                )
                .await;
                ok &= matches!(r, Ok((200 | 201, _)));
            }
            if ok {
                break;
            }
            assert!(
                healed.elapsed() < RECOVERY_BOUND,
                "[{}] service did not return within {RECOVERY_BOUND:?} of the heal",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let recovered = healed.elapsed();
        // Let the clients run a little on the healed cluster, so each key's
        // history ends with reads that must see the latest writes.
        let until = self.register_ops() + 40;
        let t = Instant::now();
        while self.register_ops() < until && t.elapsed() < Duration::from_secs(20) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.stop.store(true, Ordering::SeqCst);
        for t in std::mem::take(&mut self.tasks) {
            let _ = tokio::time::timeout(Duration::from_secs(30), t).await;
        }
        let rec = std::mem::take(&mut *self.record.lock().unwrap());
        assert!(
            rec.errors.is_empty(),
            "[{}] unexpected replies: {:?}",
            self.name,
            rec.errors
        );

        // Linearizability per key.
        let mut verdicts = BTreeMap::new();
        let mut ops_checked = 0;
        for (key, ops) in &rec.registers {
            ops_checked += ops.len();
            let t = Instant::now();
            let v = lin::check(&lin::Register, ops, MAX_STEPS);
            let clients: std::collections::BTreeSet<usize> = ops.iter().map(|o| o.client).collect();
            eprintln!(
                "[{}] key {key}: {} operations from {} clients ({} unknown), {v:?} in {:.2} s",
                self.name,
                ops.len(),
                clients.len(),
                ops.iter().filter(|o| o.ret.is_none()).count(),
                t.elapsed().as_secs_f64()
            );
            verdicts.insert(*key, v);
        }

        // Convergence and lost writes.
        let leader = c.wait_leader().await;
        let target = c.status(leader).await.map(|s| s.applied_index).unwrap_or(0);
        c.wait_applied(&ids, target).await;
        c.assert_converged(&ids).await;
        let mut lost = 0;
        for &id in &ids {
            let have = c.list(id, "ledger/", true).await;
            let missing: Vec<&String> = rec
                .ledger_acked
                .iter()
                .filter(|k| !have.contains_key(k.trim_start_matches("kv/")))
                .collect();
            if !missing.is_empty() {
                eprintln!("[{}] node {id} lacks acknowledged writes: {missing:?}", self.name);
            }
            lost += missing.len();
        }

        // The rate limit: grants never exceed the bucket.
        let (st, rl) = call(
            c,
            leader,
            reqwest::Method::GET,
            "/v1/ratelimits/fault-bucket",
            None,
            None,
        )
        .await
        .expect("read the rate limit");
        assert_eq!(st, 200, "{rl}");
        let left = rl["value"]["buckets"][""]["level_milli"].as_u64().unwrap_or(0) / 1000;
        let spent = BUCKET - left;
        let overgranted = !(rec.grants <= spent && spent <= rec.grants + rec.acquires_unknown);

        // One leader per term, from the nodes' own logs.
        let leaders = leaders_by_term(c);
        let doubled: Vec<_> = leaders.iter().filter(|(_, ids)| ids.len() > 1).collect();
        assert!(
            doubled.is_empty(),
            "[{}] terms with two leaders: {doubled:?}",
            self.name
        );

        let out = Outcome {
            ops_checked,
            verdicts,
            lost,
            overgranted,
        };
        let line = format!(
            "[{}] RESULT: {} register operations checked over {} keys, {} ledger writes acknowledged \
             ({} unknown), {} faults injected, {} acknowledged writes lost, rate limit: {} granted + {} unknown \
             vs {} spent of {BUCKET} ({}), leaders by term {:?}, service back {:.1} s after the heal; verdict: {}",
            self.name,
            out.ops_checked,
            out.verdicts.len(),
            rec.ledger_acked.len(),
            rec.ledger_unknown,
            self.faults,
            out.lost,
            rec.grants,
            rec.acquires_unknown,
            spent,
            if out.overgranted { "VIOLATED" } else { "ok" },
            leaders,
            recovered.as_secs_f64(),
            if out.linearizable() && out.lost == 0 && !out.overgranted {
                "linearizable".to_string()
            } else {
                format!("NOT LINEARIZABLE: {:?}", out.verdicts)
            }
        );
        eprintln!("{line}");
        eprintln!("[{}] unknown outcomes by cause: {:?}", self.name, rec.unknown_why);
        super::report(&line);
        out
    }
}

/// Asserts the outcome is clean (the normal scenarios).
pub fn assert_clean(name: &str, o: &Outcome) {
    assert!(
        o.ops_checked > 50,
        "[{name}] too few operations to check: {}",
        o.ops_checked
    );
    assert!(o.linearizable(), "[{name}] not linearizable: {:?}", o.verdicts);
    assert_eq!(o.lost, 0, "[{name}] acknowledged writes lost");
    assert!(!o.overgranted, "[{name}] the rate limit granted more than it held");
}

/// (term → nodes that logged becoming leader in it), from every node's log.
pub fn leaders_by_term(c: &TestCluster) -> BTreeMap<u64, std::collections::BTreeSet<u64>> {
    let mut out: BTreeMap<u64, std::collections::BTreeSet<u64>> = BTreeMap::new();
    for (&id, p) in &c.nodes {
        let text = std::fs::read_to_string(p.log()).unwrap_or_default();
        for line in text.lines() {
            let line = strip_ansi(line);
            if std::env::var_os("KEEL_FAULT_DEBUG").is_some() && line.contains("role changed") {
                eprintln!("node {id}: {line}");
            }
            if !line.contains("role changed") || !line.contains("to=\"leader\"") {
                continue;
            }
            if let Some(term) = line
                .split("term=")
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
                .and_then(|t| t.parse::<u64>().ok())
            {
                out.entry(term).or_default().insert(id);
            }
        }
    }
    out
}

/// A small deterministic generator per client (no shared RNG state).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

async fn register_client(
    c: Arc<TestCluster>,
    client: usize,
    node: u64,
    epoch: Instant,
    record: Arc<Mutex<Record>>,
    stop: Arc<AtomicBool>,
    next_value: Arc<AtomicU64>,
) {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (client as u64 + 1).wrapping_mul(0x2545_F491_4F6C_DD1D));
    // What this client last read per key: (value, revision).
    let mut seen: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
    let started = Instant::now();
    let mut ledger = 0u64;
    let mut backoff = false;
    // Bounded: stops when told, or after 3,000 operations or 10 minutes.
    for _ in 0..3_000 {
        if stop.load(Ordering::SeqCst) || started.elapsed() > Duration::from_secs(600) {
            break;
        }
        if backoff {
            // The node is down or unreachable: do not spin.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let key = rng.next() % KEYS;
        let path = format!("/v1/kv/reg/{key}");
        let dice = rng.next() % 10;
        let call_t = micros(epoch);
        if dice < 4 {
            // Linearizable read; a failed read has no effect and is dropped.
            let r = call(&c, node, reqwest::Method::GET, &path, None, None).await;
            backoff = r.is_err() || r.as_ref().is_ok_and(|(st, _)| *st >= 500);
            if let Ok((st, b)) = r {
                let out = match st {
                    200 => {
                        let v = b["value"]["w"].as_u64();
                        let rev = b["revision"].as_u64();
                        if let (Some(v), Some(rev)) = (v, rev) {
                            seen.insert(key, (v, rev));
                        }
                        Some(RegOut::Value(v))
                    }
                    404 => Some(RegOut::Value(None)),
                    _ => None,
                };
                if let Some(o) = out {
                    push(&record, key, client, call_t, Some(micros(epoch)), RegIn::Read, o);
                }
            }
        } else if dice < 7 || !seen.contains_key(&key) {
            let v = next_value.fetch_add(1, Ordering::SeqCst);
            let r = call(&c, node, reqwest::Method::PUT, &path, Some(json!({"w": v})), None).await;
            backoff = r.is_err() || r.as_ref().is_ok_and(|(st, _)| *st >= 500);
            match r {
                Err(e) if e == NOT_SENT => {}
                Ok((200 | 201, _)) => push(
                    &record,
                    key,
                    client,
                    call_t,
                    Some(micros(epoch)),
                    RegIn::Write(v),
                    RegOut::Ok,
                ),
                Ok((st, b)) if st < 500 && st != 408 && st != 429 => {
                    record.lock().unwrap().errors.push(format!("PUT {path}: {st} {b}"));
                }
                _ => {
                    record.lock().unwrap().unknown(&r);
                    push(&record, key, client, call_t, None, RegIn::Write(v), RegOut::Unknown)
                }
            }
        } else {
            let (expect, rev) = seen[&key];
            let new = next_value.fetch_add(1, Ordering::SeqCst);
            let r = call(
                &c,
                node,
                reqwest::Method::PUT,
                &path,
                Some(json!({"w": new})),
                Some(rev),
            )
            .await;
            backoff = r.is_err() || r.as_ref().is_ok_and(|(st, _)| *st >= 500);
            let input = RegIn::Cas { expect, new };
            match r {
                Err(e) if e == NOT_SENT => {}
                Ok((200 | 201, _)) => push(&record, key, client, call_t, Some(micros(epoch)), input, RegOut::Ok),
                Ok((409 | 412, _)) => push(
                    &record,
                    key,
                    client,
                    call_t,
                    Some(micros(epoch)),
                    input,
                    RegOut::Conflict,
                ),
                Ok((st, b)) if st < 500 && st != 408 && st != 429 => {
                    record.lock().unwrap().errors.push(format!("CAS {path}: {st} {b}"));
                }
                _ => {
                    record.lock().unwrap().unknown(&r);
                    push(&record, key, client, call_t, None, input, RegOut::Unknown)
                }
            }
            seen.remove(&key);
        }
        // Every few operations, a write of a unique key: the ledger that
        // must survive in full.
        if rng.next().is_multiple_of(4) {
            ledger += 1;
            let k = format!("ledger/{client}-{ledger}");
            match call(
                &c,
                node,
                reqwest::Method::PUT,
                &format!("/v1/kv/{k}"),
                Some(json!(ledger)),
                None,
            )
            .await
            {
                Ok((200 | 201, _)) => record.lock().unwrap().ledger_acked.push(k),
                Err(e) if e == NOT_SENT => backoff = true,
                _ => {
                    backoff = true;
                    record.lock().unwrap().ledger_unknown += 1
                }
            }
        }
    }
}

fn push(record: &Mutex<Record>, key: u64, client: usize, call: u64, ret: Option<u64>, input: RegIn, output: RegOut) {
    record.lock().unwrap().registers.entry(key).or_default().push(Op {
        client,
        call,
        ret,
        input,
        output,
    });
}

async fn acquire_client(
    c: Arc<TestCluster>,
    _client: usize,
    node: u64,
    record: Arc<Mutex<Record>>,
    stop: Arc<AtomicBool>,
) {
    let started = Instant::now();
    for _ in 0..2_000 {
        if stop.load(Ordering::SeqCst) || started.elapsed() > Duration::from_secs(600) {
            break;
        }
        let r = call(
            &c,
            node,
            reqwest::Method::POST,
            "/v1/ratelimits/fault-bucket/acquire",
            Some(json!({"tokens": 1})),
            None,
        )
        .await;
        {
            let mut rec = record.lock().unwrap();
            match r {
                Err(e) if e == NOT_SENT => {}
                Ok((200, _)) => rec.grants += 1,
                Ok((429, _)) => rec.denials += 1,
                Ok((st, b)) if st < 500 && st != 408 => rec.errors.push(format!("acquire: {st} {b}")),
                _ => rec.acquires_unknown += 1,
            }
        }
        // Spread the bucket over the scenario.
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
}
