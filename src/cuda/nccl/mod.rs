//! NCCL behind [`Collective`]: all-gather, all-reduce (sum, max), reduce-scatter and barrier on
//! the backend's stream, with errors and timeouts that come back as errors.
//!
//! A thin wrapper over cudarc's raw NCCL bindings (not its `Comm`, which panics when an abort
//! fails and does not expose the communicator for `ncclCommGetAsyncError`).
//!
//! **Timeouts.** NCCL calls only enqueue work; a peer that never arrives leaves the stream waiting
//! forever. With a timeout set, every collective waits for its stream by polling `cuStreamQuery`
//! and `ncclCommGetAsyncError`; past the timeout the communicator is aborted (which unblocks the
//! stream) and the call returns [`PfcError::Collective`]. The communicator is unusable after that.
//! The clock starts when the work queued on the stream before the collective has finished (an
//! event recorded just before it), so a short timeout is not spent on a large step's compute.
//! The communicator's creation, which waits for every rank to join, is bounded as well (by the
//! longer of that timeout and [`NcclCollective::DEFAULT_INIT_TIMEOUT`], or as chosen).
//!
//! **Non-blocking communicators.** Some NCCL calls block the calling thread where no poll can
//! reach them: the creation, and the calls that make connections (NCCL connects lazily, at the
//! first use of each algorithm) and wait for every peer to make theirs. With a timeout (the
//! collective's or the init's) and NCCL 2.14 or later the communicator is created non-blocking (`ncclCommInitRankConfig`,
//! `blocking = 0`): those calls return at once and each is polled to its end, the creation under
//! the init bound, a call's host-side set-up under the longer of the two timeouts (it waits for
//! the slowest peer and takes seconds at scale), so a peer that dies between the creation and a
//! first collective is an error, not a hang. Dropping it finalizes it first (`ncclCommFinalize`,
//! which meets the node's other ranks, polled under that longer bound) and aborts it when that
//! does not finish. `NCCL_COMM_BLOCKING` (0 or 1), which NCCL applies over any config, is read
//! here too and chooses the kind. Without a timeout, or with an older NCCL, the communicator is
//! a blocking one.
//!
//! **Finding libnccl**: see [`library`]; its functions are re-exported here.

mod init;
pub mod library;

pub use library::{find_nccl_so2, link_nccl, nccl_available, nccl_version, new_unique_id};

use super::CudaBackend;
use crate::backend::{Collective, Elem, ReduceOp};
use crate::error::{PfcError, Result};
use crate::plan::Dtype;
use crate::rendezvous::{UniqueId, UNIQUE_ID_BYTES};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use cudarc::nccl::{result as nccl, sys};
use init::{settle, Unsettled};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One rank's NCCL communicator on a [`CudaBackend`]'s stream.
pub struct NcclCollective {
    comm: sys::ncclComm_t,
    stream: Arc<CudaStream>,
    rank: usize,
    world_size: usize,
    timeout: Option<Duration>,
    /// Created with `blocking = 0`: a call that returns `ncclInProgress` is polled to its end.
    nonblocking: bool,
    /// Bounds the poll of a non-blocking call's host-side set-up, and of the finalize at drop:
    /// the longer of the two timeouts (see `set_up_limit`).
    settle_limit: Option<Duration>,
    broken: std::sync::atomic::AtomicBool,
}

// SAFETY: an NCCL communicator may be used from any thread, one call at a time; `&self` methods
// only enqueue on the communicator and the trait's callers serialize them per rank.
unsafe impl Send for NcclCollective {}

impl std::fmt::Debug for NcclCollective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "NcclCollective(rank {} of {})",
            self.rank, self.world_size
        )
    }
}

fn nccl_err(what: &str) -> impl FnOnce(nccl::NcclError) -> PfcError + '_ {
    move |e| PfcError::Collective(format!("{what}: {e:?}"))
}

