//! Guest profiling (`--profile path=FILE[,hz=N]`): the guest's instruction pointer, sampled
//! on every running vCPU, counted per address and written at exit as a table of the guest
//! image's functions and hottest addresses.
//!
//! Host profilers do not see the guest: perf sees the VMM and KVM, and a guest that runs at
//! CPL3 under shadow paging shows up as no symbol at all. A sampler thread kicks each vCPU
//! that runs guest code out of `KVM_RUN` `hz` times a second (the vCPU kick signal); the
//! vCPU reads its registers at that exit and counts RIP. What that measures:
//! - RIP is the next instruction to run: a sample lands just after the instruction that kept
//!   the CPU waiting (a cache or TLB miss shows up on the instruction after the load).
//! - A kick that arrives while the VMM serves an exit is seen at the next entry: that time
//!   counts at the instruction after the exiting one (a port `out`).
//! - Sleeping vCPUs are not sampled.
//! - Every sample is an exit (tens of microseconds here): at 1000 Hz the guest loses a few
//!   percent.
//!
//! The guest chooses RIP, so counts are bounded: at most [`MAX_ADDRESSES`] distinct addresses
//! per vCPU; samples elsewhere once that is reached are counted as dropped.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use object::{Object, ObjectSymbol, SymbolKind};

use crate::sync::lock;

/// Distinct addresses counted per vCPU.
pub const MAX_ADDRESSES: usize = 65_536;
/// Lines of each table in the report.
const TOP: usize = 40;

/// The guest image's functions, by address.
#[derive(Debug, Default)]
pub struct Symbols {
    /// `(start, end, name)`, sorted by start. A symbol without a size ends where the next one
    /// starts (the last such one holds only its first byte).
    funcs: Vec<(u64, u64, String)>,
}

impl Symbols {
    /// The function symbols of an ELF image (none if it has no symbol table or is not ELF).
    pub fn from_elf(image: &[u8]) -> Symbols {
        let Ok(file) = object::File::parse(image) else { return Symbols::default() };
        let mut funcs: Vec<(u64, u64, String)> = file
            .symbols()
            .filter(|s| s.kind() == SymbolKind::Text && s.address() != 0)
            .filter_map(|s| {
                let name = s.name().ok()?;
                Some((s.address(), s.address().saturating_add(s.size()), demangle(name)))
            })
            .collect();
        funcs.sort_by_key(|f| f.0);
        funcs.dedup_by_key(|f| f.0);
        let starts: Vec<u64> = funcs.iter().map(|f| f.0).collect();
        for (i, f) in funcs.iter_mut().enumerate() {
            if f.1 == f.0 {
                f.1 = starts.get(i + 1).copied().unwrap_or(f.0 + 1);
            }
        }
        Symbols { funcs }
    }

    /// The function holding `addr` and the offset into it.
    pub fn lookup(&self, addr: u64) -> Option<(&str, u64)> {
        let i = self.funcs.partition_point(|f| f.0 <= addr).checked_sub(1)?;
        let (start, end, name) = &self.funcs[i];
        (addr < *end).then_some((name.as_str(), addr - start))
    }

    /// How many functions are known.
    pub fn len(&self) -> usize {
        self.funcs.len()
    }

    /// Whether none are.
    pub fn is_empty(&self) -> bool {
        self.funcs.is_empty()
    }
}

/// A Rust symbol demangled without its hash; anything else as it is.
fn demangle(name: &str) -> String {
    match rustc_demangle::try_demangle(name) {
        Ok(d) => format!("{d:#}"),
        Err(_) => name.to_string(),
    }
}

/// One vCPU's counts.
#[derive(Debug, Default)]
struct Counts {
    by_rip: HashMap<u64, u64>,
    samples: u64,
    dropped: u64,
}

/// The sampler's state, shared by its thread and the vCPUs.
#[derive(Debug)]
pub struct Profiler {
    period: Duration,
    hz: u32,
    /// Per vCPU: a sample is wanted at its next exit.
    wanted: Box<[AtomicBool]>,
    counts: Box<[Mutex<Counts>]>,
    symbols: Symbols,
}

impl Profiler {
    /// A profiler of `cpus` vCPUs at `hz`, naming addresses by `symbols`.
    pub fn new(cpus: u32, hz: u32, symbols: Symbols) -> Profiler {
        Profiler {
            period: Duration::from_nanos(1_000_000_000 / u64::from(hz.max(1))),
            hz,
            wanted: (0..cpus).map(|_| AtomicBool::new(false)).collect(),
            counts: (0..cpus).map(|_| Mutex::new(Counts::default())).collect(),
            symbols,
        }
    }

    /// The sampler thread: every period, kicks each vCPU thread that `running` says runs
    /// guest code, until `stop()`.
    pub fn run(&self, threads: &[libc::pthread_t], running: impl Fn(usize) -> bool, stop: impl Fn() -> bool) {
        while !stop() {
            std::thread::park_timeout(self.period);
            for (i, &t) in threads.iter().enumerate().take(self.wanted.len()) {
                if running(i) {
                    self.wanted[i].store(true, Ordering::Release);
                    crate::signals::kick_vcpu(t);
                }
            }
        }
    }

