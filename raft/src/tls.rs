//! TLS configuration and peer identity for keel.
//!
//! Every party in a cluster holds a certificate from the one cluster CA, and the
//! certificate names its holder with a `keel://` URI SAN: `keel://node/<id>` for
//! a cluster node, `keel://client/<name>` for a gateway and `keel://admin/<name>`
//! for an operator. This module loads that material, builds rustls configs for the
//! Raft peer port, the client API port and outgoing connections, and reads the
//! identity of the party on the other end of a connection. The peer port must
//! never accept a non-node certificate: a valid certificate from the right CA is
//! not enough, because that is how Consul and Nomad let any client certificate act
//! as a server (CVE-2021-37219), so the role check runs inside the handshake.
//! Only TLS 1.2 and 1.3 are enabled, and rustls implements nothing older, so TLS
//! 1.1 and below cannot be negotiated at all.

use std::fmt;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, RootCertStore, SignatureScheme,
    SupportedProtocolVersion,
};

/// The protocol versions keel speaks: TLS 1.3 first, then TLS 1.2.
static VERSIONS: &[&SupportedProtocolVersion] = &[&rustls::version::TLS13, &rustls::version::TLS12];

/// The URI scheme of keel identities.
const SCHEME: &str = "keel";

/// The role and name of a party in the cluster, as carried by its certificate.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Identity {
    /// A cluster node with its Raft node id (`keel://node/<id>`).
    Node(u64),
    /// A gateway or other client (`keel://client/<name>`).
    Client(String),
    /// An operator with admin rights (`keel://admin/<name>`).
    Admin(String),
}

impl Identity {
    /// Returns true only for an admin identity.
    pub fn is_admin(&self) -> bool {
        matches!(self, Identity::Admin(_))
    }

    /// Returns the node id of a node identity and `None` for anything else.
    pub fn node_id(&self) -> Option<u64> {
        match self {
            Identity::Node(id) => Some(*id),
            _ => None,
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::Node(id) => write!(f, "node/{id}"),
            Identity::Client(name) => write!(f, "client/{name}"),
            Identity::Admin(name) => write!(f, "admin/{name}"),
        }
    }
}

/// An error while loading TLS material, building a config or reading an identity.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    /// A file is not well-formed PEM.
    #[error("malformed PEM in {}: {source}", path.display())]
    Pem { path: PathBuf, source: std::io::Error },
    /// A file that should hold certificates holds none.
    #[error("no CERTIFICATE block in {}", path.display())]
    NoCertificate { path: PathBuf },
    /// A file that should hold a private key holds none.
    #[error("no PRIVATE KEY block in {}", path.display())]
    NoPrivateKey { path: PathBuf },
    /// A CA certificate was rejected as a trust anchor.
    #[error("unusable CA certificate in {}: {source}", path.display())]
    BadCa { path: PathBuf, source: rustls::Error },
    /// The private key cannot be used, or does not belong to the certificate.
    #[error("key {} does not fit certificate {}: {source}", key.display(), cert.display())]
    KeyMismatch {
        cert: PathBuf,
        key: PathBuf,
        source: rustls::Error,
    },
    /// rustls refused to build a configuration.
    #[error("cannot build TLS config: {0}")]
    Config(String),
    /// A certificate could not be parsed as X.509.
    #[error("cannot parse certificate: {0}")]
    Parse(String),
    /// A certificate carries no `keel://` URI SAN.
    #[error("certificate carries no keel:// identity (URI SAN)")]
    NoIdentity,
    /// A `keel://` URI SAN is not one of the three accepted forms.
    #[error("malformed keel identity {uri:?}: {reason}")]
    MalformedIdentity { uri: String, reason: &'static str },
    /// A certificate carries more than one `keel://` URI SAN.
    #[error("certificate carries more than one keel:// identity ({first:?} and {second:?})")]
    AmbiguousIdentity { first: String, second: String },
    /// A valid certificate was presented on the peer port by something other than a node.
    #[error("{0} may not connect to the peer port: only node certificates are accepted")]
    NotANode(Identity),
}

