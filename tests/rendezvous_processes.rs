//! The rendezvous across real processes, as a launcher runs them: this test binary starts itself
//! again as k child processes with the torchrun variables (RANK, WORLD_SIZE, LOCAL_RANK,
//! MASTER_ADDR, MASTER_PORT); each child agrees on one id of rank 0's over TCP on loopback and on
//! another through a shared file, and prints what it got. The parent checks that every rank
//! printed rank 0's two ids (made from its process id, clock and a counter, so no other process
//! could have produced them), and that they differ. A second test starts two jobs on one port
//! with different run ids (`PFC_RUN_ID`, `TORCHELASTIC_RUN_ID`): the other job's rank must fail
//! at once, the job's own ranks must agree. A third gives two ranks run ids that are not UTF-8:
//! both must fail at once naming the variable.
//! The thread-based tests in src/rendezvous.rs cover the same protocol inside one process.

use partial_fc::rendezvous::{LaunchEnv, Rendezvous, UniqueId, UNIQUE_ID_BYTES};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Set in the children's environment: the shared file's path.
const CHILD: &str = "PFC_RENDEZVOUS_TEST_FILE";
const TEST: &str = "tcp_and_file_rendezvous_across_processes";
/// Set in the children's environment of the run-id test: run the TCP exchange only.
const TCP_CHILD: &str = "PFC_RENDEZVOUS_TEST_TCP_ONLY";
const RUN_ID_TEST: &str = "another_run_on_the_port_is_refused_across_processes";

/// Starts this test binary as one rank running `test`, with the torchrun variables for `rank`
/// of `world` on `port` and `extra`; the run-id variables of this process are not passed on.
fn start_rank(test: &str, rank: usize, world: usize, port: u16, extra: &[(&str, &str)]) -> Child {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env_remove("PFC_RUN_ID")
        .env_remove("TORCHELASTIC_RUN_ID")
        .env("RANK", rank.to_string())
        .env("LOCAL_RANK", rank.to_string())
        .env("WORLD_SIZE", world.to_string())
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (name, value) in extra {
        cmd.env(name, value);
    }
    cmd.spawn().unwrap()
}

/// A free port: bind to port 0, read what the system gave, release it for rank 0.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The hex after `RANK r KIND ` in a child's output.
fn reported(stdout: &str, rank: usize, kind: &str) -> Option<UniqueId> {
    let prefix = format!("RANK {rank} {kind} ");
    let hex = stdout
        .lines()
        // The harness may print "test … " before the first line of output.
        .find_map(|l| l.find(&prefix).map(|at| &l[at + prefix.len()..]))?;
    Some(UniqueId::from_hex(hex.trim()).unwrap())
}

/// A new id each call: bytes that depend on this process, this instant and a call counter.
fn fresh_id() -> partial_fc::Result<UniqueId> {
    static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut state = nanos ^ (u64::from(std::process::id()) << 32) ^ call.rotate_left(17);
    let mut bytes = [0u8; UNIQUE_ID_BYTES];
    for b in bytes.iter_mut() {
        // SplitMix64 steps: enough to spread the seed over all 128 bytes.
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        *b = (z ^ (z >> 31)) as u8;
    }
    Ok(UniqueId(bytes))
}

/// One child: both rendezvous, one line each on stdout.
fn child(file: &str) {
    let env = LaunchEnv::from_env().expect("launcher variables");
    let timeout = Duration::from_secs(30);
    let tcp = Rendezvous::Tcp {
        addr: format!("{}:{}", env.master_addr, env.master_port),
        timeout,
        // from the environment, as a launched job does
        run_id: None,
    }
    .exchange(env.rank, env.world_size, fresh_id)
    .expect("TCP rendezvous");
    let shared = Rendezvous::File {
        path: file.into(),
        timeout,
    }
    // Its own fresh id: the file exchange must carry rank 0's, not reuse the TCP one.
    .exchange(env.rank, env.world_size, fresh_id)
    .expect("file rendezvous");
    println!("RANK {} TCP {}", env.rank, tcp.to_hex());
    println!("RANK {} FILE {}", env.rank, shared.to_hex());
}

#[test]
fn tcp_and_file_rendezvous_across_processes() {
    if let Ok(file) = std::env::var(CHILD) {
        child(&file);
        return;
    }
    let world = 4;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("nccl-id");
    let file = file.to_str().unwrap();
    let port = free_port();
    // torchrun's variable, as `--rdzv-id` sets it
    let run = format!("rdzv-test-{}", std::process::id());
    let children: Vec<_> = (0..world)
        .map(|rank| {
            start_rank(
                TEST,
                rank,
                world,
                port,
                &[(CHILD, file), ("TORCHELASTIC_RUN_ID", &run)],
            )
        })
        .collect();
    let (mut tcp_ids, mut file_ids) = (Vec::new(), Vec::new());
    for (rank, child) in children.into_iter().enumerate() {
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "rank {rank} failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        for kind in ["TCP", "FILE"] {
            let id = reported(&stdout, rank, kind)
                .unwrap_or_else(|| panic!("rank {rank}: no {kind} line in\n{stdout}"));
            if kind == "TCP" {
                tcp_ids.push(id)
            } else {
                file_ids.push(id)
            }
        }
    }
    assert_eq!((tcp_ids.len(), file_ids.len()), (world, world));
    assert!(
        tcp_ids.iter().all(|id| *id == tcp_ids[0]),
        "TCP: the ranks disagree"
    );
    assert!(
        file_ids.iter().all(|id| *id == file_ids[0]),
        "file: the ranks disagree"
    );
    // Two separate exchanges of two ids rank 0 made: nobody can have taken one for the other.
    assert!(
        tcp_ids[0] != file_ids[0],
        "the file exchange returned the TCP id"
    );
    assert_ne!(
        tcp_ids[0].0, [0u8; UNIQUE_ID_BYTES],
        "rank 0's id is all zeros"
    );
}

