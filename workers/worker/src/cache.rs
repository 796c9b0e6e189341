//! The worker's content-addressed tensor cache: the base tensors a port reads, kept on
//! local disk by their sha256 (the digest the registry's tensor index gives), so that a
//! worker reads each base tensor from the registry once, whatever the number of patches
//! ported onto that base, and tensors equal in two versions of a base are read once.
//!
//! - Bounded in bytes; the least recently used entries are evicted when a fill goes over.
//! - Every fill is verified: the bytes must hash to the digest they are stored under.
//! - Crash-safe: a fill is written to a temporary file, synced, then renamed; a worker
//!   killed mid-fill leaves only a temporary file, which is never served and is removed
//!   when the cache is next opened.
//! - Never in the port's way: the job that fills an entry ports with the verified bytes
//!   it fetched; an entry that cannot be stored (a full disk) is fetched again next
//!   time, and the port goes on.
//! - Shared by the worker's concurrent jobs: one job fills an entry, others wait for it.
//! - One process per directory: the directory is locked while open; a second worker
//!   pointed at a locked directory uses the next free `<dir>-N` beside it.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use patchport_client::Client;
use patchport_core::Digest;

/// Where a cache entry's bytes come from: a byte range of a registry blob.
#[derive(Debug, Clone, Copy)]
pub struct BlobRange {
    /// The blob.
    pub blob: Digest,
    /// First byte.
    pub begin: u64,
    /// One past the last byte.
    pub end: u64,
}

#[derive(Debug)]
struct Entry {
    size: u64,
    /// Last use (a counter: larger is more recent).
    used: u64,
}

#[derive(Debug, Default)]
struct State {
    entries: HashMap<Digest, Entry>,
    total: u64,
    clock: u64,
    /// Entries being filled: the filler holds the lock, others wait on it.
    filling: HashMap<Digest, Arc<tokio::sync::Mutex<()>>>,
}

/// The cache (see the module documentation).
#[derive(Debug)]
pub struct TensorCache {
    dir: PathBuf,
    max_bytes: u64,
    state: Mutex<State>,
    /// Held open for the exclusive lock on `<dir>/.lock`.
    _lock: File,
}

/// The name of a filled entry.
fn entry_name(d: &Digest) -> String {
    d.hex()
}

const TMP_PREFIX: &str = ".fill-";

