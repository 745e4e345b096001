//! k ranks as threads of one process: the CPU's embedded stand-in for NCCL.
//!
//! Ranks exchange pointers to their own buffers under a barrier and read each other's data
//! directly, so no staging copy is made. Every reduction sums in rank order, so all ranks get
//! bit-identical results. A rank that leaves (drops its handle) or a barrier that waits longer
//! than the group's timeout breaks the group: every waiting peer gets an error instead of hanging.
//! Even then a rank returns from an operation only once no peer is still reading its buffer.

use crate::backend::{Collective, Elem, ReduceOp};
use crate::cpu::wire::{from_wire, to_wire};
use crate::cpu::CpuBackend;
use crate::error::{PfcError, Result};
use crate::plan::Dtype;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

struct State {
    arrived: usize,
    generation: u64,
    broken: Option<String>,
    /// Ranks that passed an exchange's barrier and may still read their peers' buffers. A rank
    /// does not return from an operation (not even with an error) while this is non-zero: its
    /// caller would get its buffer back while a peer still reads it.
    readers: usize,
    /// Per rank: the buffer it published for the current operation.
    slots: Vec<Slot>,
}

/// What a rank publishes when it enters an operation: which operation on which element type,
/// and its buffer. Peers read each other's buffers only after checking that every rank entered
/// the same operation on the same type: a rank that gathers `u64` while another gathers `u16`
/// would otherwise read four times the bytes its peer's buffer holds.
#[derive(Clone, Copy, PartialEq, Debug)]
struct Slot {
    op: &'static str,
    elem: &'static str,
    addr: usize,
    len: usize,
}

impl Slot {
    const NONE: Slot = Slot {
        op: "",
        elem: "",
        addr: 0,
        len: 0,
    };

    fn of<T>(op: &'static str, buf: &[T], len: usize) -> Slot {
        Slot {
            op,
            elem: std::any::type_name::<T>(),
            addr: buf.as_ptr() as usize,
            len,
        }
    }
}

struct Shared {
    world: usize,
    timeout: Duration,
    state: Mutex<State>,
    turn: Condvar,
}

/// Builds the handles of a group of ranks that run as threads.
///
/// ```
/// use partial_fc::{collective::ThreadGroup, Collective, CpuBackend, ReduceOp};
/// let results = ThreadGroup::run(3, |c| {
///     let mut v = vec![c.rank() as f32 + 1.0];
///     c.all_reduce_f32(&CpuBackend, &mut v, 1, ReduceOp::Sum).unwrap();
///     v[0]
/// });
/// assert_eq!(results, vec![6.0, 6.0, 6.0]);
/// ```
pub struct ThreadGroup;

impl ThreadGroup {
    /// Default time a rank waits for its peers before the group is declared broken: 600 s
    /// ([`ThreadGroup::with_timeout`] chooses another).
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

    /// One handle per rank; move each into its own thread. A world size of 0 is taken as 1.
    pub fn handles(world_size: usize) -> Vec<ThreadCollective> {
        Self::with_timeout(world_size, Self::DEFAULT_TIMEOUT)
    }

    /// Like [`ThreadGroup::handles`], with a barrier timeout.
    pub fn with_timeout(world_size: usize, timeout: Duration) -> Vec<ThreadCollective> {
        let world = world_size.max(1);
        let shared = Arc::new(Shared {
            world,
            timeout,
            state: Mutex::new(State {
                arrived: 0,
                generation: 0,
                broken: None,
                readers: 0,
                slots: vec![Slot::NONE; world],
            }),
            turn: Condvar::new(),
        });
        (0..world)
            .map(|rank| ThreadCollective {
                rank,
                shared: shared.clone(),
                _not_sync: std::marker::PhantomData,
            })
            .collect()
    }

    /// Runs `f` once per rank, each on its own scoped thread, and returns the results in rank
    /// order. A panic in a rank is resumed on the caller's thread.
    pub fn run<R: Send>(world_size: usize, f: impl Fn(ThreadCollective) -> R + Sync) -> Vec<R> {
        let handles = Self::handles(world_size);
        std::thread::scope(|scope| {
            let joins: Vec<_> = handles
                .into_iter()
                .map(|c| {
                    let f = &f;
                    scope.spawn(move || f(c))
                })
                .collect();
            joins
                .into_iter()
                .map(|j| j.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect()
        })
    }
}

/// This rank's count among the readers of the current exchange (`State::readers`); dropping it
/// ends the reads, also when the rank unwinds, so that no peer waits for it forever.
struct Reading<'a>(&'a Shared);

