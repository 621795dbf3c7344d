//! `make bench-c`: mimalloc-bench's allocator benchmarks, unmodified (../shared/cbench and the
//! manifests in `CBENCH_EXTRA`), in the guest with 1 and 2 vCPUs against the same sources built
//! natively with gcc and run with 1 and 2 threads, with glibc's malloc and with mimalloc
//! (`LD_PRELOAD`), interleaved in one run. Each benchmark's own figure (its printed throughput,
//! or its wall time), the guest's ratio to each native figure (above 1: the guest is better),
//! the guest allocator's exits per thousand allocations, and peak RSS (the VMM's, guest RAM
//! included, against native glibc's; from GNU time when it is installed). Writes the table as
//! target/bench-plots/cbench.csv and a chart, target/bench-plots/cbench.svg.
//!
//! The guest runs with `--cpus boot=N,affinity=auto`: with a host CPU to spare (1 vCPU here),
//! the vCPU and the slab rings' service are pinned apart, as on a host dedicated to the VM;
//! unpinned, the scheduler sometimes stacks them on one CPU for milliseconds (rptest: 4-8x the
//! exits). Native runs are not pinned.
//!
//! `make bench-c` runs `cargo bench --bench native` (our own workloads, natively and in the
//! guest) first; its rows (`ours/...`) join this table.
//!
//! `CBENCH_RUNS=N` repeats each configuration N times and takes the median (default 3);
//! `CBENCH_QUICK=1` uses the tests' short arguments instead of mimalloc-bench's;
//! `CBENCH_ONLY=a,b` runs only the benchmarks named; `CBENCH_BEFORE=1` also runs the guest
//! with `--memory rings=off` (slab rings refilled only by exits, as before they had a service
//! thread) and adds its ratio to glibc as a column.

#[path = "../../tests/common/cbench_args.rs"]
mod cbench_args;
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

#[path = "../../guest/cbench_manifest.rs"]
mod manifest;

use manifest::Bench;

/// Code generation as in the guest build (guest/build.rs), so both run the same code.
const CFLAGS: &[&str] = &["-O3", "-DNDEBUG", "-march=x86-64", "-mtune=generic", "-mno-avx", "-w"];
const MIMALLOC: &str = "/usr/lib/x86_64-linux-gnu/libmimalloc.so.2";
/// GNU time, for every run's peak RSS (guest runs: the whole VMM, guest RAM included); without
/// it there is no RSS column.
const TIME: &str = "/usr/bin/time";
/// Longest one run may take.
const TIMEOUT: Duration = Duration::from_secs(600);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("repo root").to_path_buf()
}

fn manifests() -> Vec<Bench> {
    manifest::third_party_folders(&repo())
        .iter()
        .flat_map(|f| manifest::read(f).unwrap_or_else(|e| panic!("{e}")))
        .collect()
}

/// Builds `b` natively; returns the executable.
fn build_native(b: &Bench, dir: &Path) -> Result<PathBuf, String> {
    let exe = dir.join(&b.name);
    let cc = if b.lang == "c++" { "g++" } else { "gcc" };
    let o = Command::new(cc)
        .current_dir(&b.folder)
        .args(CFLAGS)
        .args(&b.flags)
        .args(&b.sources)
        .arg("-o")
        .arg(&exe)
        .args(["-pthread", "-lm"])
        .output()
        .map_err(|e| format!("{cc}: {e}"))?;
    if !o.status.success() {
        return Err(String::from_utf8_lossy(&o.stderr).into_owned());
    }
    Ok(exe)
}

/// What a benchmark reports: the text its figure sits next to (before or after it), a scale,
/// and the unit; None for benchmarks measured by their wall time.
fn reported(name: &str) -> Option<(&'static str, bool, f64, &'static str)> {
    if name.starts_with("larson") {
        Some(("Throughput =", true, 1.0, "ops/s"))
    } else if name.starts_with("xmalloc") {
        Some(("free/sec:", true, 1e6, "frees/s"))
    } else if name.starts_with("rptest") {
        Some(("memory ops/CPU second", false, 1.0, "ops/CPU s"))
    } else {
        None
    }
}

/// Whether a higher figure is better, and its unit.
fn kind(name: &str) -> (bool, &'static str) {
    reported(name).map_or((false, "s"), |(_, _, _, unit)| (true, unit))
}

