//! The driver's one error type.
//!
//! Owns: every error the public API returns. Misbehaviour of a running device (bad used
//! entries) is reported per queue as a [`DeviceError`], which stops that queue and is
//! counted; it is also wrapped here for callers that want one error type.

use std::io;
use std::path::PathBuf;

/// A value the device wrote into a used ring that breaks the protocol. The queue that
/// saw it stops; nothing is read or freed on the strength of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    /// The used index moved by more than the number of buffers in flight.
    #[error("used index jumped by {moved} with only {in_flight} buffers in flight")]
    UsedIdxJump {
        /// How far it moved.
        moved: u16,
        /// Buffers the driver had made available.
        in_flight: u16,
    },
    /// A used element names a descriptor outside the ring.
    #[error("used id {id} out of range")]
    UsedIdOutOfRange {
        /// The id.
        id: u32,
    },
    /// A used element names a descriptor that is not in flight (already used, or never
    /// made available): a double completion.
    #[error("used id {id} is not in flight")]
    UsedIdNotInFlight {
        /// The id.
        id: u32,
    },
    /// A used length larger than the buffer the driver posted.
    #[error("used length {len} larger than the {posted}-byte buffer")]
    UsedLenTooLarge {
        /// Length the device reported.
        len: u32,
        /// Length the driver posted.
        posted: u32,
    },
    /// A packed ring's descriptor at the used position carries flags that are neither
    /// "available" nor "used" for the driver's used wrap counter (§2.8.1): a used
    /// descriptor written with the wrong wrap counter.
    #[error("packed ring descriptor {pos} has flags {flags:#06x}: used with the wrong wrap counter")]
    UsedWrongWrap {
        /// Ring position.
        pos: u16,
        /// The flags word the device wrote.
        flags: u16,
    },
    /// A received frame's header says it spans 0 buffers (`VIRTIO_NET_F_MRG_RXBUF`,
    /// virtio 1.2 §5.1.6.4: at least 1).
    #[error("a received frame's num_buffers is 0")]
    MergeZeroBuffers,
    /// A received frame's header says it spans more buffers than the device has used
    /// (or than were posted): the device must use all of a frame's buffers together.
    #[error("a received frame spans num_buffers {num_buffers} buffers, only {available} were used")]
    MergeBeyondUsed {
        /// The header's `num_buffers`.
        num_buffers: u16,
        /// Buffers the device had returned, the frame's first included.
        available: u16,
    },
    /// A later buffer of a merged frame is empty, or the buffers add up to more than any
    /// frame can be ([`MAX_MERGED_FRAME`](crate::queue::MAX_MERGED_FRAME)).
    #[error("merged frame buffer {index} has length {len}, making the frame {total} bytes")]
    MergeBadLength {
        /// Which buffer of the frame (0 is the first).
        index: u16,
        /// Its length.
        len: u32,
        /// The frame's bytes up to and including it.
        total: u32,
    },
}

