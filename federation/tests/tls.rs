//! The federation CA and mutual TLS over real loopback QUIC: good peers
//! meet and learn each other's site names; a certificate from another CA,
//! an expired one, or none at all is refused before any application byte
//! reaches the impostor.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ocmesh_federation::ca::{self, CaError};
use ocmesh_federation::tls::{self, SiteIdentity, TlsError};
use quinn::Endpoint;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Bound on every network wait, so a broken handshake fails the test
/// instead of hanging it.
const WAIT: Duration = Duration::from_secs(10);
const DAY: Duration = Duration::from_secs(86_400);
/// What a server writes to whoever it accepted; a refused client must
/// never see it.
const SECRET: &[u8] = b"federation data for members only";

fn new_ca() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    ca::init_ca(dir.path()).expect("init_ca");
    dir
}

fn identity(ca_dir: &Path, site: &str) -> SiteIdentity {
    let files = ca::issue_site_cert(ca_dir, site).expect("issue_site_cert");
    tls::load_identity(&ca_dir.join("ca.pem"), &files.cert, &files.key).expect("load_identity")
}

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

fn server(id: &SiteIdentity) -> (Endpoint, SocketAddr) {
    let ep = Endpoint::server(tls::server_config(id).expect("server_config"), loopback()).expect("bind server");
    let addr = ep.local_addr().expect("server addr");
    (ep, addr)
}

fn client(config: quinn::ClientConfig) -> Endpoint {
    let mut ep = Endpoint::client(loopback()).expect("bind client");
    ep.set_default_client_config(config);
    ep
}

