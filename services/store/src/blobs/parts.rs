//! Uploads written as one multipart upload to the blob's final key (`memory://`, `s3://`):
//! the names and contents of a session's part records and tail, and how the records chain.
//!
//! Layout inside `uploads/<id>/`:
//!
//! ```text
//! <offset, 20 digits>.<len>.part   part `part` (bytes offset..offset+len) was put: its
//!                                  content id, the content id of the part before it, and
//!                                  the sha256 state after it (JSON, see PartRecord)
//! <offset, 20 digits>.tail         bytes received after the last part, too few for a
//!                                  part (a paused or broken stream); rewritten as it grows
//! ```
//!
//! A record is written only after its part was put, and every part but the last is the
//! session's part size, so records of one session never overlap: two writers of one
//! session write the same names. The records form a chain when each names the content id
//! of the one before it; the chain from offset 0 is what the session holds, and a
//! completion lists exactly its content ids, which the backend checks against the parts
//! it stores (S3: the ETag, and the SHA-256 checksum where enabled).

use object_store::multipart::PartId;
use patchport_core::Hasher;
use serde::{Deserialize, Serialize};

/// What a `.part` record holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct PartRecord {
    /// The part's index in the multipart upload (0-based).
    pub(super) part: usize,
    /// The id the backend gave the part (`PartId::content_id`).
    pub(super) content_id: String,
    /// The content id of the part before it; none for part 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) prev: Option<String>,
    /// Hex of the sha256 state after the part (`Hasher::to_state`).
    pub(super) state: String,
}

impl PartRecord {
    /// The hash state after the part, if it is well formed and covers `end` bytes.
    pub(super) fn hasher(&self, end: u64) -> Option<Hasher> {
        let bytes = from_hex(&self.state)?;
        Hasher::from_state(&bytes).filter(|h| h.len() == end)
    }
}

/// A record's name for `len` bytes at `offset`.
pub(super) fn record_name(offset: u64, len: u64) -> String {
    format!("{offset:020}.{len}.part")
}

/// Parses a record name into (offset, len).
pub(super) fn parse_record_name(name: &str) -> Option<(u64, u64)> {
    let (offset, rest) = name.split_once('.')?;
    let len = rest.strip_suffix(".part")?;
    if offset.len() != 20 || !digits(offset) || !digits(len) {
        return None;
    }
    Some((offset.parse().ok()?, len.parse().ok()?))
}

/// The tail's name when the parts end at `offset`.
pub(super) fn tail_name(offset: u64) -> String {
    format!("{offset:020}.tail")
}

/// Parses a tail name into the offset its bytes start at.
pub(super) fn parse_tail_name(name: &str) -> Option<u64> {
    let offset = name.strip_suffix(".tail")?;
    if offset.len() != 20 || !digits(offset) {
        return None;
    }
    offset.parse().ok()
}

fn digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// The chain of records from offset 0, as far as it goes.
#[derive(Debug, Clone)]
pub(super) struct Chain {
    /// Where the chained parts end.
    pub(super) end: u64,
    /// The hash state at `end`.
    pub(super) hasher: Hasher,
    /// The content ids of the chained parts, in order.
    pub(super) ids: Vec<PartId>,
    /// Whether records exist past `end` that do not continue the chain (another writer
    /// of the session put other bytes).
    pub(super) broken: bool,
}

impl Chain {
    /// The content id of the last chained part.
    pub(super) fn last_id(&self) -> Option<&str> {
        self.ids.last().map(|p| p.content_id.as_str())
    }
}

