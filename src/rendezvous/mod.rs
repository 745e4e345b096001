//! Rendezvous: how k processes agree on the NCCL unique id before they can talk.
//!
//! Rank 0 creates the id (`ncclGetUniqueId`); every other rank must receive the same 128 bytes.
//! Three documented ways, plus NCCL's own:
//!
//! - **Environment** ([`Rendezvous::Env`]): the launcher puts the id, as 256 hex digits, into an
//!   environment variable of every process (the variable's name is the caller's choice).
//! - **Shared file** ([`Rendezvous::File`]): rank 0 writes the id atomically to a path every rank
//!   can see (NFS, a node-local tmpfs); the others wait for it to appear. The path must be new for
//!   each job: a file left by an earlier run would be read as this run's id.
//! - **TCP** ([`Rendezvous::Tcp`]): rank 0 listens on `MASTER_PORT` (every interface, unless
//!   `MASTER_ADDR` is a loopback address; the torchrun convention, see [`LaunchEnv`]) and hands
//!   the id to each rank of the job that asks for it and presents the job's [`RunId`]
//!   ([`serve_id`] gives the protocol: ranks say who they are and confirm receipt).
//! - NCCL itself reads `NCCL_COMM_ID=host:port` (when set, `ncclGetUniqueId` on rank 0 starts a
//!   bootstrap server there and every rank may use any id); the variable is passed through untouched.
//!
//! Every wait of the exchange has a timeout and ends in a typed error, never a hang; so does the
//! creation of the NCCL communicator afterwards, when it is given one
//! (`cuda::nccl::NcclCollective::new`, feature `cuda`).

mod id_file;
mod launch_env;
mod run_id;
mod tcp;

pub use id_file::{read_id_file, write_id_file};
pub use launch_env::LaunchEnv;
pub use run_id::RunId;
pub use tcp::{fetch_id, serve_id, MAGIC};

use crate::error::{PfcError, Result};
use std::net::TcpListener;
use std::path::PathBuf;
use std::time::Duration;
use tcp::listen_addr;

/// Bytes of an NCCL unique id (`NCCL_UNIQUE_ID_BYTES`).
pub const UNIQUE_ID_BYTES: usize = 128;

/// An NCCL unique id, as opaque bytes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct UniqueId(pub [u8; UNIQUE_ID_BYTES]);

impl std::fmt::Debug for UniqueId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "UniqueId({}…)", &self.to_hex()[..16])
    }
}

impl UniqueId {
    /// The id as 256 lowercase hex digits.
    ///
    /// ```
    /// use partial_fc::rendezvous::UniqueId;
    /// let id = UniqueId([7; 128]);
    /// assert_eq!(UniqueId::from_hex(&id.to_hex()).unwrap(), id);
    /// assert!(UniqueId::from_hex("zz").is_err());
    /// ```
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses 256 hex digits (surrounding whitespace ignored).
    ///
    /// # Errors
    ///
    /// [`PfcError::Param`] (`nccl_id`) when the text is not 256 hex digits.
    pub fn from_hex(text: &str) -> Result<UniqueId> {
        let text = text.trim();
        let bad = |why: &str| PfcError::param("nccl_id", abbreviate(text), why.to_string());
        if !text.is_ascii() {
            return Err(bad("holds a character that is not a hex digit"));
        }
        if text.len() != 2 * UNIQUE_ID_BYTES {
            return Err(bad(&format!(
                "must be {} hex digits, found {}",
                2 * UNIQUE_ID_BYTES,
                text.len()
            )));
        }
        let mut id = [0u8; UNIQUE_ID_BYTES];
        for (i, byte) in id.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16)
                .map_err(|_| bad("holds a character that is not a hex digit"))?;
        }
        Ok(UniqueId(id))
    }
}

fn abbreviate(text: &str) -> String {
    if text.len() > 24 {
        format!(
            "{}…",
            &text[..text.char_indices().nth(24).map_or(text.len(), |(i, _)| i)]
        )
    } else {
        text.to_string()
    }
}

