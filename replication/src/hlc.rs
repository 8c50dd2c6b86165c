//! Hybrid logical clock (Kulkarni et al.): timestamps that follow physical
//! time closely but never go backwards and always exceed every timestamp a
//! site has seen, so causally later writes sort later everywhere.
//!
//! The clock never reads time itself: callers pass the physical time in
//! milliseconds since the Unix epoch.

use std::fmt;

/// Bits of the logical counter in a packed timestamp.
const LOGICAL_BITS: u32 = 16;
const LOGICAL_MASK: u64 = (1 << LOGICAL_BITS) - 1;
/// Largest physical millisecond value a timestamp can carry (48 bits: year 10889).
pub const MAX_PHYSICAL_MS: u64 = u64::MAX >> LOGICAL_BITS;

/// A packed HLC timestamp: physical milliseconds in the upper 48 bits, a
/// logical counter in the lower 16. Ordering of the packed value is the HLC
/// order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(u64);

impl Timestamp {
    /// Builds a timestamp; physical time above 48 bits saturates.
    pub const fn new(physical_ms: u64, logical: u16) -> Self {
        let ms = if physical_ms > MAX_PHYSICAL_MS {
            MAX_PHYSICAL_MS
        } else {
            physical_ms
        };
        Timestamp((ms << LOGICAL_BITS) | logical as u64)
    }

    /// Reinterprets a packed value (as carried on the wire).
    pub const fn from_raw(raw: u64) -> Self {
        Timestamp(raw)
    }

    /// The packed value.
    pub const fn raw(self) -> u64 {
        self.0
    }

    /// Physical part, milliseconds since the Unix epoch.
    pub const fn physical_ms(self) -> u64 {
        self.0 >> LOGICAL_BITS
    }

    /// Logical counter.
    pub const fn logical(self) -> u16 {
        (self.0 & LOGICAL_MASK) as u16
    }

    /// The next timestamp after this one: the counter advances, and when it
    /// is exhausted the physical part moves one millisecond on.
    fn successor(self) -> Self {
        Timestamp(self.0.saturating_add(1))
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.physical_ms(), self.logical())
    }
}

/// What observing a remote timestamp did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Observed {
    /// The clock's new reading.
    pub now: Timestamp,
    /// The remote timestamp was further ahead of our physical time than the
    /// allowed drift; the clock advanced only to the drift bound. The
    /// caller should log and count this: the sender's clock is wrong.
    pub clamped: bool,
}

/// A site's hybrid logical clock.
#[derive(Clone, Debug)]
pub struct Clock {
    last: Timestamp,
    max_drift_ms: u64,
}

impl Clock {
    /// A fresh clock that lets remote timestamps pull it at most
    /// `max_drift_ms` ahead of local physical time.
    pub fn new(max_drift_ms: u64) -> Self {
        Self::resume(Timestamp::default(), max_drift_ms)
    }

    /// A clock that continues after `last` (read back from durable state),
    /// so a restart with a clock set backwards never reissues a timestamp.
    pub fn resume(last: Timestamp, max_drift_ms: u64) -> Self {
        Clock { last, max_drift_ms }
    }

    /// The most recent timestamp issued or observed.
    pub fn last(&self) -> Timestamp {
        self.last
    }

    /// A timestamp for a local event at physical time `physical_ms`:
    /// strictly greater than every timestamp before it.
    pub fn now(&mut self, physical_ms: u64) -> Timestamp {
        let wall = Timestamp::new(physical_ms, 0);
        self.last = if wall > self.last { wall } else { self.last.successor() };
        self.last
    }