/// `(rank, world_size)` as NCCL takes them (`int`): a typed error, rather than a truncating
/// cast, when either is out of range.
fn nccl_rank_args(rank: usize, world_size: usize) -> Result<(i32, i32)> {
    if world_size == 0 || rank >= world_size {
        return Err(PfcError::param(
            "rank",
            rank,
            format!("must lie in [0, world size {world_size})"),
        ));
    }
    let world = i32::try_from(world_size).map_err(|_| {
        PfcError::param(
            "world_size",
            world_size,
            "NCCL takes at most i32::MAX ranks",
        )
    })?;
    // rank < world_size <= i32::MAX
    Ok((rank as i32, world))
}

impl NcclCollective {
    /// The longest [`NcclCollective::new`] waits for every rank to join, whatever shorter
    /// collective timeout it is given: the ranks of a job start seconds to minutes apart, and
    /// NCCL's own set-up takes seconds at scale, while a collective of a running job either
    /// completes in well under a second or has lost a peer.
    pub const DEFAULT_INIT_TIMEOUT: Duration = Duration::from_secs(600);

    /// Joins the communicator `id` as `rank` of `world_size`, on `backend`'s device and stream;
    /// `timeout` bounds every later collective, counted from when the work queued before it has
    /// finished (`None`: they never time out). Waiting for the
    /// other ranks to join is bounded by the longer of `timeout` and
    /// [`NcclCollective::DEFAULT_INIT_TIMEOUT`] (no bound when `timeout` is `None`); use
    /// [`NcclCollective::with_init_timeout`] to choose it. With a timeout and NCCL 2.14+, the
    /// communicator is a non-blocking one (see the [module](self) documentation).
    pub fn new(
        backend: &CudaBackend,
        rank: usize,
        world_size: usize,
        id: UniqueId,
        timeout: Option<Duration>,
    ) -> Result<Self> {
        let init = timeout.map(|t| t.max(Self::DEFAULT_INIT_TIMEOUT));
        Self::with_init_timeout(backend, rank, world_size, id, init, timeout)
    }

    /// Like [`NcclCollective::new`], with the wait for every rank to join bounded by
    /// `init_timeout`. Past it the call returns [`PfcError::Collective`]: a rank that never
    /// starts (a node that failed to come up) then ends the job with an error instead of leaving
    /// every other rank waiting. When either timeout is given and NCCL is 2.14 or later, the
    /// communicator is created non-blocking and nothing is left behind on a timeout (it is
    /// aborted); the host-side set-up a collective does (its connections, at the first use of
    /// each algorithm) and the finalize at drop are bounded by the longer of the two timeouts.
    /// `NCCL_COMM_BLOCKING` (0 or 1), which NCCL applies over any config, chooses the kind
    /// instead. A blocking communicator's `ncclCommInitRank` runs on a thread of its own when
    /// `init_timeout` is given, which stays blocked in NCCL until the missing rank joins or the
    /// process exits (a communicator it makes after the caller gave up is aborted there).
    pub fn with_init_timeout(
        backend: &CudaBackend,
        rank: usize,
        world_size: usize,
        id: UniqueId,
        init_timeout: Option<Duration>,
        timeout: Option<Duration>,
    ) -> Result<Self> {
        nccl_rank_args(rank, world_size)?;
        nccl_available()?;
        let mut internal = [0 as std::ffi::c_char; UNIQUE_ID_BYTES];
        for (c, b) in internal.iter_mut().zip(id.0.iter()) {
            *c = *b as std::ffi::c_char;
        }
        let join = init::Join {
            ctx: backend.context().clone(),
            rank,
            world_size,
            id: sys::ncclUniqueId { internal },
        };
        let nonblocking = match init::blocking_from_env() {
            // NCCL_COMM_BLOCKING overrides the config in NCCL itself: a communicator made by
            // ncclCommInitRankConfig would block in this thread without any bound, and one made
            // by ncclCommInitRank would not block, unpolled.
            Some(blocking) => !blocking,
            None => init_timeout.is_some() || timeout.is_some(),
        } && nccl_version()? >= init::NONBLOCKING_SINCE;
        let comm = if nonblocking {
            join.nonblocking(init_timeout)?
        } else {
            join.blocking(init_timeout)?
        };
        // The creation bound the calling thread to the device's context (NCCL needs it current).
        Ok(NcclCollective {
            comm,
            stream: backend.stream().clone(),
            rank,
            world_size,
            timeout,
            nonblocking,
            settle_limit: set_up_limit(init_timeout, timeout),
            broken: false.into(),
        })
    }