/// A client built by hand, bypassing `load_identity`: it trusts the CA in
/// `trusted_ca_dir` (so it would accept the real server) but presents
/// `cert`/`key` (or nothing), which lets a test isolate the server's
/// refusal from the client's own checks.
fn raw_client(trusted_ca_dir: &Path, auth: Option<(&Path, &Path)>) -> quinn::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(trusted_ca_dir.join("ca.pem")).expect("ca.pem") {
        roots.add(ca.expect("ca cert")).expect("add root");
    }
    let builder = rustls::ClientConfig::builder_with_provider(tls::crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_root_certificates(roots);
    let mut config = match auth {
        Some((cert, key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .expect("cert file")
                .collect::<Result<Vec<_>, _>>()
                .expect("certs");
            let key = PrivateKeyDer::from_pem_file(key).expect("key");
            builder.with_client_auth_cert(chain, key).expect("client auth")
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![tls::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(config).expect("quic client");
    quinn::ClientConfig::new(Arc::new(crypto))
}

/// Accepts one connection and, should the handshake succeed, hands the
/// secret to the first stream the peer opens. Returns the handshake result.
fn serve_once(ep: Endpoint) -> tokio::task::JoinHandle<Result<String, String>> {
    tokio::spawn(async move {
        let incoming = tokio::time::timeout(WAIT, ep.accept())
            .await
            .map_err(|_| "no incoming connection".to_owned())?
            .ok_or_else(|| "endpoint closed".to_owned())?;
        let conn = tokio::time::timeout(WAIT, incoming)
            .await
            .map_err(|_| "handshake timed out".to_owned())?
            .map_err(|e| format!("refused: {e}"))?;
        let site = tls::peer_site(&conn).map_err(|e| e.to_string())?;
        if let Ok(Ok((mut send, _recv))) = tokio::time::timeout(WAIT, conn.accept_bi()).await {
            let _ = send.write_all(SECRET).await;
            let _ = send.finish();
            let _ = tokio::time::timeout(WAIT, send.stopped()).await;
        }
        Ok(site)
    })
}

/// Dials `addr` and tries one exchange. Returns every byte the server sent
/// back, or the error that ended the attempt (at connect, or — TLS 1.3
/// with a refused client certificate — at the first read).
async fn try_exchange(ep: &Endpoint, addr: SocketAddr) -> Result<Vec<u8>, String> {
    let connecting = ep.connect(addr, tls::SERVER_NAME).map_err(|e| e.to_string())?;
    let conn = tokio::time::timeout(WAIT, connecting)
        .await
        .map_err(|_| "connect timed out".to_owned())?
        .map_err(|e| format!("connect: {e}"))?;
    let (mut send, mut recv) = tokio::time::timeout(WAIT, conn.open_bi())
        .await
        .map_err(|_| "open_bi timed out".to_owned())?
        .map_err(|e| format!("open_bi: {e}"))?;
    send.write_all(b"hello").await.map_err(|e| format!("write: {e}"))?;
    let _ = send.finish();
    tokio::time::timeout(WAIT, recv.read_to_end(1 << 16))
        .await
        .map_err(|_| "read timed out".to_owned())?
        .map_err(|e| format!("read: {e}"))
}

/// Asserts a client was refused by the server: the server's handshake
/// failed and the client never read a byte of the secret.
async fn assert_refused_by_server(client_config: quinn::ClientConfig, server_id: &SiteIdentity) {
    let (server_ep, addr) = server(server_id);
    let served = serve_once(server_ep.clone());
    let client_ep = client(client_config);

    let got = try_exchange(&client_ep, addr).await;
    let server_side = tokio::time::timeout(WAIT, served)
        .await
        .expect("server task finished")
        .expect("server task did not panic");

    let server_err = server_side.expect_err("server must refuse the client");
    assert!(server_err.starts_with("refused:"), "server error: {server_err}");
    match got {
        Ok(bytes) => panic!(
            "refused client read {} bytes: {:?}",
            bytes.len(),
            String::from_utf8_lossy(&bytes)
        ),
        Err(e) => assert!(
            !e.contains("timed out"),
            "client should see the refusal, not a timeout: {e}"
        ),
    }
    client_ep.close(0u32.into(), b"done");
    server_ep.close(0u32.into(), b"done");
}

#[cfg(unix)]
fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).expect("metadata").permissions().mode() & 0o777
}

#[test]
fn ca_writes_files_and_refuses_overwrite_and_bad_names() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca_dir = dir.path().join("nested/ca");
    let ca_files = ca::init_ca(&ca_dir).expect("init_ca creates the directory");
    assert_eq!(ca_files.cert, ca_dir.join("ca.pem"));
    assert_eq!(ca_files.key, ca_dir.join("ca.key"));
    let site = ca::issue_site_cert(&ca_dir, "alpha").expect("issue");
    assert_eq!(site.cert, ca_dir.join("alpha.pem"));
    assert_eq!(site.key, ca_dir.join("alpha.key"));
    for p in [&ca_files.cert, &ca_files.key, &site.cert, &site.key] {
        assert!(p.is_file(), "{} written", p.display());
    }
    #[cfg(unix)]
    {
        assert_eq!(mode(&ca_files.key), 0o600);
        assert_eq!(mode(&site.key), 0o600);
    }

    // What the files say.
    let ca_der = CertificateDer::from_pem_file(&ca_files.cert).expect("ca pem");
    let (_, ca_cert) = x509_parser::parse_x509_certificate(ca_der.as_ref()).expect("ca der");
    assert!(ca_cert.is_ca());
    assert_eq!(
        ca_cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok()),
        Some("ocmesh federation CA")
    );
    let ku = ca_cert.key_usage().expect("ku").expect("ca has key usage").value;
    assert!(ku.key_cert_sign() && ku.crl_sign());
    let leaf_der = CertificateDer::from_pem_file(&site.cert).expect("site pem");
    let (_, leaf) = x509_parser::parse_x509_certificate(leaf_der.as_ref()).expect("site der");
    assert!(!leaf.is_ca());
    assert_eq!(leaf.issuer(), ca_cert.subject());
    let eku = leaf.extended_key_usage().expect("eku").expect("site has eku").value;
    assert!(eku.server_auth && eku.client_auth);
    assert_eq!(tls::site_name_of(&leaf_der).expect("site name"), "alpha");
    let now_secs = SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64;
    let days_left = (leaf.validity().not_after.timestamp() - now_secs) / 86_400;
    assert!((729..=730).contains(&days_left), "about two years: {days_left} days");

    // No overwriting.
    let err = ca::init_ca(&ca_dir).expect_err("second init");
    assert!(matches!(&err, CaError::Exists(p) if p == &ca_files.cert), "{err:?}");
    assert!(err.to_string().contains("ca.pem"), "{err}");
    let err = ca::issue_site_cert(&ca_dir, "alpha").expect_err("second issue");
    assert!(matches!(&err, CaError::Exists(_)), "{err:?}");
    assert!(err.to_string().contains("alpha."), "{err}");

    // Bad site names.
    let long = "a".repeat(64);
    for bad in ["", "A", "-a", "a-", "a_b", "a.b", long.as_str()] {
        let err = ca::issue_site_cert(&ca_dir, bad).expect_err("bad name refused");
        assert!(
            matches!(&err, CaError::BadSiteName { name, .. } if name == bad),
            "{bad:?}: {err:?}"
        );
        assert!(err.to_string().contains("invalid site name"), "{err}");
    }
    assert!(ca::validate_site_name(&"a".repeat(63)).is_ok());
    assert!(ca::validate_site_name("a-1").is_ok());
    assert!(
        ca::issue_site_cert(&ca_dir, "A")
            .expect_err("upper")
            .to_string()
            .contains("lowercase")
    );
    assert!(
        ca::issue_site_cert(&ca_dir, "")
            .expect_err("empty")
            .to_string()
            .contains("empty")
    );
    assert!(
        ca::issue_site_cert(&ca_dir, &long)
            .expect_err("long")
            .to_string()
            .contains("63")
    );

    // Missing CA.
    let nowhere = dir.path().join("no-such-ca");
    let err = ca::issue_site_cert(&nowhere, "beta").expect_err("no CA");
    assert!(
        matches!(&err, CaError::Missing(p) if p == &nowhere.join("ca.pem")),
        "{err:?}"
    );
    assert!(err.to_string().contains("ca.pem"), "{err}");
}

