//! Every decoder of on-store bytes, fed arbitrary and mutated bytes:
//! it returns an error, never panics, and what it accepts encodes back to
//! bytes it decodes the same way. (`fuzz/` runs the same decoders under
//! libFuzzer; these run in every test run.)

use proptest::prelude::*;

use super::*;
use crate::tree::Node;

fn sample_node() -> Vec<u8> {
    Node::Leaf(vec![
        ("a.csv".into(), Entry::Symlink("b".into())),
        (
            "b".into(),
            Entry::File(File {
                size: 3,
                mode: 0o644,
                mtime: 1,
                content: Content::Inline(b"abc".to_vec().into()),
            }),
        ),
    ])
    .encode()
}

fn sample_commit() -> Vec<u8> {
    Commit {
        tree: Hash::of(b"t"),
        parents: vec![Hash::of(b"p")],
        author: "me".into(),
        time: 5,
        message: "m".into(),
        meta: BTreeMap::from([("k".into(), "v".into())]),
        generation: 2,
        consumed: vec![Consumed {
            token: "t".into(),
            batches: vec!["b".into()],
        }],
    }
    .encode()
}

fn sample_batch() -> Vec<u8> {
    StagingBatch {
        id: "01J".into(),
        prior: vec![],
        ops: vec![
            Op::Delete { path: "x".into() },
            Op::Move {
                from: "a".into(),
                to: "b".into(),
            },
        ],
    }
    .encode()
}

/// Decode with every decoder; only panics matter here.
fn decode_all(bytes: &[u8]) {
    if let Ok(n) = Node::decode(bytes) {
        assert_eq!(Node::decode(&n.encode()).ok(), Some(n));
    }
    if let Some(c) = Commit::decode(bytes) {
        assert_eq!(Commit::decode(&c.encode()), Some(c));
    }
    if let Some(b) = StagingBatch::decode(bytes) {
        assert_eq!(StagingBatch::decode(&b.encode()), Some(b));
    }
    let _ = serde_json::from_slice::<BranchRef>(bytes);
    let _ = serde_json::from_slice::<TagRef>(bytes);
    let _ = serde_json::from_slice::<RepoConfig>(bytes);
    let _ = serde_json::from_slice::<LakeConfig>(bytes);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        decode_all(&bytes);
    }

    #[test]
    fn mutated_encodings_never_panic(
        which in 0usize..3,
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut bytes = [sample_node(), sample_commit(), sample_batch()][which].clone();
        for (at, x) in flips {
            let i = at.index(bytes.len());
            bytes[i] ^= x;
        }
        decode_all(&bytes);
        let n = cut.index(bytes.len() + 1);
        decode_all(&bytes[..n]);
    }
}

#[test]
fn garbage_objects_in_a_lake_are_errors_not_panics() {
    let store = Store::open(&format!("memory://garbage-{}", ulid::Ulid::new())).unwrap();
    let l = Lake::init(store.clone()).unwrap().0;
    l.create_repo("r", "main").unwrap();
    let head = l.branch_head("r", "main").unwrap();
    let tree = l.commit("r", &head).unwrap().tree;
    // A node whose name matches its bytes but whose bytes are not a node.
    let junk = Bytes::from_static(b"\x01\xff\xff\xff\xff\xff");
    let junk_hash = Hash::of(&junk);
    store.put(&junk_hash.key("nodes"), junk).unwrap();
    assert!(l.trees().entries(&junk_hash).is_err());
    // A branch ref that is not JSON, a commit that is not a commit.
    store
        .put(
            "repos/r/refs/branches/bad",
            Bytes::from_static(b"{not json"),
        )
        .unwrap();
    assert!(matches!(
        l.branch("r", "bad"),
        Err(RepoError::Decode { .. })
    ));
    let fake = Bytes::from_static(b"\x01\x00");
    let fake_id = Hash::of(&fake);
    store.put(&Lake::commit_key("r", &fake_id), fake).unwrap();
    assert!(l.commit("r", &fake_id).is_err());
    assert!(l.trees().lookup(&tree, "a/b").unwrap().is_none());
}
