#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| patchport_fuzz::checks::safetensors_header(data));
