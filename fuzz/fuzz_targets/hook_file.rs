//! Hook files (`_tarn/hooks/*.toml`, versioned in repositories).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = tarn::hooks::check_hook_file(text);
    }
});
