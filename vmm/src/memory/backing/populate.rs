//! How an `Allocated` frame gets host backing, both for the fault handler (guest first touch)
//! and for the VMM (before it writes a frame itself).
//!
//! With userfaultfd, backing is installed with `UFFDIO_COPY` from a zero buffer; the page-state
//! map's `Allocated -> Populating -> Resident` compare-and-swap makes sure exactly one thread
//! installs each frame. Without userfaultfd the kernel backs pages on first touch and the map
//! only records that the frame may be resident.

use std::sync::Arc;

use super::ram::GuestRam;
use super::uffd::{Uffd, UffdError};
use crate::memory::addr::{Gfn, HUGE_PAGE_SIZE, PAGE_SIZE, to_usize};
use crate::memory::frames::page_state::{FrameState, PageStates};

#[derive(Debug, thiserror::Error)]
pub enum PopulateError {
    #[error("frame {0} is not allocated")]
    NotAllocated(Gfn),
    #[error("frame {0} is not guest RAM")]
    NotRam(Gfn),
    #[error("userfaultfd operation on frame {gfn} failed")]
    Copy {
        gfn: Gfn,
        #[source]
        source: UffdError,
    },
    #[error("cannot change the host protection of frame {gfn}")]
    Protect {
        gfn: Gfn,
        #[source]
        source: std::io::Error,
    },
}

/// A read-only buffer of zeroes used as the `UFFDIO_COPY` source. It is an untouched private
/// anonymous mapping, so every page of it is the kernel's shared zero page: no host memory.
#[derive(Debug)]
pub struct ZeroSource {
    ptr: *const u8,
    len: u64,
}

// SAFETY: the mapping is never written and lives as long as the value; sharing a read-only
// pointer between threads is sound.
unsafe impl Send for ZeroSource {}
// SAFETY: as above.
unsafe impl Sync for ZeroSource {}

impl ZeroSource {
    /// Maps `HUGE_PAGE_SIZE` bytes of zeroes.
    pub fn new() -> std::io::Result<ZeroSource> {
        let len = HUGE_PAGE_SIZE;
        // SAFETY: a fresh anonymous read-only mapping; we own it until drop.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                crate::memory::addr::to_usize(len),
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(ZeroSource { ptr: p.cast::<u8>().cast_const(), len })
    }

    /// Pointer to `len <= HUGE_PAGE_SIZE` zero bytes.
    pub fn ptr(&self) -> *const u8 {
        self.ptr
    }

    /// Size of the buffer.
    pub fn size(&self) -> u64 {
        self.len
    }
}

impl Drop for ZeroSource {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping created in `new`, which nothing references now.
        unsafe { libc::munmap(self.ptr.cast_mut().cast(), crate::memory::addr::to_usize(self.len)) };
    }
}

/// Backing mode of guest RAM.
#[derive(Debug, Clone)]
pub enum Populate {
    /// Kernel demand paging: the host backs a page when it is first touched.
    Direct,
    /// userfaultfd: missing pages fault to the VMM, which installs them.
    Uffd { uffd: Arc<Uffd>, zero: Arc<ZeroSource> },
}

impl Populate {
    /// Makes `gfn` resident (zero-filled) unless it already is. Returns `Ok` for frames that are
    /// already `Resident`; waits while another thread populates it.
    pub fn zero_fill(&self, ram: &GuestRam, states: &PageStates, gfn: Gfn) -> Result<(), PopulateError> {
        loop {
            match states.get(gfn) {
                FrameState::Resident => return Ok(()),
                FrameState::Free | FrameState::Ballooned => return Err(PopulateError::NotAllocated(gfn)),
                // Its data is in swap: the VMM's access faults it back in like the guest's.
                FrameState::SwappingOut | FrameState::Swapped => return Ok(()),
                FrameState::Populating => std::hint::spin_loop(),
                FrameState::Allocated => {
                    if self.claim_and_fill(ram, states, gfn, 1)? == 1 {
                        return Ok(());
                    }
                }
                FrameState::Zero => {
                    if states.transition(gfn, FrameState::Zero, FrameState::Populating) {
                        return self.unzero(ram, states, gfn);
                    }
                }
            }
        }
    }

    /// Replaces whatever backs a `Zero` frame the caller moved to `Populating` (nothing, or the
    /// shared zero page) with a private zero-filled page, and marks it `Resident`.
    pub fn unzero(&self, ram: &GuestRam, states: &PageStates, gfn: Gfn) -> Result<(), PopulateError> {
        let res = ram
            .discard(gfn.gpa(), PAGE_SIZE)
            .map_err(|source| PopulateError::Protect { gfn, source })
            .and_then(|()| self.fill(ram, gfn, 1));
        let to = if res.is_ok() { FrameState::Resident } else { FrameState::Zero };
        states.transition(gfn, FrameState::Populating, to);
        res.map(|_| ())
    }

