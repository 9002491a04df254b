#!/usr/bin/env bash
# The system packages the build and the tests use, installed with apt-get and checked by
# Debian package name — never by a file glob, which a file from another package can
# satisfy (libclang-cpp14 once passed for libclang-dev). scripts/test.sh runs this under
# `env -i` (no inherited PATH additions or library paths) and then checks again.
#
#   scripts/prereqs.sh           install what is missing, then verify
#   scripts/prereqs.sh --check   verify only; exit 1 naming what is missing
#   scripts/prereqs.sh --list    print the package names
set -euo pipefail

# Package        what uses it
PACKAGES=(
  gcc          # the C compiler and linker the Rust toolchain calls
  libc6-dev    # C headers and startup files for linking
  libucx-dev   # UCX headers and libraries: the `ucx` feature (xpyd-ucx-sys)
  libclang-dev # libclang, loaded by bindgen in xpyd-ucx-sys's build script
  etcd-server  # `etcd`, started by the membership tests
  iproute2     # `ip netns`: the tests that put workers on separate network hosts
  chromium        # headless browser: the dashboard's browser test
  chromium-driver # chromedriver (WebDriver), which that test drives chromium through
)

installed() {
  [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" = installed ]
}

missing() {
  local p
  for p in "${PACKAGES[@]}"; do
    installed "$p" || echo "$p"
  done
}

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

case "${1:-}" in
  --list)
    printf '%s\n' "${PACKAGES[@]}"
    exit 0
    ;;
  --check) ;;
  "")
    mapfile -t todo < <(missing)
    if [ ${#todo[@]} -gt 0 ]; then
      echo "installing: ${todo[*]}"
      as_root apt-get update -qq
      as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "${todo[@]}"
    fi
    ;;
  *)
    echo "usage: $0 [--check|--list]" >&2
    exit 64
    ;;
esac

mapfile -t left < <(missing)
if [ ${#left[@]} -gt 0 ]; then
  echo "missing system packages: ${left[*]}" >&2
  exit 1
fi
echo "system packages installed: ${PACKAGES[*]}"
