//! The swapper: one thread that keeps guest RAM's host memory under the swap limit, the way
//! kswapd keeps a zone above its watermarks, and carries out the API's swap requests.
//!
//! When resident guest frames plus the compressed pool pass the limit, it evicts batches (the
//! clock picks and stages them under the memory manager's lock; the store writes them out
//! without it) until usage is a little below the limit. If the clock finds nothing to evict in
//! two full turns, or the swap file is full and nothing moves, it stops trying for now and says
//! the limit is not met. Fault handlers that find guest RAM well above the limit wake it and
//! wait for it a little (see `backing::fault`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::config::{SwapConfig, check_swap_limit};
use crate::memory::addr::{Gfn, PAGE_SIZE};
use crate::memory::backing::swap::file::SwapFileError;
use crate::memory::backing::swap::out::Prepared;
use crate::memory::backing::swap::{MAX_READAHEAD, STAGE_PAGES, Staging, SwapError, SwapStore};
use crate::memory::frames::page_state::FrameState;
use crate::memory::{MemoryError, MemoryManager};
use crate::sync::{ThreadInit, lock};

/// How often the swapper looks at usage without being woken.
const PERIOD: Duration = Duration::from_millis(10);
/// How long the swapper leaves the limit alone after it could not meet it (unless the limit
/// changes).
const GIVE_UP_FOR: Duration = Duration::from_millis(500);
/// Frames a background swap-in looks at per step.
const SWAP_IN_STEP: u64 = 4096;
/// How long `stop` waits for the batches in flight (a write to a dying disk may never end).
const STOP_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum SwapperError {
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Swap(#[from] SwapError),
    #[error("the swapper thread panicked")]
    Panicked,
    #[error("the swap writer thread is gone")]
    WriterGone,
    #[error("cannot set up the swapper thread")]
    ThreadSetup(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl SwapperError {
    /// Whether swap could not read a page back (an I/O error on the swap file).
    pub fn is_read_error(&self) -> bool {
        matches!(self, SwapperError::Swap(SwapError::Read { .. }))
    }
}

/// Whoever holds the memory manager (the VM), as the swapper sees it.
pub trait MemoryLock: Send + Sync + 'static {
    /// The memory manager, locked.
    fn mm(&self) -> MutexGuard<'_, MemoryManager>;
}

/// Work the API asked for.
#[derive(Debug, Default)]
struct Requests {
    /// Sweeps asked for (`PUT /swap/out`: evict everything not touched since the hand last
    /// passed), and sweeps done.
    out: u64,
    out_done: u64,
    /// Bring everything back (`PUT /swap/in`): the next frame to look at, while under way.
    back_in: Option<Gfn>,
}

/// What the swapper is doing (the stats JSON's `swap.state`, `GET /swap`'s `state`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SwapState {
    /// Usage is within the limit.
    #[default]
    Within,
    /// Evicting to get under the limit.
    Reclaiming,
    /// Over the limit with nothing more it can evict now (all pages hot, or the file full).
    LimitNotMet,
    /// Bringing swapped pages back (`PUT /swap/in`).
    SwappingIn,
}

/// The swapper.
#[derive(Debug)]
pub struct Swapper {
    store: Arc<SwapStore>,
    config: Mutex<SwapConfig>,
    requests: Mutex<Requests>,
    state: Mutex<SwapState>,
    /// Times the swapper gave up on the limit for want of anything to evict, and until when it
    /// rests (with the limit it gave up on).
    not_met: AtomicU64,
    resting: Mutex<Option<(Instant, u64)>>,
    /// The writer thread's job queue and its answers, once it runs.
    writer: Mutex<Option<(SyncSender<WriteJob>, Receiver<WriteDone>)>>,
    stop: AtomicBool,
    /// Whether the swapper thread is not running (not started yet, or ended): `stop` waits for
    /// it, so that nothing is half-evicted when the final stats are taken.
    stopped: (Mutex<bool>, Condvar),
}

/// A batch for the writer thread: its staging area (locked by the swapper until the answer
/// comes back) and where its pages go.
struct WriteJob {
    staging: *const Staging,
    prepared: Prepared,
}

// SAFETY: the staging area behind the pointer stays locked by the swapper, which does not touch
// it, until the writer has answered; the writer only reads it.
unsafe impl Send for WriteJob {}

/// The writer's answer.
type WriteDone = (Prepared, Result<(), SwapFileError>);

/// A batch whose pages the writer is writing while the swapper stages the next one.
struct InFlight<'a> {
    area: usize,
    staging: MutexGuard<'a, Staging>,
}

