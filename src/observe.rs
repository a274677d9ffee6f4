//! Watching the node from the inside: the sampler that turns openraft's
//! metrics channel into Prometheus gauges and log lines (leader changes,
//! elections, membership changes, snapshots), and the readiness rules that
//! `/readyz` and `/ha/*` share.
//!
//! Readiness. A node is ready when it is not shutting down, is a voter,
//! knows a leader, has *recently heard from it* and has applied close to
//! the commit index. "Knows a leader" alone is not enough: openraft keeps a
//! follower's last leader in its vote until a new election succeeds, and
//! with pre-vote a node cut off in a minority never starts one, so it would
//! name its old leader forever. Contact is therefore measured: on the
//! leader, the time since a quorum last acknowledged it
//! (`last_quorum_acked`); on a follower, the time since it last accepted an
//! append or heartbeat from the leader (every accepted append renews the
//! vote's lease, `RaftState::vote_last_modified`).

use std::collections::BTreeMap;
use std::collections::VecDeque;
use std::time::Duration;
use std::time::Instant;

use keel_raft::TypeConfig;
use openraft::Instant as _;
use openraft::ServerState;
use openraft::type_config::async_runtime::watch::WatchReceiver;
use prometheus_client::metrics::gauge::Gauge;
use tracing::Instrument;

use crate::cluster::Cluster;
use crate::cluster::role_name;
use crate::metrics;
use crate::metrics::InfoLabels;
use crate::metrics::KindLabel;
use crate::metrics::PeerLabel;
use crate::metrics::RoleLabel;

/// openraft's metrics of keel's type configuration.
pub type RaftMetrics = openraft::RaftMetrics<TypeConfig>;

/// A node whose applied index trails the cluster's commit index by more
/// than this many entries is not ready (it is catching up).
pub const MAX_APPLY_LAG: u64 = 1_000;

/// How often gauges that do not change with Raft events (contact ages,
/// lag in seconds, readiness) are refreshed.
const TICK: Duration = Duration::from_millis(500);
/// Index-only metrics changes are sampled at most this often: the entry
/// clock's own resolution, so replication lag in seconds loses nothing.
const SAMPLE_EVERY: Duration = EntryClock::MERGE;
/// How often the state sizes are counted (a scan of the state).
const COUNT_EVERY: Duration = Duration::from_secs(10);

/// Contact older than this means the node is cut off: twice the longest
/// election timeout (a healthy leader heartbeats many times within it).
pub fn contact_threshold(raft: &keel_raft::Raft) -> Duration {
    let c = raft.config();
    Duration::from_millis((2 * c.election_timeout_max).max(3 * c.heartbeat_interval))
}

/// Contact older than this makes a peer SUSPECTED in `/ha/status`.
pub fn suspect_threshold(raft: &keel_raft::Raft) -> Duration {
    Duration::from_millis(raft.config().election_timeout_min)
}

/// How long ago this node last had contact with a working leader: the
/// leader's last quorum acknowledgement, or a follower's last accepted
/// append. `None`: no contact yet (or the Raft core did not answer).
pub async fn leader_contact_age(cluster: &Cluster, m: &RaftMetrics) -> Option<Duration> {
    if m.state == ServerState::Leader {
        let voters: Vec<u64> = m.membership_config.membership().voter_ids().collect();
        if voters == [cluster.node_id()] {
            return Some(Duration::ZERO);
        }
        return m.last_quorum_acked.as_ref().map(|t| t.elapsed());
    }
    m.current_leader?;
    let ask = cluster
        .raft()
        .with_raft_state(|st| st.vote_last_modified().map(|t| t.elapsed()));
    match tokio::time::timeout(Duration::from_secs(1), ask).await {
        Ok(Ok(age)) => age,
        _ => None,
    }
}

/// What readiness found.
#[derive(Debug, Clone)]
pub struct Readiness {
    /// `None` when ready, otherwise why not.
    pub not_ready: Option<String>,
    /// Contact age with the leader (see [`leader_contact_age`]).
    pub contact_age: Option<Duration>,
}

