//! VM configuration: plain data, parsed from command-line strings and validated in one place.
//!
//! [`VmConfigBuilder`] collects what the user gave; [`VmConfigBuilder::validate`] checks every rule
//! that needs no host access and produces a [`VmConfig`]. Host-dependent limits (KVM's vCPU limit,
//! the host's NUMA nodes, mappable address space) are checked when the VM is built.

mod balloon;
mod cpus;
mod memory;
mod numa;
mod profile;
mod size;
mod swap;

use std::path::PathBuf;

use protocol::{MAX_GUEST_ARGS, MAX_NODES, MAX_VCPUS, PAGE_SIZE};

pub use balloon::{BalloonConfig, MAX_STATS_INTERVAL_S, parse_balloon_arg};
pub use cpus::{Affinity, CpusArg, Placement, parse_cpus_arg, place};
pub use memory::{Backing, HugeLeaves, MemoryArg, parse_memory_arg};
pub use numa::{DistanceSpec, HostBinding, HostPolicy, NumaConfig, NumaNode, NumaNodeSpec, parse_cpu_list};
pub use profile::{ProfileConfig, parse_profile_arg};
pub use size::ByteSize;
pub use swap::{
    MIN_SWAP_LIMIT, SwapConfig, SwapPolicy, check_limit as check_swap_limit, default_swap_dir, parse_swap_arg,
};

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
    #[error("invalid --cpus `{spec}`: {reason}")]
    InvalidCpus { spec: String, reason: String },
    #[error(
        "--cpus affinity: host CPU {cpu} is not one this process may run on (allowed: {})",
        numa::format_cpu_list(allowed)
    )]
    UnavailableHostCpu { cpu: u32, allowed: Vec<u32> },
    #[error("--cpus affinity names vCPU {vcpu}, but the VM has {cpus} vCPUs")]
    AffinityCpuOutOfRange { vcpu: u32, cpus: u32 },
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
    #[error("--seccomp `{0}` is not `on` or `off`")]
    InvalidSeccomp(String),
    #[error("invalid --balloon `{spec}`: {reason}")]
    InvalidBalloon { spec: String, reason: String },
    #[error("--balloon size {size} is larger than the guest's {memory} bytes of RAM")]
    BalloonTooLarge { size: u64, memory: u64 },
    #[error("invalid --profile `{spec}`: {reason}")]
    InvalidProfile { spec: String, reason: String },
    #[error("invalid --swap `{spec}`: {reason}")]
    InvalidSwap { spec: String, reason: String },
    #[error("--swap needs userfaultfd: it cannot be used with --memory backing=demand")]
    SwapNeedsUffd,
    #[error("--api-socket: the path is empty")]
    EmptyApiSocket,
}

/// The guest image to boot.
#[derive(Clone, Debug)]
pub enum Kernel {
    /// An ELF file (`--kernel PATH`).
    Path(PathBuf),
    /// An image carried inside the `vmm` binary (the default guest).
    Embedded(&'static [u8]),
}

impl std::fmt::Display for Kernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Kernel::Path(p) => write!(f, "{}", p.display()),
            Kernel::Embedded(bytes) => write!(f, "(built-in default guest, {} KiB)", bytes.len() / 1024),
        }
    }
}

/// The validated VM configuration handed to the VMM.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// Guest ELF image.
    pub kernel: Kernel,
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
    /// Whether a VMM thread services the slab rings without exits.
    pub rings: bool,
    /// vCPU count.
    pub cpus: u32,
    /// Where the vCPU threads (and the rings' service) run.
    pub affinity: Affinity,
    pub numa: NumaConfig,
    /// Passed to the guest verbatim.
    pub guest_args: String,
    /// Seed handed to the guest (`seed=` from the guest args, or chosen by the VMM).
    pub seed: u64,
    /// Where to write the stats JSON at exit.
    pub stats_file: Option<PathBuf>,
    /// Print the stats table at exit.
    pub verbose: bool,
    /// Run the VMM's threads under seccomp filters.
    pub seccomp: bool,
    /// The balloon at boot.
    pub balloon: BalloonConfig,
    /// Host-side swap (`None`: off).
    pub swap: Option<SwapConfig>,
    /// Where the control API listens.
    pub api_socket: Option<PathBuf>,
    /// Sampling of the guest's instruction pointer (`None`: off).
    pub profile: Option<ProfileConfig>,
}

