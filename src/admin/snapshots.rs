//! `/api/v1/snapshots`: FAS snapshots — what every target ran — and their restore.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::actions::{view, ActionView};
use super::{blocking, now_secs, AppError, AppState, Authorized, ErrorBody};
use crate::planner::actions::{Snapshot, SnapshotRequest};

pub(super) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(list, create)).routes(routes!(show, delete)).routes(routes!(restore))
}

#[utoipa::path(get, path = "/api/v1/snapshots", tag = "actions",
    responses((status = 200, body = Vec<Snapshot>)))]
async fn list(State(s): State<AppState>) -> Result<Json<Vec<Snapshot>>, AppError> {
    let actions = s.actions.clone();
    Ok(Json(blocking(move || actions.snapshots()).await?))
}

#[utoipa::path(post, path = "/api/v1/snapshots", tag = "actions", request_body = SnapshotRequest,
    responses((status = 201, body = Snapshot), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn create(
    _auth: Authorized,
    State(s): State<AppState>,
    Json(req): Json<SnapshotRequest>,
) -> Result<(StatusCode, Json<Snapshot>), AppError> {
    let actions = s.actions.clone();
    Ok((StatusCode::CREATED, Json(blocking(move || actions.snapshot(req, now_secs())).await?)))
}

#[utoipa::path(get, path = "/api/v1/snapshots/{name}", tag = "actions", params(("name" = String, Path)),
    responses((status = 200, body = Snapshot), (status = 404, body = ErrorBody)))]
async fn show(State(s): State<AppState>, Path(name): Path<String>) -> Result<Json<Snapshot>, AppError> {
    let actions = s.actions.clone();
    Ok(Json(blocking(move || actions.get_snapshot(&name)).await?))
}

#[utoipa::path(delete, path = "/api/v1/snapshots/{name}", tag = "actions", params(("name" = String, Path)),
    responses((status = 200, description = "{deleted}", body = Object), (status = 404, body = ErrorBody)))]
async fn delete(
    _auth: Authorized,
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, AppError> {
    let actions = s.actions.clone();
    let gone = name.clone();
    blocking(move || actions.delete_snapshot(&gone)).await?;
    Ok(Json(serde_json::json!({ "deleted": name })))
}

/// How to restore: a dry run unless `overrideDryrun`.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestoreBody {
    #[serde(default)]
    pub override_dryrun: bool,
    #[serde(default)]
    pub time_limit: Option<u64>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct Restored {
    pub action: ActionView,
    /// Xnames of the snapshot removed since: not restored.
    pub skipped: Vec<String>,
}

#[utoipa::path(post, path = "/api/v1/snapshots/{name}/restore", tag = "actions", params(("name" = String, Path)),
    request_body(content = Option<RestoreBody>),
    responses((status = 201, description = "the action that puts the snapshot back", body = Restored),
        (status = 404, body = ErrorBody), (status = 409, description = "expired", body = ErrorBody)))]
async fn restore(
    _auth: Authorized,
    State(s): State<AppState>,
    Path(name): Path<String>,
    body: Option<Json<RestoreBody>>,
) -> Result<(StatusCode, Json<Restored>), AppError> {
    let b = body.map(|Json(b)| b).unwrap_or_default();
    let actions = s.actions.clone();
    let (a, skipped) = blocking(move || actions.restore(&name, b.override_dryrun, b.time_limit, now_secs())).await?;
    Ok((StatusCode::CREATED, Json(Restored { action: view(&s, &a.action_id)?, skipped })))
}
