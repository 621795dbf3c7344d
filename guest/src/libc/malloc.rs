//! `malloc` and friends on the VMM's allocator. Objects up to 64 KiB come from the slab
//! magazines (`heap`) in exactly the size class the request needs, with no header: `free` finds
//! the class from the address (each class has its own slab zone, `protocol::slab`). Larger
//! blocks are whole-page regions (ALLOC / FREE), whose sizes the runtime keeps in a table of
//! its own (guest memory, guest data: the VMM trusts none of it and checks every FREE).
//!
//! Freed regions are kept for reuse, a few and up to [`CACHE_BYTES`], the way glibc keeps freed
//! large chunks mapped (its mmap threshold rises to the size of a freed chunk, so the next ones
//! of that size come from its heap): a block of the same page count takes one back with no exit,
//! and with its pages resident and their translations cached, where a fresh region costs an
//! ALLOC exit, second-level faults and a shadow-paging walk per page on first touch. The oldest
//! go back to the VMM when the cache is full. A stale pointer into a cached region reads and
//! writes it unnoticed, as with glibc; one into a region given back faults.

use alloc::collections::BTreeMap;
use core::ptr::null_mut;
use core::sync::atomic::{AtomicBool, Ordering};

use protocol::memcall::{op, policy};
use protocol::slab::{CLASSES, class_for, class_of_addr};
use protocol::status;

use crate::sched::NoPreempt;
use crate::{arch, heap, mem};

use super::errno::{EINVAL, ENOMEM};

const PAGE: usize = 4096;

/// A large block: where its region starts (the block may be aligned inside it), its size, and
/// the region's length.
#[derive(Clone, Copy)]
struct Large {
    region: u64,
    size: usize,
    len: usize,
}

/// Freed regions kept at most, and their bytes at most.
const CACHE_SLOTS: usize = 16;
const CACHE_BYTES: usize = 32 << 20;

/// The large blocks in use by address, and freed regions kept for reuse (oldest first).
struct Larges {
    map: BTreeMap<u64, Large>,
    cache: [(u64, usize); CACHE_SLOTS],
    cached: usize,
    cached_bytes: usize,
}

impl Larges {
    /// Takes the kept region at `i` out of the cache.
    fn remove(&mut self, i: usize) -> u64 {
        let (region, len) = self.cache[i];
        self.cache.copy_within(i + 1..self.cached, i);
        self.cached -= 1;
        self.cached_bytes -= len;
        region
    }

    /// Takes a kept region of exactly `len` bytes (the newest).
    fn take(&mut self, len: usize) -> Option<u64> {
        let i = self.cache[..self.cached].iter().rposition(|&(_, l)| l == len)?;
        Some(self.remove(i))
    }

    /// Keeps `region` of `len` bytes; returns the regions pushed out to make room (the oldest),
    /// for the caller to give back.
    fn keep(&mut self, region: u64, len: usize) -> ([u64; CACHE_SLOTS], usize) {
        let mut out = [0; CACHE_SLOTS];
        let mut n = 0;
        while self.cached > 0 && (self.cached == CACHE_SLOTS || self.cached_bytes + len > CACHE_BYTES) {
            out[n] = self.remove(0);
            n += 1;
        }
        self.cache[self.cached] = (region, len);
        self.cached += 1;
        self.cached_bytes += len;
        (out, n)
    }
}

/// Large blocks, behind a spinlock.
struct LargeTable {
    held: AtomicBool,
    state: core::cell::UnsafeCell<Larges>,
}

// SAFETY: `state` is only reached through `with`, which serialises access with `held`.
unsafe impl Sync for LargeTable {}

static LARGE: LargeTable = LargeTable {
    held: AtomicBool::new(false),
    state: core::cell::UnsafeCell::new(Larges {
        map: BTreeMap::new(),
        cache: [(0, 0); CACHE_SLOTS],
        cached: 0,
        cached_bytes: 0,
    }),
};

