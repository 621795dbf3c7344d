//! Guest allocations plus frees per second against raw exits per second, measured in the same
//! VM: the guest times `out` to the no-op port, then alloc/free pairs through its global
//! allocator (per-vCPU magazines on the VMM's slabs). The ratio is how many allocator operations
//! fit in the time of one exit. Also prints allocator operations per exit (a count).
//!
//! `cargo bench -p vmm --bench slab_fastpath` (after `images/build.sh`; `make bench` does both)

mod common;

fn run(size: u64) -> (u64, u64, u64) {
    let r = common::run_scenario(
        "size=512M",
        &format!("scenario=fastpath size={size} ops=1000000 exits=20000"),
        "fastpath",
    );
    let g = |k: &str| r[k].as_u64().unwrap_or_else(|| panic!("{k}"));
    (g("exit_ps"), g("op_ps"), g("ops_per_exit"))
}

fn main() {
    let quick = !std::env::args().any(|a| a == "--bench");
    common::build_guest();
    let runs = if quick { 1 } else { 5 };
    println!("guest allocator ops/s vs raw exits/s in the same VM, median of {runs} runs");
    println!("{:<10} {:>12} {:>12} {:>14} {:>10}", "size", "exit ns", "op ns", "ops per exit", "ratio");
    for size in [16u64, 64, 256, 1024, 4096] {
        let mut rs: Vec<(u64, u64, u64)> = (0..runs).map(|_| run(size)).collect();
        rs.sort_by_key(|r| r.1);
        let (exit, op, per_exit) = rs[rs.len() / 2];
        #[allow(clippy::cast_precision_loss)]
        let ratio = exit as f64 / op.max(1) as f64;
        #[allow(clippy::cast_precision_loss)]
        let (exit_ns, op_ns) = (exit as f64 / 1000.0, op as f64 / 1000.0);
        println!("{size:<10} {exit_ns:>12.0} {op_ns:>12.3} {per_exit:>14} {ratio:>9.0}x");
    }
    println!("ratio = (allocator ops per second) / (raw exits per second); goal >= 20x");
}
