//! The calling thread's scheduling class. The mount's io_uring queue
//! threads run in the idle class (`mount::sched`), and a new thread takes
//! the class of the thread that starts it (`SCHED_RESET_ON_FORK` resets
//! real-time classes only). So a thread that may be started while a queue
//! thread serves a request (the store's runtime threads, a big file's
//! chunker and uploader, whole-file assembly, background cleanup) leaves
//! the idle class first: else it would run only when nothing else wants a
//! CPU, with no guard to bring it back.

/// Put the calling thread in the idle class (`SCHED_IDLE`), or in the
/// normal one (`SCHED_OTHER`). False if the kernel refused.
pub fn set_idle(idle: bool) -> bool {
    set_idle_of(0, idle)
}

/// `set_idle` for the thread `tid` of this process (0: the caller).
pub fn set_idle_of(tid: i32, idle: bool) -> bool {
    let policy = if idle {
        libc::SCHED_IDLE
    } else {
        libc::SCHED_OTHER
    };
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid struct; a bad tid is refused (ESRCH).
    unsafe { libc::sched_setscheduler(tid, policy, &param) == 0 }
}

/// The calling thread's id.
pub fn tid() -> i32 {
    // SAFETY: gettid(2) takes no arguments and cannot fail.
    unsafe { libc::gettid() }
}

/// Is the calling thread in the idle class?
pub fn is_idle() -> bool {
    // SAFETY: pid 0 is the calling thread.
    unsafe { libc::sched_getscheduler(0) == libc::SCHED_IDLE }
}

/// May a thread of this process leave the idle class once in it (root, or
/// `CAP_SYS_NICE`, or a raised `RLIMIT_NICE`)? Tried once, on a thread of
/// its own (whose class then does not matter).
pub fn may_leave_idle() -> bool {
    static MAY: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *MAY.get_or_init(|| {
        std::thread::Builder::new()
            .name("tarn-sched-probe".into())
            .spawn(|| set_idle(true) && set_idle(false))
            .ok()
            .and_then(|t| t.join().ok())
            .unwrap_or(false)
    })
}

/// Leave the idle class if the thread was started in it. Call first thing
/// in a thread that serves others.
pub fn leave_inherited_idle() {
    if is_idle() {
        set_idle(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_started_by_an_idle_one_leaves_the_idle_class() {
        if !may_leave_idle() {
            return; // the way back is closed here: nothing leaves the class
        }
        let (inherited, after) = std::thread::spawn(|| {
            assert!(set_idle(true));
            std::thread::spawn(|| {
                let inherited = is_idle();
                leave_inherited_idle();
                (inherited, is_idle())
            })
            .join()
            .unwrap()
        })
        .join()
        .unwrap();
        assert!(inherited, "a new thread takes its starter's class");
        assert!(!after);
    }
}
