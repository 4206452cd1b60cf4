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
//! (`Guard`). The guard looks between requests; one long request in the
//! idle class under load (a branch view's refresh, a close chunking a few
//! MiB on a local lake) would run at a few thousandths of a CPU, so a
//! `Watchdog` thread in the normal class moves a queue thread that has
//! served one request for over `LONG_REQUEST` to the normal class itself.
//! Where the thread could not come back from the idle class (without
//! `CAP_SYS_NICE` or a raised `RLIMIT_NICE`) it never leaves the normal one.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::thread_class::{set_idle, set_idle_of, tid};

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
/// Checks in a row that must see long waits: the daemon's own background
/// threads (uploads, a view's refresh) run in bursts of 1–3 ms that hold
/// up one check, while load holds up every one. (Counted by hand: with
/// one check enough, the queue threads of an unpinned untar spent 40–70%
/// of it in the normal class.)
const LONG_CHECKS: u32 = 2;
/// The first stay in the normal class. It doubles, up to `HOLD_MAX`, each
/// time the thread turns back after a stay in the idle class shorter than
/// the last one in the normal class (load that goes on), and is back to
/// `HOLD_MIN` after a longer one.
const HOLD_MIN: Duration = Duration::from_secs(1);
const HOLD_MAX: Duration = Duration::from_secs(64);
/// A request served this long in the idle class is moved to the normal
/// class (by the watchdog, which looks this often while requests come):
/// under load a request waits at most about twice this for a fair share of
/// a CPU. Requests of a small file take µs.
const LONG_REQUEST: Duration = Duration::from_millis(10);

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
    /// Checks in a row that saw long waits.
    long_checks: u32,
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
            long_checks: 0,
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
        if self.idle {
            let long = waited >= WAITED_AT_LEAST.as_nanos() as u64
                && waited > WAIT_LIMIT.as_nanos() as u64 * runs.max(1);
            self.long_checks = if long { self.long_checks + 1 } else { 0 };
            if self.long_checks < LONG_CHECKS {
                return None;
            }
            self.turn_back(now);
            return Some(false);
        }
        if now.duration_since(self.since) < self.staying {
            return None;
        }
        self.idle = true;
        self.since = now;
        Some(true)
    }

    /// To the normal class, for `hold` (see `HOLD_MIN`).
    fn turn_back(&mut self, now: Instant) {
        if now.duration_since(self.since) >= self.staying {
            self.hold = HOLD_MIN;
        }
        self.long_checks = 0;
        self.staying = self.hold;
        self.hold = (self.hold * 2).min(HOLD_MAX);
        self.idle = false;
        self.since = now;
    }
}

/// What a queue thread in the idle class shows the watchdog.
#[derive(Debug)]
struct Slot {
    tid: i32,
    /// When the request being served began (`Watchdog::now`); 0 between
    /// requests.
    busy_since: AtomicU64,
    /// Requests begun (so the watchdog sees requests come and go between
    /// two looks).
    begun: AtomicU64,
    /// In the idle class. The watchdog clears it when it moves the thread
    /// to the normal class; the thread's guard, still counting it idle,
    /// takes note at its next tick.
    idle: AtomicBool,
}

/// Moves a queue thread serving one request for over `LONG_REQUEST` in the
/// idle class to the normal class. Looks every `LONG_REQUEST` while
/// requests come; sleeps (parked) while none does.
pub struct Watchdog {
    base: Instant,
    slots: Mutex<Vec<Arc<Slot>>>,
    parked: AtomicBool,
    thread: OnceLock<std::thread::Thread>,
}

impl Watchdog {
    /// Start the watchdog's thread; it ends once the watchdog is dropped.
    /// (It holds only a `Weak`, so the queue threads own the watchdog.)
    pub fn start() -> std::io::Result<Arc<Watchdog>> {
        let dog = Arc::new(Watchdog {
            base: Instant::now(),
            slots: Mutex::new(Vec::new()),
            parked: AtomicBool::new(false),
            thread: OnceLock::new(),
        });
        let weak = Arc::downgrade(&dog);
        let handle = std::thread::Builder::new()
            .name("tarn-uring-watch".into())
            .spawn(move || watch(weak))?;
        let _ = dog.thread.set(handle.thread().clone());
        Ok(dog)
    }

    /// Nanoseconds since the watchdog started; never 0.
    fn now(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64 + 1
    }

    fn register(&self) -> Arc<Slot> {
        let slot = Arc::new(Slot {
            tid: tid(),
            busy_since: AtomicU64::new(0),
            begun: AtomicU64::new(0),
            idle: AtomicBool::new(true),
        });
        self.slots.lock().push(slot.clone());
        slot
    }

