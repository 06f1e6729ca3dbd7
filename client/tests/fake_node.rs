//! The client against fake nodes: real QUIC and mutual TLS in one process, scripted answers.
//!
//! Each fake node is a quinn server with a certificate from a CA generated here (rcgen). It
//! answers `ClusterInfo` with a two-node ring, keeps a toy store (a put without context adds a
//! sibling, a put or delete with one replaces every sibling), logs every request it receives,
//! and can be scripted to answer the next writes with `Overloaded` or `QuorumNotReached`, or to
//! never answer. The toy store is not the real causal merge; it only has to be enough to see
//! the client do the right thing.
//!
//! Node `n1` is the seed: its certificate has both `n1.node.quorumkv` and `node.quorumkv`.
//! Node `n2`'s certificate has only `n2.node.quorumkv`, so any request that reaches `n2` proves
//! the client dialed it by its own node name.

// Helpers outside `#[test]` functions unwrap too: a failed setup step should fail the test.
#![allow(clippy::unwrap_used)]

use quorumkv_client::frame::{decode_frame, encode_frame};
use quorumkv_client::protocol::{
    ClusterInfo, ErrorKind, ErrorReply, KeyspaceInfo, NodeAddress, QuorumShortfall, Request,
    Response, CLIENT_ALPN,
};
use quorumkv_client::{
    exit_code, Client, ClientBuilder, Context, Error, ReadOptions, RequestId, SiblingValue,
    TlsIdentity, WriteOptions, DEFAULT_KEYSPACE,
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
use std::sync::{Arc, Mutex};
use std::time::Duration;

const MAX_FRAME: u32 = 1 << 20;

/// Bounds every test: a hang fails instead of stalling the suite.
async fn bounded<T>(test: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(60), test)
        .await
        .expect("test exceeded its time bound")
}

// ----- certificates --------------------------------------------------------------------------

struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// PEM texts of one certificate and its key.
struct Leaf {
    cert: String,
    key: String,
}

impl Ca {
    fn new(name: &str) -> Ca {
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

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    fn leaf(&self, names: &[&str]) -> Leaf {
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

    fn client_identity(&self) -> TlsIdentity {
        self.client_identity_trusting(self)
    }

    /// A client certificate from this CA, trusting `trusted` for servers.
    fn client_identity_trusting(&self, trusted: &Ca) -> TlsIdentity {
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
struct Script {
    /// `(node id, request)` in arrival order.
    log: Vec<(String, Request)>,
    /// Answer this many upcoming writes with `Overloaded`.
    overload_writes: u32,
    /// Answer this many upcoming writes with `QuorumNotReached`.
    fail_quorum_writes: u32,
    /// Never answer data requests (the stream stays open until the client gives up).
    silent: bool,
    store: HashMap<Vec<u8>, Vec<SiblingValue>>,
}

type Shared = Arc<Mutex<Script>>;

struct FakeNode {
    address: SocketAddr,
    endpoint: quinn::Endpoint,
}

impl Drop for FakeNode {
    fn drop(&mut self) {
        self.endpoint.close(0u32.into(), b"test over");
    }
}

/// Starts a fake node with certificate `leaf` (from `ca`, which it also trusts for clients).
fn start_node(
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
    let response = {
        let mut script = shared.lock().unwrap();
        script.log.push((id, request.clone()));
        if script.silent && !matches!(request, Request::ClusterInfo) {
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
            }
        }
        Request::Delete { key, context, .. } => {
            if context.is_some() {
                script.store.remove(&key);
            }
            Response::Written {
                context: Context::from_bytes(b"ctx".to_vec()),
            }
        }
    }
}

/// Two fake nodes forming one cluster with keyspace `default`, N = 2.
struct Cluster {
    ca: Ca,
    shared: Shared,
    ring: Ring,
    n1: FakeNode,
    _n2: FakeNode,
}

impl Cluster {
    fn start() -> Cluster {
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
                    address: n2.address.to_string(),
                },
            ],
            keyspaces: vec![KeyspaceInfo {
                name: DEFAULT_KEYSPACE.into(),
                n: 2,
            }],
            request_timeout_ms: None,
        });
        Cluster {
            ca,
            shared,
            ring,
            n1,
            _n2: n2,
        }
    }

    fn builder(&self) -> ClientBuilder {
        ClientBuilder::new()
            .seed(self.n1.address.to_string())
            .identity(self.ca.client_identity())
            .backoff(Duration::from_millis(1), Duration::from_millis(5))
    }

    async fn client(&self) -> Client {
        self.builder().build().await.unwrap()
    }

    fn script(&self) -> std::sync::MutexGuard<'_, Script> {
        self.shared.lock().unwrap()
    }

    fn take_log(&self) -> Vec<(String, Request)> {
        std::mem::take(&mut self.script().log)
    }

    /// The node a key's requests should reach first: its preferred coordinator.
    fn coordinator(&self, key: &[u8]) -> String {
        let list = self
            .ring
            .preference_list_for(DEFAULT_KEYSPACE, key, 2)
            .unwrap();
        list.ids().next().unwrap().to_string()
    }
}

