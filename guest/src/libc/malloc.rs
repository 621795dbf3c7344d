//! `malloc` and friends on the VMM's allocator. Objects up to 64 KiB come from the slab
//! magazines (`heap`) in exactly the size class the request needs, with no header: `free` finds
//! the class from the address (each class has its own slab zone, `protocol::slab`). Larger
//! blocks are whole-page regions (ALLOC / FREE), whose sizes the runtime keeps in a table of
//! its own (guest memory, guest data: the VMM trusts none of it and checks every FREE).

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

/// A large block: where its region starts (the block may be aligned inside it) and its size.
#[derive(Clone, Copy)]
struct Large {
    region: u64,
    size: usize,
}

/// Large blocks by address, behind a spinlock (each is an exit anyway).
struct LargeTable {
    held: AtomicBool,
    map: core::cell::UnsafeCell<BTreeMap<u64, Large>>,
}

// SAFETY: `map` is only reached through `with`, which serialises access with `held`.
unsafe impl Sync for LargeTable {}

static LARGE: LargeTable =
    LargeTable { held: AtomicBool::new(false), map: core::cell::UnsafeCell::new(BTreeMap::new()) };

impl LargeTable {
    fn with<R>(&self, f: impl FnOnce(&mut BTreeMap<u64, Large>) -> R) -> R {
        let _g = NoPreempt::new();
        while self.held.compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed).is_err() {
            arch::pause();
        }
        // SAFETY: the lock is held.
        let r = f(unsafe { &mut *self.map.get() });
        self.held.store(false, Ordering::Release);
        r
    }
}

/// The alignment malloc promises for `size` (glibc's 16, or less for objects too small to need
/// it).
fn natural_align(size: usize) -> usize {
    if size >= 16 { 16 } else { size.max(1).next_power_of_two() }
}

fn alloc_large(size: usize, align: usize) -> *mut u8 {
    let Some(len) = size.checked_add(if align > PAGE { align } else { 0 }) else { return null_mut() };
    let r = {
        let _g = NoPreempt::new();
        heap::count_exit();
        heap::count_alloc();
        mem::alloc_call(mem::mk(op::ALLOC, 0, [len as u64, policy::LOCAL, 0, 0]))
    };
    if r.status != status::OK {
        return null_mut();
    }
    let region = r.ret[0];
    let ptr = region.next_multiple_of(align.max(PAGE) as u64);
    LARGE.with(|m| m.insert(ptr, Large { region, size }));
    ptr as *mut u8
}

/// `size` bytes aligned to `align` (a power of two), or null.
pub fn alloc_block(size: usize, align: usize) -> *mut u8 {
    match class_for(size.max(1), align) {
        Some(class) => heap::alloc_small(class),
        None => alloc_large(size, align),
    }
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
    let Some(large) = LARGE.with(|m| m.remove(&(ptr as u64))) else { return false };
    let _g = NoPreempt::new();
    heap::count_exit();
    mem::alloc_call(mem::mk(op::FREE, 0, [large.region, 0, 0, 0])).status == status::OK
}

/// The usable size of the block at `ptr` (0 for null or an unknown pointer).
pub fn usable_size(ptr: *mut u8) -> usize {
    if ptr.is_null() {
        return 0;
    }
    if let Some(class) = class_of_addr(ptr as u64) {
        return CLASSES[class] as usize;
    }
    LARGE.with(|m| m.get(&(ptr as u64)).map_or(0, |l| l.size.next_multiple_of(PAGE)))
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
    let p = malloc(total);
    if !p.is_null() && class_of_addr(p as u64).is_some() {
        // Slab objects come back dirty; regions are zero from the VMM.
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
