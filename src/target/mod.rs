//! Protocol targets on the reactors.

pub mod nbd;
pub mod nbd_proto;
pub mod nbd_tls;
pub mod nvmf;
pub mod nvmf_proto;
