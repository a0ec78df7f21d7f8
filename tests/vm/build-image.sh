#!/usr/bin/env bash
# Builds the guest image of the VM tests (tests/tests/vm_*.rs): a Debian 6.1 kernel and an
# initramfs with busybox, the VFIO modules (plus a vfio.ko rebuilt with no-IOMMU support),
# the kernel's own virtio-net driver modules (for guests that use the kernel's driver
# instead of ours: vt.mode=kernel), ethtool, our testpmd and the driver's l2fwd example
# with their shared libraries,
# tests/vm/guest-init.sh as /init and tests/vm/guest-kernel-net.sh beside it.
#
#   tests/vm/build-image.sh          # -> target/vm/image/{vmlinuz,initrd.img,manifest}
#
# A user's image: the same guest with the user's own files in it, written to a directory of
# its own (the default image, which our tests boot, is never touched):
#
#   tests/vm/build-image.sh --add ./myapp --add ./app.conf:/etc/app.conf --init ./run.sh [--no-bind] [--out DIR]
#
#   --add SRC[:DEST]   copy SRC into the image at DEST (default /bin/<name of SRC>); may
#                      repeat. A dynamically linked program brings the shared libraries
#                      `ldd` lists for it.
#   --init SCRIPT      the guest's /init runs SCRIPT (with sh) once the virtio-net devices
#                      are bound to vfio-pci (their addresses in $VNET_BDFS, hugepages
#                      mounted), or, with --no-bind, once the kernel's virtio_net has brought
#                      the interfaces up (their names in $VNET_IFACES); see guest-init.sh.
#   --no-bind          leave the virtio-net devices to the kernel's own virtio_net driver
#                      instead of binding them to vfio-pci (IPv6 off, so the kernel sends
#                      nothing by itself; no addresses). Boot it with vt.mode=kernel.
#   --out DIR          where the image goes (default: <vm dir>/user-images/<hash of the
#                      inputs>, so images with different inputs never overwrite each other)
#
# Everything it downloads or builds is cached under target/vm/ (gitignored with target/):
# a warm run only re-checks testpmd with cargo and repacks the initramfs if an input
# changed (a few seconds). It needs root only to apt-get install missing host tools.
#
# Environment:
#   VNET_VM_DIR=DIR        cache and output directory (default: <cargo target dir>/vm,
#                          i.e. $CARGO_TARGET_DIR/vm or <repo>/target/vm)
#   VNET_TESTPMD=PATH      use this testpmd binary instead of `cargo build --release -p testpmd`
#   VNET_L2FWD=PATH        use this l2fwd binary instead of
#                          `cargo build --release -p vnet-driver --example l2fwd`
#   VNET_VM_APT=0          never apt-get install missing host tools (fail instead)
#   VNET_KERNEL_ABI=6.1.0-57  VNET_KERNEL_VERSION=6.1.192-3
#                          the Debian kernel: linux-image-<ABI>-amd64, linux-headers-
#                          <ABI>-{amd64,common}, linux-kbuild-6.1 and linux-source-6.1, all of
#                          exactly this version (the rebuilt vfio.ko must match the kernel).
#                          Default: the kernel Debian's linux-image-amd64 points at now (the
#                          archive keeps only the current set of these packages complete),
#                          else 6.1.0-57 / 6.1.192-3.
#
# Host packages (Debian 12): apt (apt-get download, dpkg -x), cpio, gzip, xz-utils, make,
# gcc-12, binutils (strip), libelf1 and libssl3 (linux-kbuild's tools), libc-bin (ldd),
# ethtool (copied into the image with its libraries), cargo.
# The tests also need qemu-system-x86. Missing ones are installed when running as root.
#
# Output: the last line is "VNET-IMAGE <dir>" with vmlinuz and initrd.img in <dir>.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)

