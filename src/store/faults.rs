//! An object store that fails on purpose, for tests and drills: transient
//! errors, timeouts, slow answers, puts that land but report failure, and
//! a store that is down. Wrap any backend and hand it to `Store::over`.
//!
//! Faults are deterministic (every Nth request), so a test that passes
//! passes every time: with at most one injected failure in a row, the
//! store's retries always get through, and what a test sees is how the
//! layers above handle the failure, not luck.

use std::fmt;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, Result,
};
use parking_lot::Mutex;

/// What to break, and how often.
#[derive(Debug, Clone, Default)]
pub struct FaultPlan {
    /// Every Nth request fails with a transient error (0: never).
    pub error_every: u64,
    /// Every Nth request waits `timeout` and then fails (0: never).
    pub timeout_every: u64,
    pub timeout: Duration,
    /// Every request first waits this long.
    pub delay: Duration,
    /// Every Nth put lands and then reports a transient failure (0: never).
    pub lost_ack_every: u64,
    /// Every request fails (the store is down).
    pub down: bool,
    /// Puts of keys starting with this fail (a persistent, targeted fault).
    pub fail_puts_under: Option<String>,
    /// Puts of keys starting with this first wait this long (a slow,
    /// targeted fault: work that puts them stays in flight meanwhile).
    pub slow_puts_under: Option<(String, Duration)>,
}

/// Counts of what was injected.
#[derive(Debug, Default)]
pub struct FaultCounts {
    pub requests: AtomicU64,
    pub errors: AtomicU64,
    pub lost_acks: AtomicU64,
    /// Puts that began waiting as `slow_puts_under` says.
    pub slow_puts: AtomicU64,
}

#[derive(Debug)]
pub struct FaultyStore {
    inner: Arc<dyn ObjectStore>,
    plan: Mutex<FaultPlan>,
    pub counts: FaultCounts,
    puts: AtomicU64,
}

fn injected(what: &str) -> object_store::Error {
    object_store::Error::Generic {
        store: "faults",
        source: format!("injected fault: {what}").into(),
    }
}

impl FaultyStore {
    pub fn new(inner: Arc<dyn ObjectStore>, plan: FaultPlan) -> Arc<FaultyStore> {
        Arc::new(FaultyStore {
            inner,
            plan: Mutex::new(plan),
            counts: FaultCounts::default(),
            puts: AtomicU64::new(0),
        })
    }

    /// Change what breaks from now on.
    pub fn set_plan(&self, plan: FaultPlan) {
        *self.plan.lock() = plan;
    }

    /// Before a request: maybe wait, maybe fail.
    async fn before(&self) -> Result<()> {
        let plan = self.plan.lock().clone();
        let n = self.counts.requests.fetch_add(1, Ordering::Relaxed) + 1;
        if !plan.delay.is_zero() {
            tokio::time::sleep(plan.delay).await;
        }
        let fail = |what| {
            self.counts.errors.fetch_add(1, Ordering::Relaxed);
            Err(injected(what))
        };
        if plan.down {
            return fail("store down");
        }
        if plan.error_every > 0 && n.is_multiple_of(plan.error_every) {
            return fail("transient error");
        }
        if plan.timeout_every > 0 && n.is_multiple_of(plan.timeout_every) {
            tokio::time::sleep(plan.timeout).await;
            return fail("timeout");
        }
        Ok(())
    }

    async fn put_checks(&self, location: &Path) -> Result<bool> {
        self.before().await?;
        let plan = self.plan.lock().clone();
        if let Some(prefix) = &plan.fail_puts_under {
            if location.as_ref().starts_with(prefix.as_str()) {
                self.counts.errors.fetch_add(1, Ordering::Relaxed);
                return Err(injected("put refused"));
            }
        }
        if let Some((prefix, wait)) = &plan.slow_puts_under {
            if location.as_ref().starts_with(prefix.as_str()) {
                self.counts.slow_puts.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(*wait).await;
            }
        }
        let n = self.puts.fetch_add(1, Ordering::Relaxed) + 1;
        Ok(plan.lost_ack_every > 0 && n.is_multiple_of(plan.lost_ack_every))
    }
}

impl fmt::Display for FaultyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FaultyStore({})", self.inner)
    }
}

#[async_trait]
impl ObjectStore for FaultyStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        let lose_ack = self.put_checks(location).await?;
        let r = self.inner.put_opts(location, payload, opts).await?;
        if lose_ack {
            self.counts.lost_acks.fetch_add(1, Ordering::Relaxed);
            return Err(injected("put landed, acknowledgement lost"));
        }
        Ok(r)
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        self.put_checks(location).await?;
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        self.before().await?;
        self.inner.get_opts(location, options).await
    }

    async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        self.before().await?;
        self.inner.get_ranges(location, ranges).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        if self.plan.lock().down {
            return Box::pin(futures::stream::once(async { Err(injected("store down")) }));
        }
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.before().await?;
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.before().await?;
        self.inner.copy_opts(from, to, options).await
    }
}