/// A benchmark's own figure from its output, or its wall time.
fn figure(name: &str, out: &str, wall_s: f64) -> f64 {
    let Some((key, after, scale, _)) = reported(name) else { return wall_s };
    let value = out.rfind(key).and_then(|i| {
        let word =
            if after { out[i + key.len()..].split_whitespace().next() } else { out[..i].split_whitespace().last() };
        word?.trim_matches(|c: char| !c.is_ascii_digit() && c != '.').trim_start_matches('.').parse::<f64>().ok()
    });
    value.map_or(0.0, |v| v * scale)
}

#[derive(Clone, Copy, Default)]
struct Sample {
    value: f64,
    exits: f64,
    allocs: f64,
    /// Share of the vCPUs' busy time spent in SLAB_EXCHANGE exits, percent.
    exit_pct: f64,
    /// Peak RSS, MiB (0 without GNU time).
    rss_mib: f64,
}

/// `timeout` for `TIMEOUT`, through GNU time if there is one, ready for the program's path.
fn wrapper() -> Command {
    let mut cmd = Command::new("timeout");
    cmd.arg(TIMEOUT.as_secs().to_string());
    if Path::new(TIME).exists() {
        cmd.args([TIME, "-f", "@maxrss_kib=%M"]);
    }
    cmd
}

/// The peak RSS GNU time reported in `stderr`, MiB.
fn rss_mib(stderr: &str) -> f64 {
    stderr
        .rfind("@maxrss_kib=")
        .and_then(|i| stderr[i + 12..].split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0)
}

fn run_native(exe: &Path, name: &str, args: &str, preload: Option<&str>) -> Option<Sample> {
    let mut cmd = wrapper();
    cmd.arg(exe).args(args.split_whitespace());
    // Beside the executables: some benchmarks (rptest) write their figures to files.
    if let Some(dir) = exe.parent() {
        cmd.current_dir(dir);
    }
    if let Some(p) = preload {
        cmd.env("LD_PRELOAD", p);
    }
    let start = Instant::now();
    let o = cmd.output().ok()?;
    let wall = start.elapsed().as_secs_f64();
    if !o.status.success() {
        eprintln!("  native {name} {args}: exit {:?}", o.status.code());
        return None;
    }
    let out = String::from_utf8_lossy(&o.stdout) + String::from_utf8_lossy(&o.stderr);
    Some(Sample {
        value: figure(name, &out, wall),
        rss_mib: rss_mib(&String::from_utf8_lossy(&o.stderr)),
        ..Default::default()
    })
}

fn run_guest(name: &str, args: &str, cpus: u32, rings: bool) -> Option<Sample> {
    let o = wrapper()
        .arg(env!("CARGO_BIN_EXE_vmm"))
        .args(["run", "--kernel"])
        .arg(common::guest_image())
        .args([
            "--cpus",
            &format!("boot={cpus},affinity=auto"),
            "--memory",
            if rings { "size=2G" } else { "size=2G,rings=off" },
        ])
        .arg("--guest-args")
        .arg(format!("scenario=cbench name={name} args=\"{args}\""))
        .output()
        .ok()?;
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let result = common::results(&out, "cbench").into_iter().next();
    let Some(r) = result.filter(|_| o.status.success()) else {
        eprintln!("  guest {name} {args}: exit {:?}\n{}", o.status.code(), String::from_utf8_lossy(&o.stderr));
        return None;
    };
    let num = |k: &str| common::number(&r, k);
    Some(Sample {
        value: figure(name, &out, num("wall_ns") / 1e9),
        exits: num("exits"),
        allocs: num("allocs"),
        exit_pct: if num("busy_ns") > 0.0 { num("exchange_ns") * 100.0 / num("busy_ns") } else { 0.0 },
        rss_mib: rss_mib(&String::from_utf8_lossy(&o.stderr)),
    })
}

