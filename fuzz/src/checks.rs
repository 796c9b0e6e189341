//! The properties that the fuzz targets (`fuzz/fuzz_targets/*.rs`, libFuzzer) and the
//! proptest harness (`services/core/tests/fuzz_props.rs`) check: one definition, two
//! drivers. Each function takes arbitrary bytes, must never panic on its own, and panics
//! (a fuzz crash, a failed proptest case) only when `patchport-core` breaks a property.
//!
//! The allocation probe counts the largest single allocation made on the calling thread,
//! so `tensor_index` can assert that the streaming indexer never allocates according to
//! a size the file declares (a header length up to 100 MB, a tensor of any size).

use patchport_core::adapter::AdapterConfig;
use patchport_core::layout::{TensorIndexer, count_non_finite};
use patchport_core::model_config::ModelConfig;
use patchport_core::safetensors::{self as st, Header, SafetensorsError};
use patchport_core::{AnyRef, Digest, Name, PortRef, Reference, Version, VersionRef};

/// The largest single allocation a bounded parser may make for `input_len` bytes of input:
/// a generous multiple of the input (JSON values, hash maps and their doubling growth),
/// far below the 100 MB header length a file may declare.
pub fn allocation_bound(input_len: usize) -> usize {
    64 * input_len + (1 << 20)
}

/// Largest single allocation per thread, while armed.
#[allow(unsafe_code)]
pub mod alloc_probe {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    thread_local! {
        static ARMED: Cell<bool> = const { Cell::new(false) };
        static PEAK: Cell<usize> = const { Cell::new(0) };
    }

    fn record(size: usize) {
        let _ = ARMED.try_with(|armed| {
            if armed.get() {
                let _ = PEAK.try_with(|p| p.set(p.get().max(size)));
            }
        });
    }

    /// The system allocator, recording the largest request made on an armed thread.
    #[derive(Debug)]
    pub struct Probe;

    // SAFETY: every call is forwarded unchanged to `System`; the bookkeeping touches only
    // const-initialised thread-locals, which never allocate.
    unsafe impl GlobalAlloc for Probe {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            record(layout.size());
            // SAFETY: forwarded with the caller's layout.
            unsafe { System.alloc(layout) }
        }

        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            record(layout.size());
            // SAFETY: forwarded with the caller's layout.
            unsafe { System.alloc_zeroed(layout) }
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            // SAFETY: forwarded with the caller's pointer and layout.
            unsafe { System.dealloc(ptr, layout) }
        }

        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            record(new_size);
            // SAFETY: forwarded with the caller's pointer, layout and size.
            unsafe { System.realloc(ptr, layout, new_size) }
        }
    }

    /// Runs `f` with the probe armed on this thread; returns its value and the largest
    /// single allocation it made.
    pub fn measure<T>(f: impl FnOnce() -> T) -> (T, usize) {
        PEAK.with(|p| p.set(0));
        ARMED.with(|a| a.set(true));
        let out = f();
        ARMED.with(|a| a.set(false));
        (out, PEAK.with(Cell::get))
    }
}

/// What a validated header guarantees: tensors in file order, contiguous from the data
/// start to the end of the file, each range exactly the size its dtype and shape need.
fn check_header(h: &Header, file_size: u64) {
    assert_eq!(h.data_start(), 8 + h.json_len);
    assert!(
        h.data_start() <= file_size,
        "header past the end of the file"
    );
    let mut at = h.data_start();
    for t in &h.tensors {
        assert_eq!(t.begin, at, "tensor {:?} is not contiguous", t.name);
        assert!(t.begin <= t.end);
        let numel = t
            .shape
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .expect("an accepted shape has a representable element count");
        let bits = numel
            .checked_mul(t.dtype.bitsize() as u64)
            .expect("an accepted tensor has a representable bit count");
        assert_eq!(bits % 8, 0);
        assert_eq!(
            t.end - t.begin,
            bits / 8,
            "tensor {:?} has the wrong size",
            t.name
        );
        assert_eq!(t.numel(), numel);
        assert!(h.tensor(&t.name).is_some());
        at = t.end;
    }
    assert_eq!(
        at, file_size,
        "the data section does not end at the end of the file"
    );
}

