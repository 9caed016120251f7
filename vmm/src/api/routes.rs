//! The route table: the one list of (method, path, handler) that the router
//! is built from and that the OpenAPI test compares with
//! `vmm/api/openapi.yaml`.

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::http::{Method, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{delete, get, patch, post, put, MethodRouter};
use axum::{middleware, Router};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::{RequestBodyTimeoutLayer, TimeoutLayer};

use super::error::{json_errors, HttpError};
use super::handlers;
use super::{BODY_TIMEOUT, MAX_BODY_BYTES, REQUEST_TIMEOUT};
use crate::control::Control;
use klpvisor_api::MAX_PATCH_BYTES;

/// What every handler gets: the VMM's control state.
pub type AppState = Arc<Control>;

/// Every route the server exposes. Paths use OpenAPI's `{param}` syntax,
/// which axum shares.
pub fn route_table() -> Vec<(Method, &'static str, MethodRouter<AppState>)> {
    vec![
        (Method::GET, "/vm", get(handlers::vm_info)),
        (Method::PATCH, "/vm", patch(handlers::vm_set_state)),
        (Method::PUT, "/vm/pause", put(handlers::vm_pause)),
        (Method::PUT, "/vm/resume", put(handlers::vm_resume)),
        (Method::GET, "/vcpus/{id}/regs", get(handlers::vcpu_regs)),
        (Method::GET, "/memory", get(handlers::memory)),
        (Method::GET, "/symbols", get(handlers::symbols)),
        (Method::GET, "/symbols/all", get(handlers::symbols_all)),
        (Method::GET, "/tasks", get(handlers::tasks)),
        (Method::GET, "/patches", get(handlers::patches)),
        (
            Method::POST,
            "/patches",
            // A module is not a JSON request: it gets its own, larger limit.
            post(handlers::patch_apply).layer(DefaultBodyLimit::max(MAX_PATCH_BYTES)),
        ),
        (
            Method::POST,
            "/patches/{name}/disable",
            post(handlers::patch_disable),
        ),
        (
            Method::POST,
            "/patches/{name}/enable",
            post(handlers::patch_enable),
        ),
        (
            Method::DELETE,
            "/patches/{name}",
            delete(handlers::patch_remove),
        ),
        (Method::GET, "/history", get(handlers::history)),
        (Method::POST, "/rollback", post(handlers::rollback)),
    ]
}

/// "GET /vm, PATCH /vm, ..." for error messages.
pub fn route_list() -> String {
    route_table()
        .iter()
        .map(|(m, p, _)| format!("{m} {p}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Whether concrete `path` matches `template` (`{x}` matches one segment).
fn matches(template: &str, path: &str) -> bool {
    let t: Vec<&str> = template.split('/').collect();
    let p: Vec<&str> = path.split('/').collect();
    t.len() == p.len()
        && t.iter()
            .zip(&p)
            .all(|(t, p)| (t.starts_with('{') && !p.is_empty()) || t == p)
}

/// Methods the table has for `path`.
pub fn allowed_methods(path: &str) -> Vec<Method> {
    route_table()
        .into_iter()
        .filter(|(_, t, _)| matches(t, path))
        .map(|(m, _, _)| m)
        .collect()
}

async fn no_route(method: Method, uri: axum::http::Uri) -> HttpError {
    HttpError::new(
        StatusCode::NOT_FOUND,
        format!("no route {method} {}; routes: {}", uri.path(), route_list()),
    )
}

/// The application with its limits.
pub fn router(control: Arc<Control>) -> Router {
    let mut r = Router::new();
    for (_, path, handler) in route_table() {
        r = r.route(path, handler);
    }
    r.fallback(no_route)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            REQUEST_TIMEOUT,
        ))
        .layer(RequestBodyTimeoutLayer::new(BODY_TIMEOUT))
        // The largest body any route takes; each route's own limit
        // (DefaultBodyLimit) is checked as its extractor reads.
        .layer(RequestBodyLimitLayer::new(MAX_PATCH_BYTES))
        .layer(CatchPanicLayer::custom(|_| {
            HttpError::internal("the VMM hit a bug serving this request (see its log)")
                .into_response()
        }))
        .layer(middleware::from_fn(json_errors))
        .with_state(control)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_match_one_segment_per_parameter() {
        assert!(matches("/vcpus/{id}/regs", "/vcpus/0/regs"));
        assert!(!matches("/vcpus/{id}/regs", "/vcpus//regs"));
        assert!(!matches("/vcpus/{id}/regs", "/vcpus/0"));
        assert!(matches("/vm", "/vm"));
        assert_eq!(allowed_methods("/vm"), vec![Method::GET, Method::PATCH]);
        assert!(allowed_methods("/nope").is_empty());
    }

    /// Every route the server exposes is documented, and the document
    /// promises no route the server lacks.
    #[test]
    fn openapi_document_lists_exactly_the_served_routes() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/api/openapi.yaml");
        let text = std::fs::read_to_string(path).unwrap();
        let doc: serde_norway::Value = serde_norway::from_str(&text).unwrap();
        let paths = doc["paths"].as_mapping().expect("openapi.yaml has paths");
        let mut documented = Vec::new();
        for (p, ops) in paths {
            let p = p.as_str().unwrap();
            for (m, _) in ops.as_mapping().unwrap() {
                documented.push(format!("{} {p}", m.as_str().unwrap().to_uppercase()));
            }
        }
        documented.sort();
        let mut served: Vec<String> = route_table()
            .iter()
            .map(|(m, p, _)| format!("{m} {p}"))
            .collect();
        served.sort();
        assert_eq!(served, documented, "vmm/api/openapi.yaml is out of date");
    }

    #[test]
    fn every_route_is_unique() {
        let t = route_table();
        for (i, (m, p, _)) in t.iter().enumerate() {
            assert!(
                !t.iter().skip(i + 1).any(|(m2, p2, _)| m2 == m && p2 == p),
                "{m} {p} twice"
            );
        }
    }
}
