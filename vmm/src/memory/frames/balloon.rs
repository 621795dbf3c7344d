//! The balloon's frames: taken from the buddy allocators like any allocation, marked
//! `Ballooned`, never handed out and never backed. Per node, the balloon holds up to its
//! target; while it holds less, it takes free frames as they appear (so the guest's allocations
//! get ENOMEM and every frame it frees goes to the balloon). With deflate-on-OOM, an allocation
//! that finds no free frame makes the balloon give frames back instead (and lowers its target
//! by as much).
//!
//! Which frames are ballooned lives in the page-state map only: the balloon keeps counts, not
//! lists, so it costs the VMM nothing per frame.

use crate::memory::addr::{Gfn, NodeId, Order};

use super::page_state::FrameState;
use super::{FrameError, Frames};

/// Largest block the balloon takes at once (2 MiB), so that it can give back in small steps.
const MAX_ORDER: u32 = 9;
/// Least a deflate-on-OOM gives back: 1 MiB.
pub const OOM_DEFLATE_MIN: u64 = 256;

/// What the balloon did, in frames.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct BalloonCounters {
    pub inflated: u64,
    pub deflated: u64,
    /// Allocations that deflated the balloon instead of failing.
    pub oom_deflates: u64,
    pub oom_deflated: u64,
}

/// The balloon's frame holdings.
#[derive(Debug, Default)]
pub(super) struct BalloonFrames {
    /// Per node: frames the balloon wants, and frames it holds.
    pub(super) target: Vec<u64>,
    pub(super) held: Vec<u64>,
    pub(super) deflate_on_oom: bool,
    pub(super) counters: BalloonCounters,
}

impl BalloonFrames {
    pub(super) fn new(nodes: usize) -> Self {
        BalloonFrames { target: vec![0; nodes], held: vec![0; nodes], ..Default::default() }
    }
}

/// One node's balloon figures.
#[derive(Clone, Debug, serde::Serialize)]
pub struct BalloonNode {
    pub node: u32,
    pub target_frames: u64,
    pub actual_frames: u64,
}

impl Frames {
    /// Sets the frames the balloon should hold on each node, and whether allocations may
    /// deflate it; takes free frames or gives frames back at once. Returns the frames it
    /// still lacks (the guest holds them).
    pub fn set_balloon(&mut self, per_node: &[u64], deflate_on_oom: bool) -> u64 {
        self.balloon.deflate_on_oom = deflate_on_oom;
        for (n, &t) in per_node.iter().enumerate().take(self.nodes.len()) {
            self.balloon.target[n] = t.min(self.nodes[n].buddy.managed_pages());
            let held = self.balloon.held[n];
            if held > self.balloon.target[n] {
                let given = self.balloon_release(n, held - self.balloon.target[n]);
                self.balloon.counters.deflated += given;
            }
        }
        self.balloon_fill()
    }

    /// Takes free frames up to each node's target; returns the frames still lacking.
    pub fn balloon_fill(&mut self) -> u64 {
        let mut lacking = 0;
        for n in 0..self.nodes.len() {
            let mut want = self.balloon.target[n].saturating_sub(self.balloon.held[n]);
            let mut k = MAX_ORDER;
            while want > 0 {
                k = k.min(63 - want.leading_zeros());
                let order = Order::new(u8::try_from(k).expect("small")).expect("valid order");
                match self.nodes[n].buddy.alloc(order) {
                    Ok(g) => {
                        self.states.set_range(g, order.pages(), FrameState::Ballooned);
                        self.balloon.held[n] += order.pages();
                        self.balloon.counters.inflated += order.pages();
                        want -= order.pages();
                    }
                    Err(_) if k > 0 => k -= 1,
                    Err(_) => break,
                }
            }
            lacking += want;
        }
        lacking
    }

    /// Gives back up to `pages` ballooned frames of node `n` (whole blocks, so possibly a few
    /// more); returns how many.
    fn balloon_release(&mut self, n: usize, pages: u64) -> u64 {
        let mut given = 0;
        let ranges: Vec<(Gfn, Gfn)> =
            self.nodes[n].ranges.iter().map(|r| (Gfn(r.start / 4096), Gfn(r.end() / 4096))).collect();
        for (start, end) in ranges {
            let mut at = start;
            while at < end && given < pages {
                if self.states.get(at) != FrameState::Ballooned {
                    at = at.plus(1);
                    continue;
                }
                let k = self.nodes[n].buddy.allocated_order(at).expect("ballooned frames are whole blocks");
                self.states.set_range(at, k.pages(), FrameState::Free);
                self.nodes[n].buddy.free(at, k).expect("a ballooned block frees");
                given += k.pages();
                at = at.plus(k.pages());
            }
        }
        self.balloon.held[n] -= given;
        given
    }

    /// Runs `f`; if it finds no frames while deflate-on-OOM is on and the balloon holds some,
    /// deflates the balloon by at least `pages` (and 1 MiB), lowering its target as much, and
    /// runs `f` again, until `f` succeeds or the balloon is empty.
    pub(super) fn or_deflate<T>(
        &mut self,
        pages: u64,
        mut f: impl FnMut(&mut Self) -> Result<T, FrameError>,
    ) -> Result<T, FrameError> {
        loop {
            match f(self) {
                Err(e) if e.is_exhausted() && self.balloon.deflate_on_oom => {
                    // The node holding the most ballooned frames gives.
                    let Some((n, _)) =
                        self.balloon.held.iter().enumerate().filter(|(_, h)| **h > 0).max_by_key(|(_, h)| **h)
                    else {
                        return Err(e);
                    };
                    let given = self.balloon_release(n, pages.max(OOM_DEFLATE_MIN));
                    self.balloon.target[n] = self.balloon.target[n].saturating_sub(given);
                    self.balloon.counters.oom_deflates += 1;
                    self.balloon.counters.oom_deflated += given;
                }
                other => return other,
            }
        }
    }

    /// Per-node balloon figures.
    pub fn balloon_nodes(&self) -> Vec<BalloonNode> {
        (0..self.nodes.len())
            .map(|n| BalloonNode {
                node: self.nodes[n].id.0,
                target_frames: self.balloon.target[n],
                actual_frames: self.balloon.held[n],
            })
            .collect()
    }

    /// What the balloon did.
    pub fn balloon_counters(&self) -> &BalloonCounters {
        &self.balloon.counters
    }

    /// Whether allocations may deflate the balloon.
    pub fn balloon_deflates_on_oom(&self) -> bool {
        self.balloon.deflate_on_oom
    }

    /// Every node's ballooned frames are exactly what the balloon counts.
    pub(super) fn check_balloon(&self) -> Result<(), String> {
        for (n, node) in self.nodes.iter().enumerate() {
            let ballooned: u64 = node
                .ranges
                .iter()
                .map(|r| self.states.census(Gfn(r.start / 4096), r.len / 4096)[FrameState::Ballooned as usize])
                .sum();
            if ballooned != self.balloon.held[n] {
                return Err(format!(
                    "node {}: {ballooned} frames ballooned in the state map, the balloon counts {}",
                    NodeId(u32::try_from(n).expect("few nodes")),
                    self.balloon.held[n]
                ));
            }
        }
        Ok(())
    }
}
