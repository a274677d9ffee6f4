//! Unit tests of the apply logic, one behaviour each.

use super::*;

fn put(key: &str, value: &str, expect: Option<Expect>) -> Request {
    Request {
        time_ms: 1,
        idempotency_key: None,
        command: Command::Put {
            key: key.into(),
            value: value.as_bytes().to_vec(),
            expect,
        },
    }
}

fn del(key: &str, expect: Option<Expect>) -> Request {
    Request {
        time_ms: 1,
        idempotency_key: None,
        command: Command::Delete {
            key: key.into(),
            expect,
        },
    }
}

/// Applies and commits the writes into the map, like the RocksDB plumbing does.
fn run(state: &mut HashMap<String, Object>, req: &Request, index: u64) -> Response {
    let (writes, resp) = apply(state, req, index).unwrap();
    for w in writes {
        match w {
            Write::Put(k, o) => state.insert(k, o),
            Write::Delete(k) => state.remove(&k),
        };
    }
    resp
}

#[test]
fn put_creates_then_updates_with_revisions() {
    let mut s = HashMap::new();
    assert_eq!(
        run(&mut s, &put("a", "1", None), 5),
        Response::Written {
            revision: 5,
            created: true
        }
    );
    assert_eq!(
        run(&mut s, &put("a", "2", None), 7),
        Response::Written {
            revision: 7,
            created: false
        }
    );
    let o = &s["a"];
    assert_eq!((o.revision, o.create_revision, o.version), (7, 5, 2));
    assert_eq!(o.value, b"2");
}

#[test]
fn revision_precondition_allows_exactly_one_of_two_racers() {
    let mut s = HashMap::new();
    run(&mut s, &put("w", "0", None), 3);
    let first = run(&mut s, &put("w", "a", Some(Expect::Revision(3))), 4);
    let second = run(&mut s, &put("w", "b", Some(Expect::Revision(3))), 5);
    assert_eq!(
        first,
        Response::Written {
            revision: 4,
            created: false
        }
    );
    assert_eq!(
        second,
        Response::Conflict {
            current_revision: Some(4)
        }
    );
    assert_eq!(s["w"].value, b"a");
}

#[test]
fn create_only_refuses_an_existing_object() {
    let mut s = HashMap::new();
    assert!(matches!(
        run(&mut s, &put("k", "1", Some(Expect::Absent)), 1),
        Response::Written { .. }
    ));
    assert_eq!(
        run(&mut s, &put("k", "2", Some(Expect::Absent)), 2),
        Response::Conflict {
            current_revision: Some(1)
        }
    );
}

#[test]
fn revision_precondition_on_missing_object_conflicts() {
    let mut s = HashMap::new();
    assert_eq!(
        run(&mut s, &put("k", "1", Some(Expect::Revision(9))), 1),
        Response::Conflict { current_revision: None }
    );
    assert!(s.is_empty());
}

#[test]
fn delete_of_missing_object_is_not_found_and_changes_nothing() {
    let mut s = HashMap::new();
    assert_eq!(run(&mut s, &del("k", None), 1), Response::NotFound);
    run(&mut s, &put("k", "1", None), 2);
    assert_eq!(
        run(&mut s, &del("k", Some(Expect::Revision(1))), 3),
        Response::Conflict {
            current_revision: Some(2)
        }
    );
    assert_eq!(
        run(&mut s, &del("k", Some(Expect::Present)), 4),
        Response::Deleted { revision: 4 }
    );
    assert!(!s.contains_key("k"));
}

#[test]
fn overlay_sees_earlier_writes_of_the_same_batch() {
    let base = HashMap::new();
    let mut ov = Overlay::new(&base);
    let (w, _) = apply(&ov, &put("k", "1", None), 1).unwrap();
    ov.record(&w);
    let (_, resp) = apply(&ov, &put("k", "2", Some(Expect::Absent)), 2).unwrap();
    assert_eq!(
        resp,
        Response::Conflict {
            current_revision: Some(1)
        }
    );
    let (w, _) = apply(&ov, &del("k", None), 3).unwrap();
    ov.record(&w);
    assert_eq!(ov.get("k").unwrap(), None);
}