# ---- options: a user's image ---------------------------------------------------------------
# Errors in the options are one line on stderr and exit status 2, before anything is built.
usage_error() { echo "build-image.sh: ERROR: $*" >&2; exit 2; }
abspath() { echo "$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"; }
ADD_SRC=() ADD_DEST=() USER_INIT="" NO_BIND=0 OUT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --add)
            [ $# -ge 2 ] || usage_error "--add needs SRC[:DEST]"
            src=${2%%:*} dest=${2#*:}
            [ "$dest" != "$2" ] || dest=/bin/$(basename "$src")
            [ -f "$src" ] || usage_error "--add $2: $src: no such file"
            case "$dest" in /*) ;; *) usage_error "--add $2: DEST must be an absolute path in the guest" ;; esac
            case "$dest" in /init | /etc/vnet-* | */../* | */..) usage_error "--add $2: DEST $dest is reserved" ;; esac
            ADD_SRC+=("$(abspath "$src")") ADD_DEST+=("$dest")
            shift 2 ;;
        --init)
            [ $# -ge 2 ] || usage_error "--init needs SCRIPT"
            [ -f "$2" ] || usage_error "--init $2: no such file"
            USER_INIT=$(abspath "$2")
            shift 2 ;;
        --no-bind) NO_BIND=1; shift ;;
        --out)
            [ $# -ge 2 ] || usage_error "--out needs DIR"
            OUT=$2; shift 2 ;;
        -h | --help) sed -n '2,/^set -euo pipefail/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) usage_error "unknown argument '$1' (build-image.sh --help)" ;;
    esac
