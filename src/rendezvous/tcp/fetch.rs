//! A rank's side of the TCP rendezvous: [`fetch_id`], which resolves rank 0's address and
//! asks it for the id, each wait bound by the timeout.

#[cfg(doc)] // for the doc links
use super::serve_id;
use super::wire::{
    read_by, write_by, HELLO_HEAD, MAGIC, REPLY_BYTES, STATUS_OTHER_RUN, STATUS_OTHER_VERSION,
    STATUS_OTHER_WORLD, STATUS_SERVED,
};
use crate::error::{PfcError, Result};
use crate::rendezvous::{RunId, UniqueId, UNIQUE_ID_BYTES};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Rank `rank`'s side of the TCP exchange with rank 0 of a `world_size` job at `addr` whose run
/// id is `run_id`: connects (resolving `addr` again and trying each of its addresses until
/// `timeout`, since rank 0's host may not resolve or listen yet), sends its rank and run id and
/// reads the id ([`serve_id`] gives the protocol). A refusal (another run id, another world
/// size, a rank out of range, another protocol version) is an error at once. Resolving a host
/// name runs on a helper thread that is waited for no longer than the time left (at least
/// 100 ms), since the system resolver has timeouts of its own that can far exceed `timeout`.
/// Each connection ends by the deadline too (or 100 ms after it starts, if later), however
/// slowly rank 0 (or whatever listens there) answers.
///
/// # Errors
///
/// - [`PfcError::Param`] when `rank` is not in `[1, world_size)`, or when `run_id` cannot be
///   used ([`RunId::check`]).
/// - [`PfcError::Collective`] when rank 0 refuses this rank (the message says why: another job
///   (run id ...) on this port, another world size, another protocol version), or when it is
///   not reachable within `timeout` (the message names `addr` and the last failure: a refused
///   connection, a name that does not resolve, or a resolution that did not finish in time).
pub fn fetch_id(
    addr: &str,
    rank: usize,
    world_size: usize,
    run_id: &RunId,
    timeout: Duration,
) -> Result<UniqueId> {
    let system: Resolver =
        Arc::new(|addr: &str| addr.to_socket_addrs().map(|found| found.collect()));
    fetch_id_with(addr, rank, world_size, run_id, timeout, &system)
}

/// Turns `host:port` into socket addresses; [`fetch_id`] uses the system's (`to_socket_addrs`),
/// the tests one that is slow or fails on purpose.
pub(in crate::rendezvous) type Resolver =
    Arc<dyn Fn(&str) -> std::io::Result<Vec<SocketAddr>> + Send + Sync>;

