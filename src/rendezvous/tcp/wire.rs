//! The TCP rendezvous's bytes: the tag that starts every message, a request's head, rank 0's
//! answer and its statuses; and reads and writes that end by a connection's deadline.

#[cfg(doc)] // for the doc links
use crate::rendezvous::RunId;
use crate::rendezvous::UNIQUE_ID_BYTES;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Instant;

/// The first bytes of every message of the TCP rendezvous, with its protocol version (3: the
/// request carries the job's [`RunId`]).
pub const MAGIC: &[u8; 8] = b"pfc-id/3";

/// What every version's [`MAGIC`] starts with: a request that starts so but is of another
/// version gets an answer in this version, which its client reports as another version instead
/// of retrying until its timeout.
pub(super) const MAGIC_STEM: &[u8] = b"pfc-id/";

/// A rank's request, up to its run id: [`MAGIC`], world size and rank (u32, little-endian), and
/// the run id's length (u16, little-endian); the run id's bytes follow.
pub(in crate::rendezvous) const HELLO_HEAD: usize = MAGIC.len() + 4 + 4 + 2;
/// Rank 0's answer: [`MAGIC`], status (one of the `STATUS_` values), rank 0's world size (u32,
/// little-endian; zero unless served or refused for its world size), the id (zeros unless
/// served).
pub(in crate::rendezvous) const REPLY_BYTES: usize = MAGIC.len() + 1 + 4 + UNIQUE_ID_BYTES;
/// The id follows.
pub(in crate::rendezvous) const STATUS_SERVED: u8 = 0;
/// Refused: another world size, or a rank outside `[1, world_size)`.
pub(super) const STATUS_OTHER_WORLD: u8 = 1;
/// Refused: another run id (another job on this port).
pub(super) const STATUS_OTHER_RUN: u8 = 2;
/// Refused: the request was of another version of this protocol. Only a client of another
/// version gets it, and that client sees this version's [`MAGIC`] first.
pub(in crate::rendezvous) const STATUS_OTHER_VERSION: u8 = 3;

/// Rank 0's answer with `status`, `world` and `id`.
pub(in crate::rendezvous) fn reply(
    status: u8,
    world: usize,
    id: &[u8; UNIQUE_ID_BYTES],
) -> Vec<u8> {
    let mut reply = Vec::with_capacity(REPLY_BYTES);
    reply.extend_from_slice(MAGIC);
    reply.push(status);
    reply.extend_from_slice(&u32::try_from(world).unwrap_or(u32::MAX).to_le_bytes());
    reply.extend_from_slice(id);
    reply
}

/// The error of a read or write that `deadline` cut off.
fn past(deadline: Instant) -> std::io::Error {
    let late = Instant::now().saturating_duration_since(deadline);
    std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("the connection's deadline passed ({late:?} ago)"),
    )
}

/// Reads into `buf` until it is full or the peer closes, and returns how many bytes came; an
/// error of [`std::io::ErrorKind::TimedOut`] at `deadline`. The time left is set as the read
/// timeout before each read: the socket's timeout bounds one `read` only, so a peer that sends
/// a byte just within it would otherwise hold the connection for as many timeouts as it has
/// bytes to send.
pub(super) fn read_by(
    stream: &mut TcpStream,
    buf: &mut [u8],
    deadline: Instant,
) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(past(deadline));
        }
        stream.set_read_timeout(Some(left))?;
        match stream.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// [`read_by`] that must fill `buf`: a peer that closes first is an
/// [`std::io::ErrorKind::UnexpectedEof`] error.
pub(super) fn read_exact_by(
    stream: &mut TcpStream,
    buf: &mut [u8],
    deadline: Instant,
) -> std::io::Result<()> {
    if read_by(stream, buf, deadline)? < buf.len() {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// Writes all of `bytes` by `deadline`, setting the time left as the write timeout before each
/// write (for the reason of [`read_by`]: a peer that reads a byte at a time).
pub(super) fn write_by(
    stream: &mut TcpStream,
    mut bytes: &[u8],
    deadline: Instant,
) -> std::io::Result<()> {
    while !bytes.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(past(deadline));
        }
        stream.set_write_timeout(Some(left))?;
        match stream.write(bytes) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
