//! Echo endpoints: QUIC servers that answer every request frame with a small reply frame,
//! with the same TLS as a QuorumKV node, to measure what the network path alone costs.
//!
//! # Why
//!
//! A QuorumKV request pays for QUIC and TLS, framing and encoding, a fan-out to replicas, the
//! coordinator's state machine, storage and fsyncs. The echo endpoints keep the first three
//! and remove the rest, so the [`crate::ceiling`] and [`crate::raw_quic`] modes measure an
//! upper bound: no store can answer faster over this path on this machine.
//!
//! # What is the same as a node
//!
//! * **TLS**: a cluster CA and node certificates made by `quorumkv_node::certs` (as `quorumkv
//!   dev` makes them), the node's own rustls configurations (`quorumkv_node::tls`: TLS 1.3,
//!   ring provider, client certificates required, no 0-RTT), the client ALPN, and the node's
//!   QUIC transport settings (stream limits, idle timeout, keep-alives). Each accepted
//!   connection is authenticated the way a node does it (identity read from the certificate).
//! * **Framing**: one request frame per bidirectional stream, encoded with
//!   `quorumkv_client::frame::encode_frame` (version byte, length, rmp-serde body), its header
//!   checked before the body is read, the body decoded; one reply frame back; the stream
//!   finished. One connection per endpoint carries all streams, as the client does.
//!
//! # Processes
//!
//! Each endpoint is its own process (`quorumkv-bench echo`), so endpoints do not share a
//! runtime with each other or with the load generator, as nodes would not. [`EchoProcess`]
//! starts one on an OS-chosen loopback port, learns the port from the child's first line of
//! output (`listening <address>`), and kills it when dropped, on error and Ctrl-C alike. The
//! child also exits when its standard input (a pipe from the parent) closes, so even a parent
//! killed with SIGKILL leaves no endpoint behind.

use anyhow::{anyhow, bail, Context as _, Result};
use quorumkv_client::frame::{decode_body, decode_header, encode_frame, FRAME_HEADER_LEN};
use quorumkv_node::certs::{self, IfExists};
use quorumkv_node::config::Limits;
use quorumkv_node::tls;
use quorumkv_ring::NodeId;
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The request an echo endpoint receives: a key and a value, as a put carries.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EchoRequest {
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
}

/// The reply: a token of about the size of the context a write returns.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EchoReply {
    #[serde(with = "serde_bytes")]
    pub token: Vec<u8>,
}

/// Bytes in the reply's token: about a write's context for a key written by one coordinator.
pub const REPLY_TOKEN_BYTES: usize = 48;

/// How long a child endpoint may take to say where it listens.
const START_DEADLINE: Duration = Duration::from_secs(10);

/// Arguments of `quorumkv-bench echo`.
#[derive(Clone, Debug, clap::Args)]
pub struct EchoArgs {
    /// Address to listen on (UDP); port 0 picks a free one, printed as `listening <address>`.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// Cluster CA certificate (PEM).
    #[arg(long)]
    pub ca: PathBuf,
    /// This endpoint's node certificate (PEM).
    #[arg(long)]
    pub cert: PathBuf,
    /// Its private key (PEM).
    #[arg(long)]
    pub key: PathBuf,
    /// Exit when standard input closes: a parent that holds the other end of a pipe takes
    /// its endpoints down with it, even if it is killed without a chance to clean up.
    #[arg(long)]
    pub exit_with_stdin: bool,
}

