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

/// One served route: its method, path template, handler and the query
/// parameters its handler accepts (any other is refused with 400).
pub struct Route {
    /// The HTTP method.
    pub method: Method,
    /// The path template (`{name}` for a segment).
    pub path: &'static str,
    /// What serves it.
    pub handler: MethodRouter<AppState>,
    /// The query parameters its handler accepts.
    pub params: &'static [&'static str],
}

fn route(
    method: Method,
    path: &'static str,
    handler: MethodRouter<AppState>,
    params: &'static [&'static str],
) -> Route {
    Route {
        method,
        path,
        handler,
        params,
    }
}

/// Every route the server exposes. Paths use OpenAPI's `{param}` syntax,
/// which axum shares.
pub fn route_table() -> Vec<Route> {
    use handlers::{MEMORY_PARAMS, ROLLBACK_PARAMS, SYMBOLS_PARAMS, TRANSITION_PARAMS};
    vec![
        route(Method::GET, "/vm", get(handlers::vm_info), &[]),
        route(Method::PATCH, "/vm", patch(handlers::vm_set_state), &[]),
        route(Method::PUT, "/vm/pause", put(handlers::vm_pause), &[]),
        route(Method::PUT, "/vm/resume", put(handlers::vm_resume), &[]),
        route(
            Method::GET,
            "/vcpus/{id}/regs",
            get(handlers::vcpu_regs),
            &[],
        ),
        route(Method::GET, "/memory", get(handlers::memory), MEMORY_PARAMS),
        route(
            Method::GET,
            "/symbols",
            get(handlers::symbols),
            SYMBOLS_PARAMS,
        ),
        route(Method::GET, "/symbols/all", get(handlers::symbols_all), &[]),
        route(Method::GET, "/tasks", get(handlers::tasks), &[]),
        route(Method::GET, "/patches", get(handlers::patches), &[]),
        route(
            Method::POST,
            "/patches",
            post(handlers::patch_apply).layer(DefaultBodyLimit::max(MAX_PATCH_BYTES)),
            TRANSITION_PARAMS,
        ),
        route(
            Method::POST,
            "/patches/{name}/disable",
            post(handlers::patch_disable),
            TRANSITION_PARAMS,
        ),
        route(
            Method::POST,
            "/patches/{name}/enable",
            post(handlers::patch_enable),
            TRANSITION_PARAMS,
        ),
        route(
            Method::DELETE,
            "/patches/{name}",
            delete(handlers::patch_remove),
            &[],
        ),
        route(Method::GET, "/history", get(handlers::history), &[]),
        route(
            Method::POST,
            "/rollback",
            post(handlers::rollback),
            ROLLBACK_PARAMS,
        ),
    ]
}

/// "GET /vm, PATCH /vm, ..." for error messages.
pub fn route_list() -> String {
    route_table()
        .iter()
        .map(|r| format!("{} {}", r.method, r.path))
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
        .filter(|r| matches(r.path, path))
        .map(|r| r.method)
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
    for route in route_table() {
        r = r.route(route.path, route.handler);
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
            .map(|r| format!("{} {}", r.method, r.path))
            .collect();
        served.sort();
        assert_eq!(served, documented, "vmm/api/openapi.yaml is out of date");
    }

    /// Each route's documented parameters are the server's: the query
    /// parameters its handler accepts and the path's placeholders; its
    /// documented statuses are ones the server answers, with 200, a 400
    /// where it takes query parameters (an unknown or bad one) and a 404
    /// where its path names something.
    #[test]
    fn openapi_document_has_each_routes_parameters_and_statuses() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/api/openapi.yaml");
        let text = std::fs::read_to_string(path).unwrap();
        let doc: serde_norway::Value = serde_norway::from_str(&text).unwrap();
        // Every status the server's code answers with (its error types and
        // the middleware: body limit, timeouts, connection limit).
        let answered = [200, 400, 403, 404, 405, 408, 409, 413, 422, 500, 503, 507];
        for r in route_table() {
            let op = &doc["paths"][r.path][r.method.as_str().to_lowercase().as_str()];
            let here = format!("{} {}", r.method, r.path);
            let params: Vec<(String, String)> = op["parameters"]
                .as_sequence()
                .map(|s| {
                    s.iter()
                        .map(|p| {
                            (
                                p["name"].as_str().unwrap().to_owned(),
                                p["in"].as_str().unwrap().to_owned(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            let named = |at: &str| -> Vec<&str> {
                let mut v: Vec<&str> = params
                    .iter()
                    .filter(|(_, a)| a == at)
                    .map(|(n, _)| n.as_str())
                    .collect();
                v.sort_unstable();
                v
            };
            let mut served: Vec<&str> = r.params.to_vec();
            served.sort_unstable();
            assert_eq!(named("query"), served, "{here}: query parameters");
            let mut placeholders: Vec<&str> = r
                .path
                .split('/')
                .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
                .collect();
            placeholders.sort_unstable();
            assert_eq!(named("path"), placeholders, "{here}: path parameters");
            let statuses: Vec<u16> = op["responses"]
                .as_mapping()
                .unwrap_or_else(|| panic!("{here}: no responses"))
                .keys()
                .map(|k| k.as_str().unwrap().parse().unwrap())
                .collect();
            for s in &statuses {
                assert!(
                    answered.contains(s),
                    "{here}: documents {s}, never answered"
                );
            }
            assert!(statuses.contains(&200), "{here}: no 200");
            if !r.params.is_empty() {
                assert!(statuses.contains(&400), "{here}: takes parameters, no 400");
            }
            if !placeholders.is_empty() {
                assert!(statuses.contains(&404), "{here}: names something, no 404");
            }
        }
    }

    #[test]
    fn every_route_is_unique() {
        let t = route_table();
        for (i, a) in t.iter().enumerate() {
            assert!(
                !t.iter()
                    .skip(i + 1)
                    .any(|b| b.method == a.method && b.path == a.path),
                "{} {} twice",
                a.method,
                a.path
            );
        }
    }
}
