//! `keel disk-check`: how long a durable log write takes on a device, alone
//! and when several nodes sync on it at once.
//!
//! Every write keel acknowledges waits for an `fdatasync` of its Raft log on a
//! quorum of nodes, so the device's sync latency is the floor of a write's
//! latency, and its tail decides whether heartbeats arrive in time. The log
//! writes small records into write-ahead log files it reuses, so each sync
//! carries data only. This command measures that pattern in a directory: a
//! record overwritten into a file already written and synced, then
//! `fdatasync`. First one writer alone; then `--syncers` writers (one per
//! node, as when a cluster's nodes share one device, as on a laptop or in
//! `bench/compare-etcd`), each with its own file, starting each round
//! together: the time from a round's first start until a quorum of them (a
//! majority) has finished is what a write waits for on such a machine.

use std::fs::File;
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::path::PathBuf;
use std::sync::Barrier;
use std::time::Duration;
use std::time::Instant;

use anyhow::Context;
use anyhow::bail;
use clap::Args;
use serde::Serialize;

/// Options of `keel disk-check`.
#[derive(Debug, Clone, Args)]
pub struct DiskCheckArgs {
    /// An existing directory on the device to check (a node's data directory
    /// or its parent). Probe files are created there and removed.
    #[arg(long)]
    pub dir: PathBuf,
    /// Syncs to time, alone and per writer when together.
    #[arg(long, default_value_t = 1000)]
    pub count: usize,
    /// Bytes per record (a put's log record is about 300).
    #[arg(long, default_value_t = 300)]
    pub record_bytes: usize,
    /// Writers syncing at once in the second measurement (one per node that
    /// shares the device); 1 skips it.
    #[arg(long, default_value_t = 3)]
    pub syncers: usize,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Latency percentiles, milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Percentiles {
    pub n: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// What `keel disk-check` reports.
#[derive(Debug, Clone, Serialize)]
pub struct DiskReport {
    pub dir: String,
    pub record_bytes: usize,
    /// One writer: a record written and synced, `count` times.
    pub alone: Percentiles,
    /// `syncers` writers at once, if more than one.
    pub together: Option<Together>,
}

/// Several writers syncing at once, round by round.
#[derive(Debug, Clone, Serialize)]
pub struct Together {
    pub syncers: usize,
    /// A majority of `syncers`.
    pub quorum: usize,
    /// From a round's first start until `quorum` writers had synced.
    pub quorum_synced: Percentiles,
    /// From a round's first start until every writer had synced.
    pub all_synced: Percentiles,
    /// From a round's first start to its last: how far apart the writers
    /// began (threads woken together do not all run at once).
    pub start_spread: Percentiles,
}

/// A sync p99 above this is too slow for a control plane's log: writes
/// queue and heartbeats arrive late (etcd's guidance for its WAL is the
/// same 10 ms).
pub const SLOW_P99_MS: f64 = 10.0;

/// The largest probe file (`--count` records of `--record-bytes`); there is
/// one per writer.
pub const MAX_FILE_BYTES: usize = 1 << 30;

/// A majority of `n` voters.
pub fn quorum(n: usize) -> usize {
    n / 2 + 1
}

/// Percentiles of `ms` (sorted in place). `None` for no samples.
pub fn percentiles(ms: &mut [f64]) -> Option<Percentiles> {
    if ms.is_empty() {
        return None;
    }
    ms.sort_by(f64::total_cmp);
    let at = |q: f64| ms[((ms.len() as f64 * q) as usize).min(ms.len() - 1)];
    Some(Percentiles {
        n: ms.len(),
        p50_ms: at(0.5),
        p99_ms: at(0.99),
        max_ms: ms[ms.len() - 1],
    })
}

/// For each round, the time from its earliest start to the `k`-th
/// completion (1-based), in milliseconds. `starts[w][r]` and `ends[w][r]`
/// are writer `w`'s round `r`, as offsets from one origin.
pub fn kth_completion(starts: &[Vec<Duration>], ends: &[Vec<Duration>], k: usize) -> Vec<f64> {
    let rounds = starts.iter().map(Vec::len).min().unwrap_or(0);
    (0..rounds)
        .map(|r| {
            let first = starts.iter().map(|s| s[r]).min().expect("at least one writer");
            let mut done: Vec<Duration> = ends.iter().map(|e| e[r]).collect();
            done.sort();
            (done[k - 1] - first).as_secs_f64() * 1000.0
        })
        .collect()
}

/// For each round, milliseconds from its earliest start to its latest.
pub fn start_spread(starts: &[Vec<Duration>]) -> Vec<f64> {
    let rounds = starts.iter().map(Vec::len).min().unwrap_or(0);
    (0..rounds)
        .map(|r| {
            let first = starts.iter().map(|s| s[r]).min().expect("at least one writer");
            let last = starts.iter().map(|s| s[r]).max().expect("at least one writer");
            (last - first).as_secs_f64() * 1000.0
        })
        .collect()
}

fn validate(a: &DiskCheckArgs) -> anyhow::Result<()> {
    if !(1..=1_000_000).contains(&a.count) {
        bail!("--count must be between 1 and 1000000, got {}", a.count);
    }
    if !(1..=1 << 20).contains(&a.record_bytes) {
        bail!("--record-bytes must be between 1 and 1048576, got {}", a.record_bytes);
    }
    if a.count * a.record_bytes > MAX_FILE_BYTES {
        bail!(
            "--count x --record-bytes is {} bytes, above {MAX_FILE_BYTES}: each writer writes a file of that size",
            a.count * a.record_bytes
        );
    }
    if !(1..=16).contains(&a.syncers) {
        bail!("--syncers must be between 1 and 16, got {}", a.syncers);
    }
    let meta = std::fs::metadata(&a.dir).with_context(|| format!("--dir {}", a.dir.display()))?;
    if !meta.is_dir() {
        bail!("--dir {} is not a directory", a.dir.display());
    }
    Ok(())
}

/// A probe file: `count` records' worth written and synced first, so the
/// timed writes overwrite allocated blocks (as the log's reused WAL files
/// do) and each sync carries data only. Removed on drop.
struct Probe {
    path: PathBuf,
    file: File,
}

impl Probe {
    fn create(dir: &Path, name: &str, bytes: usize) -> anyhow::Result<Probe> {
        let path = dir.join(name);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        let probe = Probe { path, file };
        let zeros = vec![0u8; 1 << 20];
        let mut at = 0;
        while at < bytes {
            let n = (bytes - at).min(zeros.len());
            probe.file.write_all_at(&zeros[..n], at as u64)?;
            at += n;
        }
        probe.file.sync_all()?;
        Ok(probe)
    }

    fn write_sync(&self, record: &[u8], i: usize) -> std::io::Result<()> {
        self.file.write_all_at(record, (i * record.len()) as u64)?;
        self.file.sync_data()
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn alone(a: &DiskCheckArgs, record: &[u8]) -> anyhow::Result<Percentiles> {
    let probe = Probe::create(&a.dir, ".keel-disk-check-0", a.count * record.len())?;
    let mut ms = Vec::with_capacity(a.count);
    for i in 0..a.count {
        let t = Instant::now();
        probe.write_sync(record, i)?;
        ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(percentiles(&mut ms).expect("count >= 1"))
}

fn together(a: &DiskCheckArgs, record: &[u8]) -> anyhow::Result<Together> {
    let probes = (0..a.syncers)
        .map(|w| Probe::create(&a.dir, &format!(".keel-disk-check-{w}"), a.count * record.len()))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let barrier = Barrier::new(a.syncers);
    let origin = Instant::now();
    let timed: Vec<std::io::Result<(Vec<Duration>, Vec<Duration>)>> = std::thread::scope(|s| {
        let handles: Vec<_> = probes
            .iter()
            .map(|p| {
                let barrier = &barrier;
                s.spawn(move || {
                    let (mut starts, mut ends) = (Vec::with_capacity(a.count), Vec::with_capacity(a.count));
                    for i in 0..a.count {
                        barrier.wait();
                        starts.push(origin.elapsed());
                        // A failed write still waits at every later barrier,
                        // so the other writers are not left waiting.
                        let r = p.write_sync(record, i);
                        ends.push(origin.elapsed());
                        if let Err(e) = r {
                            for _ in i + 1..a.count {
                                barrier.wait();
                            }
                            return Err(e);
                        }
                    }
                    Ok((starts, ends))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a syncer panicked"))
            .collect()
    });
    let (mut starts, mut ends) = (Vec::new(), Vec::new());
    for t in timed {
        let (s, e) = t.context("write and fdatasync")?;
        starts.push(s);
        ends.push(e);
    }
    let q = quorum(a.syncers);
    Ok(Together {
        syncers: a.syncers,
        quorum: q,
        quorum_synced: percentiles(&mut kth_completion(&starts, &ends, q)).expect("count >= 1"),
        all_synced: percentiles(&mut kth_completion(&starts, &ends, a.syncers)).expect("count >= 1"),
        start_spread: percentiles(&mut start_spread(&starts)).expect("count >= 1"),
    })
}

/// Measure, in the calling thread (it blocks for the whole run).
pub fn measure(a: &DiskCheckArgs) -> anyhow::Result<DiskReport> {
    validate(a)?;
    let record = vec![b'x'; a.record_bytes];
    let alone = alone(a, &record)?;
    let together = if a.syncers > 1 {
        Some(together(a, &record)?)
    } else {
        None
    };
    Ok(DiskReport {
        dir: a.dir.display().to_string(),
        record_bytes: a.record_bytes,
        alone,
        together,
    })
}

fn line(label: &str, p: &Percentiles) -> String {
    format!(
        "{label}: p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms ({} syncs)",
        p.p50_ms, p.p99_ms, p.max_ms, p.n
    )
}

/// The report for people.
pub fn render(r: &DiskReport) -> String {
    let mut out = format!(
        "{}-byte record overwritten + fdatasync in {}\n{}\n",
        r.record_bytes,
        r.dir,
        line("one writer", &r.alone)
    );
    if let Some(t) = &r.together {
        out += &line(
            &format!("{} writers at once, until {} had synced", t.syncers, t.quorum),
            &t.quorum_synced,
        );
        out += "\n";
        out += &line(
            &format!("{} writers at once, until all had synced", t.syncers),
            &t.all_synced,
        );
        out += &format!(
            "\n(their starts spread over p50 {:.3} ms, p99 {:.3} ms per round)\n",
            t.start_spread.p50_ms, t.start_spread.p99_ms
        );
    }
    if r.alone.p99_ms > SLOW_P99_MS {
        out += &format!(
            "warning: p99 above {SLOW_P99_MS} ms: writes will be slow and heartbeats late; use a faster device\n"
        );
    }
    out
}

/// `keel disk-check`.
pub async fn run(a: DiskCheckArgs) -> anyhow::Result<()> {
    let json = a.json;
    let report = tokio::task::spawn_blocking(move || measure(&a)).await??;
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", render(&report));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(us: u64) -> Duration {
        Duration::from_micros(us)
    }

    #[test]
    fn quorum_is_a_majority() {
        assert_eq!([1, 2, 3, 4, 5].map(quorum), [1, 2, 2, 3, 3]);
    }

    #[test]
    fn percentiles_pick_from_the_sorted_samples() {
        assert_eq!(percentiles(&mut []), None);
        let mut ms: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        let p = percentiles(&mut ms).unwrap();
        assert_eq!((p.n, p.p50_ms, p.p99_ms, p.max_ms), (100, 51.0, 100.0, 100.0));
        let p = percentiles(&mut [2.5]).unwrap();
        assert_eq!((p.p50_ms, p.p99_ms, p.max_ms), (2.5, 2.5, 2.5));
    }

    #[test]
    fn a_round_counts_from_its_first_start_to_the_kth_end() {
        // Two rounds of three writers.
        let starts = vec![vec![d(0), d(1000)], vec![d(10), d(1005)], vec![d(20), d(1001)]];
        let ends = vec![vec![d(300), d(1900)], vec![d(100), d(1400)], vec![d(500), d(1200)]];
        let ms = |v: Vec<f64>| v.iter().map(|x| (x * 1000.0).round() as u64).collect::<Vec<_>>();
        assert_eq!(ms(kth_completion(&starts, &ends, 1)), [100, 200]);
        assert_eq!(ms(kth_completion(&starts, &ends, 2)), [300, 400]);
        assert_eq!(ms(kth_completion(&starts, &ends, 3)), [500, 900]);
        assert_eq!(ms(start_spread(&starts)), [20, 5]);
    }

    #[test]
    fn bad_options_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a-file");
        std::fs::write(&file, b"x").unwrap();
        let ok = DiskCheckArgs {
            dir: dir.path().into(),
            count: 3,
            record_bytes: 300,
            syncers: 3,
            json: false,
        };
        for (args, needle) in [
            (DiskCheckArgs { count: 0, ..ok.clone() }, "--count"),
            (
                DiskCheckArgs {
                    record_bytes: 0,
                    ..ok.clone()
                },
                "--record-bytes",
            ),
            (
                DiskCheckArgs {
                    syncers: 17,
                    ..ok.clone()
                },
                "--syncers",
            ),
            (
                DiskCheckArgs {
                    count: 1_000_000,
                    record_bytes: 1 << 20,
                    ..ok.clone()
                },
                "--count x --record-bytes",
            ),
            (
                DiskCheckArgs {
                    dir: file.clone(),
                    ..ok.clone()
                },
                "is not a directory",
            ),
            (
                DiskCheckArgs {
                    dir: dir.path().join("missing"),
                    ..ok.clone()
                },
                "--dir",
            ),
        ] {
            let e = measure(&args).unwrap_err();
            assert!(format!("{e:#}").contains(needle), "{e:#}");
        }
    }

    #[test]
    fn a_small_run_measures_and_leaves_no_files() {
        let dir = tempfile::tempdir().unwrap();
        let r = measure(&DiskCheckArgs {
            dir: dir.path().into(),
            count: 5,
            record_bytes: 100,
            syncers: 3,
            json: true,
        })
        .unwrap();
        assert_eq!(r.alone.n, 5);
        let t = r.together.expect("three writers");
        assert_eq!((t.syncers, t.quorum, t.quorum_synced.n), (3, 2, 5));
        assert!(t.quorum_synced.p50_ms <= t.all_synced.p50_ms);
        assert!(r.alone.p50_ms > 0.0);
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "probe files left behind"
        );
    }
}
