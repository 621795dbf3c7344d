//! Memory calls: a batch of requests per doorbell exit, each copied out of guest memory,
//! validated, and dispatched to the memory manager. Bad requests get a status code; only a
//! host-side failure stops the VM.

use std::sync::Mutex;
use std::time::Instant;

use vm_memory::{Bytes, GuestAddress, GuestMemoryError};

use protocol::memcall::{ALL_NODES, AREA_OFFSET, MAX_BATCH, MemCall, op, policy};
use protocol::slab::{NR_CLASSES, RING};
use protocol::{CPU_PAGE_ARGS, CPU_PAGE_FAULT_STATUS, CPU_PAGE_MEMCALL_DONE, CPU_PAGE_TRAP_CR2, MemStats, status};

use crate::boot::CpuBoot;
use crate::memory::addr::NodeId;
use crate::memory::backing::ram::GuestRam;
use crate::memory::frames::policy::Policy;
use crate::memory::{MemoryError, MemoryManager};
use crate::metrics::{Counter, Histogram, LatencySummary};
use crate::rings::{self, RingError, Rings};
use crate::sync::lock;
use crate::wire::Wire;

/// A memory call the VMM could not serve: the VM stops.
#[derive(Debug, thiserror::Error)]
pub enum MemCallError {
    #[error("cannot read {len} bytes at {gpa:#x}")]
    Read {
        gpa: u64,
        len: usize,
        #[source]
        source: GuestMemoryError,
    },
    #[error("cannot write {len} bytes at {gpa:#x}")]
    Write {
        gpa: u64,
        len: usize,
        #[source]
        source: GuestMemoryError,
    },
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Rings(#[from] RingError),
}

/// Why one call failed: a status for the guest, or a host failure.
enum Refusal {
    Status(u64),
    Host(MemCallError),
}

impl From<MemoryError> for Refusal {
    fn from(e: MemoryError) -> Self {
        match e.guest_status() {
            Some(st) => Refusal::Status(st),
            None => Refusal::Host(e.into()),
        }
    }
}

impl From<MemCallError> for Refusal {
    fn from(e: MemCallError) -> Self {
        Refusal::Host(e)
    }
}

/// EINVAL for a malformed call.
fn invalid() -> Refusal {
    Refusal::Status(status::EINVAL)
}

/// Operation names, indexed by op code.
pub const OP_NAMES: [&str; op::COUNT] = [
    "nop",
    "alloc",
    "free",
    "map_lazy",
    "fault",
    "protect",
    "move",
    "stats",
    "translate",
    "slab_exchange",
    "slab_free",
    "slab_info",
    "guest_stats",
];

/// Per-operation counts.
#[derive(Debug, Default)]
pub struct MemCallCounters {
    pub doorbells: Counter,
    pub calls: Counter,
    /// Doorbells with more than MAX_BATCH calls (none processed).
    pub bad_batches: Counter,
    pub unknown_ops: Counter,
    pub by_op: [Counter; op::COUNT],
    pub errors_by_op: [Counter; op::COUNT],
    /// Slab objects handed out and returned through magazines.
    pub slab_objects_out: Counter,
    pub slab_objects_in: Counter,
    /// LAZY_FAULT port calls.
    pub lazy_fault_calls: Counter,
    /// Time the VMM spends per doorbell (copy in, dispatch, flush, copy out).
    pub doorbell_latency: Histogram,
}

/// Serializable snapshot.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MemCallReport {
    pub doorbells: u64,
    pub calls: u64,
    pub calls_per_doorbell: f64,
    pub bad_batches: u64,
    pub unknown_ops: u64,
    pub lazy_fault_calls: u64,
    pub slab_objects_out: u64,
    pub slab_objects_in: u64,
    /// Slab objects moved (both ways) per doorbell exit.
    pub slab_objects_per_doorbell: f64,
    pub ops: std::collections::BTreeMap<String, OpReport>,
    pub doorbell_latency: LatencySummary,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct OpReport {
    pub calls: u64,
    pub errors: u64,
}

impl MemCallCounters {
    pub fn report(&self) -> MemCallReport {
        let doorbells = self.doorbells.get();
        let calls = self.calls.get();
        #[allow(clippy::cast_precision_loss)]
        let per = if doorbells == 0 { 0.0 } else { calls as f64 / doorbells as f64 };
        MemCallReport {
            doorbells,
            calls,
            calls_per_doorbell: (per * 100.0).round() / 100.0,
            bad_batches: self.bad_batches.get(),
            unknown_ops: self.unknown_ops.get(),
            lazy_fault_calls: self.lazy_fault_calls.get(),
            slab_objects_out: self.slab_objects_out.get(),
            slab_objects_in: self.slab_objects_in.get(),
            slab_objects_per_doorbell: {
                #[allow(clippy::cast_precision_loss)]
                let moved = (self.slab_objects_out.get() + self.slab_objects_in.get()) as f64;
                #[allow(clippy::cast_precision_loss)]
                let d = doorbells.max(1) as f64;
                (moved / d * 100.0).round() / 100.0
            },
            ops: OP_NAMES
                .iter()
                .enumerate()
                .map(|(i, n)| {
                    (n.to_string(), OpReport { calls: self.by_op[i].get(), errors: self.errors_by_op[i].get() })
                })
                .collect(),
            doorbell_latency: self.doorbell_latency.summary(),
        }
    }
}

/// Where a vCPU's calls come from and go to.
#[derive(Debug, Clone, Copy)]
pub struct MemCallCtx<'a> {
    pub mm: &'a Mutex<MemoryManager>,
    pub ram: &'a GuestRam,
    pub counters: &'a MemCallCounters,
    pub rings: &'a Rings,
}

