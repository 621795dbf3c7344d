//! The contract between the `vmm` and the guest payload.
//!
//! Both sides compile from this one file, so they cannot drift apart: the I/O ports, the guest's
//! exit statuses, the guest-virtual address layout, the `BootInfo` block the VMM hands to the guest
//! and the per-vCPU page through which the guest talks to the VMM.
//!
//! Everything here is plain `#[repr(C)]` data with explicit padding and sizes checked at compile
//! time. The guest is untrusted: the VMM copies every field out of guest memory and validates it.

#![no_std]

/// Size of a small page.
pub const PAGE_SIZE: u64 = 0x1000;
/// Size of a large (2 MiB) page.
pub const HUGE_PAGE_SIZE: u64 = 0x20_0000;

/// I/O ports. A port-I/O exit costs 6-18 us on the target host: batch through the per-vCPU page.
///
/// The VMM opens exactly this range in every vCPU's TSS I/O permission bitmap; any other port
/// raises #GP in the guest.
pub mod port {
    /// `out8`: one console byte (for the exception path, where the buffer may be unusable).
    pub const CONSOLE_PUTC: u16 = 0x400;
    /// `out32 len`: `len` bytes from [`super::CpuPage::console`] go to the console.
    pub const CONSOLE_WRITE: u16 = 0x401;
    /// `out32 status`: the guest is done; the VMM exits with `status` (0 to
    /// [`super::exit::GUEST_MAX`]). Any other status is a protocol error: the VMM reports it
    /// and exits with its own code for that, so a guest cannot pass for the VMM's failures.
    pub const EXIT: u16 = 0x402;
    /// `out32 0`: the VMM stores the vCPU's CR2 (unreadable at CPL3) in
    /// [`super::CpuPage::trap_cr2`].
    pub const TRAP_INFO: u16 = 0x403;
    /// `out32 n | first << 16`: process the `n` [`super::memcall::MemCall`]s of the vCPU's
    /// request area starting at slot `first` (`first + n <= memcall::MAX_BATCH`), in order. Each
    /// gets its `status` and `ret`; the VMM stores how many it processed in
    /// [`super::CpuPage::memcall_done`]. (The guest's allocator uses the last slot on its own, so
    /// it can refill in the middle of a batch being built.)
    pub const MEMCALL: u16 = 0x404;
    /// `out32 x`: does nothing; a raw exit for measuring exit cost.
    pub const NOP: u16 = 0x405;
    /// `out32 n`: install exception handlers: [`super::CpuPage::args`]`[v]` is the handler of
    /// vector `v` for `v < n` (0 = none). Handlers must lie in executable image pages. The VMM
    /// writes the status ([`super::status`]) to `args[0]`.
    pub const SET_IDT: u16 = 0x406;
    /// `out32 error_code`, from the guest's #PF handler: the VMM reads the vCPU's CR2, stores it in
    /// [`super::CpuPage::trap_cr2`] and, if it lies in a MAP_LAZY region, backs that page (the
    /// memcall FAULT, on its own channel so it cannot clobber a batch the faulting code was
    /// building). Protection faults (error code bit 0) are never lazy faults.
    /// [`super::CpuPage::fault_status`] gets `status::OK` when the access can be
    /// retried, `status::EFAULT` when the fault is the guest's own. One exit per #PF.
    pub const LAZY_FAULT: u16 = 0x407;
    /// First port the guest may use.
    pub const FIRST: u16 = 0x400;
    /// Last port the guest may use.
    pub const LAST: u16 = 0x40f;
}

/// Exit statuses the guest reports through [`port::EXIT`]. The `vmm` process exits with the same
/// number; the VMM's own failures use codes from 64 up, so the two never collide.
pub mod exit {
    /// The scenario ran and verified.
    pub const SUCCESS: u32 = 0;
    /// The scenario's verification failed.
    pub const VERIFY_FAILED: u32 = 1;
    /// An unexpected CPU exception.
    pub const EXCEPTION: u32 = 2;
    /// The guest panicked.
    pub const PANIC: u32 = 3;
    /// Bad `--guest-args` or an unknown scenario.
    pub const BAD_ARGS: u32 = 4;
    /// A memory call failed where the scenario did not expect it.
    pub const MEMCALL_FAILED: u32 = 5;
    /// The largest status a guest may exit with; the VMM's own exit codes start above it.
    pub const GUEST_MAX: u32 = 63;
}

