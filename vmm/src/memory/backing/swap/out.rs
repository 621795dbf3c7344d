//! Swap-out: staging evicted pages (under the memory manager's lock) and writing them out
//! (without it): kept clean copies, zero pages, the compressed pool, the file, and putting a
//! page back when its write fails.

use std::sync::MutexGuard;
use std::sync::atomic::Ordering;

use crate::memory::addr::{Gfn, PAGE_SIZE, to_usize};
use crate::memory::frames::page_state::FrameState;
use crate::sync::lock;

use super::super::uffd::UffdError;
use super::file::{AlignedBuf, SwapFileError};
use super::{Loc, STAGE_PAGES, STAGING_AREAS, Staging, SwapError, SwapStore, set_bit, take_bit, test_bit};

/// An eviction's outcome: the frame, its new state, and its new location (`None`: the one it
/// has).
type Done = (Gfn, FrameState, Option<Loc>);

/// A batch between [`SwapStore::prepare`] and [`SwapStore::finish`]: the outcomes decided so
/// far, and the staged pages bound for the file with the slots they got (fewer when the file
/// is full: the rest go back).
#[derive(Debug)]
pub struct Prepared {
    done: Vec<Done>,
    to_file: Vec<usize>,
    slots: Vec<u32>,
}

/// 8-byte words in a page.
const WORDS: usize = 512;

/// How many of a page's 8-byte words are zero; or 0 as soon as it is clear the page is neither
/// empty nor half empty: more than half its words are not zero, or none of its first 16 are
/// (a dense page: reading it to the end would cost a trip to memory per cache line for
/// nothing).
fn zero_words(page: &[u8]) -> usize {
    let (mut zeros, mut others) = (0, 0);
    for w in page.chunks_exact(8) {
        if u64::from_ne_bytes(w.try_into().unwrap_or([1; 8])) == 0 {
            zeros += 1;
        } else {
            others += 1;
            if others > WORDS / 2 || others == 16 && zeros == 0 {
                return 0;
            }
        }
    }
    zeros
}

