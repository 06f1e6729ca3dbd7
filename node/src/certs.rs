//! The cluster's certificate authority and the certificates it issues.
//!
//! # Why a private CA
//!
//! Every QuorumKV connection is mutual TLS 1.3 over QUIC (see [`crate::tls`]). Both ends prove
//! who they are with a certificate signed by one *cluster CA* that the operator creates with
//! `quorumkv certs init`. Trust is exactly "signed by this CA": no public CA, no system trust
//! store, so a certificate from anywhere else, however valid, opens nothing.
//!
//! # What a certificate says
//!
//! Identity lives in subject alternative names (SANs), never in the subject's common name:
//!
//! - one URI SAN, `quorumkv://node/<id>` for a node ([`node_uri`]) or
//!   `quorumkv://client/<name>` for a client ([`client_uri`]). This is what a node reads out of
//!   a peer's certificate to learn who it talks to ([`crate::tls::Identity`]); a certificate
//!   with no such URI, or with two, identifies nobody and is refused.
//! - for nodes, two DNS SANs: `<id>.node.quorumkv` ([`node_dns_name`]), the name nodes dial
//!   each other by, so that a node's certificate cannot stand in for another node; and
//!   `node.quorumkv` ([`ANY_NODE_DNS_NAME`]), the name a client dials a seed by when it does
//!   not yet know which node is listening there. Nodes never dial by IP address: addresses
//!   change, identities do not.
//!
//! Node certificates allow both TLS server and client authentication (a node accepts
//! connections and dials its peers); client certificates allow client authentication only, so
//! a client certificate can never serve as a node.
//!
//! # Files
//!
//! In one directory: `ca.pem` / `ca.key` (the CA), `cluster.secret` (the cluster secret, see
//! below), `node-<id>.pem` / `node-<id>.key`, `client-<name>.pem` / `client-<name>.key`. Keys
//! are PKCS#8 PEM, written with mode 0600 on Unix.
//!
//! # The cluster secret
//!
//! `cluster.secret` holds 32 random bytes as 64 hex digits and a newline, mode 0600. Every node
//! loads it (`tls.cluster_secret`) and seals the context tokens it hands to clients with it
//! ([`crate::version_vector::ContextKeys`]); clients never need it, and a client that has it
//! can forge contexts, so it is copied to nodes only. [`init_ca`] writes it with the CA;
//! [`write_cluster_secret`] writes one on its own (for a CA made before secrets existed, or a
//! rotation: the old file stays listed in `tls.cluster_secret_previous` until every node has
//! the new one). Keys are ECDSA P-256. The CA is valid for [`CA_VALIDITY_DAYS`], leaves for
//! [`LEAF_VALIDITY_DAYS`]; every certificate starts being valid an hour in the past so that a
//! peer whose clock is slightly behind accepts it at once.
//!
//! # How it fails
//!
//! Nothing is ever overwritten unless the caller passes [`IfExists::Overwrite`]: replacing
//! `ca.key` would orphan every certificate the old CA issued, so the default is to refuse with
//! [`Error::CertificateExists`] naming the file. Issuing loads the CA from the directory and
//! checks that its key matches its certificate ([`Error::Certificate`] otherwise), because
//! certificates signed by the wrong key fail only later, at every handshake. Unreadable or
//! unparsable files are [`Error::CertificateFile`] naming the path.

use crate::error::{Error, Result};
use crate::version_vector::{ClusterSecret, ContextKeys, CLUSTER_SECRET_LEN};
use quorumkv_ring::NodeId;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The URI scheme of identity SANs.
pub const URI_SCHEME: &str = "quorumkv";
/// Prefix of a node's identity URI; the node id follows.
pub const NODE_URI_PREFIX: &str = "quorumkv://node/";
/// Prefix of a client's identity URI; the client name follows.
pub const CLIENT_URI_PREFIX: &str = "quorumkv://client/";
/// The DNS SAN every node certificate carries: the name to dial a node whose id is unknown.
pub const ANY_NODE_DNS_NAME: &str = "node.quorumkv";
/// How long the CA certificate is valid.
pub const CA_VALIDITY_DAYS: u64 = 3650;
/// How long node and client certificates are valid.
pub const LEAF_VALIDITY_DAYS: u64 = 730;
/// Longest client name, the same as a node id: one DNS label.
pub const CLIENT_NAME_LEN_MAX: usize = 63;

/// Certificates start being valid this long before they are issued, for peers whose clocks lag.
const CLOCK_SKEW_ALLOWANCE: Duration = Duration::from_secs(3600);

