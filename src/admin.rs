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
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::firmware::{Expected, Firmware, FirmwareError, ImageMeta};
use crate::fleet::{Device, DeviceSpec, Fleet, FleetError, Upserted, MAIN_COMPONENT};
use crate::planner::waves::Waves;
use crate::planner::{Operation, Planner, PlannerError};
use crate::telemetry::Telemetry;

mod actions;
mod cluster;
mod guard;
mod rollouts;
mod snapshots;
mod waves;
use guard::guard;
pub use guard::Authorized;

#[derive(Clone)]
pub struct AppState {
    pub fleet: Arc<Fleet>,
    pub firmware: Arc<Firmware>,
    pub planner: Arc<Planner>,
    pub waves: Arc<Waves>,
    pub rollouts: Arc<crate::planner::rollouts::Rollouts>,
    pub actions: Arc<crate::planner::actions::Actions>,
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
    /// A planner's data-plane nodes (`cluster.role = "planner"`).
    pub nodes: Option<Arc<crate::cluster::feed::Nodes>>,
}

/// An error as the API answers it (the OpenAPI document's name for [`AppError`]'s body).
#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// What went wrong, for a person.
    pub error: String,
    /// What kind of error, for a program: invalid, not_found, conflict, unauthorized, …
    pub kind: String,
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
            FirmwareError::BadIdentity(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid"),
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

impl From<crate::planner::RegisterError> for AppError {
    fn from(e: crate::planner::RegisterError) -> Self {
        use crate::planner::RegisterError as R;
        match e {
            R::Fleet(e) => e.into(),
            R::Waves(e) => e.into(),
            R::Rollouts(e) => e.into(),
        }
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

#[derive(OpenApi)]
#[openapi(
    info(title = "fwgate admin API", description = "Images, devices, waves, rollouts, TUF. Every /api/v1 route \
        needs Authorization: Bearer <token> (GET also the read-only token)."),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
    tags((name = "images"), (name = "devices"), (name = "waves"), (name = "rollouts"), (name = "actions"), (name = "tuf"),
        (name = "cluster", description = "a planner's data-plane nodes"), (name = "openapi"), (name = "probes", description = "open: no token"))
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, api: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let scheme = SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build());
        api.components.get_or_insert_with(Default::default).add_security_scheme("bearer", scheme);
    }
}

/// The router and the OpenAPI document of every route in it, made from the same handlers.
pub fn router_and_doc(state: AppState) -> (Router, utoipa::openapi::OpenApi) {
    let image_limit = state.max_image_bytes + 1;
    let request_limit = state.max_request_bytes;
    let images = OpenApiRouter::new().routes(routes!(list_images, add_image)).layer(DefaultBodyLimit::max(image_limit));
    let (api, mut doc) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(images)
        .routes(routes!(show_image))
        .routes(routes!(set_identity))
        .routes(routes!(list_devices, add_devices))
        .routes(routes!(show_device, delete_device))
        .routes(routes!(assign))
        .routes(routes!(device_token))
        .merge(waves::routes())
        .merge(rollouts::routes())
        .merge(actions::routes())
        .merge(snapshots::routes())
        .merge(cluster::routes())
        .routes(routes!(tuf_status))
        .routes(routes!(tuf_refresh))
        .routes(routes!(openapi_json))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), guard))
        .split_for_parts();
    let (probes, probes_doc) =
        OpenApiRouter::new().routes(routes!(livez)).routes(routes!(readyz)).routes(routes!(metrics)).split_for_parts();
    doc.merge(probes_doc);
    // The probes need no token: an empty requirement overrides the document's.
    for (path, item) in doc.paths.paths.iter_mut() {
        if !path.starts_with("/api/") {
            if let Some(op) = item.get.as_mut() {
                op.security = Some(vec![utoipa::openapi::security::SecurityRequirement::default()]);
            }
        }
    }
    let router = api.merge(probes).layer(DefaultBodyLimit::max(request_limit)).with_state(state.clone());
    (router.layer(axum::Extension(OpenApiJson(Arc::from(doc.to_json().unwrap_or_default())))), doc)
}

