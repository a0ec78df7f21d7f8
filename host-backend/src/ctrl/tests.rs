//! Unit tests of control-command parsing and the receive filter.

use super::*;

const ALL: u64 = bit(vn::VIRTIO_NET_F_CTRL_VQ)
    | bit(vn::VIRTIO_NET_F_CTRL_RX)
    | bit(vn::VIRTIO_NET_F_CTRL_RX_EXTRA)
    | bit(vn::VIRTIO_NET_F_CTRL_VLAN)
    | bit(vn::VIRTIO_NET_F_CTRL_MAC_ADDR)
    | bit(vn::VIRTIO_NET_F_MQ)
    | bit(vn::VIRTIO_NET_F_CTRL_GUEST_OFFLOADS)
    | bit(vn::VIRTIO_NET_F_GUEST_CSUM)
    | bit(vn::VIRTIO_NET_F_GUEST_TSO4);
const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];

fn cmd(class: u32, command: u32, data: &[u8]) -> Vec<u8> {
    let mut v = vec![class as u8, command as u8];
    v.extend_from_slice(data);
    v
}

fn table(uni: &[[u8; 6]], multi: &[[u8; 6]]) -> Vec<u8> {
    let mut v = (uni.len() as u32).to_le_bytes().to_vec();
    uni.iter().for_each(|m| v.extend_from_slice(m));
    v.extend_from_slice(&(multi.len() as u32).to_le_bytes());
    multi.iter().for_each(|m| v.extend_from_slice(m));
    v
}

fn eth(dst: [u8; 6], vlan: Option<u16>) -> Vec<u8> {
    let mut f = dst.to_vec();
    f.extend_from_slice(&[2, 0, 0, 0, 0, 9]);
    if let Some(v) = vlan {
        f.extend_from_slice(&[0x81, 0x00]);
        f.extend_from_slice(&(0x2000 | v).to_be_bytes()); // PCP 1 must not matter
    }
    f.extend_from_slice(&[0x08, 0x00]);
    f
}

#[test]
fn rx_mode_commands_parse_and_check_length_value_and_feature() {
    let p = |c, d: &[u8], feat| parse(&cmd(vn::VIRTIO_NET_CTRL_RX, c, d), feat, 4);
    assert_eq!(p(0, &[1], ALL), Ok(Command::RxMode(RxMode::Promisc, true)));
    assert_eq!(p(1, &[0], ALL), Ok(Command::RxMode(RxMode::AllMulti, false)));
    assert_eq!(p(5, &[1], ALL), Ok(Command::RxMode(RxMode::NoBcast, true)));
    assert!(matches!(p(0, &[], ALL), Err(Refused::Length { expected: 1, got: 0, .. })));
    assert!(matches!(p(0, &[1, 0], ALL), Err(Refused::Length { expected: 1, got: 2, .. })));
    assert!(matches!(p(0, &[2], ALL), Err(Refused::Value { .. })));
    assert!(matches!(p(6, &[1], ALL), Err(Refused::Unsupported { class: 0, command: 6 })));
    let no_extra = ALL & !bit(vn::VIRTIO_NET_F_CTRL_RX_EXTRA);
    assert!(p(1, &[1], no_extra).is_ok());
    assert!(matches!(p(2, &[1], no_extra), Err(Refused::NotNegotiated { .. })));
    let no_rx = ALL & !bit(vn::VIRTIO_NET_F_CTRL_RX);
    assert!(matches!(p(0, &[1], no_rx), Err(Refused::NotNegotiated { .. })));
}

#[test]
fn mac_table_parses_validates_and_overflows() {
    let u = [2, 0, 0, 0, 0, 1];
    let m = [0x01, 0, 0x5e, 0, 0, 1];
    let p = |d: &[u8]| parse(&cmd(vn::VIRTIO_NET_CTRL_MAC, 0, d), ALL, 1);
    let Ok(Command::MacTable(t)) = p(&table(&[u], &[m, m])) else { panic!() };
    assert_eq!((t.uni, t.multi, t.uni_overflow, t.multi_overflow), (vec![u], vec![m, m], false, false));
    assert!(matches!(p(&table(&[], &[])), Ok(Command::MacTable(t)) if t == MacTable::default()));
    // Lengths: truncated, extra bytes, a count that claims more than is there.
    let good = table(&[u], &[m]);
    assert!(matches!(p(&good[..good.len() - 1]), Err(Refused::Length { .. })));
    let mut extra = good.clone();
    extra.push(0);
    assert!(matches!(p(&extra), Err(Refused::Length { .. })));
    assert!(matches!(p(&[0xff, 0xff, 0xff, 0xff]), Err(Refused::Length { .. })));
    assert!(matches!(p(&[0, 0, 0]), Err(Refused::Length { .. })));
    assert!(matches!(p(&[0, 0, 0, 0]), Err(Refused::Length { .. })));
    // Address classes.
    assert!(matches!(p(&table(&[m], &[])), Err(Refused::Value { .. })));
    assert!(matches!(p(&table(&[], &[u])), Err(Refused::Value { .. })));
    // Too many entries: that class becomes accept-all.
    let many: Vec<[u8; 6]> = (0..65).map(|i| [2, 0, 0, 0, 1, i as u8]).collect();
    let Ok(Command::MacTable(t)) = p(&table(&many, &[m])) else { panic!() };
    assert!(t.uni_overflow && t.uni.is_empty() && !t.multi_overflow && t.multi == vec![m]);
    let Ok(Command::MacTable(t)) = p(&table(&many[..64], &[m])) else { panic!() };
    assert!(!t.uni_overflow && t.uni.len() == 64 && t.multi_overflow && t.multi.is_empty());
    let no_rx = ALL & !bit(vn::VIRTIO_NET_F_CTRL_RX);
    assert!(matches!(
        parse(&cmd(vn::VIRTIO_NET_CTRL_MAC, 0, &good), no_rx, 1),
        Err(Refused::NotNegotiated { .. })
    ));
}

