//! A fixed-length array allocated zeroed, so per-frame metadata for a 64 GiB guest costs host
//! memory only where it is written. Large arrays are their own `MAP_NORESERVE` anonymous mapping:
//! untouched pages are the shared zero page, and a huge guest's metadata fails with an error
//! rather than aborting in the allocator under the kernel's overcommit heuristic.

use std::alloc::{Layout, alloc_zeroed, dealloc, handle_alloc_error};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64};

/// Types for which the all-zero bit pattern is a valid value.
///
/// # Safety
/// Implementors must be valid when every byte is zero and must not implement `Drop`.
pub unsafe trait Zeroable: Sized {}

// SAFETY: integers and atomics are valid at zero and have no drop glue.
unsafe impl Zeroable for u8 {}
// SAFETY: as above.
unsafe impl Zeroable for u32 {}
// SAFETY: as above.
unsafe impl Zeroable for u64 {}
// SAFETY: as above.
unsafe impl Zeroable for AtomicU8 {}
// SAFETY: as above.
unsafe impl Zeroable for AtomicU32 {}
// SAFETY: as above.
unsafe impl Zeroable for AtomicU64 {}

/// Arrays at least this large get their own mapping (and can be trimmed).
const MMAP_THRESHOLD: usize = 64 << 10;

pub struct ZeroedVec<T: Zeroable> {
    ptr: NonNull<T>,
    len: usize,
}

// SAFETY: ZeroedVec owns its elements like a Box<[T]>.
unsafe impl<T: Zeroable + Send> Send for ZeroedVec<T> {}
// SAFETY: shared access only hands out &[T].
unsafe impl<T: Zeroable + Sync> Sync for ZeroedVec<T> {}

impl<T: Zeroable> ZeroedVec<T> {
    /// `len` zeroed elements. Panics if the host cannot map them; use [`try_new`](Self::try_new)
    /// for sizes that come from user input.
    pub fn new(len: usize) -> Self {
        Self::try_new(len).unwrap_or_else(|e| panic!("cannot map {len} metadata elements: {e}"))
    }

    /// `len` zeroed elements, or the mapping error.
    pub fn try_new(len: usize) -> std::io::Result<Self> {
        let bytes = Self::bytes(len)?;
        if bytes == 0 {
            return Ok(ZeroedVec { ptr: NonNull::dangling(), len });
        }
        if bytes < MMAP_THRESHOLD {
            let layout = Layout::array::<T>(len).map_err(|_| std::io::Error::from_raw_os_error(libc::ENOMEM))?;
            // SAFETY: layout has non-zero size (checked above).
            let raw = unsafe { alloc_zeroed(layout) };
            let ptr = NonNull::new(raw.cast::<T>()).unwrap_or_else(|| handle_alloc_error(layout));
            return Ok(ZeroedVec { ptr, len });
        }
        // SAFETY: a fresh private anonymous mapping that this value owns until drop.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let ptr = NonNull::new(raw.cast::<T>()).ok_or_else(|| std::io::Error::from_raw_os_error(libc::ENOMEM))?;
        Ok(ZeroedVec { ptr, len })
    }

    /// Drops the host backing of every page of the array that is all zeroes (it reads as
    /// zeroes again afterwards): metadata for memory the guest gave back stops costing RSS.
    /// Returns the bytes released. `&mut self` guarantees nobody reads or writes meanwhile.
    pub fn trim(&mut self) -> usize {
        let bytes = Self::bytes(self.len).unwrap_or(0);
        if bytes < MMAP_THRESHOLD {
            return 0;
        }
        let page = super::addr::to_usize(super::addr::PAGE_SIZE);
        let base = self.ptr.as_ptr().cast::<u8>();
        let mut released = 0;
        let mut off = 0;
        while off < bytes {
            let len = page.min(bytes - off);
            // SAFETY: [base+off, base+off+len) lies in our mapping; we hold &mut self, so no
            // one else accesses it while we read it.
            let chunk = unsafe { std::slice::from_raw_parts(base.add(off), len) };
            if len == page && chunk.iter().all(|&b| b == 0) {
                // SAFETY: the page is inside our private anonymous mapping and all zeroes, so
                // dropping it changes no value: it reads back as zeroes.
                let rc = unsafe { libc::madvise(base.add(off).cast(), len, libc::MADV_DONTNEED) };
                if rc == 0 {
                    released += len;
                }
            }
            off += len;
        }
        released
    }

    /// Bytes of the array that have host memory now (pages only read may map the shared zero
    /// page and count here too: an upper bound).
    pub fn resident_bytes(&self) -> u64 {
        let bytes = Self::bytes(self.len).unwrap_or(0);
        if bytes < MMAP_THRESHOLD {
            return bytes as u64;
        }
        let page = super::addr::to_usize(super::addr::PAGE_SIZE);
        let mut vec = vec![0u8; bytes.div_ceil(page)];
        // SAFETY: mincore reads the page tables of our own mapping [ptr, ptr+bytes) and writes
        // one byte per page into `vec`, which has exactly that many.
        let rc = unsafe { libc::mincore(self.ptr.as_ptr().cast(), bytes, vec.as_mut_ptr()) };
        if rc != 0 {
            return bytes as u64;
        }
        vec.iter().filter(|&&v| v & 1 != 0).count() as u64 * page as u64
    }

    fn bytes(len: usize) -> std::io::Result<usize> {
        len.checked_mul(size_of::<T>()).ok_or_else(|| std::io::Error::from_raw_os_error(libc::ENOMEM))
    }
}

impl<T: Zeroable> Deref for ZeroedVec<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: ptr points to len zero-initialised (hence valid, by Zeroable) elements we own.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl<T: Zeroable> DerefMut for ZeroedVec<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as in deref, and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl<T: Zeroable> Drop for ZeroedVec<T> {
    fn drop(&mut self) {
        let bytes = Self::bytes(self.len).expect("size was valid at allocation");
        if bytes == 0 {
            return;
        }
        if bytes < MMAP_THRESHOLD {
            let layout = Layout::array::<T>(self.len).expect("layout was valid at allocation");
            // SAFETY: allocated in `try_new` with this exact layout; T has no drop glue.
            unsafe { dealloc(self.ptr.as_ptr().cast::<u8>(), layout) };
        } else {
            // SAFETY: unmaps exactly the mapping made in `try_new`; nothing borrows it any more.
            unsafe { libc::munmap(self.ptr.as_ptr().cast(), bytes) };
        }
    }
}

impl<T: Zeroable> std::fmt::Debug for ZeroedVec<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ZeroedVec(len={})", self.len)
    }
}
