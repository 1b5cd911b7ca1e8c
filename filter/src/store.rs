//! The small seams between decisions and the proxy: shared data and the clock. The filter's
//! logic is written against these so it runs (and is tested) natively.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreError {
    /// Someone wrote the key since we read it.
    CasMismatch,
    /// Anything else the host reported; callers fail closed.
    Host,
}

/// Proxy-wasm shared data: process-wide, guarded by one mutex, copy on read.
pub trait SharedStore {
    /// The value and its CAS stamp (0 when the key is absent).
    fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, u32), StoreError>;
    /// Writes when `cas` is 0 or still current; a missing key is always written.
    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError>;
}

/// Nanoseconds since the Unix epoch.
pub trait Clock {
    fn now_nanos(&self) -> u64;
}

/// In-memory stand-ins for tests and for the bench's native profile of the decision path
/// (feature `fake-store`).
#[cfg(any(test, feature = "fake-store"))]
pub mod fake {
    use super::*;
    use std::cell::{Cell, RefCell};
    use std::collections::HashMap;

    /// Behaves like Envoy's shared data, including CAS stamps.
    #[derive(Default)]
    pub struct MemStore {
        pub map: RefCell<HashMap<String, (Vec<u8>, u32)>>,
        next_cas: Cell<u32>,
        /// Fail this many upcoming CAS writes, to exercise the retry paths.
        pub fail_cas: Cell<u32>,
    }

    impl SharedStore for MemStore {
        fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, u32), StoreError> {
            Ok(match self.map.borrow().get(key) {
                Some((v, cas)) => (Some(v.clone()), *cas),
                None => (None, 0),
            })
        }
        fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError> {
            let mut map = self.map.borrow_mut();
            if let Some((_, current)) = map.get(key) {
                if cas != 0 && self.fail_cas.get() > 0 {
                    self.fail_cas.set(self.fail_cas.get() - 1);
                    return Err(StoreError::CasMismatch);
                }
                if cas != 0 && cas != *current {
                    return Err(StoreError::CasMismatch);
                }
            }
            self.next_cas.set(self.next_cas.get() + 1);
            map.insert(key.to_string(), (value.to_vec(), self.next_cas.get()));
            Ok(())
        }
    }

    pub struct FixedClock(pub Cell<u64>);

    impl Clock for FixedClock {
        fn now_nanos(&self) -> u64 {
            self.0.get()
        }
    }
}