/// Where the unique id comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rendezvous {
    /// Every rank reads the id from this environment variable (hex).
    Env(String),
    /// Rank 0 writes the id to this file; the others wait for it. The path must be new for each
    /// job: a file left by an earlier run would be read as this run's id.
    File {
        /// The shared path.
        path: PathBuf,
        /// How long the other ranks wait.
        timeout: Duration,
    },
    /// Rank 0 serves the id on this address to the ranks that present the same run id; the
    /// others connect.
    Tcp {
        /// `host:port` of rank 0.
        addr: String,
        /// How long each side waits.
        timeout: Duration,
        /// The job's token. `None` reads it from the environment when the exchange starts
        /// ([`RunId::from_env`]: `PFC_RUN_ID`, then `TORCHELASTIC_RUN_ID`), so that a job
        /// launched by torchrun with `--rdzv-id` is told apart without code;
        /// `Some(RunId::default())` asks for no token whatever the environment says. Every rank
        /// of a job must end up with the same one.
        run_id: Option<RunId>,
    },
}

impl Rendezvous {
    /// Every rank calls this; rank 0's `create` makes the id (for NCCL, `ncclGetUniqueId`), the
    /// other ranks never call it. Returns the id all ranks share.
    ///
    /// # Errors
    ///
    /// - [`PfcError::Param`]: `rank` outside `[0, world_size)`; for [`Rendezvous::Env`], the
    ///   variable unset or not an id; for [`Rendezvous::Tcp`], a run id that cannot be used
    ///   ([`RunId::check`]: read from a variable whose value is longer than [`RunId::MAX_BYTES`]
    ///   or not UTF-8, by [`LaunchEnv`] or, with `run_id: None`, here), checked for a job of one
    ///   too.
    /// - [`PfcError::Collective`]: a wait ran past its timeout (the message names the missing
    ///   ranks, or rank 0's address), rank 0 cannot listen, or rank 0 refused this rank (another
    ///   job's rank 0 on the port: another run id or world size; another protocol version).
    /// - [`PfcError::Io`]: the id file cannot be written or read.
    /// - Whatever `create` returns.
    pub fn exchange(
        &self,
        rank: usize,
        world_size: usize,
        create: impl FnOnce() -> Result<UniqueId>,
    ) -> Result<UniqueId> {
        if world_size == 0 || rank >= world_size {
            return Err(PfcError::param(
                "rank",
                rank,
                format!("must lie in [0, world size {world_size})"),
            ));
        }
        match self {
            Rendezvous::Env(var) => {
                let text = std::env::var(var).map_err(|_| {
                    PfcError::param(
                        "nccl_id",
                        var.clone(),
                        "environment variable is unset; put rank 0's id there as hex",
                    )
                })?;
                UniqueId::from_hex(&text)
            }
            Rendezvous::File { path, timeout } => {
                if rank == 0 {
                    let id = create()?;
                    write_id_file(path, &id)?;
                    Ok(id)
                } else {
                    read_id_file(path, *timeout)
                }
            }
            Rendezvous::Tcp {
                addr,
                timeout,
                run_id,
            } => {
                // Read and checked before the shortcut below, so that a bad run id shows in a
                // test of one process, not first in a job of many.
                let run_id = match run_id {
                    Some(run_id) => run_id.clone(),
                    None => RunId::from_env()?,
                };
                run_id.check()?;
                if world_size == 1 {
                    // A job of one has nobody to hand the id to: no port is taken.
                    create()
                } else if rank == 0 {
                    let at = listen_addr(addr);
                    let listener = TcpListener::bind(at.as_str()).map_err(|e| {
                        PfcError::Collective(format!(
                            "rendezvous: cannot listen on {at} (for {addr}): {e}"
                        ))
                    })?;
                    let id = create()?;
                    serve_id(&listener, &id, world_size, &run_id, *timeout)?;
                    Ok(id)
                } else {
                    fetch_id(addr, rank, world_size, &run_id, *timeout)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
