//! TLS for the client: the cluster CA, the client's certificate, and the names nodes answer to.
//!
//! A QuorumKV cluster runs its own certificate authority. Connections are mutually
//! authenticated: the client verifies every node against the cluster CA, and the node verifies
//! the client's certificate against the same CA. Only TLS 1.3 is offered, with rustls' `ring`
//! crypto provider, and 0-RTT is off: a replayed early-data write is exactly the kind of
//! surprise a replicated store should not have.
//!
//! # Server names
//!
//! A node's certificate carries two DNS subject alternative names: `<id>.node.quorumkv`, which
//! binds the certificate to one node id, and `node.quorumkv`, which every node has. The client
//! dials a node whose id it knows (from the cluster's `ClusterInfo`) by
//! [`node_server_name`], so a certificate stolen from one node cannot answer for another, and
//! dials a seed, whose id it does not know yet, by [`SEED_SERVER_NAME`]. No name depends on IP
//! addresses or DNS, so nodes can move without reissuing certificates.
//!
//! # Key material
//!
//! [`TlsIdentity`] holds the three PEM inputs: the CA certificate(s), the client's certificate
//! chain and its private key (PKCS#8, PKCS#1 or SEC1). They are parsed with `rustls-pki-types`'
//! PEM support when the identity is created, so a bad file fails early, as
//! [`Error::Tls`], naming the file.

use crate::error::{Error, Result};
use crate::protocol::CLIENT_ALPN;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::fmt;
use std::path::Path;
use std::sync::Arc;

/// The DNS name every node's certificate carries; used to dial seeds, whose id is unknown.
pub const SEED_SERVER_NAME: &str = "node.quorumkv";

/// The TLS server name of the node with id `id`: `<id>.node.quorumkv`.
pub fn node_server_name(id: &str) -> String {
    format!("{id}.{SEED_SERVER_NAME}")
}

/// The client's TLS identity: the cluster CA to trust and the certificate to present.
pub struct TlsIdentity {
    ca: Vec<CertificateDer<'static>>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl fmt::Debug for TlsIdentity {
    /// Never prints the key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsIdentity")
            .field("ca_certificates", &self.ca.len())
            .field("chain_certificates", &self.chain.len())
            .finish_non_exhaustive()
    }
}

impl Clone for TlsIdentity {
    fn clone(&self) -> Self {
        TlsIdentity {
            ca: self.ca.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl TlsIdentity {
    /// Parses PEM text held in memory: `ca` (one or more CA certificates), `cert` (the client
    /// certificate, optionally followed by intermediates) and `key` (its private key).
    pub fn from_pem(ca: &[u8], cert: &[u8], key: &[u8]) -> Result<TlsIdentity> {
        Ok(TlsIdentity {
            ca: certificates("CA", ca)?,
            chain: certificates("certificate", cert)?,
            key: PrivateKeyDer::from_pem_slice(key).map_err(|e| Error::Tls {
                reason: format!("private key PEM: {e}"),
            })?,
        })
    }

    /// Reads and parses the three PEM files. Errors name the file that failed.
    pub fn from_files(
        ca: impl AsRef<Path>,
        cert: impl AsRef<Path>,
        key: impl AsRef<Path>,
    ) -> Result<TlsIdentity> {
        let (ca, cert, key) = (ca.as_ref(), cert.as_ref(), key.as_ref());
        let ca_pem = read("CA", ca)?;
        let cert_pem = read("certificate", cert)?;
        let key_pem = read("key", key)?;
        TlsIdentity::from_pem(&ca_pem, &cert_pem, &key_pem).map_err(|e| match e {
            Error::Tls { reason } => Error::Tls {
                reason: format!(
                    "{reason} (files: CA {}, certificate {}, key {})",
                    ca.display(),
                    cert.display(),
                    key.display()
                ),
            },
            other => other,
        })
    }

    /// The quinn client configuration: TLS 1.3 only, `ring` provider, client ALPN, no 0-RTT.
    pub(crate) fn quic_client_config(&self) -> Result<quinn::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        for ca in &self.ca {
            roots.add(ca.clone()).map_err(|e| Error::Tls {
                reason: format!("CA certificate unusable: {e}"),
            })?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls_error)?
            .with_root_certificates(roots)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| Error::Tls {
                reason: format!("client certificate or key unusable: {e}"),
            })?;
        tls.alpn_protocols = vec![CLIENT_ALPN.to_vec()];
        tls.enable_early_data = false;
        let quic =
            quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| Error::Tls {
                reason: format!("TLS configuration unusable for QUIC: {e}"),
            })?;
        Ok(quinn::ClientConfig::new(Arc::new(quic)))
    }
}

fn tls_error(e: rustls::Error) -> Error {
    Error::Tls {
        reason: e.to_string(),
    }
}

fn read(what: &str, path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::Tls {
        reason: format!("cannot read {what} file {}: {e}", path.display()),
    })
}

/// Every certificate in a PEM text; at least one.
fn certificates(what: &str, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>> {
    let certificates = CertificateDer::pem_slice_iter(pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::Tls {
            reason: format!("{what} PEM: {e}"),
        })?;
    if certificates.is_empty() {
        return Err(Error::Tls {
            reason: format!("{what} PEM holds no certificate"),
        });
    }
    Ok(certificates)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_bind_the_id() {
        assert_eq!(node_server_name("n1"), "n1.node.quorumkv");
        assert_eq!(SEED_SERVER_NAME, "node.quorumkv");
    }

    #[test]
    fn bad_pem_is_a_tls_error_naming_the_input() {
        let err = TlsIdentity::from_pem(b"not pem", b"", b"").unwrap_err();
        assert!(
            matches!(&err, Error::Tls { reason } if reason.contains("CA")),
            "{err}"
        );
        assert_eq!(crate::exit_code(&err), 2);
    }

    #[test]
    fn missing_files_are_tls_errors_naming_the_file() {
        let err = TlsIdentity::from_files("/nonexistent/ca.pem", "/x", "/y").unwrap_err();
        assert!(
            matches!(&err, Error::Tls { reason } if reason.contains("/nonexistent/ca.pem")),
            "{err}"
        );
    }
}