/// Paths of one party's TLS material.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The cluster CA certificate (PEM).
    pub ca: PathBuf,
    /// Our certificate, optionally followed by intermediates (PEM).
    pub cert: PathBuf,
    /// Our private key (PEM, PKCS#8, SEC1 or PKCS#1).
    pub key: PathBuf,
}

/// Loaded TLS material of one party; cloning it is cheap.
#[derive(Clone)]
pub struct TlsMaterial {
    provider: Arc<CryptoProvider>,
    roots: Arc<RootCertStore>,
    certified: Arc<CertifiedKey>,
}

impl fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("roots", &self.roots.len())
            .field("identity", &self.identity().ok())
            .finish_non_exhaustive()
    }
}

impl TlsMaterial {
    /// Reads the CA, certificate and key PEM files; every error names the file at fault.
    pub fn load(files: &TlsFiles) -> Result<Self, TlsError> {
        let read = |path: &Path| {
            std::fs::read(path).map_err(|source| TlsError::Read {
                path: path.to_owned(),
                source,
            })
        };
        Self::from_pem(files, &read(&files.ca)?, &read(&files.cert)?, &read(&files.key)?)
    }

    /// Builds the material from PEM bytes; `files` only names the sources in errors.
    fn from_pem(files: &TlsFiles, ca: &[u8], cert: &[u8], key: &[u8]) -> Result<Self, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        for ca_cert in pem_certs(&files.ca, ca)? {
            roots.add(ca_cert).map_err(|source| TlsError::BadCa {
                path: files.ca.clone(),
                source,
            })?;
        }
        let chain = pem_certs(&files.cert, cert)?;
        let key_der = rustls_pemfile::private_key(&mut BufReader::new(key))
            .map_err(|source| TlsError::Pem {
                path: files.key.clone(),
                source,
            })?
            .ok_or_else(|| TlsError::NoPrivateKey {
                path: files.key.clone(),
            })?;
        let certified = CertifiedKey::from_der(chain, key_der, &provider).map_err(|source| TlsError::KeyMismatch {
            cert: files.cert.clone(),
            key: files.key.clone(),
            source,
        })?;
        Ok(Self {
            provider,
            roots: Arc::new(roots),
            certified: Arc::new(certified),
        })
    }

    /// Returns the identity carried by our own certificate.
    pub fn identity(&self) -> Result<Identity, TlsError> {
        let leaf = self.certified.cert.first().ok_or(TlsError::NoIdentity)?;
        identity_from_der(leaf)
    }

    /// Builds the server config of the peer (Raft) port.
    ///
    /// A client certificate is required, must chain to the cluster CA and must carry a
    /// `keel://node/<id>` identity; client and admin certificates are refused during the
    /// handshake. ALPN offers h2 only. Session resumption is off, so every connection goes
    /// through that check afresh and no session from another config can be resumed here.
    pub fn peer_server_config(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        self.server_config(true, vec![b"h2".to_vec()])
    }

    /// Builds the server config of the client API port.
    ///
    /// A client certificate is optional at the TLS layer (so orchestrator probes can connect),
    /// but one that is presented must chain to the cluster CA and carry a keel identity of any
    /// role; the API refuses every non-probe request made without one. ALPN offers h2 and
    /// http/1.1.
    pub fn api_server_config(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        self.server_config(false, vec![b"h2".to_vec(), b"http/1.1".to_vec()])
    }

    /// Builds a client config that presents our certificate and trusts only the cluster CA.
    ///
    /// With `alpn_h2_only` (peer connections) ALPN offers h2 only, otherwise h2 and http/1.1.
    pub fn client_config(&self, alpn_h2_only: bool) -> Result<Arc<rustls::ClientConfig>, TlsError> {
        let mut config = rustls::ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(VERSIONS)
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_root_certificates(self.roots.clone())
            .with_client_cert_resolver(Arc::new(SingleCertAndKey::from(self.certified.clone())));
        config.alpn_protocols = if alpn_h2_only {
            vec![b"h2".to_vec()]
        } else {
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        };
        Ok(Arc::new(config))
    }

    fn server_config(&self, nodes_only: bool, alpn: Vec<Vec<u8>>) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let inner = WebPkiClientVerifier::builder_with_provider(self.roots.clone(), self.provider.clone())
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let verifier = Arc::new(KeelClientVerifier { inner, nodes_only });
        let mut config = rustls::ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(VERSIONS)
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(SingleCertAndKey::from(self.certified.clone())));
        config.alpn_protocols = alpn;
        if nodes_only {
            // A resumed session skips the client verifier: never resume on the peer port.
            config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
            config.send_tls13_tickets = 0;
        }
        Ok(Arc::new(config))
    }
}

