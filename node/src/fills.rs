//! Notices of refills: peers' changes that replaced withheld stubs this
//! site held (see `ocmesh_replication::withheld`). A refilled change lands
//! below the version vector, so readers that follow the vector (watches)
//! never see it come; they follow these notices as well.
//!
//! The last `KEPT` groups of refills are kept with a generation number; a
//! reader that fell further behind learns that it missed some.

use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};

use ocmesh_replication::RangeSet;
use tokio::sync::watch;

/// Refill groups remembered for readers that are behind.
const KEPT: usize = 64;

/// What a reader behind `generation` has not seen yet.
#[derive(Debug, Default)]
pub struct FillsSince {
    pub generation: u64,
    pub ranges: RangeSet,
    /// Refill groups that were forgotten before this reader asked.
    pub missed: u64,
}

#[derive(Debug)]
pub(crate) struct FillNotices {
    recent: Mutex<VecDeque<(u64, RangeSet)>>,
    generation: watch::Sender<u64>,
}

impl Default for FillNotices {
    fn default() -> Self {
        FillNotices {
            recent: Mutex::new(VecDeque::new()),
            generation: watch::Sender::new(0),
        }
    }
}

impl FillNotices {
    /// After a durable commit that refilled `ranges`.
    pub fn record(&self, ranges: RangeSet) {
        if ranges.is_empty() {
            return;
        }
        let mut recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
        let generation = *self.generation.borrow() + 1;
        recent.push_back((generation, ranges));
        while recent.len() > KEPT {
            recent.pop_front();
        }
        self.generation.send_replace(generation);
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    pub fn since(&self, seen: u64) -> FillsSince {
        let recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
        let mut out = FillsSince {
            generation: *self.generation.borrow(),
            ..FillsSince::default()
        };
        let oldest = recent.front().map_or(out.generation + 1, |(g, _)| *g);
        out.missed = oldest.saturating_sub(seen + 1);
        for (_, ranges) in recent.iter().filter(|(g, _)| *g > seen) {
            for (origin, first, last) in ranges.ranges() {
                out.ranges.insert_range(origin, first, last);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(origin: &str, seq: u64) -> RangeSet {
        let mut r = RangeSet::new();
        r.insert(origin, seq);
        r
    }

    #[test]
    fn readers_get_what_came_after_them_and_learn_what_they_missed() {
        let notices = FillNotices::default();
        notices.record(RangeSet::new());
        assert_eq!(notices.since(0).generation, 0, "an empty refill is no notice");
        notices.record(one("a", 3));
        notices.record(one("b", 7));
        let s = notices.since(1);
        assert_eq!((s.generation, s.missed), (2, 0));
        assert!(s.ranges.contains("b", 7) && !s.ranges.contains("a", 3));
        for n in 0..KEPT as u64 + 5 {
            notices.record(one("c", n));
        }
        let s = notices.since(2);
        assert_eq!(s.missed, 5, "five groups fell out before this reader asked");
        assert!(s.ranges.contains("c", 5) && !s.ranges.contains("c", 4));
        assert_eq!(notices.since(s.generation).ranges.len(), 0);
    }
}
