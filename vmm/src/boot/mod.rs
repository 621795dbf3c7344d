//! Building the guest's initial address space: the image, the system tables, `BootInfo`, and each
//! vCPU's area and stacks. Every frame comes from the memory manager's buddy allocators and is
//! mapped through the VMM-built page tables, so accounting is exact from the first frame.

pub mod image;
pub mod tables;

use std::path::Path;

use vm_memory::GuestAddress;

use crate::wire::Wire;

use protocol::layout::{
    BOOT_INFO_VA, CPU_AREA_PAGES, EXC_STACK_OFFSET, EXC_STACK_SIZE, SHARED_VA, STACK_SIZE, STACK_STRIDE, STACK_VA,
    SYSTEM_SIZE, SYSTEM_VA, cpu_area, exc_stack_top, stack_top,
};
use protocol::shared::{SHARED_MAGIC, SharedPage};
use protocol::{BOOT_MAGIC, BOOT_VERSION, BootInfo, MAX_NODES, MAX_RANGES_PER_NODE, MAX_VCPUS, MemRange, NodeInfo};

use crate::config::{Kernel, VmConfig};
use crate::memory::addr::{Gva, NodeId, PAGE_SIZE};
use crate::memory::space::pagetable::PteFlags;
use crate::memory::{MemoryError, MemoryManager};

use image::{Image, ImageError, LoadedImage};

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("cannot build the guest's boot memory")]
    Memory(#[from] MemoryError),
    #[error("the system tables for {0} vCPUs do not fit in the system area")]
    SystemArea(u32),
}

/// Where one vCPU's boot state lives.
#[derive(Clone, Copy, Debug)]
pub struct CpuBoot {
    pub id: u32,
    pub node: u32,
    /// Guest-physical address of the vCPU's [`protocol::CpuPage`].
    pub cpu_page_gpa: GuestAddress,
    pub cpu_page_va: u64,
    pub tss_va: u64,
    pub stack_top: u64,
}

/// The guest's initial state.
#[derive(Debug)]
pub struct GuestBoot {
    pub image: LoadedImage,
    /// Exclusive ranges of executable image pages (valid exception-handler targets).
    pub exec_ranges: Vec<(u64, u64)>,
    pub cr3: u64,
    pub gdt_va: u64,
    pub gdt_limit: u16,
    pub idt_va: u64,
    /// Guest-physical address of the IDT (the VMM fills it when the guest installs handlers).
    pub idt_gpa: GuestAddress,
    /// Guest-physical address of the [`protocol::shared::SharedPage`] (resident for good).
    pub shared_gpa: GuestAddress,
    pub cpus: Vec<CpuBoot>,
}

/// Offsets in the system area.
const GDT_OFFSET: u64 = 0;
const GDT_PAGES: u64 = 2;
const IDT_OFFSET: u64 = GDT_PAGES * PAGE_SIZE;
const TSS_OFFSET: u64 = IDT_OFFSET + PAGE_SIZE;

/// Opens and validates the guest image (before any VM resources are created).
pub fn open_image(kernel: &Kernel) -> Result<Image, ImageError> {
    match kernel {
        Kernel::Path(path) => Image::open(path),
        Kernel::Embedded(bytes) => Image::from_bytes(Path::new("(built-in default guest)"), bytes),
    }
}