impl LargeTable {
    fn with<R>(&self, f: impl FnOnce(&mut Larges) -> R) -> R {
        let _g = NoPreempt::new();
        while self.held.compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed).is_err() {
            arch::pause();
        }
        // SAFETY: the lock is held.
        let r = f(unsafe { &mut *self.state.get() });
        self.held.store(false, Ordering::Release);
        r
    }
}

/// Gives regions back to the VMM; false if one was refused.
fn give_back(regions: &[u64]) -> bool {
    let _g = NoPreempt::new();
    regions.iter().fold(true, |ok, &r| {
        heap::count_exit();
        ok & (mem::alloc_call(mem::mk(op::FREE, 0, [r, 0, 0, 0])).status == status::OK)
    })
}

/// The alignment malloc promises for `size` (glibc's 16, or less for objects too small to need
/// it).
fn natural_align(size: usize) -> usize {
    if size >= 16 { 16 } else { size.max(1).next_power_of_two() }
}

/// A block of `size` bytes aligned to `align` from a region: `(pointer or null, whether it
/// was used before)` (a fresh region is zero).
fn alloc_large(size: usize, align: usize) -> (*mut u8, bool) {
    let Some(len) = size.checked_add(if align > PAGE { align } else { 0 }) else { return (null_mut(), false) };
    let Some(len) = len.checked_next_multiple_of(PAGE) else { return (null_mut(), false) };
    {
        let _g = NoPreempt::new();
        heap::count_alloc();
    }
    if align <= PAGE
        && let Some(region) = LARGE.with(|t| {
            let r = t.take(len)?;
            t.map.insert(r, Large { region: r, size, len });
            Some(r)
        })
    {
        return (region as *mut u8, true);
    }
    let r = {
        let _g = NoPreempt::new();
        heap::count_exit();
        mem::alloc_call(mem::mk(op::ALLOC, 0, [len as u64, policy::LOCAL, 0, 0]))
    };
    if r.status != status::OK {
        return (null_mut(), false);
    }
    let region = r.ret[0];
    let ptr = region.next_multiple_of(align.max(PAGE) as u64);
    LARGE.with(|t| t.map.insert(ptr, Large { region, size, len }));
    (ptr as *mut u8, false)
}

/// `size` bytes aligned to `align` (a power of two), or null; and whether the block may hold
/// old data (slab objects and reused regions do; fresh regions are zero).
fn alloc_block_dirty(size: usize, align: usize) -> (*mut u8, bool) {
    match class_for(size.max(1), align) {
        Some(class) => (heap::alloc_small(class), true),
        None => alloc_large(size, align),
    }
}

/// `size` bytes aligned to `align` (a power of two), or null.
pub fn alloc_block(size: usize, align: usize) -> *mut u8 {
    alloc_block_dirty(size, align).0
}

/// Frees `ptr`; false if it is not a block this allocator knows (the VMM checks slab objects
/// itself, later, and reports bad ones in the magazine).
pub fn free_block(ptr: *mut u8) -> bool {
    if ptr.is_null() {
        return true;
    }
    if let Some(class) = class_of_addr(ptr as u64) {
        heap::free_small(class, ptr as u64);
        return true;
    }
    let ptr = ptr as u64;
    // The region to give back (unless kept), and the kept ones it pushed out of the cache.
    let Some((back, out, n)) = LARGE.with(|t| {
        let large = t.map.remove(&ptr)?;
        // Regions of at most half the cache, whose block starts the region, are kept.
        if large.region != ptr || large.len > CACHE_BYTES / 2 {
            return Some((Some(large.region), [0; CACHE_SLOTS], 0));
        }
        let (out, n) = t.keep(large.region, large.len);
        Some((None, out, n))
    }) else {
        return false;
    };
    give_back(&out[..n]) && back.is_none_or(|r| give_back(&[r]))
}

