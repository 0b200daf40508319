//! Which pod is calling: a node-scoped watch of pods and service accounts feeding a pure index.
//!
//! [`Store`] is the shared, read-mostly handle the IMDS server asks; [`watch::Watcher`] is the only
//! writer. Consumers that must react to changes (the credential cache) receive [`Event`]s on a channel.
//! The store also says what its view is worth ([`View`]): nothing may be answered from it until both
//! lists are complete, and a pod it does not know may simply be unseen while the API server is away.

pub mod index;
pub mod watch;

use std::net::IpAddr;
use std::sync::{Arc, RwLock};

use tokio::time::Instant;

pub use index::{ByUid, Change, Hold, Index, Lookup};

/// The host's kernel boot time in Unix seconds, from the `btime` line of `/proc/stat` (the kernel's,
/// not the container's: containers share the host's kernel and its `/proc/stat`).
pub fn boot_time() -> std::io::Result<i64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    stat.lines()
        .find_map(|line| line.strip_prefix("btime ")?.trim().parse().ok())
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "no btime line in /proc/stat"))
}

/// What the watcher tells the credential cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A workload changed or went away.
    Changed(Change),
    /// The view became whole: the first full lists of pods and service accounts have been applied, or
    /// the relists after missed events. Roles resolved before it may have come from a partial view.
    Synced,
}

/// What the store's view is worth.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct View {
    /// The node's pods are completely listed (not before the first list, nor between a 410 and the
    /// relist that follows).
    pub pods: bool,
    /// The service accounts are completely listed (same rules).
    pub service_accounts: bool,
    /// The pod watch stands: a pod unknown to the index does not exist (as of the last event).
    pub reachable: bool,
}

impl View {
    /// Whole: every role can be resolved from it.
    pub fn is_whole(&self) -> bool {
        self.pods && self.service_accounts
    }
}

/// Shared handle to the index, with a generation counter that waiters use to learn of new pods.
#[derive(Clone)]
pub struct Store {
    index: Arc<RwLock<Index>>,
    generation: Arc<tokio::sync::watch::Sender<u64>>,
    view: Arc<tokio::sync::watch::Sender<View>>,
    whole: Arc<tokio::sync::watch::Sender<bool>>,
}

impl Default for Store {
    fn default() -> Self {
        Self::new(None, false)
    }
}

impl Store {
    /// An empty store for a node that booted at `boot_time` (Unix seconds; `None`: unknown), also
    /// indexing `hostNetwork` pods (by UID only) when `host_network` (the container-credentials
    /// endpoint is on).
    pub fn new(boot_time: Option<i64>, host_network: bool) -> Self {
        Self {
            index: Arc::new(RwLock::new(
                Index::with_boot_time(boot_time).with_host_network(host_network),
            )),
            generation: Arc::new(tokio::sync::watch::channel(0).0),
            view: Arc::new(tokio::sync::watch::channel(View::default()).0),
            whole: Arc::new(tokio::sync::watch::channel(false).0),
        }
    }

    /// The view now.
    pub fn view(&self) -> View {
        *self.view.borrow()
    }

    /// Follows whether the view is whole (for readiness).
    pub fn whole(&self) -> tokio::sync::watch::Receiver<bool> {
        self.whole.subscribe()
    }

    /// Waits until `deadline` for the view to be whole; true if it is.
    pub async fn wait_whole(&self, deadline: Instant) -> bool {
        if self.view().is_whole() {
            return true;
        }
        let mut whole = self.whole.subscribe();
        matches!(
            tokio::time::timeout_at(deadline, whole.wait_for(|w| *w)).await,
            Ok(Ok(_))
        )
    }

    /// Changes the view.
    pub(crate) fn set_view(&self, change: impl FnOnce(&mut View)) {
        self.view.send_modify(change);
        let whole = self.view().is_whole();
        self.whole.send_if_modified(|w| std::mem::replace(w, whole) != whole);
        self.generation.send_modify(|g| *g += 1);
    }

    /// The pod that owns `ip` now.
    pub fn lookup(&self, ip: IpAddr) -> Lookup {
        self.read(|index| index.lookup(ip))
    }

    /// The pod that owns `ip`, waiting until `deadline` for the watch to learn of it when it is not known
    /// yet (a pod that just started sends its first request before the API server's event reaches us).
    pub async fn lookup_or_wait(&self, ip: IpAddr, deadline: Instant) -> Lookup {
        self.read_until(
            deadline,
            |index| index.lookup(ip),
            |found| !matches!(found, Lookup::Unknown | Lookup::Pending),
        )
        .await
    }

    /// The pod with `uid`, waiting until `deadline` for the watch to learn of it when it is not known
    /// yet (the kubelet mints a pod's token, and the pod may present it, before our watch event lands).
    pub async fn by_uid_or_wait(&self, uid: &str, deadline: Instant) -> ByUid {
        self.read_until(deadline, |index| index.by_uid(uid), |found| *found != ByUid::Unknown)
            .await
    }

    /// What `look` reads from the index, read again on every change until `settled` says it is an
    /// answer or `deadline` passes (then the last reading). A first reading that settles costs no
    /// subscription: the common case, a known caller, stays a read.
    async fn read_until<T>(&self, deadline: Instant, look: impl Fn(&Index) -> T, settled: impl Fn(&T) -> bool) -> T {
        let found = self.read(&look);
        if settled(&found) {
            return found;
        }
        let mut generation = self.generation.subscribe();
        loop {
            // Mark the current generation seen before looking, so a change in between wakes us.
            generation.borrow_and_update();
            let found = self.read(&look);
            if settled(&found) {
                return found;
            }
            match tokio::time::timeout_at(deadline, generation.changed()).await {
                Ok(Ok(())) => continue,
                _ => return found,
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
        let store = Store::new(None, false);
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
        let store = Store::new(None, false);
        let started = Instant::now();
        let found = store
            .lookup_or_wait("10.0.0.8".parse().unwrap(), started + Duration::from_millis(500))
            .await;
        assert_eq!(found, Lookup::Unknown);
        assert_eq!(started.elapsed(), Duration::from_millis(500));
    }
}
