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

use crate::error::{PfcError, Result};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
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

/// The process-group variables torchrun-style launchers set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchEnv {
    /// `RANK`: this process's rank in `[0, WORLD_SIZE)`.
    pub rank: usize,
    /// `WORLD_SIZE`: number of processes.
    pub world_size: usize,
    /// `LOCAL_RANK`: index of this process on its node (its GPU). When unset:
    /// `RANK % LOCAL_WORLD_SIZE` if `LOCAL_WORLD_SIZE` is set, else `RANK` (right for one node
    /// only: a multi-node launcher must set one of them).
    pub local_rank: usize,
    /// `MASTER_ADDR`: host of rank 0 (default 127.0.0.1).
    pub master_addr: String,
    /// `MASTER_PORT`: rank 0's rendezvous port, 1 to 65535 (default 29500).
    pub master_port: u16,
    /// The job's token for the TCP rendezvous: `PFC_RUN_ID`, else `TORCHELASTIC_RUN_ID` (what
    /// torchrun sets from `--rdzv-id`), else none ([`RunId::from_vars`]). Not checked yet: a
    /// value that cannot be a run id is an error where the TCP rendezvous takes it
    /// ([`RunId::check`]), so that it cannot stop a job that does not use it.
    pub run_id: RunId,
}

impl LaunchEnv {
    /// Reads the variables through `get` (use [`LaunchEnv::from_env`] for the process).
    ///
    /// The run id is read but not checked here: only the TCP rendezvous uses it, so a value
    /// that cannot be one (longer than [`RunId::MAX_BYTES`], not UTF-8) must not stop a job
    /// that agrees on its id through a file or a variable. It is an error where the TCP
    /// rendezvous takes it ([`RunId::check`]).
    ///
    /// # Errors
    ///
    /// [`PfcError::Param`] naming the variable at fault: `WORLD_SIZE` or `RANK` unset or not a
    /// whole number, a rank outside the world, `LOCAL_RANK` outside `LOCAL_WORLD_SIZE`, an
    /// empty `MASTER_ADDR`, or a `MASTER_PORT` that is not in 1..=65535.
    ///
    /// ```
    /// use partial_fc::rendezvous::LaunchEnv;
    /// let vars = [("RANK", "9"), ("WORLD_SIZE", "16"), ("LOCAL_WORLD_SIZE", "8")];
    /// let get = |k: &str| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string());
    /// let env = LaunchEnv::from_vars(get).unwrap();
    /// assert_eq!((env.rank, env.local_rank, env.master_port), (9, 1, 29500));
    /// ```
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<LaunchEnv> {
        Self::read(|name| get(name).map_or(Var::Unset, Var::Text))
    }

    /// Reads the process's environment. A value that is not UTF-8 is an error naming its
    /// variable, not an unset variable and not a lossy copy (which could make two different
    /// values equal); for a run-id variable, that error comes where the TCP rendezvous takes
    /// the run id, as for a run id that is too long ([`LaunchEnv::from_vars`]).
    ///
    /// # Errors
    ///
    /// As [`LaunchEnv::from_vars`], and [`PfcError::Param`] naming a variable other than the
    /// run id's whose value is not UTF-8.
    pub fn from_env() -> Result<LaunchEnv> {
        Self::read(env_var)
    }

    fn read(get: impl Fn(&str) -> Var) -> Result<LaunchEnv> {
        let text = |name: &'static str| -> Result<Option<String>> {
            match get(name) {
                Var::Unset => Ok(None),
                Var::Text(text) => Ok(Some(text)),
                Var::NotUtf8(bytes) => Err(not_utf8(name, &bytes)),
            }
        };
        fn parse(name: &'static str, v: Option<String>) -> Result<Option<usize>> {
            v.map(|s| {
                s.trim()
                    .parse()
                    .map_err(|_| PfcError::param(name, s.clone(), "is not a whole number"))
            })
            .transpose()
        }
        let world_size = parse("WORLD_SIZE", text("WORLD_SIZE")?)?.ok_or_else(|| {
            PfcError::param("WORLD_SIZE", "unset", "the launcher must set WORLD_SIZE")
        })?;
        if world_size == 0 {
            return Err(PfcError::param("WORLD_SIZE", 0, "must be at least 1"));
        }
        let rank = parse("RANK", text("RANK")?)?
            .ok_or_else(|| PfcError::param("RANK", "unset", "the launcher must set RANK"))?;
        if rank >= world_size {
            return Err(PfcError::param(
                "RANK",
                rank,
                format!("must lie in [0, WORLD_SIZE = {world_size})"),
            ));
        }
        let local_world = parse("LOCAL_WORLD_SIZE", text("LOCAL_WORLD_SIZE")?)?;
        if local_world == Some(0) {
            return Err(PfcError::param("LOCAL_WORLD_SIZE", 0, "must be at least 1"));
        }
        let local_rank = match (parse("LOCAL_RANK", text("LOCAL_RANK")?)?, local_world) {
            (Some(l), Some(n)) if l >= n => {
                return Err(PfcError::param(
                    "LOCAL_RANK",
                    l,
                    format!("must lie in [0, LOCAL_WORLD_SIZE = {n})"),
                ))
            }
            (Some(l), _) => l,
            (None, Some(n)) => rank % n,
            (None, None) => rank,
        };
        let master_addr = text("MASTER_ADDR")?.unwrap_or_else(|| "127.0.0.1".into());
        if master_addr.trim().is_empty() {
            return Err(PfcError::param(
                "MASTER_ADDR",
                "\"\"",
                "is empty (unset it for 127.0.0.1, or name rank 0's host)",
            ));
        }
        let master_port = match text("MASTER_PORT")? {
            None => 29500,
            Some(text) => match text.trim().parse::<u16>() {
                Ok(port) if port > 0 => port,
                _ => {
                    return Err(PfcError::param(
                        "MASTER_PORT",
                        text,
                        "must be a port number in 1..=65535",
                    ))
                }
            },
        };
        let run_id = RunId::read(&get);
        Ok(LaunchEnv {
            rank,
            world_size,
            local_rank,
            master_addr: master_addr.trim().to_string(),
            master_port,
            run_id,
        })
    }
}

