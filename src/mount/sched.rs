//! The scheduling class of the io_uring queue threads (`super::uring`).
//!
//! A queue thread answers a caller on the caller's CPU, and the reply
//! wakes the caller while the thread is still running there. The kernel
//! then looks for an idle CPU to run the caller on, finds the other one
//! and wakes it: on a VM whose idle vCPUs halt at once, that costs ~30 µs,
//! about once per small file an untar writes (1.1–1.3 such moves per file
//! were counted). A thread in the idle class (`SCHED_IDLE`) does not make
//! its CPU busy in the kernel's eyes, so the caller stays where it was and
//! runs as soon as the reply is sent; an unpinned untar of 20k small files
//! went from 2.8–3.2 s to 2.2–2.5 s on such a VM, and reading them back
//! from 1.5–1.8 s to 1.2 s.
//!
//! The idle class runs only when nothing else wants the CPU, so under load
//! (a build, a training job busy on every core) a queue thread would wait
//! a scheduler tick (4 ms here) for every request: the same read took
//! 21–58 s instead of 1.4 s next to two busy loops. So each thread watches
//! how long it waits to run (`/proc/thread-self/schedstat`, its second
//! field) and goes back to the normal class for a while when it waits long
//! (`Guard`). Where the thread could not come back from the idle class
//! (without `CAP_SYS_NICE` or a raised `RLIMIT_NICE`) it never leaves the
//! normal one.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::thread_class::set_idle;

/// How often a thread in the idle class looks at its waits: often enough
/// that a few requests at most wait a tick each before it turns back.
const CHECK_EVERY: Duration = Duration::from_millis(2);
/// Average wait to run, per time run, above which the thread turns back:
/// next to a caller the thread waits the caller's few µs between requests;
/// under load it waits a tick (1–4 ms).
const WAIT_LIMIT: Duration = Duration::from_micros(250);
/// And at least this much waited in one check, so one slow wakeup alone
/// does not turn it back.
const WAITED_AT_LEAST: Duration = Duration::from_millis(1);
/// The first stay in the normal class; it doubles each time the thread
/// turns back again within `CALM`, up to `HOLD_MAX`.
const HOLD_MIN: Duration = Duration::from_secs(1);
const HOLD_MAX: Duration = Duration::from_secs(64);
/// A stay in the idle class this long without waiting long resets the stay
/// in the normal class to `HOLD_MIN`.
const CALM: Duration = Duration::from_secs(30);

/// What `/proc/thread-self/schedstat` says: nanoseconds waited to run
/// (runnable, not running) and how many times the thread ran.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Waits {
    waited_ns: u64,
    runs: u64,
}

impl Waits {
    fn parse(text: &str) -> Option<Waits> {
        let mut fields = text.split_ascii_whitespace().skip(1);
        Some(Waits {
            waited_ns: fields.next()?.parse().ok()?,
            runs: fields.next()?.parse().ok()?,
        })
    }
}

/// When a queue thread changes class, given its waits (no system calls:
/// the caller reads the waits and applies the class).
#[derive(Debug)]
struct Guard {
    idle: bool,
    /// When the class last changed.
    since: Instant,
    next_check: Instant,
    /// The waits at the last check.
    last: Waits,
    /// What the last check saw: waited (ns) and runs since the one before.
    window: (u64, u64),
    /// How long the next turn to the normal class lasts.
    hold: Duration,
    /// How long the current stay in the normal class lasts.
    staying: Duration,
}

impl Guard {
    fn new(now: Instant, waits: Waits) -> Guard {
        Guard {
            idle: true,
            since: now,
            next_check: now + CHECK_EVERY,
            last: waits,
            window: (0, 0),
            hold: HOLD_MIN,
            staying: Duration::ZERO,
        }
    }

    /// Is a check due (else the waits need not be read)?
    fn due(&self, now: Instant) -> bool {
        now >= self.next_check
    }

    /// The class to change to (true: idle), if it changes now.
    fn check(&mut self, now: Instant, waits: Waits) -> Option<bool> {
        self.next_check = now + CHECK_EVERY;
        let waited = waits.waited_ns.saturating_sub(self.last.waited_ns);
        let runs = waits.runs.saturating_sub(self.last.runs);
        self.last = waits;
        self.window = (waited, runs);
        if self.idle {
            let long = waited >= WAITED_AT_LEAST.as_nanos() as u64
                && waited > WAIT_LIMIT.as_nanos() as u64 * runs.max(1);
            if !long {
                return None;
            }
            if now.duration_since(self.since) >= CALM {
                self.hold = HOLD_MIN;
            }
            self.staying = self.hold;
            self.hold = (self.hold * 2).min(HOLD_MAX);
            self.idle = false;
        } else {
            if now.duration_since(self.since) < self.staying {
                return None;
            }
            self.idle = true;
        }
        self.since = now;
        Some(self.idle)
    }
}

/// A queue thread's class and its guard; made by the thread itself.
pub struct QueueClass {
    /// The thread's own schedstat, and the guard; none if the thread stays
    /// in the normal class.
    watch: Option<(File, Guard)>,
}

impl QueueClass {
    /// Put the calling thread in the idle class if `wanted` and it could
    /// come back from it; else leave it as it is.
    pub fn start(wanted: bool) -> QueueClass {
        let watch = (wanted && may_come_back())
            .then(|| {
                let file = File::open("/proc/thread-self/schedstat").ok()?;
                let waits = read(&file)?;
                set_idle(true).then(|| (file, Guard::new(Instant::now(), waits)))
            })
            .flatten();
        QueueClass { watch }
    }

