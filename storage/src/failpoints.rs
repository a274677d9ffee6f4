//! Failpoints: named places where a test can crash the process or inject a
//! fault, through the [`fail`](https://docs.rs/fail) crate.
//!
//! They exist only when this crate is built with the `failpoints` feature.
//! `cargo test` builds it that way (the root package lists `keel-storage`
//! with the feature among its dev-dependencies, and Cargo unifies features
//! for everything a test run builds, the `keel` binary included), so the
//! cluster tests can start real `keel serve` processes with failpoints. A
//! plain `cargo build` or `cargo build --release` compiles none of them:
//! every function here is then an empty inline function, and `FAILPOINTS` is
//! ignored with a warning. Switching between the two rebuilds only the
//! workspace crates, never RocksDB.
//!
//! A process configures them once at start from the `FAILPOINTS` environment
//! variable ([`setup`]), in the fail crate's syntax:
//! `FAILPOINTS='snap-before-switch=return;log-before-purge=2*off->return'`.
//!
//! - A **crash point** ([`crash_point`]) with the action `return` aborts the
//!   process on the spot (SIGABRT: no destructor, no flush, like `kill -9`).
//!   `K*off->return` crashes at the (K+1)-th pass. `panic`, `sleep(ms)` and
//!   `pause` behave as the fail crate documents.
//! - A **flag point** ([`flag_point`]) with `return` or `return(arg)` tells its
//!   caller to inject a fault (e.g. flip a bit in a snapshot chunk in transit).
//!
//! The points, in the order an install passes them (see
//! `snapshot/DESIGN.md`):
//!
//! | name | where |
//! | --- | --- |
//! | `snap-recv-chunk` | receiver, after each snapshot chunk is written and verified |
//! | `snap-verified` | install, after the whole file is verified, before anything changes |
//! | `snap-before-switch` | the next generation is built and `CURRENT.tmp` fsynced, before the rename |
//! | `snap-before-dir-fsync` | `CURRENT` renamed, before the directory fsync |
//! | `snap-after-dir-fsync` | the switch is durable, before the new database is opened |
//! | `snap-after-switch` | new database live, snapshot file published, before returning to Raft |
//! | `snap-build-published` | building a snapshot: the file is published, before it goes to Raft |
//! | `log-before-purge` | log store, before a purge is written |
//! | `snap-send-corrupt` (flag) | sender, flips one bit of the next piece it sends |
//! | `snap-send-cut` (flag) | sender, breaks off the transfer after the next piece |
//! | `read-skip-read-index` (flag) | `keel` API: a linearizable read skips ReadIndex (a broken variant the fault suite must catch) |

/// Keeps the failpoint configuration alive; hold it for the life of the process.
#[must_use = "failpoints stay configured only while the guard lives"]
pub struct Guard {
    #[cfg(feature = "failpoints")]
    _scenario: Option<fail::FailScenario<'static>>,
}

/// True when this build has failpoints compiled in.
pub const ENABLED: bool = cfg!(feature = "failpoints");

/// Configures the failpoints named in `FAILPOINTS`, if any.
///
/// Call it once, first thing in `main`. It writes to stderr (logging may not
/// be set up yet) when `FAILPOINTS` is set, so a crash test's log shows it.
pub fn setup() -> Guard {
    let configured = std::env::var("FAILPOINTS").ok().filter(|s| !s.trim().is_empty());
    #[cfg(feature = "failpoints")]
    {
        match configured {
            Some(spec) => {
                eprintln!("keel: FAILPOINTS active: {spec}");
                Guard {
                    _scenario: Some(fail::FailScenario::setup()),
                }
            }
            None => Guard { _scenario: None },
        }
    }
    #[cfg(not(feature = "failpoints"))]
    {
        if let Some(spec) = configured {
            eprintln!("keel: warning: FAILPOINTS={spec:?} is ignored: this build has no failpoints");
        }
        Guard {}
    }
}

/// A place where a test may crash the process (action `return`).
#[inline]
pub fn crash_point(name: &str) {
    #[cfg(feature = "failpoints")]
    {
        fail::fail_point!(name, |arg| crash(name, arg));
    }
    #[cfg(not(feature = "failpoints"))]
    let _ = name;
}

#[cfg(feature = "failpoints")]
fn crash(name: &str, arg: Option<String>) -> ! {
    tracing::error!(failpoint = name, ?arg, "failpoint fired: aborting the process");
    eprintln!("keel: failpoint {name} fired: aborting the process");
    std::process::abort()
}

/// Runs `f` every time the point `name` is passed, in this process (for
/// tests that must act at an exact step of the code under test).
#[cfg(feature = "failpoints")]
pub fn on_pass(name: &str, f: impl Fn() + Send + Sync + 'static) {
    fail::cfg_callback(name, f).expect("a failpoint callback is always accepted");
}

/// A place where a test may inject a fault: `Some(arg)` when the point fires
/// (`arg` empty for a bare `return`).
#[inline]
pub fn flag_point(name: &str) -> Option<String> {
    #[cfg(feature = "failpoints")]
    {
        fail::fail_point!(name, |arg: Option<String>| Some(arg.unwrap_or_default()));
    }
    let _ = name;
    None
}