    /// Whether the communicator was created non-blocking (see the [module](self) documentation):
    /// with either timeout (the collective's or the init's) and NCCL 2.14 or later, unless
    /// `NCCL_COMM_BLOCKING` chose otherwise.
    pub fn is_nonblocking(&self) -> bool {
        self.nonblocking
    }

    fn check_usable(&self) -> Result<()> {
        if self.broken.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(PfcError::Collective(
                "the NCCL communicator was aborted after an earlier error".into(),
            ));
        }
        Ok(())
    }

    /// With a timeout, an event recorded on the stream just before a collective is enqueued:
    /// [`Self::wait`] starts the clock when it completes, so that the compute queued before the
    /// collective (a large step's GEMMs and softmax passes) does not count against the timeout.
    fn mark(&self, what: &str) -> Result<Option<cudarc::driver::CudaEvent>> {
        if self.timeout.is_none() {
            return Ok(None);
        }
        self.stream.record_event(None).map(Some).map_err(|e| {
            self.refuse_locally(PfcError::Collective(format!(
                "{what}: recording an event: {e:?}"
            )))
        })
    }

    /// Waits for the stream with the timeout, checking NCCL's asynchronous errors; aborts the
    /// communicator on timeout or error. The timeout runs from the completion of `queued` (the
    /// work before the collective; `None`: from now).
    fn wait(&self, what: &str, queued: Option<cudarc::driver::CudaEvent>) -> Result<()> {
        let Some(timeout) = self.timeout else {
            return Ok(());
        };
        let mut deadline = None;
        loop {
            // SAFETY: the stream and communicator are alive for the duration of `self`.
            let status = unsafe { cudarc::driver::sys::cuStreamQuery(self.stream.cu_stream()) };
            if status == cudarc::driver::sys::CUresult::CUDA_SUCCESS {
                // Done, but an asynchronous error may have been raised meanwhile (NCCL makes
                // no promise about the results after one).
                return match self.async_error() {
                    None => Ok(()),
                    Some(e) => Err(self.abort(format!("{what}: {e}"))),
                };
            }
            if status != cudarc::driver::sys::CUresult::CUDA_ERROR_NOT_READY {
                return Err(self.abort(format!("{what}: the stream failed ({status:?})")));
            }
            if deadline.is_none() {
                let started = match &queued {
                    None => true,
                    Some(event) => event
                        .try_is_complete()
                        .map_err(|e| self.abort(format!("{what}: the stream failed ({e:?})")))?,
                };
                if started {
                    // `Duration::MAX` (wait forever) must not overflow `Instant + Duration`.
                    deadline = Some(crate::deadline::deadline_after(timeout));
                }
            }
            if let Some(e) = self.async_error() {
                return Err(self.abort(format!("{what}: {e}")));
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(self.abort(format!(
                    "{what}: no progress within {timeout:?} (a peer rank is missing or stuck)"
                )));
            }
            std::thread::sleep(Duration::from_micros(50));
        }
    }

    fn abort(&self, msg: String) -> PfcError {
        if !self.broken.swap(true, std::sync::atomic::Ordering::Relaxed) {
            // SAFETY: aborting a live communicator; it is not used again (see `check_usable`).
            let _ = unsafe { nccl::comm_abort(self.comm) };
        }
        PfcError::Collective(format!("rank {}: {msg}; communicator aborted", self.rank))
    }

    /// This rank's own failure before it enqueued its part (a short buffer, an event it could
    /// not record): the peers are in, or about to enter, the collective it will not join, so
    /// the communicator is aborted (they fail through their timeout or NCCL's error rather than
    /// pairing this rank's next call with it), and the error itself is returned, as
    /// `ThreadCollective` does (see `Collective::abort`).
    fn refuse_locally(&self, err: PfcError) -> PfcError {
        let _ = self.abort(format!("refused its part: {err}"));
        err
    }

    /// NCCL's asynchronous error on the communicator (a failed query counts as one).
    fn async_error(&self) -> Option<String> {
        match init::comm_state(self.comm) {
            init::State::Failed(e) => Some(e),
            init::State::Ready | init::State::InProgress => None,
        }
    }

    fn enqueue(
        &self,
        what: &str,
        call: impl FnOnce(sys::cudaStream_t) -> std::result::Result<nccl::NcclStatus, nccl::NcclError>,
    ) -> Result<()> {
        self.check_usable()?;
        let queued = self.mark(what)?;
        self.call(what, call)?;
        self.wait(what, queued)
    }

    /// Makes one NCCL call on the stream: an error aborts the communicator; a non-blocking
    /// call is polled until NCCL has it on the stream (a first use of an algorithm makes its
    /// connections meanwhile, waiting for every peer), under the longer of the two timeouts.
    fn call(
        &self,
        what: &str,
        call: impl FnOnce(sys::cudaStream_t) -> std::result::Result<nccl::NcclStatus, nccl::NcclError>,
    ) -> Result<()> {
        call(self.stream.cu_stream() as sys::cudaStream_t)
            .map_err(|e| self.abort(format!("{what}: {e:?}")))?;
        if self.nonblocking {
            settle(self.comm, self.settle_limit).map_err(|why| {
                self.abort(match why {
                    Unsettled::Failed(e) => format!("{what}: {e}"),
                    Unsettled::TimedOut(t) => format!(
                        "{what}: no progress within {t:?} (a peer rank is missing or stuck: \
                         NCCL was still setting the call up, e.g. its connections)"
                    ),
                })
            })?;
        }
        Ok(())
    }
}