fn pem_certs(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = rustls_pemfile::certs(&mut BufReader::new(pem))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            path: path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { path: path.to_owned() });
    }
    Ok(certs)
}

/// Client certificate verifier: WebPKI chain validation, then the keel identity check.
#[derive(Debug)]
struct KeelClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    nodes_only: bool,
}

impl ClientCertVerifier for KeelClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        // The peer port always demands a certificate. The API port lets
        // probes (`/livez`, `/readyz`) in without one; every other API route
        // refuses a request that came without a certificate (401).
        self.nodes_only
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        // Chain, validity period and clientAuth EKU first; the identity only counts after.
        self.inner.verify_client_cert(end_entity, intermediates, now)?;
        let refuse = |e: TlsError| {
            let e = Arc::new(Refusal(e));
            rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(e)))
        };
        match identity_from_der(end_entity).map_err(refuse)? {
            Identity::Node(_) => Ok(ClientCertVerified::assertion()),
            _ if !self.nodes_only => Ok(ClientCertVerified::assertion()),
            other => Err(refuse(TlsError::NotANode(other))),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Why a client certificate was refused; rustls shows it with `Debug`, so that prints the
/// message too and the server's handshake error reads as a sentence.
struct Refusal(TlsError);

impl fmt::Debug for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl std::error::Error for Refusal {}

/// Returns the identity carried by a DER certificate, its one `keel://` URI SAN.
///
/// It is an error if the certificate has no such SAN, if the SAN is malformed, or if it
/// has two (an ambiguous certificate is never trusted to mean the first one).
pub fn identity_from_der(der: &[u8]) -> Result<Identity, TlsError> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| TlsError::Parse(e.to_string()))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| TlsError::Parse(e.to_string()))?;
    let mut found: Option<(&str, Identity)> = None;
    for name in san.iter().flat_map(|ext| ext.value.general_names.iter()) {
        let GeneralName::URI(uri) = name else {
            continue;
        };
        let Some(identity) = parse_identity_uri(uri)? else {
            continue;
        };
        if let Some((first, _)) = found {
            return Err(TlsError::AmbiguousIdentity {
                first: first.into(),
                second: (*uri).into(),
            });
        }
        found = Some((uri, identity));
    }
    found.map(|(_, identity)| identity).ok_or(TlsError::NoIdentity)
}

/// Parses a URI SAN; `Ok(None)` means it is not a keel URI at all.
fn parse_identity_uri(uri: &str) -> Result<Option<Identity>, TlsError> {
    let Some((scheme, rest)) = uri.split_once(':') else {
        return Ok(None);
    };
    if !scheme.eq_ignore_ascii_case(SCHEME) {
        return Ok(None);
    }
    let bad = |reason| {
        Err(TlsError::MalformedIdentity {
            uri: uri.to_owned(),
            reason,
        })
    };
    let Some(path) = rest.strip_prefix("//").filter(|_| scheme == SCHEME) else {
        return bad("expected keel://<role>/<name>");
    };
    let Some((role, name)) = path.split_once('/') else {
        return bad("expected keel://<role>/<name>");
    };
    match role {
        "node" => {
            let canonical = !name.is_empty()
                && name.len() <= 20
                && name.bytes().all(|b| b.is_ascii_digit())
                && (name == "0" || !name.starts_with('0'));
            match name.parse::<u64>() {
                Ok(id) if canonical => Ok(Some(Identity::Node(id))),
                _ => bad("node id must be a decimal u64 without leading zeros"),
            }
        }
        "client" | "admin" if !valid_name(name) => {
            bad("name must be 1 to 64 characters of [A-Za-z0-9._-], not only dots")
        }
        "client" => Ok(Some(Identity::Client(name.to_owned()))),
        "admin" => Ok(Some(Identity::Admin(name.to_owned()))),
        _ => bad("role must be node, client or admin"),
    }
}