/// Guest-virtual address layout. The VMM builds the page tables; the guest never changes them.
///
/// ```text
/// 0x0000_0000_0000_0000  unmapped (null guard)
/// 0x0000_0000_0010_0000  BootInfo, read-only                      BOOT_INFO_VA
/// 0x0000_0000_0018_0000  GDT, IDT, TSSs: supervisor-only           SYSTEM_VA
/// 0x0000_0000_0040_0000  per-vCPU areas, CPU_AREA_STRIDE each      CPU_AREA_VA
/// 0x0000_0000_0200_0000  guest image (ELF segments)                IMAGE_VA_START..IMAGE_VA_END
/// 0x0000_0000_4000_0000  per-vCPU stacks, STACK_STRIDE each        STACK_VA
/// 0x0000_0010_0000_0000  heap mapped with 4 KiB pages              HEAP_VA_START..HEAP_VA_END
/// 0x0000_0400_0000_0000  heap mapped with 2 MiB pages              HUGE_HEAP_VA_START..HUGE_HEAP_VA_END
/// 0x0000_0800_0000_0000  slabs, one per 64 KiB slot                SLAB_VA_START..SLAB_VA_END
/// ```
///
/// The two heaps never share a page-directory entry: a PDE is either always a 2 MiB leaf or
/// always points to a page table, which keeps shadow-paging hosts from caching a stale walk.
pub mod layout {
    use super::{HUGE_PAGE_SIZE, PAGE_SIZE};

    /// The [`super::BootInfo`] block.
    pub const BOOT_INFO_VA: u64 = 0x10_0000;
    /// GDT page, IDT page, then the TSS pages. Not accessible from CPL3.
    pub const SYSTEM_VA: u64 = 0x18_0000;
    /// Size of the system area.
    pub const SYSTEM_SIZE: u64 = 0x8_0000;
    /// Per-vCPU areas: vCPU `i`'s starts at `CPU_AREA_VA + i * CPU_AREA_STRIDE`.
    pub const CPU_AREA_VA: u64 = 0x40_0000;
    /// Distance between two vCPUs' areas.
    pub const CPU_AREA_STRIDE: u64 = 0x1_0000;
    /// Pages mapped in each vCPU area: the CpuPage, the memory-call request area (2 pages) and
    /// the slab magazines.
    pub const CPU_AREA_PAGES: u64 = 16;
    /// Lowest address a guest image segment may occupy.
    pub const IMAGE_VA_START: u64 = 0x200_0000;
    /// End of the image window.
    pub const IMAGE_VA_END: u64 = 0x4000_0000;
    /// Per-vCPU stack slots: vCPU `i`'s is `STACK_VA + i * STACK_STRIDE`.
    pub const STACK_VA: u64 = 0x4000_0000;
    /// Distance between two vCPUs' stack slots.
    pub const STACK_STRIDE: u64 = 0x10_0000;
    /// Offset, inside a slot, of the bottom of the exception (IST) stack; one guard page below it.
    pub const EXC_STACK_OFFSET: u64 = PAGE_SIZE;
    /// Size of the exception stack used for double faults.
    pub const EXC_STACK_SIZE: u64 = 4 * PAGE_SIZE;
    /// Size of the main stack. It ends at the top of the slot; the page below it is unmapped.
    pub const STACK_SIZE: u64 = 256 * 1024;
    /// Heap for 4 KiB-page mappings.
    pub const HEAP_VA_START: u64 = 0x10_0000_0000;
    /// End of the 4 KiB-page heap.
    pub const HEAP_VA_END: u64 = 0x400_0000_0000;
    /// Heap for 2 MiB-page mappings.
    pub const HUGE_HEAP_VA_START: u64 = HEAP_VA_END;
    /// End of the 2 MiB-page heap.
    pub const HUGE_HEAP_VA_END: u64 = 0x800_0000_0000;
    /// Slabs (4 KiB pages): slab `i` lives in the 64 KiB slot at `SLAB_VA_START + i * SLAB_SLOT`.
    pub const SLAB_VA_START: u64 = HUGE_HEAP_VA_END;
    /// End of the slab zone.
    pub const SLAB_VA_END: u64 = 0x900_0000_0000;
    /// Address space per slab (the largest slab).
    pub const SLAB_SLOT: u64 = 0x1_0000;

