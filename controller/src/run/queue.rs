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

use tokio::{sync::Notify, time::Instant};

/// The queue; clone the `Arc` to share it between the router and the workers.
#[derive(Debug)]
pub struct WorkQueue<K> {
    state: Mutex<State<K>>,
    notify: Notify,
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

/// First retry delay after a failure; it doubles per further consecutive
/// failure, as client-go's item exponential failure rate limiter.
const RETRY_BASE: Duration = Duration::from_millis(5);
/// Most doublings: the delay stops growing at 5 ms × 2^12 ≈ 20 s.
const RETRY_MAX_DOUBLINGS: u32 = 12;

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
        Arc::new(WorkQueue {
            state: Mutex::new(State {
                queue: VecDeque::new(),
                queued: HashSet::new(),
                active: HashSet::new(),
                dirty: HashSet::new(),
                failures: std::collections::HashMap::new(),
                waiting: HashSet::new(),
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
            drop(s);
            let queue = Arc::clone(self);
            tokio::spawn(async move {
                tokio::time::sleep_until(at).await;
                let mut s = queue.lock();
                if s.waiting.remove(&key) && !s.closed && s.queued.insert(key.clone()) {
                    s.queue.push_back(key);
                    drop(s);
                    queue.notify.notify_one();
                }
            });
            return;
        }
        if s.queued.insert(key.clone()) {
            s.queue.push_back(key);
            drop(s);
            self.notify.notify_one();
        }
    }

    /// Queues `key` after `delay` (retries, stale caches).
    pub fn add_after(self: &Arc<Self>, key: K, delay: Duration) {
        let queue = Arc::clone(self);
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            queue.add(key);
        });
    }

    /// Queues `key` again after a delay that doubles with each consecutive failure
    /// (client-go's item exponential failure rate limiter); returns the delay.
    pub fn retry_after_failure(self: &Arc<Self>, key: K) -> Duration {
        let failures = {
            let mut s = self.lock();
            let n = s.failures.entry(key.clone()).or_default();
            *n += 1;
            *n
        };
        let delay = RETRY_BASE * 2u32.pow((failures - 1).min(RETRY_MAX_DOUBLINGS));
        self.add_after(key, delay);
        delay
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

    #[tokio::test]
    async fn the_first_retry_waits_the_base_delay_which_doubles_per_failure_and_resets_on_forget() {
        let q = WorkQueue::new();
        assert_eq!(q.retry_after_failure("k"), Duration::from_millis(5));
        assert_eq!(q.retry_after_failure("k"), Duration::from_millis(10));
        q.forget(&"k");
        assert_eq!(q.retry_after_failure("k"), Duration::from_millis(5));
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
