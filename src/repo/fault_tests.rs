//! The ref-update protocol against a store that fails on purpose
//! (`store::faults`): transient errors and lost acknowledgements are
//! absorbed; a store that is down fails operations cleanly; no failure
//! leaves a ref naming objects that are not there, or loses a staged change.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::store::faults::{FaultPlan, FaultyStore};

fn faulty_lake(plan: FaultPlan) -> (Lake, Arc<FaultyStore>) {
    let faults = FaultyStore::new(Arc::new(object_store::memory::InMemory::new()), plan);
    let store = Store::over(faults.clone(), "memory://faulty");
    (Lake::init(store).unwrap().0, faults)
}

fn put(l: &Lake, path: &str, data: &[u8]) -> Result<String> {
    let (entry, _) = l.store_file(data, 0o644, 0, path)?;
    l.flush()?;
    l.stage(
        "r",
        "main",
        vec![Op::Put {
            path: path.into(),
            entry,
        }],
    )
}

fn commit(l: &Lake, m: &str) -> Result<Hash> {
    l.commit_branch(
        "r",
        "main",
        &CommitOptions {
            message: m.into(),
            ..Default::default()
        },
    )
}

/// How many commits on main's first-parent history added each path.
fn adds_per_path(l: &Lake) -> BTreeMap<String, usize> {
    let head = l.branch_head("r", "main").unwrap();
    let mut out = BTreeMap::new();
    for (_, c) in l.log("r", &head, usize::MAX).unwrap() {
        let before = match c.parents.first() {
            Some(p) => l.commit("r", p).unwrap().tree,
            None => l.trees.empty_dir(),
        };
        for ch in l.diff_trees(&before, &c.tree).unwrap() {
            if ch.kind == ChangeKind::Added {
                *out.entry(ch.path).or_default() += 1;
            }
        }
    }
    out
}

fn clean(l: &Lake) {
    let report = l.fsck(&FsckOptions::default()).unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}

#[test]
fn transient_errors_and_lost_acknowledgements_are_absorbed() {
    let (l, faults) = faulty_lake(FaultPlan {
        error_every: 3,
        lost_ack_every: 4,
        ..Default::default()
    });
    l.create_repo("r", "main").unwrap();
    for i in 0..24 {
        let big = crate::chunk::INLINE_MAX as usize + i; // not inline: chunks go to the store
        put(&l, &format!("f{i}"), &vec![i as u8; big]).unwrap();
        if i % 5 == 4 {
            commit(&l, &format!("c{i}")).unwrap();
        }
    }
    commit(&l, "last").unwrap();
    assert!(faults.counts.errors.load(Ordering::Relaxed) > 10);
    assert!(faults.counts.lost_acks.load(Ordering::Relaxed) > 5);
    faults.set_plan(FaultPlan::default());
    let adds = adds_per_path(&l);
    assert_eq!(adds.len(), 24);
    assert!(adds.values().all(|n| *n == 1), "{adds:?}");
    assert!(l.status("r", "main").unwrap().is_empty());
    clean(&l);
}

#[test]
fn a_store_that_is_down_fails_cleanly_and_loses_nothing() {
    let (l, faults) = faulty_lake(FaultPlan::default());
    l.create_repo("r", "main").unwrap();
    put(&l, "a", b"a").unwrap();
    let head = commit(&l, "a").unwrap();
    put(&l, "b", b"b").unwrap();
    faults.set_plan(FaultPlan {
        down: true,
        ..Default::default()
    });
    let err = commit(&l, "b").unwrap_err();
    assert!(
        err.to_string().contains("injected fault: store down"),
        "{err}"
    );
    assert!(put(&l, "c", b"c").is_err());
    faults.set_plan(FaultPlan::default());
    assert_eq!(l.branch_head("r", "main").unwrap(), head);
    let staged: Vec<String> = l
        .status("r", "main")
        .unwrap()
        .into_iter()
        .map(|c| c.path)
        .collect();
    assert_eq!(
        staged,
        ["b"],
        "the acknowledged stage survives, the refused one is not there"
    );
    commit(&l, "b").unwrap();
    clean(&l);
}

#[test]
fn failed_object_writes_never_leave_a_ref_naming_missing_objects() {
    let (l, faults) = faulty_lake(FaultPlan::default());
    l.create_repo("r", "main").unwrap();
    let head = l.branch_head("r", "main").unwrap();
    put(&l, "d/x", &vec![7u8; 10_000]).unwrap();
    for prefix in ["nodes/", "repos/r/commits/"] {
        faults.set_plan(FaultPlan {
            fail_puts_under: Some(prefix.into()),
            ..Default::default()
        });
        assert!(commit(&l, "x").is_err(), "{prefix}");
        faults.set_plan(FaultPlan::default());
        assert_eq!(l.branch_head("r", "main").unwrap(), head);
        clean(&l);
    }
    commit(&l, "x").unwrap();
    clean(&l);
}

