//! The virtio-net control queue's commands (virtio 1.2 §5.1.6.5) and the receive-side
//! state they set: RX mode, MAC and VLAN filters, the MAC address, guest offloads.
//!
//! Owns: parsing and validating a command exactly as the guest wrote it (class, command,
//! every length and value, and whether the feature it needs was negotiated), the device
//! defaults after reset (QEMU's: promiscuous on, empty MAC table, empty VLAN table when
//! `CTRL_VLAN` is negotiated, every negotiated guest offload on), and the per-frame
//! filtering decision the data path makes.
//! Must not: touch rings, guest memory or device state (the device applies a parsed
//! [`Command`], see `Device::apply_ctrl`; the control path reads and acknowledges it).
//!
//! A refused command is a [`Refused`] (acknowledged `VIRTIO_NET_ERR`), never a panic:
//! every length comes from the guest and is checked before it is used.

use spec::layout::features::bit;
use virtio_bindings::virtio_net as vn;

/// `VIRTIO_NET_OK`.
pub const ACK_OK: u8 = vn::VIRTIO_NET_OK as u8;
/// `VIRTIO_NET_ERR`.
pub const ACK_ERR: u8 = vn::VIRTIO_NET_ERR as u8;

/// MAC addresses the filter table holds (unicast and multicast together, as QEMU); a
/// longer list turns that class into accept-all (the spec allows it: "it can ... silently
/// switch to allmulti or promiscuous mode if it is given too many addresses").
pub const MAC_TABLE_ENTRIES: usize = 64;
/// VLAN ids (802.1Q: 12 bits).
pub const MAX_VLAN: usize = 4096;
/// Longest command (class, command and data) accepted; a MAC table of ~10 000 entries.
/// Longer is refused, so one command cannot make the device copy megabytes.
pub const CTRL_MAX_LEN: usize = 64 * 1024;

/// Guest offloads `VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET` can switch (§5.1.6.5.6.1), as
/// feature-bit masks.
pub const GUEST_OFFLOADS: u64 = bit(vn::VIRTIO_NET_F_GUEST_CSUM)
    | bit(vn::VIRTIO_NET_F_GUEST_TSO4)
    | bit(vn::VIRTIO_NET_F_GUEST_TSO6)
    | bit(vn::VIRTIO_NET_F_GUEST_ECN)
    | bit(vn::VIRTIO_NET_F_GUEST_UFO)
    | bit(vn::VIRTIO_NET_F_GUEST_USO4)
    | bit(vn::VIRTIO_NET_F_GUEST_USO6);

/// One of the RX-mode switches (`VIRTIO_NET_CTRL_RX_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxMode {
    /// Receive everything.
    Promisc,
    /// Receive every multicast frame.
    AllMulti,
    /// Receive every unicast frame.
    AllUni,
    /// Receive no multicast frame (broadcast excepted).
    NoMulti,
    /// Receive no unicast frame.
    NoUni,
    /// Receive no broadcast frame.
    NoBcast,
}

/// The MAC filter table (`VIRTIO_NET_CTRL_MAC_TABLE_SET`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MacTable {
    /// Unicast addresses accepted besides the device's own.
    pub uni: Vec<[u8; 6]>,
    /// Multicast addresses accepted.
    pub multi: Vec<[u8; 6]>,
    /// More unicast addresses than the table holds: accept every unicast frame.
    pub uni_overflow: bool,
    /// More multicast addresses than the table holds: accept every multicast frame.
    pub multi_overflow: bool,
}

/// A validated control command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Switch an RX mode on or off.
    RxMode(RxMode, bool),
    /// Replace the MAC filter table.
    MacTable(MacTable),
    /// Set the device's MAC address.
    MacAddr([u8; 6]),
    /// Accept frames tagged with this VLAN id.
    VlanAdd(u16),
    /// Stop accepting frames tagged with this VLAN id.
    VlanDel(u16),
    /// Use queue pairs `1..=n`.
    VqPairs(u16),
    /// Enable exactly these guest offloads (feature-bit masks).
    GuestOffloads(u64),
}

