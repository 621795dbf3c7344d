//! Memory calls: the guest asks the VMM for memory, which it owns.
//!
//! A vCPU writes up to [`memcall::MAX_BATCH`] [`memcall::MemCall`]s into its request area (page 1
//! and 2 of its CPU area, [`memcall::AREA_OFFSET`]) and rings [`port::MEMCALL`] once: one exit
//! for the whole batch. The VMM copies each call out of guest memory, validates every field, and
//! writes back `status` (a [`status`] code) and `ret`.
//!
//! Addresses are guest-virtual. All memory the VMM hands out is zeroed and is backed by host
//! memory only when first touched (unless [`memcall::flags::POPULATE`]).

/// Offset of the request area within the vCPU's CPU area.
pub const AREA_OFFSET: u64 = super::PAGE_SIZE;
/// Most calls per doorbell.
pub const MAX_BATCH: usize = 128;

/// One call. `args` and `ret` depend on `op`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemCall {
    /// An [`op`] code.
    pub op: u32,
    /// [`flags`] for ALLOC and MAP_LAZY, [`prot`] bits for PROTECT.
    pub flags: u32,
    pub args: [u64; 4],
    /// Written by the VMM: a `status` code.
    pub status: u64,
    /// Written by the VMM.
    pub ret: [u64; 2],
}

const _: () = assert!(core::mem::size_of::<MemCall>() == 64);
const _: () = assert!(AREA_OFFSET + (MAX_BATCH * 64) as u64 <= 3 * super::PAGE_SIZE);

/// Operations. Every argument, flag and bit the operation does not name is reserved and
/// must be 0: anything else gets EINVAL, so that it can be given a meaning later.
pub mod op {
    /// Does nothing (status OK): measures the batch path itself.
    pub const NOP: u32 = 0;
    /// `args = [size, policy, node, 0]` -> `ret = [address, mapped bytes]`.
    pub const ALLOC: u32 = 1;
    /// `args = [address, 0, 0, 0]`: frees an ALLOC or MAP_LAZY region (its start address).
    pub const FREE: u32 = 2;
    /// `args = [size, policy, node, 0]` -> `ret = [address, size]`: reserves a region whose
    /// frames are allocated only when touched (the guest's #PF handler sends FAULT).
    pub const MAP_LAZY: u32 = 3;
    /// `args = [address, 0, 0, 0]`: backs the page at `address` in a MAP_LAZY region (with
    /// fault-around) -> `ret = [pages mapped, 0]`.
    pub const FAULT: u32 = 4;
    /// `args = [address, size, 0, 0]`, `flags` = [`super::prot`] bits: changes the access
    /// of whole pages inside one region. `prot::NONE` unmaps them but keeps their contents.
    pub const PROTECT: u32 = 5;
    /// `args = [address, 0, 0, 0]` -> `ret = [new address, 0]`: moves a region to a new
    /// address (like `mremap`); the old address faults afterwards, the data follows.
    pub const MOVE: u32 = 6;
    /// `args = [node or ALL_NODES, 0, 0, 0]`: writes a [`super::MemStats`] into the
    /// calling vCPU's `CpuPage::args`.
    pub const STATS: u32 = 7;
    /// `args = [address, 0, 0, 0]` -> `ret = [guest-physical address, node]` of the page.
    pub const TRANSLATE: u32 = 8;
    /// `args = [class, want, 0, 0]`: drains the calling vCPU's free ring of `class` (every
    /// object validated; bad ones are skipped and reported in the magazine), then refills its
    /// alloc ring up to `want` objects (at most [`super::super::slab::target`]) -> `ret =
    /// [objects in the alloc ring, bad frees]`. The synchronous path of the rings, which a
    /// VMM thread otherwise services without an exit (`protocol::slab`).
    pub const SLAB_EXCHANGE: u32 = 9;
    /// `args = [object, 0, 0, 0]`: frees one slab object now (EFAULT: not an object,
    /// EALREADY: already free).
    pub const SLAB_FREE: u32 = 10;
    /// `args = [object, 0, 0, 0]` -> `ret = [object size, 0]` if it is handed out (EFAULT:
    /// not an object, EALREADY: free).
    pub const SLAB_INFO: u32 = 11;
    /// `args = [cache bytes, lazy faults, 0, 0]`: what only the guest knows, for the balloon
    /// statistics: bytes it holds in caches it could drop, and the #PF it resolved through
    /// FAULT (its minor faults). Sent every [`super::super::shared::SharedPage::stats_interval_ms`].
    pub const GUEST_STATS: u32 = 12;
    /// Number of operations.
    pub const COUNT: usize = 13;
}

/// NUMA policy of ALLOC and MAP_LAZY (`args[1]`), with the node in `args[2]`.
pub mod policy {
    /// The calling vCPU's node, falling back to the others by distance.
    pub const LOCAL: u64 = 0;
    /// Only `node`; ENOMEM when it is full.
    pub const BIND: u64 = 1;
    /// `node` first, then the others by distance from it.
    pub const PREFERRED: u64 = 2;
    /// Round-robin over all nodes, page by page (or block by block for contiguous memory).
    pub const INTERLEAVE: u64 = 3;
}

/// ALLOC / MAP_LAZY flags.
pub mod flags {
    /// The memory reads as zero. Always true (freed frames lose their contents); accepted
    /// so callers can say what they rely on.
    pub const ZERO: u32 = 1 << 0;
    /// Physically contiguous, like the kernel's `alloc_pages`.
    pub const CONTIGUOUS: u32 = 1 << 1;
    /// Only below 4 GiB guest-physical (like `GFP_DMA32`).
    pub const DMA32: u32 = 1 << 2;
    /// Prefer 2 MiB pages (size rounded up to 2 MiB); falls back to 4 KiB pages.
    pub const HUGE: u32 = 1 << 3;
    /// Back the memory with host memory now instead of on first touch.
    pub const POPULATE: u32 = 1 << 4;
    /// Reserved, refused with EINVAL: new memory is writable, and writable memory is never
    /// executable (W^X). To run code, write it, then PROTECT it `READ | EXEC`.
    pub const EXEC: u32 = 1 << 5;
    /// Every flag ALLOC accepts (MAP_LAZY takes ZERO and DMA32).
    pub const ALL: u32 = ZERO | CONTIGUOUS | DMA32 | HUGE | POPULATE;
}

/// PROTECT access bits. `WRITE | EXEC` together is refused with EINVAL (W^X): memory is
/// writable or executable, never both.
pub mod prot {
    /// No access: pages unmapped, contents kept.
    pub const NONE: u32 = 0;
    pub const READ: u32 = 1 << 0;
    pub const WRITE: u32 = 1 << 1;
    pub const EXEC: u32 = 1 << 2;
    pub const ALL: u32 = READ | WRITE | EXEC;
}

/// STATS for every node.
pub const ALL_NODES: u64 = u64::MAX;