#[test]
fn apply_is_deterministic() {
    let mut a = HashMap::new();
    let mut b = HashMap::new();
    let reqs = [
        put("x", "1", None),
        put("y", "2", None),
        del("x", None),
        put("y", "3", Some(Expect::Revision(2))),
    ];
    for (i, r) in reqs.iter().enumerate() {
        assert_eq!(run(&mut a, r, i as u64 + 1), run(&mut b, r, i as u64 + 1));
    }
    assert_eq!(a, b);
}

mod control_plane {
    use std::collections::BTreeMap;
    use std::collections::HashMap;

    use super::super::control::*;
    use super::super::*;

    fn req(time_ms: u64, command: Command) -> Request {
        Request {
            time_ms,
            idempotency_key: None,
            command,
        }
    }

    /// Applies like the state machine does: writes go into the map.
    fn exec(s: &mut HashMap<String, Object>, r: &Request, index: u64) -> Response {
        let (writes, resp) = apply(s, r, index).unwrap();
        for w in writes {
            match w {
                Write::Put(k, o) => s.insert(k, o),
                Write::Delete(k) => s.remove(&k),
            };
        }
        resp
    }

    fn spec(id: &str, ttl: Option<u64>) -> WorkerSpec {
        WorkerSpec {
            id: id.into(),
            url: format!("http://{id}:8000"),
            models: vec!["llama".into()],
            worker_type: WorkerType::Regular,
            labels: BTreeMap::new(),
            priority: 0,
            cost: 1,
            weight: 1,
            lease_ttl_ms: ttl,
            breaker: BreakerConfig {
                failure_threshold: 2,
                success_threshold: 2,
                cooldown_ms: 1000,
            },
        }
    }

    fn worker(s: &HashMap<String, Object>, id: &str) -> Option<Worker> {
        s.get(&format!("workers/{id}")).map(|o| from_json(&o.value).unwrap())
    }

    #[test]
    fn lease_lapses_only_at_its_deadline_and_heartbeats_renew_it() {
        let mut s = HashMap::new();
        exec(
            &mut s,
            &req(
                1_000,
                Command::PutWorker {
                    spec: spec("w1", Some(500)),
                    expect: None,
                },
            ),
            1,
        );
        exec(
            &mut s,
            &req(
                1_000,
                Command::PutWorker {
                    spec: spec("w2", None),
                    expect: None,
                },
            ),
            2,
        );
        assert_eq!(worker(&s, "w1").unwrap().lease_expires_ms, Some(1_500));
        // Before the deadline nothing expires.
        let r = exec(&mut s, &req(1_499, Command::Expire), 3);
        assert_eq!(
            r,
            Response::Expired {
                workers: vec![],
                affinities: vec![]
            }
        );
        // A heartbeat at 1,400 moves the deadline to 1,900.
        exec(&mut s, &req(1_400, Command::Heartbeat { id: "w1".into() }), 4);
        let r = exec(&mut s, &req(1_600, Command::Expire), 5);
        assert_eq!(
            r,
            Response::Expired {
                workers: vec![],
                affinities: vec![]
            }
        );
        let r = exec(&mut s, &req(1_900, Command::Expire), 6);
        assert_eq!(
            r,
            Response::Expired {
                workers: vec!["w1".into()],
                affinities: vec![]
            }
        );
        assert!(worker(&s, "w1").is_none(), "lapsed worker removed");
        assert!(worker(&s, "w2").is_some(), "a worker without a lease never expires");
        assert_eq!(
            exec(&mut s, &req(2_000, Command::Heartbeat { id: "w1".into() }), 7),
            Response::NotFound
        );
    }

    fn report(s: &mut HashMap<String, Object>, t: u64, ok: bool, i: u64) -> Worker {
        let r = exec(
            s,
            &req(
                t,
                Command::HealthReport {
                    id: "w".into(),
                    ok,
                    error: (!ok).then(|| "timeout".into()),
                },
            ),
            i,
        );
        assert!(matches!(r, Response::Written { .. }), "{r:?}");
        worker(s, "w").unwrap()
    }