    /// Move any thread serving one request for too long to the normal
    /// class. True if requests came since `begun` (per slot) was taken.
    fn look(&self, begun: &mut Vec<u64>) -> bool {
        let now = self.now();
        let slots = self.slots.lock();
        begun.resize(slots.len(), 0);
        let mut active = false;
        for (slot, seen) in slots.iter().zip(begun.iter_mut()) {
            let since = slot.busy_since.load(Ordering::SeqCst);
            let count = slot.begun.load(Ordering::Relaxed);
            active |= since != 0 || count != *seen;
            *seen = count;
            let long = since != 0 && now.saturating_sub(since) > LONG_REQUEST.as_nanos() as u64;
            if long && slot.idle.load(Ordering::SeqCst) {
                // Noted first: once the thread is in the normal class, its
                // next tick finds the note.
                slot.idle.store(false, Ordering::SeqCst);
                let tid = slot.tid;
                if set_idle_of(tid, false) {
                    tracing::debug!(tid, "io_uring queue thread moved to the normal class");
                } else {
                    // Its guard returns it to the idle class after its stay.
                    tracing::warn!(tid, "io_uring queue thread could not leave the idle class");
                }
            }
        }
        active
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        // Its thread, parked or not, then finds it gone and ends.
        if let Some(t) = self.thread.get() {
            t.unpark();
        }
    }
}

fn watch(dog: Weak<Watchdog>) {
    let mut begun = Vec::new();
    loop {
        let Some(d) = dog.upgrade() else { return };
        if d.look(&mut begun) {
            drop(d);
            std::thread::sleep(LONG_REQUEST);
            continue;
        }
        // Nothing came: sleep until a request begins. A request begun
        // after `parked` is set sees it and wakes this thread; one begun
        // before is seen here.
        d.parked.store(true, Ordering::SeqCst);
        let busy = d
            .slots
            .lock()
            .iter()
            .any(|s| s.busy_since.load(Ordering::SeqCst) != 0);
        drop(d);
        if !busy {
            std::thread::park();
        }
        if let Some(d) = dog.upgrade() {
            d.parked.store(false, Ordering::SeqCst);
        }
    }
}

/// A queue thread's class, its guard and what its watchdog sees; made by
/// the thread itself.
pub struct QueueClass {
    /// None if the thread stays in the normal class.
    watch: Option<Watched>,
}

struct Watched {
    /// The thread's own schedstat.
    file: File,
    guard: Guard,
    dog: Arc<Watchdog>,
    slot: Arc<Slot>,
}

impl QueueClass {
    /// Put the calling thread in the idle class, watched by `dog`, if there
    /// is one (its maker checked `may_leave_idle`); else leave it as it is.
    pub fn start(dog: Option<&Arc<Watchdog>>) -> QueueClass {
        let watch = dog.and_then(|dog| {
            let file = File::open("/proc/thread-self/schedstat").ok()?;
            let waits = read(&file)?;
            set_idle(true).then(|| Watched {
                file,
                guard: Guard::new(Instant::now(), waits),
                dog: dog.clone(),
                slot: dog.register(),
            })
        });
        QueueClass { watch }
    }

    /// Is the thread in the idle class now (as its guard counts)?
    pub fn idle(&self) -> bool {
        self.watch.as_ref().is_some_and(|w| w.guard.idle)
    }

    /// Serve one request: the watchdog sees how long it takes.
    pub fn serve<T>(&self, request: impl FnOnce() -> T) -> T {
        let Some(w) = self.watch.as_ref().filter(|w| w.guard.idle) else {
            return request();
        };
        w.slot.begun.fetch_add(1, Ordering::Relaxed);
        w.slot.busy_since.store(w.dog.now(), Ordering::SeqCst);
        if w.dog.parked.load(Ordering::SeqCst) {
            if let Some(t) = w.dog.thread.get() {
                t.unpark();
            }
        }
        let out = request();
        w.slot.busy_since.store(0, Ordering::SeqCst);
        out
    }

