//! The pages and the JSON API driven with `oneshot`, without Nix, over the router tests' small
//! image service (`hello` is built, nothing else is): escaping of hostile input, JSON errors under
//! `/api/`, the builds API's answers, bounded event streams, asset caching.

use axum::body::Body;
use axum::http::{HeaderValue, Method, Request, StatusCode, header};

use crate::http::tests::{app, app_with, get_json, send, state_with};

async fn page(router: axum::Router, path: &str, host: &str) -> (StatusCode, String) {
    let request = Request::get(path)
        .header(header::HOST, HeaderValue::from_str(host).unwrap())
        .body(Body::empty())
        .unwrap();
    let (status, headers, body) = send(router, request).await;
    assert_eq!(
        headers[header::CONTENT_TYPE],
        "text/html; charset=utf-8",
        "{path}"
    );
    assert!(
        headers[header::CONTENT_SECURITY_POLICY]
            .to_str()
            .unwrap()
            .contains("script-src 'self'"),
        "{path}"
    );
    (status, String::from_utf8(body).unwrap())
}

async fn post_json(
    router: axum::Router,
    path: &str,
    body: &str,
) -> (StatusCode, serde_json::Value) {
    let request = Request::post(path)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_owned()))
        .unwrap();
    let (status, headers, body) = send(router, request).await;
    assert_eq!(headers[header::CONTENT_TYPE], "application/json", "{path}");
    let text = String::from_utf8(body).unwrap();
    assert!(!text.contains('<'), "{path}: markup in JSON: {text}");
    (status, serde_json::from_str(&text).unwrap())
}

#[tokio::test]
async fn pages_escape_hostile_input_and_never_reflect_it_raw() {
    let dir = tempfile::tempdir().unwrap();
    let (router, _) = app(dir.path());
    let (status, html) = page(router.clone(), "/", "registry.example").await;
    assert_eq!(status, StatusCode::OK);
    assert!(html.contains("docker pull registry.example/shell/hello"));
    let (_, html) = page(router.clone(), "/", "a\"<b>").await;
    assert!(!html.contains("<b>") && !html.contains("a\"<"), "{html}");

    let encoded = "%3Cscript%3Ealert(1)%3C%2Fscript%3E";
    for path in [
        format!("/search?q={encoded}"),
        format!("/build/{encoded}"),
        format!("/build/hello:{encoded}"),
        format!("/build/hello/{encoded}"),
    ] {
        let (status, html) = page(router.clone(), &path, "localhost").await;
        assert_ne!(status, StatusCode::OK, "{path}");
        assert!(
            !html.contains("<script>alert"),
            "{path} reflected the script raw: {html}"
        );
        assert!(html.contains("script&#62;alert"), "{path}: {html}");
    }
}

