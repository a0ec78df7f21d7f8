//! Sends UDP/IPv4 frames out of a network interface as fast as the kernel takes them,
//! for a given time: an `AF_PACKET` socket bound to the interface, `PACKET_QDISC_BYPASS`
//! (no queueing discipline in between) and `sendmmsg` of 64 frames a call.
//!
//! Why the tap benchmark needs it: the "kernel to guest" rows need the kernel to hand
//! frames to a tap as fast as it can, and this machine's kernel has no `pktgen`. Sent out
//! of a tap from the kernel's side, each frame goes to whoever reads the tap's file
//! descriptor (our backend's `tap` port, or DPDK's `net_tap`). The same sender runs for
//! every contender; it is one process on one CPU, so a row it feeds is bounded by it.
//!
//! ```sh
//! ip netns exec NS target/release/examples/pkt_flood IFNAME SIZE SECONDS [CPU]
//! ```
//! Output: one line, `sent=N seconds=S`.

use std::time::{Duration, Instant};

fn die(what: &str) -> ! {
    eprintln!("pkt_flood: {what}: {}", std::io::Error::last_os_error());
    std::process::exit(1)
}

/// An Ethernet/IPv4/UDP frame of `len` bytes from 10.99.0.1:9 to 10.99.0.2:9 with a
/// valid IPv4 header checksum and no UDP checksum.
fn frame(len: usize) -> Vec<u8> {
    let mut f = vec![0u8; len];
    f[0..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
    f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip_len = (len - 14) as u16;
    let ip = &mut f[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&[10, 99, 0, 1]);
    ip[16..20].copy_from_slice(&[10, 99, 0, 2]);
    let mut sum = 0u32;
    for w in ip.chunks(2) {
        sum += u16::from_be_bytes([w[0], w[1]]) as u32;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    ip[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    f[34..36].copy_from_slice(&9u16.to_be_bytes());
    f[36..38].copy_from_slice(&9u16.to_be_bytes());
    f[38..40].copy_from_slice(&(ip_len - 20).to_be_bytes());
    f
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    if a.len() < 4 {
        eprintln!("usage: pkt_flood IFNAME SIZE SECONDS [CPU]");
        std::process::exit(2);
    }
    let size: usize = a[2].parse().unwrap_or(0);
    let secs: f64 = a[3].parse().unwrap_or(0.0);
    if !(60..=9018).contains(&size) || secs.is_nan() || secs <= 0.0 {
        eprintln!("pkt_flood: SIZE must be 60..=9018 and SECONDS positive");
        std::process::exit(2);
    }
    if let Some(cpu) = a.get(4).and_then(|c| c.parse::<usize>().ok()) {
        // SAFETY: a zeroed cpu_set_t filled by CPU_SET; the call only reads it.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                die("sched_setaffinity");
            }
        }
    }
    let name = std::ffi::CString::new(a[1].as_str()).unwrap_or_else(|_| die("interface name"));
    // SAFETY: a NUL-terminated name.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        die("no such interface");
    }
    // SAFETY: plain socket call.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    if fd < 0 {
        die("socket(AF_PACKET)");
    }
    // SAFETY: a zeroed sockaddr_ll with family, protocol 0 (send only) and the index.
    let rc = unsafe {
        let mut sll: libc::sockaddr_ll = std::mem::zeroed();
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_ifindex = ifindex as i32;
        libc::bind(
            fd,
            &sll as *const _ as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if rc != 0 {
        die("bind");
    }
    let one: libc::c_int = 1;
    // SAFETY: an int option through a valid pointer and its size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_PACKET,
            libc::PACKET_QDISC_BYPASS,
            &one as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as u32,
        )
    };
    if rc != 0 {
        die("PACKET_QDISC_BYPASS");
    }
    const BATCH: usize = 64;
    let f = frame(size);
    let mut iov = libc::iovec { iov_base: f.as_ptr() as *mut libc::c_void, iov_len: f.len() };
    // SAFETY: mmsghdr is a plain C struct; zero is a valid starting value.
    let mut msgs: Vec<libc::mmsghdr> = (0..BATCH).map(|_| unsafe { std::mem::zeroed() }).collect();
    for m in msgs.iter_mut() {
        m.msg_hdr.msg_iov = &mut iov;
        m.msg_hdr.msg_iovlen = 1;
    }
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    let mut sent = 0u64;
    while Instant::now() < end {
        // SAFETY: `msgs` holds BATCH headers, each pointing at `iov`, which points at `f`;
        // all outlive the call, and the kernel only reads them.
        let n = unsafe { libc::sendmmsg(fd, msgs.as_mut_ptr(), BATCH as u32, 0) };
        if n > 0 {
            sent += n as u64;
        } else if n < 0 {
            let e = std::io::Error::last_os_error();
            if !matches!(e.raw_os_error(), Some(libc::ENOBUFS | libc::EAGAIN | libc::EINTR)) {
                die("sendmmsg");
            }
        }
    }
    println!("sent={sent} seconds={:.3}", start.elapsed().as_secs_f64());
}