/// One variable as read: unset, its text, or a value that is not UTF-8 (its bytes).
enum Var {
    Unset,
    Text(String),
    NotUtf8(Vec<u8>),
}

/// One variable of the process's environment. A value that is not UTF-8 keeps its bytes, so
/// that the reader can name the variable instead of taking it for unset or comparing a lossy
/// copy (`job-\xff` and `job-\xfe` would both read `job-\u{fffd}`).
fn env_var(name: &str) -> Var {
    match std::env::var_os(name) {
        None => Var::Unset,
        Some(value) => match value.into_string() {
            Ok(text) => Var::Text(text),
            Err(raw) => Var::NotUtf8(raw.as_encoded_bytes().to_vec()),
        },
    }
}

/// The error for variable `name` whose value, `bytes`, is not UTF-8; the value is printed with
/// its bytes escaped (`job-\xff`), and only a prefix of a long one, as run ids are.
fn not_utf8(name: &'static str, bytes: &[u8]) -> PfcError {
    PfcError::param(name, shown_bytes(bytes), "is not valid UTF-8")
}

/// `bytes` as messages print a value that may be a run id: in full (escaped) when at most 8
/// bytes long, else its first 4 bytes and its length.
fn shown_bytes(bytes: &[u8]) -> String {
    if bytes.len() <= 8 {
        format!("\"{}\"", bytes.escape_ascii())
    } else {
        format!("\"{}…\" ({} bytes)", bytes[..4].escape_ascii(), bytes.len())
    }
}

/// A job's token for the TCP rendezvous.
///
/// Rank 0 hands the NCCL id only to ranks that present the same run id. Without one, two jobs
/// that happen to use the same `MASTER_ADDR:MASTER_PORT` and the same world size (two users'
/// torchrun defaults on one node, a job restarted while its predecessor still runs) could take
/// each other's id: their ranks would then join the wrong communicator and hang or mix
/// gradients. With one, such a rank is refused at once with an error that says so.
///
/// The empty run id ([`RunId::default`]) means "no token": every rank without one matches
/// every other, which is the weaker mode of protocol version 2 (ranks are told apart by world
/// size and rank only). The token is compared as bytes, case and whitespace included. It is
/// not a secret in the cryptographic sense (it travels in clear text), but it is treated as one
/// in messages: only a short prefix of a long run id is ever printed.
///
/// A run id read by [`LaunchEnv`] from a variable whose value cannot be one (too long, not
/// UTF-8) is kept, with the reason, until the TCP rendezvous takes it: [`RunId::check`] is the
/// error then, naming the variable.
///
/// ```
/// use partial_fc::rendezvous::RunId;
/// let vars = [("TORCHELASTIC_RUN_ID", "job-17")];
/// let get = |k: &str| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string());
/// assert_eq!(RunId::from_vars(get).unwrap().as_str(), "job-17");
/// assert!(RunId::new("x".repeat(RunId::MAX_BYTES + 1)).is_err());
/// ```
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct RunId {
    /// The token (empty for none); for an unusable one, the value as read (lossy if not UTF-8).
    text: String,
    /// Why the value read cannot be a run id, when it cannot.
    unusable: Option<Unusable>,
}

/// A variable's value that cannot be a run id: what [`RunId::check`] reports.
#[derive(Clone, PartialEq, Eq, Hash)]
struct Unusable {
    /// The variable read.
    variable: &'static str,
    /// Its value as messages print it (a prefix of a long one only).
    shown: String,
    /// Why it cannot be a run id.
    why: String,
}

impl RunId {
    /// The longest run id, in bytes: the token travels in every request, and rank 0 reads no
    /// more than this from a peer it does not know yet.
    pub const MAX_BYTES: usize = 256;

    /// A run id given by the caller (a job name, a scheduler's job id, a UUID). Empty means
    /// "no token" (see the type's documentation).
    ///
    /// # Errors
    ///
    /// [`PfcError::Param`] (`run_id`) when it is longer than [`RunId::MAX_BYTES`] bytes.
    pub fn new(text: impl Into<String>) -> Result<RunId> {
        let id = Self::from_text("run_id", text.into());
        id.check()?;
        Ok(id)
    }

