//! Names and identifiers: document ids (ObjectId strings), collection
//! names, and the ISO-8601 timestamps OpenCore puts in documents.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

use rand::Rng;

/// Why a name or id was refused.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum NameError {
    #[error("collection name is empty")]
    EmptyCollection,
    #[error("collection name {0:?} is longer than 120 characters")]
    LongCollection(String),
    #[error("collection name {name:?} contains {bad:?}; use letters, digits, '_', '-' and '.'")]
    BadCollectionChar { name: String, bad: char },
    #[error("collection name {0:?} may not start with 'system.' or '.'")]
    ReservedCollection(String),
    #[error("document id {0:?} is not an ObjectId: 24 hexadecimal characters")]
    BadId(String),
}

/// Checks a collection name: letters, digits, '_', '-', '.'; 1 to 120 long.
pub fn validate_collection(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::EmptyCollection);
    }
    if name.chars().count() > 120 {
        return Err(NameError::LongCollection(name.to_owned()));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
    {
        return Err(NameError::BadCollectionChar {
            name: name.to_owned(),
            bad,
        });
    }
    if name.starts_with("system.") || name.starts_with('.') {
        return Err(NameError::ReservedCollection(name.to_owned()));
    }
    Ok(())
}

/// Checks a document id: 24 hexadecimal characters, as a MongoDB ObjectId.
pub fn validate_id(id: &str) -> Result<(), NameError> {
    if id.len() == 24 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(())
    } else {
        Err(NameError::BadId(id.to_owned()))
    }
}

/// This process's ObjectId counter (starting at a random value, as
/// MongoDB's does).
static COUNTER: OnceLock<AtomicU32> = OnceLock::new();
/// This process's 5 random ObjectId bytes.
static PROCESS: OnceLock<[u8; 5]> = OnceLock::new();

/// A new ObjectId string, as MongoDB makes them: 4 bytes of seconds, 5
/// random bytes chosen once per process, a 3-byte counter. Ids made by one
/// process therefore ascend, so every B-tree keyed by them grows at its
/// right edge instead of splitting pages all over.
pub fn new_object_id(unix_secs: u64) -> String {
    let process = PROCESS.get_or_init(|| rand::rng().random());
    let c = COUNTER
        .get_or_init(|| AtomicU32::new(rand::rng().random()))
        .fetch_add(1, Ordering::Relaxed);
    object_id(unix_secs, process, c)
}

fn object_id(unix_secs: u64, process: &[u8; 5], counter: u32) -> String {
    let mut bytes = [0u8; 12];
    bytes[..4].copy_from_slice(&(unix_secs as u32).to_be_bytes());
    bytes[4..9].copy_from_slice(process);
    bytes[9..].copy_from_slice(&counter.to_be_bytes()[1..]);
    hex::encode(bytes)
}

/// Where a node's ids come from: the process's ObjectId source, or a
/// seeded one (simulations) so that one seed gives the same ids.
#[derive(Debug)]
pub(crate) struct IdGen {
    /// The seeded generator, this node's 5 ObjectId bytes and its counter.
    seeded: Option<(rand::rngs::StdRng, [u8; 5], u32)>,
}

impl IdGen {
    pub fn new(seed: Option<u64>) -> Self {
        use rand::SeedableRng;
        IdGen {
            seeded: seed.map(|s| {
                let mut rng = rand::rngs::StdRng::seed_from_u64(s);
                let process = rng.random();
                (rng, process, 0)
            }),
        }
    }

    /// `new_object_id`, from the seeded generator when there is one.
    pub fn object_id(&mut self, unix_secs: u64) -> String {
        let Some((_, process, counter)) = &mut self.seeded else {
            return new_object_id(unix_secs);
        };
        *counter = counter.wrapping_add(1);
        object_id(unix_secs, process, *counter)
    }

    /// 32 random bytes (a secret).
    pub fn secret(&mut self) -> [u8; 32] {
        match &mut self.seeded {
            Some((rng, ..)) => rng.random(),
            None => rand::random(),
        }
    }
}

