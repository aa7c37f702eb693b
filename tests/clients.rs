//! End to end with real registry clients: docker pulls and runs an image, skopeo copies one into
//! an OCI layout (verifying every digest on the way).

mod common;

use common::{Server, require_docker, require_tool, run};

#[test]
fn docker_pulls_and_runs_shell_hello() {
    require_docker();
    let server = Server::start();
    let image = format!("{}/shell/hello", server.host());
    run("docker", &["pull", &image]);
    let out = run(
        "docker",
        &["run", "--rm", "--network", "none", &image, "hello"],
    );
    assert_eq!(out, "Hello, world!\n");
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