/// The DNS name a node is dialed by: `<id>.node.quorumkv`.
pub fn node_dns_name(id: &NodeId) -> String {
    format!("{id}.{ANY_NODE_DNS_NAME}")
}

/// The identity URI SAN of a node: `quorumkv://node/<id>`.
pub fn node_uri(id: &NodeId) -> String {
    format!("{NODE_URI_PREFIX}{id}")
}

/// The identity URI SAN of a client: `quorumkv://client/<name>`.
pub fn client_uri(name: &str) -> String {
    format!("{CLIENT_URI_PREFIX}{name}")
}

/// Checks a client name: 1 to 63 lowercase letters, digits, `-` or `_`, not starting or ending
/// with `-`. Names end up in file names and URIs, so nothing that needs escaping is allowed.
pub fn validate_client_name(name: &str) -> Result<()> {
    let reason = if name.is_empty() {
        Some("must not be empty")
    } else if name.len() > CLIENT_NAME_LEN_MAX {
        Some("must be at most 63 characters")
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
    {
        Some("may contain only lowercase letters a-z, digits 0-9, '-' and '_'")
    } else if name.starts_with('-') || name.ends_with('-') {
        Some("must not start or end with '-'")
    } else {
        None
    };
    match reason {
        None => Ok(()),
        Some(reason) => Err(Error::InvalidClientName {
            // Bounded, so that a hostile name cannot make a huge error message.
            name: name.chars().take(80).collect(),
            reason,
        }),
    }
}

/// What to do when a file to be written already exists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IfExists {
    /// Fail with [`Error::CertificateExists`] and write nothing.
    Refuse,
    /// Replace the existing files.
    Overwrite,
}

/// A certificate and its private key, as files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertPaths {
    /// The PEM certificate.
    pub cert: PathBuf,
    /// The PEM (PKCS#8) private key.
    pub key: PathBuf,
}

/// The files of the cluster CA.
pub type CaPaths = CertPaths;
/// The files of an issued node or client certificate.
pub type IssuedPaths = CertPaths;

/// Where the CA lives in `dir`.
pub fn ca_paths(dir: &Path) -> CaPaths {
    CertPaths {
        cert: dir.join("ca.pem"),
        key: dir.join("ca.key"),
    }
}

/// Where node `id`'s certificate lives in `dir`.
pub fn node_paths(dir: &Path, id: &NodeId) -> IssuedPaths {
    CertPaths {
        cert: dir.join(format!("node-{id}.pem")),
        key: dir.join(format!("node-{id}.key")),
    }
}

/// Where client `name`'s certificate lives in `dir` (`name` is not validated here).
pub fn client_paths(dir: &Path, name: &str) -> IssuedPaths {
    CertPaths {
        cert: dir.join(format!("client-{name}.pem")),
        key: dir.join(format!("client-{name}.key")),
    }
}

/// Creates the cluster CA in `dir` (created if missing): `ca.pem` and `ca.key`.
pub fn init_ca(dir: &Path, if_exists: IfExists) -> Result<CaPaths> {
    let paths = ca_paths(dir);
    refuse_existing(&paths, if_exists)?;
    let key = KeyPair::generate().map_err(cert_error)?;
    let mut params = CertificateParams::default();
    // A name of its own per CA, so that a certificate from another QuorumKV cluster fails as
    // "unknown issuer" (clearer than a bad signature) and operators can tell CAs apart.
    let tag = blake3::hash(key.public_key_raw()).to_hex();
    params.distinguished_name = distinguished_name(&format!("QuorumKV cluster CA {}", &tag[..12]));
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    set_validity(&mut params, CA_VALIDITY_DAYS)?;
    let cert = params.self_signed(&key).map_err(cert_error)?;
    create_dir(dir)?;
    write_pair(&paths, &cert.pem(), &key.serialize_pem(), if_exists)?;
    let secret = cluster_secret_path(dir);
    // A secret that already exists is kept unless overwriting was asked for: it is not tied
    // to the CA, and replacing it would refuse every context clients hold.
    if if_exists == IfExists::Overwrite || !secret.exists() {
        write_cluster_secret(&secret, if_exists)?;
    }
    Ok(paths)
}

/// The file name of the cluster secret in a certificate directory.
pub const CLUSTER_SECRET_FILE: &str = "cluster.secret";

/// Where the cluster secret lives in `dir`.
pub fn cluster_secret_path(dir: &Path) -> PathBuf {
    dir.join(CLUSTER_SECRET_FILE)
}