    /// Guest-virtual address of vCPU `cpu`'s area.
    pub const fn cpu_area(cpu: u32) -> u64 {
        CPU_AREA_VA + cpu as u64 * CPU_AREA_STRIDE
    }

    /// Top of vCPU `cpu`'s main stack (exclusive).
    pub const fn stack_top(cpu: u32) -> u64 {
        STACK_VA + (cpu as u64 + 1) * STACK_STRIDE
    }

    /// Top of vCPU `cpu`'s exception stack (exclusive).
    pub const fn exc_stack_top(cpu: u32) -> u64 {
        STACK_VA + cpu as u64 * STACK_STRIDE + EXC_STACK_OFFSET + EXC_STACK_SIZE
    }

    const _: () = assert!(BOOT_INFO_VA + PAGE_SIZE <= SYSTEM_VA);
    const _: () = assert!(SYSTEM_VA + SYSTEM_SIZE <= CPU_AREA_VA);
    const _: () = assert!(CPU_AREA_VA + super::MAX_VCPUS as u64 * CPU_AREA_STRIDE <= IMAGE_VA_START);
    const _: () = assert!(CPU_AREA_PAGES * PAGE_SIZE <= CPU_AREA_STRIDE);
    const _: () = assert!(IMAGE_VA_END <= STACK_VA);
    const _: () = assert!(STACK_VA + super::MAX_VCPUS as u64 * STACK_STRIDE <= HEAP_VA_START);
    const _: () = assert!(EXC_STACK_OFFSET + EXC_STACK_SIZE + PAGE_SIZE + STACK_SIZE <= STACK_STRIDE);
    const _: () = assert!(HUGE_HEAP_VA_START.is_multiple_of(512 * HUGE_PAGE_SIZE));
    const _: () = assert!(SLAB_VA_END <= 1 << 47 && SLAB_VA_START.is_multiple_of(512 * HUGE_PAGE_SIZE));
}

/// Most NUMA nodes a guest can have.
pub const MAX_NODES: usize = 8;
/// Most vCPUs a guest can have (KVM may allow fewer).
pub const MAX_VCPUS: usize = 256;
/// Most guest-physical ranges per node (the MMIO hole below 4 GiB can split a node in two).
pub const MAX_RANGES_PER_NODE: usize = 2;
/// Longest `--guest-args` string, in bytes.
pub const MAX_GUEST_ARGS: usize = 1024;

/// `BootInfo::magic`.
pub const BOOT_MAGIC: u64 = u64::from_le_bytes(*b"MMVMBOOT");
/// `BootInfo::version`; bumped on any layout change.
pub const BOOT_VERSION: u32 = 1;

/// A guest-physical range.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemRange {
    /// First byte.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
}

/// One NUMA node as the guest sees it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeInfo {
    /// Node id (dense from 0).
    pub id: u32,
    /// Valid entries in `ranges`.
    pub nr_ranges: u32,
    /// Guest-physical ranges of this node's RAM, ascending.
    pub ranges: [MemRange; MAX_RANGES_PER_NODE],
    /// Bit `i` of `cpus[i / 64]` is set when vCPU `i` belongs to this node.
    pub cpus: [u64; MAX_VCPUS / 64],
    /// Total RAM of the node, in bytes.
    pub mem_bytes: u64,
}