/// Errors of the driver library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration value is unusable (names the value and the reason).
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The vhost-user socket is missing or refuses the connection.
    #[error("cannot connect to {path}: {reason}")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The device does not offer a feature the driver requires.
    #[error("the device does not offer required feature {name} (bit {bit})")]
    MissingFeature {
        /// Feature name.
        name: &'static str,
        /// Feature bit.
        bit: u32,
    },
    /// The device refused the features the driver acknowledged (FEATURES_OK not set).
    #[error("the device refused the negotiated features {0:#x}")]
    FeaturesRefused(u64),
    /// The DMA arena cannot hold the rings and buffers asked for.
    #[error("DMA arena of {size} bytes too small: {need} bytes needed for rings and buffers")]
    ArenaTooSmall {
        /// Arena size.
        size: usize,
        /// Bytes needed.
        need: usize,
    },
    /// Hugepages were asked for but none are available.
    #[error("no hugepages available for the DMA arena ({0}); reserve some in /proc/sys/vm/nr_hugepages")]
    NoHugepages(io::Error),
    /// A vhost-user back-end did not answer a request in time
    /// ([`PortConfig::vhost_user_timeout`](crate::PortConfig::vhost_user_timeout)); the
    /// connection is closed.
    #[error("vhost-user {request}: no answer from the back-end within {waited_ms} ms (connection closed)")]
    VhostUserTimeout {
        /// The request.
        request: &'static str,
        /// How long it waited.
        waited_ms: u64,
    },
    /// A vhost-user request failed.
    #[error("vhost-user {request}: {reason}")]
    VhostUser {
        /// The request.
        request: &'static str,
        /// What the back-end or the socket said.
        reason: String,
    },
    /// The PCI device is not bound to `vfio-pci` (or to no driver at all).
    #[error(
        "PCI device {bdf} is {}, not to vfio-pci: bind it first \
         (echo vfio-pci > /sys/bus/pci/devices/{bdf}/driver_override; \
         echo {bdf} > /sys/bus/pci/drivers/vfio-pci/bind, after unbinding it from its driver)",
        match driver { Some(d) => format!("bound to {d}"), None => "bound to no driver".to_string() }
    )]
    NotBoundToVfio {
        /// The PCI address.
        bdf: String,
        /// The driver it is bound to, if any.
        driver: Option<String>,
    },
    /// The device's IOMMU group holds devices not bound to `vfio-pci`.
    #[error(
        "VFIO group {group} of {bdf} is not viable: every device in \
         /sys/kernel/iommu_groups/{group}/devices must be bound to vfio-pci or to no driver"
    )]
    GroupNotViable {
        /// The PCI address.
        bdf: String,
        /// The IOMMU group number.
        group: u32,
    },
    /// A VFIO operation failed (names the operation and the reason, with a hint for the
    /// usual mistakes).
    #[error("VFIO {op}: {reason}")]
    Vfio {
        /// What was being done (an ioctl, a file, a step).
        op: &'static str,
        /// What went wrong.
        reason: String,
    },
    /// The PCI device is not a usable modern virtio-net device, or broke the virtio-PCI
    /// protocol during setup.
    #[error("virtio-pci {bdf}: {reason}")]
    VirtioPci {
        /// The PCI address.
        bdf: String,
        /// What went wrong.
        reason: String,
    },
    /// An operation needs a feature that was not negotiated: the device does not offer
    /// it, or the port was opened without it.
    #[error(
        "{what} needs {feature} (feature bit {bit}), which was not negotiated: the device does not \
         offer it or the port was opened without it"
    )]
    Unsupported {
        /// The operation (a control command, an XDP attach).
        what: &'static str,
        /// The feature's name.
        feature: &'static str,
        /// Its bit.
        bit: u32,
    },
    /// The device answered a control command with `VIRTIO_NET_ERR`.
    #[error("the device refused {command} (it answered VIRTIO_NET_ERR)")]
    ControlRefused {
        /// The command.
        command: &'static str,
    },
    /// The device wrote an acknowledgement that is neither `VIRTIO_NET_OK` nor
    /// `VIRTIO_NET_ERR` (or none at all).
    #[error(
        "{command}: the device wrote acknowledgement {ack:#04x}, neither VIRTIO_NET_OK nor VIRTIO_NET_ERR"
    )]
    ControlBadAck {
        /// The command.
        command: &'static str,
        /// The byte it wrote (0xff: it wrote nothing).
        ack: u8,
    },
    /// A control command got no acknowledgement in time from a device that has answered
    /// control commands before (or a PCI device, which must serve its control queue).
    /// The command stays posted; the next command first checks whether it completed.
    #[error(
        "{command}: no acknowledgement from {device} within {waited_ms} ms (the control queue may be \
         stuck; the next command checks again)"
    )]
    ControlTimeout {
        /// The command.
        command: &'static str,
        /// The port.
        device: String,
        /// How long it waited.
        waited_ms: u64,
    },
    /// A vhost-user back-end offered `VIRTIO_NET_F_CTRL_VQ` but never answered the
    /// control queue: under QEMU and DPDK's virtio-user the front-end terminates the
    /// control queue itself, so back-ends such as DPDK's `net_vhost` offer the feature
    /// without serving it.
    #[error(
        "{command}: {device} does not serve the control virtqueue: it offered VIRTIO_NET_F_CTRL_VQ but \
         acknowledged no command within {waited_ms} ms (vhost-user back-ends such as DPDK's net_vhost \
         leave the control queue to the front-end); control commands are unavailable on this port"
    )]
    ControlNotServed {
        /// The command.
        command: &'static str,
        /// The port.
        device: String,
        /// How long it waited.
        waited_ms: u64,
    },
    /// The port was closed (its device reset): no command can be sent any more.
    #[error("{0}: the port is closed")]
    PortClosed(String),
    /// The port's link is down (its back-end went away and has not come back yet): a
    /// control command cannot reach the device now. Settings made before are replayed
    /// when the port reconnects.
    #[error("{device}: the link is down ({reason}): control commands wait for the device to come back")]
    LinkDown {
        /// The port.
        device: String,
        /// Why the link is down.
        reason: String,
    },
    /// An XDP program cannot be attached because receive offloads that merge frames
    /// (guest TSO/UFO/ECN/USO) are on and the device cannot switch them off.
    #[error(
        "cannot attach an XDP program: receive offloads {offloads} are on and the device cannot switch \
         them off (VIRTIO_NET_F_CTRL_GUEST_OFFLOADS was not negotiated); open the port without them"
    )]
    XdpOffloads {
        /// The offloads, by name.
        offloads: String,
    },
    /// An XDP program cannot be attached because a full frame and the XDP headroom do not
    /// fit one receive buffer.
    #[error(
        "cannot attach an XDP program: MTU {mtu} (a {frame}-byte frame) with {headroom} bytes of headroom \
         (XDP needs {need}) does not fit the {room}-byte receive buffers"
    )]
    XdpGeometry {
        /// The port's MTU.
        mtu: u16,
        /// The largest frame (MTU + Ethernet header).
        frame: usize,
        /// Headroom before the frame in every buffer.
        headroom: usize,
        /// Headroom XDP needs.
        need: usize,
        /// Buffer bytes for headroom and frame (tailroom excluded).
        room: usize,
    },
    /// The device misbehaved.
    #[error("device error: {0}")]
    Device(#[from] DeviceError),
    /// Any other I/O failure, with context.
    #[error("{context}: {source}")]
    Io {
        /// What we were doing.
        context: String,
        /// What went wrong.
        source: io::Error,
    },
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io { context: context.into(), source }
    }
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;
