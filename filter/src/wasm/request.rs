//! The HTTP context: one per request. Reads headers through the host, lets the core decide
//! ([`crate::request::handle`]) and sends what it says.

use super::calls::{self, Headers};
use super::root::{log, HostClock, RequestStore, Shared};
use crate::abi;
use crate::authorize::Denial;
use crate::forward;
use crate::host::Level;
use crate::request::{self, Reply, RequestHeaders, EXPIRES_HEADER};
use crate::store::Clock;
use crate::timefmt;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;
use std::borrow::Cow;
use std::cell::OnceCell;
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

/// The request's headers through proxy-wasm host calls. The whole map is read in one call
/// the first time a header is needed, and that listing serves every read and the removals,
/// all of which come before the filter's edits: one host call where there were three (the
/// `request.headers` attribute for the token header, the header-map call for
/// `authorization`, a listing for the removals), about 12,000 fewer instructions per request
/// (docs/benchmarks.md, the waterfall).
#[derive(Default)]
pub struct RequestMap {
    listed: OnceCell<Result<Vec<u8>, u32>>,
}

impl RequestMap {
    fn listing(&self) -> Result<&[u8], String> {
        self.listed
            .get_or_init(|| calls::map_pairs(Headers::Request))
            .as_deref()
            .map_err(|status| host_status(*status))
    }
}

fn host_status(status: u32) -> String {
    format!("host status {status}")
}

impl RequestHeaders for RequestMap {
    type Value = Vec<u8>;
    fn get(&self, name: &str) -> Option<Vec<u8>> {
        // A map the host would not hand over reads as empty: no credential, refused.
        let pairs = abi::decode_pairs(self.listing().ok()?)?;
        abi::header_value(&pairs, name).map(Cow::into_owned)
    }
    fn remove_where(&mut self, doomed: &dyn Fn(&[u8]) -> bool) -> Result<(), String> {
        let pairs = abi::decode_pairs(self.listing()?).ok_or("a malformed header map")?;
        for name in forward::names_to_remove(pairs.iter().map(|(name, _)| *name), doomed) {
            calls::remove(Headers::Request, name).map_err(host_status)?;
        }
        Ok(())
    }
    fn set(&mut self, name: &str, value: &[u8]) -> Result<(), String> {
        // Replacing removes every client-sent copy before setting ours (Envoy's setCopy), in
        // one host call rather than a remove and an add.
        calls::replace(Headers::Request, name, value).map_err(host_status)
    }
}

/// Answers a refused request in the client's protocol ([`request::answer`]). For gRPC, Envoy
/// builds the trailers-only answer from the status given (`grpc-status`, `content-type:
/// application/grpc`), so the metadata travel as headers and the body stays empty.
fn refuse(headers: &RequestMap, d: Denial, expires_at: Option<i64>, needed_scopes: Option<&str>) {
    let a = request::answer(headers, d, expires_at, needed_scopes);
    let headers: Vec<(&str, &[u8])> = a.headers.iter().map(|(n, v)| (*n, v.as_bytes())).collect();
    let grpc_status = a.grpc.map(|code| code as u32);
    if let Err(status) =
        calls::send_local_response(a.status, &headers, a.body.as_bytes(), grpc_status)
    {
        log(
            Level::Warn,
            &format!("cannot send the {} answer (host status {status})", a.status),
        );
    }
}

impl Context for Request {}

impl HttpContext for Request {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let mut headers = RequestMap::default();
        let Some(shared) = self.shared.clone() else {
            refuse(&headers, Denial::StateUnavailable, None, None);
            return Action::Pause;
        };
        #[cfg(any(
            feature = "waterfall-return",
            feature = "waterfall-read",
            feature = "waterfall-hash",
            feature = "waterfall-lookup",
            feature = "waterfall-identity"
        ))]
        return super::waterfall::request(&shared, &mut headers);
        #[allow(unreachable_code)]
        let handled = request::handle(
            &shared.config,
            &shared.identity,
            &RequestStore(&shared),
            &shared.scopes,
            &mut headers,
            HostClock.now_nanos(),
            |c| {
                if c.usage {
                    shared.usage.borrow_mut().count(c.id, c.allowed, c.at);
                }
                if c.fleet {
                    shared.fleet.borrow_mut().count(c.id, c.allowed, c.at);
                }
            },
        );
        if let Some(trouble) = &handled.trouble {
            log(Level::Warn, trouble);
        }
        shared.outcomes.bump(handled.counter);
        match handled.reply {
            Reply::Allow { expires_at } => {
                self.expires_at = expires_at.map(timefmt::rfc3339);
                Action::Continue
            }
            Reply::Refuse {
                denial,
                expires_at,
                needed_scopes,
            } => {
                refuse(&headers, denial, expires_at, needed_scopes.as_deref());
                Action::Pause
            }
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if let Some(t) = self.expires_at.take() {
            // Only a courtesy to the client: nothing to undo if the host refuses it.
            let _ = calls::add(Headers::Response, EXPIRES_HEADER, t.as_bytes());
        }
        Action::Continue
    }
}