/// Writes a new random cluster secret to `path` (mode 0600; the directory is created, mode
/// 0700, if missing). Refuses to replace an existing file unless `if_exists` says so.
pub fn write_cluster_secret(path: &Path, if_exists: IfExists) -> Result<ClusterSecret> {
    if if_exists == IfExists::Refuse && path.exists() {
        return Err(Error::CertificateExists {
            path: path.to_path_buf(),
        });
    }
    let mut bytes = [0u8; CLUSTER_SECRET_LEN];
    rand::TryRngCore::try_fill_bytes(&mut rand::rngs::OsRng, &mut bytes)
        .map_err(|e| cert_error(format!("the OS random generator failed: {e}")))?;
    let secret = ClusterSecret::from_bytes(bytes);
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        create_dir(parent)?;
    }
    let mut text = String::with_capacity(2 * CLUSTER_SECRET_LEN + 1);
    for byte in secret.as_bytes() {
        text.push_str(&format!("{byte:02x}"));
    }
    text.push('\n');
    write_file(path, &text, 0o600, if_exists)?;
    Ok(secret)
}

/// Reads a cluster secret file: exactly 64 hex digits, surrounding whitespace ignored. A file
/// that others may read is loaded, with a warning: whoever reads it can forge contexts.
pub fn load_cluster_secret(path: &Path) -> Result<ClusterSecret> {
    let bad = |reason: String| Error::CertificateFile {
        path: path.to_path_buf(),
        reason,
    };
    let text = fs::read_to_string(path).map_err(|e| {
        bad(format!(
            "cannot read the cluster secret: {e} (`quorumkv certs secret` writes one)"
        ))
    })?;
    let hex = text.trim().as_bytes();
    if hex.len() != 2 * CLUSTER_SECRET_LEN {
        return Err(bad(format!(
            "a cluster secret is {} hex digits; this file holds {} characters",
            2 * CLUSTER_SECRET_LEN,
            hex.len()
        )));
    }
    let mut bytes = [0u8; CLUSTER_SECRET_LEN];
    for (byte, pair) in bytes.iter_mut().zip(hex.chunks_exact(2)) {
        let digits = std::str::from_utf8(pair).ok();
        *byte = digits
            .and_then(|d| u8::from_str_radix(d, 16).ok())
            .ok_or_else(|| bad("a cluster secret holds hex digits only".into()))?;
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = fs::metadata(path) {
            if meta.permissions().mode() & 0o077 != 0 {
                tracing::warn!(
                    path = %path.display(),
                    "the cluster secret is readable by other users; whoever reads it can forge \
                     client contexts (chmod 600 it)"
                );
            }
        }
    }
    Ok(ClusterSecret::from_bytes(bytes))
}

/// Loads the current cluster secret and every previous one a node's configuration names.
pub fn load_context_keys(tls: &crate::config::TlsConfig) -> Result<ContextKeys> {
    let current = load_cluster_secret(&tls.cluster_secret)?;
    let previous = tls
        .cluster_secret_previous
        .iter()
        .map(PathBuf::as_path)
        .map(load_cluster_secret)
        .collect::<Result<Vec<_>>>()?;
    Ok(ContextKeys::new(current, previous))
}

/// Issues a node certificate for `id`, signed by the CA in `dir`: files `node-<id>.pem/.key`.
pub fn issue_node(dir: &Path, id: &NodeId, if_exists: IfExists) -> Result<IssuedPaths> {
    let paths = node_paths(dir, id);
    refuse_existing(&paths, if_exists)?;
    let sans = vec![
        SanType::URI(ia5(node_uri(id))?),
        SanType::DnsName(ia5(node_dns_name(id))?),
        SanType::DnsName(ia5(ANY_NODE_DNS_NAME.to_owned())?),
    ];
    let usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    issue(dir, &paths, &format!("node {id}"), sans, usages, if_exists)?;
    Ok(paths)
}

/// Issues a client certificate for `name`, signed by the CA in `dir`: files
/// `client-<name>.pem/.key`. Client certificates allow TLS client authentication only.
pub fn issue_client(dir: &Path, name: &str, if_exists: IfExists) -> Result<IssuedPaths> {
    validate_client_name(name)?;
    let paths = client_paths(dir, name);
    refuse_existing(&paths, if_exists)?;
    let sans = vec![SanType::URI(ia5(client_uri(name))?)];
    let usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    issue(
        dir,
        &paths,
        &format!("client {name}"),
        sans,
        usages,
        if_exists,
    )?;
    Ok(paths)
}

