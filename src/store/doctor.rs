//! `tarn doctor`: can this machine use this store as a lake? Checks what
//! the ref-update protocol relies on (credentials, create-only puts,
//! compare-and-swap) and what hurts it (clock skew, latency), with a
//! scratch object under `doctor/` that it removes again.

use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use serde::Serialize;

use object_store::ObjectStoreExt;

use super::{block_on, Cas, Store, Version};

/// Clocks further apart than this make commit times (display only) and
/// S3 request signing unreliable; ordering never depends on them.
const SKEW_WARN: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub level: Level,
    pub check: &'static str,
    pub detail: String,
}

fn finding(level: Level, check: &'static str, detail: impl Into<String>) -> Finding {
    Finding {
        level,
        check,
        detail: detail.into(),
    }
}

impl Store {
    /// Run the checks; stops early when the store cannot be reached.
    pub fn doctor(&self) -> Vec<Finding> {
        let mut out = Vec::new();
        let key = format!("doctor/{}", ulid::Ulid::new());
        let t0 = Instant::now();
        let before = SystemTime::now();
        match self.put_if_absent(&key, Bytes::from_static(b"1")) {
            Ok(true) => out.push(finding(
                Level::Ok,
                "access",
                format!(
                    "{}: credentials work, a small write took {} ms",
                    self.url,
                    t0.elapsed().as_millis()
                ),
            )),
            Ok(false) => out.push(finding(
                Level::Fail,
                "access",
                format!("{key} existed before it was written"),
            )),
            Err(e) => {
                out.push(finding(
                    Level::Fail,
                    "access",
                    format!("cannot write to {}: {e}", self.url),
                ));
                return out;
            }
        }
        let after = SystemTime::now();
        let t1 = Instant::now();
        match self.get(&key) {
            Ok(Some(b)) if b.as_ref() == b"1" => out.push(finding(
                Level::Ok,
                "read",
                format!("a small read took {} ms", t1.elapsed().as_millis()),
            )),
            Ok(_) => out.push(finding(
                Level::Fail,
                "read",
                "read back something other than was written (no read-after-write consistency)",
            )),
            Err(e) => out.push(finding(Level::Fail, "read", e.to_string())),
        }
        out.push(match self.put_if_absent(&key, Bytes::from_static(b"2")) {
            Ok(false) => finding(
                Level::Ok,
                "create-only puts",
                "a second create of the same key is refused (If-None-Match)",
            ),
            Ok(true) => finding(
                Level::Fail,
                "create-only puts",
                "a second create of the same key succeeded: this store cannot hold a lake (needs If-None-Match: *)",
            ),
            Err(e) => finding(Level::Fail, "create-only puts", e.to_string()),
        });
        out.push(self.check_cas(&key));
        out.push(self.check_clock(&key, before, after));
        if let Err(e) = self.delete(&key) {
            out.push(finding(
                Level::Warn,
                "cleanup",
                format!("could not delete {key}: {e}"),
            ));
        }
        out
    }

    fn check_cas(&self, key: &str) -> Finding {
        let check = "compare-and-swap";
        let current = match self.get_versioned(key) {
            Ok(Some((_, v))) => v,
            Ok(None) => return finding(Level::Fail, check, format!("{key} vanished")),
            Err(e) => return finding(Level::Fail, check, e.to_string()),
        };
        let stale = Version {
            e_tag: Some("\"not-the-current-version\"".into()),
            version: None,
        };
        match self.cas(key, Some(&stale), Bytes::from_static(b"3")) {
            Ok(Cas::Lost) => {}
            Ok(Cas::Done(_)) => {
                return finding(
                    Level::Fail,
                    check,
                    "an update against a stale version succeeded: this store cannot hold a lake (needs If-Match)",
                )
            }
            Err(e) => return finding(Level::Fail, check, e.to_string()),
        }
        match self.cas(key, Some(&current), Bytes::from_static(b"4")) {
            Ok(Cas::Done(_)) => finding(
                Level::Ok,
                check,
                "updates against the current version succeed and against a stale one are refused",
            ),
            Ok(Cas::Lost) => finding(
                Level::Fail,
                check,
                "an update against the current version was refused",
            ),
            Err(e) => finding(Level::Fail, check, e.to_string()),
        }
    }

    /// Compare the store's timestamp of the object we just wrote with our
    /// clock around the write.
    fn check_clock(&self, key: &str, before: SystemTime, after: SystemTime) -> Finding {
        let check = "clock";
        let path = self.path(key);
        let stamp = match block_on(self.inner.head(&path)) {
            Ok(m) => SystemTime::from(m.last_modified),
            Err(e) => {
                return finding(
                    Level::Warn,
                    check,
                    format!("cannot read the store's time: {e}"),
                )
            }
        };
        // Object stores keep whole seconds at times.
        let lo = before - Duration::from_secs(1);
        let skew = if stamp < lo {
            lo.duration_since(stamp).unwrap_or_default()
        } else if stamp > after {
            stamp.duration_since(after).unwrap_or_default()
        } else {
            Duration::ZERO
        };
        let level = if skew > SKEW_WARN {
            Level::Warn
        } else {
            Level::Ok
        };
        finding(
            level,
            check,
            format!(
                "this machine and the store differ by about {} ms (ordering comes from the store, not clocks; over {} s, commit times shown are off)",
                skew.as_millis(),
                SKEW_WARN.as_secs()
            ),
        )
    }
}
