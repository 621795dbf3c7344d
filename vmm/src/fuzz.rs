//! Fuzz harnesses: one function per input the guest or a user controls. Each takes arbitrary
//! bytes and panics only when the VMM does something wrong (a panic of its own, a host failure
//! caused by guest input, a broken invariant). `fuzz/` runs them under libFuzzer; the unit
//! tests below replay the committed corpus and every crash ever found (`fuzz/regressions/`).

use std::io::Write as _;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use vm_memory::{Bytes, GuestAddress};

use protocol::layout::{CPU_AREA_PAGES, cpu_area};
use protocol::memcall::{AREA_OFFSET, MAX_BATCH, op};
use protocol::slab::{
    DOORBELL_OFFSET, MAG_ALLOC, MAG_ALLOC_HEAD, MAG_ALLOC_TAIL, MAG_FREE, MAG_FREE_HEAD, MAGAZINES_OFFSET, Magazine,
    NR_CLASSES, slot,
};

use crate::boot::CpuBoot;
use crate::console::{KEEP_PER_SCENARIO, LineBuffer, MAX_LINE, MAX_SCENARIOS, ResultLog, parse_result};
use crate::memcall::{MemCallCounters, MemCallCtx, doorbell, lazy_fault};
use crate::memory::addr::NodeId;
use crate::memory::standalone;
use crate::rings::Rings;

/// Reads the input front to back; zeroes once it runs out.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut b = [0u8; N];
        let n = N.min(self.0.len());
        b[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        b
    }

    fn u8(&mut self) -> u8 {
        self.bytes::<1>()[0]
    }

    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.bytes())
    }

    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.bytes())
    }
}

/// An argument of the form `0xFE..` names something the VMM handed out earlier (a region or an
/// object, plus a page offset), so that fuzzing reaches FREE, PROTECT, MOVE and slab frees of
/// real things as well as of invented ones.
fn resolve(v: u64, handed: &[u64]) -> u64 {
    if v >> 56 != 0xfe || handed.is_empty() {
        return v;
    }
    let i = (v & 0xffff) as usize % handed.len();
    handed[i].wrapping_add(((v >> 16) & 0xff) * 4096).wrapping_add(((v >> 24) & 0xff) * 8)
}

