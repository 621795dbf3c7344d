//! The slab allocator against a model (proptest), with the invariants checked after every
//! operation, and the division-free object lookup.

use super::*;
use crate::memory::MemoryManager;
use proptest::prelude::*;
use std::collections::BTreeSet;

#[test]
fn reciprocals_divide_exactly_inside_a_slot() {
    for (c, &size) in CLASSES.iter().enumerate() {
        for off in 0..SLAB_SLOT {
            assert_eq!((off * RECIPROCALS[c]) >> 32, off / u64::from(size), "{off} / {size}");
        }
    }
}

/// A two-node memory manager over real (unregistered) guest RAM, without KVM.
fn manager() -> MemoryManager {
    crate::memory::standalone(&[16 << 20, 16 << 20]).unwrap()
}

#[derive(Debug, Clone)]
enum Pick {
    /// A live object of the class (by index into the model's set).
    Live(usize),
    /// An object freed earlier.
    Freed(usize),
    /// A live object plus a few bytes: inside an object, not at its start.
    Inside(usize, u64),
    /// An address that is no object.
    Wild(u64),
}

#[derive(Debug, Clone)]
enum Op {
    Exchange { cpu: u32, class: usize, frees: Vec<Pick>, want: usize },
    Free(usize, Pick),
    Info(usize, Pick),
}

fn pick() -> impl Strategy<Value = Pick> {
    prop_oneof![
        6 => any::<usize>().prop_map(Pick::Live),
        2 => any::<usize>().prop_map(Pick::Freed),
        1 => (any::<usize>(), 1u64..8).prop_map(|(i, d)| Pick::Inside(i, d)),
        1 => (0u64..1 << 20).prop_map(Pick::Wild),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    // A few classes, so slabs fill, empty and get reused; two page-run classes (slabs over
    // several slots, lookup by division).
    let class = prop::sample::select(vec![0usize, 4, 9, 16, FIRST_LARGE, NR_CLASSES - 1]);
    prop_oneof![
        6 => (0u32..3, class.clone(), prop::collection::vec(pick(), 0..40), 0usize..=128)
            .prop_map(|(cpu, class, frees, want)| Op::Exchange { cpu, class, frees, want }),
        2 => (class.clone(), pick()).prop_map(|(c, p)| Op::Free(c, p)),
        1 => (class, pick()).prop_map(|(c, p)| Op::Info(c, p)),
    ]
}

/// Resolves a pick against the model: the address and the status a free of it must get.
fn resolve(p: &Pick, live: &BTreeSet<u64>, freed: &[u64]) -> Option<(u64, u64)> {
    use protocol::status::*;
    let nth = |s: &BTreeSet<u64>, i: usize| (!s.is_empty()).then(|| *s.iter().nth(i % s.len()).unwrap());
    match *p {
        Pick::Live(i) => nth(live, i).map(|a| (a, OK)),
        Pick::Freed(i) => {
            (!freed.is_empty()).then(|| freed[i % freed.len()]).filter(|a| !live.contains(a)).map(|a| (a, EALREADY))
        }
        Pick::Inside(i, d) => nth(live, i).map(|a| (a + d, EFAULT)),
        Pick::Wild(a) => Some((a, EFAULT)),
    }
}

/// Whether a free's status `got` is the one the model expects (`want`). A stale free (of an
/// object freed before) finds its slab released if the slab emptied since (page-run classes
/// keep one empty slab and release the rest): then it is no object at all (EFAULT), which is
/// as right as EALREADY.
fn same_error(got: u64, want: u64) -> bool {
    got == want || (want == protocol::status::EALREADY && got == protocol::status::EFAULT)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn matches_model_with_invariants_after_every_operation(ops in prop::collection::vec(op(), 1..80)) {
        use protocol::status::OK;
        let mut mm = manager();
        // Model: live objects per class, and everything ever freed.
        let mut live: Vec<BTreeSet<u64>> = vec![BTreeSet::new(); NR_CLASSES];
        let mut freed: Vec<Vec<u64>> = vec![Vec::new(); NR_CLASSES];
        for op in ops {
            match op {
                Op::Exchange { cpu, class, frees, want } => {
                    let mut addrs = Vec::new();
                    let mut expect = Vec::new();
                    for p in &frees {
                        if let Some((a, st)) = resolve(p, &live[class], &freed[class]) {
                            // A pick may name the same live object twice: the second is a
                            // double free.
                            let st = if st == OK && addrs.contains(&a) { protocol::status::EALREADY } else { st };
                            addrs.push(a);
                            expect.push((a, st));
                        }
                    }
                    let (out, bad) = mm.slab_exchange(cpu, NodeId(cpu % 2), class, &addrs, want).unwrap();
                    let mut bad_iter = bad.iter();
                    for (a, st) in expect {
                        if st == OK {
                            prop_assert!(live[class].remove(&a));
                            freed[class].push(a);
                        } else {
                            let got = bad_iter.next().copied();
                            prop_assert!(got.is_some_and(|(b, s)| b == a && same_error(s, st)), "free of {:#x}: {:?}, want {}", a, got, st);
                        }
                    }
                    prop_assert!(bad_iter.next().is_none());
                    prop_assert!(out.len() <= want);
                    for o in out {
                        prop_assert!(live.iter().all(|l| !l.contains(&o)), "{:#x} handed out twice", o);
                        prop_assert_eq!(mm.slab_info(o).unwrap(), CLASSES[class]);
                        live[class].insert(o);
                    }
                }
                Op::Free(class, p) => {
                    if let Some((a, st)) = resolve(&p, &live[class], &freed[class]) {
                        let r = mm.slab_free(a);
                        match r {
                            Ok(()) => {
                                prop_assert_eq!(st, OK);
                                live[class].remove(&a);
                                freed[class].push(a);
                            }
                            Err(e) => prop_assert!(same_error(e.status(), st), "{} vs {}", e.status(), st),
                        }
                    }
                }
                Op::Info(class, p) => {
                    if let Some((a, st)) = resolve(&p, &live[class], &freed[class]) {
                        match mm.slab_info(a) {
                            Ok(size) => {
                                prop_assert_eq!(st, OK);
                                prop_assert_eq!(size, CLASSES[class]);
                            }
                            Err(e) => prop_assert!(same_error(e.status(), st), "{} vs {}", e.status(), st),
                        }
                    }
                }
            }
            mm.flush().unwrap();
            mm.check_invariants().map_err(TestCaseError::fail)?;
            let active: u64 = live.iter().map(|l| l.len() as u64).sum();
            prop_assert_eq!(mm.slabs().active(), active);
        }
    }
}
