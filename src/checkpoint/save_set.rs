//! `PartialFc::save_set`: every rank's checkpoint written as a set, all or none, through two
//! agreements: one that every rank wrote its file (and is at the same step of the same run, into
//! the same folder) before any renames, one that every rename succeeded before the old files'
//! backups go.

use super::shard_file_name;
use crate::atomic_file::PendingFile;
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
    /// folder keeps the set it held. Left uncovered: a job killed during the renames, and a
    /// group that breaks inside the second agreement after some ranks had its answer (the
    /// others then restore): both leave a mix, which [`CheckpointSet::open`] refuses as such.
    /// Files of another world size in `dir` are not touched (a folder per world size, or per
    /// checkpoint, keeps `open`'s globbing simple), and two jobs must not save into one folder
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

/// Renames `pending` over `path`, first keeping the file it replaces (if any) under a hidden
/// backup name beside it, as a hard link (or, where the file system has none, a copy). Returns
/// the backup's name, `None` when there was no file to keep. On an error nothing changed.
fn replace_keeping_backup(pending: PendingFile, path: &Path) -> Result<Option<PathBuf>> {
    let backup = if path.exists() {
        let name = path
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        let backup = path.with_file_name(format!(".{name}.prev{}", std::process::id()));
        let _ = std::fs::remove_file(&backup);
        std::fs::hard_link(path, &backup)
            .or_else(|_| std::fs::copy(path, &backup).map(|_| ()))
            .map_err(io(&backup))?;
        Some(backup)
    } else {
        None
    };
    if let Err(e) = pending.commit() {
        if let Some(b) = &backup {
            let _ = std::fs::remove_file(b);
        }
        return Err(e);
    }
    Ok(backup)
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> PfcError + '_ {
    move |source| PfcError::Io {
        path: path.to_path_buf(),
        source,
    }
}