/// Evaluates readiness from a metrics snapshot.
pub async fn readiness_of(cluster: &Cluster, m: &RaftMetrics) -> Readiness {
    let contact_age = leader_contact_age(cluster, m).await;
    let threshold = contact_threshold(cluster.raft());
    let applied = m.last_applied.as_ref().map(|l| l.index).unwrap_or(0);
    let committed = m
        .cluster_committed
        .as_ref()
        .or(m.local_committed.as_ref())
        .map(|l| l.index)
        .unwrap_or(0);
    let not_ready = if cluster.is_stopping() {
        Some("shutting down".to_string())
    } else if m.state == ServerState::Learner {
        Some("learner".to_string())
    } else if m.state == ServerState::Shutdown {
        Some("raft stopped".to_string())
    } else if m.current_leader.is_none() {
        Some("no leader".to_string())
    } else if contact_age.is_none() {
        Some(if m.state == ServerState::Leader {
            "leader not yet acknowledged by a quorum".to_string()
        } else {
            "no contact with the leader yet".to_string()
        })
    } else if let Some(age) = contact_age.filter(|a| *a > threshold) {
        Some(if m.state == ServerState::Leader {
            format!(
                "no quorum acknowledgement for {} ms (limit {} ms): cut off from a majority",
                age.as_millis(),
                threshold.as_millis()
            )
        } else {
            format!(
                "no contact with leader {} for {} ms (limit {} ms)",
                m.current_leader.unwrap_or(0),
                age.as_millis(),
                threshold.as_millis()
            )
        })
    } else if committed.saturating_sub(applied) > MAX_APPLY_LAG {
        Some(format!(
            "catching up: applied index {applied} is {} entries behind commit index {committed} (limit {MAX_APPLY_LAG})",
            committed - applied
        ))
    } else {
        None
    };
    Readiness { not_ready, contact_age }
}

/// Evaluates readiness now.
pub async fn readiness(cluster: &Cluster) -> Readiness {
    let m = cluster.raft().metrics().borrow_watched().clone();
    readiness_of(cluster, &m).await
}

/// Number of log entries up to `index` (indexes start at 0).
fn count(index: Option<u64>) -> u64 {
    index.map(|i| i + 1).unwrap_or(0)
}

/// Remembers when the leader first saw each stretch of its log, so the age
/// of the oldest entry a follower lacks can be told in seconds.
///
/// A record `(index, t)` says that entries after the previous record's
/// index, up to `index`, were first seen at about `t`. Records closer than
/// [`EntryClock::MERGE`] are merged (ages err by at most that much on the
/// high side) and, past [`EntryClock::CAP`] records, neighbours are merged
/// pairwise, so memory stays bounded while a follower is down for long.
/// Entries older than this node's leadership count from its first record:
/// for them the age is a lower bound.
#[derive(Debug, Default)]
pub struct EntryClock {
    records: VecDeque<(u64, Instant)>,
}

impl EntryClock {
    /// Records closer in time than this are merged.
    pub const MERGE: Duration = Duration::from_millis(10);
    /// Most records kept.
    pub const CAP: usize = 4096;

    /// Notes that the log reaches `last_index` at `now`.
    pub fn observe(&mut self, last_index: u64, now: Instant) {
        match self.records.back_mut() {
            Some((i, _)) if *i >= last_index => {}
            Some((i, t)) if now.saturating_duration_since(*t) < Self::MERGE => *i = last_index,
            _ => self.records.push_back((last_index, now)),
        }
        if self.records.len() > Self::CAP {
            let old = std::mem::take(&mut self.records);
            let mut it = old.into_iter();
            while let Some((i1, t)) = it.next() {
                // The pair keeps the later index and the earlier time.
                let i = it.next().map(|(i2, _)| i2).unwrap_or(i1);
                self.records.push_back((i, t));
            }
        }
    }

    /// Forgets records every peer has matched.
    pub fn prune(&mut self, matched_by_all: u64) {
        while self.records.len() > 1 && self.records.front().is_some_and(|(i, _)| *i <= matched_by_all) {
            self.records.pop_front();
        }
    }

