//! Links the guest with its linker script, as a static non-PIE executable, and builds the C
//! programs it can run (`scenario=cbench`): the guest's C runtime (`crt/`), the project's own C
//! test programs (`ctests/MANIFEST.toml`), the third-party allocator benchmarks in
//! `../shared/cbench/MANIFEST.toml` if that folder exists, and those of the manifests in the
//! folders listed in `CBENCH_EXTRA` (colon-separated). Sources are compiled where they lie; none
//! is copied into the repository.
//!
//! Each program is compiled with the host's gcc/g++ against glibc's headers, for a CPL3 guest
//! linked at a fixed address: no stack protector (it reads %fs), no red zone (exceptions and
//! ticks arrive on the current stack), no PIC/PIE, no AVX. Its objects are combined (`ld -r`),
//! its `main` renamed `cbench_<name>_main` and every other symbol it defines made local, so
//! programs with the same symbols live side by side. `OUT_DIR/cbench.rs` lists them.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

#[path = "cbench_manifest.rs"]
mod manifest;

use manifest::Bench;

/// Flags for every C and C++ file built for the guest.
const COMMON: &[&str] = &[
    "-O3",
    "-DNDEBUG",
    "-fno-stack-protector",
    "-mno-red-zone",
    "-fno-pic",
    "-fno-pie",
    "-fno-plt",
    "-fcf-protection=none",
    "-fno-asynchronous-unwind-tables",
    "-fno-unwind-tables",
    "-U_FORTIFY_SOURCE",
    "-D_FORTIFY_SOURCE=0",
    "-march=x86-64",
    "-mtune=generic",
    "-mno-avx",
    "-ffunction-sections",
    "-fdata-sections",
    "-w",
];
const CXX: &[&str] = &["-fno-exceptions", "-fno-rtti", "-std=gnu++17"];

fn main() {
    let dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    println!("cargo:rustc-link-arg=-T{}/linker.ld", dir.display());
    println!("cargo:rustc-link-arg=--no-pie");
    println!("cargo:rerun-if-changed=linker.ld");
    println!("cargo:rerun-if-changed=crt");
    println!("cargo:rerun-if-env-changed=CBENCH_EXTRA");

    let include = dir.join("crt/include");
    let mut objects = Vec::new();
    let mut jobs = Vec::new();
    for entry in std::fs::read_dir(dir.join("crt")).expect("guest/crt exists") {
        let path = entry.expect("readable crt folder").path();
        let lang = match path.extension().and_then(|e| e.to_str()) {
            Some("c") => "c",
            Some("cpp") => "c++",
            _ => continue,
        };
        let obj = out.join(format!("crt_{}.o", path.file_stem().unwrap().to_string_lossy()));
        let mut flags = vec!["-fno-tree-loop-distribute-patterns".to_string(), "-ffreestanding".to_string()];
        if lang == "c++" {
            flags.push(format!("-I{}", include.display()));
        }
        jobs.push((path.parent().unwrap().to_path_buf(), lang, path.clone(), flags, obj.clone()));
        objects.push(obj);
    }
    for (job, result) in jobs.iter().zip(compile_all(&jobs)) {
        if let Err(e) = result {
            panic!("guest C runtime: {} does not compile:\n{e}", job.2.display());
        }
    }

    let root = dir.parent().expect("guest/ is in the repository").to_path_buf();
    let mut manifests = vec![dir.join("ctests")];
    manifests.extend(manifest::third_party_folders(&root));

    let mut table = String::new();
    let mut decls = String::new();
    let mut seen = BTreeSet::new();
    for folder in &manifests {
        println!("cargo:rerun-if-changed={}", folder.join("MANIFEST.toml").display());
        let benches = match manifest::read(folder) {
            Ok(b) => b,
            Err(e) => {
                println!("cargo:warning=C benchmarks: {e}");
                continue;
            }
        };
        for b in benches {
            let id: String = b.name.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
            if !seen.insert(id.clone()) {
                println!(
                    "cargo:warning=C benchmarks: {} in {} is a second program of that name",
                    b.name,
                    folder.display()
                );
                continue;
            }
            match build_program(&b, &id, &out, &include) {
                Ok(obj) => {
                    objects.push(obj);
                    let _ = writeln!(decls, "    fn cbench_{id}_main(argc: i32, argv: *mut *mut u8) -> i32;");
                    let _ = writeln!(
                        table,
                        "    Program {{ name: {:?}, args: {:?}, main: cbench_{id}_main }},",
                        b.name, b.args
                    );
                }
                Err(e) => println!("cargo:warning=C benchmarks: {} left out: {e}", b.name),
            }
        }
    }

    let lib = out.join("libcbench.a");
    let _ = std::fs::remove_file(&lib);
    run(Command::new("ar").arg("crs").arg(&lib).args(&objects)).expect("ar builds the C archive");
    println!("cargo:rustc-link-search=native={}", out.display());
    println!("cargo:rustc-link-lib=static=cbench");
    let code = format!(
        "// Generated by build.rs: the C programs linked into this guest.\n\
         unsafe extern \"C\" {{\n{decls}}}\n\n\
         /// Every C program in the image, in manifest order.\n\
         pub static PROGRAMS: &[Program] = &[\n{table}];\n"
    );
    std::fs::write(out.join("cbench.rs"), code).expect("OUT_DIR is writable");
}

