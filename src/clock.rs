//! Time sources. `now_ns` is the monotonic clock every component uses, so a
//! simulator can reason about it; `Tsc` is a calibrated cycle counter for the
//! load generator's per-I/O timestamps, where a vDSO call per I/O is too much.

use std::time::Instant;

/// Monotonic nanoseconds since an arbitrary fixed point (CLOCK_MONOTONIC).
#[inline]
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Reads the time-stamp counter (or falls back to `now_ns` off x86_64).
#[inline(always)]
pub fn ticks() -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: RDTSC has no memory effects and exists on every x86_64 CPU.
        unsafe { core::arch::x86_64::_rdtsc() }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        now_ns()
    }
}

/// Conversion from [`ticks`] to nanoseconds, measured against the OS clock.
#[derive(Clone, Copy, Debug)]
pub struct TickRate {
    pub ticks_per_ns: f64,
}

impl TickRate {
    /// Calibrates over about 20 ms.
    pub fn calibrate() -> TickRate {
        let t0 = Instant::now();
        let c0 = ticks();
        while t0.elapsed().as_millis() < 20 {
            std::hint::spin_loop();
        }
        let c1 = ticks();
        let ns = t0.elapsed().as_nanos() as f64;
        let ticks_per_ns = ((c1 - c0) as f64 / ns).max(1e-9);
        TickRate { ticks_per_ns }
    }

    #[inline]
    pub fn to_ns(self, ticks: u64) -> u64 {
        (ticks as f64 / self.ticks_per_ns) as u64
    }

    #[inline]
    pub fn from_ns(self, ns: u64) -> u64 {
        (ns as f64 * self.ticks_per_ns) as u64
    }
}