#[test]
fn slow_and_timing_out_stores_still_commit() {
    let (l, faults) = faulty_lake(FaultPlan {
        delay: Duration::from_millis(2),
        timeout_every: 5,
        timeout: Duration::from_millis(30),
        ..Default::default()
    });
    l.create_repo("r", "main").unwrap();
    put(&l, "a", &vec![1u8; 9000]).unwrap();
    commit(&l, "a").unwrap();
    assert!(faults.counts.errors.load(Ordering::Relaxed) > 0);
    faults.set_plan(FaultPlan::default());
    clean(&l);
}

#[test]
fn fsck_reports_missing_and_corrupt_objects_precisely() {
    let store = Store::open(&format!("memory://fsck-{}", ulid::Ulid::new())).unwrap();
    let l = Lake::init(store.clone()).unwrap().0;
    l.create_repo("r", "main").unwrap();
    put(&l, "dir/big", &vec![3u8; 20_000]).unwrap();
    put(&l, "small", b"s").unwrap();
    commit(&l, "c").unwrap();
    clean(&l);
    let chunk = store.list("chunks").unwrap().pop().unwrap();
    store.put(&chunk, Bytes::from_static(b"flipped")).unwrap();
    let report = l.fsck(&FsckOptions::default()).unwrap();
    assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
    assert!(report.problems[0].contains("chunk") && report.problems[0].contains("corrupt"));
    assert!(
        report.problems[0].contains("/dir/big"),
        "{:?}",
        report.problems
    );
    // Sampling none still finds it gone, not corrupt.
    store.delete(&chunk).unwrap();
    let sampled = l
        .fsck(&FsckOptions {
            sample: 0.0,
            ..Default::default()
        })
        .unwrap();
    assert!(
        sampled.problems[0].contains("missing"),
        "{:?}",
        sampled.problems
    );
    assert_eq!(sampled.chunks_verified, 0);
    // A missing tree node.
    let head = l.branch_head("r", "main").unwrap();
    let tree = l.commit("r", &head).unwrap().tree;
    store.delete(&tree.key("nodes")).unwrap();
    let report = l.fsck(&FsckOptions::default()).unwrap();
    assert!(report
        .problems
        .iter()
        .any(|p| p.contains(&format!("node {}", tree.short())) && p.contains("missing")));
}

#[test]
fn a_writer_whose_clock_is_behind_still_applies_after_what_it_saw() {
    let store = Store::open(&format!("memory://skew-{}", ulid::Ulid::new())).unwrap();
    let l = Lake::init(store.clone()).unwrap().0;
    l.create_repo("r", "main").unwrap();
    // Another machine, its clock an hour ahead, staged "a" = "theirs".
    let (r, _) = l.branch("r", "main").unwrap();
    let ahead = std::time::SystemTime::now() + Duration::from_secs(3600);
    let theirs = StagingBatch {
        id: ulid::Ulid::from_datetime(ahead).to_string(),
        prior: vec![],
        ops: vec![Op::Put {
            path: "a".into(),
            entry: Entry::Symlink("theirs".into()),
        }],
    };
    store
        .put(
            &Lake::batch_key("r", &r.staging, &theirs.id),
            Bytes::from(theirs.encode()),
        )
        .unwrap();
    // This machine sees it, then writes "a" = "mine": its write comes after.
    let (_, work) = l.working_tree("r", "main").unwrap();
    assert_eq!(
        l.trees.lookup(&work, "a").unwrap(),
        Some(Entry::Symlink("theirs".into()))
    );
    let mine = l
        .stage(
            "r",
            "main",
            vec![Op::Put {
                path: "a".into(),
                entry: Entry::Symlink("mine".into()),
            }],
        )
        .unwrap();
    assert!(mine > theirs.id);
    let id = commit(&l, "c").unwrap();
    let tree = l.commit("r", &id).unwrap().tree;
    assert_eq!(
        l.trees.lookup(&tree, "a").unwrap(),
        Some(Entry::Symlink("mine".into()))
    );
    // History order never looks at clocks: a child whose time is earlier
    // than its parent's still comes first in the log.
    let parent = l.commit("r", &id).unwrap();
    let skewed = Commit {
        parents: vec![id],
        time: parent.time - 86_400_000,
        generation: parent.generation + 1,
        message: "from a machine a day behind".into(),
        ..parent
    };
    let child = l.write_commit("r", &skewed).unwrap();
    let log = l.log("r", &child, 10).unwrap();
    assert_eq!(log[0].0, child);
    assert_eq!(log[1].0, id);
    assert_eq!(l.merge_bases("r", &child, &id).unwrap(), vec![id]);
}
