//! VM configuration: plain data, parsed from command-line strings and validated in one place.
//!
//! [`VmConfigBuilder`] collects what the user gave; [`VmConfigBuilder::validate`] checks every rule
//! that needs no host access and produces a [`VmConfig`]. Host-dependent limits (KVM's vCPU limit,
//! the host's NUMA nodes, mappable address space) are checked when the VM is built.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use protocol::{MAX_GUEST_ARGS, MAX_NODES, MAX_VCPUS, PAGE_SIZE};

const _: () = assert!(MAX_VCPUS <= MAX_CPUS_ANY_HOST as usize);

/// Default guest RAM.
pub const DEFAULT_MEMORY: u64 = 512 << 20;
/// Default vCPU count.
pub const DEFAULT_CPUS: u32 = 1;
/// Default fault-around window: frames installed per second-level fault.
pub const DEFAULT_FAULT_AROUND: u64 = 64 << 10;
/// Largest fault-around window (one UFFDIO_COPY from the 2 MiB zero buffer), and the default
/// limit a sequential stream's window grows to.
pub const MAX_FAULT_AROUND: u64 = 2 << 20;
/// Default guest arguments: the stress scenario the default guest runs.
pub const DEFAULT_GUEST_ARGS: &str = "scenario=stress";
/// No x86 KVM build allows more vCPUs than this (`KVM_MAX_VCPUS` is at most 4096); the host's
/// actual limit and the protocol's ([`MAX_VCPUS`]) are checked when the VM is built.
pub const MAX_CPUS_ANY_HOST: u32 = 4096;
/// ACPI SLIT distance of a node to itself.
pub const LOCAL_DISTANCE: u8 = 10;
/// Default distance between two different nodes.
pub const REMOTE_DISTANCE: u8 = 20;

/// Errors in user-supplied configuration. Each message names the offending input.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("invalid size `{0}`: expected a number with an optional K, M, G or T suffix")]
    InvalidSize(String),
    #[error("invalid CPU list `{0}`: expected items like `3` or `0-3` joined by `:`")]
    InvalidCpuList(String),
    #[error("invalid --numa `{spec}`: {reason}")]
    InvalidNuma { spec: String, reason: String },
    #[error("invalid --numa-distance `{spec}`: {reason}")]
    InvalidDistance { spec: String, reason: String },
    #[error("invalid --memory `{spec}`: {reason}")]
    InvalidMemory { spec: String, reason: String },
    #[error("memory size must not be zero")]
    ZeroMemory,
    #[error("memory size {0} is not a multiple of 4 KiB")]
    UnalignedMemory(u64),
    #[error("--cpus must be at least 1")]
    ZeroCpus,
    #[error("--cpus {0}: no x86 KVM host allows more than {MAX_CPUS_ANY_HOST} vCPUs")]
    TooManyCpus(u32),
    #[error("{0} NUMA nodes given; at most {MAX_NODES} are supported")]
    TooManyNodes(usize),
    #[error("NUMA node ids must be dense from 0: node {0} is missing")]
    MissingNode(u32),
    #[error("NUMA node {0} is given twice")]
    DuplicateNode(u32),
    #[error("NUMA node {node}: size {size} is {reason}")]
    BadNodeSize { node: u32, size: u64, reason: &'static str },
    #[error("NUMA node sizes add up to {sum} bytes but --memory size is {memory} bytes")]
    NodeSizesMismatch { sum: u64, memory: u64 },
    #[error("vCPU {cpu} is in both NUMA node {first} and node {second}")]
    OverlappingCpu { cpu: u32, first: u32, second: u32 },
    #[error("vCPU {0} belongs to no NUMA node")]
    MissingCpu(u32),
    #[error("NUMA node {node} lists vCPU {cpu}, but there are only {cpus} vCPUs")]
    CpuOutOfRange { node: u32, cpu: u32, cpus: u32 },
    #[error("--numa-distance names node {0}, which is not defined")]
    UnknownDistanceNode(u32),
    #[error("--numa-distance {a}:{b}={d}: distances are at least 10")]
    DistanceTooSmall { a: u32, b: u32, d: u32 },
    #[error("--numa-distance {a}:{b}={d}: distances are at most 255")]
    DistanceTooLarge { a: u32, b: u32, d: u32 },
    #[error("--numa-distance {a}:{a}={d}: the distance of a node to itself is 10")]
    BadLocalDistance { a: u32, d: u32 },
    #[error("--numa-distance {a}:{b} is given as both {d1} and {d2}")]
    ConflictingDistance { a: u32, b: u32, d1: u8, d2: u8 },
    #[error("--guest-args is {0} bytes long; at most {MAX_GUEST_ARGS} are allowed")]
    GuestArgsTooLong(usize),
    #[error("--guest-args contains a control character")]
    GuestArgsControlChar,
    #[error("--guest-args seed `{0}` is not a number")]
    BadSeed(String),
}