/// Handed to the guest at [`layout::BOOT_INFO_VA`] (read-only) and in `rsi` at entry.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BootInfo {
    /// [`BOOT_MAGIC`].
    pub magic: u64,
    /// [`BOOT_VERSION`].
    pub version: u32,
    /// Number of vCPUs.
    pub nr_vcpus: u32,
    /// Number of NUMA nodes.
    pub nr_nodes: u32,
    /// Length of `args` in bytes.
    pub args_len: u32,
    /// Guest RAM, in bytes.
    pub mem_bytes: u64,
    /// Seed for the guest's pseudo-random choices (from `--guest-args seed=`, else from the VMM).
    pub seed: u64,
    /// Guest TSC frequency in kHz (0 if unknown): for turning `rdtsc` deltas into time.
    pub tsc_khz: u64,
    /// Guest-virtual range of the loaded image.
    pub image: MemRange,
    /// The nodes, `nr_nodes` valid.
    pub nodes: [NodeInfo; MAX_NODES],
    /// `distance[a][b]`: ACPI SLIT-style distance from node `a` to `b` (10 = local).
    pub distance: [[u8; MAX_NODES]; MAX_NODES],
    /// Node of each vCPU.
    pub cpu_node: [u8; MAX_VCPUS],
    /// `--guest-args`, UTF-8, `args_len` bytes valid.
    pub args: [u8; MAX_GUEST_ARGS],
}

// No padding anywhere (sum of the fields): the VMM writes it as plain bytes.
const _: () = assert!(
    core::mem::size_of::<BootInfo>()
        == 8 + 4 * 4
            + 8 * 3
            + 16
            + MAX_NODES * core::mem::size_of::<NodeInfo>()
            + MAX_NODES * MAX_NODES
            + MAX_VCPUS
            + MAX_GUEST_ARGS
);
const _: () = assert!(core::mem::size_of::<NodeInfo>() == 8 + 16 * MAX_RANGES_PER_NODE + 8 * (MAX_VCPUS / 64) + 8);
const _: () = assert!(core::mem::size_of::<BootInfo>() as u64 <= PAGE_SIZE);

/// Bytes of console buffer in each [`CpuPage`].
pub const CONSOLE_BUF: usize = 2048;

/// Page 0 of each vCPU's area (at [`layout::cpu_area`]); the vCPU's GS base points here.
///
/// The guest writes it; the VMM reads it only when the guest rings a port, and copies and
/// validates what it reads.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct CpuPage {
    /// This page's own guest-virtual address, so that `gs:[0]` finds it.
    pub self_va: u64,
    /// The vCPU id.
    pub cpu_id: u32,
    /// The vCPU's NUMA node.
    pub node: u32,
    /// CR2 of the last exception, written by the VMM on [`port::TRAP_INFO`].
    pub trap_cr2: u64,
    /// Number of memory calls the VMM processed for the last [`port::MEMCALL`].
    pub memcall_done: u64,
    /// Status of the last [`port::LAZY_FAULT`].
    pub fault_status: u64,
    /// Reserved, zero.
    pub reserved: [u64; 3],
    /// Arguments and results of simple port calls ([`port::SET_IDT`]).
    pub args: [u64; 32],
    /// Console bytes for [`port::CONSOLE_WRITE`].
    pub console: [u8; CONSOLE_BUF],
}

/// Offset of [`CpuPage::trap_cr2`] (the VMM writes it).
pub const CPU_PAGE_TRAP_CR2: u64 = core::mem::offset_of!(CpuPage, trap_cr2) as u64;
/// Offset of [`CpuPage::memcall_done`].
pub const CPU_PAGE_MEMCALL_DONE: u64 = core::mem::offset_of!(CpuPage, memcall_done) as u64;
/// Offset of [`CpuPage::fault_status`].
pub const CPU_PAGE_FAULT_STATUS: u64 = core::mem::offset_of!(CpuPage, fault_status) as u64;
/// Offset of [`CpuPage::args`].
pub const CPU_PAGE_ARGS: u64 = core::mem::offset_of!(CpuPage, args) as u64;
/// Offset of [`CpuPage::console`] (the VMM reads it).
pub const CPU_PAGE_CONSOLE: u64 = core::mem::offset_of!(CpuPage, console) as u64;