impl Drop for NcclCollective {
    fn drop(&mut self) {
        if *self.broken.get_mut() {
            return;
        }
        // A communicator with a pending asynchronous error (a peer that died unnoticed, which
        // is possible without a timeout) is aborted: destroying it could wait on that peer. A
        // non-blocking one is finalized first, which completes its calls (and can wait on a
        // peer that never joined one) under the limit; one that does not finalize is aborted.
        let healthy = self.async_error().is_none()
            && (!self.nonblocking || {
                // SAFETY: the communicator is live; nothing else is called on it meanwhile.
                let started = unsafe { sys::ncclCommFinalize(self.comm) };
                started.result().is_ok() && settle(self.comm, self.settle_limit).is_ok()
            });
        // SAFETY: the communicator is live and dropped once.
        unsafe {
            if healthy {
                let _ = nccl::comm_destroy(self.comm);
            } else {
                let _ = nccl::comm_abort(self.comm);
            }
        }
    }
}

impl NcclCollective {
    /// All-gather of any element type as bytes (`count · size_of::<T>()` per rank, `ncclUint8`):
    /// an all-gather does no arithmetic, so the bytes are all NCCL needs to move, and every
    /// [`Elem`] (u16 wire words, i64 labels, u64, i32) goes through the same call without a table
    /// from Rust types to NCCL types that would have to grow with `Elem`. A ring moves the same
    /// bytes either way.
    fn all_gather_bytes<T>(
        &self,
        send: &CudaSlice<T>,
        count: usize,
        recv: &mut CudaSlice<T>,
    ) -> Result<()> {
        self.check_usable()?;
        let queued = self.mark("ncclAllGather")?;
        self.enqueue_all_gather(send, count, recv)?;
        self.wait("ncclAllGather", queued)
    }

