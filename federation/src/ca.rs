//! The federation CA: one self-signed CA per mesh, and a certificate per
//! site signed by it, naming the site in its CN and DNS SAN and good for
//! both ends of a TLS connection (sites both dial and accept, so one
//! certificate carries both the ServerAuth and ClientAuth usages).
//!
//! Files live flat in one directory: `ca.pem`/`ca.key` for the CA and
//! `SITE.pem`/`SITE.key` per site. Nothing here ever overwrites a file: a
//! lost CA key means re-issuing every site, so an accidental second `init`
//! must fail loudly rather than replace it.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

/// File name of the CA certificate inside the CA directory.
pub const CA_CERT_FILE: &str = "ca.pem";
/// File name of the CA private key inside the CA directory.
pub const CA_KEY_FILE: &str = "ca.key";
/// Common name of the CA certificate.
pub const CA_COMMON_NAME: &str = "ocmesh federation CA";

const DAY: Duration = Duration::from_secs(86_400);
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * DAY.as_secs());
const SITE_VALIDITY: Duration = Duration::from_secs(2 * 365 * DAY.as_secs());
/// 9999-12-31T23:59:59Z: the last instant an X.509 GeneralizedTime (and the
/// date library under rcgen) can express; later times are refused up front
/// instead of failing deep inside certificate encoding.
const LAST_ENCODABLE_SECS: u64 = 253_402_300_799;

/// Paths written by [`init_ca`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaFiles {
    /// `dir/ca.pem`, the self-signed CA certificate.
    pub cert: PathBuf,
    /// `dir/ca.key`, the CA private key (PKCS#8 PEM, mode 0600 on unix).
    pub key: PathBuf,
}

/// Paths written by [`issue_site_cert`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteFiles {
    /// `dir/SITE.pem`, the site certificate signed by the CA.
    pub cert: PathBuf,
    /// `dir/SITE.key`, the site private key (PKCS#8 PEM, mode 0600 on unix).
    pub key: PathBuf,
}