pub fn app(state: AppState) -> Router {
    router_and_doc(state).0
}

/// The document, as `GET /api/v1/openapi.json` serves it.
#[derive(Clone)]
struct OpenApiJson(Arc<str>);

#[utoipa::path(get, path = "/api/v1/openapi.json", tag = "openapi",
    responses((status = 200, description = "this document (OpenAPI 3.1)", body = Object)))]
async fn openapi_json(axum::Extension(doc): axum::Extension<OpenApiJson>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], doc.0.to_string())
}

#[utoipa::path(get, path = "/livez", tag = "probes", responses((status = 200, description = "alive", body = String)))]
async fn livez() -> &'static str {
    "ok\n"
}

#[utoipa::path(get, path = "/readyz", tag = "probes",
    responses((status = 200, description = "every listener is up", body = String), (status = 503, body = String)))]
async fn readyz(State(s): State<AppState>) -> impl IntoResponse {
    if s.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting\n")
    }
}

#[utoipa::path(get, path = "/metrics", tag = "probes",
    responses((status = 200, description = "Prometheus text format", body = String, content_type = "text/plain")))]
async fn metrics(State(s): State<AppState>) -> impl IntoResponse {
    for (state, n) in s.planner.counts() {
        s.telemetry.set_operations(state.as_str(), n as i64);
    }
    s.telemetry.set_hot_bytes(s.firmware.hot_bytes() as i64);
    let (waiting, holds) = s.planner.trust_holds();
    s.telemetry.set_trust(waiting, holds, s.waves.staging_retries());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], s.telemetry.render())
}

#[utoipa::path(get, path = "/api/v1/images", tag = "images", responses((status = 200, body = Vec<ImageMeta>)))]
async fn list_images(State(s): State<AppState>) -> Json<Vec<ImageMeta>> {
    Json(s.firmware.list().iter().map(|m| (**m).clone()).collect())
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
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

/// An uploaded image's metadata, and whether the upload created it.
#[derive(Serialize, Deserialize, utoipa::ToSchema)]
pub struct AddedImage {
    pub created: bool,
    #[serde(flatten)]
    pub item: ImageMeta,
}

fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[utoipa::path(post, path = "/api/v1/images", tag = "images", params(AddImage),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "the image bytes"),
    responses((status = 201, body = AddedImage), (status = 200, description = "the same bytes exist", body = AddedImage),
        (status = 409, body = ErrorBody), (status = 413, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn add_image(
    _auth: Authorized,
    State(s): State<AppState>,
    Query(q): Query<AddImage>,
    body: Bytes,
) -> Result<(StatusCode, Json<AddedImage>), AppError> {
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
    Ok((status, Json(AddedImage { created, item: (*meta).clone() })))
}

#[utoipa::path(get, path = "/api/v1/images/{name}/{version}", tag = "images",
    params(("name" = String, Path), ("version" = String, Path)),
    responses((status = 200, body = ImageMeta), (status = 404, body = ErrorBody)))]
async fn show_image(
    State(s): State<AppState>,
    Path((name, version)): Path<(String, String)>,
) -> Result<Json<ImageMeta>, AppError> {
    s.firmware
        .get(&name, &version)
        .map(|m| Json((*m).clone()))
        .ok_or_else(|| FirmwareError::NotFound(format!("{name}@{version}")).into())
}

#[utoipa::path(put, path = "/api/v1/images/{name}/{version}/identity", tag = "images",
    params(("name" = String, Path), ("version" = String, Path)),
    request_body(content = crate::firmware::ImageIdentity, description = "a FAS imagefile; fields FAS has and fwgate does not use are ignored"),
    responses((status = 200, body = ImageMeta), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn set_identity(
    _auth: Authorized,
    State(s): State<AppState>,
    Path((name, version)): Path<(String, String)>,
    Json(identity): Json<crate::firmware::ImageIdentity>,
) -> Result<Json<ImageMeta>, AppError> {
    let firmware = s.firmware.clone();
    let meta = blocking(move || firmware.set_identity(&name, &version, identity)).await?;
    Ok(Json((*meta).clone()))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    pub after: Option<String>,
    pub limit: Option<usize>,
    /// An RSQL device filter (`fleet::filter`).
    pub filter: Option<String>,
}

#[utoipa::path(get, path = "/api/v1/devices", tag = "devices", params(ListQuery),
    responses((status = 200, description = "in id order", body = Vec<Device>), (status = 422, body = ErrorBody)))]
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
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum OneOrMany {
    One(DeviceSpec),
    Many(Vec<DeviceSpec>),
}

#[utoipa::path(post, path = "/api/v1/devices", tag = "devices", request_body = OneOrMany,
    responses((status = 200, body = Upserted), (status = 400, body = ErrorBody)))]
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
    // Devices joining a tag with a complete wave get its version, and ones matching a dynamic
    // rollout's filter join it; a crash before that is finished when the gateway opens.
    let out = blocking(move || {
        crate::planner::register_devices(&fleet, &waves, Some(&rollouts), specs, now_secs()).map_err(AppError::from)
    })
    .await?;
    Ok(Json(out))
}

