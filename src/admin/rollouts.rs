//! `/api/v1/rollouts`: create, list, show, status, the operator actions, retry.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;

use super::{blocking, now_secs, AppError, AppState, Authorized};
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

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/rollouts", get(list).post(create))
        .route("/api/v1/rollouts/{name}", get(show).delete(delete))
        .route("/api/v1/rollouts/{name}/status", get(status))
        .route("/api/v1/rollouts/{name}/retry", post(retry))
        .route("/api/v1/rollouts/{name}/{action}", post(act))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Deleted rollouts too.
    #[serde(default)]
    pub deleted: bool,
}

async fn list(State(s): State<AppState>, Query(q): Query<ListQuery>) -> Json<Vec<Rollout>> {
    Json(s.rollouts.list(q.deleted))
}

async fn create(
    _auth: Authorized,
    State(s): State<AppState>,
    Json(req): Json<CreateRequest>,
) -> Result<(StatusCode, Json<Rollout>), AppError> {
    let rollouts = s.rollouts.clone();
    Ok((StatusCode::CREATED, Json(blocking(move || rollouts.create(req, now_secs())).await?)))
}

async fn show(State(s): State<AppState>, Path(name): Path<String>) -> Result<Json<Rollout>, AppError> {
    s.rollouts.get(&name).map(Json).ok_or_else(|| RolloutError::NotFound(name).into())
}

async fn status(State(s): State<AppState>, Path(name): Path<String>) -> Result<Json<RolloutStatus>, AppError> {
    let rollouts = s.rollouts.clone();
    Ok(Json(blocking(move || rollouts.status(&name)).await?))
}

/// An approval's or a denial's remark.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActBody {
    #[serde(default)]
    pub remark: Option<String>,
}

/// Longest remark kept.
const MAX_REMARK: usize = 1024;

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

async fn delete(
    _auth: Authorized,
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Rollout>, AppError> {
    let rollouts = s.rollouts.clone();
    Ok(Json(blocking(move || rollouts.act(&name, Action::Delete, None, now_secs())).await?))
}

async fn retry(
    _auth: Authorized,
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<(StatusCode, Json<Rollout>), AppError> {
    let rollouts = s.rollouts.clone();
    Ok((StatusCode::CREATED, Json(blocking(move || rollouts.retry(&name, now_secs())).await?)))
}
