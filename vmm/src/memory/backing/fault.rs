//! Second-level fault handling: the userspace face of EPT/NPT violations.
//!
//! All guest RAM is registered with userfaultfd. When a vCPU (or KVM walking the guest's tables,
//! or the VMM itself) touches a page with no host backing, the thread blocks and a message
//! arrives here. Handler threads serve it from the page-state map alone, without the memory
//! manager's lock:
//!
//! - `Allocated` (never written): zero-fill it and its `Allocated` neighbours in the aligned
//!   fault-around window with one `UFFDIO_COPY` per contiguous run (one 64 KiB copy costs about a
//!   ninth of sixteen 4 KiB ones here).
//! - `Populating` / `Resident`: another path is installing it or already did; wake the thread.
//! - `Free` or `Ballooned`, and handed out at some time before: a vCPU whose walk of the guest's tables found
//!   the frame before the VMM unmapped and freed it (the guest's own race between an access and
//!   a FREE, MOVE or PROTECT on another vCPU). Install a zero page and drop it again at once: the
//!   `MADV_DONTNEED` makes KVM retry its walk, which now finds no mapping, so the guest gets its
//!   own #PF. The same vCPU may fault here again (the drop can win the race with its retry);
//!   each one is served the same way, and the frame is never handed to anyone meanwhile.
//! - `Free` and never handed out since boot: no translation the VMM ever made leads there, so
//!   nothing can explain the access. The VM stops with an error naming the address. This is
//!   exact, not a guess: the page-state map remembers which frames were ever handed out.
//! - `Zero`: a read gets the shared zero page, write-protected; a write (or the write-protect
//!   fault of a write to that zero page) a private page, and the frame becomes `Resident`.
//! - Other write-protect faults (a write during a translation invalidation) are resolved by
//!   lifting the protection.
//! - `Swapped`: read the page back from swap (and, for a sequential stream, the swapped pages
//!   after it); `SwappingOut`: leave the thread asleep (the eviction's end wakes it, and it
//!   faults again); a handler never waits for the swapper. After making
//!   memory resident, a handler gives the swapper time to keep guest RAM near its limit.
//!
//! Any handler failure is reported through the error callback; the VM then stops. A vCPU never
//! waits on a handler that is gone, because the process exits with it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use vm_memory::GuestAddress;

use crate::metrics::{Counter, Histogram, LatencySummary};
use crate::sync::{ThreadInit, lock};

use super::populate::{Populate, PopulateError, ZeroSource};
use super::ram::GuestRam;
use super::swap::{MAX_READAHEAD, SwapError, SwapStore};
use super::uffd::{UFFD_EVENT_PAGEFAULT, UFFD_PAGEFAULT_FLAG_WP, UFFD_PAGEFAULT_FLAG_WRITE, Uffd, UffdError, UffdMsg};
use crate::memory::addr::{Gfn, PAGE_SIZE};
use crate::memory::frames::page_state::{FrameState, PageStates};

