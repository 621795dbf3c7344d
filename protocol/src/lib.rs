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
    /// `out32 0`: registers the guest's notification handler, [`super::CpuPage::args`]`[0]`
    /// (it must lie in executable image pages; the VMM writes the status to `args[0]`). The VMM
    /// notifies the guest when it asks something of it ([`super::shared::SharedPage`] changed:
    /// the balloon's target, a shutdown request): it interrupts the vCPU that registered and
    /// enters the handler the way a kernel delivers a signal, on the interrupted stack: `rsp`
    /// drops by 16, `[rsp]` holds the interrupted RFLAGS and `[rsp + 8]` the interrupted RIP,
    /// and every other register keeps its interrupted value. The handler saves and restores
    /// what it uses and returns with `popfq; ret`. It is not entered again until the guest
    /// reports [`NOTIFY_DONE`].
    pub const SET_NOTIFY: u16 = 0x408;
    /// `out32 seq`: the guest handled the notification for [`super::shared::SharedPage::seq`]
    /// `seq` (its low 32 bits); the VMM may deliver the next one.
    pub const NOTIFY_DONE: u16 = 0x409;
    /// `out32 period_us`: timer ticks for this vCPU, for a guest that schedules threads of its
    /// own. Every `period_us` microseconds (1000 to 1_000_000; 0 turns them off) the VMM
    /// interrupts the vCPU and enters the handler at [`super::CpuPage::args`]`[0]` (executable
    /// image pages) the way it enters the notification handler (see [`SET_NOTIFY`]), and sets
    /// [`super::CpuPage::tick_mask`] to 1 (like a CPU clearing IF); while the mask is nonzero a
    /// due tick only sets [`super::CpuPage::tick_pending`]. The guest clears both. The VMM
    /// writes the status to `args[0]`.
    pub const SET_TICK: u16 = 0x40a;
    /// `out32 0`: this vCPU has nothing to run: it sleeps until another vCPU's [`WAKE`] for it,
    /// until [`super::CpuPage::args`]`[0]` nanoseconds pass (0 or more than a second: a
    /// second), or until the VMM has something for it (a notification, a stop). A `WAKE` sent
    /// before it sleeps is not lost: the next `IDLE` returns at once.
    pub const IDLE: u16 = 0x40b;
    /// `out32 cpu`: wakes vCPU `cpu` from [`IDLE`].
    pub const WAKE: u16 = 0x40c;
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
    /// A C program (`scenario=cbench`) called `abort`, or its allocator found a bad free.
    pub const ABORTED: u32 = 6;
    /// A C program exited with a nonzero status (its `@result` line says which).
    pub const PROGRAM_FAILED: u32 = 7;
    /// The largest status a guest may exit with; the VMM's own exit codes start above it.
    pub const GUEST_MAX: u32 = 63;
}

pub mod layout;

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
    /// Nonzero while the guest does not want a tick handler entered (see [`port::SET_TICK`]);
    /// the VMM sets it when it enters the handler.
    pub tick_mask: u64,
    /// Set by the VMM when a tick came due while `tick_mask` was set.
    pub tick_pending: u64,
    /// The guest's own word (its current thread); the VMM never reads or writes it.
    pub thread: u64,
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
/// Offset of [`CpuPage::tick_mask`] (the VMM reads and sets it).
pub const CPU_PAGE_TICK_MASK: u64 = core::mem::offset_of!(CpuPage, tick_mask) as u64;
/// Offset of [`CpuPage::tick_pending`] (the VMM sets it).
pub const CPU_PAGE_TICK_PENDING: u64 = core::mem::offset_of!(CpuPage, tick_pending) as u64;
/// Offset of [`CpuPage::thread`].
pub const CPU_PAGE_THREAD: u64 = core::mem::offset_of!(CpuPage, thread) as u64;
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

pub mod memcall;
pub mod shared;

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
    /// Frames the balloon holds (counted in `allocated_frames`, but not the guest's).
    pub balloon_frames: u64,
}

const _: () = assert!(core::mem::size_of::<MemStats>() <= 32 * 8);

pub mod slab;

/// Prefix of a console line that carries a machine-readable result. The VMM stores the rest of
/// the line (`key=value` pairs) in the stats JSON instead of printing it as plain output.
pub const RESULT_PREFIX: &str = "@result ";
