//! Guest-visible first-touch cost per 4 KiB page: second-level faults served by userfaultfd
//! (`backing=uffd`) with fixed fault-around windows from 4 KiB to 2 MiB, the adaptive window
//! (grows for sequential streams), memory populated up front (POPULATE), the default backing
//! (`auto`: the adaptive window, and kernel demand paging for a chunk of RAM once faults there
//! are scattered), and the same memory under kernel demand paging (no userfaultfd). Two patterns: every page in order, and 10% of the pages at
//! random (where big windows install memory nobody touches). Each configuration boots a guest
//! running `scenario=touch`, which times one write per page with the TSC; configurations are
//! interleaved run by run, medians reported, with ratios against demand paging and the frames
//! installed per page touched.
//!
//! `cargo bench -p vmm --bench first_touch` (after `images/build.sh`; `make bench` does both)

mod common;

use protocol::memcall::flags;

struct Config {
    name: &'static str,
    memory: &'static str,
    flags: u32,
}

fn run(c: &Config, size_mib: u64, pct: u64, rounds: u64) -> (u64, u64, f64) {
    common::first_touch(&format!("size=1G,{}", c.memory), size_mib, c.flags, pct, rounds)
}

fn main() {
    let quick = !std::env::args().any(|a| a == "--bench");
    common::build_guest();
    let (size, runs) = if quick { (16, 1) } else { (256, 5) };
    let contiguous = flags::CONTIGUOUS;
    let configs = [
        Config { name: "kernel demand paging (no uffd)", memory: "backing=demand", flags: contiguous },
        Config {
            name: "uffd, fixed 4K",
            memory: "backing=uffd,fault-around=4K,fault-around-max=4K",
            flags: contiguous,
        },
        Config {
            name: "uffd, fixed 64K",
            memory: "backing=uffd,fault-around=64K,fault-around-max=64K",
            flags: contiguous,
        },
        Config {
            name: "uffd, fixed 256K",
            memory: "backing=uffd,fault-around=256K,fault-around-max=256K",
            flags: contiguous,
        },
        Config {
            name: "uffd, fixed 2M",
            memory: "backing=uffd,fault-around=2M,fault-around-max=2M",
            flags: contiguous,
        },
        Config {
            name: "uffd, adaptive 4K..2M",
            memory: "backing=uffd,fault-around=4K,fault-around-max=2M",
            flags: contiguous,
        },
        Config {
            name: "uffd, adaptive 64K..2M",
            memory: "backing=uffd,fault-around=64K,fault-around-max=2M",
            flags: contiguous,
        },
        Config { name: "auto, 64K..2M (the default)", memory: "backing=auto", flags: contiguous },
        Config {
            name: "uffd, POPULATE at allocation",
            memory: "backing=uffd,fault-around=64K",
            flags: contiguous | flags::POPULATE,
        },
    ];
    let all: Vec<&Config> = configs.iter().collect();
    // Once the default backing has handed scattered first touches over to the kernel, they
    // cost what the kernel's do; the first pass pays for finding out that they are scattered.
    let steady: Vec<&Config> =
        configs.iter().filter(|c| c.memory == "backing=demand" || c.memory == "backing=auto").collect();
    for (pattern, pct, rounds, configs) in [
        ("every page in order", 100, 1, &all),
        ("10% of pages at random", 10, 1, &all),
        ("10% of pages at random, the fastest of 3 passes in one VM", 10, 3, &steady),
    ] {
        let mut results: Vec<Vec<(u64, u64, f64)>> = vec![Vec::new(); configs.len()];
        for _ in 0..runs {
            for (i, c) in configs.iter().enumerate() {
                results[i].push(run(c, size, pct, rounds));
            }
        }
        println!("first touch of {size} MiB, {pattern} (one write per touched page), median of {runs} runs");
        println!(
            "{:<36} {:>12} {:>10} {:>12} {:>18}",
            "configuration", "ns per page", "faults", "vs demand", "installed/touched"
        );
        let median = |v: &Vec<(u64, u64, f64)>| {
            let mut ns: Vec<u64> = v.iter().map(|r| r.0).collect();
            ns.sort_unstable();
            (ns[ns.len() / 2], v[0].1, v[0].2)
        };
        let base = median(&results[0]).0.max(1);
        for (c, r) in configs.iter().zip(&results) {
            let (ns, faults, inflation) = median(r);
            #[allow(clippy::cast_precision_loss)]
            let ratio = base as f64 / ns.max(1) as f64;
            println!("{:<36} {ns:>12} {faults:>10} {ratio:>11.2}x {inflation:>18.2}", c.name);
        }
        println!();
    }
    println!(
        "vs demand above 1: faster than kernel demand paging; installed/touched: frames made resident (by the VMM's faults or the kernel's) per page the guest touched (1.00 = no memory wasted)"
    );
}
