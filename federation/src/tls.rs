//! Mutual TLS for the mesh over quinn (rustls on the ring provider, the
//! only one compiled in).
//!
//! Both sides present a certificate issued by the federation CA and verify
//! the other's against it during the handshake, so no application data can
//! flow before both are verified. A dialer knows only an address, not which
//! site answers there, so the client checks the server's chain, validity
//! and ServerAuth usage but no particular name; the peer's site name is then
//! read from its verified certificate with [`peer_site`], never from a
//! message.
//!
//! Every rustls builder gets [`crypto_provider`] explicitly: other crates in
//! the binary may compile a second provider, and rustls refuses to guess a
//! process default when two are present.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::verify_server_cert_signed_by_trust_anchor;
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

use crate::ca::validate_site_name;

/// ALPN of the federation protocol; a peer speaking anything else is
/// refused in the handshake.
pub const ALPN: &[u8] = b"ocmesh-fed/1";

/// The server name a dialer puts in its ClientHello (SNI). It is a fixed
/// placeholder: the server ignores it and the client's verifier does not
/// match it, because the dialer does not know which site it will reach.
pub const SERVER_NAME: &str = "ocmesh-peer";

/// QUIC keep-alive interval, well inside [`MAX_IDLE_TIMEOUT`] so an idle
/// but healthy link is never timed out, even with a lost keep-alive or two.
pub const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(5);
/// QUIC idle timeout: how long a silent peer is kept before the connection
/// is closed and the mesh starts redialing.
pub const MAX_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Why TLS material could not be loaded, a configuration could not be
/// built, or a peer's identity could not be read.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{0} does not exist")]
    Missing(PathBuf),
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path} is not valid PEM: {reason}")]
    BadPem { path: PathBuf, reason: String },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("{path} holds no usable CA certificate: {reason}")]
    BadCa { path: PathBuf, reason: String },
    #[error("{path} holds no usable PEM private key: {reason}")]
    NoKey { path: PathBuf, reason: String },
    #[error("{path} holds a certificate that cannot be decoded: {reason}")]
    BadCertificate { path: PathBuf, reason: String },
    #[error("the private key in {key} does not belong to the certificate in {cert}: {reason}")]
    KeyMismatch {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
    #[error("the certificate in {cert} is not signed by the CA in {ca}: {reason}")]
    NotSignedByCa { cert: PathBuf, ca: PathBuf, reason: String },
    #[error("the certificate in {cert} has expired: {reason}")]
    Expired { cert: PathBuf, reason: String },
    #[error("the certificate in {cert} is not valid yet: {reason}")]
    NotYetValid { cert: PathBuf, reason: String },
    /// Chained to the CA and in date, but unusable for another reason
    /// (e.g. it lacks the ServerAuth or ClientAuth usage).
    #[error("the certificate in {cert} is not acceptable under the CA in {ca}: {reason}")]
    NotTrusted { cert: PathBuf, ca: PathBuf, reason: String },
    #[error("the certificate in {path} names no usable site: {reason}")]
    NoSiteName { path: PathBuf, reason: String },
    #[error("the peer's certificate names no usable site: {0}")]
    PeerSiteName(String),
    #[error("the peer presented no certificate")]
    NoPeerCertificate,
    #[error("cannot build the TLS configuration ({what}): {reason}")]
    Config { what: &'static str, reason: String },
}

/// The ring provider, the only one compiled into this crate; passed
/// explicitly to every builder so nothing depends on a process default.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Installs the ring provider as the process default, for any library that
/// asks rustls for the default. Installing when a provider is already
/// installed (by us or anyone) is not an error: this crate never relies on
/// the default anyway.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// This site's TLS identity: the federation CA root(s), this site's
/// certificate chain and private key, and the site name from its own
/// certificate. Built only by [`load_identity`], which checks it.
#[derive(Debug, Clone)]
pub struct SiteIdentity {
    site: String,
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    // PrivateKeyDer's Debug elides the key material.
    key: Arc<PrivateKeyDer<'static>>,
}

impl SiteIdentity {
    /// The site name from this site's own certificate.
    pub fn site(&self) -> &str {
        &self.site
    }
}

/// Loads and checks this site's identity: the files exist and parse, the
/// key belongs to the certificate, the certificate names a valid site and
/// is valid now under the CA for both server and client use.
///
/// All of this would otherwise surface at every handshake as a terse alert
/// on the peer's side; checking at start-up gives one clear message naming
/// the file.
pub fn load_identity(ca_pem: &Path, cert_pem: &Path, key_pem: &Path) -> Result<SiteIdentity, TlsError> {
    let mut roots = RootCertStore::empty();
    for ca in read_certs(ca_pem)? {
        roots.add(ca).map_err(|e| TlsError::BadCa {
            path: ca_pem.to_path_buf(),
            reason: e.to_string(),
        })?;
    }
    let roots = Arc::new(roots);

    let chain = read_certs(cert_pem)?;
    let (leaf, intermediates) = chain.split_first().ok_or_else(|| TlsError::NoCertificate {
        path: cert_pem.to_path_buf(),
    })?;
    let site = site_name(leaf).map_err(|e| match e {
        NameError::Undecodable(reason) => TlsError::BadCertificate {
            path: cert_pem.to_path_buf(),
            reason,
        },
        NameError::NoName(reason) => TlsError::NoSiteName {
            path: cert_pem.to_path_buf(),
            reason,
        },
    })?;

    let key = read_key(key_pem)?;
    let provider = crypto_provider();
    let signing_key = provider
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|e| TlsError::NoKey {
            path: key_pem.to_path_buf(),
            reason: e.to_string(),
        })?;
    CertifiedKey::new(chain.clone(), signing_key)
        .keys_match()
        .map_err(|e| TlsError::KeyMismatch {
            cert: cert_pem.to_path_buf(),
            key: key_pem.to_path_buf(),
            reason: e.to_string(),
        })?;

    // Check our own certificate the way peers will, in both roles.
    let refused = |e: rustls::Error| classify(e, cert_pem, ca_pem);
    let now = UnixTime::now();
    let parsed = ParsedCertificate::try_from(leaf).map_err(refused)?;
    verify_server_cert_signed_by_trust_anchor(
        &parsed,
        &roots,
        intermediates,
        now,
        provider.signature_verification_algorithms.all,
    )
    .map_err(refused)?;
    client_verifier(&roots, &provider)?
        .verify_client_cert(leaf, intermediates, now)
        .map_err(refused)?;

    Ok(SiteIdentity {
        site,
        roots,
        chain,
        key: Arc::new(key),
    })
}