/// Signs a fresh key's certificate with the CA in `dir` and writes both to `paths`.
fn issue(
    dir: &Path,
    paths: &CertPaths,
    common_name: &str,
    sans: Vec<SanType>,
    usages: Vec<ExtendedKeyUsagePurpose>,
    if_exists: IfExists,
) -> Result<()> {
    let ca = ca_paths(dir);
    let ca_cert_pem = read_text(&ca.cert)?;
    let ca_key = KeyPair::from_pem(&read_text(&ca.key)?).map_err(|e| Error::CertificateFile {
        path: ca.key.clone(),
        reason: format!("not a usable private key: {e}"),
    })?;
    check_key_matches(&ca.cert, &ca_cert_pem, &ca_key)?;
    let issuer =
        Issuer::from_ca_cert_pem(&ca_cert_pem, ca_key).map_err(|e| Error::CertificateFile {
            path: ca.cert.clone(),
            reason: format!("not a usable CA certificate: {e}"),
        })?;

    let key = KeyPair::generate().map_err(cert_error)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = distinguished_name(common_name);
    params.subject_alt_names = sans;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = usages;
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params, LEAF_VALIDITY_DAYS)?;
    let cert = params.signed_by(&key, &issuer).map_err(cert_error)?;
    write_pair(paths, &cert.pem(), &key.serialize_pem(), if_exists)
}

/// Refuses early, before any key is generated, when a target file exists.
fn refuse_existing(paths: &CertPaths, if_exists: IfExists) -> Result<()> {
    if if_exists == IfExists::Refuse {
        for path in [&paths.cert, &paths.key] {
            if path.exists() {
                return Err(Error::CertificateExists { path: path.clone() });
            }
        }
    }
    Ok(())
}

/// A CA whose key does not match its certificate would issue certificates that fail every
/// handshake; say so now, naming the file, rather than at the first connection.
fn check_key_matches(cert_path: &Path, cert_pem: &str, key: &KeyPair) -> Result<()> {
    let bad = |reason: String| Error::CertificateFile {
        path: cert_path.to_path_buf(),
        reason,
    };
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
        .map_err(|e| bad(format!("not a PEM certificate: {e}")))?;
    let cert = pem
        .parse_x509()
        .map_err(|e| bad(format!("not an X.509 certificate: {e}")))?;
    if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err(Error::Certificate {
            reason: format!(
                "the CA key does not belong to the CA certificate {}",
                cert_path.display()
            ),
        });
    }
    Ok(())
}

fn distinguished_name(common_name: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, "QuorumKV");
    name.push(DnType::CommonName, common_name);
    name
}

/// Valid from a little before now until `days` from now.
fn set_validity(params: &mut CertificateParams, days: u64) -> Result<()> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|_| cert_error("the system clock is before 1970"))?;
    let not_before = now.saturating_sub(CLOCK_SKEW_ALLOWANCE);
    let not_after = now.saturating_add(Duration::from_secs(days * 86_400));
    // rcgen takes `time::OffsetDateTime`; x509-parser (already a dependency, and built on the
    // same `time`) converts a Unix timestamp into one, which spares a direct `time` dependency.
    params.not_before = asn1_time(not_before)?.to_datetime();
    params.not_after = asn1_time(not_after)?.to_datetime();
    Ok(())
}

fn asn1_time(since_epoch: Duration) -> Result<x509_parser::time::ASN1Time> {
    let secs = i64::try_from(since_epoch.as_secs()).map_err(|_| cert_error("time out of range"))?;
    x509_parser::time::ASN1Time::from_timestamp(secs)
        .map_err(|e| cert_error(format!("time out of range: {e}")))
}

fn ia5(value: String) -> Result<rcgen::string::Ia5String> {
    value
        .clone()
        .try_into()
        .map_err(|e| cert_error(format!("{value:?} cannot be a SAN: {e}")))
}

fn cert_error(reason: impl std::fmt::Display) -> Error {
    Error::Certificate {
        reason: reason.to_string(),
    }
}

fn read_text(path: &Path) -> Result<String> {
    fs::read_to_string(path).map_err(|e| Error::CertificateFile {
        path: path.to_path_buf(),
        reason: format!("cannot read: {e}"),
    })
}

fn create_dir(dir: &Path) -> Result<()> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        // The directory holds the CA key: keep it private to the owner when we create it.
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir).map_err(|e| Error::CertificateFile {
        path: dir.to_path_buf(),
        reason: format!("cannot create directory: {e}"),
    })
}

