//! What a command may write its output file over. The files are written atomically (a
//! temporary file beside the destination, then a rename), so a refusal here is the only thing
//! that keeps an existing file: it is checked before any work, and again just before the write
//! (a long prediction leaves time for another program to put a file there).

use crate::text::progress;
use partial_fc::checkpoint::FORMAT;
use std::io::Read;
use std::path::Path;

/// The largest safetensors header read to look for a checkpoint's metadata (as the crate's
/// reader allows).
const MAX_HEADER: u64 = 32 << 20;

/// Whether an existing file may be replaced.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    /// Only with `--force` (`pfc predict --out`).
    RefuseUnlessForced { force: bool },
    /// Yes (`pfc step --output`, whose output is rewritten run after run).
    Replace,
}

/// Refuses `out` (given as `flag`) when it is a folder, its folder does not exist, it is a
/// device, a pipe or a socket, it is one of `inputs`, it is a partial-fc checkpoint shard
/// (never, `--force` or not), or it exists and `existing` does not allow replacing it.
pub fn refuse_unsafe_output(
    flag: &str,
    out: &Path,
    inputs: &[&Path],
    existing: Existing,
) -> Result<(), String> {
    let shown = out.display();
    // `dir/`, `dir/.`, `..`: a folder's name, whether the folder exists or not (read from the
    // text: `Path::components` drops a trailing `.`).
    let text = out.as_os_str().to_string_lossy();
    let last = text.rsplit(std::path::is_separator).next().unwrap_or("");
    if out.is_dir() || matches!(last, "" | "." | "..") {
        return Err(format!("{flag} {shown} names a folder: give a file name"));
    }
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !parent.is_dir() {
        return Err(format!(
            "{flag} {shown}: the folder {} does not exist",
            parent.display()
        ));
    }
    // The output is written after the work: a folder that takes no new file (read-only, full
    // of inodes) is found now, by making and removing a file there.
    // A name taken (a probe a killed run left, another process's) moves on to the next.
    let mut attempt = 0u32;
    loop {
        let probe = parent.join(format!(".pfc-write-check-{}-{attempt}", std::process::id()));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&probe)
        {
            Ok(_) => {
                let _ = std::fs::remove_file(&probe);
                break;
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempt < 100 => {
                attempt += 1;
            }
            Err(e) => {
                return Err(format!(
                    "{flag} {shown}: cannot write in the folder {}: {e}",
                    parent.display()
                ))
            }
        }
    }
    // A link counts as there (even one to nothing): the rename would replace it.
    let Ok(meta) = std::fs::symlink_metadata(out) else {
        return Ok(());
    };
    if !meta.is_file() && !meta.is_symlink() {
        return Err(format!(
            "{flag} {shown} is not a regular file (a device, a pipe or a socket): the output \
             would replace it; write it elsewhere"
        ));
    }
    if let Ok(out_canonical) = std::fs::canonicalize(out) {
        for input in inputs {
            if std::fs::canonicalize(input).ok().as_ref() == Some(&out_canonical) {
                let which = if inputs.len() == 1 {
                    "the input file"
                } else {
                    "one of the input files"
                };
                return Err(format!(
                    "{flag} {shown} is {which}: write the output elsewhere"
                ));
            }
        }
    }
    if let Some(shard) = checkpoint_shard(out) {
        return Err(format!(
            "{flag} {shown} is a partial-fc checkpoint shard ({shard}): it is never replaced, \
             --force or not; write the output elsewhere"
        ));
    }
    match existing {
        Existing::Replace | Existing::RefuseUnlessForced { force: true } => Ok(()),
        Existing::RefuseUnlessForced { force: false } => Err(format!(
            "{flag} {shown} exists: give --force to replace it, or another name"
        )),
    }
}

/// If `path` is a partial-fc checkpoint shard (its safetensors metadata's `format` is the
/// checkpoint format, this version's or a later one's), which one: `rank 0 of 2, step 10`.
/// Only the header is read, so a truncated shard is still recognized.
fn checkpoint_shard(path: &Path) -> Option<String> {
    // Only a regular file (through a link too) can be a shard; opening a pipe would block.
    if !std::fs::metadata(path).ok()?.is_file() {
        return None;
    }
    let mut file = std::fs::File::open(path).ok()?;
    let mut n = [0u8; 8];
    file.read_exact(&mut n).ok()?;
    let n = u64::from_le_bytes(n);
    if n > MAX_HEADER {
        return None;
    }
    let mut header = Vec::new();
    file.take(n).read_to_end(&mut header).ok()?;
    // The raw text of each entry, not a tree of JSON values (tens of bytes per number), and the
    // metadata parsed only when it is of a checkpoint's size.
    type Raw = Box<serde_json::value::RawValue>;
    let header: std::collections::HashMap<String, Raw> = serde_json::from_slice(&header).ok()?;
    // The readers' own cap (src/tensor_file.rs): a file with more metadata is no shard any
    // reader of this crate takes, and a shard of up to this much (a trainer's metadata) must
    // still be recognized, or an output would replace it (a review found 2 MiB replaced).
    let meta = header.get("__metadata__")?.get();
    if meta.len() > 16 << 20 {
        return None;
    }
    let meta: std::collections::HashMap<String, String> = serde_json::from_str(meta).ok()?;
    let field = |key: &str| meta.get(key).map(String::as_str);
    let family = FORMAT.split('/').next().unwrap_or(FORMAT);
    let format = field("format")?;
    if format != FORMAT && format.split('/').next() != Some(family) {
        return None;
    }
    let described = match (field("rank"), field("world_size"), field("step")) {
        (Some(rank), Some(world), Some(step)) => {
            // Files from before the update count was recorded stepped once per pass.
            let updates = field("optimizer_steps").unwrap_or(step);
            match (step.parse(), updates.parse()) {
                (Ok(p), Ok(u)) => format!("rank {rank} of {world}, {}", progress(p, u)),
                _ => format!("rank {rank} of {world}, step {step}"),
            }
        }
        _ => format!("format {format}"),
    };
    // The file's own text, in an error line: control characters escaped, at most 200 kept.
    Some(
        described
            .chars()
            .take(200)
            .flat_map(|c| c.escape_debug())
            .collect(),
    )
}