    /// Is the thread in the idle class now?
    pub fn idle(&self) -> bool {
        self.watch.as_ref().is_some_and(|(_, g)| g.idle)
    }

    /// Look at the waits if a check is due, and change class if need be.
    /// Called after each round of requests (a clock read when no check is
    /// due).
    pub fn tick(&mut self) {
        let Some((file, guard)) = &mut self.watch else {
            return;
        };
        let now = Instant::now();
        if !guard.due(now) {
            return;
        }
        let Some(waits) = read(file) else {
            return;
        };
        if let Some(idle) = guard.check(now, waits) {
            let (waited_ns, runs) = guard.window;
            tracing::debug!(idle, waited_ns, runs, "io_uring queue thread changes class");
            if !set_idle(idle) && !idle {
                tracing::warn!("io_uring queue thread could not leave the idle class");
            }
        }
    }
}

fn read(file: &File) -> Option<Waits> {
    let mut buf = [0u8; 96];
    let n = file.read_at(&mut buf, 0).ok()?;
    Waits::parse(std::str::from_utf8(&buf[..n]).ok()?)
}

/// May a thread of this process leave the idle class once in it? Tried
/// once, on a thread of its own (whose class then does not matter).
fn may_come_back() -> bool {
    static MAY: OnceLock<bool> = OnceLock::new();
    *MAY.get_or_init(|| {
        std::thread::Builder::new()
            .name("tarn-sched-probe".into())
            .spawn(|| set_idle(true) && set_idle(false))
            .ok()
            .and_then(|t| t.join().ok())
            .unwrap_or(false)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waits(waited_us: u64, runs: u64) -> Waits {
        Waits {
            waited_ns: waited_us * 1000,
            runs,
        }
    }

    #[test]
    fn schedstat_is_read_as_waited_and_runs() {
        assert_eq!(
            Waits::parse("50421586 58257 23\n"),
            Some(Waits {
                waited_ns: 58257,
                runs: 23
            })
        );
        assert_eq!(Waits::parse("1 2"), None);
        assert_eq!(Waits::parse(""), None);
    }

    #[test]
    fn short_waits_next_to_a_caller_keep_the_idle_class() {
        let t0 = Instant::now();
        let mut g = Guard::new(t0, waits(0, 0));
        assert!(!g.due(t0));
        // 2000 runs of 20 µs each: 40 ms waited, but 20 µs a run.
        assert_eq!(g.check(t0 + CHECK_EVERY, waits(40_000, 2000)), None);
        // One slow wakeup (600 µs) alone is not load.
        assert_eq!(g.check(t0 + 2 * CHECK_EVERY, waits(40_600, 2001)), None);
        assert!(g.idle);
    }

    #[test]
    fn long_waits_turn_back_for_a_while_and_longer_each_time() {
        let t0 = Instant::now();
        let mut g = Guard::new(t0, waits(0, 0));
        // A tick's wait per run: back to normal.
        let t1 = t0 + CHECK_EVERY;
        assert_eq!(g.check(t1, waits(8_000, 2)), Some(false));
        // Normal for HOLD_MIN, whatever the waits.
        assert_eq!(g.check(t1 + HOLD_MIN / 2, waits(8_000, 500)), None);
        let t2 = t1 + HOLD_MIN;
        assert_eq!(g.check(t2, waits(8_000, 900)), Some(true));
        // Load again at once: normal for twice as long.
        let t3 = t2 + CHECK_EVERY;
        assert_eq!(g.check(t3, waits(20_000, 903)), Some(false));
        assert_eq!(g.check(t3 + HOLD_MIN, waits(20_000, 903)), None);
        let t4 = t3 + 2 * HOLD_MIN;
        assert_eq!(g.check(t4, waits(20_000, 903)), Some(true));
        // Doubling stops at HOLD_MAX.
        let mut t = t4;
        let mut w = 20_000;
        for _ in 0..10 {
            t += CHECK_EVERY;
            w += 10_000;
            assert_eq!(g.check(t, waits(w, 903)), Some(false));
            t += g.staying;
            assert!(g.staying <= HOLD_MAX);
            assert_eq!(g.check(t, waits(w, 903)), Some(true));
        }
        assert_eq!(g.staying, HOLD_MAX);
        // After a calm stretch in the idle class, the stay is short again.
        t += CALM;
        assert_eq!(g.check(t, waits(w + 10_000, 905)), Some(false));
        assert_eq!(g.staying, HOLD_MIN);
    }

    /// The class a queue thread ends up in, from a thread of its own.
    fn class_taken(wanted: bool) -> (bool, i32) {
        std::thread::spawn(move || {
            let c = QueueClass::start(wanted);
            // SAFETY: the calling thread's policy; no arguments.
            (c.idle(), unsafe { libc::sched_getscheduler(0) })
        })
        .join()
        .unwrap()
    }

    #[test]
    fn the_idle_class_is_taken_only_when_wanted_and_the_way_back_is_open() {
        assert_eq!(class_taken(false), (false, libc::SCHED_OTHER));
        let expected = if may_come_back() {
            (true, libc::SCHED_IDLE)
        } else {
            (false, libc::SCHED_OTHER)
        };
        assert_eq!(class_taken(true), expected);
    }
}
