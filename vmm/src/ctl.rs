//! `vmm ctl`: one command per API call, text by default, `--json` for the API's own bodies.

use std::process::ExitCode;

use crate::api::client::{self, ClientError};
use crate::api::{BalloonStatistics, BalloonView};
use crate::cli::{BalloonCommand, CtlArgs, CtlCommand, SwapCommand};
use crate::config::ByteSize;

/// Runs one `vmm ctl` command; errors are one line and exit code 1 (69 if the VMM cannot be
/// reached).
pub fn run(args: CtlArgs) -> ExitCode {
    match command(&args) {
        Ok(out) => {
            println!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("vmm: error: {}", crate::error_chain(&e));
            ExitCode::from(if matches!(e, ClientError::Connect { .. }) { crate::exit_code::UNAVAILABLE } else { 1 })
        }
    }
}

fn command(args: &CtlArgs) -> Result<String, ClientError> {
    let socket = &args.api_socket;
    let get = |path| client::call(socket, "GET", path, None);
    let text = |body: Vec<u8>| String::from_utf8_lossy(&body).into_owned();
    Ok(match &args.command {
        CtlCommand::Vm => {
            let body = get("/vm")?;
            if args.json {
                text(body)
            } else {
                let v: serde_json::Value = client::decode(&body)?;
                format!(
                    "{}, up {:.1} s: {} MiB, {} vCPUs, {} NUMA nodes, guest args `{}`",
                    v["state"].as_str().unwrap_or("?"),
                    v["uptime_s"].as_f64().unwrap_or(0.0),
                    v["config"]["memory"].as_u64().unwrap_or(0) >> 20,
                    v["config"]["cpus"],
                    v["config"]["nodes"].as_array().map_or(0, Vec::len),
                    v["config"]["guest_args"].as_str().unwrap_or("")
                )
            }
        }
        CtlCommand::Stats => {
            let body = get("/stats")?;
            if args.json { text(body) } else { stats_text(&client::decode(&body)?) }
        }
        CtlCommand::Balloon { command: None } => {
            let body = get("/balloon")?;
            if args.json { text(body) } else { client::balloon_line(&client::decode::<BalloonView>(&body)?) }
        }
        CtlCommand::Balloon { command: Some(BalloonCommand::Stats) } => {
            let body = get("/balloon/statistics")?;
            if args.json { text(body) } else { client::statistics_table(&client::decode::<BalloonStatistics>(&body)?) }
        }
        CtlCommand::Balloon { command: Some(BalloonCommand::Set { size, wait }) } => {
            let bytes = size.parse::<ByteSize>().map_err(|e| ClientError::Api(e.to_string()))?.0;
            let wait = wait.as_deref().map(client::parse_duration).transpose()?;
            let json = args.json;
            let s = client::balloon_set(socket, bytes >> 20, wait, |s| {
                if !json {
                    eprintln!("balloon: {} of {} MiB", s.actual_mib, s.target_mib);
                }
            })?;
            if json {
                serde_json::to_string(&s).unwrap_or_default()
            } else {
                format!("balloon: {} of {} MiB held", s.actual_mib, s.target_mib)
            }
        }
        CtlCommand::Swap { command: None } => {
            let body = get("/swap")?;
            if args.json { text(body) } else { swap_text(&client::decode(&body)?) }
        }
        CtlCommand::Swap { command: Some(SwapCommand::Set { limit }) } => {
            let bytes = limit.parse::<ByteSize>().map_err(|e| ClientError::Api(e.to_string()))?.0;
            client::call(socket, "PATCH", "/swap", Some(&format!(r#"{{"limit_mib": {}}}"#, bytes >> 20)))?;
            format!("swap limit set to {} MiB", bytes >> 20)
        }
        CtlCommand::Swap { command: Some(SwapCommand::Out) } => {
            client::call(socket, "PUT", "/swap/out", None)?;
            "swap-out of cold pages requested".to_string()
        }
        CtlCommand::Swap { command: Some(SwapCommand::In) } => {
            client::call(socket, "PUT", "/swap/in", None)?;
            "swap-in of every page requested".to_string()
        }
        CtlCommand::Shutdown => {
            client::call(socket, "PUT", "/actions", Some(r#"{"action_type": "Shutdown"}"#))?;
            "shutdown requested".to_string()
        }
    })
}

/// `GET /swap`, for people.
fn swap_text(v: &serde_json::Value) -> String {
    if v["enabled"] != true {
        return "swap: off".to_string();
    }
    let n = |k: &str| v[k].as_u64().unwrap_or(0);
    format!(
        "swap: {} (policy {}), limit {} MiB, guest RAM resident {} MiB, pool {} MiB\n\
         pages: {} out, {} in ({} refaults), {} zero, {} clean; pool {} pages; file {} pages ({} MiB, {} MiB written)\n\
         swap-in latency: p50 {} us, p99 {} us; {} no-space, {} I/O errors",
        v["state"].as_str().unwrap_or("?"),
        v["policy"].as_str().unwrap_or("?"),
        n("limit_mib"),
        n("resident_bytes") >> 20,
        n("pool_bytes") >> 20,
        n("pages_out"),
        n("pages_in"),
        n("refaults"),
        n("zero_pages"),
        n("clean_drops"),
        n("compressed_pages"),
        n("file_pages"),
        n("file_bytes") >> 20,
        n("file_written_bytes") >> 20,
        v["swap_in_latency"]["p50_ns"].as_u64().unwrap_or(0) / 1000,
        v["swap_in_latency"]["p99_ns"].as_u64().unwrap_or(0) / 1000,
        n("enospc"),
        n("io_errors")
    )
}

/// The stats, for people: the same two lines `vmm` prints at exit, from the JSON.
fn stats_text(v: &serde_json::Value) -> String {
    let nodes = v["memory"]["nodes"].as_array().cloned().unwrap_or_default();
    let sum = |k: &str| nodes.iter().map(|n| n[k].as_u64().unwrap_or(0)).sum::<u64>();
    format!(
        "VMM RSS {} MiB (peak {} MiB); guest RAM {} MiB: {} MiB free, {} MiB allocated, {} MiB resident\n\
         balloon {} of {} MiB; {} exits, {} memory calls, {} second-level faults",
        v["host"]["vm_rss_kib"].as_u64().unwrap_or(0) / 1024,
        v["host"]["vm_hwm_kib"].as_u64().unwrap_or(0) / 1024,
        sum("frames_total") * 4 / 1024,
        sum("frames_free") * 4 / 1024,
        sum("frames_allocated") * 4 / 1024,
        sum("frames_resident") * 4 / 1024,
        v["balloon"]["actual_frames"].as_u64().unwrap_or(0) * 4 / 1024,
        v["balloon"]["target_frames"].as_u64().unwrap_or(0) * 4 / 1024,
        v["exits"]["total"],
        v["memcalls"]["calls"],
        v["faults"]["zero_fill"].as_u64().unwrap_or(0)
    )
}
