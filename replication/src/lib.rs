//! ocmesh-replication: the sans-IO core of ocmesh's replication.
//!
//! - [`hlc`]: the hybrid logical clock that orders writes across sites.
//! - [`change`]: change records, their validation, and the version order
//!   (`VersionKey`: HLC, then origin) that picks a document's current version.
//! - [`merge`]: a document's current state and conflicts from its set of
//!   versions, field by field; [`acl_merge`]: `_acl` per principal.
//! - [`ownership`]: which versions of a work item count after a forced
//!   takeover moved it to another site.
//! - [`vv`]: version vectors, one contiguous sequence number per origin.
//! - [`session`]: the sync session state machine run on each side of a link.
//! - [`chunks`]: file chunks asked for and sent by content hash, inside a
//!   session.
//! - [`filter`]: whether a change may go to a given peer (its share
//!   settings and the `_acl` in the change's body); [`withheld`]: the
//!   sequences a site holds only as withheld stubs, as ranges.
//!
//! Invariants: nothing here performs I/O, reads a clock, or draws random
//! numbers; time comes in as arguments. Each origin numbers its changes
//! 1, 2, 3, ... without gaps, and a site holds, per origin, exactly the
//! prefix its version vector says. Applying a change twice is the same as
//! applying it once.

pub mod acl_merge;
pub mod change;
pub mod chunks;
pub mod filter;
pub mod hlc;
pub mod merge;
pub mod ownership;
pub mod session;
pub mod vv;
pub mod withheld;

pub use change::{Change, ChangeKind, VersionKey};
pub use filter::{AclMode, PeerPolicy, ShareConfig};
pub use hlc::{Clock, Timestamp};
pub use session::{FetchRequest, Input, Output, RangeRequest, SessionConfig, SessionError, SyncSession};
pub use vv::VersionVector;
pub use withheld::RangeSet;