/// Transport settings shared by both sides: keep-alives every
/// [`KEEP_ALIVE_INTERVAL`] keep NAT bindings and the idle timer fresh; a
/// peer silent for [`MAX_IDLE_TIMEOUT`] is dropped so the mesh can redial.
pub fn transport_config() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(KEEP_ALIVE_INTERVAL));
    // 30 s is far below the VarInt bound (2^62 ms), so this cannot fail;
    // fall back to quinn's default rather than panic if it ever did.
    if let Ok(idle) = quinn::IdleTimeout::try_from(MAX_IDLE_TIMEOUT) {
        t.max_idle_timeout(Some(idle));
    }
    Arc::new(t)
}

/// The accepting side: TLS 1.3 only, ALPN [`ALPN`], and a client
/// certificate chained to the CA, valid now, with the ClientAuth usage and
/// a valid site name is mandatory.
pub fn server_config(id: &SiteIdentity) -> Result<quinn::ServerConfig, TlsError> {
    let provider = crypto_provider();
    let verifier = Arc::new(SiteClientVerifier {
        inner: client_verifier(&id.roots, &provider)?,
    });
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(config_err("server protocol versions"))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(id.chain.clone(), id.key.clone_key())
        .map_err(config_err("server certificate"))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = QuicServerConfig::try_from(tls).map_err(config_err("QUIC server"))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(transport_config());
    Ok(config)
}

/// The dialing side: TLS 1.3 only, ALPN [`ALPN`], presents this site's
/// certificate, and accepts any server whose chain leads to the CA, is
/// valid now, carries the ServerAuth usage and names a valid site. Dial
/// with [`SERVER_NAME`] (any name works; it is not checked).
pub fn client_config(id: &SiteIdentity) -> Result<quinn::ClientConfig, TlsError> {
    let provider = crypto_provider();
    let verifier = Arc::new(FederationServerVerifier {
        roots: id.roots.clone(),
        provider: provider.clone(),
    });
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(config_err("client protocol versions"))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(id.chain.clone(), id.key.clone_key())
        .map_err(config_err("client certificate"))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = QuicClientConfig::try_from(tls).map_err(config_err("QUIC client"))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(transport_config());
    Ok(config)
}

/// The site name of the peer on an established connection, read from the
/// certificate the handshake verified (DNS SAN, else CN) and checked with
/// [`validate_site_name`].
pub fn peer_site(conn: &quinn::Connection) -> Result<String, TlsError> {
    let identity = conn.peer_identity().ok_or(TlsError::NoPeerCertificate)?;
    let chain = identity
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| TlsError::NoPeerCertificate)?;
    let leaf = chain.first().ok_or(TlsError::NoPeerCertificate)?;
    site_name(leaf).map_err(|e| TlsError::PeerSiteName(e.reason().to_owned()))
}

