//! The memory manager: owns every guest frame (per-node buddy allocators), the page-state map,
//! the guest's page tables and the host backing of guest RAM.
//!
//! Rules it keeps:
//! - A frame is `Allocated` only while its contents are zero and it has no host backing; the VMM
//!   writes a frame only after making it `Resident` ([`MemoryManager::write`]), so a VMM write
//!   never blocks on the fault handler.
//! - Freed frames lose their host backing (`MADV_DONTNEED`) before going back to the buddy, so a
//!   reused frame is zero and host RSS follows what the guest uses.
//! - After a present leaf entry changes, the old frame's host mapping is dropped so that no
//!   vCPU keeps a stale translation (see `pagetable`).

use std::sync::Arc;

use kvm_ioctls::VmFd;
use vm_memory::{Bytes, GuestAddress};

use crate::layout::RamRange;

use std::collections::{BTreeMap, HashMap};

use protocol::layout::{
    HEAP_VA_END, HEAP_VA_START, HUGE_HEAP_VA_END, HUGE_HEAP_VA_START, SLAB_SLOT, SLAB_VA_END, SLAB_VA_START,
};

use super::addr::{Gfn, Gva, HUGE_PAGE_SIZE, NodeId, PAGE_SIZE};
use super::buddy::{BuddyAllocator, BuddyError, BuddyInfo};
use super::memslots::Memslots;
use super::page_state::{FrameState, PageStates};
use super::pagetable::{PageSize, PageTables, PtError, Pte, PteFlags};
use super::policy::Fallback;
use super::populate::{Populate, PopulateError};
use super::ram::GuestRam;
use super::regions::Region;
use super::slab::SlabAllocator;
use super::vaspace::VaZone;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("node {node}: cannot allocate {pages} frames")]
    Alloc {
        node: NodeId,
        pages: u64,
        #[source]
        source: BuddyError,
    },
    #[error("cannot free {pages} frames at {gfn}")]
    Free {
        gfn: Gfn,
        pages: u64,
        #[source]
        source: BuddyError,
    },
    #[error("no NUMA node {0}")]
    NoNode(NodeId),
    #[error("cannot register memslots for {pages} frames at {gfn}")]
    Memslot {
        gfn: Gfn,
        pages: u64,
        #[source]
        source: super::ram::RamError,
    },
    #[error("cannot map the memory manager's metadata")]
    Metadata(#[source] std::io::Error),
    #[error("page tables: cannot update {va}")]
    PageTable {
        va: Gva,
        #[source]
        source: PtError,
    },
    #[error("cannot write {len} bytes at {gpa:#x}")]
    Write {
        gpa: u64,
        len: usize,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("cannot read {len} bytes at {gpa:#x}")]
    Read {
        gpa: u64,
        len: usize,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("cannot back frame {gfn}")]
    Populate {
        gfn: Gfn,
        #[source]
        source: PopulateError,
    },
    #[error("cannot discard the host backing of {pages} frames at {gfn}")]
    Discard {
        gfn: Gfn,
        pages: u64,
        #[source]
        source: std::io::Error,
    },
}

/// A memory manager over real, unregistered guest RAM of `node_sizes` (no KVM), with distance 10
/// local and 20 remote: for tests and benchmarks of the allocators.
pub fn standalone(node_sizes: &[u64]) -> Result<MemoryManager, MemoryError> {
    let n = node_sizes.len();
    let ranges = crate::layout::ram_ranges(node_sizes).ok_or(MemoryError::NoNode(NodeId(0)))?;
    let bindings = vec![None; n];
    let ram = Arc::new(GuestRam::new(&ranges, &bindings).map_err(|e| MemoryError::Metadata(std::io::Error::other(e)))?);
    let distance: Vec<Vec<u8>> = (0..n).map(|a| (0..n).map(|b| if a == b { 10 } else { 20 }).collect()).collect();
    MemoryManager::new(ram, &distance, Populate::Direct, None, 64 << 10)
}

/// Most frames one lazy-region fault maps.
const LAZY_WINDOW_MAX: u64 = 16;

/// One NUMA node's frames.
#[derive(Debug)]
pub struct NodeMem {
    pub id: NodeId,
    pub ranges: Vec<RamRange>,
    pub buddy: BuddyAllocator,
}

