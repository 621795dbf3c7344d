//! `scenario=boot`: print the layout the VMM described, check it, rendezvous all vCPUs.

use protocol::exit;

use super::{Ctx, fail};
use crate::{arch, bootinfo, print, println};

pub fn run(ctx: &Ctx) {
    let bi = ctx.bi;
    if ctx.cpu == 0 {
        println!(
            "guest: {} vCPUs, {} MiB in {} NUMA nodes, seed {}, args \"{}\"",
            bi.nr_vcpus,
            bi.mem_bytes >> 20,
            bi.nr_nodes,
            bi.seed,
            ctx.args.0
        );
        for n in &bi.nodes[..bi.nr_nodes as usize] {
            // Human-readable, then machine-readable for the VMM's stats.
            print!("guest: node {}: {} MiB at", n.id, n.mem_bytes >> 20);
            for r in &n.ranges[..n.nr_ranges as usize] {
                print!(" {:#x}-{:#x}", r.start, r.start + r.len);
            }
            println!();
            print!("@result kind=layout node={} mem={} ranges=", n.id, n.mem_bytes);
            for (i, r) in n.ranges[..n.nr_ranges as usize].iter().enumerate() {
                print!("{}{:#x}+{:#x}", if i > 0 { "," } else { "" }, r.start, r.len);
            }
            print!(" cpus=");
            let mut first = true;
            for cpu in 0..bi.nr_vcpus as usize {
                if n.cpus[cpu / 64] & (1 << (cpu % 64)) != 0 {
                    print!("{}{cpu}", if first { "" } else { "," });
                    first = false;
                }
            }
            print!(" distance=");
            for b in 0..bi.nr_nodes as usize {
                print!("{}{}", if b > 0 { "," } else { "" }, bi.distance[n.id as usize][b]);
            }
            println!();
        }
        if let Err(e) = bootinfo::check_layout(bi) {
            println!("guest: inconsistent layout: {e}");
            fail(exit::VERIFY_FAILED);
        }
    }
    ctx.barrier();
    println!("guest: cpu {} (node {}) is up", ctx.cpu, bi.cpu_node[ctx.cpu as usize]);
    ctx.barrier();
    if ctx.cpu == 0 {
        println!(
            "@result scenario=boot vcpus={} nodes={} tsc_khz={} t={}",
            bi.nr_vcpus,
            bi.nr_nodes,
            bi.tsc_khz,
            arch::rdtsc()
        );
    }
}