fn put_request_id(request: &Request) -> RequestId {
    match request {
        Request::Put { request_id, .. } => *request_id,
        other => panic!("expected a put, got {other:?}"),
    }
}

/// A UDP port with nothing listening on it.
fn dead_address() -> String {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.local_addr().unwrap().to_string()
}

// ----- tests ---------------------------------------------------------------------------------

#[tokio::test]
async fn learns_the_cluster_from_a_seed_and_routes_to_each_keys_coordinator() {
    bounded(async {
        let cluster = Cluster::start();
        let client = cluster.client().await;
        let log = cluster.take_log();
        assert_eq!(log.len(), 1);
        assert!(matches!(log[0], (ref node, Request::ClusterInfo) if node == "n1"));

        let keys: Vec<Vec<u8>> = (0..24).map(|i| format!("key-{i}").into_bytes()).collect();
        for key in &keys {
            client
                .put(
                    DEFAULT_KEYSPACE,
                    key,
                    key.clone(),
                    None,
                    WriteOptions::default(),
                )
                .await
                .unwrap();
        }
        let log = cluster.take_log();
        let mut reached = std::collections::BTreeSet::new();
        for (key, (node, request)) in keys.iter().zip(&log) {
            assert!(matches!(request, Request::Put { key: k, .. } if k == key));
            assert_eq!(node, &cluster.coordinator(key), "key {key:?}");
            reached.insert(node.clone());
        }
        // Both nodes coordinate some keys, so n2 was dialed by its own name.
        assert_eq!(reached.len(), 2, "{reached:?}");

        for key in &keys {
            let read = client
                .get(DEFAULT_KEYSPACE, key, ReadOptions::default())
                .await
                .unwrap();
            assert_eq!(read.siblings.len(), 1);
            assert_eq!(&read.siblings[0].value, key);
            assert_eq!(read.context, Context::from_bytes(b"ctx".to_vec()));
        }
        client.close().await;
    })
    .await;
}

#[tokio::test]
async fn an_overloaded_write_is_retried_with_the_same_request_id() {
    bounded(async {
        let cluster = Cluster::start();
        let client = cluster.client().await;
        cluster.take_log();
        cluster.script().overload_writes = 1;

        client
            .put(
                DEFAULT_KEYSPACE,
                b"k",
                b"v".to_vec(),
                None,
                WriteOptions::default(),
            )
            .await
            .unwrap();
        let log = cluster.take_log();
        assert_eq!(log.len(), 2, "one overloaded attempt, one retry");
        assert_eq!(put_request_id(&log[0].1), put_request_id(&log[1].1));
        assert_eq!(log[0].0, cluster.coordinator(b"k"));

        // The next logical write draws a new id.
        client
            .put(
                DEFAULT_KEYSPACE,
                b"k",
                b"w".to_vec(),
                None,
                WriteOptions::default(),
            )
            .await
            .unwrap();
        let next = cluster.take_log();
        assert_ne!(put_request_id(&next[0].1), put_request_id(&log[0].1));
    })
    .await;
}

