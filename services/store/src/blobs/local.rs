//! Uploads on a `file://` store written once: a session's bytes go into one data file at
//! their offsets, each durable stretch is recorded with the sha256 state after it, and
//! commit hard-links the data file to its blob key after checking the recorded hash.
//!
//! Layout inside `uploads/<id>/`:
//!
//! ```text
//! data                               the bytes received, at their offsets
//! <offset, 20 digits>.<len>.state    bytes offset..offset+len of `data` are durable; the
//!                                    serialized sha256 state after them (Hasher::to_state)
//! ```
//!
//! Every write and the commit hold an exclusive lock (`flock`) on `data`, and a write
//! only ever adds bytes at the durable end (bytes it would send again below that end must
//! equal the stored ones), so the records form one chain and the bytes under a record
//! never change: the last record's state is the hash of exactly the bytes the data file
//! holds. Bytes are handed to the disk as they are written (`sync_file_range`, Linux) and
//! fsynced before their record is written (a temporary file renamed;
//! the record itself is not fsynced), so a record that survives a crash never names
//! bytes the disk lost; a crash leaves at most a torn tail past the durable end, which the
//! next write overwrites, and records it lost (or left empty, which [`scan`] ignores) only
//! move the durable end back. A data file that was linked to a blob (link count above
//! one) or replaced is never written again.
//!
//! Locks are `flock`s: sessions on one host (or a filesystem that supports them) only.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write as _};
use std::os::unix::fs::{FileExt as _, MetadataExt as _};
use std::path::{Path as FsPath, PathBuf};

use bytes::Bytes;
use patchport_core::{Digest, Hasher};

use super::BlobError;
use super::upload::{Segment, contiguous_end};

/// The name of a session's data file.
pub(super) const DATA_FILE: &str = "data";

/// What [`scan`] found in a session directory.
#[derive(Debug, Default)]
pub(super) struct Scan {
    /// The records, by offset.
    pub records: Vec<Segment>,
    /// Whether the session holds segment objects (`<offset>`, the layout older registries
    /// used): such a session is not continued (see `upload.rs`).
    pub segments: bool,
}

/// A failure of a local upload operation, mapped to a [`BlobError`] by [`Fail::into_blob`].
#[derive(Debug)]
pub(super) enum Fail {
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    Changed(String),
    Incomplete(u64),
    Mismatch(Digest),
}

impl Fail {
    fn io(op: &'static str, path: &FsPath) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.to_owned();
        move |source| Self::Io { op, path, source }
    }

    pub(super) fn into_blob(self, upload_id: &str, digest: Digest, size: u64) -> BlobError {
        match self {
            Self::Io { op, path, source } => BlobError::Storage {
                op,
                key: path.display().to_string(),
                source: object_store::Error::Generic {
                    store: "LocalFileSystem",
                    source: Box::new(source),
                },
            },
            Self::Changed(detail) => BlobError::UploadChanged {
                upload_id: upload_id.to_owned(),
                detail,
            },
            Self::Incomplete(committed) => BlobError::Incomplete {
                upload_id: upload_id.to_owned(),
                committed,
                size,
            },
            Self::Mismatch(actual) => BlobError::DigestMismatch {
                declared: digest,
                actual,
            },
        }
    }
}

/// The record name for `len` bytes at `offset`.
pub(super) fn record_name(offset: u64, len: u64) -> String {
    format!("{offset:020}.{len}.state")
}

/// Parses a record name; `None` for anything else.
pub(super) fn parse_record_name(name: &str) -> Option<Segment> {
    let (offset, rest) = name.split_once('.')?;
    let len = rest.strip_suffix(".state")?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if offset.len() != 20 || !digits(offset) || !digits(len) {
        return None;
    }
    Some(Segment {
        offset: offset.parse().ok()?,
        len: len.parse().ok()?,
    })
}

/// Whether a name is a segment object's (`<offset, 20 digits>`).
pub(super) fn is_segment_name(name: &str) -> bool {
    name.len() == 20 && name.bytes().all(|b| b.is_ascii_digit())
}

/// Lists a session directory (missing: empty).
pub(super) fn scan(dir: &FsPath) -> Result<Scan, Fail> {
    let mut scan = Scan::default();
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(scan),
        Err(e) => return Err(Fail::io("list", dir)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(Fail::io("list", dir))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if let Some(record) = parse_record_name(&name) {
            // An empty record is what a crash leaves of one written just before it.
            let len = entry.metadata().map_err(Fail::io("stat", dir))?.len();
            if len > 0 {
                scan.records.push(record);
            }
        } else if is_segment_name(&name) {
            scan.segments = true;
        }
    }
    scan.records.sort_by_key(|r| r.offset);
    Ok(scan)
}

