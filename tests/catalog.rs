//! The package catalog from the outside: the search API, "did you mean" in the errors clients
//! print, and a commit's catalog reused from storage after a restart.

mod common;

use common::{Server, client, require_docker, run, search, search_ready};

/// The pullable names of a search's results, best first.
fn names(body: &serde_json::Value) -> Vec<String> {
    body["packages"]
        .as_array()
        .expect("a list of packages")
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn search_finds_packages_by_part_of_their_name() {
    let server = Server::start();
    let hel = search_ready(&server, "q=hel").await;
    assert_eq!(names(&hel)[0], "hello", "{hel}");
    let hello = &hel["packages"][0];
    assert_eq!(hello["attr"], "hello");
    assert_eq!(hello["version"], "2.12.1");
    assert!(hello["description"].as_str().unwrap().contains("Hello"));

    let xev = search_ready(&server, "q=xev").await;
    assert_eq!(names(&xev)[0], "xorg.xev", "{xev}");
    let password = search_ready(&server, "q=1password").await;
    assert_eq!(names(&password)[0], "1password", "{password}");
    assert_eq!(password["packages"][0]["attr"], "_1password");
    let limited = search_ready(&server, "q=s&limit=2").await;
    assert!(names(&limited).len() <= 2, "{limited}");

    let long = format!("q={}", "a".repeat(10 * 1024));
    for bad in [
        long.as_str(),
        "q=",
        "q=%20%20",
        "",
        "q=hello&limit=0",
        "q=hello&limit=101",
        "q=hello&limit=many",
        "q=hello&limit=-1",
    ] {
        let (status, body) = search(&server, bad).await;
        assert_eq!(status, 400, "{}: {body}", &bad[..bad.len().min(40)]);
        assert_eq!(body["errors"][0]["code"], "QUERY_INVALID");
    }
}

#[tokio::test]
async fn a_misspelled_name_gets_a_suggestion_in_docker_pull() {
    require_docker();
    let server = Server::start();
    // The catalog is made the first time something asks for it.
    search_ready(&server, "q=hello").await;
    let output = std::process::Command::new("docker")
        .args(["pull", &format!("{}/shell/helo", server.host())])
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        printed.contains(&format!(
            "manifest unknown: no package \"helo\" in the package set {}; did you mean \"hello\"?",
            common::offline_pkgs().display()
        )),
        "{printed}"
    );
    // Nothing close: no suggestion.
    let response = client()
        .get(server.url("/v2/zzzzzzzzzz/manifests/latest"))
        .send()
        .await
        .unwrap();
    let body: serde_json::Value = response.json().await.unwrap();
    let message = body["errors"][0]["message"].as_str().unwrap();
    assert!(!message.contains("did you mean"), "{message}");
    assert_eq!(
        body["errors"][0]["detail"]["suggestions"],
        serde_json::json!({})
    );
}

#[tokio::test]
async fn a_commits_catalog_is_read_back_from_storage_after_a_restart() {
    let repo = common::repo::PkgsRepo::create();
    let tmp = tempfile::tempdir().unwrap();
    let storage = tmp.path().join("storage");
    let git = [
        ("NIXERY_PKGS_PATH", ""),
        ("NIXERY_PKGS_REPO", repo.path.to_str().unwrap()),
    ];
    let server = Server::start_on(&storage, &git);
    let first = search_ready(&server, "q=hello").await;
    assert_eq!(
        (
            server.metric("nixery_catalogs_total{outcome=\"evaluated\"}"),
            server.metric("nixery_catalogs_total{outcome=\"stored\"}")
        ),
        (1, 0)
    );
    let server = server.restart(&git);
    let again = search_ready(&server, "q=hello").await;
    assert_eq!(again, first);
    assert_eq!(
        (
            server.metric("nixery_catalogs_total{outcome=\"evaluated\"}"),
            server.metric("nixery_catalogs_total{outcome=\"stored\"}")
        ),
        (0, 1),
        "the restarted server evaluated the catalog again"
    );
    // The stored catalog is one file under the storage's caches.
    let stored = run(
        "find",
        &[
            storage.join("cache/catalogs").to_str().unwrap(),
            "-type",
            "f",
        ],
    );
    assert_eq!(stored.lines().count(), 1, "{stored}");
}