/// The usable size of the block at `ptr` (0 for null or an unknown pointer).
pub fn usable_size(ptr: *mut u8) -> usize {
    if ptr.is_null() {
        return 0;
    }
    if let Some(class) = class_of_addr(ptr as u64) {
        return CLASSES[class] as usize;
    }
    LARGE.with(|t| t.map.get(&(ptr as u64)).map_or(0, |l| l.size.next_multiple_of(PAGE)))
}

fn bad_free(ptr: *mut u8) -> ! {
    super::sys::fatal(format_args!("free(): invalid pointer {ptr:p}"))
}

#[unsafe(no_mangle)]
pub extern "C" fn malloc(size: usize) -> *mut u8 {
    let p = alloc_block(size, natural_align(size));
    if p.is_null() {
        super::set_errno(ENOMEM);
    }
    p
}

#[unsafe(no_mangle)]
pub extern "C" fn free(ptr: *mut u8) {
    if !free_block(ptr) {
        bad_free(ptr);
    }
}

#[unsafe(no_mangle)]
pub extern "C" fn calloc(n: usize, size: usize) -> *mut u8 {
    let Some(total) = n.checked_mul(size) else {
        super::set_errno(ENOMEM);
        return null_mut();
    };
    let (p, dirty) = alloc_block_dirty(total, natural_align(total));
    if p.is_null() {
        super::set_errno(ENOMEM);
    } else if dirty {
        // Slab objects and reused regions come back dirty; fresh regions are zero.
        // SAFETY: p is a fresh block of at least `total` bytes.
        unsafe { core::ptr::write_bytes(p, 0, total) };
    }
    p
}

#[unsafe(no_mangle)]
pub extern "C" fn realloc(ptr: *mut u8, size: usize) -> *mut u8 {
    if ptr.is_null() {
        return malloc(size);
    }
    if size == 0 {
        free(ptr);
        return null_mut();
    }
    let old = usable_size(ptr);
    if old == 0 {
        bad_free(ptr);
    }
    // Keep the block if it fits and is not more than twice too big.
    if size <= old && (size > old / 2 || old <= 16) {
        return ptr;
    }
    let new = malloc(size);
    if new.is_null() {
        return null_mut();
    }
    // SAFETY: both blocks are live and at least min(old, size) bytes long; they do not overlap.
    unsafe { core::ptr::copy_nonoverlapping(ptr, new, old.min(size)) };
    free(ptr);
    new
}

#[unsafe(no_mangle)]
pub extern "C" fn malloc_usable_size(ptr: *mut u8) -> usize {
    usable_size(ptr)
}

#[unsafe(no_mangle)]
pub extern "C" fn posix_memalign(out: *mut *mut u8, align: usize, size: usize) -> i32 {
    if !align.is_power_of_two() || !align.is_multiple_of(core::mem::size_of::<usize>()) {
        return EINVAL;
    }
    let p = alloc_block(size, align.max(natural_align(size)));
    if p.is_null() {
        return ENOMEM;
    }
    // SAFETY: the caller passes a writable pointer.
    unsafe { out.write(p) };
    0
}

#[unsafe(no_mangle)]
pub extern "C" fn aligned_alloc(align: usize, size: usize) -> *mut u8 {
    if !align.is_power_of_two() {
        super::set_errno(EINVAL);
        return null_mut();
    }
    let p = alloc_block(size, align.max(natural_align(size)));
    if p.is_null() {
        super::set_errno(ENOMEM);
    }
    p
}

#[unsafe(no_mangle)]
pub extern "C" fn memalign(align: usize, size: usize) -> *mut u8 {
    aligned_alloc(align, size)
}

#[unsafe(no_mangle)]
pub extern "C" fn valloc(size: usize) -> *mut u8 {
    aligned_alloc(PAGE, size)
}

#[unsafe(no_mangle)]
pub extern "C" fn pvalloc(size: usize) -> *mut u8 {
    aligned_alloc(PAGE, size.next_multiple_of(PAGE))
}
