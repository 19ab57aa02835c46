//! kiln: a polled-mode tiering block-storage engine.
//!
//! See `docs/ARCHITECTURE.md` for the module map and the path of one I/O.
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod bdev;
pub mod bench;
pub mod cli;
pub mod clock;
pub mod config;
pub mod crashpoint;
pub mod dma;
pub mod ffi;
pub mod frame;
pub mod heat;
pub mod heatmap;
pub mod metrics;
pub mod migrate;
pub mod object_rpc;
pub mod policy;
pub mod predict;
pub mod reactor;
pub mod replay;
pub mod rpc;
pub mod server;
pub mod sim;
pub mod target;
pub mod units;
pub mod volume;