    #[test]
    fn circuit_breaker_walks_every_transition() {
        let mut s = HashMap::new();
        exec(
            &mut s,
            &req(
                0,
                Command::PutWorker {
                    spec: spec("w", None),
                    expect: None,
                },
            ),
            1,
        );
        assert_eq!(worker(&s, "w").unwrap().circuit, CircuitState::Closed);
        assert_eq!(worker(&s, "w").unwrap().health, HealthStatus::Unknown);
        // closed --1 failure--> closed (below threshold 2)
        let w = report(&mut s, 10, false, 2);
        assert_eq!(
            (w.circuit, w.health, w.consecutive_failures),
            (CircuitState::Closed, HealthStatus::Unhealthy, 1)
        );
        assert_eq!(w.last_error.as_deref(), Some("timeout"));
        // a success resets the failure count
        let w = report(&mut s, 20, true, 3);
        assert_eq!((w.circuit, w.consecutive_failures), (CircuitState::Closed, 0));
        // closed --2 failures--> open at 40
        report(&mut s, 30, false, 4);
        let w = report(&mut s, 40, false, 5);
        assert_eq!((w.circuit, w.circuit_since_ms), (CircuitState::Open, 40));
        // open: reports during the cool-down keep it open, even successes
        let w = report(&mut s, 500, true, 6);
        assert_eq!((w.circuit, w.circuit_since_ms), (CircuitState::Open, 40));
        // open --cool-down passed, probe succeeds--> half-open (1 of 2 successes)
        let w = report(&mut s, 1_040, true, 7);
        assert_eq!((w.circuit, w.circuit_since_ms), (CircuitState::HalfOpen, 1_040));
        // half-open --failure--> open again
        let w = report(&mut s, 1_100, false, 8);
        assert_eq!((w.circuit, w.circuit_since_ms), (CircuitState::Open, 1_100));
        // open --cool-down, probe--> half-open --2nd success--> closed
        let w = report(&mut s, 2_100, true, 9);
        assert_eq!(w.circuit, CircuitState::HalfOpen);
        let w = report(&mut s, 2_200, true, 10);
        assert_eq!(
            (w.circuit, w.circuit_since_ms, w.health),
            (CircuitState::Closed, 2_200, HealthStatus::Healthy)
        );
        // re-registering keeps health and circuit
        exec(
            &mut s,
            &req(
                3_000,
                Command::PutWorker {
                    spec: spec("w", None),
                    expect: None,
                },
            ),
            11,
        );
        assert_eq!(worker(&s, "w").unwrap().circuit_since_ms, 2_200);
    }

    #[test]
    fn token_bucket_grants_exactly_capacity_then_refills_from_command_time() {
        let mut s = HashMap::new();
        let tb = RateLimitSpec::TokenBucket {
            capacity: 100,
            refill_milli_per_sec: 10_000,
        };
        exec(
            &mut s,
            &req(
                0,
                Command::PutRateLimit {
                    name: "rl".into(),
                    spec: tb,
                    expect: None,
                },
            ),
            1,
        );
        let mut granted = 0;
        for i in 0..150 {
            let r = exec(
                &mut s,
                &req(
                    0,
                    Command::Acquire {
                        name: "rl".into(),
                        tokens: 1,
                        key: None,
                    },
                ),
                2 + i,
            );
            if let Response::Acquired { granted: true, .. } = r {
                granted += 1;
            }
        }
        assert_eq!(granted, 100);
        let r = exec(
            &mut s,
            &req(
                0,
                Command::Acquire {
                    name: "rl".into(),
                    tokens: 5,
                    key: None,
                },
            ),
            200,
        );
        assert_eq!(
            r,
            Response::Acquired {
                granted: false,
                remaining: 0,
                retry_after_ms: Some(500),
                revision: 200
            }
        );
        // 0.5 s later at 10 tokens/s, 5 tokens are back.
        let r = exec(
            &mut s,
            &req(
                500,
                Command::Acquire {
                    name: "rl".into(),
                    tokens: 5,
                    key: None,
                },
            ),
            201,
        );
        assert!(
            matches!(
                r,
                Response::Acquired {
                    granted: true,
                    remaining: 0,
                    ..
                }
            ),
            "{r:?}"
        );
        // A clock that runs backwards never refills.
        let r = exec(
            &mut s,
            &req(
                100,
                Command::Acquire {
                    name: "rl".into(),
                    tokens: 1,
                    key: None,
                },
            ),
            202,
        );
        assert!(matches!(r, Response::Acquired { granted: false, .. }), "{r:?}");
        // More than the capacity can never be granted.
        let r = exec(
            &mut s,
            &req(
                99_000,
                Command::Acquire {
                    name: "rl".into(),
                    tokens: 101,
                    key: None,
                },
            ),
            203,
        );
        assert!(
            matches!(
                r,
                Response::Acquired {
                    granted: false,
                    retry_after_ms: None,
                    ..
                }
            ),
            "{r:?}"
        );
        // Tenants have their own buckets.
        let r = exec(
            &mut s,
            &req(
                0,
                Command::Acquire {
                    name: "rl".into(),
                    tokens: 100,
                    key: Some("t2".into()),
                },
            ),
            204,
        );
        assert!(
            matches!(
                r,
                Response::Acquired {
                    granted: true,
                    remaining: 0,
                    ..
                }
            ),
            "{r:?}"
        );
        assert_eq!(
            exec(
                &mut s,
                &req(
                    0,
                    Command::Acquire {
                        name: "nope".into(),
                        tokens: 1,
                        key: None
                    }
                ),
                205
            ),
            Response::NotFound
        );
    }