/// [`fetch_id`] with the resolver given.
pub(in crate::rendezvous) fn fetch_id_with(
    addr: &str,
    rank: usize,
    world_size: usize,
    run_id: &RunId,
    timeout: Duration,
    resolve: &Resolver,
) -> Result<UniqueId> {
    let fail = |why: String| PfcError::Collective(format!("rendezvous with {addr}: {why}"));
    let (rank32, world32) = match (u32::try_from(rank), u32::try_from(world_size)) {
        (Ok(r), Ok(w)) if r >= 1 && r < w => (r, w),
        _ => {
            return Err(PfcError::param(
                "rank",
                rank,
                format!("must lie in [1, world size {world_size}) to fetch the id"),
            ))
        }
    };
    run_id.check()?;
    let token = run_id.as_str().as_bytes();
    // A RunId that passes its check holds at most MAX_BYTES, which fits in a u16.
    let token_len = u16::try_from(token.len())
        .map_err(|_| PfcError::param("run_id", run_id.shown(), "is longer than a run id may be"))?;
    let mut hello = Vec::with_capacity(HELLO_HEAD + token.len());
    hello.extend_from_slice(MAGIC);
    hello.extend_from_slice(&world32.to_le_bytes());
    hello.extend_from_slice(&rank32.to_le_bytes());
    hello.extend_from_slice(&token_len.to_le_bytes());
    hello.extend_from_slice(token);
    let request = Request {
        hello: &hello,
        rank: rank32,
        world: world32,
        run_id,
    };
    let deadline = crate::deadline::deadline_after(timeout);
    let mut last = String::from("not tried");
    loop {
        match resolve_within(addr, deadline, resolve) {
            Ok(targets) => {
                for target in targets {
                    match fetch_from(&target, &request, deadline) {
                        Ok(Some(id)) => return Ok(id),
                        Ok(None) => last = format!("{target}: connection closed early"),
                        Err(Refused(why)) => return Err(fail(why)),
                        Err(Retry(why)) => last = format!("{target}: {why}"),
                    }
                }
            }
            Err(why) => last = why,
        }
        if Instant::now() >= deadline {
            return Err(fail(format!(
                "rank 0 not reachable within {timeout:?} (last: {last})"
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Resolves `addr` with `resolve`, waiting no longer than until `deadline` (but at least
/// 100 ms, as a connection's reads do). A numeric address needs no resolver and no thread.
/// Otherwise the resolver runs on a thread of its own: a lookup that outlives the wait is left
/// to finish there (its answer is dropped), which is the only way to bound a blocking
/// `getaddrinfo`; at most one such thread is left per call of [`fetch_id`], since the wait only
/// ends early at the deadline, after which no more lookups start.
fn resolve_within(
    addr: &str,
    deadline: Instant,
    resolve: &Resolver,
) -> std::result::Result<Vec<SocketAddr>, String> {
    if let Ok(at) = addr.parse::<SocketAddr>() {
        return Ok(vec![at]);
    }
    let host = addr.rsplit_once(':').map_or(addr, |(host, _)| host);
    let (answer, answered) = std::sync::mpsc::channel();
    let (owned, resolve) = (addr.to_string(), Arc::clone(resolve));
    std::thread::Builder::new()
        .name("pfc-resolve".into())
        .spawn(move || {
            let _ = answer.send(resolve(&owned));
        })
        .map_err(|e| format!("cannot start a thread to resolve {host}: {e}"))?;
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(100));
    match answered.recv_timeout(left) {
        Ok(Ok(targets)) => Ok(targets),
        Ok(Err(e)) => Err(format!("cannot resolve {host}: {e}")),
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Err(format!(
            "resolving {host} did not finish within the time left"
        )),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            Err(format!("resolving {host} failed without an answer"))
        }
    }
}

/// One rank's request, with what the messages of a refusal need.
struct Request<'a> {
    /// The bytes sent.
    hello: &'a [u8],
    rank: u32,
    world: u32,
    run_id: &'a RunId,
}

/// Why one try of [`fetch_id`] failed.
enum FetchError {
    /// Rank 0 answered and refused, or is not a rendezvous server: trying again cannot help.
    Refused(String),
    /// Not reachable (yet), or the connection broke: try again until the deadline.
    Retry(String),
}
use FetchError::{Refused, Retry};

/// One try of [`fetch_id`] against `target`. The connection's deadline is `deadline`, or
/// 100 ms from now if that is later (a last try still gets a chance): connecting, sending the
/// request, reading the answer and confirming all end by it, whatever the server sends, since
/// the time left is set before each read and write (a server that drips its answer a byte at
/// a time cannot hold the rank past it).
fn fetch_from(
    target: &SocketAddr,
    request: &Request<'_>,
    deadline: Instant,
) -> std::result::Result<Option<UniqueId>, FetchError> {
    let retry = |e: std::io::Error| Retry(e.to_string());
    let until = deadline.max(Instant::now() + Duration::from_millis(100));
    // At most 500 ms, so that a target that drops packets leaves time for the next one.
    let connect_within = until
        .saturating_duration_since(Instant::now())
        .clamp(Duration::from_millis(1), Duration::from_millis(500));
    let mut stream = TcpStream::connect_timeout(target, connect_within).map_err(retry)?;
    write_by(&mut stream, request.hello, until).map_err(retry)?;
    let mut reply = [0u8; REPLY_BYTES];
    let got = read_by(&mut stream, &mut reply, until).map_err(retry)?;
    // A short answer with another tag (the first version's was 136 bytes) is a refusal; a short
    // one with no tag yet, a broken connection to try again.
    let other_version =
        || Refused("it is not a partial-fc rendezvous server of this protocol version".into());
    if got >= MAGIC.len() && &reply[..MAGIC.len()] != MAGIC {
        return Err(other_version());
    }
    if got < REPLY_BYTES {
        return Ok(None);
    }
    let at = MAGIC.len() + 1;
    let theirs = u32::from_le_bytes([reply[at], reply[at + 1], reply[at + 2], reply[at + 3]]);
    let (rank, ours) = (request.rank, request.world);
    match reply[MAGIC.len()] {
        STATUS_SERVED => {}
        STATUS_OTHER_WORLD => {
            return Err(Refused(format!(
                "rank 0 there serves a job of world size {theirs}; this is rank {rank} of {ours} \
                 (another job on the same MASTER_ADDR:MASTER_PORT?)"
            )))
        }
        STATUS_OTHER_RUN => {
            let run = if request.run_id.is_empty() {
                "run id: rank 0 has one, this rank none".to_string()
            } else {
                format!("run id other than this rank's {}", request.run_id.shown())
            };
            return Err(Refused(format!(
                "rank 0 there belongs to another job ({run}) on this port; give every rank \
                 of one job the same run id (PFC_RUN_ID, or torchrun --rdzv-id) and jobs that \
                 run at once different MASTER_PORTs"
            )));
        }
        STATUS_OTHER_VERSION => return Err(other_version()),
        status => {
            return Err(Refused(format!(
                "rank 0 there refused rank {rank} of {ours} with an unknown status {status}"
            )))
        }
    }
    let mut id = [0u8; UNIQUE_ID_BYTES];
    id.copy_from_slice(&reply[at + 4..]);
    // Rank 0 counts this rank only once it has the id: confirm.
    write_by(&mut stream, &[1], until).map_err(retry)?;
    Ok(Some(UniqueId(id)))
}
