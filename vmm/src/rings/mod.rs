//! The slab rings: each vCPU's per-class alloc and free rings (`protocol::slab`), serviced
//! without an exit by a VMM thread while the guest runs, and synchronously by SLAB_EXCHANGE
//! when the guest finds an alloc ring empty or a free ring full.
//!
//! The VMM owns the producer index of every alloc ring and the consumer index of every free
//! ring; it keeps them here and only ever *writes* them to guest memory. The guest's indices
//! are read once per exchange and checked against ours: a ring that claims to hold more than
//! [`RING`] entries is refused (`ring_errors`). Every freed pointer is copied out once and
//! validated by the slab layer, as before. All changes happen under the memory manager's lock,
//! which both paths hold; the service thread only peeks at indices without it.
//!
//! The service learns which rings want it from each vCPU's doorbell (`protocol::slab`): a word
//! the guest sets a class's bit in as a ring runs low or fills, which the service takes with one
//! swap. It reads the rings' indices themselves only every [`SCAN_EVERY`] (and when it goes
//! idle), for anything a doorbell did not say: polling the indices, which the guest writes on
//! every allocation and free, made each of those writes a cache miss (larson, 1 vCPU: 4-15M
//! operations per second against 8-15M with the doorbells).
//!
//! The service thread polls while there is work: after a pass that moved objects it only yields
//! the CPU; it keeps polling (spinning) for [`SPIN_PERIOD`] after the last work: a sleep,
//! however short, costs more here than a guest takes to empty a ring. After that an empty pass
//! sleeps [`MIN_POLL`], then twice as long each time, up to [`MAX_POLL`]. It tells the guest it
//! runs (`Magazine::service`), so that a guest finding a ring empty waits a little for it
//! rather than exit. After [`IDLE_PERIOD`] without work it drains what the free rings hold and
//! sleeps until a SLAB_EXCHANGE exit wakes it, so an idle VM costs no CPU. While every host CPU
//! runs a vCPU it parks instead (until a vCPU goes to sleep in IDLE).
//!
//! How deep alloc rings are kept depends on the same: shallow ([`protocol::slab::shallow`])
//! while the service has a CPU and refills them as they fall to half, so that freed objects come
//! back warm; while it is parked and every ring that runs dry costs an exit, as deep as the
//! class allows ([`protocol::slab::target`]) for a vCPU that exits often, and shallower for one
//! that exits rarely at that depth (`Rings::pace`). A ring the guest runs dry while the service
//! has a CPU (bursts faster than it refills) grows, and shrinks back once it stays calm
//! (`Rings::serve`). The VMM keeps the depths itself and tells the guest in `Magazine::depth`.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryError, GuestMemoryMmap};

use protocol::slab::{
    CLASSES, DOORBELL_OFFSET, Doorbell, MAG_ALLOC_TAIL, MAG_DEPTH, MAG_FREE_HEAD, MAG_SERVICE, MAGAZINES_OFFSET,
    Magazine, NR_CLASSES, RING, SERVICE_WAIT_US, shallow, target,
};

use crate::memory::{MemoryError, MemoryManager};
use crate::metrics::Counter;
use crate::sync::lock;

mod magazine;

use magazine::{ClassRing, CpuRings, HostPtr, exchange, load, store, take_doorbell};
pub use magazine::{Exchanged, status_of};