#[test]
fn mac_addr_vlan_pairs_offloads_parse_and_validate() {
    let p = |class, c, d: &[u8]| parse(&cmd(class, c, d), ALL, 4);
    let mac = [2, 1, 2, 3, 4, 5];
    assert_eq!(p(1, 1, &mac), Ok(Command::MacAddr(mac)));
    assert!(matches!(p(1, 1, &mac[..5]), Err(Refused::Length { .. })));
    assert!(matches!(p(1, 1, &[1, 0, 0, 0, 0, 1]), Err(Refused::Value { .. })));
    assert!(matches!(p(1, 1, &[0; 6]), Err(Refused::Value { .. })));
    assert!(matches!(p(1, 2, &mac), Err(Refused::Unsupported { .. })));

    assert_eq!(p(2, 0, &4095u16.to_le_bytes()), Ok(Command::VlanAdd(4095)));
    assert_eq!(p(2, 1, &7u16.to_le_bytes()), Ok(Command::VlanDel(7)));
    assert!(matches!(p(2, 0, &4096u16.to_le_bytes()), Err(Refused::Value { .. })));
    assert!(matches!(p(2, 0, &[1]), Err(Refused::Length { .. })));
    assert!(matches!(p(2, 2, &[1, 0]), Err(Refused::Unsupported { .. })));

    assert_eq!(p(4, 0, &4u16.to_le_bytes()), Ok(Command::VqPairs(4)));
    assert_eq!(p(4, 0, &1u16.to_le_bytes()), Ok(Command::VqPairs(1)));
    assert!(matches!(p(4, 0, &0u16.to_le_bytes()), Err(Refused::Value { .. })));
    assert!(matches!(p(4, 0, &5u16.to_le_bytes()), Err(Refused::Value { .. })));
    assert!(matches!(p(4, 1, &[0; 8]), Err(Refused::Unsupported { .. })));
    let no_mq = ALL & !bit(vn::VIRTIO_NET_F_MQ);
    assert!(matches!(parse(&cmd(4, 0, &[1, 0]), no_mq, 4), Err(Refused::NotNegotiated { .. })));

    let csum_tso = bit(vn::VIRTIO_NET_F_GUEST_CSUM) | bit(vn::VIRTIO_NET_F_GUEST_TSO4);
    assert_eq!(p(5, 0, &csum_tso.to_le_bytes()), Ok(Command::GuestOffloads(csum_tso)));
    assert_eq!(p(5, 0, &0u64.to_le_bytes()), Ok(Command::GuestOffloads(0)));
    let tso6 = bit(vn::VIRTIO_NET_F_GUEST_TSO6);
    assert!(matches!(p(5, 0, &tso6.to_le_bytes()), Err(Refused::Value { .. })));
    // A negotiated feature bit that is not an offload is refused too.
    let mq = bit(vn::VIRTIO_NET_F_MQ);
    assert!(matches!(p(5, 0, &mq.to_le_bytes()), Err(Refused::Value { .. })));
    assert!(matches!(p(5, 0, &[0; 7]), Err(Refused::Length { .. })));

    assert!(matches!(parse(&[], ALL, 1), Err(Refused::NoHeader { len: 0 })));
    assert!(matches!(parse(&[0], ALL, 1), Err(Refused::NoHeader { len: 1 })));
    assert!(matches!(p(3, 0, &[]), Err(Refused::Unsupported { .. })));
    assert!(matches!(p(6, 0, &[0; 8]), Err(Refused::Unsupported { .. })));
    assert!(matches!(p(255, 255, &[]), Err(Refused::Unsupported { .. })));
}

