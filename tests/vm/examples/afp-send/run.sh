#!/bin/sh
# build-image.sh --init: the guest runs this once the kernel's virtio_net has brought the
# interfaces up ($VNET_IFACES); then it runs the scenario's command.
set -- $VNET_IFACES
echo "interfaces: $*"
echo "VNET-VALUE ifaces=$#"
