//! A private network for a test cluster: one network namespace per node,
//! joined by a bridge in the test's own namespace, and partitions made by
//! the kernel.
//!
//! Node `i` of network `k` has the address `10.201.k.i` in namespace
//! `keel-<k>-<i>`; the bridge `keelbr<k>` carries `10.201.k.254`, the
//! address the test's clients (and proxies) use. A partition cutting `i`
//! off from `j` is a pair of policy-routing rules in `i`'s namespace:
//! packets from `j` are dropped on input and packets to `j` on output
//! (`ip rule … blackhole`), so established connections stall the way they
//! do when a switch drops traffic, with no reset to warn either side.
//! Neighbour (ARP) entries are static, so a healed link works at once.
//! Clients in the test's namespace are never cut off.
//!
//! Needs root and iproute2's `ip`. Everything is removed on drop (deleting
//! a namespace deletes its end of the veth pair).

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::Mutex;
use std::sync::atomic::AtomicU32;
use std::sync::atomic::Ordering;

fn ip(args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("running ip {args:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn must(args: &[&str]) -> String {
    ip(args).unwrap_or_else(|e| panic!("{e}"))
}

pub struct Net {
    pub k: u32,
    pub n: u64,
    /// Directed links currently cut: (from, to) means packets from `from`
    /// to `to` are dropped.
    cut: Mutex<BTreeSet<(u64, u64)>>,
    /// Rules added by [`Net::cut_to_port`]: the `ip` arguments that
    /// delete each.
    port_cuts: Mutex<Vec<Vec<String>>>,
}

impl Net {
    /// The address of node `i`.
    pub fn host(&self, i: u64) -> String {
        format!("10.201.{}.{i}", self.k)
    }
    /// The bridge's address (the test's side).
    pub fn gateway(&self) -> String {
        format!("10.201.{}.254", self.k)
    }
    pub fn netns(&self, i: u64) -> String {
        format!("keel-{}-{i}", self.k)
    }
    fn bridge(&self) -> String {
        format!("keelbr{}", self.k)
    }

    /// Creates namespaces for nodes `1..=n`.
    pub fn new(n: u64) -> Net {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        remove_stale();
        // A network number free on this machine (the pid spreads concurrent
        // test processes apart; a left-over bridge is skipped).
        let links = must(&["-o", "link", "show"]);
        let mut k = 0;
        for _ in 0..250 {
            let c = (std::process::id() + NEXT.fetch_add(1, Ordering::SeqCst) * 7) % 250 + 1;
            if !links.contains(&format!("keelbr{c}:")) {
                k = c;
                break;
            }
        }
        assert!(k != 0, "no free network number");
        let net = Net {
            k,
            n,
            cut: Mutex::new(BTreeSet::new()),
            port_cuts: Mutex::new(Vec::new()),
        };
        let br = net.bridge();
        must(&["link", "add", &br, "type", "bridge"]);
        // Record the owner so a later run can remove what a killed run left.
        let _ = std::fs::write(stale_marker(k), std::process::id().to_string());
        must(&["addr", "add", &format!("{}/24", net.gateway()), "dev", &br]);
        must(&["link", "set", &br, "up"]);
        let mut macs = Vec::new();
        for i in 1..=n {
            let ns = net.netns(i);
            must(&["netns", "add", &ns]);
            let outer = format!("kv{k}n{i}");
            let inner = format!("kv{k}p{i}");
            must(&[
                "link", "add", &outer, "type", "veth", "peer", "name", &inner, "netns", &ns,
            ]);
            must(&["link", "set", &outer, "master", &br]);
            must(&["link", "set", &outer, "up"]);
            must(&["-n", &ns, "addr", "add", &format!("{}/24", net.host(i)), "dev", &inner]);
            must(&["-n", &ns, "link", "set", &inner, "up"]);
            must(&["-n", &ns, "link", "set", "lo", "up"]);
            // The local table after the partition rules (pref 10 and 11), so
            // that input drops apply to packets for local addresses.
            must(&["-n", &ns, "rule", "add", "pref", "100", "lookup", "local"]);
            must(&["-n", &ns, "rule", "del", "pref", "0"]);
            let mac = must(&["-n", &ns, "-o", "link", "show", &inner]);
            let mac = mac
                .split("link/ether ")
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
                .expect("veth MAC")
                .to_string();
            macs.push((i, inner, mac));
        }
        // Static neighbours: a dropped ARP reply during a partition must not
        // leave a node unable to reach a peer after the heal.
        for (i, inner, _) in &macs {
            for (j, _, mac) in &macs {
                if i != j {
                    must(&[
                        "-n",
                        &net.netns(*i),
                        "neigh",
                        "replace",
                        &net.host(*j),
                        "lladdr",
                        mac,
                        "dev",
                        inner,
                        "nud",
                        "permanent",
                    ]);
                }
            }
        }
        net
    }

    /// Drops packets from `from` to `to` (one direction).
    pub fn cut_one_way(&self, from: u64, to: u64) {
        let mut cut = self.cut.lock().unwrap();
        if !cut.insert((from, to)) {
            return;
        }
        // In `from`'s namespace: nothing leaves for `to`. In `to`'s:
        // nothing from `from` is accepted.
        must(&[
            "-n",
            &self.netns(from),
            "rule",
            "add",
            "pref",
            "11",
            "to",
            &self.host(to),
            "blackhole",
        ]);
        must(&[
            "-n",
            &self.netns(to),
            "rule",
            "add",
            "pref",
            "10",
            "from",
            &self.host(from),
            "blackhole",
        ]);
    }

    fn restore_one_way(&self, from: u64, to: u64) {
        let _ = ip(&[
            "-n",
            &self.netns(from),
            "rule",
            "del",
            "pref",
            "11",
            "to",
            &self.host(to),
            "blackhole",
        ]);
        let _ = ip(&[
            "-n",
            &self.netns(to),
            "rule",
            "del",
            "pref",
            "10",
            "from",
            &self.host(from),
            "blackhole",
        ]);
    }

    /// Drops the TCP segments `from` sends to `to`'s port `port` (one
    /// direction, that port only): connections `from` opened to that port
    /// stall, while `to` still reaches every port of `from`, answers
    /// included. For a leader whose appends must not reach one follower
    /// while that follower can still probe the leader's port. Undone by
    /// [`Net::heal`].
    pub fn cut_to_port(&self, from: u64, to: u64, port: u16) {
        let port = port.to_string();
        let rule = |ns: u64, pref: &str, dir: &str, addr: String| -> Vec<String> {
            vec![
                "-n".to_string(),
                self.netns(ns),
                "rule".into(),
                "add".into(),
                "pref".into(),
                pref.into(),
                dir.into(),
                addr,
                "ipproto".into(),
                "tcp".into(),
                "dport".into(),
                port.clone(),
                "blackhole".into(),
            ]
        };
        // In `from`'s namespace nothing leaves for that port of `to`; in
        // `to`'s nothing from `from` to that port is accepted.
        for mut args in [
            rule(from, "13", "to", self.host(to)),
            rule(to, "12", "from", self.host(from)),
        ] {
            must(&args.iter().map(String::as_str).collect::<Vec<_>>());
            args[3] = "del".into();
            self.port_cuts.lock().unwrap().push(args);
        }
    }

    /// Cuts every link between the groups `a` and `b`, both directions.
    pub fn partition(&self, a: &[u64], b: &[u64]) {
        for &x in a {
            for &y in b {
                self.cut_one_way(x, y);
                self.cut_one_way(y, x);
            }
        }
    }

    /// Cuts node `i` off from every other node.
    pub fn isolate(&self, i: u64) {
        let others: Vec<u64> = (1..=self.n).filter(|&j| j != i).collect();
        self.partition(&[i], &others);
    }

    /// Restores every link.
    pub fn heal(&self) {
        let mut cut = self.cut.lock().unwrap();
        for (from, to) in std::mem::take(&mut *cut) {
            self.restore_one_way(from, to);
        }
        for undo in std::mem::take(&mut *self.port_cuts.lock().unwrap()) {
            let _ = ip(&undo.iter().map(String::as_str).collect::<Vec<_>>());
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        teardown(self.k, self.n);
    }
}

fn stale_marker(k: u32) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("keel-test-net-{k}.pid"))
}

