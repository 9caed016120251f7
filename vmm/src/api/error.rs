//! Every error the API returns is `{"error": "..."}` with a status that
//! says whose fault it is (4xx: the request, 5xx: the VMM or the guest's
//! state), including the ones axum and tower-http produce as plain text
//! (bad paths, query strings or JSON bodies, oversized bodies, timeouts):
//! [`json_errors`] rewrites those.

use axum::body::{to_bytes, Body};
use axum::extract::rejection::JsonRejection;
use axum::extract::Request;
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;

use klpvisor_api::{ErrorKind, ErrorReply};
use klpvisor_engine::callback::gate::GateError;
use klpvisor_engine::engine::{EngineError, Fault};
use klpvisor_engine::transition::TransitionError;

use super::routes::{allowed_methods, route_list};
use super::{BODY_TIMEOUT, MAX_BODY_BYTES, REQUEST_TIMEOUT};
use crate::control::ControlError;

/// A failed request: status, kind and a message a user can act on.
#[derive(Debug)]
pub struct HttpError {
    /// The HTTP status.
    pub status: StatusCode,
    /// The class a script reacts to (the reply's `kind`).
    pub kind: ErrorKind,
    /// The reply's `error` text.
    pub message: String,
}

impl HttpError {
    /// An error of the kind its status implies ([`ErrorKind::of_status`]).
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            kind: ErrorKind::of_status(status.as_u16()),
            message: message.into(),
        }
    }

    fn with_kind(mut self, kind: ErrorKind) -> Self {
        self.kind = kind;
        self
    }

    /// A 400: the request itself is wrong.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    /// A 404: no such patch, vCPU or symbol.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }

    /// A 500: the VMM failed.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::warn!(status = self.status.as_u16(), "API: {}", self.message);
        } else {
            tracing::debug!(status = self.status.as_u16(), "API: {}", self.message);
        }
        (
            self.status,
            Json(ErrorReply {
                error: self.message,
                kind: Some(self.kind),
            }),
        )
            .into_response()
    }
}