#[tokio::test]
async fn retries_stop_after_the_configured_count() {
    bounded(async {
        let cluster = Cluster::start();
        let client = cluster.builder().retries(2).build().await.unwrap();
        cluster.take_log();
        cluster.script().overload_writes = 10;
        let error = client
            .put(
                DEFAULT_KEYSPACE,
                b"k",
                b"v".to_vec(),
                None,
                WriteOptions::default(),
            )
            .await
            .unwrap_err();
        assert!(matches!(error, Error::Overloaded { .. }), "{error}");
        assert_eq!(exit_code(&error), 6);
        assert_eq!(cluster.take_log().len(), 3, "the attempt and two retries");
    })
    .await;
}

#[tokio::test]
async fn quorum_not_reached_is_reported_at_once_with_its_shortfall() {
    bounded(async {
        let cluster = Cluster::start();
        let client = cluster.client().await;
        cluster.take_log();
        cluster.script().fail_quorum_writes = 1;
        let error = client
            .put(
                DEFAULT_KEYSPACE,
                b"k",
                b"v".to_vec(),
                None,
                WriteOptions::default(),
            )
            .await
            .unwrap_err();
        assert!(
            matches!(
                error,
                Error::QuorumNotReached {
                    required: 2,
                    acked: 1,
                    ..
                }
            ),
            "{error}"
        );
        assert_eq!(exit_code(&error), 3);
        assert_eq!(cluster.take_log().len(), 1, "not retried");
    })
    .await;
}

#[tokio::test]
async fn invalid_requests_are_not_retried() {
    bounded(async {
        let cluster = Cluster::start();
        let client = cluster.client().await;
        cluster.take_log();
        let options = ReadOptions {
            r: Some(0),
            timeout_ms: None,
        };
        let error = client
            .get(DEFAULT_KEYSPACE, b"k", options)
            .await
            .unwrap_err();
        assert!(matches!(error, Error::InvalidRequest { .. }), "{error}");
        assert_eq!(exit_code(&error), 2);
        assert_eq!(cluster.take_log().len(), 1);
    })
    .await;
}

#[tokio::test]
async fn resolve_merges_siblings_and_writes_back_with_the_context() {
    bounded(async {
        let cluster = Cluster::start();
        let client = cluster.client().await;
        // No context: each write becomes a sibling (in the fake as in the real node).
        for value in ["b", "a"] {
            client
                .put(DEFAULT_KEYSPACE, b"k", value, None, WriteOptions::default())
                .await
                .unwrap();
        }
        let read = client
            .get(DEFAULT_KEYSPACE, b"k", ReadOptions::default())
            .await
            .unwrap();
        assert_eq!(read.siblings.len(), 2);

        let mut seen = 0;
        client
            .resolve(
                DEFAULT_KEYSPACE,
                b"k",
                ReadOptions::default(),
                WriteOptions::default(),
                |siblings| {
                    seen = siblings.len();
                    let mut values: Vec<&[u8]> =
                        siblings.iter().map(|s| s.value.as_slice()).collect();
                    values.sort();
                    values.join(&b'+')
                },
            )
            .await
            .unwrap();
        assert_eq!(seen, 2);
        let read = client
            .get(DEFAULT_KEYSPACE, b"k", ReadOptions::default())
            .await
            .unwrap();
        assert_eq!(read.siblings.len(), 1);
        assert_eq!(read.siblings[0].value, b"a+b");

        // A missing key: the merge sees no siblings and its output is written.
        client
            .resolve(
                DEFAULT_KEYSPACE,
                b"fresh",
                ReadOptions::default(),
                WriteOptions::default(),
                |siblings| {
                    assert!(siblings.is_empty());
                    b"initial".to_vec()
                },
            )
            .await
            .unwrap();
        let log = cluster.take_log();
        let (_, last) = log.last().unwrap();
        assert!(matches!(
            last,
            Request::Put { key, value, context: Some(_), .. } if key == b"fresh" && value == b"initial"
        ));

        // Delete with the read's context removes what the read saw.
        let read = client
            .get(DEFAULT_KEYSPACE, b"k", ReadOptions::default())
            .await
            .unwrap();
        client
            .delete(DEFAULT_KEYSPACE, b"k", Some(&read.context), WriteOptions::default())
            .await
            .unwrap();
        let read = client
            .get(DEFAULT_KEYSPACE, b"k", ReadOptions::default())
            .await
            .unwrap();
        assert!(read.siblings.is_empty());
    })
    .await;
}

