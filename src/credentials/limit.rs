//! The node's budget for exchanges (TokenRequest + `AssumeRoleWithWebIdentity`): at most `concurrency`
//! at once and `rate` per second (a token bucket holding at most one second's worth), handed out by
//! priority — a pod waiting for its first credentials goes ahead of refreshes, which go ahead of
//! prefetches — and first come, first served within one priority.
//!
//! No task of its own: waiters queue tickets, the holder of a slot wakes them when it leaves, and a
//! waiter held back only by the rate sleeps until the bucket has a token.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// Who is asking, most urgent first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Priority {
    /// A request is waiting for a pod's first credentials.
    Request = 0,
    /// A session is due for renewal (its current credentials are still served).
    Refresh = 1,
    /// Nobody is waiting yet.
    Prefetch = 2,
}

/// The shared budget.
#[derive(Clone)]
pub struct Limiter {
    inner: Arc<Inner>,
}

struct Inner {
    concurrency: usize,
    rate: f64,
    state: Mutex<State>,
    changed: Notify,
}

struct State {
    in_flight: usize,
    tokens: f64,
    refilled: Instant,
    queues: [VecDeque<u64>; 3],
    next_ticket: u64,
}

/// One slot of the budget, returned when dropped.
pub struct Permit {
    inner: Arc<Inner>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.inner.lock().in_flight -= 1;
        self.inner.changed.notify_waiters();
    }
}

/// Removes a waiter's ticket if it gives up (its task was cancelled) before it got a slot.
struct Ticket<'a> {
    inner: &'a Inner,
    priority: Priority,
    id: u64,
    queued: bool,
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        if self.queued {
            self.inner.lock().queues[self.priority as usize].retain(|t| *t != self.id);
            self.inner.changed.notify_waiters();
        }
    }
}

impl Limiter {
    /// At most `concurrency` (≥ 1) exchanges at once and `rate` (> 0) per second.
    pub fn new(concurrency: usize, rate: f64) -> Self {
        let rate = if rate.is_finite() && rate > 0.0 { rate } else { 1.0 };
        Self {
            inner: Arc::new(Inner {
                concurrency: concurrency.max(1),
                rate,
                state: Mutex::new(State {
                    in_flight: 0,
                    tokens: rate.max(1.0),
                    refilled: Instant::now(),
                    queues: Default::default(),
                    next_ticket: 0,
                }),
                changed: Notify::new(),
            }),
        }
    }

    /// Exchanges running now.
    pub fn in_flight(&self) -> usize {
        self.inner.lock().in_flight
    }

    /// Waits for a slot at `priority`.
    pub async fn acquire(&self, priority: Priority) -> Permit {
        let inner = &*self.inner;
        let mut ticket = Ticket {
            inner,
            priority,
            id: 0,
            queued: false,
        };
        loop {
            // Register interest before looking, so a release in between is not missed.
            let changed = inner.changed.notified();
            let mut changed = std::pin::pin!(changed);
            changed.as_mut().enable();
            let wait = {
                let mut state = inner.lock();
                state.refill(inner.rate);
                if !ticket.queued {
                    ticket.id = state.next_ticket;
                    state.next_ticket += 1;
                    state.queues[priority as usize].push_back(ticket.id);
                    ticket.queued = true;
                }
                let first = state.queues.iter().find_map(|q| q.front().copied());
                if first == Some(ticket.id) && state.in_flight < inner.concurrency {
                    if state.tokens >= 1.0 {
                        state.tokens -= 1.0;
                        state.in_flight += 1;
                        state.queues[priority as usize].pop_front();
                        ticket.queued = false;
                        // The next in line may be able to go too.
                        inner.changed.notify_waiters();
                        return Permit {
                            inner: self.inner.clone(),
                        };
                    }
                    Some(Duration::from_secs_f64((1.0 - state.tokens) / inner.rate))
                } else {
                    None
                }
            };
            match wait {
                Some(delay) => {
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = changed => {}
                    }
                }
                None => changed.await,
            }
        }
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("limiter lock poisoned: a holder panicked")
    }
}

impl State {
    fn refill(&mut self, rate: f64) {
        let now = Instant::now();
        let elapsed = now.duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(rate.max(1.0));
        self.refilled = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test(start_paused = true)]
    async fn never_more_than_the_concurrency_run_at_once() {
        let limiter = Limiter::new(10, 1000.0);
        let (running, peak) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..200 {
            let (limiter, running, peak) = (limiter.clone(), running.clone(), peak.clone());
            tasks.spawn(async move {
                let _permit = limiter.acquire(Priority::Prefetch).await;
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(50)).await;
                running.fetch_sub(1, Ordering::SeqCst);
            });
        }
        while tasks.join_next().await.is_some() {}
        assert_eq!(peak.load(Ordering::SeqCst), 10);
        assert_eq!(limiter.in_flight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_rate_holds_over_time() {
        let limiter = Limiter::new(100, 5.0);
        let started = Instant::now();
        for _ in 0..25 {
            drop(limiter.acquire(Priority::Request).await);
        }
        // A full bucket (5) goes at once, the other 20 at 5 per second.
        assert_eq!(started.elapsed().as_secs(), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn requests_go_ahead_of_refreshes_and_refreshes_ahead_of_prefetches() {
        let limiter = Limiter::new(1, 1000.0);
        let held = limiter.acquire(Priority::Request).await;
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = tokio::task::JoinSet::new();
        for (i, priority) in [
            Priority::Prefetch,
            Priority::Refresh,
            Priority::Prefetch,
            Priority::Request,
        ]
        .into_iter()
        .enumerate()
        {
            let (limiter, order) = (limiter.clone(), order.clone());
            tasks.spawn(async move {
                let _permit = limiter.acquire(priority).await;
                order.lock().unwrap().push(i);
            });
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
        drop(held);
        while tasks.join_next().await.is_some() {}
        assert_eq!(*order.lock().unwrap(), vec![3, 1, 0, 2]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_that_gives_up_does_not_block_the_queue() {
        let limiter = Limiter::new(1, 1000.0);
        let held = limiter.acquire(Priority::Request).await;
        let quitter = tokio::spawn({
            let limiter = limiter.clone();
            async move { drop(limiter.acquire(Priority::Request).await) }
        });
        tokio::time::sleep(Duration::from_millis(1)).await;
        quitter.abort();
        let _ = quitter.await;
        drop(held);
        let next = tokio::time::timeout(Duration::from_secs(1), limiter.acquire(Priority::Prefetch)).await;
        assert!(next.is_ok());
    }
}