// No padding anywhere: the VMM reads these as plain bytes.
const _: () = assert!(core::mem::size_of::<CpuPage>() == 8 + 4 + 4 + 8 + 40 + 256 + CONSOLE_BUF);
const _: () = assert!(core::mem::size_of::<CpuPage>() as u64 <= PAGE_SIZE);

/// Status codes the VMM returns for calls.
pub mod status {
    /// Done.
    pub const OK: u64 = 0;
    /// An argument is invalid.
    pub const EINVAL: u64 = 1;
    /// Not enough memory.
    pub const ENOMEM: u64 = 2;
    /// An address is not mapped (or not owned by the caller).
    pub const EFAULT: u64 = 3;
    /// The object is already free (double free).
    pub const EALREADY: u64 = 4;
    /// Unknown operation.
    pub const ENOSYS: u64 = 5;
}

/// Memory calls: the guest asks the VMM for memory, which it owns.
///
/// A vCPU writes up to [`memcall::MAX_BATCH`] [`memcall::MemCall`]s into its request area (page 1
/// and 2 of its CPU area, [`memcall::AREA_OFFSET`]) and rings [`port::MEMCALL`] once: one exit
/// for the whole batch. The VMM copies each call out of guest memory, validates every field, and
/// writes back `status` (a [`status`] code) and `ret`.
///
/// Addresses are guest-virtual. All memory the VMM hands out is zeroed and is backed by host
/// memory only when first touched (unless [`memcall::flags::POPULATE`]).
pub mod memcall {
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
        /// `args = [class, want, 0, 0]`: drains the calling vCPU's free magazine of `class`
        /// (every object validated; bad ones are skipped and reported in the magazine), then
        /// refills its alloc magazine up to `want` objects (at most
        /// [`super::super::slab::batch`]) -> `ret = [objects in the alloc magazine, bad frees]`.
        pub const SLAB_EXCHANGE: u32 = 9;
        /// `args = [object, 0, 0, 0]`: frees one slab object now (EFAULT: not an object,
        /// EALREADY: already free).
        pub const SLAB_FREE: u32 = 10;
        /// `args = [object, 0, 0, 0]` -> `ret = [object size, 0]` if it is handed out (EFAULT:
        /// not an object, EALREADY: free).
        pub const SLAB_INFO: u32 = 11;
        /// Number of operations.
        pub const COUNT: usize = 12;
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
}

/// What STATS writes into `CpuPage::args` (all counts in 4 KiB frames unless named otherwise).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemStats {
    pub total_frames: u64,
    pub free_frames: u64,
    pub allocated_frames: u64,
    pub resident_frames: u64,
    /// Second-level (userfaultfd) faults served so far that installed memory.
    pub uffd_faults: u64,
    /// Frames those faults installed.
    pub uffd_pages: u64,
    /// The VMM process's resident set, in KiB.
    pub host_rss_kib: u64,
    /// Fault-around window in bytes.
    pub fault_around: u64,
    /// Page-table pages in use.
    pub page_table_pages: u64,
    /// Memory calls served so far (all vCPUs).
    pub memcalls: u64,
    /// Doorbell exits so far (all vCPUs).
    pub doorbells: u64,
    /// The anonymous part of the VMM's resident set (guest RAM and VMM heap), in KiB.
    pub host_rss_anon_kib: u64,
    /// Slab objects handed out (in magazines or in use).
    pub slab_objects_active: u64,
    /// Frames holding slabs.
    pub slab_frames: u64,
}

const _: () = assert!(core::mem::size_of::<MemStats>() <= 32 * 8);

/// Small objects: size classes and the per-vCPU magazines through which the guest gets and
/// returns slab objects without an exit per object.
///
/// Each vCPU has, per class, an *alloc* magazine of ready objects (the guest pops from it) and a
/// *free* magazine (the guest pushes freed objects onto it). When the alloc magazine is empty or
/// the free magazine full, one SLAB_EXCHANGE call drains and refills it. The guest never reuses
/// a freed object itself: every object goes back through the VMM, which checks it belongs to a
/// live slab, sits on an object boundary and is not already free, before it can be handed out
/// again. Bad frees change nothing and are counted in the magazine.
pub mod slab {
    use super::PAGE_SIZE;

