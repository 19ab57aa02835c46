//! Protocol targets on the reactors.

pub mod nbd;
pub mod nbd_proto;