/// One child of the run-id test: the TCP exchange with the run id of its environment; prints
/// the id, or the error and exits with status 3.
fn tcp_child() {
    let env = LaunchEnv::from_env().expect("launcher variables");
    let got = Rendezvous::Tcp {
        addr: format!("{}:{}", env.master_addr, env.master_port),
        timeout: Duration::from_secs(60),
        run_id: None,
    }
    .exchange(env.rank, env.world_size, fresh_id);
    match got {
        Ok(id) => println!("RANK {} TCP {}", env.rank, id.to_hex()),
        Err(e) => {
            println!("RANK {} ERROR {e}", env.rank);
            use std::io::Write;
            let _ = std::io::stdout().flush();
            std::process::exit(3);
        }
    }
}

/// Two jobs of world size 2 on one port: job A (rank 0 with `PFC_RUN_ID`) and a rank 1 of job
/// B (`TORCHELASTIC_RUN_ID` only). B's rank fails long before its 60 s timeout with the error
/// that names another job and the run id; then A's rank 1, whose `PFC_RUN_ID` overrides a
/// `TORCHELASTIC_RUN_ID` of B's, gets rank 0's id.
#[test]
fn another_run_on_the_port_is_refused_across_processes() {
    if std::env::var_os(TCP_CHILD).is_some() {
        tcp_child();
        return;
    }
    let port = free_port();
    let job_a = format!("job-a-{}", std::process::id());
    let job_b = format!("job-b-{}", std::process::id());
    let tcp_only = (TCP_CHILD, "1");
    let rank0 = start_rank(RUN_ID_TEST, 0, 2, port, &[tcp_only, ("PFC_RUN_ID", &job_a)]);
    let start = Instant::now();
    let intruder = start_rank(
        RUN_ID_TEST,
        1,
        2,
        port,
        &[tcp_only, ("TORCHELASTIC_RUN_ID", &job_b)],
    )
    .wait_with_output()
    .unwrap();
    let took = start.elapsed();
    let out = String::from_utf8_lossy(&intruder.stdout);
    assert_eq!(intruder.status.code(), Some(3), "job B's rank:\n{out}");
    assert!(
        out.contains("RANK 1 ERROR")
            && out.contains("another job (run id")
            && out.contains("on this port"),
        "job B's rank:\n{out}"
    );
    assert!(
        took < Duration::from_secs(30),
        "refused only after {took:?}"
    );
    let rank1 = start_rank(
        RUN_ID_TEST,
        1,
        2,
        port,
        &[
            tcp_only,
            ("PFC_RUN_ID", &job_a),
            ("TORCHELASTIC_RUN_ID", &job_b),
        ],
    );
    let mut ids = Vec::new();
    for (rank, child) in [rank0, rank1].into_iter().enumerate() {
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "job A's rank {rank} failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        ids.push(
            reported(&stdout, rank, "TCP")
                .unwrap_or_else(|| panic!("rank {rank}: no TCP line in\n{stdout}")),
        );
    }
    assert_eq!(ids[0], ids[1], "job A's ranks disagree");
}

const NON_UTF8_TEST: &str = "run_ids_that_are_not_utf8_are_refused_naming_the_variable";

/// Two jobs of world size 2 on one port whose `PFC_RUN_ID`s are not UTF-8 and differ only
/// there (`job-\xff`, `job-\xfe`): read lossily, both became `job-\u{fffd}` and rank 0 handed
/// job A's NCCL id to job B's rank (found by a review). Now such a value is a `Param` error
/// naming `PFC_RUN_ID`, with its bytes escaped, on both ranks, at once: no id changes hands
/// and rank 0 does not wait for its 60 s timeout. It comes from the TCP exchange, not from
/// `LaunchEnv::from_env` (which the child unwraps first: a panic there would exit with 101,
/// and print no `RANK` line), so a job that does not use the TCP rendezvous is not affected.
#[test]
#[cfg(unix)]
fn run_ids_that_are_not_utf8_are_refused_naming_the_variable() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    if std::env::var_os(TCP_CHILD).is_some() {
        tcp_child();
        return;
    }
    let port = free_port();
    let spawn = |rank: usize, run_id: &[u8]| {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args([NON_UTF8_TEST, "--exact", "--nocapture", "--test-threads=1"])
            .env_remove("TORCHELASTIC_RUN_ID")
            .env(TCP_CHILD, "1")
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", "2")
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .env("PFC_RUN_ID", OsStr::from_bytes(run_id))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd.spawn().unwrap()
    };
    let start = Instant::now();
    let rank0 = spawn(0, b"job-\xff");
    let intruder = spawn(1, b"job-\xfe");
    for (rank, child, shown) in [(0, rank0, "job-\\xff"), (1, intruder, "job-\\xfe")] {
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(3),
            "rank {rank} (PFC_RUN_ID={shown}) was not refused:\n{stdout}\n{stderr}"
        );
        let expected = format!(
            "RANK {rank} ERROR invalid parameter PFC_RUN_ID = \"{shown}\": is not valid UTF-8"
        );
        assert!(
            stdout.contains(&expected),
            "rank {rank}:\n{stdout}\n{stderr}"
        );
        assert!(
            reported(&stdout, rank, "TCP").is_none(),
            "rank {rank} got an id:\n{stdout}"
        );
    }
    let took = start.elapsed();
    assert!(
        took < Duration::from_secs(30),
        "refused only after {took:?}"
    );
}