/// The swapper's figures beside the store's.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SwapperReport {
    pub state: SwapState,
    /// Times the limit could not be met (nothing more to evict: all hot, or the file full).
    pub limit_not_met: u64,
    pub sweep_requested: bool,
    pub swap_in_requested: bool,
}

impl Swapper {
    pub fn new(store: Arc<SwapStore>, config: SwapConfig) -> Self {
        Swapper {
            store,
            config: Mutex::new(config),
            requests: Mutex::new(Requests::default()),
            state: Mutex::new(SwapState::Within),
            not_met: AtomicU64::new(0),
            resting: Mutex::new(None),
            writer: Mutex::new(None),
            stop: AtomicBool::new(false),
            stopped: (Mutex::new(true), Condvar::new()),
        }
    }

    /// The store.
    pub fn store(&self) -> &Arc<SwapStore> {
        &self.store
    }

    /// The configuration in force (with the current limit).
    pub fn config(&self) -> SwapConfig {
        lock(&self.config).clone()
    }

    /// Starts the thread, which runs `init` (its seccomp filter) first; its first error goes to
    /// `on_error`.
    pub fn spawn(
        self: Arc<Self>,
        shared: Arc<dyn MemoryLock>,
        init: ThreadInit,
        on_error: impl Fn(SwapperError) + Send + Sync + 'static,
    ) -> std::io::Result<()> {
        // The writer: writes one batch while the swapper stages the next (the disk and the CPU
        // work at once). It ends when the swapper drops its queue.
        let (jobs, queue) = sync_channel::<WriteJob>(1);
        let (answers, done) = sync_channel::<WriteDone>(1);
        *lock(&self.writer) = Some((jobs, done));
        let on_error = Arc::new(on_error);
        let (store, init_w, report) = (Arc::clone(&self.store), Arc::clone(&init), Arc::clone(&on_error));
        std::thread::Builder::new().name("swap-writer".into()).spawn(move || {
            if let Err(e) = init_w() {
                report(SwapperError::ThreadSetup(e));
                return;
            }
            while let Ok(job) = queue.recv() {
                // SAFETY: see `WriteJob`: the area is locked by the swapper and left alone until
                // this answer arrives.
                let staging = unsafe { &*job.staging };
                let res = store.write_prepared(staging, &job.prepared);
                if answers.send((job.prepared, res)).is_err() {
                    return;
                }
            }
        })?;
        *lock(&self.stopped.0) = false;
        let me = Arc::clone(&self);
        let spawned = std::thread::Builder::new().name("swapper".into()).spawn(move || {
            let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                init().map_err(SwapperError::ThreadSetup).and_then(|()| self.run(shared.as_ref()))
            }))
            .unwrap_or(Err(SwapperError::Panicked));
            *lock(&self.stopped.0) = true;
            self.stopped.1.notify_all();
            if let Err(e) = res {
                on_error(e);
            }
        });
        if let Err(e) = spawned {
            *lock(&me.stopped.0) = true;
            return Err(e);
        }
        Ok(())
    }

    /// Stops the thread and waits (at most [`STOP_WAIT`]) until it has ended its batches.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        self.store.kick();
        let g = lock(&self.stopped.0);
        let _ = self.stopped.1.wait_timeout_while(g, STOP_WAIT, |stopped| !*stopped);
    }

    /// `PATCH /swap`: a new limit (the pool keeps its share of it).
    pub fn set_limit(&self, limit: u64) -> Result<(), String> {
        check_swap_limit(limit)?;
        let pool = {
            let mut c = lock(&self.config);
            c.limit = limit;
            c.pool_for(limit)
        };
        self.store.set_limit(limit, pool);
        Ok(())
    }

    /// `PUT /swap/out`.
    pub fn request_out(&self) {
        lock(&self.requests).out += 1;
        self.store.kick();
    }

    /// `PUT /swap/in`.
    pub fn request_in(&self) {
        lock(&self.requests).back_in.get_or_insert(Gfn(0));
        self.store.kick();
    }

    pub fn report(&self) -> SwapperReport {
        let r = lock(&self.requests);
        SwapperReport {
            state: *lock(&self.state),
            limit_not_met: self.not_met.load(Ordering::Relaxed),
            sweep_requested: r.out > r.out_done,
            swap_in_requested: r.back_in.is_some(),
        }
    }

    fn set_state(&self, s: SwapState) {
        *lock(&self.state) = s;
    }

    fn run(&self, shared: &dyn MemoryLock) -> Result<(), SwapperError> {
        while !self.stop.load(Ordering::Acquire) {
            self.store.wait_for_kick(PERIOD);
            let asked = lock(&self.requests).out;
            if asked > lock(&self.requests).out_done {
                self.sweep(shared)?;
                lock(&self.requests).out_done = asked;
            }
            self.enforce_limit(shared)?;
            self.trim_pool()?;
            let next = lock(&self.requests).back_in;
            if let Some(from) = next {
                let next = self.swap_in_step(from)?;
                lock(&self.requests).back_in = next;
                if next.is_some() {
                    // More to do: do not wait for the period.
                    self.store.kick();
                }
            }
        }
        Ok(())
    }

    /// One batch: staged under the manager's lock, prepared, and queued for the writer; then
    /// the previous batch (`inflight`), written meanwhile, is ended while the writer goes on
    /// with this one. Without a writer the batch is written here. Returns (frames staged, whether the hand wrapped).
    fn batch<'a>(
        &'a self,
        shared: &dyn MemoryLock,
        inflight: &mut Option<InFlight<'a>>,
    ) -> Result<(usize, bool), SwapperError> {
        let area = inflight.as_ref().map_or(0, |f| f.area + 1);
        let mut staging = self.store.lock_staging(area);
        let out = shared.mm().swap_stage(&mut staging, STAGE_PAGES)?;
        let prepared = self.store.prepare(&staging)?;
        let writer = lock(&self.writer);
        match writer.as_ref() {
            Some((jobs, _)) => {
                // Queued behind the batch being written, so the disk never waits for the
                // previous batch's ending (its discard and page states) below.
                let job = WriteJob { staging: &raw const *staging, prepared };
                if jobs.send(job).is_err() {
                    return Err(SwapperError::WriterGone);
                }
                drop(writer);
                self.land(inflight)?;
                *inflight = Some(InFlight { area, staging });
            }
            None => {
                drop(writer);
                self.land(inflight)?;
                let written = self.store.write_prepared(&staging, &prepared);
                self.store.finish(&mut staging, prepared, written)?;
            }
        }
        Ok((out.staged, out.wrapped))
    }

    /// Ends the batch the writer has, once it is written.
    fn land(&self, inflight: &mut Option<InFlight<'_>>) -> Result<(), SwapperError> {
        let Some(mut f) = inflight.take() else { return Ok(()) };
        let answer = lock(&self.writer).as_ref().map(|(_, done)| done.recv());
        let Some(Ok((prepared, written))) = answer else { return Err(SwapperError::WriterGone) };
        self.store.finish(&mut f.staging, prepared, written)?;
        Ok(())
    }

    /// Evicts until usage is a little under the limit, or nothing more can go.
    fn enforce_limit(&self, shared: &dyn MemoryLock) -> Result<(), SwapperError> {
        let limit = self.store.limit();
        if self.store.usage() <= limit {
            if *lock(&self.state) != SwapState::SwappingIn {
                self.set_state(SwapState::Within);
            }
            return Ok(());
        }
        if lock(&self.resting).is_some_and(|(until, l)| Instant::now() < until && l == limit) {
            return Ok(());
        }
        self.set_state(SwapState::Reclaiming);
        // Free memory first: the slabs' cached empty slabs cost no I/O to give back.
        shared.mm().slab_trim()?;
        let low = limit.saturating_sub((limit / 32).max(2 << 20));
        let (mut empty_laps, mut stalled) = (0, 0);
        let mut inflight = None;
        while self.store.usage() > low && !self.stop.load(Ordering::Acquire) {
            let before = self.store.usage();
            let (staged, wrapped) = self.batch(shared, &mut inflight)?;
            if staged == 0 && wrapped {
                empty_laps += 1;
            }
            stalled = if self.store.usage() >= before { stalled + 1 } else { 0 };
            // Two turns of the hand with nothing to evict, or no progress in eight batches (the
            // file full or failing, everything hot).
            if empty_laps >= 2 || stalled >= 8 {
                self.land(&mut inflight)?;
                self.set_state(SwapState::LimitNotMet);
                self.not_met.fetch_add(1, Ordering::Relaxed);
                *lock(&self.resting) = Some((Instant::now() + GIVE_UP_FOR, limit));
                return Ok(());
            }
        }
        self.land(&mut inflight)?;
        self.set_state(SwapState::Within);
        Ok(())
    }

    /// `PUT /swap/out`: one full turn of the hand, evicting every page not touched since it
    /// last passed.
    fn sweep(&self, shared: &dyn MemoryLock) -> Result<(), SwapperError> {
        let Some(start) = shared.mm().swap_position() else { return Ok(()) };
        let mut inflight = None;
        while !self.stop.load(Ordering::Acquire) {
            self.batch(shared, &mut inflight)?;
            let Some((laps, hand)) = shared.mm().swap_position() else { break };
            if laps > start.0 + 1 || (laps > start.0 && hand >= start.1) {
                break;
            }
        }
        self.land(&mut inflight)
    }

    /// The pool over its (lowered) capacity writes back its oldest pages. (This thread is the
    /// pool's only inserter: `prepare` runs here too.)
    fn trim_pool(&self) -> Result<(), SwapperError> {
        while self.store.pool_over_capacity() > 0 {
            if !self.store.pool_writeback()? {
                break;
            }
        }
        Ok(())
    }

    /// `PUT /swap/in`: brings back the swapped frames of the next step from `from`, while usage
    /// stays under the limit. Returns where to go on (`None`: done).
    fn swap_in_step(&self, from: Gfn) -> Result<Option<Gfn>, SwapperError> {
        self.set_state(SwapState::SwappingIn);
        let end = self.store.frames_end();
        let limit = self.store.limit();
        let room = limit.saturating_sub((limit / 32).max(2 << 20));
        let mut g = from;
        let stop = Gfn((from.0 + SWAP_IN_STEP).min(end.0));
        while g < stop {
            if self.store.usage() + MAX_READAHEAD as u64 * PAGE_SIZE > room {
                // No room: done for now (the limit wins over the request).
                self.set_state(SwapState::Within);
                return Ok(None);
            }
            if self.store.state(g) == FrameState::Swapped {
                self.store.swap_in(g, MAX_READAHEAD - 1)?;
            }
            g = g.plus(1);
        }
        if g >= end {
            self.set_state(SwapState::Within);
            return Ok(None);
        }
        Ok(Some(g))
    }
}