/// How long the service keeps polling without sleeping after its last work, when it has a CPU
/// of its own.
pub const SPIN_PERIOD: Duration = Duration::from_millis(2);
/// Cached empty slabs unused this long go back to the buddy allocator (checked every
/// [`PURGE_EVERY`] while the service runs).
pub const PURGE_AFTER: Duration = Duration::from_millis(200);
/// How often the service looks for empty slabs to give back.
pub const PURGE_EVERY: Duration = Duration::from_millis(50);
/// Shortest sleep between two passes (right after one that moved objects).
pub const MIN_POLL: Duration = Duration::from_micros(20);
/// Longest sleep between two passes while the service is awake.
pub const MAX_POLL: Duration = Duration::from_millis(1);
/// Time without work after which the service sleeps until an exit wakes it.
pub const IDLE_PERIOD: Duration = Duration::from_millis(100);
/// How often the service looks at every ring's indices, for what the guest's doorbells did not
/// say (between two looks it reads only the doorbells).
pub const SCAN_EVERY: Duration = Duration::from_millis(1);
/// How long a sleeping service waits before looking whether the VM is stopping.
const SLEEP_CHECK: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum RingError {
    #[error("cannot access the magazine at {gpa:#x}")]
    Access {
        gpa: u64,
        #[source]
        source: GuestMemoryError,
    },
    #[error(transparent)]
    Memory(#[from] MemoryError),
}

/// Ring counters.
#[derive(Debug, Default)]
pub struct RingCounters {
    /// Service passes, and those that moved objects.
    pub passes: Counter,
    pub busy_passes: Counter,
    /// Exchanges done by the service thread (no exit) and by SLAB_EXCHANGE (an exit).
    pub serviced: Counter,
    pub synchronous: Counter,
    /// Other rings of the same vCPU a SLAB_EXCHANGE served while it was at it.
    pub piggybacked: Counter,
    /// Rings the service found due by their doorbell, and by a scan of the indices alone (what
    /// the doorbells did not say).
    pub rung: Counter,
    pub scanned: Counter,
    /// Objects put in alloc rings and taken from free rings (good frees only).
    pub objects_out: Counter,
    pub objects_in: Counter,
    /// Bad frees found in free rings.
    pub bad_frees: Counter,
    /// Rings refused because the guest's index claimed more than a ring holds.
    pub ring_errors: Counter,
    /// Times the service went to sleep after its idle period, and was woken by an exit.
    pub sleeps: Counter,
    /// Times the service parked because every host CPU ran a vCPU.
    pub parks: Counter,
    pub wakeups: Counter,
    /// Times a ring's depth grew (it ran dry) or shrank back (it stayed calm), and times a
    /// vCPU's rings got deeper or shallower for its exit rate while the service was parked.
    pub depth_changes: Counter,
}

/// Serializable snapshot of [`RingCounters`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct RingReport {
    pub service: bool,
    pub passes: u64,
    pub busy_passes: u64,
    pub serviced: u64,
    pub synchronous: u64,
    pub piggybacked: u64,
    pub rung: u64,
    pub scanned: u64,
    pub objects_out: u64,
    pub objects_in: u64,
    pub bad_frees: u64,
    pub ring_errors: u64,
    pub sleeps: u64,
    pub parks: u64,
    pub wakeups: u64,
    pub depth_changes: u64,
}

/// Refills in a row that found a ring not run dry, after which its depth halves (to
/// [`shallow`] at least).
const CALM_REFILLS: u32 = 1024;

/// While the service is parked: the window each vCPU's exits are counted in, the rates (exits
/// a second) above and below which its alloc rings get deeper and shallower (see
/// `Rings::pace`), the halvings of the class's target they start at, and the most they get
/// (2048 to 1024 at first, down to 256, for small classes). `EXITS_HIGH` is over twice
/// `EXITS_LOW`, so that halving the depth (about twice the exits) does not undo itself.
pub const PACE_WINDOW: Duration = Duration::from_millis(20);
pub const EXITS_HIGH: u64 = 1200;
pub const EXITS_LOW: u64 = 400;
const FIRST_PARKED_SHIFT: u32 = 1;
const MAX_PARKED_SHIFT: u32 = 3;

