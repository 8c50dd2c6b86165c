//! A site in memory, following the node's rules: per-origin logs that only
//! grow by the next sequence number, per-document histories ordered by
//! `VersionKey`, the greatest version current (a delete means gone), and an
//! HLC fed by the site's skewed physical clock.

use std::collections::BTreeMap;
use std::hash::Hasher;

use ocmesh_replication::{Change, ChangeKind, Clock, FetchRequest, Timestamp, VersionKey, VersionVector};

/// How far ahead of a site's clock a peer's timestamp may pull it.
const MAX_DRIFT_MS: u64 = 60_000;

/// One simulated site's durable state and clock.
#[derive(Debug, Clone)]
pub struct Replica {
    pub name: String,
    clock: Clock,
    logs: BTreeMap<String, Vec<Change>>,
    /// (collection, id) → versions in order, value = (origin, seq).
    histories: BTreeMap<(String, String), BTreeMap<VersionKey, (String, u64)>>,
    pub duplicates: u64,
}

impl Replica {
    pub fn new(name: &str) -> Self {
        Replica {
            name: name.to_owned(),
            clock: Clock::new(MAX_DRIFT_MS),
            logs: BTreeMap::new(),
            histories: BTreeMap::new(),
            duplicates: 0,
        }
    }

    pub fn vv(&self) -> VersionVector {
        self.logs.iter().map(|(o, l)| (o.clone(), l.len() as u64)).collect()
    }

    pub fn change(&self, origin: &str, seq: u64) -> Option<&Change> {
        let i = usize::try_from(seq).ok()?.checked_sub(1)?;
        self.logs.get(origin)?.get(i)
    }

    /// A local write of `body` to document `id` (a delete when `delete`).
    pub fn write(&mut self, id: &str, body: &[u8], delete: bool, physical_ms: u64) -> Change {
        let hlc = self.clock.now(physical_ms);
        let seq = self.logs.get(&self.name).map_or(0, |l| l.len() as u64) + 1;
        let exists = self.current(id).is_some();
        let kind = match (delete, exists) {
            (true, _) => ChangeKind::Delete,
            (false, true) => ChangeKind::Update,
            (false, false) => ChangeKind::Insert,
        };
        let change = Change {
            origin: self.name.clone(),
            seq,
            hlc: hlc.raw(),
            kind: kind as i32,
            collection: "entities".into(),
            doc_id: id.to_owned(),
            body: body.to_vec(),
            author: "sim".into(),
        };
        self.append(change.clone());
        change
    }

    fn append(&mut self, c: Change) {
        let key = VersionKey::of(&c);
        let doc = (c.collection.clone(), c.doc_id.clone());
        self.histories
            .entry(doc)
            .or_default()
            .insert(key, (c.origin.clone(), c.seq));
        self.logs.entry(c.origin.clone()).or_default().push(c);
    }

    /// Applies a peer's batch as the node does: duplicates skipped, a gap
    /// or a change under our own name refuses the whole batch.
    /// Returns how many changes were new here.
    pub fn apply(&mut self, changes: Vec<Change>, physical_ms: u64) -> Result<usize, String> {
        let mut expect = self.vv();
        let mut fresh = Vec::new();
        for c in changes {
            ocmesh_replication::change::validate(&c).map_err(|e| e.to_string())?;
            let held = expect.get(&c.origin);
            if c.seq <= held {
                self.duplicates += 1;
                continue;
            }
            if c.origin == self.name {
                return Err(format!("change {} under our own name", c.seq));
            }
            if c.seq != held + 1 {
                return Err(format!("gap: {}:{} after {held}", c.origin, c.seq));
            }
            expect.advance(&c.origin, c.seq);
            fresh.push(c);
        }
        let n = fresh.len();
        for c in fresh {
            self.clock.observe(Timestamp::from_raw(c.hlc), physical_ms);
            self.append(c);
        }
        Ok(n)
    }