/// What the user gave, before validation.
#[derive(Clone, Debug, Default)]
pub struct VmConfigBuilder {
    pub kernel: Option<PathBuf>,
    pub memory: MemoryArg,
    pub cpus: Option<u32>,
    pub affinity: Affinity,
    pub numa: Vec<NumaNodeSpec>,
    pub distances: Vec<DistanceSpec>,
    pub guest_args: Option<String>,
    pub stats_file: Option<PathBuf>,
    pub verbose: bool,
    /// `--seccomp on|off`.
    pub seccomp: Option<String>,
    pub balloon: Option<BalloonConfig>,
    pub swap: Option<SwapConfig>,
    pub api_socket: Option<PathBuf>,
    pub profile: Option<ProfileConfig>,
}

impl VmConfigBuilder {
    /// Checks every rule that needs no host access and fills in defaults.
    /// `default_kernel` is used when no `--kernel` was given.
    pub fn validate(self, default_kernel: Kernel) -> Result<VmConfig, ConfigError> {
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
            numa::validate_numa(self.numa, &self.distances, self.memory.size, self.cpus)?
        };

        cpus::check_affinity(&self.affinity, cpus)?;
        let balloon = self.balloon.unwrap_or_default();
        if balloon.size > memory {
            return Err(ConfigError::BalloonTooLarge { size: balloon.size, memory });
        }
        if self.api_socket.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
            return Err(ConfigError::EmptyApiSocket);
        }
        let backing = self.memory.backing.unwrap_or(Backing::Auto);
        if self.swap.is_some() && backing == Backing::Demand {
            return Err(ConfigError::SwapNeedsUffd);
        }
        Ok(VmConfig {
            kernel: self.kernel.map_or(default_kernel, Kernel::Path),
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
            backing,
            huge_leaves: self.memory.huge_leaves.unwrap_or(HugeLeaves::Auto),
            rings: self.memory.rings.unwrap_or(true),
            cpus,
            affinity: self.affinity,
            numa,
            guest_args,
            seed,
            stats_file: self.stats_file,
            verbose: self.verbose,
            seccomp: match self.seccomp.as_deref() {
                None | Some("on") => true,
                Some("off") => false,
                Some(other) => return Err(ConfigError::InvalidSeccomp(other.to_string())),
            },
            balloon,
            swap: self.swap,
            api_socket: self.api_socket,
            profile: self.profile,
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
        b.validate(Kernel::Path("k".into()))
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
        assert_eq!(numa::format_cpu_list(&[0, 1, 2, 5, 7, 8]), "0-2:5:7-8");
        assert_eq!(numa::format_cpu_list(&[]), "none");
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
        let m = parse_memory_arg("size=1G,fault-around=2M,backing=demand,rings=off").unwrap();
        assert_eq!(
            m,
            MemoryArg {
                size: Some(1 << 30),
                fault_around: Some(2 << 20),
                fault_around_max: None,
                backing: Some(Backing::Demand),
                huge_leaves: None,
                rings: Some(false),
            }
        );
        assert!(parse_memory_arg("size=1G,rings=maybe").is_err());
        let small = VmConfigBuilder {
            memory: parse_memory_arg("fault-around=64K,fault-around-max=16K").unwrap(),
            ..Default::default()
        };
        assert!(small.validate(Kernel::Path("k".into())).is_err());
        assert_eq!(parse_memory_arg("huge-leaves=on").unwrap().huge_leaves, Some(HugeLeaves::On));
        assert!(parse_memory_arg("huge-leaves=maybe").is_err());
        assert!(parse_memory_arg("fault-around=3K").is_err());
        assert!(parse_memory_arg("fault-around=4M").is_err());
        assert!(parse_memory_arg("backing=swap").is_err());
        assert!(parse_memory_arg("size=1G,size=2G").is_err());
        let long = VmConfigBuilder { guest_args: Some("x".repeat(MAX_GUEST_ARGS + 1)), ..Default::default() };
        assert!(matches!(long.validate(Kernel::Path("k".into())), Err(ConfigError::GuestArgsTooLong(_))));
        let seeded = VmConfigBuilder { guest_args: Some("scenario=x seed=42".into()), ..Default::default() };
        assert_eq!(seeded.validate(Kernel::Path("k".into())).unwrap().seed, 42);
    }
}
