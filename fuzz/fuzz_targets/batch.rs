//! Staging batches (`repos/<repo>/staging/<token>/<id>`).
#![no_main]
use libfuzzer_sys::fuzz_target;
use tarn::repo::StagingBatch;

fuzz_target!(|data: &[u8]| {
    if let Some(b) = StagingBatch::decode(data) {
        assert_eq!(StagingBatch::decode(&b.encode()), Some(b));
    }
});