    /// Enqueues the all-gather of `count` elements per rank as bytes, without waiting.
    fn enqueue_all_gather<T>(
        &self,
        send: &CudaSlice<T>,
        count: usize,
        recv: &mut CudaSlice<T>,
    ) -> Result<()> {
        need(send, count, "all_gather send").map_err(|e| self.refuse_locally(e))?;
        let len = count.saturating_mul(self.world_size);
        need(recv, len, "all_gather recv").map_err(|e| self.refuse_locally(e))?;
        let bytes = count * std::mem::size_of::<T>();
        let (src, _s) = send.device_ptr(&self.stream);
        let (dst, _d) = recv.device_ptr_mut(&self.stream);
        // SAFETY: both pointers cover the counts checked above; the stream orders their use.
        self.call("ncclAllGather", |s| unsafe {
            nccl::all_gather(
                src as _,
                dst as _,
                bytes,
                sys::ncclDataType_t::ncclUint8,
                self.comm,
                s,
            )
        })
    }
}

impl NcclCollective {
    /// `ncclReduceScatter` with `ncclSum` of `count` elements per rank of `dtype` (whose size
    /// must be `T`'s), on the layer's stream, waited for like every other collective.
    fn reduce_scatter_sum<T>(
        &self,
        send: &CudaSlice<T>,
        count: usize,
        recv: &mut CudaSlice<T>,
        dtype: sys::ncclDataType_t,
    ) -> Result<()> {
        self.check_usable()?;
        let len = count.saturating_mul(self.world_size);
        need(send, len, "reduce_scatter send").map_err(|e| self.refuse_locally(e))?;
        need(recv, count, "reduce_scatter recv").map_err(|e| self.refuse_locally(e))?;
        let (src, _s) = send.device_ptr(&self.stream);
        let (dst, _d) = recv.device_ptr_mut(&self.stream);
        // SAFETY: both pointers cover the counts checked above, in elements of `dtype`'s size
        // (the callers pair f32 with ncclFloat32 and u16 with the 16-bit types).
        self.enqueue("ncclReduceScatter", |s| unsafe {
            nccl::reduce_scatter(
                src as _,
                dst as _,
                count,
                dtype,
                sys::ncclRedOp_t::ncclSum,
                self.comm,
                s,
            )
        })
    }
}

