//! Fake QuorumKV nodes for the client's tests: real QUIC and mutual TLS in one process,
//! scripted answers.
//!
//! Each fake node is a quinn server with a certificate from a CA generated here (rcgen). It
//! answers `ClusterInfo` with a two-node ring, keeps a toy store (a put without context adds a
//! sibling, a put or delete with one replaces every sibling), logs every request it receives,
//! and can be scripted to answer the next writes with `Overloaded` or `QuorumNotReached`, to
//! answer one node's data requests late, or to never answer. The toy store is not the real
//! causal merge; it only has to be enough to see the client do the right thing. A [`Relay`] in
//! front of a node can make it play dead.
//!
//! Node `n1` is the seed: its certificate has both `n1.node.quorumkv` and `node.quorumkv`.
//! Node `n2`'s certificate has only `n2.node.quorumkv`, so any request that reaches `n2` proves
//! the client dialed it by its own node name.

// Each test crate uses a different part of this module.
#![allow(dead_code)]
// Helpers outside `#[test]` functions unwrap too: a failed setup step should fail the test.
#![allow(clippy::unwrap_used)]

use quorumkv_client::frame::{decode_frame, encode_frame};
use quorumkv_client::protocol::{
    ClusterInfo, ErrorKind, ErrorReply, KeyspaceInfo, NodeAddress, QuorumShortfall, Request,
    Response, CLIENT_ALPN,
};
use quorumkv_client::{
    Client, ClientBuilder, Context, RequestId, SiblingValue, TlsIdentity, DEFAULT_KEYSPACE,
};
use quorumkv_ring::{Node, NodeId, Ring, RingConfig, Zone};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub const MAX_FRAME: u32 = 1 << 20;

/// Bounds every test: a hang fails instead of stalling the suite.
pub async fn bounded<T>(test: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(60), test)
        .await
        .expect("test exceeded its time bound")
}

// ----- certificates --------------------------------------------------------------------------

pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// PEM texts of one certificate and its key.
pub struct Leaf {
    pub cert: String,
    pub key: String,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Ca { issuer }
    }

    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    pub fn leaf(&self, names: &[&str]) -> Leaf {
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, names[0].to_string());
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }

    pub fn client_identity(&self) -> TlsIdentity {
        self.client_identity_trusting(self)
    }

    /// A client certificate from this CA, trusting `trusted` for servers.
    pub fn client_identity_trusting(&self, trusted: &Ca) -> TlsIdentity {
        let leaf = self.leaf(&["cli.client.quorumkv"]);
        TlsIdentity::from_pem(
            trusted.pem().as_bytes(),
            leaf.cert.as_bytes(),
            leaf.key.as_bytes(),
        )
        .unwrap()
    }
}

// ----- the fake nodes ------------------------------------------------------------------------

/// What the fake nodes saw and how they are scripted to answer. Shared by both nodes.
#[derive(Default)]
pub struct Script {
    /// `(node id, request)` in arrival order.
    pub log: Vec<(String, Request)>,
    /// Answer this many upcoming writes with `Overloaded`.
    pub overload_writes: u32,
    /// Answer this many upcoming writes with `QuorumNotReached`.
    pub fail_quorum_writes: u32,
    /// Never answer data requests (the stream stays open until the client gives up).
    pub silent: bool,
    /// Node id → how long that node waits before answering a data request: a slow replica.
    pub delay: HashMap<String, Duration>,
    pub store: HashMap<Vec<u8>, Vec<SiblingValue>>,
}

pub type Shared = Arc<Mutex<Script>>;

pub struct FakeNode {
    pub address: SocketAddr,
    endpoint: quinn::Endpoint,
}

impl Drop for FakeNode {
    fn drop(&mut self) {
        self.endpoint.close(0u32.into(), b"test over");
    }
}

