//! Headless Chromium for the web page tests, driven through fantoccini: each [`Browser`] has a
//! `chromedriver` of its own (own port, own profile directory), so tests may run in parallel.
//! What WebDriver does not do by itself is here: starting and killing chromedriver, telling a
//! page that did not load from one that did, sizing the viewport, and the console's errors.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::elements::Element;
use fantoccini::wd::WebDriverCompatibleCommand;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

/// How long chromedriver and Chromium may take to start: the first start on a machine reads a
/// few hundred MB of Chromium from disk.
const START_TIMEOUT: Duration = Duration::from_secs(120);
/// How long one page load may take before WebDriver gives up on it.
const PAGE_LOAD_TIMEOUT: Duration = Duration::from_secs(60);
const INSTALL: &str = "apt-get install chromium chromium-driver";

/// A headless Chromium session (the WebDriver client it derefs to) and its chromedriver; both
/// are killed when dropped.
pub struct Browser {
    client: Client,
    _chromedriver: Chromedriver,
    dir: tempfile::TempDir,
}

/// The chromedriver process; killed with its process group (Chromium's processes) when dropped,
/// also when a start fails half way.
struct Chromedriver(Child);

impl Drop for Chromedriver {
    fn drop(&mut self) {
        let group = rustix::process::Pid::from_child(&self.0);
        rustix::process::kill_process_group(group, rustix::process::Signal::KILL).ok();
        self.0.wait().ok();
    }
}

impl std::ops::Deref for Browser {
    type Target = Client;
    fn deref(&self) -> &Client {
        &self.client
    }
}

impl Browser {
    /// Starts chromedriver on a free port of 127.0.0.1 and opens a headless Chromium session in
    /// a fresh profile. Panics, naming the install step, when chromedriver is not installed.
    pub async fn start() -> Browser {
        super::require_tool("chromedriver", INSTALL);
        let dir = tempfile::tempdir().expect("a temporary directory for the browser");
        let stderr = std::fs::File::create(dir.path().join("stderr.log")).expect("a log file");
        // Its own process group, so that dropping the browser kills Chromium's processes too.
        // Port 0: chromedriver picks a free port and prints it, so parallel tests cannot race.
        // TMPDIR: what Chromium leaves in /tmp when killed (its singleton socket) goes with `dir`.
        let chromedriver = std::os::unix::process::CommandExt::process_group(
            Command::new("chromedriver")
                .arg("--port=0")
                .env("TMPDIR", dir.path()),
            0,
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .expect("chromedriver starts");
        let mut chromedriver = Chromedriver(chromedriver);
        let port = read_port(&mut chromedriver.0);
        let log = |dir: &tempfile::TempDir| log_tail(dir.path());
        let port = match tokio::time::timeout(START_TIMEOUT, port).await {
            Ok(Ok(port)) => port,
            Ok(Err(_)) => panic!("chromedriver exited before it listened{}", log(&dir)),
            Err(_) => panic!(
                "chromedriver printed no port in {START_TIMEOUT:?}{}",
                log(&dir)
            ),
        };
        let profile = dir.path().join("profile");
        let capabilities = json!({
            "goog:chromeOptions": {"args": [
                "--headless=new",
                "--no-sandbox", // the tests run as root, where Chromium's sandbox refuses to start
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--window-size=1280,900",
                "--hide-scrollbars",
                "--force-device-scale-factor=1",
                "--lang=en-US",
                format!("--user-data-dir={}", profile.display()),
            ]},
            "goog:loggingPrefs": {"browser": "ALL"},
            "timeouts": {"pageLoad": PAGE_LOAD_TIMEOUT.as_millis() as u64},
        });
        let Value::Object(capabilities) = capabilities else {
            unreachable!("a JSON object")
        };
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let mut builder = ClientBuilder::new(connector);
        builder.capabilities(capabilities);
        let webdriver = format!("http://127.0.0.1:{port}");
        let client = match tokio::time::timeout(START_TIMEOUT, builder.connect(&webdriver)).await {
            Ok(Ok(client)) => client,
            Ok(Err(e)) => panic!(
                "Chromium did not start (`{INSTALL}` installs it): {e}{}",
                log(&dir)
            ),
            Err(_) => panic!("Chromium did not start in {START_TIMEOUT:?}{}", log(&dir)),
        };
        Browser {
            client,
            _chromedriver: chromedriver,
            dir,
        }
    }

    /// Opens `url` and waits until the page has loaded; panics if it could not be loaded at all
    /// (an HTTP error status is a page like any other).
    pub async fn goto(&self, url: &str) {
        self.client.goto(url).await.expect(url);
        // A network error is no WebDriver error: Chromium shows its own error page instead.
        let script = "return document.documentURI.startsWith('chrome-error:')
            && (document.querySelector('.error-code')?.textContent || document.title)";
        let error = self
            .execute(script, vec![])
            .await
            .expect("the page answers");
        assert_eq!(
            error,
            false,
            "{url} did not load{}",
            log_tail(self.dir.path())
        );
    }

    /// The first element matching the CSS selector `css`; panics if there is none.
    pub async fn find(&self, css: &str) -> Element {
        match self.client.find(Locator::Css(css)).await {
            Ok(element) => element,
            Err(e) => panic!("no element {css} on {:?}: {e}", self.current_url().await),
        }
    }

    /// Waits up to `timeout` for an element matching `css` to appear.
    pub async fn wait_for(&self, css: &str, timeout: Duration) -> Element {
        let found = self.wait().at_most(timeout).for_element(Locator::Css(css));
        found
            .await
            .unwrap_or_else(|e| panic!("no element {css} after {timeout:?}: {e}"))
    }

    /// Saves a PNG of the visible page to `target/screenshots/<name>.png` in the crate and
    /// returns its path.
    pub async fn screenshot(&self, name: &str) -> PathBuf {
        let png = self.client.screenshot().await.expect("a screenshot");
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("target/screenshots/{name}.png"));
        std::fs::create_dir_all(path.parent().unwrap()).expect("the screenshot directory");
        std::fs::write(&path, png).expect("the screenshot is written");
        path
    }

