//! A device's vhost-user message handler fed arbitrary message sequences (decoded
//! messages, no socket: the `vhost` crate's framing is its own), with what a worker's
//! resync does after each message: every ring that may run is built from the device
//! state (a bad one is marked broken), one burst runs on it, and it is let go.
#![no_main]

use arbitrary::Arbitrary;
use host_backend::fuzz_api::{FuzzFd, FuzzRegion, HandlerSession};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Fd {
    None,
    Fresh,
    Signalled,
    Pipe,
}

impl Fd {
    fn get(self) -> FuzzFd {
        match self {
            Fd::None => FuzzFd::None,
            Fd::Fresh => FuzzFd::EventFd,
            Fd::Signalled => FuzzFd::Signalled,
            Fd::Pipe => FuzzFd::Pipe,
        }
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
struct Region {
    /// Pages (guest-physical and front-end addresses in 4 KiB steps, so rings can land
    /// in them), or anything with `raw`.
    gpa_page: u8,
    uva_page: u8,
    pages: u8,
    offset_page: u8,
    raw: Option<(u64, u64, u64)>,
}

/// A ring address: a page and offset (inside likely memory) or anything.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Addr {
    At(u8, u16),
    Raw(u64),
}

impl Addr {
    fn get(self) -> u64 {
        match self {
            Addr::At(page, off) => 0x7000_0000 + page as u64 * 0x1000 + (off as u64 & 0xfff),
            Addr::Raw(a) => a,
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Msg {
    /// `SET_FEATURES` of the offered ones masked (or anything with `raw`).
    SetFeatures {
        mask: u64,
        raw: bool,
    },
    SetProtocolFeatures(u64),
    SetOwner,
    ResetOwner,
    SetMemTable {
        regions: Vec<Region>,
        fill: Vec<u8>,
    },
    SetVringNum {
        index: u8,
        num: u16,
    },
    SetVringAddr {
        index: u8,
        desc: Addr,
        used: Addr,
        avail: Addr,
    },
    SetVringBase {
        index: u8,
        base: u32,
    },
    GetVringBase {
        index: u8,
    },
    SetVringKick {
        index: u8,
        fd: Fd,
    },
    SetVringCall {
        index: u8,
        fd: Fd,
    },
    SetVringErr {
        index: u8,
        fd: Fd,
    },
    SetVringEnable {
        index: u8,
        enable: bool,
    },
    GetConfig {
        offset: u32,
        size: u32,
    },
    SetConfig {
        offset: u32,
        data: Vec<u8>,
    },
    GetQueueNum,
    Ctrl(Vec<u8>),
    Reconnect,
    /// `VHOST_USER_IOTLB_MSG`: `kind` 2 update, 3 invalidate; an IOVA in small pages
    /// (rings and buffers are addressed the same way), a target in likely memory.
    Iotlb {
        iova_page: u16,
        pages: u8,
        uaddr: Addr,
        perm: u8,
        kind: u8,
    },
    /// Anything on the IOTLB channel.
    IotlbRaw(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
struct Input {
    pairs: u8,
    iommu: bool,
    msgs: Vec<Msg>,
}

fuzz_target!(|inp: Input| {
    if std::env::var_os("FUZZ_DEBUG").is_some() {
        eprintln!("{inp:#?}");
    }
    let s = HandlerSession::new(inp.pairs as u16 % 4 + 1, inp.iommu);
    for m in inp.msgs.iter().take(48) {
        match m {
            Msg::SetFeatures { mask, raw } => {
                let f = if *raw { *mask } else { s.get_features() & mask };
                s.set_features(f);
            }
            Msg::SetProtocolFeatures(f) => {
                s.set_protocol_features(*f);
            }
            Msg::SetOwner => {
                s.set_owner();
            }
            Msg::ResetOwner => {
                s.reset_owner();
            }
            Msg::SetMemTable { regions, fill } => {
                let rs: Vec<FuzzRegion> = regions
                    .iter()
                    .map(|r| match r.raw {
                        Some((gpa, len, uva)) => FuzzRegion { gpa, len, uva, mmap_offset: 0 },
                        None => FuzzRegion {
                            gpa: r.gpa_page as u64 * 0x1000,
                            len: (r.pages as u64 % 32 + 1) * 0x1000,
                            uva: 0x7000_0000 + r.uva_page as u64 * 0x1000,
                            mmap_offset: (r.offset_page as u64 % 4) * 0x1000,
                        },
                    })
                    .collect();
                s.set_mem_table(&rs, fill);
            }
            Msg::SetVringNum { index, num } => {
                s.set_vring_num(*index as u32 % 12, *num as u32);
            }
            Msg::SetVringAddr { index, desc, used, avail } => {
                s.set_vring_addr(*index as u32 % 12, desc.get(), used.get(), avail.get());
            }
            Msg::SetVringBase { index, base } => {
                s.set_vring_base(*index as u32 % 12, *base);
            }
            Msg::GetVringBase { index } => {
                s.get_vring_base(*index as u32 % 12);
            }
            Msg::SetVringKick { index, fd } => {
                s.set_vring_kick(*index % 12, fd.get());
            }
            Msg::SetVringCall { index, fd } => {
                s.set_vring_call(*index % 12, fd.get());
            }
            Msg::SetVringErr { index, fd } => {
                s.set_vring_err(*index % 12, fd.get());
            }
            Msg::SetVringEnable { index, enable } => {
                s.set_vring_enable(*index as u32 % 12, *enable);
            }
            Msg::GetConfig { offset, size } => {
                s.get_config(*offset, *size);
            }
            Msg::SetConfig { offset, data } => {
                s.set_config(*offset, data);
            }
            Msg::GetQueueNum => {
                s.get_queue_num();
            }
            Msg::Ctrl(data) => {
                s.ctrl(data);
            }
            Msg::Reconnect => s.reconnect(),
            Msg::Iotlb { iova_page, pages, uaddr, perm, kind } => s.iotlb_msg(
                *iova_page as u64 * 0x1000,
                (*pages as u64 + 1) * 0x1000,
                uaddr.get() & !0xfff,
                *perm,
                2 + kind % 3,
            ),
            Msg::IotlbRaw(bytes) => s.iotlb_raw(bytes),
        }
        s.activate_all();
    }
    let _ = s.snapshot_json();
});
