//! Secure by default, tried from outside: a coordinator started the default
//! way (loopback, no token given, so it generates one into `job.token`) with
//! one `worker join` host in it, waiting for a second host. Then:
//!
//! * a client without the token, and one with a wrong token, calls every RPC
//!   of `proto/orchestrator/v1/coordinator.proto` (the list is read from the
//!   file, so a new RPC must be added here): all are `UNAUTHENTICATED`, and
//!   the job is unaffected (still waiting, the same one member, heartbeating);
//! * a client with the token and the real member id but without its secret,
//!   or with a wrong one, calls every member RPC: all are refused, while the
//!   real secret (read from the rank process's environment, as its owner
//!   can) is accepted, so the refusals are the credentials' doing;
//! * neither the token nor the member secret is on any process's command
//!   line (coordinator, worker agent, rank) or in any log, while the rank's
//!   environment does carry them;
//! * a connection that sends nothing is closed at a deadline, and so is one
//!   that speaks HTTP/2 (pings, answered) but makes no call with the token.
//!
//! With `--tls-cert`/`--tls-key` the coordinator serves TLS: a worker given
//! the CA joins over `https://`, a plain-text client gets nowhere, and a
//! connection that never starts its handshake is closed at a deadline. A
//! certificate or key that does not parse fails `up` before it listens.
//!
//! The coordinator's connection limit grows with the job's hosts, and it
//! raises its open-files limit to hold them, saying so when the hard limit
//! is too low.
//!
//! The ring's challenge-response (an impostor on a ring port is refused) is
//! tested in `rsb-collective` (`ring::tests`), where both sides can be
//! played without a job.

use rsb_integration_tests::{binary, on_path, processes, require, workspace_root};
use rsb_proto::auth::{MEMBER_HEADER, MEMBER_SECRET_ENV, SECRET_HEADER, TOKEN_ENV, TOKEN_HEADER};
use rsb_proto::v1 as pb;
use rsb_proto::v1::coordinator_client::CoordinatorClient;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tonic::metadata::AsciiMetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

