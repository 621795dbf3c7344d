//! Tests of the compressed pool.

// Test data and printed ratios: the casts are intentional.
#![allow(clippy::cast_possible_truncation, clippy::cast_precision_loss)]
use std::collections::HashMap;
use std::hint::black_box;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::test_runner::{TestCaseError, TestRunner};

use super::*;

const OUT: usize = lz4_flex::block::get_maximum_output_size(PAGE);
const BAD: fn(u32) -> PoolError = PoolError::BadHandle;

/// Kinds: 0 zero but one byte, 1 patterned ints, 2 text, 3 partly random, 4 random.
fn page(kind: u64, seed: u64) -> Vec<u8> {
    let lcg = |x: &u64| Some(x.wrapping_mul(0x5851_f42d_4c95_7f2d).wrapping_add(0x1405_7b7e_f767_814f));
    let mut rnd = std::iter::successors(Some(seed), lcg).skip(1).map(|x| (x >> 40) as u8);
    let words = ["guest ", "page ", "swap ", "the ", "memory ", "kernel ", "of ", "frame\n"];
    let ints = (0..PAGE as u32 / 4).flat_map(|i| (i % 256 * 3 + seed as u32).to_le_bytes());
    let mut p: Vec<u8> = match kind {
        0 => (0..PAGE).map(|i| u8::from(i == seed as usize % PAGE)).collect(),
        1 => ints.collect(),
        2 => (0..PAGE).flat_map(|_| words[usize::from(rnd.next().unwrap() % 8)].bytes()).collect(),
        3 => rnd.take(1024 + seed as usize % 1900).collect(),
        _ => rnd.take(PAGE).collect(),
    };
    p.resize(PAGE, 0);
    p
}

#[test]
fn round_trip() {
    let (mut pool, mut out, mut back) = (Pool::new(4 * CHUNK_U64), vec![0; OUT], vec![0; PAGE]);
    for (kind, seed) in (0..4).flat_map(|k| (0..5).map(move |s| (k, s * 331))) {
        let p = page(kind, seed);
        let n = pool.compress(&p, &mut out).unwrap_or_else(|| panic!("kind {kind} rejected"));
        let h = pool.insert(kind << 32 | seed, &out[..n]).unwrap();
        pool.load(h, &mut back).unwrap();
        assert!(back == p && pool.gfn_of(h) == Ok(kind << 32 | seed), "kind {kind} seed {seed}");
    }
    assert_eq!((pool.compress(&page(4, 1), &mut out), pool.stats().rejected), (None, 1));
    // Not lz4, a block of 100 bytes, and a good page loaded into a buffer of the wrong size.
    let h = [&[0xff; 40][..], &lz4_flex::compress(&[1; 100]), &lz4_flex::compress(&[1; PAGE])]
        .map(|c| pool.insert(9, c).unwrap());
    let loads = [pool.load(h[0], &mut back), pool.load(h[1], &mut back), pool.load(h[2], &mut [0; PAGE + 1])];
    assert_eq!((loads, pool.load(h[2], &mut back)), (h.map(|h| Err(PoolError::Corrupt(h))), Ok(())));
    assert_eq!((pool.insert(1, &[]), pool.insert(1, &[0; MAX_STORED + 1])), (None, None));
    assert_eq!((Pool::new(CHUNK_U64 - 1).insert(1, &[1]), pool.stats().inserts), (None, 23));
    pool.check_invariants().unwrap();
}

