//! End to end with real registry clients: docker pulls and runs an image, skopeo copies one into
//! an OCI layout (verifying every digest on the way).

mod common;

use common::{
    Server, docker_pull_and_run_hello, require_containerd, require_docker, require_tool, run,
    run_failing,
};

#[test]
fn docker_pulls_and_runs_shell_hello() {
    require_docker();
    let server = Server::start();
    let image = format!("{}/shell/hello", server.host());
    docker_pull_and_run_hello(&image);
    // The default command is bash, and the shell finds the image's tools.
    let out = run(
        "docker",
        &[
            "run",
            "--rm",
            "--network",
            "none",
            &image,
            "bash",
            "-c",
            "ls /bin/hello && /usr/bin/env echo ok",
        ],
    );
    assert_eq!(out, "/bin/hello\nok\n");
    run("docker", &["rmi", &image]);
    assert_eq!(server.nix_builds(), 1, "docker's HEAD and GET built twice");
}

#[test]
fn skopeo_copies_the_image_into_an_oci_layout() {
    require_tool("skopeo", "apt-get install skopeo");
    let server = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    run(
        "skopeo",
        &[
            "copy",
            "--src-tls-verify=false",
            &format!("docker://{}/shell/hello:latest", server.host()),
            &format!("oci:{}:latest", layout.display()),
        ],
    );
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    assert_eq!(index["manifests"].as_array().unwrap().len(), 1);
    let inspect = run(
        "skopeo",
        &[
            "inspect",
            "--tls-verify=false",
            &format!("docker://{}/shell/hello", server.host()),
        ],
    );
    let inspect: serde_json::Value = serde_json::from_str(&inspect).unwrap();
    assert_eq!(inspect["Architecture"], "amd64");
}

#[test]
fn containerd_pulls_unpacks_and_runs_shell_hello() {
    require_containerd();
    let server = Server::start();
    let namespace = format!("nixery-test-{}", server.port);
    let image = format!("{}/shell/hello:latest", server.host());
    let ctr = |args: &[&str]| common::ctr(&namespace, args);
    common::ctr_pull(&namespace, &image, &[]);
    let listed = ctr(&["images", "ls", "--quiet"]);
    assert!(listed.contains(&image), "{listed}");
    // containerd fetched the manifest by digest after resolving the tag: still one build.
    assert_eq!(server.nix_builds(), 1);
    let container = format!("hello-{}", server.port);
    let out = common::ctr_run_hello(&namespace, &image, &container);
    assert_eq!(out, "Hello, world!\n");
    ctr(&["images", "rm", &image]);
}

#[test]
fn podman_pulls_shell_hello() {
    require_tool("podman", "apt-get install podman");
    let server = Server::start();
    let image = format!("{}/shell/hello", server.host());
    let id = run("podman", &["pull", "--tls-verify=false", &image]);
    assert!(!id.trim().is_empty());
    let digest = run(
        "podman",
        &["image", "inspect", "--format", "{{.Digest}}", &image],
    );
    assert!(digest.trim().starts_with("sha256:"), "{digest}");
    run("podman", &["rmi", &image]);
}

#[test]
fn clients_print_why_an_image_cannot_be_built_and_docker_runs_nix_once() {
    require_docker();
    require_tool("podman", "apt-get install podman");
    require_containerd();
    let server = Server::start();
    let failing = format!("{}/shell/failing", server.host());
    let expected = format!(
        "manifest unknown: building shell/failing failed: builder for 'failing' failed with exit code 1; log: http://{}/build/shell/failing",
        server.host()
    );

    let docker = run_failing("docker", &["pull", &failing]);
    assert!(docker.contains(&expected), "{docker}");
    // Docker's HEAD and then GET ran one build.
    assert_eq!((server.nix_builds(), server.evaluations()), (1, 1));

    let podman = run_failing("podman", &["pull", "--tls-verify=false", &failing]);
    assert!(podman.contains(&expected), "{podman}");
    // containerd prints no registry message for a 404, only that the reference is not found.
    let ctr = run_failing(
        "ctr",
        &[
            "images",
            "pull",
            "--plain-http",
            &format!("{failing}:latest"),
        ],
    );
    assert!(
        ctr.contains(&format!("{failing}:latest: not found")),
        "{ctr}"
    );
    assert_eq!((server.nix_builds(), server.evaluations()), (1, 1));

    let unknown = run_failing(
        "docker",
        &["pull", &format!("{}/shell/nodjs", server.host())],
    );
    assert!(
        unknown.contains(&format!(
            "manifest unknown: no package \"nodjs\" in the package set {}",
            common::offline_pkgs().display()
        )),
        "{unknown}"
    );
}