    /// Look at the waits if a check is due, and change class if need be.
    /// Called after each round of requests (a clock read when no check is
    /// due).
    pub fn tick(&mut self) {
        let Some(w) = &mut self.watch else {
            return;
        };
        let now = Instant::now();
        if w.guard.idle && !w.slot.idle.load(Ordering::SeqCst) {
            w.guard.turn_back(now); // the watchdog moved it
        }
        if !w.guard.due(now) {
            return;
        }
        let Some(waits) = read(&w.file) else {
            return;
        };
        let before = w.guard.last;
        if let Some(idle) = w.guard.check(now, waits) {
            tracing::debug!(
                tid = w.slot.tid,
                idle,
                waited_ns = waits.waited_ns.saturating_sub(before.waited_ns),
                runs = waits.runs.saturating_sub(before.runs),
                "io_uring queue thread changes class"
            );
            if set_idle(idle) {
                w.slot.idle.store(idle, Ordering::SeqCst);
            } else if !idle {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::thread_class::may_leave_idle;

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
        // Nor one check held up by a burst of other work (3 ms, one run),
        // between ordinary ones.
        assert_eq!(g.check(t0 + 3 * CHECK_EVERY, waits(43_600, 2002)), None);
        assert_eq!(g.check(t0 + 4 * CHECK_EVERY, waits(43_700, 2100)), None);
        assert_eq!(g.check(t0 + 5 * CHECK_EVERY, waits(46_700, 2101)), None);
        assert!(g.idle);
    }

    /// Checks `LONG_CHECKS` apart from `t`, each seeing a tick's wait per
    /// run (4 ms, one run); the last one's answer.
    fn loaded(g: &mut Guard, t: &mut Instant, w: &mut Waits) -> Option<bool> {
        let mut answer = None;
        for _ in 0..LONG_CHECKS {
            *t += CHECK_EVERY;
            w.waited_ns += 4_000_000;
            w.runs += 1;
            answer = g.check(*t, *w);
        }
        answer
    }

    #[test]
    fn long_waits_turn_back_for_a_while_and_longer_while_they_go_on() {
        let mut t = Instant::now();
        let mut w = waits(0, 0);
        let mut g = Guard::new(t, w);
        // A tick's wait per run, check after check: back to normal.
        t += CHECK_EVERY;
        w.waited_ns += 4_000_000;
        w.runs += 1;
        assert_eq!(g.check(t, w), None, "one check is not enough");
        w.waited_ns += 4_000_000;
        w.runs += 1;
        assert_eq!(g.check(t + CHECK_EVERY, w), Some(false));
        t += CHECK_EVERY;
        // Normal for HOLD_MIN, whatever the waits.
        assert_eq!(g.check(t + HOLD_MIN / 2, waits(0, 0)), None);
        t += HOLD_MIN;
        assert_eq!(g.check(t, w), Some(true));
        // Load again at once: normal for twice as long, and so on up to
        // HOLD_MAX.
        for expected in [2, 4, 8, 16, 32, 64, 64] {
            assert_eq!(loaded(&mut g, &mut t, &mut w), Some(false));
            assert_eq!(g.staying, HOLD_MIN * expected);
            t += g.staying - CHECK_EVERY;
            assert_eq!(g.check(t, w), None);
            t += CHECK_EVERY;
            assert_eq!(g.check(t, w), Some(true));
        }
        assert_eq!(g.staying, HOLD_MAX);
        // A stay in the idle class longer than the last normal one: load
        // that came back, not load that went on; the stay is short again.
        t += HOLD_MAX;
        assert_eq!(loaded(&mut g, &mut t, &mut w), Some(false));
        assert_eq!(g.staying, HOLD_MIN);
    }

    /// The class a queue thread ends up in, from a thread of its own.
    fn class_taken(wanted: bool) -> (bool, i32) {
        // As `Queues::start` makes them.
        let dog = (wanted && may_leave_idle()).then(|| Watchdog::start().unwrap());
        std::thread::spawn(move || {
            let c = QueueClass::start(dog.as_ref());
            // SAFETY: the calling thread's policy; no arguments.
            (c.idle(), unsafe { libc::sched_getscheduler(0) })
        })
        .join()
        .unwrap()
    }

    #[test]
    fn a_long_request_in_the_idle_class_is_moved_to_the_normal_class() {
        if !may_leave_idle() {
            return; // no queue thread takes the idle class here
        }
        let dog = Watchdog::start().unwrap();
        let seen = std::thread::spawn(move || {
            let mut class = QueueClass::start(Some(&dog));
            if !class.idle() {
                return None; // the idle class is not ours to take here
            }
            // Quick requests stay in the idle class.
            for _ in 0..100 {
                class.serve(|| assert!(crate::thread_class::is_idle()));
                class.tick();
            }
            // A request that runs on (here: until it is moved, or 5 s).
            let deadline = Instant::now() + Duration::from_secs(5);
            let moved = class.serve(|| {
                while crate::thread_class::is_idle() && Instant::now() < deadline {
                    std::hint::spin_loop();
                }
                !crate::thread_class::is_idle()
            });
            let idle_before_tick = class.idle();
            class.tick();
            Some((moved, idle_before_tick, class.idle()))
        })
        .join()
        .unwrap();
        if let Some(seen) = seen {
            // Moved mid-request; the guard takes note at its next tick.
            assert_eq!(seen, (true, true, false));
        }
    }

    #[test]
    fn the_idle_class_is_taken_only_when_wanted_and_the_way_back_is_open() {
        assert_eq!(class_taken(false), (false, libc::SCHED_OTHER));
        let expected = if may_leave_idle() {
            (true, libc::SCHED_IDLE)
        } else {
            (false, libc::SCHED_OTHER)
        };
        assert_eq!(class_taken(true), expected);
    }
}
