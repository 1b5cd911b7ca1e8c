//! For `make bench` only (section `waterfall`): the request path cut after one step, to
//! price each step of the wasm flavor inside a real Envoy. One feature per cut:
//! `waterfall-return` (the VM entered and left), `-read` (+ the credential header read),
//! `-hash` (+ SHA-256), `-lookup` (+ the state and token records from shared data, decoded),
//! `-identity` (+ the credential removed and the identity headers set). Every request passes:
//! these filters check nothing.

use super::root::{HostStore, Shared};
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
    let state = HostStore.get(STATE_KEY).ok().and_then(|(v, _)| v);
    let Ok((Some(value), _)) = HostStore.get(&record::token_key(&hash)) else {
        return Action::Continue;
    };
    let Some(rec) = record::decode_token(&value) else {
        return Action::Continue;
    };
    if STEP == 3 {
        black_box((state, rec.status));
        return Action::Continue;
    }
    for name in &cfg.token_headers {
        headers.remove(name);
    }
    let ids = &shared.identity;
    headers.set(&ids.id, rec.id);
    headers.set(&ids.name, rec.name);
    headers.set(&ids.owner, rec.owner);
    headers.set(&ids.kind, rec.kind.as_str().as_bytes());
    Action::Continue
}