#[test]
fn stale_and_forged_handles() {
    let (mut pool, mut out) = (Pool::new(8 * CHUNK_U64), vec![0; OUT]);
    let n = pool.compress(&page(3, 1500), &mut out).unwrap();
    let hs: Vec<_> = (0..400).map(|g| pool.insert(g, &out[..n]).unwrap()).collect();
    pool.retire_oldest();
    assert_eq!((pool.gfn_of(hs[0]), pool.remove(hs[1])), (Err(BAD(hs[0])), Err(BAD(hs[1]))));
    assert_eq!((pool.remove(hs[200]), pool.remove(hs[200])), (Ok(200), Err(BAD(hs[200]))));
    assert_eq!(pool.load(hs[200], &mut [0; PAGE]), Err(BAD(hs[200])));
    let live: HashMap<u32, u64> =
        hs.iter().copied().zip(0..).filter(|&(h, g)| h >> OFF_BITS != hs[0] >> OFF_BITS && g != 200).collect();
    assert!(live.iter().all(|(&h, &g)| pool.gfn_of(h) == Ok(g)));
    let near = (0..6u32, 0..1u32 << OFF_BITS).prop_map(|(s, o)| s << OFF_BITS | o); // into live chunks
    let pool = std::cell::RefCell::new(pool);
    let check = |h| {
        let mut pool = pool.borrow_mut();
        if let Some(&g) = live.get(&h) {
            prop_assert_eq!(pool.gfn_of(h), Ok(g));
        } else {
            let got = (pool.gfn_of(h), pool.load(h, &mut [0; PAGE]), pool.remove(h));
            prop_assert_eq!(got, (Err(BAD(h)), Err(BAD(h)), Err(BAD(h))));
        }
        Ok(())
    };
    TestRunner::default().run(&prop_oneof![any::<u32>(), near], check).unwrap();
    // A payload that looks like a live header (guests choose page contents) is no entry.
    let mut pool = pool.into_inner();
    let hb = pool.insert(1, &[0; 48]).unwrap();
    let fake = Header { gfn: 42, len: 16, flags: LIVE, tag: hb + 6 }.encode(); // as if the key were 0
    assert_eq!(pool.insert(1, &[[0; 16], fake, [0; 16]].concat()), Some(hb + 4));
    assert_eq!(pool.gfn_of(hb + 6), Err(BAD(hb + 6)));
    pool.check_invariants().unwrap();
}

#[test]
fn capacity_and_lru() {
    let (mut pool, blob, per, hs) =
        (Pool::new(4 * CHUNK_U64 + 100), [0xab; 3000], CHUNK / entry_size(3000), &mut vec![]);
    while let Some(h) = pool.insert(hs.len() as u64, &blob) {
        hs.push(h);
    }
    assert_eq!((hs.len(), pool.bytes(), pool.capacity(), pool.has_room(3000)), (4 * per, 4 << 18, 4 << 18, false));
    pool.remove(hs[1]).unwrap();
    let oldest = pool.oldest_live();
    assert_eq!(oldest, (0..per).filter(|&i| i != 1).map(|i| (i as u64, hs[i])).collect::<Vec<_>>());
    // Written back: removed, then retired. The emptied oldest chunk waits for retire_oldest.
    assert!(oldest.iter().all(|&(_, h)| pool.remove(h).is_ok()));
    assert_eq!((pool.bytes(), pool.has_room(3000)), (4 << 18, false));
    pool.retire_oldest();
    let s = pool.stats();
    assert_eq!(
        (s.bytes, s.entries, pool.gfn_of(hs[0]), pool.gfn_of(hs[per])),
        (3 << 18, 3 * per as u64, Err(BAD(hs[0])), Ok(per as u64))
    );
    hs.push(pool.insert(99, &blob).unwrap());
    for (i, &h) in hs[2 * per..3 * per].iter().enumerate() {
        assert_eq!(pool.stats().chunks, 4, "a middle chunk with {} live entries was retired", per - i);
        pool.remove(h).unwrap();
    }
    let s = pool.stats();
    assert_eq!((s.chunks, s.retired_chunks, pool.gfn_of(hs[2 * per])), (3, 2, Err(BAD(hs[2 * per]))));
    pool.remove(hs[4 * per]).unwrap();
    assert_eq!(pool.stats().chunks, 3, "the chunk being filled stays");
    pool.set_capacity(2 * CHUNK_U64);
    assert_eq!((pool.over_capacity(), pool.has_room(16)), (CHUNK_U64, true));
    pool.check_invariants().unwrap();
    // An emptied chunk being filled goes once a new chunk is needed.
    let mut pool = Pool::new(3 * CHUNK_U64);
    for g in 0..=2 * per as u64 {
        let h = pool.insert(g, &blob).unwrap();
        if g >= per as u64 {
            pool.remove(h).unwrap();
        }
    }
    assert_eq!((pool.stats().chunks, pool.stats().retired_chunks), (2, 1));
}

