//! The federation CA: one self-signed CA per mesh, and a certificate per
//! site signed by it, naming the site in its CN and DNS SAN and good for
//! both ends of a TLS connection (sites dial and accept).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

const CA_CERT: &str = "ca.pem";
const CA_KEY: &str = "ca.key";
const CA_NAME: &str = "ocmesh federation CA";
const DAY: Duration = Duration::from_secs(86_400);
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 86_400);
const SITE_VALIDITY: Duration = Duration::from_secs(2 * 365 * 86_400);

/// Paths written by `init_ca`.
#[derive(Debug, Clone)]
pub struct CaFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Paths written by `issue_site_cert`.
#[derive(Debug, Clone)]
pub struct SiteFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Why a CA operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("invalid site name {name:?}: {why}")]
    BadSiteName { name: String, why: &'static str },
    #[error("{0} already exists; refusing to overwrite it")]
    Exists(PathBuf),
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a usable {what}: {reason}")]
    Parse {
        path: PathBuf,
        what: &'static str,
        reason: String,
    },
    #[error("cannot make certificate: {0}")]
    Generate(#[from] rcgen::Error),
}

/// Site names: 1 to 63 of lowercase ASCII letters, digits and '-', not
/// starting or ending with '-' (a DNS label, so it fits a SAN).
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
        return bad("use only lowercase letters, digits and '-'");
    }
    if name.starts_with('-') || name.ends_with('-') {
        return bad("it may not start or end with '-'");
    }
    Ok(())
}

fn refuse_existing(paths: &[&Path]) -> Result<(), CaError> {
    match paths.iter().find(|p| p.exists()) {
        Some(p) => Err(CaError::Exists(p.to_path_buf())),
        None => Ok(()),
    }
}

fn write(path: &Path, contents: &str, secret: bool) -> Result<(), CaError> {
    let err = |source| CaError::Write {
        path: path.to_path_buf(),
        source,
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
    std::io::Write::write_all(&mut f, contents.as_bytes()).map_err(err)
}

fn read(path: &Path) -> Result<String, CaError> {
    std::fs::read_to_string(path).map_err(|source| CaError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Creates `dir` if needed and writes a new CA into `dir/ca.pem` and `dir/ca.key`.
pub fn init_ca(dir: &Path) -> Result<CaFiles, CaError> {
    let files = CaFiles {
        cert: dir.join(CA_CERT),
        key: dir.join(CA_KEY),
    };
    refuse_existing(&[&files.cert, &files.key])?;
    std::fs::create_dir_all(dir).map_err(|source| CaError::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, CA_NAME);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = SystemTime::now();
    params.not_before = (now - DAY).into();
    params.not_after = (now + CA_VALIDITY).into();
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    write(&files.key, &key.serialize_pem(), true)?;
    write(&files.cert, &cert.pem(), false)?;
    Ok(files)
}

/// Issues a certificate for `site`, valid for two years from now.
pub fn issue_site_cert(dir: &Path, site: &str) -> Result<SiteFiles, CaError> {
    let now = SystemTime::now();
    issue_site_cert_with_validity(dir, site, now - DAY, now + SITE_VALIDITY)
}

/// Issues a certificate for `site` valid from `not_before` to `not_after`
/// into `dir/SITE.pem` and `dir/SITE.key`, signed by the CA in `dir`.
pub fn issue_site_cert_with_validity(
    dir: &Path,
    site: &str,
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<SiteFiles, CaError> {
    validate_site_name(site)?;
    let ca_cert_path = dir.join(CA_CERT);
    let ca_key_path = dir.join(CA_KEY);
    let ca_key = KeyPair::from_pem(&read(&ca_key_path)?).map_err(|e| CaError::Parse {
        path: ca_key_path.clone(),
        what: "CA private key",
        reason: e.to_string(),
    })?;
    let issuer = Issuer::from_ca_cert_pem(&read(&ca_cert_path)?, ca_key).map_err(|e| CaError::Parse {
        path: ca_cert_path.clone(),
        what: "CA certificate",
        reason: e.to_string(),
    })?;
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
    write(&files.key, &key.serialize_pem(), true)?;
    write(&files.cert, &cert.pem(), false)?;
    Ok(files)
}
