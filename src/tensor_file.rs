//! Safetensors reading and atomic writing, shared by checkpoints and step files.
//!
//! Why safetensors: the format the PyTorch world exchanges weights in, with a bounds-checked
//! header, so a truncated or corrupt file is an error rather than garbage. The crate reads and
//! writes it itself, a tensor or a block at a time, because the safetensors crate needs whole
//! files and tensors in memory, which a shard of tens of gigabytes cannot afford; that crate
//! checks this code in tests/tensor_format.rs.

use crate::atomic_file::io_error as io_err;
use crate::error::{PfcError, Result};
use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// Largest header accepted: a file claiming more is refused before anything is allocated for
/// it. 32 MiB, below safetensors' own 100 MB: room for the largest metadata accepted (16 MiB)
/// and about 150,000 tensor entries, while a hostile header of millions of tiny entries (which
/// a JSON map holds at about 14 bytes per byte of text) stays under half a gigabyte.
pub(crate) const MAX_HEADER: u64 = 32 << 20;

/// Largest `__metadata__` accepted, in bytes of header text: a checkpoint's own entries take a
/// few hundred bytes and a trainer's (`save_with_metadata`) a few more; millions of tiny entries
/// in a 100 MB header made a load hold gigabytes for the file's life.
pub(crate) const MAX_METADATA_BYTES: usize = 16 << 20;

/// Longest shape accepted, in bytes of text: 64 dimensions of 20 digits. No tensor here has more
/// than 2; a shape of millions of dimensions was gigabytes to parse.
const MAX_SHAPE_TEXT: usize = 64 * 22;

/// Where one tensor lies in the file.
struct Entry {
    dtype: String,
    shape: Vec<usize>,
    /// Absolute byte range in the file.
    start: u64,
    end: u64,
}

/// A safetensors file whose header has been read and validated; tensors are read from the file
/// one at a time, straight into their vectors. A shard of hundreds of millions of classes is
/// tens of gigabytes: holding the file's bytes and the decoded tensors at once would double the
/// host memory a load needs.
pub struct TensorFile {
    path: PathBuf,
    metadata: HashMap<String, String>,
    tensors: HashMap<String, Entry>,
    /// The file as opened: each read checks it is still the same file (the offsets above are
    /// that file's).
    identity: Identity,
}

/// What tells one version of a file from another: its length and modification time, and on
/// Unix its device and inode (an atomic save, which renames a new file over the old one,
/// changes the inode even within the same second).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Identity {
    len: u64,
    modified: Option<std::time::SystemTime>,
    node: (u64, u64),
}

impl Identity {
    fn of(meta: &std::fs::Metadata) -> Identity {
        #[cfg(unix)]
        let node = {
            use std::os::unix::fs::MetadataExt;
            (meta.dev(), meta.ino())
        };
        #[cfg(not(unix))]
        let node = (0, 0);
        Identity {
            len: meta.len(),
            modified: meta.modified().ok(),
            node,
        }
    }
}

fn format_err(path: &Path, reason: impl Into<String>) -> PfcError {
    PfcError::Format {
        path: path.to_path_buf(),
        reason: printable(&reason.into()),
    }
}

/// At most this many characters of an error that quotes a file's own text.
const MAX_QUOTED: usize = 2000;