/// A size in bytes, parsed from `SIZE` with an optional binary K/M/G/T suffix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let bad = || ConfigError::InvalidSize(s.to_string());
        let t = s.trim();
        let (digits, shift) = match t.char_indices().last() {
            Some((i, c)) if c.is_ascii_alphabetic() => {
                let shift = match c.to_ascii_uppercase() {
                    'K' => 10,
                    'M' => 20,
                    'G' => 30,
                    'T' => 40,
                    _ => return Err(bad()),
                };
                (&t[..i], shift)
            }
            _ => (t, 0),
        };
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let n: u64 = digits.parse().map_err(|_| bad())?;
        n.checked_mul(1u64 << shift).map(ByteSize).ok_or_else(bad)
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(u32, &str); 4] = [(40, "T"), (30, "G"), (20, "M"), (10, "K")];
        for (shift, unit) in UNITS {
            if self.0 != 0 && self.0.trailing_zeros() >= shift {
                return write!(f, "{}{unit}", self.0 >> shift);
            }
        }
        write!(f, "{}", self.0)
    }
}

/// Parses a CPU list: `A`, `A-B`, or items joined by `:` (`0-3:8`). Returns the sorted ids
/// (duplicates kept, so the caller can report overlaps).
pub fn parse_cpu_list(s: &str) -> Result<Vec<u32>, ConfigError> {
    let bad = || ConfigError::InvalidCpuList(s.to_string());
    let mut cpus = Vec::new();
    for item in s.split(':') {
        let (lo, hi) = match item.split_once('-') {
            Some((a, b)) => (a, b),
            None => (item, item),
        };
        let lo: u32 = lo.trim().parse().map_err(|_| bad())?;
        let hi: u32 = hi.trim().parse().map_err(|_| bad())?;
        if lo > hi || hi >= MAX_CPUS_ANY_HOST {
            return Err(bad());
        }
        cpus.extend(lo..=hi);
    }
    cpus.sort_unstable();
    Ok(cpus)
}

/// How a node's host memory is bound to a host NUMA node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HostPolicy {
    /// `MPOL_PREFERRED`: allocate there when possible, elsewhere otherwise.
    Preferred,
    /// `MPOL_BIND`: only there.
    Bind,
}

/// Host NUMA placement of one guest node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct HostBinding {
    /// Host node id.
    pub node: u32,
    /// Binding policy.
    pub policy: HostPolicy,
}

/// One `--numa` argument.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NumaNodeSpec {
    pub id: u32,
    pub size: u64,
    pub cpus: Vec<u32>,
    pub host: Option<HostBinding>,
}

impl FromStr for NumaNodeSpec {
    type Err = ConfigError;

