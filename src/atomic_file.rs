//! Whole-file writes that never leave a half-written file under the destination's name: the
//! bytes go to a temporary file beside it, are flushed to the disk, and are renamed over it.
//! On any failure the temporary file is removed and an existing file is left as it was.

use crate::error::{PfcError, Result};
use crate::tensor_file::temp_path_beside;
use std::path::Path;

/// Writes `bytes` to `path` atomically (see the module docs); errors name `path`.
pub(crate) fn write_bytes_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |tmp| {
        std::fs::write(tmp, bytes).map_err(io_error(path))
    })
}

/// The crate's I/O error for the destination `path` (the temporary file's name means nothing
/// to the user).
pub(crate) fn io_error(path: &Path) -> impl Fn(std::io::Error) -> PfcError + '_ {
    move |source| PfcError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Atomically replaces `path` with what `write` puts into the temporary file it is given (a
/// file it creates); the file is flushed to the disk before the rename. An error from `write`
/// (an I/O error, or one of the data it writes, such as a failed device download) is returned
/// as it is, after the temporary file is removed.
pub(crate) fn write_atomic_with(
    path: &Path,
    write: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    let tmp = temp_path_beside(path);
    let written = write(&tmp).and_then(|()| {
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .and_then(|()| std::fs::rename(&tmp, path))
            .map_err(io_error(path))
    });
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
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