/// Serves `out MEMCALL, n | first << 16` from vCPU `cpu`.
pub fn doorbell(ctx: MemCallCtx<'_>, cpu: &CpuBoot, value: u32) -> Result<(), MemCallError> {
    let (n, first) = ((value & 0xffff) as usize, (value >> 16) as usize);
    let start = Instant::now();
    let c = ctx.counters;
    c.doorbells.inc();
    let mem = ctx.ram.mem();
    let done = GuestAddress(cpu.cpu_page_gpa.0 + CPU_PAGE_MEMCALL_DONE);
    if first + n > MAX_BATCH {
        c.bad_batches.inc();
        let _ = mem.write_obj(0u64, done);
        return Ok(());
    }
    // Copy the batch out of guest memory before looking at any of it.
    let area = GuestAddress(cpu.cpu_page_gpa.0 + AREA_OFFSET + first as u64 * 64);
    let mut calls = vec![Wire::<MemCall>::default(); n];
    for (i, call) in calls.iter_mut().enumerate() {
        *call = mem.read_obj(GuestAddress(area.0 + i as u64 * 64)).map_err(|source| MemCallError::Read {
            gpa: area.0,
            len: 64,
            source,
        })?;
    }
    let mut stats_out = None;
    {
        let mut mm = lock(ctx.mm);
        for call in &mut calls {
            let (st, ret) = dispatch(&mut mm, ctx, cpu, &call.0, &mut stats_out)?;
            call.0.status = st;
            call.0.ret = ret;
        }
        mm.flush()?;
    }
    c.calls.add(n as u64);
    for (i, call) in calls.iter().enumerate() {
        let at = GuestAddress(area.0 + i as u64 * 64);
        // Only the results: status (offset 40) and ret (48, 56).
        let results: [u64; 3] = [call.0.status, call.0.ret[0], call.0.ret[1]];
        for (j, v) in results.iter().enumerate() {
            let _ = mem.write_obj(*v, GuestAddress(at.0 + 40 + j as u64 * 8));
        }
    }
    if let Some(s) = stats_out {
        let _ = mem.write_obj(Wire::<MemStats>(s), GuestAddress(cpu.cpu_page_gpa.0 + CPU_PAGE_ARGS));
    }
    let _ = mem.write_obj(n as u64, done);
    c.doorbell_latency.record(u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX));
    Ok(())
}

/// Serves `out LAZY_FAULT` for a #PF at `cr2`: backs the page if it is in a lazy region.
pub fn lazy_fault(ctx: MemCallCtx<'_>, cpu: &CpuBoot, cr2: u64, error_code: u32) -> Result<(), MemCallError> {
    ctx.counters.lazy_fault_calls.inc();
    let mem = ctx.ram.mem();
    let _ = mem.write_obj(cr2, GuestAddress(cpu.cpu_page_gpa.0 + CPU_PAGE_TRAP_CR2));
    // A protection fault (present page) is the guest's own, whatever region it is in.
    const PF_PRESENT: u32 = 1;
    let st = if error_code & PF_PRESENT != 0 {
        status::EFAULT
    } else {
        match lock(ctx.mm).fault_lazy(cr2) {
            Ok(_) => status::OK,
            Err(e) => e.guest_status().ok_or(e)?,
        }
    };
    let _ = mem.write_obj(st, GuestAddress(cpu.cpu_page_gpa.0 + CPU_PAGE_FAULT_STATUS));
    Ok(())
}