    fn from_str(spec: &str) -> Result<Self, ConfigError> {
        let bad = |reason: String| ConfigError::InvalidNuma { spec: spec.to_string(), reason };
        let (mut id, mut size, mut cpus, mut host_node, mut policy) = (None, None, None, None, None);
        for kv in spec.split(',') {
            let (k, v) = kv.split_once('=').ok_or_else(|| bad(format!("`{kv}` is not key=value")))?;
            let dup = |k: &str| bad(format!("`{k}` is given twice"));
            match k {
                "node" => {
                    let n = v.parse::<u32>().map_err(|_| bad(format!("node id `{v}` is not a number")))?;
                    if id.replace(n).is_some() {
                        return Err(dup(k));
                    }
                }
                "size" => {
                    let s = v.parse::<ByteSize>().map_err(|e| bad(e.to_string()))?;
                    if size.replace(s.0).is_some() {
                        return Err(dup(k));
                    }
                }
                "cpus" => {
                    let c = parse_cpu_list(v).map_err(|e| bad(e.to_string()))?;
                    if cpus.replace(c).is_some() {
                        return Err(dup(k));
                    }
                }
                "host-node" => {
                    let n = v.parse::<u32>().map_err(|_| bad(format!("host node `{v}` is not a number")))?;
                    if host_node.replace(n).is_some() {
                        return Err(dup(k));
                    }
                }
                "host-policy" => {
                    let p = match v {
                        "preferred" => HostPolicy::Preferred,
                        "bind" => HostPolicy::Bind,
                        _ => return Err(bad(format!("host-policy `{v}` is not `preferred` or `bind`"))),
                    };
                    if policy.replace(p).is_some() {
                        return Err(dup(k));
                    }
                }
                _ => return Err(bad(format!("unknown key `{k}`"))),
            }
        }
        let id = id.ok_or_else(|| bad("`node=ID` is missing".into()))?;
        let size = size.ok_or_else(|| bad("`size=SIZE` is missing".into()))?;
        let host = match (host_node, policy) {
            (Some(node), p) => Some(HostBinding { node, policy: p.unwrap_or(HostPolicy::Preferred) }),
            (None, Some(_)) => return Err(bad("host-policy needs host-node".into())),
            (None, None) => None,
        };
        Ok(NumaNodeSpec { id, size, cpus: cpus.unwrap_or_default(), host })
    }
}

/// One `--numa-distance A:B=D` argument.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DistanceSpec {
    pub a: u32,
    pub b: u32,
    pub distance: u32,
}

impl FromStr for DistanceSpec {
    type Err = ConfigError;

    fn from_str(spec: &str) -> Result<Self, ConfigError> {
        let bad = || ConfigError::InvalidDistance {
            spec: spec.to_string(),
            reason: "expected A:B=D with node ids A, B and a distance D".into(),
        };
        let (nodes, d) = spec.split_once('=').ok_or_else(bad)?;
        let (a, b) = nodes.split_once(':').ok_or_else(bad)?;
        Ok(DistanceSpec {
            a: a.trim().parse().map_err(|_| bad())?,
            b: b.trim().parse().map_err(|_| bad())?,
            distance: d.trim().parse().map_err(|_| bad())?,
        })
    }
}

/// How guest RAM gets host memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backing {
    /// Second-level faults go to the VMM through userfaultfd (the default).
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
/// `size=SIZE[,fault-around=SIZE][,fault-around-max=SIZE][,backing=uffd|demand][,huge-leaves=auto|on|off]`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryArg {
    pub size: Option<u64>,
    pub fault_around: Option<u64>,
    pub fault_around_max: Option<u64>,
    pub backing: Option<Backing>,
    pub huge_leaves: Option<HugeLeaves>,
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
            "backing" => {
                let b = match v {
                    "uffd" => Backing::Uffd,
                    "demand" => Backing::Demand,
                    _ => return Err(bad(format!("backing `{v}` is not `uffd` or `demand`"))),
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

/// A validated NUMA node.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct NumaNode {
    pub id: u32,
    pub size: u64,
    pub cpus: Vec<u32>,
    pub host: Option<HostBinding>,
}

/// The validated NUMA layout.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct NumaConfig {
    pub nodes: Vec<NumaNode>,
    /// `distance[a][b]`, symmetric, 10 on the diagonal.
    pub distance: Vec<Vec<u8>>,
}

impl NumaConfig {
    /// Node of every vCPU, indexed by vCPU id.
    pub fn cpu_nodes(&self, cpus: u32) -> Vec<u32> {
        let mut out = vec![0; cpus as usize];
        for n in &self.nodes {
            for &c in &n.cpus {
                out[c as usize] = n.id;
            }
        }
        out
    }
}

