//! Mutual TLS for the mesh (rustls on the ring provider, the only one
//! compiled in). Servers require a client certificate chained to the
//! federation CA; clients verify the server's chain against the same CA. A
//! dialer knows only an address, so the client checks the chain but no
//! name, and the peer's site name is read from its verified certificate.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

use crate::ca::validate_site_name;

/// ALPN of the federation protocol.
pub const ALPN: &[u8] = b"ocmesh-fed/1";
/// The server name a dialer puts in its ClientHello; servers ignore it.
pub const SERVER_NAME: &str = "ocmesh-peer";

/// Why TLS material could not be loaded or used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("{path} holds no PEM private key: {reason}")]
    NoKey { path: PathBuf, reason: String },
    #[error("{key} does not belong to the certificate in {cert}: {reason}")]
    KeyMismatch {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
    #[error("{cert} is not valid under the CA in {ca}: {reason}")]
    NotTrusted { cert: PathBuf, ca: PathBuf, reason: String },
    #[error("certificate names no usable site: {0}")]
    NoSiteName(String),
    #[error("peer presented no certificate")]
    NoPeerCertificate,
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// The ring provider, passed explicitly to every rustls builder.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Installs the ring provider process-wide (for any library that asks for
/// the default); installing twice is harmless.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// This site's certificate, key and the federation CA.
#[derive(Debug, Clone)]
pub struct SiteIdentity {
    site: String,
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
}

impl SiteIdentity {
    /// The site name from this site's own certificate.
    pub fn site(&self) -> &str {
        &self.site
    }
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let iter = CertificateDer::pem_file_iter(path).map_err(|e| TlsError::Read {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let certs: Vec<_> = iter.collect::<Result<_, _>>().map_err(|e| TlsError::Read {
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

/// Reads the site name (DNS SAN, else CN) from a DER certificate.
pub fn site_name_of(cert: &CertificateDer<'_>) -> Result<String, TlsError> {
    let (_, parsed) =
        x509_parser::parse_x509_certificate(cert.as_ref()).map_err(|e| TlsError::NoSiteName(e.to_string()))?;
    let from_san = parsed.subject_alternative_name().ok().flatten().and_then(|san| {
        san.value.general_names.iter().find_map(|n| match n {
            x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
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
            .ok_or_else(|| TlsError::NoSiteName("no DNS name and no common name".into()))?,
    };
    validate_site_name(&name).map_err(|e| TlsError::NoSiteName(e.to_string()))?;
    Ok(name)
}

/// Loads and checks this site's identity: the files parse, the key matches
/// the certificate, and the certificate is valid now under the CA.
pub fn load_identity(ca_pem: &Path, cert_pem: &Path, key_pem: &Path) -> Result<SiteIdentity, TlsError> {
    let mut roots = RootCertStore::empty();
    for ca in certs(ca_pem)? {
        roots.add(ca).map_err(|e| TlsError::Read {
            path: ca_pem.to_path_buf(),
            reason: e.to_string(),
        })?;
    }
    let chain = certs(cert_pem)?;
    let key = PrivateKeyDer::from_pem_file(key_pem).map_err(|e| TlsError::NoKey {
        path: key_pem.to_path_buf(),
        reason: e.to_string(),
    })?;
    let provider = crypto_provider();
    let mismatch = |reason: String| TlsError::KeyMismatch {
        cert: cert_pem.to_path_buf(),
        key: key_pem.to_path_buf(),
        reason,
    };
    let certified =
        CertifiedKey::from_der(chain.clone(), key.clone_key(), &provider).map_err(|e| mismatch(e.to_string()))?;
    certified.keys_match().map_err(|e| mismatch(e.to_string()))?;
    let site = site_name_of(&chain[0])?;
    let roots = Arc::new(roots);
    // Check our own certificate the way peers will, so a wrong or expired
    // one fails at start-up with a clear message rather than at every dial.
    let verifier = server_verifier(&roots, &provider)?;
    verifier
        .verify_server_cert(&chain[0], &chain[1..], &dns_name(&site)?, &[], UnixTime::now())
        .map_err(|e| TlsError::NotTrusted {
            cert: cert_pem.to_path_buf(),
            ca: ca_pem.to_path_buf(),
            reason: e.to_string(),
        })?;
    Ok(SiteIdentity {
        site,
        roots,
        chain,
        key: Arc::new(key),
    })
}

fn dns_name(site: &str) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(site.to_owned()).map_err(|e| TlsError::NoSiteName(e.to_string()))
}

fn server_verifier(
    roots: &Arc<RootCertStore>,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<WebPkiServerVerifier>, TlsError> {
    WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))
}

/// Transport settings for flaky links: keep-alives well inside the idle timeout.
pub fn transport_config() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(Duration::from_secs(5)));
    t.max_idle_timeout(Some(quinn::IdleTimeout::from(quinn::VarInt::from_u32(30_000))));
    Arc::new(t)
}

/// Accepting side: requires a client certificate chained to the CA.
pub fn server_config(id: &SiteIdentity) -> Result<quinn::ServerConfig, TlsError> {
    let provider = crypto_provider();
    let client_verifier = WebPkiClientVerifier::builder_with_provider(id.roots.clone(), provider.clone())
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(client_verifier)
        .with_single_cert(id.chain.clone(), id.key.clone_key())
        .map_err(|e| TlsError::Config(e.to_string()))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| TlsError::Config(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(transport_config());
    Ok(config)
}

/// Dialing side: presents our certificate, verifies the server's chain.
pub fn client_config(id: &SiteIdentity) -> Result<quinn::ClientConfig, TlsError> {
    let provider = crypto_provider();
    let verifier = Arc::new(CaChainVerifier {
        inner: server_verifier(&id.roots, &provider)?,
    });
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(id.chain.clone(), id.key.clone_key())
        .map_err(|e| TlsError::Config(e.to_string()))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = QuicClientConfig::try_from(tls).map_err(|e| TlsError::Config(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(transport_config());
    Ok(config)
}

/// Verifies a server's chain, validity and usage against the CA, checking
/// the name against the one its own certificate carries (any site of the
/// federation may answer at an address; which one it is, we read after).
#[derive(Debug)]
struct CaChainVerifier {
    inner: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for CaChainVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let site = site_name_of(end_entity)
            .map_err(|_| rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding))?;
        let name = ServerName::try_from(site)
            .map_err(|_| rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding))?;
        self.inner
            .verify_server_cert(end_entity, intermediates, &name, ocsp_response, now)
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

/// The site name of the peer on a connection, from its verified certificate.
pub fn peer_site(conn: &quinn::Connection) -> Result<String, TlsError> {
    let identity = conn.peer_identity().ok_or(TlsError::NoPeerCertificate)?;
    let chain = identity
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| TlsError::NoPeerCertificate)?;
    let leaf = chain.first().ok_or(TlsError::NoPeerCertificate)?;
    site_name_of(leaf)
}