/// `text` as an error line may show it: control characters (a newline, an ANSI escape) escaped
/// and at most [`MAX_QUOTED`] characters kept. The reasons quote what a file holds (tensor
/// names, dtypes, metadata), and a hostile file could otherwise forge lines of a command's
/// output or fill the terminal with megabytes of one error.
pub(crate) fn printable(text: &str) -> String {
    let mut out = String::new();
    for (i, c) in text.chars().enumerate() {
        if i == MAX_QUOTED {
            out.push_str("… (cut)");
            break;
        }
        // Control characters, and the invisible ones that reorder or hide text (bidirectional
        // overrides and isolates, marks): shown as escapes.
        // Unicode's format characters (Cf) and line and paragraph separators (Zl, Zp), as
        // ranges: the standard library has no general category.
        let hidden = matches!(c,
            '\u{ad}' | '\u{600}'..='\u{605}' | '\u{61c}' | '\u{6dd}' | '\u{70f}' | '\u{180e}'
            | '\u{200b}'..='\u{200f}' | '\u{2028}'..='\u{202e}' | '\u{2060}'..='\u{206f}'
            | '\u{feff}' | '\u{fff9}'..='\u{fffb}' | '\u{110bd}' | '\u{1bca0}'..='\u{1bca3}'
            | '\u{1d173}'..='\u{1d17a}' | '\u{e0001}' | '\u{e0020}'..='\u{e007f}');
        if c.is_control() || hidden {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

fn f32_from_le(v: f32) -> f32 {
    f32::from_bits(u32::from_le(v.to_bits()))
}

fn f32_to_le(v: f32) -> f32 {
    f32::from_bits(v.to_bits().to_le())
}

fn dtype_bytes(dtype: &str) -> Option<u64> {
    Some(match dtype {
        "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" => 1,
        "I16" | "U16" | "F16" | "BF16" => 2,
        "I32" | "U32" | "F32" => 4,
        "I64" | "U64" | "F64" => 8,
        _ => return None,
    })
}

impl TensorFile {
    /// Opens `path` and validates its header: every tensor's dtype, shape and byte range, which
    /// must tile the data section exactly as the file's length says (so a truncated file is an
    /// error here, before any tensor is read).
    pub fn read(path: &Path) -> Result<TensorFile> {
        let bad =
            |reason: String| format_err(path, format!("not a valid safetensors file ({reason})"));
        // A pipe (a FIFO, `<(cat file)`) would block the open until a writer comes, and could
        // not be read twice anyway (the tensors are read after the header, some twice): looked
        // at before the open. A link is followed, as the open follows it.
        if let Ok(m) = std::fs::metadata(path) {
            if !m.is_file() && !m.is_dir() {
                return Err(io_err(path)(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "not a regular file (a pipe, a device or a socket): give a file, which is \
                     read in several passes",
                )));
            }
        }
        let mut file = File::open(path).map_err(io_err(path))?;
        let meta = file.metadata().map_err(io_err(path))?;
        if meta.is_dir() {
            return Err(io_err(path)(std::io::Error::new(
                std::io::ErrorKind::IsADirectory,
                "is a directory, not a safetensors file",
            )));
        }
        let identity = Identity::of(&meta);
        let len = meta.len();
        let mut n = [0u8; 8];
        file.read_exact(&mut n)
            .map_err(|_| bad("shorter than its 8-byte header length".into()))?;
        let n = u64::from_le_bytes(n);
        if n > MAX_HEADER || 8 + n > len {
            return Err(bad(format!("a header of {n} bytes in a file of {len}")));
        }
        let mut header = vec![0u8; n as usize];
        file.read_exact(&mut header).map_err(io_err(path))?;
        // Parsed in two levels over the raw text, never into a tree of JSON values: a tree costs
        // tens of bytes per number, so a 100 MB header of one long shape took 3.5 GB (a review's
        // hostile file). Each field is parsed into its type once its size is checked.
        type Raw = Box<serde_json::value::RawValue>;
        let header: HashMap<String, Raw> =
            serde_json::from_slice(&header).map_err(|e| bad(format!("header: {e}")))?;
        let data_start = 8 + n;
        let mut metadata = HashMap::new();
        let mut tensors = HashMap::new();
        let mut ranges = Vec::new();
        for (name, info) in header {
            if name == "__metadata__" {
                if info.get().len() > MAX_METADATA_BYTES {
                    return Err(bad(format!(
                        "__metadata__ of {} bytes (at most {MAX_METADATA_BYTES})",
                        info.get().len()
                    )));
                }
                metadata = serde_json::from_str(info.get())
                    .map_err(|e| bad(format!("__metadata__: {e}")))?;
                continue;
            }
            let info: HashMap<String, Raw> =
                serde_json::from_str(info.get()).map_err(|e| bad(format!("tensor {name}: {e}")))?;
            let field = |key: &str| {
                info.get(key)
                    .map(|v| v.get())
                    .ok_or_else(|| bad(format!("tensor {name} has no {key}")))
            };
            let dtype: String = serde_json::from_str(field("dtype")?)
                .map_err(|e| bad(format!("tensor {name}: dtype: {e}")))?;
            let shape_text = field("shape")?;
            if shape_text.len() > MAX_SHAPE_TEXT {
                return Err(bad(format!(
                    "tensor {name}: a shape of {} bytes of text (more dimensions than a tensor \
                     here has)",
                    shape_text.len()
                )));
            }
            let shape: Vec<usize> = serde_json::from_str(shape_text)
                .map_err(|e| bad(format!("tensor {name}: shape: {e}")))?;
            let offsets: Vec<u64> = serde_json::from_str(field("data_offsets")?)
                .map_err(|e| bad(format!("tensor {name}: data_offsets: {e}")))?;
            let [b, e] = offsets[..] else {
                return Err(bad(format!(
                    "tensor {name}: data_offsets holds {} numbers, 2 (begin, end) expected",
                    offsets.len()
                )));
            };
            let elem =
                dtype_bytes(&dtype).ok_or_else(|| bad(format!("tensor {name}: dtype {dtype}")))?;
            let bytes = shape
                .iter()
                .try_fold(elem, |acc, &d| acc.checked_mul(d as u64))
                .ok_or_else(|| bad(format!("tensor {name}: shape {shape:?} overflows")))?;
            if e < b || e - b != bytes {
                return Err(bad(format!(
                    "tensor {name}: {dtype} {shape:?} is {bytes} bytes, its data_offsets [{b}, {e}]"
                )));
            }
            // A hostile header's offsets may lie anywhere in u64: checked, not wrapped.
            let end = data_start
                .checked_add(e)
                .filter(|&end| end <= len)
                .ok_or_else(|| {
                    bad(format!(
                        "tensor {name}: data_offsets [{b}, {e}] pass the end of the file ({} \
                         data bytes)",
                        len.saturating_sub(data_start)
                    ))
                })?;
            ranges.push((b, e));
            tensors.insert(
                name,
                Entry {
                    dtype,
                    shape,
                    start: data_start + b,
                    end,
                },
            );
        }
        // The byte ranges must tile [0, data length) with no gap or overlap, as safetensors
        // writes them and checks them.
        ranges.sort_unstable();
        let mut at = 0u64;
        for (b, e) in ranges {
            if b != at {
                return Err(bad(format!("tensor data at byte {b}, {at} expected")));
            }
            at = e;
        }
        if data_start + at != len {
            return Err(bad(format!(
                "its tensors end at byte {}, the file at {len} (truncated or padded)",
                data_start + at
            )));
        }
        Ok(TensorFile {
            path: path.to_path_buf(),
            metadata,
            tensors,
            identity,
        })
    }

    /// The file's string metadata.
    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    /// A metadata entry parsed as `T`, `None` if absent.
    pub fn meta<T: std::str::FromStr>(&self, key: &str) -> Result<Option<T>> {
        match self.metadata.get(key) {
            None => Ok(None),
            Some(v) => v.parse().map(Some).map_err(|_| {
                format_err(&self.path, format!("metadata {key} = {v:?} does not parse"))
            }),
        }
    }

    /// Values `offset .. offset + len` of tensor `name`, which must have dtype `want` (of
    /// `T`'s size, little-endian in the file) and hold them.
    fn read_values<T: bytemuck::Pod + Default>(
        &self,
        name: &str,
        want: &str,
        (offset, len): (usize, usize),
        from_le: fn(T) -> T,
    ) -> Result<Vec<T>> {
        let entry = self
            .tensors
            .get(name)
            .ok_or_else(|| format_err(&self.path, format!("tensor {name} is missing")))?;
        if entry.dtype != want {
            return Err(format_err(
                &self.path,
                format!("tensor {name} is {}, {want} expected", entry.dtype),
            ));
        }
        let size = std::mem::size_of::<T>() as u64;
        let total = (entry.end - entry.start) / size;
        if (offset as u64)
            .checked_add(len as u64)
            .is_none_or(|end| end > total)
        {
            return Err(format_err(
                &self.path,
                format!("tensor {name}: values {offset}..+{len} of {total}"),
            ));
        }
        let mut values: Vec<T> = Vec::new();
        values.try_reserve_exact(len).map_err(|_| {
            format_err(
                &self.path,
                format!("tensor {name}: no memory for {len} values"),
            )
        })?;
        values.resize(len, T::default());
        let mut file = File::open(&self.path).map_err(io_err(&self.path))?;
        let now = Identity::of(&file.metadata().map_err(io_err(&self.path))?);
        if now != self.identity {
            return Err(format_err(
                &self.path,
                "the file changed since it was opened (replaced or rewritten): its header no \
                 longer describes it; read it again",
            ));
        }
        file.seek(SeekFrom::Start(entry.start + size * offset as u64))
            .and_then(|_| file.read_exact(bytemuck::cast_slice_mut(&mut values)))
            .map_err(io_err(&self.path))?;
        if cfg!(target_endian = "big") {
            values.iter_mut().for_each(|v| *v = from_le(*v));
        }
        Ok(values)
    }

    /// A whole tensor and its shape, `None` if the file has no such tensor.
    fn read_tensor<T: bytemuck::Pod + Default>(
        &self,
        name: &str,
        want: &str,
        from_le: fn(T) -> T,
    ) -> Result<Option<(Vec<T>, Vec<usize>)>> {
        let Some(entry) = self.tensors.get(name) else {
            return Ok(None);
        };
        let len = ((entry.end - entry.start) / std::mem::size_of::<T>() as u64) as usize;
        let values = self.read_values(name, want, (0, len), from_le)?;
        Ok(Some((values, entry.shape.clone())))
    }

    /// The dtype of tensor `name` as safetensors writes it (`F32`, `BF16`...), `None` if absent.
    pub fn dtype(&self, name: &str) -> Option<&str> {
        self.tensors.get(name).map(|e| e.dtype.as_str())
    }

    /// The shape of tensor `name`, `None` if absent.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|e| e.shape.as_slice())
    }

    /// Values `offset .. offset + len` of the f32 tensor `name` (which must exist and hold them).
    pub fn f32_block(&self, name: &str, offset: usize, len: usize) -> Result<Vec<f32>> {
        self.read_values(name, "F32", (offset, len), f32_from_le)
    }

    /// An f32 tensor and its shape, `None` if absent.
    pub fn f32(&self, name: &str) -> Result<Option<(Vec<f32>, Vec<usize>)>> {
        self.read_tensor(name, "F32", |v: f32| {
            f32::from_bits(u32::from_le(v.to_bits()))
        })
    }

    /// An i64 tensor and its shape, `None` if absent.
    pub fn i64(&self, name: &str) -> Result<Option<(Vec<i64>, Vec<usize>)>> {
        self.read_tensor(name, "I64", i64::from_le)
    }

    /// A tensor that must exist.
    pub fn require<T>(&self, name: &str, got: Result<Option<T>>) -> Result<T> {
        got?.ok_or_else(|| format_err(&self.path, format!("tensor {name} is missing")))
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// One tensor to write: name, shape, data.
pub enum OutTensor<'a> {
    /// f32 values.
    F32(&'a str, Vec<usize>, &'a [f32]),
    /// i64 values.
    I64(&'a str, Vec<usize>, &'a [i64]),
    /// f32 values produced a block at a time: `block(offset, len)` returns values
    /// `offset .. offset + len` (downloaded from a device, say), so that the host never holds
    /// more than a block of a shard that may be tens of gigabytes.
    F32Blocks(
        &'a str,
        Vec<usize>,
        &'a dyn Fn(usize, usize) -> Result<Vec<f32>>,
    ),
}

impl OutTensor<'_> {
    fn name(&self) -> &str {
        match self {
            OutTensor::F32(n, ..) | OutTensor::I64(n, ..) | OutTensor::F32Blocks(n, ..) => n,
        }
    }

    fn shape(&self) -> &[usize] {
        match self {
            OutTensor::F32(_, s, _) | OutTensor::I64(_, s, _) | OutTensor::F32Blocks(_, s, _) => s,
        }
    }

    /// The safetensors dtype and its bytes per value.
    fn dtype(&self) -> (&'static str, u64) {
        match self {
            OutTensor::I64(..) => ("I64", 8),
            _ => ("F32", 4),
        }
    }
}

/// The little-endian bytes of `values`: borrowed on a little-endian host (no copy of a shard
/// that may be tens of gigabytes), converted on a big-endian one.
fn le_bytes<T: bytemuck::Pod>(values: &[T], to_le: fn(T) -> T) -> std::borrow::Cow<'_, [u8]> {
    if cfg!(target_endian = "little") {
        std::borrow::Cow::Borrowed(bytemuck::cast_slice(values))
    } else {
        let converted: Vec<T> = values.iter().map(|&v| to_le(v)).collect();
        std::borrow::Cow::Owned(bytemuck::cast_slice(&converted).to_vec())
    }
}