fn teardown(k: u32, n: u64) {
    for i in 1..=n.max(9) {
        let _ = ip(&["netns", "del", &format!("keel-{k}-{i}")]);
    }
    let _ = ip(&["link", "del", &format!("keelbr{k}")]);
    let _ = std::fs::remove_file(stale_marker(k));
}

/// Removes networks whose owning test process is gone (a run killed before
/// its destructors ran).
fn remove_stale() {
    let Ok(dir) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(k) = name
            .strip_prefix("keel-test-net-")
            .and_then(|r| r.strip_suffix(".pid"))
            .and_then(|r| r.parse::<u32>().ok())
        else {
            continue;
        };
        let owner: Option<u32> = std::fs::read_to_string(e.path())
            .ok()
            .and_then(|s| s.trim().parse().ok());
        let alive = owner.is_some_and(|p| std::path::Path::new(&format!("/proc/{p}")).exists());
        if !alive {
            teardown(k, 9);
        }
    }
}

/// True when this process may create network namespaces (root with `ip`).
pub fn available() -> Result<(), String> {
    // Probed once per test process (tests run on several threads).
    static PROBE: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    PROBE
        .get_or_init(|| {
            let probe = format!("keel-probe-{}", std::process::id());
            let _ = ip(&["netns", "del", &probe]);
            ip(&["netns", "add", &probe])?;
            let _ = ip(&["netns", "del", &probe]);
            Ok(())
        })
        .clone()
}