impl From<ControlError> for HttpError {
    fn from(e: ControlError) -> Self {
        let status = match &e {
            ControlError::AlreadyPaused
            | ControlError::NotPaused
            | ControlError::Transition(TransitionError::PausedForCallbacks)
            | ControlError::Transition(TransitionError::PausedForPercpu)
            | ControlError::Busy(_)
            | ControlError::Transition(TransitionError::Refused { .. }) => StatusCode::CONFLICT,
            ControlError::Transition(TransitionError::CallbackTimeout { .. }) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            // Not raised by the VMM, which can call into its guest.
            ControlError::Transition(TransitionError::NoGuestCalls { .. }) => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            ControlError::NoSuchVcpu { .. } => StatusCode::NOT_FOUND,
            ControlError::Stopped | ControlError::KernelNotReady(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ControlError::Vm(crate::VmError::PauseTimeout(..)) => StatusCode::SERVICE_UNAVAILABLE,
            ControlError::Vm(_)
            | ControlError::Tasks(_)
            | ControlError::NoTaskWalk
            | ControlError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            // A module whose trailer cannot be read is a bad module (like
            // one the ELF parser rejects); anything else is the policy's no.
            ControlError::Signature(klpvisor_engine::signature::SignatureError::Malformed(_)) => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            ControlError::Signature(_) => StatusCode::FORBIDDEN,
            ControlError::Engine(e) => match e.kind() {
                Fault::Module => StatusCode::UNPROCESSABLE_ENTITY,
                Fault::State => StatusCode::CONFLICT,
                Fault::NotFound => StatusCode::NOT_FOUND,
                Fault::NoSpace => StatusCode::INSUFFICIENT_STORAGE,
                Fault::Guest | Fault::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            },
        };
        // A 409 is busy by default; these are not.
        let kind = match &e {
            ControlError::Engine(EngineError::Blocked(_)) => Some(ErrorKind::Blocked),
            ControlError::Engine(EngineError::Gate(GateError::Busy(_))) => Some(ErrorKind::Busy),
            ControlError::Transition(TransitionError::Refused { .. }) => Some(ErrorKind::Refused),
            ControlError::Engine(_) if status == StatusCode::CONFLICT => Some(ErrorKind::Refused),
            ControlError::Transition(TransitionError::CallbackTimeout { .. }) => {
                Some(ErrorKind::Failed)
            }
            _ => None,
        };
        let out = Self::new(status, e.to_string());
        match kind {
            Some(k) => out.with_kind(k),
            None => out,
        }
    }
}

fn is_json(resp: &Response) -> bool {
    resp.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"))
}

/// Middleware: turns any non-JSON error response into `{"error": ...}`,
/// replacing terse or empty framework messages with actionable ones.
pub async fn json_errors(req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let resp = next.run(req).await;
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error()) || is_json(&resp) {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = match to_bytes(body, 16 << 10).await {
        Ok(b) => String::from_utf8_lossy(&b).trim().to_owned(),
        Err(_) => String::new(),
    };
    let message = match status {
        StatusCode::METHOD_NOT_ALLOWED => {
            let allowed = allowed_methods(&path);
            format!(
                "{method} is not allowed on {path}; use {}",
                allowed
                    .iter()
                    .map(|m| m.as_str())
                    .collect::<Vec<_>>()
                    .join(" or ")
            )
        }
        StatusCode::NOT_FOUND if text.is_empty() => {
            format!("no route {method} {path}; routes: {}", route_list())
        }
        StatusCode::PAYLOAD_TOO_LARGE => format!(
            "request body too large: the limit is {MAX_BODY_BYTES} bytes{}",
            if text.is_empty() {
                String::new()
            } else {
                format!(" ({text})")
            }
        ),
        StatusCode::REQUEST_TIMEOUT => format!(
            "the request body did not arrive within {} s; send it in one go",
            BODY_TIMEOUT.as_secs()
        ),
        StatusCode::SERVICE_UNAVAILABLE if text.is_empty() => format!(
            "no reply within {} s; the request may still be running, and a transition it \
             started may commit or be abandoned after this: GET /patches (patcher list) shows \
             the patches, any transition in progress, and under \"ended\" how the last ones \
             finished",
            REQUEST_TIMEOUT.as_secs()
        ),
        _ if text.is_empty() => status
            .canonical_reason()
            .unwrap_or("request failed")
            .to_owned(),
        _ => text,
    };
    let mut out = HttpError::new(status, message).into_response();
    if let Some(allow) = parts.headers.get(header::ALLOW) {
        out.headers_mut().insert(header::ALLOW, allow.clone());
    }
    out
}

/// A JSON body that could not be read: a body that stalled past
/// [`BODY_TIMEOUT`] is the client's timeout (408), not malformed JSON.
pub fn json_rejection(r: JsonRejection) -> HttpError {
    let timed_out = {
        let mut e: Option<&(dyn std::error::Error + 'static)> = Some(&r);
        let mut found = false;
        while let Some(err) = e {
            if err.is::<tower_http::timeout::TimeoutError>() {
                found = true;
                break;
            }
            e = err.source();
        }
        found
    };
    if timed_out {
        return HttpError::new(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the request body did not arrive within {} s; send it in one go",
                BODY_TIMEOUT.as_secs()
            ),
        );
    }
    HttpError::new(r.status(), r.body_text())
}

/// The 403 a refused peer gets (served outside the router).
pub fn forbidden(message: &str) -> axum::http::Response<Body> {
    let body = serde_json::to_vec(&ErrorReply {
        error: message.to_owned(),
        kind: Some(ErrorKind::Refused),
    })
    .unwrap_or_default();
    let mut resp = axum::http::Response::new(Body::from(body));
    *resp.status_mut() = StatusCode::FORBIDDEN;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use klpvisor_engine::signature::{KeyId, SignatureError};

    /// A policy refusal is 403 (the request is understood and not
    /// allowed); an unreadable trailer is a bad module like any other.
    #[test]
    fn signature_refusals_are_forbidden_and_malformed_trailers_unprocessable() {
        let status = |e: SignatureError| HttpError::from(ControlError::Signature(e)).status;
        assert_eq!(status(SignatureError::Unsigned), StatusCode::FORBIDDEN);
        assert_eq!(
            status(SignatureError::KernelSignatureOnly),
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            status(SignatureError::UnknownKey {
                key_id: KeyId([1; 8]),
                trusted: String::new()
            }),
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            status(SignatureError::BadSignature {
                key_id: KeyId([1; 8]),
                key_file: "k.pub".into()
            }),
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            status(SignatureError::Malformed("x".into())),
            StatusCode::UNPROCESSABLE_ENTITY
        );
        let e = HttpError::from(ControlError::Signature(SignatureError::Unsigned));
        assert!(
            e.message.starts_with("patch is not signed"),
            "{}",
            e.message
        );
    }

    #[test]
    fn engine_invariants_are_klpvisors_fault_not_the_guests() {
        use klpvisor_engine::engine::EngineError;
        let e = HttpError::from(ControlError::Engine(EngineError::Internal(
            "no site for 0xffffffff81000000".into(),
        )));
        assert_eq!(e.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(e.message.contains("a bug in klpvisor"), "{}", e.message);
        assert!(!e.message.contains("reading the guest"), "{}", e.message);
        let refused = HttpError::from(ControlError::Transition(
            klpvisor_engine::transition::TransitionError::PausedForCallbacks,
        ));
        assert_eq!(refused.status, StatusCode::CONFLICT);
    }

    #[test]
    fn a_conflict_says_whether_to_retry_wait_or_give_up() {
        use klpvisor_engine::engine::EngineError;
        let kind = |e: ControlError| {
            let h = HttpError::from(e);
            (h.status.as_u16(), h.kind)
        };
        assert_eq!(kind(ControlError::AlreadyPaused), (409, ErrorKind::Busy));
        assert_eq!(
            kind(ControlError::Engine(EngineError::Blocked(Vec::new()))),
            (409, ErrorKind::Blocked)
        );
        assert_eq!(
            kind(ControlError::Signature(SignatureError::Unsigned)),
            (403, ErrorKind::Refused)
        );
        assert_eq!(
            kind(ControlError::Engine(EngineError::Internal("x".into()))),
            (500, ErrorKind::Failed)
        );
        assert_eq!(kind(ControlError::Stopped), (503, ErrorKind::Unavailable));
        // What reaches the client.
        let resp = HttpError::from(ControlError::Engine(EngineError::Blocked(Vec::new())));
        let body = serde_json::to_value(ErrorReply {
            error: resp.message,
            kind: Some(resp.kind),
        })
        .unwrap();
        assert_eq!(body["kind"], "blocked");
    }
}