    /// Claims every `Allocated` frame of `[gfn, gfn + pages)` (`Allocated -> Populating`),
    /// installs zero-filled backing for the claimed runs, and marks them `Resident`. Frames in
    /// other states are left alone. Returns how many frames it installed.
    pub fn claim_and_fill(
        &self,
        ram: &GuestRam,
        states: &PageStates,
        gfn: Gfn,
        pages: u64,
    ) -> Result<u64, PopulateError> {
        self.claim_and_fill_counted(ram, states, gfn, pages, |_| {})
    }

    /// [`claim_and_fill`](Self::claim_and_fill), calling `claimed(n)` once with every frame it
    /// claimed, before the first copy: the copy wakes the faulting thread, so whatever it may
    /// read must be counted first, and a fault's frames are counted together (a reader of the
    /// counters never sees part of one fault's window, however long its copies take).
    pub fn claim_and_fill_counted(
        &self,
        ram: &GuestRam,
        states: &PageStates,
        gfn: Gfn,
        pages: u64,
        claimed: impl FnOnce(u64),
    ) -> Result<u64, PopulateError> {
        // The runs of frames this thread manages to claim.
        let mut runs: Vec<(Gfn, u64)> = Vec::new();
        let mut i = 0;
        while i < pages {
            let start = i;
            while i < pages && states.transition(gfn.plus(i), FrameState::Allocated, FrameState::Populating) {
                i += 1;
            }
            if i > start {
                runs.push((gfn.plus(start), i - start));
            }
            i += 1;
        }
        if runs.is_empty() {
            return Ok(0);
        }
        claimed(runs.iter().map(|&(_, n)| n).sum());
        let (mut installed, mut failed) = (0, None);
        for (run, n) in runs {
            // After a failure, the runs not filled yet go back to `Allocated` unfilled.
            let to = match failed.is_none().then(|| self.fill(ram, run, n)) {
                Some(Ok(k)) => {
                    installed += k;
                    FrameState::Resident
                }
                Some(Err(e)) => {
                    failed = Some(e);
                    FrameState::Allocated
                }
                None => FrameState::Allocated,
            };
            for j in 0..n {
                states.transition(run.plus(j), FrameState::Populating, to);
            }
        }
        failed.map_or(Ok(installed), Err)
    }

    /// Installs zero-filled backing for `pages` frames from `gfn`, which the caller has moved to
    /// `Populating`. Frames that turn out to be present already count as done.
    pub fn fill(&self, ram: &GuestRam, gfn: Gfn, pages: u64) -> Result<u64, PopulateError> {
        let hva = ram.host_addr(gfn.gpa()).ok_or(PopulateError::NotRam(gfn))? as u64;
        if !ram.is_ram(gfn.gpa(), pages * PAGE_SIZE) {
            return Err(PopulateError::NotRam(gfn));
        }
        match self {
            Populate::Direct => {
                // Touch each page so the kernel backs it now: `Resident` must mean present.
                for i in 0..pages {
                    let p = (hva + i * PAGE_SIZE) as *mut u8;
                    // SAFETY: p is inside guest RAM (checked above); the frame is `Populating`,
                    // owned by this caller, and zero, so writing a zero changes nothing but
                    // makes the kernel allocate the page.
                    unsafe { std::ptr::write_volatile(p, 0) };
                }
                Ok(pages)
            }
            Populate::Uffd { uffd, zero } => {
                let len = pages * PAGE_SIZE;
                let mut done = 0;
                while done < len {
                    let chunk = (len - done).min(zero.size());
                    // SAFETY: zero.ptr() is valid for zero.size() >= chunk bytes of reads; the
                    // destination lies in guest RAM, registered with this uffd.
                    match unsafe { uffd.copy(hva + done, zero.ptr(), chunk, true) } {
                        Ok(n) => done += n,
                        // Already present (populated by the kernel before registration, or a
                        // concurrent path): skip that page.
                        Err(UffdError::Exists { copied, .. }) => {
                            done += copied + PAGE_SIZE;
                            let _ = uffd.wake(hva + done - PAGE_SIZE, PAGE_SIZE);
                        }
                        Err(UffdError::Again { copied, .. }) => done += copied,
                        Err(source) => return Err(PopulateError::Copy { gfn, source }),
                    }
                }
                Ok(pages)
            }
        }
    }