    /// A run id of `text`, read from `name`: unusable (see [`RunId::check`]) when too long.
    fn from_text(name: &'static str, text: String) -> RunId {
        let unusable = (text.len() > Self::MAX_BYTES).then(|| Unusable {
            variable: name,
            shown: shown_text(&text),
            why: format!(
                "is {} bytes long; a run id has at most {}",
                text.len(),
                Self::MAX_BYTES
            ),
        });
        RunId { text, unusable }
    }

    /// Reads the run id through `get`: `PFC_RUN_ID` if set and not empty, else
    /// `TORCHELASTIC_RUN_ID` (torchrun sets it to `--rdzv-id`, whose default is `none`, the
    /// same for every job), else none. `PFC_RUN_ID` comes first so that a launcher can give a
    /// job its own token without changing torchrun's.
    ///
    /// # Errors
    ///
    /// [`PfcError::Param`] naming the variable whose value is longer than
    /// [`RunId::MAX_BYTES`] bytes.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<RunId> {
        let id = Self::read(|name| get(name).map_or(Var::Unset, Var::Text));
        id.check()?;
        Ok(id)
    }

    /// Reads the run id from the process's environment, as [`RunId::from_vars`].
    ///
    /// # Errors
    ///
    /// As [`RunId::from_vars`], and [`PfcError::Param`] naming the variable whose value is not
    /// UTF-8 (a lossy copy could make two jobs' different run ids equal).
    pub fn from_env() -> Result<RunId> {
        let id = Self::read(env_var);
        id.check()?;
        Ok(id)
    }

    /// [`RunId::from_vars`] without the check: a value that cannot be a run id is kept, with
    /// the reason, for [`RunId::check`].
    fn read(get: impl Fn(&str) -> Var) -> RunId {
        for name in ["PFC_RUN_ID", "TORCHELASTIC_RUN_ID"] {
            match get(name) {
                Var::Text(text) if !text.is_empty() => return Self::from_text(name, text),
                // Never empty: the empty value is valid UTF-8.
                Var::NotUtf8(bytes) => {
                    return RunId {
                        text: String::from_utf8_lossy(&bytes).into_owned(),
                        unusable: Some(Unusable {
                            variable: name,
                            shown: shown_bytes(&bytes),
                            why: "is not valid UTF-8".into(),
                        }),
                    }
                }
                _ => {}
            }
        }
        RunId::default()
    }

    /// Whether this run id can be used: always for one made by [`RunId::new`],
    /// [`RunId::from_vars`] or [`RunId::from_env`]; [`LaunchEnv`] keeps one that cannot
    /// (see its `run_id`), and the TCP rendezvous ([`Rendezvous::exchange`], [`serve_id`],
    /// [`fetch_id`]) calls this before it sends or compares anything.
    ///
    /// # Errors
    ///
    /// [`PfcError::Param`] naming the variable that was read, when its value is longer than
    /// [`RunId::MAX_BYTES`] bytes or not UTF-8.
    ///
    /// ```
    /// use partial_fc::rendezvous::{LaunchEnv, RunId};
    /// let long = "x".repeat(RunId::MAX_BYTES + 1);
    /// let vars = [("RANK", "0"), ("WORLD_SIZE", "2"), ("TORCHELASTIC_RUN_ID", long.as_str())];
    /// let get = |k: &str| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string());
    /// let env = LaunchEnv::from_vars(get).unwrap(); // fine for a file rendezvous
    /// assert!(env.run_id.check().is_err()); // not for the TCP one
    /// ```
    pub fn check(&self) -> Result<()> {
        match &self.unusable {
            None => Ok(()),
            Some(u) => Err(PfcError::param(u.variable, u.shown.clone(), u.why.clone())),
        }
    }

    /// The run id's text (empty for none; for one that [`RunId::check`] refuses, the value as
    /// read, lossy if it was not UTF-8).
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether this is "no token".
    pub fn is_empty(&self) -> bool {
        self.text.is_empty()
    }

    /// The run id as messages print it (see [`shown_text`]).
    fn shown(&self) -> String {
        match &self.unusable {
            Some(u) => u.shown.clone(),
            None if self.text.is_empty() => "none".into(),
            None => shown_text(&self.text),
        }
    }
}

/// A run id's text as messages print it: in full when it is at most 8 bytes, else its first 4
/// characters and its length, so that an error message or a log never holds a long token.
fn shown_text(text: &str) -> String {
    if text.len() <= 8 {
        format!("\"{}\"", text.escape_debug())
    } else {
        let end = text.char_indices().nth(4).map_or(text.len(), |(i, _)| i);
        format!("\"{}…\" ({} bytes)", text[..end].escape_debug(), text.len())
    }
}

impl std::fmt::Debug for RunId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.unusable {
            None => write!(f, "RunId({})", self.shown()),
            // so that a printed LaunchEnv shows why its TCP rendezvous will fail
            Some(u) => write!(f, "RunId({}: {} {})", u.variable, u.shown, u.why),
        }
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

/// The first bytes of every message of the TCP rendezvous, with its protocol version (3: the
/// request carries the job's [`RunId`]).
pub const MAGIC: &[u8; 8] = b"pfc-id/3";