/// A client interceptor that attaches exactly the given metadata.
#[derive(Clone)]
struct Attach(Vec<(&'static str, String)>);

impl tonic::service::Interceptor for Attach {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        for (key, value) in &self.0 {
            let value = AsciiMetadataValue::try_from(value.as_str())
                .map_err(|_| Status::internal("bad test metadata"))?;
            request.metadata_mut().insert(*key, value);
        }
        Ok(request)
    }
}

type Client = CoordinatorClient<InterceptedService<Channel, Attach>>;

/// A child process killed when the test ends, however it ends.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `coordinator up` of the tiny recipe for `nodes` hosts, listening on a
/// free loopback port, with its run folder `out`.
fn coordinator_on_loopback(nodes: &str, out: &Path) -> Command {
    let mut cmd = Command::new(binary("coordinator"));
    cmd.args(["up", "--nodes", nodes, "--listen", "127.0.0.1:0", "--recipe"])
        .arg(workspace_root().join("recipes/debug/resnet18_tiny_cpu.yaml"))
        .arg("--out")
        .arg(out);
    cmd
}

fn wait_until<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < limit, "timed out after {limit:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn spawn_logged(cmd: &mut Command, log: &Path) -> Proc {
    let out = std::fs::File::create(log.with_extension("out")).unwrap();
    let err = std::fs::File::create(log.with_extension("err")).unwrap();
    let child = cmd
        .env("RUST_LOG", "debug")
        .current_dir(workspace_root())
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .expect("starting a process");
    Proc(child)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// The RPC names of the protocol, read from the proto file.
fn rpcs_of_the_proto() -> Vec<String> {
    let proto = workspace_root().join("proto/orchestrator/v1/coordinator.proto");
    read(&proto)
        .lines()
        .filter_map(|l| l.trim().strip_prefix("rpc "))
        .filter_map(|l| l.split('(').next())
        .map(|n| n.trim().to_string())
        .collect()
}

/// The worker's rank process, once it runs the rank's program: a child
/// read between its fork and its exec shows the worker's command line, or
/// none at all while the kernel swaps in the new program.
fn rank_process_of(worker: u32) -> u32 {
    wait_until(Duration::from_secs(30), "the rank process", || {
        processes::children_of(worker)
            .into_iter()
            .find(|&child| proc_text(child, "cmdline").split_whitespace().nth(1) == Some("rank"))
    })
}

/// NUL-separated `/proc/PID/<file>` (cmdline, environ) as text.
fn proc_text(pid: u32, file: &str) -> String {
    let bytes = std::fs::read(format!("/proc/{pid}/{file}")).unwrap_or_default();
    String::from_utf8_lossy(&bytes).replace('\0', " ")
}

/// A variable of a process's environment.
fn environ_var(pid: u32, var: &str) -> Option<String> {
    let bytes = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    bytes.split(|b| *b == 0).find_map(|entry| {
        let entry = String::from_utf8_lossy(entry);
        entry.strip_prefix(&format!("{var}=")).map(str::to_string)
    })
}

struct Job {
    job_id: String,
    member_id: String,
}

/// Calls every RPC with plausible arguments for this job (so a refusal is
/// never the arguments' fault); `None` for an RPC the caller does not try.
async fn call(client: &mut Client, rpc: &str, job: &Job) -> Result<(), Status> {
    let member_id = job.member_id.clone();
    let job_id = job.job_id.clone();
    match rpc {
        "Join" => client
            .join(pb::JoinRequest {
                host_name: "intruder".into(),
                advertise_address: "127.0.0.1".into(),
                device_kind: pb::DeviceKind::Cpu as i32,
                local_ranks: 1,
            })
            .await
            .map(drop),
        "Heartbeat" => client.heartbeat(pb::HeartbeatRequest { member_id }).await.map(drop),
        "GetAssignment" => {
            let request = pb::AssignmentRequest { member_id, local_rank: 0 };
            // Answered at once when refused; a granted one would wait for the job.
            match tokio::time::timeout(Duration::from_secs(5), client.get_assignment(request)).await
            {
                Ok(r) => r.map(drop),
                Err(_) => Ok(()),
            }
        }
        "Rendezvous" => {
            let request = pb::RendezvousRequest {
                job_id,
                generation: 1,
                global_rank: 0,
                payload: Some(pb::rendezvous_request::Payload::RingAddress("127.0.0.1:9".into())),
            };
            match tokio::time::timeout(Duration::from_secs(5), client.rendezvous(request)).await {
                Ok(r) => r.map(drop),
                Err(_) => Ok(()),
            }
        }
        "ReportMetrics" => client
            .report_metrics(pb::MetricsReport {
                job_id,
                generation: 1,
                global_rank: 0,
                record: Some(pb::metrics_report::Record::Step(pb::StepRecord {
                    epoch: 0,
                    step: 1,
                    lr: 0.1,
                    loss: 0.0,
                    images_per_sec: 1e9,
                    total_updates: 1,
                    skipped_updates: 0,
                    peak_gpu_memory_mib: None,
                    rank_balance: None,
                    input_wait_share: None,
                })),
                sequence: 1,
            })
            .await
            .map(drop),
        "CommitCheckpoint" => client
            .commit_checkpoint(pb::CheckpointCommit {
                job_id,
                generation: 1,
                epoch: 600,
                path: "/tmp/forged-checkpoint".into(),
                updates: 600,
                sequence: 2,
                disk_warning: String::new(),
            })
            .await
            .map(drop),
        "Leave" => client
            .leave(pb::LeaveRequest {
                member_id,
                local_rank: 0,
                success: false,
                message: "x".into(),
                generation: 1,
                collective_peer: None,
                stop_requested_by: Vec::new(),
                collective_peer_unknown: false,
                tampered_link_from: None,
                stopped_before_training: false,
            })
            .await
            .map(drop),
        "Status" => client.status(pb::StatusRequest {}).await.map(drop),
        other => panic!("the test does not know the RPC {other}: add it to `call`"),
    }
}

async fn client(url: &str, metadata: Vec<(&'static str, String)>) -> Client {
    let channel = tonic::transport::Endpoint::from_shared(url.to_string())
        .unwrap()
        .connect()
        .await
        .expect("connecting to the coordinator");
    CoordinatorClient::with_interceptor(channel, Attach(metadata))
}

/// A client of the coordinator at `address` (over TLS with `ca`) with the
/// job token, and the count of the connections it has opened: a member's
/// connection is held past the deadline at which strangers' are closed, so
/// it stays at 1.
async fn counting_client(
    address: std::net::SocketAddr,
    ca: Option<&Path>,
    token: &str,
) -> (Client, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let opened = std::sync::Arc::new(AtomicUsize::new(0));
    let count = std::sync::Arc::clone(&opened);
    let connector = tower::service_fn(move |_: tonic::transport::Uri| {
        count.fetch_add(1, Ordering::SeqCst);
        async move {
            let stream = tokio::net::TcpStream::connect(address).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
        }
    });
    let scheme = if ca.is_some() { "https" } else { "http" };
    let mut endpoint =
        tonic::transport::Endpoint::from_shared(format!("{scheme}://{address}")).unwrap();
    if let Some(ca) = ca {
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(read(ca)));
        endpoint = endpoint.tls_config(tls).unwrap();
    }
    let channel = endpoint.connect_with_connector(connector).await.expect("connecting");
    let client = CoordinatorClient::with_interceptor(
        channel,
        Attach(vec![(TOKEN_HEADER, token.to_string())]),
    );
    (client, opened)
}

/// Calls Status on `client` and says how many connections it has opened.
fn status_on_one_connection(
    runtime: &tokio::runtime::Runtime,
    client: &mut Client,
    opened: &std::sync::atomic::AtomicUsize,
) -> usize {
    runtime.block_on(client.status(pb::StatusRequest {})).expect("Status with the token");
    opened.load(std::sync::atomic::Ordering::SeqCst)
}

async fn status(url: &str, token: &str) -> pb::StatusResponse {
    let mut c = client(url, vec![(TOKEN_HEADER, token.to_string())]).await;
    c.status(pb::StatusRequest {}).await.expect("Status with the token").into_inner()
}

/// A connection to `address` that sends nothing is closed by the other side
/// within 30 s (its deadline is 10 s), not kept open.
fn assert_a_silent_connection_is_closed(address: std::net::SocketAddr) {
    use std::io::Read;
    let mut silent = std::net::TcpStream::connect(address).unwrap();
    silent.set_read_timeout(Some(Duration::from_secs(40))).unwrap();
    let opened = Instant::now();
    // What the server says first (an HTTP/2 server's settings) is read past,
    // up to the end of the connection.
    let closed = loop {
        match silent.read(&mut [0u8; 256]) {
            Ok(n) if n > 0 && opened.elapsed() < Duration::from_secs(40) => continue,
            other => break other,
        }
    };
    assert!(
        matches!(closed, Ok(0))
            || closed.as_ref().is_err_and(|e| e.kind() != std::io::ErrorKind::WouldBlock),
        "a silent connection was kept open for {:?}: {closed:?}",
        opened.elapsed()
    );
    assert!(opened.elapsed() < Duration::from_secs(30), "closed after {:?}", opened.elapsed());
}

/// A stranger's HTTP/2 connection to `address` (plain text) that talks, a
/// ping every 200 ms that the server answers, but never makes a call with
/// the job token, is closed by the other side within 30 s (its deadline is
/// 10 s), not kept open.
fn assert_a_strangers_talking_connection_is_closed(address: std::net::SocketAddr) {
    use std::io::{ErrorKind, Read, Write};
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    // Frames: a 3-byte length, a type, flags, a 4-byte stream id, the payload.
    const SETTINGS: [u8; 9] = [0, 0, 0, 4, 0, 0, 0, 0, 0];
    const PING: [u8; 17] = [0, 0, 8, 6, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8];
    let mut stranger = std::net::TcpStream::connect(address).unwrap();
    stranger.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let opened = Instant::now();
    let mut sent = [PREFACE, &SETTINGS[..]].concat();
    let mut received = Vec::new();
    let ended = loop {
        assert!(opened.elapsed() < Duration::from_secs(30), "a talking stranger was kept open");
        sent.extend_from_slice(&PING);
        if let Err(e) = stranger.write_all(&sent) {
            break format!("write: {e}");
        }
        sent.clear();
        match stranger.read(&mut [0u8; 4096]) {
            Ok(0) => break "end".to_string(),
            Ok(n) => received.push(n),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => break format!("read: {e}"),
        }
    };
    let answered: usize = received.iter().sum();
    // Settings, their acknowledgement and a ping answer at least: it talked.
    assert!(answered >= 3 * 9 + 8, "the server said {answered} bytes before it ended ({ended})");
    assert!(opened.elapsed() >= Duration::from_secs(5), "closed after {:?}", opened.elapsed());
}

/// The first "coordinator listening on ADDR;" of a coordinator's stdout
/// (up to its `;`: a line still being written is not read yet).
fn listening_address(stdout: &Path) -> std::net::SocketAddr {
    let listening = wait_until(Duration::from_secs(30), "the coordinator to listen", || {
        read(stdout)
            .lines()
            .find_map(|l| l.strip_prefix("coordinator listening on "))
            .and_then(|l| l.split_once(';'))
            .map(|(address, _)| address.to_string())
    });
    listening.parse().unwrap()
}

#[test]
fn strangers_are_refused_every_rpc_and_credentials_stay_off_argv_and_logs() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let logs = tmp.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let (coordinator_bin, worker_bin) = (binary("coordinator"), binary("worker"));

    // The default way: no token, no --listen (127.0.0.1:50051). Another job
    // on this host may hold that port: then a free loopback port.
    let default_port_free = std::net::TcpListener::bind("127.0.0.1:50051").is_ok();
    let mut up = Command::new(&coordinator_bin);
    up.env_remove(TOKEN_ENV)
        .env_remove(MEMBER_SECRET_ENV)
        .args(["up", "--nodes", "2", "--recipe"])
        .arg(workspace_root().join("recipes/debug/resnet18_tiny_cpu.yaml"))
        .arg("--out")
        .arg(&out);
    if !default_port_free {
        eprintln!("127.0.0.1:50051 is in use: the coordinator listens on a free port");
        up.args(["--listen", "127.0.0.1:0"]);
    }
    let mut coordinator = spawn_logged(&mut up, &logs.join("coordinator"));
    let stdout = logs.join("coordinator.out");
    let bound = listening_address(&stdout);
    assert!(bound.ip().is_loopback(), "the default listen address is {bound}, not loopback");
    if default_port_free {
        assert_eq!(bound.port(), 50051);
    }
    let url = format!("http://{bound}");

    // The generated token: in a file only its owner can read, and `up` says
    // how workers get it.
    let token_file = out.join("job.token");
    let token = read(&token_file).trim().to_string();
    assert_eq!(token.len(), 64, "job.token holds {token:?}");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&token_file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "job.token has mode {mode:o}");
    }
    let printed = read(&stdout);
    assert!(printed.contains("--token-file") && printed.contains(TOKEN_ENV), "{printed}");

    // One worker host joins (with the token from the file) and its rank waits.
    let mut join = Command::new(&worker_bin);
    join.env_remove(TOKEN_ENV)
        .env_remove(MEMBER_SECRET_ENV)
        .args(["join", "--coordinator", &url, "--devices", "cpu", "--host-name", "a"])
        .arg("--token-file")
        .arg(&token_file);
    let mut worker = spawn_logged(&mut join, &logs.join("worker"));
    let runtime = tokio::runtime::Runtime::new().unwrap();
    // A client with the token, whose one connection is held all along.
    let (mut holder, held) = runtime.block_on(counting_client(bound, None, &token));
    assert_eq!(status_on_one_connection(&runtime, &mut holder, &held), 1);
    let member_id = wait_until(Duration::from_secs(60), "the worker to join", || {
        let s = runtime.block_on(status(&url, &token));
        s.members.first().map(|m| m.member_id.clone())
    });
    let job = Job { job_id: runtime.block_on(status(&url, &token)).job_id, member_id };
    let rank = rank_process_of(worker.0.id());
    let secret = wait_until(Duration::from_secs(10), "the rank's environment", || {
        environ_var(rank, MEMBER_SECRET_ENV)
    });
    assert_eq!(environ_var(rank, TOKEN_ENV).as_deref(), Some(token.as_str()));

    let rpcs = rpcs_of_the_proto();
    assert_eq!(rpcs.len(), 8, "RPCs read from the proto: {rpcs:?}");
    let member_rpcs =
        ["Heartbeat", "GetAssignment", "Rendezvous", "ReportMetrics", "CommitCheckpoint", "Leave"];
    assert!(member_rpcs.iter().all(|r| rpcs.iter().any(|p| p == r)), "{rpcs:?}");
    let wrong_token = "f".repeat(64);
    let refusals: Vec<String> = runtime.block_on(async {
        let mut refusals = Vec::new();
        // (a) Without the token, and with a wrong one: every RPC.
        for (who, metadata) in [
            ("no token", vec![]),
            ("a wrong token", vec![(TOKEN_HEADER, wrong_token.clone())]),
            (
                "a wrong token and the real member credentials",
                vec![
                    (TOKEN_HEADER, wrong_token.clone()),
                    (MEMBER_HEADER, job.member_id.clone()),
                    (SECRET_HEADER, secret.clone()),
                ],
            ),
        ] {
            let mut c = client(&url, metadata).await;
            for rpc in &rpcs {
                match call(&mut c, rpc, &job).await {
                    Err(s) if s.code() == Code::Unauthenticated => {
                        assert!(!s.message().contains(&job.member_id), "{s:?}");
                        refusals.push(format!("{who}: {rpc}"));
                    }
                    other => panic!("{rpc} with {who} was not refused: {other:?}"),
                }
            }
        }
        // (b) The token and the real member id, but not its secret.
        for (who, member) in [
            ("no member secret", vec![(MEMBER_HEADER, job.member_id.clone())]),
            (
                "a wrong member secret",
                vec![(MEMBER_HEADER, job.member_id.clone()), (SECRET_HEADER, "0".repeat(64))],
            ),
            (
                "the secret with another member id",
                vec![(MEMBER_HEADER, "m2-a".into()), (SECRET_HEADER, secret.clone())],
            ),
        ] {
            let mut metadata = vec![(TOKEN_HEADER, token.clone())];
            metadata.extend(member);
            let mut c = client(&url, metadata).await;
            for rpc in member_rpcs {
                match call(&mut c, rpc, &job).await {
                    Err(s) if s.code() == Code::Unauthenticated => {
                        refusals.push(format!("{who}: {rpc}"))
                    }
                    other => panic!("{rpc} with the token and {who} was not refused: {other:?}"),
                }
            }
        }
        // The control: the real credentials are accepted.
        let mut real = client(
            &url,
            vec![
                (TOKEN_HEADER, token.clone()),
                (MEMBER_HEADER, job.member_id.clone()),
                (SECRET_HEADER, secret.clone()),
            ],
        )
        .await;
        let beat = real
            .heartbeat(pb::HeartbeatRequest { member_id: job.member_id.clone() })
            .await
            .expect("a heartbeat with the member's real credentials")
            .into_inner();
        assert!(beat.keep_going && beat.failure.is_empty(), "{beat:?}");
        refusals
    });
    assert_eq!(refusals.len(), 3 * rpcs.len() + 3 * member_rpcs.len(), "{refusals:#?}");

    // The job is unaffected: still waiting, one member, heartbeating, and the
    // processes alive.
    let after = runtime.block_on(status(&url, &token));
    assert_eq!(after.state, "waiting", "{after:?}");
    assert_eq!(after.members.len(), 1, "{after:?}");
    assert_eq!(after.members[0].member_id, job.member_id);
    assert!(after.members[0].last_heartbeat_ms_ago < 10_000, "{after:?}");
    assert!(coordinator.0.try_wait().unwrap().is_none(), "the coordinator exited");
    assert!(worker.0.try_wait().unwrap().is_none(), "the worker exited");
    assert!(Path::new(&format!("/proc/{rank}")).exists(), "the rank process exited");

    // (d) No credential on a command line; the refusals were logged, the
    // credentials never.
    for (what, pid) in
        [("coordinator", coordinator.0.id()), ("worker", worker.0.id()), ("rank", rank)]
    {
        let cmdline = proc_text(pid, "cmdline");
        assert!(!cmdline.is_empty(), "{what} ({pid}) has no command line");
        assert!(!cmdline.contains(&token), "the job token is on the {what}'s command line");
        assert!(!cmdline.contains(&secret), "the member secret is on the {what}'s command line");
    }
    assert!(proc_text(rank, "cmdline").contains(&job.member_id), "pid {rank} is not the rank");
    // A stranger's connection that says nothing is closed within 10 s, and
    // so is one that speaks HTTP/2 all along but never with the token.
    assert_a_silent_connection_is_closed(bound);
    assert_a_strangers_talking_connection_is_closed(bound);
    // More than the 10 s deadline later, the token holder's connection is
    // the one it opened first.
    assert_eq!(status_on_one_connection(&runtime, &mut holder, &held), 1);
    let _ = Command::new("kill").arg(rank.to_string()).status();
    drop(worker);
    drop(coordinator);
    let mut logged: Vec<PathBuf> =
        std::fs::read_dir(&logs).unwrap().flatten().map(|e| e.path()).collect();
    let ranks = out.join("ranks");
    if ranks.is_dir() {
        logged.extend(std::fs::read_dir(&ranks).unwrap().flatten().map(|e| e.path()));
    }
    for path in &logged {
        let text = read(path);
        assert!(!text.contains(&token), "the job token is in {}", path.display());
        assert!(!text.contains(&secret), "the member secret is in {}", path.display());
    }
    let coordinator_log = read(&logs.join("coordinator.err"));
    assert!(
        coordinator_log.contains("refused a call without the job token"),
        "the refusals were not logged:\n{coordinator_log}"
    );
    assert!(coordinator_log.contains("member credentials not accepted"), "{coordinator_log}");
}

