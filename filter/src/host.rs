//! What the sync leader needs from the proxy it runs in. Each data-plane flavor implements
//! [`Host`] (proxy-wasm host calls; Envoy's dynamic-module callbacks); the orchestration in
//! [`crate::leader`] is written once against it and tested with [`fake::FakeHost`].

use crate::metrics::{Counter, Gauge};
use crate::store::SharedStore;
use crate::usage::Tally;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Info,
    Warn,
    Error,
}

/// An HTTP request to the control plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Call<'a> {
    pub cluster: &'a str,
    pub method: &'static str,
    pub path: &'a str,
    pub authority: &'a str,
    /// The whole `authorization` value (`Bearer <sync credential>`).
    pub authorization: &'a str,
    /// `accept` for a GET, `content-type` for a POST, and its value.
    pub media_type: (&'static str, &'static str),
    pub body: Option<&'a [u8]>,
    pub timeout_ms: u64,
}

impl<'a> Call<'a> {
    /// The request headers, in the order the control plane sees them.
    pub fn headers(&self) -> [(&'a str, &'a str); 5] {
        [
            (":method", self.method),
            (":path", self.path),
            (":authority", self.authority),
            ("authorization", self.authorization),
            self.media_type,
        ]
    }
}

pub trait Host {
    type Store: SharedStore;
    /// State shared by every worker of this Envoy.
    fn store(&self) -> &Self::Store;
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> u64;
    /// Sends `call`. `Ok`: the host's id for it, under which the answer will come back;
    /// `Err`: why it could not be sent, for the log.
    fn send(&self, call: &Call<'_>) -> Result<u64, String>;
    /// The cross-worker queue, leader's end: moves the usage counts that workers handed over
    /// since the last tick into `into` (a bounded amount per tick).
    fn gather_usage(&self, into: &mut Tally);
    fn count(&self, counter: Counter, n: u64);
    fn record(&self, gauge: Gauge, value: u64);
    fn log(&self, level: Level, message: &str);
}

/// A host in memory, for tests: a [`MemStore`](crate::store::fake::MemStore), a clock that
/// tests move, calls recorded instead of sent, a queue of usage batches.
#[cfg(test)]
pub mod fake {
    use super::*;
    use crate::store::fake::MemStore;
    use std::cell::{Cell, RefCell};
    use std::collections::HashMap;
    use tokengate_wire::UsageEntry;

    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Sent {
        pub id: u64,
        pub method: &'static str,
        pub path: String,
        pub headers: Vec<(String, String)>,
        pub body: Option<Vec<u8>>,
        pub timeout_ms: u64,
    }

    #[derive(Default)]
    pub struct FakeHost {
        pub store: MemStore,
        pub now_ms: Cell<u64>,
        pub sent: RefCell<Vec<Sent>>,
        /// Refuse to send this many upcoming calls.
        pub refuse: Cell<u32>,
        pub queue: RefCell<Vec<Vec<UsageEntry>>>,
        pub counters: RefCell<HashMap<Counter, u64>>,
        pub gauges: RefCell<HashMap<Gauge, u64>>,
        pub logs: RefCell<Vec<(Level, String)>>,
        next_id: Cell<u64>,
    }

    impl FakeHost {
        pub fn counter(&self, c: Counter) -> u64 {
            self.counters.borrow().get(&c).copied().unwrap_or(0)
        }
        pub fn gauge(&self, g: Gauge) -> Option<u64> {
            self.gauges.borrow().get(&g).copied()
        }
        pub fn last(&self) -> Sent {
            self.sent.borrow().last().cloned().expect("a call was sent")
        }
        pub fn advance(&self, ms: u64) {
            self.now_ms.set(self.now_ms.get() + ms);
        }
    }

    impl Host for FakeHost {
        type Store = MemStore;
        fn store(&self) -> &MemStore {
            &self.store
        }
        fn now_ms(&self) -> u64 {
            self.now_ms.get()
        }
        fn send(&self, call: &Call<'_>) -> Result<u64, String> {
            if self.refuse.get() > 0 {
                self.refuse.set(self.refuse.get() - 1);
                return Err("refused by the test".into());
            }
            self.next_id.set(self.next_id.get() + 1);
            let id = self.next_id.get();
            self.sent.borrow_mut().push(Sent {
                id,
                method: call.method,
                path: call.path.to_string(),
                headers: call
                    .headers()
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                body: call.body.map(<[u8]>::to_vec),
                timeout_ms: call.timeout_ms,
            });
            Ok(id)
        }
        fn gather_usage(&self, into: &mut Tally) {
            for batch in self.queue.borrow_mut().drain(..) {
                into.merge(batch);
            }
        }
        fn count(&self, counter: Counter, n: u64) {
            *self.counters.borrow_mut().entry(counter).or_default() += n;
        }
        fn record(&self, gauge: Gauge, value: u64) {
            self.gauges.borrow_mut().insert(gauge, value);
        }
        fn log(&self, level: Level, message: &str) {
            self.logs.borrow_mut().push((level, message.to_string()));
        }
    }
}