/// What every version's [`MAGIC`] starts with: a request that starts so but is of another
/// version gets an answer in this version, which its client reports as another version instead
/// of retrying until its timeout.
const MAGIC_STEM: &[u8] = b"pfc-id/";

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

/// Writes the id to `path` atomically (temporary file, then rename), readable by its owner only
/// on Unix (anyone holding the id could join the job's communicator).
///
/// # Errors
///
/// [`PfcError::Io`] when the file cannot be created, written or renamed.
pub fn write_id_file(path: &Path, id: &UniqueId) -> Result<()> {
    // A temporary file and a rename, removed again if either fails.
    crate::atomic_file::write_private_atomic(path, id.to_hex().as_bytes())
}

/// Waits up to `timeout` for `path` to hold an id. A file that is there but does not hold one
/// yet (a launcher that writes it in place, not atomically) is read again until the timeout,
/// and then its parse error is returned.
///
/// # Errors
///
/// [`PfcError::Collective`] when no file appears within `timeout`; [`PfcError::Param`] when
/// the file still does not hold an id then; [`PfcError::Io`] when it cannot be read.
pub fn read_id_file(path: &Path, timeout: Duration) -> Result<UniqueId> {
    let deadline = crate::deadline::deadline_after(timeout);
    loop {
        match std::fs::read_to_string(path) {
            Ok(text) => match UniqueId::from_hex(&text) {
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                parsed => return parsed,
            },
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

/// Rank 0's side of the TCP exchange: hands the id to every other rank of a `world_size` job
/// whose run id is `run_id`.
///
/// The protocol (version 3): a rank connects and sends [`MAGIC`], the world size and its rank
/// (u32, little-endian), and its run id (a u16 length, little-endian, at most
/// [`RunId::MAX_BYTES`], then the bytes); rank 0 answers with [`MAGIC`], a status byte, its own
/// world size and the id, and counts the rank only once it has confirmed receipt with one byte.
/// So a connection that says nothing valid (a port probe, a health check, a client of something
/// else) is not counted; a rank of another job (another run id, checked first and compared
/// without an early exit; or another world size), or a rank outside `[1, world_size)`, is
/// refused with an answer that tells it why (never rank 0's run id); a client of another
/// version of this protocol is answered in this version, so that it reports the mismatch at
/// once; and a rank that connects twice is counted once. Connections are served
/// concurrently (at most 64 at a time; more are closed at once), each on a thread of its own:
/// a request must arrive, and its answer go out, within 1 s of connecting, and a rank that got
/// the id has 5 s more to confirm, whatever the overall deadline. These are deadlines of the
/// connection, not timeouts of each read: a peer that sends its request a byte at a time is
/// cut off at 1 s all the same. At the deadline no connection is taken any more, the ones in
/// progress finish (so a rank served just before it is counted), and a rank still missing is
/// an error naming it. A failed `accept` (too many open files, a connection aborted before it
/// was taken) is tried again until the deadline, and the timeout's message gives its error.
///
/// # Errors
///
/// - [`PfcError::Param`] when `run_id` cannot be used ([`RunId::check`]).
/// - [`PfcError::Collective`] when a rank is still missing at the deadline (the message names
///   the missing ranks, counts the requests refused for another run id, a sign of two jobs on
///   one port, and gives the last error of `accept`, if any), or when the listener cannot be
///   made non-blocking.
pub fn serve_id(
    listener: &TcpListener,
    id: &UniqueId,
    world_size: usize,
    run_id: &RunId,
    timeout: Duration,
) -> Result<()> {
    run_id.check()?;
    listener
        .set_nonblocking(true)
        .map_err(|e| PfcError::Collective(format!("rendezvous: {e}")))?;
    serve_id_with(
        || listener.accept().map(|(stream, _)| stream),
        id,
        world_size,
        run_id,
        timeout,
    )
}

/// [`serve_id`] with the accepting given: `accept` is the listener's (non-blocking), the
/// tests' one that fails on purpose.
fn serve_id_with(
    mut accept: impl FnMut() -> std::io::Result<TcpStream>,
    id: &UniqueId,
    world_size: usize,
    run_id: &RunId,
    timeout: Duration,
) -> Result<()> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    const MAX_IN_FLIGHT: usize = 64;
    let deadline = crate::deadline::deadline_after(timeout);
    let peers = world_size.saturating_sub(1);
    let mut served = std::collections::BTreeSet::new();
    let (confirmed, ranks) = std::sync::mpsc::channel::<usize>();
    let in_flight = Arc::new(AtomicUsize::new(0));
    // Requests refused for another run id: said in the timeout's message.
    let other_runs = Arc::new(AtomicUsize::new(0));
    // The last failed accept: said in the timeout's message, since it may be why a rank is
    // missing (a process out of file descriptors cannot take the rank's connection).
    let mut accept_failed: Option<std::io::Error> = None;
    loop {
        while let Ok(rank) = ranks.try_recv() {
            served.insert(rank);
        }
        if served.len() >= peers {
            return Ok(());
        }
        if Instant::now() >= deadline {
            // The connections in progress end within their own deadlines (1 s + 5 s).
            if in_flight.load(Ordering::Acquire) > 0 {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            while let Ok(rank) = ranks.try_recv() {
                served.insert(rank);
            }
            if served.len() >= peers {
                return Ok(());
            }
            let missing: Vec<usize> = (1..world_size).filter(|r| !served.contains(r)).collect();
            let others = match other_runs.load(Ordering::Acquire) {
                0 => String::new(),
                n => {
                    format!("; refused {n} request(s) of another job (another run id) on this port")
                }
            };
            let accepting = accept_failed
                .map(|e| format!("; the last failed accept said: {e}"))
                .unwrap_or_default();
            return Err(PfcError::Collective(format!(
                "rendezvous: {} of {peers} ranks received the id within {timeout:?}; \
                 missing ranks {missing:?}{others}{accepting}",
                served.len()
            )));
        }
        match accept() {
            Ok(stream) => {
                if in_flight.load(Ordering::Acquire) >= MAX_IN_FLIGHT {
                    continue; // dropped: closed at once
                }
                let left = deadline.saturating_duration_since(Instant::now());
                // A rank sends its request as soon as it is connected: a connection silent for
                // a second is not one. The deadline is the connection's, not each read's, so
                // that a peer cannot stretch it by sending a byte at a time.
                let until = Instant::now() + left.clamp(Duration::from_millis(10), REQUEST_WITHIN);
                in_flight.fetch_add(1, Ordering::AcqRel);
                let (confirmed, handler_count, id) = (confirmed.clone(), in_flight.clone(), *id);
                let (run_id, other_runs) = (run_id.clone(), other_runs.clone());
                let spawned = std::thread::Builder::new()
                    .name("pfc-rendezvous".into())
                    .spawn(move || {
                        match serve_one(stream, &id, world_size, &run_id, until) {
                            Some(Served::Rank(rank)) => {
                                let _ = confirmed.send(rank);
                            }
                            Some(Served::OtherRun) => {
                                other_runs.fetch_add(1, Ordering::AcqRel);
                            }
                            None => {}
                        }
                        // after the send: the loop drains the channel once this reaches 0
                        handler_count.fetch_sub(1, Ordering::AcqRel);
                    });
                if spawned.is_err() {
                    in_flight.fetch_sub(1, Ordering::AcqRel);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                // EMFILE, ENFILE, ENOBUFS, ECONNABORTED...: the listener is still good, and the
                // condition may pass (descriptors are freed, the next peer does not abort).
                // The sleep keeps an error that repeats at once from spinning.
                accept_failed = Some(e);
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// How long a connection to rank 0 has for its request (and rank 0 for its answer).
const REQUEST_WITHIN: Duration = Duration::from_secs(1);
/// How long a rank that got the id has to confirm, whatever rank 0's deadline.
const CONFIRM_WITHIN: Duration = Duration::from_secs(5);

/// The error of a read or write that `deadline` cut off.
fn past(deadline: Instant) -> std::io::Error {
    let late = Instant::now().saturating_duration_since(deadline);
    std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("the connection's deadline passed ({late:?} ago)"),
    )
}

/// Reads into `buf` until it is full or the peer closes, and returns how many bytes came; an
/// error of [`std::io::ErrorKind::TimedOut`] at `deadline`. The time left is set as the read
/// timeout before each read: the socket's timeout bounds one `read` only, so a peer that sends
/// a byte just within it would otherwise hold the connection for as many timeouts as it has
/// bytes to send.
fn read_by(stream: &mut TcpStream, buf: &mut [u8], deadline: Instant) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(past(deadline));
        }
        stream.set_read_timeout(Some(left))?;
        match stream.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// [`read_by`] that must fill `buf`: a peer that closes first is an
/// [`std::io::ErrorKind::UnexpectedEof`] error.
fn read_exact_by(stream: &mut TcpStream, buf: &mut [u8], deadline: Instant) -> std::io::Result<()> {
    if read_by(stream, buf, deadline)? < buf.len() {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// Writes all of `bytes` by `deadline`, setting the time left as the write timeout before each
/// write (for the reason of [`read_by`]: a peer that reads a byte at a time).
fn write_by(stream: &mut TcpStream, mut bytes: &[u8], deadline: Instant) -> std::io::Result<()> {
    while !bytes.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(past(deadline));
        }
        stream.set_write_timeout(Some(left))?;
        match stream.write(bytes) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The address rank 0 listens on for `addr` (`MASTER_ADDR:MASTER_PORT`): a loopback address
/// (`127.x.y.z`, `::1`, `localhost`) as given, since the job is on this machine; anything else
/// on every interface of MASTER_PORT (`0.0.0.0`, or `[::]` for an IPv6 address), as torchrun's
/// store does. Binding the name itself would fail for a name that does not resolve yet or
/// names a service address (a Kubernetes ClusterIP), and would listen on loopback only where
/// /etc/hosts maps the host's own name to 127.0.1.1, out of the other nodes' reach.
fn listen_addr(addr: &str) -> String {
    let Some((host, port)) = addr.rsplit_once(':') else {
        return addr.to_string(); // no port: let bind() say what is wrong
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let ip = host.parse::<std::net::IpAddr>().ok();
    if host.eq_ignore_ascii_case("localhost") || ip.is_some_and(|ip| ip.is_loopback()) {
        return addr.to_string();
    }
    if ip.is_some_and(|ip| ip.is_ipv6()) {
        format!("[::]:{port}")
    } else {
        format!("0.0.0.0:{port}")
    }
}

/// A rank's request, up to its run id: [`MAGIC`], world size and rank (u32, little-endian), and
/// the run id's length (u16, little-endian); the run id's bytes follow.
const HELLO_HEAD: usize = MAGIC.len() + 4 + 4 + 2;
/// Rank 0's answer: [`MAGIC`], status (one of the `STATUS_` values), rank 0's world size (u32,
/// little-endian; zero unless served or refused for its world size), the id (zeros unless
/// served).
const REPLY_BYTES: usize = MAGIC.len() + 1 + 4 + UNIQUE_ID_BYTES;
/// The id follows.
const STATUS_SERVED: u8 = 0;
/// Refused: another world size, or a rank outside `[1, world_size)`.
const STATUS_OTHER_WORLD: u8 = 1;
/// Refused: another run id (another job on this port).
const STATUS_OTHER_RUN: u8 = 2;
/// Refused: the request was of another version of this protocol. Only a client of another
/// version gets it, and that client sees this version's [`MAGIC`] first.
const STATUS_OTHER_VERSION: u8 = 3;

/// What one connection to rank 0 turned out to be.
enum Served {
    /// A rank of this job that received the id and confirmed.
    Rank(usize),
    /// A rank of another job, refused for its run id.
    OtherRun,
}

/// Whether two run ids are the same, looking at every byte of the shorter length (no early
/// exit on the first difference, so the time taken says little about how much of a guess was
/// right; the length itself is not hidden).
fn same_run_id(a: &[u8], b: &[u8]) -> bool {
    let differ = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    (a.len() == b.len()) & (differ == 0)
}

/// Rank 0's answer with `status`, `world` and `id`.
fn reply(status: u8, world: usize, id: &[u8; UNIQUE_ID_BYTES]) -> Vec<u8> {
    let mut reply = Vec::with_capacity(REPLY_BYTES);
    reply.extend_from_slice(MAGIC);
    reply.push(status);
    reply.extend_from_slice(&u32::try_from(world).unwrap_or(u32::MAX).to_le_bytes());
    reply.extend_from_slice(id);
    reply
}

/// Serves one connection: the rank it served, [`Served::OtherRun`] for a rank of another job,
/// or `None` if it was neither (not a rank of this protocol version, another world size, a
/// rank that did not confirm). The request must have come and the answer gone by `until`; a
/// rank that got the id has [`CONFIRM_WITHIN`] after that to confirm.
fn serve_one(
    mut stream: TcpStream,
    id: &UniqueId,
    world_size: usize,
    run_id: &RunId,
    until: Instant,
) -> Option<Served> {
    stream.set_nonblocking(false).ok()?;
    let mut head = [0u8; HELLO_HEAD];
    read_exact_by(&mut stream, &mut head[..MAGIC.len()], until).ok()?;
    if &head[..MAGIC.len()] != MAGIC {
        if head.starts_with(MAGIC_STEM) {
            refuse_other_version(stream, until);
        }
        return None;
    }
    read_exact_by(&mut stream, &mut head[MAGIC.len()..], until).ok()?;
    let word = |at: usize| u32::from_le_bytes([head[at], head[at + 1], head[at + 2], head[at + 3]]);
    let (their_world, rank) = (word(MAGIC.len()), word(MAGIC.len() + 4));
    let token_len = usize::from(u16::from_le_bytes([
        head[HELLO_HEAD - 2],
        head[HELLO_HEAD - 1],
    ]));
    if token_len > RunId::MAX_BYTES {
        return None; // no client of this version sends one: not a rank
    }
    let mut token = [0u8; RunId::MAX_BYTES];
    read_exact_by(&mut stream, &mut token[..token_len], until).ok()?;
    let (their_world, rank) = (their_world as usize, rank as usize);
    let status = if !same_run_id(&token[..token_len], run_id.as_str().as_bytes()) {
        STATUS_OTHER_RUN
    } else if their_world == world_size && (1..world_size).contains(&rank) {
        STATUS_SERVED
    } else {
        STATUS_OTHER_WORLD
    };
    let answer = match status {
        STATUS_SERVED => reply(status, world_size, &id.0),
        // Another job learns nothing of this one: not its world size, not its run id.
        STATUS_OTHER_RUN => reply(status, 0, &[0; UNIQUE_ID_BYTES]),
        _ => reply(status, world_size, &[0; UNIQUE_ID_BYTES]),
    };
    write_by(&mut stream, &answer, until).ok()?;
    match status {
        STATUS_SERVED => {
            // Once a rank has the id it must be counted, or rank 0 gives up on a rank that is
            // already in NCCL's init: its confirmation gets 5 s whatever the overall deadline
            // (which may be milliseconds away when the id goes out).
            let mut ack = [0u8; 1];
            read_exact_by(&mut stream, &mut ack, Instant::now() + CONFIRM_WITHIN).ok()?;
            Some(Served::Rank(rank))
        }
        STATUS_OTHER_RUN => Some(Served::OtherRun),
        _ => None,
    }
}

/// Answers a request of another version of this protocol with this version's refusal, so that
/// its client fails at once naming the version (every version's client checks [`MAGIC`] first)
/// instead of retrying until its timeout. The rest of the request is read before the socket
/// closes: closing with unread bytes would reset the connection, and a reset can discard the
/// answer before the client reads it. All of it by `until`, the connection's deadline.
fn refuse_other_version(mut stream: TcpStream, until: Instant) {
    if write_by(
        &mut stream,
        &reply(STATUS_OTHER_VERSION, 0, &[0; UNIQUE_ID_BYTES]),
        until,
    )
    .is_err()
    {
        return;
    }
    let _ = stream.shutdown(std::net::Shutdown::Write);
    // The client closes once it has the answer; read until then, a few KiB at most.
    let mut sink = [0u8; 4096];
    let _ = read_by(&mut stream, &mut sink, until);
}

/// Rank `rank`'s side of the TCP exchange with rank 0 of a `world_size` job at `addr` whose run
/// id is `run_id`: connects (resolving `addr` again and trying each of its addresses until
/// `timeout`, since rank 0's host may not resolve or listen yet), sends its rank and run id and
/// reads the id ([`serve_id`] gives the protocol). A refusal (another run id, another world
/// size, a rank out of range, another protocol version) is an error at once. Resolving a host
/// name runs on a helper thread that is waited for no longer than the time left (at least
/// 100 ms), since the system resolver has timeouts of its own that can far exceed `timeout`.
/// Each connection ends by the deadline too (or 100 ms after it starts, if later), however
/// slowly rank 0 (or whatever listens there) answers.
///
/// # Errors
///
/// - [`PfcError::Param`] when `rank` is not in `[1, world_size)`, or when `run_id` cannot be
///   used ([`RunId::check`]).
/// - [`PfcError::Collective`] when rank 0 refuses this rank (the message says why: another job
///   (run id ...) on this port, another world size, another protocol version), or when it is
///   not reachable within `timeout` (the message names `addr` and the last failure: a refused
///   connection, a name that does not resolve, or a resolution that did not finish in time).
pub fn fetch_id(
    addr: &str,
    rank: usize,
    world_size: usize,
    run_id: &RunId,
    timeout: Duration,
) -> Result<UniqueId> {
    let system: Resolver =
        Arc::new(|addr: &str| addr.to_socket_addrs().map(|found| found.collect()));
    fetch_id_with(addr, rank, world_size, run_id, timeout, &system)
}

/// Turns `host:port` into socket addresses; [`fetch_id`] uses the system's (`to_socket_addrs`),
/// the tests one that is slow or fails on purpose.
type Resolver = Arc<dyn Fn(&str) -> std::io::Result<Vec<SocketAddr>> + Send + Sync>;

/// [`fetch_id`] with the resolver given.
fn fetch_id_with(
    addr: &str,
    rank: usize,
    world_size: usize,
    run_id: &RunId,
    timeout: Duration,
    resolve: &Resolver,
) -> Result<UniqueId> {
    let fail = |why: String| PfcError::Collective(format!("rendezvous with {addr}: {why}"));
    let (rank32, world32) = match (u32::try_from(rank), u32::try_from(world_size)) {
        (Ok(r), Ok(w)) if r >= 1 && r < w => (r, w),
        _ => {
            return Err(PfcError::param(
                "rank",
                rank,
                format!("must lie in [1, world size {world_size}) to fetch the id"),
            ))
        }
    };
    run_id.check()?;
    let token = run_id.as_str().as_bytes();
    // A RunId that passes its check holds at most MAX_BYTES, which fits in a u16.
    let token_len = u16::try_from(token.len())
        .map_err(|_| PfcError::param("run_id", run_id.shown(), "is longer than a run id may be"))?;
    let mut hello = Vec::with_capacity(HELLO_HEAD + token.len());
    hello.extend_from_slice(MAGIC);
    hello.extend_from_slice(&world32.to_le_bytes());
    hello.extend_from_slice(&rank32.to_le_bytes());
    hello.extend_from_slice(&token_len.to_le_bytes());
    hello.extend_from_slice(token);
    let request = Request {
        hello: &hello,
        rank: rank32,
        world: world32,
        run_id,
    };
    let deadline = crate::deadline::deadline_after(timeout);
    let mut last = String::from("not tried");
    loop {
        match resolve_within(addr, deadline, resolve) {
            Ok(targets) => {
                for target in targets {
                    match fetch_from(&target, &request, deadline) {
                        Ok(Some(id)) => return Ok(id),
                        Ok(None) => last = format!("{target}: connection closed early"),
                        Err(Refused(why)) => return Err(fail(why)),
                        Err(Retry(why)) => last = format!("{target}: {why}"),
                    }
                }
            }
            Err(why) => last = why,
        }
        if Instant::now() >= deadline {
            return Err(fail(format!(
                "rank 0 not reachable within {timeout:?} (last: {last})"
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Resolves `addr` with `resolve`, waiting no longer than until `deadline` (but at least
/// 100 ms, as a connection's reads do). A numeric address needs no resolver and no thread.
/// Otherwise the resolver runs on a thread of its own: a lookup that outlives the wait is left
/// to finish there (its answer is dropped), which is the only way to bound a blocking
/// `getaddrinfo`; at most one such thread is left per call of [`fetch_id`], since the wait only
/// ends early at the deadline, after which no more lookups start.
fn resolve_within(
    addr: &str,
    deadline: Instant,
    resolve: &Resolver,
) -> std::result::Result<Vec<SocketAddr>, String> {
    if let Ok(at) = addr.parse::<SocketAddr>() {
        return Ok(vec![at]);
    }
    let host = addr.rsplit_once(':').map_or(addr, |(host, _)| host);
    let (answer, answered) = std::sync::mpsc::channel();
    let (owned, resolve) = (addr.to_string(), Arc::clone(resolve));
    std::thread::Builder::new()
        .name("pfc-resolve".into())
        .spawn(move || {
            let _ = answer.send(resolve(&owned));
        })
        .map_err(|e| format!("cannot start a thread to resolve {host}: {e}"))?;
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(100));
    match answered.recv_timeout(left) {
        Ok(Ok(targets)) => Ok(targets),
        Ok(Err(e)) => Err(format!("cannot resolve {host}: {e}")),
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Err(format!(
            "resolving {host} did not finish within the time left"
        )),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            Err(format!("resolving {host} failed without an answer"))
        }
    }
}

/// One rank's request, with what the messages of a refusal need.
struct Request<'a> {
    /// The bytes sent.
    hello: &'a [u8],
    rank: u32,
    world: u32,
    run_id: &'a RunId,
}

/// Why one try of [`fetch_id`] failed.
enum FetchError {
    /// Rank 0 answered and refused, or is not a rendezvous server: trying again cannot help.
    Refused(String),
    /// Not reachable (yet), or the connection broke: try again until the deadline.
    Retry(String),
}
use FetchError::{Refused, Retry};

/// One try of [`fetch_id`] against `target`. The connection's deadline is `deadline`, or
/// 100 ms from now if that is later (a last try still gets a chance): connecting, sending the
/// request, reading the answer and confirming all end by it, whatever the server sends, since
/// the time left is set before each read and write (a server that drips its answer a byte at
/// a time cannot hold the rank past it).
fn fetch_from(
    target: &SocketAddr,
    request: &Request<'_>,
    deadline: Instant,
) -> std::result::Result<Option<UniqueId>, FetchError> {
    let retry = |e: std::io::Error| Retry(e.to_string());
    let until = deadline.max(Instant::now() + Duration::from_millis(100));
    // At most 500 ms, so that a target that drops packets leaves time for the next one.
    let connect_within = until
        .saturating_duration_since(Instant::now())
        .clamp(Duration::from_millis(1), Duration::from_millis(500));
    let mut stream = TcpStream::connect_timeout(target, connect_within).map_err(retry)?;
    write_by(&mut stream, request.hello, until).map_err(retry)?;
    let mut reply = [0u8; REPLY_BYTES];
    let got = read_by(&mut stream, &mut reply, until).map_err(retry)?;
    // A short answer with another tag (the first version's was 136 bytes) is a refusal; a short
    // one with no tag yet, a broken connection to try again.
    let other_version =
        || Refused("it is not a partial-fc rendezvous server of this protocol version".into());
    if got >= MAGIC.len() && &reply[..MAGIC.len()] != MAGIC {
        return Err(other_version());
    }
    if got < REPLY_BYTES {
        return Ok(None);
    }
    let at = MAGIC.len() + 1;
    let theirs = u32::from_le_bytes([reply[at], reply[at + 1], reply[at + 2], reply[at + 3]]);
    let (rank, ours) = (request.rank, request.world);
    match reply[MAGIC.len()] {
        STATUS_SERVED => {}
        STATUS_OTHER_WORLD => {
            return Err(Refused(format!(
                "rank 0 there serves a job of world size {theirs}; this is rank {rank} of {ours} \
                 (another job on the same MASTER_ADDR:MASTER_PORT?)"
            )))
        }
        STATUS_OTHER_RUN => {
            let run = if request.run_id.is_empty() {
                "run id: rank 0 has one, this rank none".to_string()
            } else {
                format!("run id other than this rank's {}", request.run_id.shown())
            };
            return Err(Refused(format!(
                "rank 0 there belongs to another job ({run}) on this port; give every rank \
                 of one job the same run id (PFC_RUN_ID, or torchrun --rdzv-id) and jobs that \
                 run at once different MASTER_PORTs"
            )));
        }
        STATUS_OTHER_VERSION => return Err(other_version()),
        status => {
            return Err(Refused(format!(
                "rank 0 there refused rank {rank} of {ours} with an unknown status {status}"
            )))
        }
    }
    let mut id = [0u8; UNIQUE_ID_BYTES];
    id.copy_from_slice(&reply[at + 4..]);
    // Rank 0 counts this rank only once it has the id: confirm.
    write_by(&mut stream, &[1], until).map_err(retry)?;
    Ok(Some(UniqueId(id)))
}

#[cfg(test)]
mod tests;
