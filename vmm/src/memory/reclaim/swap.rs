//! Host-side swap's policy: which resident pages leave host memory.
//!
//! A clock over the accessed bits of the guest's leaf entries (the VMM built the tables, so it
//! can read them; see `space::scan`). The hand walks the heap and slab zones in address order;
//! a page whose accessed bit is set gets a second chance (the bit is cleared), a page whose bit
//! is clear has not been touched since the hand last passed and is a victim. Clearing a bit is
//! not enough on a shadow-paging host: the guest keeps using its cached translation and the
//! bit would stay clear however hot the page. So the frames whose bits were cleared have their
//! translations dropped, a batch at a time (`Backing::refresh`), and the guest's next touch
//! walks the tables again and sets the bit. `fifo` is the same hand blind to the bits, for
//! comparison.
//!
//! Staging a victim needs the manager's lock (no free may interleave), so a batch is picked and
//! staged in one go here; writing it out is the store's job, without the lock.

use crate::config::SwapPolicy;
use crate::memory::addr::{Gfn, Gva};
use crate::memory::backing::swap::{STAGE_PAGES, Staging, SwapStore, SwapStoreReport};
use crate::memory::backing::{Backing, BackingError};
use crate::memory::frames::page_state::FrameState;
use crate::memory::space::AddressSpace;
use crate::memory::space::pagetable::{PageSize, test_and_clear_dirty};

use super::super::MemoryError;

/// Most leaves one batch looks at (bounds how long the manager's lock is held).
const SCAN_BUDGET: usize = 64 * 1024;

/// What the policy did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct SwapPolicyCounters {
    /// Leaves the hand passed, those it found accessed (and cleared), and the victims it chose.
    pub scanned: u64,
    pub young: u64,
    pub victims: u64,
    /// Full turns of the hand.
    pub laps: u64,
    /// Translation drops after clearing accessed bits (one per run of frames).
    pub refreshes: u64,
    /// Time spent walking the tables, and dropping translations: what tracking accesses costs
    /// the VMM (the guest pays one walk per refreshed page it touches again).
    pub scan_us: u64,
    pub refresh_us: u64,
}

/// Swap's figures: the store's and the clock's (the stats JSON's `swap`).
#[derive(Clone, Debug, serde::Serialize)]
pub struct SwapSnapshot {
    #[serde(flatten)]
    pub store: SwapStoreReport,
    pub policy: SwapPolicy,
    pub clock: SwapPolicyCounters,
}

/// The hand and its figures.
#[derive(Debug)]
pub struct SwapClock {
    policy: SwapPolicy,
    hand: Gva,
    counters: SwapPolicyCounters,
}

/// What one batch did.
#[derive(Clone, Copy, Debug, Default)]
pub struct BatchOutcome {
    /// Frames moved into the staging area.
    pub staged: usize,
    /// Whether the hand passed the end of the zones.
    pub wrapped: bool,
}

impl SwapClock {
    pub fn new(policy: SwapPolicy) -> Self {
        SwapClock { policy, hand: Gva(0), counters: SwapPolicyCounters::default() }
    }

    /// The policy in force.
    pub fn policy(&self) -> SwapPolicy {
        self.policy
    }

    /// The hand's laps so far and where it is: a caller that wants one full turn waits until
    /// both say it went round.
    pub fn position(&self) -> (u64, Gva) {
        (self.counters.laps, self.hand)
    }

    pub fn counters(&self) -> &SwapPolicyCounters {
        &self.counters
    }

    /// The store's and the clock's figures.
    pub fn snapshot(&self, store: &SwapStore) -> SwapSnapshot {
        SwapSnapshot { store: store.report(), policy: self.policy, clock: self.counters.clone() }
    }

    /// Picks up to `want` victims (at most what the staging area has room for) and stages
    /// them: claims each resident one, moves its page out of guest RAM, and records whether
    /// it was written since its last swap-in (its leaf's dirty bit, cleared for next time).
    pub fn stage_batch(
        &mut self,
        space: &AddressSpace,
        backing: &Backing,
        staging: &mut Staging,
        want: usize,
    ) -> Result<BatchOutcome, MemoryError> {
        let Some(store) = backing.swap() else { return Ok(BatchOutcome::default()) };
        let mem = backing.ram().mem();
        let states = backing.states();
        let want = want.min(STAGE_PAGES - staging.gfns().len());
        let clock = self.policy == SwapPolicy::Clock;
        let mut victims: Vec<(Gfn, u64)> = Vec::with_capacity(want);
        let mut young: Vec<(Gfn, u64)> = Vec::new();
        let c = &mut self.counters;
        let t = std::time::Instant::now();
        let end = space.scan_leaves(mem, states, self.hand, SCAN_BUDGET, clock, |leaf| {
            c.scanned += 1;
            let frames = match leaf.size {
                PageSize::Size4K => 1,
                PageSize::Size2M => 512,
            };
            if clock && leaf.accessed {
                c.young += 1;
                push_run(&mut young, leaf.gfn, frames);
                return true;
            }
            for i in 0..frames {
                let g = leaf.gfn.plus(i);
                if states.get(g) == FrameState::Resident && victims.len() < want {
                    victims.push((g, leaf.slot));
                }
            }
            victims.len() < want
        });
        self.hand = end.next;
        if end.wrapped {
            c.laps += 1;
        }
        c.scan_us += crate::metrics::micros(t.elapsed());
        // The guest's next touch of a page whose bit was cleared must walk its tables again.
        if !young.is_empty() {
            let t = std::time::Instant::now();
            c.refreshes += young.len() as u64;
            backing.refresh(&young)?;
            c.refresh_us += crate::metrics::micros(t.elapsed());
        }
        let gfns: Vec<Gfn> = victims.iter().map(|v| v.0).collect();
        let first = staging.gfns().len();
        let staged = store.stage(staging, &gfns).map_err(BackingError::from)?;
        let mut k = first;
        let mut last: Option<(u64, bool)> = None;
        for (i, &(_, slot)) in victims.iter().enumerate() {
            if !staged[i] {
                continue;
            }
            // A 2 MiB leaf's frames share one entry and one dirty bit.
            let dirty = match last {
                Some((s, d)) if s == slot => d,
                _ => test_and_clear_dirty(mem, slot).unwrap_or(true),
            };
            last = Some((slot, dirty));
            staging.set_dirty(k, dirty);
            k += 1;
        }
        c.victims += (k - first) as u64;
        Ok(BatchOutcome { staged: k - first, wrapped: end.wrapped })
    }
}

/// Frames between two runs to refresh that are refreshed with them, to save calls: dropping
/// the translations of a few pages the guest has not touched lately costs nothing until it
/// touches them, and one call costs about as much as refreshing a hundred pages.
const REFRESH_GAP: u64 = 64;

/// Appends `n` frames from `gfn` to `runs`, extending the last run when they follow it closely
/// (within the same 2 MiB block, so that runs never cross a RAM range's end).
fn push_run(runs: &mut Vec<(Gfn, u64)>, gfn: Gfn, n: u64) {
    if let Some(last) = runs.last_mut() {
        let end = last.0.plus(last.1);
        if gfn >= end && gfn.0 - end.0 <= REFRESH_GAP && gfn.0 >> 9 == last.0.0 >> 9 {
            last.1 = gfn.0 + n - last.0.0;
            return;
        }
    }
    runs.push((gfn, n));
}
