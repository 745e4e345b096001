//! Rank 0's side of the TCP rendezvous: [`serve_id`], the address it listens on, and the
//! answer to each connection.

use super::wire::{
    read_by, read_exact_by, reply, write_by, HELLO_HEAD, MAGIC, MAGIC_STEM, STATUS_OTHER_RUN,
    STATUS_OTHER_VERSION, STATUS_OTHER_WORLD, STATUS_SERVED,
};
use crate::error::{PfcError, Result};
use crate::rendezvous::{RunId, UniqueId, UNIQUE_ID_BYTES};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Rank 0's side of the TCP exchange: hands the id to every other rank of a `world_size` job
/// whose run id is `run_id`.
///
/// The protocol (version 3): a rank connects and sends [`MAGIC`], the world size and its rank
/// (u32, little-endian), and its run id (a u16 length, little-endian, at most
/// [`RunId::MAX_BYTES`], then the bytes); rank 0 answers with [`MAGIC`], a status byte, its own
/// world size and the id, and counts the rank only once it has confirmed receipt with one byte.
/// So a connection that says nothing valid (a port probe, a health check, a client of something
/// else) is not counted; a rank of another job (another run id, checked first and compared
/// without an early exit; or another world size), or a rank outside `[1, world_size)`, is
/// refused with an answer that tells it why (never rank 0's run id); a client of another
/// version of this protocol is answered in this version, so that it reports the mismatch at
/// once; and a rank that connects twice is counted once. Connections are served
/// concurrently (at most 64 at a time; more are closed at once), each on a thread of its own:
/// a request must arrive, and its answer go out, within 1 s of connecting, and a rank that got
/// the id has 5 s more to confirm, whatever the overall deadline. These are deadlines of the
/// connection, not timeouts of each read: a peer that sends its request a byte at a time is
/// cut off at 1 s all the same. At the deadline no connection is taken any more, the ones in
/// progress finish (so a rank served just before it is counted), and a rank still missing is
/// an error naming it. A failed `accept` (too many open files, a connection aborted before it
/// was taken) is tried again until the deadline, and the timeout's message gives its error.
///
/// # Errors
///
/// - [`PfcError::Param`] when `run_id` cannot be used ([`RunId::check`]).
/// - [`PfcError::Collective`] when a rank is still missing at the deadline (the message names
///   the missing ranks, counts the requests refused for another run id, a sign of two jobs on
///   one port, and gives the last error of `accept`, if any), or when the listener cannot be
///   made non-blocking.
pub fn serve_id(
    listener: &TcpListener,
    id: &UniqueId,
    world_size: usize,
    run_id: &RunId,
    timeout: Duration,
) -> Result<()> {
    run_id.check()?;
    listener
        .set_nonblocking(true)
        .map_err(|e| PfcError::Collective(format!("rendezvous: {e}")))?;
    serve_id_with(
        || listener.accept().map(|(stream, _)| stream),
        id,
        world_size,
        run_id,
        timeout,
    )
}

