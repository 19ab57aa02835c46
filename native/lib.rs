//! `libkiln_fio.so`: kiln's C ABI ([`kiln::ffi`]) plus, when `build.rs` found fio's
//! headers, the fio external ioengine in `kiln_fio.c`. fio loads it with
//! `--ioengine=external:PATH/libkiln_fio.so` and looks up `get_ioengine`.
#![deny(clippy::undocumented_unsafe_blocks)]

// Link kiln's `#[no_mangle]` C ABI into this library for kiln_fio.c.
pub use kiln::ffi;

#[cfg(kiln_fio_engine)]
mod engine {
    use std::ffi::c_void;

    extern "C" {
        /// The engine's `struct ioengine_ops` (kiln_fio.c).
        fn kiln_fio_ioengine() -> *mut c_void;
    }

    /// fio's entry point for external engines (`get_ioengine_t` in fio's ioengines.h).
    /// A Rust cdylib exports only Rust symbols, so the C engine's own `ioengine` symbol
    /// would stay hidden; this one hands fio the same table.
    ///
    /// # Safety
    /// `ops` points to a writable `struct ioengine_ops *` (fio passes its own local).
    #[no_mangle]
    pub unsafe extern "C" fn get_ioengine(ops: *mut *mut c_void) {
        // SAFETY: kiln_fio_ioengine returns a pointer to a static table; the caller
        // passes a writable pointer slot.
        unsafe { *ops = kiln_fio_ioengine() };
    }
}