/// Memory-call batches, LAZY_FAULT reports and slab exchanges with arbitrary magazines, through
/// the same path as a vCPU's doorbell, against a two-node manager over real (unregistered) RAM.
/// Every call must end in a status (never a host failure), and the manager's invariants must
/// hold after every input.
pub fn memcalls(data: &[u8]) {
    let mut input = Input(data);
    let mut mm = standalone(&[4 << 20, 4 << 20]).expect("a standalone manager");
    let id = u32::from(input.u8() & 1);
    let area = mm.alloc_frames(NodeId(id), CPU_AREA_PAGES, None).expect("the CPU area");
    for i in 0..CPU_AREA_PAGES {
        mm.make_resident(area.plus(i)).expect("the CPU area is resident");
    }
    let ram = Arc::clone(mm.ram());
    let cpu = CpuBoot { id, node: id, cpu_page_gpa: area.gpa(), cpu_page_va: cpu_area(id), tss_va: 0, stack_top: 0 };
    let mm = Mutex::new(mm);
    let counters = MemCallCounters::default();
    let rings = Rings::new(ram.mem(), [(id, id, area.gpa().0)], false).expect("the magazines are RAM");
    let ctx = MemCallCtx { mm: &mm, ram: &ram, counters: &counters, rings: &rings };
    let mem = ram.mem();
    let calls = area.gpa().0 + AREA_OFFSET;
    let mut handed: Vec<u64> = Vec::new();
    for _ in 0..64 {
        if input.is_empty() {
            break;
        }
        let kind = input.u8();
        match kind % 4 {
            // A batch of calls, then a doorbell (usually well-formed, sometimes not).
            0 | 1 => {
                let n = usize::from(input.u8()) % 8 + 1;
                let first = if kind & 0x10 != 0 { usize::from(input.u8()) } else { 0 };
                for i in 0..n {
                    let mut c = [0u8; 64];
                    c[..4].copy_from_slice(&input.u32().to_le_bytes());
                    c[4..8].copy_from_slice(&input.u32().to_le_bytes());
                    for a in 0..4 {
                        let v = resolve(input.u64(), &handed);
                        c[8 + a * 8..16 + a * 8].copy_from_slice(&v.to_le_bytes());
                    }
                    let at = calls + ((first + i) % MAX_BATCH) as u64 * 64;
                    mem.write_slice(&c, GuestAddress(at)).expect("the request area");
                }
                let value = if kind & 0x20 != 0 { input.u32() } else { u32::try_from(n | first << 16).expect("small") };
                doorbell(ctx, &cpu, value).expect("guest input never causes a host failure");
                for i in 0..n.min(MAX_BATCH) {
                    let at = calls + ((first + i) % MAX_BATCH) as u64 * 64;
                    let o: u32 = mem.read_obj(GuestAddress(at)).expect("read");
                    let st: u64 = mem.read_obj(GuestAddress(at + 40)).expect("read");
                    let ret: u64 = mem.read_obj(GuestAddress(at + 48)).expect("read");
                    if st == protocol::status::OK && matches!(o, op::ALLOC | op::MAP_LAZY | op::MOVE) {
                        handed.push(ret);
                    }
                }
            }
            // A slab exchange, or a service pass, over rings whose indices and free entries
            // the fuzzer wrote.
            2 => {
                let class = usize::from(input.u8()) % NR_CLASSES;
                let mag = area.gpa().0 + MAGAZINES_OFFSET + (class * size_of::<Magazine>()) as u64;
                let at = |off: u64| GuestAddress(mag + off);
                let (alloc_tail, free_head) = (input.u32(), input.u32());
                mem.write_obj(alloc_tail, at(MAG_ALLOC_TAIL)).expect("magazine");
                mem.write_obj(free_head, at(MAG_FREE_HEAD)).expect("magazine");
                for i in 0..u32::from(input.u8() % 17) {
                    let v = resolve(input.u64(), &handed);
                    let s = slot(free_head.wrapping_sub(1 + i)) as u64;
                    mem.write_obj(v, at(MAG_FREE + s * 8)).expect("magazine");
                }
                // Rings kept deep (no CPU for a service) or shallow and adaptive (one has).
                rings.announce(0, kind & 0x10 == 0);
                if kind & 0x80 != 0 {
                    // Any doorbell bits, then a pass that reads only doorbells, or scans too.
                    let bell = area.gpa().0 + DOORBELL_OFFSET;
                    mem.write_obj(input.u32(), GuestAddress(bell)).expect("doorbell");
                    rings
                        .pass(&mm, kind & 0x20 != 0, kind & 0x40 != 0)
                        .expect("guest input never causes a host failure");
                } else {
                    let class_arg = if kind & 0x40 != 0 { u64::from(input.u8()) } else { class as u64 };
                    let want = u64::from(input.u32() % 1024);
                    let mut c = [0u8; 64];
                    c[..4].copy_from_slice(&op::SLAB_EXCHANGE.to_le_bytes());
                    c[8..16].copy_from_slice(&class_arg.to_le_bytes());
                    c[16..24].copy_from_slice(&want.to_le_bytes());
                    mem.write_slice(&c, GuestAddress(calls)).expect("the request area");
                    doorbell(ctx, &cpu, 1).expect("guest input never causes a host failure");
                }
                let head: u32 = mem.read_obj(at(MAG_ALLOC_HEAD)).expect("magazine");
                for i in 1..=16 {
                    let s = slot(head.wrapping_sub(i)) as u64;
                    let obj: u64 = mem.read_obj(at(MAG_ALLOC + s * 8)).expect("magazine");
                    if obj != 0 && handed.len() < 4096 {
                        handed.push(obj);
                    }
                }
            }
            // A #PF report at an address of the fuzzer's choosing.
            _ => {
                let cr2 = resolve(input.u64(), &handed);
                lazy_fault(ctx, &cpu, cr2, input.u32()).expect("guest input never causes a host failure");
            }
        }
    }
    if let Err(e) = crate::sync::lock(&mm).check_invariants() {
        panic!("invariant broken: {e}");
    }
}

/// A guest image: validated, and when valid, loaded into a memory manager.
pub fn image(data: &[u8]) {
    thread_local! {
        /// One in-memory file, rewritten per input.
        static FILE: std::fs::File = {
            // SAFETY: memfd_create with a constant name and flags; the fd is owned below.
            let fd = unsafe { libc::memfd_create(c"fuzz-image".as_ptr(), libc::MFD_CLOEXEC) };
            assert!(fd >= 0, "memfd_create");
            // SAFETY: a fresh descriptor nothing else owns.
            std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) })
        };
    }
    FILE.with(|f| {
        f.set_len(0).expect("truncate");
        let mut w = f;
        std::io::Seek::rewind(&mut w).expect("rewind");
        w.write_all(data).expect("write");
        let path = std::path::PathBuf::from(format!("/proc/self/fd/{}", f.as_raw_fd()));
        let Ok(img) = crate::boot::image::Image::open(&path) else { return };
        let mut mm = standalone(&[16 << 20]).expect("a standalone manager");
        if let Ok(loaded) = img.load(&mut mm, NodeId(0)) {
            assert!(loaded.va_start < loaded.va_end && loaded.entry >= loaded.va_start && loaded.entry < loaded.va_end);
        }
        if let Err(e) = mm.check_invariants() {
            panic!("invariant broken after loading: {e}");
        }
    });
}

