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
/// (and its environment variables) choose them as for `ncclCommInitRank`. NCCL copies `size`
/// bytes, padding included, so the config is built in zeroed memory field by field and kept in
/// a `MaybeUninit`, whose moves keep every byte (a typed move need not keep padding).
fn nonblocking_config() -> std::mem::MaybeUninit<sys::ncclConfig_t> {
    // NCCL_CONFIG_UNDEF_INT and NCCL_CONFIG_UNDEF_PTR.
    const UNSET: c_int = c_int::MIN;
    let mut config = std::mem::MaybeUninit::<sys::ncclConfig_t>::zeroed();
    let c = config.as_mut_ptr();
    // SAFETY: field writes into zeroed memory of the config's layout (integers and raw
    // pointers, for which all-zero bytes are valid values), through a pointer to it.
    unsafe {
        (*c).size = std::mem::size_of::<sys::ncclConfig_t>();
        (*c).magic = 0xcafe_beef;
        (*c).version = CONFIG_LAYOUT_VERSION;
        (*c).blocking = 0;
        (*c).cgaClusterSize = UNSET;
        (*c).minCTAs = UNSET;
        (*c).maxCTAs = UNSET;
        (*c).netName = std::ptr::null();
        (*c).splitShare = UNSET;
        (*c).trafficClass = UNSET;
        (*c).commName = std::ptr::null();
        (*c).collnetEnable = UNSET;
        (*c).CTAPolicy = UNSET;
        (*c).shrinkShare = UNSET;
        (*c).nvlsCTAs = UNSET;
        (*c).nChannelsPerNetPeer = UNSET;
        (*c).nvlinkCentricSched = UNSET;
        (*c).graphUsageMode = UNSET;
        (*c).numRmaCtx = UNSET;
        (*c).maxP2pPeers = UNSET;
    }
    config
}

/// `NCCL_COMM_BLOCKING` as NCCL reads it: `Some(true)` for 1, `Some(false)` for 0, which
/// override the config's `blocking` (and `ncclCommInitRank`'s default); `None` otherwise.
pub(super) fn blocking_from_env() -> Option<bool> {
    blocking_from(std::env::var("NCCL_COMM_BLOCKING").ok().as_deref())
}

fn blocking_from(value: Option<&str>) -> Option<bool> {
    match value?.trim() {
        "1" => Some(true),
        "0" => Some(false),
        _ => None,
    }
}

/// A communicator's state as `ncclCommGetAsyncError` reports it.
#[derive(Debug, PartialEq)]
pub(super) enum State {
    Ready,
    InProgress,
    /// An asynchronous error, or a failed query, described.
    Failed(String),
}

/// Queries a communicator's state. The code is read as an integer: cudarc's `ncclResult_t` is
/// a Rust enum, and a code a later NCCL adds would not be a valid value of it.
pub(super) fn comm_state(comm: sys::ncclComm_t) -> State {
    let mut code: u32 = 0;
    // SAFETY: a live communicator; NCCL writes one `ncclResult_t` (a C enum: 32 bits).
    let query = unsafe {
        sys::ncclCommGetAsyncError(comm, (&mut code as *mut u32).cast::<sys::ncclResult_t>())
    };
    if query != sys::ncclResult_t::ncclSuccess {
        return State::Failed(format!("ncclCommGetAsyncError failed ({query:?})"));
    }
    const SUCCESS: u32 = sys::ncclResult_t::ncclSuccess as u32;
    const IN_PROGRESS: u32 = sys::ncclResult_t::ncclInProgress as u32;
    match code {
        SUCCESS => State::Ready,
        IN_PROGRESS => State::InProgress,
        code => State::Failed(format!("NCCL reported {}", result_name(code))),
    }
}

/// An NCCL result code's name (NCCL 2.30's list), or its number.
fn result_name(code: u32) -> String {
    const NAMES: [&str; 9] = [
        "ncclSuccess",
        "ncclUnhandledCudaError",
        "ncclSystemError",
        "ncclInternalError",
        "ncclInvalidArgument",
        "ncclInvalidUsage",
        "ncclRemoteError",
        "ncclInProgress",
        "ncclTimeout",
    ];
    NAMES
        .get(code as usize)
        .map_or_else(|| format!("NCCL error {code}"), |n| n.to_string())
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
    for poll in 0u32.. {
        match comm_state(comm) {
            State::Ready => return Ok(()),
            State::InProgress => {}
            State::Failed(e) => return Err(Unsettled::Failed(e)),
        }
        if let (Some(d), Some(limit)) = (deadline, limit) {
            if Instant::now() >= d {
                return Err(Unsettled::TimedOut(limit));
            }
        }
        // NCCL may finish an ordinary collective's enqueue on a thread of its own (microseconds):
        // yield first, as a sleep costs tens of microseconds; a call still in progress after
        // that waits for peers (milliseconds to seconds): sleep, backing off to 1 ms.
        if poll < 200 {
            std::thread::yield_now();
        } else {
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(1));
        }
    }
    unreachable!("the poll loop ends by returning")
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
        let started = unsafe {
            sys::ncclCommInitRankConfig(&mut comm, world, self.id, rank, config.as_mut_ptr())
        };
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

    #[test]
    fn nccl_comm_blocking_is_read_as_nccl_reads_it() {
        assert_eq!(blocking_from(Some("1")), Some(true));
        assert_eq!(blocking_from(Some("0")), Some(false));
        for other in [None, Some(""), Some("yes"), Some("2")] {
            assert_eq!(blocking_from(other), None, "{other:?}");
        }
    }

    /// The config NCCL_CONFIG_INITIALIZER would give, but non-blocking: NCCL refuses one whose
    /// magic or size is wrong, and reads `blocking` from the fourth field of every layout.
    #[test]
    fn the_config_is_an_initialized_nonblocking_one() {
        let config = nonblocking_config();
        // Every byte is defined, padding included (zero there).
        // SAFETY: the MaybeUninit was zeroed whole, then fields were written.
        let bytes: &[u8] = unsafe {
            std::slice::from_raw_parts(
                config.as_ptr().cast::<u8>(),
                std::mem::size_of::<sys::ncclConfig_t>(),
            )
        };
        let last_field_end = std::mem::offset_of!(sys::ncclConfig_t, maxP2pPeers) + 4;
        assert!(
            bytes[last_field_end..].iter().all(|&b| b == 0),
            "the tail padding NCCL copies is zero: {:?}",
            &bytes[last_field_end..]
        );
        // SAFETY: as above; every field holds a valid value.
        let c = unsafe { config.assume_init_ref() };
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