/// `safetensors_header`: the 8-byte prefix, the length limit and the header JSON of
/// arbitrary bytes, both as a whole file and as the start of a longer one.
pub fn safetensors_header(data: &[u8]) {
    let len = data.len() as u64;
    if let Ok(h) = st::parse_file_header(data) {
        check_header(&h, len);
    }
    // The bytes as the first bytes of a file whose size the store reports (the registry
    // reads the header before the data). The prefix is checked against that size.
    let Ok(n) = st::json_len(data, u64::MAX) else {
        return;
    };
    assert!(n <= st::MAX_HEADER_LEN);
    let Some(json) = data.get(8..8 + n as usize) else {
        return;
    };
    // The safetensors crate's own verdict decides which size is the right one.
    let crate_says = std::str::from_utf8(json)
        .ok()
        .and_then(|s| serde_json::from_str::<safetensors::tensor::Metadata>(s).ok());
    match crate_says {
        Some(meta) => {
            let size = 8 + n + meta.data_len() as u64;
            let h = st::parse_header(json, size)
                .expect("a header the safetensors crate accepts is accepted for its own size");
            check_header(&h, size);
            assert_eq!(st::json_len(data, size), Ok(n));
            for wrong in [size - 1, size + 1] {
                if wrong >= 8 + n {
                    assert!(
                        matches!(
                            st::parse_header(json, wrong),
                            Err(SafetensorsError::BadOffsets { .. })
                        ),
                        "a file of the wrong size was accepted"
                    );
                }
            }
        }
        None => {
            for size in [8 + n, 8 + n + 1, 8 + n + 4096] {
                assert!(st::parse_header(json, size).is_err());
            }
        }
    }
}

/// A tiny xorshift for chunk sizes (deterministic from the input).
fn next(state: &mut u32) -> u32 {
    *state ^= *state << 13;
    *state ^= *state >> 17;
    *state ^= *state << 5;
    *state
}

/// `tensor_index`: the streaming indexer fed arbitrary bytes in arbitrary chunkings.
///
/// `data[0]` seeds the chunk sizes, `data[1]` says which file size is declared (the
/// real one, larger, smaller, or up to the 100 MB header limit), the rest is the file.
pub fn tensor_index(data: &[u8]) {
    let [seed, mode, file @ ..] = data else {
        return;
    };
    let real = file.len() as u64;
    let k = u64::from(*mode >> 2);
    let declared = match mode & 3 {
        0 => real,
        1 => real + k + 1,
        2 => real.saturating_sub(k + 1),
        _ => st::MAX_HEADER_LEN + 8 + k,
    };
    let mut state = u32::from(*seed) | 0x9e37_0000;
    let (result, peak) = alloc_probe::measure(|| {
        let mut ix = TensorIndexer::new(declared);
        let mut rest = file;
        while !rest.is_empty() {
            let take = match next(&mut state) % 4 {
                0 => 1,
                1 => (next(&mut state) % 16) as usize + 1,
                2 => (next(&mut state) % 512) as usize + 1,
                _ => rest.len(),
            }
            .min(rest.len());
            ix.feed(&rest[..take])?;
            rest = &rest[take..];
        }
        ix.finish()
    });
    assert!(
        peak <= allocation_bound(file.len()),
        "the indexer allocated {peak} bytes at once for a {}-byte input declaring {declared} bytes",
        file.len()
    );
    let whole = st::parse_file_header(file);
    match result {
        Ok((header, records)) => {
            assert_eq!(declared, real, "a file of the wrong size was indexed");
            let parsed = whole.expect("the indexer accepted a file the header parser refuses");
            assert_eq!(header, parsed, "the indexer and the header parser disagree");
            check_header(&header, real);
            assert_eq!(records.len(), header.tensors.len());
            for (r, t) in records.iter().zip(&header.tensors) {
                assert_eq!((&r.name, r.begin, r.end), (&t.name, t.begin, t.end));
                assert_eq!(r.shape, t.shape);
                let bytes = &file[r.begin as usize..r.end as usize];
                assert_eq!(r.digest, Digest::of(bytes), "tensor {:?} digest", r.name);
                assert_eq!(r.non_finite, count_non_finite(t.dtype, bytes));
            }
        }
        Err(_) => {
            if declared == real {
                assert!(
                    whole.is_err(),
                    "the indexer refused a file the header parser accepts"
                );
            }
        }
    }
}