impl Drop for Reading<'_> {
    fn drop(&mut self) {
        let mut st = self.0.state.lock().unwrap_or_else(|p| p.into_inner());
        st.readers = st.readers.saturating_sub(1);
        if st.readers == 0 {
            self.0.turn.notify_all();
        }
    }
}

/// One rank's handle on a [`ThreadGroup`]. `Send` (move it into the rank's thread) but not
/// `Sync`: a collective counts arrivals, so two threads calling through one rank's handle would
/// complete it without a peer, reading that peer's stale buffer (a review found it).
///
/// ```compile_fail
/// fn shared<T: Sync>(_: &T) {}
/// let handles = partial_fc::collective::ThreadGroup::handles(2);
/// shared(&handles[0]);
/// ```
pub struct ThreadCollective {
    rank: usize,
    shared: Arc<Shared>,
    _not_sync: std::marker::PhantomData<std::cell::Cell<()>>,
}

impl std::fmt::Debug for ThreadCollective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ThreadCollective(rank {} of {})",
            self.rank, self.shared.world
        )
    }
}

impl Drop for ThreadCollective {
    fn drop(&mut self) {
        // Peers that already passed the last barrier see the generation move first and return
        // normally; any later wait by a peer fails at once instead of timing out. (A poisoned
        // lock is taken anyway: the peers must still hear that this rank is gone.)
        self.break_group(&format!("rank {} left the group", self.rank));
    }
}

impl ThreadCollective {
    /// Breaks the group for this rank's local failure and returns the error: the peers waiting
    /// in the collective this rank will not join fail at once (see [`Collective::abort`]).
    fn refuse_locally(&self, err: PfcError) -> PfcError {
        self.break_group(&format!(
            "rank {} failed its part of a collective: {err}",
            self.rank
        ));
        err
    }