#[test]
fn issue_refuses_a_ca_that_is_not_one() {
    let good = new_ca();
    let files = ca::issue_site_cert(good.path(), "alpha").expect("issue");

    // A site certificate posing as the CA.
    let fake = tempfile::tempdir().expect("tempdir");
    std::fs::copy(&files.cert, fake.path().join("ca.pem")).expect("copy");
    std::fs::copy(&files.key, fake.path().join("ca.key")).expect("copy");
    let err = ca::issue_site_cert(fake.path(), "beta").expect_err("not a CA");
    assert!(matches!(&err, CaError::NotCa(p) if p.ends_with("ca.pem")), "{err:?}");

    // Garbage instead of PEM.
    let junk = tempfile::tempdir().expect("tempdir");
    std::fs::write(junk.path().join("ca.pem"), "not a certificate").expect("write");
    std::fs::copy(good.path().join("ca.key"), junk.path().join("ca.key")).expect("copy");
    let err = ca::issue_site_cert(junk.path(), "beta").expect_err("not PEM");
    assert!(
        matches!(&err, CaError::Parse { path, .. } if path.ends_with("ca.pem")),
        "{err:?}"
    );

    // The CA certificate with someone else's key.
    let other = new_ca();
    let mixed = tempfile::tempdir().expect("tempdir");
    std::fs::copy(good.path().join("ca.pem"), mixed.path().join("ca.pem")).expect("copy");
    std::fs::copy(other.path().join("ca.key"), mixed.path().join("ca.key")).expect("copy");
    let err = ca::issue_site_cert(mixed.path(), "beta").expect_err("wrong key");
    assert!(matches!(&err, CaError::CaKeyMismatch { .. }), "{err:?}");
    assert!(!mixed.path().join("beta.pem").exists() && !mixed.path().join("beta.key").exists());

    // An empty validity window.
    let now = SystemTime::now();
    let err = ca::issue_site_cert_with_validity(good.path(), "beta", now, now - DAY).expect_err("empty window");
    assert!(matches!(&err, CaError::BadValidity(_)), "{err:?}");
}

