//! `scenario=badcalls`: every kind of invalid memory call gets its error code back, changes
//! nothing, and the VMM keeps serving good calls. So do garbage ring indices and bad frees put
//! in the slab rings.

use protocol::exit;
use protocol::memcall::{ALL_NODES, MAX_BATCH, flags, op, policy, prot};
use protocol::port;
use protocol::status::{EALREADY, EFAULT, EINVAL, ENOMEM, ENOSYS, OK};

use super::{Ctx, fail};
use crate::mem::{self, Batch, mk};
use crate::trap::{self, pf};
use crate::{arch, heap, println};

/// W^X done right: write code into writable memory, make it read+exec, run it; writing it then
/// faults. Returns the number of failed checks.
fn load_and_run_code() -> u32 {
    // mov eax, 42; ret
    const CODE: [u8; 6] = [0xb8, 0x2a, 0x00, 0x00, 0x00, 0xc3];
    let mut failures = 0;
    let Ok((va, _)) = mem::alloc(4096, policy::LOCAL, 0, 0) else {
        println!("guest: badcalls: no page for code");
        return 1;
    };
    for (i, &b) in CODE.iter().enumerate() {
        // SAFETY: va is a fresh read-write page of ours.
        unsafe { core::ptr::write_volatile((va + i as u64) as *mut u8, b) };
    }
    if mem::protect(va, 4096, prot::READ | prot::EXEC).is_err() {
        println!("guest: badcalls: cannot make the code page read+exec");
        return 1;
    }
    // SAFETY: the page holds a complete function (`mov eax, 42; ret`) following the C ABI,
    // mapped read+exec.
    let f: extern "C" fn() -> u32 = unsafe { core::mem::transmute(va as usize) };
    if f() != 42 {
        println!("guest: badcalls: the loaded code did not run");
        failures += 1;
    }
    match trap::write(va, 0) {
        Err(f) if f.error & (pf::PRESENT | pf::WRITE) == (pf::PRESENT | pf::WRITE) => {}
        _ => {
            println!("guest: badcalls: executable memory took a write");
            failures += 1;
        }
    }
    if mem::free(va).is_err() {
        failures += 1;
    }
    failures
}

/// The scheduler's ports with bad values: a tick handler outside the image's code, a wake-up
/// for a vCPU that does not exist, an endless sleep: errors or bounded waits, nothing else.
/// Returns the number of failed checks.
fn bad_scheduler_calls() -> u32 {
    let page = arch::cpu_page();
    let mut failures = 0;
    let set_tick = |handler: u64, period: u32| {
        // SAFETY: this vCPU's CpuPage; the VMM writes the status into args[0] during the exit.
        unsafe {
            (*page).args[0] = handler;
            arch::out32(port::SET_TICK, period);
            core::ptr::read_volatile(&(*page).args[0])
        }
    };
    static DATA: u64 = 0;
    for (what, handler) in [("in data", &raw const DATA as u64), ("null", 0), ("non-canonical", 1 << 63)] {
        let st = set_tick(handler, 1000);
        if st != EINVAL {
            println!("guest: badcalls: a tick handler {what}: status {st}, expected {EINVAL}");
            failures += 1;
        }
    }
    if set_tick(0, 0) != OK {
        println!("guest: badcalls: turning ticks off failed");
        failures += 1;
    }
    arch::out32(port::WAKE, 100_000);
    arch::out32(port::WAKE, u32::MAX);
    // The longest sleep is a second, whatever the guest asks.
    let t0 = arch::rdtsc();
    // SAFETY: this vCPU's CpuPage.
    unsafe { (*page).args[0] = u64::MAX };
    arch::out32(port::IDLE, 0);
    let slept = arch::rdtsc() - t0;
    if slept > 3 * crate::bootinfo::get().map_or(u64::MAX, |bi| bi.tsc_khz * 1000) {
        println!("guest: badcalls: IDLE with an endless timeout slept {slept} cycles");
        failures += 1;
    }
    failures
}

