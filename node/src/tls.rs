//! Mutual TLS 1.3 for the node's QUIC endpoint: configs, identities and the checks that bind
//! them.
//!
//! # What is guaranteed
//!
//! A node has one QUIC endpoint (quinn) that serves two protocols, told apart by ALPN:
//! clients speak [`CLIENT_ALPN`] and nodes speak [`PEER_ALPN`] to each other. On both, **every
//! connection is mutually authenticated against the cluster CA** ([`crate::certs`]): the
//! server configuration ([`server_crypto`]) requires a client certificate that chains to the
//! CA, so a connection without a certificate, or with one from any other CA, fails inside the
//! handshake, before a single application byte is read. Only TLS 1.3 is offered, and 0-RTT
//! is off: early data can be replayed by an attacker, and a replayed write is not something a
//! quorum store should have to reason about.
//!
//! Authentication says "the CA signed this"; it does not yet say *who*. After the handshake,
//! [`authenticate`] reads the peer's [`Identity`] out of its certificate (the one
//! `quorumkv://node/<id>` or `quorumkv://client/<name>` URI SAN) and [`check_peer`] applies
//! the rule that matters: **only node certificates may speak the peer protocol**, because a
//! peer can write any key without a quorum. A node that claims an id (in its hello) is held
//! to the id in its certificate by [`check_claimed_node`]. A node certificate is not enough on
//! its own: the CA may have issued one for an id that was never (or is no longer) a member, so
//! the listener (`server/listener.rs`) admits to the peer protocol only the node ids of the
//! cluster map, and the core drops any peer message from another sender.
//!
//! The dialing side authenticates the server too: nodes dial each other by the name
//! `<id>.node.quorumkv`, which only that node's certificate carries, so a node cannot answer
//! for another; clients that do not yet know a node's id dial `node.quorumkv`, which every
//! node certificate carries and no client certificate does.
//!
//! # How it fails
//!
//! Building a config fails with [`Error::CertificateFile`] naming an unreadable or unparsable
//! file, or [`Error::Tls`] when the pieces do not fit (a key that does not match its
//! certificate, a CA file with no certificate). A refused connection surfaces as a quinn
//! handshake error on both ends (the TLS alert says why); a connection that completes the
//! handshake but fails [`authenticate`] gets [`Error::PeerIdentity`],
//! [`Error::ClientOnPeerProtocol`] or [`Error::UnknownAlpn`], and the caller closes it with
//! that message. Nothing read from a peer's certificate can panic: it is parsed, never
//! indexed blindly.
//!
//! The crypto provider is *ring*, named explicitly rather than taken from a process-wide
//! default, so no other crate's choice of provider can change what this node accepts.

use crate::certs::{validate_client_name, CLIENT_URI_PREFIX, NODE_URI_PREFIX, URI_SCHEME};
use crate::config::{Limits, TlsConfig};
use crate::error::{Error, Result};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quorumkv_ring::NodeId;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use x509_parser::extensions::GeneralName;

/// ALPN protocol name of the peer (node-to-node) protocol.
pub const PEER_ALPN: &[u8] = b"quorumkv-peer/1";

/// ALPN protocol name of the client protocol, defined with the rest of the public protocol.
pub use quorumkv_client::protocol::CLIENT_ALPN;

/// A connection with no traffic for this long is closed. Peers ping far more often than
/// this, so an idle peer connection means a dead peer or path.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// The dialing side sends QUIC keep-alives this often, well inside [`IDLE_TIMEOUT`], so a
/// quiet but healthy connection is not torn down and redialed.
pub const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(10);

/// Who is at the other end of a connection, as its certificate says.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Identity {
    /// A cluster node (`quorumkv://node/<id>`).
    Node(NodeId),
    /// A client (`quorumkv://client/<name>`).
    Client(String),
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::Node(id) => write!(f, "node {id}"),
            Identity::Client(name) => write!(f, "client {name}"),
        }
    }
}