/// Runs an echo endpoint until the process is killed.
pub async fn serve(args: EchoArgs) -> Result<()> {
    if args.exit_with_stdin {
        std::thread::spawn(|| {
            let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut Vec::new());
            std::process::exit(0);
        });
    }
    let limits = Limits::default();
    let crypto = tls::server_crypto(&args.ca, &args.cert, &args.key)?;
    let config = tls::quic_server_config(crypto, &limits)?;
    let endpoint = quinn::Endpoint::server(config, args.listen)
        .with_context(|| format!("binding {}", args.listen))?;
    // The parent reads this line to learn the port; stdout is flushed by println's newline
    // only on a terminal, so flush explicitly.
    println!("listening {}", endpoint.local_addr()?);
    std::io::Write::flush(&mut std::io::stdout())?;
    let max_frame_bytes = limits.frame_bytes_max;
    while let Some(incoming) = endpoint.accept().await {
        tokio::spawn(async move {
            let Ok(connection) = incoming.await else {
                return;
            };
            if let Err(e) = tls::authenticate(&connection) {
                connection.close(0x10u32.into(), e.to_string().as_bytes());
                return;
            }
            while let Ok((send, recv)) = connection.accept_bi().await {
                tokio::spawn(answer(send, recv, max_frame_bytes));
            }
        });
    }
    Ok(())
}

/// Reads one request frame from a stream and writes one reply frame.
async fn answer(mut send: quinn::SendStream, mut recv: quinn::RecvStream, max_frame_bytes: u32) {
    let mut header = [0u8; FRAME_HEADER_LEN];
    if recv.read_exact(&mut header).await.is_err() {
        return;
    }
    let Ok(len) = decode_header(header, max_frame_bytes) else {
        let _ = recv.stop(0u32.into());
        return;
    };
    let mut body = vec![0u8; len];
    if recv.read_exact(&mut body).await.is_err() {
        return;
    }
    let Ok(request) = decode_body::<EchoRequest>(&body) else {
        return;
    };
    let reply = EchoReply {
        token: blake3::hash(&request.key).as_bytes().repeat(2)[..REPLY_TOKEN_BYTES].to_vec(),
    };
    if let Ok(frame) = encode_frame(&reply, max_frame_bytes) {
        if send.write_all(&frame).await.is_ok() {
            let _ = send.finish();
        }
    }
}

/// One request/reply exchange on a new stream of `connection`, as the client does it.
pub async fn exchange(
    connection: &quinn::Connection,
    frame: &[u8],
    max_frame_bytes: u32,
) -> Result<(), &'static str> {
    let (mut send, mut recv) = connection.open_bi().await.map_err(|_| "connection_lost")?;
    send.write_all(frame).await.map_err(|_| "stream_write")?;
    let _ = send.finish();
    let mut header = [0u8; FRAME_HEADER_LEN];
    recv.read_exact(&mut header)
        .await
        .map_err(|_| "stream_read")?;
    let len = decode_header(header, max_frame_bytes).map_err(|_| "malformed_frame")?;
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body)
        .await
        .map_err(|_| "stream_read")?;
    decode_body::<EchoReply>(&body).map_err(|_| "malformed_frame")?;
    Ok(())
}

/// Encodes the request frame for record `key` with a value of `value_bytes`.
pub fn request_frame(key: u64, value: &[u8]) -> Result<Vec<u8>, &'static str> {
    let request = EchoRequest {
        key: crate::keys::key_name(key),
        value: value.to_vec(),
    };
    encode_frame(&request, Limits::default().frame_bytes_max).map_err(|_| "encode")
}

/// A cluster CA with node certificates `n1..=nodes` and a client certificate, laid out by the
/// same functions `quorumkv dev` uses, in a directory removed on drop.
#[derive(Debug)]
pub struct Pki {
    dir: tempfile::TempDir,
    nodes: usize,
}

impl Pki {
    /// Creates the CA and certificates.
    pub fn new(nodes: usize) -> Result<Pki> {
        let dir = tempfile::Builder::new()
            .prefix("quorumkv-bench-pki-")
            .tempdir()?;
        certs::init_ca(dir.path(), IfExists::Refuse)?;
        for index in 1..=nodes {
            certs::issue_node(dir.path(), &Pki::node_id(index)?, IfExists::Refuse)?;
        }
        certs::issue_client(dir.path(), quorumkv_node::dev::DEV_CLIENT, IfExists::Refuse)?;
        Ok(Pki { dir, nodes })
    }