    fn break_group(&self, reason: &str) {
        let mut st = self
            .shared
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if st.broken.is_none() {
            st.broken = Some(reason.to_string());
        }
        self.shared.turn.notify_all();
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, State>> {
        self.shared
            .state
            .lock()
            .map_err(|_| PfcError::Collective("a rank panicked inside a collective".into()))
    }

    fn wait_all(&self, publish: Option<Slot>) -> Result<()> {
        let mut st = self.lock()?;
        if let Some(msg) = &st.broken {
            return Err(PfcError::Collective(msg.clone()));
        }
        let publishing = publish.is_some();
        if let Some(slot) = publish {
            st.slots[self.rank] = slot;
        }
        let generation = st.generation;
        st.arrived += 1;
        if st.arrived == self.shared.world {
            st.arrived = 0;
            st.generation += 1;
            if publishing {
                // Every rank is through the exchange's barrier: each may now read the others.
                st.readers = self.shared.world;
            }
            self.shared.turn.notify_all();
            return Ok(());
        }
        let deadline = crate::deadline::deadline_after(self.shared.timeout);
        loop {
            if st.generation != generation {
                return Ok(());
            }
            if let Some(msg) = &st.broken {
                return Err(PfcError::Collective(msg.clone()));
            }
            let now = Instant::now();
            if now >= deadline {
                let msg = format!(
                    "rank {} waited {:?} for its peers; the group is broken",
                    self.rank, self.shared.timeout
                );
                st.broken = Some(msg.clone());
                self.shared.turn.notify_all();
                return Err(PfcError::Collective(msg));
            }
            st = self
                .shared
                .turn
                .wait_timeout(st, deadline - now)
                .map_err(|_| PfcError::Collective("a rank panicked inside a collective".into()))?
                .0;
        }
    }

    /// Publishes `own` and waits for every rank; then the buffers every rank published, once
    /// every rank is known to have entered the same operation on the same element type. A rank
    /// that entered another one breaks the group: its calls no longer pair with the others'.
    ///
    /// The returned [`Reading`] counts this rank among the readers of its peers' buffers until
    /// it is passed to [`ThreadCollective::release`] (or dropped, if the rank unwinds).
    fn exchange<T>(&self, own: Slot) -> Result<(Reading<'_>, Vec<(*const T, usize)>)> {
        self.wait_all(Some(own))?;
        let reading = Reading(&self.shared);
        let mut st = self.lock()?;
        if let Some((r, other)) = st
            .slots
            .iter()
            .enumerate()
            .find(|(_, s)| s.op != own.op || s.elem != own.elem)
        {
            let msg = format!(
                "rank {r} called {}::<{}> while rank {} called {}::<{}>: the ranks' calls no \
                 longer pair up; the group is broken",
                other.op, other.elem, self.rank, own.op, own.elem
            );
            st.broken = Some(msg.clone());
            self.shared.turn.notify_all();
            drop(st);
            return Err(self
                .release(reading, Err(PfcError::Collective(msg)))
                .unwrap_err());
        }
        let peers = st
            .slots
            .iter()
            .map(|s| (s.addr as *const T, s.len))
            .collect();
        Ok((reading, peers))
    }

    /// Ends this rank's reads of its peers' buffers, then the operation's second barrier, with
    /// `result` as the operation's outcome if the barrier passes. Whatever happens, the rank
    /// returns only once no peer reads any more: if the barrier fails (a peer timed out or
    /// left), it still waits, without a timeout, for the peers that are reading, which are
    /// copying from memory and finish. Without that wait its caller could change or free a
    /// buffer a peer is still reading.
    fn release(&self, reading: Reading<'_>, result: Result<()>) -> Result<()> {
        drop(reading);
        let passed = self.wait_all(None);
        if passed.is_err() {
            if let Ok(mut st) = self.shared.state.lock() {
                while st.readers > 0 {
                    match self.shared.turn.wait(st) {
                        Ok(next) => st = next,
                        Err(_) => break, // a rank panicked holding the lock: nothing to wait for
                    }
                }
            }
        }
        passed.and(result)
    }

    /// The all-gather on host slices (the trait method's body, under a name of its own so that
    /// it is not confused with [`Collective::all_gather`]).
    fn gather_slices<T: Copy>(&self, send: &[T], count: usize, recv: &mut [T]) -> Result<()> {
        let world = self.shared.world;
        if send.len() < count || recv.len() < count.saturating_mul(world) {
            return Err(self.refuse_locally(PfcError::Shape(format!(
                "all_gather of {count} per rank needs send >= {count} and recv >= {}",
                count.saturating_mul(world)
            ))));
        }
        let (reading, peers) = self.exchange::<T>(Slot::of("all_gather", send, count))?;
        if let Some((r, &(_, n))) = peers.iter().enumerate().find(|(_, p)| p.1 != count) {
            let err = PfcError::Collective(format!(
                "all_gather: rank {r} sent {n} elements, rank {} expected {count}",
                self.rank
            ));
            return self.release(reading, Err(err));
        }
        for (r, &(ptr, n)) in peers.iter().enumerate() {
            // SAFETY: rank r published `count` readable elements and does not return from the
            // operation (so its caller cannot touch them) while a rank is reading (`release`).
            let src = unsafe { std::slice::from_raw_parts(ptr, n) };
            recv[r * count..(r + 1) * count].copy_from_slice(src);
        }
        self.release(reading, Ok(()))
    }
}

impl ThreadCollective {
    /// The reduce-scatter on host slices: every rank publishes its `world · count` values, then
    /// `reduce` gets, in rank order, every rank's block of this rank (`count` values each) and
    /// writes their reduction into `recv`; the second barrier keeps the peers' buffers alive
    /// until every rank has read.
    fn reduce_scatter_slices<T: Copy>(
        &self,
        op: &'static str,
        send: &[T],
        count: usize,
        recv: &mut [T],
        reduce: impl FnOnce(&[&[T]], &mut [T]),
    ) -> Result<()> {
        let world = self.shared.world;
        if send.len() < count.saturating_mul(world) || recv.len() < count {
            return Err(self.refuse_locally(PfcError::Shape(format!(
                "reduce_scatter of {count} per rank needs send >= {} and recv >= {count}",
                count.saturating_mul(world)
            ))));
        }
        let (reading, peers) = self.exchange::<T>(Slot::of(op, send, count * world))?;
        if let Some(r) = peers.iter().position(|&(_, n)| n != count * world) {
            let err = PfcError::Collective(format!(
                "reduce_scatter: rank {r} sent {} elements, rank {} {}",
                peers[r].1,
                self.rank,
                count * world
            ));
            return self.release(reading, Err(err));
        }
        let block = self.rank * count..(self.rank + 1) * count;
        // SAFETY: as in gather_slices.
        let blocks: Vec<&[T]> = peers
            .iter()
            .map(|&(p, n)| unsafe { &std::slice::from_raw_parts(p, n)[block.clone()] })
            .collect();
        reduce(&blocks, &mut recv[..count]);
        drop(blocks);
        self.release(reading, Ok(()))
    }
}

impl Collective<CpuBackend> for ThreadCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.world
    }

    fn all_gather<T: Elem>(
        &self,
        _: &CpuBackend,
        send: &Vec<T>,
        count: usize,
        recv: &mut Vec<T>,
    ) -> Result<()> {
        self.gather_slices(send, count, recv)
    }

    fn all_reduce_f32(
        &self,
        _: &CpuBackend,
        buf: &mut Vec<f32>,
        count: usize,
        op: ReduceOp,
    ) -> Result<()> {
        if buf.len() < count {
            return Err(self.refuse_locally(PfcError::Shape(format!(
                "all_reduce of {count} on a buffer of {}",
                buf.len()
            ))));
        }
        let name = match op {
            ReduceOp::Sum => "all_reduce(sum)",
            ReduceOp::Max => "all_reduce(max)",
        };
        let (reading, peers) = self.exchange::<f32>(Slot::of(name, buf, count))?;
        if let Some(r) = peers.iter().position(|&(_, n)| n != count) {
            let err = PfcError::Collective(format!(
                "all_reduce: rank {r} reduces {} elements, rank {} {count}",
                peers[r].1, self.rank
            ));
            return self.release(reading, Err(err));
        }
        // SAFETY: as in gather_slices; every rank reads before `release`, and writes its own
        // buffer only after it.
        let sources: Vec<&[f32]> = peers
            .iter()
            .map(|&(p, n)| unsafe { std::slice::from_raw_parts(p, n) })
            .collect();
        let reduced: Vec<f32> = (0..count)
            .map(|i| {
                let values = sources.iter().map(|s| s[i]);
                match op {
                    ReduceOp::Sum => values.fold(0.0, |a, v| a + v),
                    ReduceOp::Max => values.fold(f32::NEG_INFINITY, f32::max),
                }
            })
            .collect();
        drop(sources);
        self.release(reading, Ok(()))?;
        buf[..count].copy_from_slice(&reduced);
        Ok(())
    }

    fn reduce_scatter_f32(
        &self,
        _: &CpuBackend,
        send: &Vec<f32>,
        count: usize,
        recv: &mut Vec<f32>,
    ) -> Result<()> {
        self.reduce_scatter_slices("reduce_scatter_f32", send, count, recv, |blocks, out| {
            out.fill(0.0);
            for block in blocks {
                for (o, v) in out.iter_mut().zip(*block) {
                    *o += v;
                }
            }
        })
    }

    fn reduce_scatter_16(
        &self,
        _: &CpuBackend,
        send: &Vec<u16>,
        count: usize,
        recv: &mut Vec<u16>,
        dtype: Dtype,
    ) -> Result<()> {
        super::check_16_bit(dtype).map_err(|e| self.refuse_locally(e))?;
        // In f32, in rank order, starting from rank 0's value (so that one rank is a copy), then
        // rounded once: every rank computes the same bits for its block, whatever the threads.
        let op = match dtype {
            Dtype::F16 => "reduce_scatter_16(f16)",
            _ => "reduce_scatter_16(bf16)",
        };
        self.reduce_scatter_slices(op, send, count, recv, |blocks, out| {
            for (j, o) in out.iter_mut().enumerate() {
                let mut sum = from_wire(blocks[0][j], dtype);
                for block in &blocks[1..] {
                    sum += from_wire(block[j], dtype);
                }
                *o = to_wire(sum, dtype);
            }
        })
    }

    fn barrier(&self) -> Result<()> {
        // The second wait keeps every rank here until all have checked the slots, as the
        // other operations' second wait does: a rank that went on would overwrite its slot.
        let (reading, _) = self.exchange::<u8>(Slot::of::<u8>("barrier", &[], 0))?;
        self.release(reading, Ok(()))
    }

    fn abort(&self, reason: &str) {
        self.break_group(&format!("rank {} aborted the group: {reason}", self.rank));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A rank whose second barrier times out used to return at once, while a slower peer still
    /// copied from its buffer: its caller could then change or free memory being read (found by
    /// a review: a 256 MiB all-gather crashed with SIGSEGV). Rank 0 here holds its read open for
    /// 1.5 s, five times rank 1's timeout (which is long enough that both reach the first
    /// barrier in time on a loaded machine).
    #[test]
    fn a_rank_that_times_out_returns_only_after_its_peers_stopped_reading() {
        use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
        let mut handles = ThreadGroup::with_timeout(2, Duration::from_millis(300));
        let (h1, h0) = (handles.pop().unwrap(), handles.pop().unwrap());
        let done_reading = AtomicBool::new(false);
        std::thread::scope(|scope| {
            let done = &done_reading;
            // h0 moves into its thread: a handle is not Sync.
            let slow = scope.spawn(move || {
                let send = vec![1u32; 4];
                let (reading, peers) = h0.exchange::<u32>(Slot::of("all_gather", &send, 4))?;
                assert_eq!(peers.len(), 2);
                std::thread::sleep(Duration::from_millis(1500)); // still reading rank 1's buffer
                done.store(true, SeqCst);
                h0.release(reading, Ok(()))
            });
            let (send, mut recv) = (vec![2u32; 4], vec![0u32; 8]);
            let fast = h1.all_gather(&CpuBackend, &send, 4, &mut recv);
            assert!(fast.is_err(), "rank 1's second barrier must time out");
            assert!(
                done_reading.load(SeqCst),
                "rank 1 returned while rank 0 was still reading its buffer"
            );
            assert_eq!(recv, [1, 1, 1, 1, 2, 2, 2, 2]);
            assert!(
                slow.join().unwrap().is_err(),
                "the group is broken for rank 0 too"
            );
        });
    }

    #[test]
    fn gather_reduce_scatter_agree_with_sequential() {
        let k = 4;
        let out = ThreadGroup::run(k, |c| {
            let b = CpuBackend;
            let r = c.rank();
            let send: Vec<f32> = (0..3).map(|i| (r * 10 + i) as f32).collect();
            let mut recv = vec![0.0; 3 * k];
            c.all_gather(&b, &send, 3, &mut recv).unwrap();
            let big: Vec<f32> = (0..2 * k).map(|i| (i + r) as f32).collect();
            let mut part = vec![0.0; 2];
            c.reduce_scatter_f32(&b, &big, 2, &mut part).unwrap();
            let mut mx = vec![r as f32];
            c.all_reduce_f32(&b, &mut mx, 1, ReduceOp::Max).unwrap();
            (recv, part, mx[0])
        });
        for (r, (recv, part, mx)) in out.iter().enumerate() {
            assert_eq!(recv[3..6], [10.0, 11.0, 12.0]);
            let want: Vec<f32> = (0..2)
                .map(|i| (0..k).map(|q| (r * 2 + i + q) as f32).sum())
                .collect();
            assert_eq!(*part, want);
            assert_eq!(*mx, 3.0);
        }
    }

    #[test]
    fn ranks_in_different_operations_or_types_break_the_group() {
        // A u16 gather paired with a u64 gather of the same count: without the check, rank 1
        // would read 4× the bytes rank 0's buffer holds.
        let out = ThreadGroup::run(2, |c| {
            let b = CpuBackend;
            let first = if c.rank() == 0 {
                c.all_gather(&b, &vec![1u16; 4], 4, &mut vec![0u16; 8])
            } else {
                c.all_gather(&b, &vec![1u64; 4], 4, &mut vec![0u64; 8])
            };
            (first, c.barrier())
        });
        for (first, then) in &out {
            let msg = first.as_ref().unwrap_err().to_string();
            assert!(msg.contains("u16") && msg.contains("u64"), "{msg}");
            assert!(then.is_err(), "the group stays broken");
        }
        // A barrier paired with an all-reduce, and a sum with a max.
        let out = ThreadGroup::run(2, |c| {
            let b = CpuBackend;
            let mut v = vec![1.0f32];
            match c.rank() {
                0 => c.barrier(),
                _ => c.all_reduce_f32(&b, &mut v, 1, ReduceOp::Sum),
            }
        });
        assert!(out.iter().all(|r| r.is_err()), "{out:?}");
        let out = ThreadGroup::run(2, |c| {
            let mut v = vec![1.0f32];
            let op = [ReduceOp::Sum, ReduceOp::Max][c.rank()];
            c.all_reduce_f32(&CpuBackend, &mut v, 1, op)
        });
        assert!(out.iter().all(|r| r.is_err()), "{out:?}");
        // Matching calls still work, barriers included.
        let out = ThreadGroup::run(3, |c| {
            c.barrier()?;
            let mut v = vec![c.rank() as f32];
            c.all_reduce_f32(&CpuBackend, &mut v, 1, ReduceOp::Sum)?;
            c.barrier()?;
            Ok::<_, PfcError>(v[0])
        });
        assert!(
            out.iter().all(|r| matches!(r, Ok(v) if *v == 3.0)),
            "{out:?}"
        );
    }

    #[test]
    fn a_departed_rank_breaks_the_group_instead_of_hanging() {
        let mut handles = ThreadGroup::with_timeout(2, Duration::from_secs(30));
        let second = handles.pop().unwrap();
        let first = handles.pop().unwrap();
        let waiter = std::thread::spawn(move || first.barrier());
        std::thread::sleep(Duration::from_millis(50));
        drop(second);
        assert!(waiter.join().unwrap().is_err());
    }
}
