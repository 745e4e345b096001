//! Creating a communicator, and the poll that non-blocking NCCL calls need.
//!
//! A blocking communicator (`ncclCommInitRank`) blocks the calling thread in NCCL: in its
//! creation, until every rank has joined, and — since NCCL connects lazily, at a communicator's
//! first collectives — in the first collective, until every peer has made its own. A peer that
//! dies between the two leaves that call blocked for good, where no timeout of ours can reach it.
//! A non-blocking communicator (`ncclCommInitRankConfig` with `blocking = 0`, NCCL 2.14+) returns
//! `ncclInProgress` from those calls instead, and the caller polls `ncclCommGetAsyncError` until
//! the call is done ([`settle`]), which is bounded and can end in `ncclCommAbort`. NCCL forbids
//! any other call on the communicator, and any kernel on its stream, while one is in progress;
//! every call of ours settles before it returns.

use super::nccl_err;
use crate::error::{PfcError, Result};
use cudarc::driver::CudaContext;
use cudarc::nccl::{result as nccl, sys};
use std::ffi::c_int;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The first NCCL with `ncclCommInitRankConfig` and `ncclCommFinalize`, which non-blocking
/// communicators need (`NCCL_VERSION(2, 14, 0)`).
pub(super) const NONBLOCKING_SINCE: i32 = 21400;

/// `NCCL_VERSION(2, 30, 0)`: the header whose `ncclConfig_t` layout cudarc's bindings (feature
/// `nccl-02030`) carry. NCCL reads a config by its `size` and `version` and fills what a newer
/// library knows and an older header lacks with its defaults; an older library reads the fields
/// it knows, which begin every later layout (fields are only appended).
const CONFIG_LAYOUT_VERSION: u32 = 23000;

/// `NCCL_CONFIG_INITIALIZER` with `blocking = 0`: every other field left unset, so that NCCL
/// (and its environment variables) choose them as for `ncclCommInitRank`.
fn nonblocking_config() -> sys::ncclConfig_t {
    // NCCL_CONFIG_UNDEF_INT and NCCL_CONFIG_UNDEF_PTR.
    const UNSET: c_int = c_int::MIN;
    let null = std::ptr::null();
    sys::ncclConfig_t {
        size: std::mem::size_of::<sys::ncclConfig_t>(),
        magic: 0xcafe_beef,
        version: CONFIG_LAYOUT_VERSION,
        blocking: 0,
        cgaClusterSize: UNSET,
        minCTAs: UNSET,
        maxCTAs: UNSET,
        netName: null,
        splitShare: UNSET,
        trafficClass: UNSET,
        commName: null,
        collnetEnable: UNSET,
        CTAPolicy: UNSET,
        shrinkShare: UNSET,
        nvlsCTAs: UNSET,
        nChannelsPerNetPeer: UNSET,
        nvlinkCentricSched: UNSET,
        graphUsageMode: UNSET,
        numRmaCtx: UNSET,
        maxP2pPeers: UNSET,
    }
}

/// Why a non-blocking call did not settle.
#[derive(Debug)]
pub(super) enum Unsettled {
    /// NCCL reported an error (or the poll itself failed).
    Failed(String),
    /// Still in progress at the limit.
    TimedOut(Duration),
}

/// Polls a non-blocking communicator until its last call is done: `Ok` once NCCL says
/// `ncclSuccess`, an error when it reports one, [`Unsettled::TimedOut`] past `limit` (`None`:
/// no limit). The comm is left as it is either way: the caller aborts it.
pub(super) fn settle(
    comm: sys::ncclComm_t,
    limit: Option<Duration>,
) -> std::result::Result<(), Unsettled> {
    let deadline = limit.map(crate::deadline::deadline_after);
    let mut pause = Duration::from_micros(20);
    loop {
        let mut state = sys::ncclResult_t::ncclSuccess;
        // SAFETY: a live communicator, polled from one thread at a time (the caller's).
        let query = unsafe { sys::ncclCommGetAsyncError(comm, &mut state) };
        if query != sys::ncclResult_t::ncclSuccess {
            return Err(Unsettled::Failed(format!(
                "ncclCommGetAsyncError failed ({query:?})"
            )));
        }
        match state {
            sys::ncclResult_t::ncclSuccess => return Ok(()),
            sys::ncclResult_t::ncclInProgress => {}
            e => return Err(Unsettled::Failed(format!("NCCL reported {e:?}"))),
        }
        if let (Some(d), Some(limit)) = (deadline, limit) {
            if Instant::now() >= d {
                return Err(Unsettled::TimedOut(limit));
            }
        }
        std::thread::sleep(pause);
        // A call in progress is waiting for peers (milliseconds to seconds): back off to 1 ms.
        pause = (pause * 2).min(Duration::from_millis(1));
    }
}

/// Where the message for a creation that did not finish says what happened.
fn did_not_join(rank: usize, world_size: usize, limit: Duration, how: &str) -> PfcError {
    PfcError::Collective(format!(
        "rank {rank}: the NCCL communicator's creation did not complete within {limit:?}: a peer \
         rank of {world_size} never joined (or is stuck){how}"
    ))
}

