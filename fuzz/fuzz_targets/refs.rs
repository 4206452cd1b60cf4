//! The JSON objects of a lake: lake.json, repo.json, branch and tag refs.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tarn::repo::{BranchRef, LakeConfig, RepoConfig, TagRef};

fuzz_target!(|data: &[u8]| {
    let _ = serde_json::from_slice::<LakeConfig>(data);
    let _ = serde_json::from_slice::<RepoConfig>(data);
    let _ = serde_json::from_slice::<BranchRef>(data);
    let _ = serde_json::from_slice::<TagRef>(data);
});