#[derive(Clone)]
struct Row {
    name: String,
    threads: u32,
    unit: &'static str,
    higher: bool,
    guest: Option<f64>,
    /// The guest with `rings=off` (CBENCH_BEFORE=1).
    before: Option<f64>,
    glibc: Option<f64>,
    mimalloc: Option<f64>,
    exits_per_k: Option<f64>,
    /// Percent of the vCPUs' busy time in SLAB_EXCHANGE exits (round trip and the VMM's work).
    exit_pct: Option<f64>,
    /// Peak RSS, MiB: the guest's VMM (guest RAM included) and native glibc.
    guest_rss: Option<f64>,
    glibc_rss: Option<f64>,
    /// First-touch rows (`ours/touch-*`, from the native harness): frames made resident per
    /// page the guest touched; their glibc column is kernel demand paging of the same guest.
    frames_per_touch: Option<f64>,
}

impl Row {
    /// Guest against an anchor: above 1, the guest is better.
    fn ratio(&self, anchor: Option<f64>) -> Option<f64> {
        self.ratio_of(self.guest, anchor)
    }

    fn ratio_of(&self, guest: Option<f64>, anchor: Option<f64>) -> Option<f64> {
        let (g, a) = (guest?, anchor?);
        if g <= 0.0 || a <= 0.0 {
            return None;
        }
        Some(if self.higher { g / a } else { a / g })
    }
}

fn fmt(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(v) if v >= 1e6 => format!("{:.2}M", v / 1e6),
        Some(v) if v >= 1e3 => format!("{:.1}k", v / 1e3),
        Some(v) if v >= 10.0 => format!("{v:.1}"),
        Some(v) => format!("{v:.3}"),
    }
}

fn main() {
    common::build_guest();
    let runs: usize = std::env::var("CBENCH_RUNS").ok().and_then(|s| s.parse().ok()).unwrap_or(3).max(1);
    let quick = std::env::var("CBENCH_QUICK").is_ok_and(|v| v == "1");
    let before = std::env::var("CBENCH_BEFORE").is_ok_and(|v| v == "1");
    let only: Option<Vec<String>> =
        std::env::var("CBENCH_ONLY").ok().map(|v| v.split(',').map(str::to_string).collect());
    let benches: Vec<Bench> =
        manifests().into_iter().filter(|b| only.as_ref().is_none_or(|o| o.contains(&b.name))).collect();
    if benches.is_empty() {
        println!("cbench: no manifests (../shared/cbench/MANIFEST.toml or CBENCH_EXTRA): nothing to run");
        return;
    }
    let mimalloc = Path::new(MIMALLOC).exists().then_some(MIMALLOC);
    if mimalloc.is_none() {
        println!("cbench: {MIMALLOC} is missing (make setup installs libmimalloc2.0): no mimalloc column");
    }
    let native_dir = repo().join("target/cbench-native");
    std::fs::create_dir_all(&native_dir).expect("target/ is writable");
    println!(
        "cbench: {} benchmarks, {} run(s) each, {} arguments; guest with 1 and 2 vCPUs, native with 1 and 2 threads",
        benches.len(),
        runs,
        if quick { "short" } else { "mimalloc-bench's" }
    );
    let mut rows = Vec::new();
    for b in &benches {
        let exe = match build_native(b, &native_dir) {
            Ok(e) => e,
            Err(e) => {
                println!("cbench: {} does not build natively, left out: {e}", b.name);
                continue;
            }
        };
        let base = if quick { cbench_args::short_args(&b.name).unwrap_or(&b.args) } else { &b.args };
        for threads in [1u32, 2] {
            let args = base.replace("{N}", &threads.to_string());
            let (mut g, mut n, mut m, mut e) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            let mut x = Vec::new();
            let (mut g_rss, mut n_rss) = (Vec::new(), Vec::new());
            let mut off = Vec::new();
            for _ in 0..runs {
                if before && let Some(s) = run_guest(&b.name, &args, threads, false) {
                    off.push(s.value);
                }
                if let Some(s) = run_guest(&b.name, &args, threads, true) {
                    g.push(s.value);
                    if s.rss_mib > 0.0 {
                        g_rss.push(s.rss_mib);
                    }
                    if s.allocs > 0.0 {
                        e.push(s.exits * 1000.0 / s.allocs);
                    }
                    x.push(s.exit_pct);
                }
                if let Some(s) = run_native(&exe, &b.name, &args, None) {
                    n.push(s.value);
                    if s.rss_mib > 0.0 {
                        n_rss.push(s.rss_mib);
                    }
                }
                if let Some(s) = mimalloc.and_then(|p| run_native(&exe, &b.name, &args, Some(p))) {
                    m.push(s.value);
                }
            }
            let (higher, unit) = kind(&b.name);
            let row = Row {
                name: b.name.clone(),
                threads,
                unit,
                higher,
                guest: common::median(g),
                before: common::median(off),
                glibc: common::median(n),
                mimalloc: common::median(m),
                exits_per_k: common::median(e),
                exit_pct: common::median(x),
                guest_rss: common::median(g_rss),
                glibc_rss: common::median(n_rss),
                frames_per_touch: None,
            };
            println!(
                "  {:<15} {threads}  guest {:>9} {unit:<9} glibc {:>9}  mimalloc {:>9}  vs glibc {:>6}x  vs mimalloc {:>6}x{}",
                row.name,
                fmt(row.guest),
                fmt(row.glibc),
                fmt(row.mimalloc),
                fmt(row.ratio(row.glibc)),
                fmt(row.ratio(row.mimalloc)),
                if before {
                    format!("  (rings off: {}x)", fmt(row.ratio_of(row.before, row.glibc)))
                } else {
                    String::new()
                }
            );
            rows.push(row);
        }
    }
    rows.extend(our_workloads(&repo().join("target/bench-plots/native-rows.csv")));
    print_table(&rows);
    let plots = repo().join("target/bench-plots");
    std::fs::create_dir_all(&plots).expect("target/ is writable");
    write_csv(&plots.join("cbench.csv"), &rows);
    // The chart compares allocators; first-touch rows have another anchor.
    let allocators: Vec<Row> = rows.iter().filter(|r| r.frames_per_touch.is_none()).cloned().collect();
    plot(&plots.join("cbench.svg"), &allocators);
    println!("table: {}; chart: {}", plots.join("cbench.csv").display(), plots.join("cbench.svg").display());
}

