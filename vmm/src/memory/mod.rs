//! Guest memory: the frames, who owns them, their host backing, and how the guest sees them.
//!
//! Layers, each owning its state, its error enum, its `check_invariants()` and its snapshot;
//! dependencies point down only:
//!
//! ```text
//!   MemoryManager (this file): a thin facade, the only type the VM sees
//!     reclaim/  taking memory back: the balloon, host-side swap's policy
//!     slab/     small objects, in slab regions of the address space
//!     space/    the guest's virtual address space: page tables, VA zones, regions
//!     backing/  host memory behind the frames: RAM, memslots, userfaultfd, faults, populate
//!     frames/   who owns each guest-physical frame: buddies, page states, NUMA placement
//! ```
//!
//! Rules the layers keep together:
//! - A frame is `Allocated` only while its contents are zero and it has no host backing; the VMM
//!   writes a frame only after making it `Resident` (`Backing::write`), so a VMM write never
//!   blocks on the fault handler.
//! - Freed frames lose their host backing (`MADV_DONTNEED`) before going back to the buddy, so a
//!   reused frame is zero and host RSS follows what the guest uses.
//! - After a present leaf entry changes, the old frame's host mapping is dropped so that no
//!   vCPU keeps a stale translation (see `space`).

pub mod addr;
pub mod backing;
pub mod frames;
pub mod reclaim;
pub mod slab;
pub mod space;
#[cfg(test)]
mod tests;
pub mod zeroed;

use std::sync::Arc;

use kvm_ioctls::VmFd;
use vm_memory::GuestAddress;

use protocol::MemStats;

use crate::config::HostBinding;
use crate::layout::RamRange;

use crate::config::{BalloonConfig, SwapConfig};
use addr::{Gfn, Gva, NodeId};
use backing::fault::FaultHandler;
use backing::ram::GuestRam;
use backing::swap::{Staging, SwapStore};
use backing::{Backing, BackingError, BackingSnapshot};
use frames::policy::Policy;
use frames::{FrameError, Frames, FramesSnapshot};
use reclaim::balloon::{Balloon, BalloonError, BalloonSnapshot};
use reclaim::swap::{BatchOutcome, SwapClock, SwapSnapshot};
use slab::{Exchanged, SlabAllocator, SlabError, SlabSnapshot};
use space::pagetable::{PageSize, PteFlags};
use space::{AddressSpace, Phys, SpaceError, SpaceSnapshot};

/// Frames freed between two trims of the VMM's own memory...
const TRIM_AFTER_FRAMES: u64 = 8192;
/// ...or regions freed (their metadata, however little guest memory they held).
const TRIM_AFTER_REGIONS: u64 = 4096;

