//! `/api/v1/rollouts`: create, list, show, status, the operator actions, retry.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{blocking, now_secs, AppError, AppState, Authorized, ErrorBody};
use crate::planner::rollouts::{Action, CreateRequest, Rollout, RolloutError, RolloutStatus};

impl From<RolloutError> for AppError {
    fn from(e: RolloutError) -> Self {
        let (status, kind) = match e {
            RolloutError::Planner(p) => return p.into(),
            RolloutError::Fleet(f) => return f.into(),
            RolloutError::BadFilter(_) => (StatusCode::UNPROCESSABLE_ENTITY, "bad_filter"),
            RolloutError::InvalidName(_) | RolloutError::Invalid(_) | RolloutError::NoDevices => {
                (StatusCode::UNPROCESSABLE_ENTITY, "invalid")
            }
            RolloutError::NotFound(_) | RolloutError::NoImage(_) => (StatusCode::NOT_FOUND, "not_found"),
            RolloutError::NotAdmissible { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "not_admissible"),
            RolloutError::Illegal(_) => (StatusCode::CONFLICT, "illegal_transition"),
            RolloutError::Exists(_) | RolloutError::NotRetryable { .. } | RolloutError::NothingToRetry(_) => {
                (StatusCode::CONFLICT, "conflict")
            }
            RolloutError::Store(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        AppError::new(status, kind, e)
    }
}

pub(super) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list, create))
        .routes(routes!(show, delete))
        .routes(routes!(status))
        .routes(routes!(retry))
        .routes(routes!(act))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Deleted rollouts too.
    #[serde(default)]
    pub deleted: bool,
}

#[utoipa::path(get, path = "/api/v1/rollouts", tag = "rollouts", params(ListQuery),
    responses((status = 200, description = "in creation order", body = Vec<Rollout>)))]
async fn list(State(s): State<AppState>, Query(q): Query<ListQuery>) -> Json<Vec<Rollout>> {
    Json(s.rollouts.list(q.deleted))
}

#[utoipa::path(post, path = "/api/v1/rollouts", tag = "rollouts", request_body = CreateRequest,
    responses((status = 201, description = "ready, or waiting for approval", body = Rollout),
        (status = 409, body = ErrorBody), (status = 422, description = "invalid, bad_filter or not_admissible", body = ErrorBody)))]
async fn create(
    _auth: Authorized,
    State(s): State<AppState>,
    Json(req): Json<CreateRequest>,
) -> Result<(StatusCode, Json<Rollout>), AppError> {
    let rollouts = s.rollouts.clone();
    Ok((StatusCode::CREATED, Json(blocking(move || rollouts.create(req, now_secs())).await?)))
}

#[utoipa::path(get, path = "/api/v1/rollouts/{name}", tag = "rollouts", params(("name" = String, Path)),
    responses((status = 200, body = Rollout), (status = 404, body = ErrorBody)))]
async fn show(State(s): State<AppState>, Path(name): Path<String>) -> Result<Json<Rollout>, AppError> {
    s.rollouts.get(&name).map(Json).ok_or_else(|| RolloutError::NotFound(name).into())
}

#[utoipa::path(get, path = "/api/v1/rollouts/{name}/status", tag = "rollouts", params(("name" = String, Path)),
    responses((status = 200, description = "a row per group", body = RolloutStatus), (status = 404, body = ErrorBody)))]
async fn status(State(s): State<AppState>, Path(name): Path<String>) -> Result<Json<RolloutStatus>, AppError> {
    let rollouts = s.rollouts.clone();
    Ok(Json(blocking(move || rollouts.status(&name)).await?))
}

/// An approval's or a denial's remark.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ActBody {
    #[serde(default)]
    pub remark: Option<String>,
}

/// Longest remark kept.
const MAX_REMARK: usize = 1024;

#[utoipa::path(post, path = "/api/v1/rollouts/{name}/{action}", tag = "rollouts",
    params(("name" = String, Path),
        ("action" = String, Path, description = "approve, deny, start, pause, resume, stop or trigger-next-group")),
    request_body(content = Option<ActBody>, description = "a remark, for approve and deny"),
    responses((status = 200, body = Rollout), (status = 404, body = ErrorBody),
        (status = 409, description = "illegal_transition: the action names the state that refuses it", body = ErrorBody)))]
async fn act(
    _auth: Authorized,
    State(s): State<AppState>,
    Path((name, action)): Path<(String, String)>,
    body: Option<Json<ActBody>>,
) -> Result<Json<Rollout>, AppError> {
    let action = match action.as_str() {
        "approve" => Action::Approve,
        "deny" => Action::Deny,
        "start" => Action::Start,
        "pause" => Action::Pause,
        "resume" => Action::Resume,
        "stop" => Action::Stop,
        "trigger-next-group" => Action::TriggerNextGroup,
        other => {
            return Err(AppError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!(
                    "no rollout action {other:?}: approve, deny, start, pause, resume, stop, trigger-next-group, retry"
                ),
            ))
        }
    };
    let remark = body.and_then(|Json(b)| b.remark);
    if remark.as_ref().is_some_and(|r| r.len() > MAX_REMARK) {
        return Err(AppError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
            format!("remark: at most {MAX_REMARK} bytes"),
        ));
    }
    let rollouts = s.rollouts.clone();
    Ok(Json(blocking(move || rollouts.act(&name, action, remark, now_secs())).await?))
}

#[utoipa::path(delete, path = "/api/v1/rollouts/{name}", tag = "rollouts", params(("name" = String, Path)),
    responses((status = 200, body = Rollout), (status = 404, body = ErrorBody)))]
async fn delete(
    _auth: Authorized,
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Rollout>, AppError> {
    let rollouts = s.rollouts.clone();
    Ok(Json(blocking(move || rollouts.act(&name, Action::Delete, None, now_secs())).await?))
}

#[utoipa::path(post, path = "/api/v1/rollouts/{name}/retry", tag = "rollouts", params(("name" = String, Path)),
    responses((status = 201, description = "a rollout of the devices that failed", body = Rollout),
        (status = 409, body = ErrorBody)))]
async fn retry(
    _auth: Authorized,
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<(StatusCode, Json<Rollout>), AppError> {
    let rollouts = s.rollouts.clone();
    Ok((StatusCode::CREATED, Json(blocking(move || rollouts.retry(&name, now_secs())).await?)))
}