impl TensorCache {
    /// Opens (creating) the cache in `dir`, or in the first `dir-N` no other live process
    /// holds; indexes the entries there (least recently modified first) and removes
    /// unfinished fills.
    pub fn open(dir: &Path, max_bytes: u64) -> io::Result<Self> {
        let mut n = 0u32;
        let (dir, lock) = loop {
            let candidate = if n == 0 {
                dir.to_path_buf()
            } else {
                let mut s = dir.as_os_str().to_owned();
                s.push(format!("-{n}"));
                PathBuf::from(s)
            };
            std::fs::create_dir_all(&candidate)?;
            let lock = File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .open(candidate.join(".lock"))?;
            match lock.try_lock() {
                Ok(()) => break (candidate, lock),
                Err(std::fs::TryLockError::WouldBlock) if n < 64 => n += 1,
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Err(io::Error::other(format!(
                        "{} and 64 siblings are held by other workers",
                        dir.display()
                    )));
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(e),
            }
        };
        let mut found = Vec::new();
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.starts_with(TMP_PREFIX) {
                // A fill that never finished (the worker died): never served.
                let _ = std::fs::remove_file(entry.path());
                continue;
            }
            let Ok(digest) = format!("sha256:{name}").parse::<Digest>() else {
                continue;
            };
            let meta = entry.metadata()?;
            if !meta.is_file() {
                continue;
            }
            found.push((meta.modified().ok(), digest, meta.len()));
        }
        found.sort_by_key(|(m, _, _)| *m);
        let mut state = State::default();
        for (_, digest, size) in found {
            state.clock += 1;
            state.total += size;
            state.entries.insert(
                digest,
                Entry {
                    size,
                    used: state.clock,
                },
            );
        }
        let cache = Self {
            dir,
            max_bytes,
            state: Mutex::new(state),
            _lock: lock,
        };
        {
            let mut s = cache.state.lock().unwrap_or_else(|e| e.into_inner());
            cache.evict(&mut s, None);
        }
        tracing::info!(dir = %cache.dir.display(), max_bytes, "tensor cache opened");
        Ok(cache)
    }

    /// The directory in use.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).total
    }

    /// Whether an entry is held.
    pub fn contains(&self, digest: &Digest) -> bool {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entries
            .contains_key(digest)
    }

    /// Opens a held entry and marks it used. An open file stays readable after the
    /// entry is evicted (the bytes go when the last reader closes it).
    fn lookup(&self, digest: &Digest) -> Option<File> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.clock += 1;
        let clock = s.clock;
        let e = s.entries.get_mut(digest)?;
        e.used = clock;
        match File::open(self.dir.join(entry_name(digest))) {
            Ok(f) => Some(f),
            Err(_) => {
                // Removed behind our back: forget it, it will be filled again.
                if let Some(e) = s.entries.remove(digest) {
                    s.total -= e.size;
                }
                None
            }
        }
    }

    /// Evicts least recently used entries (never `keep`) until the bound holds.
    fn evict(&self, s: &mut State, keep: Option<&Digest>) {
        while s.total > self.max_bytes {
            let victim = s
                .entries
                .iter()
                .filter(|(d, _)| Some(*d) != keep)
                .min_by_key(|(_, e)| e.used)
                .map(|(d, _)| *d);
            let Some(victim) = victim else { break };
            let Some(e) = s.entries.remove(&victim) else {
                break;
            };
            s.total -= e.size;
            let _ = std::fs::remove_file(self.dir.join(entry_name(&victim)));
            metrics::counter!(patchport_telemetry::WORKER_CACHE_EVICTED_BYTES).increment(e.size);
            tracing::debug!(digest = %victim, size = e.size, "cache entry evicted");
        }
    }

    /// Reads the bytes stored under `digest` into `buf`, filling the entry from `from`
    /// first when it is not held. `Ok(false)`: the entry is larger than the whole cache
    /// (not cached; the caller reads the range itself).
    pub async fn read(
        &self,
        client: &Client,
        digest: Digest,
        from: BlobRange,
        buf: &mut Vec<u8>,
    ) -> io::Result<bool> {
        let size = from.end.saturating_sub(from.begin);
        if size > self.max_bytes {
            return Ok(false);
        }
        let file = match self.lookup(&digest) {
            Some(f) => f,
            None => {
                let gate = {
                    let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
                    s.filling.entry(digest).or_default().clone()
                };
                let _filling = gate.lock().await;
                match self.lookup(&digest) {
                    // Another job filled it while this one waited.
                    Some(f) => f,
                    None => {
                        metrics::counter!(patchport_telemetry::WORKER_CACHE_MISSES).increment(1);
                        let filled = self.fill(client, digest, from, buf).await;
                        self.state
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .filling
                            .remove(&digest);
                        return filled.map(|()| true);
                    }
                }
            }
        };
        metrics::counter!(patchport_telemetry::WORKER_CACHE_HITS).increment(1);
        buf.clear();
        buf.resize(size as usize, 0);
        let len = file.metadata()?.len();
        if len != size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("cached {digest} holds {len} bytes, {size} expected"),
            ));
        }
        file.read_exact_at(buf, 0)?;
        Ok(true)
    }

    /// Reads `from` into `buf` (verified) and stores it as the entry `digest`. The
    /// caller has the bytes whether or not they could be stored: a cache that cannot
    /// write (a full disk) costs later reads from the registry, never the port.
    async fn fill(
        &self,
        client: &Client,
        digest: Digest,
        from: BlobRange,
        buf: &mut Vec<u8>,
    ) -> io::Result<()> {
        fetch(client, digest, from, buf).await?;
        match self.store(&digest, buf).await {
            Ok(()) => {
                let size = buf.len() as u64;
                let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
                s.clock += 1;
                let used = s.clock;
                if let Some(old) = s.entries.insert(digest, Entry { size, used }) {
                    s.total -= old.size;
                }
                s.total += size;
                self.evict(&mut s, Some(&digest));
            }
            Err(e) => {
                tracing::warn!(%digest, dir = %self.dir.display(), error = %e, "a tensor could not be stored in the cache; it will be read from the registry again");
            }
        }
        Ok(())
    }

    /// Writes verified bytes to a temporary file, syncs and renames it into place.
    async fn store(&self, digest: &Digest, bytes: &[u8]) -> io::Result<()> {
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = self
            .dir
            .join(format!("{TMP_PREFIX}{}-{seq}", entry_name(digest)));
        let result = async {
            let mut file = File::create(&tmp)?;
            file.write_all(bytes)?;
            file.sync_all()?;
            drop(file);
            if let Some(hook) = std::env::var_os("PATCHPORT_TEST_CACHE_FILL_STALL") {
                stall_for_test(Path::new(&hook), &tmp).await;
            }
            std::fs::rename(&tmp, self.dir.join(entry_name(digest)))?;
            File::open(&self.dir)?.sync_all()
        }
        .await;
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }
}

