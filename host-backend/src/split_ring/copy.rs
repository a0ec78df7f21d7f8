//! Copies between walked chains and host buffers: [`gather`] (out of a chain), [`scatter`]
//! (into one) and [`copy_chain`] (from one chain to another).
//!
//! Owns: the byte copies of the data path over guest buffers. Must not: validate or walk
//! descriptors (a [`Chain`] is already checked and translated), touch ring indices, or
//! form a Rust reference into guest memory (every copy is a raw `ptr::copy`).
//!
//! Sound to call with any chain: a `Chain<'m>` only holds ranges inside guest memory the
//! caller borrows for `'m` (see [`super::chain`]), and every offset is checked against the
//! segment lengths before a pointer is formed.

use super::Chain;

// `gather`, `scatter` and `copy_chain` first try the case of every burst path: the whole
// range inside the first piece (a one-descriptor chain, which `walk` decides inline). That
// case is inlined into the caller, so a copy of a constant length (a header, two MAC
// addresses) becomes a few moves; anything else goes to the piece-by-piece loop out of
// line. Measured with `bench/callgrind.sh` (be-loop: `reflect`'s three small copies and its
// frame copy).

/// Copies `len` bytes out of `chain` starting at byte `off` into `dst`. Returns the bytes
/// copied (less than `len` if the chain is shorter).
#[inline(always)]
pub(crate) fn gather(chain: &Chain<'_>, off: usize, dst: &mut [u8]) -> usize {
    if let Some(p) = chain.in_first(off, dst.len()) {
        // SAFETY: `p .. + dst.len()` is inside a translated guest buffer (`in_first`);
        // `dst` is ours. `copy` as in `gather_pieces`.
        unsafe { std::ptr::copy(p, dst.as_mut_ptr(), dst.len()) };
        return dst.len();
    }
    gather_pieces(chain, off, dst)
}

#[inline(never)]
fn gather_pieces(chain: &Chain<'_>, mut off: usize, dst: &mut [u8]) -> usize {
    let mut done = 0;
    for s in chain.segs() {
        let l = s.len as usize;
        if off >= l {
            off -= l;
            continue;
        }
        let n = (l - off).min(dst.len() - done);
        // SAFETY: `s.ptr + off .. + n` is inside a translated guest buffer; `dst` is ours.
        // `copy` (memmove semantics) because guest memory is foreign; the bytes may be
        // torn if the driver rewrites them concurrently, which only harms that driver.
        unsafe { std::ptr::copy(s.ptr.add(off), dst.as_mut_ptr().add(done), n) };
        done += n;
        off = 0;
        if done == dst.len() {
            break;
        }
    }
    done
}

/// Copies `src` into `chain` starting at byte `off`. Returns the bytes copied.
#[inline(always)]
pub(crate) fn scatter(chain: &Chain<'_>, off: usize, src: &[u8]) -> usize {
    if let Some(p) = chain.in_first(off, src.len()) {
        // SAFETY: `p .. + src.len()` is inside a translated, device-writable guest buffer
        // (`in_first`).
        unsafe { std::ptr::copy(src.as_ptr(), p, src.len()) };
        return src.len();
    }
    scatter_pieces(chain, off, src)
}

#[inline(never)]
fn scatter_pieces(chain: &Chain<'_>, mut off: usize, src: &[u8]) -> usize {
    let mut done = 0;
    for s in chain.segs() {
        let l = s.len as usize;
        if off >= l {
            off -= l;
            continue;
        }
        let n = (l - off).min(src.len() - done);
        // SAFETY: the destination lies inside a translated, device-writable guest buffer.
        unsafe { std::ptr::copy(src.as_ptr().add(done), s.ptr.add(off), n) };
        done += n;
        off = 0;
        if done == src.len() {
            break;
        }
    }
    done
}

/// Copies `len` bytes from `src` (from byte `src_off`) to `dst` (from byte `dst_off`),
/// piece by piece. Returns the bytes copied.
#[inline(always)]
pub(crate) fn copy_chain(
    src: &Chain<'_>,
    src_off: usize,
    dst: &Chain<'_>,
    dst_off: usize,
    len: usize,
) -> usize {
    if let (Some(s), Some(d)) = (src.in_first(src_off, len), dst.in_first(dst_off, len)) {
        // SAFETY: both ranges lie inside a translated guest buffer (`in_first`); `copy`
        // as in `copy_pieces`.
        unsafe { std::ptr::copy(s, d, len) };
        return len;
    }
    copy_pieces(src, src_off, dst, dst_off, len)
}

#[inline(never)]
fn copy_pieces(src: &Chain<'_>, src_off: usize, dst: &Chain<'_>, dst_off: usize, len: usize) -> usize {
    let (mut si, mut so) = (0usize, src_off);
    let (mut di, mut dof) = (0usize, dst_off);
    let (ss, ds) = (src.segs(), dst.segs());
    let mut done = 0;
    while done < len {
        while si < ss.len() && so >= ss[si].len as usize {
            so -= ss[si].len as usize;
            si += 1;
        }
        while di < ds.len() && dof >= ds[di].len as usize {
            dof -= ds[di].len as usize;
            di += 1;
        }
        if si == ss.len() || di == ds.len() {
            break;
        }
        let n = (ss[si].len as usize - so).min(ds[di].len as usize - dof).min(len - done);
        // SAFETY: both ranges lie inside translated guest buffers (bounds from the segs);
        // `copy` tolerates a malicious driver pointing both at the same memory.
        unsafe { std::ptr::copy(ss[si].ptr.add(so), ds[di].ptr.add(dof), n) };
        so += n;
        dof += n;
        done += n;
    }
    done
}