/// Module names to resolve ranks and alphas for: fixed ones plus names taken from the
/// config itself, so its patterns get a chance to match.
fn modules(c: &AdapterConfig) -> Vec<String> {
    let mut out: Vec<String> = [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.mlp.down_proj",
        "transformer.h.0.attn.c_attn",
        "",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    if let patchport_core::adapter::TargetModules::List(l) = &c.target_modules {
        out.extend(l.iter().take(2).map(|m| format!("model.layers.3.{m}")));
    }
    out.extend(c.rank_pattern.iter().take(2).map(|(k, _)| k.clone()));
    out.extend(c.alpha_pattern.iter().take(2).map(|(k, _)| k.clone()));
    out
}

/// `adapter_config`: PEFT `adapter_config.json` parsing, refusals, rank/alpha patterns
/// (bounded in number and size; a stored config read back without compiling them
/// resolves ranks and alphas the same), and re-pointing (which must give a config that
/// parses to the same adapter).
pub fn adapter_config(data: &[u8]) {
    let stored = AdapterConfig::parse_stored(data);
    let c = match AdapterConfig::parse(data) {
        Ok(c) => c,
        Err(e) => {
            assert!(e.to_string().starts_with("adapter_config.json"));
            return;
        }
    };
    let stored = stored.expect("what parse accepts, parse_stored accepts");
    assert!(c.rank_pattern.len() <= patchport_core::adapter::MAX_PATTERNS);
    assert!(c.alpha_pattern.len() <= patchport_core::adapter::MAX_PATTERNS);
    for m in modules(&c) {
        assert_eq!(stored.rank_for(&m), c.rank_for(&m));
        assert_eq!(stored.alpha_for(&m).to_bits(), c.alpha_for(&m).to_bits());
    }
    let refusals = c.refusals();
    let lora = c.peft_type == "LORA";
    if !lora {
        assert_eq!(refusals.len(), 1, "a non-LoRA adapter has one refusal");
    }
    if lora {
        assert!(c.r > 0);
        for m in modules(&c) {
            let r = c.rank_for(&m);
            assert!(r == c.r || c.rank_pattern.iter().any(|(_, v)| *v == r));
            let a = c.alpha_for(&m);
            assert!(a.is_finite());
            assert!(a == c.lora_alpha || c.alpha_pattern.iter().any(|(_, v)| *v == a));
            assert!(c.scale_for(&m).is_finite());
        }
    }
    let base = "fuzz/base:v2";
    let rev = "sha256:0000000000000000000000000000000000000000000000000000000000000000";
    let again = AdapterConfig::parse(&c.repointed_json(base, Some(rev)))
        .expect("a re-pointed config parses");
    assert_eq!(again.base_model_name_or_path.as_deref(), Some(base));
    assert_eq!(again.revision.as_deref(), Some(rev));
    assert_eq!(again.peft_type, c.peft_type);
    assert_eq!(again.r, c.r);
    assert_eq!(again.lora_alpha.to_bits(), c.lora_alpha.to_bits());
    assert_eq!(again.rank_pattern, c.rank_pattern);
    assert_eq!(again.alpha_pattern, c.alpha_pattern);
    assert_eq!(again.target_modules, c.target_modules);
    assert_eq!(again.refusals(), refusals);
    let _ = (c.rank_pattern_map(), c.alpha_pattern_map());
}

const LLAMA: &[u8] = br#"{"model_type":"llama","architectures":["LlamaForCausalLM"],"hidden_size":64,"num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"vocab_size":320,"dtype":"float32"}"#;

/// `model_config`: HF `config.json` parsing and the architecture-family comparison.
pub fn model_config(data: &[u8]) {
    let c = match ModelConfig::parse(data) {
        Ok(c) => c,
        Err(e) => {
            assert!(e.to_string().starts_with("config.json"));
            return;
        }
    };
    assert!(!c.model_type.is_empty());
    assert!(c.family_mismatches(&c).is_empty());
    let llama = ModelConfig::parse(LLAMA).expect("the llama config parses");
    let there = c.family_mismatches(&llama);
    let back = llama.family_mismatches(&c);
    assert_eq!(there.len(), back.len(), "family comparison is symmetric");
}

/// Error messages quote at most a bounded prefix of the input.
fn bounded(message: String) {
    assert!(
        message.len() <= 4096,
        "an error message of {} bytes",
        message.len()
    );
}

/// `Display` then `FromStr` gives the same value back, and `Display` is stable.
fn round_trip<T>(x: &T) -> String
where
    T: std::fmt::Display + std::str::FromStr + PartialEq + std::fmt::Debug,
    T::Err: std::fmt::Debug,
{
    let shown = x.to_string();
    let back: T = shown
        .parse()
        .unwrap_or_else(|e| panic!("{shown:?} (displayed from {x:?}) does not parse: {e:?}"));
    assert_eq!(&back, x, "{shown:?} parses to another value");
    assert_eq!(back.to_string(), shown);
    shown
}

/// `names`: Name/Version/Digest/VersionRef/Reference/PortRef/AnyRef parsing; every
/// accepted input round-trips through `Display`, and the two ways to parse a reference
/// agree.
pub fn names(data: &[u8]) {
    let s = String::from_utf8_lossy(data);
    let s = s.as_ref();
    match s.parse::<Name>() {
        Ok(n) => {
            assert_eq!(round_trip(&n), s, "a name displays as typed");
            assert_eq!(format!("{}/{}", n.namespace(), n.name()), s);
        }
        Err(e) => bounded(e.to_string()),
    }
    match s.parse::<Version>() {
        Ok(v) => assert_eq!(round_trip(&v), s, "a version displays as typed"),
        Err(e) => bounded(e.to_string()),
    }
    match s.parse::<Digest>() {
        Ok(d) => assert_eq!(round_trip(&d), s, "a digest displays as typed"),
        Err(e) => bounded(e.to_string()),
    }
    match s.parse::<VersionRef>() {
        Ok(v) => {
            round_trip(&v);
        }
        Err(e) => bounded(e.to_string()),
    }
    let reference = s.parse::<Reference>();
    match &reference {
        Ok(r) => {
            round_trip(r);
        }
        Err(e) => bounded(e.to_string()),
    }
    let port = s.parse::<PortRef>();
    match &port {
        Ok(p) => {
            round_trip(p);
            assert_eq!(p.to_string(), format!("{}@{}", p.patch, p.base));
        }
        Err(e) => bounded(e.to_string()),
    }
    match s.parse::<AnyRef>() {
        Ok(AnyRef::Version(r)) => {
            assert_eq!(
                reference.as_ref().ok(),
                Some(&r),
                "AnyRef and Reference agree"
            );
            assert_eq!(
                round_trip(&r).parse::<AnyRef>(),
                Ok(AnyRef::Version(r.clone()))
            );
        }
        Ok(AnyRef::Port(p)) => {
            assert_eq!(port.as_ref().ok(), Some(&p), "AnyRef and PortRef agree");
            assert_eq!(
                round_trip(&p).parse::<AnyRef>(),
                Ok(AnyRef::Port(p.clone()))
            );
        }
        Err(e) => bounded(e.to_string()),
    }
}
