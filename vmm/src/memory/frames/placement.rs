//! Placing a request on nodes: a policy, the calling vCPU's node and the shape the request
//! needs (one run, or the largest blocks available, like `vmalloc`), tried node by node in the
//! policy's fallback order.

use crate::memory::addr::{Gfn, NodeId, Order};

use super::policy::Policy;
use super::{FrameError, Frames, Run};

/// Frames below this are below 4 GiB guest-physical.
const DMA32_LIMIT: Gfn = Gfn(1 << 20);

/// Where and how a request's frames may be taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placement {
    pub policy: Policy,
    /// Node of the requesting vCPU (for `Policy::Local`).
    pub local: NodeId,
    /// Only frames below 4 GiB.
    pub dma32: bool,
    /// One physically contiguous run.
    pub contiguous: bool,
}

impl Frames {
    /// `pages` frames placed by `p`: one run when `p.contiguous`, else the largest blocks
    /// available. On failure nothing is taken; `is_exhausted()` errors mean "no room".
    pub fn take(&mut self, pages: u64, p: Placement) -> Result<Vec<Run>, FrameError> {
        self.or_deflate(pages, |f| {
            let mut taken: Vec<Run> = Vec::new();
            let result = f.take_into(pages, p, &mut taken);
            if let Err(e) = result {
                f.free_unbacked(&taken)?;
                return Err(e);
            }
            Ok(taken)
        })
    }

    fn take_into(&mut self, pages: u64, p: Placement, taken: &mut Vec<Run>) -> Result<(), FrameError> {
        let limit = p.dma32.then_some(DMA32_LIMIT);
        if p.contiguous {
            for n in self.fallback.candidates(p.policy, p.local, self.rotor) {
                match self.alloc_on(n, pages, limit) {
                    Ok(g) => {
                        taken.push((g, pages));
                        self.rotor += 1;
                        return Ok(());
                    }
                    Err(e) if e.is_exhausted() => continue,
                    Err(e) => return Err(e),
                }
            }
            return Err(FrameError::NoMemory);
        }
        if p.policy == Policy::Interleave {
            for _ in 0..pages {
                let nodes = self.fallback.candidates(p.policy, p.local, self.rotor);
                self.rotor += 1;
                let mut got = None;
                for n in nodes {
                    match self.alloc_on(n, 1, limit) {
                        Ok(g) => {
                            got = Some(g);
                            break;
                        }
                        Err(e) if e.is_exhausted() => continue,
                        Err(e) => return Err(e),
                    }
                }
                taken.push((got.ok_or(FrameError::NoMemory)?, 1));
            }
            return Ok(());
        }
        let mut left = pages;
        for n in self.fallback.candidates(p.policy, p.local, self.rotor) {
            let mut k = floor_log2(left).min(u32::from(Order::MAX.get()));
            while left > 0 {
                match self.alloc_on(n, 1 << k, limit) {
                    Ok(g) => {
                        taken.push((g, 1 << k));
                        left -= 1 << k;
                        if left > 0 {
                            k = k.min(floor_log2(left));
                        }
                    }
                    Err(e) if e.is_exhausted() => {
                        if k == 0 {
                            break;
                        }
                        k -= 1;
                    }
                    Err(e) => return Err(e),
                }
            }
            if left == 0 {
                return Ok(());
            }
        }
        Err(FrameError::NoMemory)
    }

    /// `blocks` 2 MiB blocks (order 9, each aligned), each placed by `policy` on its own: the
    /// interleave rotor advances per block. All or nothing.
    pub fn take_huge_blocks(&mut self, blocks: u64, policy: Policy, local: NodeId) -> Result<Vec<Run>, FrameError> {
        self.or_deflate(blocks * Order::HUGE.pages(), |f| {
            let mut runs = Vec::with_capacity(usize::try_from(blocks).unwrap_or(0));
            for _ in 0..blocks {
                let nodes = f.fallback.candidates(policy, local, f.rotor);
                f.rotor += 1;
                match nodes.iter().find_map(|&n| f.alloc_on(n, Order::HUGE.pages(), None).ok()) {
                    Some(g) => runs.push((g, Order::HUGE.pages())),
                    None => {
                        f.free_unbacked(&runs)?;
                        return Err(FrameError::NoMemory);
                    }
                }
            }
            Ok(runs)
        })
    }
}

fn floor_log2(x: u64) -> u32 {
    63 - x.max(1).leading_zeros()
}
