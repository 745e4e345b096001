//! Whole-file writes that never leave a half-written file under the destination's name: the
//! bytes go to a temporary file beside it, are flushed to the disk, and are renamed over it, and
//! the folder is flushed so that the rename itself survives a power loss. On any failure the
//! temporary file is removed and an existing file is left as it was. The temporary file is
//! created new (never opened through a link someone put under its name). Files that must
//! appear together or not at all are written in two steps: each to its temporary file
//! ([`write_pending_with`]), then, once all are, each renamed into place
//! ([`PendingFile::commit`]).

use crate::error::{PfcError, Result};
use crate::tensor_file::temp_path_beside;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Writes `bytes` to `path` atomically (see the module docs); errors name `path`.
#[cfg_attr(not(feature = "plot"), allow(dead_code))] // the plots' writer
pub(crate) fn write_bytes_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_impl(path, false, |mut file| {
        file.write_all(bytes).map_err(io_error(path))
    })
}

/// [`write_bytes_atomic`] for a secret (the NCCL id): on Unix the file is readable by its owner
/// only (mode 0600), from its creation on.
pub(crate) fn write_private_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_impl(path, true, |mut file| {
        file.write_all(bytes).map_err(io_error(path))
    })
}

/// Refuses a destination that exists and is neither a regular file nor a link: the rename would
/// replace a device (`/dev/null` for a root user), a pipe or a socket with a regular file, and a
/// folder is not a file's place.
fn refuse_special(path: &Path) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.is_file() && !meta.is_symlink() => Err(PfcError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "not a regular file (a folder, a device, a pipe or a socket): the output would \
                 replace it",
            ),
        }),
        _ => Ok(()),
    }
}

/// The crate's I/O error for the destination `path` (the temporary file's name means nothing
/// to the user).
pub(crate) fn io_error(path: &Path) -> impl Fn(std::io::Error) -> PfcError + '_ {
    move |source| PfcError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn write_atomic_impl(
    path: &Path,
    private: bool,
    write: impl FnOnce(std::fs::File) -> Result<()>,
) -> Result<()> {
    write_pending_impl(path, private, write)?.commit()
}

/// Writes what `write` puts into the temporary file it is given (open for writing), beside
/// `path`, and flushes it to the disk, but does not rename it: that is left to
/// [`PendingFile::commit`], and dropping the [`PendingFile`] instead removes the file. So a set
/// of files that must appear together or not at all (`checkpoint::reshard`'s ranks) is written
/// each pending, and only when all are does any take its final name: a failure on a later file
/// leaves no earlier one beside the old files of the set. An error from `write` (an I/O error,
/// or one of the data it writes, such as a failed device download) is returned as it is, after
/// the temporary file is removed.
pub(crate) fn write_pending_with(
    path: &Path,
    write: impl FnOnce(std::fs::File) -> Result<()>,
) -> Result<PendingFile> {
    refuse_special(path)?;
    write_pending_impl(path, false, write)
}

fn write_pending_impl(
    path: &Path,
    private: bool,
    write: impl FnOnce(std::fs::File) -> Result<()>,
) -> Result<PendingFile> {
    let tmp = temp_path_beside(path);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = private;
    let file = options.open(&tmp).map_err(io_error(path))?;
    // From here on, dropping `pending` (an error below) removes the temporary file.
    let pending = PendingFile {
        tmp,
        path: path.to_path_buf(),
        renamed: false,
    };
    write(file)?;
    // Opened for writing: Windows flushes (FlushFileBuffers) only through a handle that may
    // write.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&pending.tmp)
        .and_then(|f| f.sync_all())
        .map_err(io_error(path))?;
    Ok(pending)
}

/// A complete file, flushed to the disk under a temporary name beside its destination, that
/// has not yet been renamed over it ([`write_pending_with`]). [`commit`](Self::commit) renames
/// it into place; dropping it uncommitted removes the temporary file, leaving the destination
/// as it was. (A process killed before either leaves the temporary file, a hidden name beside
/// the destination, as an interrupted atomic write does.)
#[derive(Debug)]
#[must_use = "a pending file is removed when dropped: commit it"]
pub(crate) struct PendingFile {
    tmp: PathBuf,
    path: PathBuf,
    /// Set once the rename is done: nothing is left under the temporary name to remove (and
    /// another file may come to have it).
    renamed: bool,
}

