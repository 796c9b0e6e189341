//! Fuzz targets over the parsers of `patchport-core`. The properties live in
//! `checks.rs`, shared with the proptest harness in `services/core/tests/fuzz_props.rs`;
//! the targets in `fuzz_targets/` only hand libFuzzer's bytes to them.
//!
//! Run: `scripts/fuzz.sh [SECONDS_PER_TARGET]`, or `scripts/fuzz.sh --seeds` to replay the
//! committed corpus.

pub mod checks;

/// Every allocation goes through the probe, so `tensor_index` can bound the largest one.
#[global_allocator]
static PROBE: checks::alloc_probe::Probe = checks::alloc_probe::Probe;