impl Identity {
    /// Reads the identity of an end-entity certificate (DER): its one `quorumkv://` URI SAN.
    /// A certificate with none, with two (even two equal ones), or with one that does not
    /// parse identifies nobody. The input may come from the network: it is parsed, never
    /// trusted; by the time a handshake has completed, rustls has already checked the
    /// signature chain.
    pub fn from_certificate_der(der: &[u8]) -> Result<Identity> {
        let bad = |reason: String| Error::PeerIdentity { reason };
        let (rest, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| bad(format!("not an X.509 certificate: {e}")))?;
        if !rest.is_empty() {
            return Err(bad("trailing bytes after the certificate".into()));
        }
        let san = cert
            .subject_alternative_name()
            .map_err(|e| bad(format!("unreadable subject alternative names: {e}")))?
            .ok_or_else(|| bad("no subject alternative names, so no identity".into()))?;
        let mut uris = san
            .value
            .general_names
            .iter()
            .filter_map(|name| match name {
                GeneralName::URI(uri) if has_our_scheme(uri) => Some(*uri),
                _ => None,
            });
        let uri = uris
            .next()
            .ok_or_else(|| bad(format!("no {URI_SCHEME}:// URI among its names")))?;
        if uris.next().is_some() {
            return Err(bad(format!(
                "more than one {URI_SCHEME}:// URI; identity is ambiguous"
            )));
        }
        if let Some(id) = uri.strip_prefix(NODE_URI_PREFIX) {
            let id = NodeId::new(id).map_err(|e| bad(format!("URI {uri:?}: {e}")))?;
            Ok(Identity::Node(id))
        } else if let Some(name) = uri.strip_prefix(CLIENT_URI_PREFIX) {
            validate_client_name(name).map_err(|e| bad(format!("URI {uri:?}: {e}")))?;
            Ok(Identity::Client(name.to_owned()))
        } else {
            Err(bad(format!(
                "URI {:?} is neither {NODE_URI_PREFIX}<id> nor {CLIENT_URI_PREFIX}<name>",
                uri.chars().take(80).collect::<String>()
            )))
        }
    }
}

/// Whether a URI's scheme is ours, compared case-insensitively as RFC 3986 says, so that a
/// second identity cannot hide behind `QUORUMKV://`.
fn has_our_scheme(uri: &str) -> bool {
    uri.split_once(':')
        .is_some_and(|(scheme, _)| scheme.eq_ignore_ascii_case(URI_SCHEME))
}

/// The application protocol a connection negotiated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// [`CLIENT_ALPN`]: requests from clients (or from nodes acting as clients).
    Client,
    /// [`PEER_ALPN`]: replication traffic between nodes.
    Peer,
}

/// Applies the protocol rule to an authenticated connection: the peer protocol only for
/// node certificates; the client protocol for any certificate the CA signed.
pub fn check_peer(identity: &Identity, alpn: Option<&[u8]>) -> Result<Protocol> {
    match alpn {
        Some(alpn) if alpn == CLIENT_ALPN => Ok(Protocol::Client),
        Some(alpn) if alpn == PEER_ALPN => match identity {
            Identity::Node(_) => Ok(Protocol::Peer),
            Identity::Client(_) => Err(Error::ClientOnPeerProtocol {
                identity: identity.to_string(),
            }),
        },
        Some(alpn) => Err(Error::UnknownAlpn {
            alpn: format!("{:?}", String::from_utf8_lossy(alpn)),
        }),
        None => Err(Error::UnknownAlpn {
            alpn: "(none negotiated)".to_owned(),
        }),
    }
}

/// Holds a node to the id it claims (in its hello): it must be the id in its certificate.
pub fn check_claimed_node(identity: &Identity, claimed: &NodeId) -> Result<()> {
    match identity {
        Identity::Node(id) if id == claimed => Ok(()),
        other => Err(Error::NodeIdMismatch {
            claimed: claimed.to_string(),
            certified: other.to_string(),
        }),
    }
}

