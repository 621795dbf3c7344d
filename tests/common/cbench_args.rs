//! Short arguments for the known C benchmarks (the manifests hold mimalloc-bench's, which run
//! for seconds to minutes): what the tests run, and `make bench-c` with `CBENCH_QUICK=1`. `{N}`
//! is the number of threads (vCPUs in the guest).

pub const SHORT: &[(&str, &str)] = &[
    ("larson", "1 8 1000 1000 100 4141 {N}"),
    ("larson-sized", "1 8 1000 1000 100 4141 {N}"),
    ("xmalloc-test", "-w {N} -t 1 -s 64"),
    ("cache-scratch1", "1 100 1 20000 {N}"),
    ("cache-scratchN", "{N} 100 1 20000 {N}"),
    ("cache-thrashN", "{N} 100 1 20000 {N}"),
    ("mstress", "{N} 10 5"),
    ("mleak", "2"),
    ("rptest", "{N} 0 1 2 50 100 10 8 1600"),
];

/// The short arguments of `name`, if it is a known benchmark.
pub fn short_args(name: &str) -> Option<&'static str> {
    SHORT.iter().find(|(n, _)| *n == name).map(|(_, a)| *a)
}