#[utoipa::path(delete, path = "/api/v1/devices/{id}", tag = "devices", params(("id" = String, Path)),
    responses((status = 200, description = "{deleted, unfinished_operations}", body = Object), (status = 404, body = ErrorBody)))]
async fn delete_device(
    _auth: Authorized,
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, AppError> {
    let gone = id.clone();
    let deleted = blocking(move || {
        crate::planner::delete_device(&s.planner, &s.fleet, &s.waves, Some(&s.rollouts), &gone, now_secs())
    });
    match deleted.await? {
        Some(n) => Ok(Json(serde_json::json!({"deleted": id, "unfinished_operations": n}))),
        None => Err(FleetError::NotFound(id).into()),
    }
}

/// A device with its operations, as `devices show` prints it.
#[derive(Serialize, Deserialize, utoipa::ToSchema)]
pub struct DeviceView {
    #[serde(flatten)]
    pub device: Device,
    pub operations: Vec<OperationView>,
}

#[derive(Serialize, Deserialize, utoipa::ToSchema)]
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

#[utoipa::path(get, path = "/api/v1/devices/{id}", tag = "devices", params(("id" = String, Path)),
    responses((status = 200, body = DeviceView), (status = 404, body = ErrorBody)))]
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

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AssignBody {
    /// NAME@VERSION.
    pub image: String,
    #[serde(default)]
    pub component: Option<String>,
}

#[utoipa::path(put, path = "/api/v1/devices/{id}/assignment", tag = "devices", params(("id" = String, Path)),
    request_body = AssignBody,
    responses((status = 200, body = OperationView), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
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

#[utoipa::path(post, path = "/api/v1/devices/{id}/token", tag = "devices", params(("id" = String, Path)),
    responses((status = 200, description = "{device, token}: the device's MQTT password", body = Object),
        (status = 409, body = ErrorBody)))]
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

#[utoipa::path(get, path = "/api/v1/tuf", tag = "tuf",
    responses((status = 200, description = "what each configured repository verified", body = Object)))]
async fn tuf_status(State(s): State<AppState>) -> Json<serde_json::Value> {
    let trust = s.planner.trust();
    let repos: Vec<serde_json::Value> = trust
        .configured()
        .into_iter()
        .map(|r| serde_json::json!({"repo": r, "verified": trust.verified(r).map(|v| (*v).clone())}))
        .collect();
    Json(serde_json::json!({"repositories": repos}))
}

#[utoipa::path(post, path = "/api/v1/tuf/{repo}/refresh", tag = "tuf",
    params(("repo" = String, Path, description = "production or ci")),
    responses((status = 200, body = crate::tuf::Verified), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
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