/// What bounds the host-side set-up of a non-blocking call and the finalize at drop: the
/// longer of the init bound and the collective timeout (either, when only one is given). The
/// set-up waits for the slowest peer to reach the call and makes connections (seconds at
/// scale), and the finalize meets the node's other ranks, so the short collective timeout, which
/// is meant for a running collective, is not theirs.
fn set_up_limit(init_timeout: Option<Duration>, timeout: Option<Duration>) -> Option<Duration> {
    match (init_timeout, timeout) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

fn need<T>(buf: &CudaSlice<T>, len: usize, what: &str) -> Result<()> {
    if buf.len() < len {
        return Err(PfcError::Shape(format!(
            "{what}: buffer of {} elements, {len} needed",
            buf.len()
        )));
    }
    Ok(())
}

fn op_of(op: ReduceOp) -> sys::ncclRedOp_t {
    match op {
        ReduceOp::Sum => sys::ncclRedOp_t::ncclSum,
        ReduceOp::Max => sys::ncclRedOp_t::ncclMax,
    }
}

impl Collective<CudaBackend> for NcclCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_gather<T: Elem>(
        &self,
        _: &CudaBackend,
        send: &CudaSlice<T>,
        count: usize,
        recv: &mut CudaSlice<T>,
    ) -> Result<()> {
        self.all_gather_bytes(send, count, recv)
    }

    fn all_reduce_f32(
        &self,
        _: &CudaBackend,
        buf: &mut CudaSlice<f32>,
        count: usize,
        op: ReduceOp,
    ) -> Result<()> {
        self.check_usable()?;
        need(buf, count, "all_reduce").map_err(|e| self.refuse_locally(e))?;
        let (ptr, _d) = buf.device_ptr_mut(&self.stream);
        // SAFETY: in place over `count` checked elements.
        self.enqueue("ncclAllReduce", |s| unsafe {
            nccl::all_reduce(
                ptr as _,
                ptr as _,
                count,
                sys::ncclDataType_t::ncclFloat32,
                op_of(op),
                self.comm,
                s,
            )
        })
    }

    fn reduce_scatter_f32(
        &self,
        _: &CudaBackend,
        send: &CudaSlice<f32>,
        count: usize,
        recv: &mut CudaSlice<f32>,
    ) -> Result<()> {
        self.reduce_scatter_sum(send, count, recv, sys::ncclDataType_t::ncclFloat32)
    }

    fn reduce_scatter_16(
        &self,
        _: &CudaBackend,
        send: &CudaSlice<u16>,
        count: usize,
        recv: &mut CudaSlice<u16>,
        dtype: Dtype,
    ) -> Result<()> {
        // NCCL sums these types itself (in the type, hop by hop along its ring), so the u16
        // buffers are handed over under the dtype they hold.
        self.check_usable()?;
        crate::collective::check_16_bit(dtype).map_err(|e| self.refuse_locally(e))?;
        let nccl_type = if dtype == Dtype::F16 {
            sys::ncclDataType_t::ncclFloat16
        } else {
            sys::ncclDataType_t::ncclBfloat16
        };
        self.reduce_scatter_sum(send, count, recv, nccl_type)
    }

    fn barrier(&self) -> Result<()> {
        // NCCL has no barrier: an all-reduce of one value orders the ranks. It is waited for
        // like every other collective (with the timeout, checking NCCL's asynchronous errors,
        // aborting on either); without a timeout `enqueue` does not wait, and a barrier must.
        self.check_usable()?;
        let mut dummy = self
            .stream
            .alloc_zeros::<f32>(1)
            .map_err(|e| self.refuse_locally(PfcError::Device(format!("barrier: {e:?}"))))?;
        let (ptr, _d) = dummy.device_ptr_mut(&self.stream);
        // SAFETY: in place over one valid element, alive until this function returns.
        self.enqueue("barrier", |s| unsafe {
            nccl::all_reduce(
                ptr as _,
                ptr as _,
                1,
                sys::ncclDataType_t::ncclFloat32,
                sys::ncclRedOp_t::ncclSum,
                self.comm,
                s,
            )
        })?;
        if self.timeout.is_none() {
            self.stream
                .synchronize()
                .map_err(|e| self.abort(format!("barrier: the stream failed ({e:?})")))?;
        }
        Ok(())
    }

    fn abort(&self, reason: &str) {
        // The peers in other processes learn of it through their own timeout or NCCL's error.
        let _ = NcclCollective::abort(self, format!("aborted: {reason}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_args_refuse_what_an_i32_cannot_hold() {
        assert_eq!(nccl_rank_args(1, 4).unwrap(), (1, 4));
        let most = i32::MAX as usize;
        assert_eq!(
            nccl_rank_args(most - 1, most).unwrap(),
            (i32::MAX - 1, i32::MAX)
        );
        // `world_size as i32` used to truncate 2^32 + 2 ranks to 2 (and rank 2^32 + 1 to 1).
        for (rank, world) in [(1, (1usize << 32) + 2), ((1 << 32) + 1, (1 << 32) + 2)] {
            match nccl_rank_args(rank, world) {
                Err(PfcError::Param { name, .. }) => assert_eq!(name, "world_size"),
                other => panic!("{rank}/{world}: {other:?}"),
            }
        }
        for (rank, world) in [(0, 0), (4, 4), (usize::MAX, 2)] {
            match nccl_rank_args(rank, world) {
                Err(PfcError::Param { name, .. }) => assert_eq!(name, "rank"),
                other => panic!("{rank}/{world}: {other:?}"),
            }
        }
    }
}