/// Per-node frame counts for the stats.
#[derive(Clone, Debug, serde::Serialize)]
pub struct NodeStats {
    pub node: u32,
    pub frames_total: u64,
    pub frames_free: u64,
    pub frames_allocated: u64,
    pub frames_resident: u64,
    /// Frames ever installed by second-level faults.
    pub frames_faulted: u64,
    pub buddyinfo: BuddyInfo,
}

/// Frames and their backing: the part of the manager that page-table updates need while the
/// tables themselves are borrowed.
#[derive(Debug)]
pub(super) struct FramePool {
    pub(super) ram: Arc<GuestRam>,
    pub(super) states: Arc<PageStates>,
    pub(super) nodes: Vec<NodeMem>,
    pub(super) populate: Populate,
    /// KVM memslots, registered as frames are first handed out (`None` without a VM: tests).
    pub(super) slots: Option<Memslots>,
}

impl FramePool {
    /// Takes `pages` contiguous frames from `node` and makes them guest-visible `Allocated`.
    pub(super) fn alloc(&mut self, node: NodeId, pages: u64, below: Option<Gfn>) -> Result<Gfn, MemoryError> {
        let n = self.nodes.get_mut(node.0 as usize).ok_or(MemoryError::NoNode(node))?;
        let res = match below {
            Some(limit) => n.buddy.alloc_exact_below(pages, limit),
            None => n.buddy.alloc_exact(pages),
        };
        let gfn = res.map_err(|source| MemoryError::Alloc { node, pages, source })?;
        if let Some(slots) = &mut self.slots
            && let Err(source) = slots.ensure(gfn.gpa(), pages * PAGE_SIZE)
        {
            let _ = self.nodes[node.0 as usize].buddy.free_exact(gfn, pages);
            return Err(MemoryError::Memslot { gfn, pages, source });
        }
        self.states.set_range(gfn, pages, FrameState::Allocated);
        Ok(gfn)
    }

    /// A zeroed, resident frame for a page table: from node 0 (tables are few and shared),
    /// else from any node.
    pub(super) fn alloc_table(&mut self) -> Option<Gfn> {
        let nodes = u32::try_from(self.nodes.len()).expect("few nodes");
        let gfn = (0..nodes).find_map(|n| self.alloc(NodeId(n), 1, None).ok())?;
        if self.populate.zero_fill(&self.ram, &self.states, gfn).is_err() {
            let _ = self.free(gfn, 1);
            return None;
        }
        Some(gfn)
    }

    /// Returns a run to its node after dropping its host backing. Nothing changes on error.
    pub(super) fn free(&mut self, gfn: Gfn, pages: u64) -> Result<(), MemoryError> {
        let bad = |source| MemoryError::Free { gfn, pages, source };
        let node = self.states.node(gfn).ok_or(bad(BuddyError::OutOfRange { gfn }))?;
        self.nodes[node].buddy.check_exact(gfn, pages).map_err(bad)?;
        if self.states.set_range(gfn, pages, FrameState::Free) > 0 {
            self.ram.discard(gfn.gpa(), pages * PAGE_SIZE).map_err(|source| MemoryError::Discard {
                gfn,
                pages,
                source,
            })?;
        }
        self.nodes[node].buddy.free_exact(gfn, pages).map_err(bad)
    }
}

#[derive(Debug)]
pub struct MemoryManager {
    pub(super) pool: FramePool,
    pub(super) pt: PageTables,
    /// Present leaves in each leaf table; a table whose count drops to zero loses its host
    /// backing (it stays in place: tables are never repointed).
    pub(super) leaves: HashMap<Gfn, u32>,
    /// Guest regions (allocations and lazy regions) by start address.
    pub(super) regions: BTreeMap<u64, Region>,
    pub(super) va_small: VaZone,
    pub(super) va_huge: VaZone,
    /// Slabs: one 64 KiB slot each, no guards (the slot's unused tail is unmapped).
    pub(super) va_slab: VaZone,
    pub(super) fallback: Fallback,
    /// Interleave position.
    pub(super) rotor: u64,
    /// Frames unmapped by this batch's frees, discarded and returned at [`Self::flush`].
    pub(super) pending_free: Vec<(Gfn, u64)>,
    /// Frames a lazy-region fault maps at once.
    pub(super) lazy_window: u64,
    /// Map HUGE allocations with 2 MiB leaves. Off under shadow paging: there KVM's shadow
    /// entries are 4 KiB whatever the guest leaf size, and this host's shadow MMU (PVM) keeps
    /// translations of guest 2 MiB leaves across MMU-notifier invalidations, so a freed or moved
    /// 2 MiB page stays readable (`scenario=ptstress huge=100` shows it with
    /// `--memory huge-leaves=on`).
    pub(super) huge_leaves: bool,
    pub(super) counters: MmCounters,
    /// Small objects.
    pub(super) slab: SlabAllocator,
    /// Frames freed since the VMM last trimmed its own memory.
    pub(super) freed_since_trim: u64,
}

