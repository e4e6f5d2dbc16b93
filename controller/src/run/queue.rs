//! A keyed work queue with client-go's semantics: a key is queued at most once, is
//! processed by one worker at a time, and a key added while it is being processed
//! is processed again afterwards. Keys are reconciled even when their object is
//! gone, which upstream's controllers rely on (a deleted Service's Endpoints, a
//! deleted Endpoints' mirrored slices) and kube-runtime's Controller cannot express
//! (it only reconciles objects present in its store).
//!
//! With a minimum interval, a key processed less than that long ago waits until
//! the interval has passed: an isolated change is processed at once (no added
//! latency), and a burst of changes to one key (ten Pods of a Service turning
//! Ready together) costs at most one more sync, so one more write.
//!
//! With a burst delay, while keys arrive faster than [`BURST_RATE`] a new key
//! also waits that long before it is queued: under load (a rollout, many Pods
//! turning Ready at once) the Pods of one Service that change together are
//! synced, and written, once instead of twice. The minimum interval then holds
//! only during a burst too: a quiet cluster never waits, so a single Pod's
//! change (even a Pod flapping) is not slowed down.

use std::{
    collections::{HashSet, VecDeque},
    hash::Hash,
    sync::{Arc, Mutex},
    time::Duration,
};

use prometheus_client::metrics::{counter::Counter, gauge::Gauge};
use tokio::{sync::Notify, time::Instant};

/// The queue; clone the `Arc` to share it between the router and the workers.
#[derive(Debug)]
pub struct WorkQueue<K> {
    state: Mutex<State<K>>,
    notify: Notify,
    metrics: QueueMetrics,
}

/// What a queue reports, kept current by the queue itself under its lock.
#[derive(Clone, Debug, Default)]
pub struct QueueMetrics {
    /// Keys ready to be taken (client-go's `workqueue_depth`).
    pub ready: Gauge,
    /// Keys ready, or waiting for a delay or an interval: the work ahead.
    pub pending: Gauge,
    /// Keys added (`workqueue_adds_total`).
    pub adds: Counter,
    /// Retries after a failure (`workqueue_retries_total`).
    pub retries: Counter,
}

#[derive(Debug)]
struct State<K> {
    queue: VecDeque<K>,
    queued: HashSet<K>,
    active: HashSet<K>,
    dirty: HashSet<K>,
    /// Consecutive failures per key, for exponential backoff.
    failures: std::collections::HashMap<K, u32>,
    /// Keys held back by the minimum interval, and when each was last started.
    waiting: HashSet<K>,
    /// Keys to be added after a delay (retries, stale caches), each with the
    /// one time it is due: the earliest asked for (client-go's delaying queue).
    delayed: std::collections::HashMap<K, Instant>,
    last_started: std::collections::HashMap<K, Instant>,
    min_interval: Duration,
    /// How long a new key waits while keys arrive faster than [`BURST_RATE`].
    burst_delay: Duration,
    /// Keys added in the current and the previous [`RATE_WINDOW`].
    rate: AddRate,
    closed: bool,
}

/// Adds counted per window, to tell a burst from a quiet cluster.
#[derive(Debug)]
struct AddRate {
    window_start: Instant,
    current: u32,
    previous: u32,
}

/// The window over which the add rate is counted.
const RATE_WINDOW: Duration = Duration::from_millis(100);
/// Adds per [`RATE_WINDOW`] from which keys are batched (100 per second).
pub const BURST_RATE: u32 = 10;

impl<K: Eq + Hash> State<K> {
    /// Updates the gauges; called after every change of the sets they count.
    fn report(&self, metrics: &QueueMetrics) {
        metrics.ready.set(self.queue.len() as i64);
        let later =
            self.delayed.keys().filter(|k| !self.queued.contains(*k) && !self.waiting.contains(*k)).count();
        metrics.pending.set((self.queue.len() + self.waiting.len() + later) as i64);
    }

    fn count_add(&mut self) {
        let now = Instant::now();
        let elapsed = now.duration_since(self.rate.window_start);
        if elapsed >= RATE_WINDOW {
            // A window without adds in between means the previous one was quiet.
            self.rate.previous = if elapsed < 2 * RATE_WINDOW { self.rate.current } else { 0 };
            self.rate.current = 0;
            self.rate.window_start = now;
            // Intervals that have passed no longer hold anything back.
            let min_interval = self.min_interval;
            if self.last_started.len() > 1024 {
                self.last_started.retain(|_, started| now.duration_since(*started) < min_interval);
            }
        }
        self.rate.current = self.rate.current.saturating_add(1);
    }

