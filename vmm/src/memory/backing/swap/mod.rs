//! Host-side swap: where a guest frame's data goes when it leaves host memory, and how it comes
//! back, with the vCPUs running.
//!
//! - **Out.** Under the memory manager's lock (so no free or reallocation interleaves), a
//!   `Resident` frame is claimed (`SwappingOut`) and its page is *moved* out of guest RAM into a
//!   staging area with `UFFDIO_MOVE`: atomically, with no copy, and with KVM's translations
//!   dropped by the kernel's MMU notifier. From then on a guest touch faults to the fault
//!   handler, which waits until the eviction is over. Without the lock, [`SwapStore::commit`]
//!   then decides each staged page's fate: a page swapped in earlier and not written since
//!   (its leaf's dirty bit says so) still has its file slot and costs no I/O; an all-zero page
//!   becomes `Zero` (no I/O, no slot); a page that compresses to at most 3 KiB goes to the
//!   compressed pool; the rest is written to the file in batches of contiguous slots. A failed
//!   write puts the page back (`UFFDIO_COPY`): it stays resident and nothing is lost.
//! - **In.** A fault on a `Swapped` frame reads it back (pool or file) and installs it with one
//!   `UFFDIO_COPY` ([`SwapStore::swap_in`]); a file slot is kept while the page stays clean. A
//!   read error stops the VM with the guest-physical address: the guest never gets zeros in
//!   place of its data.
//! - **Gone.** A freed frame's copy is dropped with no I/O ([`SwapStore::forget`]); so is a
//!   kept copy once the VMM writes the page or changes its leaf ([`SwapStore::drop_clean`]).
//!
//! Where each frame's data is lives in one 32-bit word per frame (a sparse, lazily touched
//! array: 4 bytes per frame at most, only where frames were ever swapped), plus the file's slot
//! bitmap. The pool is the only inserter-side state shared with the fault handler; it and the
//! location words change under one lock.

pub mod file;
pub mod out;
pub mod pool;
mod swapin;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::memory::addr::{Gfn, PAGE_SIZE, to_usize};
use crate::memory::frames::page_state::{FrameState, PageStates};
use crate::memory::zeroed::ZeroedVec;
use crate::metrics::{Counter, Histogram, LatencySummary};
use crate::sync::lock;

use super::ram::GuestRam;
use super::uffd::{Uffd, UffdError};
use file::{SwapFile, SwapFileError};
use pool::Pool;

/// Pages one eviction batch stages (2 MiB).
pub const STAGE_PAGES: usize = 512;
/// Staging areas: a batch is written while the next one is staged.
pub const STAGING_AREAS: usize = 2;
/// Most pages a swap-in reads at once (the faulting page and its read-ahead).
pub const MAX_READAHEAD: usize = 16;
/// Most recent evictions remembered for refault detection.
const RECENT_MAX: u64 = 1 << 16;
/// How long the file rests after it was full or a write failed, before swap tries it again.
const FILE_RETRY: Duration = Duration::from_secs(2);

/// Location word: no copy, a file slot, or a pool handle (the low 30 bits).
const TAG_MASK: u32 = 3 << 30;
const TAG_FILE: u32 = 1 << 30;
const TAG_POOL: u32 = 2 << 30;
const VALUE_MASK: u32 = !TAG_MASK;

/// Where a frame's data is in swap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Loc {
    None,
    File(u32),
    Pool(u32),
}

impl Loc {
    fn decode(v: u32) -> Loc {
        match v & TAG_MASK {
            TAG_FILE => Loc::File(v & VALUE_MASK),
            TAG_POOL => Loc::Pool(v & VALUE_MASK),
            _ => Loc::None,
        }
    }

