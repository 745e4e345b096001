//! The rendezvous's tests: id formats, the file and TCP exchanges (run ids, refusals,
//! deadlines, lookups) and `LaunchEnv`.

use super::launch_env::Var;
use super::tcp::{
    fetch_id_with, reply, same_run_id, serve_id_with, Resolver, HELLO_HEAD, REPLY_BYTES,
    STATUS_OTHER_VERSION, STATUS_SERVED,
};
use super::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Instant;

fn some_id(seed: u8) -> UniqueId {
    let mut id = [0u8; UNIQUE_ID_BYTES];
    for (i, b) in id.iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(31).wrapping_add(seed);
    }
    UniqueId(id)
}

/// A listener on a free loopback port, and its address.
fn loopback() -> (TcpListener, String) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    (listener, addr)
}

/// Rank 0 serving `id` to a job of `world` ranks without a run id, on its own thread.
fn serve_in_thread(
    listener: TcpListener,
    id: UniqueId,
    world: usize,
    timeout: Duration,
) -> std::thread::JoinHandle<Result<()>> {
    std::thread::spawn(move || serve_id(&listener, &id, world, &RunId::default(), timeout))
}

/// A rank's fetch without a run id.
fn fetch(addr: &str, rank: usize, world: usize, timeout: Duration) -> Result<UniqueId> {
    fetch_id(addr, rank, world, &RunId::default(), timeout)
}

#[test]
fn hex_round_trip_and_errors() {
    let id = some_id(3);
    assert_eq!(
        UniqueId::from_hex(&format!("  {}\n", id.to_hex())).unwrap(),
        id
    );
    assert!(matches!(
        UniqueId::from_hex("abc"),
        Err(PfcError::Param { .. })
    ));
    let mut bad = id.to_hex();
    bad.replace_range(10..11, "g");
    assert!(matches!(
        UniqueId::from_hex(&bad),
        Err(PfcError::Param { .. })
    ));
}

#[test]
fn launch_env_parses_and_validates() {
    let vars = |pairs: &'static [(&'static str, &'static str)]| {
        move |k: &str| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    };
    let env = LaunchEnv::from_vars(vars(&[
        ("RANK", "2"),
        ("WORLD_SIZE", "4"),
        ("MASTER_PORT", "1234"),
    ]))
    .unwrap();
    assert_eq!(
        (env.rank, env.world_size, env.local_rank, env.master_port),
        (2, 4, 2, 1234)
    );
    assert!(LaunchEnv::from_vars(vars(&[("RANK", "4"), ("WORLD_SIZE", "4")])).is_err());
    assert!(LaunchEnv::from_vars(vars(&[("RANK", "x"), ("WORLD_SIZE", "4")])).is_err());
    assert!(LaunchEnv::from_vars(vars(&[("WORLD_SIZE", "4")])).is_err());
}

#[test]
fn launch_env_blames_the_variable_that_is_wrong() {
    fn vars<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }
    let blamed = |pairs: &[(&str, &str)]| match LaunchEnv::from_vars(vars(pairs)) {
        Err(PfcError::Param { name, .. }) => name,
        other => panic!("{pairs:?} gave {other:?}"),
    };
    let base = [("RANK", "1"), ("WORLD_SIZE", "4")];
    let with = |extra: (&'static str, &'static str)| {
        let mut v = base.to_vec();
        v.push(extra);
        v
    };
    assert_eq!(blamed(&[("RANK", "0"), ("WORLD_SIZE", "0")]), "WORLD_SIZE");
    assert_eq!(blamed(&with(("MASTER_PORT", "0"))), "MASTER_PORT");
    assert_eq!(blamed(&with(("MASTER_PORT", "70000"))), "MASTER_PORT");
    assert_eq!(blamed(&with(("MASTER_ADDR", " "))), "MASTER_ADDR");
    assert_eq!(blamed(&with(("LOCAL_WORLD_SIZE", "0"))), "LOCAL_WORLD_SIZE");
    let mut v = with(("LOCAL_WORLD_SIZE", "2"));
    v.push(("LOCAL_RANK", "2"));
    assert_eq!(blamed(&v), "LOCAL_RANK");
    // without LOCAL_WORLD_SIZE, a node index past the whole job's size
    assert_eq!(blamed(&with(("LOCAL_RANK", "5"))), "LOCAL_RANK");
    // without LOCAL_RANK, the node-local index comes from LOCAL_WORLD_SIZE
    let mut v = vec![
        ("RANK", "9"),
        ("WORLD_SIZE", "16"),
        ("LOCAL_WORLD_SIZE", "8"),
    ];
    assert_eq!(LaunchEnv::from_vars(vars(&v)).unwrap().local_rank, 1);
    v.push(("LOCAL_RANK", "3"));
    assert_eq!(LaunchEnv::from_vars(vars(&v)).unwrap().local_rank, 3);
}

