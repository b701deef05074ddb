//! `/api/v1/actions`: FAS-style firmware actions, in FAS's shape.

use std::collections::BTreeMap;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Serialize;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{blocking, now_secs, AppError, AppState, Authorized, ErrorBody};
use crate::planner::actions::{Action, ActionError, ActionRequest, OperationState, PlannedOperation};

impl From<ActionError> for AppError {
    fn from(e: ActionError) -> Self {
        let (status, kind) = match e {
            ActionError::Planner(p) => return p.into(),
            ActionError::Plan(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid"),
            ActionError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ActionError::NotAbortable { .. }
            | ActionError::NotDeletable { .. }
            | ActionError::SnapshotExists(_)
            | ActionError::Expired(_) => (StatusCode::CONFLICT, "conflict"),
            ActionError::Invalid(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid"),
            ActionError::NoSnapshot(_) | ActionError::NoOperation(_) => (StatusCode::NOT_FOUND, "not_found"),
            ActionError::Store(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        AppError::new(status, kind, e)
    }
}

pub(super) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list, create))
        .routes(routes!(show, delete))
        .routes(routes!(status))
        .routes(routes!(operations))
        .routes(routes!(abort))
        .routes(routes!(operation))
}

/// An action with its operations as they stand now and how many are in each state.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ActionView {
    #[serde(flatten)]
    pub action: Action,
    pub operation_counts: BTreeMap<&'static str, usize>,
}

fn counts(ops: &[PlannedOperation]) -> BTreeMap<&'static str, usize> {
    let mut c: BTreeMap<&'static str, usize> = OperationState::ALL.iter().map(|s| (s.as_str(), 0)).collect();
    for o in ops {
        *c.entry(o.state.as_str()).or_default() += 1;
    }
    c.insert("total", ops.len());
    c
}

pub(super) fn view(s: &AppState, id: &str) -> Result<ActionView, AppError> {
    let mut action = s.actions.get(id).ok_or_else(|| ActionError::NotFound(id.into()))?;
    action.operations = s.actions.operations(id)?;
    Ok(ActionView { operation_counts: counts(&action.operations), action })
}

#[utoipa::path(get, path = "/api/v1/actions", tag = "actions",
    responses((status = 200, description = "in creation order, without their operations", body = Vec<Action>)))]
async fn list(State(s): State<AppState>) -> Json<Vec<Action>> {
    Json(s.actions.list().into_iter().map(|a| Action { operations: Vec::new(), ..a }).collect())
}

#[utoipa::path(post, path = "/api/v1/actions", tag = "actions", request_body = ActionRequest,
    responses((status = 201, description = "planned: a dry run (completed) unless command.overrideDryrun, else running or blocked behind the running action", body = ActionView),
        (status = 422, body = ErrorBody)))]
async fn create(
    _auth: Authorized,
    State(s): State<AppState>,
    Json(req): Json<ActionRequest>,
) -> Result<(StatusCode, Json<ActionView>), AppError> {
    let actions = s.actions.clone();
    let a = blocking(move || actions.create(req, now_secs())).await?;
    Ok((StatusCode::CREATED, Json(view(&s, &a.action_id)?)))
}

#[utoipa::path(get, path = "/api/v1/actions/{id}", tag = "actions", params(("id" = String, Path)),
    responses((status = 200, body = ActionView), (status = 404, body = ErrorBody)))]
async fn show(State(s): State<AppState>, Path(id): Path<String>) -> Result<Json<ActionView>, AppError> {
    Ok(Json(view(&s, &id)?))
}

#[utoipa::path(delete, path = "/api/v1/actions/{id}", tag = "actions", params(("id" = String, Path)),
    responses((status = 200, description = "deleted (a completed or aborted action; its operations stay in the devices' histories)", body = Action),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn delete(
    _auth: Authorized,
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Action>, AppError> {
    let actions = s.actions.clone();
    Ok(Json(blocking(move || actions.delete(&id)).await?))
}

#[utoipa::path(get, path = "/api/v1/actions/{id}/status", tag = "actions", params(("id" = String, Path)),
    responses((status = 200, description = "the action's state and how many operations are in each state", body = Object),
        (status = 404, body = ErrorBody)))]
async fn status(State(s): State<AppState>, Path(id): Path<String>) -> Result<Json<serde_json::Value>, AppError> {
    let v = view(&s, &id)?;
    Ok(Json(serde_json::json!({
        "actionID": v.action.action_id, "state": v.action.state, "dryrun": v.action.dryrun,
        "operationCounts": v.operation_counts,
    })))
}

#[utoipa::path(get, path = "/api/v1/actions/{id}/operations", tag = "actions", params(("id" = String, Path)),
    responses((status = 200, body = Vec<PlannedOperation>), (status = 404, body = ErrorBody)))]
async fn operations(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Vec<PlannedOperation>>, AppError> {
    Ok(Json(s.actions.operations(&id)?))
}

#[utoipa::path(delete, path = "/api/v1/actions/{id}/instance", tag = "actions", params(("id" = String, Path)),
    responses((status = 200, description = "aborted (FAS's abort)", body = Action), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
async fn abort(_auth: Authorized, State(s): State<AppState>, Path(id): Path<String>) -> Result<Json<Action>, AppError> {
    let actions = s.actions.clone();
    Ok(Json(blocking(move || actions.abort(&id, now_secs())).await?))
}

#[utoipa::path(get, path = "/api/v1/operations/{id}", tag = "actions", params(("id" = String, Path, description = "ACTIONID-N")),
    responses((status = 200, body = PlannedOperation), (status = 404, body = ErrorBody)))]
async fn operation(State(s): State<AppState>, Path(id): Path<String>) -> Result<Json<PlannedOperation>, AppError> {
    Ok(Json(s.actions.operation(&id)?))
}
