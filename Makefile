# One command to set up and run, one to test. `.ci/run` calls `make lint test`.
CARGO ?= cargo

.PHONY: all setup guest run test lint bench bench-c fuzz clean

all: run

# Toolchain pieces this project needs beyond stable Rust.
setup:
	rustup target add x86_64-unknown-none
	rustup component add rustfmt clippy
	./images/host-packages.sh

# The default guest image (images/out/guest.elf).
guest: setup
	./images/build.sh

# Boot the default stress guest with the embedded default configuration.
run: setup
	$(CARGO) run --release -p vmm -- run

test: guest
	$(CARGO) test --workspace

lint: setup
	$(CARGO) fmt --all --check
	cd guest && $(CARGO) fmt --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	cd guest && $(CARGO) clippy --release -- -D warnings

bench: guest
	$(CARGO) bench -p vmm

# The C allocator benchmarks (../shared/cbench) in the guest against native glibc and mimalloc,
# and our own workloads natively and in the guest (the native bench, first): one table,
# target/bench-plots/cbench.csv and cbench.svg. CBENCH_RUNS=N repeats (default 3); CBENCH_QUICK=1
# uses the tests' short arguments; CBENCH_ONLY=larson,rptest runs only those.
bench-c: guest
	$(CARGO) bench -p vmm --bench native
	$(CARGO) bench -p vmm --bench cbench

# A short smoke pass of every fuzz target over its corpus (a minute in all); fuzz/run.sh TARGET
# -runs=N for long runs.
fuzz: setup
	./fuzz/run.sh smoke

clean:
	$(CARGO) clean
	cd guest && $(CARGO) clean
	cd fuzz && $(CARGO) clean
	rm -rf images/out
