//! The admin HTTP API (JSON over axum): images, devices, assignment, waves, rollouts, `/metrics`,
//! `/livez`, `/readyz`. Every `/api/v1` route needs a bearer token — the admin token, or for
//! reads the optional read-only one — and a Host header naming this gateway (a page in an
//! operator's browser cannot reach it through DNS rebinding); probes and metrics stay open.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use crate::firmware::{Expected, Firmware, FirmwareError, ImageMeta};
use crate::fleet::{Device, DeviceSpec, Fleet, FleetError, Upserted, MAIN_COMPONENT};
use crate::planner::waves::{
    InitRequest, RolloutReport, RolloutRequest, Wave, WaveError, WaveState, WaveStatus, Waves,
};
use crate::planner::{Operation, Planner, PlannerError};
use crate::telemetry::Telemetry;

mod guard;
mod rollouts;
use guard::guard;
pub use guard::Authorized;

#[derive(Clone)]
pub struct AppState {
    pub fleet: Arc<Fleet>,
    pub firmware: Arc<Firmware>,
    pub planner: Arc<Planner>,
    pub waves: Arc<Waves>,
    pub rollouts: Arc<crate::planner::rollouts::Rollouts>,
    pub telemetry: Arc<Telemetry>,
    pub token: Arc<str>,
    /// May read `/api/v1`, not change it.
    pub read_token: Option<Arc<str>>,
    /// Host header names accepted (lower-case, no port).
    pub allowed_hosts: Arc<[String]>,
    pub list_limit: usize,
    pub max_image_bytes: usize,
    pub max_request_bytes: usize,
    /// Set once every listener is up.
    pub ready: Arc<AtomicBool>,
    /// The MQTT device secret, when device authentication is on.
    pub device_secret: Option<Arc<str>>,
}

/// An operator error, as JSON `{"error": "...", "kind": "..."}` with a fitting status.
#[derive(Debug)]
pub struct AppError {
    status: StatusCode,
    kind: &'static str,
    message: String,
}

impl AppError {
    fn new(status: StatusCode, kind: &'static str, message: impl ToString) -> AppError {
        AppError { status, kind, message: message.to_string() }
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        (self.status, Json(serde_json::json!({"error": self.message, "kind": self.kind}))).into_response()
    }
}

impl From<FirmwareError> for AppError {
    fn from(e: FirmwareError) -> Self {
        let (status, kind) = match &e {
            FirmwareError::Conflict { .. } => (StatusCode::CONFLICT, "conflict"),
            FirmwareError::Empty | FirmwareError::Invalid { .. } => (StatusCode::BAD_REQUEST, "invalid"),
            FirmwareError::TooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
            FirmwareError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            FirmwareError::NotExpected { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "not_a_target"),
            FirmwareError::Damaged(_) | FirmwareError::Store(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        AppError::new(status, kind, e)
    }
}

impl From<FleetError> for AppError {
    fn from(e: FleetError) -> Self {
        let (status, kind) = match &e {
            FleetError::InvalidId(_) | FleetError::Invalid { .. } | FleetError::Duplicate(_) => {
                (StatusCode::BAD_REQUEST, "invalid")
            }
            FleetError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            FleetError::Full(_) | FleetError::Index(_) => (StatusCode::INSUFFICIENT_STORAGE, "full"),
            FleetError::Store(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        AppError::new(status, kind, e)
    }
}

impl From<PlannerError> for AppError {
    fn from(e: PlannerError) -> Self {
        match e {
            PlannerError::Fleet(e) => e.into(),
            PlannerError::Firmware(e) => e.into(),
            PlannerError::UnknownDevice(_) | PlannerError::UnknownImage(_) => {
                AppError::new(StatusCode::NOT_FOUND, "not_found", e)
            }
            PlannerError::BadImageRef(_) | PlannerError::Hardware { .. } => {
                AppError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", e)
            }
            PlannerError::InFlight { .. } => AppError::new(StatusCode::CONFLICT, "in_flight", e),
            PlannerError::NotAdmissible(_) => AppError::new(StatusCode::UNPROCESSABLE_ENTITY, "not_admissible", e),
            PlannerError::Store(_) => AppError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e),
        }
    }
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

pub fn app(state: AppState) -> Router {
    let image_limit = state.max_image_bytes + 1;
    let request_limit = state.max_request_bytes;
    Router::new()
        .route("/api/v1/images", get(list_images).post(add_image).layer(DefaultBodyLimit::max(image_limit)))
        .route("/api/v1/images/{name}/{version}", get(show_image))
        .route("/api/v1/devices", get(list_devices).post(add_devices))
        .route("/api/v1/devices/{id}", get(show_device).delete(delete_device))
        .route("/api/v1/devices/{id}/assignment", put(assign))
        .route("/api/v1/devices/{id}/token", post(device_token))
        .route("/api/v1/waves", get(list_waves).post(init_wave))
        .route("/api/v1/waves/{name}", get(show_wave))
        .route("/api/v1/waves/{name}/rollout", post(rollout_wave))
        .route("/api/v1/waves/{name}/complete", post(complete_wave))
        .route("/api/v1/waves/{name}/cancel", post(cancel_wave))
        .route("/api/v1/waves/{name}/status", get(wave_status))
        .route("/api/v1/tags/{tag}", get(show_tag))
        .route("/api/v1/tuf", get(tuf_status))
        .route("/api/v1/tuf/{repo}/refresh", post(tuf_refresh))
        .merge(rollouts::routes())
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), guard))
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(request_limit))
        .with_state(state)
}