    #[test]
    fn fixed_window_resets_at_window_boundaries() {
        let mut s = HashMap::new();
        let fw = RateLimitSpec::FixedWindow {
            limit: 3,
            window_ms: 1000,
        };
        exec(
            &mut s,
            &req(
                0,
                Command::PutRateLimit {
                    name: "q".into(),
                    spec: fw,
                    expect: None,
                },
            ),
            1,
        );
        let acq = |s: &mut HashMap<String, Object>, t: u64, i: u64| {
            exec(
                s,
                &req(
                    t,
                    Command::Acquire {
                        name: "q".into(),
                        tokens: 1,
                        key: None,
                    },
                ),
                i,
            )
        };
        for i in 0..3 {
            assert!(matches!(
                acq(&mut s, 100, 2 + i),
                Response::Acquired { granted: true, .. }
            ));
        }
        assert_eq!(
            acq(&mut s, 250, 5),
            Response::Acquired {
                granted: false,
                remaining: 0,
                retry_after_ms: Some(750),
                revision: 5
            }
        );
        assert!(matches!(
            acq(&mut s, 1_000, 6),
            Response::Acquired {
                granted: true,
                remaining: 2,
                ..
            }
        ));
    }

    #[test]
    fn counters_add_and_refuse_overflow() {
        let mut s = HashMap::new();
        assert_eq!(
            exec(
                &mut s,
                &req(
                    0,
                    Command::CounterAdd {
                        name: "c".into(),
                        delta: 5
                    }
                ),
                1
            ),
            Response::Counter { value: 5, revision: 1 }
        );
        assert_eq!(
            exec(
                &mut s,
                &req(
                    0,
                    Command::CounterAdd {
                        name: "c".into(),
                        delta: -7
                    }
                ),
                2
            ),
            Response::Counter { value: -2, revision: 2 }
        );
        let r = exec(
            &mut s,
            &req(
                0,
                Command::CounterAdd {
                    name: "c".into(),
                    delta: i64::MIN,
                },
            ),
            3,
        );
        assert!(matches!(r, Response::Invalid(_)), "{r:?}");
    }

    #[test]
    fn affinity_vanishes_at_its_expiry_by_command_time() {
        let mut s = HashMap::new();
        exec(
            &mut s,
            &req(
                0,
                Command::PutAffinity {
                    session: "s1".into(),
                    worker_id: "w".into(),
                    ttl_ms: 100,
                    expect: None,
                },
            ),
            1,
        );
        exec(
            &mut s,
            &req(
                0,
                Command::PutAffinity {
                    session: "s2".into(),
                    worker_id: "w".into(),
                    ttl_ms: 1_000,
                    expect: None,
                },
            ),
            2,
        );
        let r = exec(&mut s, &req(100, Command::Expire), 3);
        assert_eq!(
            r,
            Response::Expired {
                workers: vec![],
                affinities: vec!["s1".into()]
            }
        );
        assert!(s.contains_key("affinity/s2") && !s.contains_key("affinity/s1"));
    }

    fn kv_put(key: &str, v: &str) -> Command {
        Command::Put {
            key: key.into(),
            value: v.as_bytes().to_vec(),
            expect: None,
        }
    }