/// Writes the key first, then the certificate: a certificate on disk always has its key.
fn write_pair(paths: &CertPaths, cert_pem: &str, key_pem: &str, if_exists: IfExists) -> Result<()> {
    write_file(&paths.key, key_pem, 0o600, if_exists)?;
    write_file(&paths.cert, cert_pem, 0o644, if_exists)
}

/// Writes a new file with `mode` (on Unix). With [`IfExists::Refuse`] the file is created
/// exclusively, so a file that appeared since the early check is still not overwritten; with
/// [`IfExists::Overwrite`] an old file is removed first, so the new one gets `mode` even if
/// the old one was readable by others.
fn write_file(path: &Path, contents: &str, mode: u32, if_exists: IfExists) -> Result<()> {
    let io_error = |what: &str, e: std::io::Error| Error::CertificateFile {
        path: path.to_path_buf(),
        reason: format!("cannot {what}: {e}"),
    };
    if if_exists == IfExists::Overwrite {
        match fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error("remove the old file", e)),
        }
    }
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            Error::CertificateExists {
                path: path.to_path_buf(),
            }
        } else {
            io_error("create", e)
        }
    })?;
    file.write_all(contents.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| io_error("write", e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::extensions::GeneralName;

    fn id(value: &str) -> NodeId {
        NodeId::new(value).unwrap()
    }

    /// SANs of the certificate in a PEM file, as (kind, value) strings.
    fn sans(path: &Path) -> Vec<(String, String)> {
        let pem = fs::read(path).unwrap();
        let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
        let cert = pem.parse_x509().unwrap();
        let san = cert.subject_alternative_name().unwrap().unwrap();
        san.value
            .general_names
            .iter()
            .map(|name| match name {
                GeneralName::DNSName(v) => ("dns".to_owned(), v.to_string()),
                GeneralName::URI(v) => ("uri".to_owned(), v.to_string()),
                other => ("other".to_owned(), format!("{other:?}")),
            })
            .collect()
    }

    #[test]
    fn names() {
        let n = id("n1");
        assert_eq!(node_dns_name(&n), "n1.node.quorumkv");
        assert_eq!(node_uri(&n), "quorumkv://node/n1");
        assert_eq!(client_uri("alice"), "quorumkv://client/alice");
        assert!(node_uri(&n).starts_with(&format!("{URI_SCHEME}://")));
    }

    #[test]
    fn client_names_are_validated() {
        for ok in ["alice", "a", "bench_1", "ops-team", &"a".repeat(63)] {
            validate_client_name(ok).unwrap();
        }
        for bad in [
            "",
            "Alice",
            "a/b",
            "a.b",
            "-a",
            "a-",
            "a b",
            &"a".repeat(64),
        ] {
            let err = validate_client_name(bad).unwrap_err();
            assert!(matches!(err, Error::InvalidClientName { .. }), "{bad}");
        }
    }

    #[test]
    fn ca_and_leaves_carry_the_expected_names_and_private_keys() {
        let dir = tempfile::tempdir().unwrap();
        let ca = init_ca(dir.path(), IfExists::Refuse).unwrap();
        assert_eq!(ca, ca_paths(dir.path()));
        let node = issue_node(dir.path(), &id("n1"), IfExists::Refuse).unwrap();
        assert_eq!(node.cert, dir.path().join("node-n1.pem"));
        assert_eq!(
            sans(&node.cert),
            vec![
                ("uri".into(), "quorumkv://node/n1".into()),
                ("dns".into(), "n1.node.quorumkv".into()),
                ("dns".into(), "node.quorumkv".into()),
            ]
        );
        let client = issue_client(dir.path(), "alice", IfExists::Refuse).unwrap();
        assert_eq!(client.key, dir.path().join("client-alice.key"));
        assert_eq!(
            sans(&client.cert),
            vec![("uri".into(), "quorumkv://client/alice".into())]
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for key in [&ca.key, &node.key, &client.key] {
                let mode = fs::metadata(key).unwrap().permissions().mode();
                assert_eq!(mode & 0o777, 0o600, "{}", key.display());
            }
        }
    }

    #[test]
    fn leaves_have_the_right_usages_and_validity() {
        let dir = tempfile::tempdir().unwrap();
        init_ca(dir.path(), IfExists::Refuse).unwrap();
        let node = issue_node(dir.path(), &id("n1"), IfExists::Refuse).unwrap();
        let client = issue_client(dir.path(), "c", IfExists::Refuse).unwrap();
        for (paths, server_auth) in [(&node, true), (&client, false)] {
            let pem = fs::read(&paths.cert).unwrap();
            let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
            let cert = pem.parse_x509().unwrap();
            let eku = cert.extended_key_usage().unwrap().unwrap().value;
            assert_eq!(eku.server_auth, server_auth);
            assert!(eku.client_auth);
            assert!(!cert.is_ca());
            assert!(cert.validity().is_valid());
            let days = (cert.validity().not_after.timestamp()
                - cert.validity().not_before.timestamp())
                / 86_400;
            assert!((LEAF_VALIDITY_DAYS as i64..=LEAF_VALIDITY_DAYS as i64 + 1).contains(&days));
        }
    }

    #[test]
    fn refuses_to_overwrite_unless_asked() {
        let dir = tempfile::tempdir().unwrap();
        let ca = init_ca(dir.path(), IfExists::Refuse).unwrap();
        let before = fs::read(&ca.key).unwrap();
        let err = init_ca(dir.path(), IfExists::Refuse).unwrap_err();
        let Error::CertificateExists { ref path } = err else {
            panic!("expected CertificateExists, got {err}");
        };
        assert!(*path == ca.cert || *path == ca.key, "{}", path.display());
        assert!(err.to_string().contains("refusing to overwrite"));
        assert_eq!(
            fs::read(&ca.key).unwrap(),
            before,
            "the CA key is untouched"
        );
        init_ca(dir.path(), IfExists::Overwrite).unwrap();
        assert_ne!(fs::read(&ca.key).unwrap(), before, "a new CA was written");

        issue_node(dir.path(), &id("n1"), IfExists::Refuse).unwrap();
        assert!(matches!(
            issue_node(dir.path(), &id("n1"), IfExists::Refuse),
            Err(Error::CertificateExists { .. })
        ));
        issue_node(dir.path(), &id("n1"), IfExists::Overwrite).unwrap();
    }

    #[test]
    fn issuing_without_a_ca_names_the_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let err = issue_node(dir.path(), &id("n1"), IfExists::Refuse).unwrap_err();
        assert!(matches!(err, Error::CertificateFile { ref path, .. } if path.ends_with("ca.pem")));
        assert!(!dir.path().join("node-n1.key").exists());
    }

    #[test]
    fn a_ca_key_that_does_not_match_its_certificate_is_refused() {
        let one = tempfile::tempdir().unwrap();
        let two = tempfile::tempdir().unwrap();
        init_ca(one.path(), IfExists::Refuse).unwrap();
        let other = init_ca(two.path(), IfExists::Refuse).unwrap();
        fs::copy(&other.key, one.path().join("ca.key")).unwrap();
        let err = issue_client(one.path(), "alice", IfExists::Refuse).unwrap_err();
        assert!(matches!(err, Error::Certificate { .. }), "{err}");
    }

    #[test]
    fn init_writes_a_private_cluster_secret_that_loads_and_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        init_ca(dir.path(), IfExists::Refuse).unwrap();
        let path = cluster_secret_path(dir.path());
        let secret = load_cluster_secret(&path).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{mode:o}");
        }
        // Writing again without --force is refused; the secret is unchanged.
        let err = write_cluster_secret(&path, IfExists::Refuse).unwrap_err();
        assert!(matches!(err, Error::CertificateExists { .. }), "{err}");
        assert_eq!(load_cluster_secret(&path).unwrap(), secret);
        // A new one is another secret.
        let other =
            write_cluster_secret(&dir.path().join("next.secret"), IfExists::Refuse).unwrap();
        assert_ne!(other, secret);
    }

    #[test]
    fn a_missing_or_malformed_secret_names_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("cluster.secret");
        let err = load_cluster_secret(&missing).unwrap_err();
        assert!(err.to_string().contains("cluster.secret"), "{err}");
        for bad in ["", "abc", &"zz".repeat(32), &"00".repeat(33)] {
            fs::write(&missing, bad).unwrap();
            let err = load_cluster_secret(&missing).unwrap_err();
            assert!(
                matches!(err, Error::CertificateFile { .. }),
                "{bad:?}: {err}"
            );
        }
        fs::write(&missing, format!("  {}\n", "0a".repeat(32))).unwrap();
        assert_eq!(
            load_cluster_secret(&missing).unwrap(),
            ClusterSecret::from_bytes([10; CLUSTER_SECRET_LEN])
        );
    }
}