/// Garbage in the slab rings of one class: indices claiming more than a ring holds get EFAULT
/// from SLAB_EXCHANGE and are skipped by the service thread meanwhile; wild pointers in the free
/// ring are found and counted by whichever side drains it (the service thread, without an exit,
/// when it runs). Afterwards the class works as before. Returns the number of failed checks.
fn bad_rings(service: bool) -> u32 {
    use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};
    let class = protocol::slab::NR_CLASSES - 1;
    let _g = crate::sched::NoPreempt::new();
    let mut failures = 0;
    let mut check = |ok: bool, what: &str| {
        if !ok {
            println!("guest: badcalls: rings: {what}");
            failures += 1;
        }
    };
    heap::top_up(class);
    let m = heap::magazine(class);
    let exchange = || mem::call(mk(op::SLAB_EXCHANGE, 0, [class as u64, 1, 0, 0])).status;
    let rd = |p: *const u32| {
        // SAFETY: p points into this vCPU's mapped magazine.
        unsafe { read_volatile(p) }
    };
    let wr = |p: *mut u32, v: u32| {
        // SAFETY: as above; the guest's own fields, which only this vCPU uses.
        unsafe { write_volatile(p, v) }
    };
    // SAFETY: m points into this vCPU's mapped magazines; only field addresses are taken.
    let (tail_p, head_p) = unsafe { (addr_of_mut!((*m).alloc_tail), addr_of_mut!((*m).free_head)) };
    // SAFETY: as above.
    let (vmm_head, vmm_tail) = unsafe { (addr_of!((*m).alloc_head), addr_of!((*m).free_tail)) };
    let (tail, head) = (rd(tail_p), rd(head_p));
    // Consumed more than there was; holding more than a ring's worth of frees.
    wr(tail_p, rd(vmm_head).wrapping_add(1));
    check(exchange() == EFAULT, "an alloc index past the ring's end was accepted");
    wr(tail_p, rd(vmm_head).wrapping_sub(protocol::slab::RING as u32 + 1));
    check(exchange() == EFAULT, "an alloc index a ring behind was accepted");
    wr(tail_p, tail);
    wr(head_p, rd(vmm_tail).wrapping_add(protocol::slab::RING as u32 + 7));
    check(exchange() == EFAULT, "a free index beyond the ring was accepted");
    // The service thread meets the same garbage for a while, with every doorbell bit rung
    // (classes that do not exist included).
    for _ in 0..30 {
        heap::ring_doorbell_bits(u32::MAX);
        arch::spin_ms(1);
    }
    wr(head_p, head);
    check(exchange() == OK, "the ring does not work after its indices were restored");
    // Wild pointers in the free ring: counted, nothing else.
    let (n0, _, _) = heap::bad_frees(class);
    let (page, _) = mem::alloc(4096, policy::LOCAL, 0, 0).expect("a page");
    let wild = [0xdead_0000, 1 << 63, 8, page, page + 32768];
    for w in wild {
        heap::push_free(class, w);
    }
    if service {
        // Drained without an exit.
        for _ in 0..200 {
            if rd(vmm_tail) == rd(head_p) {
                break;
            }
            arch::spin_ms(5);
        }
        check(rd(vmm_tail) == rd(head_p), "the service thread did not drain the free ring");
    }
    heap::flush();
    let (n1, st, bad) = heap::bad_frees(class);
    check(n1 == n0 + wild.len() as u32, "wild frees in the ring were not all counted");
    check(u64::from(st) == EFAULT && bad == page + 32768, "the last bad free was misreported");
    check(mem::free(page).is_ok(), "the page was disturbed by frees of it in the ring");
    let obj = heap::alloc_small(class);
    check(!obj.is_null(), "no object of the class after the garbage");
    heap::free_small(class, obj as u64);
    failures
}

