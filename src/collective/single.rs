//! The collective of a group of one: every operation is a copy or nothing.

use crate::backend::{Backend, Collective, Elem, ReduceOp};
use crate::error::Result;
use crate::plan::Dtype;

/// A world of one rank, for any backend.
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleRank;

impl<B: Backend> Collective<B> for SingleRank {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_gather<T: Elem>(
        &self,
        b: &B,
        send: &B::Buf<T>,
        count: usize,
        recv: &mut B::Buf<T>,
    ) -> Result<()> {
        b.copy(send, recv, count)
    }
    fn all_reduce_f32(&self, _: &B, _: &mut B::Buf<f32>, _: usize, _: ReduceOp) -> Result<()> {
        Ok(())
    }
    fn reduce_scatter_f32(
        &self,
        b: &B,
        send: &B::Buf<f32>,
        count: usize,
        recv: &mut B::Buf<f32>,
    ) -> Result<()> {
        b.copy(send, recv, count)
    }
    fn reduce_scatter_16(
        &self,
        b: &B,
        send: &B::Buf<u16>,
        count: usize,
        recv: &mut B::Buf<u16>,
        dtype: Dtype,
    ) -> Result<()> {
        // The sum over one rank is its own values, already in the dtype: nothing to round.
        super::check_16_bit(dtype)?;
        b.copy(send, recv, count)
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
}