/// The hash state after the first `end` bytes: the record that ends there (a new hasher
/// at 0). A record that is missing, unreadable or of another length is `Changed`.
pub(super) fn state_at(dir: &FsPath, records: &[Segment], end: u64) -> Result<Hasher, Fail> {
    if end == 0 {
        return Ok(Hasher::new());
    }
    let Some(record) = records
        .iter()
        .find(|r| r.offset.saturating_add(r.len) == end)
    else {
        return Err(Fail::Changed(format!(
            "no hash state recorded at offset {end}"
        )));
    };
    let path = dir.join(record_name(record.offset, record.len));
    let state = fs::read(&path).map_err(Fail::io("read", &path))?;
    Hasher::from_state(&state)
        .filter(|h| h.len() == end)
        .ok_or_else(|| Fail::Changed(format!("corrupt hash state in {}", path.display())))
}

/// Where a writer continues: the durable offset and the hash state there.
pub(super) fn resume_point(dir: &FsPath, size: u64) -> Result<(u64, Hasher), Fail> {
    let scan = scan(dir)?;
    let end = contiguous_end(&scan.records, size);
    Ok((end, state_at(dir, &scan.records, end)?))
}

/// Opens the session's data file (creating it) and locks it exclusively; refuses a data
/// file that became a blob.
fn open_locked(dir: &FsPath, create: bool) -> Result<File, Fail> {
    let path = dir.join(DATA_FILE);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .truncate(false)
        .open(&path)
        .map_err(|e| match e.kind() {
            ErrorKind::NotFound => Fail::Changed("the session's data file is gone".to_owned()),
            _ => Fail::io("open", &path)(e),
        })?;
    file.lock().map_err(Fail::io("lock", &path))?;
    let held = file.metadata().map_err(Fail::io("stat", &path))?;
    let named = fs::metadata(&path).map_err(Fail::io("stat", &path))?;
    if held.nlink() != 1 || (held.dev(), held.ino()) != (named.dev(), named.ino()) {
        return Err(Fail::Changed("the session was committed".to_owned()));
    }
    Ok(file)
}

/// Writes `parts` (bytes `start..start+n`) into the data file, continuing `hasher` (the
/// state at `start`), and records them durably. Bytes below the durable end (another
/// writer of the session sent them first) are compared instead of written. Returns the
/// hash state after the parts.
pub(super) fn append(
    dir: &FsPath,
    start: u64,
    parts: &[Bytes],
    mut hasher: Hasher,
) -> Result<Hasher, Fail> {
    let path = dir.join(DATA_FILE);
    // Only a writer at offset 0 creates the data file: a later one finds it or stops.
    let file = open_locked(dir, start == 0)?;
    let durable = contiguous_end(&scan(dir)?.records, u64::MAX);
    if start > durable {
        return Err(Fail::Changed(format!(
            "{durable} bytes are durable, a writer continued at {start}"
        )));
    }
    let mut pos = start;
    let mut existing = Vec::new();
    for part in parts {
        let part_end = pos + part.len() as u64;
        if pos < durable {
            let same = usize::try_from(part_end.min(durable) - pos).unwrap_or(usize::MAX);
            existing.resize(same, 0);
            file.read_exact_at(&mut existing, pos)
                .map_err(Fail::io("read", &path))?;
            if existing[..] != part[..same] {
                return Err(Fail::Changed(format!(
                    "bytes sent again at offset {pos} differ from those received"
                )));
            }
        }
        if part_end > durable {
            let skip = usize::try_from(durable.saturating_sub(pos)).unwrap_or(0);
            let at = pos.max(durable);
            file.write_all_at(&part[skip..], at)
                .map_err(Fail::io("write", &path))?;
            start_writeback(&file, at, part_end - at);
        }
        hasher.update(part);
        pos = part_end;
    }
    if pos > durable {
        file.sync_data().map_err(Fail::io("fsync", &path))?;
        write_record(
            dir,
            &record_name(durable, pos - durable),
            &hasher.to_state(),
        )?;
    }
    Ok(hasher)
}

/// Starts writing `len` bytes of `file` at `offset` to disk without waiting for them, so
/// that the disk works while the next bytes are hashed and written and the `sync_data`
/// that makes them durable finds most of them written already (without it, nothing is
/// written back before that `sync_data`: the kernel's background writeback starts only
/// at gigabytes of dirty pages). Durability still comes from `sync_data` alone.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn start_writeback(file: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd as _;
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return;
    };
    // SAFETY: sync_file_range(2) takes a descriptor and integers and touches no memory of
    // ours; `file` is open for the whole call. A failure only leaves all the writing to
    // the `sync_data` after it.
    let _ = unsafe {
        libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE)
    };
}

#[cfg(not(target_os = "linux"))]
fn start_writeback(_: &File, _: u64, _: u64) {}

/// Writes a hash record atomically: a temporary file (`<name>#0`, which the expiry sweep
/// knows) renamed into place. Not fsynced (see the module doc): after a machine crash
/// it may be missing or empty, never wrong.
fn write_record(dir: &FsPath, name: &str, contents: &[u8]) -> Result<(), Fail> {
    let tmp = dir.join(format!("{name}#0"));
    let path = dir.join(name);
    let mut f = File::create(&tmp).map_err(Fail::io("create", &tmp))?;
    f.write_all(contents).map_err(Fail::io("write", &tmp))?;
    fs::rename(&tmp, &path).map_err(Fail::io("rename", &path))
}