/// Compiles, combines and renames one program; returns its object.
fn build_program(b: &Bench, id: &str, out: &Path, include: &Path) -> Result<PathBuf, String> {
    let folder = &b.folder;
    let lang = match b.lang.as_str() {
        "c" | "c++" => b.lang.as_str(),
        other => return Err(format!("unknown language {other:?}")),
    };
    let mut jobs = Vec::new();
    for (i, src) in b.sources.iter().enumerate() {
        let path = folder.join(src);
        println!("cargo:rerun-if-changed={}", path.display());
        let obj = out.join(format!("cb_{id}_{i}.o"));
        let mut flags = b.flags.clone();
        if lang == "c++" {
            flags.insert(0, format!("-I{}", include.display()));
        }
        jobs.push((folder.to_path_buf(), lang, path, flags, obj));
    }
    for r in compile_all(&jobs) {
        r?;
    }
    let combined = out.join(format!("cbench_{id}.o"));
    run(Command::new("ld").arg("-r").arg("-o").arg(&combined).args(jobs.iter().map(|j| &j.4)))?;
    let main = format!("cbench_{id}_main");
    run(Command::new("objcopy")
        .arg(format!("--redefine-sym=main={main}"))
        .arg(format!("--keep-global-symbol={main}"))
        .arg(&combined))?;
    Ok(combined)
}

/// One compilation: working folder, language, source, extra flags, object.
type Job<'a> = (PathBuf, &'a str, PathBuf, Vec<String>, PathBuf);

/// Runs the compilations two at a time (the build machine has two cores).
fn compile_all(jobs: &[Job<'_>]) -> Vec<Result<(), String>> {
    let mut results = Vec::new();
    for pair in jobs.chunks(2) {
        let children: Vec<_> = pair
            .iter()
            .map(|(cwd, lang, src, flags, obj)| {
                let cc = if *lang == "c++" { "g++" } else { "gcc" };
                let mut cmd = Command::new(cc);
                cmd.current_dir(cwd).args(COMMON);
                if *lang == "c++" {
                    cmd.args(CXX);
                }
                cmd.args(flags).arg("-c").arg(src).arg("-o").arg(obj).stderr(Stdio::piped());
                cmd.spawn().map_err(|e| format!("{cc}: {e}")).map(|c| (cc, c))
            })
            .collect();
        for child in children {
            results.push(child.and_then(|(cc, c)| {
                let o = c.wait_with_output().map_err(|e| format!("{cc}: {e}"))?;
                check(cc, &o)
            }));
        }
    }
    results
}

fn check(what: &str, o: &Output) -> Result<(), String> {
    if o.status.success() { Ok(()) } else { Err(format!("{what} failed: {}", String::from_utf8_lossy(&o.stderr))) }
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let name = cmd.get_program().to_string_lossy().into_owned();
    let o = cmd.output().map_err(|e| format!("{name}: {e}"))?;
    check(&name, &o)
}