/// Formats milliseconds since the Unix epoch as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub fn iso8601(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil-from-days (H. Hinnant), for the proleptic Gregorian calendar.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let (hour, minute, second, ms) = (rem / 3600, (rem % 3600) / 60, rem % 60, unix_ms % 1000);
    if !(0..=9999).contains(&year) {
        return format!("{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}.{ms:03}Z");
    }
    // Digit by digit: every write stamps two or three of these, and
    // `format!` cost the writer about 2% of its time.
    let mut out = *b"0000-00-00T00:00:00.000Z";
    let mut put = |at: usize, width: usize, mut n: u64| {
        for i in (at..at + width).rev() {
            out[i] = b'0' + (n % 10) as u8;
            n /= 10;
        }
    };
    put(0, 4, year as u64);
    put(5, 2, month as u64);
    put(8, 2, day as u64);
    put(11, 2, hour);
    put(14, 2, minute);
    put(17, 2, second);
    put(20, 3, ms);
    out.iter().map(|&b| char::from(b)).collect()
}

/// Parses `YYYY-MM-DDTHH:MM:SS[.fff]Z` (what `iso8601` writes, and what
/// OpenCore clients send) into milliseconds since the Unix epoch.
pub fn parse_iso8601(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' || b[16] != b':' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> { s.get(r)?.parse().ok() };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let rest = &s[19..];
    let (ms, tail) = match rest.strip_prefix('.') {
        Some(frac) => {
            let digits: String = frac.chars().take_while(|c| c.is_ascii_digit()).collect();
            let ms = format!("{digits:0<3}").get(..3)?.parse::<i64>().ok()?;
            (ms, &frac[digits.len()..])
        }
        None => (0, rest),
    };
    if tail != "Z" || !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    // Days-from-civil (H. Hinnant).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let total = ((days * 24 + h) * 60 + mi) * 60 + sec;
    u64::try_from(total * 1000 + ms).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso_round_trip() {
        for ms in [0u64, 951_782_400_123, 1_795_990_088_000, 4_102_444_800_999] {
            assert_eq!(parse_iso8601(&iso8601(ms)), Some(ms));
        }
        assert_eq!(parse_iso8601("2026-11-24T10:00:00Z"), Some(1_795_514_400_000));
        assert_eq!(parse_iso8601("2026-11-24 10:00:00Z"), None);
        assert_eq!(parse_iso8601("yesterday"), None);
    }

    #[test]
    fn collection_names() {
        assert!(validate_collection("entities").is_ok());
        assert!(validate_collection("fs.files").is_ok());
        assert!(matches!(
            validate_collection("bad$name"),
            Err(NameError::BadCollectionChar { bad: '$', .. })
        ));
        assert!(matches!(
            validate_collection("a b"),
            Err(NameError::BadCollectionChar { bad: ' ', .. })
        ));
        assert_eq!(validate_collection(""), Err(NameError::EmptyCollection));
        assert!(validate_collection("system.users").is_err());
        assert!(validate_collection(&"x".repeat(121)).is_err());
    }

    #[test]
    fn ids() {
        let id = new_object_id(1_700_000_000);
        assert!(validate_id(&id).is_ok());
        assert_ne!(id, new_object_id(1_700_000_000));
        assert!(validate_id("xyz").is_err());
        let seeded = |seed| {
            let mut g = IdGen::new(Some(seed));
            (g.object_id(1_700_000_000), g.object_id(1_700_000_000))
        };
        assert_eq!(seeded(5), seeded(5), "one seed, one sequence");
        assert_ne!(seeded(5), seeded(6));
        let (a, b) = seeded(5);
        assert!(validate_id(&a).is_ok() && a != b);
        // One source's ids ascend: time, its own 5 bytes, then a counter.
        assert!(a < b, "{a} {b}");
        let (x, y) = (new_object_id(1_700_000_000), new_object_id(1_700_000_001));
        assert_eq!(x[8..18], y[8..18], "one process, one middle part");
        assert!(x < y);
        assert!(validate_id("0123456789abcdef0123456g").is_err());
    }

    #[test]
    fn timestamps() {
        assert_eq!(iso8601(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(iso8601(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(iso8601(1_795_990_088_000), "2026-11-29T22:08:08.000Z");
        // Past year 9999 the year takes five digits.
        assert_eq!(iso8601(253_402_300_800_000), "10000-01-01T00:00:00.000Z");
    }

    proptest::proptest! {
        /// The digit-by-digit formatting writes what parsing reads back,
        /// field for field, across the whole four-digit-year range.
        #[test]
        fn timestamps_round_trip(ms in 0u64..253_402_300_800_000) {
            let s = iso8601(ms);
            proptest::prop_assert_eq!(s.len(), 24);
            proptest::prop_assert_eq!(parse_iso8601(&s), Some(ms));
        }
    }
}
