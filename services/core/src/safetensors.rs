//! safetensors header parsing and validation, from the header bytes alone.
//!
//! A safetensors file is `u64 little-endian header length N`, `N` bytes of JSON, then the
//! tensor data. The JSON is validated by the `safetensors` crate's own `Metadata` rules
//! (known dtypes, sizes that match shapes, offsets contiguous from 0); on top of that the
//! data section must end exactly at the end of the file. Offsets here are absolute file
//! offsets, so a tensor can be read with one ranged read.

use std::collections::BTreeMap;

pub use safetensors::Dtype;
use safetensors::tensor::Metadata;

/// The largest header accepted (the `safetensors` crate's own limit).
pub const MAX_HEADER_LEN: u64 = 100_000_000;

/// A safetensors file that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SafetensorsError {
    /// Shorter than the 8-byte length prefix.
    #[error("file is {size} bytes, too short for the 8-byte safetensors header length")]
    TooShort {
        /// The file size.
        size: u64,
    },
    /// The declared header length exceeds the limit or the file.
    #[error("bad header length: the file declares a {declared}-byte header but {reason}")]
    BadHeaderLength {
        /// The declared length.
        declared: u64,
        /// Why it is wrong.
        reason: String,
    },
    /// The header is not the JSON safetensors expects.
    #[error("bad header JSON: {message}")]
    BadJson {
        /// What the parser said.
        message: String,
    },
    /// Offsets that overlap, leave gaps, or run past the end of the file.
    #[error("bad tensor offsets: {message}")]
    BadOffsets {
        /// Which tensor and how.
        message: String,
    },
}

/// One tensor, located by absolute byte range within its file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// Tensor name (`model.layers.0.self_attn.q_proj.weight`).
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Shape, outermost first.
    pub shape: Vec<u64>,
    /// First byte, absolute within the file.
    pub begin: u64,
    /// One past the last byte, absolute within the file.
    pub end: u64,
}

impl TensorInfo {
    /// Number of elements.
    pub fn numel(&self) -> u64 {
        self.shape.iter().product()
    }
}

/// A validated safetensors header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Length of the JSON (the `N` of the prefix).
    pub json_len: u64,
    /// Tensors ordered by offset.
    pub tensors: Vec<TensorInfo>,
    /// The `__metadata__` map.
    pub metadata: BTreeMap<String, String>,
}

impl Header {
    /// Absolute offset of the first data byte (`8 + N`).
    pub fn data_start(&self) -> u64 {
        8 + self.json_len
    }

    /// The tensor with this name.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }
}

/// Reads the JSON length from the first 8 bytes and checks it against the file size.
pub fn json_len(prefix: &[u8], file_size: u64) -> Result<u64, SafetensorsError> {
    let Some(first8) = prefix.get(..8) else {
        return Err(SafetensorsError::TooShort { size: file_size });
    };
    if file_size < 8 {
        return Err(SafetensorsError::TooShort { size: file_size });
    }
    let mut b = [0u8; 8];
    b.copy_from_slice(first8);
    let declared = u64::from_le_bytes(b);
    if declared > MAX_HEADER_LEN {
        return Err(SafetensorsError::BadHeaderLength {
            declared,
            reason: format!("the limit is {MAX_HEADER_LEN} bytes"),
        });
    }
    if declared > file_size - 8 {
        return Err(SafetensorsError::BadHeaderLength {
            declared,
            reason: format!("the file has only {} bytes after the prefix", file_size - 8),
        });
    }
    Ok(declared)
}