/// Builds the guest's memory: image, system tables, BootInfo, per-vCPU areas and stacks.
pub fn build(mm: &mut MemoryManager, cfg: &VmConfig, image: Image, tsc_khz: u32) -> Result<GuestBoot, BootError> {
    let cpu_nodes = cfg.numa.cpu_nodes(cfg.cpus);
    let exec_ranges = image.segments.iter().filter(|s| s.executable).map(|s| (s.va, s.va + s.mem_len)).collect();
    let loaded = image.load(mm, NodeId(0))?;

    // System area: GDT, IDT, one TSS per vCPU. Supervisor-only, so CPL3 cannot touch it.
    let tss_bytes = u64::from(cfg.cpus) * tables::TSS_STRIDE;
    let sys_pages = TSS_OFFSET / PAGE_SIZE + tss_bytes.div_ceil(PAGE_SIZE);
    if sys_pages * PAGE_SIZE > SYSTEM_SIZE || tables::gdt_entries(cfg.cpus) as u64 * 8 > GDT_PAGES * PAGE_SIZE {
        return Err(BootError::SystemArea(cfg.cpus));
    }
    let sys = mm.alloc_frames(NodeId(0), sys_pages, None)?;
    let tss_va = |cpu: u32| SYSTEM_VA + TSS_OFFSET + u64::from(cpu) * tables::TSS_STRIDE;
    let gdt = tables::gdt(cfg.cpus, tss_va);
    let gdt_bytes: Vec<u8> = gdt.iter().flat_map(|d| d.to_le_bytes()).collect();
    mm.write(sys.gpa(), &gdt_bytes)?;
    mm.make_resident(sys.plus(IDT_OFFSET / PAGE_SIZE))?;
    for cpu in 0..cfg.cpus {
        let t = tables::tss(exc_stack_top(cpu));
        let off = tss_va(cpu) - SYSTEM_VA;
        mm.write(GuestAddress(sys.gpa().0 + off), &t)?;
    }
    mm.map_pages(Gva(SYSTEM_VA), sys, sys_pages, PteFlags::WRITABLE | PteFlags::NO_EXECUTE)?;

    // Per-vCPU areas and stacks, on the vCPU's node.
    let mut cpus = Vec::with_capacity(cfg.cpus as usize);
    for cpu in 0..cfg.cpus {
        let node = cpu_nodes[cpu as usize];
        let area = mm.alloc_frames(NodeId(node), CPU_AREA_PAGES, None)?;
        let va = cpu_area(cpu);
        let mut header = Vec::with_capacity(16);
        header.extend_from_slice(&va.to_le_bytes());
        header.extend_from_slice(&cpu.to_le_bytes());
        header.extend_from_slice(&node.to_le_bytes());
        mm.write(area.gpa(), &header)?;
        let user_rw = PteFlags::USER | PteFlags::WRITABLE | PteFlags::NO_EXECUTE;
        mm.map_pages(Gva(va), area, CPU_AREA_PAGES, user_rw)?;

        let slot = STACK_VA + u64::from(cpu) * STACK_STRIDE;
        let exc = mm.alloc_frames(NodeId(node), EXC_STACK_SIZE / PAGE_SIZE, None)?;
        mm.map_pages(Gva(slot + EXC_STACK_OFFSET), exc, EXC_STACK_SIZE / PAGE_SIZE, user_rw)?;
        let stack = mm.alloc_frames(NodeId(node), STACK_SIZE / PAGE_SIZE, None)?;
        mm.map_pages(Gva(stack_top(cpu) - STACK_SIZE), stack, STACK_SIZE / PAGE_SIZE, user_rw)?;

        cpus.push(CpuBoot {
            id: cpu,
            node,
            cpu_page_gpa: area.gpa(),
            cpu_page_va: va,
            tss_va: tss_va(cpu),
            stack_top: stack_top(cpu),
        });
    }

    // BootInfo, read-only to the guest.
    let info = boot_info(cfg, &loaded, tsc_khz);
    let bi = mm.alloc_frames(NodeId(0), 1, None)?;
    mm.write_obj(bi.gpa(), &Wire(info))?;
    mm.map_pages(Gva(BOOT_INFO_VA), bi, 1, PteFlags::USER | PteFlags::NO_EXECUTE)?;

    // The shared page, read-only to the guest; the VMM updates it while the guest runs.
    let shared = mm.alloc_frames(NodeId(0), 1, None)?;
    mm.write_obj(shared.gpa(), &Wire(SharedPage { magic: SHARED_MAGIC, ..SharedPage::default() }))?;
    mm.map_pages(Gva(SHARED_VA), shared, 1, PteFlags::USER | PteFlags::NO_EXECUTE)?;

    Ok(GuestBoot {
        image: loaded,
        exec_ranges,
        cr3: mm.space().page_tables().root().gpa().0,
        gdt_va: SYSTEM_VA + GDT_OFFSET,
        gdt_limit: u16::try_from(gdt_bytes.len() - 1).expect("GDT fits in two pages"),
        idt_va: SYSTEM_VA + IDT_OFFSET,
        idt_gpa: sys.plus(IDT_OFFSET / PAGE_SIZE).gpa(),
        shared_gpa: shared.gpa(),
        cpus,
    })
}

