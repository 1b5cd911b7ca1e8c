//! The small seams between decisions and the proxy: shared data and the clock. The filter's
//! logic is written against these so it runs (and is tested) natively, and so that each
//! data-plane flavor supplies its own: proxy-wasm shared data for the wasm filter, process
//! memory for the native module.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreError {
    /// Someone wrote the key since we read it.
    CasMismatch,
    /// Anything else the host reported; callers fail closed.
    Host,
}

/// Key-value state shared by every worker of one Envoy, with compare-and-swap stamps.
pub trait SharedStore {
    /// A value as read: owned bytes (proxy-wasm copies on every read), or a cheap handle on
    /// shared bytes (the native store), so that reading allocates nothing there.
    type Value: AsRef<[u8]>;
    /// The value and its CAS stamp (0 when the key is absent).
    fn get(&self, key: &str) -> Result<(Option<Self::Value>, u32), StoreError>;
    /// Writes when `cas` is 0 or still current; a missing key is always written.
    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError>;
}

/// Nanoseconds since the Unix epoch.
pub trait Clock {
    fn now_nanos(&self) -> u64;
}

/// What a compare-and-swap step decides after reading the current value.
pub enum Step<W, T> {
    /// Write `W` (if nobody wrote the key since the read), then return `T`.
    Write(W, T),
    /// Leave the key as it is and return `T`.
    Keep(T),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CasError {
    /// Every attempt lost the race to another writer.
    Exhausted,
    /// The host refused a read or a write.
    Host,
}

/// Read, decide, write with compare-and-swap; on a lost race read again, up to `attempts`
/// times. The one retry loop of the filter: rate state, snapshot generations, token records
/// and the state key all go through it.
pub fn compare_and_swap<S, W, T>(
    store: &S,
    key: &str,
    attempts: u32,
    mut step: impl FnMut(Option<&[u8]>) -> Step<W, T>,
) -> Result<T, CasError>
where
    S: SharedStore + ?Sized,
    W: AsRef<[u8]>,
{
    for _ in 0..attempts {
        let (value, cas) = store.get(key).map_err(|_| CasError::Host)?;
        match step(value.as_ref().map(AsRef::as_ref)) {
            Step::Keep(t) => return Ok(t),
            Step::Write(w, t) => match store.set(key, w.as_ref(), cas) {
                Ok(()) => return Ok(t),
                Err(StoreError::CasMismatch) => continue,
                Err(StoreError::Host) => return Err(CasError::Host),
            },
        }
    }
    Err(CasError::Exhausted)
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
        type Value = Vec<u8>;
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

#[cfg(test)]
mod tests {
    use super::fake::MemStore;
    use super::*;

    #[test]
    fn compare_and_swap_retries_lost_races_then_gives_up() {
        let s = MemStore::default();
        s.set("k", b"1", 0).unwrap();
        let bump = |v: Option<&[u8]>| {
            let n = v.and_then(|v| std::str::from_utf8(v).ok()?.parse::<u32>().ok());
            let next = n.unwrap_or(0) + 1;
            Step::Write(next.to_string(), next)
        };
        assert_eq!(compare_and_swap(&s, "k", 4, bump), Ok(2));
        s.fail_cas.set(3);
        assert_eq!(
            compare_and_swap(&s, "k", 4, bump),
            Ok(3),
            "three lost races"
        );
        s.fail_cas.set(4);
        assert_eq!(compare_and_swap(&s, "k", 4, bump), Err(CasError::Exhausted));
        assert_eq!(s.get("k").unwrap().0.unwrap(), b"3");
        assert_eq!(
            compare_and_swap(&s, "k", 4, |_| Step::<&[u8], _>::Keep(7)),
            Ok(7)
        );
        assert_eq!(
            compare_and_swap(&s, "absent", 1, |v| Step::Write(b"x", v.is_none())),
            Ok(true)
        );
    }

    #[test]
    fn host_errors_end_the_loop_at_once() {
        struct Broken;
        impl SharedStore for Broken {
            type Value = Vec<u8>;
            fn get(&self, _: &str) -> Result<(Option<Vec<u8>>, u32), StoreError> {
                Ok((None, 0))
            }
            fn set(&self, _: &str, _: &[u8], _: u32) -> Result<(), StoreError> {
                Err(StoreError::Host)
            }
        }
        let mut calls = 0;
        let r = compare_and_swap(&Broken, "k", 10, |_| {
            calls += 1;
            Step::Write(b"x", ())
        });
        assert_eq!((r, calls), (Err(CasError::Host), 1));
    }
}