    #[test]
    fn txn_chooses_a_branch_by_compares_and_is_all_or_nothing() {
        let mut s = HashMap::new();
        exec(&mut s, &req(0, kv_put("kv/a", "1")), 1);
        let txn = |rev| Txn {
            compares: vec![("kv/a".into(), Expect::Revision(rev))],
            success: vec![kv_put("kv/a", "2"), kv_put("kv/b", "2")],
            failure: vec![kv_put("kv/failed", "1")],
        };
        let r = exec(&mut s, &req(0, Command::Txn(txn(1))), 2);
        assert!(
            matches!(
                r,
                Response::Txn {
                    succeeded: true,
                    revision: 2,
                    ..
                }
            ),
            "{r:?}"
        );
        assert_eq!(s["kv/b"].value, b"2");
        // The compare now fails: the failure branch runs instead.
        let r = exec(&mut s, &req(0, Command::Txn(txn(1))), 3);
        assert!(matches!(r, Response::Txn { succeeded: false, .. }), "{r:?}");
        assert!(s.contains_key("kv/failed"));
        // An operation that cannot apply aborts the whole transaction.
        let before = s.clone();
        let bad = Txn {
            compares: vec![],
            success: vec![
                kv_put("kv/c", "1"),
                Command::Delete {
                    key: "kv/missing".into(),
                    expect: None,
                },
            ],
            failure: vec![],
        };
        let r = exec(&mut s, &req(0, Command::Txn(bad)), 4);
        assert!(matches!(r, Response::Invalid(_)), "{r:?}");
        assert_eq!(s, before, "an aborted transaction changes nothing");
    }

    #[test]
    fn an_idempotency_key_applies_a_write_once() {
        let mut s = HashMap::new();
        let r = Request {
            time_ms: 0,
            idempotency_key: Some("k1".into()),
            command: Command::CounterAdd {
                name: "c".into(),
                delta: 1,
            },
        };
        assert_eq!(exec(&mut s, &r, 1), Response::Counter { value: 1, revision: 1 });
        // The retry (a new log entry) returns the first answer and changes nothing.
        assert_eq!(exec(&mut s, &r, 2), Response::Counter { value: 1, revision: 1 });
        assert_eq!(from_json::<i64>(&s["counters/c"].value).unwrap(), 1);
        // Forgotten after the TTL, by command time.
        exec(&mut s, &req(IDEM_TTL_MS, Command::Expire), 3);
        assert!(!s.contains_key("~idem/k1"));
    }

    #[test]
    fn history_records_client_changes_and_forgets_old_ones() {
        let mut s = HashMap::new();
        exec(&mut s, &req(0, kv_put("kv/a", "1")), 1);
        exec(
            &mut s,
            &req(
                0,
                Command::Delete {
                    key: "kv/a".into(),
                    expect: None,
                },
            ),
            2,
        );
        let ev: Vec<Event> = from_json(&s[&history_key(1)].value).unwrap();
        assert_eq!(
            ev,
            vec![Event {
                key: "kv/a".into(),
                kind: "put".into(),
                value: Some("1".into())
            }]
        );
        let ev: Vec<Event> = from_json(&s[&history_key(2)].value).unwrap();
        assert_eq!(ev[0].kind, "delete");
        // A failed command records nothing.
        exec(
            &mut s,
            &req(
                0,
                Command::Delete {
                    key: "kv/a".into(),
                    expect: None,
                },
            ),
            3,
        );
        assert!(!s.contains_key(&history_key(3)));
        // Far later, old history is pruned, one index per entry.
        exec(&mut s, &req(0, kv_put("kv/z", "1")), HISTORY_KEEP + 1);
        assert!(!s.contains_key(&history_key(1)) && s.contains_key(&history_key(HISTORY_KEEP + 1)));
        assert!(s.contains_key(&history_key(2)), "the window keeps HISTORY_KEEP indexes");
    }

    #[test]
    fn every_entry_forgets_the_one_index_that_left_the_window() {
        let mut s = HashMap::new();
        for i in [10, 11, 12, 20] {
            exec(&mut s, &req(0, kv_put("kv/a", "1")), i);
        }
        // A failed command forgets its index's horizon too.
        let fail = Command::Delete {
            key: "kv/missing".into(),
            expect: None,
        };
        exec(&mut s, &req(0, fail), 10 + HISTORY_KEEP);
        assert!(!s.contains_key(&history_key(10)));
        assert!(s.contains_key(&history_key(11)), "only the horizon is forgotten");
        // Entries without a command (blank, membership) forget theirs.
        for i in [11, 12] {
            for w in apply_without_command(i + HISTORY_KEEP) {
                let Write::Delete(k) = w else {
                    panic!("an entry without a command only deletes")
                };
                s.remove(&k);
            }
            assert!(!s.contains_key(&history_key(i)), "history of {i} kept");
        }
        assert!(s.contains_key(&history_key(20)));
        assert!(forget_history(5).is_empty(), "nothing to forget early on");
        assert!(forget_history(HISTORY_KEEP).is_empty(), "history starts at index 1");
        assert_eq!(forget_history(HISTORY_KEEP + 9), vec![Write::Delete(history_key(9))]);
    }
}