/// Why creating the CA or issuing a site certificate failed.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// The site name is not a valid DNS label of the allowed alphabet.
    #[error("invalid site name {name:?}: {why}")]
    BadSiteName { name: String, why: &'static str },
    /// A file we would write is already there.
    #[error("{0} already exists; refusing to overwrite it")]
    Exists(PathBuf),
    /// A file we need is not there (for the CA: run `init_ca` first).
    #[error("{0} does not exist")]
    Missing(PathBuf),
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    /// The file is there but does not hold what it should (not PEM, wrong
    /// kind of PEM section, undecodable DER).
    #[error("{path} is not a usable {what}: {reason}")]
    Parse {
        path: PathBuf,
        what: &'static str,
        reason: String,
    },
    /// The CA certificate lacks the CA basic constraint, so peers would
    /// refuse every certificate it signed.
    #[error("{0} is not a CA certificate (its basic constraints do not allow signing certificates)")]
    NotCa(PathBuf),
    /// The CA key is not the key of the CA certificate, so anything signed
    /// with it would not verify.
    #[error("{key} is not the private key of the CA certificate {cert}")]
    CaKeyMismatch { cert: PathBuf, key: PathBuf },
    /// The CA certificate is outside its validity period.
    #[error("the CA certificate {path} is not valid now (valid {not_before} to {not_after})")]
    CaNotValid {
        path: PathBuf,
        not_before: String,
        not_after: String,
    },
    /// The requested validity period is empty or not encodable.
    #[error("invalid validity period: {0}")]
    BadValidity(&'static str),
    /// rcgen could not generate a key or build/sign a certificate.
    #[error("cannot make certificate: {0}")]
    Generate(#[from] rcgen::Error),
}

/// Checks a site name: 1 to 63 of lowercase ASCII letters, digits and '-',
/// not starting or ending with '-'.
///
/// The name goes into a DNS SAN and peers read it back as the site's
/// identity, so it must be exactly one DNS label, and lowercase only so two
/// spellings can never name the same site.
pub fn validate_site_name(name: &str) -> Result<(), CaError> {
    let bad = |why| {
        Err(CaError::BadSiteName {
            name: name.to_owned(),
            why,
        })
    };
    if name.is_empty() {
        return bad("it is empty");
    }
    if name.len() > 63 {
        return bad("it is longer than 63 characters");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return bad("only lowercase letters a-z, digits 0-9 and '-' are allowed");
    }
    if name.starts_with('-') || name.ends_with('-') {
        return bad("it may not start or end with '-'");
    }
    Ok(())
}

/// Creates `dir` if needed and writes a new CA into `dir/ca.pem` and
/// `dir/ca.key`, valid for ten years. Refuses if either file exists.
pub fn init_ca(dir: &Path) -> Result<CaFiles, CaError> {
    let files = CaFiles {
        cert: dir.join(CA_CERT_FILE),
        key: dir.join(CA_KEY_FILE),
    };
    refuse_existing(&[&files.cert, &files.key])?;
    std::fs::create_dir_all(dir).map_err(|source| CaError::Write {
        path: dir.to_path_buf(),
        source,
    })?;

    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, CA_COMMON_NAME);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let (not_before, not_after) = window_from_now(CA_VALIDITY)?;
    params.not_before = not_before.into();
    params.not_after = not_after.into();

    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    write_pair(&files.cert, &cert.pem(), &files.key, &key.serialize_pem())?;
    Ok(files)
}

/// Issues a certificate for `site` signed by the CA in `dir`, valid for two
/// years from now, into `dir/SITE.pem` and `dir/SITE.key`.
pub fn issue_site_cert(dir: &Path, site: &str) -> Result<SiteFiles, CaError> {
    let (not_before, not_after) = window_from_now(SITE_VALIDITY)?;
    issue_site_cert_with_validity(dir, site, not_before, not_after)
}

/// Like [`issue_site_cert`] with an explicit validity period, so operators
/// can issue short-lived certificates and tests can make expired ones.
pub fn issue_site_cert_with_validity(
    dir: &Path,
    site: &str,
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<SiteFiles, CaError> {
    validate_site_name(site)?;
    check_encodable(not_before)?;
    check_encodable(not_after)?;
    if not_after <= not_before {
        return Err(CaError::BadValidity("not_after must be later than not_before"));
    }
    let issuer = load_issuer(dir)?;
    let files = SiteFiles {
        cert: dir.join(format!("{site}.pem")),
        key: dir.join(format!("{site}.key")),
    };
    refuse_existing(&[&files.cert, &files.key])?;

    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, site);
    params.subject_alt_names = vec![SanType::DnsName(site.try_into()?)];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    params.not_before = not_before.into();
    params.not_after = not_after.into();

    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    write_pair(&files.cert, &cert.pem(), &files.key, &key.serialize_pem())?;
    Ok(files)
}

/// Loads `dir/ca.pem` and `dir/ca.key` and checks them before signing with
/// them: rcgen's `Issuer` trusts its input, and a certificate signed by a
/// non-CA, a mismatched key or an expired CA would only fail later, at
/// every peer's handshake, with a far less helpful message.
fn load_issuer(dir: &Path) -> Result<Issuer<'static, KeyPair>, CaError> {
    let cert_path = dir.join(CA_CERT_FILE);
    let key_path = dir.join(CA_KEY_FILE);
    let cert_pem = read(&cert_path)?;
    let key_pem = read(&key_path)?;

    let parse_err = |path: &Path, what, reason: String| CaError::Parse {
        path: path.to_path_buf(),
        what,
        reason,
    };
    let cert_der = CertificateDer::from_pem_slice(&cert_pem).map_err(|e| {
        let reason = match e {
            rustls_pki_types::pem::Error::NoItemsFound => "no PEM CERTIFICATE section in it".to_owned(),
            e => e.to_string(),
        };
        parse_err(&cert_path, "CA certificate (PEM)", reason)
    })?;
    let key_text = std::str::from_utf8(&key_pem)
        .map_err(|_| parse_err(&key_path, "CA private key (PEM)", "the file is not text".into()))?;
    let key = KeyPair::from_pem(key_text).map_err(|e| parse_err(&key_path, "CA private key (PEM)", e.to_string()))?;

    let (_, parsed) = x509_parser::parse_x509_certificate(cert_der.as_ref())
        .map_err(|e| parse_err(&cert_path, "CA certificate", e.to_string()))?;
    if !parsed.is_ca() {
        return Err(CaError::NotCa(cert_path));
    }
    if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err(CaError::CaKeyMismatch {
            cert: cert_path,
            key: key_path,
        });
    }
    let validity = parsed.validity();
    if !validity.is_valid() {
        return Err(CaError::CaNotValid {
            path: cert_path,
            not_before: validity.not_before.to_string(),
            not_after: validity.not_after.to_string(),
        });
    }
    Issuer::from_ca_cert_der(&cert_der, key).map_err(|e| parse_err(&cert_path, "CA certificate", e.to_string()))
}

