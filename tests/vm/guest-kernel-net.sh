#!/bin/sh
# The guest side of the stock-Linux VM tests (vt.mode=kernel; sourced by /init, which has
# loaded the kernel's own virtio-net driver): configures the NIC, then runs one job.
# Nothing here touches our driver: this guest is what our backend meets when a user boots
# an ordinary Linux VM.
#
# Kernel command line parameters (besides /init's):
#   vt.ip=A.B.C.D/N     the NIC's address (required)
#   vt.peer=A.B.C.D     the other side's address (required for vt.job=xfer)
#   vt.mtu=N            MTU to set on the NIC (default: what the device's config says)
#   vt.mib=N            xfer: MiB to serve and to fetch (default 64)
#   vt.offloads=on|off  ethtool -K tso/gso/tx checksumming on the NIC (default: leave
#                       the driver's defaults, which are on when negotiated)
#   vt.job=xfer         xfer: write vt.mib MiB of random bytes, print their sha256, serve
#                       them over HTTP (busybox httpd, port 8080), fetch the peer's file
#                       over TCP, print its sha256 and size; then print the TCP and NIC
#                       counters and VNET-RESULT, and stay up (serving) until the host
#                       ends the VM: the peer may still be fetching.
#
# Markers (one line each):
#   VNET-NET if=IF mtu=N mac=MAC driver=virtio_net features=...
#   VNET-ETHTOOL name: on|off [fixed]      the NIC's offloads as ethtool -k shows them
#   VNET-XFER-SRC sha256=H bytes=N         what this guest serves
#   VNET-XFER-GOT sha256=H bytes=N secs=S  what it fetched from the peer
#   VNET-TCP key=value ...                 /proc/net/snmp's Tcp counters
#   VNET-IFSTATS rx_packets=N tx_packets=N rx_bytes=N tx_bytes=N rx_dropped=N ...

IP="" PEER="" MTU="" MIB=64 OFFLOADS="" JOB=xfer
for a in $(cat /proc/cmdline); do
    case "$a" in
        vt.ip=*) IP=${a#*=} ;;
        vt.peer=*) PEER=${a#*=} ;;
        vt.mtu=*) MTU=${a#*=} ;;
        vt.mib=*) MIB=${a#*=} ;;
        vt.offloads=*) OFFLOADS=${a#*=} ;;
        vt.job=*) JOB=${a#*=} ;;
    esac
done
echo "VNET-KNET ip=$IP peer=$PEER mtu=${MTU:-device} mib=$MIB offloads=${OFFLOADS:-default} job=$JOB"
[ -n "$IP" ] || fail "vt.ip is required in vt.mode=kernel"

# ---- the NIC ----------------------------------------------------------------------------
IF=""
for i in $(seq 1 50); do
    for d in /sys/class/net/*; do
        n=${d##*/}
        [ "$n" = lo ] && continue
        [ "$(basename "$(readlink "$d/device/driver" 2>/dev/null)")" = virtio_net ] && { IF=$n; break; }
    done
    [ -n "$IF" ] && break
    sleep 0.1
done
[ -n "$IF" ] || { ls /sys/class/net | sed 's/^/VNET-NETDEV /'; fail "no network interface bound to virtio_net"; }
ip link set lo up
if [ -n "$MTU" ]; then
    ip link set "$IF" mtu "$MTU" 2>/tmp/mtu.err || fail "ip link set $IF mtu $MTU: $(cat /tmp/mtu.err)"
fi
if [ -n "$OFFLOADS" ]; then
    ethtool -K "$IF" tx "$OFFLOADS" tso "$OFFLOADS" gso "$OFFLOADS" 2>/tmp/ethtool.err \
        || fail "ethtool -K $IF ... $OFFLOADS: $(cat /tmp/ethtool.err)"
fi
ip addr add "$IP" dev "$IF" || fail "ip addr add $IP dev $IF"
ip link set "$IF" up || fail "ip link set $IF up"
# virtio's feature bits as the driver negotiated them (a string of 0/1 by bit number)
echo "VNET-NET if=$IF mtu=$(cat /sys/class/net/$IF/mtu) mac=$(cat /sys/class/net/$IF/address) driver=virtio_net features=$(cat /sys/class/net/$IF/device/features 2>/dev/null)"
ethtool -k "$IF" | grep -E '^(rx-checksumming|tx-checksumming|tcp-segmentation-offload|generic-segmentation-offload|generic-receive-offload|	tx-tcp-segmentation|	tx-tcp6-segmentation):' \
    | sed 's/^\t*/VNET-ETHTOOL /'

counters() {
    # /proc/net/snmp: a "Tcp:" line of names, then one of values
    awk '/^Tcp:/ { if (!n) { for (i = 2; i <= NF; i++) k[i] = $i; n = NF } else { s = "VNET-TCP"; for (i = 2; i <= n; i++) s = s " " k[i] "=" $i; print s } }' /proc/net/snmp
    S=/sys/class/net/$IF/statistics
    echo "VNET-IFSTATS rx_packets=$(cat $S/rx_packets) tx_packets=$(cat $S/tx_packets) rx_bytes=$(cat $S/rx_bytes) tx_bytes=$(cat $S/tx_bytes) rx_dropped=$(cat $S/rx_dropped) rx_errors=$(cat $S/rx_errors) tx_dropped=$(cat $S/tx_dropped)"
}

# ---- jobs -------------------------------------------------------------------------------
case "$JOB" in
xfer)
    [ -n "$PEER" ] || fail "vt.job=xfer needs vt.peer"
    mkdir -p /tmp/www
    dd if=/dev/urandom of=/tmp/www/data bs=1048576 count="$MIB" 2>/dev/null || fail "dd of $MIB MiB"
    echo "VNET-XFER-SRC sha256=$(sha256sum /tmp/www/data | cut -d' ' -f1) bytes=$(stat -c %s /tmp/www/data)"
    touch /tmp/www/ready
    httpd -p 8080 -h /tmp/www || fail "httpd"
    # the peer boots at its own pace: wait (bounded) until it answers
    i=0
    until ping -c 1 -W 1 "$PEER" >/dev/null 2>&1; do
        i=$((i + 1)); [ $i -lt 240 ] || fail "the peer $PEER never answered a ping"
    done
    i=0
    until wget -q -O /dev/null "http://$PEER:8080/ready" 2>/dev/null; do
        i=$((i + 1)); [ $i -lt 240 ] || fail "the peer's HTTP server never came up"; sleep 0.5
    done
    T0=$(cut -d' ' -f1 /proc/uptime)
    wget -q -O /tmp/got "http://$PEER:8080/data" 2>/tmp/wget.err || { counters; fail "wget from $PEER: $(cat /tmp/wget.err)"; }
    T1=$(cut -d' ' -f1 /proc/uptime)
    echo "VNET-XFER-GOT sha256=$(sha256sum /tmp/got | cut -d' ' -f1) bytes=$(stat -c %s /tmp/got) secs=$(awk "BEGIN {print $T1 - $T0}")"
    rm -f /tmp/got
    counters
    echo "VNET-RESULT PASS xfer uptime=$(uptime_s)"
    # stay up, serving: the host ends the VM once both guests are done
    exec sleep 100000
    ;;
*)
    fail "unknown vt.job=$JOB"
    ;;
esac