pub fn run(ctx: &Ctx) {
    if ctx.cpu != 0 {
        return;
    }
    // First, so that the slab it uses is there before and after the frame count below.
    let mut failures = bad_rings(ctx.args.num("service", 1).unwrap_or(1) != 0);
    heap::flush();
    let before = mem::stats(ALL_NODES).unwrap_or_default();
    let (good, _) = mem::alloc(3 * 4096, policy::LOCAL, 0, 0).expect("a good allocation");
    let (lazy, _) = mem::map_lazy(16 * 4096, policy::LOCAL, 0, 0).expect("a good lazy region");
    let (freed, _) = mem::alloc(4096, policy::LOCAL, 0, 0).expect("a good allocation");
    mem::free(freed).expect("a good free");
    let nodes = u64::from(ctx.bi.nr_nodes);
    let cases: &[(&str, u32, u32, [u64; 4], u64)] = &[
        ("unknown op", 99, 0, [0; 4], ENOSYS),
        ("alloc of zero bytes", op::ALLOC, 0, [0, 0, 0, 0], EINVAL),
        ("alloc beyond guest RAM", op::ALLOC, 0, [1 << 60, 0, 0, 0], ENOMEM),
        ("alloc of u64::MAX bytes", op::ALLOC, 0, [u64::MAX, 0, 0, 0], ENOMEM),
        ("alloc with unknown flags", op::ALLOC, 1 << 20, [4096, 0, 0, 0], EINVAL),
        ("alloc with unknown policy", op::ALLOC, 0, [4096, 9, 0, 0], EINVAL),
        ("bind to a missing node", op::ALLOC, 0, [4096, policy::BIND, nodes, 0], EINVAL),
        ("bind to node u64::MAX", op::ALLOC, 0, [4096, policy::BIND, u64::MAX, 0], EINVAL),
        ("local with a node", op::ALLOC, 0, [4096, policy::LOCAL, 1, 0], EINVAL),
        ("lazy with HUGE", op::MAP_LAZY, flags::HUGE, [4096, 0, 0, 0], EINVAL),
        ("free of nothing", op::FREE, 0, [0x1234_5000, 0, 0, 0], EFAULT),
        ("free inside a region", op::FREE, 0, [good + 4096, 0, 0, 0], EFAULT),
        ("double free", op::FREE, 0, [freed, 0, 0, 0], EALREADY),
        ("free with extra arguments", op::FREE, 0, [good, 1, 0, 0], EINVAL),
        ("free with flags", op::FREE, 1, [good, 0, 0, 0], EINVAL),
        ("free of a non-canonical address", op::FREE, 0, [1 << 63, 0, 0, 0], EFAULT),
        ("protect of nothing", op::PROTECT, prot::READ, [0x1234_5000, 4096, 0, 0], EFAULT),
        ("protect unaligned", op::PROTECT, prot::READ, [good + 1, 4096, 0, 0], EINVAL),
        ("protect past the end", op::PROTECT, prot::READ, [good, 8 * 4096, 0, 0], EINVAL),
        ("protect with length overflow", op::PROTECT, prot::READ, [good, u64::MAX - 4095, 0, 0], EINVAL),
        ("protect of zero bytes", op::PROTECT, prot::READ, [good, 0, 0, 0], EINVAL),
        ("protect with unknown bits", op::PROTECT, 0x80, [good, 4096, 0, 0], EINVAL),
        ("move of nothing", op::MOVE, 0, [0x1234_5000, 0, 0, 0], EFAULT),
        ("fault outside lazy regions", op::FAULT, 0, [good, 0, 0, 0], EFAULT),
        ("fault past a lazy region", op::FAULT, 0, [lazy + 16 * 4096, 0, 0, 0], EFAULT),
        ("translate non-canonical", op::TRANSLATE, 0, [1 << 48, 0, 0, 0], EINVAL),
        ("translate unmapped", op::TRANSLATE, 0, [0x1234_5000, 0, 0, 0], EFAULT),
        ("stats of a missing node", op::STATS, 0, [nodes, 0, 0, 0], EINVAL),
        ("alloc with a reserved argument", op::ALLOC, 0, [4096, 0, 0, 1], EINVAL),
        ("lazy with a reserved argument", op::MAP_LAZY, 0, [4096, 0, 0, 1], EINVAL),
        ("alloc writable and executable (W^X)", op::ALLOC, flags::EXEC, [4096, 0, 0, 0], EINVAL),
        ("lazy writable and executable (W^X)", op::MAP_LAZY, flags::EXEC, [4096, 0, 0, 0], EINVAL),
        ("protect write+exec (W^X)", op::PROTECT, prot::WRITE | prot::EXEC, [good, 4096, 0, 0], EINVAL),
        ("protect read+write+exec (W^X)", op::PROTECT, prot::ALL, [good, 4096, 0, 0], EINVAL),
    ];
    // All in one batch: one exit, each call judged on its own.
    let mut b = Batch::new();
    for &(_, o, f, a, _) in cases {
        b.push(mk(o, f, a));
    }
    let done = b.send();
    if done != cases.len() {
        println!("guest: badcalls: the VMM processed {done} of {} calls", cases.len());
        failures += 1;
    }
    for (i, &(what, _, _, _, want)) in cases.iter().enumerate() {
        let got = Batch::result(i).status;
        if got != want {
            println!("guest: badcalls: {what}: status {got}, expected {want}");
            failures += 1;
        }
    }
    // A doorbell for more calls than the area holds, or reaching past its end, is refused whole.
    for value in [(MAX_BATCH + 1) as u32, 2 | ((MAX_BATCH as u32 - 1) << 16)] {
        arch::out32(port::MEMCALL, value);
        // SAFETY: the VMM wrote memcall_done in this vCPU's CpuPage during the exit.
        let done = unsafe { core::ptr::read_volatile(&(*arch::cpu_page()).memcall_done) };
        if done != 0 {
            println!("guest: badcalls: the doorbell {value:#x} was processed");
            failures += 1;
        }
    }
    // Nothing changed: the good regions still work and free normally.
    let r = mem::call(mk(op::NOP, 0, [0; 4]));
    if r.status != OK {
        failures += 1;
    }
    super::util::write(good, 42);
    if super::util::read(good) != 42 || mem::free(good).is_err() || mem::free(lazy).is_err() {
        println!("guest: badcalls: good regions were disturbed");
        failures += 1;
    }
    failures += load_and_run_code();
    failures += bad_scheduler_calls();
    let after = mem::stats(ALL_NODES).unwrap_or_default();
    if super::util::data_frames(&after) != super::util::data_frames(&before) {
        let (b, a) = (super::util::data_frames(&before), super::util::data_frames(&after));
        println!("guest: badcalls: frames leaked (data frames {b} before, {a} after)");
        failures += 1;
    }
    println!("@result scenario=badcalls cases={} failures={failures}", cases.len());
    if failures > 0 {
        fail(exit::VERIFY_FAILED);
    }
}