    /// Object sizes.
    pub const CLASSES: [u32; 17] = [8, 16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096];
    /// Number of classes.
    pub const NR_CLASSES: usize = CLASSES.len();
    /// Largest slab object; larger allocations are whole pages (ALLOC).
    pub const MAX_OBJECT: u32 = 4096;
    /// Entries per magazine.
    pub const MAG: usize = 128;
    /// Offset of the magazines (`[Magazine; NR_CLASSES]`) within the vCPU's CPU area.
    pub const MAGAZINES_OFFSET: u64 = 3 * PAGE_SIZE;

    /// One class's magazines on one vCPU.
    #[repr(C)]
    #[derive(Clone, Copy, Debug)]
    pub struct Magazine {
        /// Objects in `alloc` (the guest pops from the end; the VMM refills).
        pub alloc_count: u32,
        /// Objects in `free` (the guest pushes; the VMM drains).
        pub free_count: u32,
        /// Bad frees found in this magazine so far (VMM).
        pub free_errors: u32,
        /// Status of the last bad free (VMM).
        pub last_status: u32,
        /// The last bad pointer (VMM).
        pub last_bad: u64,
        pub alloc: [u64; MAG],
        pub free: [u64; MAG],
    }

    /// Offset of `alloc` in a [`Magazine`].
    pub const MAG_ALLOC: u64 = core::mem::offset_of!(Magazine, alloc) as u64;
    /// Offset of `free` in a [`Magazine`].
    pub const MAG_FREE: u64 = core::mem::offset_of!(Magazine, free) as u64;
    const _: () = assert!(core::mem::size_of::<Magazine>() == 24 + 16 * MAG);
    const _: () = assert!(
        MAGAZINES_OFFSET + (NR_CLASSES * core::mem::size_of::<Magazine>()) as u64
            <= super::layout::CPU_AREA_PAGES * PAGE_SIZE
    );

    /// Class of each size in 8-byte steps (for alignments up to 8): `CLASS_OF[size.div_ceil(8)]`.
    const CLASS_OF: [u8; MAX_OBJECT as usize / 8 + 1] = {
        let mut t = [0u8; MAX_OBJECT as usize / 8 + 1];
        let mut i = 0;
        while i < t.len() {
            let mut c = 0;
            while (CLASSES[c] as usize) < i * 8 {
                c += 1;
            }
            // Fewer than 256 classes.
            #[allow(clippy::cast_possible_truncation)]
            {
                t[i] = c as u8;
            }
            i += 1;
        }
        t
    };

    /// The smallest class holding `size` bytes at `align`, if any.
    pub const fn class_for(size: usize, align: usize) -> Option<usize> {
        if align <= 8 {
            return if size <= MAX_OBJECT as usize { Some(CLASS_OF[size.div_ceil(8)] as usize) } else { None };
        }
        let mut i = 0;
        while i < NR_CLASSES {
            let c = CLASSES[i] as usize;
            // A class's objects are aligned to its largest power-of-two divisor.
            if c >= size && (1 << c.trailing_zeros()) >= align {
                return Some(i);
            }
            i += 1;
        }
        None
    }

    const _: () = {
        // The table agrees with the search for every size.
        let mut size = 0;
        while size <= MAX_OBJECT as usize {
            let mut c = 0;
            while (CLASSES[c] as usize) < size {
                c += 1;
            }
            assert!(CLASS_OF[size.div_ceil(8)] as usize == c);
            size += 1;
        }
    };

    /// How many objects one exchange moves for a class of `size` bytes: about 32 KiB worth,
    /// between 16 and [`MAG`] (so even 4 KiB objects make 32 operations per exit).
    pub const fn batch(size: u32) -> usize {
        let n = 32768 / size as usize;
        if n < 16 {
            16
        } else if n > MAG {
            MAG
        } else {
            n
        }
    }
}

/// Prefix of a console line that carries a machine-readable result. The VMM stores the rest of
/// the line (`key=value` pairs) in the stats JSON instead of printing it as plain output.
pub const RESULT_PREFIX: &str = "@result ";