#[test]
fn reset_state_is_promiscuous_with_negotiated_offloads() {
    let r = RxConfig::reset(MAC, ALL);
    assert!(r.promisc && r.pass_all());
    assert_eq!(r.vlan_count(), 0);
    assert_eq!(r.offloads, bit(vn::VIRTIO_NET_F_GUEST_CSUM) | bit(vn::VIRTIO_NET_F_GUEST_TSO4));
    assert!(r.tso4() && r.csum());
    let r = RxConfig::reset(MAC, 0);
    assert_eq!(r.vlan_count(), 4096);
    assert_eq!(r.offloads, 0);
    assert!(!r.tso4() && !r.csum());
    // TSO without checksum offload is not usable.
    let mut r = RxConfig::reset(MAC, ALL);
    r.apply(&Command::GuestOffloads(bit(vn::VIRTIO_NET_F_GUEST_TSO4)));
    assert!(!r.tso4() && !r.csum());
}

#[test]
fn filter_decisions_follow_mode_tables_and_vlans() {
    let other = [2, 0, 0, 0, 0, 0x77];
    let listed = [2, 0, 0, 0, 0, 0x88];
    let mcast = [0x01, 0, 0x5e, 0, 0, 1];
    let mcast2 = [0x33, 0x33, 0, 0, 0, 1];
    let bcast = [0xff; 6];
    let mut r = RxConfig::reset(MAC, ALL);
    assert!(r.accepts(&eth(other, Some(5))), "promiscuous after reset");
    r.apply(&Command::RxMode(RxMode::Promisc, false));
    assert!(!r.pass_all());
    assert!(r.accepts(&eth(MAC, None)));
    assert!(!r.accepts(&eth(other, None)));
    assert!(r.accepts(&eth(bcast, None)));
    assert!(!r.accepts(&eth(mcast, None)));
    assert!(!r.accepts(&eth(MAC, Some(5))), "VLAN 5 not in the table");
    assert!(!r.accepts(&eth(MAC, None)[..13]), "shorter than an Ethernet header");
    assert!(!r.accepts(&eth(MAC, Some(5))[..15]), "tagged, VLAN id cut off");

    r.apply(&Command::VlanAdd(5));
    assert!(r.accepts(&eth(MAC, Some(5))));
    assert!(!r.accepts(&eth(MAC, Some(6))));
    r.apply(&Command::VlanDel(5));
    assert!(!r.accepts(&eth(MAC, Some(5))));

    let Ok(Command::MacTable(t)) = parse(&cmd(1, 0, &table(&[listed], &[mcast])), ALL, 1) else { panic!() };
    r.apply(&Command::MacTable(t));
    assert!(r.accepts(&eth(listed, None)) && r.accepts(&eth(mcast, None)));
    assert!(!r.accepts(&eth(other, None)) && !r.accepts(&eth(mcast2, None)));

    r.apply(&Command::RxMode(RxMode::AllMulti, true));
    assert!(r.accepts(&eth(mcast2, None)));
    r.apply(&Command::RxMode(RxMode::NoMulti, true));
    assert!(!r.accepts(&eth(mcast, None)), "NOMULTI wins over ALLMULTI and the table");
    assert!(r.accepts(&eth(bcast, None)), "NOMULTI leaves broadcast alone");
    r.apply(&Command::RxMode(RxMode::NoBcast, true));
    assert!(!r.accepts(&eth(bcast, None)));

    r.apply(&Command::RxMode(RxMode::AllUni, true));
    assert!(r.accepts(&eth(other, None)));
    r.apply(&Command::RxMode(RxMode::NoUni, true));
    assert!(!r.accepts(&eth(other, None)) && !r.accepts(&eth(MAC, None)), "NOUNI wins");

    r.apply(&Command::MacAddr(other));
    r.apply(&Command::RxMode(RxMode::NoUni, false));
    r.apply(&Command::RxMode(RxMode::AllUni, false));
    assert!(r.accepts(&eth(other, None)) && !r.accepts(&eth(MAC, None)), "new MAC replaces the old");

    r.apply(&Command::RxMode(RxMode::Promisc, true));
    assert!(r.accepts(&eth(bcast, None)) && r.accepts(&eth(mcast, Some(9))), "promiscuous wins");

    let Ok(Command::MacTable(t)) = parse(
        &cmd(1, 0, &table(&(0..65).map(|i| [2, 0, 0, 0, 1, i as u8]).collect::<Vec<_>>(), &[])),
        ALL,
        1,
    ) else {
        panic!()
    };
    let mut r = RxConfig::reset(MAC, ALL);
    r.apply(&Command::RxMode(RxMode::Promisc, false));
    r.apply(&Command::MacTable(t));
    assert!(r.accepts(&eth(other, None)), "unicast overflow accepts all unicast");
    assert!(!r.accepts(&eth(mcast, None)));
}

#[test]
fn vlans_pass_without_ctrl_vlan() {
    let mut r = RxConfig::reset(MAC, ALL & !bit(vn::VIRTIO_NET_F_CTRL_VLAN));
    r.apply(&Command::RxMode(RxMode::Promisc, false));
    assert!(r.accepts(&eth(MAC, Some(4095))) && r.accepts(&eth(MAC, Some(0))));
}