/// The rows `cargo bench --bench native` left for this table (our own workloads, natively and in
/// the guest; `make bench-c` runs it first), if it did.
fn our_workloads(path: &Path) -> Vec<Row> {
    let Ok(text) = std::fs::read_to_string(path) else { return Vec::new() };
    let num = |s: &str| s.parse::<f64>().ok();
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(',').collect();
            (f.len() >= 10).then(|| Row {
                name: f[0].to_string(),
                threads: f[1].parse().unwrap_or(0),
                unit: if f[2] == "pages/s" { "pages/s" } else { "ops/s" },
                higher: true,
                guest: num(f[4]),
                before: None,
                glibc: num(f[5]),
                mimalloc: num(f[6]),
                exits_per_k: num(f[9]),
                exit_pct: None,
                guest_rss: None,
                glibc_rss: None,
                frames_per_touch: f.get(12).and_then(|v| num(v)),
            })
        })
        .collect()
}

fn print_table(rows: &[Row]) {
    println!();
    println!(
        "{:<19} {:>3} {:>10} {:>10} {:>10} {:<10} {:>9} {:>11} {:>13} {:>11} {:>18} {:>17}",
        "benchmark",
        "thr",
        "guest",
        "glibc",
        "mimalloc",
        "unit",
        "vs glibc",
        "vs mimalloc",
        "exits/1k alloc",
        "exit time %",
        "rings off vs glibc",
        "RSS MiB vmm/glibc"
    );
    for r in rows {
        println!(
            "{:<19} {:>3} {:>10} {:>10} {:>10} {:<10} {:>8}x {:>10}x {:>13} {:>11} {:>17}x {:>8} /{:>7}",
            r.name,
            r.threads,
            fmt(r.guest),
            fmt(r.glibc),
            fmt(r.mimalloc),
            r.unit,
            fmt(r.ratio(r.glibc)),
            fmt(r.ratio(r.mimalloc)),
            fmt(r.exits_per_k),
            fmt(r.exit_pct),
            fmt(r.ratio_of(r.before, r.glibc)),
            fmt(r.guest_rss),
            fmt(r.glibc_rss)
        );
    }
    println!("(ratios: the guest's figure against native, above 1 = the guest is better; wall times inverted)");
    println!("(RSS: peak, from GNU time; the VMM's includes guest RAM, page tables and its own metadata)");
    println!(
        "(exit time: the vCPUs' time in SLAB_EXCHANGE exits, round trip and the VMM's work, over their busy time)"
    );
    for r in rows.iter().filter(|r| r.frames_per_touch.is_some()) {
        println!(
            "({}: first touch of 256 MiB; its glibc column is the same guest under kernel demand paging; {} frames made resident per page touched)",
            r.name,
            fmt(r.frames_per_touch)
        );
    }
}