/// Every vCPU's rings, and the service thread's wake-up.
#[derive(Debug)]
pub struct Rings {
    cpus: Vec<CpuRings>,
    /// When the rings were made (the vCPUs' exit windows count from it).
    epoch: Instant,
    /// Whether a service thread runs (`--memory rings=on`).
    service: bool,
    /// Host CPUs: the service has one of its own while fewer vCPUs than this are running.
    host_cpus: usize,
    asleep: AtomicBool,
    /// Whether no host CPU is free for the service, so that alloc rings are kept at the depth
    /// each vCPU's exit rate sets (`Rings::pace`, up to [`target`]) rather than each ring's
    /// own (from [`shallow`]); the guest learns the depths from `Magazine::depth`.
    deep: AtomicBool,
    /// Asleep because no host CPU is free for the service (only [`unpark`](Self::unpark) wakes
    /// it early).
    parked: AtomicBool,
    poked: Mutex<bool>,
    wake: Condvar,
    pub counters: RingCounters,
}

const _: () = assert!(NR_CLASSES <= 32);

impl Rings {
    /// Rings for vCPUs given as `(id, node, guest-physical address of its CPU page)`, whose
    /// magazines lie in `mem`.
    pub fn new(
        mem: &GuestMemoryMmap,
        cpus: impl IntoIterator<Item = (u32, u32, u64)>,
        service: bool,
    ) -> Result<Rings, RingError> {
        let cpus: Vec<CpuRings> = cpus
            .into_iter()
            .map(|(id, node, page)| {
                let mags = page + MAGAZINES_OFFSET;
                let slice = mem
                    .get_slice(GuestAddress(mags), NR_CLASSES * size_of::<Magazine>())
                    .map_err(|source| RingError::Access { gpa: mags, source })?;
                let gpa = page + DOORBELL_OFFSET;
                let bell = mem
                    .get_slice(GuestAddress(gpa), size_of::<Doorbell>())
                    .map_err(|source| RingError::Access { gpa, source })?;
                Ok(CpuRings {
                    id,
                    node,
                    host: HostPtr(slice.ptr_guard_mut().as_ptr()),
                    bell: HostPtr(bell.ptr_guard_mut().as_ptr()),
                    active: AtomicU32::new(0),
                    classes: (0..NR_CLASSES)
                        .map(|class| ClassRing {
                            alloc_head: AtomicU32::new(0),
                            free_tail: AtomicU32::new(0),
                            depth: AtomicU32::new(u32::try_from(shallow(CLASSES[class])).expect("at most RING")),
                            calm: AtomicU32::new(0),
                        })
                        .collect(),
                    parked_shift: AtomicU32::new(FIRST_PARKED_SHIFT),
                    window_exits: AtomicU32::new(0),
                    window_start: AtomicU64::new(0),
                })
            })
            .collect::<Result<_, RingError>>()?;
        let host_cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        // Nothing goes to the magazines yet: guest RAM has no fault handler. Until the service
        // announces itself, `Magazine::depth` reads 0.
        Ok(Rings {
            cpus,
            epoch: Instant::now(),
            service,
            host_cpus,
            asleep: AtomicBool::new(false),
            deep: AtomicBool::new(true),
            parked: AtomicBool::new(false),
            poked: Mutex::new(false),
            wake: Condvar::new(),
            counters: RingCounters::default(),
        })
    }

    /// How many objects the alloc ring of `class` on `c` is kept at now (see
    /// `Magazine::depth`).
    fn depth(&self, c: &CpuRings, class: usize) -> usize {
        if self.deep.load(Ordering::Relaxed) {
            let size = CLASSES[class];
            (target(size) >> c.parked_shift.load(Ordering::Relaxed)).max(shallow(size))
        } else {
            c.classes[class].depth.load(Ordering::Relaxed) as usize
        }
    }

