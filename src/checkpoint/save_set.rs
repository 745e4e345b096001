//! `PartialFc::save_set`: every rank's checkpoint written as a set, all or none, through two
//! agreements: one that every rank wrote its file (and is at the same step of the same run, into
//! the same folder) before any renames, one that every rename succeeded before the old files'
//! backups go.

use super::shard_file_name;
use crate::atomic_file::{io_error as io, PendingFile};
use crate::backend::{Backend, Collective};
use crate::error::{PfcError, Result};
use crate::layer::{Call, PartialFc};
use std::path::{Path, PathBuf};

impl<B: Backend, C: Collective<B>> PartialFc<B, C> {
    /// Every rank's checkpoint, written as a set: each rank writes its file
    /// (`dir/rank{r}-of-{k}.safetensors`, [`shard_file_name`]) under a temporary name; the ranks
    /// agree that all of them succeeded and that they are at the same pass and update of the
    /// same run (seed) and write to the same folder; each renames its file into place, keeping
    /// the file it replaces under a backup name; a second agreement checks every rename, and
    /// only then are the backups removed. A rank that fails anywhere (a diverged value, a full
    /// disk, a rename, its part of an agreement) makes every rank restore what it had: the
    /// folder keeps the set it held. Its peers learn of a rank whose part of an agreement broke
    /// through the collective itself: at once with threads, and under NCCL only through the
    /// communicator's timeout (`NcclCollective`'s), so a job without one waits there, and one
    /// killed before it fires keeps the new files beside the backups. Left uncovered: a job
    /// killed between the first rename and the backups' removal (which spans the second
    /// agreement), and a group that breaks inside the second agreement after some ranks had its
    /// answer (those keep the new files, the others restore): both leave a mix of two saves,
    /// which [`CheckpointSet::open`] refuses when they differ in pass, update count or seed,
    /// but not two saves of the same step (a run resumed from an older folder), and the hidden
    /// backups `.NAME.prev<pid>.<n>`. The ranks must see `dir` under one canonical path (a
    /// folder mounted at different places on different machines is refused as another folder)
    /// and it must be one shared folder (node-local folders of the same path pass the check and
    /// split the set). Files of another world size in `dir` are not touched (a folder per
    /// checkpoint keeps `open`'s globbing simple), and two jobs must not save into one folder
    /// at once. `dir` is made if missing. A collective call: every rank calls it; `extra` as in
    /// [`save_with_metadata`](Self::save_with_metadata). Returns this rank's file.
    ///
    /// [`CheckpointSet::open`]: super::CheckpointSet::open
    ///
    /// ```
    /// use partial_fc::checkpoint::CheckpointSet;
    /// use partial_fc::{collective::ThreadGroup, Collective, CpuBackend, LayerConfig, PartialFc};
    /// let dir = tempfile::tempdir().unwrap();
    /// let files = ThreadGroup::run(2, |comm| {
    ///     let mut layer = PartialFc::new(LayerConfig::new(100, 8, 4), CpuBackend, comm).unwrap();
    ///     layer.save_set(dir.path(), &[]).unwrap()
    /// });
    /// assert!(CheckpointSet::open(&files).unwrap().is_complete());
    /// ```
    ///
    /// # Errors
    ///
    /// Those of [`save_with_metadata`](Self::save_with_metadata) (this rank's own, or
    /// [`PfcError::Collective`] naming the rank that failed, or the rank at another step, run or
    /// folder), and [`PfcError::Io`] when `dir` cannot be made or a rename fails; in each case
    /// no rank's file changed, except as said above.
    pub fn save_set(&mut self, dir: &Path, extra: &[(&str, &str)]) -> Result<PathBuf> {
        let (world, rank) = (self.collective().world_size(), self.collective().rank());
        let path = dir.join(shard_file_name(world, rank));
        let prepared = std::fs::create_dir_all(dir)
            .map_err(io(dir))
            .and_then(|()| self.pending_save(&path, extra));
        let (pending, own) = match prepared {
            Ok(p) => (Some(p), None),
            Err(e) => (None, Some(e)),
        };
        // Which set this rank writes: its counters, its run's seed and the folder (as the file
        // system names it). Ranks that differ would write a set `open` refuses.
        let folder = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
        let which = format!(
            "{} {} {} {}",
            self.steps(),
            self.optimizer_steps(),
            self.config().seed,
            folder.display()
        );
        let identity = crate::layer::fnv1a_bits(&which, 24);
        // A refusal anywhere returns here on every rank; `pending` is dropped, which removes
        // this rank's temporary file.
        let found = self.agree(own, identity, Call::Save)?;
        if let Some(r) = found.iter().position(|&f| f != identity) {
            return Err(PfcError::Collective(format!(
                "rank {r} would save another set than rank {rank} (another pass or update \
                 count, another seed, or another folder than {}): every rank must save the same \
                 step of one run into one folder; no rank's file changed",
                folder.display()
            )));
        }
        let pending = pending.ok_or_else(|| {
            PfcError::Collective("internal: the ranks agreed on a save that failed".into())
        })?;
        let renamed = replace_keeping_backup(pending, &path);
        let (backup, own) = match renamed {
            Ok(backup) => (Some(backup), None),
            Err(e) => (None, Some(e)),
        };
        match self.agree(own, 0, Call::SaveCommit) {
            Ok(_) => {
                if let Some(Some(old)) = backup {
                    let _ = std::fs::remove_file(old);
                }
                Ok(path)
            }
            Err(e) => {
                // Some rank's rename (or its part of the agreement) failed: put back what was.
                if let Some(backup) = backup {
                    let restored = match backup {
                        Some(old) => std::fs::rename(&old, &path),
                        None => std::fs::remove_file(&path),
                    };
                    if let Err(undo) = restored {
                        return Err(PfcError::Collective(format!(
                            "{e}; and rank {rank} could not restore {}: {undo} (the folder now \
                             mixes two saves)",
                            path.display()
                        )));
                    }
                }
                Err(e)
            }
        }
    }
}

/// Renames `pending` over `path`, first moving the file it replaces (if any: a link too, even
/// a dangling one) aside to a hidden backup name of its own beside it (`.NAME.prev<pid>.<n>`):
/// two renames, constant time and no space, and a restore is one rename back. Returns the
/// backup's name, `None` when there was nothing to keep. On an error nothing changed (the old
/// file is moved back).
fn replace_keeping_backup(pending: PendingFile, path: &Path) -> Result<Option<PathBuf>> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let backup = if std::fs::symlink_metadata(path).is_ok() {
        let name = path
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let backup = path.with_file_name(format!(".{name}.prev{}.{n}", std::process::id()));
        if std::fs::symlink_metadata(&backup).is_ok() {
            // Never replace a file of that name: it may be a killed save's only old copy.
            return Err(PfcError::Io {
                path: backup,
                source: std::io::Error::from(std::io::ErrorKind::AlreadyExists),
            });
        }
        std::fs::rename(path, &backup).map_err(io(&backup))?;
        Some(backup)
    } else {
        None
    };
    if let Err(e) = pending.commit() {
        if let Some(b) = &backup {
            let _ = std::fs::rename(b, path);
        }
        return Err(e);
    }
    Ok(backup)
}
