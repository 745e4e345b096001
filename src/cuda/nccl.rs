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
//! **Finding libnccl.** cudarc opens `libnccl.so` (or `.so.12`/`.so.13`), but runtime installs
//! (Debian's `libnccl2`, the `nvidia-nccl-cu12`/`cu13` wheels) ship only `libnccl.so.2`. A process
//! cannot change its own library search path, so [`nccl_available`] says how to fix it, and
//! [`link_nccl`] creates the `libnccl.so` link in a folder the launcher puts on `LD_LIBRARY_PATH`
//! of the processes it starts (examples/multi_gpu.rs does this).

use super::CudaBackend;
use crate::backend::{Collective, Elem, ReduceOp};
use crate::error::{PfcError, Result};
use crate::plan::Dtype;
use crate::rendezvous::{UniqueId, UNIQUE_ID_BYTES};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use cudarc::nccl::{result as nccl, sys};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Checks that NCCL can be loaded, with instructions when it cannot.
pub fn nccl_available() -> Result<()> {
    // SAFETY: only tries to open the library.
    if unsafe { sys::is_culib_present() } {
        return Ok(());
    }
    let hint = find_nccl_so2()
        .map(|p| format!(" Found {}: run `partial_fc::cuda::nccl::link_nccl(so2, dir)` or `ln -s {} DIR/libnccl.so`, then start the process with DIR on LD_LIBRARY_PATH.", p.display(), p.display()))
        .unwrap_or_else(|| " Install NCCL (apt install libnccl2, or pip install nvidia-nccl-cu12) and put its lib folder on LD_LIBRARY_PATH.".into());
    Err(PfcError::BackendUnavailable(format!(
        "NCCL was not found: cudarc opens libnccl.so, libnccl.so.13 or libnccl.so.12, and runtime packages ship only libnccl.so.2.{hint}"
    )))
}

/// Looks for `libnccl.so.2` on `LD_LIBRARY_PATH`, in the usual system folders and in Python's
/// `nvidia/nccl/lib` wheels under the given site-packages roots of `PFC_NCCL_SEARCH` (colon-separated).
pub fn find_nccl_so2() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var("LD_LIBRARY_PATH")
        .unwrap_or_default()
        .split(':')
        .chain(
            std::env::var("PFC_NCCL_SEARCH")
                .unwrap_or_default()
                .split(':'),
        )
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .collect();
    dirs.extend(
        [
            "/usr/lib/x86_64-linux-gnu",
            "/usr/local/cuda/lib64",
            "/usr/lib64",
            "/usr/lib",
        ]
        .map(PathBuf::from),
    );
    for d in dirs {
        for candidate in [
            d.join("libnccl.so.2"),
            d.join("nvidia/nccl/lib/libnccl.so.2"),
        ] {
            if candidate.exists() {
                return Some(candidate);
            }
        }
    }
    None
}

