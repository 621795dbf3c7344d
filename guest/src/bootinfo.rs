//! The `BootInfo` block the VMM maps read-only at `layout::BOOT_INFO_VA`.

use protocol::{BOOT_MAGIC, BOOT_VERSION, BootInfo, MAX_GUEST_ARGS, MAX_NODES, MAX_VCPUS, layout::BOOT_INFO_VA};

/// The block, after checking that it is one this guest understands.
pub fn get() -> Result<&'static BootInfo, &'static str> {
    // SAFETY: the VMM maps a BootInfo (plain integers, any bit pattern valid) read-only at
    // BOOT_INFO_VA for the guest's whole life.
    let bi = unsafe { &*(BOOT_INFO_VA as *const BootInfo) };
    if bi.magic != BOOT_MAGIC {
        return Err("bad BootInfo magic");
    }
    if bi.version != BOOT_VERSION {
        return Err("unsupported BootInfo version");
    }
    if bi.nr_vcpus == 0 || bi.nr_vcpus as usize > MAX_VCPUS {
        return Err("bad vCPU count");
    }
    if bi.nr_nodes == 0 || bi.nr_nodes as usize > MAX_NODES {
        return Err("bad node count");
    }
    if bi.args_len as usize > MAX_GUEST_ARGS || core::str::from_utf8(&bi.args[..bi.args_len as usize]).is_err() {
        return Err("bad guest args");
    }
    Ok(bi)
}

/// The guest arguments.
pub fn args(bi: &BootInfo) -> &str {
    core::str::from_utf8(&bi.args[..bi.args_len as usize]).unwrap_or("")
}

/// Checks the layout's internal consistency: node sizes add up, every vCPU is in exactly one
/// node (and `cpu_node` agrees), distances are symmetric with 10 on the diagonal.
pub fn check_layout(bi: &BootInfo) -> Result<(), &'static str> {
    let nodes = &bi.nodes[..bi.nr_nodes as usize];
    let mut total = 0;
    for (i, n) in nodes.iter().enumerate() {
        if n.id as usize != i || n.nr_ranges == 0 || n.nr_ranges as usize > n.ranges.len() {
            return Err("bad node entry");
        }
        let sum: u64 = n.ranges[..n.nr_ranges as usize].iter().map(|r| r.len).sum();
        if sum != n.mem_bytes {
            return Err("node ranges do not add up to the node size");
        }
        total += sum;
    }
    if total != bi.mem_bytes {
        return Err("node sizes do not add up to guest memory");
    }
    for cpu in 0..bi.nr_vcpus as usize {
        let owners = nodes.iter().filter(|n| n.cpus[cpu / 64] & (1 << (cpu % 64)) != 0).count();
        if owners != 1
            || !nodes.iter().any(|n| n.id == u32::from(bi.cpu_node[cpu]) && n.cpus[cpu / 64] & (1 << (cpu % 64)) != 0)
        {
            return Err("a vCPU is not in exactly one node");
        }
    }
    for a in 0..nodes.len() {
        if bi.distance[a][a] != 10 {
            return Err("local distance is not 10");
        }
        for b in 0..nodes.len() {
            if bi.distance[a][b] != bi.distance[b][a] || bi.distance[a][b] < 10 {
                return Err("distances are not symmetric");
            }
        }
    }
    Ok(())
}