/// Why a command is acknowledged with `VIRTIO_NET_ERR`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// Shorter than the two-byte class/command header.
    NoHeader {
        /// Bytes the guest wrote.
        len: usize,
    },
    /// Longer than [`CTRL_MAX_LEN`].
    TooLong {
        /// Bytes the guest wrote.
        len: u64,
    },
    /// A class or command this device does not implement.
    Unsupported {
        /// `class`.
        class: u8,
        /// `command`.
        command: u8,
    },
    /// The command needs a feature the driver did not negotiate.
    NotNegotiated {
        /// `class`.
        class: u8,
        /// `command`.
        command: u8,
        /// The missing feature.
        feature: &'static str,
    },
    /// The command data has the wrong length.
    Length {
        /// `class`.
        class: u8,
        /// `command`.
        command: u8,
        /// What the command needs.
        expected: usize,
        /// What the guest wrote.
        got: usize,
    },
    /// A value out of range.
    Value {
        /// `class`.
        class: u8,
        /// `command`.
        command: u8,
        /// What is wrong.
        what: &'static str,
    },
    /// The chain has no device-writable byte for the acknowledgement (or more buffers
    /// than the device maps), so the command cannot be answered; it is not applied.
    NoAck,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::NoHeader { len } => write!(f, "command of {len} bytes has no class/command header"),
            Refused::TooLong { len } => write!(f, "command of {len} bytes is longer than {CTRL_MAX_LEN}"),
            Refused::Unsupported { class, command } => {
                write!(f, "class {class} command {command} not supported")
            }
            Refused::NotNegotiated { class, command, feature } => {
                write!(f, "class {class} command {command} needs {feature}, which was not negotiated")
            }
            Refused::Length { class, command, expected, got } => {
                write!(f, "class {class} command {command}: {got} bytes of data, expected {expected}")
            }
            Refused::Value { class, command, what } => write!(f, "class {class} command {command}: {what}"),
            Refused::NoAck => write!(f, "command chain has no room for the acknowledgement"),
        }
    }
}

fn is_multicast(mac: &[u8; 6]) -> bool {
    mac[0] & 1 != 0
}

fn mac_at(b: &[u8]) -> [u8; 6] {
    [b[0], b[1], b[2], b[3], b[4], b[5]]
}

