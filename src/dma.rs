//! DMA buffer pool: fixed-size, aligned buffers carved from one mapping.
//!
//! The pool tries 2 MiB hugepages first (`MAP_HUGETLB` through `memmap2`) and
//! falls back to anonymous memory, which is page-aligned. Every buffer has a
//! stable index so io_uring can use it as a registered ("fixed") buffer and a
//! VFIO driver can map the region once. The pool is sized at start and never
//! grows: an empty pool is a normal, handled condition (back-pressure).

use memmap2::{MmapMut, MmapOptions};

/// One buffer handed out by a [`DmaPool`]. Plain data: it does not free itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaBuf {
    pub ptr: *mut u8,
    pub len: usize,
    /// Index in the pool, which is also the io_uring fixed-buffer index.
    pub index: u16,
}

impl DmaBuf {
    /// # Safety
    /// The caller must own the buffer (no I/O in flight on it).
    pub unsafe fn as_slice(&self) -> &[u8] {
        // SAFETY: the pool keeps `len` bytes at `ptr` alive for its lifetime, and the
        // caller promises no device is writing them.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// # Safety
    /// The caller must own the buffer (no I/O in flight on it).
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn as_mut_slice(&self) -> &mut [u8] {
        // SAFETY: as for `as_slice`, and the caller owns the buffer exclusively.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

/// A per-reactor pool of equal, aligned buffers.
pub struct DmaPool {
    map: MmapMut,
    buf_bytes: usize,
    count: usize,
    free: Vec<u16>,
    hugepages: bool,
}

impl DmaPool {
    /// Creates `count` buffers of `buf_bytes` each (rounded up to 4 KiB).
    pub fn new(buf_bytes: usize, count: usize) -> std::io::Result<DmaPool> {
        assert!(
            count > 0 && count < u16::MAX as usize,
            "pool size out of range"
        );
        let buf_bytes = buf_bytes.max(4096).next_multiple_of(4096);
        let total = buf_bytes * count;
        let huge_total = total.next_multiple_of(2 << 20);
        let (map, hugepages) = match MmapOptions::new().len(huge_total).huge(Some(21)).map_anon() {
            Ok(m) => (m, true),
            Err(_) => (MmapOptions::new().len(total).map_anon()?, false),
        };
        assert_eq!(map.as_ptr() as usize % 4096, 0);
        let free = (0..count as u16).rev().collect();
        Ok(DmaPool {
            map,
            buf_bytes,
            count,
            free,
            hugepages,
        })
    }

    pub fn buf_bytes(&self) -> usize {
        self.buf_bytes
    }

    pub fn capacity(&self) -> usize {
        self.count
    }

    pub fn available(&self) -> usize {
        self.free.len()
    }

    /// Whether the pool got hugepages.
    pub fn hugepages(&self) -> bool {
        self.hugepages
    }

    /// Base address and length of the whole region (for IOMMU mapping).
    pub fn region(&self) -> (*const u8, usize) {
        (self.map.as_ptr(), self.buf_bytes * self.count)
    }

    /// The iovecs of every buffer, in index order, for `io_uring_register_buffers`.
    pub fn iovecs(&self) -> Vec<libc::iovec> {
        (0..self.count)
            .map(|i| libc::iovec {
                // SAFETY: i < count, so the offset stays inside the mapping.
                iov_base: unsafe { self.map.as_ptr().add(i * self.buf_bytes) } as *mut libc::c_void,
                iov_len: self.buf_bytes,
            })
            .collect()
    }

    /// Takes a buffer, or `None` when the pool is empty.
    #[inline]
    pub fn alloc(&mut self) -> Option<DmaBuf> {
        let index = self.free.pop()?;
        Some(self.buf(index))
    }

    /// The buffer with this index (whether or not it is allocated).
    #[inline]
    pub fn buf(&self, index: u16) -> DmaBuf {
        assert!((index as usize) < self.count);
        // SAFETY: index < count, so the offset stays inside the mapping.
        let ptr = unsafe { self.map.as_ptr().add(index as usize * self.buf_bytes) } as *mut u8;
        DmaBuf {
            ptr,
            len: self.buf_bytes,
            index,
        }
    }

    /// Returns a buffer to the pool.
    #[inline]
    pub fn free(&mut self, buf: DmaBuf) {
        assert!(
            (buf.index as usize) < self.count && self.free.len() < self.count,
            "double free"
        );
        debug_assert!(
            !self.free.contains(&buf.index),
            "double free of buffer {}",
            buf.index
        );
        self.free.push(buf.index);
    }
}

/// A heap buffer with 4 KiB alignment, for metadata I/O off the hot path.
pub struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes rounded up to 4 KiB.
    pub fn zeroed(len: usize) -> AlignedBuf {
        let len = len.max(4096).next_multiple_of(4096);
        let layout = std::alloc::Layout::from_size_align(len, 4096).expect("layout");
        // SAFETY: non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null(), "out of memory allocating {len} bytes");
        AlignedBuf { ptr, len }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: we own `len` initialised bytes at `ptr`.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: we own `len` initialised bytes at `ptr`, borrowed mutably.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let layout = std::alloc::Layout::from_size_align(self.len, 4096).expect("layout");
        // SAFETY: allocated in `zeroed` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, layout) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alloc_free_alignment() {
        let mut pool = DmaPool::new(5000, 4).unwrap();
        assert_eq!(pool.buf_bytes(), 8192);
        let a = pool.alloc().unwrap();
        let b = pool.alloc().unwrap();
        assert_ne!(a.ptr, b.ptr);
        assert_eq!(a.ptr as usize % 4096, 0);
        assert_eq!(pool.available(), 2);
        pool.alloc().unwrap();
        pool.alloc().unwrap();
        assert!(pool.alloc().is_none(), "an empty pool is a normal path");
        pool.free(a);
        assert_eq!(pool.alloc().unwrap().index, a.index);
        assert_eq!(pool.iovecs().len(), 4);
    }
}
