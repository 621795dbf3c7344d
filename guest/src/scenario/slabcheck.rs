//! `scenario=slabcheck`: the VMM owns the slabs. A double free, a wild free (a pointer that is
//! no object: off a boundary, outside any slab, an object never handed out) and using a freed
//! object's handle all get errors back and change nothing; good objects keep working.

use alloc::boxed::Box;
use alloc::vec::Vec;

use protocol::exit;
use protocol::memcall::{ALL_NODES, op, policy};
use protocol::slab::class_for;
use protocol::status::{EALREADY, EFAULT, OK};

use super::util::Checks;
use super::{Ctx, fail};
use crate::{heap, mem, println};

pub fn run(ctx: &Ctx) {
    if ctx.cpu != 0 {
        return;
    }
    let mut c = Checks::new("slabcheck");
    let before = mem::stats(ALL_NODES).unwrap_or_default();
    let class = class_for(64, 8).expect("a class for 64 bytes");

    // A good object, freed properly.
    let b = Box::new([7u64; 8]);
    let x = Box::into_raw(b) as u64;
    c.check(mem::call(mem::mk(op::SLAB_INFO, 0, [x, 0, 0, 0])).ret[0] == 64, "SLAB_INFO of a live object");
    // SAFETY: x came from Box::into_raw just above.
    drop(unsafe { Box::from_raw(x as *mut [u64; 8]) });
    c.check(heap::flush() == 0, "a good free was reported bad");

    // Using the freed object's handle.
    c.check(mem::call(mem::mk(op::SLAB_INFO, 0, [x, 0, 0, 0])).status == EALREADY, "SLAB_INFO of a freed object");
    c.check(mem::call(mem::mk(op::SLAB_FREE, 0, [x, 0, 0, 0])).status == EALREADY, "SLAB_FREE of a freed object");

    // Bad frees through the magazine: each is reported and skipped.
    let (page, _) = mem::alloc(4096, policy::LOCAL, 0, 0).expect("a page");
    let live = Box::into_raw(Box::new([1u64; 8])) as u64;
    // Top the magazine up now: the exchanges below then refill nothing, so the VMM hands out no
    // object between finding a free one and pushing it.
    heap::top_up(class);
    // An object of the same slab that the VMM holds free (never handed out, or back already):
    // a pointer the guest "invents".
    let slab_page = x & !4095;
    let invented = (0..64)
        .map(|k| slab_page + k * 64)
        .find(|&y| y != x && mem::call(mem::mk(op::SLAB_INFO, 0, [y, 0, 0, 0])).status == EALREADY)
        .unwrap_or(x);
    let cases: [(u64, u64, &str); 5] = [
        (x, EALREADY, "double free"),
        (live + 8, EFAULT, "pointer inside an object"),
        (page, EFAULT, "pointer to a page allocation"),
        (0xdead_0000, EFAULT, "pointer to nothing"),
        (invented, EALREADY, "an object the guest invented"),
    ];
    for (ptr, want, what) in cases {
        let (n0, _, _) = heap::bad_frees(class);
        heap::push_free(class, ptr);
        heap::flush();
        let (n1, st, bad) = heap::bad_frees(class);
        c.check(n1 == n0 + 1 && u64::from(st) == want && bad == ptr, what);
    }

    // Nothing changed: the live object is intact and frees normally; allocation still works.
    // SAFETY: `live` came from Box::into_raw above and was never freed.
    let l = unsafe { Box::from_raw(live as *mut [u64; 8]) };
    c.check(*l == [1u64; 8], "a live object was disturbed");
    drop(l);
    let v: Vec<u64> = (0..1000).collect();
    c.check(v.iter().sum::<u64>() == 499_500, "allocation after bad frees");
    drop(v);
    c.check(heap::flush() == 5, "the bad-free count changed on good frees");
    c.check(mem::call(mem::mk(op::SLAB_FREE, 0, [page, 0, 0, 0])).status == EFAULT, "SLAB_FREE of a page allocation");
    c.check(mem::free(page).is_ok(), "the page allocation was disturbed");
    heap::flush();
    let after = mem::stats(ALL_NODES).unwrap_or_default();
    // Everything freed came back: what the VMM counts as handed out is what sits in magazines.
    let cached: u64 = (0..ctx.cpus).map(heap::cached_objects).sum();
    c.check(after.slab_objects_active == cached, "slab objects leaked");
    let _ = before;
    let r = mem::call(mem::mk(op::SLAB_EXCHANGE, 0, [99, 1, 0, 0]));
    c.check(r.status != OK, "an exchange for a missing class succeeded");
    println!("@result scenario=slabcheck cases=5 ok={}", u8::from(c.ok));
    if !c.ok {
        fail(exit::VERIFY_FAILED);
    }
}