/// Starts a fake node with certificate `leaf` (from `ca`, which it also trusts for clients).
pub fn start_node(
    id: &str,
    ca: &Ca,
    leaf: &Leaf,
    shared: Shared,
    info: Arc<Mutex<Option<ClusterInfo>>>,
) -> FakeNode {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca.pem().as_bytes()).unwrap())
        .unwrap();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .unwrap();
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(leaf.cert.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_slice(leaf.key.as_bytes()).unwrap();
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .unwrap();
    tls.alpn_protocols = vec![CLIENT_ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap();
    let config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    let endpoint = quinn::Endpoint::server(config, "127.0.0.1:0".parse().unwrap()).unwrap();
    let address = endpoint.local_addr().unwrap();
    tokio::spawn(accept(endpoint.clone(), id.to_string(), shared, info));
    FakeNode { address, endpoint }
}

async fn accept(
    endpoint: quinn::Endpoint,
    id: String,
    shared: Shared,
    info: Arc<Mutex<Option<ClusterInfo>>>,
) {
    while let Some(incoming) = endpoint.accept().await {
        let (id, shared, info) = (id.clone(), shared.clone(), info.clone());
        tokio::spawn(async move {
            // A refused handshake ends here; rustls has sent the client its alert.
            let Ok(connection) = incoming.await else {
                return;
            };
            while let Ok((send, recv)) = connection.accept_bi().await {
                tokio::spawn(serve_stream(
                    send,
                    recv,
                    id.clone(),
                    shared.clone(),
                    info.clone(),
                ));
            }
        });
    }
}

async fn serve_stream(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    id: String,
    shared: Shared,
    info: Arc<Mutex<Option<ClusterInfo>>>,
) {
    let Ok(bytes) = recv.read_to_end(MAX_FRAME as usize + 5).await else {
        return;
    };
    let request: Request = decode_frame(&bytes, MAX_FRAME).unwrap();
    let is_data = !matches!(request, Request::ClusterInfo);
    let delay = {
        let mut script = shared.lock().unwrap();
        script.log.push((id.clone(), request.clone()));
        script.delay.get(&id).copied().filter(|_| is_data)
    };
    if let Some(delay) = delay {
        tokio::time::sleep(delay).await;
    }
    let response = {
        let mut script = shared.lock().unwrap();
        if script.silent && is_data {
            None
        } else {
            Some(answer(&mut script, request, &info))
        }
    };
    let Some(response) = response else {
        // Hold the stream open without answering until the client gives up and resets it.
        let _ = send.stopped().await;
        return;
    };
    let frame = encode_frame(&response, MAX_FRAME).unwrap();
    if send.write_all(&frame).await.is_ok() {
        let _ = send.finish();
        let _ = send.stopped().await;
    }
}

fn error(kind: ErrorKind, quorum: Option<QuorumShortfall>) -> Response {
    Response::Error(ErrorReply {
        kind,
        message: format!("scripted {kind:?}"),
        quorum,
    })
}

fn answer(script: &mut Script, request: Request, info: &Mutex<Option<ClusterInfo>>) -> Response {
    let is_write = matches!(request, Request::Put { .. } | Request::Delete { .. });
    if is_write && script.overload_writes > 0 {
        script.overload_writes -= 1;
        return error(ErrorKind::Overloaded, None);
    }
    if is_write && script.fail_quorum_writes > 0 {
        script.fail_quorum_writes -= 1;
        let shortfall = QuorumShortfall {
            required: 2,
            acked: 1,
            durable_required: 1,
            durable_acked: 1,
        };
        return error(ErrorKind::QuorumNotReached, Some(shortfall));
    }
    match request {
        Request::ClusterInfo => Response::ClusterInfo(info.lock().unwrap().clone().unwrap()),
        Request::Get { key, options, .. } => {
            if options.r == Some(0) {
                return error(ErrorKind::InvalidRequest, None);
            }
            Response::Got {
                siblings: script.store.get(&key).cloned().unwrap_or_default(),
                context: Context::from_bytes(b"ctx".to_vec()),
            }
        }
        Request::Put {
            key,
            value,
            context,
            ..
        } => {
            let siblings = script.store.entry(key).or_default();
            if context.is_some() {
                siblings.clear();
            }
            siblings.push(SiblingValue {
                value,
                timestamp_ms: 1,
            });
            Response::Written {
                context: Context::from_bytes(b"ctx".to_vec()),
                hinted: 0,
            }
        }
        Request::Delete { key, context, .. } => {
            if context.is_some() {
                script.store.remove(&key);
            }
            Response::Written {
                context: Context::from_bytes(b"ctx".to_vec()),
                hinted: 0,
            }
        }
        // The fake nodes keep no replicas of their own to show.
        Request::Replicas { .. } => Response::Replicas(Vec::new()),
    }
}

/// How to set up a [`Cluster`].
#[derive(Clone, Copy, Debug, Default)]
pub struct Setup {
    /// Put a [`Relay`] in front of `n2`, and list the relay as `n2`'s address.
    pub relay_n2: bool,
    /// The coordinator timeout the nodes report in `ClusterInfo`.
    pub request_timeout_ms: Option<u64>,
}

/// Two fake nodes forming one cluster with keyspace `default`, N = 2.
pub struct Cluster {
    pub ca: Ca,
    pub shared: Shared,
    pub info: Arc<Mutex<Option<ClusterInfo>>>,
    pub ring: Ring,
    pub n1: FakeNode,
    pub n2: FakeNode,
    /// In front of `n2` when [`Setup::relay_n2`] asked for it.
    pub relay: Option<Relay>,
}

impl Cluster {
    pub fn start() -> Cluster {
        Cluster::start_with(Setup::default())
    }

    /// Needs a tokio runtime when `setup.relay_n2` is set.
    pub fn start_with(setup: Setup) -> Cluster {
        let ca = Ca::new("quorumkv test CA");
        let shared = Shared::default();
        let info = Arc::new(Mutex::new(None));
        let n1 = start_node(
            "n1",
            &ca,
            &ca.leaf(&["n1.node.quorumkv", "node.quorumkv"]),
            shared.clone(),
            info.clone(),
        );
        let n2 = start_node(
            "n2",
            &ca,
            &ca.leaf(&["n2.node.quorumkv"]),
            shared.clone(),
            info.clone(),
        );
        let relay = setup.relay_n2.then(|| Relay::start(n2.address));
        let n2_address = relay.as_ref().map_or(n2.address, |relay| relay.address);
        let members = ["n1", "n2"]
            .map(|id| Node::new(NodeId::new(id).unwrap(), Zone::new("z").unwrap(), 1).unwrap());
        let ring = Ring::build(RingConfig::new(16, 3).unwrap(), members).unwrap();
        *info.lock().unwrap() = Some(ClusterInfo {
            ring: ring.clone(),
            nodes: vec![
                NodeAddress {
                    id: "n1".into(),
                    address: n1.address.to_string(),
                },
                NodeAddress {
                    id: "n2".into(),
                    address: n2_address.to_string(),
                },
            ],
            keyspaces: vec![KeyspaceInfo {
                name: DEFAULT_KEYSPACE.into(),
                n: 2,
            }],
            request_timeout_ms: setup.request_timeout_ms,
        });
        Cluster {
            ca,
            shared,
            info,
            ring,
            n1,
            n2,
            relay,
        }
    }

    pub fn builder(&self) -> ClientBuilder {
        ClientBuilder::new()
            .seed(self.n1.address.to_string())
            .identity(self.ca.client_identity())
            .backoff(Duration::from_millis(1), Duration::from_millis(5))
    }

    pub async fn client(&self) -> Client {
        self.builder().build().await.unwrap()
    }

    pub fn script(&self) -> std::sync::MutexGuard<'_, Script> {
        self.shared.lock().unwrap()
    }

    pub fn take_log(&self) -> Vec<(String, Request)> {
        std::mem::take(&mut self.script().log)
    }

    /// The node a key's requests should reach first: its preferred coordinator.
    pub fn coordinator(&self, key: &[u8]) -> String {
        let list = self
            .ring
            .preference_list_for(DEFAULT_KEYSPACE, key, 2)
            .unwrap();
        list.ids().next().unwrap().to_string()
    }

    /// `count` keys `key-<i>` whose preferred coordinator is `node`.
    pub fn keys_coordinated_by(&self, node: &str, count: usize) -> Vec<Vec<u8>> {
        (0..)
            .map(|i| format!("key-{i}").into_bytes())
            .filter(|key| self.coordinator(key) == node)
            .take(count)
            .collect()
    }
}

