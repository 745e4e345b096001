//! Any backend's ranks talking through a host collective: each operation downloads the operand,
//! runs the CPU collective on it, and uploads the result.
//!
//! This is the "virtual ranks" mode: k shards on one device (or k devices without NCCL), each rank
//! a thread with its own backend, exchanging through a [`super::ThreadGroup`]. It is slow by
//! design (every collective crosses PCIe), and exact: the distributed softmax, the all-gather and
//! the reduce-scatter paths run on the real device kernels and can be compared with the CPU.

use crate::backend::{Backend, Collective, Elem, ReduceOp};
use crate::cpu::CpuBackend;
use crate::error::{PfcError, Result};
use crate::plan::Dtype;

/// `count × world_size` elements of a gathered or scattered buffer, or a typed error when the
/// product overflows `usize` (no buffer that long exists, and the wrapped length must not be
/// used to size one).
fn group_len(count: usize, world_size: usize, what: &str) -> Result<usize> {
    count.checked_mul(world_size).ok_or_else(|| {
        PfcError::Collective(format!(
            "{what}: {count} elements × {world_size} ranks overflow usize"
        ))
    })
}

/// Wraps a host collective for any backend.
///
/// ```
/// use partial_fc::collective::{HostStaged, ThreadGroup};
/// use partial_fc::{Collective, CpuBackend, ReduceOp};
/// let sums = ThreadGroup::run(2, |c| {
///     let staged = HostStaged::new(c);
///     let mut v = vec![1.0f32, 2.0];
///     staged.all_reduce_f32(&CpuBackend, &mut v, 2, ReduceOp::Sum).unwrap();
///     v
/// });
/// assert_eq!(sums[1], vec![2.0, 4.0]);
/// ```
#[derive(Debug)]
pub struct HostStaged<C> {
    inner: C,
}

impl<C> HostStaged<C> {
    /// Wraps `inner`.
    pub fn new(inner: C) -> Self {
        HostStaged { inner }
    }
}

impl<C: Collective<CpuBackend>> HostStaged<C> {
    /// This rank's part before the host collective (a size check, a download): on failure the
    /// group is broken, so that the peers already in the collective fail at once instead of
    /// waiting for a rank that will not come (see [`Collective::abort`]).
    fn staged<T>(&self, what: &str, prepare: impl FnOnce() -> Result<T>) -> Result<T> {
        prepare().inspect_err(|e| self.inner.abort(&format!("{what}: {e}")))
    }

    /// This rank's part after the host collective (the upload of its result): the peers may
    /// already have returned, so a failure here breaks the group too rather than leaving it
    /// whole with this rank out of step.
    fn unstaged(&self, what: &str, result: Result<()>) -> Result<()> {
        result.inspect_err(|e| self.inner.abort(&format!("{what}: {e}")))
    }
}

/// `recv` holds `len` elements: checked before the collective, so that a short buffer is this
/// rank's refusal (the group broken at once) rather than a failure after its peers succeeded.
fn need_recv<B: Backend, T: Elem>(b: &B, recv: &B::Buf<T>, len: usize, what: &str) -> Result<()> {
    if b.len(recv) < len {
        return Err(PfcError::Shape(format!(
            "{what}: receive buffer of {} elements, {len} needed",
            b.len(recv)
        )));
    }
    Ok(())
}

impl<B: Backend, C: Collective<CpuBackend>> Collective<B> for HostStaged<C> {
    fn rank(&self) -> usize {
        self.inner.rank()
    }

    fn world_size(&self) -> usize {
        self.inner.world_size()
    }

    fn all_gather<T: Elem>(
        &self,
        b: &B,
        send: &B::Buf<T>,
        count: usize,
        recv: &mut B::Buf<T>,
    ) -> Result<()> {
        let (len, host) = self.staged("all_gather", || {
            let len = group_len(count, self.inner.world_size(), "all_gather")?;
            need_recv(b, recv, len, "all_gather")?;
            Ok((len, b.download(send, count)?))
        })?;
        let mut out = vec![T::default(); len];
        self.inner.all_gather(&CpuBackend, &host, count, &mut out)?;
        self.unstaged("all_gather", b.upload(&out, recv))
    }

    fn all_reduce_f32(
        &self,
        b: &B,
        buf: &mut B::Buf<f32>,
        count: usize,
        op: ReduceOp,
    ) -> Result<()> {
        let mut host = self.staged("all_reduce_f32", || b.download(buf, count))?;
        self.inner
            .all_reduce_f32(&CpuBackend, &mut host, count, op)?;
        self.unstaged("all_reduce_f32", b.upload(&host, buf))
    }

    fn reduce_scatter_f32(
        &self,
        b: &B,
        send: &B::Buf<f32>,
        count: usize,
        recv: &mut B::Buf<f32>,
    ) -> Result<()> {
        let host = self.staged("reduce_scatter_f32", || {
            let len = group_len(count, self.inner.world_size(), "reduce_scatter_f32")?;
            need_recv(b, recv, count, "reduce_scatter_f32")?;
            b.download(send, len)
        })?;
        let mut out = vec![0.0; count];
        self.inner
            .reduce_scatter_f32(&CpuBackend, &host, count, &mut out)?;
        self.unstaged("reduce_scatter_f32", b.upload(&out, recv))
    }

    fn reduce_scatter_16(
        &self,
        b: &B,
        send: &B::Buf<u16>,
        count: usize,
        recv: &mut B::Buf<u16>,
        dtype: Dtype,
    ) -> Result<()> {
        let host = self.staged("reduce_scatter_16", || {
            super::check_16_bit(dtype)?;
            let len = group_len(count, self.inner.world_size(), "reduce_scatter_16")?;
            need_recv(b, recv, count, "reduce_scatter_16")?;
            b.download(send, len)
        })?;
        let mut out = vec![0u16; count];
        self.inner
            .reduce_scatter_16(&CpuBackend, &host, count, &mut out, dtype)?;
        self.unstaged("reduce_scatter_16", b.upload(&out, recv))
    }

    fn barrier(&self) -> Result<()> {
        self.inner.barrier()
    }

    fn abort(&self, reason: &str) {
        self.inner.abort(reason)
    }
}
