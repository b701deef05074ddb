//! The admin API's OpenAPI document: served at `/api/v1/openapi.json`, generated from the same
//! handlers the router serves, and complete — every route of the router is in it.

mod common;

use std::collections::BTreeSet;

use common::*;
use reqwest::Method;
use serde_json::Value;

/// `(METHOD, path)` of every operation in the document.
fn operations(doc: &Value) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in ["get", "put", "post", "delete", "patch", "head"] {
            if item.get(method).is_some() {
                out.insert((method.to_uppercase(), path.clone()));
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_of_the_router_is_in_the_openapi_document() {
    let dir = tempfile::tempdir().unwrap();
    let gw = TestGateway::start(test_config(dir.path())).await;
    let (status, doc) = admin(&gw.admin, Method::GET, "/api/v1/openapi.json", None, None).await;
    assert_eq!(status, 200, "{doc}");
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."), "{doc}");
    let ops = operations(&doc);
    // Behind the token, like every /api/v1 route.
    let anonymous = reqwest::get(format!("{}/api/v1/openapi.json", gw.admin)).await.unwrap();
    assert_eq!(anonymous.status(), 401);

    // Every route, old and new, as an operator knows them.
    for (m, p) in [
        ("GET", "/livez"),
        ("GET", "/readyz"),
        ("GET", "/metrics"),
        ("GET", "/api/v1/openapi.json"),
        ("POST", "/api/v1/images"),
        ("GET", "/api/v1/images/{name}/{version}"),
        ("GET", "/api/v1/devices"),
        ("DELETE", "/api/v1/devices/{id}"),
        ("PUT", "/api/v1/devices/{id}/assignment"),
        ("POST", "/api/v1/devices/{id}/token"),
        ("POST", "/api/v1/waves"),
        ("POST", "/api/v1/waves/{name}/rollout"),
        ("GET", "/api/v1/waves/{name}/status"),
        ("GET", "/api/v1/tags/{tag}"),
        ("POST", "/api/v1/tuf/{repo}/refresh"),
        ("POST", "/api/v1/rollouts"),
        ("GET", "/api/v1/rollouts/{name}/status"),
        ("POST", "/api/v1/rollouts/{name}/{action}"),
        ("POST", "/api/v1/rollouts/{name}/retry"),
        ("DELETE", "/api/v1/rollouts/{name}"),
    ] {
        assert!(ops.contains(&(m.to_owned(), p.to_owned())), "{m} {p} is not in the document");
    }

    // Every documented operation is routed: the router answers it with a handler's answer,
    // never its own fallback (404 with an empty body) or 405 (the path has other methods).
    for (m, p) in &ops {
        let path = p.replace("{action}", "start").replace('{', "").replace('}', "");
        let (status, body) = admin(&gw.admin, Method::from_bytes(m.as_bytes()).unwrap(), &path, None, None).await;
        assert_ne!(status, 405, "{m} {p}: documented, not routed");
        assert!(!(status == 404 && body == Value::String(String::new())), "{m} {p}: documented, not routed");
    }

    // A route added to the router without going through the document's handlers fails here:
    // the admin module builds its routes only from documented handlers (`routes!`), and any
    // plain `.route("…")` must name a documented path.
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = vec![src.join("admin.rs")];
    files.extend(std::fs::read_dir(src.join("admin")).unwrap().map(|e| e.unwrap().path()));
    let paths: BTreeSet<&str> = ops.iter().map(|(_, p)| p.as_str()).collect();
    let mut plain = 0;
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for (i, _) in text.match_indices(".route(\"") {
            let rest = &text[i + 8..];
            let path = &rest[..rest.find('"').unwrap()];
            assert!(paths.contains(path), "{}: route {path} is not in the OpenAPI document", f.display());
            plain += 1;
        }
    }
    assert_eq!(plain, 0, "every route goes through a documented handler");

    // The pieces an operator's tooling reads.
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    for s in ["Rollout", "CreateRequest", "RolloutStatus", "RolloutGroupStatus", "Wave", "Device", "ErrorBody"] {
        assert!(schemas.contains_key(s), "schema {s} missing: {:?}", schemas.keys().collect::<Vec<_>>());
    }
    assert_eq!(doc["components"]["securitySchemes"]["bearer"]["scheme"], "bearer");
    assert_eq!(doc["paths"]["/livez"]["get"]["security"], serde_json::json!([{}]), "probes need no token");
    gw.stop().await;
}
