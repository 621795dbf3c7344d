//! The command line. The syntax is a contract (tests and users rely on it); the strings are
//! parsed and validated by `config`, so every mistake gets one precise message.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::{
    ConfigError, Kernel, VmConfig, VmConfigBuilder, parse_balloon_arg, parse_cpus_arg, parse_memory_arg,
    parse_profile_arg, parse_swap_arg,
};

#[derive(Debug, Parser)]
#[command(name = "vmm", version, about = "A KVM microVM memory manager")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
// Parsed once per process: the size of the larger variant costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum Command {
    /// Boot a guest and run it to completion; exits with the guest's status.
    Run(RunArgs),
    /// Talk to a running VM through its control API.
    Ctl(CtlArgs),
}

#[derive(Debug, Args)]
pub struct CtlArgs {
    /// The VM's API socket (`vmm run --api-socket`)
    #[arg(long = "api-socket", value_name = "PATH")]
    pub api_socket: PathBuf,
    /// Print the API's JSON instead of text
    #[arg(long)]
    pub json: bool,
    #[command(subcommand)]
    pub command: CtlCommand,
}

#[derive(Debug, Subcommand)]
pub enum CtlCommand {
    /// The VM's state and configuration
    Vm,
    /// The VM's stats
    Stats,
    /// The balloon: its size, or `set SIZE`, or `stats`
    Balloon {
        #[command(subcommand)]
        command: Option<BalloonCommand>,
    },
    /// Host-side swap: its state, or `set SIZE`, `out`, `in`
    Swap {
        #[command(subcommand)]
        command: Option<SwapCommand>,
    },
    /// Ask the guest to finish (the VMM stops it after a grace period)
    Shutdown,
}

#[derive(Debug, Subcommand)]
pub enum SwapCommand {
    /// Set the host memory guest RAM may use (`256M`, `1G`)
    Set { limit: String },
    /// Evict every page not touched since the last scan, now
    Out,
    /// Bring every swapped page back, in the background (as the limit allows)
    In,
}

#[derive(Debug, Subcommand)]
pub enum BalloonCommand {
    /// Set the balloon's size (`512M`, `1G`)
    Set {
        size: String,
        /// Wait until the balloon holds its size (`5s`, `500ms`)
        #[arg(long, value_name = "DURATION")]
        wait: Option<String>,
    },
    /// The balloon's statistics
    Stats,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Guest ELF image [default: the default guest built into vmm]
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Guest RAM: size=SIZE[,fault-around=SIZE][,fault-around-max=SIZE][,backing=auto|uffd|demand][,huge-leaves=auto|on|off]
    /// [default: size=512M,fault-around=64K,fault-around-max=2M,backing=auto,huge-leaves=auto]
    #[arg(long, value_name = "size=SIZE,...")]
    pub memory: Option<String>,
    /// vCPUs: N, or boot=N[,affinity=off|auto|[VCPU@[CPUS],...]] (auto: with CPUs to spare,
    /// vCPU i on host CPU i and the rings' service on the rest) [default: 1, or the CPUs listed
    /// in --numa; affinity=off]
    #[arg(long, value_name = "N|boot=N,...")]
    pub cpus: Option<String>,
    /// A NUMA node: node=ID,size=SIZE,cpus=LIST[,host-node=N][,host-policy=preferred|bind]
    #[arg(long, value_name = "SPEC")]
    pub numa: Vec<String>,
    /// Distance between two nodes, A:B=D (symmetric; default 10 local, 20 remote)
    #[arg(long = "numa-distance", value_name = "A:B=D")]
    pub numa_distance: Vec<String>,
    /// Arguments for the guest, "key=value ..." [default: "scenario=stress"]
    #[arg(long = "guest-args", value_name = "ARGS")]
    pub guest_args: Option<String>,
    /// Write the stats as JSON to PATH at exit
    #[arg(long = "stats-file", value_name = "PATH")]
    pub stats_file: Option<PathBuf>,
    /// Print a stats table at exit, and log more
    #[arg(short, long)]
    pub verbose: bool,
    /// Run every VMM thread under its seccomp filter (`off`: for debugging) [default: on]
    #[arg(long, value_name = "on|off")]
    pub seccomp: Option<String>,
    /// The balloon at boot: size=SIZE[,deflate-on-oom=on|off][,stats-interval=SECS]
    /// [default: size=0,deflate-on-oom=off,stats-interval=0]
    #[arg(long, value_name = "size=SIZE,...")]
    pub balloon: Option<String>,
    /// Serve the control API (HTTP/1.1, JSON) on this Unix socket
    #[arg(long = "api-socket", value_name = "PATH")]
    pub api_socket: Option<PathBuf>,
    /// Host-side swap: limit=SIZE[,dir=DIR][,file-max=SIZE][,compress=lz4|off][,pool=SIZE]
    /// [default: off; dir=$TMPDIR or /var/tmp, file-max=guest RAM, compress=lz4, pool=limit/5]
    #[arg(long, value_name = "limit=SIZE,...")]
    pub swap: Option<String>,
    /// Sample the guest's instruction pointer and write a table of its hottest functions to
    /// FILE at exit: path=FILE[,hz=N] [default rate: 1000 samples a second per running vCPU]
    #[arg(long, value_name = "path=FILE,...")]
    pub profile: Option<String>,
}

impl RunArgs {
    /// Parses and validates the arguments into a configuration.
    pub fn into_config(self, default_kernel: Kernel) -> Result<VmConfig, ConfigError> {
        let cpus = self.cpus.as_deref().map(parse_cpus_arg).transpose()?.unwrap_or_default();
        let builder = VmConfigBuilder {
            kernel: self.kernel,
            memory: self.memory.as_deref().map(parse_memory_arg).transpose()?.unwrap_or_default(),
            cpus: cpus.boot,
            affinity: cpus.affinity,
            numa: self.numa.iter().map(|s| s.parse()).collect::<Result<_, _>>()?,
            distances: self.numa_distance.iter().map(|s| s.parse()).collect::<Result<_, _>>()?,
            guest_args: self.guest_args,
            stats_file: self.stats_file,
            verbose: self.verbose,
            seccomp: self.seccomp,
            balloon: self.balloon.as_deref().map(parse_balloon_arg).transpose()?,
            swap: self.swap.as_deref().map(parse_swap_arg).transpose()?,
            api_socket: self.api_socket,
            profile: self.profile.as_deref().map(parse_profile_arg).transpose()?,
        };
        builder.validate(default_kernel)
    }
}