/// Parses and validates one command: `data` is every device-readable byte of the chain
/// (class, command, command-specific data, however the driver split them into
/// descriptors), `features` what the driver acknowledged, `max_pairs` the device's
/// `max_virtqueue_pairs`.
pub fn parse(data: &[u8], features: u64, max_pairs: u16) -> Result<Command, Refused> {
    let [class, command, body @ ..] = data else {
        return Err(Refused::NoHeader { len: data.len() });
    };
    let (class, command) = (*class, *command);
    let need = |feature: u32, name: &'static str| {
        if features & bit(feature) != 0 {
            Ok(())
        } else {
            Err(Refused::NotNegotiated { class, command, feature: name })
        }
    };
    let exact = |n: usize| {
        if body.len() == n {
            Ok(())
        } else {
            Err(Refused::Length { class, command, expected: n, got: body.len() })
        }
    };
    let value = |what: &'static str| Refused::Value { class, command, what };
    match (class as u32, command as u32) {
        (vn::VIRTIO_NET_CTRL_RX, c) if c <= vn::VIRTIO_NET_CTRL_RX_NOBCAST => {
            let mode = match c {
                vn::VIRTIO_NET_CTRL_RX_PROMISC => RxMode::Promisc,
                vn::VIRTIO_NET_CTRL_RX_ALLMULTI => RxMode::AllMulti,
                vn::VIRTIO_NET_CTRL_RX_ALLUNI => RxMode::AllUni,
                vn::VIRTIO_NET_CTRL_RX_NOMULTI => RxMode::NoMulti,
                vn::VIRTIO_NET_CTRL_RX_NOUNI => RxMode::NoUni,
                _ => RxMode::NoBcast,
            };
            need(vn::VIRTIO_NET_F_CTRL_RX, "VIRTIO_NET_F_CTRL_RX")?;
            if !matches!(mode, RxMode::Promisc | RxMode::AllMulti) {
                need(vn::VIRTIO_NET_F_CTRL_RX_EXTRA, "VIRTIO_NET_F_CTRL_RX_EXTRA")?;
            }
            exact(1)?;
            match body[0] {
                0 => Ok(Command::RxMode(mode, false)),
                1 => Ok(Command::RxMode(mode, true)),
                _ => Err(value("RX mode value is neither 0 nor 1")),
            }
        }
        (vn::VIRTIO_NET_CTRL_MAC, vn::VIRTIO_NET_CTRL_MAC_TABLE_SET) => {
            need(vn::VIRTIO_NET_F_CTRL_RX, "VIRTIO_NET_F_CTRL_RX")?;
            let length = |got: usize, expected: usize| Refused::Length { class, command, expected, got };
            // Two `struct virtio_net_ctrl_mac { le32 entries; u8 macs[entries][6]; }`.
            let list = |b: &'_ [u8]| -> Result<(usize, usize), Refused> {
                let n = b.get(..4).ok_or(length(b.len(), 4))?;
                let n = u32::from_le_bytes([n[0], n[1], n[2], n[3]]) as usize;
                let bytes =
                    n.checked_mul(6).and_then(|x| x.checked_add(4)).ok_or(length(b.len(), usize::MAX))?;
                if b.len() < bytes {
                    return Err(length(b.len(), bytes));
                }
                Ok((n, bytes))
            };
            let (nu, ulen) = list(body)?;
            let (nm, mlen) = list(&body[ulen..])?;
            if ulen + mlen != body.len() {
                return Err(length(body.len(), ulen + mlen));
            }
            let uni: Vec<[u8; 6]> = body[4..ulen].chunks_exact(6).map(mac_at).collect();
            let multi: Vec<[u8; 6]> = body[ulen + 4..].chunks_exact(6).map(mac_at).collect();
            debug_assert_eq!((uni.len(), multi.len()), (nu, nm));
            if uni.iter().any(is_multicast) {
                return Err(value("multicast address in the unicast table"));
            }
            if !multi.iter().all(is_multicast) {
                return Err(value("unicast address in the multicast table"));
            }
            // Unicast entries first, then multicast, in one table (QEMU's layout).
            let mut t = MacTable::default();
            if nu <= MAC_TABLE_ENTRIES {
                t.uni = uni;
            } else {
                t.uni_overflow = true;
            }
            if t.uni.len() + nm <= MAC_TABLE_ENTRIES {
                t.multi = multi;
            } else {
                t.multi_overflow = true;
            }
            Ok(Command::MacTable(t))
        }
        (vn::VIRTIO_NET_CTRL_MAC, vn::VIRTIO_NET_CTRL_MAC_ADDR_SET) => {
            need(vn::VIRTIO_NET_F_CTRL_MAC_ADDR, "VIRTIO_NET_F_CTRL_MAC_ADDR")?;
            exact(6)?;
            let mac = mac_at(body);
            if is_multicast(&mac) {
                return Err(value("a multicast address cannot be the device's address"));
            }
            if mac == [0; 6] {
                return Err(value("the all-zero address cannot be the device's address"));
            }
            Ok(Command::MacAddr(mac))
        }
        (vn::VIRTIO_NET_CTRL_VLAN, vn::VIRTIO_NET_CTRL_VLAN_ADD | vn::VIRTIO_NET_CTRL_VLAN_DEL) => {
            need(vn::VIRTIO_NET_F_CTRL_VLAN, "VIRTIO_NET_F_CTRL_VLAN")?;
            exact(2)?;
            let vid = u16::from_le_bytes([body[0], body[1]]);
            if vid as usize >= MAX_VLAN {
                return Err(value("VLAN id not below 4096"));
            }
            Ok(if command as u32 == vn::VIRTIO_NET_CTRL_VLAN_ADD {
                Command::VlanAdd(vid)
            } else {
                Command::VlanDel(vid)
            })
        }
        (vn::VIRTIO_NET_CTRL_MQ, vn::VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET) => {
            need(vn::VIRTIO_NET_F_MQ, "VIRTIO_NET_F_MQ")?;
            exact(2)?;
            let n = u16::from_le_bytes([body[0], body[1]]);
            if n == 0 || n > max_pairs {
                return Err(value("virtqueue_pairs outside 1..=max_virtqueue_pairs"));
            }
            Ok(Command::VqPairs(n))
        }
        (vn::VIRTIO_NET_CTRL_GUEST_OFFLOADS, vn::VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET) => {
            need(vn::VIRTIO_NET_F_CTRL_GUEST_OFFLOADS, "VIRTIO_NET_F_CTRL_GUEST_OFFLOADS")?;
            exact(8)?;
            let mut b = [0u8; 8];
            b.copy_from_slice(body);
            let offloads = u64::from_le_bytes(b);
            // "A driver MUST NOT enable an offload for which the appropriate feature has
            // not been negotiated": the bits are feature bits, negotiated or refused.
            if offloads & !(features & GUEST_OFFLOADS) != 0 {
                return Err(value("offload bits that were not negotiated"));
            }
            Ok(Command::GuestOffloads(offloads))
        }
        _ => Err(Refused::Unsupported { class, command }),
    }
}