/// The rule for client and admin names, shared with `keel cert`.
fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && !name.bytes().all(|b| b == b'.')
}

/// Returns the identity of the peer of an established server-side connection.
///
/// It is read from the first certificate the client presented, and is `None` if there is
/// none or it carries no valid keel identity.
pub fn peer_identity(conn: &rustls::ServerConnection) -> Option<Identity> {
    identity_from_der(conn.peer_certificates()?.first()?).ok()
}

/// Returns the identity of the server of an established client-side connection.
///
/// A client uses it to check that it reached the node id it meant to reach.
pub fn server_identity(conn: &rustls::ClientConnection) -> Option<Identity> {
    identity_from_der(conn.peer_certificates()?.first()?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::ExtendedKeyUsagePurpose::{ClientAuth, ServerAuth};
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};
    use rustls::pki_types::ServerName;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    type Ca = (rcgen::Certificate, KeyPair);
    type Side = Result<Option<Identity>, String>;

    fn ca(name: &str) -> Ca {
        let mut p = CertificateParams::default();
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate().unwrap();
        (p.self_signed(&key).unwrap(), key)
    }

    /// A leaf signed by `ca` with the given URI SANs (node leaves also get serverAuth),
    /// as (cert PEM, key PEM).
    fn leaf(ca: &Ca, uris: &[&str], expired: bool) -> (String, String) {
        let mut p = CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
        let sans = uris.iter().map(|u| SanType::URI((*u).try_into().unwrap()));
        p.subject_alt_names.extend(sans);
        let node = uris.iter().any(|u| u.starts_with("keel://node/"));
        p.extended_key_usages = if node {
            vec![ClientAuth, ServerAuth]
        } else {
            vec![ClientAuth]
        };
        if expired {
            (p.not_before, p.not_after) = (rcgen::date_time_ymd(2020, 1, 1), rcgen::date_time_ymd(2021, 1, 1));
        }
        let key = KeyPair::generate().unwrap();
        (p.signed_by(&key, &ca.0, &ca.1).unwrap().pem(), key.serialize_pem())
    }

    /// Material trusting `trust` and presenting the leaf `(cert, key)`.
    fn material(trust: &Ca, (cert, key): &(String, String)) -> TlsMaterial {
        let f = TlsFiles {
            ca: "ca.pem".into(),
            cert: "me.pem".into(),
            key: "me-key.pem".into(),
        };
        TlsMaterial::from_pem(&f, trust.0.pem().as_bytes(), cert.as_bytes(), key.as_bytes()).unwrap()
    }

    /// A client config with TLS 1.2 only, or with no client certificate at all.
    fn odd_client(m: &TlsMaterial, tls12_only: bool) -> Arc<rustls::ClientConfig> {
        let versions = if tls12_only {
            &[&rustls::version::TLS12][..]
        } else {
            VERSIONS
        };
        let b = rustls::ClientConfig::builder_with_provider(m.provider.clone())
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(m.roots.clone());
        Arc::new(match tls12_only {
            true => b.with_client_cert_resolver(Arc::new(SingleCertAndKey::from(m.certified.clone()))),
            false => b.with_no_client_auth(),
        })
    }

    /// One real handshake over loopback TCP; returns what each side saw. The client only
    /// succeeds once the server's first application bytes arrive, since under TLS 1.3 a
    /// refused client certificate shows on the client side only after its handshake.
    async fn handshake(server: Arc<rustls::ServerConfig>, client: Arc<rustls::ClientConfig>) -> (Side, Side) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server_task = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let accept = tokio_rustls::TlsAcceptor::from(server).accept(tcp);
            let mut tls = accept.await.map_err(|e| e.to_string())?;
            let id = peer_identity(tls.get_ref().1);
            tls.write_all(b"ok").await.map_err(|e| e.to_string())?;
            tls.shutdown().await.map_err(|e| e.to_string())?;
            Ok::<_, String>(id)
        });
        let client_side = async {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let name = ServerName::try_from("localhost").unwrap();
            let connect = tokio_rustls::TlsConnector::from(client).connect(name, tcp);
            let mut tls = connect.await.map_err(|e| e.to_string())?;
            let id = server_identity(tls.get_ref().1);
            tls.read_exact(&mut [0u8; 2]).await.map_err(|e| e.to_string())?;
            Ok::<_, String>(id)
        };
        let limit = std::time::Duration::from_secs(10);
        let client_result = tokio::time::timeout(limit, client_side).await.unwrap();
        let server_result = tokio::time::timeout(limit, server_task).await.unwrap();
        (server_result.unwrap(), client_result)
    }

    async fn refused(server: &Arc<rustls::ServerConfig>, client: Arc<rustls::ClientConfig>) -> String {
        let (s, c) = handshake(server.clone(), client).await;
        assert!(c.is_err(), "client should fail, got {c:?}");
        s.expect_err("server should refuse")
    }

    /// The cluster CA and node 1's material.
    fn cluster() -> (Ca, TlsMaterial) {
        let ca = ca("keel test CA");
        let node1 = material(&ca, &leaf(&ca, &["keel://node/1"], false));
        (ca, node1)
    }

    #[tokio::test]
    async fn peer_port_accepts_a_node_and_both_sides_see_identities() {
        let (ca, node1) = cluster();
        let node2 = material(&ca, &leaf(&ca, &["keel://node/2"], false));
        let seen = handshake(node1.peer_server_config().unwrap(), node2.client_config(true).unwrap()).await;
        assert_eq!(seen, (Ok(Some(Identity::Node(2))), Ok(Some(Identity::Node(1)))));
        assert_eq!(node2.identity().unwrap(), Identity::Node(2));
    }

    #[tokio::test]
    async fn peer_port_refuses_everything_but_a_valid_node_cert() {
        let (ca, node1) = cluster();
        let server = node1.peer_server_config().unwrap();
        for uri in ["keel://client/gw-1", "keel://admin/ops"] {
            let m = material(&ca, &leaf(&ca, &[uri], false));
            let err = refused(&server, m.client_config(true).unwrap()).await;
            assert!(err.contains("may not connect to the peer port"), "{err}");
            // TLS 1.2 rejects at the same point.
            refused(&server, odd_client(&m, true)).await;
        }
        // Trusts our CA, so it gets as far as client auth, but presents a node cert from
        // another CA: one with another name, and an impostor with the very same name.
        for (name, why) in [("other CA", "UnknownIssuer"), ("keel test CA", "BadSignature")] {
            let foreign = material(&ca, &leaf(&self::ca(name), &["keel://node/2"], false));
            let err = refused(&server, foreign.client_config(true).unwrap()).await;
            assert!(err.contains(why), "{err}");
        }
        let expired = material(&ca, &leaf(&ca, &["keel://node/2"], true));
        let err = refused(&server, expired.client_config(true).unwrap()).await;
        assert!(err.contains("expired"), "{err}");
        let err = refused(&server, odd_client(&node1, false)).await;
        assert!(err.contains("no certificates"), "{err}");
    }

    /// TLS 1.1 is impossible by construction: the configs enable only TLS 1.2 and 1.3, and
    /// rustls has no code for anything older. A raw TLS 1.1 ClientHello gets an alert.
    #[tokio::test]
    async fn tls11_client_hello_is_refused() {
        let server = cluster().1.peer_server_config().unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            tokio_rustls::TlsAcceptor::from(server).accept(tcp).await.map(drop)
        });
        // Record header, ClientHello header, version 3.2 (TLS 1.1), zero random, no session
        // id, two suites rustls knows, null compression, and a signature_algorithms extension
        // only, so that the version (no supported_versions) is what gets refused.
        let mut hello = vec![0x16, 0x03, 0x01, 0x00, 0x39, 0x01, 0x00, 0x00, 0x35, 0x03, 0x02];
        hello.extend([0u8; 32]);
        hello.extend([0x00, 0x00, 0x04, 0xc0, 0x2b, 0xc0, 0x2f, 0x01, 0x00]);
        hello.extend([0x00, 0x08, 0x00, 0x0d, 0x00, 0x04, 0x00, 0x02, 0x04, 0x03]);
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tcp.write_all(&hello).await.unwrap();
        let mut reply = Vec::new();
        let read = tcp.read_to_end(&mut reply);
        tokio::time::timeout(std::time::Duration::from_secs(10), read)
            .await
            .unwrap()
            .unwrap();
        // An alert record (21) carrying protocol_version (70).
        assert_eq!((reply.first(), reply.get(6)), (Some(&21), Some(&70)), "{reply:02x?}");
        let err = task.await.unwrap().unwrap_err().to_string();
        assert!(err.contains("Tls12NotOffered"), "{err}");
    }

    #[tokio::test]
    async fn api_port_accepts_any_keel_identity_or_none_but_nothing_else() {
        let (ca, node1) = cluster();
        let server = node1.api_server_config().unwrap();
        for (uri, want) in [
            ("keel://client/gw-1", Identity::Client("gw-1".into())),
            ("keel://admin/ops", Identity::Admin("ops".into())),
            ("keel://node/7", Identity::Node(7)),
        ] {
            let m = material(&ca, &leaf(&ca, &[uri], false));
            let seen = handshake(server.clone(), m.client_config(false).unwrap()).await;
            assert_eq!(seen, (Ok(Some(want)), Ok(Some(Identity::Node(1)))));
        }
        // No certificate: the handshake succeeds with no identity (the API answers 401).
        let seen = handshake(server.clone(), odd_client(&node1, false)).await;
        assert_eq!(seen, (Ok(None), Ok(Some(Identity::Node(1)))));
        let nameless = material(&ca, &leaf(&ca, &[], false));
        let err = refused(&server, nameless.client_config(false).unwrap()).await;
        assert!(err.contains("no keel:// identity"), "{err}");
    }

    /// A full in-memory handshake, tickets included, without sockets.
    fn in_memory(
        client: &Arc<rustls::ClientConfig>,
        server: &Arc<rustls::ServerConfig>,
    ) -> (rustls::ClientConnection, rustls::ServerConnection) {
        let name = ServerName::try_from("localhost").unwrap();
        let mut c = rustls::ClientConnection::new(client.clone(), name).unwrap();
        let mut s = rustls::ServerConnection::new(server.clone()).unwrap();
        for _ in 0..5 {
            let mut buf = Vec::new();
            c.write_tls(&mut buf).unwrap();
            if !buf.is_empty() {
                s.read_tls(&mut buf.as_slice()).unwrap();
                s.process_new_packets().unwrap();
            }
            buf.clear();
            s.write_tls(&mut buf).unwrap();
            if !buf.is_empty() {
                c.read_tls(&mut buf.as_slice()).unwrap();
                c.process_new_packets().unwrap();
            }
        }
        assert!(!c.is_handshaking() && !s.is_handshaking());
        (c, s)
    }

    #[test]
    fn tls13_h2_by_default_and_no_resumption_on_the_peer_port() {
        let (ca, node1) = cluster();
        let m = material(&ca, &leaf(&ca, &["keel://node/2"], false));
        let (peer, api) = (node1.peer_server_config().unwrap(), node1.api_server_config().unwrap());
        let client = m.client_config(false).unwrap();
        let (c, s) = in_memory(&client, &api);
        assert_eq!(s.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
        assert_eq!(s.alpn_protocol(), Some(&b"h2"[..]));
        assert_eq!(
            (peer_identity(&s), server_identity(&c)),
            (Some(Identity::Node(2)), Some(Identity::Node(1)))
        );
        // The API port resumes (showing the check below means something); the peer port never.
        assert_eq!(
            in_memory(&client, &api).1.handshake_kind(),
            Some(rustls::HandshakeKind::Resumed)
        );
        let client = m.client_config(true).unwrap();
        in_memory(&client, &peer);
        let (_, s) = in_memory(&client, &peer);
        assert_eq!(s.handshake_kind(), Some(rustls::HandshakeKind::Full));
        assert_eq!(peer_identity(&s), Some(Identity::Node(2)));
    }

    #[test]
    fn identities_parse_strictly() {
        let ok = |u: &str| parse_identity_uri(u).unwrap();
        assert_eq!(ok("keel://node/0"), Some(Identity::Node(0)));
        assert_eq!(ok(&format!("keel://node/{}", u64::MAX)), Some(Identity::Node(u64::MAX)));
        assert_eq!(ok("keel://client/gw_1.a-b"), Some(Identity::Client("gw_1.a-b".into())));
        assert_eq!(ok("keel://admin/ops"), Some(Identity::Admin("ops".into())));
        assert_eq!((ok("https://a.example/x"), ok("spiffe://keel/node/1")), (None, None));
        let long = format!("keel://client/{}", "a".repeat(65));
        let bad = "keel://node/ keel://node/01 keel://node/+1 keel://node/1/2 keel://node/x \
                   keel://node/18446744073709551616 keel://client/ keel://client/.. keel://operator/x \
                   keel://admin/a/b keel://client/a%20b keel://node keel:node/1 KEEL://node/1";
        for uri in bad.split_whitespace().chain([long.as_str(), "keel://client/a b"]) {
            assert!(parse_identity_uri(uri).is_err(), "{uri} should be malformed");
        }
        let ca = ca("keel test CA");
        let der = |(cert, _): (String, String)| pem_certs(Path::new("t"), cert.as_bytes()).unwrap().remove(0);
        let two = identity_from_der(&der(leaf(&ca, &["keel://client/x", "keel://node/1"], false)));
        assert!(matches!(two, Err(TlsError::AmbiguousIdentity { .. })), "{two:?}");
        let none = identity_from_der(&der(leaf(&ca, &["https://a.example/"], false)));
        assert!(matches!(none, Err(TlsError::NoIdentity)), "{none:?}");
        assert!(matches!(identity_from_der(b"junk"), Err(TlsError::Parse(_))));
    }

    #[test]
    fn identity_helpers_and_display() {
        let ids = [
            Identity::Node(3),
            Identity::Client("gw-1".into()),
            Identity::Admin("ops".into()),
        ];
        let shown: Vec<_> = ids.iter().map(|i| (i.to_string(), i.node_id(), i.is_admin())).collect();
        assert_eq!(
            shown,
            [
                ("node/3".to_owned(), Some(3), false),
                ("client/gw-1".to_owned(), None, false),
                ("admin/ops".to_owned(), None, true),
            ]
        );
    }

    #[test]
    fn load_reads_files_and_names_the_bad_one() {
        let dir = std::env::temp_dir().join(format!("keel-tls-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = ca("keel test CA");
        let (cert, key) = leaf(&ca, &["keel://node/4"], false);
        let f = TlsFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join("n.pem"),
            key: dir.join("n-key.pem"),
        };
        for (path, pem) in [(&f.ca, ca.0.pem()), (&f.cert, cert), (&f.key, key)] {
            std::fs::write(path, pem).unwrap();
        }
        std::fs::write(dir.join("other-key.pem"), leaf(&ca, &[], false).1).unwrap();
        assert_eq!(TlsMaterial::load(&f).unwrap().identity().unwrap(), Identity::Node(4));
        let err = |f: TlsFiles| TlsMaterial::load(&f).unwrap_err().to_string();
        let missing = err(TlsFiles {
            key: dir.join("absent.pem"),
            ..f.clone()
        });
        assert!(
            missing.contains("cannot read") && missing.contains("absent.pem"),
            "{missing}"
        );
        let swapped = err(TlsFiles {
            ca: f.key.clone(),
            ..f.clone()
        });
        assert!(swapped.contains("no CERTIFICATE block in") && swapped.contains("n-key.pem"));
        let keyless = err(TlsFiles {
            key: f.cert.clone(),
            ..f.clone()
        });
        assert!(keyless.contains("no PRIVATE KEY block in") && keyless.contains("n.pem"));
        let mismatch = err(TlsFiles {
            key: dir.join("other-key.pem"),
            ..f.clone()
        });
        assert!(mismatch.contains("does not fit certificate"), "{mismatch}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
