//! Guest-virtual address layout. The VMM builds the page tables; the guest never changes them.
//!
//! ```text
//! 0x0000_0000_0000_0000  unmapped (null guard)
//! 0x0000_0000_0010_0000  BootInfo, read-only                      BOOT_INFO_VA
//! 0x0000_0000_0010_1000  SharedPage, read-only, VMM-updated        SHARED_VA
//! 0x0000_0000_0018_0000  GDT, IDT, TSSs: supervisor-only           SYSTEM_VA
//! 0x0000_0000_0200_0000  guest image (ELF segments)                IMAGE_VA_START..IMAGE_VA_END
//! 0x0000_0000_4000_0000  per-vCPU stacks, STACK_STRIDE each        STACK_VA
//! 0x0000_0000_8000_0000  per-vCPU areas, CPU_AREA_STRIDE each      CPU_AREA_VA
//! 0x0000_0010_0000_0000  heap mapped with 4 KiB pages              HEAP_VA_START..HEAP_VA_END
//! 0x0000_0400_0000_0000  heap mapped with 2 MiB pages              HUGE_HEAP_VA_START..HUGE_HEAP_VA_END
//! 0x0000_0800_0000_0000  slabs, one per 64 KiB slot                SLAB_VA_START..SLAB_VA_END
//! ```
//!
//! The two heaps never share a page-directory entry: a PDE is either always a 2 MiB leaf or
//! always points to a page table, which keeps shadow-paging hosts from caching a stale walk.

use super::{HUGE_PAGE_SIZE, PAGE_SIZE};

/// The [`super::BootInfo`] block.
pub const BOOT_INFO_VA: u64 = 0x10_0000;
/// The [`super::shared::SharedPage`], read-only to the guest, updated by the VMM while it runs.
pub const SHARED_VA: u64 = BOOT_INFO_VA + PAGE_SIZE;
/// GDT page, IDT page, then the TSS pages. Not accessible from CPL3.
pub const SYSTEM_VA: u64 = 0x18_0000;
/// Size of the system area.
pub const SYSTEM_SIZE: u64 = 0x8_0000;
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
/// Per-vCPU areas: vCPU `i`'s starts at `CPU_AREA_VA + i * CPU_AREA_STRIDE`.
pub const CPU_AREA_VA: u64 = 0x8000_0000;
/// Distance between two vCPUs' areas.
pub const CPU_AREA_STRIDE: u64 = 0x10_0000;
/// Pages mapped in each vCPU area: the CpuPage, the memory-call request area (2 pages), the
/// slab magazines (rings) and the doorbell.
pub const CPU_AREA_PAGES: u64 = (crate::slab::DOORBELL_OFFSET + 64).div_ceil(PAGE_SIZE);
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
/// Each size class's slabs live in their own part of the slab zone (class `c` from
/// `SLAB_VA_START + c * SLAB_CLASS_SPAN`), so that an object's class follows from its address
/// and a `free` needs no header (see [`crate::slab::class_of_addr`]).
pub const SLAB_CLASS_SPAN: u64 = 0x8_0000_0000;

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

const _: () = assert!(SHARED_VA + PAGE_SIZE <= SYSTEM_VA);
const _: () = assert!(SYSTEM_VA + SYSTEM_SIZE <= IMAGE_VA_START);
const _: () = assert!(IMAGE_VA_END <= STACK_VA);
const _: () = assert!(STACK_VA + super::MAX_VCPUS as u64 * STACK_STRIDE <= CPU_AREA_VA);
const _: () = assert!(CPU_AREA_PAGES * PAGE_SIZE <= CPU_AREA_STRIDE);
const _: () = assert!(CPU_AREA_VA + super::MAX_VCPUS as u64 * CPU_AREA_STRIDE <= HEAP_VA_START);
const _: () = assert!(EXC_STACK_OFFSET + EXC_STACK_SIZE + PAGE_SIZE + STACK_SIZE <= STACK_STRIDE);
const _: () = assert!(HUGE_HEAP_VA_START.is_multiple_of(512 * HUGE_PAGE_SIZE));
const _: () = assert!(SLAB_VA_END <= 1 << 47 && SLAB_VA_START.is_multiple_of(512 * HUGE_PAGE_SIZE));
