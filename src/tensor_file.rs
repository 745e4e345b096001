//! Safetensors reading and atomic writing, shared by checkpoints and step files.
//!
//! Why safetensors: the format the PyTorch world exchanges weights in, with a bounds-checked
//! header, so a truncated or corrupt file is an error rather than garbage.

use crate::error::{PfcError, Result};
use safetensors::{Dtype as StDtype, SafeTensors};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// A safetensors file read into memory and validated.
pub struct TensorFile {
    path: PathBuf,
    bytes: Vec<u8>,
    metadata: HashMap<String, String>,
}

fn format_err(path: &Path, reason: impl Into<String>) -> PfcError {
    PfcError::Format {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

impl TensorFile {
    /// Reads and parses `path` (header and every tensor's bounds are checked).
    pub fn read(path: &Path) -> Result<TensorFile> {
        let bytes = std::fs::read(path).map_err(|source| PfcError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let (_, meta) = SafeTensors::read_metadata(&bytes)
            .map_err(|e| format_err(path, format!("not a valid safetensors file ({e})")))?;
        let metadata = meta.metadata().clone().unwrap_or_default();
        SafeTensors::deserialize(&bytes)
            .map_err(|e| format_err(path, format!("not a valid safetensors file ({e})")))?;
        Ok(TensorFile {
            path: path.to_path_buf(),
            bytes,
            metadata,
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

    fn view(&self, name: &str, want: StDtype) -> Result<Option<(Vec<usize>, &[u8])>> {
        let st = SafeTensors::deserialize(&self.bytes)
            .map_err(|e| format_err(&self.path, e.to_string()))?;
        let view = match st.tensor(name) {
            Ok(v) => v,
            Err(_) => return Ok(None),
        };
        if view.dtype() != want {
            return Err(format_err(
                &self.path,
                format!("tensor {name} is {:?}, {want:?} expected", view.dtype()),
            ));
        }
        let shape = view.shape().to_vec();
        // The data borrows self.bytes, which outlives the SafeTensors view.
        let start = view.data().as_ptr() as usize - self.bytes.as_ptr() as usize;
        Ok(Some((shape, &self.bytes[start..start + view.data().len()])))
    }

    /// An f32 tensor and its shape, `None` if absent.
    pub fn f32(&self, name: &str) -> Result<Option<(Vec<f32>, Vec<usize>)>> {
        Ok(self.view(name, StDtype::F32)?.map(|(shape, data)| {
            let values = data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            (values, shape)
        }))
    }

    /// An i64 tensor and its shape, `None` if absent.
    pub fn i64(&self, name: &str) -> Result<Option<(Vec<i64>, Vec<usize>)>> {
        Ok(self.view(name, StDtype::I64)?.map(|(shape, data)| {
            let values = data
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")))
                .collect();
            (values, shape)
        }))
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
}

/// Writes tensors and metadata to `path` atomically: to a temporary file beside it, then a
/// rename, so a crash or a full disk never leaves a half-written file under the final name.
pub fn write_atomic(
    path: &Path,
    tensors: &[OutTensor<'_>],
    metadata: HashMap<String, String>,
) -> Result<()> {
    let mut owned: Vec<(String, StDtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for t in tensors {
        match t {
            OutTensor::F32(name, shape, data) => owned.push((
                name.to_string(),
                StDtype::F32,
                shape.clone(),
                data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            )),
            OutTensor::I64(name, shape, data) => owned.push((
                name.to_string(),
                StDtype::I64,
                shape.clone(),
                data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            )),
        }
    }
    let views = owned
        .iter()
        .map(|(n, dt, shape, bytes)| {
            safetensors::tensor::TensorView::new(*dt, shape.clone(), bytes)
                .map(|v| (n.clone(), v))
                .map_err(|e| format_err(path, format!("tensor {n}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let bytes = safetensors::serialize(views, Some(metadata))
        .map_err(|e| format_err(path, e.to_string()))?;
    crate::atomic_file::write_bytes_atomic(path, &bytes)
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

/// Writes and flushes to the disk, so the rename that follows never exposes unwritten data.
pub(crate) fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut file = std::fs::File::create(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}