async fn readyz(State(s): State<AppState>) -> impl IntoResponse {
    if s.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting\n")
    }
}

async fn metrics(State(s): State<AppState>) -> impl IntoResponse {
    for (state, n) in s.planner.counts() {
        s.telemetry.set_operations(state.as_str(), n as i64);
    }
    s.telemetry.set_hot_bytes(s.firmware.hot_bytes() as i64);
    let (waiting, holds) = s.planner.trust_holds();
    s.telemetry.set_trust(waiting, holds, s.waves.staging_retries());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], s.telemetry.render())
}

async fn list_images(State(s): State<AppState>) -> Json<Vec<ImageMeta>> {
    Json(s.firmware.list().iter().map(|m| (**m).clone()).collect())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddImage {
    pub name: String,
    pub version: String,
    /// The TUF target these bytes claim to be (`repo` says of which repository, default
    /// production): the upload is refused unless length and sha256 match it.
    #[serde(default)]
    pub target: Option<String>,
    #[serde(default)]
    pub repo: Option<String>,
    /// Comma-separated device types; empty or absent means any.
    #[serde(default)]
    pub hardware: Option<String>,
}

#[derive(Serialize, Deserialize)]
pub struct Added<T> {
    pub created: bool,
    #[serde(flatten)]
    pub item: T,
}

fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

async fn add_image(
    _auth: Authorized,
    State(s): State<AppState>,
    Query(q): Query<AddImage>,
    body: Bytes,
) -> Result<(StatusCode, Json<Added<ImageMeta>>), AppError> {
    let hardware: Vec<String> = q
        .hardware
        .as_deref()
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .map(String::from)
        .collect();
    let expected = match &q.target {
        None => None,
        Some(target) => {
            let repo = q.repo.as_deref().unwrap_or(crate::tuf::PRODUCTION);
            let t = s
                .planner
                .trust()
                .named_target(repo, target)
                .map_err(|e| AppError::new(StatusCode::UNPROCESSABLE_ENTITY, "not_a_target", e))?;
            if let Some(signed) = t.version.as_deref().filter(|v| *v != q.version) {
                let why = format!(
                    "version label {} differs from {signed}, the signed custom.version of {repo} target {target}",
                    q.version
                );
                return Err(AppError::new(StatusCode::UNPROCESSABLE_ENTITY, "label_mismatch", why));
            }
            Some(Expected { what: format!("{repo} target {target}"), length: t.length, sha256: t.sha256 })
        }
    };
    let fw = s.firmware.clone();
    // Hashing and writing tens of MiB is blocking work.
    let (meta, created) =
        blocking(move || fw.add_expecting(&q.name, &q.version, hardware, body, expected.as_ref(), now_secs())).await?;
    let status = if created { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(Added { created, item: (*meta).clone() })))
}

