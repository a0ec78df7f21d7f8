//! `evil-device SOCKET MODE [--good N] [--lifetime SECS] [--in-order] [--packed]`: a deliberately misbehaving
//! vhost-user virtio-net device for the driver's malicious-device tests (see
//! `vnet_tests::evildevice`).

fn main() {
    std::process::exit(vnet_tests::evildevice::device_main(std::env::args_os().skip(1).collect()));
}