    fn bursting(&self, now: Instant) -> bool {
        !self.burst_delay.is_zero()
            && now.duration_since(self.rate.window_start) < 2 * RATE_WINDOW
            && self.rate.current.max(self.rate.previous) > BURST_RATE
    }
}

/// First retry delay after a failure; it doubles per further consecutive failure
/// (client-go's item exponential failure rate limiter). 1 s as upstream's
/// EndpointSlice controller: a failed write is most often a conflict or an
/// apiserver in trouble, which faster retries only load further.
const RETRY_BASE: Duration = Duration::from_secs(1);
/// Most doublings: the delay stops growing at 1 s × 2^8 = 256 s. Upstream grows
/// to 1000 s and drops a key after 15 retries, relying on its informers'
/// periodic resync to bring it back hours later; svcplane never drops a key (it
/// has no resync) and caps the delay so a Service is retried every few minutes
/// for as long as it fails.
const RETRY_MAX_DOUBLINGS: u32 = 8;

impl<K: Clone + Eq + Hash + Send + 'static> WorkQueue<K> {
    /// An empty queue without a minimum interval.
    pub fn new() -> Arc<Self> {
        Self::with_min_interval(Duration::ZERO)
    }

    /// An empty queue whose keys are processed at most once per `min_interval`.
    pub fn with_min_interval(min_interval: Duration) -> Arc<Self> {
        Self::with_intervals(min_interval, Duration::ZERO)
    }

    /// An empty queue whose keys are processed at most once per `min_interval`,
    /// and wait `burst_delay` before their first sync while keys arrive faster
    /// than [`BURST_RATE`].
    pub fn with_intervals(min_interval: Duration, burst_delay: Duration) -> Arc<Self> {
        Self::with_metrics(min_interval, burst_delay, QueueMetrics::default())
    }

    /// [`Self::with_intervals`], reporting into `metrics`.
    pub fn with_metrics(min_interval: Duration, burst_delay: Duration, metrics: QueueMetrics) -> Arc<Self> {
        Arc::new(WorkQueue {
            metrics,
            state: Mutex::new(State {
                queue: VecDeque::new(),
                queued: HashSet::new(),
                active: HashSet::new(),
                dirty: HashSet::new(),
                failures: std::collections::HashMap::new(),
                waiting: HashSet::new(),
                delayed: std::collections::HashMap::new(),
                last_started: std::collections::HashMap::new(),
                min_interval,
                burst_delay,
                rate: AddRate { window_start: Instant::now(), current: 0, previous: 0 },
                closed: false,
            }),
            notify: Notify::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<K>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `key` unless it is queued already; if it is being processed, it is
    /// queued again when that finishes. It waits first when it was started less
    /// than the minimum interval ago (always without a burst delay, else during a
    /// burst) and, during a burst, for the burst delay.
    pub fn add(self: &Arc<Self>, key: K) {
        let mut s = self.lock();
        s.count_add();
        self.metrics.adds.inc();
        self.schedule(s, key);
    }

    fn schedule(self: &Arc<Self>, mut s: std::sync::MutexGuard<'_, State<K>>, key: K) {
        if s.closed || s.queued.contains(&key) || s.waiting.contains(&key) {
            return;
        }
        if s.active.contains(&key) {
            s.dirty.insert(key);
            return;
        }
        let now = Instant::now();
        let bursting = s.bursting(now);
        // With burst batching on, the minimum interval also holds only during a
        // burst: in a quiet cluster a Pod that flaps is followed at once.
        let interval_ends = (bursting || s.burst_delay.is_zero())
            .then(|| s.last_started.get(&key).map(|started| *started + s.min_interval))
            .flatten();
        let batch_ends = bursting.then(|| now + s.burst_delay);
        let ready_at = interval_ends.max(batch_ends);
        if let Some(at) = ready_at
            && at > now
        {
            s.waiting.insert(key.clone());
            s.report(&self.metrics);
            drop(s);
            let queue = Arc::clone(self);
            tokio::spawn(async move {
                tokio::time::sleep_until(at).await;
                let mut s = queue.lock();
                if s.waiting.remove(&key) && !s.closed && s.queued.insert(key.clone()) {
                    s.queue.push_back(key);
                    s.report(&queue.metrics);
                    drop(s);
                    queue.notify.notify_one();
                }
            });
            return;
        }
        if s.queued.insert(key.clone()) {
            s.queue.push_back(key);
            s.report(&self.metrics);
            drop(s);
            self.notify.notify_one();
        }
    }

    /// Queues `key` after `delay` (retries, stale caches); it counts as pending
    /// meanwhile. A key has one pending delay, the earliest asked for, as in
    /// client-go: failures that pile up while a retry is pending (a burst of
    /// events, each sync failing) do not each start a retry chain of their own.
    /// Returns how long until the key is queued.
    pub fn add_after(self: &Arc<Self>, key: K, delay: Duration) -> Duration {
        let now = Instant::now();
        let at = now + delay;
        {
            let mut s = self.lock();
            if let Some(&due) = s.delayed.get(&key)
                && due <= at
            {
                return due.saturating_duration_since(now);
            }
            s.delayed.insert(key.clone(), at);
            s.report(&self.metrics);
        }
        let queue = Arc::clone(self);
        tokio::spawn(async move {
            tokio::time::sleep_until(at).await;
            {
                let mut s = queue.lock();
                // Superseded by an earlier delay, which has queued the key or will.
                if s.delayed.get(&key) != Some(&at) {
                    return;
                }
                s.delayed.remove(&key);
            }
            queue.add(key);
        });
        delay
    }

    /// Queues `key` again after a delay that doubles with each consecutive failure
    /// (client-go's item exponential failure rate limiter); returns how long
    /// until it is queued, sooner when an earlier retry is pending already.
    pub fn retry_after_failure(self: &Arc<Self>, key: K) -> Duration {
        let failures = {
            let mut s = self.lock();
            let n = s.failures.entry(key.clone()).or_default();
            *n += 1;
            *n
        };
        let delay = RETRY_BASE * 2u32.pow((failures - 1).min(RETRY_MAX_DOUBLINGS));
        self.metrics.retries.inc();
        self.add_after(key, delay)
    }

    /// Forgets `key`'s failures (it succeeded).
    pub fn forget(&self, key: &K) {
        self.lock().failures.remove(key);
    }

    /// The next key to process; `None` once the queue is shut down.
    pub async fn next(&self) -> Option<K> {
        loop {
            let notified = self.notify.notified();
            {
                let mut s = self.lock();
                if s.closed {
                    return None;
                }
                if let Some(key) = s.queue.pop_front() {
                    s.queued.remove(&key);
                    s.report(&self.metrics);
                    s.active.insert(key.clone());
                    if !s.min_interval.is_zero() {
                        s.last_started.insert(key.clone(), Instant::now());
                    }
                    if !s.queue.is_empty() {
                        // Wake another worker for the rest.
                        self.notify.notify_one();
                    }
                    return Some(key);
                }
            }
            notified.await;
        }
    }

    /// Marks `key` processed; requeues it if it was added meanwhile.
    pub fn done(self: &Arc<Self>, key: &K) {
        let mut s = self.lock();
        s.active.remove(key);
        if s.dirty.remove(key) {
            self.schedule(s, key.clone());
        }
    }

    /// Keys waiting (not counting those being processed).
    pub fn len(&self) -> usize {
        self.lock().queue.len()
    }

    /// True when nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Stops handing out keys; `next` returns `None` from now on.
    pub fn shutdown(&self) {
        self.lock().closed = true;
        self.notify.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn duplicate_adds_collapse_and_adds_during_processing_requeue_once() {
        let q = WorkQueue::new();
        q.add("a");
        q.add("a");
        q.add("b");
        assert_eq!(q.len(), 2);
        let k = q.next().await.unwrap();
        assert_eq!(k, "a");
        q.add("a");
        q.add("a");
        assert_eq!(q.len(), 1, "a is active: only marked dirty");
        q.done(&k);
        assert_eq!(q.len(), 2, "a requeued once after done");
        assert_eq!(q.next().await, Some("b"));
        assert_eq!(q.next().await, Some("a"));
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_retry_waits_the_base_delay_which_doubles_per_failure_and_resets_on_forget() {
        let q = WorkQueue::new();
        let mut retried_after = Vec::new();
        for _ in 0..11 {
            let said = q.retry_after_failure("k");
            let started = Instant::now();
            assert_eq!(q.next().await, Some("k"));
            assert_eq!(started.elapsed(), said, "queued when it said");
            q.done(&"k");
            retried_after.push(said.as_secs());
        }
        assert_eq!(retried_after, [1, 2, 4, 8, 16, 32, 64, 128, 256, 256, 256], "capped, never dropped");
        q.forget(&"k");
        assert_eq!(q.retry_after_failure("k"), Duration::from_secs(1));
        q.shutdown();
    }

    #[tokio::test(start_paused = true)]
    async fn failures_while_a_retry_is_pending_keep_one_retry_the_earliest() {
        let q = WorkQueue::new();
        assert_eq!(q.retry_after_failure("k"), Duration::from_secs(1));
        assert_eq!(q.retry_after_failure("k"), Duration::from_secs(1), "the pending retry stands");
        assert_eq!(q.retry_after_failure("k"), Duration::from_secs(1));
        assert_eq!(
            q.add_after("k", Duration::from_millis(100)),
            Duration::from_millis(100),
            "an earlier one wins"
        );
        let started = Instant::now();
        assert_eq!(q.next().await, Some("k"));
        assert_eq!(started.elapsed(), Duration::from_millis(100));
        q.done(&"k");
        // The first failure's 1 s timer was superseded and the two after it
        // started none (they asked for 2 s and 4 s): nothing is queued again.
        tokio::time::advance(Duration::from_secs(10)).await;
        tokio::task::yield_now().await;
        assert_eq!(q.len(), 0, "one retry, not one per failure");
        // The backoff still counts every failure.
        assert_eq!(q.retry_after_failure("k"), Duration::from_secs(8));
        q.shutdown();
    }

    #[tokio::test(start_paused = true)]
    async fn a_key_synced_recently_waits_for_the_interval_and_collapses_a_burst() {
        let q = WorkQueue::with_min_interval(Duration::from_millis(200));
        q.add("svc");
        let k = q.next().await.unwrap();
        q.done(&k);
        let started = Instant::now();
        for _ in 0..10 {
            q.add("svc");
        }
        assert_eq!(q.len(), 0, "held back, not queued at once");
        let again =
            tokio::time::timeout(Duration::from_secs(5), q.next()).await.expect("queued after the interval");
        assert_eq!(again, Some("svc"));
        assert!(started.elapsed() >= Duration::from_millis(150), "waited for the interval");
        q.done(&"svc");
        assert_eq!(q.len(), 0, "ten adds made one sync");
        q.add("other");
        assert_eq!(q.len(), 1, "a key not synced recently is queued at once");
        q.shutdown();
    }

    #[tokio::test(start_paused = true)]
    async fn under_a_burst_new_keys_wait_and_each_syncs_once_but_a_quiet_key_does_not_wait() {
        let q = WorkQueue::with_intervals(Duration::from_millis(100), Duration::from_millis(200));
        q.add(0);
        assert_eq!(q.len(), 1, "quiet: queued at once");
        // More than BURST_RATE keys in one window, each added three times.
        for round in 0..3 {
            for k in 1..=2 * BURST_RATE {
                q.add(k);
                // Key 0 was the first add: up to BURST_RATE adds go through.
                if round == 0 && k < BURST_RATE {
                    assert_eq!(q.len(), k as usize + 1, "below the rate key {k} is queued at once");
                }
            }
        }
        let held = q.len();
        assert_eq!(held, BURST_RATE as usize, "past the rate, new keys wait");
        let started = Instant::now();
        let mut seen = Vec::new();
        while seen.len() < 2 * BURST_RATE as usize + 1 {
            let k = tokio::time::timeout(Duration::from_secs(5), q.next()).await.expect("key").expect("open");
            seen.push(k);
            q.done(&k);
        }
        assert!(started.elapsed() >= Duration::from_millis(150), "the held keys waited for the delay");
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), 2 * BURST_RATE as usize + 1, "every key synced exactly once");
        assert_eq!(q.len(), 0);

        // After a quiet spell, a key is queued at once again, even one synced
        // less than the minimum interval ago.
        tokio::time::advance(3 * RATE_WINDOW).await;
        q.add(99);
        assert_eq!(q.len(), 1, "quiet again: no delay");
        let k = q.next().await.expect("open");
        q.done(&k);
        q.add(99);
        assert_eq!(q.len(), 1, "quiet: the minimum interval does not hold");
        q.shutdown();
    }

    #[tokio::test]
    async fn pending_counts_delayed_keys_until_they_are_taken_and_ready_counts_queued_ones() {
        let metrics = QueueMetrics::default();
        let q = WorkQueue::with_metrics(Duration::ZERO, Duration::ZERO, metrics.clone());
        q.add_after("later", Duration::from_millis(20));
        assert_eq!((metrics.ready.get(), metrics.pending.get(), metrics.adds.get()), (0, 1, 0));
        q.add("now");
        assert_eq!((metrics.ready.get(), metrics.pending.get()), (1, 2));
        assert_eq!(q.next().await, Some("now"));
        assert_eq!((metrics.ready.get(), metrics.pending.get()), (0, 1), "the delayed key still pending");
        assert_eq!(q.next().await, Some("later"));
        assert_eq!((metrics.ready.get(), metrics.pending.get(), metrics.adds.get()), (0, 0, 2));
        q.shutdown();
    }

    #[tokio::test]
    async fn shutdown_releases_waiting_workers() {
        let q: Arc<WorkQueue<u8>> = WorkQueue::new();
        let worker = tokio::spawn({
            let q = q.clone();
            async move { q.next().await }
        });
        tokio::task::yield_now().await;
        q.shutdown();
        assert_eq!(worker.await.unwrap(), None);
    }
}