#[test]
fn an_id_file_written_in_place_is_read_once_complete() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("id");
    std::fs::write(&path, "").unwrap();
    let id = some_id(4);
    let reader = {
        let path = path.clone();
        std::thread::spawn(move || read_id_file(&path, Duration::from_secs(20)))
    };
    std::thread::sleep(Duration::from_millis(100));
    std::fs::write(&path, id.to_hex()).unwrap();
    assert_eq!(reader.join().unwrap().unwrap(), id);
    // still not an id at the deadline: its parse error
    std::fs::write(&path, "abc").unwrap();
    assert!(matches!(
        read_id_file(&path, Duration::from_millis(100)),
        Err(PfcError::Param { .. })
    ));
}

#[test]
fn file_exchange_between_threads() {
    let dir = tempfile::tempdir().unwrap();
    let rv = Rendezvous::File {
        path: dir.path().join("id"),
        timeout: Duration::from_secs(10),
    };
    let ids: Vec<UniqueId> = std::thread::scope(|s| {
        let joins: Vec<_> = (0..4)
            .map(|rank| {
                let rv = rv.clone();
                s.spawn(move || rv.exchange(rank, 4, || Ok(some_id(9))).unwrap())
            })
            .collect();
        joins.into_iter().map(|j| j.join().unwrap()).collect()
    });
    assert!(ids.iter().all(|id| *id == some_id(9)));
}

#[test]
fn tcp_exchange_on_loopback() {
    let (listener, addr) = loopback();
    let server = serve_in_thread(listener, some_id(5), 4, Duration::from_secs(10));
    let clients: Vec<_> = (1..4)
        .map(|rank| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                fetch_id(&addr, rank, 4, &RunId::default(), Duration::from_secs(10)).unwrap()
            })
        })
        .collect();
    for c in clients {
        assert_eq!(c.join().unwrap(), some_id(5));
    }
    server.join().unwrap().unwrap();
}

/// A connection that says nothing (a port probe) used to count as a served rank, so rank
/// 0 stopped listening with a real rank still to come (found by a review). Now it is not
/// counted, and neither is a second connection of the same rank.
#[test]
fn probes_and_repeated_ranks_are_not_counted() {
    let (listener, addr) = loopback();
    drop(TcpStream::connect(&addr).unwrap()); // a probe: connects and closes
    let mut silent = TcpStream::connect(&addr).unwrap(); // connects, says nothing
    silent.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap(); // or something else entirely
    let server = serve_in_thread(listener, some_id(6), 3, Duration::from_secs(20));
    assert_eq!(
        fetch(&addr, 1, 3, Duration::from_secs(10)).unwrap(),
        some_id(6)
    );
    assert_eq!(
        fetch(&addr, 1, 3, Duration::from_secs(10)).unwrap(),
        some_id(6),
        "a rank that asks again gets the id again"
    );
    assert!(!server.is_finished(), "rank 2 has not fetched yet");
    assert_eq!(
        fetch(&addr, 2, 3, Duration::from_secs(10)).unwrap(),
        some_id(6)
    );
    server.join().unwrap().unwrap();
}

#[test]
fn a_job_of_one_takes_no_port() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let rv = Rendezvous::Tcp {
        addr: taken.local_addr().unwrap().to_string(),
        timeout: Duration::from_secs(1),
        run_id: Some(RunId::default()),
    };
    assert_eq!(rv.exchange(0, 1, || Ok(some_id(1))).unwrap(), some_id(1));
}