/// The command line and every configuration parser.
pub fn cli(data: &[u8]) {
    use clap::Parser as _;
    let text = String::from_utf8_lossy(data);
    for s in text.split('\0') {
        let _ = s.parse::<crate::config::ByteSize>();
        let _ = crate::config::parse_cpu_list(s);
        let _ = crate::config::parse_memory_arg(s);
        let _ = s.parse::<crate::config::NumaNodeSpec>();
        let _ = s.parse::<crate::config::DistanceSpec>();
    }
    let args = std::iter::once("vmm").chain(text.split('\0'));
    let Ok(cli) = crate::cli::Cli::try_parse_from(args) else { return };
    let crate::cli::Command::Run(run) = cli.command else { return };
    let Ok(cfg) = run.into_config(crate::config::Kernel::Path("default.elf".into())) else { return };
    // A valid configuration is consistent.
    assert!(cfg.cpus >= 1 && cfg.memory > 0);
    assert_eq!(cfg.numa.nodes.iter().map(|n| n.size).sum::<u64>(), cfg.memory);
    let mut cpus: Vec<u32> = cfg.numa.nodes.iter().flat_map(|n| n.cpus.iter().copied()).collect();
    cpus.sort_unstable();
    assert_eq!(cpus, (0..cfg.cpus).collect::<Vec<_>>(), "every vCPU in exactly one node");
    let d = &cfg.numa.distance;
    for (a, row) in d.iter().enumerate() {
        assert_eq!(row[a], 10);
        for (b, &x) in row.iter().enumerate() {
            assert_eq!(x, d[b][a], "symmetric distances");
        }
    }
    assert!(cfg.fault_around.is_power_of_two() && cfg.fault_around <= cfg.fault_around_max);
}

/// Console bytes from any number of writes, the lines they make, and the results kept.
pub fn console(data: &[u8]) {
    let mut input = Input(data);
    let mut lines = LineBuffer::default();
    let mut results = ResultLog::default();
    let mut pushed = 0u64;
    while !input.is_empty() {
        let n = usize::from(input.u8());
        let take = n.min(input.0.len());
        let (chunk, rest) = input.0.split_at(take);
        input.0 = rest;
        let mut got = Vec::new();
        lines.push(chunk, |l| got.push(l.to_string()));
        for l in got {
            assert!(l.len() <= MAX_LINE * 3, "a line longer than its bound");
            assert!(!l.contains('\n'));
            let fields = parse_result(&l);
            assert!(fields.keys().all(|k| !k.contains(char::is_whitespace)));
            if l.starts_with(protocol::RESULT_PREFIX) {
                results.push(&l);
                pushed += 1;
            }
        }
    }
    lines.flush(|_| {});
    let kept = results.lines().len() as u64;
    assert!(kept <= ((MAX_SCENARIOS + 1) * KEEP_PER_SCENARIO) as u64);
    assert_eq!(kept + results.dropped().values().sum::<u64>(), pushed);
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    /// Every committed corpus input and crash regression of `target`, through its harness.
    fn replay(target: &str, harness: fn(&[u8])) {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
        let mut n = 0;
        for dir in [root.join("corpus").join(target), root.join("regressions").join(target)] {
            let Ok(entries) = std::fs::read_dir(&dir) else { continue };
            for e in entries.flatten().filter(|e| !e.file_name().to_string_lossy().starts_with('.')) {
                // A running fuzzer replaces corpus files as it minimises them.
                let Ok(data) = std::fs::read(e.path()) else { continue };
                harness(&data);
                n += 1;
            }
        }
        assert!(n > 0, "no corpus for {target}");
    }

    #[test]
    fn memcalls_corpus_and_regressions() {
        replay("memcalls", super::memcalls);
    }

    #[test]
    fn image_corpus_and_regressions() {
        replay("image", super::image);
    }

    #[test]
    fn cli_corpus_and_regressions() {
        replay("cli", super::cli);
    }

    #[test]
    fn console_corpus_and_regressions() {
        replay("console", super::console);
    }
}