    /// Whether vCPU `cpu` owes a sample (and clears the request).
    pub fn wanted(&self, cpu: u32) -> bool {
        self.wanted.get(cpu as usize).is_some_and(|w| w.swap(false, Ordering::AcqRel))
    }

    /// Counts a sample of vCPU `cpu` at `rip`.
    pub fn record(&self, cpu: u32, rip: u64) {
        let Some(c) = self.counts.get(cpu as usize) else { return };
        let mut c = lock(c);
        c.samples += 1;
        let full = c.by_rip.len() >= MAX_ADDRESSES;
        match c.by_rip.get_mut(&rip) {
            Some(n) => *n += 1,
            None if full => c.dropped += 1,
            None => {
                c.by_rip.insert(rip, 1);
            }
        }
    }

    /// Samples taken on each vCPU.
    pub fn samples(&self) -> Vec<u64> {
        self.counts.iter().map(|c| lock(c).samples).collect()
    }

    /// The report: totals, the functions by samples, the hottest addresses.
    pub fn report(&self) -> String {
        let mut by_rip: HashMap<u64, u64> = HashMap::new();
        let (mut dropped, mut per_cpu) = (0, Vec::with_capacity(self.counts.len()));
        for c in &self.counts {
            let c = lock(c);
            per_cpu.push(c.samples);
            dropped += c.dropped;
            for (&rip, &n) in &c.by_rip {
                *by_rip.entry(rip).or_default() += n;
            }
        }
        let total: u64 = per_cpu.iter().sum();
        let share = |n: u64| if total == 0 { 0.0 } else { n as f64 * 100.0 / total as f64 };
        let mut by_func: HashMap<&str, u64> = HashMap::new();
        for (&rip, &n) in &by_rip {
            *by_func.entry(self.symbols.lookup(rip).map_or("(outside the image's functions)", |s| s.0)).or_default() +=
                n;
        }
        let mut funcs: Vec<(&str, u64)> = by_func.into_iter().collect();
        funcs.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        let mut addrs: Vec<(u64, u64)> = by_rip.into_iter().collect();
        addrs.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));

        let mut out = String::new();
        let cpus: Vec<String> = per_cpu.iter().enumerate().map(|(i, n)| format!("vCPU {i}: {n}")).collect();
        let _ = writeln!(
            out,
            "# guest profile: {total} samples at {} Hz ({}); {dropped} not counted (over {MAX_ADDRESSES} addresses); {} functions known",
            self.hz,
            cpus.join(", "),
            self.symbols.len()
        );
        let _ = writeln!(out, "#\n#  share  samples  function");
        for (name, n) in funcs.iter().take(TOP) {
            let _ = writeln!(out, "{:6.1}% {n:8}  {name}", share(*n));
        }
        let _ = writeln!(out, "#\n#  share  samples  address             function+offset");
        for (rip, n) in addrs.iter().take(TOP) {
            let at = self.symbols.lookup(*rip).map_or_else(|| "?".to_string(), |(f, off)| format!("{f}+{off:#x}"));
            let _ = writeln!(out, "{:6.1}% {n:8}  {rip:#018x}  {at}", share(*n));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn symbols() -> Symbols {
        // As from_elf leaves them: the sizeless `a` runs to `b`.
        Symbols {
            funcs: vec![(0x1000, 0x1100, "a".into()), (0x1100, 0x1180, "b".into()), (0x2000, 0x2400, "c".into())],
        }
    }

    #[test]
    fn addresses_resolve_to_the_function_around_them() {
        let s = symbols();
        assert_eq!(s.lookup(0xfff), None);
        assert_eq!(s.lookup(0x1000), Some(("a", 0)));
        assert_eq!(s.lookup(0x10ff), Some(("a", 0xff)));
        assert_eq!(s.lookup(0x117f), Some(("b", 0x7f)));
        assert_eq!(s.lookup(0x1180), None);
        assert_eq!(s.lookup(0x2345), Some(("c", 0x345)));
        assert_eq!(s.lookup(0x2400), None);
    }

    #[test]
    fn counts_are_bounded_and_the_report_ranks_functions() {
        let p = Profiler::new(2, 100, symbols());
        for _ in 0..3 {
            p.record(0, 0x1110);
        }
        p.record(1, 0x1010);
        p.record(7, 0x1010);
        for rip in 0..MAX_ADDRESSES as u64 + 5 {
            p.record(1, 0x10_0000 + rip);
        }
        assert_eq!(p.samples(), vec![3, MAX_ADDRESSES as u64 + 6]);
        let r = p.report();
        assert!(r.contains(&format!("{} samples at 100 Hz", MAX_ADDRESSES + 9)), "{r}");
        assert!(r.contains("6 not counted"), "{r}");
        let lines: Vec<&str> = r.lines().collect();
        assert!(lines[3].ends_with("(outside the image's functions)"), "{r}");
        assert!(lines[4].ends_with(" b") && lines[4].contains(" 3 "), "{r}");
        assert!(r.contains("0x0000000000001110  b+0x10"), "{r}");
    }

    #[test]
    fn a_request_is_taken_once() {
        let p = Profiler::new(1, 1000, Symbols::default());
        assert!(!p.wanted(0));
        p.wanted[0].store(true, Ordering::Release);
        assert!(p.wanted(0));
        assert!(!p.wanted(0) && !p.wanted(5));
    }
}