#[test]
fn rank_0_listens_on_every_interface_unless_the_address_is_loopback() {
    assert_eq!(listen_addr("127.0.0.1:29500"), "127.0.0.1:29500");
    assert_eq!(listen_addr("localhost:29500"), "localhost:29500");
    assert_eq!(listen_addr("[::1]:7"), "[::1]:7");
    assert_eq!(listen_addr("node0:29500"), "0.0.0.0:29500");
    assert_eq!(listen_addr("10.1.2.3:29500"), "0.0.0.0:29500");
    assert_eq!(listen_addr("[fd00::5]:29500"), "[::]:29500");
}

/// Silent connections are served beside the real ranks, not before them: five of them used
/// to hold rank 0 for a second each, past a 3 s timeout, and the real rank was reported
/// missing (found by a review).
#[test]
fn silent_connections_do_not_hold_up_the_ranks() {
    let (listener, addr) = loopback();
    let silent: Vec<TcpStream> = (0..8).map(|_| TcpStream::connect(&addr).unwrap()).collect();
    let server = serve_in_thread(listener, some_id(2), 2, Duration::from_millis(2500));
    assert_eq!(
        fetch(&addr, 1, 2, Duration::from_millis(2500)).unwrap(),
        some_id(2)
    );
    server.join().unwrap().unwrap();
    drop(silent);
}

/// A rank that gets the id just before rank 0's deadline and confirms just after it is
/// counted (it is already in NCCL's init): rank 0 used to give up on the confirmation at
/// the deadline and report the rank missing (found by a review).
#[test]
fn a_rank_served_at_the_deadline_is_counted() {
    let (listener, addr) = loopback();
    let server = serve_in_thread(listener, some_id(8), 2, Duration::from_millis(2000));
    std::thread::sleep(Duration::from_millis(1000));
    let mut s = TcpStream::connect(&addr).unwrap();
    let mut hello = MAGIC.to_vec();
    hello.extend_from_slice(&2u32.to_le_bytes());
    hello.extend_from_slice(&1u32.to_le_bytes());
    hello.extend_from_slice(&0u16.to_le_bytes()); // no run id
    s.write_all(&hello).unwrap();
    let mut reply = [0u8; REPLY_BYTES];
    s.read_exact(&mut reply).unwrap();
    assert_eq!(reply[MAGIC.len()], 0, "served");
    std::thread::sleep(Duration::from_millis(1500)); // past rank 0's deadline
    s.write_all(&[1]).unwrap();
    server.join().unwrap().unwrap();
}

/// A server that answers with another tag and closes, shorter than this version's answer
/// (as the first version's 136 bytes), is refused as another version at once, not retried
/// until the timeout. (A first-version rank 0 itself closes without reading the request, so
/// the connection may be reset before its answer arrives: then the rank retries and times
/// out, naming the address.)
#[test]
fn a_server_with_another_tag_is_named_as_another_version() {
    let (listener, addr) = loopback();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut request = [0u8; HELLO_HEAD]; // a request without a run id
        s.read_exact(&mut request).unwrap();
        let mut msg = b"pfc-id/1".to_vec();
        msg.extend_from_slice(&[9; UNIQUE_ID_BYTES]);
        s.write_all(&msg).unwrap();
    });
    let start = Instant::now();
    let err = fetch(&addr, 1, 2, Duration::from_secs(20)).unwrap_err();
    assert!(err.to_string().contains("protocol version"), "{err}");
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "refused, not retried"
    );
    server.join().unwrap();
}

/// A rank of a job with another world size (two jobs on one port) is refused at once, with
/// both sizes in the message, and not counted.
#[test]
fn a_rank_of_another_job_is_refused() {
    let (listener, addr) = loopback();
    let server = serve_in_thread(listener, some_id(7), 2, Duration::from_millis(1500));
    let err = fetch(&addr, 3, 8, Duration::from_secs(10)).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("world size 2") && msg.contains("rank 3 of 8"),
        "{msg}"
    );
    let err = server.join().unwrap().unwrap_err();
    assert!(err.to_string().contains("missing ranks [1]"), "{err}");
    assert!(matches!(
        fetch(&addr, 0, 2, Duration::from_millis(10)),
        Err(PfcError::Param { .. })
    ));
}

#[test]
fn waiting_ranks_time_out_with_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = read_id_file(&dir.path().join("never"), Duration::from_millis(50)).unwrap_err();
    assert!(matches!(err, PfcError::Collective(_)));
    // Nobody listens on this port (bound and dropped).
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let err = fetch_id(
        &format!("127.0.0.1:{port}"),
        1,
        2,
        &RunId::default(),
        Duration::from_millis(200),
    )
    .unwrap_err();
    assert!(matches!(err, PfcError::Collective(_)));
}