/// Parses and validates the header JSON (the `N` bytes after the prefix) of a file of
/// `file_size` bytes.
pub fn parse_header(json: &[u8], file_size: u64) -> Result<Header, SafetensorsError> {
    let json_len = json.len() as u64;
    if file_size < 8 || json_len > file_size - 8 {
        return Err(SafetensorsError::BadHeaderLength {
            declared: json_len,
            reason: format!("the file has only {file_size} bytes"),
        });
    }
    let text = std::str::from_utf8(json).map_err(|e| SafetensorsError::BadJson {
        message: format!("not UTF-8: {e}"),
    })?;
    // The crate validates dtypes, shapes and contiguous offsets while deserialising.
    let meta: Metadata = serde_json::from_str(text).map_err(|e| {
        let message = e.to_string();
        if message.contains("invalid offset")
            || message.contains("invalid shape, data type, or offset")
            || message.contains("overflow")
            || message.contains("misaligned")
            || message.contains("byte boundary")
        {
            SafetensorsError::BadOffsets {
                message: describe_crate_error(&message),
            }
        } else {
            SafetensorsError::BadJson { message }
        }
    })?;
    let data_start = 8 + json_len;
    let data_len = file_size - data_start;
    if meta.data_len() as u64 != data_len {
        return Err(SafetensorsError::BadOffsets {
            message: format!(
                "tensor data ends at byte {} of the data section but the data section has {} bytes",
                meta.data_len(),
                data_len
            ),
        });
    }
    let mut tensors: Vec<TensorInfo> = meta
        .offset_keys()
        .into_iter()
        .filter_map(|name| {
            let info = meta.info(&name)?;
            Some(TensorInfo {
                dtype: info.dtype,
                shape: info.shape.iter().map(|&d| d as u64).collect(),
                begin: data_start + info.data_offsets.0 as u64,
                end: data_start + info.data_offsets.1 as u64,
                name,
            })
        })
        .collect();
    // The crate orders tensors by offset but leaves empty tensors at the same offset in
    // hash-map order, which differs between two parses of the same header; break ties by
    // name so a file always indexes the same way.
    tensors.sort_by(|a, b| (a.begin, a.end, &a.name).cmp(&(b.begin, b.end, &b.name)));
    let metadata = meta
        .metadata()
        .as_ref()
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default();
    Ok(Header {
        json_len,
        tensors,
        metadata,
    })
}

/// Parses a whole in-memory safetensors file's header.
pub fn parse_file_header(bytes: &[u8]) -> Result<Header, SafetensorsError> {
    let n = json_len(bytes, bytes.len() as u64)?;
    parse_header(&bytes[8..8 + n as usize], bytes.len() as u64)
}

fn describe_crate_error(message: &str) -> String {
    if let Some(rest) = message.split("invalid offset for tensor `").nth(1) {
        let name = rest.split('`').next().unwrap_or(rest);
        return format!(
            "tensor {name:?} does not start where the previous one ends (offsets overlap, leave a gap or are reversed)"
        );
    }
    if message.contains("invalid shape, data type, or offset") {
        return "a tensor's byte range does not match its dtype and shape".to_owned();
    }
    if message.contains("overflow") {
        return "tensor shape or offsets overflow".to_owned();
    }
    format!("invalid tensor layout ({message})")
}

/// The size in bytes of one element, for byte-sized dtypes.
pub fn dtype_size(dtype: Dtype) -> Option<usize> {
    let bits = dtype.bitsize();
    bits.is_multiple_of(8).then_some(bits / 8)
}

/// A serialised header (prefix + padded JSON) and each tensor's absolute `[begin, end)`.
pub type HeaderBytes = (Vec<u8>, Vec<(u64, u64)>);