// ----- a relay that can play dead ------------------------------------------------------------

/// A UDP relay in front of a fake node. While it plays dead it drops every datagram both ways,
/// as a node killed with `kill -9` (or cut off) would look from the client: no answer, no
/// refusal, no close.
pub struct Relay {
    pub address: SocketAddr,
    dead: Arc<AtomicBool>,
}

impl Relay {
    /// Starts relaying to `upstream`. Needs a tokio runtime; its tasks end with it.
    pub fn start(upstream: SocketAddr) -> Relay {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.set_nonblocking(true).unwrap();
        let socket = Arc::new(tokio::net::UdpSocket::from_std(socket).unwrap());
        let address = socket.local_addr().unwrap();
        let dead = Arc::new(AtomicBool::new(false));
        tokio::spawn(relay_from_clients(socket, upstream, dead.clone()));
        Relay { address, dead }
    }

    /// Drops everything from now on (`true`), or relays again (`false`).
    pub fn play_dead(&self, dead: bool) {
        self.dead.store(dead, Ordering::SeqCst);
    }
}

/// Forwards each client's datagrams through a socket of its own, so answers find their way back.
async fn relay_from_clients(
    socket: Arc<tokio::net::UdpSocket>,
    upstream: SocketAddr,
    dead: Arc<AtomicBool>,
) {
    let mut sessions: HashMap<SocketAddr, Arc<tokio::net::UdpSocket>> = HashMap::new();
    let mut buf = vec![0u8; 65_536];
    loop {
        let Ok((len, client)) = socket.recv_from(&mut buf).await else {
            return;
        };
        if dead.load(Ordering::SeqCst) {
            continue;
        }
        let session = sessions.entry(client).or_insert_with(|| {
            let session = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            session.set_nonblocking(true).unwrap();
            session.connect(upstream).unwrap();
            let session = Arc::new(tokio::net::UdpSocket::from_std(session).unwrap());
            tokio::spawn(relay_to_client(
                session.clone(),
                socket.clone(),
                client,
                dead.clone(),
            ));
            session
        });
        let _ = session.send(&buf[..len]).await;
    }
}

async fn relay_to_client(
    session: Arc<tokio::net::UdpSocket>,
    socket: Arc<tokio::net::UdpSocket>,
    client: SocketAddr,
    dead: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 65_536];
    loop {
        let Ok(len) = session.recv(&mut buf).await else {
            return;
        };
        if !dead.load(Ordering::SeqCst) {
            let _ = socket.send_to(&buf[..len], client).await;
        }
    }
}

/// Waits (polling, with a deadline) until `condition` holds; panics naming `what`.
pub async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn put_request_id(request: &Request) -> RequestId {
    match request {
        Request::Put { request_id, .. } => *request_id,
        other => panic!("expected a put, got {other:?}"),
    }
}

/// A UDP port with nothing listening on it.
pub fn dead_address() -> String {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.local_addr().unwrap().to_string()
}
