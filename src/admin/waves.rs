//! `/api/v1/waves` and `/api/v1/tags`: Foundries-style waves and what they made of each tag.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{blocking, now_secs, AppError, AppState, Authorized, ErrorBody};
use crate::planner::waves::{InitRequest, RolloutReport, RolloutRequest, Wave, WaveError, WaveState, WaveStatus};

pub(super) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_waves, init_wave))
        .routes(routes!(show_wave))
        .routes(routes!(rollout_wave))
        .routes(routes!(complete_wave))
        .routes(routes!(cancel_wave))
        .routes(routes!(wave_status))
        .routes(routes!(show_tag))
}

impl From<WaveError> for AppError {
    fn from(e: WaveError) -> Self {
        let (status, kind) = match e {
            WaveError::Planner(p) => return p.into(),
            WaveError::Fleet(f) => return f.into(),
            WaveError::InvalidName(_)
            | WaveError::BadLimit(_)
            | WaveError::Unordered(_)
            | WaveError::NotProduction { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "invalid"),
            WaveError::NotFound(_) | WaveError::NoImage(_) => (StatusCode::NOT_FOUND, "not_found"),
            WaveError::NotAdmissible { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "not_admissible"),
            WaveError::LabelMismatch { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "label_mismatch"),
            WaveError::Exists(_)
            | WaveError::ActiveWave { .. }
            | WaveError::NotNewer { .. }
            | WaveError::NotActive { .. }
            | WaveError::CancelComplete(..)
            | WaveError::TooManyRollouts(_) => (StatusCode::CONFLICT, "conflict"),
            WaveError::Store(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        AppError::new(status, kind, e)
    }
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct WaveQuery {
    pub status: Option<String>,
    pub tag: Option<String>,
}

#[utoipa::path(get, path = "/api/v1/waves", tag = "waves", params(WaveQuery),
    responses((status = 200, description = "waves in creation order", body = Vec<Wave>), (status = 422, body = ErrorBody)))]
async fn list_waves(State(s): State<AppState>, Query(q): Query<WaveQuery>) -> Result<Json<Vec<Wave>>, AppError> {
    let state = match q.status.as_deref() {
        None => None,
        Some("active") => Some(WaveState::Active),
        Some("complete") => Some(WaveState::Complete),
        Some("canceled") => Some(WaveState::Canceled),
        Some(other) => {
            return Err(AppError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid",
                format!("unknown wave status {other:?}: active, complete or canceled"),
            ))
        }
    };
    Ok(Json(s.waves.list(state, q.tag.as_deref())))
}

#[utoipa::path(post, path = "/api/v1/waves", tag = "waves", request_body = InitRequest,
    responses((status = 201, description = "initialized", body = Wave), (status = 200, description = "dry run", body = Wave),
        (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn init_wave(
    _auth: Authorized,
    State(s): State<AppState>,
    Json(req): Json<InitRequest>,
) -> Result<(StatusCode, Json<Wave>), AppError> {
    let dry = req.dry_run;
    let waves = s.waves.clone();
    let w = blocking(move || waves.init(req, now_secs())).await?;
    Ok((if dry { StatusCode::OK } else { StatusCode::CREATED }, Json(w)))
}

#[utoipa::path(get, path = "/api/v1/waves/{name}", tag = "waves", params(("name" = String, Path)),
    responses((status = 200, body = Wave), (status = 404, body = ErrorBody)))]
async fn show_wave(State(s): State<AppState>, Path(name): Path<String>) -> Result<Json<Wave>, AppError> {
    s.waves.get(&name).map(Json).ok_or_else(|| WaveError::NotFound(name).into())
}

#[utoipa::path(post, path = "/api/v1/waves/{name}/rollout", tag = "waves", params(("name" = String, Path)),
    request_body = RolloutRequest,
    responses((status = 200, body = RolloutReport), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn rollout_wave(
    _auth: Authorized,
    State(s): State<AppState>,
    Path(name): Path<String>,
    Json(req): Json<RolloutRequest>,
) -> Result<Json<RolloutReport>, AppError> {
    let waves = s.waves.clone();
    Ok(Json(blocking(move || waves.rollout(&name, req, now_secs())).await?))
}

#[derive(Serialize, Deserialize, utoipa::ToSchema)]
pub struct WaveChange {
    pub wave: Wave,
    /// Devices staged by a complete, operations withdrawn by a cancel.
    pub operations: usize,
}

#[utoipa::path(post, path = "/api/v1/waves/{name}/complete", tag = "waves", params(("name" = String, Path)),
    responses((status = 200, description = "devices staged", body = WaveChange), (status = 409, body = ErrorBody)))]
async fn complete_wave(
    _auth: Authorized,
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<WaveChange>, AppError> {
    let waves = s.waves.clone();
    let (wave, operations) = blocking(move || waves.complete(&name, now_secs())).await?;
    Ok(Json(WaveChange { wave, operations }))
}

#[utoipa::path(post, path = "/api/v1/waves/{name}/cancel", tag = "waves", params(("name" = String, Path)),
    responses((status = 200, description = "operations withdrawn", body = WaveChange), (status = 409, body = ErrorBody)))]
async fn cancel_wave(
    _auth: Authorized,
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<WaveChange>, AppError> {
    let waves = s.waves.clone();
    let (wave, operations) = blocking(move || waves.cancel(&name, now_secs())).await?;
    Ok(Json(WaveChange { wave, operations }))
}

#[utoipa::path(get, path = "/api/v1/waves/{name}/status", tag = "waves", params(("name" = String, Path)),
    responses((status = 200, body = WaveStatus), (status = 404, body = ErrorBody)))]
async fn wave_status(State(s): State<AppState>, Path(name): Path<String>) -> Result<Json<WaveStatus>, AppError> {
    let waves = s.waves.clone();
    Ok(Json(blocking(move || waves.status(&name, now_secs())).await?))
}

#[utoipa::path(get, path = "/api/v1/tags/{tag}", tag = "waves", params(("tag" = String, Path)),
    responses((status = 200, description = "the tag's production and CI versions, each with its wave, and its active waves",
        body = Object)))]
async fn show_tag(State(s): State<AppState>, Path(tag): Path<String>) -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "tag": tag,
        "production_versions": s.waves.production_versions(&tag, true),
        "ci_versions": s.waves.production_versions(&tag, false),
        "production": s.waves.version_sources(&tag, true),
        "ci": s.waves.version_sources(&tag, false),
        "active_waves": s.waves.list(Some(crate::planner::waves::WaveState::Active), Some(&tag))
            .iter()
            .map(|w| serde_json::json!({"wave": w.name, "version": w.version, "production": w.production}))
            .collect::<Vec<_>>(),
    }))
}