#[test]
fn sequence_numbers_wrap_without_aliasing() {
    let (mut pool, first, per) = (Pool::new(4 * CHUNK_U64), SEQ_SPAN - 2, CHUNK / entry_size(3000));
    pool.next_seq = first;
    let hs: Vec<_> = std::iter::from_fn(|| pool.insert(0, &[7; 3000])).collect();
    assert!(hs.len() == 4 * per && hs.iter().all(|&h| h < 1 << 30 && pool.gfn_of(h) == Ok(0)), "across the wrap");
    pool.check_invariants().unwrap();
    pool.set_capacity(8 * CHUNK_U64);
    hs[per..3 * per].iter().for_each(|&h| assert!(pool.remove(h).is_ok()));
    // The newest chunk is full; a new one numbered first + 2^16 would alias the oldest's handles.
    pool.next_seq = first + SEQ_SPAN;
    assert_eq!((pool.has_room(3000), pool.insert(0, &[1; 3000])), (false, None));
    pool.retire_oldest();
    assert!(pool.insert(0, &[1; 3000]).is_some() && pool.gfn_of(hs[3 * per]) == Ok(0));
    pool.check_invariants().unwrap();
}

/// What the model test stores: (compressed, page), 20 to 2950 bytes compressed.
fn corpus() -> &'static [(Vec<u8>, Vec<u8>)] {
    static C: OnceLock<Vec<(Vec<u8>, Vec<u8>)>> = OnceLock::new();
    C.get_or_init(|| {
        let (mut pool, mut out) = (Pool::new(0), vec![0; OUT]);
        let pages = (0..32).map(|i| page([0, 1, 2, 3, 3, 3][i % 6], i as u64 * 97));
        pages.map(|p| (pool.compress(&p, &mut out).map(|n| out[..n].to_vec()).unwrap(), p)).collect()
    })
}

#[derive(Clone, Debug)]
enum Op {
    Insert(usize, u64),
    Remove(usize),
    Load(usize),
    Retire,
    Forged(u32),
    SetCap(u64),
}

/// Handle -> (gfn, corpus index).
type Model = HashMap<PoolHandle, (u64, usize)>;

/// What the caller does to make room: write back the oldest chunk's entries (here: forget
/// them), `remove` them or not, and retire the chunk.
fn writeback(pool: &mut Pool, model: &mut Model, remove: bool) -> Result<(), TestCaseError> {
    let old = pool.oldest_live();
    prop_assert!(old.windows(2).all(|w| w[0].1 < w[1].1), "not in insertion order");
    for &(g, h) in &old {
        prop_assert_eq!(model.remove(&h).map(|m| m.0), Some(g));
        prop_assert!(!remove || pool.remove(h) == Ok(g));
    }
    pool.retire_oldest();
    prop_assert!(old.iter().all(|&(_, h)| pool.gfn_of(h) == Err(BAD(h))));
    Ok(())
}

proptest! {
       #![proptest_config(ProptestConfig::with_cases(32))]
       #[test]
       fn matches_model(ops in prop::collection::vec(prop_oneof![
           200 => (0..32usize, any::<u64>()).prop_map(|(i, g)| Op::Insert(i, g)),
           50 => any::<usize>().prop_map(Op::Remove),
           30 => any::<usize>().prop_map(Op::Load),
           1 => Just(Op::Retire),
           20 => any::<u32>().prop_map(Op::Forged),
           1 => (1..5u64).prop_map(Op::SetCap),
       ], 1..3000)) {
           let (mut pool, mut model, mut buf) = (Pool::new(2 * CHUNK_U64), Model::new(), vec![0; PAGE]);
           for op in ops {
               let mut keys: Vec<_> = model.keys().copied().collect();
               keys.sort_unstable();
               let pick = |i: usize| keys.get(i % keys.len().max(1)).copied();
               match op {
                   Op::Insert(i, gfn) => {
                       let c = &corpus()[i].0;
                       for retry in [false, true] {
                           let (room, h) = (pool.has_room(c.len()), pool.insert(gfn, c));
                           prop_assert_eq!(room, h.is_some());
                           match h {
                               Some(h) => {
prop_assert!(model.insert(h, (gfn, i)).is_none());
break;
}
                               None if !retry => writeback(&mut pool, &mut model, true)?,
                               None => {}
                           }
                       }
                   }
                   Op::Remove(i) => if let Some(h) = pick(i) {
                       prop_assert_eq!(pool.remove(h), Ok(model.remove(&h).unwrap().0));
                       prop_assert_eq!(pool.remove(h), Err(BAD(h)));
                   },
                   Op::Load(i) => if let Some(h) = pick(i) {
                       prop_assert_eq!(pool.load(h, &mut buf), Ok(()));
                       prop_assert!(buf == corpus()[model[&h].1].1);
                   },
                   Op::Retire => writeback(&mut pool, &mut model, false)?,
                   Op::Forged(h) => if let Some(&(g, _)) = model.get(&h) {
                       prop_assert_eq!(pool.gfn_of(h), Ok(g));
                   } else {
                       prop_assert_eq!((pool.remove(h), pool.load(h, &mut buf)), (Err(BAD(h)), Err(BAD(h))));
                   },
                   Op::SetCap(n) => pool.set_capacity(n * CHUNK_U64),
               }
               pool.check_invariants().map_err(TestCaseError::fail)?;
               let s = pool.stats();
               let stored: usize = model.values().map(|&(_, i)| corpus()[i].0.len()).sum();
               prop_assert_eq!((s.entries, s.stored_bytes, s.bytes), (model.len() as u64, stored as u64, s.chunks * CHUNK_U64));
           }
       }
   }

