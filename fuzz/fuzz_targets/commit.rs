//! Commit objects (`repos/<repo>/commits/`).
#![no_main]
use libfuzzer_sys::fuzz_target;
use tarn::repo::Commit;

fuzz_target!(|data: &[u8]| {
    if let Some(c) = Commit::decode(data) {
        assert_eq!(Commit::decode(&c.encode()), Some(c));
    }
});
