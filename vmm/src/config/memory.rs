//! The `--memory` argument.

use protocol::PAGE_SIZE;

use super::{ByteSize, ConfigError, MAX_FAULT_AROUND};

/// How guest RAM gets host memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backing {
    /// Second-level faults go to the VMM through userfaultfd, except that without swap, once
    /// first touches are seen to be scattered, the kernel backs missing pages itself (the
    /// default; see `FaultHandler::allow_kernel_first_touch`).
    Auto,
    /// Every second-level fault goes to the VMM through userfaultfd.
    Uffd,
    /// Kernel demand paging, no userfaultfd: for comparison only (translation invalidations
    /// then use an mprotect toggle, racy with concurrent writers).
    Demand,
}

/// Whether HUGE allocations get 2 MiB guest leaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HugeLeaves {
    /// On where KVM uses two-dimensional paging (EPT/NPT), off under shadow paging.
    Auto,
    On,
    Off,
}

/// The `--memory` argument:
/// `size=SIZE[,fault-around=SIZE][,fault-around-max=SIZE][,backing=auto|uffd|demand][,huge-leaves=auto|on|off]`
/// `[,rings=on|off]`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryArg {
    pub size: Option<u64>,
    pub fault_around: Option<u64>,
    pub fault_around_max: Option<u64>,
    pub backing: Option<Backing>,
    pub huge_leaves: Option<HugeLeaves>,
    /// Whether a VMM thread services the slab rings (off: only SLAB_EXCHANGE exits do).
    pub rings: Option<bool>,
}

/// Parses `--memory`.
pub fn parse_memory_arg(spec: &str) -> Result<MemoryArg, ConfigError> {
    let bad = |reason: String| ConfigError::InvalidMemory { spec: spec.to_string(), reason };
    let mut m = MemoryArg::default();
    for kv in spec.split(',') {
        let Some((k, v)) = kv.split_once('=') else {
            return Err(bad(format!("`{kv}` is not key=value (expected size=SIZE)")));
        };
        let dup = match k {
            "size" => m.size.replace(v.parse::<ByteSize>().map_err(|e| bad(e.to_string()))?.0).is_some(),
            "fault-around" | "fault-around-max" => {
                let fa = v.parse::<ByteSize>().map_err(|e| bad(e.to_string()))?.0;
                if !fa.is_power_of_two() || !(PAGE_SIZE..=MAX_FAULT_AROUND).contains(&fa) {
                    return Err(bad(format!("{k} {v} is not a power of two from 4K to 2M")));
                }
                if k == "fault-around" { m.fault_around.replace(fa) } else { m.fault_around_max.replace(fa) }.is_some()
            }
            "huge-leaves" => {
                let h = match v {
                    "auto" => HugeLeaves::Auto,
                    "on" => HugeLeaves::On,
                    "off" => HugeLeaves::Off,
                    _ => return Err(bad(format!("huge-leaves `{v}` is not `auto`, `on` or `off`"))),
                };
                m.huge_leaves.replace(h).is_some()
            }
            "rings" => {
                let on = match v {
                    "on" => true,
                    "off" => false,
                    _ => return Err(bad(format!("rings `{v}` is not `on` or `off`"))),
                };
                m.rings.replace(on).is_some()
            }
            "backing" => {
                let b = match v {
                    "auto" => Backing::Auto,
                    "uffd" => Backing::Uffd,
                    "demand" => Backing::Demand,
                    _ => return Err(bad(format!("backing `{v}` is not `auto`, `uffd` or `demand`"))),
                };
                m.backing.replace(b).is_some()
            }
            _ => return Err(bad(format!("unknown key `{k}`"))),
        };
        if dup {
            return Err(bad(format!("`{k}` is given twice")));
        }
    }
    Ok(m)
}