/// Memory-manager event counts.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct MmCounters {
    pub regions_created: u64,
    pub regions_freed: u64,
    pub huge_fallbacks: u64,
    pub lazy_faults: u64,
    pub lazy_pages: u64,
    pub tables_discarded: u64,
    pub trims: u64,
    pub trimmed_bytes: u64,
    pub discard_calls: u64,
    pub discarded_pages: u64,
    pub invalidations: u64,
}

impl MemoryManager {
    /// Puts all of `ram` into per-node buddy allocators and allocates the root page table.
    /// With `vm`, memslots are registered with KVM as frames are first handed out.
    pub fn new(
        ram: Arc<GuestRam>,
        distance: &[Vec<u8>],
        populate: Populate,
        vm: Option<VmFd>,
        fault_around: u64,
    ) -> Result<Self, MemoryError> {
        let nr_nodes = distance.len();
        let ranges = ram.ranges().to_vec();
        let end = Gfn::containing(GuestAddress(crate::layout::ram_end(&ranges)));
        let frame_ranges = ranges
            .iter()
            .map(|r| (Gfn::containing(r.base()), Gfn::containing(GuestAddress(r.end())), r.node as usize))
            .collect();
        let states = Arc::new(PageStates::new(end, frame_ranges, nr_nodes).map_err(MemoryError::Metadata)?);
        let mut nodes = Vec::with_capacity(nr_nodes);
        for n in 0..nr_nodes {
            let own: Vec<RamRange> = ranges.iter().filter(|r| r.node as usize == n).copied().collect();
            let start = Gfn::containing(own.first().expect("every node has RAM").base());
            let stop = Gfn::containing(GuestAddress(own.last().expect("every node has RAM").end()));
            let mut buddy = BuddyAllocator::new(start, stop).map_err(MemoryError::Metadata)?;
            for r in &own {
                buddy.add_free_range(Gfn::containing(r.base()), Gfn::containing(GuestAddress(r.end())));
            }
            let id = NodeId(u32::try_from(n).expect("few nodes"));
            nodes.push(NodeMem { id, ranges: own, buddy });
        }
        let slots = vm.map(|vm| Memslots::new(vm, Arc::clone(&ram)));
        let mut pool = FramePool { ram, states, nodes, populate, slots };
        let root = pool.alloc_table().ok_or(MemoryError::Alloc {
            node: NodeId(0),
            pages: 1,
            source: BuddyError::OutOfMemory { order: 0 },
        })?;
        Ok(MemoryManager {
            pool,
            pt: PageTables::new(root),
            leaves: HashMap::new(),
            regions: BTreeMap::new(),
            va_small: VaZone::new(HEAP_VA_START, HEAP_VA_END, PAGE_SIZE),
            va_huge: VaZone::new(HUGE_HEAP_VA_START, HUGE_HEAP_VA_END, HUGE_PAGE_SIZE),
            va_slab: VaZone::with_guard(SLAB_VA_START, SLAB_VA_END, SLAB_SLOT, false),
            fallback: Fallback::new(distance),
            rotor: 0,
            pending_free: Vec::new(),
            lazy_window: (fault_around / PAGE_SIZE).clamp(1, LAZY_WINDOW_MAX),
            huge_leaves: false,
            counters: MmCounters::default(),
            slab: SlabAllocator::new(nr_nodes),
            freed_since_trim: 0,
        })
    }

