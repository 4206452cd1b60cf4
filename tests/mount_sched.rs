//! The io_uring queue threads' scheduling class (`mount::sched`): idle
//! while nothing else wants their CPUs, normal while other work keeps them
//! waiting, idle again once it stops; normal throughout with
//! `--no-idle-queues`. A test binary of its own: the busy loops it runs
//! would slow the other mount tests.

mod common;
use common::*;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use libc::{SCHED_IDLE, SCHED_OTHER};

/// An io_uring queue thread (`tarn-uring-N`; not a helper,
/// `tarn-uring-help-N`)?
fn is_queue(name: &str) -> bool {
    name.strip_prefix("tarn-uring-")
        .is_some_and(|n| n.parse::<u32>().is_ok())
}

/// Make requests from every CPU until all of a daemon's queue threads are
/// in the class `policy`.
fn wait_for_queues(what: &str, timeout: Duration, pid: u32, file: &Path, policy: i32) {
    wait_until(what, timeout, || {
        requests_from_every_cpu(file);
        queue_policies(pid) == vec![policy; cpus()]
    });
}

/// The scheduling policy of each io_uring queue thread of a daemon.
fn queue_policies(pid: u32) -> Vec<i32> {
    threads(pid)
        .into_iter()
        .filter(|(name, _)| is_queue(name))
        .map(|(_, policy)| policy)
        .collect()
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn pin_to(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is empty; `cpu` is below the CPU count.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Requests through the mount from every CPU in turn (the kernel hands a
/// request to the queue of the CPU its caller runs on).
fn requests_from_every_cpu(file: &Path) {
    for cpu in 0..cpus() {
        let file = file.to_path_buf();
        std::thread::spawn(move || {
            pin_to(cpu);
            for _ in 0..50 {
                std::fs::metadata(&file).unwrap();
                assert_eq!(std::fs::read(&file).unwrap(), b"data\n");
            }
        })
        .join()
        .unwrap();
    }
}

/// A busy loop in the normal class on every CPU, until `stop`.
fn busy_loops(stop: &Arc<AtomicBool>) -> Vec<std::thread::JoinHandle<()>> {
    (0..cpus())
        .map(|cpu| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                pin_to(cpu);
                while !stop.load(Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            })
        })
        .collect()
}

#[test]
fn queue_threads_leave_the_idle_class_under_load_and_come_back() {
    if !fuse_available() {
        return;
    }
    let s = Scratch::new();
    s.ok(&["repo", "create", "sales"]);
    let src = s.write("data.txt", b"data\n");
    s.ok(&["put", src.to_str().unwrap(), "sales/main/data.txt"]);
    s.ok(&["commit", "sales/main", "-m", "one file"]);

    let normal = Mount::new(&s, "normal", &["--no-idle-queues"]);
    // Every request checks the branch (a read of its ref on the store's
    // runtime, from the queue thread that serves it).
    let m = Mount::new(&s, "mnt", &["--metadata-ttl", "0s"]);
    if !io_uring_offered() {
        eprintln!("no FUSE over io_uring here: no queue threads to look at");
        return;
    }
    let file = m.p("sales/main/data.txt");
    let pid = m.child.id();
    let queues = || queue_policies(pid);
    wait_until("the queue threads", Duration::from_secs(10), || {
        queues().len() == cpus()
    });

    // Kept in the normal class when told so.
    requests_from_every_cpu(&normal.p("sales/main/data.txt"));
    let policies = queue_policies(normal.child.id());
    assert_eq!(policies, vec![SCHED_OTHER; cpus()]);
    drop(normal);

    // Could the daemon (this test's privileges) come back from the idle
    // class? The check the daemon itself makes.
    if !tarn::thread_class::may_leave_idle() {
        // Without CAP_SYS_NICE a thread could not come back from the idle
        // class, so it never enters it.
        requests_from_every_cpu(&file);
        assert_eq!(queues(), vec![SCHED_OTHER; cpus()]);
        return;
    }
    // Idle with the CPUs free (a first request slow for other reasons, say
    // a cold disk, may send a thread to the normal class for a second).
    wait_for_queues(
        "the queue threads idle (the test needs the CPUs otherwise free)",
        Duration::from_secs(30),
        pid,
        &file,
        SCHED_IDLE,
    );

    // Threads started while a queue thread serves a request (the store's
    // runtime, a big file's chunker and uploader) would take its class;
    // they leave it. Seen end to end here, after work of every kind; the
    // store's and the stream's unit tests start such threads from an idle
    // one every time.
    let branch = m.p("sales/main");
    for cpu in 0..cpus() {
        let branch = branch.clone();
        std::thread::spawn(move || {
            pin_to(cpu);
            std::fs::write(
                branch.join(format!("big{cpu}")),
                pseudo_random(3 << 20, cpu as u64),
            )
            .unwrap();
            for i in 0..20 {
                std::fs::write(branch.join(format!("small{cpu}-{i}")), b"x").unwrap();
            }
        })
        .join()
        .unwrap();
    }
    ctl(&branch, "commit -m more").unwrap();
    let src = s.write("cli.txt", b"from the CLI\n");
    s.ok(&["put", src.to_str().unwrap(), "sales/main/cli.txt"]);
    requests_from_every_cpu(&file);
    assert_eq!(
        std::fs::read(branch.join("big0")).unwrap(),
        pseudo_random(3 << 20, 0)
    );
    let idle_others: Vec<String> = threads(pid)
        .into_iter()
        .filter(|(name, policy)| *policy == SCHED_IDLE && !is_queue(name))
        .map(|(name, _)| name)
        .collect();
    assert_eq!(idle_others, Vec::<String>::new());

    // Busy loops on every CPU keep the queue threads waiting: they go back
    // to the normal class (and the requests are answered all along). Either
    // of the two ways does it here, the guard (waits between requests) or
    // the watchdog (a request preempted for long); their unit tests take
    // each alone.
    let stop = Arc::new(AtomicBool::new(false));
    let loops = busy_loops(&stop);
    let left_idle = std::panic::catch_unwind(|| {
        wait_until(
            "a queue thread in the normal class",
            Duration::from_secs(60),
            || {
                std::fs::read(&file).unwrap();
                queues().contains(&SCHED_OTHER)
            },
        )
    });
    stop.store(true, Ordering::Relaxed);
    for l in loops {
        l.join().unwrap();
    }
    left_idle.unwrap();

    // Once the CPUs are free again they return to the idle class (after a
    // stay in the normal one of a second, or a few if they turned back
    // more than once).
    wait_for_queues(
        "the queue threads idle again",
        Duration::from_secs(90),
        pid,
        &file,
        SCHED_IDLE,
    );
}