fn write_csv(path: &Path, rows: &[Row]) {
    let opt = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v}"));
    let mut s = String::from(
        "benchmark,threads,unit,higher_is_better,guest,glibc,mimalloc,guest_vs_glibc,guest_vs_mimalloc,exits_per_1k_allocs,vmm_rss_mib,glibc_rss_mib,frames_per_touch,exit_time_pct\n",
    );
    for r in rows {
        s += &format!(
            "{},{},{},{},{},{},{},{},{},{},{},{},{},{}\n",
            r.name,
            r.threads,
            r.unit,
            r.higher,
            opt(r.guest),
            opt(r.glibc),
            opt(r.mimalloc),
            opt(r.ratio(r.glibc)),
            opt(r.ratio(r.mimalloc)),
            opt(r.exits_per_k),
            opt(r.guest_rss),
            opt(r.glibc_rss),
            opt(r.frames_per_touch),
            opt(r.exit_pct)
        );
    }
    std::fs::write(path, s).expect("target/bench-plots is writable");
}

/// Bars of the guest's ratio to glibc and to mimalloc per benchmark and thread count, on a log
/// scale with a line at 1 (parity).
fn plot(path: &Path, rows: &[Row]) {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (1100, 480)).into_drawing_area();
    let _ = root.fill(&WHITE);
    let n = rows.len().max(1);
    let vals: Vec<(Option<f64>, Option<f64>)> = rows.iter().map(|r| (r.ratio(r.glibc), r.ratio(r.mimalloc))).collect();
    let all: Vec<f64> = vals.iter().flat_map(|(a, b)| [*a, *b]).flatten().collect();
    let lo = all.iter().copied().fold(1.0, f64::min).max(1e-4) / 1.5;
    let hi = all.iter().copied().fold(1.0, f64::max) * 1.5;
    let Ok(mut chart) = ChartBuilder::on(&root)
        .caption("C allocator benchmarks: the guest against native (above 1 = guest better)", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(90)
        .y_label_area_size(64)
        .build_cartesian_2d(0f64..n as f64, (lo..hi).log_scale())
    else {
        return;
    };
    let labels: Vec<String> = rows.iter().map(|r| format!("{} {}t", r.name, r.threads)).collect();
    let _ = chart
        .configure_mesh()
        .x_labels(n)
        .x_label_formatter(&|x| {
            labels.iter().zip(0..).find(|(_, i)| f64::from(*i) == x.floor()).map(|(l, _)| l.clone()).unwrap_or_default()
        })
        .x_label_style(("sans-serif", 11).into_text_style(&root).transform(FontTransform::Rotate90))
        .y_desc("guest / native")
        .draw();
    let bar = |i: usize, off: f64, v: f64, color: RGBColor| {
        Rectangle::new([(i as f64 + off, lo), (i as f64 + off + 0.38, v)], color.filled())
    };
    let _ = chart
        .draw_series(
            vals.iter().enumerate().filter_map(|(i, (g, _))| g.map(|v| bar(i, 0.1, v, RGBColor(66, 133, 244)))),
        )
        .map(|s| {
            s.label("vs glibc")
                .legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], RGBColor(66, 133, 244).filled()))
        });
    let _ = chart
        .draw_series(vals.iter().enumerate().filter_map(|(i, (_, m))| m.map(|v| bar(i, 0.5, v, RGBColor(219, 68, 55)))))
        .map(|s| {
            s.label("vs mimalloc")
                .legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], RGBColor(219, 68, 55).filled()))
        });
    let _ = chart.draw_series(LineSeries::new([(0.0, 1.0), (n as f64, 1.0)], BLACK.stroke_width(1)));
    let _ = chart.configure_series_labels().border_style(BLACK).background_style(WHITE).draw();
    let _ = root.present();
}
