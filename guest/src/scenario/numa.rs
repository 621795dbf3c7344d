//! `scenario=numa` (two nodes or more): every policy places every page where it says, checked
//! page by page with batched TRANSLATE calls.

use protocol::exit;
use protocol::memcall::{ALL_NODES, op, policy};
use protocol::status::{ENOMEM, OK};

use super::util::node_of_gpa;
use super::{Ctx, fail};
use crate::mem::{self, Batch, Error, mk};
use crate::println;

/// Nodes of every page of `[va, va + len)`, counted per node (as the VMM and BootInfo both say).
fn nodes_of(ctx: &Ctx, va: u64, len: u64, counts: &mut [u64; 8]) -> u64 {
    let mut mismatches = 0;
    let pages = len / 4096;
    let mut done = 0;
    while done < pages {
        let n = (pages - done).min(mem::BATCH as u64);
        let mut b = Batch::new();
        for p in 0..n {
            b.push(mk(op::TRANSLATE, 0, [va + (done + p) * 4096, 0, 0, 0]));
        }
        b.send();
        for i in 0..n as usize {
            let r = Batch::result(i);
            if r.status != OK || node_of_gpa(ctx.bi, r.ret[0]).map(u64::from) != Some(r.ret[1]) {
                mismatches += 1;
            } else {
                counts[r.ret[1] as usize % 8] += 1;
            }
        }
        done += n;
    }
    mismatches
}

pub fn run(ctx: &Ctx) {
    if ctx.bi.nr_nodes < 2 {
        if ctx.cpu == 0 {
            println!("@result scenario=numa skipped=1 ok=1");
        }
        return;
    }
    let mut checks = super::util::Checks::new("numa");
    let mut check = |cond: bool, what: &str| checks.check(cond, what);
    // LOCAL on every vCPU lands on that vCPU's node.
    let mut c = [0u64; 8];
    let (va, len) = mem::alloc(1 << 20, policy::LOCAL, 0, 0).expect("alloc");
    check(nodes_of(ctx, va, len, &mut c) == 0, "translate disagrees with BootInfo");
    check(c[ctx.bi.cpu_node[ctx.cpu as usize] as usize] == len / 4096, "LOCAL memory is not on the vCPU's node");
    let _ = mem::free(va);
    ctx.barrier();
    if ctx.cpu != 0 {
        ctx.barrier();
        return;
    }

    // BIND(1): all on node 1.
    let mut c = [0u64; 8];
    let (va, len) = mem::alloc(8 << 20, policy::BIND, 1, 0).expect("alloc");
    check(nodes_of(ctx, va, len, &mut c) == 0, "translate disagrees with BootInfo");
    check(c[1] == len / 4096, "BIND(1) memory outside node 1");
    let bind_pages = c[1];
    let _ = mem::free(va);

    // INTERLEAVE: pages alternate between the nodes.
    let mut c = [0u64; 8];
    let (va, len) = mem::alloc(256 * 4096, policy::INTERLEAVE, 0, 0).expect("alloc");
    check(nodes_of(ctx, va, len, &mut c) == 0, "translate disagrees with BootInfo");
    let per = len / 4096 / u64::from(ctx.bi.nr_nodes);
    let balanced = c[..ctx.bi.nr_nodes as usize].iter().all(|&n| n.abs_diff(per) <= 1);
    check(balanced, "INTERLEAVE is not balanced");
    let (i0, i1) = (c[0], c[1]);
    let _ = mem::free(va);

    // Fill node 1 with BIND(1) until ENOMEM; PREFERRED(1) then falls back to node 0.
    let mut held = [0u64; 64];
    let mut n = 0;
    let mut size = 16u64 << 20;
    while size >= 4096 && n < held.len() {
        match mem::alloc(size, policy::BIND, 1, 0) {
            Ok((v, _)) => {
                held[n] = v;
                n += 1;
            }
            Err(Error(ENOMEM)) => size /= 2,
            Err(_) => break,
        }
    }
    let node1 = mem::stats(1).unwrap_or_default();
    check(node1.free_frames < 64, "node 1 did not fill up");
    check(mem::alloc(4096, policy::BIND, 1, 0) == Err(Error(ENOMEM)), "BIND(1) still succeeds on a full node");
    let mut c = [0u64; 8];
    let fallback = match mem::alloc(1 << 20, policy::PREFERRED, 1, 0) {
        Ok((v, l)) => {
            check(nodes_of(ctx, v, l, &mut c) == 0, "translate disagrees with BootInfo");
            let _ = mem::free(v);
            c[0]
        }
        Err(_) => 0,
    };
    check(fallback == 256, "PREFERRED(1) did not fall back to node 0");
    for &v in &held[..n] {
        let _ = mem::free(v);
    }
    let all = mem::stats(ALL_NODES).unwrap_or_default();
    println!(
        "@result scenario=numa bind_pages={bind_pages} interleave_node0={i0} interleave_node1={i1} preferred_fallback_pages={fallback} free_frames_end={} ok={}",
        all.free_frames,
        u8::from(checks.ok)
    );
    if !checks.ok {
        fail(exit::VERIFY_FAILED);
    }
    ctx.barrier();
}