    /// Drops every cached translation of the frames in `runs` while keeping their contents:
    /// after a present leaf pointing at them changed, no vCPU may keep using the old one.
    /// Write-protecting a page fires the kernel's MMU notifier, which makes KVM drop its
    /// translations; a write in the short window takes a WP fault that the fault handler
    /// resolves. (Without userfaultfd an mprotect toggle does the same, with a window in which a
    /// concurrent guest write fails: that mode is for measurements only.)
    pub fn invalidate(&self, ram: &GuestRam, states: &PageStates, runs: &[(Gfn, u64)]) -> Result<(), PopulateError> {
        for &(gfn, pages) in runs {
            let hva = ram.host_addr(gfn.gpa()).ok_or(PopulateError::NotRam(gfn))? as u64;
            let len = pages * PAGE_SIZE;
            match self {
                Populate::Uffd { uffd, .. } => {
                    let wp = |on| uffd.writeprotect(hva, len, on).map_err(|source| PopulateError::Copy { gfn, source });
                    wp(true)?;
                    wp(false)?;
                    self.reprotect_zero(ram, states, gfn, pages)?;
                }
                Populate::Direct => {
                    for prot in [libc::PROT_READ, libc::PROT_READ | libc::PROT_WRITE] {
                        // SAFETY: [hva, hva+len) is guest RAM we own (host_addr and the run
                        // come from the allocator); changing its protection and restoring it
                        // does not invalidate any Rust reference.
                        let rc = unsafe { libc::mprotect(hva as *mut libc::c_void, to_usize(len), prot) };
                        if rc != 0 {
                            return Err(PopulateError::Protect { gfn, source: std::io::Error::last_os_error() });
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Drops every cached translation of `runs` (after reclaim cleared their accessed bits) so
    /// that the guest's next touch walks its page tables again, without ever blocking a write:
    /// with userfaultfd, a write-unprotect of pages that are not protected. It changes no page,
    /// but the kernel still announces the protection change to its MMU notifiers, and KVM
    /// drops its translations (measured here: it halves the misses on a hot set, the same as a
    /// protect-unprotect toggle, with one call instead of two and no write-fault window).
    /// Without userfaultfd, an mprotect toggle as in [`invalidate`](Self::invalidate).
    pub fn refresh(&self, ram: &GuestRam, states: &PageStates, runs: &[(Gfn, u64)]) -> Result<(), PopulateError> {
        let Populate::Uffd { uffd, .. } = self else { return self.invalidate(ram, states, runs) };
        for &(gfn, pages) in runs {
            let hva = ram.host_addr(gfn.gpa()).ok_or(PopulateError::NotRam(gfn))? as u64;
            uffd.writeprotect(hva, pages * PAGE_SIZE, false).map_err(|source| PopulateError::Copy { gfn, source })?;
            self.reprotect_zero(ram, states, gfn, pages)?;
        }
        Ok(())
    }

    /// Maps the kernel's shared zero page, write-protected, for a read of the `Zero` frame
    /// `gfn`, without waking the reader. The protection is what keeps the accounting exact: a
    /// later guest write takes a write-protect fault, which marks the frame `Resident` before
    /// lifting it (otherwise the kernel's copy-on-write would give the frame a private page the
    /// VMM never hears of, and that page would never be counted nor evicted). A write that
    /// lands between the mapping and the protection is caught by looking at the page.
    pub fn map_zero(&self, ram: &GuestRam, states: &PageStates, gfn: Gfn) -> Result<(), PopulateError> {
        let Populate::Uffd { uffd, .. } = self else { return Ok(()) };
        let hva = ram.host_addr(gfn.gpa()).ok_or(PopulateError::NotRam(gfn))? as u64;
        match uffd.zeropage(hva, PAGE_SIZE, false) {
            Ok(_) | Err(UffdError::Exists { .. }) | Err(UffdError::Again { .. }) => {}
            Err(source) => return Err(PopulateError::Copy { gfn, source }),
        }
        Self::protect_zero(uffd, states, gfn, hva, 1)
    }

    /// A write-protect fault on the `Zero` frame `gfn`: if its page is mapped (the shared zero
    /// page [`map_zero`](Self::map_zero) protected), the frame becomes `Resident`, since the
    /// guest's write will land once the protection is lifted; returns whether it did. A fault
    /// that waited while the page went away (an invalidation's write window, then an eviction
    /// that found the page all zero) leaves the frame `Zero`: the retried write takes a
    /// missing-page fault instead. The frame is claimed (`Populating`) while the page is looked
    /// at, so nothing fills or drops it meanwhile.
    pub fn zero_written(&self, ram: &GuestRam, states: &PageStates, gfn: Gfn) -> Result<bool, PopulateError> {
        if !states.transition(gfn, FrameState::Zero, FrameState::Populating) {
            return Ok(false);
        }
        let mapped = match ram.host_addr(gfn.gpa()) {
            Some(hva) => present(hva as u64, PAGE_SIZE).map(|v| v[0] & 1 != 0),
            None => Ok(false),
        };
        let now = if matches!(mapped, Ok(true)) { FrameState::Resident } else { FrameState::Zero };
        states.transition(gfn, FrameState::Populating, now);
        mapped.map_err(|source| PopulateError::Protect { gfn, source })
    }

    /// Puts the write protection back on the `Zero` frames of a run whose protection was just
    /// lifted (see [`map_zero`](Self::map_zero)), and marks `Resident` any whose page the guest
    /// wrote while it was off.
    fn reprotect_zero(&self, ram: &GuestRam, states: &PageStates, gfn: Gfn, pages: u64) -> Result<(), PopulateError> {
        let Populate::Uffd { uffd, .. } = self else { return Ok(()) };
        let mut i = 0;
        while i < pages {
            if states.get(gfn.plus(i)) != FrameState::Zero {
                i += 1;
                continue;
            }
            let start = i;
            while i < pages && states.get(gfn.plus(i)) == FrameState::Zero {
                i += 1;
            }
            let first = gfn.plus(start);
            let hva = ram.host_addr(first.gpa()).ok_or(PopulateError::NotRam(first))? as u64;
            Self::protect_zero(uffd, states, first, hva, i - start)?;
        }
        Ok(())
    }

    /// Write-protects the `pages` `Zero` frames from `first` (at `hva`), then marks `Resident`
    /// each whose page is mapped and was written before the protection took hold.
    fn protect_zero(uffd: &Uffd, states: &PageStates, first: Gfn, hva: u64, pages: u64) -> Result<(), PopulateError> {
        let len = pages * PAGE_SIZE;
        uffd.writeprotect(hva, len, true).map_err(|source| PopulateError::Copy { gfn: first, source })?;
        let present = present(hva, len).map_err(|source| PopulateError::Protect { gfn: first, source })?;
        for (k, _) in (0u64..).zip(&present).filter(|(_, p)| **p & 1 != 0) {
            Self::note_written(states, first.plus(k), hva + k * PAGE_SIZE);
        }
        Ok(())
    }

    /// A write-protected, present page of the `Zero` frame `gfn` at `hva` that holds anything
    /// but zeroes was written before its protection: the frame is `Resident`.
    fn note_written(states: &PageStates, gfn: Gfn, hva: u64) {
        let words = hva as *const u64;
        // SAFETY: the page at `hva` is guest RAM with a present entry (the caller checked), so
        // reading it cannot fault; it is write-protected, so nothing changes it meanwhile.
        let written = (0..to_usize(PAGE_SIZE) / 8).any(|k| unsafe { words.add(k).read_volatile() } != 0);
        if written {
            states.transition(gfn, FrameState::Zero, FrameState::Resident);
        }
    }

    /// Whether missing pages fault to the VMM.
    pub fn is_uffd(&self) -> bool {
        matches!(self, Populate::Uffd { .. })
    }
}

/// Which pages of `[hva, hva + len)` have a page table entry (`mincore`: the zero page counts),
/// one byte each (bit 0): only those may be read without a fault.
pub fn present(hva: u64, len: u64) -> std::io::Result<Vec<u8>> {
    let mut vec = vec![0u8; to_usize(len / PAGE_SIZE)];
    // SAFETY: mincore reads the page tables of guest RAM (our mapping) and writes one byte per
    // page into `vec`, which has exactly that many.
    let rc = unsafe { libc::mincore(hva as *mut libc::c_void, to_usize(len), vec.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(vec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::ram_ranges;

    /// A window whose `Allocated` frames lie in three runs (a resident frame and two free ones
    /// between them) is counted once, with all its frames, before any of them is filled.
    #[test]
    fn a_window_in_several_runs_is_counted_once_before_the_first_copy() {
        let ram = GuestRam::new(&ram_ranges(&[1 << 20]).unwrap(), &[None]).unwrap();
        let states = PageStates::new(Gfn(256), vec![(Gfn(0), Gfn(256), 0)], 1).unwrap();
        states.set_range(Gfn(16), 16, FrameState::Allocated);
        states.set_range(Gfn(20), 1, FrameState::Resident);
        states.set_range(Gfn(25), 2, FrameState::Free);
        let mut counted = Vec::new();
        let installed = Populate::Direct
            .claim_and_fill_counted(&ram, &states, Gfn(16), 16, |n| counted.push((n, states.census(Gfn(16), 16))))
            .unwrap();
        assert_eq!(installed, 13);
        // Free 2, Populating 13 (every run claimed), Resident 1 (the one that was): none filled yet.
        assert_eq!(counted, vec![(13, [2, 0, 13, 1, 0, 0, 0, 0])]);
        assert_eq!(states.census(Gfn(16), 16), [2, 0, 0, 14, 0, 0, 0, 0]);
        // Nothing left to claim: no count at all.
        let again = Populate::Direct.claim_and_fill_counted(&ram, &states, Gfn(16), 16, |_| panic!("counted")).unwrap();
        assert_eq!(again, 0);
    }
}
