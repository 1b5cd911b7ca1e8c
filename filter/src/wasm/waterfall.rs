//! For `make bench` only (section `waterfall`): the request path cut after one step, to
//! price each step of the wasm flavor inside a real Envoy. One feature per cut:
//! `waterfall-return` (the VM entered and left), `-read` (+ the credential header read),
//! `-hash` (+ SHA-256), `-lookup` (+ the state and the token record, decoded),
//! `-identity` (+ the credential and spoofed headers removed, the identity headers set). Every request passes:
//! these filters check nothing.

use super::root::{RequestStore, Shared};
use crate::authorize;
use crate::record::{self, STATE_KEY};
use crate::request::RequestHeaders;
use crate::store::SharedStore;
use proxy_wasm::types::Action;
use std::hint::black_box;

const STEP: u8 = if cfg!(feature = "waterfall-identity") {
    4
} else if cfg!(feature = "waterfall-lookup") {
    3
} else if cfg!(feature = "waterfall-hash") {
    2
} else if cfg!(feature = "waterfall-read") {
    1
} else {
    0
};

pub fn request(shared: &Shared, headers: &mut impl RequestHeaders) -> Action {
    if STEP == 0 {
        return Action::Continue;
    }
    let cfg = &shared.config;
    let Some(credential) = authorize::extract(cfg, |name| headers.get(name)) else {
        return Action::Continue;
    };
    if STEP == 1 {
        black_box(credential.bytes());
        return Action::Continue;
    }
    let hash = authorize::hash(credential.bytes());
    if STEP == 2 {
        black_box(hash);
        return Action::Continue;
    }
    // As the full filter reads them: the state key from this worker's copy, the token record
    // from shared data.
    let store = RequestStore(shared);
    let state = store.get(STATE_KEY).ok().and_then(|(v, _)| v);
    let Ok((Some(value), _)) = store.get(&record::token_key(&hash)) else {
        return Action::Continue;
    };
    let Some(rec) = record::decode_token(&value) else {
        return Action::Continue;
    };
    if STEP == 3 {
        black_box((state, rec.status));
        return Action::Continue;
    }
    let ids = &shared.identity.names;
    let _ = headers.remove_where(&|name| crate::forward::to_remove(cfg, name, ids));
    let values: [&[u8]; 4] = [rec.id, rec.name, rec.owner, rec.kind.as_str().as_bytes()];
    for (name, value) in ids.iter().zip(values) {
        let _ = headers.set(name, value);
    }
    Action::Continue
}
