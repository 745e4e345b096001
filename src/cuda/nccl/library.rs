//! Finding and loading libnccl: cudarc opens `libnccl.so` (or `.so.12`/`.so.13`), but runtime
//! installs (Debian's `libnccl2`, the `nvidia-nccl-cu12`/`cu13` wheels) ship only
//! `libnccl.so.2`. A process cannot change its own library search path, so [`nccl_available`]
//! says how to fix it, and [`link_nccl`] creates the `libnccl.so` link in a folder the launcher
//! puts on `LD_LIBRARY_PATH` of the processes it starts (examples/multi_gpu.rs does this).

use crate::error::{PfcError, Result};
use crate::rendezvous::{UniqueId, UNIQUE_ID_BYTES};
use cudarc::nccl::{result as nccl, sys};
use std::path::{Path, PathBuf};

/// Checks that NCCL can be loaded, with instructions when it cannot.
pub fn nccl_available() -> Result<()> {
    // SAFETY: only tries to open the library.
    if unsafe { sys::is_culib_present() } {
        return Ok(());
    }
    let hint = find_nccl_so2()
        .map(|p| format!(" Found {}: run `partial_fc::cuda::nccl::link_nccl(so2, dir)` or `ln -s {} DIR/libnccl.so`, then start the process with DIR on LD_LIBRARY_PATH.", p.display(), p.display()))
        .unwrap_or_else(|| " Install NCCL (apt install libnccl2, or pip install nvidia-nccl-cu12) and put its lib folder on LD_LIBRARY_PATH.".into());
    Err(PfcError::BackendUnavailable(format!(
        "NCCL was not found: cudarc opens libnccl.so, libnccl.so.13 or libnccl.so.12, and runtime packages ship only libnccl.so.2.{hint}"
    )))
}

/// Looks for `libnccl.so.2` on `LD_LIBRARY_PATH`, in the usual system folders and in Python's
/// `nvidia/nccl/lib` wheels under the given site-packages roots of `PFC_NCCL_SEARCH` (colon-separated).
pub fn find_nccl_so2() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var("LD_LIBRARY_PATH")
        .unwrap_or_default()
        .split(':')
        .chain(
            std::env::var("PFC_NCCL_SEARCH")
                .unwrap_or_default()
                .split(':'),
        )
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .collect();
    dirs.extend(
        [
            "/usr/lib/x86_64-linux-gnu",
            "/usr/local/cuda/lib64",
            "/usr/lib64",
            "/usr/lib",
        ]
        .map(PathBuf::from),
    );
    for d in dirs {
        for candidate in [
            d.join("libnccl.so.2"),
            d.join("nvidia/nccl/lib/libnccl.so.2"),
        ] {
            if candidate.exists() {
                return Some(candidate);
            }
        }
    }
    None
}

/// Creates `dir/libnccl.so` pointing at `so2` (a `libnccl.so.2`), so that a process started with
/// `dir` on `LD_LIBRARY_PATH` finds NCCL through cudarc. Returns the link's path.
///
/// `dir` should be private to the user, best a fresh temporary directory (examples/multi_gpu.rs
/// uses one per launch): every library in it will be loaded by the processes started with it on
/// their search path. A link already there is kept if it points at `so2` and replaced if it
/// points anywhere else or nowhere (NCCL moved or upgraded); a file that is not a link is an
/// error, never overwritten.
pub fn link_nccl(so2: &Path, dir: &Path) -> Result<PathBuf> {
    let io = |source| PfcError::Io {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let link = dir.join("libnccl.so");
    match std::fs::symlink_metadata(&link) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
        Ok(meta) if !meta.file_type().is_symlink() => {
            return Err(PfcError::Io {
                path: link.clone(),
                source: std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "exists and is not a link: remove it or choose another folder",
                ),
            })
        }
        Ok(_) if std::fs::read_link(&link).is_ok_and(|t| t == so2) => return Ok(link),
        Ok(_) => {} // a stale or foreign link: replaced below
    }
    // A new link under a temporary name, renamed over the old one: never a moment without one.
    let temp = dir.join(format!("libnccl.so.{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&temp);
    #[cfg(unix)]
    std::os::unix::fs::symlink(so2, &temp).map_err(io)?;
    std::fs::rename(&temp, &link).map_err(|e| {
        let _ = std::fs::remove_file(&temp);
        io(e)
    })?;
    Ok(link)
}

/// A new NCCL unique id (rank 0 calls this and shares it through [`crate::rendezvous`]).
pub fn new_unique_id() -> Result<UniqueId> {
    nccl_available()?;
    let id = nccl::get_uniqueid()
        .map_err(|e| PfcError::Collective(format!("ncclGetUniqueId: {e:?}")))?;
    let mut bytes = [0u8; UNIQUE_ID_BYTES];
    for (b, c) in bytes.iter_mut().zip(id.internal.iter()) {
        *b = *c as u8;
    }
    Ok(UniqueId(bytes))
}

/// NCCL's version as an integer (e.g. 22703 for 2.27.3).
pub fn nccl_version() -> Result<i32> {
    nccl_available()?;
    nccl::get_nccl_version().map_err(|e| PfcError::Collective(format!("ncclGetVersion: {e:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A dangling link (NCCL moved) used to make every later launch fail, and a link to another
    /// library was kept as it was (found by a review).
    #[test]
    fn link_nccl_keeps_a_right_link_and_replaces_a_wrong_one() {
        let dir = tempfile::tempdir().unwrap();
        let so2 = dir.path().join("libnccl.so.2");
        std::fs::write(&so2, b"nccl").unwrap();
        let folder = dir.path().join("links");
        let link = link_nccl(&so2, &folder).unwrap();
        assert_eq!(std::fs::read_link(&link).unwrap(), so2);
        assert_eq!(link_nccl(&so2, &folder).unwrap(), link, "kept");
        for wrong in [
            dir.path().join("gone/libnccl.so.2"),
            dir.path().join("other.so"),
        ] {
            std::fs::write(dir.path().join("other.so"), b"other").unwrap();
            std::fs::remove_file(&link).unwrap();
            std::os::unix::fs::symlink(&wrong, &link).unwrap();
            assert_eq!(link_nccl(&so2, &folder).unwrap(), link);
            assert_eq!(
                std::fs::read_link(&link).unwrap(),
                so2,
                "{wrong:?} replaced"
            );
        }
        std::fs::remove_file(&link).unwrap();
        std::fs::write(&link, b"a real file").unwrap();
        assert!(matches!(link_nccl(&so2, &folder), Err(PfcError::Io { .. })));
        assert_eq!(
            std::fs::read(&link).unwrap(),
            b"a real file",
            "never overwritten"
        );
    }
}