/// What the device delivers into a guest's receive queues: its filters and offloads.
/// The device keeps the current one behind an `Arc` and replaces it as a whole on every
/// command; each receive ring holds the `Arc` it was activated with, so the data path
/// reads it without a lock or an atomic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RxConfig {
    /// Receive everything (QEMU's default after reset).
    pub promisc: bool,
    /// See [`RxMode::AllMulti`].
    pub allmulti: bool,
    /// See [`RxMode::AllUni`].
    pub alluni: bool,
    /// See [`RxMode::NoMulti`].
    pub nomulti: bool,
    /// See [`RxMode::NoUni`].
    pub nouni: bool,
    /// See [`RxMode::NoBcast`].
    pub nobcast: bool,
    /// The device's MAC address (config space, `MAC_ADDR_SET`).
    pub mac: [u8; 6],
    /// The MAC filter table.
    pub table: MacTable,
    /// VLAN ids accepted, one bit each; all set when `CTRL_VLAN` is not negotiated.
    pub vlans: Box<[u64; MAX_VLAN / 64]>,
    /// Guest offloads enabled now, as feature-bit masks.
    pub offloads: u64,
    /// `VIRTIO_NET_F_MRG_RXBUF` was negotiated: a frame may span several receive chains,
    /// the first one's header saying how many (`num_buffers`, §5.1.6.3.2).
    pub mrg_rxbuf: bool,
    /// Every feature the driver acknowledged (fixed until its next `SET_FEATURES`): what
    /// a transmit path checks a frame's offload requests against (`CSUM`, `HOST_*`).
    pub features: u64,
}

impl RxConfig {
    /// The state after reset for a driver that acknowledged `features`: promiscuous,
    /// empty MAC table, empty VLAN table if `CTRL_VLAN` was negotiated (otherwise every
    /// VLAN is accepted), every negotiated guest offload on.
    pub fn reset(mac: [u8; 6], features: u64) -> RxConfig {
        let vlan_filter = features & bit(vn::VIRTIO_NET_F_CTRL_VLAN) != 0;
        RxConfig {
            promisc: true,
            allmulti: false,
            alluni: false,
            nomulti: false,
            nouni: false,
            nobcast: false,
            mac,
            table: MacTable::default(),
            vlans: Box::new([if vlan_filter { 0 } else { u64::MAX }; MAX_VLAN / 64]),
            offloads: features & GUEST_OFFLOADS,
            mrg_rxbuf: features & bit(vn::VIRTIO_NET_F_MRG_RXBUF) != 0,
            features,
        }
    }