#[tokio::test]
async fn a_node_that_never_answers_times_out() {
    bounded(async {
        let cluster = Cluster::start();
        let client = cluster
            .builder()
            .request_timeout(Duration::from_millis(300))
            .retries(1)
            .build()
            .await
            .unwrap();
        cluster.take_log();
        cluster.script().silent = true;
        let error = client
            .get(DEFAULT_KEYSPACE, b"k", ReadOptions::default())
            .await
            .unwrap_err();
        assert!(matches!(error, Error::Timeout), "{error}");
        assert_eq!(exit_code(&error), 4);
        assert_eq!(cluster.take_log().len(), 2, "the attempt and one retry");
    })
    .await;
}

#[tokio::test]
async fn a_client_certificate_from_a_foreign_ca_is_refused() {
    bounded(async {
        let cluster = Cluster::start();
        let foreign = Ca::new("someone else's CA");
        let error = ClientBuilder::new()
            .seed(cluster.n1.address.to_string())
            .identity(foreign.client_identity_trusting(&cluster.ca))
            .build()
            .await
            .unwrap_err();
        assert!(
            matches!(error, Error::AuthenticationRefused { .. }),
            "{error}"
        );
        assert_eq!(exit_code(&error), 5);
        assert!(!error.is_retryable());
    })
    .await;
}

#[tokio::test]
async fn a_node_certificate_from_a_foreign_ca_is_refused() {
    bounded(async {
        let cluster = Cluster::start();
        let foreign = Ca::new("someone else's CA");
        // The client trusts only the foreign CA, so the cluster's nodes cannot prove who they are.
        let error = ClientBuilder::new()
            .seed(cluster.n1.address.to_string())
            .identity(cluster.ca.client_identity_trusting(&foreign))
            .build()
            .await
            .unwrap_err();
        assert!(
            matches!(error, Error::AuthenticationRefused { .. }),
            "{error}"
        );
        assert_eq!(exit_code(&error), 5);
    })
    .await;
}

#[tokio::test]
async fn no_reachable_node_fails_with_every_attempt_listed() {
    bounded(async {
        let ca = Ca::new("quorumkv test CA");
        let seeds = [dead_address(), dead_address()];
        let error = ClientBuilder::new()
            .seeds(seeds.clone())
            .identity(ca.client_identity())
            .connect_timeout(Duration::from_millis(200))
            .build()
            .await
            .unwrap_err();
        match &error {
            Error::NoNodeReachable { attempts } => {
                let tried: Vec<&str> = attempts.iter().map(|(node, _)| node.as_str()).collect();
                assert_eq!(tried, [seeds[0].as_str(), seeds[1].as_str()]);
            }
            other => panic!("expected NoNodeReachable, got {other}"),
        }
        assert_eq!(exit_code(&error), 4);
    })
    .await;
}

#[tokio::test]
async fn configuration_errors_are_reported_before_any_network_use() {
    bounded(async {
        let ca = Ca::new("quorumkv test CA");
        let error = ClientBuilder::new()
            .identity(ca.client_identity())
            .build()
            .await
            .unwrap_err();
        assert!(matches!(error, Error::InvalidConfig { .. }), "{error}");
        let error = ClientBuilder::new()
            .seed(dead_address())
            .identity_files(
                "/nonexistent/ca.pem",
                "/nonexistent/c.pem",
                "/nonexistent/k.pem",
            )
            .build()
            .await
            .unwrap_err();
        assert!(matches!(error, Error::Tls { .. }), "{error}");
        assert_eq!(exit_code(&error), 2);
    })
    .await;
}
