//! From the engine's composed layout to stored byte ranges: each merged-model file as a
//! list of blob ranges (the header's blob, ranges of the new base's blobs, the merged
//! tensors' blobs). Pure: the caller stores the blobs and supplies their digests.

use std::collections::HashMap;

use patchport_core::Digest;
use patchport_core::layout::BlobRange;

use crate::plan::{ComposedFile, Piece};

/// Appends a range, merging it into the previous one when they are contiguous in the
/// same blob.
pub fn push_range(segments: &mut Vec<BlobRange>, r: BlobRange) {
    if r.length == 0 {
        return;
    }
    if let Some(last) = segments.last_mut()
        && last.digest == r.digest
        && last.offset + last.length == r.offset
    {
        last.length += r.length;
        return;
    }
    segments.push(r);
}

/// The ranges of the new base's blobs that `file` begins with after its header, when
/// everything after them is merged tensors (the layout that moves them last): that
/// beginning is the same for every port of a base that merges the same tensors, and
/// known before any is merged. `None` for any other file (a copy, a file without a
/// header, merged tensors in place) or when a piece names no base file.
pub fn base_prefix(
    file: &ComposedFile,
    base_file: impl Fn(&str) -> Option<Digest>,
) -> Option<Vec<BlobRange>> {
    let sources = file
        .pieces
        .iter()
        .take_while(|p| matches!(p, Piece::Source { .. }))
        .count();
    let merged_last = sources > 0
        && sources < file.pieces.len()
        && file.pieces[sources..]
            .iter()
            .all(|p| matches!(p, Piece::Merged { .. }));
    if file.header.is_empty() || !merged_last {
        return None;
    }
    let mut segments = Vec::new();
    for p in &file.pieces[..sources] {
        if let Piece::Source {
            file: src,
            begin,
            end,
        } = p
        {
            push_range(&mut segments, base_range(&base_file, src, *begin, *end)?);
        }
    }
    Some(segments)
}

/// Bytes `begin..end` of the new base's file `src`.
fn base_range(
    base_file: impl Fn(&str) -> Option<Digest>,
    src: &str,
    begin: u64,
    end: u64,
) -> Option<BlobRange> {
    Some(BlobRange {
        digest: base_file(src)?,
        offset: begin,
        length: end - begin,
    })
}

/// The blob ranges that reproduce `file`: `header` is the stored header's digest (when
/// the file has one), `base_file` gives the digest of a file of the new base, `merged`
/// the stored digest and length of each merged tensor. Fails naming what is missing.
pub fn compose_ranges(
    file: &ComposedFile,
    header: Option<Digest>,
    base_file: impl Fn(&str) -> Option<Digest>,
    merged: &HashMap<String, (Digest, u64)>,
) -> Result<Vec<BlobRange>, String> {
    let mut segments = Vec::new();
    if !file.header.is_empty() {
        let digest = header.ok_or_else(|| format!("{}: header not stored", file.path))?;
        push_range(
            &mut segments,
            BlobRange {
                digest,
                offset: 0,
                length: file.header.len() as u64,
            },
        );
    }
    for p in &file.pieces {
        let range = match p {
            Piece::Source {
                file: src,
                begin,
                end,
            } => base_range(&base_file, src, *begin, *end)
                .ok_or_else(|| format!("no base file {src}"))?,
            Piece::Merged { tensor, len } => {
                let (digest, stored) = merged
                    .get(tensor)
                    .ok_or_else(|| format!("merged tensor {tensor} was not stored"))?;
                if stored != len {
                    return Err(format!(
                        "merged tensor {tensor}: {stored} bytes stored, {len} planned"
                    ));
                }
                BlobRange {
                    digest: *digest,
                    offset: 0,
                    length: *len,
                }
            }
        };
        push_range(&mut segments, range);
    }
    Ok(segments)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(begin: u64, end: u64) -> Piece {
        Piece::Source {
            file: "model.safetensors".to_owned(),
            begin,
            end,
        }
    }

    fn merged(name: &str, len: u64) -> Piece {
        Piece::Merged {
            tensor: name.to_owned(),
            len,
        }
    }

    #[test]
    fn only_a_file_whose_merged_tensors_come_last_has_a_base_prefix() {
        let base = Digest::of(b"base");
        let base_file = |p: &str| (p == "model.safetensors").then_some(base);
        let file = |header: &[u8], pieces: Vec<Piece>| ComposedFile {
            path: "model.safetensors".to_owned(),
            header: header.to_vec(),
            pieces,
        };
        // Contiguous base ranges are one range; the merged tensors after them are not in it.
        let last = file(
            b"hdr",
            vec![
                source(8, 20),
                source(20, 30),
                merged("q", 4),
                merged("v", 4),
            ],
        );
        assert_eq!(
            base_prefix(&last, base_file),
            Some(vec![BlobRange {
                digest: base,
                offset: 8,
                length: 22,
            }])
        );
        for other in [
            file(b"hdr", vec![source(8, 20), merged("q", 4), source(24, 30)]),
            file(b"hdr", vec![merged("q", 4), source(12, 30)]),
            file(b"hdr", vec![source(8, 30)]),
            file(b"", vec![source(0, 30)]),
        ] {
            assert_eq!(base_prefix(&other, base_file), None, "{other:?}");
        }
        let elsewhere = ComposedFile {
            pieces: vec![
                Piece::Source {
                    file: "other.safetensors".to_owned(),
                    begin: 8,
                    end: 20,
                },
                merged("q", 4),
            ],
            ..last.clone()
        };
        assert_eq!(base_prefix(&elsewhere, base_file), None);
    }
}