#[test]
fn the_coordinator_serves_tls_when_given_a_certificate() {
    if !require(on_path("openssl"), "openssl, to make a test certificate") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // A test CA, and the coordinator's certificate for 127.0.0.1 signed by it.
    let (ca, cert, key) =
        (tmp.path().join("ca.pem"), tmp.path().join("cert.pem"), tmp.path().join("key.pem"));
    std::fs::write(
        tmp.path().join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    for args in [
        &[&["req", "-x509"][..], &ec, &["-days", "2", "-subj", "/CN=rsb-test-ca"]]
            .concat()
            .iter()
            .chain(&["-keyout", "ca.key", "-out", "ca.pem"])
            .copied()
            .collect::<Vec<_>>(),
        &[&["req"][..], &ec, &["-subj", "/CN=localhost", "-keyout", "key.pem"]]
            .concat()
            .iter()
            .chain(&["-out", "leaf.csr"])
            .copied()
            .collect::<Vec<_>>(),
        &["x509", "-req", "-in", "leaf.csr", "-CA", "ca.pem", "-CAkey", "ca.key"]
            .iter()
            .chain(&["-CAcreateserial", "-days", "2", "-out", "cert.pem", "-extfile", "ext.cnf"])
            .copied()
            .collect::<Vec<_>>(),
    ] {
        let made = Command::new("openssl").args(args).current_dir(tmp.path()).output().unwrap();
        assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    }
    let token = "tls-test-token-6b0f2d9c1e";
    let logs = tmp.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let mut up = coordinator_on_loopback("2", &tmp.path().join("run"));
    up.env(TOKEN_ENV, token).arg("--tls-cert").arg(&cert).arg("--tls-key").arg(&key);
    let _coordinator = spawn_logged(&mut up, &logs.join("coordinator"));
    let bound = listening_address(&logs.join("coordinator.out"));
    let url = format!("https://{bound}");
    let mut join = Command::new(binary("worker"));
    join.env(TOKEN_ENV, token)
        .args(["join", "--coordinator", &url, "--devices", "cpu", "--host-name", "t"])
        .arg("--tls-ca")
        .arg(&ca);
    let worker = spawn_logged(&mut join, &logs.join("worker"));
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (mut holder, held) = runtime.block_on(counting_client(bound, Some(&ca), token));
    assert_eq!(status_on_one_connection(&runtime, &mut holder, &held), 1);
    let tls_status = || {
        runtime.block_on(async {
            let tls = tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(read(&ca)));
            let channel = tonic::transport::Endpoint::from_shared(url.clone())
                .unwrap()
                .tls_config(tls)
                .unwrap()
                .connect()
                .await
                .expect("a TLS connection with the CA");
            let mut c = CoordinatorClient::with_interceptor(
                channel,
                Attach(vec![(TOKEN_HEADER, token.to_string())]),
            );
            c.status(pb::StatusRequest {}).await.expect("Status over TLS").into_inner()
        })
    };
    wait_until(Duration::from_secs(60), "the worker to join over TLS", || {
        (tls_status().members.len() == 1).then_some(())
    });
    // The rank process is told the CA too.
    let rank = rank_process_of(worker.0.id());
    assert!(proc_text(rank, "cmdline").contains("--tls-ca"), "{}", proc_text(rank, "cmdline"));
    // A plain-text client gets no answer from the TLS port.
    let plain = runtime.block_on(async {
        let attempt = async {
            let channel = tonic::transport::Endpoint::from_shared(format!("http://{bound}"))
                .unwrap()
                .connect()
                .await
                .map_err(|e| e.to_string())?;
            let mut c = CoordinatorClient::with_interceptor(
                channel,
                Attach(vec![(TOKEN_HEADER, token.to_string())]),
            );
            c.status(pb::StatusRequest {}).await.map_err(|e| e.to_string())
        };
        tokio::time::timeout(Duration::from_secs(10), attempt).await
    });
    assert!(!matches!(plain, Ok(Ok(_))), "a plain-text call was answered: {plain:?}");
    // A connection that never starts its TLS handshake is closed at the
    // handshake deadline (10 s): a stranger's silence holds nothing open.
    assert_a_silent_connection_is_closed(bound);
    // A client with the token holds its one TLS connection past that
    // deadline (its call vouched for it through the TLS layer).
    assert_eq!(status_on_one_connection(&runtime, &mut holder, &held), 1);
    let _ = Command::new("kill").arg(rank.to_string()).status();
}

