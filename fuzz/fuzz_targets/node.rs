//! Tree nodes and manifests (`nodes/`): decode, and re-encode what decodes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tarn::tree::Node;

fuzz_target!(|data: &[u8]| {
    if let Ok(n) = Node::decode(data) {
        assert_eq!(Node::decode(&n.encode()).ok(), Some(n));
    }
});
