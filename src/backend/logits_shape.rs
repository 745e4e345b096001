//! The shape of the logits matrix: `rows × cols` values, each row `ld` elements after the last.
//!
//! Why a row stride: the number of sampled classes `S = int(r · C/k)` is whatever the sample rate
//! makes it (104,857 for r = 0.1 of 2^20 classes, odd), and a matrix whose rows are an odd number
//! of elements apart has no row after the first on a 16-byte boundary. cuBLAS documents that its
//! tensor-core GEMMs want every leading dimension a multiple of 16 bytes (8 elements of f16/bf16),
//! and the softmax kernels' vector loads want rows on 16-byte boundaries too. So the layer lays
//! its logits out with `ld` = `cols` rounded up to [`LOGITS_ROW_ALIGN`] elements: at most 7 more
//! values per row, and the GEMMs, the softmax and the planner share one layout.
//!
//! The padding columns `cols..ld` carry no class. The softmax passes use none of their values,
//! and the passes that write the gradient (pass 3 and the one-kernel softmax) write zeros there,
//! so a backward GEMM that runs over all `ld` columns adds nothing from them (the layer keeps the
//! matching rows of the sampled centers zero, so that nothing non-finite meets those zeros).

use crate::error::{PfcError, Result};

/// Elements a padded logits row is rounded up to: 8, 16 bytes of f16/bf16 (32 of f32).
pub const LOGITS_ROW_ALIGN: usize = 8;

/// `rows × cols` logits, rows `ld` elements apart (`ld ≥ cols`).
///
/// ```
/// use partial_fc::backend::LogitsShape;
///
/// let s = LogitsShape::aligned(1024, 104_857).unwrap();
/// assert_eq!(s.ld, 104_864);
/// assert_eq!(s.len().unwrap(), 1024 * 104_864);
/// assert_eq!(LogitsShape::dense(3, 5).ld, 5);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogitsShape {
    /// Rows (embeddings of the gathered batch).
    pub rows: usize,
    /// Columns that hold a class (the sampled centers).
    pub cols: usize,
    /// Elements from the start of one row to the start of the next.
    pub ld: usize,
}

impl LogitsShape {
    /// Rows stored back to back (`ld = cols`).
    pub fn dense(rows: usize, cols: usize) -> Self {
        LogitsShape {
            rows,
            cols,
            ld: cols,
        }
    }

    /// Rows padded to a multiple of [`LOGITS_ROW_ALIGN`] elements: the layout the layer uses.
    ///
    /// # Errors
    ///
    /// [`PfcError::Shape`] when the padded row length overflows `usize`.
    pub fn aligned(rows: usize, cols: usize) -> Result<Self> {
        let ld = cols
            .checked_next_multiple_of(LOGITS_ROW_ALIGN)
            .ok_or_else(|| {
                PfcError::Shape(format!("a logits row of {cols} columns overflows usize"))
            })?;
        Ok(LogitsShape { rows, cols, ld })
    }

    /// Elements a buffer needs to hold the matrix: `rows × ld`.
    ///
    /// # Errors
    ///
    /// [`PfcError::Shape`] when `ld < cols` (rows would overlap) or the product overflows
    /// `usize`.
    pub fn len(&self) -> Result<usize> {
        if self.ld < self.cols {
            return Err(PfcError::Shape(format!(
                "logits rows {} elements apart cannot hold {} columns",
                self.ld, self.cols
            )));
        }
        self.rows.checked_mul(self.ld).ok_or_else(|| {
            PfcError::Shape(format!(
                "logits of {} rows × {} elements overflow usize",
                self.rows, self.ld
            ))
        })
    }

    /// Whether the matrix holds no value (no rows, or rows without columns).
    pub fn is_empty(&self) -> bool {
        self.rows == 0 || self.cols == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_rounds_up_to_eight_and_keeps_multiples() {
        for (cols, ld) in [(0, 0), (1, 8), (7, 8), (8, 8), (9, 16), (104_857, 104_864)] {
            assert_eq!(LogitsShape::aligned(2, cols).unwrap().ld, ld, "cols {cols}");
        }
    }

    #[test]
    fn overflowing_or_overlapping_shapes_are_errors() {
        assert!(LogitsShape::aligned(1, usize::MAX).is_err());
        assert!(LogitsShape::aligned(usize::MAX, 9).unwrap().len().is_err());
        let overlapping = LogitsShape {
            rows: 2,
            cols: 5,
            ld: 4,
        };
        assert!(overlapping.len().is_err());
    }
}