/// Runs one call: `(status, ret)`. `Err` only for host failures that stop the VM.
fn dispatch(
    mm: &mut MemoryManager,
    ctx: MemCallCtx<'_>,
    cpu: &CpuBoot,
    call: &MemCall,
    stats_out: &mut Option<MemStats>,
) -> Result<(u64, [u64; 2]), MemCallError> {
    let c = ctx.counters;
    let Some(idx) = usize::try_from(call.op).ok().filter(|&i| i < OP_NAMES.len()) else {
        c.unknown_ops.inc();
        return Ok((status::ENOSYS, [0; 2]));
    };
    c.by_op[idx].inc();
    let local = NodeId(cpu.node);
    let a = call.args;
    let res: Result<[u64; 2], Refusal> = match call.op {
        op::NOP => unused(call, 0).map(|()| [0; 2]),
        op::ALLOC => reserved(a[3])
            .and_then(|()| parse_policy(a[1], a[2]))
            .and_then(|p| Ok(mm.alloc_region(a[0], call.flags, p, local)?))
            .map(|(va, len)| [va, len]),
        op::MAP_LAZY => reserved(a[3])
            .and_then(|()| parse_policy(a[1], a[2]))
            .and_then(|p| Ok(mm.map_lazy(a[0], call.flags, p, local)?))
            .map(|(va, len)| [va, len]),
        op::FREE => unused(call, 1).and_then(|()| Ok(mm.free_region(a[0])?)).map(|()| [0; 2]),
        op::FAULT => unused(call, 1).and_then(|()| Ok(mm.fault_lazy(a[0])?)).map(|n| [n, 0]),
        op::PROTECT => {
            if a[2] != 0 || a[3] != 0 {
                Err(invalid())
            } else {
                mm.protect_region(a[0], a[1], call.flags).map(|()| [0; 2]).map_err(Refusal::from)
            }
        }
        op::MOVE => unused(call, 1).and_then(|()| Ok(mm.move_region(a[0])?)).map(|va| [va, 0]),
        op::STATS => unused(call, 1)
            .and_then(|()| {
                let node = if a[0] == ALL_NODES { None } else { Some(usize::try_from(a[0]).map_err(|_| invalid())?) };
                Ok(mm.mem_stats(node)?)
            })
            .map(|mut s| {
                let host = crate::host::process_memory();
                s.host_rss_kib = host.rss_kib;
                s.host_rss_anon_kib = host.anon_kib;
                s.memcalls = c.calls.get();
                s.doorbells = c.doorbells.get();
                *stats_out = Some(s);
                [0; 2]
            }),
        op::TRANSLATE => {
            unused(call, 1).and_then(|()| Ok(mm.translate(a[0])?)).map(|(gpa, node)| [gpa, u64::from(node)])
        }
        op::SLAB_EXCHANGE => {
            if call.flags != 0 || a[2] != 0 || a[3] != 0 {
                Err(invalid())
            } else {
                slab_exchange(mm, ctx, cpu, a[0], a[1])
            }
        }
        op::SLAB_FREE => unused(call, 1).and_then(|()| Ok(mm.slab_free(a[0])?)).map(|()| [0; 2]),
        op::SLAB_INFO => unused(call, 1).and_then(|()| Ok(mm.slab_info(a[0])?)).map(|size| [u64::from(size), 0]),
        op::GUEST_STATS => unused(call, 2).map(|()| {
            mm.guest_stats(a[0], a[1]);
            [0; 2]
        }),
        _ => unreachable!("op index checked above"),
    };
    match res {
        Ok(ret) => Ok((status::OK, ret)),
        Err(Refusal::Host(e)) => Err(e),
        Err(Refusal::Status(st)) => {
            c.errors_by_op[idx].inc();
            Ok((st, [0; 2]))
        }
    }
}

/// SLAB_EXCHANGE: drain the vCPU's free ring of `class`, refill its alloc ring up to `want`.
fn slab_exchange(
    mm: &mut MemoryManager,
    ctx: MemCallCtx<'_>,
    cpu: &CpuBoot,
    class: u64,
    want: u64,
) -> Result<[u64; 2], Refusal> {
    let class = usize::try_from(class).ok().filter(|&c| c < NR_CLASSES).ok_or_else(invalid)?;
    let want = usize::try_from(want).ok().filter(|&w| w <= RING).ok_or_else(invalid)?;
    let r = ctx.rings.exchange_sync(mm, cpu.id, class, want).map_err(|e| match e {
        RingError::Memory(e) => Refusal::from(e),
        e @ RingError::Access { .. } => Refusal::Host(e.into()),
    })?;
    ctx.counters.slab_objects_out.add(r.out as u64);
    ctx.counters.slab_objects_in.add(r.freed as u64);
    match rings::status_of(&r, want) {
        status::OK => Ok([u64::from(r.level), r.bad as u64]),
        st => Err(Refusal::Status(st)),
    }
}

/// Checks that a reserved argument is zero.
fn reserved(arg: u64) -> Result<(), Refusal> {
    if arg != 0 { Err(invalid()) } else { Ok(()) }
}

/// Checks that flags and the arguments from `used` on are zero.
fn unused(call: &MemCall, used: usize) -> Result<(), Refusal> {
    if call.flags != 0 || call.args[used..].iter().any(|&x| x != 0) {
        return Err(invalid());
    }
    Ok(())
}

fn parse_policy(p: u64, node: u64) -> Result<Policy, Refusal> {
    let node_id = || u32::try_from(node).map(NodeId).map_err(|_| invalid());
    match p {
        policy::LOCAL if node == 0 => Ok(Policy::Local),
        policy::BIND => Ok(Policy::Bind(node_id()?)),
        policy::PREFERRED => Ok(Policy::Preferred(node_id()?)),
        policy::INTERLEAVE if node == 0 => Ok(Policy::Interleave),
        _ => Err(invalid()),
    }
}