/// The identity of the other end of an established connection, from its certificate.
pub fn peer_identity(connection: &quinn::Connection) -> Result<Identity> {
    let chain = connection
        .peer_identity()
        .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
        .ok_or_else(|| Error::PeerIdentity {
            reason: "the connection has no peer certificate".into(),
        })?;
    let end_entity = chain.first().ok_or_else(|| Error::PeerIdentity {
        reason: "the peer sent an empty certificate chain".into(),
    })?;
    Identity::from_certificate_der(end_entity)
}

/// The ALPN protocol an established connection negotiated, if any.
pub fn negotiated_alpn(connection: &quinn::Connection) -> Option<Vec<u8>> {
    connection
        .handshake_data()
        .and_then(|data| data.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|data| data.protocol)
}

/// Everything an accepting node checks once the handshake is done: who the peer is and which
/// protocol it may speak. On error, close the connection with the error's message.
pub fn authenticate(connection: &quinn::Connection) -> Result<(Identity, Protocol)> {
    let identity = peer_identity(connection)?;
    let protocol = check_peer(&identity, negotiated_alpn(connection).as_deref())?;
    Ok((identity, protocol))
}

// ----- building configs -----------------------------------------------------------------------

/// The one crypto provider: ring, TLS 1.3 suites only (see the module documentation).
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls_error(reason: impl fmt::Display) -> Error {
    Error::Tls {
        reason: reason.to_string(),
    }
}

/// Reads every certificate in a PEM file, in order.
pub fn load_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let bad = |reason: String| Error::CertificateFile {
        path: path.to_path_buf(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad(format!("cannot read certificates: {e}")))?
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("cannot parse certificates: {e}")))?;
    if certs.is_empty() {
        return Err(bad("contains no PEM certificate".into()));
    }
    Ok(certs)
}

/// Reads the private key in a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn load_private_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| Error::CertificateFile {
        path: path.to_path_buf(),
        reason: format!("cannot read a PEM private key: {e}"),
    })
}

/// The trust anchors: every certificate in the CA file (several while a CA is rotated).
fn load_roots(ca: &Path) -> Result<Arc<RootCertStore>> {
    let mut roots = RootCertStore::empty();
    for cert in load_certificates(ca)? {
        roots.add(cert).map_err(|e| Error::CertificateFile {
            path: ca.to_path_buf(),
            reason: format!("not a usable CA certificate: {e}"),
        })?;
    }
    Ok(Arc::new(roots))
}

/// Server side of the node's endpoint: this node's certificate, client certificates required
/// and checked against the CA, both ALPNs, TLS 1.3 only, no 0-RTT.
pub fn server_crypto(ca: &Path, cert: &Path, key: &Path) -> Result<rustls::ServerConfig> {
    let provider = provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(load_roots(ca)?, provider.clone())
        .build()
        .map_err(tls_error)?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_error)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certificates(cert)?, load_private_key(key)?)
        .map_err(|e| {
            tls_error(format!(
                "certificate {} with key {}: {e}",
                cert.display(),
                key.display()
            ))
        })?;
    config.alpn_protocols = vec![CLIENT_ALPN.to_vec(), PEER_ALPN.to_vec()];
    config.max_early_data_size = 0;
    Ok(config)
}

/// Dialing side for node-to-node connections: presents this node's certificate, speaks
/// [`PEER_ALPN`]. Dial with the server name [`crate::certs::node_dns_name`] of the peer.
pub fn peer_client_crypto(ca: &Path, cert: &Path, key: &Path) -> Result<rustls::ClientConfig> {
    client_crypto_for(ca, cert, key, PEER_ALPN)
}