    /// Exchanges the rings of `class` on `c` (refilling up to `want`, at most their depth), then
    /// adapts the depth to what the refill found (see [`ClassRing::depth`]) and tells the guest
    /// if it changed.
    fn serve(
        &self,
        mm: &mut MemoryManager,
        c: &CpuRings,
        class: usize,
        want: usize,
        sync: bool,
    ) -> Result<Exchanged, RingError> {
        let now = self.depth(c, class);
        let r = exchange(mm, c, class, want.min(now), sync)?;
        let counters = &self.counters;
        if r.refused {
            counters.ring_errors.inc();
        }
        counters.objects_out.add(r.out as u64);
        counters.objects_in.add(r.freed as u64);
        counters.bad_frees.add(r.bad as u64);
        if self.deep.load(Ordering::Relaxed) || r.refused || r.out == 0 {
            return Ok(r);
        }
        let (ring, size) = (&c.classes[class], CLASSES[class]);
        let next = if r.ran_dry {
            ring.calm.store(0, Ordering::Relaxed);
            (now * 2).min(target(size))
        } else if ring.calm.fetch_add(1, Ordering::Relaxed) + 1 >= CALM_REFILLS {
            ring.calm.store(0, Ordering::Relaxed);
            (now / 2).max(shallow(size))
        } else {
            now
        };
        if next != now {
            let next = u32::try_from(next).expect("at most RING");
            ring.depth.store(next, Ordering::Relaxed);
            store(c, class, MAG_DEPTH, next);
            counters.depth_changes.inc();
        }
        Ok(r)
    }

    fn cpu(&self, id: u32) -> Option<&CpuRings> {
        self.cpus.iter().find(|c| c.id == id)
    }

    /// SLAB_EXCHANGE from vCPU `cpu`: drains the free ring of `class` and refills its alloc
    /// ring up to `want` (at most the ring's depth); wakes the service thread if it sleeps.
    pub fn exchange_sync(
        &self,
        mm: &mut MemoryManager,
        cpu: u32,
        class: usize,
        want: usize,
    ) -> Result<Exchanged, RingError> {
        let Some(c) = self.cpu(cpu) else { return Ok(Exchanged { refused: true, ..Exchanged::default() }) };
        c.active.fetch_or(1 << class, Ordering::Relaxed);
        self.counters.synchronous.inc();
        let r = self.serve(mm, c, class, want, true)?;
        // The exit is paid for: serve this vCPU's other rings that are due as well, so that a
        // guest using many classes takes one exit where it would have taken one per class
        // (when no host CPU is left for the service, exits are how rings get served).
        for k in classes_in(self.due_classes(c, false) & !(1 << class)) {
            self.serve(mm, c, k, RING, false)?;
            self.counters.piggybacked.inc();
        }
        if self.deep.load(Ordering::Relaxed) {
            self.pace(c);
        }
        self.poke();
        Ok(r)
    }