    /// Resizes the window so that the page sees a `width` × `height` viewport in CSS pixels
    /// (390 × 844 is a phone), which is also the size of a [`Browser::screenshot`].
    pub async fn set_window_size(&self, width: u32, height: u32) {
        // The window is larger than its viewport, even headless (by 143 pixels in height for
        // Chromium 156): measure the difference and make up for it.
        let viewport = || async {
            let inner = self
                .execute("return [window.innerWidth, window.innerHeight]", vec![])
                .await
                .expect("the viewport's size");
            (
                inner[0].as_i64().unwrap_or(0),
                inner[1].as_i64().unwrap_or(0),
            )
        };
        let wanted = (i64::from(width), i64::from(height));
        let mut outer = wanted;
        for _ in 0..2 {
            let size = (u32::try_from(outer.0), u32::try_from(outer.1));
            let (Ok(w), Ok(h)) = size else {
                panic!("no window size {outer:?} gives a {width}×{height} viewport")
            };
            self.client
                .set_window_size(w, h)
                .await
                .expect("a window size");
            let inner = viewport().await;
            if inner == wanted {
                return;
            }
            outer = (outer.0 + wanted.0 - inner.0, outer.1 + wanted.1 - inner.1);
        }
        panic!(
            "the viewport is not {width}×{height} but {:?}",
            viewport().await
        );
    }

    /// The messages of the browser's console errors (`console.error`, uncaught exceptions,
    /// failed loads) since the last call: Chromium hands each out once.
    pub async fn console_errors(&self) -> Vec<String> {
        let entries = self.issue_cmd(BrowserLog).await.expect("the browser log");
        let Value::Array(entries) = entries else {
            panic!("browser log: not a list: {entries}")
        };
        entries
            .into_iter()
            .filter(|e| e["level"] == "SEVERE")
            .map(|e| e["message"].as_str().unwrap_or_default().to_owned())
            .collect()
    }
}

/// chromedriver's own command for the browser's console (not W3C), fed by the
/// `goog:loggingPrefs` capability.
#[derive(Debug)]
struct BrowserLog;

impl WebDriverCompatibleCommand for BrowserLog {
    fn endpoint(
        &self,
        base: &url::Url,
        session: Option<&str>,
    ) -> Result<url::Url, url::ParseError> {
        base.join(&format!("session/{}/se/log", session.unwrap_or_default()))
    }

    fn method_and_body(&self, _: &url::Url) -> (http::Method, Option<String>) {
        (
            http::Method::POST,
            Some(json!({"type": "browser"}).to_string()),
        )
    }
}

/// The tail of what chromedriver and Chromium wrote to stderr in `dir`, for failure messages.
fn log_tail(dir: &Path) -> String {
    let log = std::fs::read_to_string(dir.join("stderr.log")).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    let tail = &lines[lines.len().saturating_sub(30)..];
    format!("\nchromedriver's stderr:\n{}", tail.join("\n"))
}

/// Reads the port chromedriver prints ("... started successfully on port 12345."), then keeps
/// reading its stdout so that it never blocks on a full pipe.
fn read_port(chromedriver: &mut Child) -> tokio::sync::oneshot::Receiver<u16> {
    let stdout = chromedriver.stdout.take().expect("chromedriver's stdout");
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(port) = line.split("started successfully on port ").nth(1)
                && let Ok(port) = port.trim_end_matches('.').parse()
                && let Some(tx) = tx.take()
            {
                tx.send(port).ok();
            }
        }
    });
    rx
}