/// Serialises a header for tensors laid out contiguously in the given order; returns the
/// complete header bytes (prefix + JSON padded with spaces to a multiple of 8) and each
/// tensor's absolute `[begin, end)`.
pub fn write_header(
    tensors: &[(String, Dtype, Vec<u64>)],
    metadata: &BTreeMap<String, String>,
) -> Result<HeaderBytes, SafetensorsError> {
    let mut map = serde_json::Map::new();
    if !metadata.is_empty() {
        map.insert(
            "__metadata__".to_owned(),
            serde_json::to_value(metadata).map_err(|e| SafetensorsError::BadJson {
                message: e.to_string(),
            })?,
        );
    }
    let mut offset = 0u64;
    let mut rel = Vec::with_capacity(tensors.len());
    for (name, dtype, shape) in tensors {
        let numel: u64 = shape.iter().product();
        let bits = numel.checked_mul(dtype.bitsize() as u64).ok_or_else(|| {
            SafetensorsError::BadOffsets {
                message: format!("tensor {name:?} is too large"),
            }
        })?;
        let size = bits.div_ceil(8);
        map.insert(
            name.clone(),
            serde_json::json!({
                "dtype": dtype,
                "shape": shape,
                "data_offsets": [offset, offset + size],
            }),
        );
        rel.push((offset, offset + size));
        offset += size;
    }
    let mut json = serde_json::to_vec(&serde_json::Value::Object(map)).map_err(|e| {
        SafetensorsError::BadJson {
            message: e.to_string(),
        }
    })?;
    while json.len() % 8 != 0 {
        json.push(b' ');
    }
    let start = 8 + json.len() as u64;
    let mut out = Vec::with_capacity(json.len() + 8);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    Ok((
        out,
        rel.into_iter()
            .map(|(b, e)| (start + b, start + e))
            .collect(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(json: &str, data: usize) -> Vec<u8> {
        let mut v = (json.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(json.as_bytes());
        v.extend(std::iter::repeat_n(0u8, data));
        v
    }

    #[test]
    fn parses_a_valid_file() {
        let f = file(
            r#"{"__metadata__":{"format":"pt"},"b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]},"a":{"dtype":"BF16","shape":[2,2],"data_offsets":[0,8]}}"#,
            16,
        );
        let h = parse_file_header(&f).unwrap();
        assert_eq!(h.tensors.len(), 2);
        assert_eq!(h.tensors[0].name, "a");
        assert_eq!(h.tensors[0].begin, h.data_start());
        assert_eq!(h.tensors[1].end, f.len() as u64);
        assert_eq!(h.metadata["format"], "pt");
    }

    #[test]
    fn rejects_bad_files() {
        assert!(matches!(
            parse_file_header(&[1, 2, 3]),
            Err(SafetensorsError::TooShort { .. })
        ));
        let mut f = file("{}", 0);
        f[..8].copy_from_slice(&1000u64.to_le_bytes());
        assert!(matches!(
            parse_file_header(&f),
            Err(SafetensorsError::BadHeaderLength { .. })
        ));
        assert!(matches!(
            parse_file_header(&file("{not json", 0)),
            Err(SafetensorsError::BadJson { .. })
        ));
        let unknown = file(
            r#"{"a":{"dtype":"Q4","shape":[1],"data_offsets":[0,1]}}"#,
            1,
        );
        assert!(matches!(
            parse_file_header(&unknown),
            Err(SafetensorsError::BadJson { .. })
        ));
        let overlap = file(
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
            12,
        );
        assert!(matches!(
            parse_file_header(&overlap),
            Err(SafetensorsError::BadOffsets { .. })
        ));
        let past_end = file(
            r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#,
            8,
        );
        assert!(matches!(
            parse_file_header(&past_end),
            Err(SafetensorsError::BadOffsets { .. })
        ));
        let wrong_size = file(
            r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
            8,
        );
        assert!(matches!(
            parse_file_header(&wrong_size),
            Err(SafetensorsError::BadOffsets { .. })
        ));
    }

    #[test]
    fn empty_tensors_at_one_offset_keep_one_order() {
        // Found by fuzzing: their order followed a randomly seeded hash map.
        let f = file(
            r#"{"e":{"dtype":"U8","shape":[0],"data_offsets":[4,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"d":{"dtype":"U8","shape":[0],"data_offsets":[4,4]},"c":{"dtype":"U8","shape":[0],"data_offsets":[4,4]},"b":{"dtype":"U8","shape":[0],"data_offsets":[4,4]}}"#,
            4,
        );
        for _ in 0..20 {
            let names: Vec<String> = parse_file_header(&f)
                .unwrap()
                .tensors
                .into_iter()
                .map(|t| t.name)
                .collect();
            assert_eq!(names, ["a", "b", "c", "d", "e"]);
        }
    }

    #[test]
    fn write_header_round_trips() {
        let tensors = vec![
            ("w".to_owned(), Dtype::BF16, vec![3, 5]),
            ("b".to_owned(), Dtype::F32, vec![5]),
        ];
        let (head, ranges) = write_header(&tensors, &BTreeMap::new()).unwrap();
        assert_eq!(head.len() % 8, 0);
        let total = ranges.last().unwrap().1 as usize;
        let mut f = head.clone();
        f.resize(total, 0);
        let h = parse_file_header(&f).unwrap();
        assert_eq!(h.tensor("w").unwrap().begin, ranges[0].0);
        assert_eq!(h.tensor("b").unwrap().end, ranges[1].1);
    }

    proptest::proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let _ = parse_file_header(&bytes);
        }

        #[test]
        fn never_panics_on_json(json in "\\PC{0,200}", data in 0usize..64) {
            let _ = parse_file_header(&file(&json, data));
        }
    }
}
