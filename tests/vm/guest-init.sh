#!/bin/sh
# /init of the VM tests' initramfs (busybox sh; built by tests/vm/build-image.sh).
#
# Loads the VFIO modules, binds the virtio-net PCI device (1af4:1041) to vfio-pci through
# driver_override, reserves hugepages, runs our testpmd on it and powers off. Everything
# the host checks is a line on the serial console starting with "VNET-" (markers may be
# preceded by console escape codes: match them as substrings); testpmd's stdout lines
# are prefixed "TP| " and its stderr lines "TP! ", between
#   ===== VNET-TESTPMD BEGIN <command line> =====   and   ===== VNET-TESTPMD END rc=N =====
# The last line is "VNET-RESULT PASS" or "VNET-RESULT FAIL <reason>".
#
# In vt.mode=kernel it loads the kernel's own virtio-net driver instead and hands over to
# /bin/guest-kernel-net.sh (a stock Linux guest: see that script for its parameters).
#
# Kernel command line parameters:
#   vt.mode=noiommu|viommu|kernel
#                             load vfio with enable_unsafe_noiommu_mode=1 (the rebuilt
#                             vfio-noiommu.ko), or use a vIOMMU (default noiommu); or
#                             kernel: no VFIO, the kernel's virtio_net drives the NIC
#   (testpmd takes every virtio-net device, port i the i-th in PCI order)
#   vt.fwd=none|txonly|rxonly|io|...   testpmd --forward-mode; none = bind only (default none)
#   vt.secs=N                 testpmd --duration (default 5)
#   vt.txfirst=N              --tx-first N (default 4 in io mode, none otherwise)
#   vt.tp=A,B,...             extra testpmd arguments, commas become spaces
#   vt.hugepages=N            2 MiB pages to reserve (default 128)
#   vt.app=l2fwd              bind every virtio-net device and run the driver's l2fwd
#                             example on them (-a BDF each) for vt.secs seconds, then
#                             SIGINT; stdout lines prefixed "L2| ", between
#                             ===== VNET-L2FWD BEGIN ... ===== and ===== VNET-L2FWD END rc=N =====
#   vt.l2=A,B,...             extra l2fwd arguments, commas become spaces
#   vt.cmd=BASE64             a shell command line (base64 of it: the kernel command line
#                             splits on spaces) that the guest runs as the application, after
#                             the image's own --init script when it has one
#   vt.app=user               run the user's application: the image's /etc/vnet-app-init
#                             (build-image.sh --init) and then vt.cmd, once the devices are
#                             bound to vfio-pci ($VNET_BDFS: their addresses, hugepages
#                             mounted); the default when the image has one or vt.cmd is set.
#                             Their output (stderr too) is prefixed "APP| ", between
#                             ===== VNET-APP BEGIN ===== and ===== VNET-APP END rc=N =====;
#                             the result is PASS when both exit 0. A line "VNET-VALUE name=N"
#                             is a value the VM runner's checks can name (guest.name).
#                             In vt.mode=kernel, or in an image built with --no-bind
#                             (/etc/vnet-no-bind), nothing is bound: the kernel's virtio_net
#                             takes the NICs, IPv6 is turned off before any link is up (the
#                             kernel then sends nothing by itself), every interface is set up
#                             without an address ($VNET_IFACES: their names, in PCI order),
#                             then the application runs.
#   vt.shell=1                start a shell instead of powering off (debugging)
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/hugepages /tmp /run
mount -t tmpfs tmpfs /tmp
uptime_s() { cut -d' ' -f1 /proc/uptime; }
echo
echo "VNET-INIT uptime=$(uptime_s) kernel=$(uname -r) cpus=$(nproc) mem=$(awk '/MemTotal/ {print $2 "kB"}' /proc/meminfo)"

MODE=noiommu FWD=none SECS=5 TXFIRST="" TPEXTRA="" HUGEPAGES=128 DEBUG_SHELL=0 APP=testpmd L2EXTRA="" CMD=""
APP_SET=0
for a in $(cat /proc/cmdline); do
    case "$a" in
        vt.mode=*) MODE=${a#*=} ;;
        vt.fwd=*) FWD=${a#*=} ;;
        vt.secs=*) SECS=${a#*=} ;;
        vt.txfirst=*) TXFIRST=${a#*=} ;;
        vt.tp=*) TPEXTRA=$(echo "${a#*=}" | tr ',' ' ') ;;
        vt.hugepages=*) HUGEPAGES=${a#*=} ;;
        vt.shell=1) DEBUG_SHELL=1 ;;
        vt.app=*) APP=${a#*=} APP_SET=1 ;;
        vt.cmd=*) CMD=$(echo "${a#*=}" | base64 -d 2>/dev/null) || CMD="" ;;
        vt.l2=*) L2EXTRA=$(echo "${a#*=}" | tr ',' ' ') ;;
    esac