/// What [`create`] needs to make one rank's communicator.
pub(super) struct Join {
    pub ctx: Arc<CudaContext>,
    pub rank: usize,
    pub world_size: usize,
    pub id: sys::ncclUniqueId,
}

impl Join {
    fn args(&self) -> (c_int, c_int) {
        // Checked by `nccl_rank_args` before a `Join` is made.
        (self.rank as c_int, self.world_size as c_int)
    }

    /// `ncclCommInitRankConfig` with `blocking = 0`, polled until every rank has joined or
    /// `limit` has passed (then the communicator is aborted: nothing is left behind).
    pub(super) fn nonblocking(&self, limit: Option<Duration>) -> Result<sys::ncclComm_t> {
        bind(&self.ctx)?;
        let (rank, world) = self.args();
        let mut config = nonblocking_config();
        let mut comm: sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: `comm` is written by NCCL; the id is 128 valid bytes; the config is a whole
        // `ncclConfig_t` of the layout its `size` and `version` name, alive for the call.
        let started =
            unsafe { sys::ncclCommInitRankConfig(&mut comm, world, self.id, rank, &mut config) };
        let abort = |comm: sys::ncclComm_t| {
            if !comm.is_null() {
                // SAFETY: a communicator this function made and nobody else holds.
                let _ = unsafe { nccl::comm_abort(comm) };
            }
        };
        if let Err(e) = started.result() {
            abort(comm);
            return Err(nccl_err("ncclCommInitRankConfig")(e));
        }
        match settle(comm, limit) {
            Ok(()) => Ok(comm),
            Err(why) => {
                abort(comm);
                Err(match why {
                    Unsettled::TimedOut(limit) => {
                        did_not_join(self.rank, self.world_size, limit, "; it was aborted")
                    }
                    Unsettled::Failed(e) => {
                        PfcError::Collective(format!("ncclCommInitRankConfig: {e}"))
                    }
                })
            }
        }
    }

    /// `ncclCommInitRank` (a blocking communicator), on a thread of its own when `limit` is
    /// given: the call blocks until every rank has joined, so the wait is bounded from outside.
    /// Past the limit the thread stays blocked in NCCL until the missing rank joins or the
    /// process exits; if it completes after the caller gave up, it aborts the communicator it
    /// made.
    pub(super) fn blocking(self, limit: Option<Duration>) -> Result<sys::ncclComm_t> {
        bind(&self.ctx)?;
        /// A communicator handed from the init thread (NCCL communicators may move threads).
        struct Joined(sys::ncclComm_t);
        // SAFETY: see the type's comment; nothing else holds the handle.
        unsafe impl Send for Joined {}
        let (rank, world_size) = (self.rank, self.world_size);
        let (done, joined) = std::sync::mpsc::channel::<Result<Joined>>();
        std::thread::Builder::new()
            .name(format!("pfc-nccl-init-{rank}"))
            // NCCL's topology search recurses; the main thread's usual 8 MiB, not a spawned
            // thread's 2 MiB, is what it is known to run in.
            .stack_size(16 << 20)
            .spawn(move || {
                let (rank_i, world_i) = self.args();
                let result = bind(&self.ctx).and_then(|()| {
                    let mut comm = std::mem::MaybeUninit::uninit();
                    // SAFETY: `comm` is written by NCCL on success; the id is 128 valid bytes.
                    unsafe {
                        nccl::comm_init_rank(comm.as_mut_ptr(), world_i, self.id, rank_i)
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
        let no_answer =
            || PfcError::Collective("the NCCL init thread ended without an answer".into());
        let result = match limit {
            None => joined.recv().map_err(|_| no_answer())?,
            Some(limit) => match joined.recv_timeout(limit) {
                Ok(result) => result,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    return Err(did_not_join(
                        rank,
                        world_size,
                        limit,
                        "; the init thread stays blocked in NCCL (NCCL older than 2.14 has no \
                         non-blocking communicator)",
                    ))
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return Err(no_answer()),
            },
        };
        Ok(result?.0)
    }
}

/// Makes the device's context current on this thread, as NCCL's calls need.
pub(super) fn bind(ctx: &Arc<CudaContext>) -> Result<()> {
    ctx.bind_to_thread()
        .map_err(|e| PfcError::Device(format!("binding the context: {e:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The config NCCL_CONFIG_INITIALIZER would give, but non-blocking: NCCL refuses one whose
    /// magic or size is wrong, and reads `blocking` from the fourth field of every layout.
    #[test]
    fn the_config_is_an_initialized_nonblocking_one() {
        let c = nonblocking_config();
        assert_eq!(c.magic, 0xcafe_beef);
        assert_eq!(c.size, std::mem::size_of::<sys::ncclConfig_t>());
        assert_eq!(c.blocking, 0);
        assert_eq!(c.cgaClusterSize, c_int::MIN, "left to NCCL");
        assert!(c.netName.is_null() && c.commName.is_null());
        assert_eq!(
            std::mem::offset_of!(sys::ncclConfig_t, blocking),
            std::mem::size_of::<usize>() + 8,
            "size, magic and version come first, as in every NCCL since 2.14"
        );
        assert!(c.version >= NONBLOCKING_SINCE as u32);
    }
}
