//! Reading the l2fwd example's output (`driver/examples/l2fwd.rs`): its per-port
//! statistics blocks, per-queue lines and the MACs it prints at start; shared by the
//! tests that run it on virtio-user ports and inside a guest.

/// `Statistics for port P` block's line `key` (the last block) as a number.
pub fn port_stat(out: &str, port: usize, key: &str) -> u64 {
    let start = out
        .rfind(&format!("Statistics for port {port} "))
        .unwrap_or_else(|| panic!("no statistics for port {port} in:\n{out}"));
    let line = out[start..]
        .lines()
        .find(|l| l.starts_with(key))
        .unwrap_or_else(|| panic!("no '{key}' for port {port} in:\n{out}"));
    line[key.len()..].trim().parse().unwrap_or_else(|_| panic!("bad line '{line}'"))
}

/// `queue Q: received R sent S` lines of port `port`'s last block: [(R, S)] per queue.
pub fn queue_stats(out: &str, port: usize) -> Vec<(u64, u64)> {
    let start = out.rfind(&format!("Statistics for port {port} ")).expect("port block");
    out[start..]
        .lines()
        .skip(1)
        .take_while(|l| !l.starts_with("Statistics for port") && !l.starts_with("Aggregate"))
        .filter_map(|l| l.trim().strip_prefix("queue "))
        .map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            (w[2].parse().expect("received"), w[4].parse().expect("sent"))
        })
        .collect()
}

/// The MAC l2fwd printed for `port` ("Port P: MAC AA:BB:..").
pub fn printed_mac(out: &str, port: usize) -> [u8; 6] {
    let key = format!("Port {port}: MAC ");
    let at = out.find(&key).unwrap_or_else(|| panic!("no '{key}' in:\n{out}")) + key.len();
    let mut mac = [0u8; 6];
    for (m, h) in mac.iter_mut().zip(out[at..at + 17].split(':')) {
        *m = u8::from_str_radix(h, 16).expect("hex MAC");
    }
    mac
}
