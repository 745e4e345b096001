//! A collective that passes every call through to another and lets a test act around it: fail a
//! call on demand, fail after the peers got the result, record what a rank sent, break the
//! group. Each test states only its hook, not the eight methods of the trait.

use partial_fc::plan::Dtype;
use partial_fc::{Collective, CpuBackend, Elem, ReduceOp, Result};

/// The call a hook sees, with what it may look at.
pub enum Op<'a> {
    AllGather,
    AllReduce,
    /// What this rank contributes (`world_size · count` values).
    ReduceScatterF32 {
        send: &'a [f32],
    },
    ReduceScatter16,
    Barrier,
}

/// What a test does around the calls of [`Hooked`]'s inner collective.
pub trait Hook<C>: Send {
    /// Before the call: an error is returned instead of making it.
    fn before(&self, _op: &Op<'_>, _inner: &C) -> Result<()> {
        Ok(())
    }
    /// After the call succeeded (the peers have their result): an error is returned instead.
    fn after(&self, _op: &Op<'_>, _inner: &C) -> Result<()> {
        Ok(())
    }
    /// The layer broke the group ([`Collective::abort`]); the inner collective is aborted after.
    fn aborted(&self, _reason: &str) {}
    /// The rank reported (the inner collective's unless a test needs another).
    fn rank(&self, inner: &C) -> usize
    where
        C: Collective<CpuBackend>,
    {
        inner.rank()
    }
    /// The world size reported.
    fn world_size(&self, inner: &C) -> usize
    where
        C: Collective<CpuBackend>,
    {
        inner.world_size()
    }
}

/// `inner`'s calls, with `hook` around each.
pub struct Hooked<C, H> {
    pub inner: C,
    pub hook: H,
}

impl<C, H> Hooked<C, H> {
    pub fn new(inner: C, hook: H) -> Self {
        Hooked { inner, hook }
    }

    fn around<R>(&self, op: Op<'_>, call: impl FnOnce(&C) -> Result<R>) -> Result<R>
    where
        H: Hook<C>,
    {
        self.hook.before(&op, &self.inner)?;
        let out = call(&self.inner)?;
        self.hook.after(&op, &self.inner)?;
        Ok(out)
    }
}

impl<C: Collective<CpuBackend>, H: Hook<C>> Collective<CpuBackend> for Hooked<C, H> {
    fn rank(&self) -> usize {
        self.hook.rank(&self.inner)
    }
    fn world_size(&self) -> usize {
        self.hook.world_size(&self.inner)
    }
    fn all_gather<T: Elem>(
        &self,
        b: &CpuBackend,
        send: &Vec<T>,
        count: usize,
        recv: &mut Vec<T>,
    ) -> Result<()> {
        self.around(Op::AllGather, |c| c.all_gather(b, send, count, recv))
    }
    fn all_reduce_f32(
        &self,
        b: &CpuBackend,
        buf: &mut Vec<f32>,
        count: usize,
        op: ReduceOp,
    ) -> Result<()> {
        self.around(Op::AllReduce, |c| c.all_reduce_f32(b, buf, count, op))
    }
    fn reduce_scatter_f32(
        &self,
        b: &CpuBackend,
        send: &Vec<f32>,
        count: usize,
        recv: &mut Vec<f32>,
    ) -> Result<()> {
        let whole = &send[..(count * self.world_size()).min(send.len())];
        self.around(Op::ReduceScatterF32 { send: whole }, |c| {
            c.reduce_scatter_f32(b, send, count, recv)
        })
    }
    fn reduce_scatter_16(
        &self,
        b: &CpuBackend,
        send: &Vec<u16>,
        count: usize,
        recv: &mut Vec<u16>,
        dtype: Dtype,
    ) -> Result<()> {
        self.around(Op::ReduceScatter16, |c| {
            c.reduce_scatter_16(b, send, count, recv, dtype)
        })
    }
    fn barrier(&self) -> Result<()> {
        self.around(Op::Barrier, |c| c.barrier())
    }
    fn abort(&self, reason: &str) {
        self.hook.aborted(reason);
        self.inner.abort(reason)
    }
}
