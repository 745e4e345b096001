//! The id file of [`Rendezvous::File`](super::Rendezvous::File): rank 0 writes it atomically,
//! the other ranks wait for it.

use super::UniqueId;
use crate::error::{PfcError, Result};
use std::path::Path;
use std::time::{Duration, Instant};

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
