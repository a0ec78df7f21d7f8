//! Control commands and their encoding (virtio 1.2 §5.1.6.5): `struct
//! virtio_net_ctrl_hdr`'s class and command, the command data, and the feature each
//! command needs.
//!
//! Owns: [`Command`], the encoding of its data into the command buffer (the MAC table in
//! two parts, one per table) and the argument checks that need no device. Must not:
//! touch the control ring or wait for the device (`queue.rs` does).

use crate::error::{Error, Result};
use crate::layout::{ctrl, features as f};

/// Most MAC addresses in one `MAC_TABLE_SET` (unicast and multicast together).
pub const MAC_TABLE_MAX: usize = 256;

/// One control command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command<'a> {
    /// `VIRTIO_NET_CTRL_RX_PROMISC`: receive every frame (on) or only those the filters
    /// accept (off).
    Promisc(bool),
    /// `VIRTIO_NET_CTRL_RX_ALLMULTI`: receive every multicast frame.
    AllMulti(bool),
    /// `VIRTIO_NET_CTRL_MAC_TABLE_SET`: the unicast and multicast addresses to accept
    /// besides the device's own.
    MacTable {
        /// Unicast addresses.
        unicast: &'a [[u8; 6]],
        /// Multicast addresses.
        multicast: &'a [[u8; 6]],
    },
    /// `VIRTIO_NET_CTRL_MAC_ADDR_SET`: the device's own address.
    MacAddr([u8; 6]),
    /// `VIRTIO_NET_CTRL_VLAN_ADD`: accept frames tagged with this VLAN id.
    VlanAdd(u16),
    /// `VIRTIO_NET_CTRL_VLAN_DEL`: stop accepting this VLAN id.
    VlanDel(u16),
    /// `VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET`: the number of queue pairs the device uses.
    QueuePairs(u16),
    /// `VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET`: the receive offloads in use (feature bits).
    GuestOffloads(u64),
}

impl Command<'_> {
    /// The command's name in the spec.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Promisc(_) => "VIRTIO_NET_CTRL_RX_PROMISC",
            Command::AllMulti(_) => "VIRTIO_NET_CTRL_RX_ALLMULTI",
            Command::MacTable { .. } => "VIRTIO_NET_CTRL_MAC_TABLE_SET",
            Command::MacAddr(_) => "VIRTIO_NET_CTRL_MAC_ADDR_SET",
            Command::VlanAdd(_) => "VIRTIO_NET_CTRL_VLAN_ADD",
            Command::VlanDel(_) => "VIRTIO_NET_CTRL_VLAN_DEL",
            Command::QueuePairs(_) => "VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET",
            Command::GuestOffloads(_) => "VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET",
        }
    }

    /// `(class, command)`.
    pub fn class_cmd(&self) -> (u8, u8) {
        match self {
            Command::Promisc(_) => (ctrl::CLASS_RX, ctrl::RX_PROMISC),
            Command::AllMulti(_) => (ctrl::CLASS_RX, ctrl::RX_ALLMULTI),
            Command::MacTable { .. } => (ctrl::CLASS_MAC, ctrl::MAC_TABLE_SET),
            Command::MacAddr(_) => (ctrl::CLASS_MAC, ctrl::MAC_ADDR_SET),
            Command::VlanAdd(_) => (ctrl::CLASS_VLAN, ctrl::VLAN_ADD),
            Command::VlanDel(_) => (ctrl::CLASS_VLAN, ctrl::VLAN_DEL),
            Command::QueuePairs(_) => (ctrl::CLASS_MQ, ctrl::MQ_VQ_PAIRS_SET),
            Command::GuestOffloads(_) => (ctrl::CLASS_GUEST_OFFLOADS, ctrl::GUEST_OFFLOADS_SET),
        }
    }

    /// The feature bit the command needs (besides `VIRTIO_NET_F_CTRL_VQ`), §5.1.6.5.
    pub fn feature(&self) -> u32 {
        match self {
            Command::Promisc(_) | Command::AllMulti(_) | Command::MacTable { .. } => f::NET_CTRL_RX,
            Command::MacAddr(_) => f::NET_CTRL_MAC_ADDR,
            Command::VlanAdd(_) | Command::VlanDel(_) => f::NET_CTRL_VLAN,
            Command::QueuePairs(_) => f::NET_MQ,
            Command::GuestOffloads(_) => f::NET_CTRL_GUEST_OFFLOADS,
        }
    }

    /// Writes the command-specific data into `out`; returns its length and where a
    /// second descriptor starts (the MAC table's multicast half), if anywhere.
    pub fn encode(&self, out: &mut [u8]) -> Result<(usize, Option<usize>)> {
        let need = match self {
            Command::MacTable { unicast, multicast } => {
                if unicast.len() + multicast.len() > MAC_TABLE_MAX {
                    return Err(Error::Config(format!(
                        "a MAC table of {} addresses: at most {MAC_TABLE_MAX}",
                        unicast.len() + multicast.len()
                    )));
                }
                8 + 6 * (unicast.len() + multicast.len())
            }
            Command::MacAddr(_) => 6,
            Command::VlanAdd(_) | Command::VlanDel(_) | Command::QueuePairs(_) => 2,
            Command::GuestOffloads(_) => 8,
            Command::Promisc(_) | Command::AllMulti(_) => 1,
        };
        if out.len() < need {
            return Err(Error::Config(format!("{}: {need} bytes of data do not fit", self.name())));
        }
        match self {
            Command::Promisc(on) | Command::AllMulti(on) => out[0] = *on as u8,
            Command::MacTable { unicast, multicast } => {
                let mut at = 0;
                let mut table = |macs: &[[u8; 6]], at: &mut usize| {
                    out[*at..*at + 4].copy_from_slice(&(macs.len() as u32).to_le_bytes());
                    *at += 4;
                    for m in macs {
                        out[*at..*at + 6].copy_from_slice(m);
                        *at += 6;
                    }
                };
                table(unicast, &mut at);
                let split = at;
                table(multicast, &mut at);
                return Ok((at, Some(split)));
            }
            Command::MacAddr(m) => out[..6].copy_from_slice(m),
            Command::VlanAdd(v) | Command::VlanDel(v) | Command::QueuePairs(v) => {
                out[..2].copy_from_slice(&v.to_le_bytes())
            }
            Command::GuestOffloads(o) => out[..8].copy_from_slice(&o.to_le_bytes()),
        }
        Ok((need, None))
    }
}