    /// Age at `now` of the first entry after `matched` (`None` for nothing
    /// matched), or zero if the peer has everything recorded.
    pub fn lag(&self, matched: Option<u64>, now: Instant) -> Duration {
        let want = count(matched); // index of the first missing entry
        self.records
            .iter()
            .find(|(i, _)| *i >= want)
            .map(|(_, t)| now.saturating_duration_since(*t))
            .unwrap_or(Duration::ZERO)
    }

    /// Forgets everything (leadership lost).
    pub fn reset(&mut self) {
        self.records.clear();
    }

    /// Number of records (for tests).
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// True when nothing is recorded.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
}

/// The gauges that are plain numbers from the metrics (term, leader,
/// indexes): cheap enough to set on every change, so they are never stale.
fn set_indexes(m: &RaftMetrics) {
    let g = metrics::get();
    g.raft_term.set(m.current_term as i64);
    g.raft_leader_id.set(m.current_leader.unwrap_or(0) as i64);
    g.raft_last_log_index.set(m.last_log_index.unwrap_or(0) as i64);
    g.raft_commit_index
        .set(m.local_committed.as_ref().map(|l| l.index).unwrap_or(0) as i64);
    g.raft_last_applied_index
        .set(m.last_applied.as_ref().map(|l| l.index).unwrap_or(0) as i64);
    g.raft_snapshot_index
        .set(m.snapshot.as_ref().map(|l| l.index).unwrap_or(0) as i64);
}

/// What the sampler remembers between samples.
#[derive(Default)]
struct Sampler {
    role: Option<ServerState>,
    leadership: Option<(u64, u64)>,
    membership: Option<Option<keel_storage::types::LogId>>,
    snapshot: Option<u64>,
    clock: EntryClock,
    /// The `raft_role` series, one per role, looked up once.
    roles: Vec<(&'static str, Gauge)>,
    /// Each replicated peer's series, looked up when the peer first appears
    /// and removed with it: a sample then only stores numbers.
    peers: BTreeMap<u64, PeerGauges>,
}

/// One peer's replication series (handles share the registered values).
struct PeerGauges {
    label: PeerLabel,
    lag_entries: Gauge,
    lag_seconds: metrics::FGauge,
    /// Absent while openraft reports no acknowledgement from the peer.
    ack_age: Option<metrics::FGauge>,
}

impl PeerGauges {
    fn new(peer: u64) -> Self {
        let g = metrics::get();
        let label = PeerLabel { peer: peer.to_string() };
        Self {
            lag_entries: g.raft_replication_lag_entries.get_or_create(&label).clone(),
            lag_seconds: g.raft_replication_lag_seconds.get_or_create(&label).clone(),
            ack_age: None,
            label,
        }
    }

    /// Sets the age of the peer's last acknowledgement, or removes the series.
    fn set_ack_age(&mut self, age: Option<f64>) {
        let family = &metrics::get().raft_peer_last_ack_age;
        match age {
            Some(a) => {
                self.ack_age
                    .get_or_insert_with(|| family.get_or_create(&self.label).clone())
                    .set(a);
            }
            None => {
                if self.ack_age.take().is_some() {
                    family.remove(&self.label);
                }
            }
        }
    }

    /// Removes every series of the peer.
    fn remove(&self) {
        let g = metrics::get();
        g.raft_replication_lag_entries.remove(&self.label);
        g.raft_replication_lag_seconds.remove(&self.label);
        g.raft_peer_last_ack_age.remove(&self.label);
    }
}

impl Sampler {
    /// True when `m` changes something the sampler logs: role, leadership,
    /// membership or snapshot. Such a change is never deferred.
    fn news(&self, m: &RaftMetrics) -> bool {
        self.role != Some(m.state)
            || m.current_leader
                .is_some_and(|l| self.leadership != Some((m.current_term, l)))
            || self.membership.as_ref() != Some(m.membership_config.log_id())
            || self.snapshot != m.snapshot.as_ref().map(|l| l.index)
    }