    /// Counts an exit of `c` while the service is parked, and sets the depth of its alloc rings
    /// from how often it exits. Parked, a refill is what an exit buys, and the depth trades
    /// exits for warm, compact memory: the deeper the rings, the more objects are in flight
    /// (spread over more slab pages), and the longer a freed object waits before it is handed
    /// out again. ours/larson on 2 vCPUs ran 1.3-1.5x faster with rings at 1024 and 1.6x at 512
    /// than at 2048 (2-4x the exits), while C larson, larson-sized and xmalloc-test, which
    /// exit far more often, lost 15-35% below 2048. So rings start at half the class's target;
    /// a vCPU that exits more than [`EXITS_HIGH`] times a second (counted as soon as a
    /// [`PACE_WINDOW`] holds that many) gets them twice as deep, up to [`target`]; one that
    /// exits less than [`EXITS_LOW`] times a second over a whole window gets them half as deep,
    /// down to [`shallow`].
    fn pace(&self, c: &CpuRings) {
        let now = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX).max(1);
        let start = c.window_start.load(Ordering::Relaxed);
        if start == 0 {
            // The first exit opens the first window: the time before it (boot) says nothing.
            c.window_start.store(now, Ordering::Relaxed);
            return;
        }
        let exits = u64::from(c.window_exits.fetch_add(1, Ordering::Relaxed)) + 1;
        let span = now.saturating_sub(start);
        let window = u64::try_from(PACE_WINDOW.as_nanos()).unwrap_or(u64::MAX);
        let shift = c.parked_shift.load(Ordering::Relaxed);
        let next = if exits * 1_000_000_000 > EXITS_HIGH * window {
            shift.saturating_sub(1)
        } else if span < window {
            return;
        } else if exits * 1_000_000_000 < EXITS_LOW * span {
            (shift + 1).min(MAX_PARKED_SHIFT)
        } else {
            shift
        };
        c.window_start.store(now, Ordering::Relaxed);
        c.window_exits.store(0, Ordering::Relaxed);
        if next != shift {
            c.parked_shift.store(next, Ordering::Relaxed);
            self.tell_depths(c);
            self.counters.depth_changes.inc();
        }
    }

    /// Wakes the service thread if it sleeps for want of work (not if it is parked: an exit
    /// means the vCPUs are busy, and the service would only take a CPU from them).
    pub fn poke(&self) {
        if self.service && self.asleep.load(Ordering::Acquire) && !self.parked.load(Ordering::Acquire) {
            *lock(&self.poked) = true;
            self.wake.notify_one();
        }
    }

    /// Wakes the service thread if it is parked (a vCPU went to sleep: a host CPU may be free).
    pub fn unpark(&self) {
        if self.service && self.parked.load(Ordering::Acquire) {
            *lock(&self.poked) = true;
            self.wake.notify_one();
        }
    }

    /// Sleeps until poked or `SLEEP_CHECK` passes, or the VM stops; returns whether it was
    /// poked (and takes the poke).
    fn sleep(&self, stopping: &impl Fn() -> bool) -> bool {
        let mut poked = lock(&self.poked);
        if !*poked && !stopping() {
            poked = self.wake.wait_timeout(poked, SLEEP_CHECK).expect("the lock is never poisoned").0;
        }
        std::mem::take(&mut *poked)
    }

    /// The `(cpu, class)` rings that need the service now: those whose doorbell the guest
    /// rang, and with `scan` every ring whose indices say so: an alloc ring at or below half its
    /// depth, a free ring holding [`protocol::slab::drain_at`] entries (any, with `all`).
    /// Without the manager's lock.
    fn due(&self, scan: bool, all: bool) -> Vec<(usize, usize)> {
        let mut due = Vec::new();
        for (i, c) in self.cpus.iter().enumerate() {
            let mut mask = take_doorbell(c);
            c.active.fetch_or(mask, Ordering::Relaxed);
            self.counters.rung.add(u64::from(mask.count_ones()));
            if scan {
                let found = self.due_classes(c, all);
                self.counters.scanned.add(u64::from((found & !mask).count_ones()));
                mask |= found;
            }
            due.extend(classes_in(mask).map(|class| (i, class)));
        }
        due
    }

    /// One service pass: exchanges every ring that is due (`scan`: looking at every ring's
    /// indices, not only the doorbells), each under its own hold of the manager's lock (a
    /// vCPU's exit waits for one exchange at most). Returns the objects moved.
    pub fn pass(&self, mm: &Mutex<MemoryManager>, scan: bool, all: bool) -> Result<usize, RingError> {
        self.counters.passes.inc();
        let due = self.due(scan || all, all);
        if due.is_empty() {
            return Ok(0);
        }
        let mut moved = 0;
        for (i, class) in due {
            let mut mm = lock(mm);
            let r = self.serve(&mut mm, &self.cpus[i], class, RING, false)?;
            mm.flush()?;
            self.counters.serviced.inc();
            moved += r.out + r.freed + r.bad;
        }
        if moved > 0 {
            self.counters.busy_passes.inc();
        }
        Ok(moved)
    }

    /// How long a guest should wait for the service (`Magazine::service`) while `sleeping`
    /// vCPUs sleep in IDLE: [`SERVICE_WAIT_US`] when the host has a CPU for the service beside
    /// the running vCPUs, else 0 (a vCPU spinning for the service only helps if the service
    /// can run meanwhile).
    fn wait_us(&self, sleeping: usize) -> u32 {
        if self.cpus.len().saturating_sub(sleeping) < self.host_cpus { SERVICE_WAIT_US } else { 0 }
    }

    /// Tells the guest in every magazine how long to wait for the service (0: it does not run),
    /// and how deep its alloc rings are kept: the full [`target`] while no host CPU is free for
    /// the service (`deep`), else [`shallow`] (also while the service sleeps for want of work:
    /// the exit that wakes it refills no deeper than it would).
    pub(crate) fn announce(&self, wait: u32, deep: bool) {
        self.deep.store(deep, Ordering::Relaxed);
        for c in &self.cpus {
            for class in 0..NR_CLASSES {
                store(c, class, MAG_SERVICE, wait);
            }
            self.tell_depths(c);
        }
    }

    /// Writes the depth every alloc ring of `c` is kept at now into its magazine.
    fn tell_depths(&self, c: &CpuRings) {
        for class in 0..NR_CLASSES {
            store(c, class, MAG_DEPTH, u32::try_from(self.depth(c, class)).expect("at most RING"));
        }
    }

    /// The service thread's loop, until `stopping()`. While passes find work it only yields
    /// the CPU between them (a vCPU that wants it gets it); without work it sleeps, longer each
    /// time. `sleeping()` says how many vCPUs sleep in IDLE (they leave their host CPU free).
    pub fn run_service(
        &self,
        mm: &Mutex<MemoryManager>,
        stopping: impl Fn() -> bool,
        sleeping: impl Fn() -> usize,
    ) -> Result<(), RingError> {
        let mut poll = MIN_POLL;
        let mut last_work = Instant::now();
        let mut wait = self.wait_us(sleeping());
        self.announce(wait, wait == 0);
        let mut last_purge = Instant::now();
        let mut last_scan = Instant::now();
        while !stopping() {
            if last_purge.elapsed() >= PURGE_EVERY {
                last_purge = Instant::now();
                lock(mm).slab_purge(PURGE_AFTER)?;
            }
            let now = self.wait_us(sleeping());
            if now != wait {
                wait = now;
                self.announce(wait, wait == 0);
            }
            if wait == 0 {
                // Every host CPU runs a vCPU: a pass would only take one from a vCPU (larson,
                // 2 vCPUs on 2 CPUs, did no better with the service polling than without it).
                // Park until a vCPU sleeps; the vCPUs' own exits serve the rings meanwhile.
                self.counters.parks.inc();
                self.parked.store(true, Ordering::Release);
                self.asleep.store(true, Ordering::Release);
                while !stopping() && self.wait_us(sleeping()) == 0 {
                    let _ = self.sleep(&stopping);
                    lock(mm).slab_purge(PURGE_AFTER)?;
                }
                self.asleep.store(false, Ordering::Release);
                self.parked.store(false, Ordering::Release);
                poll = MIN_POLL;
                last_work = Instant::now();
                continue;
            }
            let scan = last_scan.elapsed() >= SCAN_EVERY;
            if scan {
                last_scan = Instant::now();
            }
            if self.pass(mm, scan, false)? > 0 {
                poll = MIN_POLL;
                last_work = Instant::now();
                std::thread::yield_now();
                continue;
            }
            // (Here the service has a CPU of its own: `wait > 0`.)
            let idle = last_work.elapsed();
            if idle < SPIN_PERIOD {
                for _ in 0..64 {
                    std::hint::spin_loop();
                }
                continue;
            }
            if idle < IDLE_PERIOD {
                std::thread::sleep(poll);
                poll = (poll * 2).min(MAX_POLL);
                continue;
            }
            // Idle: make every free visible, give back the slabs' caches (memory that stayed
            // free this long is not about to be reused), then sleep until an exit needs us.
            self.announce(0, false);
            self.pass(mm, true, true)?;
            lock(mm).slab_trim()?;
            self.counters.sleeps.inc();
            self.asleep.store(true, Ordering::Release);
            while !self.sleep(&stopping) && !stopping() {}
            self.asleep.store(false, Ordering::Release);
            wait = self.wait_us(sleeping());
            self.announce(wait, wait == 0);
            self.counters.wakeups.inc();
            poll = MIN_POLL;
            last_work = Instant::now();
        }
        Ok(())
    }

    pub fn report(&self) -> RingReport {
        let c = &self.counters;
        RingReport {
            service: self.service,
            passes: c.passes.get(),
            busy_passes: c.busy_passes.get(),
            serviced: c.serviced.get(),
            synchronous: c.synchronous.get(),
            piggybacked: c.piggybacked.get(),
            rung: c.rung.get(),
            scanned: c.scanned.get(),
            objects_out: c.objects_out.get(),
            objects_in: c.objects_in.get(),
            bad_frees: c.bad_frees.get(),
            ring_errors: c.ring_errors.get(),
            sleeps: c.sleeps.get(),
            parks: c.parks.get(),
            wakeups: c.wakeups.get(),
            depth_changes: c.depth_changes.get(),
        }
    }

    /// Whether a service thread is configured.
    pub fn has_service(&self) -> bool {
        self.service
    }

    /// The classes (a bit each) whose rings on `c` need the service: an alloc ring at or below half
    /// its depth, a free ring holding [`protocol::slab::drain_at`] entries (any, with `all`).
    /// Reads only indices.
    fn due_classes(&self, c: &CpuRings, all: bool) -> u32 {
        let mut due = 0;
        for class in classes_in(c.active.load(Ordering::Relaxed)) {
            let ring = &c.classes[class];
            let (tail, head) = (load(c, class, MAG_ALLOC_TAIL), load(c, class, MAG_FREE_HEAD));
            let level = ring.alloc_head.load(Ordering::Relaxed).wrapping_sub(tail) as usize;
            let pending = head.wrapping_sub(ring.free_tail.load(Ordering::Relaxed));
            let low = level <= RING && level * 2 <= self.depth(c, class);
            let full = pending as usize <= RING
                && (pending >= protocol::slab::drain_at(CLASSES[class]) || (all && pending > 0));
            if low || full {
                due |= 1 << class;
            }
        }
        due
    }
}

