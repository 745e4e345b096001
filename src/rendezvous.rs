//! Rendezvous: how k processes agree on the NCCL unique id before they can talk.
//!
//! Rank 0 creates the id (`ncclGetUniqueId`); every other rank must receive the same 128 bytes.
//! Three documented ways, plus NCCL's own:
//!
//! - **Environment** ([`Rendezvous::Env`]): the launcher puts the id, as 256 hex digits, into an
//!   environment variable of every process (default `PFC_NCCL_ID`).
//! - **Shared file** ([`Rendezvous::File`]): rank 0 writes the id atomically to a path every rank
//!   can see (NFS, a node-local tmpfs); the others wait for it to appear.
//! - **TCP** ([`Rendezvous::Tcp`]): rank 0 listens on `MASTER_ADDR:MASTER_PORT` (the torchrun
//!   convention, see [`LaunchEnv`]) and hands the id to every rank that connects.
//! - NCCL itself reads `NCCL_COMM_ID=host:port` (when set, `ncclGetUniqueId` on rank 0 starts a
//!   bootstrap server there and every rank may use any id); the variable is passed through untouched.
//!
//! Every wait has a timeout and ends in a typed error, never a hang.

use crate::error::{PfcError, Result};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

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

/// The process-group variables torchrun-style launchers set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchEnv {
    /// `RANK`: this process's rank in `[0, WORLD_SIZE)`.
    pub rank: usize,
    /// `WORLD_SIZE`: number of processes.
    pub world_size: usize,
    /// `LOCAL_RANK`: index of this process on its node (its GPU); defaults to `RANK`.
    pub local_rank: usize,
    /// `MASTER_ADDR`: host of rank 0 (default 127.0.0.1).
    pub master_addr: String,
    /// `MASTER_PORT`: rank 0's rendezvous port (default 29500).
    pub master_port: u16,
}

impl LaunchEnv {
    /// Reads the variables through `get` (use `|k| std::env::var(k).ok()` for the process).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<LaunchEnv> {
        fn parse<T: std::str::FromStr>(name: &'static str, v: Option<String>) -> Result<Option<T>> {
            v.map(|s| {
                s.trim()
                    .parse()
                    .map_err(|_| PfcError::param(name, s.clone(), "is not a valid number"))
            })
            .transpose()
        }
        let rank: usize = parse("RANK", get("RANK"))?
            .ok_or_else(|| PfcError::param("RANK", "unset", "the launcher must set RANK"))?;
        let world_size: usize = parse("WORLD_SIZE", get("WORLD_SIZE"))?.ok_or_else(|| {
            PfcError::param("WORLD_SIZE", "unset", "the launcher must set WORLD_SIZE")
        })?;
        if world_size == 0 || rank >= world_size {
            return Err(PfcError::param(
                "RANK",
                rank,
                format!("must lie in [0, WORLD_SIZE = {world_size})"),
            ));
        }
        Ok(LaunchEnv {
            rank,
            world_size,
            local_rank: parse("LOCAL_RANK", get("LOCAL_RANK"))?.unwrap_or(rank),
            master_addr: get("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into()),
            master_port: parse("MASTER_PORT", get("MASTER_PORT"))?.unwrap_or(29500),
        })
    }

    /// Reads the process's environment.
    pub fn from_env() -> Result<LaunchEnv> {
        Self::from_vars(|k| std::env::var(k).ok())
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
    /// Rank 0 serves the id on this address; the others connect.
    Tcp {
        /// `host:port` of rank 0.
        addr: String,
        /// How long each side waits.
        timeout: Duration,
    },
}

const MAGIC: &[u8; 8] = b"pfc-id/1";

impl Rendezvous {
    /// Every rank calls this; rank 0's `create` makes the id (for NCCL, `ncclGetUniqueId`), the
    /// other ranks never call it. Returns the id all ranks share.
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
            Rendezvous::Tcp { addr, timeout } => {
                if rank == 0 {
                    let listener = TcpListener::bind(addr.as_str()).map_err(|e| {
                        PfcError::Collective(format!("rendezvous: cannot listen on {addr}: {e}"))
                    })?;
                    let id = create()?;
                    serve_id(&listener, &id, world_size - 1, *timeout)?;
                    Ok(id)
                } else {
                    fetch_id(addr, *timeout)
                }
            }
        }
    }
}

/// Writes the id to `path` atomically (temporary file, then rename).
pub fn write_id_file(path: &Path, id: &UniqueId) -> Result<()> {
    // A temporary file and a rename, removed again if either fails.
    crate::atomic_file::write_bytes_atomic(path, id.to_hex().as_bytes())
}

/// Waits up to `timeout` for `path` to hold an id.
pub fn read_id_file(path: &Path, timeout: Duration) -> Result<UniqueId> {
    let deadline = crate::deadline::deadline_after(timeout);
    loop {
        match std::fs::read_to_string(path) {
            Ok(text) => return UniqueId::from_hex(&text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(PfcError::Collective(format!(
                    "rendezvous: {} did not appear within {timeout:?}; did rank 0 start?",
                    path.display()
                )))
            }
            Err(source) => {
                return Err(PfcError::Io {
                    path: path.to_path_buf(),
                    source,
                })
            }
        }
    }
}

