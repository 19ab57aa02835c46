//! Spin-then-park support: an epoll set, an eventfd for messages, and a
//! timerfd for poller deadlines.
//!
//! Lost-wake-up protocol: the reactor sets `sleeping` (SeqCst), re-checks its
//! message queue, and only then waits. A sender pushes its message first and
//! then, if `sleeping` is set, writes the eventfd. Either the reactor sees
//! the message in its re-check, or the sender sees `sleeping` and wakes it.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The sending side: wakes a parked reactor.
pub struct Waker {
    eventfd: RawFd,
    sleeping: AtomicBool,
}

impl Waker {
    #[inline]
    pub fn wake(&self) {
        if self.sleeping.load(Ordering::SeqCst) {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a valid u64 to our own eventfd.
            unsafe { libc::write(self.eventfd, &one as *const u64 as *const libc::c_void, 8) };
        }
    }
}

impl Drop for Waker {
    fn drop(&mut self) {
        // SAFETY: we own the eventfd and nothing uses it after the last Waker is dropped.
        unsafe { libc::close(self.eventfd) };
    }
}

/// The reactor's side: the epoll set it parks on.
pub struct Parker {
    epoll: RawFd,
    timerfd: RawFd,
    waker: Arc<Waker>,
    /// Pollers' fds that fired during the last park, for pollers that only
    /// read a socket when it is readable (see [`Parker::take_fired`]).
    fired: std::cell::RefCell<Vec<RawFd>>,
}

fn check(rc: i32, what: &str) -> std::io::Result<i32> {
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        return Err(std::io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(rc)
}

impl Parker {
    pub fn new() -> std::io::Result<Parker> {
        // SAFETY: plain syscalls with constant flags; results are checked.
        let epoll = check(
            unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) },
            "epoll_create1",
        )?;
        // SAFETY: as above.
        let eventfd = check(
            unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) },
            "eventfd",
        )?;
        // SAFETY: as above.
        let timerfd = check(
            unsafe {
                libc::timerfd_create(
                    libc::CLOCK_MONOTONIC,
                    libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
                )
            },
            "timerfd_create",
        )?;
        let parker = Parker {
            epoll,
            timerfd,
            waker: Arc::new(Waker {
                eventfd,
                sleeping: AtomicBool::new(false),
            }),
            fired: std::cell::RefCell::new(Vec::with_capacity(64)),
        };
        parker.watch(eventfd)?;
        parker.watch(timerfd)?;
        Ok(parker)
    }

    pub fn waker(&self) -> Arc<Waker> {
        self.waker.clone()
    }

    /// Adds an fd (edge-triggered readability) to the set that wakes the reactor.
    pub fn watch(&self, fd: RawFd) -> std::io::Result<()> {
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLET) as u32,
            u64: fd as u64,
        };
        // SAFETY: `ev` is a valid epoll_event; the kernel copies it.
        let rc = unsafe { libc::epoll_ctl(self.epoll, libc::EPOLL_CTL_ADD, fd, &mut ev) };
        if rc < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EEXIST) {
            return check(rc, "epoll_ctl ADD").map(drop);
        }
        Ok(())
    }

    /// Also wakes on writability (a socket whose send buffer was full).
    pub fn watch_rw(&self, fd: RawFd) -> std::io::Result<()> {
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLET) as u32,
            u64: fd as u64,
        };
        // SAFETY: `ev` is a valid epoll_event; the kernel copies it.
        let rc = unsafe { libc::epoll_ctl(self.epoll, libc::EPOLL_CTL_ADD, fd, &mut ev) };
        check(rc, "epoll_ctl ADD").map(drop)
    }

    /// Copies the fds that fired during the last park into `out` (cleared first).
    /// Several pollers may look; the reactor clears the set after one round of polls.
    pub fn take_fired(&self, out: &mut Vec<RawFd>) {
        out.clear();
        out.extend_from_slice(&self.fired.borrow());
    }

    /// Forgets the fds that fired (after every poller has seen them).
    pub fn clear_fired(&self) {
        self.fired.borrow_mut().clear();
    }

    /// Removes an fd (call before closing it).
    pub fn unwatch(&self, fd: RawFd) {
        // SAFETY: a null event is allowed for EPOLL_CTL_DEL since Linux 2.6.9.
        unsafe { libc::epoll_ctl(self.epoll, libc::EPOLL_CTL_DEL, fd, std::ptr::null_mut()) };
    }

    /// Sleeps until an fd fires, a message arrives or `deadline_ns` passes.
    /// `pending` re-checks the message queue after `sleeping` is published.
    pub fn park(&self, deadline_ns: Option<u64>, pending: impl Fn() -> bool) {
        self.waker.sleeping.store(true, Ordering::SeqCst);
        if pending() {
            self.waker.sleeping.store(false, Ordering::SeqCst);
            return;
        }
        if let Some(d) = deadline_ns {
            let spec = libc::itimerspec {
                it_interval: libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                },
                it_value: libc::timespec {
                    tv_sec: (d / 1_000_000_000) as i64,
                    tv_nsec: (d % 1_000_000_000) as i64,
                },
            };
            // SAFETY: valid itimerspec; absolute CLOCK_MONOTONIC time, the clock of now_ns().
            unsafe {
                libc::timerfd_settime(
                    self.timerfd,
                    libc::TFD_TIMER_ABSTIME,
                    &spec,
                    std::ptr::null_mut(),
                )
            };
        }
        let mut events: [libc::epoll_event; 32] = [libc::epoll_event { events: 0, u64: 0 }; 32];
        // SAFETY: `events` has room for 32 entries, as we tell the kernel.
        let n = unsafe {
            libc::epoll_wait(
                self.epoll,
                events.as_mut_ptr(),
                32,
                if deadline_ns.is_some() { 1000 } else { 200 },
            )
        };
        self.waker.sleeping.store(false, Ordering::SeqCst);
        let mut buf = 0u64;
        let mut fired = self.fired.borrow_mut();
        for ev in events.iter().take(n.max(0) as usize) {
            let fd = ev.u64 as RawFd;
            if fd != self.waker.eventfd && fd != self.timerfd && fired.len() < fired.capacity() {
                fired.push(fd);
            }
            if fd == self.waker.eventfd || fd == self.timerfd {
                // SAFETY: reads 8 bytes into a valid u64 from our own non-blocking fd.
                unsafe { libc::read(fd, &mut buf as *mut u64 as *mut libc::c_void, 8) };
            }
        }
    }
}

impl Drop for Parker {
    fn drop(&mut self) {
        // SAFETY: we own both fds; the eventfd is closed by the last Waker.
        unsafe {
            libc::close(self.epoll);
            libc::close(self.timerfd);
        }
    }
}