    fn encode(self) -> u32 {
        match self {
            Loc::None => 0,
            Loc::File(s) => TAG_FILE | (s & VALUE_MASK),
            Loc::Pool(h) => TAG_POOL | (h & VALUE_MASK),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SwapError {
    #[error("host-side swap needs UFFDIO_MOVE (Linux 6.8 or later)")]
    NoMove,
    #[error("cannot map the swap staging area")]
    Staging(#[source] std::io::Error),
    #[error(transparent)]
    File(#[from] SwapFileError),
    #[error("cannot read guest-physical page {gpa:#x} back from swap")]
    Read {
        gpa: u64,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("guest-physical page {gpa:#x} is swapped out but swap has no copy of it")]
    Lost { gpa: u64 },
    #[error("userfaultfd failed while swapping guest-physical page {gpa:#x}")]
    Uffd {
        gpa: u64,
        #[source]
        source: UffdError,
    },
    #[error("cannot drop the staging area's pages")]
    Discard(#[source] std::io::Error),
}

/// What swap did, readable while it runs.
#[derive(Debug, Default)]
pub struct SwapCounters {
    /// Pages that left host memory (to the pool, the file, as zero, or as a kept clean copy).
    pub pages_out: Counter,
    /// Pages read back in.
    pub pages_in: Counter,
    /// All-zero pages dropped without I/O.
    pub zero_pages: Counter,
    /// Clean pages whose kept file copy made I/O unnecessary.
    pub clean_drops: Counter,
    /// Pages stored in the pool, and written back from it to the file.
    pub pool_stores: Counter,
    pub pool_writebacks: Counter,
    /// Pages written to the file (evictions and pool writebacks).
    pub file_writes: Counter,
    /// Pages brought back in before the memory turned over once since they left (fewer
    /// evictions since theirs than the limit holds pages, or than the 64 Ki remembered): had
    /// they stayed, they would have been hits. Eviction mistakes, as Linux's workingset
    /// refaults.
    pub refaults: Counter,
    /// Of those, the ones brought in by read-ahead.
    pub readahead: Counter,
    /// Evictions refused for want of file space (the file system or file-max), and write errors.
    pub enospc: Counter,
    pub io_errors: Counter,
    /// Staged pages put back into guest RAM after a failed write.
    pub put_back: Counter,
    /// Frames the kernel would not move (busy); they stay resident.
    pub busy: Counter,
    /// Time fault handlers waited for the swapper to catch up (guest RAM well above the limit).
    pub throttled_us: Counter,
}

/// A snapshot of swap's figures (the stats JSON's `swap`, with the policy's).
#[derive(Clone, Debug, serde::Serialize)]
pub struct SwapStoreReport {
    pub limit_bytes: u64,
    /// Guest frames resident in host memory.
    pub resident_bytes: u64,
    pub pages_out: u64,
    pub pages_in: u64,
    pub zero_pages: u64,
    pub clean_drops: u64,
    /// Pages in the compressed pool, their compressed bytes, and the pool's host memory.
    pub compressed_pages: u64,
    pub compressed_bytes: u64,
    pub pool_bytes: u64,
    pub pool_capacity: u64,
    pub pool_stores: u64,
    pub pool_writebacks: u64,
    /// Pages in the file (including clean copies of resident pages), and its bytes in use.
    pub file_pages: u64,
    pub file_bytes: u64,
    pub file_max_bytes: u64,
    pub file_direct_io: bool,
    pub file_written_bytes: u64,
    pub file_read_bytes: u64,
    pub refaults: u64,
    pub readahead_pages: u64,
    pub enospc: u64,
    pub io_errors: u64,
    pub put_back: u64,
    pub busy: u64,
    pub throttled_us: u64,
    /// Whether the file can take no more (full, or the file system is).
    pub file_full: bool,
    /// Host memory of swap's own bookkeeping.
    pub metadata_bytes: u64,
    /// Swap-in latency, from the fault to the page installed: faults that read one page, and
    /// faults that read ahead (up to 16 pages).
    pub swap_in_latency: LatencySummary,
    pub swap_in_readahead_latency: LatencySummary,
    /// Parts of a swap-in: one read from the file, one `UFFDIO_COPY`.
    pub swap_in_read_latency: LatencySummary,
    pub swap_in_install_latency: LatencySummary,
}

/// The pool: what the evictor and the fault handlers share.
#[derive(Debug)]
struct Inner {
    pool: Pool,
}

/// A hasher for frame numbers: one multiply (the map sees one key per eviction and swap-in).
#[derive(Debug, Default)]
struct GfnHasher(u64);

impl std::hash::Hasher for GfnHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = (v ^ self.0).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// The latest evictions, by eviction number, for refault detection.
#[derive(Debug, Default)]
struct Recent {
    /// Evictions so far.
    count: u64,
    order: VecDeque<(Gfn, u64)>,
    at: HashMap<Gfn, u64, std::hash::BuildHasherDefault<GfnHasher>>,
}

impl Recent {
    fn evicted(&mut self, gfn: Gfn) {
        self.count += 1;
        while self.order.len() as u64 >= RECENT_MAX {
            if let Some((g, n)) = self.order.pop_front()
                && self.at.get(&g) == Some(&n)
            {
                self.at.remove(&g);
            }
        }
        self.order.push_back((gfn, self.count));
        self.at.insert(gfn, self.count);
    }

    /// Whether `gfn` coming back now, with room for `pages` resident pages, is a refault: fewer
    /// evictions happened since its own than there is room.
    fn back(&mut self, gfn: Gfn, pages: u64) -> bool {
        self.at.remove(&gfn).is_some_and(|n| self.count - n < pages)
    }
}

/// The staging area: where evicted pages wait while they are written. One evictor at a time
/// holds it ([`SwapStore::lock_staging`]).
#[derive(Debug)]
pub struct Staging {
    base: u64,
    /// Staged frames, in staging-slot order, and whether each was written since its last
    /// swap-in (its leaf's dirty bit).
    gfns: Vec<Gfn>,
    dirty: Vec<bool>,
}

// SAFETY: `base` is a mapping owned by the store for its whole life; the staging area is only
// used by whoever holds its mutex.
unsafe impl Send for Staging {}

impl Staging {
    /// Frames staged so far.
    pub fn gfns(&self) -> &[Gfn] {
        &self.gfns
    }

    /// Whether the staging area is full.
    pub fn is_full(&self) -> bool {
        self.gfns.len() >= STAGE_PAGES
    }

    /// Records whether staged frame `i` was written since its last swap-in.
    pub fn set_dirty(&mut self, i: usize, dirty: bool) {
        self.dirty[i] = dirty;
    }

    fn slot_addr(&self, i: usize) -> u64 {
        self.base + i as u64 * PAGE_SIZE
    }

    fn page(&self, i: usize) -> &[u8] {
        // SAFETY: slot i < STAGE_PAGES is inside the staging mapping; a staged slot holds a page
        // moved there by `stage` (present, so reading it does not fault), which nothing writes
        // while the staging lock is held.
        unsafe { std::slice::from_raw_parts(self.slot_addr(i) as *const u8, to_usize(PAGE_SIZE)) }
    }
}

/// What swap is made of.
#[derive(Clone, Copy, Debug)]
pub struct SwapSettings<'a> {
    /// Where the (unnamed) swap file lives, and the most it may hold.
    pub dir: &'a std::path::Path,
    pub file_max: u64,
    /// The compressed pool's size (0: no pool, no compression).
    pub pool: u64,
    /// Host memory guest RAM may use: resident frames plus the pool.
    pub limit: u64,
}

/// Swap's pages and where they are.
#[derive(Debug)]
pub struct SwapStore {
    states: Arc<PageStates>,
    ram: Arc<GuestRam>,
    uffd: Arc<Uffd>,
    locations: ZeroedVec<AtomicU32>,
    /// One bit per frame: it came back soon after its last eviction (a refault), so its next
    /// eviction goes to the pool.
    warm: ZeroedVec<AtomicU64>,
    /// One bit per frame: an eviction of it is staged and not yet ended. A frame the guest
    /// frees and gets back meanwhile is not staged again until then: otherwise the first
    /// eviction's ending would take the second claim for its own (and record the old copy).
    evicting: ZeroedVec<AtomicU64>,
    file: SwapFile,
    file_max: u64,
    inner: Mutex<Inner>,
    /// The latest evictions (for refault counts), apart from the pool: swap-ins from the file
    /// never wait for the pool's lock.
    recent: Mutex<Recent>,
    staging: [Mutex<Staging>; STAGING_AREAS],
    compress: bool,
    limit: AtomicU64,
    /// Until when the file takes no more pages (full, or failing writes): retried after that.
    file_blocked: Mutex<Option<Instant>>,
    /// Pages whose data is in the file (kept clean copies included).
    file_pages: AtomicU64,
    pub counters: SwapCounters,
    /// Swap-in latency: faults that read one page, and faults that read ahead.
    latency: Histogram,
    latency_readahead: Histogram,
    /// Its parts: one file read (of a run of slots), one `UFFDIO_COPY` of a page.
    latency_read: Histogram,
    latency_install: Histogram,
    /// Wakes the swapper: a generation count and its condition variable.
    kick: (Mutex<u64>, Condvar),
}

impl SwapStore {
    /// Swap for `ram`, whose frames' states are `states`, faulting through `uffd`, as `s` says.
    pub fn new(
        states: Arc<PageStates>,
        ram: Arc<GuestRam>,
        uffd: Arc<Uffd>,
        s: &SwapSettings<'_>,
    ) -> Result<SwapStore, SwapError> {
        if !uffd.can_move() {
            return Err(SwapError::NoMove);
        }
        let (file_max, pool, limit, compress) = (s.file_max, s.pool, s.limit, s.pool > 0);
        let file = SwapFile::create(s.dir, file_max)?;
        let frames = ram.ranges().iter().map(|r| r.end() / PAGE_SIZE).max().unwrap_or(0);
        let locations = ZeroedVec::try_new(to_usize(frames)).map_err(SwapError::Staging)?;
        let warm = ZeroedVec::try_new(to_usize(frames.div_ceil(64))).map_err(SwapError::Staging)?;
        let evicting = ZeroedVec::try_new(to_usize(frames.div_ceil(64))).map_err(SwapError::Staging)?;
        // Two staging areas, side by side: one batch is written while the next is staged.
        let len = STAGING_AREAS as u64 * STAGE_PAGES as u64 * PAGE_SIZE;
        // SAFETY: a fresh private anonymous mapping that the store owns until drop.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                to_usize(len),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(SwapError::Staging(std::io::Error::last_os_error()));
        }
        let base = base as u64;
        // SAFETY: the staging mapping is ours for the store's life; only the evictor touches
        // it, and only pages it moved there (present), so no fault there ever needs serving.
        unsafe { uffd.register(base, len, false) }.map_err(|source| SwapError::Uffd { gpa: 0, source })?;
        Ok(SwapStore {
            states,
            ram,
            uffd,
            locations,
            warm,
            evicting,
            file,
            file_max,
            inner: Mutex::new(Inner { pool: Pool::new(if compress { pool } else { 0 }) }),
            recent: Mutex::new(Recent::default()),
            staging: std::array::from_fn(|i| {
                Mutex::new(Staging {
                    base: base + i as u64 * STAGE_PAGES as u64 * PAGE_SIZE,
                    gfns: Vec::with_capacity(STAGE_PAGES),
                    dirty: Vec::with_capacity(STAGE_PAGES),
                })
            }),
            compress,
            limit: AtomicU64::new(limit),
            file_blocked: Mutex::new(None),
            file_pages: AtomicU64::new(0),
            counters: SwapCounters::default(),
            latency: Histogram::default(),
            latency_readahead: Histogram::default(),
            latency_read: Histogram::default(),
            latency_install: Histogram::default(),
            kick: (Mutex::new(0), Condvar::new()),
        })
    }

    // Limits and wake-ups.

    /// Host memory guest RAM may use.
    pub fn limit(&self) -> u64 {
        self.limit.load(Ordering::Relaxed)
    }

    /// Changes the limit (and the pool's share of it, `pool`), and wakes the swapper.
    pub fn set_limit(&self, limit: u64, pool: u64) {
        self.limit.store(limit, Ordering::Relaxed);
        if self.compress {
            lock(&self.inner).pool.set_capacity(pool);
        }
        // A larger limit may leave room for the file again.
        *lock(&self.file_blocked) = None;
        self.kick();
    }

    /// Host memory guest RAM uses now: resident frames and the pool.
    pub fn usage(&self) -> u64 {
        self.states.resident_total() * PAGE_SIZE + lock(&self.inner).pool.bytes()
    }

    /// Whether the file can take no more pages.
    pub fn file_full(&self) -> bool {
        lock(&self.file_blocked).is_some_and(|t| Instant::now() < t)
    }

    /// Stops writing to the file for [`FILE_RETRY`] (it is full, or writes fail).
    fn block_file(&self) {
        *lock(&self.file_blocked) = Some(Instant::now() + FILE_RETRY);
    }

    /// Wakes the swapper.
    pub fn kick(&self) {
        *lock(&self.kick.0) += 1;
        self.kick.1.notify_all();
    }

    /// Waits for a [`kick`](Self::kick) or `timeout`.
    pub fn wait_for_kick(&self, timeout: Duration) {
        let g = lock(&self.kick.0);
        let start = *g;
        let _ = self.kick.1.wait_timeout_while(g, timeout, |n| *n == start);
    }

    /// Called by the fault handler after it made memory resident: when guest RAM uses more
    /// than the limit plus `slack`, wake the swapper and wait while it catches up (giving up
    /// after `wait` without progress).
    pub fn throttle(&self, slack: u64, wait: Duration) {
        if self.usage() <= self.limit() + slack {
            return;
        }
        self.kick();
        let start = Instant::now();
        // Waits while the swapper makes progress; gives up after `wait` without any (everything
        // hot, the file full or failing), so a fault is slowed but never stuck.
        let (mut best, mut since) = (self.usage(), start);
        loop {
            let usage = self.usage();
            if usage <= self.limit() + slack || self.file_full() {
                break;
            }
            if usage < best {
                (best, since) = (usage, Instant::now());
            } else if since.elapsed() >= wait {
                break;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        self.counters.throttled_us.add(crate::metrics::micros(start.elapsed()));
    }

    /// Bytes the pool holds beyond its capacity (after the limit was lowered).
    pub fn pool_over_capacity(&self) -> u64 {
        lock(&self.inner).pool.over_capacity()
    }

    /// One past the last guest frame.
    pub fn frames_end(&self) -> Gfn {
        Gfn(self.locations.len() as u64)
    }

    /// The state of `gfn`.
    pub fn state(&self, gfn: Gfn) -> FrameState {
        self.states.get(gfn)
    }

    // Gone.

    /// Drops every swap copy of the frames in `runs`, which were just freed. No I/O.
    pub fn forget(&self, runs: &[(Gfn, u64)]) {
        let mut inner = lock(&self.inner);
        for &(g, n) in runs {
            for i in 0..n {
                self.release(&mut inner, g.plus(i));
                self.take_warm(g.plus(i));
            }
        }
    }

    /// Drops the kept clean copy of `Resident` frames in `runs`: the VMM is about to write
    /// them, or their leaf changed (its dirty bit may not tell the truth any more). The caller
    /// holds the memory manager's lock, so none of them is being evicted.
    pub fn drop_clean(&self, runs: &[(Gfn, u64)]) {
        let mut inner = None;
        for &(g, n) in runs {
            for i in 0..n {
                let gfn = g.plus(i);
                if self.location(gfn).load(Ordering::Acquire) == 0 || self.states.get(gfn) != FrameState::Resident {
                    continue;
                }
                self.release(inner.get_or_insert_with(|| lock(&self.inner)), gfn);
            }
        }
    }

    /// Takes `gfn`'s location and frees what it names.
    fn release(&self, inner: &mut Inner, gfn: Gfn) {
        let Some(word) = self.locations.get(to_usize(gfn.0)) else { return };
        match Loc::decode(word.swap(0, Ordering::AcqRel)) {
            Loc::None => {}
            Loc::File(s) => {
                self.file.free(s);
                self.file_pages.fetch_sub(1, Ordering::Relaxed);
            }
            Loc::Pool(h) => {
                let _ = inner.pool.remove(h);
            }
        }
    }

    /// Marks `gfn` warm (it refaulted).
    fn set_warm(&self, gfn: Gfn) {
        set_bit(&self.warm, gfn);
    }

    /// Whether `gfn` was warm (and is no longer).
    fn take_warm(&self, gfn: Gfn) -> bool {
        take_bit(&self.warm, gfn)
    }

    fn location(&self, gfn: Gfn) -> &AtomicU32 {
        &self.locations[to_usize(gfn.0)]
    }

    // Figures.

    /// A snapshot.
    pub fn report(&self) -> SwapStoreReport {
        let (pool, pool_meta) = {
            let inner = lock(&self.inner);
            (inner.pool.stats(), inner.pool.metadata_bytes())
        };
        let f = self.file.stats();
        let c = &self.counters;
        SwapStoreReport {
            limit_bytes: self.limit(),
            resident_bytes: self.states.resident_total() * PAGE_SIZE,
            pages_out: c.pages_out.get(),
            pages_in: c.pages_in.get(),
            zero_pages: c.zero_pages.get(),
            clean_drops: c.clean_drops.get(),
            compressed_pages: pool.entries,
            compressed_bytes: pool.stored_bytes,
            pool_bytes: pool.bytes,
            pool_capacity: pool.capacity,
            pool_stores: c.pool_stores.get(),
            pool_writebacks: c.pool_writebacks.get(),
            file_pages: self.file_pages.load(Ordering::Relaxed),
            file_bytes: f.slots_used * PAGE_SIZE,
            file_max_bytes: self.file_max,
            file_direct_io: self.file.direct(),
            file_written_bytes: f.bytes_written,
            file_read_bytes: f.bytes_read,
            refaults: c.refaults.get(),
            readahead_pages: c.readahead.get(),
            enospc: c.enospc.get(),
            io_errors: c.io_errors.get(),
            put_back: c.put_back.get(),
            busy: c.busy.get(),
            throttled_us: c.throttled_us.get(),
            file_full: self.file_full(),
            metadata_bytes: self.locations.resident_bytes()
                + self.warm.resident_bytes()
                + self.evicting.resident_bytes()
                + self.file.metadata_bytes()
                + pool_meta,
            swap_in_latency: self.latency.summary(),
            swap_in_readahead_latency: self.latency_readahead.summary(),
            swap_in_read_latency: self.latency_read.summary(),
            swap_in_install_latency: self.latency_install.summary(),
        }
    }

    /// Every `Swapped` frame has a copy, no free frame has one, file copies match the file's
    /// slot map, and the pool and file are consistent.
    pub fn check_invariants(&self) -> Result<(), String> {
        let inner = lock(&self.inner);
        inner.pool.check_invariants()?;
        self.file.check_invariants()?;
        let mut file_pages = 0;
        for &(first, end, _) in self.states.ranges() {
            for g in first.0..end.0 {
                let gfn = Gfn(g);
                let loc = Loc::decode(self.location(gfn).load(Ordering::Acquire));
                let st = self.states.get(gfn);
                match (st, loc) {
                    (FrameState::Swapped, Loc::None) => return Err(format!("frame {gfn} is swapped with no copy")),
                    (FrameState::Free | FrameState::Ballooned | FrameState::Allocated, l) if l != Loc::None => {
                        return Err(format!("frame {gfn} is {st:?} but keeps a swap copy {l:?}"));
                    }
                    _ => {}
                }
                match loc {
                    Loc::File(s) => {
                        file_pages += 1;
                        if !self.file.in_use(s) {
                            return Err(format!("frame {gfn}'s file slot {s} is free"));
                        }
                    }
                    Loc::Pool(h) if inner.pool.gfn_of(h) != Ok(g) => {
                        return Err(format!("frame {gfn}'s pool entry {h:#x} is not its"));
                    }
                    _ => {}
                }
            }
        }
        // (Called with the swapper stopped: no eviction is in flight.)
        if let Some(i) =
            (0..self.evicting.len()).find(|&i| self.evicting.get(i).is_some_and(|w| w.load(Ordering::Acquire) != 0))
        {
            return Err(format!("an eviction of a frame near {:#x} never ended", i as u64 * 64 * PAGE_SIZE));
        }
        if file_pages != self.file.stats().slots_used {
            return Err(format!(
                "{file_pages} frames have file copies, the file has {} slots",
                self.file.stats().slots_used
            ));
        }
        Ok(())
    }
}

impl Drop for SwapStore {
    fn drop(&mut self) {
        let base = lock(&self.staging[0]).base;
        // SAFETY: unmaps exactly the staging mapping made in `new`, which nothing uses now.
        unsafe {
            libc::munmap(base as *mut libc::c_void, to_usize(STAGING_AREAS as u64 * STAGE_PAGES as u64 * PAGE_SIZE))
        };
    }
}

/// Sets `gfn`'s bit in `bits`.
fn set_bit(bits: &ZeroedVec<AtomicU64>, gfn: Gfn) {
    let i = to_usize(gfn.0);
    if let Some(w) = bits.get(i / 64) {
        w.fetch_or(1 << (i % 64), Ordering::Relaxed);
    }
}

/// Whether `gfn`'s bit in `bits` is set.
fn test_bit(bits: &ZeroedVec<AtomicU64>, gfn: Gfn) -> bool {
    let i = to_usize(gfn.0);
    bits.get(i / 64).is_some_and(|w| w.load(Ordering::Acquire) & (1 << (i % 64)) != 0)
}

/// Clears `gfn`'s bit in `bits`; returns whether it was set.
fn take_bit(bits: &ZeroedVec<AtomicU64>, gfn: Gfn) -> bool {
    let i = to_usize(gfn.0);
    bits.get(i / 64).is_some_and(|w| w.fetch_and(!(1 << (i % 64)), Ordering::Relaxed) & (1 << (i % 64)) != 0)
}
