//! The HTTP context: one per request. Reads headers through the host, lets the core decide
//! ([`crate::request::handle`]) and sends what it says.

use super::root::{HostClock, HostStore, Shared};
use crate::authorize::Denial;
use crate::request::{self, Reply, RequestHeaders, EXPIRES_HEADER};
use crate::request_header;
use crate::response;
use crate::store::Clock;
use crate::timefmt;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, MapType};
use std::rc::Rc;

pub struct Request {
    /// `None` only if configuration failed, in which case Envoy refuses the filter anyway.
    shared: Option<Rc<Shared>>,
    /// The token's expiry, to announce on the response (inside the warning window only).
    expires_at: Option<String>,
}

impl Request {
    pub fn new(shared: Option<Rc<Shared>>) -> Request {
        Request {
            shared,
            expires_at: None,
        }
    }
}

/// The request's headers through proxy-wasm host calls.
pub struct Headers;

impl RequestHeaders for Headers {
    type Value = Vec<u8>;
    fn get(&self, name: &str) -> Option<Vec<u8>> {
        request_header::get(name)
    }
    fn set(&mut self, name: &str, value: &[u8]) {
        // Replacing removes every client-sent copy before setting ours (Envoy's setCopy), in
        // one host call rather than a remove and an add.
        let _ = hostcalls::set_map_value_bytes(MapType::HttpRequestHeaders, name, Some(value));
    }
    fn remove(&mut self, name: &str) {
        let _ = hostcalls::remove_map_value(MapType::HttpRequestHeaders, name);
    }
}

fn refuse(d: Denial, expires_at: Option<&str>) {
    let r = response::refusal(d);
    let mut headers: Vec<(&str, &str)> = r.headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
    if let Some(t) = expires_at {
        headers.push((EXPIRES_HEADER, t));
    }
    let _ = hostcalls::send_http_response(r.status, headers, Some(r.body.as_bytes()));
}

impl Context for Request {}

impl HttpContext for Request {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let Some(shared) = self.shared.clone() else {
            refuse(Denial::StateUnavailable, None);
            return Action::Pause;
        };
        #[cfg(any(
            feature = "waterfall-return",
            feature = "waterfall-read",
            feature = "waterfall-hash",
            feature = "waterfall-lookup",
            feature = "waterfall-identity"
        ))]
        return super::waterfall::request(&shared, &mut Headers);
        #[allow(unreachable_code)]
        let (reply, counter) = request::handle(
            &shared.config,
            &shared.identity,
            &HostStore,
            &mut Headers,
            HostClock.now_nanos(),
            |id, allowed, at| shared.usage.borrow_mut().count(id, allowed, at),
        );
        shared.outcomes.bump(counter);
        match reply {
            Reply::Allow { expires_at } => {
                self.expires_at = expires_at.map(timefmt::rfc3339);
                Action::Continue
            }
            Reply::Refuse { denial, expires_at } => {
                refuse(denial, expires_at.map(timefmt::rfc3339).as_deref());
                Action::Pause
            }
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if let Some(t) = self.expires_at.take() {
            let _ = hostcalls::add_map_value(MapType::HttpResponseHeaders, EXPIRES_HEADER, &t);
        }
        Action::Continue
    }
}