/// The validated VM configuration handed to the VMM.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// Guest ELF image.
    pub kernel: PathBuf,
    /// Guest RAM in bytes (sum of the node sizes).
    pub memory: u64,
    /// Bytes installed per second-level fault (the base window).
    pub fault_around: u64,
    /// Largest window a sequential stream of faults grows to.
    pub fault_around_max: u64,
    /// How guest RAM gets host memory.
    pub backing: Backing,
    /// Whether HUGE allocations get 2 MiB guest leaves.
    pub huge_leaves: HugeLeaves,
    /// vCPU count.
    pub cpus: u32,
    pub numa: NumaConfig,
    /// Passed to the guest verbatim.
    pub guest_args: String,
    /// Seed handed to the guest (`seed=` from the guest args, or chosen by the VMM).
    pub seed: u64,
    /// Where to write the stats JSON at exit.
    pub stats_file: Option<PathBuf>,
    /// Print the stats table at exit.
    pub verbose: bool,
}

/// What the user gave, before validation.
#[derive(Clone, Debug, Default)]
pub struct VmConfigBuilder {
    pub kernel: Option<PathBuf>,
    pub memory: MemoryArg,
    pub cpus: Option<u32>,
    pub numa: Vec<NumaNodeSpec>,
    pub distances: Vec<DistanceSpec>,
    pub guest_args: Option<String>,
    pub stats_file: Option<PathBuf>,
    pub verbose: bool,
}

impl VmConfigBuilder {
    /// Checks every rule that needs no host access and fills in defaults.
    /// `default_kernel` is used when no `--kernel` was given.
    pub fn validate(self, default_kernel: PathBuf) -> Result<VmConfig, ConfigError> {
        let guest_args = self.guest_args.unwrap_or_else(|| DEFAULT_GUEST_ARGS.to_string());
        if guest_args.len() > MAX_GUEST_ARGS {
            return Err(ConfigError::GuestArgsTooLong(guest_args.len()));
        }
        if guest_args.chars().any(char::is_control) {
            return Err(ConfigError::GuestArgsControlChar);
        }
        let seed = match guest_args.split_whitespace().find_map(|kv| kv.strip_prefix("seed=")) {
            Some(s) => s.parse::<u64>().map_err(|_| ConfigError::BadSeed(s.to_string()))?,
            None => default_seed(),
        };

        if let Some(c) = self.cpus {
            if c == 0 {
                return Err(ConfigError::ZeroCpus);
            }
            if c > MAX_CPUS_ANY_HOST {
                return Err(ConfigError::TooManyCpus(c));
            }
        }
        if let Some(m) = self.memory.size {
            check_size_alignment(m)?;
        }

        let (memory, cpus, numa) = if self.numa.is_empty() {
            let memory = self.memory.size.unwrap_or(DEFAULT_MEMORY);
            let cpus = self.cpus.unwrap_or(DEFAULT_CPUS);
            let node = NumaNode { id: 0, size: memory, cpus: (0..cpus).collect(), host: None };
            let numa = NumaConfig { nodes: vec![node], distance: vec![vec![LOCAL_DISTANCE]] };
            if let Some(d) = self.distances.first() {
                let unknown = if d.a != 0 { d.a } else { d.b };
                if unknown != 0 {
                    return Err(ConfigError::UnknownDistanceNode(unknown));
                }
            }
            (memory, cpus, numa)
        } else {
            validate_numa(self.numa, &self.distances, self.memory.size, self.cpus)?
        };

        Ok(VmConfig {
            kernel: self.kernel.unwrap_or(default_kernel),
            memory,
            fault_around: self.memory.fault_around.unwrap_or(DEFAULT_FAULT_AROUND),
            fault_around_max: {
                let base = self.memory.fault_around.unwrap_or(DEFAULT_FAULT_AROUND);
                let max = self.memory.fault_around_max.unwrap_or(MAX_FAULT_AROUND.max(base));
                if max < base {
                    return Err(ConfigError::InvalidMemory {
                        spec: format!("fault-around-max={}", ByteSize(max)),
                        reason: format!("below fault-around={}", ByteSize(base)),
                    });
                }
                max
            },
            backing: self.memory.backing.unwrap_or(Backing::Uffd),
            huge_leaves: self.memory.huge_leaves.unwrap_or(HugeLeaves::Auto),
            cpus,
            numa,
            guest_args,
            seed,
            stats_file: self.stats_file,
            verbose: self.verbose,
        })
    }
}