done
USER_IMAGE=0
if [ ${#ADD_SRC[@]} -gt 0 ] || [ -n "$USER_INIT" ] || [ "$NO_BIND" = 1 ] || [ -n "$OUT" ]; then USER_IMAGE=1; fi

# current_kernel: "<ABI> <VERSION>" of the kernel linux-image-amd64's candidate depends on.
current_kernel() {
    local v
    v=$(apt-cache policy linux-image-amd64 2>/dev/null | awk '/Candidate:/ {print $2}')
    [ -n "$v" ] && [ "$v" != "(none)" ] || return 1
    apt-cache show "linux-image-amd64=$v" 2>/dev/null \
        | sed -n 's/^Depends:.*linux-image-\([0-9][^ ]*\)-amd64 (= \([^)]*\)).*/\1 \2/p' | head -n1
}
if [ -z "${VNET_KERNEL_ABI:-}" ] || [ -z "${VNET_KERNEL_VERSION:-}" ]; then
    cur=$(current_kernel || true)
    if [ -z "$cur" ] && [ "$(id -u)" = 0 ]; then
        apt-get -o DPkg::Lock::Timeout=600 update -q >/dev/null 2>&1 || true
        cur=$(current_kernel || true)
    fi
    VNET_KERNEL_ABI=${VNET_KERNEL_ABI:-${cur%% *}}
    VNET_KERNEL_VERSION=${VNET_KERNEL_VERSION:-${cur#* }}
fi
KABI=${VNET_KERNEL_ABI:-6.1.0-57}
KVERSION=${VNET_KERNEL_VERSION:-6.1.192-3}
KSERIES=${KABI%.*-*}                     # 6.1
KVER=$KABI-amd64                         # uname -r of the guest
VM=${VNET_VM_DIR:-${CARGO_TARGET_DIR:-$REPO/target}/vm}
CACHE=$VM/cache
IMG=$VM/image
T0=${EPOCHREALTIME/./}

say() { local t=$(( ${EPOCHREALTIME/./} - T0 )); printf '[build-image %3d.%ds] %s\n' $((t / 1000000)) $((t / 100000 % 10)) "$*" >&2; }
die() { echo "build-image.sh: ERROR: $*" >&2; exit 1; }

# ---- host tools ------------------------------------------------------------------------
# command -> Debian package
declare -A TOOLS=([apt-get]=apt [dpkg]=dpkg [cpio]=cpio [gzip]=gzip [xz]=xz-utils [make]=make
                  [gcc-12]=gcc-12 [strip]=binutils [ldd]=libc-bin [sha256sum]=coreutils
                  [qemu-system-x86_64]=qemu-system-x86 [ethtool]=ethtool)
missing=()
for t in "${!TOOLS[@]}"; do command -v "$t" >/dev/null || missing+=("${TOOLS[$t]}"); done
# the prebuilt tools of linux-kbuild (objtool, modpost, ...) link these at run time
[ -e /usr/lib/x86_64-linux-gnu/libelf.so.1 ] || missing+=(libelf1)
[ -e /usr/lib/x86_64-linux-gnu/libssl.so.3 ] || missing+=(libssl3)
if [ ${#missing[@]} -gt 0 ]; then
    mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
    if [ "${VNET_VM_APT:-1}" != 0 ] && [ "$(id -u)" = 0 ]; then
        say "installing missing host packages: ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends "${missing[@]}" >&2 \
            || { apt-get -o DPkg::Lock::Timeout=600 update -q >&2 &&
                 apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends "${missing[@]}" >&2; } \
            || die "apt-get install ${missing[*]} failed"
    else
        die "missing host packages: ${missing[*]} (apt-get install ${missing[*]}; run as root to let this script do it)"
    fi
fi
command -v cargo >/dev/null || [ -n "${VNET_TESTPMD:-}" ] || die "cargo not found in PATH (or set VNET_TESTPMD)"

mkdir -p "$CACHE/debs"
# apt-get download runs as the unprivileged _apt user where it can: let it write here
chmod 0777 "$CACHE/debs" 2>/dev/null || true

# deb PKG [VERSION]: prints the path of the cached .deb, downloading it if needed.
# With VERSION the exact version is fetched (apt-get download PKG=VERSION); without it a
# cached deb of any version is reused, else the candidate is fetched.
deb() {
    local p=$1 v=${2:-} f
    if [ -n "$v" ]; then
        f="$CACHE/debs/${p}_${v/:/%3a}_amd64.deb"; [ -e "$f" ] || f="$CACHE/debs/${p}_${v/:/%3a}_all.deb"
    else
        f=$(ls "$CACHE/debs/${p}_"*.deb 2>/dev/null | head -n1 || true)
    fi
    if [ -z "$f" ] || [ ! -s "$f" ]; then
        say "apt-get download $p${v:+=$v}"
        (cd "$CACHE/debs" && apt-get download -q "$p${v:+=$v}") >"$CACHE/apt-download.log" 2>&1 \
            || { apt-get -o DPkg::Lock::Timeout=600 update -q >/dev/null 2>&1 || true
                 (cd "$CACHE/debs" && apt-get download -q "$p${v:+=$v}") >"$CACHE/apt-download.log" 2>&1; } \
            || die "apt-get download $p${v:+=$v} failed (is $p $v still in the apt sources? set VNET_KERNEL_ABI/VNET_KERNEL_VERSION to the current pair):
$(cat "$CACHE/apt-download.log")"
        if [ -n "$v" ]; then
            f=$(ls "$CACHE/debs/${p}_${v/:/%3a}_"*.deb 2>/dev/null | head -n1 || true)
        else
            f=$(ls "$CACHE/debs/${p}_"*.deb 2>/dev/null | head -n1 || true)
        fi
        [ -n "$f" ] && [ -s "$f" ] || die "apt-get download $p: no .deb appeared in $CACHE/debs"
    fi
    echo "$f"
}

# ---- 1. kernel (pinned) and its VFIO modules, in load order -------------------------------
# The order is checked against each module's modinfo "depends=" (Debian ships no modules.dep).
MODS=(vfio vfio_iommu_type1 vfio_virqfd irqbypass vfio-pci-core vfio-pci)
# The kernel's virtio-net driver and what it needs (all modules in Debian's kernel), in load
# order; /init loads them only in vt.mode=kernel.
NETMODS=(virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci failover net_failover virtio_net)
K=$CACHE/kernel-$KVER-$KVERSION
# A cache from before NETMODS lacks them: fetch the kernel again.
for m in "${NETMODS[@]}"; do [ -e "$K/modules/$m.ko" ] || rm -f "$K/.done"; done
if [ ! -e "$K/.done" ]; then
    rm -rf "$K" "$K.x"; mkdir -p "$K/modules" "$K.x"
    dpkg -x "$(deb "linux-image-$KVER" "$KVERSION")" "$K.x"
    cp "$K.x/boot/vmlinuz-$KVER" "$K/vmlinuz"
    cp "$K.x/boot/config-$KVER" "$K/config"
    for m in "${MODS[@]}" "${NETMODS[@]}"; do
        p=$(find "$K.x/lib/modules/$KVER/kernel" -name "$m.ko" -print -quit)
        [ -n "$p" ] || die "module $m.ko not found in linux-image-$KVER"
        cp "$p" "$K/modules/"
    done
    rm -rf "$K.x"
    touch "$K/.done"
fi
grep -q '^CONFIG_VFIO_NOIOMMU=y' "$K/config" && NOIOMMU_BUILTIN=1 || NOIOMMU_BUILTIN=0
say "kernel $KVER ($KVERSION), CONFIG_VFIO_NOIOMMU builtin: $NOIOMMU_BUILTIN"
# Checks that each module of a load-order list comes after every module it depends on.
check_order() {
    local loaded=" " m d deps
    for m in "$@"; do
        deps=$(grep -a -o 'depends=[^[:cntrl:]]*' "$K/modules/$m.ko" | head -n1 | cut -d= -f2 | tr ',' ' ')
        for d in $deps; do
            case "$loaded" in *" $d "* | *" ${d//_/-} "*) ;; *) die "module $m depends on $d, which is not loaded before it" ;; esac
        done
        loaded="$loaded$m "
    done
}
check_order "${MODS[@]}"
check_order "${NETMODS[@]}"

# ---- 3. vfio.ko with CONFIG_VFIO_NOIOMMU (Debian builds it without) ----------------------------
N=$CACHE/noiommu-$KVER-$KVERSION
if [ "$NOIOMMU_BUILTIN" = 0 ] && [ ! -e "$N/.done" ]; then
    say "rebuilding vfio.ko with -DCONFIG_VFIO_NOIOMMU=1 (linux-source-$KSERIES $KVERSION)"
    rm -rf "$N"; mkdir -p "$N/root" "$N/build"
    for p in "linux-headers-$KVER" "linux-headers-$KABI-common" "linux-kbuild-$KSERIES"; do
        dpkg -x "$(deb "$p" "$KVERSION")" "$N/root"
    done
    H=$N/root/usr/src/linux-headers-$KVER
    # the flavour's Makefile includes the -common tree by its installed absolute path
    echo "include $N/root/usr/src/linux-headers-$KABI-common/Makefile" > "$H/Makefile"
    # the kbuild tools are symlinked from /usr/lib/linux-kbuild-X: point them into our tree
    for l in "$H/scripts" "$H/tools"; do
        if [ -L "$l" ]; then ln -sfn "$N/root/usr/lib/linux-kbuild-$KSERIES/$(basename "$l")" "$l"; fi
    done
    SRC=linux-source-$KSERIES
    dpkg --fsys-tarfile "$(deb "$SRC" "$KVERSION")" | tar -xO "./usr/src/$SRC.tar.xz" \
        | xz -dc | tar -x -C "$N" --wildcards "$SRC/drivers/vfio/*"
    V=$N/$SRC/drivers/vfio
    # vfio.ko's objects as listed in drivers/vfio/Makefile ("vfio-y += a.o b.o ...")
    objs=$(sed -n '/^vfio-y/,/^$/p' "$V/Makefile" | grep -oE '[a-z_]+\.o' | tr '\n' ' ')
    [ -n "$objs" ] || die "cannot read vfio-y from $V/Makefile"
    for o in $objs; do cp "$V/${o%.o}.c" "$N/build/"; done
    cp "$V"/*.h "$N/build/"
    printf 'obj-m := vfio.o\nvfio-y := %s\nccflags-y += -DCONFIG_VFIO_NOIOMMU=1\n' "$objs" > "$N/build/Makefile"
    make -C "$H" M="$N/build" -j"$(nproc)" modules >"$N/make.log" 2>&1 \
        || die "vfio.ko build failed:
$(tail -n 30 "$N/make.log")"
    [ -e "$N/build/vfio.ko" ] || die "vfio.ko build produced no module: $(tail -n 20 "$N/make.log")"
    # It must export the stock module's symbol CRCs or the stock vfio_iommu_type1 and
    # vfio-pci-core refuse to load against it.
    diff <(awk -F'\t' '{print $1, $2}' "$N/build/Module.symvers" | sort) \
         <(awk -F'\t' '$3 == "drivers/vfio/vfio" {print $1, $2}' "$H/Module.symvers" | sort) >/dev/null \
        || die "rebuilt vfio.ko exports different symbol CRCs than the stock one"
    grep -q -a enable_unsafe_noiommu_mode "$N/build/vfio.ko" \
        || die "rebuilt vfio.ko has no enable_unsafe_noiommu_mode parameter"
    cp "$N/build/vfio.ko" "$N/vfio.ko"
    rm -rf "$N/root" "$N/build" "$N/linux-source-$KSERIES"    # 90 MB of headers and sources
    touch "$N/.done"
    say "vfio.ko rebuilt (symbol CRCs identical to the stock module)"
fi

# ---- 4. busybox (static) -------------------------------------------------------------------
B=$CACHE/busybox
if [ ! -e "$B/.done" ]; then
    rm -rf "$B"; mkdir -p "$B"
    dpkg -x "$(deb busybox-static)" "$B"
    touch "$B/.done"
fi

# ---- 5. testpmd ---------------------------------------------------------------------------
if [ -n "${VNET_TESTPMD:-}" ]; then
    TP=$VNET_TESTPMD
else
    say "cargo build --release -p testpmd"
    (cd "$REPO" && cargo build --release -q -p testpmd --bin testpmd) >&2 || die "cargo build --release -p testpmd failed"
    TP=${CARGO_TARGET_DIR:-$REPO/target}/release/testpmd
fi
[ -x "$TP" ] || die "testpmd binary $TP not found"
if [ -n "${VNET_L2FWD:-}" ]; then
    L2=$VNET_L2FWD
else
    say "cargo build --release -p vnet-driver --example l2fwd"
    (cd "$REPO" && cargo build --release -q -p vnet-driver --example l2fwd) >&2 || die "cargo build of the l2fwd example failed"
    L2=${CARGO_TARGET_DIR:-$REPO/target}/release/examples/l2fwd
fi
[ -x "$L2" ] || die "l2fwd binary $L2 not found"
ETHTOOL=$(command -v ethtool)
# shared libraries of testpmd and ethtool as ldd lists them (the dynamic loader appears as
# an absolute path)
mapfile -t LIBS < <(ldd "$TP" "$L2" "$ETHTOOL" | awk '/=> \// {print $3} /^[[:space:]]*\/[^ ]+ \(/ {print $1}' | sort -u)
[ ${#LIBS[@]} -gt 0 ] || die "ldd $TP listed no libraries"
# the user's programs: a dynamically linked one brings what ldd lists (a static program or
# a script lists nothing)
for f in "${ADD_SRC[@]}"; do
    if out=$(ldd "$f" 2>/dev/null); then
        mapfile -t -O "${#LIBS[@]}" LIBS < <(awk '/=> \// {print $3} /^[[:space:]]*\/[^ ]+ \(/ {print $1}' <<<"$out")
        if grep -q 'not found' <<<"$out"; then die "ldd $f: $(grep 'not found' <<<"$out" | head -n1 | xargs)"; fi
    fi
done
mapfile -t LIBS < <(printf '%s\n' "${LIBS[@]}" | sort -u)
# glibc dlopen()s libgcc_s for pthread_cancel/unwinding: make sure it is there
if ! printf '%s\n' "${LIBS[@]}" | grep -q libgcc_s; then
    g=$(ldconfig -p | awk '/libgcc_s\.so\.1 .*x86-64/ {print $NF; exit}')
    if [ -n "$g" ]; then LIBS+=("$g"); fi
fi

# ---- 6. rootfs + initramfs (only when an input changed) ------------------------------------
INPUTS=("$HERE/guest-init.sh" "$HERE/guest-kernel-net.sh" "$TP" "$L2" "$ETHTOOL" "${LIBS[@]}" "$B/bin/busybox" "$K/vmlinuz")
INPUTS+=("${ADD_SRC[@]}")
if [ -n "$USER_INIT" ]; then INPUTS+=("$USER_INIT"); fi
for m in "${MODS[@]}" "${NETMODS[@]}"; do INPUTS+=("$K/modules/$m.ko"); done
if [ "$NOIOMMU_BUILTIN" = 0 ]; then INPUTS+=("$N/vfio.ko"); fi
KEY=$( { echo "$KVER $KVERSION ${MODS[*]} ${NETMODS[*]}"
         echo "add ${ADD_DEST[*]} init ${USER_INIT:+yes} no-bind $NO_BIND"
         sha256sum "${INPUTS[@]}" | cut -d' ' -f1; } | sha256sum | cut -d' ' -f1)
if [ "$USER_IMAGE" = 1 ]; then
    IMG=${OUT:-$VM/user-images/${KEY:0:16}}
fi
mkdir -p "$IMG"
IMG=$(cd "$IMG" && pwd)
if [ -s "$IMG/initrd.img" ] && [ -s "$IMG/vmlinuz" ] && [ "$(cat "$IMG/.key" 2>/dev/null)" = "$KEY" ]; then
    say "image up to date"
else
    # a staging tree of this build's own (two builds may run side by side)
    R=$(mktemp -d "$CACHE/rootfs.XXXXXX")
    trap 'rm -rf "$R"' EXIT
    mkdir -p "$R"/{bin,sbin,dev,proc,sys,tmp,run,etc,lib/modules,var/run,dev/hugepages}
    cp "$B/bin/busybox" "$R/bin/busybox"
    # `busybox --list` includes "busybox" itself: linking it onto the binary would be a loop
    for a in $("$R/bin/busybox" --list); do
        [ "$a" = busybox ] || [ -e "$R/bin/$a" ] || ln -s busybox "$R/bin/$a"
    done
    : > "$R/lib/modules/load-order"
    for m in "${MODS[@]}"; do
        strip --strip-debug -o "$R/lib/modules/$m.ko" "$K/modules/$m.ko"
        echo "$m.ko" >> "$R/lib/modules/load-order"
    done
    if [ "$NOIOMMU_BUILTIN" = 0 ]; then
        strip --strip-debug -o "$R/lib/modules/vfio-noiommu.ko" "$N/vfio.ko"
    fi
    : > "$R/lib/modules/net-load-order"
    for m in "${NETMODS[@]}"; do
        strip --strip-debug -o "$R/lib/modules/$m.ko" "$K/modules/$m.ko"
        echo "$m.ko" >> "$R/lib/modules/net-load-order"
    done
    strip -o "$R/bin/testpmd" "$TP"
    strip -o "$R/bin/l2fwd" "$L2"
    # busybox has no ethtool: the host's replaces nothing (no applet of that name)
    cp "$ETHTOOL" "$R/bin/ethtool"
    install -m 0755 "$HERE/guest-kernel-net.sh" "$R/bin/guest-kernel-net.sh"
    for l in "${LIBS[@]}"; do
        mkdir -p "$R$(dirname "$l")"
        cp -L "$l" "$R$l"
    done
    install -m 0755 "$HERE/guest-init.sh" "$R/init"
    for i in "${!ADD_SRC[@]}"; do
        mkdir -p "$R$(dirname "${ADD_DEST[$i]}")"
        cp -L "${ADD_SRC[$i]}" "$R${ADD_DEST[$i]}"
    done
    if [ -n "$USER_INIT" ]; then install -m 0755 "$USER_INIT" "$R/etc/vnet-app-init"; fi
    if [ "$NO_BIND" = 1 ]; then : > "$R/etc/vnet-no-bind"; fi
    {
        echo "kernel $KVER $KVERSION"
        echo "testpmd $(sha256sum "$TP" | cut -d' ' -f1) $TP"
        echo "l2fwd $(sha256sum "$L2" | cut -d' ' -f1) $L2"
        echo "modules $(tr '\n' ' ' < "$R/lib/modules/load-order")"
        echo "net-modules $(tr '\n' ' ' < "$R/lib/modules/net-load-order")"
        echo "ethtool $($ETHTOOL --version | head -n1)"
        echo "libs ${LIBS[*]}"
        echo "noiommu-vfio $([ "$NOIOMMU_BUILTIN" = 0 ] && echo rebuilt || echo builtin)"
        for i in "${!ADD_SRC[@]}"; do echo "add ${ADD_DEST[$i]} $(sha256sum "${ADD_SRC[$i]}" | cut -d' ' -f1) ${ADD_SRC[$i]}"; done
        if [ -n "$USER_INIT" ]; then echo "init $(sha256sum "$USER_INIT" | cut -d' ' -f1) $USER_INIT"; fi
        if [ "$NO_BIND" = 1 ]; then echo "no-bind"; fi
    } > "$R/etc/vnet-image"
    cp "$K/vmlinuz" "$IMG/vmlinuz.tmp"
    (cd "$R" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet -R 0:0) \
        | gzip -1 > "$IMG/initrd.img.tmp"
    mv "$IMG/vmlinuz.tmp" "$IMG/vmlinuz"
    mv "$IMG/initrd.img.tmp" "$IMG/initrd.img"
    cp "$R/etc/vnet-image" "$IMG/manifest"
    echo "$KEY" > "$IMG/.key"
    say "initrd.img $(stat -c %s "$IMG/initrd.img") bytes (rootfs $(du -sh "$R" | cut -f1)), vmlinuz $(stat -c %s "$IMG/vmlinuz") bytes"
fi
say "done"
echo "VNET-IMAGE $IMG"
