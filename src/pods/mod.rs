//! Which pod is calling: a node-scoped watch of pods and service accounts feeding a pure index.
//!
//! [`Store`] is the shared, read-mostly handle the IMDS server asks; [`watch::Watcher`] is the only
//! writer. Consumers that must react to changes (the credential cache) receive [`Event`]s on a channel.

pub mod index;
pub mod watch;

use std::net::IpAddr;
use std::sync::{Arc, RwLock};

use tokio::time::Instant;

pub use index::{Change, Index, Lookup};

/// What the watcher tells the credential cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A workload changed or went away.
    Changed(Change),
    /// The first full lists of pods and service accounts have been applied.
    Synced,
}

/// Shared handle to the index, with a generation counter that waiters use to learn of new pods.
#[derive(Clone)]
pub struct Store {
    index: Arc<RwLock<Index>>,
    generation: Arc<tokio::sync::watch::Sender<u64>>,
}

impl Default for Store {
    fn default() -> Self {
        Self::new()
    }
}

impl Store {
    /// An empty store.
    pub fn new() -> Self {
        Self {
            index: Arc::default(),
            generation: Arc::new(tokio::sync::watch::channel(0).0),
        }
    }

    /// The pod that owns `ip` now.
    pub fn lookup(&self, ip: IpAddr) -> Lookup {
        self.read(|index| index.lookup(ip))
    }

    /// The pod that owns `ip`, waiting until `deadline` for the watch to learn of it when it is not known
    /// yet (a pod that just started sends its first request before the API server's event reaches us).
    pub async fn lookup_or_wait(&self, ip: IpAddr, deadline: Instant) -> Lookup {
        let found = self.lookup(ip);
        if found != Lookup::Unknown {
            return found;
        }
        let mut generation = self.generation.subscribe();
        loop {
            // Mark the current generation seen before looking, so a change in between wakes us.
            generation.borrow_and_update();
            let found = self.lookup(ip);
            if found != Lookup::Unknown {
                return found;
            }
            match tokio::time::timeout_at(deadline, generation.changed()).await {
                Ok(Ok(())) => continue,
                _ => return Lookup::Unknown,
            }
        }
    }

    /// Reads the index.
    pub fn read<T>(&self, f: impl FnOnce(&Index) -> T) -> T {
        f(&self.index.read().expect("index lock poisoned: a writer panicked"))
    }

    /// Changes the index and wakes waiters.
    pub(crate) fn write<T>(&self, f: impl FnOnce(&mut Index) -> T) -> T {
        let out = f(&mut self.index.write().expect("index lock poisoned: a writer panicked"));
        self.generation.send_modify(|g| *g += 1);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn a_waiting_lookup_returns_as_soon_as_the_pod_lands() {
        let store = Store::new();
        let writer = store.clone();
        let started = Instant::now();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(30)).await;
            writer.write(|i| i.apply_pod(&index::tests::pod("a", "uid-a", &["10.0.0.7"], None)));
        });
        let found = store
            .lookup_or_wait("10.0.0.7".parse().unwrap(), started + Duration::from_millis(500))
            .await;
        assert!(matches!(found, Lookup::Found(w) if w.uid == "uid-a"));
        assert_eq!(started.elapsed(), Duration::from_millis(30));
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_lookup_gives_up_at_the_deadline() {
        let store = Store::new();
        let started = Instant::now();
        let found = store
            .lookup_or_wait("10.0.0.8".parse().unwrap(), started + Duration::from_millis(500))
            .await;
        assert_eq!(found, Lookup::Unknown);
        assert_eq!(started.elapsed(), Duration::from_millis(500));
    }
}
