//! Parsing the capability chains VFIO appends to its info structures.
//!
//! Owns: walking a chain with every offset checked against the buffer (and a bound
//! against loops), and decoding the sparse-mmap areas of a region and the usable IOVA
//! ranges of the IOMMU. Must not: issue ioctls (it parses buffers the kernel filled).

use vfio_bindings::bindings::vfio::{
    vfio_info_cap_header, vfio_iommu_type1_info_cap_iova_range, vfio_iova_range,
    vfio_region_info_cap_sparse_mmap, vfio_region_sparse_mmap_area, VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE,
    VFIO_REGION_INFO_CAP_SPARSE_MMAP,
};

/// Walks a VFIO capability chain in `buf` from `first`: `(id, version, offset)` of each
/// header (offsets checked to lie inside `buf`, at most 64 entries against loops).
pub(super) fn caps(buf: &[u8], first: u32) -> Vec<(u16, u16, usize)> {
    let hdr = std::mem::size_of::<vfio_info_cap_header>();
    let mut out = Vec::new();
    let mut off = first as usize;
    while off != 0 && off + hdr <= buf.len() && out.len() < 64 {
        let id = u16::from_ne_bytes([buf[off], buf[off + 1]]);
        let ver = u16::from_ne_bytes([buf[off + 2], buf[off + 3]]);
        let next = u32::from_ne_bytes(buf[off + 4..off + 8].try_into().unwrap_or([0; 4])) as usize;
        out.push((id, ver, off));
        if next <= off {
            break; // chains only move forward
        }
        off = next;
    }
    out
}

fn u64_at(buf: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(buf.get(off..off + 8)?.try_into().ok()?))
}
fn u32_at(buf: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(buf.get(off..off + 4)?.try_into().ok()?))
}

/// The sparse-mmap areas of a region-info buffer, if it has that capability.
pub(super) fn parse_sparse_mmap(buf: &[u8], first: u32) -> Option<Vec<(u64, u64)>> {
    let (_, _, off) =
        caps(buf, first).into_iter().find(|c| c.0 as u32 == VFIO_REGION_INFO_CAP_SPARSE_MMAP)?;
    let n = u32_at(buf, off + std::mem::size_of::<vfio_info_cap_header>())? as usize;
    let areas = off + std::mem::size_of::<vfio_region_info_cap_sparse_mmap>();
    let sz = std::mem::size_of::<vfio_region_sparse_mmap_area>();
    (0..n).map(|i| Some((u64_at(buf, areas + i * sz)?, u64_at(buf, areas + i * sz + 8)?))).collect()
}

/// The usable IOVA ranges of an IOMMU-info buffer, if it has that capability.
pub(super) fn parse_iova_ranges(buf: &[u8], first: u32) -> Option<Vec<(u64, u64)>> {
    let (_, _, off) =
        caps(buf, first).into_iter().find(|c| c.0 as u32 == VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE)?;
    let n = u32_at(buf, off + std::mem::size_of::<vfio_info_cap_header>())? as usize;
    let ranges = off + std::mem::size_of::<vfio_iommu_type1_info_cap_iova_range>();
    let sz = std::mem::size_of::<vfio_iova_range>();
    (0..n).map(|i| Some((u64_at(buf, ranges + i * sz)?, u64_at(buf, ranges + i * sz + 8)?))).collect()
}
