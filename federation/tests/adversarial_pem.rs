//! Certificates and keys that are damaged, truncated, swapped or made up:
//! `--ca`, `--cert` and `--key` files, and the DER a peer presents.
//!
//! Properties: loading an identity from any such files is an error naming
//! what was wrong (never a panic, never an identity); reading a site name
//! from any DER is a name or an error; and the untouched files still load.

use std::path::Path;

use ocmesh_federation::ca::{init_ca, issue_site_cert};
use ocmesh_federation::tls::{install_crypto_provider, load_identity, site_name_of};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

/// How a file is damaged.
#[derive(Debug, Clone)]
enum Damage {
    /// Cut after this many bytes (modulo the length).
    Truncate(usize),
    /// Flip bits at these offsets of the file.
    Flip(Vec<(usize, u8)>),
    /// Flip bits inside the DER, keeping the PEM armour valid.
    FlipDer(Vec<(usize, u8)>),
    /// Replace with other content.
    Replace(Vec<u8>),
    /// Put another of the files here.
    Swap(usize),
}

fn damage() -> impl Strategy<Value = Damage> {
    let flips = proptest::collection::vec((any::<usize>(), 1u8..=255), 1..4);
    prop_oneof![
        any::<usize>().prop_map(Damage::Truncate),
        flips.clone().prop_map(Damage::Flip),
        flips.prop_map(Damage::FlipDer),
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..200),
            Just(b"-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n".to_vec()),
            Just(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n".to_vec()),
            Just(b"-----BEGIN CERTIFICATE-----\nMIIB\n".to_vec()),
            "[A-Za-z0-9+/=\n]{0,120}"
                .prop_map(|b| format!("-----BEGIN CERTIFICATE-----\n{b}\n-----END CERTIFICATE-----\n").into_bytes()),
        ]
        .prop_map(Damage::Replace),
        (0usize..3).prop_map(Damage::Swap),
    ]
}

fn apply(damage: &Damage, files: &[Vec<u8>; 3], which: usize) -> Vec<u8> {
    let original = &files[which];
    match damage {
        Damage::Truncate(n) => original[..n % (original.len() + 1)].to_vec(),
        Damage::Flip(flips) => {
            let mut b = original.clone();
            for (at, bits) in flips {
                let i = at % b.len();
                b[i] ^= bits;
            }
            b
        }
        Damage::FlipDer(flips) => {
            // Damage the DER and armour it again, so the PEM layer passes it on.
            let text = String::from_utf8_lossy(original);
            let Some(begin) = text.lines().next() else {
                return original.clone();
            };
            let label = begin.trim_start_matches("-----BEGIN ").trim_end_matches("-----");
            let body: String = text.lines().filter(|l| !l.starts_with("-----")).collect();
            let Some(mut der) = base64_decode(&body) else {
                return original.clone();
            };
            for (at, bits) in flips {
                let i = at % der.len().max(1);
                if let Some(b) = der.get_mut(i) {
                    *b ^= bits;
                }
            }
            format!(
                "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
                base64_encode(&der)
            )
            .into_bytes()
        }
        Damage::Replace(b) => b.clone(),
        Damage::Swap(other) => files[*other].clone(),
    }
}

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn base64_encode(bytes: &[u8]) -> String {
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut acc = 0u32;
    let mut bits = 0;
    for c in text.bytes().filter(|&c| c != b'=') {
        let v = ALPHABET.iter().position(|&a| a == c)? as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

fn load(dir: &Path, files: &[Vec<u8>; 3]) -> Result<String, String> {
    let names = ["ca.pem", "site.pem", "site.key"];
    for (name, bytes) in names.iter().zip(files) {
        std::fs::write(dir.join(name), bytes).map_err(|e| e.to_string())?;
    }
    load_identity(&dir.join(names[0]), &dir.join(names[1]), &dir.join(names[2]))
        .map(|id| id.site().to_owned())
        .map_err(|e| e.to_string())
}

#[test]
fn damaged_identity_files_are_refused_by_name() {
    install_crypto_provider();
    let ca_dir = tempfile::tempdir().expect("tmp");
    let ca = init_ca(ca_dir.path()).expect("ca");
    let site = issue_site_cert(ca_dir.path(), "alpha").expect("site");
    let files: [Vec<u8>; 3] = [
        std::fs::read(&ca.cert).expect("ca"),
        std::fs::read(&site.cert).expect("cert"),
        std::fs::read(&site.key).expect("key"),
    ];
    let work = tempfile::tempdir().expect("tmp");
    assert_eq!(load(work.path(), &files), Ok("alpha".into()));

    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(256);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&(0usize..3, damage()), |(which, damage)| {
        let mut damaged = files.clone();
        damaged[which] = apply(&damage, &files, which);
        match load(work.path(), &damaged) {
            Ok(name) => {
                // Only a change that leaves the identity intact may load.
                prop_assert_eq!(name, "alpha");
            }
            Err(e) => prop_assert!(!e.is_empty()),
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    assert_eq!(load(work.path(), &files), Ok("alpha".into()));
}

#[test]
fn any_der_reads_as_a_site_name_or_an_error() {
    let ca_dir = tempfile::tempdir().expect("tmp");
    init_ca(ca_dir.path()).expect("ca");
    let site = issue_site_cert(ca_dir.path(), "alpha").expect("site");
    let der = CertificateDer::from_pem_file(&site.cert).expect("der").to_vec();
    assert_eq!(site_name_of(&CertificateDer::from(der.clone())).expect("name"), "alpha");
    let mut runner = TestRunner::new(Config {
        cases: 512,
        failure_persistence: None,
        ..Config::default()
    });
    let strategy = prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..300),
        (
            any::<usize>(),
            proptest::collection::vec((any::<usize>(), 1u8..=255), 1..5)
        )
            .prop_map(move |(cut, flips)| {
                let mut b = der.clone();
                for (at, bits) in flips {
                    let i = at % b.len();
                    b[i] ^= bits;
                }
                b.truncate(cut % (b.len() + 1));
                b
            }),
    ];
    let result = runner.run(&strategy, |bytes| {
        if let Err(e) = site_name_of(&CertificateDer::from(bytes)) {
            prop_assert!(!e.to_string().is_empty());
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}