/// The classes whose bits are set in `mask`, lowest first.
fn classes_in(mut mask: u32) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        let class = (mask != 0).then(|| mask.trailing_zeros() as usize)?;
        mask &= mask - 1;
        Some(class)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::ram_ranges;
    use crate::memory::backing::ram::GuestRam;

    /// Parked, a vCPU's rings start at half depth, get shallower while it exits rarely (one
    /// halving per window, down to `shallow`), and deeper as soon as it exits often, and the
    /// guest is told each time.
    #[test]
    fn parked_rings_follow_the_vcpus_exit_rate() {
        let ram = GuestRam::new(&ram_ranges(&[4 << 20]).unwrap(), &[None]).unwrap();
        let rings = Rings::new(ram.mem(), [(0, 0, 0)], true).unwrap();
        rings.announce(0, true);
        let c = &rings.cpus[0];
        let depth = || load(c, 0, MAG_DEPTH) as usize;
        assert_eq!(depth(), RING >> FIRST_PARKED_SHIFT);
        rings.pace(c);
        // One exit per window: a few dozen a second.
        for halved in FIRST_PARKED_SHIFT + 1..=MAX_PARKED_SHIFT + 1 {
            std::thread::sleep(PACE_WINDOW + Duration::from_millis(5));
            rings.pace(c);
            assert_eq!(depth(), (RING >> halved.min(MAX_PARKED_SHIFT)).max(shallow(CLASSES[0])));
        }
        assert_eq!(depth(), shallow(CLASSES[0]));
        // More exits in a row than a window at EXITS_HIGH holds: twice as deep at once, each time.
        let burst = EXITS_HIGH * u64::try_from(PACE_WINDOW.as_millis()).unwrap() / 1000 + 1;
        for doubled in 1..=MAX_PARKED_SHIFT {
            for _ in 0..burst {
                rings.pace(c);
            }
            assert_eq!(depth(), shallow(CLASSES[0]) << doubled);
        }
        for _ in 0..10 * burst {
            rings.pace(c);
        }
        assert_eq!(depth(), RING);
        assert_eq!(rings.counters.depth_changes.get(), u64::from(2 * MAX_PARKED_SHIFT - FIRST_PARKED_SHIFT));
    }
}