#[derive(Debug, thiserror::Error)]
pub enum FaultError {
    #[error("guest touched guest-physical address {gpa:#x}, which the VMM never handed out")]
    NeverHandedOut { gpa: u64 },
    #[error("fault at host address {addr:#x}, outside guest RAM")]
    OutsideRam { addr: u64 },
    #[error("cannot serve the fault at guest-physical {gpa:#x}")]
    Populate {
        gpa: u64,
        #[source]
        source: PopulateError,
    },
    #[error("userfaultfd failed")]
    Uffd(#[source] UffdError),
    #[error("cannot drop the zero page installed for a free frame at {gpa:#x}")]
    Discard {
        gpa: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("guest-physical page {gpa:#x} should hold guest data but has no host backing")]
    LostResident { gpa: u64 },
    #[error(transparent)]
    Swap(#[from] SwapError),
    #[error("a fault handler thread panicked")]
    Panicked,
    #[error("cannot set up a fault handler thread")]
    ThreadSetup(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl FaultError {
    /// Whether the guest caused it (as opposed to a host failure).
    pub fn is_guest_error(&self) -> bool {
        matches!(self, FaultError::NeverHandedOut { .. })
    }

    /// Whether swap could not read a page back (an I/O error on the swap file).
    pub fn is_swap_read_error(&self) -> bool {
        matches!(self, FaultError::Swap(SwapError::Read { .. }))
    }
}

/// What the handlers did, readable while they run.
#[derive(Debug, Default)]
pub struct FaultStats {
    /// Faults that installed zero-filled memory.
    pub zero_fill: Counter,
    /// Frames those faults installed (fault-around included).
    pub pages: Counter,
    /// Faults on frames another path was installing or had installed.
    pub spurious: Counter,
    /// Faults on free frames that had been handed out (the guest's race with a free).
    pub free_frame: Counter,
    /// Write-protect faults during translation invalidations.
    pub write_protect: Counter,
    /// Reads of known-zero frames served with the shared zero page.
    pub zero_page: Counter,
    /// Writes to those zero pages (write-protect faults that made the frame resident).
    pub zero_written: Counter,
    /// Faults on frames being evicted, left asleep until the eviction ends.
    pub deferred: Counter,
    /// Faults that continued a vCPU's sequential stream (and got a grown window).
    pub sequential: Counter,
    /// Faults of a vCPU whose faults are scattered (they install only the faulting frame).
    pub scattered: Counter,
    /// The runs of frames (first, count) whose first touches went over to kernel demand paging
    /// (see [`FaultHandler::allow_kernel_first_touch`]): the kernel backs their `Allocated`
    /// frames unseen, so what is resident there is asked of it.
    pub kernel_runs: Mutex<Vec<(Gfn, u64)>>,
    /// Time to serve a zero-fill fault, from reading the message to waking the vCPU.
    pub latency: Histogram,
    /// Frames ever installed by faults, per node.
    pub faulted_per_node: Vec<Counter>,
}

impl FaultStats {
    pub fn new(nodes: usize) -> Self {
        FaultStats { faulted_per_node: (0..nodes).map(|_| Counter::default()).collect(), ..Default::default() }
    }
}

/// Serializable snapshot of [`FaultStats`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct FaultReport {
    pub fault_around_bytes: u64,
    pub fault_around_max_bytes: u64,
    pub sequential: u64,
    pub scattered: u64,
    /// Guest RAM whose missing pages the kernel now backs on first touch (scattered faults,
    /// no swap), in bytes.
    pub kernel_first_touch_bytes: u64,
    pub zero_fill: u64,
    pub pages: u64,
    pub spurious: u64,
    pub free_frame: u64,
    pub write_protect: u64,
    pub zero_page: u64,
    pub zero_written: u64,
    pub deferred: u64,
    pub latency: LatencySummary,
}

impl FaultStats {
    /// Guest RAM whose first touches went over to the kernel, in bytes.
    pub fn kernel_first_touch_bytes(&self) -> u64 {
        lock(&self.kernel_runs).iter().map(|&(_, pages)| pages * PAGE_SIZE).sum()
    }

    pub fn report(&self, fault_around_pages: u64, max_pages: u64) -> FaultReport {
        FaultReport {
            fault_around_bytes: fault_around_pages * PAGE_SIZE,
            fault_around_max_bytes: max_pages * PAGE_SIZE,
            sequential: self.sequential.get(),
            scattered: self.scattered.get(),
            kernel_first_touch_bytes: self.kernel_first_touch_bytes(),
            zero_fill: self.zero_fill.get(),
            pages: self.pages.get(),
            spurious: self.spurious.get(),
            free_frame: self.free_frame.get(),
            write_protect: self.write_protect.get(),
            zero_page: self.zero_page.get(),
            zero_written: self.zero_written.get(),
            deferred: self.deferred.get(),
            latency: self.latency.summary(),
        }
    }
}

/// Serves userfaultfd messages for guest RAM.
#[derive(Debug)]
pub struct FaultHandler {
    uffd: Arc<Uffd>,
    ram: Arc<GuestRam>,
    states: Arc<PageStates>,
    populate: Populate,
    zero: Arc<ZeroSource>,
    /// Base fault-around window in frames (a power of two).
    window: u64,
    /// Largest window a sequential stream grows to, in frames.
    max_window: u64,
    /// Per faulting thread (vCPU): where its last window ended and how big it was.
    streams: Mutex<HashMap<u32, (Gfn, u64)>>,
    /// Per faulting thread: its last zero-fill fault, and how many of its faults in a row were
    /// far from the one before (random access: windows only install memory nobody touches).
    scatter: Mutex<HashMap<u32, (Gfn, u8)>>,
    stats: Arc<FaultStats>,
    /// Host-side swap, when it is on.
    swap: OnceLock<Arc<SwapStore>>,
    /// Whether scattered first touches may go over to kernel demand paging (the runs that did
    /// are in `stats.kernel_runs`).
    kernel_allowed: AtomicBool,
}

/// A fault farther than this many base windows from the thread's previous one is "far".
const SCATTER_DISTANCE: u64 = 4;
/// After this many far faults in a row, a thread's faults install only the faulting frame
/// (until a few land near the previous again).
const SCATTER_AFTER: u8 = 4;

/// How much guest RAM goes over to kernel demand paging at once: the chunk around a scattered
/// fault. A handover walks the range and drops every translation in it (25-85 us for 64 MiB
/// here, 2.7 ms for all of a 1 GiB guest), so not all RAM at once; and not a few pages at a time
/// either, or the round trips before each handover would cost what it saves.
const KERNEL_CHUNK: u64 = 64 << 20;

/// How far above its limit guest RAM may get before faults wait for the swapper, and for how
/// long at most.
const THROTTLE_SLACK: u64 = 16 << 20;
const THROTTLE_WAIT: Duration = Duration::from_millis(200);

impl FaultHandler {
    /// A handler for `ram`, registered with `uffd`. Each fault fills the aligned `window` of
    /// frames around it; a vCPU whose faults keep landing where its last window ended (a
    /// sequential first touch) gets windows twice as large each time, up to `max_window`.
    pub fn new(
        uffd: Arc<Uffd>,
        zero: Arc<ZeroSource>,
        ram: Arc<GuestRam>,
        states: Arc<PageStates>,
        window: u64,
        max_window: u64,
        stats: Arc<FaultStats>,
    ) -> Self {
        assert!(window.is_power_of_two() && max_window >= window && max_window * PAGE_SIZE <= zero.size());
        let populate = Populate::Uffd { uffd: Arc::clone(&uffd), zero: Arc::clone(&zero) };
        FaultHandler {
            uffd,
            ram,
            states,
            populate,
            zero,
            window,
            max_window,
            streams: Mutex::new(HashMap::new()),
            scatter: Mutex::new(HashMap::new()),
            stats,
            swap: OnceLock::new(),
            kernel_allowed: AtomicBool::new(false),
        }
    }

    /// Lets first touches go over to kernel demand paging once faults are seen to be scattered
    /// (for a VM without swap, whose missing pages need nothing from the VMM but zeros). A
    /// userfaultfd round trip costs many times an in-kernel fault on a nested host (measured:
    /// 74 us against 4.6 us per page for 10% of 256 MiB at random), and scattered faults leave
    /// fault-around nothing to win. Sequential first touches keep the VMM's growing windows
    /// until then; after it every missing page is the kernel's, one page per touch (guest RAM
    /// has no transparent huge pages), and write-protect faults still come here. Nothing is
    /// handed over while swap is on: it must see the faults on swapped frames.
    pub fn allow_kernel_first_touch(&self) {
        self.kernel_allowed.store(true, Ordering::Relaxed);
    }

    /// After a scattered fault at `gfn`, hands the missing pages of its chunk of guest RAM (within
    /// its RAM range) over to the kernel, if that is allowed and not done yet.
    fn maybe_kernel_first_touch(&self, gfn: Gfn) -> Result<(), FaultError> {
        if !self.kernel_allowed.load(Ordering::Relaxed) || self.swap.get().is_some() {
            return Ok(());
        }
        let Some((first, end)) = self.states.range_of(gfn) else { return Ok(()) };
        let chunk = gfn.gpa().0 / KERNEL_CHUNK;
        let start = first.gpa().0.max(chunk * KERNEL_CHUNK);
        let stop = end.gpa().0.min((chunk + 1) * KERNEL_CHUNK);
        let Some(hva) =
            self.ram.host_addr(GuestAddress(start)).filter(|_| self.ram.is_ram(GuestAddress(start), stop - start))
        else {
            return Ok(());
        };
        {
            // Claimed here, so that no other handler thread hands it over too.
            let mut runs = lock(&self.stats.kernel_runs);
            if runs.iter().any(|&(g, n)| g <= gfn && gfn < g.plus(n)) {
                return Ok(());
            }
            runs.push((Gfn::containing(GuestAddress(start)), (stop - start) / PAGE_SIZE));
        }
        let t = Instant::now();
        // SAFETY: the range is guest RAM (one mapping, checked above), registered with this
        // uffd at start and living as long as `self.ram`.
        unsafe { self.uffd.stop_missing_faults(&[(hva as u64, stop - start)]) }.map_err(FaultError::Uffd)?;
        log::debug!("first touches of {:#x}..{stop:#x} are the kernel's now (handed over in {:?})", start, t.elapsed());
        Ok(())
    }

    /// Serves swapped frames from `swap` from now on.
    pub fn set_swap(&self, swap: Arc<SwapStore>) {
        let _ = self.swap.set(swap);
    }

    /// Starts `threads` handler threads, each running `init` first. The first error any of
    /// them hits (or a panic) goes to `on_error`, and that thread stops.
    pub fn spawn(
        self: Arc<Self>,
        threads: usize,
        init: ThreadInit,
        on_error: Arc<dyn Fn(FaultError) + Send + Sync>,
    ) -> std::io::Result<()> {
        for i in 0..threads {
            let h = Arc::clone(&self);
            let report = Arc::clone(&on_error);
            let init = Arc::clone(&init);
            std::thread::Builder::new().name(format!("uffd{i}")).spawn(move || {
                let guard = PanicGuard(Arc::clone(&report));
                if let Err(e) = init().map_err(FaultError::ThreadSetup).and_then(|()| h.run()) {
                    report(e);
                }
                std::mem::forget(guard);
            })?;
        }
        Ok(())
    }

    /// Reads and serves messages until an error.
    pub fn run(&self) -> Result<(), FaultError> {
        let mut msgs = [UffdMsg::default(); 16];
        loop {
            let n = self.uffd.read_events(&mut msgs).map_err(FaultError::Uffd)?;
            for m in &msgs[..n] {
                if m.event == UFFD_EVENT_PAGEFAULT {
                    // The low half of the feature word is the faulting thread's id.
                    #[allow(clippy::cast_possible_truncation)]
                    self.serve_from(m.address, m.flags, m.ptid as u32)?;
                }
            }
        }
    }

    /// Serves one fault at host address `addr` (from an unknown thread).
    pub fn serve(&self, addr: u64, flags: u64) -> Result<(), FaultError> {
        self.serve_from(addr, flags, 0)
    }

    /// Serves one fault at host address `addr` taken by thread `tid`.
    pub fn serve_from(&self, addr: u64, flags: u64, tid: u32) -> Result<(), FaultError> {
        let start = Instant::now();
        let page = addr & !(PAGE_SIZE - 1);
        let gpa = self.ram.gpa_of(page).ok_or(FaultError::OutsideRam { addr })?;
        let gfn = Gfn::containing(gpa);
        if flags & UFFD_PAGEFAULT_FLAG_WP != 0 {
            // A write to a `Zero` frame's write-protected zero page: from now on the frame holds
            // what the guest writes (the kernel gives it a private page once the protection is
            // off). Otherwise a write during a translation invalidation.
            let written = self
                .populate
                .zero_written(&self.ram, &self.states, gfn)
                .map_err(|source| FaultError::Populate { gpa: gpa.0, source })?;
            if written {
                self.stats.zero_written.inc();
            } else {
                self.stats.write_protect.inc();
            }
            return self.uffd.writeprotect(page, PAGE_SIZE, false).map_err(FaultError::Uffd);
        }
        match self.states.get(gfn) {
            FrameState::Allocated => {
                let scattered = self.fill_window(gfn, tid)?;
                if self.states.get(gfn) != FrameState::Resident {
                    // Lost the race for the faulting frame itself; make sure its thread wakes.
                    self.wake(page)?;
                }
                self.stats.latency.record(u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX));
                self.throttle();
                if scattered { self.maybe_kernel_first_touch(gfn) } else { Ok(()) }
            }
            FrameState::Swapped => {
                let swap = self.swap.get().ok_or(FaultError::LostResident { gpa: gpa.0 })?;
                let ahead = if self.sequential(gfn, tid) { MAX_READAHEAD - 1 } else { 0 };
                if !swap.swap_in(gfn, ahead)? {
                    return self.serve_from(addr, flags, tid);
                }
                self.throttle();
                Ok(())
            }
            FrameState::SwappingOut => {
                // Never wait for the swapper here: it may itself be faulting on guest memory
                // that needs a handler (with every handler waiting, that was a deadlock). The
                // faulting thread stays asleep; the eviction's end wakes it, and it faults again.
                self.stats.deferred.inc();
                Ok(())
            }
            FrameState::Populating => {
                // Its populator wakes every waiter when the copy lands.
                self.stats.spurious.inc();
                self.wake(page)
            }
            FrameState::Resident => self.resident(gpa, page),
            FrameState::Zero if flags & UFFD_PAGEFAULT_FLAG_WRITE == 0 => {
                // A read of a known-zero frame (KVM walking an emptied page table, or a page
                // swap found all zero): the shared zero page costs no memory; it is mapped
                // write-protected, so the first write is seen.
                self.stats.zero_page.inc();
                self.populate
                    .map_zero(&self.ram, &self.states, gfn)
                    .map_err(|source| FaultError::Populate { gpa: gpa.0, source })?;
                self.wake(page)
            }
            FrameState::Zero => {
                if self.states.transition(gfn, FrameState::Zero, FrameState::Populating) {
                    self.populate
                        .unzero(&self.ram, &self.states, gfn)
                        .map_err(|source| FaultError::Populate { gpa: gpa.0, source })?;
                }
                self.wake(page)
            }
            st @ (FrameState::Free | FrameState::Ballooned) => self.unowned_frame(gfn, st, gpa, page),
        }
    }

    /// Whether `gfn` continues thread `tid`'s stream of faults (and notes where it goes next).
    fn sequential(&self, gfn: Gfn, tid: u32) -> bool {
        if tid == 0 {
            return false;
        }
        let mut streams = lock(&self.streams);
        let seq = streams.get(&tid).is_some_and(|&(next, _)| next == gfn);
        streams.insert(tid, (gfn.plus(if seq { MAX_READAHEAD as u64 } else { 1 }), 1));
        seq
    }

    /// Whether thread `tid`'s faults are scattered: far from each other (more than a few windows
    /// apart) four times in a row, and not near again twice since (a fault continuing a stream,
    /// `seq`, is near). Notes this fault either way.
    fn scattered(&self, gfn: Gfn, tid: u32, seq: bool) -> bool {
        if tid == 0 {
            return false;
        }
        let mut scatter = lock(&self.scatter);
        if scatter.len() > 1024 {
            scatter.clear();
        }
        let (last, far) = scatter.get(&tid).copied().unwrap_or((Gfn(u64::MAX / 2), 0));
        let near = seq || gfn.0.abs_diff(last.0) < SCATTER_DISTANCE * self.window;
        // Hysteresis: a far fault adds one, a near one takes two away, so that a chance near
        // fault among random ones does not end the one-page windows, while a run of near
        // faults (locality again) does at once.
        let far = if near { far.saturating_sub(2) } else { far.saturating_add(1).min(2 * SCATTER_AFTER) };
        scatter.insert(tid, (gfn, far));
        far >= SCATTER_AFTER
    }

    /// With swap on, lets the swapper catch up when guest RAM is well above its limit.
    fn throttle(&self) {
        if let Some(s) = self.swap.get() {
            s.throttle(THROTTLE_SLACK, THROTTLE_WAIT);
        }
    }

    /// Zero-fills the `Allocated` frames of the window for a fault at `gfn` by thread `tid`
    /// (inside its RAM range): the aligned base window, or, when the thread's faults are
    /// sequential, a doubled window starting at `gfn`. Returns whether the thread's faults are
    /// scattered.
    fn fill_window(&self, gfn: Gfn, tid: u32) -> Result<bool, FaultError> {
        let (first, end) = self.states.range_of(gfn).ok_or(FaultError::OutsideRam { addr: gfn.gpa().0 })?;
        // Over the swap limit, windows do not grow: memory the guest may not touch is what
        // the swapper would have to evict next.
        let max_window =
            if self.swap.get().is_some_and(|s| s.usage() > s.limit()) { self.window } else { self.max_window };
        let (start, stop, scattered) = {
            let mut streams = lock(&self.streams);
            let (next, last) = streams.get(&tid).copied().unwrap_or((Gfn(u64::MAX), 0));
            let seq = tid != 0 && gfn == next && max_window > self.window;
            let scattered = self.scattered(gfn, tid, seq);
            let (start, stop) = if seq {
                let w = (last * 2).min(max_window);
                self.stats.sequential.inc();
                (gfn, Gfn(gfn.0 + w))
            } else if scattered {
                // Random access: the faulting frame only.
                self.stats.scattered.inc();
                (gfn, gfn.plus(1))
            } else {
                (Gfn(gfn.0 & !(self.window - 1)), Gfn((gfn.0 | (self.window - 1)) + 1))
            };
            let (start, stop) = (start.max(first), stop.min(end));
            if tid != 0 {
                if streams.len() > 1024 {
                    streams.clear();
                }
                streams.insert(tid, (stop, stop.0 - start.0));
            }
            (start, stop, scattered && !seq)
        };
        let node = self.states.node(gfn);
        // Counted before the first copy: the copy wakes the vCPU, which may read the stats at once.
        let count = |n: u64| {
            self.stats.zero_fill.inc();
            self.stats.pages.add(n);
            if let Some(node) = node {
                self.stats.faulted_per_node[node].add(n);
            }
        };
        self.populate
            .claim_and_fill_counted(&self.ram, &self.states, start, stop.0 - start.0, count)
            .map_err(|source| FaultError::Populate { gpa: gfn.gpa().0, source })?;
        Ok(scattered)
    }

    /// A fault on a frame the guest does not own (free, or taken by the balloon): install and
    /// drop a zero page so KVM retries its walk, or stop the VM if the frame was never handed
    /// out.
    fn unowned_frame(&self, gfn: Gfn, state: FrameState, gpa: GuestAddress, page: u64) -> Result<(), FaultError> {
        if !self.states.ever_handed_out(gfn) {
            return Err(FaultError::NeverHandedOut { gpa: gpa.0 });
        }
        self.stats.free_frame.inc();
        // Claim it so the allocator cannot hand it out while the zero page is in place
        // (`PageStates::set_range` waits out `Populating`).
        if !self.states.transition(gfn, state, FrameState::Populating) {
            // Allocated in the meantime: serve it normally.
            return self.serve(page, 0);
        }
        let res = self
            .populate
            .fill(&self.ram, gfn, 1)
            .map(|_| ())
            .map_err(|source| FaultError::Populate { gpa: gpa.0, source })
            .and_then(|()| {
                self.ram.discard(gpa, PAGE_SIZE).map_err(|source| FaultError::Discard { gpa: gpa.0, source })
            });
        self.states.transition(gfn, FrameState::Populating, state);
        res
    }

    /// A fault on a frame the map says is resident: normally a message that raced with the
    /// copy that installed it. If the page really is missing, the VMM lost guest data: stop.
    fn resident(&self, gpa: GuestAddress, page: u64) -> Result<(), FaultError> {
        // SAFETY: the zero buffer is valid for a page of reads; `page` is guest RAM registered
        // with this uffd. The copy only succeeds if the page is missing.
        match unsafe { self.uffd.copy(page, self.zero.ptr(), PAGE_SIZE, true) } {
            Ok(_) => Err(FaultError::LostResident { gpa: gpa.0 }),
            Err(UffdError::Exists { .. }) | Err(UffdError::Again { .. }) => {
                self.stats.spurious.inc();
                self.wake(page)
            }
            Err(e) => Err(FaultError::Uffd(e)),
        }
    }

    fn wake(&self, page: u64) -> Result<(), FaultError> {
        match self.uffd.wake(page, PAGE_SIZE) {
            Ok(()) | Err(UffdError::Gone) => Ok(()),
            Err(e) => Err(FaultError::Uffd(e)),
        }
    }
}

/// Reports a panicking handler thread.
struct PanicGuard(Arc<dyn Fn(FaultError) + Send + Sync>);

impl Drop for PanicGuard {
    fn drop(&mut self) {
        (self.0)(FaultError::Panicked);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::ram_ranges;
    use std::sync::mpsc;
    use std::time::Duration;

    /// Real guest RAM registered with a real userfaultfd, served by real handler threads; the
    /// "vCPU" is a plain thread touching the memory.
    /// Guest RAM, its page states, its userfaultfd, the handler's counters, and the handler.
    type Setup = (Arc<GuestRam>, Arc<PageStates>, Arc<Uffd>, Arc<FaultStats>, Arc<FaultHandler>);

    /// 8 MiB of guest RAM (2048 frames, all free) registered with a userfaultfd, and a handler
    /// for it with 16-frame windows (not started).
    fn handler() -> Setup {
        let ranges = ram_ranges(&[8 << 20]).unwrap();
        let ram = Arc::new(GuestRam::new(&ranges, &[None]).unwrap());
        let states = Arc::new(PageStates::new(Gfn(2048), vec![(Gfn(0), Gfn(2048), 0)], 1).unwrap());
        let uffd = Arc::new(Uffd::new().unwrap());
        for (hva, len, _) in ram.host_ranges() {
            // SAFETY: the mapping lives in `ram` until the end of the test process.
            unsafe { uffd.register(hva, len, true) }.unwrap();
        }
        let zero = Arc::new(ZeroSource::new().unwrap());
        let stats = Arc::new(FaultStats::new(1));
        let h = Arc::new(FaultHandler::new(
            Arc::clone(&uffd),
            zero,
            Arc::clone(&ram),
            Arc::clone(&states),
            16,
            16,
            Arc::clone(&stats),
        ));
        (ram, states, uffd, stats, h)
    }

    #[test]
    fn serves_allocated_and_freed_frames_and_stops_on_a_frame_never_handed_out() {
        let (ram, states, _, stats, h) = handler();
        let (tx, rx) = mpsc::channel();
        let tx = Mutex::new(tx);
        h.spawn(
            1,
            Arc::new(|| Ok(())),
            Arc::new(move |e| {
                let _ = lock(&tx).send(e);
            }),
        )
        .unwrap();

        // An allocated frame reads as zero, and its window is installed with it.
        states.set_range(Gfn(100), 40, FrameState::Allocated);
        let base = ram.host_addr(GuestAddress(0)).unwrap() as usize;
        let v = {
            let p = base + 100 * 4096 + 8;
            std::thread::spawn(move || {
                // SAFETY: inside the 8 MiB guest RAM mapping, kept alive by `ram`.
                unsafe { std::ptr::read_volatile(p as *const u64) }
            })
            .join()
            .unwrap()
        };
        assert_eq!(v, 0);
        assert_eq!(stats.zero_fill.get(), 1);
        // The aligned 16-frame window [96, 112) minus the four free frames before frame 100.
        assert_eq!(stats.pages.get(), 12);
        // The copy wakes the toucher before the handler marks the frames resident.
        let settled = std::time::Instant::now();
        while states.census(Gfn(96), 16)[FrameState::Populating as usize] > 0 {
            assert!(settled.elapsed() < Duration::from_secs(5), "frames stay Populating");
            std::thread::yield_now();
        }
        assert_eq!(states.census(Gfn(96), 16), [4, 0, 0, 12, 0, 0, 0, 0]);

        // A frame handed out and freed again while a "vCPU" still touches it: served (it reads
        // zero), however often it comes back, and nothing stops.
        states.set_range(Gfn(500), 1, FrameState::Allocated);
        states.set_range(Gfn(500), 1, FrameState::Free);
        for _ in 0..20 {
            let p = base + 500 * 4096;
            let v = std::thread::spawn(move || {
                // SAFETY: inside the 8 MiB guest RAM mapping, kept alive by `ram`.
                unsafe { std::ptr::read_volatile(p as *const u64) }
            })
            .join()
            .unwrap();
            assert_eq!(v, 0);
            // The handler drops the page after the toucher got it; wait for that, so that the
            // next touch faults again (a touch before the drop would find the page).
            let settled = std::time::Instant::now();
            while states.get(Gfn(500)) == FrameState::Populating {
                assert!(settled.elapsed() < Duration::from_secs(5), "the frame stays claimed");
                std::thread::yield_now();
            }
        }
        assert!(stats.free_frame.get() >= 20);
        assert!(rx.try_recv().is_err(), "a race with a free stops nothing");
        assert_eq!(states.get(Gfn(500)), FrameState::Free, "nothing stays installed");

        // A frame nobody was ever given: the handler reports the guest-physical address at the
        // first fault instead of hanging.
        let p = base + 1000 * 4096;
        std::thread::spawn(move || {
            // Like a vCPU whose translation points there, keep touching it.
            loop {
                // SAFETY: inside the guest RAM mapping; this thread stays blocked once the
                // handler stops, and the test process exits around it.
                unsafe { std::ptr::read_volatile(p as *const u64) };
            }
        });
        let err = rx.recv_timeout(Duration::from_secs(10)).expect("the handler reports instead of hanging");
        assert!(matches!(err, FaultError::NeverHandedOut { gpa } if gpa == 1000 * 4096), "{err}");
        assert!(err.is_guest_error());
        assert_eq!(states.get(Gfn(1000)), FrameState::Free, "nothing stays installed");
        // The touching thread stays blocked on the fault: keep its memory mapped until the
        // process exits.
        std::mem::forget(ram);
    }

    /// Scattered faults hand the chunk's missing pages over to the kernel: later first touches
    /// there take no message, read zero, and write-protection still works on the range.
    #[test]
    fn scattered_faults_hand_first_touches_over_to_the_kernel() {
        let (ram, states, uffd, stats, h) = handler();
        h.allow_kernel_first_touch();
        h.spawn(1, Arc::new(|| Ok(())), Arc::new(|e| panic!("handler failed: {e}"))).unwrap();
        states.set_range(Gfn(0), 2048, FrameState::Allocated);
        let base = ram.host_addr(GuestAddress(0)).unwrap() as u64;
        // One "vCPU" (one thread id) touching a page every 200 frames: far apart each time.
        let touch = move |frames: Vec<u64>| {
            std::thread::spawn(move || {
                for f in frames {
                    let p = base + f * 4096 + 16;
                    // SAFETY: inside the 8 MiB guest RAM mapping, kept alive by `ram`.
                    unsafe { std::ptr::write_volatile(p as *mut u64, f) };
                }
            })
            .join()
            .unwrap();
        };
        touch((0..8).map(|k| k * 200).collect());
        assert!(stats.scattered.get() >= 1, "the faults were seen to be scattered");
        assert_eq!(stats.kernel_first_touch_bytes(), 8 << 20, "the whole 8 MiB (less than a chunk) went over");
        assert_eq!(*lock(&stats.kernel_runs), vec![(Gfn(0), 2048)]);
        let faults = stats.zero_fill.get();
        // From now on the kernel backs first touches: no message, no frame installed by us.
        touch(vec![1700, 1900, 2047]);
        assert_eq!(stats.zero_fill.get(), faults);
        for f in [1700u64, 1900, 2047, 1400] {
            // SAFETY: inside the mapping; every page of it is readable now.
            let v = unsafe { std::ptr::read_volatile((base + f * 4096 + 16) as *const u64) };
            assert_eq!(v, f);
        }
        // Untouched pages read zero; write-protection still works on the range.
        // SAFETY: as above.
        assert_eq!(unsafe { std::ptr::read_volatile((base + 1234 * 4096) as *const u64) }, 0);
        uffd.writeprotect(base + 1700 * 4096, 4096, true).unwrap();
        uffd.writeprotect(base + 1700 * 4096, 4096, false).unwrap();
        std::mem::forget(ram);
    }
}
