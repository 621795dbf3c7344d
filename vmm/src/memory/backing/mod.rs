//! Backing: the host memory behind guest frames.
//!
//! Guest RAM mappings (`ram`), their KVM memslots (`memslots`), userfaultfd (`uffd`), how a
//! frame gets host memory (`populate`) and the second-level fault handler (`fault`), the pipeline
//! crosvm's `swap` crate also uses: userfaultfd -> handler -> page source. This layer makes every
//! system call that touches guest RAM; it knows the page-state map of the frames layer (which it
//! shares with the fault handler) and nothing above it: no page tables, no regions.

pub mod fault;
pub mod memslots;
pub mod populate;
pub mod ram;
pub mod swap;
pub mod uffd;

use std::sync::Arc;

use kvm_ioctls::VmFd;
use vm_memory::{Bytes, GuestAddress};

use crate::config::HostBinding;
use crate::layout::RamRange;
use crate::memory::addr::{Gfn, PAGE_SIZE};
use crate::memory::frames::Run;
use crate::memory::frames::page_state::{FrameState, PageStates};

use fault::{FaultHandler, FaultReport, FaultStats};
use memslots::Memslots;
use populate::{Populate, PopulateError, ZeroSource};
use ram::{GuestRam, RamError};
use swap::{SwapError, SwapSettings, SwapStore};
use uffd::{Uffd, UffdError};