    /// Applies one metrics snapshot to the gauges and logs what changed.
    fn on_metrics(&mut self, me: u64, m: &RaftMetrics, now: Instant) {
        let g = metrics::get();
        if self.roles.is_empty() {
            self.roles = metrics::ROLES
                .iter()
                .map(|&role| (role, g.raft_role.get_or_create(&RoleLabel { role }).clone()))
                .collect();
        }
        let current = role_name(m.state);
        for (role, gauge) in &self.roles {
            gauge.set(i64::from(current == *role));
        }
        set_indexes(m);
        let membership = m.membership_config.membership();
        g.raft_voters.set(membership.voter_ids().count() as i64);
        g.raft_learners.set(membership.learner_ids().count() as i64);

        if self.role != Some(m.state) {
            tracing::info!(
                term = m.current_term,
                leader = m.current_leader.unwrap_or(0),
                from = self.role.map(role_name).unwrap_or("starting"),
                to = role_name(m.state),
                "role changed"
            );
            self.role = Some(m.state);
        }
        if let Some(leader) = m.current_leader {
            let key = (m.current_term, leader);
            if self.leadership != Some(key) {
                g.raft_leader_changes.inc();
                tracing::info!(
                    term = m.current_term,
                    leader,
                    previous = self.leadership.map(|(_, l)| l).unwrap_or(0),
                    "leader changed"
                );
                self.leadership = Some(key);
            }
        }
        let mem = *m.membership_config.log_id();
        if self.membership.as_ref() != Some(&mem) {
            let voters: Vec<u64> = membership.voter_ids().collect();
            let learners: Vec<u64> = membership.learner_ids().collect();
            tracing::info!(
                term = m.current_term,
                leader = m.current_leader.unwrap_or(0),
                log_index = m.membership_config.log_id().as_ref().map(|l| l.index),
                ?voters,
                ?learners,
                joint = membership.get_joint_config().len() > 1,
                "membership changed"
            );
            self.membership = Some(mem);
        }
        let snap = m.snapshot.as_ref().map(|l| l.index);
        if snap.is_some() && snap != self.snapshot {
            tracing::info!(
                term = m.current_term,
                snapshot_index = snap,
                purged_index = m.purged.as_ref().map(|l| l.index),
                "snapshot in place"
            );
        }
        self.snapshot = snap;

        // Replication: leader only.
        let mut seen = Vec::new();
        if let (ServerState::Leader, Some(repl)) = (m.state, m.replication.as_ref()) {
            let last = m.last_log_index;
            if let Some(l) = last {
                self.clock.observe(l, now);
            }
            let mut min_matched: Option<u64> = last;
            for (peer, matched) in repl.iter().filter(|(id, _)| **id != me) {
                let mi = matched.as_ref().map(|l| l.index);
                let gauges = self.peers.entry(*peer).or_insert_with(|| PeerGauges::new(*peer));
                gauges.lag_entries.set(count(last).saturating_sub(count(mi)) as i64);
                gauges.lag_seconds.set(self.clock.lag(mi, now).as_secs_f64());
                let ack = m
                    .heartbeat
                    .as_ref()
                    .and_then(|h| h.get(peer).cloned().flatten())
                    .map(|t| t.elapsed().as_secs_f64());
                gauges.set_ack_age(ack);
                min_matched = match (min_matched, mi) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    _ => None,
                };
                seen.push(*peer);
            }
            if let Some(mm) = min_matched {
                self.clock.prune(mm);
            }
        } else {
            self.clock.reset();
        }
        self.peers.retain(|peer, gauges| {
            let replicated = seen.contains(peer);
            if !replicated {
                gauges.remove();
            }
            replicated
        });
    }
}

/// Starts the background task that samples this node into the gauges.
pub fn spawn(cluster: Cluster, cluster_name: &str) -> tokio::task::JoinHandle<()> {
    let me = cluster.node_id();
    metrics::set_node_id(me);
    metrics::get()
        .node_info
        .get_or_create(&InfoLabels {
            node_id: me.to_string(),
            cluster: cluster_name.to_string(),
            version: env!("CARGO_PKG_VERSION"),
        })
        .set(1);
    for kind in metrics::STATE_KINDS {
        metrics::get()
            .state_objects
            .get_or_create(&KindLabel { kind: kind.to_string() })
            .set(0);
    }
    tokio::spawn(run(cluster).instrument(tracing::info_span!("observe", node_id = me)))
}

