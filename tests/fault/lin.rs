//! A linearizability checker: the Wing & Gong search with Lowe's memo of
//! visited (linearized set, state) pairs, as in porcupine.
//!
//! Why our own: the checker is small, its model (a register with
//! compare-and-set whose values are unique per write) fits in a few lines,
//! and a search bound turns a pathological history into an explicit
//! "unknown" instead of a hung test. stateright's `LinearizabilityTester`
//! checks histories it records itself while driving a model, not histories
//! recorded from a real system, and porcupine is Go.
//!
//! An operation that failed without an answer (timeout, connection lost,
//! 503 after forwarding) may or may not have taken effect: it is recorded
//! with no return time, so the search may place it anywhere after its call
//! or after every other operation (which is the same as never).

use std::collections::HashSet;

/// One operation of a history.
#[derive(Debug, Clone)]
pub struct Op<I, O> {
    pub client: usize,
    /// Invocation time (any monotonic unit).
    pub call: u64,
    /// Return time; `None` when the outcome is unknown.
    pub ret: Option<u64>,
    pub input: I,
    pub output: O,
}

/// A sequential specification.
pub trait Model {
    type State: Clone + Eq + std::hash::Hash;
    type Input;
    type Output;
    fn init(&self) -> Self::State;
    /// The state after `input` answered `output` in `state`, or `None` when
    /// the sequential object could not have answered that.
    fn step(&self, state: &Self::State, input: &Self::Input, output: &Self::Output) -> Option<Self::State>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    /// No linearization exists.
    Illegal,
    /// The search gave up after its step bound.
    Unknown,
}

#[derive(Clone, Copy)]
struct Node {
    op: usize,
    is_call: bool,
    /// For a call: the index of its return node.
    ret: usize,
    prev: usize,
    next: usize,
}

const NIL: usize = usize::MAX;

/// Checks one history (one key) against `model`, visiting at most
/// `max_steps` search states.
pub fn check<M: Model>(model: &M, ops: &[Op<M::Input, M::Output>], max_steps: u64) -> Verdict {
    if ops.is_empty() {
        return Verdict::Ok;
    }
    // Events sorted by time; at equal times calls come first (the two
    // operations are then concurrent, the weaker claim).
    let mut events: Vec<(u64, bool, usize)> = Vec::with_capacity(ops.len() * 2);
    for (i, o) in ops.iter().enumerate() {
        events.push((o.call, true, i));
        events.push((o.ret.unwrap_or(u64::MAX), false, i));
    }
    events.sort_by_key(|&(t, is_call, i)| (t, !is_call, i));
    // A doubly linked list with a sentinel head at index 0.
    let mut nodes = vec![Node {
        op: NIL,
        is_call: false,
        ret: NIL,
        prev: NIL,
        next: NIL,
    }];
    let mut ret_of = vec![NIL; ops.len()];
    for &(_, is_call, op) in &events {
        let idx = nodes.len();
        nodes.push(Node {
            op,
            is_call,
            ret: NIL,
            prev: idx - 1,
            next: NIL,
        });
        nodes[idx - 1].next = idx;
        if !is_call {
            ret_of[op] = idx;
        }
    }
    for n in nodes.iter_mut().skip(1) {
        if n.is_call {
            n.ret = ret_of[n.op];
        }
    }
    let lift = |nodes: &mut Vec<Node>, call: usize| {
        let r = nodes[call].ret;
        for x in [call, r] {
            let (p, n) = (nodes[x].prev, nodes[x].next);
            nodes[p].next = n;
            if n != NIL {
                nodes[n].prev = p;
            }
        }
    };
    let unlift = |nodes: &mut Vec<Node>, call: usize| {
        let r = nodes[call].ret;
        for x in [r, call] {
            let (p, n) = (nodes[x].prev, nodes[x].next);
            nodes[p].next = x;
            if n != NIL {
                nodes[n].prev = x;
            }
        }
    };

    let words = ops.len().div_ceil(64);
    let mut linearized = vec![0u64; words];
    let mut cache: HashSet<(Vec<u64>, M::State)> = HashSet::new();
    let mut stack: Vec<(usize, M::State)> = Vec::new();
    let mut state = model.init();
    let mut entry = nodes[0].next;
    let mut steps = 0u64;
    loop {
        if nodes[0].next == NIL {
            return Verdict::Ok;
        }
        steps += 1;
        if steps > max_steps {
            return Verdict::Unknown;
        }
        let n = nodes[entry];
        if n.is_call {
            let o = &ops[n.op];
            let mut advanced = false;
            if let Some(next) = model.step(&state, &o.input, &o.output) {
                linearized[n.op / 64] |= 1 << (n.op % 64);
                if cache.insert((linearized.clone(), next.clone())) {
                    stack.push((entry, std::mem::replace(&mut state, next)));
                    lift(&mut nodes, entry);
                    entry = nodes[0].next;
                    advanced = true;
                } else {
                    linearized[n.op / 64] &= !(1 << (n.op % 64));
                }
            }
            if !advanced {
                entry = n.next;
            }
        } else {
            // A return reached before its call was linearized: undo the
            // most recent choice and try the next candidate after it.
            let Some((e, s)) = stack.pop() else {
                return Verdict::Illegal;
            };
            state = s;
            let op = nodes[e].op;
            linearized[op / 64] &= !(1 << (op % 64));
            unlift(&mut nodes, e);
            entry = nodes[e].next;
        }
    }
}

