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
