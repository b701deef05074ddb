//! `/api/v1/nodes` and `/api/v1/content`: what a planner's data-plane nodes need and report.

use axum::extract::{Path, State};
use axum::http::header;
use axum::response::IntoResponse;
use axum::Json;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{AppError, AppState, ErrorBody};
use crate::cluster::feed::NodeStatus;
use crate::firmware::FirmwareError;

pub(super) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(nodes)).routes(routes!(content))
}

/// The data-plane nodes this planner has heard from (none unless `cluster.role = "planner"`).
#[utoipa::path(get, path = "/api/v1/nodes", tag = "cluster",
    responses((status = 200, body = Vec<NodeStatus>)))]
async fn nodes(State(s): State<AppState>) -> Json<Vec<NodeStatus>> {
    Json(s.nodes.as_ref().map(|n| n.list(crate::now_millis())).unwrap_or_default())
}

/// An image's bytes by their sha256: how data-plane nodes fill their caches.
#[utoipa::path(get, path = "/api/v1/content/{sha256}", tag = "cluster",
    params(("sha256" = String, Path, description = "lowercase hex")),
    responses((status = 200, description = "the image", content_type = "application/octet-stream"),
        (status = 404, body = ErrorBody)))]
async fn content(State(s): State<AppState>, Path(sha256): Path<String>) -> Result<impl IntoResponse, AppError> {
    let not_found =
        || AppError::from(FirmwareError::NotFound(format!("an image with sha256 {}", crate::shown(&sha256))));
    let meta = s.firmware.list().into_iter().find(|m| m.sha256 == sha256).ok_or_else(not_found)?;
    let fw = s.firmware.clone();
    let bytes = super::blocking(move || fw.bytes(&meta)).await?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes))
}
