//! How an `Allocated` frame gets host backing, both for the fault handler (guest first touch)
//! and for the VMM (before it writes a frame itself).
//!
//! With userfaultfd, backing is installed with `UFFDIO_COPY` from a zero buffer; the page-state
//! map's `Allocated -> Populating -> Resident` compare-and-swap makes sure exactly one thread
//! installs each frame. Without userfaultfd the kernel backs pages on first touch and the map
//! only records that the frame may be resident.

use std::sync::Arc;

use super::addr::{Gfn, HUGE_PAGE_SIZE, PAGE_SIZE};
use super::page_state::{FrameState, PageStates};
use super::ram::GuestRam;
use super::uffd::{Uffd, UffdError};

#[derive(Debug, thiserror::Error)]
pub enum PopulateError {
    #[error("frame {0} is not allocated")]
    NotAllocated(Gfn),
    #[error("frame {0} is not guest RAM")]
    NotRam(Gfn),
    #[error("userfaultfd copy into frame {gfn} failed")]
    Copy {
        gfn: Gfn,
        #[source]
        source: UffdError,
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
                super::addr::to_usize(len),
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
        unsafe { libc::munmap(self.ptr.cast_mut().cast(), super::addr::to_usize(self.len)) };
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
                FrameState::Free => return Err(PopulateError::NotAllocated(gfn)),
                FrameState::Populating => std::hint::spin_loop(),
                FrameState::Allocated => {
                    if !states.transition(gfn, FrameState::Allocated, FrameState::Populating) {
                        continue;
                    }
                    let res = self.fill(ram, gfn, 1);
                    let ok = res.is_ok();
                    states.transition(
                        gfn,
                        FrameState::Populating,
                        if ok { FrameState::Resident } else { FrameState::Allocated },
                    );
                    return res.map(|_| ());
                }
            }
        }
    }

    /// Installs zero-filled backing for `pages` frames from `gfn`, which the caller has moved to
    /// `Populating`. Returns how many frames it installed (frames that turned out to be present
    /// already count as done).
    pub fn fill(&self, ram: &GuestRam, gfn: Gfn, pages: u64) -> Result<u64, PopulateError> {
        match self {
            Populate::Direct => Ok(pages),
            Populate::Uffd { uffd, zero } => {
                let len = pages * PAGE_SIZE;
                debug_assert!(len <= zero.size());
                let hva = ram.host_addr(gfn.gpa()).ok_or(PopulateError::NotRam(gfn))? as u64;
                let mut done = 0;
                while done < len {
                    // SAFETY: zero.ptr() is valid for zero.len() >= len bytes of reads; the
                    // destination lies in guest RAM, registered with this uffd.
                    match unsafe { uffd.copy(hva + done, zero.ptr(), len - done, true) } {
                        Ok(n) => done += n,
                        // Someone (the kernel, for an access before registration) already
                        // backed this page: skip it.
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
}
