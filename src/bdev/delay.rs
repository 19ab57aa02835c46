//! `delay:READ_US,WRITE_US,MIB_S:INNER`: wraps any device, adds a fixed
//! latency per request and caps bandwidth, to emulate an HDD or object tier.
//!
//! Model: a request's transfer occupies the (emulated) link for
//! `len / bandwidth` after the previous transfer ends; it completes
//! `latency` after that. Completion times are therefore monotonic in
//! submission order and a FIFO of slots suffices. The cap is per channel
//! (per reactor). Slots are preallocated: no allocation per I/O.

use std::collections::VecDeque;
use std::sync::Arc;

use super::{
    BlockDevice, ChannelOptions, Completion, DeviceError, DeviceInfo, IoChannel, IoKind, IoRequest,
    SubmitError,
};
use crate::clock::now_ns;

pub struct DelayDevice {
    info: DeviceInfo,
    inner: Arc<dyn BlockDevice>,
    read_ns: u64,
    write_ns: u64,
    /// Nanoseconds per byte at the cap, scaled by 2^20 (0 = uncapped).
    ns_per_byte_q20: u64,
}

impl DelayDevice {
    pub fn new(
        name: String,
        inner: Arc<dyn BlockDevice>,
        read_us: u64,
        write_us: u64,
        mib_s: u64,
    ) -> DelayDevice {
        let mut info = inner.info().clone();
        info.name = name;
        info.product = "delay";
        // 1 MiB/s = 2^20 bytes per 1e9 ns, so ns per byte * 2^20 = 1e9 / mib_s.
        let ns_per_byte_q20 = 1_000_000_000u64.checked_div(mib_s).unwrap_or(0);
        DelayDevice {
            info,
            inner,
            read_ns: read_us * 1000,
            write_ns: write_us * 1000,
            ns_per_byte_q20,
        }
    }
}

impl BlockDevice for DelayDevice {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn open_channel(&self, opts: &ChannelOptions<'_>) -> Result<Box<dyn IoChannel>, DeviceError> {
        let capacity = opts.queue_depth.max(1) as usize;
        Ok(Box::new(DelayChannel {
            inner: self.inner.open_channel(opts)?,
            read_ns: self.read_ns,
            write_ns: self.write_ns,
            ns_per_byte_q20: self.ns_per_byte_q20,
            link_free_ns: 0,
            slots: vec![Slot::default(); capacity],
            free: (0..capacity as u32).rev().collect(),
            order: VecDeque::with_capacity(capacity),
            scratch: vec![Completion::default(); capacity],
        }))
    }
}

#[derive(Clone, Copy, Default)]
struct Slot {
    tag: u64,
    due_ns: u64,
    done: bool,
    result: i32,
}

struct DelayChannel {
    inner: Box<dyn IoChannel>,
    read_ns: u64,
    write_ns: u64,
    ns_per_byte_q20: u64,
    link_free_ns: u64,
    slots: Vec<Slot>,
    free: Vec<u32>,
    order: VecDeque<u32>,
    scratch: Vec<Completion>,
}

impl IoChannel for DelayChannel {
    unsafe fn submit(&mut self, req: &IoRequest) -> Result<(), SubmitError> {
        let Some(&slot) = self.free.last() else {
            return Err(SubmitError::QueueFull);
        };
        let mut inner_req = *req;
        inner_req.tag = slot as u64;
        // SAFETY: forwarded unchanged but for the tag; the caller's obligations carry over.
        unsafe { self.inner.submit(&inner_req)? };
        self.free.pop();
        let now = now_ns();
        // Only payload crosses the link: a trim or a flush carries none.
        let payload = match req.kind {
            IoKind::Read | IoKind::Write | IoKind::WriteZeroes => req.len_bytes as u64,
            IoKind::Trim | IoKind::Flush => 0,
        };
        let transfer_ns = (payload * self.ns_per_byte_q20) >> 20;
        let start = self.link_free_ns.max(now);
        self.link_free_ns = start + transfer_ns;
        let latency = match req.kind {
            IoKind::Read => self.read_ns,
            IoKind::Flush => 0,
            _ => self.write_ns,
        };
        self.slots[slot as usize] = Slot {
            tag: req.tag,
            due_ns: self.link_free_ns + latency,
            done: false,
            result: 0,
        };
        self.order.push_back(slot);
        Ok(())
    }

    fn submit_pending(&mut self) -> usize {
        self.inner.submit_pending()
    }

    fn poll_completions(&mut self, out: &mut [Completion]) -> usize {
        loop {
            let n = self.inner.poll_completions(&mut self.scratch);
            for c in &self.scratch[..n] {
                let slot = &mut self.slots[c.tag as usize];
                slot.done = true;
                slot.result = c.result;
            }
            if n < self.scratch.len() {
                break;
            }
        }
        let now = now_ns();
        let mut n = 0;
        while n < out.len() {
            let Some(&head) = self.order.front() else {
                break;
            };
            let slot = self.slots[head as usize];
            if !slot.done || slot.due_ns > now {
                break;
            }
            self.order.pop_front();
            self.free.push(head);
            out[n] = Completion {
                tag: slot.tag,
                result: slot.result,
            };
            n += 1;
        }
        n
    }

    fn inflight(&self) -> usize {
        self.order.len()
    }

    fn notifier_fd(&self) -> Option<std::os::fd::RawFd> {
        self.inner.notifier_fd()
    }

    fn next_deadline_ns(&self) -> Option<u64> {
        let head = *self.order.front()?;
        let slot = &self.slots[head as usize];
        // Until the inner device completes, its notifier wakes us; after, the timer does.
        let inner = self.inner.next_deadline_ns();
        if slot.done {
            Some(inner.map_or(slot.due_ns, |d| d.min(slot.due_ns)))
        } else {
            inner
        }
    }
}
