//! Physical memory as the address space uses it: frames from the frames layer, made usable by
//! the backing layer. The two layers stay separate (each owns its state); this borrows both for
//! one operation and keeps the order between them that makes frees safe (see `frames`).

use crate::memory::addr::{Gfn, NodeId};
use crate::memory::backing::Backing;
use crate::memory::frames::policy::Policy;
use crate::memory::frames::{Frames, Placement, Run};

use super::SpaceError;

/// The frames and backing layers, borrowed together.
#[derive(Debug)]
pub struct Phys<'a> {
    pub frames: &'a mut Frames,
    pub backing: &'a mut Backing,
}

impl Phys<'_> {
    /// `pages` contiguous frames on `node` (ending at or below `below`), `Allocated` and
    /// usable by vCPUs: zero, with no host backing until touched.
    pub fn alloc(&mut self, node: NodeId, pages: u64, below: Option<Gfn>) -> Result<Gfn, SpaceError> {
        let gfn = self.frames.alloc(node, pages, below).map_err(SpaceError::Frames)?;
        self.prepared(vec![(gfn, pages)]).map(|_| gfn)
    }

    /// `pages` frames placed by `p` (see `Frames::take`).
    pub fn take(&mut self, pages: u64, p: Placement) -> Result<Vec<Run>, SpaceError> {
        let runs = self.frames.take(pages, p)?;
        self.prepared(runs)
    }

    /// `blocks` 2 MiB blocks, each placed by `policy` on its own.
    pub fn take_huge_blocks(&mut self, blocks: u64, policy: Policy, local: NodeId) -> Result<Vec<Run>, SpaceError> {
        let runs = self.frames.take_huge_blocks(blocks, policy, local)?;
        self.prepared(runs)
    }

    /// Registers new runs with the backing layer, or gives them back.
    fn prepared(&mut self, runs: Vec<Run>) -> Result<Vec<Run>, SpaceError> {
        for &(g, n) in &runs {
            if let Err(e) = self.backing.prepare(g, n) {
                self.frames.free_unbacked(&runs)?;
                return Err(e.into());
            }
        }
        Ok(runs)
    }

    /// Frees a run from [`alloc`](Self::alloc) that is mapped nowhere: its host backing is
    /// dropped before the buddy allocator can hand it out again. Nothing changes on error.
    pub fn free(&mut self, gfn: Gfn, pages: u64) -> Result<(), SpaceError> {
        if self.frames.unassign(gfn, pages).map_err(SpaceError::Frames)? > 0 {
            self.backing.discard(gfn, pages)?;
        }
        self.frames.release(gfn, pages).map_err(SpaceError::Frames)
    }

    /// Frees runs that were never mapped.
    pub fn give_back(&mut self, runs: &[Run]) -> Result<(), SpaceError> {
        for &(g, n) in runs {
            self.free(g, n)?;
        }
        Ok(())
    }

    /// A zeroed, resident frame for a page table: from node 0 (tables are few and shared),
    /// else from any node.
    pub fn alloc_table(&mut self) -> Option<Gfn> {
        let nodes = u32::try_from(self.frames.nr_nodes()).expect("few nodes");
        let gfn = (0..nodes).find_map(|n| self.alloc(NodeId(n), 1, None).ok())?;
        if self.backing.make_resident(gfn).is_err() {
            let _ = self.free(gfn, 1);
            return None;
        }
        Some(gfn)
    }
}
