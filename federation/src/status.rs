//! What the mesh reports about its peers.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use serde::Serialize;

/// One configured or connected peer, as `GET /api/v1/mesh/peers` shows it.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct PeerStatus {
    /// Site name from the peer's certificate; `None` before first contact.
    pub site: Option<String>,
    /// The address we dial, or the address it connected from.
    pub address: String,
    /// `outbound` for configured peers we dial, `inbound` for peers that dialed us.
    pub direction: &'static str,
    pub connected: bool,
    /// Changes this site holds that the peer has not acknowledged.
    pub unacked: u64,
    /// Changes sent and received in the current or last session.
    pub changes_sent: u64,
    pub changes_received: u64,
    /// UDP bytes the connection sent and received, QUIC and TLS included
    /// (quinn's counters for the current or last connection).
    pub wire_bytes_sent: u64,
    pub wire_bytes_received: u64,
    /// Packets quinn declared lost (and resent) on that connection.
    pub wire_packets_lost: u64,
    /// Changes withheld from the peer (sent as stubs: its share settings
    /// or their `_acl` keep them from it), stubs received from it, and
    /// changes sent in full because its hello listed them as withheld, in
    /// the current or last session.
    pub changes_withheld: u64,
    pub stubs_received: u64,
    pub refilled: u64,
    /// The last reason a connection attempt or session ended, if any.
    pub last_error: Option<String>,
}

/// Shared table of peer statuses, keyed by a stable slot name.
#[derive(Debug, Clone, Default)]
pub struct PeerTable {
    inner: Arc<Mutex<BTreeMap<String, PeerStatus>>>,
}

impl PeerTable {
    /// All peers, ordered by slot.
    pub fn snapshot(&self) -> Vec<PeerStatus> {
        self.inner
            .lock()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Changes the entry for `slot`, creating it from `init` if absent.
    pub fn update(&self, slot: &str, init: impl FnOnce() -> PeerStatus, f: impl FnOnce(&mut PeerStatus)) {
        if let Ok(mut m) = self.inner.lock() {
            f(m.entry(slot.to_owned()).or_insert_with(init));
        }
    }

    pub fn remove(&self, slot: &str) {
        if let Ok(mut m) = self.inner.lock() {
            m.remove(slot);
        }
    }
}
