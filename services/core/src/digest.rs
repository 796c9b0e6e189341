//! `sha256:<64 hex>` content digests.

use std::fmt;
use std::str::FromStr;

use sha2::digest::common::hazmat::SerializableState;
use sha2::{Digest as _, Sha256};

/// A sha256 content digest, displayed as `sha256:<64 lowercase hex>`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest([u8; 32]);

/// A string that is not a `sha256:<64 hex>` digest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid digest {input:?}: expected sha256:<64 lowercase hex digits>")]
pub struct DigestError {
    /// The rejected input (truncated to 100 characters).
    pub input: String,
}

impl Digest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        let mut h = Hasher::new();
        h.update(bytes);
        h.finish()
    }

    /// The raw 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Builds a digest from its raw bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The 64 lowercase hex digits, without the `sha256:` prefix.
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", hex::encode(self.0))
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Digest {
    type Err = DigestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || DigestError {
            input: s.chars().take(100).collect(),
        };
        let hex_part = s.strip_prefix("sha256:").ok_or_else(err)?;
        if hex_part.len() != 64
            || !hex_part
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(err());
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(hex_part, &mut out).map_err(|_| err())?;
        Ok(Self(out))
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Incremental sha256 that yields a [`Digest`] and counts the bytes it saw.
#[derive(Clone, Default)]
pub struct Hasher {
    inner: Sha256,
    len: u64,
}

impl fmt::Debug for Hasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hasher").field("len", &self.len).finish()
    }
}

impl Hasher {
    /// A hasher that has seen no bytes.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        self.inner.update(bytes);
        self.len += bytes.len() as u64;
    }

    /// Bytes fed so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True before any byte was fed.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The digest of everything fed.
    pub fn finish(self) -> Digest {
        Digest(self.inner.finalize().into())
    }

    /// The hasher's state (the sha256 midstate, the unprocessed tail of the last block,
    /// and the byte count; never the bytes fed), to continue later with
    /// [`from_state`](Self::from_state), possibly in another process.
    pub fn to_state(&self) -> Vec<u8> {
        let inner = self.inner.serialize();
        let mut out = Vec::with_capacity(STATE_MAGIC.len() + 8 + inner.len());
        out.extend_from_slice(STATE_MAGIC);
        out.extend_from_slice(&self.len.to_le_bytes());
        out.extend_from_slice(&inner);
        out
    }

    /// A hasher continued from [`to_state`](Self::to_state); `None` when `state` is not
    /// one (wrong length, tag or contents).
    pub fn from_state(state: &[u8]) -> Option<Self> {
        let rest = state.strip_prefix(STATE_MAGIC)?;
        let (len, inner) = rest.split_at_checked(8)?;
        let len = u64::from_le_bytes(len.try_into().ok()?);
        let inner = Sha256::deserialize(inner.try_into().ok()?).ok()?;
        // sha2's state is the midstate (32 bytes), the blocks processed (u64 LE), then
        // the buffered tail's length (one byte) and bytes: they must add up to `len`.
        let serialized = inner.serialize();
        let blocks = u64::from_le_bytes(serialized.get(32..40)?.try_into().ok()?);
        let tail = u64::from(*serialized.get(40)?);
        (blocks.checked_mul(64)?.checked_add(tail)? == len).then_some(Self { inner, len })
    }
}

/// The tag that starts a serialized [`Hasher`] state (format version 1).
const STATE_MAGIC: &[u8] = b"pp-sha256-state-v1\0";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vector() {
        assert_eq!(
            Digest::of(b"abc").to_string(),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn parse_round_trips_and_rejects_bad_input() {
        let d = Digest::of(b"x");
        assert_eq!(d.to_string().parse::<Digest>().unwrap(), d);
        for bad in [
            "",
            "sha256:",
            "sha512:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
            "sha256:BA7816BF8F01CFEA414140DE5DAE2223B00361A396177A9CB410FF61F20015AD",
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015a",
            "sha256:zz7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
        ] {
            assert!(bad.parse::<Digest>().is_err(), "{bad}");
        }
    }

    #[test]
    fn state_round_trips_and_continues() {
        let bytes: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
        for split in [0, 1, 63, 64, 65, 999, 1000] {
            let mut h = Hasher::new();
            h.update(&bytes[..split]);
            let state = h.to_state();
            let mut resumed = Hasher::from_state(&state).expect("valid state");
            assert_eq!(resumed.len(), split as u64);
            resumed.update(&bytes[split..]);
            assert_eq!(resumed.len(), 1000);
            assert_eq!(resumed.finish(), Digest::of(&bytes), "split at {split}");
        }
    }

    #[test]
    fn bad_states_are_refused() {
        let mut h = Hasher::new();
        h.update(b"hello");
        let state = h.to_state();
        assert!(Hasher::from_state(&[]).is_none());
        assert!(Hasher::from_state(&state[..state.len() - 1]).is_none());
        let mut longer = state.clone();
        longer.push(0);
        assert!(Hasher::from_state(&longer).is_none());
        let mut tag = state.clone();
        tag[0] ^= 1;
        assert!(Hasher::from_state(&tag).is_none());
        // A changed byte count no longer matches the state's own block count.
        let mut count = state.clone();
        count[STATE_MAGIC.len()] = 200;
        assert!(Hasher::from_state(&count).is_none());
    }

    proptest::proptest! {
        #[test]
        fn state_parse_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            let _ = Hasher::from_state(&bytes);
        }

        #[test]
        fn parse_never_panics(s in ".{0,80}") {
            let _ = s.parse::<Digest>();
        }
    }
}