/// Dialing side for clients: presents a client (or node) certificate, speaks
/// [`CLIENT_ALPN`]. Dial with a node's DNS name, or [`crate::certs::ANY_NODE_DNS_NAME`].
pub fn client_crypto(ca: &Path, cert: &Path, key: &Path) -> Result<rustls::ClientConfig> {
    client_crypto_for(ca, cert, key, CLIENT_ALPN)
}

fn client_crypto_for(
    ca: &Path,
    cert: &Path,
    key: &Path,
    alpn: &[u8],
) -> Result<rustls::ClientConfig> {
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_error)?
        .with_root_certificates(load_roots(ca)?)
        .with_client_auth_cert(load_certificates(cert)?, load_private_key(key)?)
        .map_err(|e| {
            tls_error(format!(
                "certificate {} with key {}: {e}",
                cert.display(),
                key.display()
            ))
        })?;
    config.alpn_protocols = vec![alpn.to_vec()];
    config.enable_early_data = false;
    Ok(config)
}

/// QUIC transport settings shared by both sides: stream limits from the config, the idle
/// timeout, and keep-alives for the dialing side.
fn transport_config(limits: &Limits, keep_alive: bool) -> quinn::TransportConfig {
    let streams = quinn::VarInt::from_u32(limits.streams_per_connection_max);
    let idle_ms = u32::try_from(IDLE_TIMEOUT.as_millis()).unwrap_or(u32::MAX);
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(streams)
        .max_concurrent_uni_streams(streams)
        .max_idle_timeout(Some(quinn::VarInt::from_u32(idle_ms).into()));
    if keep_alive {
        transport.keep_alive_interval(Some(KEEP_ALIVE_INTERVAL));
    }
    transport
}

/// Wraps [`server_crypto`]'s config for `quinn::Endpoint::server`.
pub fn quic_server_config(
    crypto: rustls::ServerConfig,
    limits: &Limits,
) -> Result<quinn::ServerConfig> {
    let crypto = QuicServerConfig::try_from(crypto).map_err(tls_error)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(transport_config(limits, false)));
    Ok(config)
}

/// Wraps [`peer_client_crypto`]'s or [`client_crypto`]'s config for
/// `quinn::Endpoint::connect_with`.
pub fn quic_client_config(
    crypto: rustls::ClientConfig,
    limits: &Limits,
) -> Result<quinn::ClientConfig> {
    let crypto = QuicClientConfig::try_from(crypto).map_err(tls_error)?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(transport_config(limits, true)));
    Ok(config)
}