/// The `BootInfo` block for `cfg`.
fn boot_info(cfg: &VmConfig, image: &LoadedImage, tsc_khz: u32) -> BootInfo {
    let ranges = crate::layout::ram_ranges(&cfg.numa.nodes.iter().map(|n| n.size).collect::<Vec<_>>())
        .expect("validated layout");
    let mut nodes = [NodeInfo::default(); MAX_NODES];
    for (i, n) in cfg.numa.nodes.iter().enumerate() {
        let info = &mut nodes[i];
        info.id = n.id;
        info.mem_bytes = n.size;
        for r in ranges.iter().filter(|r| r.node == n.id).take(MAX_RANGES_PER_NODE) {
            info.ranges[info.nr_ranges as usize] = MemRange { start: r.start, len: r.len };
            info.nr_ranges += 1;
        }
        for &c in &n.cpus {
            info.cpus[c as usize / 64] |= 1 << (c % 64);
        }
    }
    let mut distance = [[0u8; MAX_NODES]; MAX_NODES];
    for (a, row) in cfg.numa.distance.iter().enumerate() {
        distance[a][..row.len()].copy_from_slice(row);
    }
    let mut cpu_node = [0u8; MAX_VCPUS];
    for (c, n) in cfg.numa.cpu_nodes(cfg.cpus).into_iter().enumerate() {
        cpu_node[c] = u8::try_from(n).expect("node ids < MAX_NODES");
    }
    let mut args = [0u8; protocol::MAX_GUEST_ARGS];
    args[..cfg.guest_args.len()].copy_from_slice(cfg.guest_args.as_bytes());
    BootInfo {
        magic: BOOT_MAGIC,
        version: BOOT_VERSION,
        nr_vcpus: cfg.cpus,
        nr_nodes: u32::try_from(cfg.numa.nodes.len()).expect("<= MAX_NODES"),
        args_len: u32::try_from(cfg.guest_args.len()).expect("<= MAX_GUEST_ARGS"),
        mem_bytes: cfg.memory,
        seed: cfg.seed,
        tsc_khz: u64::from(tsc_khz),
        image: MemRange { start: image.va_start, len: image.va_end - image.va_start },
        nodes,
        distance,
        cpu_node,
        args,
    }
}

/// The IDT gates for the guest's handler table: `handlers[v]` is vector `v`'s entry (0 = none).
/// Handlers outside the image's executable pages are rejected (the guest is untrusted).
pub fn idt_from_handlers(handlers: &[u64], exec_ranges: &[(u64, u64)]) -> Result<Vec<u8>, usize> {
    let mut idt = Vec::with_capacity(handlers.len() * 16);
    for (v, &h) in handlers.iter().enumerate() {
        let gate = if h == 0 {
            [0, 0]
        } else if exec_ranges.iter().any(|&(s, e)| s <= h && h < e) {
            let ist = if v == tables::VECTOR_DOUBLE_FAULT { 1 } else { 0 };
            tables::idt_gate(h, ist)
        } else {
            return Err(v);
        };
        idt.extend_from_slice(&gate[0].to_le_bytes());
        idt.extend_from_slice(&gate[1].to_le_bytes());
    }
    Ok(idt)
}