#[test]
fn a_certificate_or_key_that_does_not_parse_fails_up_at_once_naming_them() {
    let tmp = tempfile::tempdir().unwrap();
    let (cert, key) = (tmp.path().join("cert.pem"), tmp.path().join("key.pem"));
    std::fs::write(&cert, "not a certificate\n").unwrap();
    std::fs::write(&key, "not a key\n").unwrap();
    let up = Command::new(binary("coordinator"))
        .env(TOKEN_ENV, "tls-test-token-6b0f2d9c1e")
        .args(["up", "--nodes", "1", "--listen", "127.0.0.1:0", "--join-timeout-secs", "60"])
        .arg("--recipe")
        .arg(workspace_root().join("recipes/debug/resnet18_tiny_cpu.yaml"))
        .arg("--out")
        .arg(tmp.path().join("run"))
        .arg("--tls-cert")
        .arg(&cert)
        .arg("--tls-key")
        .arg(&key)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Well before the join timeout: the files are checked before listening.
    let out = rsb_integration_tests::processes::wait_with_timeout(
        up,
        Duration::from_secs(30),
        "coordinator up with a broken certificate",
    );
    let (stdout, stderr) =
        (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(!stdout.contains("listening"), "it said it listens:\n{stdout}");
    assert!(
        stderr.contains(&key.display().to_string()) && stderr.contains("TLS"),
        "the error does not name the key:\n{stderr}"
    );
}

/// Plain text goes no further than loopback unless asked for: `up
/// --listen` beyond loopback without TLS fails before it listens, and
/// `worker join` and `coordinator status` refuse an `http://` coordinator
/// beyond loopback before they send the token, each naming
/// `--insecure-plaintext`, which lets them (with a warning from `up`).
/// Before, `up` only warned, and the token crossed the network in clear text.
#[test]
fn plain_text_beyond_loopback_is_refused_unless_asked_for() {
    let tmp = tempfile::tempdir().unwrap();
    let up = |extra: &[&str], name: &str| {
        let mut cmd = Command::new(binary("coordinator"));
        cmd.env(TOKEN_ENV, "plaintext-test-token-4c1d8e2a")
            .args(["up", "--nodes", "1", "--listen", "0.0.0.0:0", "--join-timeout-secs", "60"])
            .args(extra)
            .arg("--recipe")
            .arg(workspace_root().join("recipes/debug/resnet18_tiny_cpu.yaml"))
            .arg("--out")
            .arg(tmp.path().join(name))
            .stdin(Stdio::null());
        cmd
    };
    let refused = up(&[], "refused").output().unwrap();
    let (stdout, stderr) =
        (String::from_utf8_lossy(&refused.stdout), String::from_utf8_lossy(&refused.stderr));
    assert_eq!(refused.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(!stdout.contains("listening"), "it listened:\n{stdout}");
    assert!(!tmp.path().join("refused").exists(), "a refused start wrote its run folder");
    assert!(stderr.contains("--insecure-plaintext") && stderr.contains("clear text"), "{stderr}");

    let log = tmp.path().join("allowed.log");
    let _allowed = spawn_logged(&mut up(&["--insecure-plaintext"], "allowed"), &log);
    let (out, err) = (log.with_extension("out"), log.with_extension("err"));
    wait_until(Duration::from_secs(60), "the coordinator to listen on 0.0.0.0", || {
        read(&out).contains("coordinator listening on 0.0.0.0:").then_some(())
    });
    // stderr has its own writer thread: waited for too.
    wait_until(Duration::from_secs(30), "the warning of plain text beyond loopback", || {
        read(&err).contains("without TLS (--insecure-plaintext)").then_some(())
    });

    // An address of TEST-NET-1, which nothing answers: before, `join`
    // tried to connect for 120 s.
    let remote = "http://192.0.2.1:50051";
    let clients = [
        (binary("worker"), vec!["join", "--coordinator", remote, "--devices", "cpu"]),
        (binary("coordinator"), vec!["status", "--coordinator", remote]),
    ];
    for (program, args) in clients {
        let client = Command::new(&program)
            .args(&args)
            .env(TOKEN_ENV, "plaintext-test-token-4c1d8e2a")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = processes::wait_with_timeout(client, Duration::from_secs(30), args[0]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{}", args[0]);
        assert!(
            stderr.contains("192.0.2.1 is not this host's loopback")
                && stderr.contains("--insecure-plaintext"),
            "{}: {stderr}",
            args[0]
        );
    }
}

#[test]
fn a_members_connection_whose_peer_stopped_answering_frees_its_slot() {
    // One connection per address. A client presents the token (its
    // connection is a member's: never closed for its silence, never
    // evicted), then stops answering: its runtime is no longer driven, as
    // a host that lost its power or was reclaimed answers nothing. The
    // coordinator's ping goes unanswered, the connection is closed, and a
    // new connection from the address is served.
    let tmp = tempfile::tempdir().unwrap();
    let logs = tmp.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let token = "a-keepalive-test-token-0123456789";
    let mut cmd = coordinator_on_loopback("1", &tmp.path().join("run"));
    cmd.env(TOKEN_ENV, token).args(["--max-connections-per-address", "1"]);
    let _coordinator = spawn_logged(&mut cmd, &logs.join("coordinator"));
    let bound = listening_address(&logs.join("coordinator.out"));
    let gone = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (mut member, opened) = gone.block_on(counting_client(bound, None, token));
    assert_eq!(status_on_one_connection(&gone, &mut member, &opened), 1);
    let stopped_at = Instant::now();
    // Another client from the address is refused while that one holds the
    // slot, then served once the ping found it gone.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let served = wait_until(Duration::from_secs(60), "a new connection served", || {
        let outcome = runtime.block_on(async {
            let within = Duration::from_secs(3);
            let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{bound}"))
                .ok()?
                .connect_timeout(within);
            let channel = tokio::time::timeout(within, endpoint.connect()).await.ok()?.ok()?;
            let mut fresh = CoordinatorClient::with_interceptor(
                channel,
                Attach(vec![(TOKEN_HEADER, token.to_string())]),
            );
            tokio::time::timeout(within, fresh.status(pb::StatusRequest {})).await.ok()?.ok()
        });
        outcome.map(|_| stopped_at.elapsed())
    });
    assert!(served > Duration::from_secs(5), "served after {served:?}: the slot was free at once");
    println!("MEASURED a silent member's connection freed its slot {served:.1?} after it stopped");
    drop((member, gone));
}

/// Two idle connections to `bound` are held (until their deadline for a
/// call with the token, 10 s); a third is closed as soon as it is
/// accepted, and the coordinator's log `err_log` says why (`refusal`).
fn assert_a_third_connection_is_closed_at_once(
    bound: std::net::SocketAddr,
    err_log: &Path,
    refusal: &str,
) {
    use std::io::Read;
    let _held: Vec<_> = (0..2).map(|_| std::net::TcpStream::connect(bound).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(200));
    let mut third = std::net::TcpStream::connect(bound).unwrap();
    third.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let opened = Instant::now();
    let closed = third.read(&mut [0u8; 64]);
    assert!(
        matches!(closed, Ok(0))
            || closed.as_ref().is_err_and(|e| e.kind() != std::io::ErrorKind::WouldBlock),
        "the third connection was answered: {closed:?}"
    );
    assert!(opened.elapsed() < Duration::from_secs(5), "closed after {:?}", opened.elapsed());
    wait_until(Duration::from_secs(10), "the refusal in the coordinator's log", || {
        read(err_log).contains(refusal).then_some(())
    });
}

#[test]
fn one_address_holds_at_most_its_share_of_the_coordinators_connections() {
    let tmp = tempfile::tempdir().unwrap();
    let logs = tmp.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let up = |share: &str| {
        let mut cmd = coordinator_on_loopback("1", &tmp.path().join(format!("run-{share}")));
        cmd.env_remove(TOKEN_ENV).args(["--max-connections-per-address", share]);
        cmd
    };
    // 0 would refuse every host: refused at once, naming the flag.
    let zero = up("0").output().unwrap();
    assert!(!zero.status.success());
    let said = String::from_utf8_lossy(&zero.stderr);
    assert!(said.contains("--max-connections-per-address"), "{said}");
    let _coordinator = spawn_logged(&mut up("2"), &logs.join("coordinator"));
    let bound = listening_address(&logs.join("coordinator.out"));
    // Two idle connections from this address are held (until their
    // deadline for a call with the token, 10 s); a third is closed as soon
    // as it is accepted.
    assert_a_third_connection_is_closed_at_once(
        bound,
        &logs.join("coordinator.err"),
        "2 connections from its address are open already",
    );
}

/// The soft and hard "Max open files" of process `pid`.
fn open_files_limits(pid: u32) -> (u64, u64) {
    let limits = proc_text(pid, "limits");
    let line = limits.lines().find(|l| l.starts_with("Max open files")).expect("Max open files");
    let numbers: Vec<u64> = line.split_whitespace().filter_map(|w| w.parse().ok()).collect();
    (numbers[0], numbers[1])
}

/// A job of 100 hosts: 1,600 connections by default (16 a host), where a
/// fixed 512 refused the ranks of hosts past about 50 of 8 GPUs. Started
/// with a soft open-files limit of 64 (`prlimit`), the coordinator raises
/// it to hold them, those closing (an eighth more) and its files (2,056);
/// under a hard limit of 900 it raises it that far and says that
/// connections past about 572 are refused, naming the limits and what to
/// do. The limit is the server's: with `--max-connections 2`, a third idle
/// connection is closed as soon as it is accepted.
#[test]
fn the_connection_limit_grows_with_the_hosts_and_the_open_files_limit_with_it() {
    let tmp = tempfile::tempdir().unwrap();
    let logs = tmp.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    assert!(on_path("prlimit"), "prlimit (util-linux) is needed");
    let up = |hard: u64, name: &str, extra: &[&str]| {
        let mut cmd = Command::new("prlimit");
        cmd.arg(format!("--nofile=64:{hard}"))
            .arg(binary("coordinator"))
            .args(coordinator_on_loopback("100", &tmp.path().join(name)).get_args())
            .args(extra)
            .env(TOKEN_ENV, "connections-test-token-2b7e4c19");
        spawn_logged(&mut cmd, &logs.join(name))
    };
    let roomy = up(8192, "roomy", &[]);
    listening_address(&logs.join("roomy.out"));
    assert_eq!(open_files_limits(roomy.0.id()), (1600 + 200 + 256, 8192));
    let said = read(&logs.join("roomy.err"));
    assert!(said.contains("up to 1600 connections at once (--max-connections)"), "{said}");
    let tight = up(900, "tight", &[]);
    listening_address(&logs.join("tight.out"));
    assert_eq!(open_files_limits(tight.0.id()), (900, 900));
    let said = read(&logs.join("tight.err"));
    assert!(
        said.contains(
            "need 2056 open files, but the hard limit (RLIMIT_NOFILE) is 900: \
                       connections past about 572 are refused"
        ),
        "{said}"
    );
    let two = up(8192, "two", &["--max-connections", "2"]);
    let bound = listening_address(&logs.join("two.out"));
    assert_a_third_connection_is_closed_at_once(
        bound,
        &logs.join("two.err"),
        "2 connections are open already",
    );
    drop(two);
}