async fn show_image(
    State(s): State<AppState>,
    Path((name, version)): Path<(String, String)>,
) -> Result<Json<ImageMeta>, AppError> {
    s.firmware
        .get(&name, &version)
        .map(|m| Json((*m).clone()))
        .ok_or_else(|| FirmwareError::NotFound(format!("{name}@{version}")).into())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    pub after: Option<String>,
    pub limit: Option<usize>,
    /// An RSQL device filter (`fleet::filter`).
    pub filter: Option<String>,
}

async fn list_devices(State(s): State<AppState>, Query(q): Query<ListQuery>) -> Result<Json<Vec<Device>>, AppError> {
    let limit = q.limit.unwrap_or(s.list_limit).clamp(1, s.list_limit);
    let Some(text) = q.filter else { return Ok(Json(s.fleet.list(q.after.as_deref(), limit))) };
    let filter = crate::fleet::filter::Filter::parse(&text)
        .map_err(|e| AppError::new(StatusCode::UNPROCESSABLE_ENTITY, "bad_filter", e))?;
    let fleet = s.fleet.clone();
    let after = q.after;
    let found =
        blocking(move || Ok::<_, AppError>(fleet.list_where(after.as_deref(), limit, |d| filter.matches(d)))).await?;
    Ok(Json(found))
}

/// One device or a list of them.
#[derive(Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(DeviceSpec),
    Many(Vec<DeviceSpec>),
}

async fn add_devices(
    _auth: Authorized,
    State(s): State<AppState>,
    Json(body): Json<OneOrMany>,
) -> Result<Json<Upserted>, AppError> {
    let specs = match body {
        OneOrMany::One(d) => vec![d],
        OneOrMany::Many(v) => v,
    };
    let (fleet, waves, rollouts) = (s.fleet.clone(), s.waves.clone(), s.rollouts.clone());
    let out = blocking(move || {
        let ids: Vec<String> = specs.iter().map(|d| d.id.clone()).collect();
        let out = fleet.upsert(specs, now_secs())?;
        // Devices joining a tag with a complete wave get its version, and ones matching a
        // dynamic rollout's filter join it.
        waves.devices_changed(&ids, now_secs())?;
        rollouts.devices_changed(&ids, now_secs())?;
        Ok::<_, AppError>(out)
    })
    .await?;
    Ok(Json(out))
}