#[derive(Debug, thiserror::Error)]
pub enum BackingError {
    #[error(transparent)]
    Ram(#[from] RamError),
    #[error("cannot register memslots for {pages} frames at {gfn}")]
    Memslot {
        gfn: Gfn,
        pages: u64,
        #[source]
        source: RamError,
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
    #[error("cannot write {len} bytes at {gpa:#x}")]
    Write {
        gpa: u64,
        len: usize,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("cannot set up userfaultfd on guest RAM")]
    Uffd(#[source] UffdError),
    #[error("cannot map the userfaultfd zero buffer")]
    ZeroBuffer(#[source] std::io::Error),
    #[error("host-side swap needs userfaultfd")]
    SwapNeedsUffd,
    #[error(transparent)]
    Swap(#[from] SwapError),
}

/// What the backing layer reports.
#[derive(Clone, Debug)]
pub struct BackingSnapshot {
    /// KVM memslots registered so far, and the guest RAM they cover.
    pub memslots: u32,
    pub memslot_bytes: u64,
    /// Second-level faults, when userfaultfd serves them.
    pub faults: Option<FaultReport>,
    /// Frames ever installed by second-level faults, per node.
    pub faulted_per_node: Vec<u64>,
}

/// Guest RAM and how its frames get host memory.
#[derive(Debug)]
pub struct Backing {
    ram: Arc<GuestRam>,
    states: Arc<PageStates>,
    populate: Populate,
    /// KVM memslots, registered as frames are first handed out (`None` without a VM: tests).
    slots: Option<Memslots>,
    /// Fault-around window and its largest size, in frames.
    window: u64,
    max_window: u64,
    /// Set once userfaultfd serves second-level faults.
    fault_stats: Option<Arc<FaultStats>>,
    /// Host-side swap, when it is on.
    swap: Option<Arc<SwapStore>>,
}

impl Backing {
    /// Maps guest RAM for `ranges` (each node's bound to its host node, `bindings[n]`), backed by
    /// kernel demand paging until [`enable_userfaultfd`](Self::enable_userfaultfd). With `vm`,
    /// memslots are registered as frames come into use. `fault_around` and `fault_around_max`
    /// (bytes) size the fault handler's windows.
    pub fn new(
        ranges: &[RamRange],
        bindings: &[Option<HostBinding>],
        states: Arc<PageStates>,
        vm: Option<VmFd>,
        fault_around: u64,
        fault_around_max: u64,
    ) -> Result<Self, BackingError> {
        let ram = Arc::new(GuestRam::new(ranges, bindings)?);
        let slots = vm.map(|vm| Memslots::new(vm, Arc::clone(&ram)));
        Ok(Backing {
            ram,
            states,
            populate: Populate::Direct,
            slots,
            window: fault_around / PAGE_SIZE,
            max_window: fault_around_max / PAGE_SIZE,
            fault_stats: None,
            swap: None,
        })
    }

    /// Guest RAM.
    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }

    /// Registers all guest RAM with a new userfaultfd: from now on a missing page faults to the
    /// returned handler (its threads are the caller's to start), and the VMM installs pages
    /// itself with `UFFDIO_COPY`. Pages already present stay.
    pub fn enable_userfaultfd(&mut self) -> Result<Arc<FaultHandler>, BackingError> {
        let uffd = Arc::new(Uffd::new().map_err(BackingError::Uffd)?);
        for (hva, len, _) in self.ram.host_ranges() {
            // SAFETY: each range is one of our guest RAM mappings, which live as long as the
            // `GuestRam` (held by this layer and by the handler); faults there are served by
            // the handler threads the caller starts.
            unsafe { uffd.register(hva, len, true) }.map_err(BackingError::Uffd)?;
        }
        let zero = Arc::new(ZeroSource::new().map_err(BackingError::ZeroBuffer)?);
        self.populate = Populate::Uffd { uffd: Arc::clone(&uffd), zero: Arc::clone(&zero) };
        let stats = Arc::new(FaultStats::new(self.states.nodes()));
        self.fault_stats = Some(Arc::clone(&stats));
        Ok(Arc::new(FaultHandler::new(
            uffd,
            zero,
            Arc::clone(&self.ram),
            Arc::clone(&self.states),
            self.window,
            self.max_window,
            stats,
        )))
    }

    /// Turns host-side swap on (after [`enable_userfaultfd`](Self::enable_userfaultfd)): a swap
    /// file in `dir` of at most `file_max` bytes, a compressed pool of `pool` bytes (0: none),
    /// guest RAM's host memory limited to `limit`. `handler` serves swapped frames from now on.
    pub fn enable_swap(
        &mut self,
        handler: &FaultHandler,
        dir: &std::path::Path,
        file_max: u64,
        pool: u64,
        limit: u64,
    ) -> Result<Arc<SwapStore>, BackingError> {
        let Populate::Uffd { uffd, .. } = &self.populate else { return Err(BackingError::SwapNeedsUffd) };
        let store = Arc::new(SwapStore::new(
            Arc::clone(&self.states),
            Arc::clone(&self.ram),
            Arc::clone(uffd),
            &SwapSettings { dir, file_max, pool, limit },
        )?);
        handler.set_swap(Arc::clone(&store));
        self.swap = Some(Arc::clone(&store));
        Ok(store)
    }

    /// Host-side swap, when it is on.
    pub fn swap(&self) -> Option<&Arc<SwapStore>> {
        self.swap.as_ref()
    }

    /// Makes frames usable by vCPUs before they are handed out: registers the KVM memslots
    /// that cover them.
    pub fn prepare(&mut self, gfn: Gfn, pages: u64) -> Result<(), BackingError> {
        match &mut self.slots {
            Some(slots) => slots.ensure(gfn.gpa(), pages * PAGE_SIZE).map_err(|source| BackingError::Memslot {
                gfn,
                pages,
                source,
            }),
            None => Ok(()),
        }
    }

    /// Gives an `Allocated` (or `Zero`) frame private, zero-filled host memory so the VMM may
    /// write it.
    pub fn make_resident(&self, gfn: Gfn) -> Result<(), BackingError> {
        self.populate.zero_fill(&self.ram, &self.states, gfn).map_err(|source| BackingError::Populate { gfn, source })
    }

    /// Backs every `Allocated` frame of `[gfn, gfn + pages)` now (POPULATE).
    pub fn populate(&self, gfn: Gfn, pages: u64) -> Result<(), BackingError> {
        self.populate
            .claim_and_fill(&self.ram, &self.states, gfn, pages)
            .map(|_| ())
            .map_err(|source| BackingError::Populate { gfn, source })
    }

    /// Writes `data` at `gpa`, first giving every touched frame host memory (so a VMM write
    /// never waits for the fault handler).
    pub fn write(&self, gpa: GuestAddress, data: &[u8]) -> Result<(), BackingError> {
        let first = Gfn::containing(gpa);
        let last = Gfn::containing(GuestAddress(gpa.0 + data.len().max(1) as u64 - 1));
        if let Some(s) = &self.swap {
            // Written by the VMM: a clean copy in swap would not know.
            s.drop_clean(&[(first, last.0 - first.0 + 1)]);
        }
        for g in first.0..=last.0 {
            self.make_resident(Gfn(g))?;
        }
        self.ram.mem().write_slice(data, gpa).map_err(|source| BackingError::Write {
            gpa: gpa.0,
            len: data.len(),
            source,
        })
    }

    /// Drops the host memory of `[gfn, gfn + pages)`, which must lie in one RAM range: it
    /// reads as zero (or faults, under userfaultfd) afterwards, and every KVM translation of it
    /// is gone.
    pub fn discard(&self, gfn: Gfn, pages: u64) -> Result<(), BackingError> {
        self.ram.discard(gfn.gpa(), pages * PAGE_SIZE).map_err(|source| BackingError::Discard { gfn, pages, source })
    }

    /// [`discard`](Self::discard) for runs that each lie in one RAM range. Returns
    /// `(calls, pages)`.
    pub fn discard_runs(&self, runs: &[Run]) -> Result<(u64, u64), BackingError> {
        for &(g, n) in runs {
            self.discard(g, n)?;
        }
        if let Some(s) = &self.swap {
            s.forget(runs);
        }
        Ok((runs.len() as u64, runs.iter().map(|r| r.1).sum()))
    }

    /// An emptied page table keeps its place but not its memory: marked `Zero`, its private
    /// page is dropped and KVM's walks through it read the shared zero page. Returns whether it
    /// held memory.
    pub fn zero(&self, gfn: Gfn) -> Result<bool, BackingError> {
        if self.states.set_range(gfn, 1, FrameState::Zero) == 0 {
            return Ok(false);
        }
        self.discard(gfn, 1)?;
        Ok(true)
    }

    /// Drops every cached translation of the frames in `runs`, keeping their contents (after a
    /// present leaf pointing at them changed).
    pub fn invalidate(&self, runs: &[Run]) -> Result<(), BackingError> {
        let Some(&(first, _)) = runs.first() else { return Ok(()) };
        if let Some(s) = &self.swap {
            // The leaf changed: its dirty bit no longer vouches for a clean copy.
            s.drop_clean(runs);
        }
        let runs = self.split_at_ranges(runs);
        self.populate
            .invalidate(&self.ram, &self.states, &runs)
            .map_err(|source| BackingError::Populate { gfn: first, source })
    }

    /// `runs` cut where RAM ranges end: each range is its own host mapping, and a call that
    /// spans two would reach the gap between them (a run of frames contiguous in guest-physical
    /// space may cross from one node's range into the next).
    fn split_at_ranges(&self, runs: &[Run]) -> Vec<Run> {
        self.states.split_at_ranges(runs)
    }

    /// Drops every cached translation of the frames in `runs` so that the guest's next touch
    /// walks its page tables again (and sets the accessed bits reclaim just cleared). Contents
    /// and kept swap copies stay.
    pub fn refresh(&self, runs: &[Run]) -> Result<(), BackingError> {
        let Some(&(first, _)) = runs.first() else { return Ok(()) };
        let runs = self.split_at_ranges(runs);
        self.populate
            .refresh(&self.ram, &self.states, &runs)
            .map_err(|source| BackingError::Populate { gfn: first, source })
    }

    /// The page-state map.
    pub fn states(&self) -> &PageStates {
        &self.states
    }

    /// Fault-around window of the fault handler, in bytes.
    pub fn fault_around(&self) -> u64 {
        self.window * PAGE_SIZE
    }

    /// The fault handler's counters, once userfaultfd is on.
    pub fn fault_stats(&self) -> Option<&FaultStats> {
        self.fault_stats.as_deref()
    }

    /// `Allocated` frames (of `node`, or all) that the kernel backed unseen since their RAM went
    /// over to kernel demand paging for first touches (see `FaultHandler`): resident, though
    /// the page-state map cannot say so. Under kernel demand paging (`backing=demand`) that is
    /// all guest RAM. Counting asks the kernel (`mincore`) each time: about 50 ms for 64 GiB
    /// handed over here, 0.1 ms for 1 GiB. A reused count would be cheaper but stale right
    /// after frees, when callers look (tested: a guest's "everything came back" check failed).
    pub fn resident_unseen(&self, node: Option<usize>) -> Result<u64, BackingError> {
        let runs = match self.fault_stats.as_deref() {
            Some(stats) => crate::sync::lock(&stats.kernel_runs).clone(),
            None if !self.populate.is_uffd() => self.states.ranges().iter().map(|&(s, e, _)| (s, e.0 - s.0)).collect(),
            None => return Ok(0),
        };
        let mut n = 0;
        for (first, pages) in runs {
            if node.is_some_and(|k| self.states.node(first) != Some(k)) {
                continue;
            }
            let protect =
                |source| BackingError::Populate { gfn: first, source: PopulateError::Protect { gfn: first, source } };
            let hva = self
                .ram
                .host_addr(first.gpa())
                .ok_or_else(|| protect(std::io::Error::from_raw_os_error(libc::EFAULT)))?;
            let present = populate::present(hva as u64, pages * PAGE_SIZE).map_err(protect)?;
            n += (0u64..)
                .zip(&present)
                .filter(|(k, p)| **p & 1 != 0 && self.states.get(first.plus(*k)) == FrameState::Allocated)
                .count() as u64;
        }
        Ok(n)
    }

    /// Every frame handed out lies in a registered memslot (when there is a VM), and the
    /// per-node resident counts are not above the frames the map shows resident or in flight.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut counted = vec![0u64; self.states.nodes()];
        for &(first, end, node) in self.states.ranges() {
            let c = self.states.census(first, end.0 - first.0);
            counted[node] += c[FrameState::Resident as usize] + c[FrameState::Populating as usize];
            let Some(slots) = &self.slots else { continue };
            let mut g = first;
            while g < end {
                if self.states.get(g) != FrameState::Free && !slots.covers(g.gpa().0) {
                    return Err(format!("frame {g} is handed out but no memslot covers it"));
                }
                g = g.plus(1);
            }
        }
        for (node, &n) in counted.iter().enumerate() {
            // A fill in flight counts once it lands; the map may be a step ahead of the counter.
            if self.states.resident(node) > n {
                return Err(format!(
                    "node {node}: {} frames counted resident, {n} resident or filling",
                    self.states.resident(node)
                ));
            }
        }
        Ok(())
    }

    /// What the layer reports.
    pub fn snapshot(&self) -> BackingSnapshot {
        let f = self.fault_stats.as_deref();
        BackingSnapshot {
            memslots: self.slots.as_ref().map_or(0, Memslots::count),
            memslot_bytes: self.slots.as_ref().map_or(0, Memslots::registered_bytes),
            faults: f.map(|f| f.report(self.window, self.max_window)),
            faulted_per_node: (0..self.states.nodes()).map(|n| f.map_or(0, |f| f.faulted_per_node[n].get())).collect(),
        }
    }
}