#[tokio::test]
async fn the_build_page_shows_a_built_image_and_offers_to_build_others() {
    let dir = tempfile::tempdir().unwrap();
    let (router, [docker, ..]) = app(dir.path());
    let (status, html) = page(router.clone(), "/build/hello", "registry.example").await;
    assert_eq!(status, StatusCode::OK);
    assert!(html.contains(r#"data-status="done""#), "{html}");
    assert!(html.contains(docker.as_str()), "{html}");
    assert!(
        html.contains("docker pull registry.example/hello"),
        "{html}"
    );
    // Docker before 23.0 cannot unpack zstd layers: the page suggests a client that can.
    let (status, html) = page(
        router.clone(),
        "/build/zstd-layers/hello",
        "registry.example",
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        html.contains("podman pull registry.example/zstd-layers/hello"),
        "{html}"
    );
    let (status, html) = page(router.clone(), "/build/curl:v1", "registry.example").await;
    assert_eq!(status, StatusCode::OK);
    assert!(html.contains(r#"data-status="none""#), "{html}");
    assert!(html.contains(r#"action="/build/curl:v1""#), "{html}");

    // The button starts the build and goes back to the page.
    let request = Request::post("/build/curl:v1").body(Body::empty()).unwrap();
    let (status, headers, _) = send(router, request).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert_eq!(headers[header::LOCATION], "/build/curl:v1");
}

#[tokio::test]
async fn unknown_api_routes_and_methods_answer_json_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (router, _) = app(dir.path());
    for path in [
        "/api",
        "/api/",
        "/api/v2/builds",
        "/api/v1/nothing",
        "/api/v1/builds/",
    ] {
        let (status, headers, body) = get_json(router.clone(), path).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
        assert_eq!(headers[header::CONTENT_TYPE], "application/json", "{path}");
        assert_eq!(body["errors"][0]["code"], "UNSUPPORTED", "{path}");
    }
    for (method, path) in [
        (Method::GET, "/api/v1/builds"),
        (Method::DELETE, "/api/v1/builds/hello"),
        (Method::POST, "/api/v1/packages?q=x"),
        (Method::PUT, "/api/v1/events/hello"),
    ] {
        let request = Request::builder()
            .method(method.clone())
            .uri(path)
            .body(Body::empty())
            .unwrap();
        let (status, headers, body) = send(router.clone(), request).await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
        assert_eq!(headers[header::CONTENT_TYPE], "application/json");
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["errors"][0]["code"], "UNSUPPORTED");
    }
}

#[tokio::test]
async fn the_builds_api_answers_status_json_and_refuses_bad_requests() {
    let dir = tempfile::tempdir().unwrap();
    let (router, [docker, ..]) = app(dir.path());
    let (status, body) = post_json(router.clone(), "/api/v1/builds", r#"{"image": "hello"}"#).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "done");
    assert_eq!(body["digest"], docker.as_str());
    let (status, body) = post_json(
        router.clone(),
        "/api/v1/builds",
        r#"{"image": "nothere", "tag": "v2"}"#,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "failed");
    assert_eq!(body["url"], "http://localhost/build/nothere:v2");

    let (status, _, body) = get_json(router.clone(), "/api/v1/builds/hello").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["status"], "done");
    assert_eq!(
        body["events"].as_array().unwrap().last().unwrap()["phase"],
        "done"
    );
    let (status, _, body) = get_json(router.clone(), "/api/v1/builds/curl:latest").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["errors"][0]["code"], "BUILD_UNKNOWN");
    let (status, _, body) = get_json(router.clone(), "/api/v1/events/curl").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["errors"][0]["code"], "BUILD_UNKNOWN");

    for (bad, code) in [
        (r#"{"image": "<script>"}"#, "NAME_INVALID"),
        (r#"{"image": "hello", "tag": "a b"}"#, "NAME_INVALID"),
        (r#"{"image": "hello", "extra": 1}"#, "BODY_INVALID"),
        ("not json", "BODY_INVALID"),
        (
            &format!(r#"{{"image": "{}"}}"#, "a".repeat(10_000)),
            "BODY_INVALID",
        ),
    ] {
        let (status, body) = post_json(router.clone(), "/api/v1/builds", bad).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
        assert_eq!(body["errors"][0]["code"], code, "{bad}");
    }
}

#[tokio::test]
async fn event_streams_replay_a_build_and_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let (router, [docker, ..]) = app_with(dir.path(), 1, "");
    let request = Request::get("/api/v1/events/hello")
        .body(Body::empty())
        .unwrap();
    let (status, headers, body) = send(router.clone(), request).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers[header::CONTENT_TYPE], "text/event-stream");
    let body = String::from_utf8(body).unwrap();
    assert!(body.starts_with("event: started\n"), "{body}");
    assert!(body.contains("event: done\n"), "{body}");
    assert!(body.contains(docker.as_str()), "{body}");
    // The stream ended and gave its place back: another may follow.
    let request = Request::get("/api/v1/events/hello")
        .body(Body::empty())
        .unwrap();
    let (status, _, _) = send(router, request).await;
    assert_eq!(status, StatusCode::OK);

    let (router, _) = app_with(dir.path(), 0, "");
    let (status, headers, body) = get_json(router, "/api/v1/events/hello").await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(headers[header::RETRY_AFTER], "5");
    assert_eq!(body["errors"][0]["code"], "TOOMANYREQUESTS");
}

#[tokio::test]
async fn assets_are_served_with_long_caching_and_etags() {
    let dir = tempfile::tempdir().unwrap();
    let (router, _) = app(dir.path());
    let (_, html) = page(router.clone(), "/", "localhost").await;
    let href = html
        .split("href=\"/static/style.css?v=")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("the page links the stylesheet with its version");
    assert_eq!(href.len(), 16);
    let request = Request::get("/static/style.css")
        .body(Body::empty())
        .unwrap();
    let (status, headers, body) = send(router.clone(), request).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers[header::CONTENT_TYPE], "text/css; charset=utf-8");
    assert!(
        headers[header::CACHE_CONTROL]
            .to_str()
            .unwrap()
            .contains("immutable")
    );
    assert_eq!(headers[header::ETAG], format!("\"{href}\""));
    assert!(!body.is_empty());
    let request = Request::get("/static/style.css")
        .header(header::IF_NONE_MATCH, format!("\"{href}\""))
        .body(Body::empty())
        .unwrap();
    let (status, _, body) = send(router.clone(), request).await;
    assert_eq!(status, StatusCode::NOT_MODIFIED);
    assert!(body.is_empty());
    let (status, _, body) = get_json(router, "/static/nothing.js").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["errors"][0]["code"], "UNSUPPORTED");
}

#[tokio::test]
async fn the_signing_key_is_served_as_pem_and_its_absence_is_a_json_404() {
    let dir = tempfile::tempdir().unwrap();
    let (router, _) = app(dir.path());
    let (_, html) = page(router.clone(), "/", "localhost:8080").await;
    assert!(!html.contains("id=\"signatures\""), "{html}");
    let (status, _, body) = get_json(router, "/api/v1/signing-key").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["errors"][0]["code"], "KEY_UNKNOWN");
    assert!(
        body["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("NIXERY_SIGNING_KEY"),
        "{body}"
    );

    let key =
        crate::signing::SigningKey::from_pem(include_str!("../signing/testdata/pkcs8.pem"), None)
            .unwrap();
    let (state, _) = state_with(dir.path(), 10, "");
    let signer = crate::signing::Signer::new(key, "registry.example:5000").unwrap();
    let router = crate::http::router(crate::state::AppState {
        signer: Some(std::sync::Arc::new(signer)),
        ..state
    });
    let request = Request::get("/api/v1/signing-key")
        .body(Body::empty())
        .unwrap();
    let (status, headers, body) = send(router.clone(), request).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers[header::CONTENT_TYPE], "application/x-pem-file");
    assert_eq!(
        String::from_utf8(body).unwrap(),
        include_str!("../signing/testdata/cosign.pub")
    );
    let request = Request::post("/api/v1/signing-key")
        .body(Body::empty())
        .unwrap();
    let (status, _, _) = send(router.clone(), request).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    // The index page says how to verify, with the names signatures use.
    let (status, html) = page(router, "/", "localhost:8080").await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        html.contains("cosign verify --key nixery.pub registry.example:5000/shell/hello"),
        "{html}"
    );
    assert!(
        html.contains("http://localhost:8080/api/v1/signing-key"),
        "{html}"
    );
}
