//! Frames: who owns each guest-physical frame.
//!
//! The bottom layer of the memory manager, like Linux's `page_alloc.c`: per-node buddy
//! allocators, the page-state map (one state per frame, shared lock-free with the fault
//! handler), and NUMA placement (which nodes a request tries, in which order). It is pure
//! bookkeeping: no system calls, no host memory, no page tables. The layers above give frames
//! host backing (`backing`) and map them into the guest (`space`).
//!
//! Freeing is two steps so that the host backing can be dropped in between, while no vCPU
//! access can be served the old contents any more and before anyone can be handed the frame
//! again: [`Frames::unassign`] (the state map says `Free`), then [`Frames::release`] (the buddy
//! allocator takes the frames back).

pub mod balloon;
pub mod bitmap;
pub mod buddy;
pub mod page_state;
mod placement;
pub mod policy;

use std::sync::Arc;

use vm_memory::GuestAddress;

use crate::layout::RamRange;
use crate::memory::addr::{Gfn, NodeId, PAGE_SIZE};

use buddy::{BuddyAllocator, BuddyError, BuddyInfo};
use page_state::{FrameState, PageStates};
use policy::Fallback;

pub use placement::Placement;

/// A run of contiguous frames: first frame and count.
pub type Run = (Gfn, u64);

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
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
    #[error("out of guest memory")]
    NoMemory,
    #[error("no NUMA node {0}")]
    NoNode(NodeId),
    #[error("cannot map the frame allocator's metadata")]
    Metadata(#[source] std::io::Error),
}

impl FrameError {
    /// Whether the request failed only because the frames are not there (the caller may try
    /// elsewhere or report ENOMEM), as opposed to a broken request or allocator.
    pub fn is_exhausted(&self) -> bool {
        matches!(
            self,
            FrameError::NoMemory
                | FrameError::Alloc { source: BuddyError::OutOfMemory { .. } | BuddyError::TooLarge { .. }, .. }
        )
    }
}

/// One NUMA node's frames.
#[derive(Debug)]
pub struct NodeFrames {
    pub id: NodeId,
    pub ranges: Vec<RamRange>,
    pub buddy: BuddyAllocator,
}

/// Per-node frame counts (a snapshot; the stats JSON's `memory.nodes`).
#[derive(Clone, Debug, serde::Serialize)]
pub struct NodeStats {
    pub node: u32,
    pub frames_total: u64,
    pub frames_free: u64,
    pub frames_allocated: u64,
    /// Frames with host memory: those the VMM backed, and (filled in by the memory manager)
    /// those the kernel backed where first touches went over to it.
    pub frames_resident: u64,
    /// Frames ever installed by second-level faults (filled in from the backing layer).
    pub frames_faulted: u64,
    pub buddyinfo: BuddyInfo,
}

/// What the frames layer reports.
#[derive(Clone, Debug)]
pub struct FramesSnapshot {
    pub nodes: Vec<NodeStats>,
    /// Host bytes reserved for buddy and page-state metadata.
    pub metadata_bytes: u64,
}

/// Every guest frame: per-node buddies, the state map, and the NUMA fallback order.
#[derive(Debug)]
pub struct Frames {
    nodes: Vec<NodeFrames>,
    states: Arc<PageStates>,
    fallback: Fallback,
    /// Interleave position.
    rotor: u64,
    /// Frames the balloon holds.
    balloon: balloon::BalloonFrames,
}

impl Frames {
    /// All of `ranges` free, in one buddy allocator per node; `distance` is the SLIT-style
    /// matrix (one row per node).
    pub fn new(ranges: &[RamRange], distance: &[Vec<u8>]) -> Result<Self, FrameError> {
        let nr_nodes = distance.len();
        let end = Gfn::containing(GuestAddress(crate::layout::ram_end(ranges)));
        let frame_ranges = ranges
            .iter()
            .map(|r| (Gfn::containing(r.base()), Gfn::containing(GuestAddress(r.end())), r.node as usize))
            .collect();
        let states = Arc::new(PageStates::new(end, frame_ranges, nr_nodes).map_err(FrameError::Metadata)?);
        let mut nodes = Vec::with_capacity(nr_nodes);
        for n in 0..nr_nodes {
            let own: Vec<RamRange> = ranges.iter().filter(|r| r.node as usize == n).copied().collect();
            let id = NodeId(u32::try_from(n).expect("few nodes"));
            let (Some(first), Some(last)) = (own.first(), own.last()) else { return Err(FrameError::NoNode(id)) };
            let start = Gfn::containing(first.base());
            let stop = Gfn::containing(GuestAddress(last.end()));
            let mut buddy = BuddyAllocator::new(start, stop).map_err(FrameError::Metadata)?;
            for r in &own {
                buddy.add_free_range(Gfn::containing(r.base()), Gfn::containing(GuestAddress(r.end())));
            }
            nodes.push(NodeFrames { id, ranges: own, buddy });
        }
        let balloon = balloon::BalloonFrames::new(nr_nodes);
        Ok(Frames { nodes, states, fallback: Fallback::new(distance), rotor: 0, balloon })
    }

    /// The page-state map (shared with the backing layer and the fault handler).
    pub fn states(&self) -> &Arc<PageStates> {
        &self.states
    }

    /// Number of nodes.
    pub fn nr_nodes(&self) -> usize {
        self.nodes.len()
    }