/// Rank 0's side of the TCP exchange: sends the id to `peers` connecting ranks.
pub fn serve_id(
    listener: &TcpListener,
    id: &UniqueId,
    peers: usize,
    timeout: Duration,
) -> Result<()> {
    let deadline = crate::deadline::deadline_after(timeout);
    listener
        .set_nonblocking(true)
        .map_err(|e| PfcError::Collective(format!("rendezvous: {e}")))?;
    let mut served = 0;
    while served < peers {
        match listener.accept() {
            Ok((mut stream, _)) => {
                let _ = stream.set_nonblocking(false);
                let _ = stream.set_write_timeout(Some(Duration::from_secs(10)));
                let mut msg = Vec::with_capacity(MAGIC.len() + UNIQUE_ID_BYTES);
                msg.extend_from_slice(MAGIC);
                msg.extend_from_slice(&id.0);
                if stream.write_all(&msg).is_ok() {
                    served += 1;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Err(PfcError::Collective(format!(
                        "rendezvous: {served} of {peers} ranks connected within {timeout:?}"
                    )));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(PfcError::Collective(format!("rendezvous: accept: {e}"))),
        }
    }
    Ok(())
}

/// Another rank's side of the TCP exchange: connects (retrying until `timeout`) and reads the id.
pub fn fetch_id(addr: &str, timeout: Duration) -> Result<UniqueId> {
    let deadline = crate::deadline::deadline_after(timeout);
    let target: SocketAddr = addr
        .to_socket_addrs()
        .map_err(|e| PfcError::Collective(format!("rendezvous: cannot resolve {addr}: {e}")))?
        .next()
        .ok_or_else(|| PfcError::Collective(format!("rendezvous: {addr} resolves to nothing")))?;
    loop {
        match TcpStream::connect_timeout(&target, Duration::from_millis(500)) {
            Ok(mut stream) => {
                let _ = stream.set_read_timeout(Some(
                    deadline
                        .saturating_duration_since(Instant::now())
                        .max(Duration::from_millis(100)),
                ));
                let mut msg = [0u8; 8 + UNIQUE_ID_BYTES];
                stream.read_exact(&mut msg).map_err(|e| {
                    PfcError::Collective(format!("rendezvous: reading the id from {addr}: {e}"))
                })?;
                if &msg[..8] != MAGIC {
                    return Err(PfcError::Collective(format!(
                        "rendezvous: {addr} is not a partial-fc rendezvous server"
                    )));
                }
                let mut id = [0u8; UNIQUE_ID_BYTES];
                id.copy_from_slice(&msg[8..]);
                return Ok(UniqueId(id));
            }
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => {
                return Err(PfcError::Collective(format!(
                    "rendezvous: rank 0 at {addr} not reachable within {timeout:?}: {e}"
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn some_id(seed: u8) -> UniqueId {
        let mut id = [0u8; UNIQUE_ID_BYTES];
        for (i, b) in id.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(31).wrapping_add(seed);
        }
        UniqueId(id)
    }

    #[test]
    fn hex_round_trip_and_errors() {
        let id = some_id(3);
        assert_eq!(
            UniqueId::from_hex(&format!("  {}\n", id.to_hex())).unwrap(),
            id
        );
        assert!(matches!(
            UniqueId::from_hex("abc"),
            Err(PfcError::Param { .. })
        ));
        let mut bad = id.to_hex();
        bad.replace_range(10..11, "g");
        assert!(matches!(
            UniqueId::from_hex(&bad),
            Err(PfcError::Param { .. })
        ));
    }

    #[test]
    fn launch_env_parses_and_validates() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let env = LaunchEnv::from_vars(vars(&[
            ("RANK", "2"),
            ("WORLD_SIZE", "4"),
            ("MASTER_PORT", "1234"),
        ]))
        .unwrap();
        assert_eq!(
            (env.rank, env.world_size, env.local_rank, env.master_port),
            (2, 4, 2, 1234)
        );
        assert!(LaunchEnv::from_vars(vars(&[("RANK", "4"), ("WORLD_SIZE", "4")])).is_err());
        assert!(LaunchEnv::from_vars(vars(&[("RANK", "x"), ("WORLD_SIZE", "4")])).is_err());
        assert!(LaunchEnv::from_vars(vars(&[("WORLD_SIZE", "4")])).is_err());
    }

    #[test]
    fn file_exchange_between_threads() {
        let dir = tempfile::tempdir().unwrap();
        let rv = Rendezvous::File {
            path: dir.path().join("id"),
            timeout: Duration::from_secs(10),
        };
        let ids: Vec<UniqueId> = std::thread::scope(|s| {
            let joins: Vec<_> = (0..4)
                .map(|rank| {
                    let rv = rv.clone();
                    s.spawn(move || rv.exchange(rank, 4, || Ok(some_id(9))).unwrap())
                })
                .collect();
            joins.into_iter().map(|j| j.join().unwrap()).collect()
        });
        assert!(ids.iter().all(|id| *id == some_id(9)));
    }

    #[test]
    fn tcp_exchange_on_loopback() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let server = std::thread::spawn(move || {
            serve_id(&listener, &some_id(5), 3, Duration::from_secs(10))
        });
        let clients: Vec<_> = (0..3)
            .map(|_| {
                let addr = addr.clone();
                std::thread::spawn(move || fetch_id(&addr, Duration::from_secs(10)).unwrap())
            })
            .collect();
        for c in clients {
            assert_eq!(c.join().unwrap(), some_id(5));
        }
        server.join().unwrap().unwrap();
    }

    #[test]
    fn waiting_ranks_time_out_with_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = read_id_file(&dir.path().join("never"), Duration::from_millis(50)).unwrap_err();
        assert!(matches!(err, PfcError::Collective(_)));
        // Nobody listens on this port (bound and dropped).
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let err = fetch_id(&format!("127.0.0.1:{port}"), Duration::from_millis(200)).unwrap_err();
        assert!(matches!(err, PfcError::Collective(_)));
    }
}