impl SwapStore {
    /// Staging area `area` (`< STAGING_AREAS`), for one eviction batch at a time.
    pub fn lock_staging(&self, area: usize) -> MutexGuard<'_, Staging> {
        lock(&self.staging[area % STAGING_AREAS])
    }

    /// Moves the pages of `frames` that are `Resident` into the staging area, each claimed
    /// (`SwappingOut`) first; the caller holds the memory manager's lock, so no free or
    /// reallocation can interleave. Returns, per frame, whether it was staged (a frame in
    /// another state, or whose page the kernel will not move right now, is left alone).
    pub fn stage(&self, st: &mut Staging, frames: &[Gfn]) -> Result<Vec<bool>, SwapError> {
        let mut staged = vec![false; frames.len()];
        // Claim first, as many as there is room for.
        let room = STAGE_PAGES - st.gfns.len();
        let mut claimed: Vec<(usize, u64)> = Vec::with_capacity(room.min(frames.len()));
        for (i, &gfn) in frames.iter().enumerate() {
            if claimed.len() == room {
                break;
            }
            let Some(hva) = self.ram.host_addr(gfn.gpa()) else { continue };
            if test_bit(&self.evicting, gfn) {
                // Freed, handed out again and resident, while its last eviction is in flight.
                continue;
            }
            if self.states.transition(gfn, FrameState::Resident, FrameState::SwappingOut) {
                set_bit(&self.evicting, gfn);
                claimed.push((i, hva as u64));
            }
        }
        // Then move them, a run of consecutive pages (in guest RAM and so in the staging area)
        // per call: one call per page costs 16 times more here.
        let mut k = 0;
        while k < claimed.len() {
            let mut n = 1;
            while k + n < claimed.len() && claimed[k + n].1 == claimed[k].1 + n as u64 * PAGE_SIZE {
                n += 1;
            }
            let slot = st.slot_addr(st.gfns.len());
            // SAFETY: the source is guest RAM and the destination staging slots, all registered
            // with this userfaultfd; no Rust reference covers either (guest memory is only
            // accessed through raw pointers and volatile slices).
            let res = unsafe { self.uffd.move_pages(slot, claimed[k].1, n as u64 * PAGE_SIZE) };
            let moved = match &res {
                Ok(bytes) => to_usize(*bytes / PAGE_SIZE).min(n),
                Err(UffdError::Again { copied, .. } | UffdError::Exists { copied, .. }) => to_usize(copied / PAGE_SIZE),
                Err(_) => 0,
            };
            for &(i, _) in &claimed[k..k + moved] {
                st.gfns.push(frames[i]);
                st.dirty.push(true);
                staged[i] = true;
            }
            k += moved;
            if moved < n {
                // The page at `k` would not move (busy: pinned, or under migration): it stays
                // where it is; the rest of the run is tried again.
                let (i, _) = claimed[k];
                self.unclaim(frames[i]);
                if let Err(source) = res
                    && !matches!(source, UffdError::Again { .. } | UffdError::Exists { .. })
                {
                    for &(j, _) in &claimed[k + 1..] {
                        self.unclaim(frames[j]);
                    }
                    return Err(SwapError::Uffd { gpa: frames[i].gpa().0, source });
                }
                self.counters.busy.inc();
                k += 1;
            }
        }
        Ok(staged)
    }

    /// Writes out what [`stage`](Self::stage) moved, without the memory manager's lock: each
    /// page ends `Swapped` (in the pool or the file, or as a kept clean copy), `Zero`, or back
    /// in guest RAM if it could not be written. Empties the staging area. (The three steps of
    /// [`prepare`](Self::prepare), [`write_prepared`](Self::write_prepared) and
    /// [`finish`](Self::finish), in one go.)
    pub fn commit(&self, st: &mut Staging) -> Result<(), SwapError> {
        let p = self.prepare(st)?;
        let written = self.write_prepared(st, &p);
        self.finish(st, p, written)
    }

    /// Decides where each staged page goes: kept clean copies, zero pages and the pool are
    /// dealt with at once; the rest get file slots, to be written by
    /// [`write_prepared`](Self::write_prepared).
    pub fn prepare(&self, st: &Staging) -> Result<Prepared, SwapError> {
        let mut to_file = Vec::new();
        let mut done: Vec<Done> = Vec::with_capacity(st.gfns.len());
        let mut cbuf = vec![0u8; lz4_flex::block::get_maximum_output_size(to_usize(PAGE_SIZE))];
        for i in 0..st.gfns.len() {
            let gfn = st.gfns[i];
            let page = st.page(i);
            let kept = Loc::decode(self.location(gfn).load(Ordering::Acquire));
            if !st.dirty[i] && matches!(kept, Loc::File(_)) {
                self.counters.clean_drops.inc();
                done.push((gfn, FrameState::Swapped, None));
                continue;
            }
            if kept != Loc::None {
                // Written since: the kept copy is stale.
                self.release(&mut lock(&self.inner), gfn);
            }
            let zeros = zero_words(page);
            if zeros == WORDS {
                self.counters.zero_pages.inc();
                done.push((gfn, FrameState::Zero, None));
                continue;
            }
            // The pool admits pages that came back soon after their last eviction (the guest's
            // working set, just larger than the limit: cheap to bring back from memory), and
            // pages at least half zero (small once compressed). A cold page seen once goes to
            // the file: compressing it would cost CPU, and pool space it would not repay.
            let admit = self.compress && (self.take_warm(gfn) || zeros >= WORDS / 2);
            // (The pool's lock is taken and dropped here: `pool_insert` takes it again.)
            let compressed = if admit { lock(&self.inner).pool.compress(page, &mut cbuf) } else { None };
            if let Some(n) = compressed
                && let Some(h) = self.pool_insert(gfn, &cbuf[..n])?
            {
                self.counters.pool_stores.inc();
                done.push((gfn, FrameState::Swapped, Some(Loc::Pool(h))));
                continue;
            }
            to_file.push(i);
        }
        let mut slots = Vec::with_capacity(to_file.len());
        let got = if self.file_full() || to_file.is_empty() { 0 } else { self.file.alloc(to_file.len(), &mut slots) };
        if got < to_file.len() {
            self.block_file();
            self.counters.enospc.add((to_file.len() - got) as u64);
        }
        Ok(Prepared { done, to_file, slots })
    }

    /// Writes the pages `p` sent to the file: the slow part, which needs no lock (another
    /// thread may do it while the next batch is staged).
    pub fn write_prepared(&self, st: &Staging, p: &Prepared) -> Result<(), SwapFileError> {
        if p.slots.is_empty() {
            return Ok(());
        }
        let pages: Vec<&[u8]> = p.to_file[..p.slots.len()].iter().map(|&i| st.page(i)).collect();
        self.file.write(&p.slots, &pages)
    }

    /// Ends the batch once its write is over (`written`): its pages are recorded where they
    /// went, those that could not be written go back into guest RAM, and the staging area is
    /// emptied.
    pub fn finish(
        &self,
        st: &mut Staging,
        mut p: Prepared,
        written: Result<(), SwapFileError>,
    ) -> Result<(), SwapError> {
        let ok = match written {
            Ok(()) => true,
            Err(e) => {
                self.write_failed(&e);
                for &s in &p.slots {
                    self.file.free(s);
                }
                false
            }
        };
        let mut res = Ok(());
        for (k, &i) in p.to_file.iter().enumerate() {
            if ok && k < p.slots.len() {
                self.counters.file_writes.inc();
                self.file_pages.fetch_add(1, Ordering::Relaxed);
                p.done.push((st.gfns[i], FrameState::Swapped, Some(Loc::File(p.slots[k]))));
            } else if let Err(e) = self.put_back(st.gfns[i], st.page(i)) {
                res = Err(e);
            }
        }
        self.finalize(&p.done);
        let len = st.gfns.len() as u64 * PAGE_SIZE;
        st.gfns.clear();
        st.dirty.clear();
        // SAFETY: drops only staging pages (ours); their data is in swap, back in guest RAM,
        // or was dropped with its frame.
        let rc = unsafe { libc::madvise(st.base as *mut libc::c_void, to_usize(len), libc::MADV_DONTNEED) };
        if rc != 0 {
            return Err(SwapError::Discard(std::io::Error::last_os_error()));
        }
        res
    }

    fn write_failed(&self, e: &SwapFileError) {
        self.block_file();
        if matches!(e, SwapFileError::NoSpace) {
            self.counters.enospc.inc();
        } else {
            self.counters.io_errors.inc_logged(|| log::warn!("swap: {}", crate::error_chain(e)));
        }
    }

    /// Stores a compressed page in the pool, writing back its oldest pages to the file to
    /// make room. `None`: no room (the page goes to the file).
    fn pool_insert(&self, gfn: Gfn, data: &[u8]) -> Result<Option<u32>, SwapError> {
        loop {
            {
                let mut inner = lock(&self.inner);
                if let Some(h) = inner.pool.insert(gfn.0, data) {
                    return Ok(Some(h));
                }
                if inner.pool.bytes() == 0 || self.file_full() {
                    return Ok(None);
                }
            }
            if !self.pool_writeback()? {
                return Ok(None);
            }
        }
    }

    /// Writes the pool's oldest chunk back to the file and retires it. Only the evictor (the
    /// holder of the staging lock, the pool's only inserter) calls this. Returns whether it
    /// freed pool memory.
    pub fn pool_writeback(&self) -> Result<bool, SwapError> {
        let (entries, buf) = {
            let inner = lock(&self.inner);
            let entries = inner.pool.oldest_live();
            let mut buf = AlignedBuf::new(entries.len().max(1) * to_usize(PAGE_SIZE));
            for (k, &(_, h)) in entries.iter().enumerate() {
                let page = &mut buf.as_mut_slice()[k * to_usize(PAGE_SIZE)..(k + 1) * to_usize(PAGE_SIZE)];
                inner.pool.load(h, page).map_err(|e| SwapError::Read { gpa: 0, source: Box::new(e) })?;
            }
            (entries, buf)
        };
        let mut slots = Vec::with_capacity(entries.len());
        if !entries.is_empty() {
            if self.file_full() || self.file.alloc(entries.len(), &mut slots) < entries.len() {
                for &s in &slots {
                    self.file.free(s);
                }
                self.block_file();
                return Ok(false);
            }
            let pages: Vec<&[u8]> = buf.as_slice().chunks(to_usize(PAGE_SIZE)).take(entries.len()).collect();
            if let Err(e) = self.file.write(&slots, &pages) {
                self.write_failed(&e);
                for &s in &slots {
                    self.file.free(s);
                }
                return Ok(false);
            }
        }
        let mut inner = lock(&self.inner);
        for (&(g, h), &slot) in entries.iter().zip(&slots) {
            let loc = self.location(Gfn(g));
            // Only if the frame still has this pool copy (not swapped in or freed meanwhile).
            if loc
                .compare_exchange(Loc::Pool(h).encode(), Loc::File(slot).encode(), Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                self.counters.pool_writebacks.inc();
                self.counters.file_writes.inc();
                self.file_pages.fetch_add(1, Ordering::Relaxed);
                let _ = inner.pool.remove(h);
            } else {
                self.file.free(slot);
            }
        }
        inner.pool.retire_oldest();
        Ok(true)
    }

    /// Ends the eviction of each `(gfn, to, loc)`: records its new location (or keeps the one
    /// it has when `loc` is `None`) and moves it to `to`. If the frame was freed meanwhile,
    /// whatever copy it has is dropped instead.
    /// All of a batch's at once, under one lock.
    fn finalize(&self, done: &[Done]) {
        let mut inner = lock(&self.inner);
        let mut recent = lock(&self.recent);
        for &(gfn, to, loc) in done {
            if let Some(l) = loc {
                self.location(gfn).store(l.encode(), Ordering::Release);
            }
            // Still this eviction's claim (no other can exist while `evicting` is set), or the
            // frame was freed meanwhile and its copy goes.
            if self.states.transition(gfn, FrameState::SwappingOut, to) {
                self.counters.pages_out.inc();
                recent.evicted(gfn);
            } else {
                self.release(&mut inner, gfn);
            }
            take_bit(&self.evicting, gfn);
        }
        drop((inner, recent));
        let gfns: Vec<Gfn> = done.iter().map(|d| d.0).collect();
        self.wake_frames(&gfns);
    }

    /// Gives back a claim whose page was not moved: the frame stays resident.
    fn unclaim(&self, gfn: Gfn) {
        self.states.transition(gfn, FrameState::SwappingOut, FrameState::Resident);
        take_bit(&self.evicting, gfn);
        self.wake_frames(&[gfn]);
    }

    /// Wakes every thread whose fault on one of `gfns` was left waiting while its eviction
    /// was under way (the fault handler never blocks on an eviction: it leaves the faulting
    /// thread asleep, and the eviction's end wakes it to fault again). Contiguous frames share
    /// one call.
    pub(super) fn wake_frames(&self, gfns: &[Gfn]) {
        let mut runs: Vec<(Gfn, u64)> = Vec::new();
        for &g in gfns {
            match runs.last_mut() {
                Some((first, n)) if first.plus(*n) == g => *n += 1,
                _ => runs.push((g, 1)),
            }
        }
        // One mapping per call: runs cut where RAM ranges end.
        for (first, n) in self.states.split_at_ranges(&runs) {
            if let Some(hva) = self.ram.host_addr(first.gpa()) {
                let _ = self.uffd.wake(hva as u64, n * PAGE_SIZE);
            }
        }
    }

    /// Puts a staged page back into guest RAM (its write failed): it stays resident.
    fn put_back(&self, gfn: Gfn, page: &[u8]) -> Result<(), SwapError> {
        self.counters.put_back.inc();
        if !self.states.transition(gfn, FrameState::SwappingOut, FrameState::Populating) {
            // Freed meanwhile: nothing to put back.
            take_bit(&self.evicting, gfn);
            return Ok(());
        }
        let res = self.install(gfn, page);
        self.states.transition(gfn, FrameState::Populating, FrameState::Resident);
        take_bit(&self.evicting, gfn);
        res
    }

    /// Installs `page` at `gfn`'s missing page and wakes whoever waits on it.
    pub(super) fn install(&self, gfn: Gfn, page: &[u8]) -> Result<(), SwapError> {
        let hva = self.ram.host_addr(gfn.gpa()).ok_or(SwapError::Lost { gpa: gfn.gpa().0 })? as u64;
        // SAFETY: `page` is PAGE_SIZE readable bytes; the destination is a guest RAM page
        // registered with this userfaultfd, missing because its frame's data is in flight.
        match unsafe { self.uffd.copy(hva, page.as_ptr(), PAGE_SIZE, true) } {
            Ok(_) => Ok(()),
            Err(source) => Err(SwapError::Uffd { gpa: gfn.gpa().0, source }),
        }
    }
}
