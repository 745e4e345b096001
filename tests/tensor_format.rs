//! The crate reads and writes safetensors itself (a tensor or a block at a time, for shards of
//! tens of gigabytes); the safetensors crate, the format's reference implementation, must read
//! what it writes, and it must read what that crate writes.

use partial_fc::tensor_file::{write_atomic, OutTensor, TensorFile};
use std::collections::HashMap;

#[test]
fn files_the_crate_writes_are_read_by_safetensors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ours.safetensors");
    let small: Vec<f32> = (0..6).map(|i| i as f32 * 0.5 - 1.0).collect();
    let labels: Vec<i64> = vec![-1, 0, 1 << 40, i64::MAX];
    // Enough values for two blocks of the streamed writer.
    let big_len = partial_fc::tensor_file::STREAM_BLOCK + 3;
    let big = |offset: usize, len: usize| {
        Ok((offset..offset + len)
            .map(|i| (i % 1000) as f32)
            .collect::<Vec<f32>>())
    };
    let meta: HashMap<String, String> = [("step".to_string(), "7".to_string())].into();
    write_atomic(
        &path,
        &[
            OutTensor::F32("small", vec![2, 3], &small),
            OutTensor::I64("labels", vec![4], &labels),
            OutTensor::F32Blocks("big", vec![big_len], &big),
        ],
        meta,
    )
    .unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(header.metadata().as_ref().unwrap()["step"], "7");
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let f32s = |name: &str| -> Vec<f32> {
        let t = file.tensor(name).unwrap();
        assert_eq!(t.dtype(), safetensors::Dtype::F32);
        t.data()
            .chunks(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect()
    };
    assert_eq!(file.tensor("small").unwrap().shape(), [2, 3]);
    assert_eq!(f32s("small"), small);
    let big_read = f32s("big");
    assert_eq!(big_read.len(), big_len);
    assert!(big_read
        .iter()
        .enumerate()
        .all(|(i, &v)| v == (i % 1000) as f32));
    let t = file.tensor("labels").unwrap();
    assert_eq!(t.dtype(), safetensors::Dtype::I64);
    let read: Vec<i64> = t
        .data()
        .chunks(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
        .collect();
    assert_eq!(read, labels);
}

#[test]
fn files_safetensors_writes_are_read_by_the_crate() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("theirs.safetensors");
    let w: Vec<f32> = (0..12).map(|i| i as f32 - 5.5).collect();
    let l: Vec<i64> = vec![3, -7, 1 << 50];
    let wb: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
    let lb: Vec<u8> = l.iter().flat_map(|v| v.to_le_bytes()).collect();
    let views = vec![
        (
            "w",
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![3, 4], &wb).unwrap(),
        ),
        (
            "l",
            safetensors::tensor::TensorView::new(safetensors::Dtype::I64, vec![3], &lb).unwrap(),
        ),
    ];
    let meta: HashMap<String, String> = [("k".to_string(), "v".to_string())].into();
    safetensors::serialize_to_file(views, Some(meta), &path).unwrap();
    let file = TensorFile::read(&path).unwrap();
    assert_eq!(file.metadata()["k"], "v");
    assert_eq!(file.f32("w").unwrap().unwrap(), (w.clone(), vec![3, 4]));
    assert_eq!(file.i64("l").unwrap().unwrap(), (l, vec![3]));
    assert_eq!(file.f32_block("w", 5, 4).unwrap(), w[5..9]);
}

/// A header whose data_offsets lie near u64::MAX is a typed error, not an integer overflow
/// (found by a review: both headers panicked with "attempt to add with overflow").
#[test]
fn offsets_that_overflow_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let max = u64::MAX;
    for (i, header) in [
        format!(r#"{{"w":{{"dtype":"U8","shape":[0],"data_offsets":[{max},{max}]}}}}"#),
        format!(r#"{{"w":{{"dtype":"U8","shape":[{max}],"data_offsets":[0,{max}]}}}}"#),
    ]
    .iter()
    .enumerate()
    {
        let path = dir.path().join(format!("hostile{i}.safetensors"));
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(&[7u8; 4]);
        std::fs::write(&path, &bytes).unwrap();
        match partial_fc::tensor_file::TensorFile::read(&path) {
            Err(partial_fc::PfcError::Format { .. }) => {}
            other => panic!(
                "header {i}: expected a format error, got {:?}",
                other.map(|_| ())
            ),
        }
    }
}

/// A pipe given as a tensor file is refused at once (its open would block until a writer came,
/// and the file is read in several passes), naming it.
#[cfg(unix)]
#[test]
fn a_pipe_is_refused_without_blocking() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status();
    assert!(
        made.is_ok_and(|s| s.success()),
        "mkfifo (coreutils) is needed"
    );
    let e = partial_fc::tensor_file::TensorFile::read(&fifo)
        .err()
        .expect("a pipe must be refused");
    assert!(e.to_string().contains("not a regular file"), "{e}");
}
