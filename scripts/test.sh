#!/usr/bin/env bash
# Runs every test of nestvm: formatting, lints, unit tests, KVM tests with
# tiny guests on this machine's /dev/kvm, and the lab tests (Debian kernels
# nested inside QEMU TCG with AMD-V). Installs what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh

step() { printf '\n==> %s\n' "$*"; }

# In CI a missing /dev/kvm must fail the KVM tests instead of skipping them.
if [ "${CI:-}" = "true" ]; then export NESTVM_REQUIRE_KVM=1; fi

step "formatting (cargo fmt --check)"
cargo fmt --all --check

step "API description (openapi-spec-validator docs/openapi.yaml)"
"$NESTVM_VENV/bin/openapi-spec-validator" docs/openapi.yaml

step "lints (clippy -D warnings)"
cargo clippy --release --workspace --all-targets -- -D warnings

step "release build"
cargo build --release --workspace

step "unit tests and KVM tests with tiny guests"
if [ -e /dev/kvm ]; then echo "/dev/kvm is present: KVM tests run for real"; else echo "/dev/kvm is absent: KVM tests will say SKIPPED"; fi
cargo test --release --workspace

step "fuzz targets (${NESTVM_FUZZ_SECONDS:-30} s each, plus the regression corpus)"
scripts/fuzz.sh "${NESTVM_FUZZ_SECONDS:-30}"

step "lab tests (QEMU TCG with AMD-V, Debian kernels; several minutes)"
cargo test --release -p nestvm-lab --test lab -- --ignored --test-threads 1
