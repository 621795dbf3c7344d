//! `scenario=cbench name=NAME [args="..."]`: runs a C program linked into the image (the guest's
//! C runtime, `libc`, over the thread scheduler, `sched`) with `NAME` as `argv[0]` and the words
//! of `args` after it (default: the manifest's arguments, `{N}` = the vCPUs). The program
//! prints what it prints; at its end the runtime prints
//! `@result scenario=cbench name=NAME status=S wall_ns=W threads=T exits=E ...`.
//! `scenario=cbench list=1` prints the programs.

use alloc::boxed::Box;
use alloc::string::String;
use alloc::vec::Vec;

use protocol::exit;

use super::Ctx;
use crate::{arch, libc, println, sched};

/// A C program in the image.
pub struct Program {
    pub name: &'static str,
    /// The manifest's arguments (`{N}`: the vCPUs).
    pub args: &'static str,
    pub main: unsafe extern "C" fn(i32, *mut *mut u8) -> i32,
}

mod generated {
    use super::Program;
    include!(concat!(env!("OUT_DIR"), "/cbench.rs"));
}

unsafe extern "C" {
    fn __cbench_main(main: unsafe extern "C" fn(i32, *mut *mut u8) -> i32, argc: i32, argv: *mut *mut u8) -> !;
}

struct Start {
    main: unsafe extern "C" fn(i32, *mut *mut u8) -> i32,
    argv: Vec<*mut u8>,
}

/// The value of `key=` in the raw guest arguments, which may be double-quoted to hold spaces.
fn quoted_arg<'a>(raw: &'a str, key: &str) -> Option<&'a str> {
    let mut rest = raw;
    while let Some(i) = rest.find(key) {
        let at_word = i == 0 || rest.as_bytes()[i - 1].is_ascii_whitespace();
        let after = &rest[i + key.len()..];
        if at_word && let Some(v) = after.strip_prefix('=') {
            return Some(match v.strip_prefix('"') {
                Some(q) => q.split('"').next().unwrap_or(""),
                None => v.split_ascii_whitespace().next().unwrap_or(""),
            });
        }
        rest = after;
    }
    None
}

extern "C" fn main_thread(arg: *mut u8) -> *mut u8 {
    // SAFETY: `run` passed a leaked Box<Start>.
    let start = unsafe { Box::from_raw(arg.cast::<Start>()) };
    let mut argv = start.argv;
    let argc = argv.len() as i32 - 1;
    libc::sys::started();
    // SAFETY: argv holds argc NUL-terminated strings and a null, all leaked (they live as long
    // as the program); main is the program's entry.
    unsafe { __cbench_main(start.main, argc, argv.as_mut_ptr()) }
}

/// Leaks `s` as a NUL-terminated C string.
fn c_string(s: &str) -> *mut u8 {
    let mut v: Vec<u8> = Vec::with_capacity(s.len() + 1);
    v.extend_from_slice(s.as_bytes());
    v.push(0);
    v.leak().as_mut_ptr()
}

pub fn run(ctx: &Ctx) {
    let raw = ctx.args.0;
    if ctx.cpu == 0 {
        if ctx.args.get("list").is_some() {
            for p in generated::PROGRAMS {
                println!("{} {}", p.name, p.args);
            }
            arch::exit(exit::SUCCESS);
        }
        let name = ctx.args.get("name").unwrap_or("");
        let Some(p) = generated::PROGRAMS.iter().find(|p| p.name == name) else {
            let names: Vec<&str> = generated::PROGRAMS.iter().map(|p| p.name).collect();
            println!("guest: no C program `{name}` in this image (there are: {})", names.join(", "));
            arch::exit(exit::BAD_ARGS);
        };
        let args: String = quoted_arg(raw, "args").unwrap_or(p.args).replace("{N}", &alloc::format!("{}", ctx.cpus));
        let mut argv: Vec<*mut u8> =
            core::iter::once(p.name).chain(args.split_ascii_whitespace()).map(c_string).collect();
        argv.push(core::ptr::null_mut());
        libc::time::init(ctx.bi.tsc_khz);
        libc::sys::init(ctx.cpus, p.name);
        sched::init();
        let start = Box::into_raw(Box::new(Start { main: p.main, argv }));
        if sched::spawn(main_thread, start.cast(), true).is_none() {
            println!("guest: no memory for the program's main thread");
            arch::exit(exit::MEMCALL_FAILED);
        }
    }
    ctx.barrier();
    if let Err(st) = sched::start_ticks() {
        println!("guest: the VMM refused timer ticks (status {st})");
        arch::exit(exit::EXCEPTION);
    }
    sched::idle_loop()
}