fn run_id(text: &str) -> RunId {
    RunId::new(text).unwrap()
}

/// Two jobs on one port with the same world size: before run ids, a rank of the second
/// took the first's id. Now it is refused at once with an error that names another job and
/// the run id (a prefix of it only), it is not counted, and rank 0 says in its own timeout
/// that it refused another job's request; a rank with the job's run id gets the id.
#[test]
fn a_rank_of_another_run_is_refused_at_once() {
    let (listener, addr) = loopback();
    let server = std::thread::spawn(move || {
        serve_id(
            &listener,
            &some_id(3),
            2,
            &run_id("job-a"),
            Duration::from_secs(20),
        )
    });
    let intruder = "job-b-0123456789abcdef";
    let start = Instant::now();
    let err = fetch_id(&addr, 1, 2, &run_id(intruder), Duration::from_secs(20)).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, PfcError::Collective(_)), "{err:?}");
    assert!(
        msg.contains("another job (run id") && msg.contains("on this port"),
        "{msg}"
    );
    assert!(msg.contains("\"job-…\" (22 bytes)"), "{msg}");
    assert!(
        !msg.contains(intruder),
        "the whole run id is printed: {msg}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "refused, not retried"
    );
    // no run id against one
    let err = fetch(&addr, 1, 2, Duration::from_secs(20)).unwrap_err();
    assert!(
        err.to_string().contains("rank 0 has one, this rank none"),
        "{err}"
    );
    assert!(!server.is_finished(), "an intruder was counted");
    assert_eq!(
        fetch_id(&addr, 1, 2, &run_id("job-a"), Duration::from_secs(20)).unwrap(),
        some_id(3)
    );
    server.join().unwrap().unwrap();

    // rank 0's own timeout counts the refusals
    let (listener, addr) = loopback();
    let server = std::thread::spawn(move || {
        serve_id(
            &listener,
            &some_id(3),
            2,
            &run_id("job-a"),
            Duration::from_millis(1500),
        )
    });
    assert!(fetch_id(&addr, 1, 2, &run_id("job-b"), Duration::from_secs(10)).is_err());
    let err = server.join().unwrap().unwrap_err().to_string();
    assert!(
        err.contains("missing ranks [1]") && err.contains("refused 1 request(s) of another job"),
        "{err}"
    );
}

#[test]
fn run_ids_come_from_pfc_run_id_then_torchelastic_and_are_bounded() {
    fn vars<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }
    let both = [("PFC_RUN_ID", "mine"), ("TORCHELASTIC_RUN_ID", "torch")];
    assert_eq!(RunId::from_vars(vars(&both)).unwrap(), run_id("mine"));
    let empty_pfc = [("PFC_RUN_ID", ""), ("TORCHELASTIC_RUN_ID", "torch")];
    assert_eq!(RunId::from_vars(vars(&empty_pfc)).unwrap(), run_id("torch"));
    assert!(RunId::from_vars(vars(&[])).unwrap().is_empty());
    let env = LaunchEnv::from_vars(vars(&[
        ("RANK", "1"),
        ("WORLD_SIZE", "2"),
        ("TORCHELASTIC_RUN_ID", "torch"),
    ]))
    .unwrap();
    assert_eq!(env.run_id.as_str(), "torch");

    // at most MAX_BYTES, refused at construction naming the field or the variable
    let longest = "x".repeat(RunId::MAX_BYTES);
    assert_eq!(RunId::new(longest.clone()).unwrap().as_str(), longest);
    let secret = format!("s3cr3t{}", "y".repeat(RunId::MAX_BYTES));
    match RunId::new(secret.clone()) {
        Err(PfcError::Param { name, value, .. }) => {
            assert_eq!(name, "run_id");
            assert!(
                !value.contains(&secret) && value.contains("s3cr…"),
                "{value}"
            );
        }
        other => panic!("{other:?}"),
    }
    // LaunchEnv keeps it, and its check names the variable
    let long = [
        ("RANK", "1"),
        ("WORLD_SIZE", "2"),
        ("PFC_RUN_ID", secret.as_str()),
    ];
    assert!(matches!(
        LaunchEnv::from_vars(vars(&long)).unwrap().run_id.check(),
        Err(PfcError::Param {
            name: "PFC_RUN_ID",
            ..
        })
    ));
    let long = [("TORCHELASTIC_RUN_ID", secret.as_str())];
    assert!(matches!(
        RunId::from_vars(vars(&long)),
        Err(PfcError::Param {
            name: "TORCHELASTIC_RUN_ID",
            ..
        })
    ));
    // a short one is shown whole, a long one by a prefix
    assert_eq!(format!("{:?}", run_id("job-7")), "RunId(\"job-7\")");
    assert_eq!(
        format!("{:?}", run_id(&secret[..40])),
        "RunId(\"s3cr…\" (40 bytes))"
    );
    assert_eq!(format!("{:?}", RunId::default()), "RunId(none)");
    assert!(same_run_id(b"abc", b"abc") && same_run_id(b"", b""));
    assert!(!same_run_id(b"abc", b"abd") && !same_run_id(b"abc", b"ab"));
}