impl PendingFile {
    /// Renames the file over its destination and flushes the folder so that the rename
    /// survives a power loss (a file system that cannot flush a folder, as some network ones,
    /// still has the complete file under its name). On an error the temporary file is removed
    /// and the destination is as it was; errors name the destination.
    pub(crate) fn commit(mut self) -> Result<()> {
        // Again: something may have been put there while the file was written.
        refuse_special(&self.path)?;
        std::fs::rename(&self.tmp, &self.path).map_err(io_error(&self.path))?;
        self.renamed = true;
        #[cfg(unix)]
        if let Some(dir) = self.path.parent() {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
        }
        Ok(())
    }
}

impl Drop for PendingFile {
    fn drop(&mut self) {
        if !self.renamed {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Names in `dir` other than `keep`.
    fn others(dir: &Path, keep: &str) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n != keep)
            .collect()
    }

    /// A pipe (or a device, or a folder) under the destination's name is refused and stays.
    #[cfg(unix)]
    #[test]
    fn never_replaces_a_pipe_or_a_folder() {
        use std::os::unix::fs::FileTypeExt;
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().join("folder");
        std::fs::create_dir(&folder).unwrap();
        assert!(write_bytes_atomic(&folder, b"x").is_err());
        assert!(folder.is_dir());
        let fifo = dir.path().join("fifo");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        assert!(
            made.is_ok_and(|s| s.success()),
            "mkfifo (coreutils) is needed"
        );
        let e = write_bytes_atomic(&fifo, b"x").unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        assert!(std::fs::symlink_metadata(&fifo)
            .unwrap()
            .file_type()
            .is_fifo());
        assert_eq!(
            others(dir.path(), "fifo"),
            ["folder"],
            "no temporary file left"
        );
    }

    #[test]
    fn replaces_the_file_and_leaves_nothing_beside_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.txt");
        std::fs::write(&path, "old").unwrap();
        // A second name for the old file: an in-place write would change what it reads.
        let link = dir.path().join("link.txt");
        std::fs::hard_link(&path, &link).unwrap();
        write_bytes_atomic(&path, b"new").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "new");
        assert_eq!(std::fs::read_to_string(&link).unwrap(), "old");
        assert_eq!(others(dir.path(), "out.txt"), ["link.txt"]);
    }

    #[cfg(unix)]
    #[test]
    fn a_private_file_is_its_owners_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("id");
        write_private_atomic(&path, b"secret").unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
        assert_eq!(std::fs::read(&path).unwrap(), b"secret");
    }

    #[test]
    fn a_pending_file_takes_its_name_only_when_committed() {
        let dir = tempfile::tempdir().unwrap();
        let write = |text: &'static str| {
            move |mut file: std::fs::File| {
                file.write_all(text.as_bytes())
                    .map_err(io_error(Path::new("x")))
            }
        };
        let path = dir.path().join("out.txt");
        std::fs::write(&path, "old").unwrap();
        let dropped = write_pending_with(&path, write("dropped")).unwrap();
        let kept = write_pending_with(&path, write("new")).unwrap();
        assert_eq!(
            others(dir.path(), "out.txt").len(),
            2,
            "two temporary files"
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "old");
        drop(dropped);
        assert_eq!(others(dir.path(), "out.txt").len(), 1, "one removed");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "old");
        kept.commit().unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "new");
        assert!(others(dir.path(), "out.txt").is_empty());
        // A failed write leaves nothing either.
        let failed = write_pending_with(&path, |_| Err(PfcError::Shape("no".into())));
        assert!(matches!(failed, Err(PfcError::Shape(_))), "{failed:?}");
        assert!(others(dir.path(), "out.txt").is_empty());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "new");
    }

    #[test]
    fn a_failed_rename_removes_the_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        // A non-empty folder under the destination's name: the rename fails.
        let path = dir.path().join("taken");
        std::fs::create_dir(&path).unwrap();
        std::fs::write(path.join("inside"), "x").unwrap();
        match write_bytes_atomic(&path, b"new") {
            Err(PfcError::Io { path: p, .. }) => assert_eq!(p, path),
            other => panic!("{other:?}"),
        }
        assert!(others(dir.path(), "taken").is_empty());
        assert_eq!(std::fs::read_to_string(path.join("inside")).unwrap(), "x");
    }
}