/// Every command must survive the log's binary encoding (bincode cannot
/// carry some serde shapes, e.g. internally tagged enums or flatten).
#[test]
fn every_command_round_trips_through_the_log_codec() {
    use std::collections::BTreeMap;

    use super::control::*;
    let spec = WorkerSpec {
        id: "w".into(),
        url: "http://w".into(),
        models: vec!["m".into()],
        worker_type: WorkerType::Decode,
        labels: BTreeMap::from([("a".to_string(), "b".to_string())]),
        priority: 1,
        cost: 2,
        weight: 3,
        lease_ttl_ms: Some(5),
        breaker: BreakerConfig::default(),
    };
    let put = Command::Put {
        key: "kv/a".into(),
        value: b"1".to_vec(),
        expect: Some(Expect::Revision(3)),
    };
    let commands = vec![
        put.clone(),
        Command::Delete {
            key: "kv/a".into(),
            expect: Some(Expect::Absent),
        },
        Command::PutWorker {
            spec,
            expect: Some(Expect::Present),
        },
        Command::Heartbeat { id: "w".into() },
        Command::HealthReport {
            id: "w".into(),
            ok: false,
            error: Some("e".into()),
        },
        Command::PutAffinity {
            session: "s".into(),
            worker_id: "w".into(),
            ttl_ms: 9,
            expect: None,
        },
        Command::PutRateLimit {
            name: "r".into(),
            spec: RateLimitSpec::TokenBucket {
                capacity: 1,
                refill_milli_per_sec: 2,
            },
            expect: None,
        },
        Command::PutRateLimit {
            name: "r".into(),
            spec: RateLimitSpec::FixedWindow { limit: 1, window_ms: 2 },
            expect: None,
        },
        Command::Acquire {
            name: "r".into(),
            tokens: 1,
            key: Some("t".into()),
        },
        Command::CounterAdd {
            name: "c".into(),
            delta: -1,
        },
        Command::Expire,
        Command::Txn(Txn {
            compares: vec![("kv/a".into(), Expect::Present)],
            success: vec![put.clone()],
            failure: vec![put],
        }),
    ];
    for command in commands {
        let r = Request {
            time_ms: 7,
            idempotency_key: Some("k".into()),
            command,
        };
        let bytes = crate::codec::encode(&r).unwrap();
        assert_eq!(crate::codec::decode::<Request>(&bytes, "test").unwrap(), r);
    }
}

/// The encoding of `depth` transactions nested in one another around an
/// expiry sweep, built from the bytes of one level so that no deep value
/// (whose own encoding would recurse as deeply) is ever constructed.
fn nested_txn_bytes(depth: usize, enc: &dyn Fn(&Command) -> Vec<u8>) -> Vec<u8> {
    let txn = |success| {
        Command::Txn(Txn {
            compares: vec![],
            success,
            failure: vec![],
        })
    };
    let (leaf, one, empty) = (
        enc(&Command::Expire),
        enc(&txn(vec![Command::Expire])),
        enc(&txn(vec![])),
    );
    // An empty transaction is a tag (as long as the leaf's) and three empty
    // lists; the leaf sits right before the last of them, `failure`.
    let empty_list = (empty.len() - leaf.len()) / 3;
    let pos = one.len() - empty_list - leaf.len();
    assert_eq!(&one[pos..pos + leaf.len()], &leaf[..]);
    let (prefix, suffix) = (&one[..pos], &one[pos + leaf.len()..]);
    [prefix.repeat(depth), leaf.clone(), suffix.repeat(depth)].concat()
}

