//! The whole memory manager against its invariants: random memory calls on a two-node
//! manager over real (unregistered) guest RAM, `check_invariants()` after every one.

use proptest::prelude::*;
use protocol::memcall::flags;

use super::addr::NodeId;
use super::frames::policy::Policy;
use super::space::SpaceError;
use super::{MemoryError, MemoryManager};

/// A two-node memory manager over real (unregistered) guest RAM, without KVM.
fn manager() -> MemoryManager {
    super::standalone(&[32 << 20, 32 << 20]).unwrap()
}

#[derive(Debug, Clone)]
enum Op {
    Alloc { size: u64, fl: u32, policy: u8, node: u8 },
    Lazy { size: u64 },
    Free(usize),
    Protect { i: usize, first: u64, pages: u64, p: u32 },
    Move(usize),
    Fault { i: usize, page: u64 },
    Wild(u64),
}

fn op() -> impl Strategy<Value = Op> {
    let fl = prop::sample::select(vec![
        0,
        flags::CONTIGUOUS,
        flags::HUGE,
        flags::POPULATE,
        flags::DMA32,
        flags::HUGE | flags::CONTIGUOUS,
        1 << 30,
    ]);
    prop_oneof![
        4 => (1u64..6 << 20, fl, 0u8..5, 0u8..3).prop_map(|(size, fl, policy, node)| Op::Alloc { size, fl, policy, node }),
        1 => (1u64..4 << 20).prop_map(|size| Op::Lazy { size }),
        3 => any::<usize>().prop_map(Op::Free),
        2 => (any::<usize>(), 0u64..8, 0u64..8, 0u32..8).prop_map(|(i, first, pages, p)| Op::Protect { i, first, pages, p }),
        1 => any::<usize>().prop_map(Op::Move),
        2 => (any::<usize>(), 0u64..1024).prop_map(|(i, page)| Op::Fault { i, page }),
        1 => any::<u64>().prop_map(Op::Wild),
    ]
}

fn policy(p: u8, node: u8) -> Policy {
    match p {
        0 => Policy::Local,
        1 => Policy::Bind(NodeId(node.into())),
        2 => Policy::Preferred(NodeId(node.into())),
        _ => Policy::Interleave,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn invariants_hold_after_every_operation(ops in prop::collection::vec(op(), 1..60)) {
        let mut mm = manager();
        let total: u64 = mm.frames().snapshot().nodes.iter().map(|n| n.frames_total).sum();
        let mut live: Vec<u64> = Vec::new();
        for op in ops {
            let pick = |i: usize, live: &Vec<u64>| (!live.is_empty()).then(|| live[i % live.len()]);
            match op {
                Op::Alloc { size, fl, policy: p, node } => {
                    match mm.alloc_region(size, fl, policy(p, node), NodeId(0)) {
                        Ok((va, len)) => {
                            prop_assert!(len >= size);
                            live.push(va);
                        }
                        Err(e) if e.guest_status().is_none() => return Err(TestCaseError::fail(e.to_string())),
                        Err(_) => {}
                    }
                }
                Op::Lazy { size } => {
                    if let Ok((va, _)) = mm.map_lazy(size, 0, Policy::Local, NodeId(1)) {
                        live.push(va);
                    }
                }
                Op::Free(i) => {
                    if let Some(va) = pick(i, &live) {
                        mm.free_region(va).unwrap();
                        live.retain(|&v| v != va);
                        // A second free is refused and changes nothing.
                        prop_assert!(matches!(mm.free_region(va), Err(MemoryError::Space(SpaceError::DoubleFree))));
                    }
                }
                Op::Protect { i, first, pages, p } => {
                    if let Some(va) = pick(i, &live) {
                        let r = mm.protect_region(va + first * 4096, pages * 4096, p);
                        prop_assert!(r.as_ref().map_err(MemoryError::guest_status).err() != Some(None), "{r:?}");
                    }
                }
                Op::Move(i) => {
                    if let Some(va) = pick(i, &live) {
                        let new = mm.move_region(va).unwrap();
                        live.retain(|&v| v != va);
                        live.push(new);
                    }
                }
                Op::Fault { i, page } => {
                    if let Some(va) = pick(i, &live) {
                        let r = mm.fault_lazy(va + page * 4096);
                        prop_assert!(r.as_ref().map_err(MemoryError::guest_status).err() != Some(None), "{r:?}");
                    }
                }
                Op::Wild(va) => {
                    if !live.contains(&va) {
                        prop_assert!(mm.free_region(va).is_err());
                    }
                }
            }
            mm.flush().unwrap();
            mm.check_invariants().map_err(TestCaseError::fail)?;
        }
        for va in live {
            mm.free_region(va).unwrap();
        }
        mm.flush().unwrap();
        mm.check_invariants().map_err(TestCaseError::fail)?;
        // Everything is back but the page tables.
        let free: u64 = mm.frames().snapshot().nodes.iter().map(|n| n.frames_free).sum();
        prop_assert_eq!(free + mm.space().page_tables().table_pages(), total);
    }
}

/// Free frames, every node.
fn free_frames(mm: &MemoryManager) -> u64 {
    mm.frames().snapshot().nodes.iter().map(|n| n.frames_free).sum()
}

#[test]
fn memory_pressure_takes_the_slabs_cached_empty_slabs() {
    use crate::config::BalloonConfig;
    use crate::memory::addr::PAGE_SIZE;
    let mut mm = super::standalone(&[16 << 20]).unwrap();
    // 64-byte objects in 20 slabs, then all freed: their slabs stay cached for reuse.
    let class = protocol::slab::class_for(64, 8).unwrap();
    let mut objs = Vec::new();
    for _ in 0..20 {
        objs.extend(mm.slab_exchange(0, NodeId(0), class, &[], 512).unwrap().0);
    }
    for chunk in objs.chunks(512) {
        mm.slab_exchange(0, NodeId(0), class, chunk, 0).unwrap();
    }
    mm.flush().unwrap();
    let cached = |mm: &MemoryManager| mm.slabs().info()[class].cached_empty;
    assert!(cached(&mm) >= 8, "{:?}", mm.slabs().info()[class]);
    // A balloon asking for every frame: the free ones at once, then the cached slabs' (which no
    // guest free would ever give it), at the next flush.
    let free = free_frames(&mm);
    let cfg = BalloonConfig { size: mm.frames().total_pages() * PAGE_SIZE, deflate_on_oom: false, stats_interval_s: 0 };
    let before = mm.configure_balloon(cfg).unwrap().actual_frames;
    assert_eq!(before, free);
    mm.flush().unwrap();
    assert!(cached(&mm) <= 1, "{:?}", mm.slabs().info()[class]);
    assert!(mm.balloon().actual_frames > before + 8 * 7, "{} -> {}", before, mm.balloon().actual_frames);
    mm.check_invariants().unwrap();
}