    /// Guest RAM.
    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.pool.ram
    }

    /// The page-state map (shared with the fault handler).
    pub fn states(&self) -> &Arc<PageStates> {
        &self.pool.states
    }

    /// The guest's page tables.
    pub fn page_tables(&self) -> &PageTables {
        &self.pt
    }

    /// The KVM memslots, if the manager runs a VM.
    pub fn memslots(&self) -> Option<&Memslots> {
        self.pool.slots.as_ref()
    }

    /// Number of nodes.
    pub fn nr_nodes(&self) -> usize {
        self.pool.nodes.len()
    }

    /// The slab allocator (read-only view, for stats).
    pub fn slabs(&self) -> &SlabAllocator {
        &self.slab
    }

    /// Whether HUGE allocations get 2 MiB leaves.
    pub fn set_huge_leaves(&mut self, on: bool) {
        self.huge_leaves = on;
    }

    /// Whether HUGE allocations get 2 MiB leaves.
    pub fn huge_leaves(&self) -> bool {
        self.huge_leaves
    }

    /// Replaces how VMM-written frames get their backing (when userfaultfd is switched on).
    pub fn set_populate(&mut self, populate: Populate) {
        self.pool.populate = populate;
    }

    /// Allocates `pages` contiguous frames on `node`, optionally ending at or below `below`.
    /// The frames are `Allocated`: zero, with no host backing until touched.
    pub fn alloc_frames(&mut self, node: NodeId, pages: u64, below: Option<Gfn>) -> Result<Gfn, MemoryError> {
        self.pool.alloc(node, pages, below)
    }

    /// Frees a run from [`alloc_frames`](Self::alloc_frames): drops its host backing and returns it
    /// to its node's buddy. The caller has already unmapped it (and invalidated translations).
    pub fn free_frames(&mut self, gfn: Gfn, pages: u64) -> Result<(), MemoryError> {
        self.pool.free(gfn, pages)
    }

    /// Writes `data` at `gpa`, first giving every touched frame host backing.
    pub fn write(&self, gpa: GuestAddress, data: &[u8]) -> Result<(), MemoryError> {
        let first = Gfn::containing(gpa);
        let last = Gfn::containing(GuestAddress(gpa.0 + data.len().max(1) as u64 - 1));
        for g in first.0..=last.0 {
            self.make_resident(Gfn(g))?;
        }
        self.pool.ram.mem().write_slice(data, gpa).map_err(|source| MemoryError::Write {
            gpa: gpa.0,
            len: data.len(),
            source,
        })
    }

    /// Writes a plain-data value at `gpa` (see [`write`](Self::write)).
    pub fn write_obj<T: vm_memory::ByteValued>(&self, gpa: GuestAddress, v: &T) -> Result<(), MemoryError> {
        self.write(gpa, v.as_slice())
    }

    /// Gives an `Allocated` frame host backing (zero-filled) so the VMM may write it.
    pub fn make_resident(&self, gfn: Gfn) -> Result<(), MemoryError> {
        let p = &self.pool;
        p.populate.zero_fill(&p.ram, &p.states, gfn).map_err(|source| MemoryError::Populate { gfn, source })
    }

    /// Maps `pages` consecutive frames from `gfn` at `va` with 4 KiB leaves.
    pub fn map_pages(&mut self, va: Gva, gfn: Gfn, pages: u64, flags: PteFlags) -> Result<(), MemoryError> {
        for i in 0..pages {
            let v = Gva(va.0 + i * PAGE_SIZE);
            self.map_one(v, gfn.plus(i), PageSize::Size4K, flags)?;
        }
        Ok(())
    }

    /// Maps one leaf (counted in its table; a discarded table gets backing again first).
    pub fn map_one(&mut self, va: Gva, gfn: Gfn, size: PageSize, flags: PteFlags) -> Result<(), MemoryError> {
        let mem = Arc::clone(&self.pool.ram);
        if let Some(t) = self.pt.leaf_table(mem.mem(), va, size) {
            self.make_resident(t)?;
        }
        let MemoryManager { pool, pt, .. } = self;
        let mut alloc = || pool.alloc_table();
        pt.map(mem.mem(), &mut alloc, va, gfn, size, flags).map_err(|source| MemoryError::PageTable { va, source })?;
        let t = self.pt.leaf_table(mem.mem(), va, size).expect("the leaf was just mapped");
        *self.leaves.entry(t).or_default() += 1;
        Ok(())
    }

    /// Changes the permissions of the leaf at `va`; returns the old entry (`None`: not mapped).
    pub(super) fn protect_one(&mut self, va: Gva, size: PageSize, flags: PteFlags) -> Result<Option<Pte>, MemoryError> {
        let mem = Arc::clone(&self.pool.ram);
        let Some(t) = self.pt.leaf_table(mem.mem(), va, size) else { return Ok(None) };
        if self.pool.states.get(t) != FrameState::Resident {
            return Ok(None);
        }
        match self.pt.protect(mem.mem(), va, size, flags) {
            Ok(old) => Ok(Some(old)),
            Err(PtError::NotMapped { .. }) => Ok(None),
            Err(source) => Err(MemoryError::PageTable { va, source }),
        }
    }

    /// An empty leaf table keeps its place (its parent entry never changes) but not its
    /// host memory: KVM's walks through it read the shared zero page (`Zero`).
    pub(super) fn discard_empty_table(&mut self, t: Gfn) -> Result<(), MemoryError> {
        if self.pool.states.set_range(t, 1, FrameState::Zero) > 0 {
            self.pool.ram.discard(t.gpa(), PAGE_SIZE).map_err(|source| MemoryError::Discard {
                gfn: t,
                pages: 1,
                source,
            })?;
            self.counters.tables_discarded += 1;
        }
        Ok(())
    }

    /// Per-node counts.
    pub fn node_stats(&self) -> Vec<NodeStats> {
        self.pool
            .nodes
            .iter()
            .map(|n| NodeStats {
                node: n.id.0,
                frames_total: n.buddy.managed_pages(),
                frames_free: n.buddy.free_pages(),
                frames_allocated: n.buddy.managed_pages() - n.buddy.free_pages(),
                frames_resident: self.pool.states.resident(n.id.0 as usize),
                frames_faulted: 0,
                buddyinfo: n.buddy.buddyinfo(),
            })
            .collect()
    }

    /// Host bytes reserved for allocator and page-state metadata (resident only where touched).
    pub fn metadata_bytes(&self) -> u64 {
        self.pool.states.metadata_bytes() + self.pool.nodes.iter().map(|n| n.buddy.metadata_bytes()).sum::<u64>()
    }

    /// Checks every allocator's invariants, that the page-state map agrees with them, that
    /// regions own disjoint, allocated frames mapped where they say, and that every leaf table's
    /// count matches its present entries.
    pub fn check_invariants(&self) -> Result<(), String> {
        self.check_frames()?;
        self.check_regions()?;
        self.check_slabs()?;
        self.check_leaf_counts()
    }

    fn check_leaf_counts(&self) -> Result<(), String> {
        let mem = self.pool.ram.mem();
        for (&t, &count) in &self.leaves {
            if self.pool.states.get(t) != FrameState::Resident {
                return Err(format!("leaf table {t} holds {count} entries but is not resident"));
            }
            let mut present = 0;
            for i in 0..512u64 {
                let v: u64 =
                    vm_memory::Bytes::read_obj(mem, GuestAddress(t.gpa().0 + i * 8)).map_err(|e| e.to_string())?;
                if Pte(v).is_present() {
                    present += 1;
                }
            }
            if present != count {
                return Err(format!("leaf table {t}: count {count}, {present} present entries"));
            }
        }
        Ok(())
    }

    fn check_frames(&self) -> Result<(), String> {
        for n in &self.pool.nodes {
            n.buddy.check_invariants().map_err(|e| format!("node {}: {e}", n.id))?;
            let mut free = 0;
            for r in &n.ranges {
                let c = self.pool.states.census(Gfn::containing(r.base()), r.len / PAGE_SIZE);
                free += c[FrameState::Free as usize];
            }
            if free != n.buddy.free_pages() {
                return Err(format!(
                    "node {}: {free} frames Free in the state map, buddy has {}",
                    n.id,
                    n.buddy.free_pages()
                ));
            }
        }
        if !self.pending_free.is_empty() {
            return Err(format!("{} runs wait for a flush", self.pending_free.len()));
        }
        Ok(())
    }
}