/// Values per block of a streamed tensor ([`OutTensor::F32Blocks`]) and of a checkpoint's
/// streamed load: 64 MiB of f32.
pub const STREAM_BLOCK: usize = 1 << 24;

/// Writes tensors and metadata to a safetensors file at `path` atomically: to a temporary file
/// beside it, then a rename, so a crash or a full disk never leaves a half-written file under
/// the final name. The data goes out from the caller's slices (no serialized copy in memory) or
/// a block at a time. The safetensors crate writes only from whole tensors in memory, hence
/// this writer; tests/tensor_format.rs checks that the crate reads what it writes.
pub fn write_atomic(
    path: &Path,
    tensors: &[OutTensor<'_>],
    metadata: HashMap<String, String>,
) -> Result<()> {
    write_pending(path, tensors, metadata)?.commit()
}

/// The first half of [`write_atomic`]: the file is written and flushed to the disk under a
/// temporary name beside `path`, and renamed over it only by
/// [`PendingFile::commit`](crate::atomic_file::PendingFile::commit) (dropped uncommitted, it is
/// removed). For files that must appear together or not at all, such as the ranks of
/// `checkpoint::reshard`: none takes its final name before every one is written.
pub(crate) fn write_pending(
    path: &Path,
    tensors: &[OutTensor<'_>],
    metadata: HashMap<String, String>,
) -> Result<crate::atomic_file::PendingFile> {
    use std::io::Write;
    // A file `read` would refuse is not written (a review found `save_with_metadata` writing
    // 17 MB of metadata that every reader then refused).
    let metadata_bytes = serde_json::to_string(&metadata).map_or(0, |m| m.len());
    if metadata_bytes > MAX_METADATA_BYTES {
        return Err(format_err(
            path,
            format!(
                "not written: {metadata_bytes} bytes of metadata, more than the {MAX_METADATA_BYTES} \
                 a reader accepts"
            ),
        ));
    }
    let mut header = serde_json::Map::new();
    header.insert(
        "__metadata__".into(),
        serde_json::to_value(&metadata).unwrap_or_default(),
    );
    let mut at = 0u64;
    let mut lens = Vec::new();
    for t in tensors {
        let len = t
            .shape()
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| format_err(path, format!("tensor {}: shape overflows", t.name())))?;
        let given = match t {
            OutTensor::F32(_, _, v) => Some(v.len()),
            OutTensor::I64(_, _, v) => Some(v.len()),
            OutTensor::F32Blocks(..) => None,
        };
        if given.is_some_and(|g| g != len) {
            return Err(format_err(
                path,
                format!(
                    "tensor {}: {} values for shape {:?}",
                    t.name(),
                    given.unwrap_or(0),
                    t.shape()
                ),
            ));
        }
        let (dtype, size) = t.dtype();
        let end = at + size * len as u64;
        header.insert(
            t.name().into(),
            serde_json::json!({"dtype": dtype, "shape": t.shape(), "data_offsets": [at, end]}),
        );
        lens.push(len);
        at = end;
    }
    let mut header = serde_json::to_vec(&header).map_err(|e| format_err(path, e.to_string()))?;
    // Padded with spaces to a multiple of 8, as safetensors writes it, so that the data that
    // follows is aligned for readers that map the file.
    header.resize(header.len().div_ceil(8) * 8, b' ');
    crate::atomic_file::write_pending_with(path, |file| {
        let io = crate::atomic_file::io_error(path);
        let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
        out.write_all(&(header.len() as u64).to_le_bytes())
            .map_err(&io)?;
        out.write_all(&header).map_err(&io)?;
        for (t, &len) in tensors.iter().zip(&lens) {
            let block = match t {
                OutTensor::F32(_, _, v) => {
                    out.write_all(&le_bytes(v, f32_to_le)).map_err(&io)?;
                    continue;
                }
                OutTensor::I64(_, _, v) => {
                    out.write_all(&le_bytes(v, i64::to_le)).map_err(&io)?;
                    continue;
                }
                OutTensor::F32Blocks(_, _, block) => block,
            };
            let mut offset = 0;
            while offset < len {
                let n = STREAM_BLOCK.min(len - offset);
                let values = block(offset, n)?;
                if values.len() != n {
                    return Err(format_err(
                        path,
                        format!(
                            "tensor {}: a block of {} values, {n} expected",
                            t.name(),
                            values.len()
                        ),
                    ));
                }
                out.write_all(&le_bytes(&values, f32_to_le)).map_err(&io)?;
                offset += n;
            }
        }
        out.flush().map_err(&io)
    })
}

/// A temporary path beside `path`, unique per process and call: ranks of one process writing
/// `ckpt.rank0` and `ckpt.rank1` at once must not share a temporary file.
pub(crate) fn temp_path_beside(path: &Path) -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let name = path
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp{}.{n}", std::process::id()))
}
