//! The CLI's calls to the control plane, and what their failures mean for the user: an API
//! refusal, a wrong or missing admin credential, or a URL that is not the control plane at
//! all (nothing listening, or Envoy's listener instead of `tokengate serve`).

use super::Failure;
use serde_json::Value;

/// Where the admin credential came from, for messages about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Flag,
    Env,
}

impl Origin {
    pub fn setting(self) -> &'static str {
        match self {
            Origin::Flag => "--admin-token",
            Origin::Env => "TOKENGATE_ADMIN_TOKEN",
        }
    }
}

/// An error answer in the control plane's shape.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub status: u16,
    pub error: String,
    pub message: String,
    pub body: Value,
}

/// The `error` codes the tokengate filter answers with; an answer carrying one came from an
/// Envoy listener, not from the control plane.
const FILTER_CODES: &[&str] = &[
    "missing_token",
    "invalid_token",
    "token_expired",
    "token_suspended",
    "insufficient_scope",
    "rate_limited",
    "quota_exceeded",
    "token_state_unavailable",
];

pub struct Client {
    pub url: String,
    pub auth: String,
    pub origin: Origin,
}

impl Client {
    fn not_the_control_plane(&self, what: String) -> Failure {
        Failure::Unreachable(format!(
            "{} {what}, so it is not the tokengate control plane: point --url or TOKENGATE_URL \
             at `tokengate serve` (make run: http://127.0.0.1:8081)",
            self.url
        ))
    }

    /// Sends one admin call; `Ok(None)` for an empty (204) answer. A 2xx answer must be a
    /// JSON object holding `expect`, as the control plane's answers do.
    pub fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        expect: &str,
    ) -> Result<Option<Value>, Failure> {
        let req = ureq::request(method, &format!("{}{path}", self.url.trim_end_matches('/')))
            .set("authorization", &self.auth)
            .timeout(std::time::Duration::from_secs(30));
        let result = match body {
            Some(b) => req.send_json(b),
            None => req.call(),
        };
        let resp = match result {
            Ok(r) => r,
            Err(ureq::Error::Status(status, r)) => return Err(self.refused(status, r)),
            Err(e) => {
                return Err(Failure::Unreachable(format!(
                    "cannot reach the control plane at {} (--url or TOKENGATE_URL): {e}",
                    self.url
                )))
            }
        };
        if resp.status() == 204 {
            return Ok(None);
        }
        let from_envoy = resp.header("server") == Some("envoy");
        let v: Value = resp.into_json().unwrap_or(Value::Null);
        if from_envoy || v.get(expect).is_none() {
            return Err(self.not_the_control_plane(
                "answered, but not with what the control plane answers".into(),
            ));
        }
        Ok(Some(v))
    }

    fn refused(&self, status: u16, r: ureq::Response) -> Failure {
        let server = r.header("server").map(str::to_string);
        let v: Value = r.into_json().unwrap_or(Value::Null);
        let text = |k: &str| v[k].as_str().map(str::to_string);
        let (Some(error), Some(message)) = (text("error"), text("message")) else {
            return self.not_the_control_plane(format!(
                "answered HTTP {status} with a body that is not the control plane's"
            ));
        };
        if server.as_deref() == Some("envoy") || FILTER_CODES.contains(&error.as_str()) {
            return self.not_the_control_plane(format!(
                "is an Envoy listener (it answered {status} `{error}` from the tokengate filter)"
            ));
        }
        match (status, error.as_str()) {
            (401, _) => Failure::Credential(format!(
                "the control plane at {} refused the admin credential from {}: it is none of \
                 the credentials that `tokengate serve` was started with",
                self.url,
                self.origin.setting()
            )),
            (429, _) => Failure::Credential(format!(
                "{message} (refused credentials from this address; the admin credential \
                 comes from {})",
                self.origin.setting()
            )),
            _ => Failure::Api(Refusal {
                status,
                error,
                message,
                body: v,
            }),
        }
    }
}
