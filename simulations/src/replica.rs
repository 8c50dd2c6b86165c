//! A site in memory, following the node's rules (node/src/writer.rs): per-origin
//! logs that only grow by the next sequence number, per-document histories
//! ordered by `VersionKey`, the greatest version current (a delete means
//! gone), and an HLC fed by the site's skewed physical clock.
//!
//! Everything here is durable state: the node commits its clock reading with
//! every write and apply, so a restart resumes exactly this replica.

use std::collections::BTreeMap;
use std::hash::Hasher;

use ocmesh_replication::{Change, ChangeKind, Clock, FetchRequest, Timestamp, VersionKey, VersionVector};

/// How far ahead of a site's clock a peer's timestamp may pull it (the
/// node's `MAX_CLOCK_DRIFT_MS`).
const MAX_DRIFT_MS: u64 = 60_000;

/// One simulated site's durable state and clock.
#[derive(Debug, Clone)]
pub struct Replica {
    pub name: String,
    clock: Clock,
    logs: BTreeMap<String, Vec<Change>>,
    /// Length of every log, kept with them.
    vv: VersionVector,
    /// (collection, id) → versions in order, value = (origin, seq).
    histories: BTreeMap<(String, String), BTreeMap<VersionKey, (String, u64)>>,
    /// Received changes already held (relayed twice, or re-sent after a reconnect).
    pub duplicates: u64,
    /// Received changes stamped beyond the drift bound (the sender's clock is wrong).
    pub clock_clamped: u64,
}

impl Replica {
    pub fn new(name: &str) -> Self {
        Replica {
            name: name.to_owned(),
            clock: Clock::new(MAX_DRIFT_MS),
            logs: BTreeMap::new(),
            vv: VersionVector::new(),
            histories: BTreeMap::new(),
            duplicates: 0,
            clock_clamped: 0,
        }
    }

    /// What this site holds: per origin, the length of its log.
    pub fn vv(&self) -> &VersionVector {
        &self.vv
    }

    pub fn change(&self, origin: &str, seq: u64) -> Option<&Change> {
        let i = usize::try_from(seq).ok()?.checked_sub(1)?;
        self.logs.get(origin)?.get(i)
    }

    /// A local write of `body` to document `id`, as the node makes it: an
    /// insert if the document is absent (or deleted), else an update; a
    /// delete when `delete`, and then `None` if there is nothing to delete
    /// (the node answers "not found" and writes nothing).
    pub fn write(&mut self, id: &str, body: &[u8], delete: bool, physical_ms: u64) -> Option<Change> {
        let exists = self.current(id).is_some();
        let kind = match (delete, exists) {
            (true, false) => return None,
            (true, true) => ChangeKind::Delete,
            (false, true) => ChangeKind::Update,
            (false, false) => ChangeKind::Insert,
        };
        let hlc = self.clock.now(physical_ms);
        let seq = self.vv.get(&self.name) + 1;
        let change = Change {
            origin: self.name.clone(),
            seq,
            hlc: hlc.raw(),
            kind: kind as i32,
            collection: "entities".into(),
            doc_id: id.to_owned(),
            body: body.to_vec(),
            author: "sim".into(),
            ..Default::default()
        };
        self.append(change.clone());
        Some(change)
    }

    fn append(&mut self, c: Change) {
        let key = VersionKey::of(&c);
        let doc = (c.collection.clone(), c.doc_id.clone());
        self.histories
            .entry(doc)
            .or_default()
            .insert(key, (c.origin.clone(), c.seq));
        self.vv.advance(&c.origin, c.seq);
        self.logs.entry(c.origin.clone()).or_default().push(c);
    }

