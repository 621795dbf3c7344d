//! `scenario=segv kind=read|write-ro|ud|gp|stack`: a deliberate bad access. The guest's own
//! exception handler must report it (vector, error code, RIP, CR2) and stop the VM with
//! `exit::EXCEPTION`; a stack overflow must arrive as a double fault on the IST stack.

use protocol::memcall::{policy, prot};

use super::Ctx;
use crate::{mem, println};

/// Recurses until the stack overflows (deliberately unbounded).
#[inline(never)]
#[allow(unconditional_recursion)]
fn recurse(depth: u64) -> u64 {
    let buf = [depth; 64];
    core::hint::black_box(&buf);
    recurse(depth + 1) + core::hint::black_box(buf[3])
}

pub fn run(ctx: &Ctx) {
    if ctx.cpu != 0 {
        return;
    }
    let kind = ctx.args.get("kind").unwrap_or("read");
    println!("guest: segv: {kind}");
    match kind {
        "read" => {
            let v = super::util::read(0xdead_0000);
            println!("guest: segv: read {v:#x} from an unmapped page");
        }
        "write-ro" => {
            let (va, _) = mem::alloc(4096, policy::LOCAL, 0, 0).expect("alloc");
            mem::protect(va, 4096, prot::READ).expect("protect");
            super::util::write(va, 1);
            println!("guest: segv: wrote a read-only page");
        }
        // SAFETY: deliberately raises #UD.
        "ud" => unsafe { core::arch::asm!("ud2") },
        // SAFETY: deliberately raises #GP (hlt is privileged at CPL3).
        "gp" => unsafe { core::arch::asm!("hlt") },
        "stack" => {
            let v = recurse(0);
            println!("guest: segv: recursion returned {v}");
        }
        _ => println!("guest: segv: unknown kind"),
    }
}
