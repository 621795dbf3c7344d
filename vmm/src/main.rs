//! `vmm`: boots a guest and exits with its status. Every failure is one line on stderr and a
//! distinct exit code (see `vmm::exit_code`).

use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;

use vmm::cli::{Cli, Command};
use vmm::config::Kernel;
use vmm::exit_code;
use vmm::vm::{Ending, Vm};

/// The default guest, built by build.rs and carried inside the binary.
static DEFAULT_GUEST: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/guest.elf"));

fn main() -> ExitCode {
    let start = Instant::now();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) if !e.use_stderr() => {
            // --help and --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // clap's report spans several lines; keep only the error itself.
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("invalid command line").trim_start_matches("error: ");
            eprintln!("vmm: error: {first} (see vmm run --help)");
            return ExitCode::from(exit_code::USAGE);
        }
    };
    let args = match cli.command {
        Command::Run(args) => args,
        Command::Ctl(ctl) => return vmm::ctl::run(ctl),
    };
    let verbose = args.verbose;
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(if verbose { "info" } else { "warn" }))
        .format_timestamp(None)
        .init();

    let cfg = match args.into_config(Kernel::Embedded(DEFAULT_GUEST)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vmm: error: {e}");
            return ExitCode::from(exit_code::USAGE);
        }
    };
    match run(cfg, start) {
        Ok(code) => ExitCode::from(code),
        Err((code, e)) => {
            eprintln!("vmm: error: {}", vmm::error_chain(e.as_ref()));
            ExitCode::from(code)
        }
    }
}

fn run(cfg: vmm::config::VmConfig, start: Instant) -> Result<u8, (u8, anyhow::Error)> {
    let stats_file = cfg.stats_file.clone();
    let verbose = cfg.verbose;
    let profile_file = cfg.profile.as_ref().map(|p| p.path.clone());
    let vm = Vm::create(cfg, start).map_err(|e| (e.exit_code(), e.into()))?;
    let profiler = vm.profiler();
    let (ending, stats) = vm.run().map_err(|e| (e.exit_code(), e.into()))?;
    if let (Some(path), Some(p)) = (profile_file, profiler) {
        std::fs::write(&path, p.report())
            .with_context(|| format!("cannot write the profile {}", path.display()))
            .map_err(|e| (exit_code::IO, e))?;
    }
    let Some(stats) = stats else {
        eprintln!("vmm: the memory manager stayed busy after the VM ended: no final figures");
        if let Ending::Fatal { message, code } = &ending {
            eprintln!("vmm: error: {message}");
            return Ok(*code);
        }
        return Ok(exit_code::SOFTWARE);
    };
    if let Some(path) = stats_file {
        let json = serde_json::to_string_pretty(&stats).expect("stats serialize");
        std::fs::write(&path, json + "\n")
            .with_context(|| format!("cannot write the stats file {}", path.display()))
            .map_err(|e| (exit_code::IO, e))?;
    }
    if verbose {
        eprintln!("{}", vmm::stats::table(&stats));
    } else {
        eprintln!("{}", vmm::stats::summary(&stats));
    }
    match &ending {
        Ending::Fatal { message, code } => {
            eprintln!("vmm: error: {message}");
            return Ok(*code);
        }
        Ending::Stopped(signal) => eprintln!("vmm: stopped by {signal} before the guest finished"),
        Ending::Guest(_) => {}
    }
    Ok(ending.exit_code())
}
