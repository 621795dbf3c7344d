#!/usr/bin/env bash
# Builds the fuzz targets with libFuzzer's coverage instrumentation (stable Rust: sancov passes,
# no sanitizer) and runs them.
#   fuzz/run.sh smoke            every target briefly over its corpus (`make fuzz`, CI)
#   fuzz/run.sh TARGET [ARGS]    one target with libFuzzer's own arguments, e.g. -runs=10000000
# New corpus entries land in fuzz/corpus/TARGET; crashes in fuzz/artifacts/TARGET.
set -euo pipefail
cd "$(dirname "$0")"
TARGETS=(memcalls image cli console)
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing"
# An explicit target keeps the instrumentation off build scripts and proc-macros.
TRIPLE=x86_64-unknown-linux-gnu
cargo build --release --target "$TRIPLE" --quiet
BIN=target/$TRIPLE/release
run() {
    local t=$1
    shift
    mkdir -p "corpus/$t" "artifacts/$t"
    "$BIN/$t" "corpus/$t" -artifact_prefix="artifacts/$t/" -rss_limit_mb=4096 "$@"
}
if [ "${1:-smoke}" = smoke ]; then
    # A minute in all: replay the corpus, then a few seconds of new inputs per target.
    for t in "${TARGETS[@]}"; do
        echo "fuzz: $t"
        run "$t" -max_total_time=12 -print_final_stats=1 2>&1 | grep -E "^(stat::number_of_executed_units|==|.*(panicked|ERROR|crash))" || true
        if ls "artifacts/$t"/crash-* >/dev/null 2>&1; then
            echo "fuzz: $t crashed; see fuzz/artifacts/$t" >&2
            exit 1
        fi
    done
else
    run "$@"
fi