fn sync_dir(dir: &FsPath) -> Result<(), Fail> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(Fail::io("fsync", dir))
}

/// The verified hash of a complete session, from its last record alone.
pub(super) fn verified(dir: &FsPath, size: u64, digest: Digest) -> Result<(), Fail> {
    let scan = scan(dir)?;
    let end = contiguous_end(&scan.records, size);
    if end < size {
        return Err(Fail::Incomplete(end));
    }
    let actual = state_at(dir, &scan.records, size)?.finish();
    if actual != digest {
        return Err(Fail::Mismatch(actual));
    }
    Ok(())
}

/// Commits a complete session: checks the recorded hash against `digest`, then
/// hard-links the data file to `blob` create-only. Returns whether the blob existed.
pub(super) fn commit(dir: &FsPath, size: u64, digest: Digest, blob: &FsPath) -> Result<bool, Fail> {
    let path = dir.join(DATA_FILE);
    // An empty blob has no bytes, hence maybe no data file yet.
    let file = open_locked(dir, size == 0)?;
    verified(dir, size, digest)?;
    let len = file.metadata().map_err(Fail::io("stat", &path))?.len();
    if len != size {
        return Err(Fail::Changed(format!(
            "the data file holds {len} bytes, expected {size}"
        )));
    }
    let parent = blob.parent().unwrap_or(FsPath::new("/"));
    fs::create_dir_all(parent).map_err(Fail::io("create directory", parent))?;
    match fs::hard_link(&path, blob) {
        Ok(()) => {
            sync_dir(parent)?;
            Ok(false)
        }
        Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(true),
        Err(e) if e.kind() == ErrorKind::CrossesDevices => copy_then_link(&file, blob),
        Err(e) => Err(Fail::io("link", blob)(e)),
    }
}

/// `uploads/` and `blobs/` on different filesystems: copy the verified bytes to a
/// temporary file beside the blob (`<blob>#1`, which the sweep at start knows), fsync,
/// and link that create-only.
fn copy_then_link(mut data: &File, blob: &FsPath) -> Result<bool, Fail> {
    let parent = blob.parent().unwrap_or(FsPath::new("/"));
    let mut tmp_name = blob.as_os_str().to_owned();
    tmp_name.push("#1");
    let tmp = PathBuf::from(tmp_name);
    let copied = (|| {
        let mut out = File::create(&tmp).map_err(Fail::io("create", &tmp))?;
        std::io::Seek::rewind(&mut data).map_err(Fail::io("read", &tmp))?;
        std::io::copy(&mut data, &mut out).map_err(Fail::io("copy", &tmp))?;
        out.sync_all().map_err(Fail::io("fsync", &tmp))?;
        match fs::hard_link(&tmp, blob) {
            Ok(()) => sync_dir(parent).map(|()| false),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(true),
            Err(e) => Err(Fail::io("link", blob)(e)),
        }
    })();
    let _ = fs::remove_file(&tmp);
    copied
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_names_round_trip_and_others_are_not_records() {
        let name = record_name(16 << 20, 1234);
        assert_eq!(name, "00000000000016777216.1234.state");
        assert_eq!(
            parse_record_name(&name),
            Some(Segment {
                offset: 16 << 20,
                len: 1234
            })
        );
        for not in [
            "data",
            "session.json",
            "00000000000000000000",
            "0000000000000000000.1.state",
            "00000000000000000000..state",
            "00000000000000000000.1.state#0",
            "00000000000000000000.x.state",
        ] {
            assert_eq!(parse_record_name(not), None, "{not}");
        }
        assert!(is_segment_name("00000000000000000000"));
        assert!(!is_segment_name(&name));
    }

    /// What a machine crash can leave of records that were renamed into place but not
    /// fsynced: an empty last record. The upload resumes from the record before it, the
    /// bytes after it are sent again, and the blob commits with the right digest.
    #[test]
    fn an_empty_record_left_by_a_crash_moves_the_durable_end_back() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let (a, b) = (Bytes::from(vec![1u8; 1000]), Bytes::from(vec![2u8; 500]));
        let after_a = append(dir, 0, std::slice::from_ref(&a), Hasher::new()).unwrap();
        append(dir, 1000, std::slice::from_ref(&b), after_a).unwrap();
        assert_eq!(resume_point(dir, 1500).unwrap().0, 1500);

        fs::write(dir.join(record_name(1000, 500)), b"").unwrap();
        let (end, state) = resume_point(dir, 1500).unwrap();
        assert_eq!(end, 1000);
        append(dir, end, std::slice::from_ref(&b), state).unwrap();

        let digest = Digest::of(&[&a[..], &b[..]].concat());
        let blob = tmp.path().join("blob");
        assert!(!commit(dir, 1500, digest, &blob).unwrap());
        assert_eq!(fs::read(&blob).unwrap(), [&a[..], &b[..]].concat());
    }
}