/// A rank of the previous version (whose request is 16 bytes, `pfc-id/2` first) gets an
/// answer in this version, which its client reads as another protocol version at once; it
/// is not counted.
#[test]
fn a_client_of_the_previous_version_is_answered_and_not_counted() {
    let (listener, addr) = loopback();
    let server = serve_in_thread(listener, some_id(4), 2, Duration::from_secs(20));
    let mut s = TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut hello = b"pfc-id/2".to_vec();
    hello.extend_from_slice(&2u32.to_le_bytes());
    hello.extend_from_slice(&1u32.to_le_bytes());
    s.write_all(&hello).unwrap();
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).unwrap();
    assert_eq!(answer.len(), REPLY_BYTES);
    assert_eq!(&answer[..MAGIC.len()], MAGIC);
    assert_eq!(answer[MAGIC.len()], STATUS_OTHER_VERSION);
    assert!(answer[MAGIC.len() + 1..].iter().all(|&b| b == 0), "no id");
    assert!(!server.is_finished(), "the old client was counted");
    assert_eq!(
        fetch(&addr, 1, 2, Duration::from_secs(10)).unwrap(),
        some_id(4)
    );
    server.join().unwrap().unwrap();
}

/// A name whose lookup hangs (a DNS server that does not answer) used to hold the rank in
/// `to_socket_addrs` beyond its timeout. Now the lookup is waited for no longer than the
/// time left, and the error is the timeout's, naming the host.
#[test]
fn a_hanging_lookup_ends_at_the_timeout() {
    let (release, hang) = std::sync::mpsc::channel::<()>();
    let hang = std::sync::Mutex::new(hang);
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = calls.clone();
    let resolver: Resolver = Arc::new(move |_: &str| {
        counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let _ = hang.lock().unwrap().recv(); // until the test ends
        Err(std::io::Error::other("released"))
    });
    let start = Instant::now();
    let err = fetch_id_with(
        "rank0.invalid:29500",
        1,
        2,
        &RunId::default(),
        Duration::from_millis(300),
        &resolver,
    )
    .unwrap_err();
    let took = start.elapsed();
    let msg = err.to_string();
    assert!(matches!(err, PfcError::Collective(_)), "{err:?}");
    assert!(
        msg.contains("not reachable within")
            && msg.contains("resolving rank0.invalid did not finish"),
        "{msg}"
    );
    assert!(took < Duration::from_secs(3), "took {took:?}");
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
    drop(release);
}

/// A name that does not resolve yet (a pod still starting) is looked up again until it
/// does, through the helper thread, as it was before the lookup was bounded.
#[test]
fn a_failing_lookup_is_retried_until_it_resolves() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let at = listener.local_addr().unwrap();
    let server = serve_in_thread(listener, some_id(1), 2, Duration::from_secs(20));
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = calls.clone();
    let resolver: Resolver = Arc::new(move |name: &str| {
        assert_eq!(name, "rank0.invalid:29500");
        match counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst) {
            0 | 1 => Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "not in DNS yet",
            )),
            _ => Ok(vec![at]),
        }
    });
    let id = fetch_id_with(
        "rank0.invalid:29500",
        1,
        2,
        &RunId::default(),
        Duration::from_secs(20),
        &resolver,
    )
    .unwrap();
    assert_eq!(id, some_id(1));
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 3);
    server.join().unwrap().unwrap();
}