/// A memory-manager failure: a layer's error. Errors the guest caused carry a status code for
/// it ([`MemoryError::guest_status`]); the rest are host failures that stop the VM.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error(transparent)]
    Frames(#[from] FrameError),
    #[error(transparent)]
    Backing(#[from] BackingError),
    #[error(transparent)]
    Space(#[from] SpaceError),
    #[error(transparent)]
    Slab(#[from] SlabError),
    #[error(transparent)]
    Balloon(#[from] BalloonError),
}

impl MemoryError {
    /// The status code the guest gets, or `None` for a host failure (the VM cannot continue).
    pub fn guest_status(&self) -> Option<u64> {
        match self {
            MemoryError::Frames(_) | MemoryError::Backing(_) => None,
            MemoryError::Space(e) => e.guest_status(),
            MemoryError::Slab(e) => e.guest_status(),
            MemoryError::Balloon(_) => Some(protocol::status::EINVAL),
        }
    }

    /// The status code for the guest (`EFAULT` for host failures).
    pub fn status(&self) -> u64 {
        self.guest_status().unwrap_or(protocol::status::EFAULT)
    }
}

/// The manager's own figures, beside its layers'.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct TrimCounters {
    /// Times the VMM gave idle memory back to the host after large frees.
    pub trims: u64,
    pub trimmed_bytes: u64,
}

/// Every layer's snapshot, taken under the manager's lock.
#[derive(Clone, Debug)]
pub struct MemorySnapshot {
    pub frames: FramesSnapshot,
    pub backing: BackingSnapshot,
    pub space: SpaceSnapshot,
    pub slab: SlabSnapshot,
    pub balloon: BalloonSnapshot,
    pub trims: TrimCounters,
    /// Host-side swap, when it is on.
    pub swap: Option<SwapSnapshot>,
}

/// The memory manager: the layers side by side, each operation borrowing the ones it needs.
#[derive(Debug)]
pub struct MemoryManager {
    frames: Frames,
    backing: Backing,
    space: AddressSpace,
    slab: SlabAllocator,
    balloon: Balloon,
    /// Host-side swap's clock, when swap is on.
    swap: Option<SwapClock>,
    trims: TrimCounters,
    /// `space.counters()`'s `frames_freed` and `regions_freed` at the last trim.
    freed_at_trim: (u64, u64),
}

/// A memory manager over real, unregistered guest RAM of `node_sizes` (no KVM), with distance 10
/// local and 20 remote: for tests and benchmarks of the allocators.
pub fn standalone(node_sizes: &[u64]) -> Result<MemoryManager, MemoryError> {
    let n = node_sizes.len();
    let ranges = crate::layout::ram_ranges(node_sizes).ok_or(FrameError::NoNode(NodeId(0)))?;
    let distance: Vec<Vec<u8>> = (0..n).map(|a| (0..n).map(|b| if a == b { 10 } else { 20 }).collect()).collect();
    MemoryManager::new(&ranges, &vec![None; n], &distance, None, 64 << 10, 2 << 20)
}

impl MemoryManager {
    /// Maps guest RAM for `ranges` (node `n` bound to `bindings[n]`), puts every frame into its
    /// node's buddy allocator and allocates the root page table. With `vm`, memslots are
    /// registered with KVM as frames are first handed out. `fault_around` and
    /// `fault_around_max` (bytes) size second-level fault windows.
    pub fn new(
        ranges: &[RamRange],
        bindings: &[Option<HostBinding>],
        distance: &[Vec<u8>],
        vm: Option<VmFd>,
        fault_around: u64,
        fault_around_max: u64,
    ) -> Result<Self, MemoryError> {
        let mut frames = Frames::new(ranges, distance)?;
        let mut backing =
            Backing::new(ranges, bindings, Arc::clone(frames.states()), vm, fault_around, fault_around_max)?;
        let space = AddressSpace::new(&mut Phys { frames: &mut frames, backing: &mut backing }, fault_around)?;
        let slab = SlabAllocator::new(frames.nr_nodes());
        Ok(MemoryManager {
            frames,
            backing,
            space,
            slab,
            balloon: Balloon::default(),
            swap: None,
            trims: TrimCounters::default(),
            freed_at_trim: (0, 0),
        })
    }

    /// The two bottom layers, borrowed together.
    fn phys(&mut self) -> (Phys<'_>, &mut AddressSpace, &mut SlabAllocator) {
        (Phys { frames: &mut self.frames, backing: &mut self.backing }, &mut self.space, &mut self.slab)
    }

    /// The frames layer (read-only).
    pub fn frames(&self) -> &Frames {
        &self.frames
    }

    /// The backing layer (read-only).
    pub fn backing(&self) -> &Backing {
        &self.backing
    }

    /// The address space (read-only).
    pub fn space(&self) -> &AddressSpace {
        &self.space
    }

    /// The slab allocator (read-only).
    pub fn slabs(&self) -> &SlabAllocator {
        &self.slab
    }

    /// Guest RAM.
    pub fn ram(&self) -> &Arc<GuestRam> {
        self.backing.ram()
    }

    /// Whether HUGE allocations get 2 MiB leaves.
    pub fn set_huge_leaves(&mut self, on: bool) {
        self.space.set_huge_leaves(on);
    }

    /// Switches second-level faults to userfaultfd; returns the handler whose threads the caller
    /// starts.
    pub fn enable_userfaultfd(&mut self) -> Result<Arc<FaultHandler>, MemoryError> {
        Ok(self.backing.enable_userfaultfd()?)
    }

    // Boot: frames the VMM fills and maps itself.

    /// Allocates `pages` contiguous frames on `node`, optionally ending at or below `below`.
    /// The frames are `Allocated`: zero, with no host backing until touched.
    pub fn alloc_frames(&mut self, node: NodeId, pages: u64, below: Option<Gfn>) -> Result<Gfn, MemoryError> {
        Ok(self.phys().0.alloc(node, pages, below)?)
    }

    /// Frees a run from [`alloc_frames`](Self::alloc_frames) that is mapped nowhere.
    pub fn free_frames(&mut self, gfn: Gfn, pages: u64) -> Result<(), MemoryError> {
        Ok(self.phys().0.free(gfn, pages)?)
    }

    /// Writes `data` at `gpa`, first giving every touched frame host backing.
    pub fn write(&self, gpa: GuestAddress, data: &[u8]) -> Result<(), MemoryError> {
        Ok(self.backing.write(gpa, data)?)
    }

    /// Writes a plain-data value at `gpa` (see [`write`](Self::write)).
    pub fn write_obj<T: vm_memory::ByteValued>(&self, gpa: GuestAddress, v: &T) -> Result<(), MemoryError> {
        self.write(gpa, v.as_slice())
    }

    /// Writes `data` at guest-virtual `va` through the guest's own page tables, the way a kernel
    /// writes to user memory: every byte must be in a page the guest may write. Returns
    /// whether it could (nothing is written otherwise).
    pub fn write_user(&self, va: u64, data: &[u8]) -> Result<bool, MemoryError> {
        let mut pieces = Vec::new();
        let mut done = 0;
        while done < data.len() {
            let at = va.wrapping_add(done as u64);
            let Some(gpa) = self.space.user_writable(&self.backing, at) else { return Ok(false) };
            let n = data.len().min(done + usize::try_from(4096 - at % 4096).unwrap_or(4096)) - done;
            pieces.push((gpa, done, n));
            done += n;
        }
        for (gpa, off, n) in pieces {
            self.backing.write(GuestAddress(gpa), &data[off..off + n])?;
        }
        Ok(true)
    }

    /// Gives an `Allocated` frame host backing (zero-filled) so the VMM may write it.
    pub fn make_resident(&self, gfn: Gfn) -> Result<(), MemoryError> {
        Ok(self.backing.make_resident(gfn)?)
    }

    /// Maps `pages` consecutive frames from `gfn` at `va` with 4 KiB leaves.
    pub fn map_pages(&mut self, va: Gva, gfn: Gfn, pages: u64, flags: PteFlags) -> Result<(), MemoryError> {
        let (mut phys, space, _) = self.phys();
        Ok(space.map_pages(&mut phys, va, gfn, pages, flags)?)
    }

    /// Maps one leaf.
    pub fn map_one(&mut self, va: Gva, gfn: Gfn, size: PageSize, flags: PteFlags) -> Result<(), MemoryError> {
        let (mut phys, space, _) = self.phys();
        Ok(space.map_one(&mut phys, va, gfn, size, flags)?)
    }

    // Reclaim.

    /// Sets the balloon (`--balloon`, `PATCH /balloon`): takes free frames at once, then every
    /// frame the guest frees until it holds its share. Returns its figures.
    pub fn configure_balloon(&mut self, config: BalloonConfig) -> Result<BalloonSnapshot, MemoryError> {
        self.balloon.configure(&mut self.frames, config)?;
        Ok(self.balloon.snapshot(&self.frames))
    }

    /// The balloon's figures.
    pub fn balloon(&self) -> BalloonSnapshot {
        self.balloon.snapshot(&self.frames)
    }

    /// Turns host-side swap on (after [`enable_userfaultfd`](Self::enable_userfaultfd), whose
    /// `handler` serves swapped frames from now on). The file holds at most `config.file_max`
    /// (default: guest RAM).
    pub fn enable_swap(&mut self, handler: &FaultHandler, config: &SwapConfig) -> Result<Arc<SwapStore>, MemoryError> {
        let ram = self.frames.total_pages() * addr::PAGE_SIZE;
        let store = self.backing.enable_swap(
            handler,
            &config.dir,
            config.file_max.unwrap_or(ram),
            config.pool_for(config.limit),
            config.limit,
        )?;
        self.swap = Some(SwapClock::new(config.policy));
        Ok(store)
    }

    /// One eviction batch: the clock picks up to `want` cold resident frames and moves them into
    /// `staging` (the store writes them out without this lock).
    pub fn swap_stage(&mut self, staging: &mut Staging, want: usize) -> Result<BatchOutcome, MemoryError> {
        match &mut self.swap {
            Some(clock) => clock.stage_batch(&self.space, &self.backing, staging, want),
            None => Ok(BatchOutcome::default()),
        }
    }

    /// The swap clock's laps and hand.
    pub fn swap_position(&self) -> Option<(u64, Gva)> {
        self.swap.as_ref().map(SwapClock::position)
    }

    /// GUEST_STATS: what only the guest knows.
    pub fn guest_stats(&mut self, cache_bytes: u64, lazy_faults: u64) {
        self.balloon.guest_report(cache_bytes, lazy_faults);
    }

    // Memory calls.

    /// ALLOC.
    pub fn alloc_region(
        &mut self,
        size: u64,
        fl: u32,
        policy: Policy,
        local: NodeId,
    ) -> Result<(u64, u64), MemoryError> {
        let (mut phys, space, _) = self.phys();
        Ok(space.alloc_region(&mut phys, size, fl, policy, local)?)
    }

    /// MAP_LAZY.
    pub fn map_lazy(&mut self, size: u64, fl: u32, policy: Policy, local: NodeId) -> Result<(u64, u64), MemoryError> {
        Ok(self.space.map_lazy(&self.frames, size, fl, policy, local)?)
    }

    /// FAULT: backs the page at `va` of a lazy region; returns the pages mapped.
    pub fn fault_lazy(&mut self, va: u64) -> Result<u64, MemoryError> {
        let (mut phys, space, _) = self.phys();
        Ok(space.fault_lazy(&mut phys, va)?)
    }

    /// FREE.
    pub fn free_region(&mut self, va: u64) -> Result<(), MemoryError> {
        let (mut phys, space, _) = self.phys();
        Ok(space.free_region(&mut phys, va)?)
    }

    /// PROTECT.
    pub fn protect_region(&mut self, va: u64, size: u64, p: u32) -> Result<(), MemoryError> {
        let (mut phys, space, _) = self.phys();
        Ok(space.protect_region(&mut phys, va, size, p)?)
    }

    /// MOVE.
    pub fn move_region(&mut self, va: u64) -> Result<u64, MemoryError> {
        let (mut phys, space, _) = self.phys();
        Ok(space.move_region(&mut phys, va)?)
    }

    /// TRANSLATE: the guest-physical address and node behind `va`.
    pub fn translate(&self, va: u64) -> Result<(u64, u32), MemoryError> {
        Ok(self.space.translate(&self.frames, &self.backing, va)?)
    }

    /// SLAB_EXCHANGE (see [`SlabAllocator::exchange`]).
    pub fn slab_exchange(
        &mut self,
        cpu: u32,
        node: NodeId,
        class: usize,
        frees: &[u64],
        want: usize,
    ) -> Result<Exchanged, MemoryError> {
        let (mut phys, space, slab) = self.phys();
        Ok(slab.exchange(space, &mut phys, cpu, node, class, frees, want)?)
    }

    /// Gives back the slabs' idle caches (empty slabs but one per class and node, ready
    /// objects past the quarantines): the guest has stopped allocating for a while.
    pub fn slab_trim(&mut self) -> Result<u64, MemoryError> {
        let (mut phys, space, slab) = self.phys();
        let n = slab.trim_empty(space, &mut phys)?;
        self.flush()?;
        Ok(n)
    }

    /// Gives back the empty slabs that stayed unused for `older_than`.
    pub fn slab_purge(&mut self, older_than: std::time::Duration) -> Result<u64, MemoryError> {
        let (mut phys, space, slab) = self.phys();
        let n = slab.purge(space, &mut phys, older_than)?;
        if n > 0 {
            self.flush()?;
        }
        Ok(n)
    }

    /// SLAB_FREE: one object back.
    pub fn slab_free(&mut self, ptr: u64) -> Result<(), MemoryError> {
        let (mut phys, space, slab) = self.phys();
        Ok(slab.free(space, &mut phys, ptr)?)
    }

    /// SLAB_INFO: the size of the handed-out object at `ptr`.
    pub fn slab_info(&self, ptr: u64) -> Result<u32, MemoryError> {
        Ok(self.slab.object_size(ptr)?)
    }

    /// STATS for one node or all: the manager's figures (the caller adds the process's).
    pub fn mem_stats(&self, node: Option<usize>) -> Result<MemStats, MemoryError> {
        let nodes = self.frames.nodes();
        let nodes = match node {
            None => nodes,
            Some(n) => std::slice::from_ref(nodes.get(n).ok_or(SpaceError::Invalid("no such node"))?),
        };
        let total: u64 = nodes.iter().map(|n| n.buddy.managed_pages()).sum();
        let free: u64 = nodes.iter().map(|n| n.buddy.free_pages()).sum();
        let resident = nodes.iter().map(|n| self.frames.states().resident(n.id.0 as usize)).sum::<u64>()
            + self.backing.resident_unseen(node)?;
        let faults = self.backing.fault_stats();
        Ok(MemStats {
            total_frames: total,
            free_frames: free,
            allocated_frames: total - free,
            resident_frames: resident,
            page_table_pages: self.space.page_tables().table_pages(),
            slab_objects_active: self.slab.active(),
            slab_frames: self.slab.frames(),
            uffd_faults: faults.map_or(0, |f| f.zero_fill.get()),
            uffd_pages: faults.map_or(0, |f| f.pages.get()),
            fault_around: self.backing.fault_around(),
            balloon_frames: match node {
                None => self.frames.balloon_nodes().iter().map(|n| n.actual_frames).sum(),
                Some(n) => self.frames.balloon_nodes().get(n).map_or(0, |b| b.actual_frames),
            },
            ..MemStats::default()
        })
    }

    /// Ends a batch of memory calls: discards the host backing of, and frees, every frame the
    /// batch's frees released (the balloon takes what it lacks), and after large frees gives
    /// the VMM's own idle memory back.
    pub fn flush(&mut self) -> Result<(), MemoryError> {
        let (mut phys, space, _) = self.phys();
        space.flush(&mut phys)?;
        let mut lacking = self.frames.balloon_fill();
        if lacking > 0 {
            // The balloon wants frames the buddy allocator lacks: give it the slabs' cached
            // empty slabs first.
            let (mut phys, space, slab) = self.phys();
            if slab.trim_empty(space, &mut phys)? > 0 {
                space.flush(&mut phys)?;
                lacking = self.frames.balloon_fill();
            }
        }
        self.balloon.filled(lacking);
        let c = self.space.counters();
        if c.frames_freed - self.freed_at_trim.0 >= TRIM_AFTER_FRAMES
            || c.regions_freed - self.freed_at_trim.1 >= TRIM_AFTER_REGIONS
        {
            self.trim();
        }
        Ok(())
    }

    /// Gives the host back the VMM's own memory that guest frees left idle: all-zero allocator
    /// metadata pages and free heap memory.
    pub fn trim(&mut self) {
        let c = self.space.counters();
        self.freed_at_trim = (c.frames_freed, c.regions_freed);
        let released = self.frames.trim_metadata();
        self.trims.trims += 1;
        self.trims.trimmed_bytes += released;
        // SAFETY: malloc_trim only returns free heap memory to the kernel.
        unsafe { libc::malloc_trim(0) };
    }

    /// Every layer's invariants, bottom up.
    pub fn check_invariants(&self) -> Result<(), String> {
        self.frames.check_invariants()?;
        self.backing.check_invariants()?;
        if let Some(s) = self.backing.swap() {
            s.check_invariants()?;
        }
        self.space.check_invariants(&self.frames, &self.backing)?;
        self.slab.check_invariants(&self.space, &self.frames, &self.backing)
    }

    /// Every layer's figures.
    pub fn snapshot(&self) -> MemorySnapshot {
        let mut frames = self.frames.snapshot();
        // What the kernel backed unseen where first touches went over to it (`backing=auto`).
        for n in &mut frames.nodes {
            n.frames_resident += self.backing.resident_unseen(Some(n.node as usize)).unwrap_or(0);
        }
        MemorySnapshot {
            frames,
            backing: self.backing.snapshot(),
            space: self.space.snapshot(),
            slab: self.slab.snapshot(),
            balloon: self.balloon.snapshot(&self.frames),
            trims: self.trims.clone(),
            swap: self.swap.as_ref().zip(self.backing.swap()).map(|(c, s)| c.snapshot(s)),
        }
    }
}
