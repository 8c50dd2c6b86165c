//! File chunks between two linked sites, by content hash, with no I/O.
//!
//! File documents replicate through the change log; their content does
//! not. A site that takes in a file document naming chunks it lacks asks
//! its peers for them by BLAKE3 hash. Since only missing chunks are asked
//! for, a chunk the receiver holds is never sent; since the asker checks
//! every chunk against its hash, a peer cannot plant other content.
//!
//! Bounds: at most [`MAX_WANTED`] chunks asked for and not yet answered,
//! at most [`MAX_WANTED`] hashes in one `ChunkWant`, and at most
//! [`MAX_SERVING`] reads owed to the peer; a peer that asks for more is
//! flooding and the session ends.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use ocmesh_proto::federation as pb;

use crate::session::SessionError;

/// Length of a chunk hash (BLAKE3).
pub const HASH_BYTES: usize = 32;
/// Most chunks asked for and not yet answered (each up to 256 KiB).
pub const MAX_WANTED: usize = 16;
/// Most chunk reads owed to the peer at once.
pub const MAX_SERVING: usize = 4 * MAX_WANTED;
/// How long a chunk the peer said it lacks is not asked for again.
pub const RETRY_MS: u64 = 5_000;

pub type Hash = [u8; HASH_BYTES];

/// What the chunk exchange asks of the shell.
#[derive(Debug, PartialEq, Eq)]
pub enum ChunkOutput {
    Send(pb::ChunkWant),
    /// Read this chunk from the local store (answer with `on_read`).
    Read(Hash),
    /// Store this chunk; its content matches its hash.
    Store(Hash, Vec<u8>),
}

/// Counters of one exchange.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChunkStats {
    pub chunks_sent: u64,
    pub chunk_bytes_sent: u64,
    pub chunks_received: u64,
    pub chunks_missing_at_peer: u64,
}

/// One side's chunk requests and the reads it owes the peer.
#[derive(Debug, Default)]
pub struct ChunkExchange {
    /// Asked for, not yet answered.
    asked: BTreeSet<Hash>,
    /// Wanted, waiting for room among `asked`.
    queued: VecDeque<Hash>,
    /// The peer said it lacks these: not asked again before the time given.
    declined: BTreeMap<Hash, u64>,
    /// Reads asked of the shell for the peer and not yet answered.
    serving: usize,
    stats: ChunkStats,
}

fn hash_of(bytes: &[u8]) -> Result<Hash, SessionError> {
    bytes
        .try_into()
        .map_err(|_| SessionError::BadChunkHash { len: bytes.len() })
}

impl ChunkExchange {
    pub fn stats(&self) -> &ChunkStats {
        &self.stats
    }

    /// True when nothing is asked for or waiting.
    pub fn is_idle(&self) -> bool {
        self.asked.is_empty() && self.queued.is_empty() && self.serving == 0
    }

    /// The shell's list of chunks this site lacks; asks for the new ones.
    pub fn want(&mut self, hashes: Vec<Hash>, now_ms: u64, out: &mut Vec<ChunkOutput>) {
        self.declined.retain(|_, until| *until > now_ms);
        for h in hashes {
            if !self.asked.contains(&h) && !self.declined.contains_key(&h) && !self.queued.contains(&h) {
                // Bounded: the shell hands over at most a page at a time.
                if self.queued.len() < 4 * MAX_WANTED {
                    self.queued.push_back(h);
                }
            }
        }
        self.ask(out);
    }

    fn ask(&mut self, out: &mut Vec<ChunkOutput>) {
        let mut hashes = Vec::new();
        while self.asked.len() < MAX_WANTED {
            let Some(h) = self.queued.pop_front() else { break };
            self.asked.insert(h);
            hashes.push(h.to_vec());
        }
        if !hashes.is_empty() {
            out.push(ChunkOutput::Send(pb::ChunkWant { hashes }));
        }
    }

    /// The peer asks for chunks: each becomes a read for the shell.
    pub fn on_want(&mut self, w: pb::ChunkWant, out: &mut Vec<ChunkOutput>) -> Result<(), SessionError> {
        if w.hashes.len() > MAX_WANTED || self.serving + w.hashes.len() > MAX_SERVING {
            return Err(SessionError::ChunkFlood {
                asked: w.hashes.len(),
                owed: self.serving,
            });
        }
        let hashes = w.hashes.iter().map(|h| hash_of(h)).collect::<Result<Vec<_>, _>>()?;
        self.serving += hashes.len();
        out.extend(hashes.into_iter().map(ChunkOutput::Read));
        Ok(())
    }

    /// The shell's answer to `Read`: the frame to send the peer.
    pub fn on_read(&mut self, hash: Hash, data: Option<Vec<u8>>) -> pb::ChunkData {
        self.serving = self.serving.saturating_sub(1);
        match data {
            Some(data) => {
                self.stats.chunks_sent += 1;
                self.stats.chunk_bytes_sent += data.len() as u64;
                pb::ChunkData {
                    hash: hash.to_vec(),
                    data,
                    missing: false,
                }
            }
            None => pb::ChunkData {
                hash: hash.to_vec(),
                data: Vec::new(),
                missing: true,
            },
        }
    }

