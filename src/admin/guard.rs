//! Who may use the admin API: the bearer token (and the read-only one) and the Host header.

use axum::extract::{FromRef, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{AppError, AppState};

/// Proof that the request carried the admin bearer token.
pub struct Authorized;

fn same(a: &[u8], b: &[u8]) -> bool {
    // Constant time in the token's content, so timing does not reveal a prefix.
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl<S: Send + Sync> FromRequestParts<S> for Authorized
where
    AppState: FromRef<S>,
{
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let state = AppState::from_ref(state);
        match bearer(&parts.headers) {
            Some(t) if same(t.as_bytes(), state.token.as_bytes()) => Ok(Authorized),
            Some(_) => Err(AppError::new(StatusCode::UNAUTHORIZED, "unauthorized", "wrong bearer token")),
            None => Err(AppError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "this route needs Authorization: Bearer <token>",
            )),
        }
    }
}

/// The token of `Authorization: Bearer <token>`.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers.get(header::AUTHORIZATION)?.to_str().ok()?.strip_prefix("Bearer ").map(str::trim)
}

/// The Host header without its port: `name`, `1.2.3.4` or `[::1]`.
fn host_name(host: &str) -> &str {
    if host.starts_with('[') {
        return host.split_once(']').map_or(host, |(h, _)| &host[..h.len() + 1]);
    }
    host.rsplit_once(':').map_or(host, |(h, _)| h)
}

/// Every `/api/v1` request: a Host of this gateway (421 otherwise), then a token — the admin
/// token for anything, the read-only one for `GET`/`HEAD` (403 for the rest), 401 without.
pub(super) async fn guard(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let host = req.headers().get(header::HOST).and_then(|v| v.to_str().ok()).map(|h| host_name(h).to_ascii_lowercase());
    if !host.as_ref().is_some_and(|h| s.allowed_hosts.iter().any(|a| a == h)) {
        s.telemetry.admin_refused("host");
        let shown = crate::shown(host.as_deref().unwrap_or("(none)")).into_owned();
        let msg = format!("Host {shown} is not one this gateway answers to (admin.allowed_hosts)");
        return AppError::new(StatusCode::MISDIRECTED_REQUEST, "misdirected", msg).into_response();
    }
    let given = bearer(req.headers());
    let read_only = matches!(*req.method(), Method::GET | Method::HEAD);
    let is_read_token = |t: &str| s.read_token.as_ref().is_some_and(|r| same(t.as_bytes(), r.as_bytes()));
    match given {
        Some(t) if same(t.as_bytes(), s.token.as_bytes()) => next.run(req).await,
        Some(t) if is_read_token(t) && read_only => next.run(req).await,
        Some(t) if is_read_token(t) => {
            s.telemetry.admin_refused("read_only");
            AppError::new(StatusCode::FORBIDDEN, "forbidden", "the read-only token cannot change anything")
                .into_response()
        }
        Some(_) => {
            s.telemetry.admin_refused("wrong_token");
            AppError::new(StatusCode::UNAUTHORIZED, "unauthorized", "wrong bearer token").into_response()
        }
        None => {
            s.telemetry.admin_refused("no_token");
            AppError::new(StatusCode::UNAUTHORIZED, "unauthorized", "this route needs Authorization: Bearer <token>")
                .into_response()
        }
    }
}