async fn run(cluster: Cluster) {
    let me = cluster.node_id();
    let mut rx = cluster.raft().metrics();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_count: Option<Instant> = None;
    let mut sampler = Sampler::default();
    // openraft publishes metrics on every commit and apply, thousands of
    // times a second under load. The index gauges follow every change; the
    // rest (roles, per-peer lag) is sampled at most every SAMPLE_EVERY when
    // nothing but indexes moved (the last change always, once it is due).
    let mut sampled: Option<Instant> = None;
    let mut deferred = false;
    loop {
        let due = sampled.map_or_else(Instant::now, |t| t + SAMPLE_EVERY);
        let (timer, catch_up) = tokio::select! {
            r = rx.changed() => {
                if r.is_err() {
                    return; // Raft stopped.
                }
                (false, false)
            }
            _ = tick.tick() => (true, false),
            _ = tokio::time::sleep_until(due.into()), if deferred => (false, true),
        };
        let now = Instant::now();
        let m = {
            let current = rx.borrow_watched();
            set_indexes(&current);
            if !timer && !catch_up && !sampler.news(&current) && sampled.is_some_and(|t| now < t + SAMPLE_EVERY) {
                deferred = true;
                continue;
            }
            deferred = false;
            sampled = Some(now);
            sampler.on_metrics(me, &current, now);
            if !timer {
                continue;
            }
            // Only the readiness check below, which awaits, needs a copy.
            current.clone()
        };
        let g = metrics::get();
        let r = readiness_of(&cluster, &m).await;
        g.raft_leader_contact_age
            .set(r.contact_age.map(|a| a.as_secs_f64()).unwrap_or(0.0));
        let fresh = r.contact_age.is_some_and(|a| a <= contact_threshold(cluster.raft()));
        g.raft_has_leader.set(i64::from(m.current_leader.is_some() && fresh));
        g.ready.set(i64::from(r.not_ready.is_none()));
        if last_count.is_none_or(|t| t.elapsed() >= COUNT_EVERY) {
            last_count = Some(Instant::now());
            let reader = cluster.reader().clone();
            if let Ok(Ok(counts)) = tokio::task::spawn_blocking(move || reader.counts()).await {
                set_counts(&counts);
            }
        }
    }
}