fn check_size_alignment(size: u64) -> Result<(), ConfigError> {
    if size == 0 {
        return Err(ConfigError::ZeroMemory);
    }
    if !size.is_multiple_of(PAGE_SIZE) {
        return Err(ConfigError::UnalignedMemory(size));
    }
    Ok(())
}

fn validate_numa(
    mut specs: Vec<NumaNodeSpec>,
    distances: &[DistanceSpec],
    memory: Option<u64>,
    cpus: Option<u32>,
) -> Result<(u64, u32, NumaConfig), ConfigError> {
    if specs.len() > MAX_NODES {
        return Err(ConfigError::TooManyNodes(specs.len()));
    }
    specs.sort_by_key(|n| n.id);
    if let Some(w) = specs.windows(2).find(|w| w[0].id == w[1].id) {
        return Err(ConfigError::DuplicateNode(w[0].id));
    }
    for (expect, n) in (0u32..).zip(&specs) {
        if n.id != expect {
            return Err(ConfigError::MissingNode(expect));
        }
    }
    let mut sum = 0u64;
    for n in &specs {
        if n.size == 0 {
            return Err(ConfigError::BadNodeSize { node: n.id, size: n.size, reason: "zero" });
        }
        if n.size % PAGE_SIZE != 0 {
            return Err(ConfigError::BadNodeSize { node: n.id, size: n.size, reason: "not a multiple of 4 KiB" });
        }
        sum = sum.checked_add(n.size).ok_or(ConfigError::BadNodeSize {
            node: n.id,
            size: n.size,
            reason: "too large",
        })?;
    }
    if let Some(m) = memory
        && m != sum
    {
        return Err(ConfigError::NodeSizesMismatch { sum, memory: m });
    }

    // Every vCPU in exactly one node.
    let mut owner: Vec<Option<u32>> = Vec::new();
    for n in &specs {
        for &cpu in &n.cpus {
            let c = cpu as usize;
            if owner.len() <= c {
                owner.resize(c + 1, None);
            }
            if let Some(first) = owner[c] {
                return Err(ConfigError::OverlappingCpu { cpu, first, second: n.id });
            }
            owner[c] = Some(n.id);
        }
    }
    let cpus = match cpus {
        Some(c) => {
            for n in &specs {
                if let Some(&cpu) = n.cpus.iter().find(|&&cpu| cpu >= c) {
                    return Err(ConfigError::CpuOutOfRange { node: n.id, cpu, cpus: c });
                }
            }
            c
        }
        None => {
            // parse_cpu_list bounds ids, so the count fits.
            let c = u32::try_from(owner.len()).unwrap_or(u32::MAX);
            if c == 0 {
                return Err(ConfigError::MissingCpu(0));
            }
            if c > MAX_CPUS_ANY_HOST {
                return Err(ConfigError::TooManyCpus(c));
            }
            c
        }
    };
    if let Some(missing) = (0..cpus).find(|&c| owner.get(c as usize).copied().flatten().is_none()) {
        return Err(ConfigError::MissingCpu(missing));
    }

    let nr = specs.len();
    let mut distance = vec![vec![REMOTE_DISTANCE; nr]; nr];
    for (i, row) in distance.iter_mut().enumerate() {
        row[i] = LOCAL_DISTANCE;
    }
    let mut given: Vec<Vec<Option<u8>>> = vec![vec![None; nr]; nr];
    for d in distances {
        for x in [d.a, d.b] {
            if x as usize >= nr {
                return Err(ConfigError::UnknownDistanceNode(x));
            }
        }
        if d.distance < u32::from(LOCAL_DISTANCE) {
            return Err(ConfigError::DistanceTooSmall { a: d.a, b: d.b, d: d.distance });
        }
        let v =
            u8::try_from(d.distance).map_err(|_| ConfigError::DistanceTooLarge { a: d.a, b: d.b, d: d.distance })?;
        if d.a == d.b && v != LOCAL_DISTANCE {
            return Err(ConfigError::BadLocalDistance { a: d.a, d: d.distance });
        }
        let (a, b) = (d.a as usize, d.b as usize);
        if let Some(prev) = given[a][b]
            && prev != v
        {
            return Err(ConfigError::ConflictingDistance { a: d.a, b: d.b, d1: prev, d2: v });
        }
        given[a][b] = Some(v);
        given[b][a] = Some(v);
        distance[a][b] = v;
        distance[b][a] = v;
    }

    let nodes = specs.into_iter().map(|s| NumaNode { id: s.id, size: s.size, cpus: s.cpus, host: s.host }).collect();
    Ok((sum, cpus, NumaConfig { nodes, distance }))
}