/// Checks a node's TLS files before it starts: they load and fit together, the certificate
/// chains to the CA, and it names `node_id`. Without this check a wrong file is discovered
/// only when peers refuse every connection.
pub fn check_node_files(tls: &TlsConfig, node_id: &NodeId) -> Result<()> {
    server_crypto(&tls.ca_cert, &tls.cert, &tls.key)?;
    peer_client_crypto(&tls.ca_cert, &tls.cert, &tls.key)?;
    let chain = load_certificates(&tls.cert)?;
    let (end_entity, intermediates) =
        chain.split_first().ok_or_else(|| Error::CertificateFile {
            path: tls.cert.clone(),
            reason: "contains no PEM certificate".into(),
        })?;
    // The client-certificate verifier is the one peers will apply to this node when it dials
    // them (node certificates carry the client-auth usage), so it is the right judge here.
    let verifier =
        WebPkiClientVerifier::builder_with_provider(load_roots(&tls.ca_cert)?, provider())
            .build()
            .map_err(tls_error)?;
    rustls::server::danger::ClientCertVerifier::verify_client_cert(
        verifier.as_ref(),
        end_entity,
        intermediates,
        UnixTime::now(),
    )
    .map_err(|e| {
        tls_error(format!(
            "{} is not accepted by the CA in {}: {e}",
            tls.cert.display(),
            tls.ca_cert.display()
        ))
    })?;
    match Identity::from_certificate_der(end_entity)? {
        Identity::Node(id) if id == *node_id => Ok(()),
        other => Err(tls_error(format!(
            "{} belongs to {other}, but this is node {node_id}",
            tls.cert.display()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certs::{self, node_dns_name, IfExists, ANY_NODE_DNS_NAME};
    use std::future::{Future, IntoFuture};
    use std::net::SocketAddr;
    use std::path::PathBuf;

    /// Every network step is bounded; a hang is a failure, not a stuck test run.
    const STEP_TIMEOUT: Duration = Duration::from_secs(10);

    async fn within<T>(future: impl Future<Output = T>) -> T {
        tokio::time::timeout(STEP_TIMEOUT, future)
            .await
            .expect("step timed out")
    }

    fn id(value: &str) -> NodeId {
        NodeId::new(value).unwrap()
    }

    /// A CA with nodes n1 and n2 and client alice, in a temporary directory.
    struct Pki {
        dir: tempfile::TempDir,
    }

    impl Pki {
        fn new() -> Pki {
            let dir = tempfile::tempdir().unwrap();
            certs::init_ca(dir.path(), IfExists::Refuse).unwrap();
            for node in ["n1", "n2"] {
                certs::issue_node(dir.path(), &id(node), IfExists::Refuse).unwrap();
            }
            certs::issue_client(dir.path(), "alice", IfExists::Refuse).unwrap();
            Pki { dir }
        }

        fn ca(&self) -> PathBuf {
            certs::ca_paths(self.dir.path()).cert
        }

        fn node(&self, node: &str) -> certs::CertPaths {
            certs::node_paths(self.dir.path(), &id(node))
        }

        fn client(&self, name: &str) -> certs::CertPaths {
            certs::client_paths(self.dir.path(), name)
        }

        fn tls(&self, node: &str) -> TlsConfig {
            let paths = self.node(node);
            TlsConfig {
                ca_cert: self.ca(),
                cert: paths.cert,
                key: paths.key,
                cluster_secret: PathBuf::from("cluster.secret"),
                cluster_secret_previous: Vec::new(),
            }
        }

        /// A listening endpoint serving as node `node`.
        fn server(&self, node: &str) -> (quinn::Endpoint, SocketAddr) {
            let paths = self.node(node);
            let crypto = server_crypto(&self.ca(), &paths.cert, &paths.key).unwrap();
            let config = quic_server_config(crypto, &Limits::default()).unwrap();
            let endpoint = quinn::Endpoint::server(config, "127.0.0.1:0".parse().unwrap()).unwrap();
            let address = endpoint.local_addr().unwrap();
            (endpoint, address)
        }

        fn client_config(&self, crypto: rustls::ClientConfig) -> quinn::ClientConfig {
            quic_client_config(crypto, &Limits::default()).unwrap()
        }
    }

    fn dialer() -> quinn::Endpoint {
        quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap()
    }

    /// Dials and waits for the outcome: a connection, or the handshake error.
    async fn dial(
        config: quinn::ClientConfig,
        address: SocketAddr,
        name: &str,
    ) -> std::result::Result<quinn::Connection, quinn::ConnectionError> {
        let connecting = dialer().connect_with(config, address, name).unwrap();
        within(connecting).await
    }

    /// Accepts one connection and returns the handshake outcome.
    async fn accept_one(
        endpoint: &quinn::Endpoint,
    ) -> std::result::Result<quinn::Connection, quinn::ConnectionError> {
        let incoming = within(endpoint.accept()).await.expect("endpoint open");
        within(incoming.into_future()).await
    }

    /// A client whose handshake is refused by the server may still see its own side
    /// complete (in TLS 1.3 the client finishes before the server has checked its
    /// certificate); either way its connection must end in an error without carrying data.
    async fn client_sees_refusal(
        outcome: std::result::Result<quinn::Connection, quinn::ConnectionError>,
    ) {
        if let Ok(connection) = outcome {
            let reason = within(connection.closed()).await;
            assert!(
                !matches!(reason, quinn::ConnectionError::LocallyClosed),
                "{reason}"
            );
        }
    }

    #[tokio::test]
    async fn a_node_and_a_client_connect_and_exchange_bytes() {
        let pki = Pki::new();
        let (server, address) = pki.server("n1");
        let serve = tokio::spawn(async move {
            let connection = accept_one(&server).await.unwrap();
            let authenticated = authenticate(&connection).unwrap();
            let (mut send, mut recv) = within(connection.accept_bi()).await.unwrap();
            let request = within(recv.read_to_end(1024)).await.unwrap();
            send.write_all(&request).await.unwrap();
            send.finish().unwrap();
            // Keep the connection until the client has read the answer and closed.
            within(connection.closed()).await;
            authenticated
        });
        let alice = pki.client("alice");
        let crypto = client_crypto(&pki.ca(), &alice.cert, &alice.key).unwrap();
        let connection = dial(pki.client_config(crypto), address, ANY_NODE_DNS_NAME)
            .await
            .unwrap();
        assert_eq!(
            peer_identity(&connection).unwrap(),
            Identity::Node(id("n1")),
            "the client learns which node answered"
        );
        let (mut send, mut recv) = within(connection.open_bi()).await.unwrap();
        send.write_all(b"hello, quorum").await.unwrap();
        send.finish().unwrap();
        let echoed = within(recv.read_to_end(1024)).await.unwrap();
        assert_eq!(echoed, b"hello, quorum");
        connection.close(0u32.into(), b"done");
        let (identity, protocol) = within(serve).await.unwrap();
        assert_eq!(identity, Identity::Client("alice".into()));
        assert_eq!(protocol, Protocol::Client);
    }

    #[tokio::test]
    async fn nodes_dial_each_other_by_name_on_the_peer_protocol() {
        let pki = Pki::new();
        let (server, address) = pki.server("n1");
        let n2 = pki.node("n2");
        let crypto = peer_client_crypto(&pki.ca(), &n2.cert, &n2.key).unwrap();
        let name = node_dns_name(&id("n1"));
        let dialing = dial(pki.client_config(crypto), address, &name);
        let (dialed, accepted) = tokio::join!(dialing, accept_one(&server));
        let (_dialed, accepted) = (dialed.unwrap(), accepted.unwrap());
        let (identity, protocol) = authenticate(&accepted).unwrap();
        assert_eq!(
            (identity.clone(), protocol),
            (Identity::Node(id("n2")), Protocol::Peer)
        );
        check_claimed_node(&identity, &id("n2")).unwrap();
        let err = check_claimed_node(&identity, &id("n1")).unwrap_err();
        assert!(matches!(err, Error::NodeIdMismatch { .. }), "{err}");
    }

    #[tokio::test]
    async fn a_certificate_from_another_ca_is_refused_in_the_handshake() {
        let pki = Pki::new();
        let other = tempfile::tempdir().unwrap();
        certs::init_ca(other.path(), IfExists::Refuse).unwrap();
        let mallory = certs::issue_client(other.path(), "alice", IfExists::Refuse).unwrap();
        let (server, address) = pki.server("n1");
        // Mallory trusts our CA (so she accepts the server) but her certificate is not ours.
        let crypto = client_crypto(&pki.ca(), &mallory.cert, &mallory.key).unwrap();
        let dialing = dial(pki.client_config(crypto), address, ANY_NODE_DNS_NAME);
        let (dialed, accepted) = tokio::join!(dialing, accept_one(&server));
        let err = accepted.expect_err("the server must refuse a foreign certificate");
        assert!(
            err.to_string().to_lowercase().contains("certificate"),
            "{err}"
        );
        client_sees_refusal(dialed).await;
    }

    #[tokio::test]
    async fn a_client_without_a_certificate_is_refused_in_the_handshake() {
        let pki = Pki::new();
        let (server, address) = pki.server("n1");
        let mut roots = RootCertStore::empty();
        for cert in load_certificates(&pki.ca()).unwrap() {
            roots.add(cert).unwrap();
        }
        let mut crypto = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        crypto.alpn_protocols = vec![CLIENT_ALPN.to_vec()];
        let dialing = dial(pki.client_config(crypto), address, ANY_NODE_DNS_NAME);
        let (dialed, accepted) = tokio::join!(dialing, accept_one(&server));
        let err = accepted.expect_err("the server must refuse a client without a certificate");
        assert!(err.to_string().contains("no certificates"), "{err}");
        client_sees_refusal(dialed).await;
    }

    #[tokio::test]
    async fn a_client_certificate_on_the_peer_protocol_is_refused() {
        let pki = Pki::new();
        let (server, address) = pki.server("n1");
        let alice = pki.client("alice");
        let mut crypto = client_crypto(&pki.ca(), &alice.cert, &alice.key).unwrap();
        crypto.alpn_protocols = vec![PEER_ALPN.to_vec()];
        let dialing = dial(pki.client_config(crypto), address, ANY_NODE_DNS_NAME);
        let (dialed, accepted) = tokio::join!(dialing, accept_one(&server));
        let (_dialed, accepted) = (dialed.unwrap(), accepted.unwrap());
        assert_eq!(negotiated_alpn(&accepted).as_deref(), Some(PEER_ALPN));
        let err = authenticate(&accepted).unwrap_err();
        assert!(matches!(err, Error::ClientOnPeerProtocol { .. }), "{err}");
        assert!(err.to_string().contains("client alice"), "{err}");
    }

    #[tokio::test]
    async fn dialing_a_node_by_another_nodes_name_fails() {
        let pki = Pki::new();
        let (server, address) = pki.server("n1");
        let n2 = pki.node("n2");
        let crypto = peer_client_crypto(&pki.ca(), &n2.cert, &n2.key).unwrap();
        // n1 answers at the address where n2 expected n3 (or itself): the name check fails.
        let name = node_dns_name(&id("n3"));
        let dialing = dial(pki.client_config(crypto), address, &name);
        let (dialed, _accepted) = tokio::join!(dialing, accept_one(&server));
        let err = dialed.expect_err("n1's certificate does not carry n3's name");
        assert!(err.to_string().contains("certificate"), "{err}");
    }

    #[test]
    fn identities_are_read_from_node_and_client_certificates() {
        let pki = Pki::new();
        let node = load_certificates(&pki.node("n2").cert).unwrap();
        assert_eq!(
            Identity::from_certificate_der(&node[0]).unwrap(),
            Identity::Node(id("n2"))
        );
        let client = load_certificates(&pki.client("alice").cert).unwrap();
        let alice = Identity::from_certificate_der(&client[0]).unwrap();
        assert_eq!(alice, Identity::Client("alice".into()));
        assert_eq!(alice.to_string(), "client alice");
    }

    /// A self-signed certificate with the given URI SANs.
    fn cert_with_uris(uris: &[&str]) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = uris
            .iter()
            .map(|uri| rcgen::SanType::URI((*uri).try_into().unwrap()))
            .collect();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn certificates_without_exactly_one_valid_identity_are_refused() {
        let pki = Pki::new();
        let ca = load_certificates(&pki.ca()).unwrap();
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("CA: no SANs", ca[0].to_vec()),
            ("garbage", b"not a certificate".to_vec()),
            ("truncated", ca[0][..ca[0].len() / 2].to_vec()),
            ("no URI", cert_with_uris(&[])),
            (
                "foreign URI only",
                cert_with_uris(&["https://example.com/n1"]),
            ),
            (
                "two identities",
                cert_with_uris(&["quorumkv://node/n1", "quorumkv://client/x"]),
            ),
            (
                "two identities, one in upper case",
                cert_with_uris(&["quorumkv://node/n1", "QUORUMKV://node/n2"]),
            ),
            ("bad node id", cert_with_uris(&["quorumkv://node/N1"])),
            (
                "bad client name",
                cert_with_uris(&["quorumkv://client/a/b"]),
            ),
            ("unknown kind", cert_with_uris(&["quorumkv://admin/root"])),
        ];
        for (case, der) in cases {
            let err = Identity::from_certificate_der(&der).unwrap_err();
            assert!(matches!(err, Error::PeerIdentity { .. }), "{case}: {err}");
        }
        let other = cert_with_uris(&["https://example.com", "quorumkv://client/bob"]);
        assert_eq!(
            Identity::from_certificate_der(&other).unwrap(),
            Identity::Client("bob".into()),
            "URIs of other schemes are ignored"
        );
    }

    #[test]
    fn the_protocol_rule() {
        let node = Identity::Node(id("n1"));
        let client = Identity::Client("alice".into());
        assert_eq!(check_peer(&node, Some(PEER_ALPN)).unwrap(), Protocol::Peer);
        assert_eq!(
            check_peer(&node, Some(CLIENT_ALPN)).unwrap(),
            Protocol::Client
        );
        assert_eq!(
            check_peer(&client, Some(CLIENT_ALPN)).unwrap(),
            Protocol::Client
        );
        assert!(matches!(
            check_peer(&client, Some(PEER_ALPN)),
            Err(Error::ClientOnPeerProtocol { .. })
        ));
        assert!(matches!(
            check_peer(&node, Some(b"h3")),
            Err(Error::UnknownAlpn { .. })
        ));
        assert!(matches!(
            check_peer(&node, None),
            Err(Error::UnknownAlpn { .. })
        ));
        assert!(matches!(
            check_claimed_node(&client, &id("n1")),
            Err(Error::NodeIdMismatch { .. })
        ));
    }

    #[test]
    fn node_files_are_checked_before_start() {
        let pki = Pki::new();
        check_node_files(&pki.tls("n1"), &id("n1")).unwrap();
        // The certificate of another node.
        let err = check_node_files(&pki.tls("n1"), &id("n2")).unwrap_err();
        assert!(err.to_string().contains("belongs to node n1"), "{err}");
        // A key that does not belong to the certificate.
        let mut mixed = pki.tls("n1");
        mixed.key = pki.node("n2").key;
        assert!(matches!(
            check_node_files(&mixed, &id("n1")),
            Err(Error::Tls { .. })
        ));
        // A certificate from another CA.
        let other = tempfile::tempdir().unwrap();
        certs::init_ca(other.path(), IfExists::Refuse).unwrap();
        let foreign = certs::issue_node(other.path(), &id("n1"), IfExists::Refuse).unwrap();
        let tls = TlsConfig {
            ca_cert: pki.ca(),
            cert: foreign.cert,
            key: foreign.key,
            cluster_secret: PathBuf::from("cluster.secret"),
            cluster_secret_previous: Vec::new(),
        };
        let err = check_node_files(&tls, &id("n1")).unwrap_err();
        assert!(err.to_string().contains("not accepted by the CA"), "{err}");
        // A missing file is named.
        let mut missing = pki.tls("n1");
        missing.ca_cert = pki.dir.path().join("nope.pem");
        let err = check_node_files(&missing, &id("n1")).unwrap_err();
        assert!(
            matches!(err, Error::CertificateFile { ref path, .. } if path.ends_with("nope.pem"))
        );
        // A client certificate is not a node certificate.
        let alice = pki.client("alice");
        let tls = TlsConfig {
            ca_cert: pki.ca(),
            cert: alice.cert,
            key: alice.key,
            cluster_secret: PathBuf::from("cluster.secret"),
            cluster_secret_previous: Vec::new(),
        };
        assert!(check_node_files(&tls, &id("n1")).is_err());
    }
}