    /// The log read a session asks for.
    pub fn fetch(&self, req: &FetchRequest) -> Vec<Change> {
        let mut out = Vec::new();
        let mut bytes = 0;
        for (origin, log) in &self.logs {
            for c in log.iter().skip(req.after.get(origin) as usize) {
                if out.len() >= req.max_changes || (!out.is_empty() && bytes + c.body.len() > req.max_bytes) {
                    return out;
                }
                bytes += c.body.len();
                out.push(c.clone());
            }
        }
        out
    }

    /// The current body of `id`, `None` if absent or deleted.
    pub fn current(&self, id: &str) -> Option<&[u8]> {
        let history = self.histories.get(&("entities".to_owned(), id.to_owned()))?;
        let (_, (origin, seq)) = history.iter().next_back()?;
        let c = self.change(origin, *seq)?;
        (c.kind != ChangeKind::Delete as i32).then_some(c.body.as_slice())
    }

    /// A stable digest of everything a user could read: every document's
    /// history in version order (so also the current state).
    pub fn digest(&self) -> u64 {
        let mut h = Fnv64::default();
        for ((coll, id), versions) in &self.histories {
            h.write(coll.as_bytes());
            h.write(id.as_bytes());
            for (key, (origin, seq)) in versions {
                h.write_u64(key.hlc.raw());
                h.write(key.origin.as_bytes());
                if let Some(c) = self.change(origin, *seq) {
                    h.write_i32(c.kind);
                    h.write(&c.body);
                }
            }
        }
        h.finish()
    }

    /// Drops one version from a history: for testing that checkers catch it.
    pub fn corrupt_drop_version(&mut self, id: &str) -> bool {
        self.histories
            .get_mut(&("entities".to_owned(), id.to_owned()))
            .is_some_and(|h| h.pop_first().is_some())
    }

    /// Every document id with history here.
    pub fn documents(&self) -> impl Iterator<Item = &str> {
        self.histories.keys().map(|(_, id)| id.as_str())
    }

    pub fn history_len(&self, id: &str) -> usize {
        self.histories
            .get(&("entities".to_owned(), id.to_owned()))
            .map_or(0, |h| h.len())
    }
}

/// FNV-1a, 64 bit: stable across runs and platforms.
#[derive(Debug)]
struct Fnv64(u64);

impl Default for Fnv64 {
    fn default() -> Self {
        Fnv64(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for Fnv64 {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
        // Length-delimit fields so ("ab","c") and ("a","bc") differ.
        self.0 ^= bytes.len() as u64;
        self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrent_writes_pick_the_same_winner_in_any_order() {
        let (mut a, mut b) = (Replica::new("a"), Replica::new("b"));
        let ca = a.write("d1", b"from a", false, 1_000);
        let cb = b.write("d1", b"from b", false, 1_000);
        a.apply(vec![cb], 1_001).expect("a");
        b.apply(vec![ca], 1_001).expect("b");
        assert_eq!(a.digest(), b.digest());
        assert_eq!(a.current("d1"), Some(&b"from b"[..]), "equal HLC: origin b sorts last");
        assert_eq!(a.history_len("d1"), 2);
    }

    #[test]
    fn digest_sees_a_missing_version() {
        let (mut a, mut b) = (Replica::new("a"), Replica::new("b"));
        let c1 = a.write("d1", b"1", false, 10);
        let c2 = a.write("d1", b"2", false, 11);
        b.apply(vec![c1, c2], 12).expect("apply");
        assert_eq!(a.digest(), b.digest());
        assert!(b.corrupt_drop_version("d1"));
        assert_ne!(a.digest(), b.digest());
    }

    #[test]
    fn gaps_are_refused_whole() {
        let mut a = Replica::new("a");
        let c1 = a.write("d1", b"1", false, 10);
        let _c2 = a.write("d1", b"2", false, 11);
        let c3 = a.write("d1", b"3", true, 12);
        let mut b = Replica::new("b");
        assert!(b.apply(vec![c1, c3], 13).is_err());
        assert_eq!(b.vv().total(), 0);
    }
}