/// serve_id's documentation says "a request must arrive within 1 s of connecting" and, at
/// the deadline, "the connections in progress end within their own deadlines (1 s + 5 s)".
/// The read timeout used to be per `read()` call, not per request: a peer that sent one
/// byte every 0.7 s kept its handler (and so serve_id, which waits for every handler after
/// the deadline) alive for up to 274 reads, minutes (found by a review). This peer drips 16
/// bytes (~11 s); rank 0's timeout is 1.5 s, so it must fail, naming the missing rank,
/// within 1.5 + 1 + 5 s (+1 s slack).
#[test]
fn a_peer_that_drips_its_request_is_cut_off_at_the_connections_deadline() {
    let (listener, addr) = loopback();
    let start = Instant::now();
    let server = serve_in_thread(listener, some_id(1), 2, Duration::from_millis(1500));
    let dripper = std::thread::spawn(move || {
        let mut s = TcpStream::connect(&addr).unwrap();
        let mut hello = MAGIC.to_vec();
        hello.extend_from_slice(&2u32.to_le_bytes());
        hello.extend_from_slice(&1u32.to_le_bytes());
        for b in hello.iter().take(16) {
            if s.write_all(&[*b]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(700));
        }
    });
    let err = server.join().unwrap().unwrap_err();
    let took = start.elapsed();
    dripper.join().unwrap();
    assert!(
        took < Duration::from_millis(1500 + 1000 + 5000 + 1000),
        "rank 0 reported its timeout only after {took:?}: {err}"
    );
    assert!(err.to_string().contains("missing ranks [1]"), "{err}");
}

/// The rank's side of the same: the read timeout used to be set once per connection, to
/// the time left, and then applied to each read, so a server that sent its answer a byte
/// every 0.3 s held the rank for 141 reads (~42 s) past a 1 s timeout. Now the connection
/// ends at the deadline, and the rank with the timeout's error.
#[test]
fn a_server_that_drips_its_answer_is_cut_off_at_the_timeout() {
    let (listener, addr) = loopback();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut request = [0u8; HELLO_HEAD]; // a request without a run id
        s.read_exact(&mut request).unwrap();
        for b in reply(STATUS_SERVED, 2, &some_id(1).0) {
            if s.write_all(&[b]).is_err() {
                return; // the rank has given up
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    });
    let start = Instant::now();
    let err = fetch(&addr, 1, 2, Duration::from_secs(1)).unwrap_err();
    let took = start.elapsed();
    assert!(matches!(err, PfcError::Collective(_)), "{err:?}");
    assert!(err.to_string().contains("not reachable within 1s"), "{err}");
    assert!(took < Duration::from_secs(6), "took {took:?}: {err}");
    server.join().unwrap();
}

/// An `accept` that fails with something other than "no connection yet" (too many open
/// files, a connection aborted before it was taken) used to end serve_id at once, with the
/// ranks still to come. Now it is tried again until the deadline; if a rank is missing
/// then, the message gives the last such error.
#[test]
fn a_failing_accept_is_tried_again_until_the_deadline() {
    use std::io::{Error, ErrorKind};
    let (listener, addr) = loopback();
    listener.set_nonblocking(true).unwrap();
    let server = std::thread::spawn(move || {
        let mut failures = 0;
        serve_id_with(
            || {
                if failures < 3 {
                    failures += 1;
                    return Err(Error::new(ErrorKind::ConnectionAborted, "aborted (test)"));
                }
                listener.accept().map(|(stream, _)| stream)
            },
            &some_id(2),
            2,
            &RunId::default(),
            Duration::from_secs(20),
        )
    });
    assert_eq!(
        fetch(&addr, 1, 2, Duration::from_secs(20)).unwrap(),
        some_id(2)
    );
    server.join().unwrap().unwrap();

    let err = serve_id_with(
        || Err(Error::other("too many open files (test)")),
        &some_id(2),
        2,
        &RunId::default(),
        Duration::from_millis(300),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("missing ranks [1]")
            && err.contains("the last failed accept said: too many open files (test)"),
        "{err}"
    );
}