/// Creates `dir/libnccl.so` pointing at `so2` (a `libnccl.so.2`), so that a process started with
/// `dir` on `LD_LIBRARY_PATH` finds NCCL through cudarc. Returns the link's path.
///
/// `dir` should be private to the user, best a fresh temporary directory (examples/multi_gpu.rs
/// uses one per launch): every library in it will be loaded by the processes started with it on
/// their search path. A link already there is kept if it points at `so2` and replaced if it
/// points anywhere else or nowhere (NCCL moved or upgraded); a file that is not a link is an
/// error, never overwritten.
pub fn link_nccl(so2: &Path, dir: &Path) -> Result<PathBuf> {
    let io = |source| PfcError::Io {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let link = dir.join("libnccl.so");
    match std::fs::symlink_metadata(&link) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
        Ok(meta) if !meta.file_type().is_symlink() => {
            return Err(PfcError::Io {
                path: link.clone(),
                source: std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "exists and is not a link: remove it or choose another folder",
                ),
            })
        }
        Ok(_) if std::fs::read_link(&link).is_ok_and(|t| t == so2) => return Ok(link),
        Ok(_) => {} // a stale or foreign link: replaced below
    }
    // A new link under a temporary name, renamed over the old one: never a moment without one.
    let temp = dir.join(format!("libnccl.so.{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&temp);
    #[cfg(unix)]
    std::os::unix::fs::symlink(so2, &temp).map_err(io)?;
    std::fs::rename(&temp, &link).map_err(|e| {
        let _ = std::fs::remove_file(&temp);
        io(e)
    })?;
    Ok(link)
}

/// A new NCCL unique id (rank 0 calls this and shares it through [`crate::rendezvous`]).
pub fn new_unique_id() -> Result<UniqueId> {
    nccl_available()?;
    let id = nccl::get_uniqueid()
        .map_err(|e| PfcError::Collective(format!("ncclGetUniqueId: {e:?}")))?;
    let mut bytes = [0u8; UNIQUE_ID_BYTES];
    for (b, c) in bytes.iter_mut().zip(id.internal.iter()) {
        *b = *c as u8;
    }
    Ok(UniqueId(bytes))
}

/// NCCL's version as an integer (e.g. 22703 for 2.27.3).
pub fn nccl_version() -> Result<i32> {
    nccl_available()?;
    nccl::get_nccl_version().map_err(|e| PfcError::Collective(format!("ncclGetVersion: {e:?}")))
}

/// One rank's NCCL communicator on a [`CudaBackend`]'s stream.
pub struct NcclCollective {
    comm: sys::ncclComm_t,
    stream: Arc<CudaStream>,
    rank: usize,
    world_size: usize,
    timeout: Option<Duration>,
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
    /// [`NcclCollective::with_init_timeout`] to choose it.
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

    /// Like [`NcclCollective::new`], with the wait for every rank to join (`ncclCommInitRank`)
    /// bounded by `init_timeout`. Past it the call returns [`PfcError::Collective`]: a rank that
    /// never starts (a node that failed to come up) then ends the job with an error instead of
    /// leaving every other rank waiting. The init runs on a thread of its own, which a blocking
    /// `ncclCommInitRank` keeps until the missing rank joins or the process exits; if it
    /// completes after the caller gave up, the communicator it made is aborted there.
    pub fn with_init_timeout(
        backend: &CudaBackend,
        rank: usize,
        world_size: usize,
        id: UniqueId,
        init_timeout: Option<Duration>,
        timeout: Option<Duration>,
    ) -> Result<Self> {
        let (rank_i, world_i) = nccl_rank_args(rank, world_size)?;
        nccl_available()?;
        let bind = |ctx: &Arc<cudarc::driver::CudaContext>| {
            ctx.bind_to_thread()
                .map_err(|e| PfcError::Device(format!("binding the context: {e:?}")))
        };
        bind(backend.context())?;
        let mut internal = [0 as std::ffi::c_char; UNIQUE_ID_BYTES];
        for (c, b) in internal.iter_mut().zip(id.0.iter()) {
            *c = *b as std::ffi::c_char;
        }
        let nccl_id = sys::ncclUniqueId { internal };
        /// A communicator handed from the init thread (NCCL communicators may move threads).
        struct Joined(sys::ncclComm_t);
        // SAFETY: see the type's comment; nothing else holds the handle.
        unsafe impl Send for Joined {}
        let (done, joined) = std::sync::mpsc::channel::<Result<Joined>>();
        let ctx = backend.context().clone();
        std::thread::Builder::new()
            .name(format!("pfc-nccl-init-{rank}"))
            // NCCL's topology search recurses; the main thread's usual 8 MiB, not a spawned
            // thread's 2 MiB, is what it is known to run in.
            .stack_size(16 << 20)
            .spawn(move || {
                let result = bind(&ctx).and_then(|()| {
                    let mut comm = std::mem::MaybeUninit::uninit();
                    // SAFETY: `comm` is written by NCCL on success; the id is 128 valid bytes.
                    unsafe {
                        nccl::comm_init_rank(comm.as_mut_ptr(), world_i, nccl_id, rank_i)
                            .map_err(nccl_err("ncclCommInitRank"))?;
                        Ok(Joined(comm.assume_init()))
                    }
                });
                if let Err(std::sync::mpsc::SendError(Ok(Joined(late)))) = done.send(result) {
                    // The caller timed out and is gone: nobody will use or free this one.
                    // SAFETY: a live communicator no one else holds, aborted once.
                    let _ = unsafe { nccl::comm_abort(late) };
                }
            })
            .map_err(|e| PfcError::Collective(format!("starting the NCCL init thread: {e}")))?;
        let comm = match init_timeout {
            None => joined.recv().map_err(|_| {
                PfcError::Collective("the NCCL init thread ended without an answer".into())
            })??,
            Some(limit) => match joined.recv_timeout(limit) {
                Ok(result) => result?,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    return Err(PfcError::Collective(format!(
                        "rank {rank}: ncclCommInitRank did not complete within {limit:?}: a peer \
                         rank of {world_size} never joined (or is stuck); the init thread stays \
                         blocked in NCCL"
                    )))
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(PfcError::Collective(
                        "the NCCL init thread ended without an answer".into(),
                    ))
                }
            },
        }
        .0;
        Ok(NcclCollective {
            comm,
            stream: backend.stream().clone(),
            rank,
            world_size,
            timeout,
            broken: false.into(),
        })
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
        let mut async_err = sys::ncclResult_t::ncclSuccess;
        // SAFETY: the communicator is alive for the duration of `self`.
        let query = unsafe { sys::ncclCommGetAsyncError(self.comm, &mut async_err) };
        if query != sys::ncclResult_t::ncclSuccess {
            return Some(format!("ncclCommGetAsyncError failed ({query:?})"));
        }
        (async_err != sys::ncclResult_t::ncclSuccess
            && async_err != sys::ncclResult_t::ncclInProgress)
            .then(|| format!("NCCL reported {async_err:?}"))
    }

    fn enqueue(
        &self,
        what: &str,
        call: impl FnOnce(sys::cudaStream_t) -> std::result::Result<nccl::NcclStatus, nccl::NcclError>,
    ) -> Result<()> {
        self.check_usable()?;
        let queued = self.mark(what)?;
        call(self.stream.cu_stream() as sys::cudaStream_t)
            .map_err(|e| self.abort(format!("{what}: {e:?}")))?;
        self.wait(what, queued)
    }
}