#[tokio::test]
async fn two_sites_handshake_exchange_and_name_each_other() {
    let ca_dir = new_ca();
    let alpha = identity(ca_dir.path(), "alpha");
    let beta = identity(ca_dir.path(), "beta");
    assert_eq!(alpha.site(), "alpha");
    assert_eq!(beta.site(), "beta");

    let (server_ep, addr) = server(&alpha);
    let accept = {
        let ep = server_ep.clone();
        tokio::spawn(async move {
            let incoming = ep.accept().await.expect("incoming");
            let conn = incoming.await.expect("server handshake");
            let peer = tls::peer_site(&conn).expect("client's site");
            let (mut send, mut recv) = conn.accept_bi().await.expect("accept_bi");
            let got = recv.read_to_end(1024).await.expect("server read");
            send.write_all(b"pong from alpha").await.expect("server write");
            send.finish().expect("finish");
            send.stopped().await.expect("client read it");
            (peer, got)
        })
    };

    let client_ep = client(tls::client_config(&beta).expect("client_config"));
    let conn = tokio::time::timeout(WAIT, client_ep.connect(addr, tls::SERVER_NAME).expect("connect"))
        .await
        .expect("connect in time")
        .expect("client handshake");
    assert_eq!(tls::peer_site(&conn).expect("server's site"), "alpha");
    let alpn = conn
        .handshake_data()
        .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|d| d.protocol);
    assert_eq!(alpn.as_deref(), Some(tls::ALPN));

    let (mut send, mut recv) = conn.open_bi().await.expect("open_bi");
    send.write_all(b"ping from beta").await.expect("client write");
    send.finish().expect("finish");
    let reply = tokio::time::timeout(WAIT, recv.read_to_end(1024))
        .await
        .expect("reply in time")
        .expect("client read");
    assert_eq!(reply, b"pong from alpha");

    let (peer, got) = tokio::time::timeout(WAIT, accept)
        .await
        .expect("server done in time")
        .expect("server task");
    assert_eq!(peer, "beta");
    assert_eq!(got, b"ping from beta");

    conn.close(0u32.into(), b"bye");
    client_ep.close(0u32.into(), b"bye");
    server_ep.close(0u32.into(), b"bye");
}

#[tokio::test]
async fn server_refuses_a_client_from_another_ca() {
    let ca_dir = new_ca();
    let alpha = identity(ca_dir.path(), "alpha");
    let rogue_ca = new_ca();
    let rogue = ca::issue_site_cert(rogue_ca.path(), "beta").expect("rogue cert");

    // Trusts the right CA, so only the server's check can stop it.
    let config = raw_client(ca_dir.path(), Some((&rogue.cert, &rogue.key)));
    assert_refused_by_server(config, &alpha).await;
}

#[tokio::test]
async fn server_refuses_a_client_without_a_certificate() {
    let ca_dir = new_ca();
    let alpha = identity(ca_dir.path(), "alpha");
    assert_refused_by_server(raw_client(ca_dir.path(), None), &alpha).await;
}

#[tokio::test]
async fn client_refuses_a_server_from_another_ca() {
    let ca_dir = new_ca();
    let beta = identity(ca_dir.path(), "beta");
    let rogue_ca = new_ca();
    let rogue_alpha = identity(rogue_ca.path(), "alpha");

    let (server_ep, addr) = server(&rogue_alpha);
    let served = serve_once(server_ep.clone());
    let client_ep = client(tls::client_config(&beta).expect("client_config"));

    let connecting = client_ep.connect(addr, tls::SERVER_NAME).expect("connect");
    let err = tokio::time::timeout(WAIT, connecting)
        .await
        .expect("connect in time")
        .expect_err("client must refuse the server at connect");
    // Both CAs are named "ocmesh federation CA", so webpki finds a
    // candidate issuer by name and then rejects its signature.
    let msg = err.to_string();
    assert!(
        msg.contains("invalid peer certificate") && (msg.contains("BadSignature") || msg.contains("UnknownIssuer")),
        "{msg}"
    );

    let server_side = tokio::time::timeout(WAIT, served)
        .await
        .expect("server task finished")
        .expect("server task did not panic");
    assert!(server_side.is_err(), "server handshake must fail too: {server_side:?}");
    client_ep.close(0u32.into(), b"done");
    server_ep.close(0u32.into(), b"done");
}