/// A run id in the environment that cannot be one (longer than MAX_BYTES here) used to
/// make `LaunchEnv::from_env` fail, and so every job, even one that agrees on its id
/// through a file (found by a review). Now only the TCP rendezvous refuses it, naming the
/// variable, before it takes a port or connects, and for a job of one too.
#[test]
fn a_run_id_that_cannot_be_one_fails_only_the_tcp_rendezvous() {
    let long = format!("s3cr3t{}", "y".repeat(RunId::MAX_BYTES));
    let pairs = [
        ("RANK", "0"),
        ("WORLD_SIZE", "2"),
        ("TORCHELASTIC_RUN_ID", long.as_str()),
    ];
    let env = LaunchEnv::from_vars(|k| {
        pairs
            .iter()
            .find(|(n, _)| *n == k)
            .map(|(_, v)| v.to_string())
    })
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = Rendezvous::File {
        path: dir.path().join("id"),
        timeout: Duration::from_secs(10),
    };
    assert_eq!(
        file.exchange(env.rank, env.world_size, || Ok(some_id(3)))
            .unwrap(),
        some_id(3)
    );

    // Taken, so that rank 0 would fail to listen (Collective) were it not checked first;
    // rank 1 would time out (Collective) connecting to it.
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let tcp = Rendezvous::Tcp {
        addr: addr.clone(),
        timeout: Duration::from_secs(1),
        run_id: Some(env.run_id.clone()),
    };
    for (rank, world) in [(0, 2), (1, 2), (0, 1)] {
        match tcp.exchange(rank, world, || Ok(some_id(3))) {
            Err(PfcError::Param {
                name: "TORCHELASTIC_RUN_ID",
                value,
                reason,
            }) => {
                assert!(value.contains("s3cr…") && !value.contains(&long), "{value}");
                assert!(reason.contains("bytes long"), "{reason}");
            }
            other => panic!("rank {rank} of {world}: {other:?}"),
        }
    }
    assert!(matches!(
        serve_id(&taken, &some_id(3), 2, &env.run_id, Duration::from_secs(1)),
        Err(PfcError::Param {
            name: "TORCHELASTIC_RUN_ID",
            ..
        })
    ));
    assert!(matches!(
        fetch_id(&addr, 1, 2, &env.run_id, Duration::from_secs(1)),
        Err(PfcError::Param {
            name: "TORCHELASTIC_RUN_ID",
            ..
        })
    ));
}

/// Values that are not UTF-8: a run-id variable's is kept and refused by its check (not
/// taken lossily, where `job-\xff` and `job-\xfe` both read `job-\u{fffd}` and matched,
/// nor skipped for the next variable); another variable's is an error at once naming it.
#[test]
fn values_that_are_not_utf8_are_errors_naming_the_variable() {
    let read = |pfc: &'static [u8], addr: Option<&'static [u8]>| {
        LaunchEnv::read(move |k| match k {
            "RANK" => Var::Text("1".into()),
            "WORLD_SIZE" => Var::Text("2".into()),
            "TORCHELASTIC_RUN_ID" => Var::Text("torch".into()),
            "PFC_RUN_ID" => Var::NotUtf8(pfc.to_vec()),
            "MASTER_ADDR" => addr.map_or(Var::Unset, |a| Var::NotUtf8(a.to_vec())),
            _ => Var::Unset,
        })
    };
    let env = read(b"job-\xff", None).unwrap();
    match env.run_id.check() {
        Err(PfcError::Param {
            name: "PFC_RUN_ID",
            value,
            reason,
        }) => {
            assert_eq!(value, "\"job-\\xff\"");
            assert_eq!(reason, "is not valid UTF-8");
        }
        other => panic!("{other:?}"),
    }
    assert_ne!(env.run_id, read(b"job-\xfe", None).unwrap().run_id);
    assert_eq!(
        format!("{:?}", env.run_id),
        "RunId(PFC_RUN_ID: \"job-\\xff\" is not valid UTF-8)"
    );
    // a long one is shown by a prefix, as any run id
    match read(b"s3cr3t-\xff-0123456789", None)
        .unwrap()
        .run_id
        .check()
    {
        Err(PfcError::Param { value, .. }) => {
            assert_eq!(value, "\"s3cr…\" (19 bytes)")
        }
        other => panic!("{other:?}"),
    }
    match read(b"job", Some(b"node\xff")) {
        Err(PfcError::Param {
            name: "MASTER_ADDR",
            value,
            ..
        }) => assert_eq!(value, "\"node\\xff\""),
        other => panic!("{other:?}"),
    }
}