/// A register holding a unique value id (or nothing), with compare-and-set.
/// Values are unique per write, so "the revision I read" and "the value I
/// read" name the same write: a conditional write on a revision is a
/// compare-and-set on the value.
pub struct Register;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegIn {
    Write(u64),
    Read,
    /// Write `new` if the value is `expect`.
    Cas {
        expect: u64,
        new: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegOut {
    /// A write or CAS that took effect.
    Ok,
    /// A CAS refused: the value was not `expect`.
    Conflict,
    /// A read's answer.
    Value(Option<u64>),
    /// No answer: may or may not have taken effect.
    Unknown,
}

impl Model for Register {
    type State = Option<u64>;
    type Input = RegIn;
    type Output = RegOut;
    fn init(&self) -> Option<u64> {
        None
    }
    fn step(&self, s: &Option<u64>, i: &RegIn, o: &RegOut) -> Option<Option<u64>> {
        match (i, o) {
            (RegIn::Write(v), RegOut::Ok | RegOut::Unknown) => Some(Some(*v)),
            (RegIn::Read, RegOut::Value(v)) => (v == s).then_some(*s),
            (RegIn::Read, RegOut::Unknown) => Some(*s),
            (RegIn::Cas { expect, new }, RegOut::Ok) => (*s == Some(*expect)).then_some(Some(*new)),
            (RegIn::Cas { expect, .. }, RegOut::Conflict) => (*s != Some(*expect)).then_some(*s),
            (RegIn::Cas { expect, new }, RegOut::Unknown) => Some(if *s == Some(*expect) { Some(*new) } else { *s }),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(client: usize, call: u64, ret: Option<u64>, input: RegIn, output: RegOut) -> Op<RegIn, RegOut> {
        Op {
            client,
            call,
            ret,
            input,
            output,
        }
    }

    const MAX: u64 = 1_000_000;

    #[test]
    fn sequential_history_is_linearizable() {
        let h = vec![
            op(0, 0, Some(1), RegIn::Write(1), RegOut::Ok),
            op(0, 2, Some(3), RegIn::Read, RegOut::Value(Some(1))),
            op(0, 4, Some(5), RegIn::Cas { expect: 1, new: 2 }, RegOut::Ok),
            op(0, 6, Some(7), RegIn::Cas { expect: 1, new: 3 }, RegOut::Conflict),
            op(0, 8, Some(9), RegIn::Read, RegOut::Value(Some(2))),
        ];
        assert_eq!(check(&Register, &h, MAX), Verdict::Ok);
    }

    #[test]
    fn a_stale_read_after_a_completed_write_is_caught() {
        let h = vec![
            op(0, 0, Some(1), RegIn::Write(1), RegOut::Ok),
            op(0, 2, Some(3), RegIn::Write(2), RegOut::Ok),
            op(1, 4, Some(5), RegIn::Read, RegOut::Value(Some(1))),
        ];
        assert_eq!(check(&Register, &h, MAX), Verdict::Illegal);
    }

    #[test]
    fn concurrent_operations_may_take_effect_in_either_order() {
        let h = vec![
            op(0, 0, Some(10), RegIn::Write(1), RegOut::Ok),
            op(1, 1, Some(9), RegIn::Write(2), RegOut::Ok),
            op(2, 11, Some(12), RegIn::Read, RegOut::Value(Some(1))),
            op(3, 2, Some(3), RegIn::Read, RegOut::Value(Some(2))),
        ];
        assert_eq!(check(&Register, &h, MAX), Verdict::Ok);
    }

    #[test]
    fn two_cas_from_the_same_value_cannot_both_win() {
        let h = vec![
            op(0, 0, Some(1), RegIn::Write(1), RegOut::Ok),
            op(1, 2, Some(6), RegIn::Cas { expect: 1, new: 2 }, RegOut::Ok),
            op(2, 3, Some(7), RegIn::Cas { expect: 1, new: 3 }, RegOut::Ok),
        ];
        assert_eq!(check(&Register, &h, MAX), Verdict::Illegal);
    }

    #[test]
    fn an_unknown_write_may_or_may_not_have_happened() {
        // Seen by a later read.
        let seen = vec![
            op(0, 0, Some(1), RegIn::Write(1), RegOut::Ok),
            op(1, 2, None, RegIn::Write(2), RegOut::Unknown),
            op(0, 5, Some(6), RegIn::Read, RegOut::Value(Some(2))),
        ];
        assert_eq!(check(&Register, &seen, MAX), Verdict::Ok);
        // Never seen.
        let lost = vec![
            op(0, 0, Some(1), RegIn::Write(1), RegOut::Ok),
            op(1, 2, None, RegIn::Write(2), RegOut::Unknown),
            op(0, 5, Some(6), RegIn::Read, RegOut::Value(Some(1))),
        ];
        assert_eq!(check(&Register, &lost, MAX), Verdict::Ok);
        // But an acknowledged write cannot vanish.
        let vanished = vec![
            op(0, 0, Some(1), RegIn::Write(1), RegOut::Ok),
            op(1, 2, Some(3), RegIn::Write(2), RegOut::Ok),
            op(0, 5, Some(6), RegIn::Read, RegOut::Value(Some(1))),
        ];
        assert_eq!(check(&Register, &vanished, MAX), Verdict::Illegal);
    }

    #[test]
    fn a_value_cannot_come_back_after_it_was_overwritten() {
        let h = vec![
            op(0, 0, Some(1), RegIn::Write(1), RegOut::Ok),
            op(0, 2, Some(3), RegIn::Write(2), RegOut::Ok),
            op(1, 4, Some(5), RegIn::Read, RegOut::Value(Some(2))),
            op(2, 6, Some(7), RegIn::Read, RegOut::Value(Some(1))),
        ];
        assert_eq!(check(&Register, &h, MAX), Verdict::Illegal);
    }

    #[test]
    fn the_step_bound_gives_unknown_not_a_hang() {
        // Many concurrent unknown writes and reads force a wide search.
        let mut h = Vec::new();
        for c in 0..40u64 {
            h.push(op(c as usize, c, None, RegIn::Write(c + 1), RegOut::Unknown));
        }
        h.push(op(99, 100, Some(101), RegIn::Read, RegOut::Value(Some(12345))));
        assert_eq!(check(&Register, &h, 10_000), Verdict::Unknown);
    }
}
