//! A hostile or careless guest cannot hurt the host: its own races never stop the VM, its calls
//! cannot grow the VMM without bound, it cannot pass for the VMM's own failures, and writable
//! memory is never executable. Every test runs a real guest on real KVM with userfaultfd.

mod common;

use common::run;
use serde_json::Value;

fn n(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("`{key}` missing from {v}"))
}

#[test]
fn guest_races_between_access_and_free_end_in_data_or_a_fault_never_a_vm_stop() {
    let mut free_frame_faults = 0;
    for huge in [0, 1] {
        let args = format!("scenario=race huge={huge} rounds=2000 seed={}", 40 + huge);
        let r = run(&["-v", "--cpus", "2", "--guest-args", &args]);
        r.assert_ok();
        let xs: Vec<Value> = r.results().into_iter().filter(|x| x["scenario"] == "race").collect();
        assert_eq!(xs.len(), 2, "{}", r.stdout);
        for x in &xs {
            assert_eq!(n(x, "violations"), 0, "{x}");
        }
        let mutator = xs.iter().find(|x| x["cpu"] == 0).unwrap();
        let toucher = xs.iter().find(|x| x["cpu"] == 1).unwrap();
        assert_eq!(n(mutator, "rounds"), 2000);
        // The toucher really raced: it saw data and it saw faults.
        assert!(n(toucher, "reads") > 1000 && n(toucher, "faults") > 1000, "{toucher}");
        let stats = r.stats.as_ref().unwrap();
        assert_eq!(stats["memory"]["invariants"], "ok");
        free_frame_faults += n(&stats["faults"], "free_frame");
    }
    // Some second-level faults arrived after their frame was freed: the race the VMM must
    // serve without stopping happened.
    assert!(free_frame_faults > 0, "no fault raced with a free");
}