    /// Node `index` (from 1): `n1`, `n2`, ...
    pub fn node_id(index: usize) -> Result<NodeId> {
        NodeId::new(format!("n{index}")).map_err(|e| anyhow!("node id: {e}"))
    }

    /// The CA certificate file.
    pub fn ca(&self) -> PathBuf {
        certs::ca_paths(self.dir.path()).cert
    }

    /// The QUIC client configuration a client would use: client certificate, client ALPN,
    /// the node's transport settings.
    pub fn client_config(&self) -> Result<quinn::ClientConfig> {
        let client = certs::client_paths(self.dir.path(), quorumkv_node::dev::DEV_CLIENT);
        let crypto = tls::client_crypto(&self.ca(), &client.cert, &client.key)?;
        Ok(tls::quic_client_config(crypto, &Limits::default())?)
    }

    /// Starts echo endpoint `index` (from 1) as a child process of `exe`.
    pub fn spawn_echo(&self, exe: &Path, index: usize) -> Result<EchoProcess> {
        if index == 0 || index > self.nodes {
            bail!("no certificate for echo endpoint {index}");
        }
        let id = Pki::node_id(index)?;
        let paths = certs::node_paths(self.dir.path(), &id);
        let child = Command::new(exe)
            .arg("echo")
            .arg("--ca")
            .arg(self.ca())
            .arg("--cert")
            .arg(&paths.cert)
            .arg("--key")
            .arg(&paths.key)
            .arg("--exit-with-stdin")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {} echo", exe.display()))?;
        EchoProcess::adopt(child, id)
    }
}

/// A running echo endpoint; killed and reaped on drop.
#[derive(Debug)]
pub struct EchoProcess {
    child: Child,
    id: NodeId,
    address: SocketAddr,
}

impl EchoProcess {
    /// Waits for the child's `listening <address>` line.
    fn adopt(mut child: Child, id: NodeId) -> Result<EchoProcess> {
        let Some(stdout) = child.stdout.take() else {
            let _ = child.kill();
            let _ = child.wait();
            bail!("echo endpoint {id} has no stdout");
        };
        // Read on a thread so the wait has a deadline even if the child never writes.
        let (sender, receiver) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = sender.send(line);
        });
        let line = receiver.recv_timeout(START_DEADLINE).unwrap_or_default();
        let address = line
            .trim()
            .strip_prefix("listening ")
            .and_then(|address| address.parse().ok());
        match address {
            Some(address) => Ok(EchoProcess { child, id, address }),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("echo endpoint {id} did not start (it said {line:?})")
            }
        }
    }

    /// Where it listens.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// The TLS server name to dial it by: its node name.
    pub fn server_name(&self) -> String {
        certs::node_dns_name(&self.id)
    }

    /// Dials it with `config` from `endpoint`.
    pub async fn connect(
        &self,
        endpoint: &quinn::Endpoint,
        config: quinn::ClientConfig,
    ) -> Result<quinn::Connection> {
        let connecting = endpoint.connect_with(config, self.address, &self.server_name())?;
        let connection = tokio::time::timeout(START_DEADLINE, connecting)
            .await
            .map_err(|_| anyhow!("no connection to echo {} in time", self.id))??;
        Ok(connection)
    }
}

impl Drop for EchoProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A client QUIC endpoint on an ephemeral loopback-reachable port.
pub fn client_endpoint() -> Result<quinn::Endpoint> {
    Ok(quinn::Endpoint::client(SocketAddr::from((
        [0, 0, 0, 0],
        0,
    )))?)
}

/// The `quorumkv-bench` executable, to start children of.
pub fn own_executable() -> Result<PathBuf> {
    std::env::current_exe().context("finding the quorumkv-bench executable")
}
