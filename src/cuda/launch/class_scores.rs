//! `class_max_cosine` (the hard-negative scores of the sampler) and `class_top_k` (prediction):
//! every class of the shard scored against a batch of normalized embeddings, a chunk of classes
//! at a time, so the full `rows × shard` matrix is never held (CPU references:
//! src/cpu/hard_negatives.rs and src/cpu/top_k.rs). A chunk is normalized with cuda/normalize.cu's
//! `normalize_rows`, scored with a cuBLAS GEMM, and reduced with normalize.cu's `row_max_into`
//! or `top_k_merge`; the two share that first half (`score_class_chunk`), each laying the
//! cosines out for its reduction.

use super::common::{i32_of, launch, need, need_product, per_row, per_warp_row};
use crate::backend::Backend;
use crate::cuda::{dev, CudaBackend};
use crate::error::Result;
use cudarc::cublas::sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
use cudarc::driver::{CudaSlice, PushKernelArg};

/// How a chunk's cosines are laid out (see `CudaBackend::score_class_chunk`).
#[derive(Clone, Copy)]
enum CosineLayout {
    /// `len × rows`: a class's cosines with every row are contiguous.
    ClassesByRows,
    /// `rows × len`: a row's cosines with every class are contiguous.
    RowsByClasses,
}

impl CudaBackend {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn launch_class_max_cosine(
        &self,
        weight: &CudaSlice<f32>,
        shard_len: usize,
        dim: usize,
        x_hat: &CudaSlice<f32>,
        row_labels: &CudaSlice<i64>,
        rows: usize,
        chunk_weights: &mut CudaSlice<f32>,
        chunk_cosines: &mut CudaSlice<f32>,
        scores: &mut CudaSlice<f32>,
    ) -> Result<()> {
        need_product(weight, [shard_len, dim], "class_max_cosine weight")?;
        need(row_labels, rows, "class_max_cosine row_labels")?;
        need_product(x_hat, [rows, dim], "class_max_cosine x_hat")?;
        need(scores, shard_len, "class_max_cosine scores")?;
        if shard_len == 0 || rows == 0 || dim == 0 {
            return Ok(());
        }
        let chunk = (chunk_weights.len() / dim)
            .min(chunk_cosines.len() / rows)
            .max(1);
        need_product(
            chunk_weights,
            [chunk.min(shard_len), dim],
            "class_max_cosine chunk_weights",
        )?;
        need_product(
            chunk_cosines,
            [chunk.min(shard_len), rows],
            "class_max_cosine chunk_cosines",
        )?;
        let rows_i = i32_of(rows, "rows")?;
        for start in (0..shard_len).step_by(chunk) {
            let len = chunk.min(shard_len - start);
            let len_i = len as i32;
            let mut out = scores.slice_mut(start..start + len);
            self.score_class_chunk(
                weight,
                start..start + len,
                dim,
                x_hat,
                rows,
                chunk_weights,
                chunk_cosines,
                CosineLayout::ClassesByRows,
            )?;
            launch!(
                self,
                "row_max_into",
                per_row(len),
                &*chunk_cosines,
                row_labels,
                &len_i,
                &rows_i,
                &mut out
            );
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn launch_class_top_k(
        &self,
        weight: &CudaSlice<f32>,
        shard_len: usize,
        dim: usize,
        x_hat: &CudaSlice<f32>,
        rows: usize,
        k: usize,
        chunk_weights: &mut CudaSlice<f32>,
        chunk_cosines: &mut CudaSlice<f32>,
        top_scores: &mut CudaSlice<f32>,
        top_ids: &mut CudaSlice<i32>,
    ) -> Result<()> {
        crate::cpu::top_k::check_k(k)?;
        need_product(weight, [shard_len, dim], "class_top_k weight")?;
        need_product(x_hat, [rows, dim], "class_top_k x_hat")?;
        need_product(top_scores, [rows, k], "class_top_k top_scores")?;
        need_product(top_ids, [rows, k], "class_top_k top_ids")?;
        i32_of(shard_len, "shard_len")?;
        let chunk = crate::cpu::top_k::chunk_len(
            chunk_weights.len(),
            chunk_cosines.len(),
            dim,
            rows,
            shard_len,
        );
        need_product(chunk_weights, [chunk, dim], "class_top_k chunk_weights")?;
        need_product(chunk_cosines, [chunk, rows], "class_top_k chunk_cosines")?;
        self.upload_at(&vec![f32::NEG_INFINITY; rows * k], top_scores, 0)?;
        self.upload_at(&vec![-1i32; rows * k], top_ids, 0)?;
        if shard_len == 0 || rows == 0 || dim == 0 {
            return Ok(());
        }
        let k_i = i32_of(k, "k")?;
        for start in (0..shard_len).step_by(chunk) {
            let len = chunk.min(shard_len - start);
            let (len_i, start_i) = (len as i32, start as i32);
            self.score_class_chunk(
                weight,
                start..start + len,
                dim,
                x_hat,
                rows,
                chunk_weights,
                chunk_cosines,
                CosineLayout::RowsByClasses,
            )?;
            launch!(
                self,
                "top_k_merge",
                per_row(rows),
                &*chunk_cosines,
                &len_i,
                &start_i,
                &k_i,
                &mut *top_scores,
                &mut *top_ids
            );
        }
        Ok(())
    }

    /// The shared first half of `class_max_cosine` and `class_top_k`: normalizes the classes
    /// `classes` of `weight` into `chunk_weights`, then scores them
    /// against the `rows` normalized embeddings `x_hat` into `cosines`, in the layout the
    /// caller's reduction reads (a class's cosines contiguous for a per-class max, a row's for a
    /// per-row top k). The caller checked every size. Neither caller needs the centers' norms:
    /// the normalization writes them to the head of `cosines`, which the GEMM then overwrites
    /// (same stream), so scoring allocates no scratch after the ranks agreed to run.
    #[allow(clippy::too_many_arguments)]
    fn score_class_chunk(
        &self,
        weight: &CudaSlice<f32>,
        classes: std::ops::Range<usize>,
        dim: usize,
        x_hat: &CudaSlice<f32>,
        rows: usize,
        chunk_weights: &mut CudaSlice<f32>,
        cosines: &mut CudaSlice<f32>,
        layout: CosineLayout,
    ) -> Result<()> {
        let len = classes.len();
        let (len_i, dim_i) = (i32_of(len, "chunk")?, i32_of(dim, "dim")?);
        let w = weight.slice(classes.start * dim..classes.end * dim);
        let mut norms = cosines.slice_mut(0..len);
        launch!(
            self,
            "normalize_rows",
            per_warp_row(len),
            &w,
            &len_i,
            &dim_i,
            &mut *chunk_weights,
            &mut norms
        );
        match layout {
            // cosines[len × rows] = chunk_weights[len × dim] · x_hatᵀ
            CosineLayout::ClassesByRows => self.sgemm_rowmajor(
                CUBLAS_OP_T,
                CUBLAS_OP_N,
                len,
                rows,
                dim,
                x_hat,
                dim,
                &*chunk_weights,
                dim,
                cosines,
            ),
            // cosines[rows × len] = x_hat[rows × dim] · chunk_weights[len × dim]ᵀ
            CosineLayout::RowsByClasses => self.sgemm_rowmajor(
                CUBLAS_OP_T,
                CUBLAS_OP_N,
                rows,
                len,
                dim,
                &*chunk_weights,
                dim,
                x_hat,
                dim,
                cosines,
            ),
        }
    }
}
