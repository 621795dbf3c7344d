//! Swap-in: reading swapped pages back (pool or file, with read-ahead) and installing them.

use std::sync::atomic::Ordering;
use std::time::Instant;

use crate::memory::addr::{Gfn, PAGE_SIZE, to_usize};
use crate::memory::frames::page_state::FrameState;
use crate::sync::lock;

use super::file::AlignedBuf;
use super::{Loc, MAX_READAHEAD, SwapError, SwapStore};

impl SwapStore {
    /// Brings `gfn` back if it is `Swapped`, and up to `ahead` of the frames after it that are
    /// too (read-ahead for sequential faults). Returns `false` if `gfn` is not `Swapped`
    /// (another path got there first: the caller looks again).
    pub fn swap_in(&self, gfn: Gfn, ahead: usize) -> Result<bool, SwapError> {
        let start = Instant::now();
        if !self.states.transition(gfn, FrameState::Swapped, FrameState::Populating) {
            return Ok(false);
        }
        let mut frames = vec![gfn];
        let end = self.states.range_of(gfn).map_or(gfn, |r| r.1);
        for k in 1..=ahead.min(MAX_READAHEAD - 1) as u64 {
            let g = gfn.plus(k);
            if g >= end || !self.states.transition(g, FrameState::Swapped, FrameState::Populating) {
                break;
            }
            frames.push(g);
        }
        let res = self.read_in(&frames);
        // Whatever happened, no frame stays claimed but the failed one (the VM stops then).
        let ok = res.as_ref().map_or(0, |_| frames.len());
        for &g in &frames[ok..] {
            if g != gfn {
                self.states.transition(g, FrameState::Populating, FrameState::Swapped);
            }
        }
        res?;
        let ns = nanos(start);
        if frames.len() == 1 { &self.latency } else { &self.latency_readahead }.record(ns);
        self.counters.pages_in.add(frames.len() as u64);
        self.counters.readahead.add(frames.len() as u64 - 1);
        // Off the fault's path: whether any came back too soon after leaving.
        let mut recent = lock(&self.recent);
        let room = self.limit() / PAGE_SIZE;
        for &g in &frames {
            if recent.back(g, room) {
                self.counters.refaults.inc();
                self.set_warm(g);
            }
        }
        Ok(true)
    }

    /// Reads claimed (`Populating`) `frames` back and installs them; marks them `Resident`.
    fn read_in(&self, frames: &[Gfn]) -> Result<(), SwapError> {
        thread_local! {
            static BUF: std::cell::RefCell<AlignedBuf> =
                std::cell::RefCell::new(AlignedBuf::new(MAX_READAHEAD * to_usize(PAGE_SIZE)));
        }
        BUF.with(|b| {
            let mut b = b.borrow_mut();
            let buf = b.as_mut_slice();
            let page = to_usize(PAGE_SIZE);
            // Where each frame's data is; pool copies are taken out at once.
            let mut locs: Vec<Loc> =
                frames.iter().map(|&g| Loc::decode(self.location(g).load(Ordering::Acquire))).collect();
            if locs.iter().any(|l| matches!(l, Loc::Pool(_))) {
                let mut inner = lock(&self.inner);
                for (k, &g) in frames.iter().enumerate() {
                    // Again under the pool's lock: a writeback may have moved it to the file.
                    locs[k] = Loc::decode(self.location(g).load(Ordering::Acquire));
                    if let Loc::Pool(h) = locs[k] {
                        inner
                            .pool
                            .load(h, &mut buf[k * page..(k + 1) * page])
                            .map_err(|e| SwapError::Read { gpa: g.gpa().0, source: Box::new(e) })?;
                        let _ = inner.pool.remove(h);
                        self.location(g).store(0, Ordering::Release);
                    }
                }
            }
            // File copies: runs of consecutive slots in one read each. The slot stays the
            // frame's (a clean copy) until the page is written or freed.
            let mut k = 0;
            while k < frames.len() {
                let Loc::File(first) = locs[k] else {
                    if locs[k] == Loc::None {
                        return Err(SwapError::Lost { gpa: frames[k].gpa().0 });
                    }
                    k += 1;
                    continue;
                };
                let mut n = 1;
                while k + n < frames.len()
                    && u32::try_from(n)
                        .ok()
                        .and_then(|n| first.checked_add(n))
                        .is_some_and(|s| locs[k + n] == Loc::File(s))
                {
                    n += 1;
                }
                let t = Instant::now();
                self.file
                    .read(first, &mut buf[k * page..(k + n) * page])
                    .map_err(|e| SwapError::Read { gpa: frames[k].gpa().0, source: Box::new(e) })?;
                self.latency_read.record(nanos(t));
                k += n;
            }
            for (k, &g) in frames.iter().enumerate() {
                let t = Instant::now();
                self.install(g, &buf[k * page..(k + 1) * page])?;
                self.latency_install.record(nanos(t));
                self.states.transition(g, FrameState::Populating, FrameState::Resident);
            }
            Ok(())
        })
    }
}

fn nanos(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_nanos()).unwrap_or(u64::MAX)
}
