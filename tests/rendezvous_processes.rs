//! The rendezvous across real processes, as a launcher runs them: this test binary starts itself
//! again as k child processes with the torchrun variables (RANK, WORLD_SIZE, LOCAL_RANK,
//! MASTER_ADDR, MASTER_PORT); each child agrees on one id of rank 0's over TCP on loopback and on
//! another through a shared file, and prints what it got. The parent checks that every rank
//! printed rank 0's two ids (made from its process id, clock and a counter, so no other process
//! could have produced them), and that they differ.
//! The thread-based tests in src/rendezvous.rs cover the same protocol inside one process.

use partial_fc::rendezvous::{LaunchEnv, Rendezvous, UniqueId, UNIQUE_ID_BYTES};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Set in the children's environment: the shared file's path.
const CHILD: &str = "PFC_RENDEZVOUS_TEST_FILE";
const TEST: &str = "tcp_and_file_rendezvous_across_processes";

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
    // A free port: bind to port 0, read what the system gave, release it for rank 0.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..world)
        .map(|rank| {
            Command::new(&exe)
                .args([TEST, "--exact", "--nocapture", "--test-threads=1"])
                .env(CHILD, &file)
                .env("RANK", rank.to_string())
                .env("LOCAL_RANK", rank.to_string())
                .env("WORLD_SIZE", world.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
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
            let prefix = format!("RANK {rank} {kind} ");
            let hex = stdout
                .lines()
                // The harness may print "test … " before the first line of output.
                .find_map(|l| l.find(&prefix).map(|at| &l[at + prefix.len()..]))
                .unwrap_or_else(|| panic!("rank {rank}: no {kind} line in\n{stdout}"));
            let id = UniqueId::from_hex(hex.trim()).unwrap();
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
