//! `null:SIZE`: completes every request at once and stores nothing, like
//! SPDK's null bdev. It measures the engine's own per-I/O cost.

use std::collections::VecDeque;

use super::{
    BlockDevice, ChannelOptions, Completion, DeviceError, DeviceInfo, IoChannel, IoRequest,
    SubmitError,
};

pub struct NullDevice {
    info: DeviceInfo,
}

impl NullDevice {
    pub fn new(name: String, size_bytes: u64) -> NullDevice {
        NullDevice {
            info: DeviceInfo {
                name,
                product: "null",
                block_size: 512,
                num_blocks: size_bytes / 512,
                buf_align: 1,
                persistent: false,
                volatile_write_cache: false,
            },
        }
    }
}

impl BlockDevice for NullDevice {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn open_channel(&self, opts: &ChannelOptions<'_>) -> Result<Box<dyn IoChannel>, DeviceError> {
        let capacity = opts.queue_depth.max(1) as usize;
        Ok(Box::new(NullChannel {
            info: self.info.clone(),
            done: VecDeque::with_capacity(capacity),
            capacity,
        }))
    }
}

struct NullChannel {
    info: DeviceInfo,
    done: VecDeque<Completion>,
    capacity: usize,
}

impl IoChannel for NullChannel {
    #[inline]
    unsafe fn submit(&mut self, req: &IoRequest) -> Result<(), SubmitError> {
        self.info.check(req)?;
        if self.done.len() == self.capacity {
            return Err(SubmitError::QueueFull);
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
