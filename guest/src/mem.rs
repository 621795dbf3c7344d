//! Memory calls to the VMM. Calls are written into this vCPU's request area and sent with one
//! doorbell exit per batch.

use protocol::layout::cpu_area;
use protocol::memcall::{AREA_OFFSET, MAX_BATCH, MemCall, op};
use protocol::{MemStats, port, status};

use crate::arch;

/// A status code other than OK.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Error(pub u64);

impl Error {
    pub fn name(self) -> &'static str {
        match self.0 {
            status::EINVAL => "EINVAL",
            status::ENOMEM => "ENOMEM",
            status::EFAULT => "EFAULT",
            status::EALREADY => "EALREADY",
            status::ENOSYS => "ENOSYS",
            _ => "?",
        }
    }
}

fn area() -> *mut MemCall {
    (cpu_area(arch::cpu_id()) + AREA_OFFSET) as *mut MemCall
}

/// Calls a batch may hold: the last slot of the request area belongs to the allocator.
pub const BATCH: usize = MAX_BATCH - 1;
/// The allocator's own slot.
const ALLOC_SLOT: usize = MAX_BATCH - 1;

/// Up to `BATCH` calls sent with one exit.
pub struct Batch {
    n: usize,
}

impl Batch {
    pub const fn new() -> Self {
        Batch { n: 0 }
    }

    /// Queues a call; returns its index. Sends the batch first if it is full.
    pub fn push(&mut self, call: MemCall) -> usize {
        if self.n == BATCH {
            self.send();
        }
        // SAFETY: the request area holds MAX_BATCH calls in this vCPU's mapped CPU area, which
        // only this vCPU writes; n < BATCH.
        unsafe { area().add(self.n).write_volatile(call) };
        self.n += 1;
        self.n - 1
    }

    /// Rings the doorbell for the queued calls; returns how many the VMM processed.
    pub fn send(&mut self) -> usize {
        let n = self.n;
        self.n = 0;
        if n == 0 {
            return 0;
        }
        arch::out32(port::MEMCALL, n as u32);
        // SAFETY: the VMM wrote memcall_done in this vCPU's CpuPage during the exit.
        unsafe { core::ptr::read_volatile(&(*arch::cpu_page()).memcall_done) as usize }
    }

    /// Result `i` of the last batch sent.
    pub fn result(i: usize) -> MemCall {
        assert!(i < BATCH);
        // SAFETY: index within the request area; the VMM has written the results.
        unsafe { area().add(i).read_volatile() }
    }
}

/// Sends one call and returns its result.
pub fn call(c: MemCall) -> MemCall {
    let mut b = Batch::new();
    b.push(c);
    b.send();
    Batch::result(0)
}

/// Sends one call from the allocator's own slot (safe while a batch is being built).
pub fn alloc_call(c: MemCall) -> MemCall {
    // SAFETY: ALLOC_SLOT is inside this vCPU's request area; only the allocator uses it.
    unsafe { area().add(ALLOC_SLOT).write_volatile(c) };
    arch::out32(port::MEMCALL, 1 | ((ALLOC_SLOT as u32) << 16));
    // SAFETY: as above; the VMM wrote the result during the exit.
    unsafe { area().add(ALLOC_SLOT).read_volatile() }
}

fn check(r: MemCall) -> Result<[u64; 2], Error> {
    if r.status == status::OK { Ok(r.ret) } else { Err(Error(r.status)) }
}

/// A memory call.
pub fn mk(op: u32, flags: u32, args: [u64; 4]) -> MemCall {
    MemCall { op, flags, args, status: u64::MAX, ret: [0; 2] }
}

/// ALLOC: returns (address, mapped length).
pub fn alloc(size: u64, policy: u64, node: u64, flags: u32) -> Result<(u64, u64), Error> {
    check(call(mk(op::ALLOC, flags, [size, policy, node, 0]))).map(|r| (r[0], r[1]))
}

pub fn free(va: u64) -> Result<(), Error> {
    check(call(mk(op::FREE, 0, [va, 0, 0, 0]))).map(|_| ())
}

/// MAP_LAZY: returns (address, length).
pub fn map_lazy(size: u64, policy: u64, node: u64, flags: u32) -> Result<(u64, u64), Error> {
    check(call(mk(op::MAP_LAZY, flags, [size, policy, node, 0]))).map(|r| (r[0], r[1]))
}

pub fn protect(va: u64, size: u64, prot: u32) -> Result<(), Error> {
    check(call(mk(op::PROTECT, prot, [va, size, 0, 0]))).map(|_| ())
}

/// MOVE: returns the new address.
pub fn mremap(va: u64) -> Result<u64, Error> {
    check(call(mk(op::MOVE, 0, [va, 0, 0, 0]))).map(|r| r[0])
}

/// TRANSLATE: (guest-physical address, node).
pub fn translate(va: u64) -> Result<(u64, u64), Error> {
    check(call(mk(op::TRANSLATE, 0, [va, 0, 0, 0]))).map(|r| (r[0], r[1]))
}

/// STATS for `node` (or `memcall::ALL_NODES`).
pub fn stats(node: u64) -> Result<MemStats, Error> {
    check(call(mk(op::STATS, 0, [node, 0, 0, 0])))?;
    let page = arch::cpu_page();
    // SAFETY: the VMM wrote a MemStats (plain u64s) at the start of this vCPU's CpuPage::args.
    Ok(unsafe { core::ptr::read_volatile((&raw const (*page).args).cast::<MemStats>()) })
}