    /// Applies a peer's batch as the node does: duplicates skipped, a gap
    /// or a change under our own name refuses the whole batch.
    /// Returns how many changes were new here.
    pub fn apply(&mut self, changes: Vec<Change>, physical_ms: u64) -> Result<usize, String> {
        let mut expect = self.vv.clone();
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
            if self.clock.observe(Timestamp::from_raw(c.hlc), physical_ms).clamped {
                self.clock_clamped += 1;
            }
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

    fn history(&self, id: &str) -> Option<&BTreeMap<VersionKey, (String, u64)>> {
        self.histories.get(&("entities".to_owned(), id.to_owned()))
    }

    /// The current body of `id`, `None` if absent or deleted.
    pub fn current(&self, id: &str) -> Option<&[u8]> {
        let (_, (origin, seq)) = self.history(id)?.iter().next_back()?;
        let c = self.change(origin, *seq)?;
        (c.kind != ChangeKind::Delete as i32).then_some(c.body.as_slice())
    }

    /// The key of the current version of `id` (a delete included).
    pub fn current_version(&self, id: &str) -> Option<&VersionKey> {
        self.history(id)?.keys().next_back()
    }

    /// Every version of `id` held here, oldest first.
    pub fn versions(&self, id: &str) -> impl Iterator<Item = &VersionKey> {
        self.history(id).into_iter().flat_map(|h| h.keys())
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
        self.history(id).map_or(0, |h| h.len())
    }
}

impl crate::site::SimSite for Replica {
    fn create(scenario: &crate::Scenario, index: usize, _seed: u64, _physical: u64) -> Result<Self, String> {
        Ok(Replica::new(&scenario.sites[index].name))
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn vv(&self) -> VersionVector {
        self.vv.clone()
    }

    fn fetch(&mut self, req: &FetchRequest, _physical: u64) -> Result<Vec<Change>, String> {
        Ok(Replica::fetch(self, req))
    }

    fn apply(&mut self, changes: Vec<Change>, physical: u64) -> Result<crate::site::Applied, String> {
        let (dups, clamped) = (self.duplicates, self.clock_clamped);
        let fresh = Replica::apply(self, changes, physical)?;
        Ok(crate::site::Applied {
            fresh: fresh as u64,
            duplicates: self.duplicates - dups,
            clock_clamped: self.clock_clamped - clamped,
        })
    }

    /// A write of a random shared document (a delete now and then).
    fn act(&mut self, ctx: &mut crate::site::Ctx<'_>) -> Result<(), String> {
        use rand::Rng;
        let doc = ctx.rng.random_range(0..ctx.scenario.documents);
        let delete = ctx.rng.random_bool(ctx.scenario.delete_ratio);
        let id = format!("{doc:024x}");
        let body = format!("{{\"by\":\"{}\",\"n\":{}}}", self.name, ctx.journal.writes);
        if let Some(c) = self.write(&id, body.as_bytes(), delete, ctx.physical) {
            ctx.journal.acked.push((c.origin, c.seq));
            ctx.journal.writes += 1;
        }
        Ok(())
    }

    fn digest(&self) -> Result<u64, String> {
        Ok(Replica::digest(self))
    }

    fn check(sites: &[Self], journal: &crate::site::Journal, anomalies: &mut Vec<String>) {
        crate::engine::check(sites, &journal.acked, anomalies);
    }
}

/// FNV-1a, 64 bit: stable across runs and platforms.
#[derive(Debug)]
pub(crate) struct Fnv64(pub(crate) u64);

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
        let ca = a.write("d1", b"from a", false, 1_000).expect("insert");
        let cb = b.write("d1", b"from b", false, 1_000).expect("insert");
        a.apply(vec![cb], 1_001).expect("a");
        b.apply(vec![ca], 1_001).expect("b");
        assert_eq!(a.digest(), b.digest());
        assert_eq!(a.current("d1"), Some(&b"from b"[..]), "equal HLC: origin b sorts last");
        assert_eq!(a.history_len("d1"), 2);
    }

    #[test]
    fn digest_sees_a_missing_version() {
        let (mut a, mut b) = (Replica::new("a"), Replica::new("b"));
        let c1 = a.write("d1", b"1", false, 10).expect("insert");
        let c2 = a.write("d1", b"2", false, 11).expect("update");
        b.apply(vec![c1, c2], 12).expect("apply");
        assert_eq!(a.digest(), b.digest());
        assert!(b.corrupt_drop_version("d1"));
        assert_ne!(a.digest(), b.digest());
    }

    #[test]
    fn gaps_are_refused_whole() {
        let mut a = Replica::new("a");
        let c1 = a.write("d1", b"1", false, 10).expect("insert");
        let _c2 = a.write("d1", b"2", false, 11).expect("update");
        let c3 = a.write("d1", b"3", true, 12).expect("delete");
        let mut b = Replica::new("b");
        assert!(b.apply(vec![c1, c3], 13).is_err());
        assert_eq!(b.vv().total(), 0);
    }

    #[test]
    fn kinds_follow_the_node() {
        let mut a = Replica::new("a");
        assert!(a.write("d1", b"x", true, 10).is_none(), "nothing to delete");
        let kinds: Vec<i32> = [(false, 11), (false, 12), (true, 13), (false, 14)]
            .into_iter()
            .map(|(delete, t)| a.write("d1", b"x", delete, t).expect("a write").kind)
            .collect();
        let k = |k: ChangeKind| k as i32;
        let expected = [
            ChangeKind::Insert,
            ChangeKind::Update,
            ChangeKind::Delete,
            ChangeKind::Insert,
        ];
        assert_eq!(kinds, expected.map(k));
        assert_eq!(a.vv().get("a"), 4);
    }

    #[test]
    fn a_clock_far_ahead_is_clamped_and_counted() {
        let mut ahead = Replica::new("ahead");
        let c = ahead.write("d1", b"x", false, 10_000_000).expect("insert");
        let mut b = Replica::new("b");
        b.apply(vec![c], 1_000).expect("apply");
        assert_eq!(b.clock_clamped, 1);
    }
}