done
[ "$FWD" = io ] && [ -z "$TXFIRST" ] && TXFIRST=4
# An image with the user's application, or a command on the kernel command line, runs it
# unless vt.app says otherwise.
if [ "$APP_SET" = 0 ] && { [ -e /etc/vnet-app-init ] || [ -n "$CMD" ]; }; then APP=user; fi
echo "VNET-PARAMS mode=$MODE fwd=$FWD secs=$SECS txfirst=${TXFIRST:-none} tp='$TPEXTRA' hugepages=$HUGEPAGES"

finish() {
    echo "VNET-RESULT $* uptime=$(uptime_s)"
    if [ "$DEBUG_SHELL" = 1 ]; then exec setsid cttyhack sh; fi
    sync
    poweroff -f
}
fail() {
    dmesg | grep -iE 'vfio|iommu|virtio|pci 0000:0[1-9]' | tail -n 15 | sed 's/^/VNET-DMESG /'
    finish FAIL "$*"
}
# The user's application: the image's --init script, then vt.cmd; then the result.
run_user_app() {
    [ -e /etc/vnet-app-init ] || [ -n "$CMD" ] || fail "vt.app=user: the image has no --init script and vt.cmd is empty"
    echo "===== VNET-APP BEGIN ====="
    {
        rc=0
        if [ -e /etc/vnet-app-init ]; then sh /etc/vnet-app-init </dev/null 2>&1 || rc=$?; fi
        if [ "$rc" = 0 ] && [ -n "$CMD" ]; then sh -c "$CMD" </dev/null 2>&1 || rc=$?; fi
        echo "$rc" > /tmp/app.rc
    } | sed 's/^/APP| /'
    RC=$(cat /tmp/app.rc)
    echo "===== VNET-APP END rc=$RC ====="
    [ "$RC" = 0 ] || fail "the application exited with $RC"
    finish PASS "app"
}

# ---- a stock Linux guest: the kernel's virtio-net driver -------------------------------------
[ -e /etc/vnet-no-bind ] && MODE=kernel
if [ "$MODE" = kernel ]; then
    if [ "$APP" = user ]; then
        # Before the driver: its interfaces then never get IPv6 (no neighbour discovery, no
        # MLD), so what the back-end counts is what the application sent.
        echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6
        echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6
    fi
    for ko in $(cat /lib/modules/net-load-order); do
        insmod "/lib/modules/$ko" 2>/tmp/insmod.err || { echo "VNET-MODULE FAIL $ko: $(cat /tmp/insmod.err)"; fail "insmod $ko"; }
    done
    echo "VNET-MODULE ok $(tr '\n' ' ' < /lib/modules/net-load-order)"
    if [ "$APP" = user ]; then
        # every virtio-net device's interface, in PCI order of the devices (waiting up to
        # 5 s for the driver to have registered them all)
        NDEV=0
        for d in /sys/bus/pci/devices/*; do
            [ "$(cat "$d/vendor")" = 0x1af4 ] && [ "$(cat "$d/device")" = 0x1041 ] && NDEV=$((NDEV + 1))
        done
        for i in $(seq 1 50); do
            VNET_IFACES="" n_if=0
            for d in /sys/bus/pci/drivers/virtio-pci/0000:*; do
                [ -d "$d" ] || continue
                for n in "$d"/virtio*/net/*; do
                    [ -d "$n" ] && VNET_IFACES="$VNET_IFACES ${n##*/}" && n_if=$((n_if + 1))
                done
            done
            [ "$n_if" -ge "$NDEV" ] && [ "$n_if" -gt 0 ] && break
            sleep 0.1
        done
        export VNET_IFACES=${VNET_IFACES# }
        [ -n "$VNET_IFACES" ] || { ls /sys/class/net | sed 's/^/VNET-NETDEV /'; fail "no network interface bound to virtio_net"; }
        ip link set lo up
        for n in $VNET_IFACES; do
            ip link set dev "$n" up 2>/tmp/up.err || fail "ip link set $n up: $(cat /tmp/up.err)"
            echo "VNET-IFACE $n mac=$(cat /sys/class/net/$n/address) mtu=$(cat /sys/class/net/$n/mtu)"
        done
        run_user_app
    fi
    . /bin/guest-kernel-net.sh
    fail "guest-kernel-net.sh returned"
fi

# ---- modules ------------------------------------------------------------------------------
for ko in $(cat /lib/modules/load-order); do
    file=$ko args=""
    if [ "$ko" = vfio.ko ] && [ "$MODE" = noiommu ]; then
        args="enable_unsafe_noiommu_mode=1"
        # Debian's vfio.ko has no CONFIG_VFIO_NOIOMMU; build-image.sh ships a rebuilt one
        [ -e /lib/modules/vfio-noiommu.ko ] && file=vfio-noiommu.ko
    fi
    if insmod "/lib/modules/$file" $args 2>/tmp/insmod.err; then
        echo "VNET-MODULE ok $file $args"
    else
        echo "VNET-MODULE FAIL $file $args: $(cat /tmp/insmod.err)"
        fail "insmod $file"
    fi
done
if [ "$MODE" = noiommu ]; then
    p=/sys/module/vfio/parameters/enable_unsafe_noiommu_mode
    [ -e $p ] || fail "vfio has no enable_unsafe_noiommu_mode parameter (built without CONFIG_VFIO_NOIOMMU)"
    echo "VNET-NOIOMMU enable_unsafe_noiommu_mode=$(cat $p)"
    [ "$(cat $p)" = Y ] || fail "no-IOMMU mode is not enabled"
fi

# ---- the virtio-net devices, each bound to vfio-pci -------------------------------------------
BDFS=""
for d in /sys/bus/pci/devices/*; do
    if [ "$(cat "$d/vendor")" = 0x1af4 ] && [ "$(cat "$d/device")" = 0x1041 ]; then BDFS="$BDFS ${d##*/}"; fi
