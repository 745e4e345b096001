//! The TCP rendezvous, protocol version 3: rank 0 serves the id ([`serve_id`], which gives the
//! protocol), the other ranks fetch it ([`fetch_id`]); `wire` holds the byte format and the
//! reads and writes bound by a connection's deadline.

mod fetch;
mod serve;
mod wire;

pub use fetch::fetch_id;
pub(super) use serve::listen_addr;
pub use serve::serve_id;
pub use wire::MAGIC;

#[cfg(test)]
pub(super) use fetch::{fetch_id_with, Resolver};
#[cfg(test)]
pub(super) use serve::{same_run_id, serve_id_with};
#[cfg(test)]
pub(super) use wire::{reply, HELLO_HEAD, REPLY_BYTES, STATUS_OTHER_VERSION, STATUS_SERVED};
