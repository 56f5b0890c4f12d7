#!/usr/bin/env bash
# The nestvm demo: builds everything, starts the lab (an emulated host with
# AMD-V) and shows nestvm booting a Linux guest inside it that can itself
# use KVM. Installs what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh

say() { printf '\n\033[1m[demo] %s\033[0m\n' "$*"; }

say "Building nestvm (release)..."
cargo build --release --workspace --quiet
say "This machine's /dev/kvm cannot expose VT-x/AMD-V to guests, so the demo runs in the lab:"
say "QEMU emulates an AMD EPYC with SVM (L1); nestvm runs inside it and boots Debian's kernel as L2."
say "Lines tagged LAB-L1 come from L1's shell, LAB-L2 from the guest nestvm booted, [ ... ] from kernels."
NESTVM_LAB_VERBOSE=1 ./target/release/nestvm-lab run crates/lab/scenarios/demo.sh --timeout 900
say "Done: nestvm booted Linux with 2 vCPUs inside an emulated AMD-V host; the guest saw svm and loaded kvm-amd."
