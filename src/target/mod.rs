//! Protocol targets on the reactors.

pub mod nbd;
pub mod nbd_proto;
pub mod nvmf;
pub mod nvmf_proto;