/// Decoding is recursive: a peer (or a corrupt log entry) sending thousands
/// of nested transactions must get an error, not overflow the stack and
/// abort the node. Legitimate nesting (one level; a few more) still decodes.
#[test]
fn deeply_nested_transactions_are_a_decoding_error_not_a_stack_overflow() {
    use bincode::Options;
    let log = |c: &Command| bincode::serialize(c).unwrap();
    let wire = |c: &Command| bincode::DefaultOptions::new().serialize(c).unwrap();
    let from_log = |b: &[u8]| bincode::deserialize::<Command>(b).map_err(|e| e.to_string());
    let from_wire = |b: &[u8]| {
        bincode::DefaultOptions::new()
            .deserialize::<Command>(b)
            .map_err(|e| e.to_string())
    };
    for depth in [1, 2, nesting::MAX_DEPTH] {
        let c = from_log(&nested_txn_bytes(depth, &log)).unwrap();
        assert_eq!(log(&c), nested_txn_bytes(depth, &log));
        assert_eq!(from_wire(&nested_txn_bytes(depth, &wire)).unwrap(), c);
    }
    for depth in [nesting::MAX_DEPTH + 1, 1_000_000] {
        for err in [
            from_log(&nested_txn_bytes(depth, &log)).unwrap_err(),
            from_wire(&nested_txn_bytes(depth, &wire)).unwrap_err(),
        ] {
            assert!(err.contains("nested more than"), "depth {depth}: {err}");
        }
    }
    // The count recovers after an error: a shallow value decodes again.
    assert!(from_wire(&nested_txn_bytes(2, &wire)).is_ok());
    // Responses nest the same way.
    let mut resp = Response::None;
    for _ in 0..nesting::MAX_DEPTH {
        resp = Response::Txn {
            succeeded: true,
            revision: 1,
            results: vec![resp],
        };
    }
    let bytes = bincode::serialize(&resp).unwrap();
    assert_eq!(bincode::deserialize::<Response>(&bytes).unwrap(), resp);
    let deeper = Response::Txn {
        succeeded: true,
        revision: 1,
        results: vec![resp],
    };
    let err = bincode::deserialize::<Response>(&bincode::serialize(&deeper).unwrap()).unwrap_err();
    assert!(err.to_string().contains("nested more than"), "{err}");
}

#[test]
fn byte_string_fields_keep_their_encodings() {
    // What `Object` and `Command::Put` were before their values became byte
    // strings: stored objects, log entries and peer messages written by
    // earlier versions must decode, and ours must be the same bytes.
    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct PlainObject {
        value: Vec<u8>,
        revision: u64,
        create_revision: u64,
        version: u64,
    }
    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    enum PlainCommand {
        Put {
            key: String,
            value: Vec<u8>,
            expect: Option<Expect>,
        },
    }
    use bincode::Options;
    let varint = || bincode::DefaultOptions::new();
    for n in [0usize, 1, 250, 251, 256, 70_000] {
        let value: Vec<u8> = (0..n).map(|i| (i * 7) as u8).collect();
        let o = Object {
            value: value.clone(),
            revision: 9,
            create_revision: 2,
            version: 3,
        };
        let p = PlainObject {
            value: value.clone(),
            revision: 9,
            create_revision: 2,
            version: 3,
        };
        assert_eq!(bincode::serialize(&o).unwrap(), bincode::serialize(&p).unwrap());
        assert_eq!(varint().serialize(&o).unwrap(), varint().serialize(&p).unwrap());
        assert_eq!(
            bincode::deserialize::<Object>(&bincode::serialize(&p).unwrap()).unwrap(),
            o
        );
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(serde_json::to_string(&o).unwrap(), json);
        assert_eq!(serde_json::from_str::<Object>(&json).unwrap(), o);

        let c = Command::Put {
            key: "kv/k".into(),
            value: value.clone(),
            expect: Some(Expect::Present),
        };
        let pc = PlainCommand::Put {
            key: "kv/k".into(),
            value,
            expect: Some(Expect::Present),
        };
        let old = varint().serialize(&pc).unwrap();
        assert_eq!(varint().serialize(&c).unwrap(), old);
        assert_eq!(varint().deserialize::<Command>(&old).unwrap(), c);
        assert_eq!(serde_json::to_string(&c).unwrap(), serde_json::to_string(&pc).unwrap());
    }
    // A length claiming more bytes than there are is an error, not an allocation.
    let mut short = bincode::serialize(&PlainObject {
        value: vec![1; 8],
        revision: 1,
        create_revision: 1,
        version: 1,
    })
    .unwrap();
    short[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(bincode::deserialize::<Object>(&short).is_err());
}