/// A seed for runs that did not ask for one: printed in the stats so the run can be repeated.
fn default_seed() -> u64 {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    // Fold the 128-bit nanosecond count; only variety matters here.
    #[allow(clippy::cast_possible_truncation)]
    let (lo, hi) = (t as u64, (t >> 64) as u64);
    lo ^ hi ^ u64::from(std::process::id()).rotate_left(32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(numa: &[&str], dist: &[&str], memory: Option<&str>, cpus: Option<u32>) -> Result<VmConfig, ConfigError> {
        let b = VmConfigBuilder {
            memory: memory.map(|m| parse_memory_arg(m).unwrap()).unwrap_or_default(),
            cpus,
            numa: numa.iter().map(|s| s.parse().unwrap()).collect(),
            distances: dist.iter().map(|s| s.parse().unwrap()).collect(),
            ..Default::default()
        };
        b.validate(PathBuf::from("k"))
    }

    #[test]
    fn sizes() {
        assert_eq!("4096".parse::<ByteSize>().unwrap().0, 4096);
        assert_eq!("512M".parse::<ByteSize>().unwrap().0, 512 << 20);
        assert_eq!("64g".parse::<ByteSize>().unwrap().0, 64 << 30);
        assert_eq!("2T".parse::<ByteSize>().unwrap().0, 2 << 40);
        for bad in ["", "M", "12Q", "-1", "1.5G", "99999999999999999999", "20000000T"] {
            assert!(bad.parse::<ByteSize>().is_err(), "{bad}");
        }
        assert_eq!(ByteSize(512 << 20).to_string(), "512M");
        assert_eq!(ByteSize(4097).to_string(), "4097");
    }

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("3").unwrap(), vec![3]);
        assert_eq!(parse_cpu_list("0-3:8").unwrap(), vec![0, 1, 2, 3, 8]);
        for bad in ["", "a", "3-1", "1-", ":", "0,1"] {
            assert!(parse_cpu_list(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn defaults() {
        let c = build(&[], &[], None, None).unwrap();
        assert_eq!(c.memory, DEFAULT_MEMORY);
        assert_eq!(c.cpus, 1);
        assert_eq!(c.numa.nodes.len(), 1);
        assert_eq!(c.guest_args, DEFAULT_GUEST_ARGS);
    }

    #[test]
    fn two_nodes() {
        let c = build(
            &["node=1,size=256M,cpus=1", "node=0,size=256M,cpus=0,host-node=0"],
            &["0:1=30"],
            Some("size=512M"),
            Some(2),
        )
        .unwrap();
        assert_eq!(c.numa.nodes[0].cpus, vec![0]);
        assert_eq!(c.numa.nodes[1].cpus, vec![1]);
        assert_eq!(c.numa.distance, vec![vec![10, 30], vec![30, 10]]);
        assert_eq!(c.numa.nodes[0].host, Some(HostBinding { node: 0, policy: HostPolicy::Preferred }));
        assert_eq!(c.numa.cpu_nodes(2), vec![0, 1]);
    }

    #[test]
    fn numa_errors() {
        use ConfigError::*;
        let n2 = ["node=0,size=256M,cpus=0", "node=1,size=256M,cpus=1"];
        assert!(matches!(build(&n2, &[], Some("size=1G"), None), Err(NodeSizesMismatch { .. })));
        assert!(matches!(
            build(&["node=0,size=256M,cpus=0-1", "node=1,size=256M,cpus=1"], &[], None, None),
            Err(OverlappingCpu { cpu: 1, .. })
        ));
        assert_eq!(build(&n2, &[], None, Some(3)).unwrap_err(), MissingCpu(2));
        assert!(matches!(build(&n2, &[], None, Some(1)), Err(CpuOutOfRange { cpu: 1, .. })));
        assert_eq!(build(&n2, &["0:2=20"], None, None).unwrap_err(), UnknownDistanceNode(2));
        assert!(matches!(build(&n2, &["0:1=5"], None, None), Err(DistanceTooSmall { .. })));
        assert!(matches!(build(&n2, &["0:1=300"], None, None), Err(DistanceTooLarge { .. })));
        assert!(matches!(build(&n2, &["0:0=20"], None, None), Err(BadLocalDistance { .. })));
        assert!(matches!(build(&n2, &["0:1=20", "1:0=30"], None, None), Err(ConflictingDistance { .. })));
        assert_eq!(
            build(&["node=0,size=256M,cpus=0", "node=2,size=256M,cpus=1"], &[], None, None).unwrap_err(),
            MissingNode(1)
        );
        assert_eq!(
            build(&["node=0,size=256M,cpus=0", "node=0,size=256M,cpus=1"], &[], None, None).unwrap_err(),
            DuplicateNode(0)
        );
        assert!(matches!(build(&["node=0,size=5000,cpus=0"], &[], None, None), Err(BadNodeSize { .. })));
        assert!("node=0,cpus=0".parse::<NumaNodeSpec>().is_err());
        assert!("node=0,size=1G,bogus=1".parse::<NumaNodeSpec>().is_err());
        assert!("node=0,size=1G,host-policy=bind".parse::<NumaNodeSpec>().is_err());
        assert!("node=0,size=1G,host-node=0,host-policy=strict".parse::<NumaNodeSpec>().is_err());
    }

    #[test]
    fn scalar_errors() {
        assert_eq!(build(&[], &[], Some("size=0"), None).unwrap_err(), ConfigError::ZeroMemory);
        assert!(matches!(build(&[], &[], Some("size=4097"), None), Err(ConfigError::UnalignedMemory(4097))));
        assert_eq!(build(&[], &[], None, Some(0)).unwrap_err(), ConfigError::ZeroCpus);
        assert!(parse_memory_arg("512M").is_err());
        let m = parse_memory_arg("size=1G,fault-around=2M,backing=demand").unwrap();
        assert_eq!(
            m,
            MemoryArg {
                size: Some(1 << 30),
                fault_around: Some(2 << 20),
                fault_around_max: None,
                backing: Some(Backing::Demand),
                huge_leaves: None
            }
        );
        let small = VmConfigBuilder {
            memory: parse_memory_arg("fault-around=64K,fault-around-max=16K").unwrap(),
            ..Default::default()
        };
        assert!(small.validate("k".into()).is_err());
        assert_eq!(parse_memory_arg("huge-leaves=on").unwrap().huge_leaves, Some(HugeLeaves::On));
        assert!(parse_memory_arg("huge-leaves=maybe").is_err());
        assert!(parse_memory_arg("fault-around=3K").is_err());
        assert!(parse_memory_arg("fault-around=4M").is_err());
        assert!(parse_memory_arg("backing=swap").is_err());
        assert!(parse_memory_arg("size=1G,size=2G").is_err());
        let long = VmConfigBuilder { guest_args: Some("x".repeat(MAX_GUEST_ARGS + 1)), ..Default::default() };
        assert!(matches!(long.validate("k".into()), Err(ConfigError::GuestArgsTooLong(_))));
        let seeded = VmConfigBuilder { guest_args: Some("scenario=x seed=42".into()), ..Default::default() };
        assert_eq!(seeded.validate("k".into()).unwrap().seed, 42);
    }
}
