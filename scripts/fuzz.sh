#!/usr/bin/env bash
# Runs every fuzz target of fuzz/ for SECONDS (default 30) each, starting
# from the regression corpus in fuzz/corpus/TARGET, which is replayed in
# full first. Fails on any crash, hang (>10 s per input) or leak. New inputs
# the fuzzer finds go to target/fuzz-corpus/TARGET, not into the repository;
# copy the interesting ones (crashes) into fuzz/corpus when fixing a bug.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-30}
# cargo-fuzz needs nightly's sanitizer flags: the nightly toolchain if it is
# installed, else the stable one told to allow them.
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    fuzz=(cargo +nightly fuzz)
else
    export RUSTC_BOOTSTRAP=1
    fuzz=(cargo fuzz)
fi
cd fuzz
for target in ${NESTVM_FUZZ_TARGETS:-virtqueue block_request net_frames net_stream state_container state_decode checkpoint_layers api_request definition port_devices mmio_registers kernel_loader migration_wire vsock_packets}; do
    out=../target/fuzz-corpus/$target
    mkdir -p "$out"
    echo "fuzz: $target for ${seconds}s"
    log=$out.log
    rc=0
    "${fuzz[@]}" run "$target" "$out" "corpus/$target" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1 || rc=$?
    grep -E "^(Done|stat::number_of_executed_units)" "$log" || true
    if [ "$rc" -ne 0 ]; then
        tail -n 40 "$log" >&2
        echo "fuzz: $target FAILED (exit $rc); full output in target/fuzz-corpus/$target.log" >&2
        exit 1
    fi
done