/// Follows `records` ((offset, len, record or None when unreadable), sorted by offset)
/// from offset 0 while each continues the one before: at the offset the chain reached,
/// with the next part index, naming the previous content id, with a hash state that
/// covers exactly the bytes up to its end.
pub(super) fn follow(records: &[(u64, u64, Option<PartRecord>)]) -> Chain {
    let mut chain = Chain {
        end: 0,
        hasher: Hasher::new(),
        ids: Vec::new(),
        broken: false,
    };
    for (offset, len, record) in records {
        if *offset < chain.end {
            continue;
        }
        let end = offset.saturating_add(*len);
        let next = record.as_ref().and_then(|r| {
            let continues = *offset == chain.end
                && r.part == chain.ids.len()
                && r.prev.as_deref() == chain.last_id()
                && *len > 0;
            continues.then(|| r.hasher(end).map(|h| (r, h))).flatten()
        });
        let Some((record, hasher)) = next else {
            chain.broken = true;
            break;
        };
        chain.end = end;
        chain.hasher = hasher;
        chain.ids.push(PartId {
            content_id: record.content_id.clone(),
        });
    }
    chain
}

pub(super) fn to_hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

fn from_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(part: usize, id: &str, prev: Option<&str>, hashed: &[u8]) -> PartRecord {
        let mut h = Hasher::new();
        h.update(hashed);
        PartRecord {
            part,
            content_id: id.to_owned(),
            prev: prev.map(str::to_owned),
            state: to_hex(&h.to_state()),
        }
    }

    #[test]
    fn names_round_trip_and_others_are_not_parts() {
        assert_eq!(record_name(5 << 20, 77), "00000000000005242880.77.part");
        assert_eq!(
            parse_record_name("00000000000005242880.77.part"),
            Some((5 << 20, 77))
        );
        assert_eq!(tail_name(3), "00000000000000000003.tail");
        assert_eq!(parse_tail_name("00000000000000000003.tail"), Some(3));
        for not in [
            "session.json",
            "00000000000000000000",
            "00000000000000000000.1.state",
            "0000000000000000000.1.part",
            "00000000000000000000..part",
            "00000000000000000000.1.part#1",
            "tail",
            "1.tail",
        ] {
            assert_eq!(parse_record_name(not), None, "{not}");
            assert_eq!(parse_tail_name(not), None, "{not}");
        }
    }

    #[test]
    fn hex_round_trips() {
        let bytes: Vec<u8> = (0..=255).collect();
        assert_eq!(from_hex(&to_hex(&bytes)), Some(bytes));
        assert_eq!(from_hex("abc"), None);
        assert_eq!(from_hex("zz"), None);
    }

    #[test]
    fn the_chain_follows_prev_ids_and_stops_at_a_break() {
        let a = record(0, "a", None, b"0123");
        let b = record(1, "b", Some("a"), b"01234567");
        let c = record(2, "c", Some("b"), b"0123456789");
        let chain = follow(&[
            (0, 4, Some(a.clone())),
            (4, 4, Some(b.clone())),
            (8, 2, Some(c.clone())),
        ]);
        assert_eq!((chain.end, chain.broken), (10, false));
        assert_eq!(chain.hasher.len(), 10);
        assert_eq!(chain.last_id(), Some("c"));

        // Another writer replaced part 1: part 2 still names the old one.
        let b2 = record(1, "B", Some("a"), b"0123xxxx");
        let chain = follow(&[(0, 4, Some(a.clone())), (4, 4, Some(b2)), (8, 2, Some(c))]);
        assert_eq!(
            (chain.end, chain.broken, chain.last_id()),
            (8, true, Some("B"))
        );

        // A gap, an unreadable record, a state of the wrong length, a wrong index.
        let chain = follow(&[(0, 4, Some(a.clone())), (5, 4, Some(b.clone()))]);
        assert_eq!((chain.end, chain.broken), (4, true));
        let chain = follow(&[(0, 4, Some(a.clone())), (4, 4, None)]);
        assert_eq!((chain.end, chain.broken), (4, true));
        let chain = follow(&[(0, 4, Some(a.clone())), (4, 5, Some(b.clone()))]);
        assert_eq!((chain.end, chain.broken), (4, true));
        let mut wrong = b;
        wrong.part = 2;
        let chain = follow(&[(0, 4, Some(a)), (4, 4, Some(wrong))]);
        assert_eq!((chain.end, chain.broken), (4, true));
        assert_eq!(follow(&[]).end, 0);
    }
}