async fn delete_device(
    _auth: Authorized,
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, AppError> {
    let waves = s.waves.clone();
    let gone = id.clone();
    match blocking(move || waves.delete_device(&gone)).await? {
        Some(n) => Ok(Json(serde_json::json!({"deleted": id, "unfinished_operations": n}))),
        None => Err(FleetError::NotFound(id).into()),
    }
}

/// A device with its operations, as `devices show` prints it.
#[derive(Serialize, Deserialize)]
pub struct DeviceView {
    #[serde(flatten)]
    pub device: Device,
    pub operations: Vec<OperationView>,
}

#[derive(Serialize, Deserialize)]
pub struct OperationView {
    #[serde(flatten)]
    pub op: Operation,
    pub progress_percent: f64,
    /// Why the operation waits instead of proceeding: "waiting for trust: …".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<String>,
}

impl From<Operation> for OperationView {
    fn from(op: Operation) -> Self {
        OperationView { progress_percent: op.progress_percent(), op, waiting: None }
    }
}

async fn show_device(State(s): State<AppState>, Path(id): Path<String>) -> Result<Json<DeviceView>, AppError> {
    let device = s.fleet.get(&id).ok_or_else(|| FleetError::NotFound(id.clone()))?;
    let now = now_secs();
    let operations = s
        .planner
        .operations_of(&id)
        .into_iter()
        .map(|op| OperationView { waiting: s.planner.waits_for_trust(&op, now), ..OperationView::from(op) })
        .collect();
    Ok(Json(DeviceView { device, operations }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AssignBody {
    /// NAME@VERSION.
    pub image: String,
    #[serde(default)]
    pub component: Option<String>,
}

async fn assign(
    _auth: Authorized,
    State(s): State<AppState>,
    Path(id): Path<String>,
    Json(b): Json<AssignBody>,
) -> Result<Json<OperationView>, AppError> {
    let component = b.component.unwrap_or_else(|| MAIN_COMPONENT.to_owned());
    if component.is_empty() || component.len() > crate::protocol::MAX_TEXT_LEN {
        return Err(AppError::new(StatusCode::BAD_REQUEST, "invalid", "component must be 1 to 128 characters"));
    }
    let planner = s.planner.clone();
    let op = blocking(move || planner.assign(&id, &component, &b.image, now_secs())).await?;
    Ok(Json(op.into()))
}

async fn device_token(
    _auth: Authorized,
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, AppError> {
    let secret = s.device_secret.as_deref().ok_or_else(|| {
        AppError::new(StatusCode::CONFLICT, "auth_off", "device authentication is off (mqtt.auth = false)")
    })?;
    if !s.fleet.contains(&id) {
        return Err(FleetError::NotFound(id).into());
    }
    Ok(Json(serde_json::json!({"device": id, "token": crate::fleet::device_token(secret, &id)})))
}

/// Runs blocking work (store writes, scans over the fleet) off the async workers.
async fn blocking<T: Send + 'static, E: Into<AppError> + Send + 'static>(
    f: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, AppError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| AppError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e))?
        .map_err(Into::into)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WaveQuery {
    pub status: Option<String>,
    pub tag: Option<String>,
}

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

async fn show_wave(State(s): State<AppState>, Path(name): Path<String>) -> Result<Json<Wave>, AppError> {
    s.waves.get(&name).map(Json).ok_or_else(|| WaveError::NotFound(name).into())
}

async fn rollout_wave(
    _auth: Authorized,
    State(s): State<AppState>,
    Path(name): Path<String>,
    Json(req): Json<RolloutRequest>,
) -> Result<Json<RolloutReport>, AppError> {
    let waves = s.waves.clone();
    Ok(Json(blocking(move || waves.rollout(&name, req, now_secs())).await?))
}

#[derive(Serialize, Deserialize)]
pub struct WaveChange {
    pub wave: Wave,
    /// Devices staged by a complete, operations withdrawn by a cancel.
    pub operations: usize,
}

async fn complete_wave(
    _auth: Authorized,
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<WaveChange>, AppError> {
    let waves = s.waves.clone();
    let (wave, operations) = blocking(move || waves.complete(&name, now_secs())).await?;
    Ok(Json(WaveChange { wave, operations }))
}

async fn cancel_wave(
    _auth: Authorized,
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<WaveChange>, AppError> {
    let waves = s.waves.clone();
    let (wave, operations) = blocking(move || waves.cancel(&name, now_secs())).await?;
    Ok(Json(WaveChange { wave, operations }))
}

async fn wave_status(State(s): State<AppState>, Path(name): Path<String>) -> Result<Json<WaveStatus>, AppError> {
    let waves = s.waves.clone();
    Ok(Json(blocking(move || waves.status(&name, now_secs())).await?))
}

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

async fn tuf_status(State(s): State<AppState>) -> Json<serde_json::Value> {
    let trust = s.planner.trust();
    let repos: Vec<serde_json::Value> = trust
        .configured()
        .into_iter()
        .map(|r| serde_json::json!({"repo": r, "verified": trust.verified(r).map(|v| (*v).clone())}))
        .collect();
    Json(serde_json::json!({"repositories": repos}))
}

async fn tuf_refresh(
    _auth: Authorized,
    State(s): State<AppState>,
    Path(repo): Path<String>,
) -> Result<Json<crate::tuf::Verified>, AppError> {
    match s.planner.trust().refresh(&repo).await {
        Ok(v) => {
            // As after the periodic refresh: what waited for trust is staged now.
            let waves = s.waves.clone();
            let staged = blocking(move || waves.after_refresh(now_secs())).await?;
            if staged > 0 {
                tracing::info!(devices = staged, "staged after the TUF refresh");
            }
            Ok(Json((*v).clone()))
        }
        Err(e @ crate::tuf::TufError::NotConfigured(_)) => Err(AppError::new(StatusCode::NOT_FOUND, "not_found", e)),
        Err(e) => Err(AppError::new(StatusCode::UNPROCESSABLE_ENTITY, "does_not_verify", e)),
    }
}