/// Checked with `mincore`, which fails with ENOMEM on an unmapped range: exact per chunk,
/// where `VmRSS` moves with whatever else the process does. Another test thread may map the
/// freed range at once; then the range no longer holds the chunk's first header.
#[test]
fn retired_chunks_are_unmapped() {
    let mut pool = Pool::new(64 * CHUNK_U64);
    while pool.insert(0, &[0x11; 3000]).is_some() {}
    let chunks: Vec<_> = pool.chunks.iter().map(|c| (c.base.as_ptr(), c.header(0).unwrap().encode())).collect();
    let mut fds = [0; 2];
    // SAFETY: pipe() writes two new descriptors into fds.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    let state = |(p, hdr): (*mut u8, [u8; HDR])| {
        let (mut v, mut got) = ([0u8; CHUNK / 4096], [0u8; HDR]);
        // SAFETY: mincore reads no memory and writes a byte per page of the range into v (room
        // for pages of 4 KiB or more); write() reads [p, p + 16) in the kernel, which returns
        // EFAULT for unmapped memory rather than faulting; read() writes only into got.
        unsafe {
            if libc::mincore(p.cast(), CHUNK, v.as_mut_ptr()) != 0 {
                return Err(std::io::Error::last_os_error().raw_os_error());
            }
            let ours =
                libc::write(fds[1], p.cast(), HDR) == 16 && libc::read(fds[0], got.as_mut_ptr().cast(), HDR) == 16;
            Ok((v.iter().filter(|&&b| b & 1 != 0).count(), ours && got == hdr))
        }
    };
    assert!(chunks.len() == 64 && chunks.iter().all(|&c| state(c).is_ok_and(|(n, ours)| n > 0 && ours)));
    while pool.bytes() > 0 {
        pool.retire_oldest();
    }
    let gone = |c| matches!(state(c), Err(Some(libc::ENOMEM)) | Ok((_, false)));
    assert!(chunks.iter().all(|&c| gone(c)), "a retired chunk is still mapped");
    // SAFETY: closes the two descriptors pipe() made.
    unsafe { (libc::close(fds[0]), libc::close(fds[1])) };
    assert_eq!(pool.stats().retired_chunks, 64);
}

#[test]
fn ratio_and_speed() {
    let (mut pool, mut out, mut buf) = (Pool::new(0), vec![0; OUT], vec![0; PAGE]);
    let pages: Vec<_> = (0..1000u64).map(|i| page(i % 5, i * 7919)).collect();
    let (mut stored, mut ct, mut dt) = (Vec::new(), Duration::ZERO, Duration::ZERO);
    for p in &pages {
        let t = Instant::now();
        let n = pool.compress(black_box(p), &mut out);
        ct += t.elapsed();
        stored.extend(n.map(|n| out[..n].to_vec()));
    }
    for c in &stored {
        let t = Instant::now();
        decompress_into(black_box(c), &mut buf).unwrap();
        dt += t.elapsed();
    }
    let (n, bytes) = (stored.len(), stored.iter().map(Vec::len).sum::<usize>());
    let (ratio, all) = (bytes as f64 / (n * PAGE) as f64, (bytes + (1000 - n) * PAGE) as f64 / (1000 * PAGE) as f64);
    let (cns, dns) = (ct.as_nanos() / 1000, dt.as_nanos() / n as u128);
    println!("pool: {n}/1000 pages stored at {ratio:.3} of their size; all pages (rejected ones as {PAGE}) {all:.3}");
    println!("pool: compress {cns} ns/page, decompress {dns} ns/page");
    assert_eq!(pool.stats().rejected, 200);
}
