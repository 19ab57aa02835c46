//! `malloc:SIZE`: a RAM disk. Each channel copies straight between the
//! caller's buffer and one shared anonymous mapping; concurrent writers to the
//! same block race exactly as they would on a real disk.

use std::collections::VecDeque;
use std::sync::Arc;

use memmap2::{MmapMut, MmapOptions};

use super::{
    BlockDevice, ChannelOptions, Completion, DeviceError, DeviceInfo, IoChannel, IoKind, IoRequest,
    SubmitError,
};

struct Region {
    _map: MmapMut,
    base: *mut u8,
}

// SAFETY: the region is a plain byte array; the block-device contract leaves
// ordering of overlapping concurrent I/O to the caller, as real disks do.
unsafe impl Send for Region {}
// SAFETY: as above.
unsafe impl Sync for Region {}

pub struct MallocDevice {
    info: DeviceInfo,
    region: Arc<Region>,
}

impl MallocDevice {
    pub fn new(name: String, size_bytes: u64) -> Result<MallocDevice, DeviceError> {
        let mut map = MmapOptions::new()
            .len(size_bytes as usize)
            .map_anon()
            .map_err(|e| DeviceError::Io(format!("{name}: cannot map {size_bytes} bytes: {e}")))?;
        let base = map.as_mut_ptr();
        Ok(MallocDevice {
            info: DeviceInfo {
                name,
                product: "malloc",
                block_size: 512,
                num_blocks: size_bytes / 512,
                buf_align: 1,
                persistent: true,
                volatile_write_cache: false,
            },
            region: Arc::new(Region { _map: map, base }),
        })
    }
}

impl BlockDevice for MallocDevice {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn open_channel(&self, opts: &ChannelOptions<'_>) -> Result<Box<dyn IoChannel>, DeviceError> {
        let capacity = opts.queue_depth.max(1) as usize;
        Ok(Box::new(MallocChannel {
            info: self.info.clone(),
            region: self.region.clone(),
            done: VecDeque::with_capacity(capacity),
            capacity,
        }))
    }
}

struct MallocChannel {
    info: DeviceInfo,
    region: Arc<Region>,
    done: VecDeque<Completion>,
    capacity: usize,
}

impl IoChannel for MallocChannel {
    #[inline]
    unsafe fn submit(&mut self, req: &IoRequest) -> Result<(), SubmitError> {
        self.info.check(req)?;
        if self.done.len() == self.capacity {
            return Err(SubmitError::QueueFull);
        }
        let len = req.len_bytes as usize;
        // SAFETY: `check` proved offset + len is inside the region.
        let media = unsafe { self.region.base.add(req.offset_bytes as usize) };
        match req.kind {
            // SAFETY: the caller guarantees `buf` holds `len` bytes (IoChannel::submit contract);
            // the media range is in bounds; the two never overlap.
            IoKind::Read => unsafe { std::ptr::copy_nonoverlapping(media, req.buf, len) },
            // SAFETY: as above.
            IoKind::Write => unsafe { std::ptr::copy_nonoverlapping(req.buf, media, len) },
            // SAFETY: the media range is in bounds.
            IoKind::WriteZeroes | IoKind::Trim => unsafe { std::ptr::write_bytes(media, 0, len) },
            IoKind::Flush => {}
        }
        self.done.push_back(Completion {
            tag: req.tag,
            result: 0,
        });
        Ok(())
    }

    #[inline]
    fn poll_completions(&mut self, out: &mut [Completion]) -> usize {
        let n = out.len().min(self.done.len());
        for (slot, c) in out.iter_mut().zip(self.done.drain(..n)) {
            *slot = c;
        }
        n
    }

    fn inflight(&self) -> usize {
        self.done.len()
    }
}