done
[ -n "$BDFS" ] || { ls /sys/bus/pci/devices | sed 's/^/VNET-PCI /'; fail "no virtio-net PCI device 1af4:1041"; }
for BDF in $BDFS; do
    D=/sys/bus/pci/devices/$BDF
    echo "VNET-DEV $BDF vendor=$(cat $D/vendor) device=$(cat $D/device) class=$(cat $D/class)"
    echo vfio-pci > "$D/driver_override"
    [ -e "$D/driver" ] && echo "$BDF" > "$D/driver/unbind"
    if ! echo "$BDF" > /sys/bus/pci/drivers/vfio-pci/bind 2>/tmp/bind.err; then
        echo "VNET-BIND-ERROR $(cat /tmp/bind.err)"
    fi
    DRV=$(basename "$(readlink "$D/driver" 2>/dev/null)" 2>/dev/null)
    echo "VNET-BIND $BDF driver=${DRV:-none}"
    [ "$DRV" = vfio-pci ] || fail "binding $BDF to vfio-pci failed"
    GRP=$(basename "$(readlink "$D/iommu_group")")
    if [ "$MODE" = noiommu ]; then NODE=/dev/vfio/noiommu-$GRP; else NODE=/dev/vfio/$GRP; fi
    echo "VNET-VFIO group=$GRP nodes=$(ls /dev/vfio | tr '\n' ' ')"
    [ -c "$NODE" ] || fail "$NODE does not exist"
    [ -c /dev/vfio/vfio ] || fail "/dev/vfio/vfio does not exist"
    echo "VNET-VFIO-OK $NODE"
done

# ---- hugepages ------------------------------------------------------------------------------
echo "$HUGEPAGES" > /proc/sys/vm/nr_hugepages
mount -t hugetlbfs nodev /dev/hugepages
echo "VNET-HUGEPAGES $(awk '/HugePages_Total/ {t=$2} /HugePages_Free/ {f=$2} END {print "total=" t " free=" f}' /proc/meminfo)"

# ---- the user's application on the bound devices ---------------------------------------------
if [ "$APP" = user ]; then
    export VNET_BDFS=${BDFS# }
    run_user_app
fi

# ---- l2fwd (the driver's example) on every device ---------------------------------------------
if [ "$APP" = l2fwd ]; then
    set -- l2fwd
    for b in $BDFS; do set -- "$@" -a "$b"; done
    # shellcheck disable=SC2086 # L2EXTRA is a word list on purpose
    set -- "$@" -- -T 0 $L2EXTRA
    echo "===== VNET-L2FWD BEGIN $* ====="
    { timeout -s INT "$SECS" "$@" 2>/tmp/l2.err </dev/null; echo $? > /tmp/l2.rc; } | sed 's/^/L2| /'
    RC=$(cat /tmp/l2.rc)
    sed 's/^/L2! /' /tmp/l2.err
    echo "===== VNET-L2FWD END rc=$RC ====="
    # timeout's own status is 124 when it sent the signal; l2fwd exits 0 on SIGINT
    [ "$RC" = 0 ] || [ "$RC" = 124 ] || fail "l2fwd exited with $RC"
    finish PASS "l2fwd"
fi

[ "$FWD" = none ] && finish PASS "bind-only"

# ---- testpmd --------------------------------------------------------------------------------
# testpmd takes every device (port i is the i-th in PCI order)
set -- testpmd
for b in $BDFS; do set -- "$@" -a "$b"; done
set -- "$@" --forward-mode="$FWD" --duration "$SECS" --stats-format json
[ -n "$TXFIRST" ] && set -- "$@" --tx-first "$TXFIRST"
# shellcheck disable=SC2086 # TPEXTRA is a word list on purpose
set -- "$@" $TPEXTRA
echo "===== VNET-TESTPMD BEGIN $* ====="
T_START=$(uptime_s)
# stdout streams live; a watchdog kills testpmd if it overruns --duration by far
{ timeout -s KILL $((SECS + 120)) "$@" 2>/tmp/tp.err </dev/null; echo $? > /tmp/tp.rc; } | sed 's/^/TP| /'
RC=$(cat /tmp/tp.rc)
sed 's/^/TP! /' /tmp/tp.err
echo "===== VNET-TESTPMD END rc=$RC start=$T_START end=$(uptime_s) ====="
if [ "$RC" != 0 ]; then
    echo "VNET-TESTPMD-ERROR rc=$RC: $(grep -v '^\[' /tmp/tp.err | tail -n 1)"
    fail "testpmd exited with $RC"
fi
finish PASS "testpmd"