/// `[now - 1 day, now + validity]`: the day of slack lets a peer whose
/// clock runs a little behind accept a certificate issued just now.
fn window_from_now(validity: Duration) -> Result<(SystemTime, SystemTime), CaError> {
    let now = SystemTime::now();
    let not_before = now.checked_sub(DAY).unwrap_or(now);
    let not_after = now.checked_add(validity).ok_or(CaError::BadValidity(
        "the end of the validity period overflows the clock",
    ))?;
    check_encodable(not_after)?;
    Ok((not_before, not_after))
}

fn check_encodable(t: SystemTime) -> Result<(), CaError> {
    match t.duration_since(UNIX_EPOCH) {
        Err(_) => Err(CaError::BadValidity("times before 1970 are not supported")),
        Ok(d) if d.as_secs() > LAST_ENCODABLE_SECS => Err(CaError::BadValidity("times after 9999 cannot be encoded")),
        Ok(_) => Ok(()),
    }
}

fn refuse_existing(paths: &[&Path]) -> Result<(), CaError> {
    match paths.iter().find(|p| p.exists()) {
        Some(p) => Err(CaError::Exists(p.to_path_buf())),
        None => Ok(()),
    }
}

fn read(path: &Path) -> Result<Vec<u8>, CaError> {
    std::fs::read(path).map_err(|source| match source.kind() {
        ErrorKind::NotFound => CaError::Missing(path.to_path_buf()),
        _ => CaError::Read {
            path: path.to_path_buf(),
            source,
        },
    })
}

/// Writes the key (private) then the certificate. If the certificate
/// cannot be written the key is removed again, so a failed run leaves no
/// half pair behind that would block the retry.
fn write_pair(cert_path: &Path, cert_pem: &str, key_path: &Path, key_pem: &str) -> Result<(), CaError> {
    write_new(key_path, key_pem, true)?;
    if let Err(e) = write_new(cert_path, cert_pem, false) {
        if let Err(rm) = std::fs::remove_file(key_path) {
            tracing::warn!(path = %key_path.display(), error = %rm, "cannot remove key after failed certificate write");
        }
        return Err(e);
    }
    Ok(())
}

/// Creates `path` exclusively (`create_new`), so a file that appeared
/// after our existence check is still never overwritten; private keys get
/// mode 0600 from the start rather than after a window of wider access.
fn write_new(path: &Path, contents: &str, secret: bool) -> Result<(), CaError> {
    let err = |source: std::io::Error| match source.kind() {
        ErrorKind::AlreadyExists => CaError::Exists(path.to_path_buf()),
        _ => CaError::Write {
            path: path.to_path_buf(),
            source,
        },
    };
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = secret;
    let mut f = opts.open(path).map_err(err)?;
    let written = std::io::Write::write_all(&mut f, contents.as_bytes()).and_then(|()| f.sync_all());
    if let Err(source) = written {
        // The file is ours (create_new succeeded) but incomplete: remove it.
        let _ = std::fs::remove_file(path);
        return Err(err(source));
    }
    Ok(())
}