/// [`serve_id`] with the accepting given: `accept` is the listener's (non-blocking), the
/// tests' one that fails on purpose.
pub(in crate::rendezvous) fn serve_id_with(
    mut accept: impl FnMut() -> std::io::Result<TcpStream>,
    id: &UniqueId,
    world_size: usize,
    run_id: &RunId,
    timeout: Duration,
) -> Result<()> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    const MAX_IN_FLIGHT: usize = 64;
    let deadline = crate::deadline::deadline_after(timeout);
    let peers = world_size.saturating_sub(1);
    let mut served = std::collections::BTreeSet::new();
    let (confirmed, ranks) = std::sync::mpsc::channel::<usize>();
    let in_flight = Arc::new(AtomicUsize::new(0));
    // Requests refused for another run id: said in the timeout's message.
    let other_runs = Arc::new(AtomicUsize::new(0));
    // The last failed accept: said in the timeout's message, since it may be why a rank is
    // missing (a process out of file descriptors cannot take the rank's connection).
    let mut accept_failed: Option<std::io::Error> = None;
    loop {
        while let Ok(rank) = ranks.try_recv() {
            served.insert(rank);
        }
        if served.len() >= peers {
            return Ok(());
        }
        if Instant::now() >= deadline {
            // The connections in progress end within their own deadlines (1 s + 5 s).
            if in_flight.load(Ordering::Acquire) > 0 {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            while let Ok(rank) = ranks.try_recv() {
                served.insert(rank);
            }
            if served.len() >= peers {
                return Ok(());
            }
            let missing: Vec<usize> = (1..world_size).filter(|r| !served.contains(r)).collect();
            let others = match other_runs.load(Ordering::Acquire) {
                0 => String::new(),
                n => {
                    format!("; refused {n} request(s) of another job (another run id) on this port")
                }
            };
            let accepting = accept_failed
                .map(|e| format!("; the last failed accept said: {e}"))
                .unwrap_or_default();
            return Err(PfcError::Collective(format!(
                "rendezvous: {} of {peers} ranks received the id within {timeout:?}; \
                 missing ranks {missing:?}{others}{accepting}",
                served.len()
            )));
        }
        match accept() {
            Ok(stream) => {
                if in_flight.load(Ordering::Acquire) >= MAX_IN_FLIGHT {
                    continue; // dropped: closed at once
                }
                let left = deadline.saturating_duration_since(Instant::now());
                // A rank sends its request as soon as it is connected: a connection silent for
                // a second is not one. The deadline is the connection's, not each read's, so
                // that a peer cannot stretch it by sending a byte at a time.
                let until = Instant::now() + left.clamp(Duration::from_millis(10), REQUEST_WITHIN);
                in_flight.fetch_add(1, Ordering::AcqRel);
                let (confirmed, handler_count, id) = (confirmed.clone(), in_flight.clone(), *id);
                let (run_id, other_runs) = (run_id.clone(), other_runs.clone());
                let spawned = std::thread::Builder::new()
                    .name("pfc-rendezvous".into())
                    .spawn(move || {
                        match serve_one(stream, &id, world_size, &run_id, until) {
                            Some(Served::Rank(rank)) => {
                                let _ = confirmed.send(rank);
                            }
                            Some(Served::OtherRun) => {
                                other_runs.fetch_add(1, Ordering::AcqRel);
                            }
                            None => {}
                        }
                        // after the send: the loop drains the channel once this reaches 0
                        handler_count.fetch_sub(1, Ordering::AcqRel);
                    });
                if spawned.is_err() {
                    in_flight.fetch_sub(1, Ordering::AcqRel);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                // EMFILE, ENFILE, ENOBUFS, ECONNABORTED...: the listener is still good, and the
                // condition may pass (descriptors are freed, the next peer does not abort).
                // The sleep keeps an error that repeats at once from spinning.
                accept_failed = Some(e);
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// How long a connection to rank 0 has for its request (and rank 0 for its answer).
const REQUEST_WITHIN: Duration = Duration::from_secs(1);
/// How long a rank that got the id has to confirm, whatever rank 0's deadline.
const CONFIRM_WITHIN: Duration = Duration::from_secs(5);

/// The address rank 0 listens on for `addr` (`MASTER_ADDR:MASTER_PORT`): a loopback address
/// (`127.x.y.z`, `::1`, `localhost`) as given, since the job is on this machine; anything else
/// on every interface of MASTER_PORT (`0.0.0.0`, or `[::]` for an IPv6 address), as torchrun's
/// store does. Binding the name itself would fail for a name that does not resolve yet or
/// names a service address (a Kubernetes ClusterIP), and would listen on loopback only where
/// /etc/hosts maps the host's own name to 127.0.1.1, out of the other nodes' reach.
pub(in crate::rendezvous) fn listen_addr(addr: &str) -> String {
    let Some((host, port)) = addr.rsplit_once(':') else {
        return addr.to_string(); // no port: let bind() say what is wrong
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let ip = host.parse::<std::net::IpAddr>().ok();
    if host.eq_ignore_ascii_case("localhost") || ip.is_some_and(|ip| ip.is_loopback()) {
        return addr.to_string();
    }
    if ip.is_some_and(|ip| ip.is_ipv6()) {
        format!("[::]:{port}")
    } else {
        format!("0.0.0.0:{port}")
    }
}

/// What one connection to rank 0 turned out to be.
enum Served {
    /// A rank of this job that received the id and confirmed.
    Rank(usize),
    /// A rank of another job, refused for its run id.
    OtherRun,
}

/// Whether two run ids are the same, looking at every byte of the shorter length (no early
/// exit on the first difference, so the time taken says little about how much of a guess was
/// right; the length itself is not hidden).
pub(in crate::rendezvous) fn same_run_id(a: &[u8], b: &[u8]) -> bool {
    let differ = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    (a.len() == b.len()) & (differ == 0)
}

/// Serves one connection: the rank it served, [`Served::OtherRun`] for a rank of another job,
/// or `None` if it was neither (not a rank of this protocol version, another world size, a
/// rank that did not confirm). The request must have come and the answer gone by `until`; a
/// rank that got the id has [`CONFIRM_WITHIN`] after that to confirm.
fn serve_one(
    mut stream: TcpStream,
    id: &UniqueId,
    world_size: usize,
    run_id: &RunId,
    until: Instant,
) -> Option<Served> {
    stream.set_nonblocking(false).ok()?;
    let mut head = [0u8; HELLO_HEAD];
    read_exact_by(&mut stream, &mut head[..MAGIC.len()], until).ok()?;
    if &head[..MAGIC.len()] != MAGIC {
        if head.starts_with(MAGIC_STEM) {
            refuse_other_version(stream, until);
        }
        return None;
    }
    read_exact_by(&mut stream, &mut head[MAGIC.len()..], until).ok()?;
    let word = |at: usize| u32::from_le_bytes([head[at], head[at + 1], head[at + 2], head[at + 3]]);
    let (their_world, rank) = (word(MAGIC.len()), word(MAGIC.len() + 4));
    let token_len = usize::from(u16::from_le_bytes([
        head[HELLO_HEAD - 2],
        head[HELLO_HEAD - 1],
    ]));
    if token_len > RunId::MAX_BYTES {
        return None; // no client of this version sends one: not a rank
    }
    let mut token = [0u8; RunId::MAX_BYTES];
    read_exact_by(&mut stream, &mut token[..token_len], until).ok()?;
    let (their_world, rank) = (their_world as usize, rank as usize);
    let status = if !same_run_id(&token[..token_len], run_id.as_str().as_bytes()) {
        STATUS_OTHER_RUN
    } else if their_world == world_size && (1..world_size).contains(&rank) {
        STATUS_SERVED
    } else {
        STATUS_OTHER_WORLD
    };
    let answer = match status {
        STATUS_SERVED => reply(status, world_size, &id.0),
        // Another job learns nothing of this one: not its world size, not its run id.
        STATUS_OTHER_RUN => reply(status, 0, &[0; UNIQUE_ID_BYTES]),
        _ => reply(status, world_size, &[0; UNIQUE_ID_BYTES]),
    };
    write_by(&mut stream, &answer, until).ok()?;
    match status {
        STATUS_SERVED => {
            // Once a rank has the id it must be counted, or rank 0 gives up on a rank that is
            // already in NCCL's init: its confirmation gets 5 s whatever the overall deadline
            // (which may be milliseconds away when the id goes out).
            let mut ack = [0u8; 1];
            read_exact_by(&mut stream, &mut ack, Instant::now() + CONFIRM_WITHIN).ok()?;
            Some(Served::Rank(rank))
        }
        STATUS_OTHER_RUN => Some(Served::OtherRun),
        _ => None,
    }
}

/// Answers a request of another version of this protocol with this version's refusal, so that
/// its client fails at once naming the version (every version's client checks [`MAGIC`] first)
/// instead of retrying until its timeout. The rest of the request is read before the socket
/// closes: closing with unread bytes would reset the connection, and a reset can discard the
/// answer before the client reads it. All of it by `until`, the connection's deadline.
fn refuse_other_version(mut stream: TcpStream, until: Instant) {
    if write_by(
        &mut stream,
        &reply(STATUS_OTHER_VERSION, 0, &[0; UNIQUE_ID_BYTES]),
        until,
    )
    .is_err()
    {
        return;
    }
    let _ = stream.shutdown(std::net::Shutdown::Write);
    // The client closes once it has the answer; read until then, a few KiB at most.
    let mut sink = [0u8; 4096];
    let _ = read_by(&mut stream, &mut sink, until);
}