/// Reads `from` into `buf` (the worker's one ranged `ReadBlob`); the bytes must hash to
/// `digest`.
async fn fetch(
    client: &Client,
    digest: Digest,
    from: BlobRange,
    buf: &mut Vec<u8>,
) -> io::Result<()> {
    let read = crate::read_blob_range(client, from.blob, from.begin, from.end, buf).await;
    metrics::counter!(patchport_telemetry::WORKER_CACHE_FETCHED_BYTES).increment(buf.len() as u64);
    read?;
    let got = Digest::of(buf);
    if got != digest {
        let size = buf.len();
        buf.clear();
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "bytes {}..{} of blob {} hash to {got} ({size} bytes), not {digest}",
                from.begin, from.end, from.blob
            ),
        ));
    }
    Ok(())
}

/// Fault injection for the crash test: a fill that is written and synced but not yet
/// renamed announces itself by creating `hook` (holding the temporary file's path) and
/// waits there until the process is killed.
async fn stall_for_test(hook: &Path, tmp: &Path) {
    let _ = std::fs::write(hook, tmp.as_os_str().as_encoded_bytes());
    tracing::warn!(tmp = %tmp.display(), "stalling a cache fill (PATCHPORT_TEST_CACHE_FILL_STALL)");
    std::future::pending::<()>().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(dir: &Path, bytes: &[u8]) -> Digest {
        let d = Digest::of(bytes);
        std::fs::write(dir.join(entry_name(&d)), bytes).unwrap();
        d
    }

    #[test]
    fn opening_indexes_entries_drops_unfinished_fills_and_applies_the_bound() {
        let root = std::env::temp_dir().join(format!("pp-cache-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        let a = put(&root, &[1u8; 100]);
        std::thread::sleep(std::time::Duration::from_millis(20));
        let b = put(&root, &[2u8; 100]);
        std::fs::write(root.join(format!("{TMP_PREFIX}abc-0")), b"partial").unwrap();
        let cache = TensorCache::open(&root, 150).unwrap();
        // The older entry goes to keep the bound; the partial fill is gone.
        assert!(!cache.contains(&a));
        assert!(cache.contains(&b));
        assert_eq!(cache.bytes(), 100);
        assert!(!root.join(format!("{TMP_PREFIX}abc-0")).exists());
        // A second process (here: a second open) gets a sibling directory.
        let second = TensorCache::open(&root, 150).unwrap();
        assert_ne!(second.dir(), cache.dir());
        drop((cache, second));
        let mut sibling = root.as_os_str().to_owned();
        sibling.push("-1");
        let _ = std::fs::remove_dir_all(&root);
        let _ = std::fs::remove_dir_all(PathBuf::from(sibling));
    }
}