impl Drop for NcclCollective {
    fn drop(&mut self) {
        if *self.broken.get_mut() {
            return;
        }
        // A communicator with a pending asynchronous error (a peer that died unnoticed, which
        // is possible without a timeout) is aborted: destroying it could wait on that peer.
        let healthy = self.async_error().is_none();
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
        unsafe {
            nccl::all_gather(
                src as _,
                dst as _,
                bytes,
                sys::ncclDataType_t::ncclUint8,
                self.comm,
                self.stream.cu_stream() as sys::cudaStream_t,
            )
        }
        .map(|_| ())
        .map_err(|e| self.abort(format!("ncclAllGather: {e:?}")))
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

    /// A dangling link (NCCL moved) used to make every later launch fail, and a link to another
    /// library was kept as it was (found by a review).
    #[test]
    fn link_nccl_keeps_a_right_link_and_replaces_a_wrong_one() {
        let dir = tempfile::tempdir().unwrap();
        let so2 = dir.path().join("libnccl.so.2");
        std::fs::write(&so2, b"nccl").unwrap();
        let folder = dir.path().join("links");
        let link = link_nccl(&so2, &folder).unwrap();
        assert_eq!(std::fs::read_link(&link).unwrap(), so2);
        assert_eq!(link_nccl(&so2, &folder).unwrap(), link, "kept");
        for wrong in [
            dir.path().join("gone/libnccl.so.2"),
            dir.path().join("other.so"),
        ] {
            std::fs::write(dir.path().join("other.so"), b"other").unwrap();
            std::fs::remove_file(&link).unwrap();
            std::os::unix::fs::symlink(&wrong, &link).unwrap();
            assert_eq!(link_nccl(&so2, &folder).unwrap(), link);
            assert_eq!(
                std::fs::read_link(&link).unwrap(),
                so2,
                "{wrong:?} replaced"
            );
        }
        std::fs::remove_file(&link).unwrap();
        std::fs::write(&link, b"a real file").unwrap();
        assert!(matches!(link_nccl(&so2, &folder), Err(PfcError::Io { .. })));
        assert_eq!(
            std::fs::read(&link).unwrap(),
            b"a real file",
            "never overwritten"
        );
    }

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