/// The site name a DER certificate carries (its first DNS SAN, else its
/// CN), checked with [`validate_site_name`].
pub fn site_name_of(cert: &CertificateDer<'_>) -> Result<String, TlsError> {
    site_name(cert).map_err(|e| TlsError::PeerSiteName(e.reason().to_owned()))
}

enum NameError {
    Undecodable(String),
    NoName(String),
}

impl NameError {
    fn reason(&self) -> &str {
        match self {
            NameError::Undecodable(r) | NameError::NoName(r) => r,
        }
    }
}

fn site_name(cert: &CertificateDer<'_>) -> Result<String, NameError> {
    let (_, parsed) =
        x509_parser::parse_x509_certificate(cert.as_ref()).map_err(|e| NameError::Undecodable(e.to_string()))?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|e| NameError::Undecodable(e.to_string()))?;
    let from_san = san.and_then(|san| {
        san.value.general_names.iter().find_map(|n| match n {
            x509_parser::extensions::GeneralName::DNSName(d) => Some((*d).to_owned()),
            _ => None,
        })
    });
    let name = match from_san {
        Some(n) => n,
        None => parsed
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok().map(str::to_owned))
            .ok_or_else(|| NameError::NoName("no DNS subject alternative name and no common name".into()))?,
    };
    validate_site_name(&name).map_err(|e| NameError::NoName(e.to_string()))?;
    Ok(name)
}

fn read_file(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => TlsError::Missing(path.to_path_buf()),
        _ => TlsError::Read {
            path: path.to_path_buf(),
            source,
        },
    })
}

/// All PEM certificates in a file, in order; at least one.
fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read_file(path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadPem {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// The first PEM private key (PKCS#8, PKCS#1 or SEC1) in a file.
fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read_file(path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => TlsError::NoKey {
            path: path.to_path_buf(),
            reason: "no PEM PRIVATE KEY section in it".into(),
        },
        e => TlsError::BadPem {
            path: path.to_path_buf(),
            reason: e.to_string(),
        },
    })
}

/// Sorts a verification failure of our own certificate into the error an
/// operator can act on: wrong CA, expired, not yet valid, or other.
fn classify(e: rustls::Error, cert: &Path, ca: &Path) -> TlsError {
    let reason = e.to_string();
    let cert = cert.to_path_buf();
    match e {
        rustls::Error::InvalidCertificate(CertificateError::Expired | CertificateError::ExpiredContext { .. }) => {
            TlsError::Expired { cert, reason }
        }
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. },
        ) => TlsError::NotYetValid { cert, reason },
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer | CertificateError::BadSignature) => {
            TlsError::NotSignedByCa {
                cert,
                ca: ca.to_path_buf(),
                reason,
            }
        }
        rustls::Error::InvalidCertificate(CertificateError::BadEncoding) => {
            TlsError::BadCertificate { path: cert, reason }
        }
        _ => TlsError::NotTrusted {
            cert,
            ca: ca.to_path_buf(),
            reason,
        },
    }
}

fn config_err<E: std::fmt::Display>(what: &'static str) -> impl FnOnce(E) -> TlsError {
    move |e| TlsError::Config {
        what,
        reason: e.to_string(),
    }
}

/// webpki's client verifier over the CA roots: chain, validity, ClientAuth
/// usage; client authentication mandatory (the builder's default).
fn client_verifier(
    roots: &Arc<RootCertStore>,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .map_err(config_err("client certificate verifier"))
}

/// Maps a certificate without a usable site name to a handshake failure,
/// so such a peer is refused before any data flows rather than after.
fn require_site_name(cert: &CertificateDer<'_>) -> Result<(), rustls::Error> {
    site_name(cert)
        .map(|_| ())
        .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::NotValidForName))
}

/// Server-certificate verifier for dialers: the chain must lead to the
/// federation CA, be valid now and carry the ServerAuth usage, and the
/// leaf must name a valid site. No particular name is required: any site
/// of the federation may answer at an address, and which one it is, is
/// read afterwards with [`peer_site`].
#[derive(Debug)]
struct FederationServerVerifier {
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for FederationServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        require_site_name(end_entity)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// webpki's client verifier plus the site-name requirement, so a client
/// the server could not name is refused in the handshake.
#[derive(Debug)]
struct SiteClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
}

impl ClientCertVerifier for SiteClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
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
        let verified = self.inner.verify_client_cert(end_entity, intermediates, now)?;
        require_site_name(end_entity)?;
        Ok(verified)
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
