//! kiln: a polled-mode tiering block-storage engine.
//!
//! See `docs/ARCHITECTURE.md` for the module map and the path of one I/O.
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod bdev;
pub mod bench;
pub mod cli;
pub mod clock;
pub mod dma;
pub mod frame;
pub mod reactor;
pub mod units;