#[tokio::test]
async fn expired_client_certificate_is_refused() {
    let ca_dir = new_ca();
    let alpha = identity(ca_dir.path(), "alpha");
    let now = SystemTime::now();
    let old = ca::issue_site_cert_with_validity(ca_dir.path(), "old", now - 30 * DAY, now - DAY).expect("expired cert");

    // load_identity refuses it outright, naming the file...
    let err = tls::load_identity(&ca_dir.path().join("ca.pem"), &old.cert, &old.key).expect_err("expired");
    assert!(
        matches!(&err, TlsError::Expired { cert, .. } if cert == &old.cert),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("old.pem") && err.to_string().contains("expired"),
        "{err}"
    );

    // ...and a client that presents it anyway is refused by the server.
    let config = raw_client(ca_dir.path(), Some((&old.cert, &old.key)));
    assert_refused_by_server(config, &alpha).await;
}

#[test]
fn load_identity_reports_what_is_wrong() {
    let ca_dir = new_ca();
    let ca_pem = ca_dir.path().join("ca.pem");
    let alpha = ca::issue_site_cert(ca_dir.path(), "alpha").expect("alpha");
    let beta = ca::issue_site_cert(ca_dir.path(), "beta").expect("beta");

    // Missing files, each named.
    let missing = ca_dir.path().join("gone.pem");
    for (ca, cert, key) in [
        (&missing, &alpha.cert, &alpha.key),
        (&ca_pem, &missing, &alpha.key),
        (&ca_pem, &alpha.cert, &missing),
    ] {
        let err = tls::load_identity(ca, cert, key).expect_err("missing file");
        assert!(matches!(&err, TlsError::Missing(p) if p == &missing), "{err:?}");
        assert!(err.to_string().contains("gone.pem"), "{err}");
    }

    // Garbage where a certificate or a key should be.
    let garbage = ca_dir.path().join("garbage.pem");
    std::fs::write(&garbage, b"\x00\x01 this is not PEM at all \xff\n").expect("write");
    let err = tls::load_identity(&ca_pem, &garbage, &alpha.key).expect_err("garbage cert");
    assert!(
        matches!(&err, TlsError::NoCertificate { path } if path == &garbage),
        "{err:?}"
    );
    assert!(err.to_string().contains("garbage.pem"), "{err}");
    let err = tls::load_identity(&garbage, &alpha.cert, &alpha.key).expect_err("garbage CA");
    assert!(
        matches!(&err, TlsError::NoCertificate { path } if path == &garbage),
        "{err:?}"
    );
    let err = tls::load_identity(&ca_pem, &alpha.cert, &garbage).expect_err("garbage key");
    assert!(
        matches!(&err, TlsError::NoKey { path, .. } if path == &garbage),
        "{err:?}"
    );
    // A key file holding a certificate has no key either.
    let err = tls::load_identity(&ca_pem, &alpha.cert, &alpha.cert).expect_err("cert as key");
    assert!(matches!(&err, TlsError::NoKey { .. }), "{err:?}");

    // Someone else's key.
    let err = tls::load_identity(&ca_pem, &alpha.cert, &beta.key).expect_err("wrong key");
    assert!(
        matches!(&err, TlsError::KeyMismatch { cert, key, .. } if cert == &alpha.cert && key == &beta.key),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("beta.key") && err.to_string().contains("alpha.pem"),
        "{err}"
    );

    // A certificate from another CA.
    let other = new_ca();
    let err = tls::load_identity(&other.path().join("ca.pem"), &alpha.cert, &alpha.key).expect_err("other CA");
    assert!(matches!(&err, TlsError::NotSignedByCa { .. }), "{err:?}");

    // And the good combination loads.
    let id = tls::load_identity(&ca_pem, &alpha.cert, &alpha.key).expect("good identity");
    assert_eq!(id.site(), "alpha");
    assert!(!format!("{id:?}").contains("PRIVATE KEY"));
}

#[test]
fn transport_and_provider_settings() {
    // Builders get the provider explicitly; installing it process-wide is
    // allowed any number of times.
    tls::install_crypto_provider();
    tls::install_crypto_provider();
    assert!(!tls::crypto_provider().cipher_suites.is_empty());
    assert_eq!(tls::KEEP_ALIVE_INTERVAL, Duration::from_secs(5));
    assert_eq!(tls::MAX_IDLE_TIMEOUT, Duration::from_secs(30));
    let _ = tls::transport_config();
}
