#!/usr/bin/env bash
# nestvm's benchmarks (apart from the tests): writes BENCHMARKS.md and
# benchmarks.json at the repository root.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
cargo build --release --workspace --quiet
./target/release/nestvm-bench
