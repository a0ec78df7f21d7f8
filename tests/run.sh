#!/usr/bin/env bash
# The README's test command: sets up what the tests need on a fresh Debian machine, then
# runs `cargo test --workspace --release` (extra arguments are passed to it).
#
#   sudo tests/run.sh                    # everything
#   sudo tests/run.sh driver_backend     # extra arguments go to cargo test (a filter, -- ...)
#
# Set-up, each step only when it is missing:
#  * Debian packages: dpdk and dpdk-dev (dpdk-testpmd and the PMDs net_virtio, net_vhost,
#    mempool_ring: the interop peer), qemu-system-x86 and the VM image's build tools
#    (cpio xz-utils make gcc-12 binutils libelf1 libssl3 ethtool), and tcpdump (reads back
#    testpmd's packet captures), iproute2 and iputils-ping (the tap tests' namespaces);
#  * 2 MiB hugepages: NR_HUGEPAGES reserved (default 1024) and hugetlbfs on /dev/hugepages;
#  * the VM image (tests/vm/build-image.sh, cached under target/vm/).
# Installing packages and reserving hugepages need root. Without root, when something is
# missing, it prints one line saying what and exits 1; when everything is there it runs
# the tests as the current user (the cross-process tests then fail on what needs root).
# Leftovers of crashed DPDK runs of the tests (file prefix vnettest-*) are removed first.
# Before the tests, a smoke run of every fuzz target (tests/fuzz/run.sh all
# $FUZZ_SMOKE_SECS, default 20 s each, stable toolchain); FUZZ_SMOKE=0 skips it, and it is
# skipped when arguments select tests.
set -euo pipefail

cd "$(dirname "$0")/.."

NR_HUGEPAGES=${NR_HUGEPAGES:-1024} # each DPDK testpmd in the tests takes -m 256
HUGE_DIR=/dev/hugepages
VM_PACKAGES=(qemu-system-x86 cpio xz-utils make gcc-12 binutils libelf1 libssl3 ethtool tcpdump)
# The tap tests (tests/tests/backend_tap.rs): `ip netns`, `ping`, `sha256sum`.
VM_PACKAGES+=(iproute2 iputils-ping coreutils)
# The VM runner's test (tests/tests/vm_runner.rs) builds a static C program with gcc-12
# (libc's static archive, libc.a, is in libc6-dev).
VM_PACKAGES+=(libc6-dev)

say() { printf 'tests/run.sh: %s\n' "$*" >&2; }
die() { say "ERROR: $*"; exit 1; }

# cargo from rustup lives in ~/.cargo/bin, which a non-login shell (sudo) may not have.
if [ -d "${HOME:-/root}/.cargo/bin" ]; then PATH="${HOME:-/root}/.cargo/bin:$PATH"; fi
command -v cargo >/dev/null || die "cargo not found in PATH (install Rust with rustup)"
root=false
[ "$(id -u)" = 0 ] && root=true

# --- what is missing ----------------------------------------------------------------
missing_pkgs=()
command -v dpdk-testpmd >/dev/null || missing_pkgs+=(dpdk dpdk-dev)
for pmd in librte_net_virtio librte_net_vhost librte_mempool_ring; do
    compgen -G "/usr/lib/*/dpdk/pmds-*/$pmd.so*" >/dev/null || { missing_pkgs+=(dpdk); break; }
done
for p in "${VM_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing_pkgs+=("$p")
done
mapfile -t missing_pkgs < <(printf '%s\n' "${missing_pkgs[@]}" | sed '/^$/d' | sort -u)
have_pages=$(cat /proc/sys/vm/nr_hugepages)
need_pages=false
[ "$have_pages" -lt "$NR_HUGEPAGES" ] && need_pages=true
need_mount=false
mountpoint -q "$HUGE_DIR" || need_mount=true

if ! $root; then
    what=()
    [ ${#missing_pkgs[@]} -gt 0 ] && what+=("the packages ${missing_pkgs[*]}")
    $need_pages && what+=("$NR_HUGEPAGES hugepages reserved (have $have_pages)")
    $need_mount && what+=("hugetlbfs mounted on $HUGE_DIR")
    if [ ${#what[@]} -gt 0 ]; then
        die "needs root to set up: $(IFS=';'; echo "${what[*]}" | sed 's/;/, /g') (run: sudo $0)"
    fi
fi

# --- set-up (root) ------------------------------------------------------------------
if [ ${#missing_pkgs[@]} -gt 0 ]; then
    say "installing ${missing_pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get -o DPkg::Lock::Timeout=600 update -q
    # On Debian 12 `dpdk` is only the runtime libraries; dpdk-testpmd is in `dpdk-dev`. The
    # PMDs the tests load are *Recommends* of `dpdk`, hence --install-recommends.
    apt-get -o DPkg::Lock::Timeout=600 install -y -q --install-recommends "${missing_pkgs[@]}"
fi
command -v dpdk-testpmd >/dev/null || die "dpdk-testpmd not found after installing dpdk-dev"
for pmd in librte_net_virtio librte_net_vhost librte_mempool_ring; do
    compgen -G "/usr/lib/*/dpdk/pmds-*/$pmd.so*" >/dev/null || die "DPDK driver $pmd is not installed"
done
command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 not found after installing qemu-system-x86"
command -v ping >/dev/null || die "ping not found after installing iputils-ping"
command -v tcpdump >/dev/null || die "tcpdump not found after installing it"

if $need_pages; then
    echo "$NR_HUGEPAGES" >/proc/sys/vm/nr_hugepages || die "cannot write /proc/sys/vm/nr_hugepages"
    have_pages=$(cat /proc/sys/vm/nr_hugepages)
    [ "$have_pages" -ge "$NR_HUGEPAGES" ] \
        || die "only $have_pages hugepages reserved, need $NR_HUGEPAGES (memory too fragmented?)"
fi
if $need_mount; then
    mkdir -p "$HUGE_DIR"
    mount -t hugetlbfs nodev "$HUGE_DIR" || die "cannot mount hugetlbfs on $HUGE_DIR"
fi
if $root; then
    # Leftovers of earlier crashed DPDK runs of our tests (EAL --file-prefix=vnettest-*).
    rm -f "$HUGE_DIR"/vnettest-*
    rm -rf /var/run/dpdk/vnettest-*
fi
free=$(awk '/^HugePages_Free/ {print $2}' /proc/meminfo)
[ "$free" -ge 512 ] || die "only $free free 2 MiB hugepages (the tests need >= 512 for two DPDK testpmds)"
say "hugepages: $have_pages reserved, $free free; DPDK $(dpkg-query -W -f='${Version}' dpdk-dev)"

# --- the VM image (cached; a warm run takes about a second) ---------------------------
cargo build --release -p testpmd -p host-backend
log=target/build-image.log
if ! tests/vm/build-image.sh >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    die "tests/vm/build-image.sh failed (log: $log)"
fi
say "$(tail -n 1 "$log")"

# --- fuzz smoke (stable toolchain; builds libFuzzer once, then runs each target) -------
if [ "${FUZZ_SMOKE:-1}" != 0 ] && [ $# -eq 0 ]; then
    secs=${FUZZ_SMOKE_SECS:-20}
    say "fuzz smoke: tests/fuzz/run.sh all $secs"
    started=$(date +%s)
    tests/fuzz/run.sh all "$secs" || die "fuzz smoke failed (inputs under tests/fuzz/artifacts/)"
    say "fuzz smoke took $(( $(date +%s) - started )) s"
fi

# --- the tests ------------------------------------------------------------------------
say "cargo test --workspace --release $*"
exec cargo test --workspace --release "$@"
