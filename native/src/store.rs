//! Token records and rate state in process memory, shared by every worker: the native
//! flavor's [`SharedStore`]. Keys are spread over independently locked shards, so workers
//! rarely meet on a lock; values are read without copying into the heap (small ones are held
//! inline, large ones behind a reference count), so the request path allocates nothing.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use tokengate_filter::store::{SharedStore, StoreError};

/// Values up to this size (rate state, leases, generations, the state key) live inline.
const INLINE: usize = 32;

/// A value as read from the store.
#[derive(Clone)]
pub enum Bytes {
    Inline { len: u8, buf: [u8; INLINE] },
    Shared(Arc<[u8]>),
}

impl Bytes {
    fn of(value: &[u8]) -> Bytes {
        if value.len() <= INLINE {
            let mut buf = [0u8; INLINE];
            buf[..value.len()].copy_from_slice(value);
            Bytes::Inline {
                len: value.len() as u8,
                buf,
            }
        } else {
            Bytes::Shared(Arc::from(value))
        }
    }

    /// Overwrites in place when both fit inline, which is what rate-state updates do: no
    /// allocation on the request path.
    fn replace(&mut self, value: &[u8]) {
        match self {
            Bytes::Inline { len, buf } if value.len() <= INLINE => {
                buf[..value.len()].copy_from_slice(value);
                *len = value.len() as u8;
            }
            _ => *self = Bytes::of(value),
        }
    }
}

impl AsRef<[u8]> for Bytes {
    fn as_ref(&self) -> &[u8] {
        match self {
            Bytes::Inline { len, buf } => buf.get(..*len as usize).unwrap_or_default(),
            Bytes::Shared(b) => b,
        }
    }
}

struct Entry {
    value: Bytes,
    cas: u32,
}

/// FNV-1a: keys are token hashes and fixed names, not chosen by clients, and short.
#[derive(Default)]
struct Fnv(u64);

impl Hasher for Fnv {
    fn write(&mut self, bytes: &[u8]) {
        let mut h = if self.0 == 0 {
            0xcbf2_9ce4_8422_2325
        } else {
            self.0
        };
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        self.0 = h;
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

type Shard = RwLock<HashMap<Box<str>, Entry, BuildHasherDefault<Fnv>>>;

const SHARDS: usize = 64;

pub struct MemoryStore {
    shards: Box<[Shard]>,
    /// CAS stamps: never 0 (which means "absent"), never reused before 2^32 writes.
    stamp: AtomicU32,
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore::new()
    }
}

impl MemoryStore {
    pub fn new() -> MemoryStore {
        MemoryStore {
            shards: (0..SHARDS).map(|_| RwLock::default()).collect(),
            stamp: AtomicU32::new(0),
        }
    }

    fn shard(&self, key: &str) -> Option<&Shard> {
        let mut h = Fnv::default();
        h.write(key.as_bytes());
        // The high bits: the low ones also pick the bucket inside the shard's map.
        self.shards.get((h.finish() >> 58) as usize % SHARDS)
    }

    fn next_stamp(&self) -> u32 {
        loop {
            let s = self.stamp.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
            if s != 0 {
                return s;
            }
        }
    }

    /// Keys held.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.read().unwrap_or_else(PoisonError::into_inner).len())
            .sum()
    }
}

impl SharedStore for MemoryStore {
    type Value = Bytes;

    fn get(&self, key: &str) -> Result<(Option<Bytes>, u32), StoreError> {
        let shard = self.shard(key).ok_or(StoreError::Host)?;
        let map = shard.read().unwrap_or_else(PoisonError::into_inner);
        Ok(match map.get(key) {
            Some(e) => (Some(e.value.clone()), e.cas),
            None => (None, 0),
        })
    }

    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError> {
        let shard = self.shard(key).ok_or(StoreError::Host)?;
        let mut map = shard.write().unwrap_or_else(PoisonError::into_inner);
        let stamp = self.next_stamp();
        match map.get_mut(key) {
            Some(e) => {
                if cas != 0 && cas != e.cas {
                    return Err(StoreError::CasMismatch);
                }
                e.value.replace(value);
                e.cas = stamp;
            }
            None => {
                map.insert(
                    key.into(),
                    Entry {
                        value: Bytes::of(value),
                        cas: stamp,
                    },
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;
    use tokengate_filter::store::{compare_and_swap, Step};

    #[test]
    fn behaves_like_shared_data() {
        let s = MemoryStore::new();
        assert_eq!(s.get("k").unwrap().1, 0);
        assert!(s.get("k").unwrap().0.is_none());
        s.set("k", b"one", 0).unwrap();
        let (v, cas) = s.get("k").unwrap();
        assert_eq!(v.unwrap().as_ref(), b"one");
        assert_ne!(cas, 0);
        s.set("k", b"two", cas).unwrap();
        assert_eq!(s.set("k", b"three", cas), Err(StoreError::CasMismatch));
        s.set("k", b"forced", 0).unwrap();
        assert_eq!(s.get("k").unwrap().0.unwrap().as_ref(), b"forced");
        let big = vec![7u8; 1_000];
        s.set("big", &big, 0).unwrap();
        let (v, _) = s.get("big").unwrap();
        assert_eq!(v.unwrap().as_ref(), &big[..]);
        s.set("big", b"small again", 0).unwrap();
        assert_eq!(s.get("big").unwrap().0.unwrap().as_ref(), b"small again");
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn a_value_read_stays_whole_while_it_is_replaced() {
        let s = MemoryStore::new();
        let big = vec![1u8; 100];
        s.set("k", &big, 0).unwrap();
        let held = s.get("k").unwrap().0.unwrap();
        s.set("k", &[2u8; 100], 0).unwrap();
        assert_eq!(held.as_ref(), &big[..]);
    }

    #[test]
    fn concurrent_compare_and_swap_loses_no_update() {
        let s = Arc::new(MemoryStore::new());
        // A missing key is written unconditionally (as in proxy-wasm): create it first.
        s.set("n", &0u64.to_le_bytes(), 0).unwrap();
        let workers: Vec<_> = (0..4)
            .map(|_| {
                let s = Arc::clone(&s);
                thread::spawn(move || {
                    for _ in 0..2_000 {
                        compare_and_swap(&*s, "n", 1_000, |v| {
                            let n = v
                                .and_then(|v| v.try_into().ok())
                                .map_or(0, u64::from_le_bytes);
                            Step::Write((n + 1).to_le_bytes(), ())
                        })
                        .unwrap();
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
        let v = s.get("n").unwrap().0.unwrap();
        assert_eq!(u64::from_le_bytes(v.as_ref().try_into().unwrap()), 8_000);
    }
}