    /// Applies a command (`VqPairs` is device state, not filter state: ignored here).
    pub fn apply(&mut self, cmd: &Command) {
        match cmd {
            Command::RxMode(mode, on) => {
                let flag = match mode {
                    RxMode::Promisc => &mut self.promisc,
                    RxMode::AllMulti => &mut self.allmulti,
                    RxMode::AllUni => &mut self.alluni,
                    RxMode::NoMulti => &mut self.nomulti,
                    RxMode::NoUni => &mut self.nouni,
                    RxMode::NoBcast => &mut self.nobcast,
                };
                *flag = *on;
            }
            Command::MacTable(t) => self.table = t.clone(),
            Command::MacAddr(mac) => self.mac = *mac,
            Command::VlanAdd(vid) => self.vlans[*vid as usize / 64] |= 1 << (vid % 64),
            Command::VlanDel(vid) => self.vlans[*vid as usize / 64] &= !(1 << (vid % 64)),
            Command::VqPairs(_) => {}
            Command::GuestOffloads(o) => self.offloads = *o,
        }
    }

    /// Whether every frame passes (no per-frame look at the header needed).
    #[inline]
    pub fn pass_all(&self) -> bool {
        self.promisc
    }

    /// Whether the filters accept a frame whose first bytes are `hdr` (at least the
    /// 14-byte Ethernet header; 16 to see a VLAN tag's id). QEMU's order: promiscuous
    /// wins; a tagged frame needs its VLAN; then broadcast, multicast, unicast rules.
    pub fn accepts(&self, hdr: &[u8]) -> bool {
        if self.promisc {
            return true;
        }
        if hdr.len() < 14 {
            return false;
        }
        if hdr[12..14] == [0x81, 0x00] {
            let Some(tci) = hdr.get(14..16) else {
                return false; // tagged, but too short to say which VLAN
            };
            let vid = (u16::from_be_bytes([tci[0], tci[1]]) & 0x0fff) as usize;
            if self.vlans[vid / 64] & (1 << (vid % 64)) == 0 {
                return false;
            }
        }
        let dst = mac_at(hdr);
        if is_multicast(&dst) {
            if dst == [0xff; 6] {
                !self.nobcast
            } else if self.nomulti {
                false
            } else if self.allmulti || self.table.multi_overflow {
                true
            } else {
                self.table.multi.contains(&dst)
            }
        } else if self.nouni {
            false
        } else if self.alluni || self.table.uni_overflow || dst == self.mac {
            true
        } else {
            self.table.uni.contains(&dst)
        }
    }

    /// Guest TSO for IPv4 may be used now (it also needs partial checksums: a GSO packet
    /// always carries `NEEDS_CSUM`, §5.1.6.4.1).
    pub fn tso4(&self) -> bool {
        let need = bit(vn::VIRTIO_NET_F_GUEST_TSO4) | bit(vn::VIRTIO_NET_F_GUEST_CSUM);
        self.offloads & need == need
    }

    /// Guest TSO for IPv6 may be used now (with partial checksums, as [`tso4`](Self::tso4)).
    pub fn tso6(&self) -> bool {
        let need = bit(vn::VIRTIO_NET_F_GUEST_TSO6) | bit(vn::VIRTIO_NET_F_GUEST_CSUM);
        self.offloads & need == need
    }

    /// Partially checksummed packets may be delivered now.
    pub fn csum(&self) -> bool {
        self.offloads & bit(vn::VIRTIO_NET_F_GUEST_CSUM) != 0
    }

    /// VLAN ids accepted.
    pub fn vlan_count(&self) -> u32 {
        self.vlans.iter().map(|w| w.count_ones()).sum()
    }

    /// The state for the statistics.
    pub fn to_json(&self) -> serde_json::Value {
        let m = self.mac;
        serde_json::json!({
            "promisc": self.promisc, "allmulti": self.allmulti, "alluni": self.alluni,
            "nomulti": self.nomulti, "nouni": self.nouni, "nobcast": self.nobcast,
            "mac": format!("{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5]),
            "unicast": self.table.uni.len(), "multicast": self.table.multi.len(),
            "uni_overflow": self.table.uni_overflow, "multi_overflow": self.table.multi_overflow,
            "vlans": self.vlan_count(),
            "guest_offloads": self.offloads,
        })
    }
}

#[cfg(test)]
mod tests;
