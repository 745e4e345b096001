//! [`RunId`]: the job's token for the TCP rendezvous, given by the caller or read from
//! `PFC_RUN_ID`, then `TORCHELASTIC_RUN_ID`.

use super::launch_env::{env_var, shown_bytes, Var};
#[cfg(doc)] // for the doc links
use super::{fetch_id, serve_id, LaunchEnv, Rendezvous};
use crate::error::{PfcError, Result};

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
    pub(super) fn read(get: impl Fn(&str) -> Var) -> RunId {
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
    pub(super) fn shown(&self) -> String {
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