    /// The nodes.
    pub fn nodes(&self) -> &[NodeFrames] {
        &self.nodes
    }

    /// Frames managed on all nodes.
    pub fn total_pages(&self) -> u64 {
        self.nodes.iter().map(|n| n.buddy.managed_pages()).sum()
    }

    /// Takes `pages` contiguous frames from `node` (ending at or below `below`) and marks them
    /// `Allocated`: zero, no host backing, not yet visible to anyone. With deflate-on-OOM, the
    /// balloon gives frames back rather than let this fail.
    pub fn alloc(&mut self, node: NodeId, pages: u64, below: Option<Gfn>) -> Result<Gfn, FrameError> {
        self.or_deflate(pages, |f| f.alloc_on(node, pages, below))
    }

    /// [`alloc`](Self::alloc) without touching the balloon.
    fn alloc_on(&mut self, node: NodeId, pages: u64, below: Option<Gfn>) -> Result<Gfn, FrameError> {
        let n = self.nodes.get_mut(node.0 as usize).ok_or(FrameError::NoNode(node))?;
        let res = match below {
            Some(limit) => n.buddy.alloc_exact_below(pages, limit),
            None => n.buddy.alloc_exact(pages),
        };
        let gfn = res.map_err(|source| FrameError::Alloc { node, pages, source })?;
        self.states.set_range(gfn, pages, FrameState::Allocated);
        Ok(gfn)
    }

    /// First step of a free: checks that `[gfn, gfn + pages)` is whole allocated blocks of one
    /// node (one run from [`alloc`](Self::alloc), or several that touch) and marks it
    /// `Free` in the state map (waiting out an in-flight fill). Returns how many of its frames
    /// were resident: their host backing must be dropped before [`release`](Self::release).
    /// Nothing changes on error.
    pub fn unassign(&mut self, gfn: Gfn, pages: u64) -> Result<u64, FrameError> {
        let bad = |source| FrameError::Free { gfn, pages, source };
        let node = self.states.node(gfn).ok_or(bad(BuddyError::OutOfRange { gfn }))?;
        self.nodes[node].buddy.check_range(gfn, pages).map_err(bad)?;
        Ok(self.states.set_range(gfn, pages, FrameState::Free))
    }

    /// Second step of a free: the buddy allocator takes the range back.
    pub fn release(&mut self, gfn: Gfn, pages: u64) -> Result<(), FrameError> {
        let bad = |source| FrameError::Free { gfn, pages, source };
        let node = self.states.node(gfn).ok_or(bad(BuddyError::OutOfRange { gfn }))?;
        self.nodes[node].buddy.free_range(gfn, pages).map_err(bad)
    }

    /// Frees runs that nobody ever backed or mapped (a request that failed half-way).
    pub(crate) fn free_unbacked(&mut self, runs: &[Run]) -> Result<(), FrameError> {
        for &(g, n) in runs {
            let resident = self.unassign(g, n)?;
            debug_assert_eq!(resident, 0, "frames handed back unused have no backing");
            self.release(g, n)?;
        }
        Ok(())
    }

    /// Splits runs where they cross from one RAM range (or node) into the next: a freed run
    /// must lie in one buddy allocator.
    pub fn split_at_ranges(&self, runs: Vec<Run>) -> Vec<Run> {
        self.states.split_at_ranges(&runs)
    }

    /// The node of a RAM frame.
    pub fn node_of(&self, gfn: Gfn) -> Option<NodeId> {
        self.states.node(gfn).map(|n| NodeId(u32::try_from(n).expect("few nodes")))
    }

    /// Host bytes reserved for allocator and page-state metadata (resident only where touched).
    pub fn metadata_bytes(&self) -> u64 {
        self.states.metadata_bytes() + self.nodes.iter().map(|n| n.buddy.metadata_bytes()).sum::<u64>()
    }

    /// Gives the host back all-zero metadata pages (after the guest freed a lot). Returns the
    /// bytes released.
    pub fn trim_metadata(&mut self) -> u64 {
        self.nodes.iter_mut().map(|n| n.buddy.trim_metadata() as u64).sum()
    }

    /// Per-node counts.
    pub fn snapshot(&self) -> FramesSnapshot {
        FramesSnapshot {
            nodes: self
                .nodes
                .iter()
                .map(|n| NodeStats {
                    node: n.id.0,
                    frames_total: n.buddy.managed_pages(),
                    frames_free: n.buddy.free_pages(),
                    frames_allocated: n.buddy.managed_pages() - n.buddy.free_pages(),
                    frames_resident: self.states.resident(n.id.0 as usize),
                    frames_faulted: 0,
                    buddyinfo: n.buddy.buddyinfo(),
                })
                .collect(),
            metadata_bytes: self.metadata_bytes(),
        }
    }

    /// Every buddy allocator's invariants, and that the state map's `Free` frames are exactly
    /// the buddies' free frames.
    pub fn check_invariants(&self) -> Result<(), String> {
        self.check_balloon()?;
        for n in &self.nodes {
            n.buddy.check_invariants().map_err(|e| format!("node {}: {e}", n.id))?;
            let mut free = 0;
            for r in &n.ranges {
                let c = self.states.census(Gfn::containing(r.base()), r.len / PAGE_SIZE);
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
        Ok(())
    }
}
