//! The launcher's variables: [`LaunchEnv`] (torchrun's `RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
//! `MASTER_ADDR`, `MASTER_PORT` and run id), and how a variable that may not be UTF-8 is read.

use super::RunId;
use crate::error::{PfcError, Result};

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

    pub(super) fn read(get: impl Fn(&str) -> Var) -> Result<LaunchEnv> {
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
            // No node holds more processes than the whole job.
            (Some(l), None) if l >= world_size => {
                return Err(PfcError::param(
                    "LOCAL_RANK",
                    l,
                    format!("must lie in [0, WORLD_SIZE = {world_size})"),
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
pub(super) enum Var {
    Unset,
    Text(String),
    NotUtf8(Vec<u8>),
}

/// One variable of the process's environment. A value that is not UTF-8 keeps its bytes, so
/// that the reader can name the variable instead of taking it for unset or comparing a lossy
/// copy (`job-\xff` and `job-\xfe` would both read `job-\u{fffd}`).
pub(super) fn env_var(name: &str) -> Var {
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
pub(super) fn shown_bytes(bytes: &[u8]) -> String {
    if bytes.len() <= 8 {
        format!("\"{}\"", bytes.escape_ascii())
    } else {
        format!("\"{}…\" ({} bytes)", bytes[..4].escape_ascii(), bytes.len())
    }
}