    /// Takes in a timestamp received from another site and returns a reading
    /// strictly greater than both it and every earlier reading, unless the
    /// remote timestamp lies beyond the drift bound: then the clock moves
    /// only up to the bound and the result says so.
    pub fn observe(&mut self, remote: Timestamp, physical_ms: u64) -> Observed {
        let bound = Timestamp::new(physical_ms.saturating_add(self.max_drift_ms), u16::MAX);
        let clamped = remote > bound;
        let remote = remote.min(bound);
        let wall = Timestamp::new(physical_ms, 0);
        let base = self.last.max(remote);
        self.last = if wall > base { wall } else { base.successor() };
        Observed {
            now: self.last,
            clamped,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const DRIFT: u64 = 500;

    #[derive(Clone, Debug)]
    enum Event {
        Local {
            advance_ms: u64,
        },
        Remote {
            advance_ms: u64,
            remote_offset_ms: i64,
            logical: u16,
        },
    }

    fn event() -> impl Strategy<Value = Event> {
        prop_oneof![
            (0u64..5).prop_map(|advance_ms| Event::Local { advance_ms }),
            (0u64..5, -2_000i64..2_000, any::<u16>()).prop_map(|(advance_ms, remote_offset_ms, logical)| {
                Event::Remote {
                    advance_ms,
                    remote_offset_ms,
                    logical,
                }
            }),
        ]
    }

    proptest! {
        /// Every reading is strictly greater than the one before, whatever
        /// physical time and remote timestamps do; a reading is never behind
        /// a remote timestamp within the drift bound; and the clock is never
        /// further ahead of physical time than the drift bound (plus the
        /// logical-counter overflow, at most one millisecond per 65,536 events).
        #[test]
        fn monotonic_causal_and_bounded(start in 1_000_000u64..2_000_000, events in proptest::collection::vec(event(), 1..200)) {
            let mut clock = Clock::new(DRIFT);
            let mut physical = start;
            let mut prev = clock.last();
            for ev in events {
                let reading = match ev {
                    Event::Local { advance_ms } => {
                        physical += advance_ms;
                        clock.now(physical)
                    }
                    Event::Remote { advance_ms, remote_offset_ms, logical } => {
                        physical += advance_ms;
                        let remote_ms = physical.saturating_add_signed(remote_offset_ms);
                        let remote = Timestamp::new(remote_ms, logical);
                        let obs = clock.observe(remote, physical);
                        if remote_ms <= physical + DRIFT {
                            prop_assert!(obs.now > remote, "behind a received timestamp");
                            prop_assert!(!obs.clamped);
                        } else {
                            prop_assert!(obs.clamped);
                        }
                        obs.now
                    }
                };
                prop_assert!(reading > prev, "not monotonic: {reading} after {prev}");
                prop_assert!(reading.physical_ms() <= physical + DRIFT + 1, "drifted: {reading} at {physical}");
                prev = reading;
            }
        }

        /// Packing round-trips.
        #[test]
        fn packing(ms in 0u64..MAX_PHYSICAL_MS, logical in any::<u16>()) {
            let t = Timestamp::new(ms, logical);
            prop_assert_eq!(t.physical_ms(), ms);
            prop_assert_eq!(t.logical(), logical);
            prop_assert_eq!(Timestamp::from_raw(t.raw()), t);
        }
    }

    #[test]
    fn resumes_after_clock_goes_backwards() {
        let mut clock = Clock::new(DRIFT);
        let before = clock.now(10_000);
        let mut restarted = Clock::resume(before, DRIFT);
        let after = restarted.now(5_000);
        assert!(after > before);
    }

    #[test]
    fn follows_physical_time_when_it_moves_on() {
        let mut clock = Clock::new(DRIFT);
        clock.now(1_000);
        assert_eq!(clock.now(2_000), Timestamp::new(2_000, 0));
        assert_eq!(clock.now(2_000), Timestamp::new(2_000, 1));
    }

    #[test]
    fn logical_overflow_moves_to_next_millisecond() {
        let mut clock = Clock::resume(Timestamp::new(7, u16::MAX), DRIFT);
        assert_eq!(clock.now(7), Timestamp::new(8, 0));
    }
}
