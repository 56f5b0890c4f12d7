#!/usr/bin/env bash
# Installs what nestvm's build, tests and lab need on a fresh Debian machine
# of this project's kind (which already has the Rust toolchain). Sourced by
# scripts/test.sh, scripts/demo.sh and scripts/bench.sh; safe to run twice.
set -euo pipefail

need=()
command -v qemu-system-x86_64 >/dev/null 2>&1 || need+=(qemu-system-x86)
# (ldd exits 1 for a static binary: read its words, not its status, which
# pipefail would take for the pipeline's.)
case "$([ -x /bin/busybox ] && ldd /bin/busybox 2>&1)" in
*"not a dynamic"*) ;;
*) need+=(busybox-static) ;;
esac
command -v dpkg-deb >/dev/null 2>&1 || need+=(dpkg)
command -v socat >/dev/null 2>&1 || need+=(socat)
# The stock guest agent, which `vm exec` and `vm cp` speak to (their tests run it here).
[ -x /usr/sbin/qemu-ga ] || need+=(qemu-guest-agent)
[ -x /usr/bin/passt ] || need+=(passt)
# image debian builds with mmdebstrap and genext2fs (its test runs them).
command -v mmdebstrap >/dev/null 2>&1 || need+=(mmdebstrap)
command -v genext2fs >/dev/null 2>&1 || need+=(genext2fs)
{ [ -x /usr/sbin/mke2fs ] || [ -x /sbin/mke2fs ]; } || need+=(e2fsprogs)
command -v cargo >/dev/null 2>&1 || { echo "setup: cargo is missing: install the Rust toolchain (rustup) first" >&2; exit 1; }

if [ ${#need[@]} -gt 0 ]; then
    echo "setup: installing Debian packages: ${need[*]}"
    if [ "$(id -u)" -ne 0 ]; then
        echo "setup: run as root (or install ${need[*]} yourself)" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# Python tools the tests use, from PyPI, in a venv of their own (cached
# across clones): openapi-spec-validator checks docs/openapi.yaml, and
# schemathesis fuzzes a live VM's API from it.
NESTVM_VENV="${XDG_CACHE_HOME:-$HOME/.cache}/nestvm/venv"
export NESTVM_VENV
if [ ! -x "$NESTVM_VENV/bin/openapi-spec-validator" ] || [ ! -x "$NESTVM_VENV/bin/st" ]; then
    echo "setup: installing Python test tools into $NESTVM_VENV (openapi-spec-validator, schemathesis)"
    if ! python3 -m venv "$NESTVM_VENV" >/dev/null 2>&1; then
        if [ "$(id -u)" -ne 0 ]; then
            echo "setup: python3 cannot make a venv: install python3-venv (as root)" >&2
            exit 1
        fi
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
        rm -rf "$NESTVM_VENV"
        python3 -m venv "$NESTVM_VENV"
    fi
    "$NESTVM_VENV/bin/pip" install -q --disable-pip-version-check \
        "openapi-spec-validator==0.9.*" "schemathesis==4.32.*"
fi

# The fuzz targets (fuzz/) build with cargo-fuzz.
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "setup: installing cargo-fuzz (cargo install cargo-fuzz --locked)"
    cargo install -q cargo-fuzz --locked
fi