    /// A chunk from the peer: checked against its hash, then stored.
    pub fn on_data(&mut self, d: pb::ChunkData, now_ms: u64, out: &mut Vec<ChunkOutput>) -> Result<(), SessionError> {
        let hash = hash_of(&d.hash)?;
        if !self.asked.remove(&hash) {
            return Err(SessionError::UnaskedChunk(hex(&hash)));
        }
        if d.missing {
            self.stats.chunks_missing_at_peer += 1;
            self.declined.insert(hash, now_ms.saturating_add(RETRY_MS));
        } else {
            if blake3::hash(&d.data).as_bytes() != &hash {
                return Err(SessionError::ChunkMismatch(hex(&hash)));
            }
            self.stats.chunks_received += 1;
            out.push(ChunkOutput::Store(hash, d.data));
        }
        self.ask(out);
        Ok(())
    }
}

fn hex(hash: &Hash) -> String {
    hash.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn content(i: u8) -> (Hash, Vec<u8>) {
        let data = vec![i; 1000];
        (*blake3::hash(&data).as_bytes(), data)
    }

    /// Carries one side's wants to the other and the answers back.
    fn serve(
        asker: &mut ChunkExchange,
        holder: &mut ChunkExchange,
        store: &[(Hash, Vec<u8>)],
        out: Vec<ChunkOutput>,
    ) -> Vec<Hash> {
        let mut stored = Vec::new();
        let mut pending = out;
        while let Some(o) = pending.pop() {
            match o {
                ChunkOutput::Send(w) => {
                    let mut reads = Vec::new();
                    holder.on_want(w, &mut reads).expect("want");
                    for r in reads {
                        let ChunkOutput::Read(h) = r else {
                            panic!("read expected")
                        };
                        let data = store.iter().find(|(k, _)| *k == h).map(|(_, d)| d.clone());
                        let frame = holder.on_read(h, data);
                        asker.on_data(frame, 0, &mut pending).expect("data");
                    }
                }
                ChunkOutput::Store(h, _) => stored.push(h),
                ChunkOutput::Read(_) => panic!("asker got a read"),
            }
        }
        stored
    }

    #[test]
    fn only_missing_chunks_travel_and_each_once() {
        let held: Vec<_> = (0..40).map(content).collect();
        let (mut a, mut b) = (ChunkExchange::default(), ChunkExchange::default());
        let mut out = Vec::new();
        let wanted: Vec<Hash> = held.iter().map(|(h, _)| *h).collect();
        a.want(wanted.clone(), 0, &mut out);
        // Asking again while the first asks are open asks for nothing more.
        a.want(wanted.clone(), 0, &mut out);
        let mut stored = serve(&mut a, &mut b, &held, out);
        stored.sort();
        let mut expect = wanted;
        expect.sort();
        assert_eq!(stored, expect);
        assert_eq!(b.stats().chunks_sent, 40);
        assert!(a.is_idle() && b.is_idle());
    }

    #[test]
    fn a_peer_lacking_a_chunk_is_asked_again_only_later() {
        let (h, _) = content(1);
        let (mut a, mut b) = (ChunkExchange::default(), ChunkExchange::default());
        let mut out = Vec::new();
        a.want(vec![h], 0, &mut out);
        assert!(serve(&mut a, &mut b, &[], out).is_empty());
        assert_eq!(a.stats().chunks_missing_at_peer, 1);
        let mut again = Vec::new();
        a.want(vec![h], RETRY_MS - 1, &mut again);
        assert!(again.is_empty());
        a.want(vec![h], RETRY_MS, &mut again);
        assert_eq!(again.len(), 1);
    }

    #[test]
    fn bad_chunk_frames_end_the_session() {
        let (h, data) = content(2);
        let mut a = ChunkExchange::default();
        let mut out = Vec::new();
        // Not asked for.
        let unasked = pb::ChunkData {
            hash: h.to_vec(),
            data: data.clone(),
            missing: false,
        };
        assert!(matches!(
            a.on_data(unasked, 0, &mut out),
            Err(SessionError::UnaskedChunk(_))
        ));
        // Content that does not match.
        a.want(vec![h], 0, &mut out);
        let forged = pb::ChunkData {
            hash: h.to_vec(),
            data: vec![9; 10],
            missing: false,
        };
        assert!(matches!(
            a.on_data(forged, 0, &mut out),
            Err(SessionError::ChunkMismatch(_))
        ));
        // A short hash.
        let short = pb::ChunkWant {
            hashes: vec![vec![1, 2, 3]],
        };
        assert!(matches!(
            a.on_want(short, &mut out),
            Err(SessionError::BadChunkHash { len: 3 })
        ));
        // A flood of asks.
        let flood = pb::ChunkWant {
            hashes: vec![h.to_vec(); MAX_WANTED + 1],
        };
        assert!(matches!(
            a.on_want(flood, &mut out),
            Err(SessionError::ChunkFlood { .. })
        ));
    }
}