fn set_counts(counts: &BTreeMap<String, u64>) {
    let g = metrics::get();
    for kind in metrics::STATE_KINDS {
        if !counts.contains_key(*kind) {
            g.state_objects
                .get_or_create(&KindLabel { kind: kind.to_string() })
                .set(0);
        }
    }
    for (kind, n) in counts {
        g.state_objects
            .get_or_create(&KindLabel { kind: kind.clone() })
            .set(*n as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_clock_ages_the_oldest_missing_entry() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut c = EntryClock::default();
        c.observe(10, t0);
        c.observe(20, t0 + ms(100));
        c.observe(30, t0 + ms(200));
        let now = t0 + ms(1000);
        assert_eq!(c.lag(Some(30), now), Duration::ZERO);
        assert_eq!(c.lag(Some(25), now), ms(800));
        assert_eq!(c.lag(Some(20), now), ms(800));
        assert_eq!(c.lag(Some(19), now), ms(900));
        assert_eq!(c.lag(Some(3), now), ms(1000));
        assert_eq!(c.lag(None, now), ms(1000));
        c.prune(20);
        assert_eq!(c.len(), 1);
        assert_eq!(c.lag(Some(20), now), ms(800));
        c.reset();
        assert!(c.is_empty());
        assert_eq!(c.lag(Some(1), now), Duration::ZERO);
    }

    #[test]
    fn entry_clock_merges_close_records_and_stays_bounded() {
        let t0 = Instant::now();
        let mut c = EntryClock::default();
        c.observe(1, t0);
        c.observe(2, t0 + Duration::from_millis(1));
        assert_eq!(c.len(), 1);
        for i in 0..(3 * EntryClock::CAP as u64) {
            c.observe(10 + i, t0 + Duration::from_millis(20 * (i + 1)));
        }
        assert!(c.len() <= EntryClock::CAP, "{}", c.len());
        // The oldest entry still has the oldest time.
        let now = t0 + Duration::from_secs(1000);
        assert_eq!(c.lag(None, now), Duration::from_secs(1000));
    }

    #[test]
    fn only_role_leadership_membership_or_snapshot_changes_are_news() {
        let mut s = Sampler::default();
        let mut m = RaftMetrics::new_initial(1);
        assert!(s.news(&m), "the first sample is news");
        s.on_metrics(1, &m, Instant::now());
        assert!(!s.news(&m));
        m.last_log_index = Some(7);
        m.last_applied = Some(keel_storage::types::LogId::new(
            openraft::impls::leader_id_adv::LeaderId { term: 1, node_id: 1 },
            7,
        ));
        assert!(!s.news(&m), "moving indexes can wait");
        m.state = ServerState::Candidate;
        assert!(s.news(&m), "a role change");
        s.on_metrics(1, &m, Instant::now());
        m.current_term = 2;
        m.current_leader = Some(2);
        assert!(s.news(&m), "a new leader");
        s.on_metrics(1, &m, Instant::now());
        m.snapshot = m.last_applied;
        assert!(s.news(&m), "a new snapshot");
    }

    #[test]
    fn peer_series_follow_the_replicated_peers() {
        // Peer ids no other test uses: the registry is shared.
        let series = |peer: u64| {
            let text = metrics::get().encode();
            let lag = format!("raft_replication_lag_entries{{peer=\"{peer}\"}} ");
            text.lines()
                .find_map(|l| l.strip_prefix(lag.as_str()).map(|v| v.to_string()))
        };
        let log_id = |index| {
            keel_storage::types::LogId::new(openraft::impls::leader_id_adv::LeaderId { term: 1, node_id: 1 }, index)
        };
        let mut s = Sampler::default();
        let mut m = RaftMetrics::new_initial(71);
        m.state = ServerState::Leader;
        m.current_term = 1;
        m.current_leader = Some(71);
        m.last_log_index = Some(9);
        m.replication = Some(
            [(71, Some(log_id(9))), (72, Some(log_id(5))), (73, None)]
                .into_iter()
                .collect(),
        );
        s.on_metrics(71, &m, Instant::now());
        assert_eq!(series(72).as_deref(), Some("4"), "10 entries, 6 matched");
        assert_eq!(series(73).as_deref(), Some("10"));
        assert_eq!(series(71), None, "no series for the leader itself");

        // The next sample stores into the same series.
        m.replication = Some(
            [(71, Some(log_id(9))), (72, Some(log_id(9))), (73, Some(log_id(1)))]
                .into_iter()
                .collect(),
        );
        s.on_metrics(71, &m, Instant::now());
        assert_eq!(series(72).as_deref(), Some("0"));
        assert_eq!(series(73).as_deref(), Some("8"));

        // A peer that leaves loses its series; leadership lost, all go.
        m.replication = Some([(71, Some(log_id(9))), (72, Some(log_id(9)))].into_iter().collect());
        s.on_metrics(71, &m, Instant::now());
        assert_eq!(series(73), None);
        assert!(series(72).is_some());
        m.state = ServerState::Follower;
        m.replication = None;
        s.on_metrics(71, &m, Instant::now());
        assert_eq!(series(72), None);

        // Leader again: the series come back and are live.
        m.state = ServerState::Leader;
        m.replication = Some([(71, Some(log_id(9))), (72, Some(log_id(7)))].into_iter().collect());
        s.on_metrics(71, &m, Instant::now());
        assert_eq!(series(72).as_deref(), Some("2"));
    }

    #[test]
    fn entry_counts_start_at_index_zero() {
        assert_eq!(count(None), 0);
        assert_eq!(count(Some(0)), 1);
        assert_eq!(count(Some(9)), 10);
    }
}
