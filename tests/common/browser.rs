//! A small W3C WebDriver client for the web page tests: each [`Browser`] is a headless Chromium
//! behind a `chromedriver` of its own (own port, own profile directory), so tests may run in
//! parallel. The commands follow https://www.w3.org/TR/webdriver2/.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use reqwest::Method;
use serde_json::{Value, json};

/// How long chromedriver and Chromium may take to start: the first start on a machine reads a
/// few hundred MB of Chromium from disk.
const START_TIMEOUT: Duration = Duration::from_secs(120);
/// How long one page load may take before WebDriver gives up on it.
const PAGE_LOAD_TIMEOUT: Duration = Duration::from_secs(60);
/// How long one WebDriver request may take; longer than a page load, so that a slow page is
/// reported as WebDriver's timeout error rather than as a dropped request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(150);
/// How often `wait_for` and `wait_until` look again.
const POLL: Duration = Duration::from_millis(50);
/// The key under which WebDriver passes an element reference in JSON (§ 12.1 Elements).
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";
const INSTALL: &str = "apt-get install chromium chromium-driver";

/// A headless Chromium driven through its own chromedriver; both are killed when dropped.
pub struct Browser {
    session: Session,
    chromedriver: Child,
    dir: tempfile::TempDir,
}

/// An element of the current page, as WebDriver refers to it.
pub struct Element {
    session: Session,
    id: String,
    css: String,
}

/// One WebDriver session: where its commands go.
#[derive(Clone)]
struct Session {
    http: reqwest::Client,
    /// `http://127.0.0.1:PORT/session/ID`
    url: String,
}

/// A failed command: WebDriver's `error` code (§ 6.6 Errors) and the rest of what it said.
struct Failure {
    error: String,
    detail: String,
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
        let mut chromedriver = std::os::unix::process::CommandExt::process_group(
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
        let port = read_port(&mut chromedriver);
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(REQUEST_TIMEOUT)
            .build()
            .expect("an HTTP client");
        let mut browser = Browser {
            session: Session {
                http,
                url: String::new(),
            },
            chromedriver,
            dir,
        };
        match tokio::time::timeout(START_TIMEOUT, port).await {
            Ok(Ok(port)) => browser.session.url = format!("http://127.0.0.1:{port}"),
            Ok(Err(_)) => panic!("chromedriver exited before it listened{}", browser.log()),
            Err(_) => panic!(
                "chromedriver printed no port in {START_TIMEOUT:?}{}",
                browser.log()
            ),
        }
        browser.wait_ready().await;
        let user_data = browser.dir.path().join("profile");
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "goog:chromeOptions": {"args": [
                "--headless=new",
                "--no-sandbox", // the tests run as root, where Chromium's sandbox refuses to start
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--window-size=1280,900",
                "--hide-scrollbars",
                "--force-device-scale-factor=1",
                "--lang=en-US",
                format!("--user-data-dir={}", user_data.display()),
            ]},
            "goog:loggingPrefs": {"browser": "ALL"},
            "timeouts": {"pageLoad": PAGE_LOAD_TIMEOUT.as_millis() as u64},
        }}});
        match browser
            .session
            .call(Method::POST, "/session", Some(capabilities))
            .await
        {
            Ok(value) => {
                let id = value["sessionId"].as_str().expect("a session id");
                browser.session.url = format!("{}/session/{id}", browser.session.url);
            }
            Err(failure) => panic!(
                "Chromium did not start (`{INSTALL}` installs it): {}: {}{}",
                failure.error,
                failure.detail,
                browser.log()
            ),
        }
        browser
    }

    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(status) = self.session.call(Method::GET, "/status", None).await
                && status["ready"] == true
            {
                return;
            }
            if let Ok(Some(exit)) = self.chromedriver.try_wait() {
                panic!("chromedriver exited with {exit}{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "chromedriver is not ready{}",
                self.log()
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// The tail of what chromedriver and Chromium wrote to stderr, for failure messages.
    fn log(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        format!("\nchromedriver's stderr:\n{}", tail.join("\n"))
    }

    /// Opens `url` and waits until the page has loaded; panics if it could not be loaded at all
    /// (an HTTP error status is a page like any other).
    pub async fn goto(&self, url: &str) {
        self.session
            .run(Method::POST, "/url", Some(json!({"url": url})), url)
            .await;
        // A network error is no WebDriver error: Chromium shows its own error page instead.
        let script = "return document.documentURI.startsWith('chrome-error:')
            && (document.querySelector('.error-code')?.textContent || document.title)";
        let error = self.execute(script, &[]).await;
        if error != false {
            panic!("{url} did not load: {error}");
        }
    }

    /// The URL of the current page.
    pub async fn current_url(&self) -> String {
        string(
            self.session
                .run(Method::GET, "/url", None, "current URL")
                .await,
        )
    }

    /// The title of the current page.
    pub async fn title(&self) -> String {
        string(self.session.run(Method::GET, "/title", None, "title").await)
    }

    /// The first element matching the CSS selector `css`; panics if there is none.
    pub async fn find(&self, css: &str) -> Element {
        let value = self
            .session
            .run(Method::POST, "/element", Some(by_css(css)), css)
            .await;
        self.element(value, css)
    }

    /// Every element matching `css`, in document order.
    pub async fn find_all(&self, css: &str) -> Vec<Element> {
        let value = self
            .session
            .run(Method::POST, "/elements", Some(by_css(css)), css)
            .await;
        let Value::Array(elements) = value else {
            panic!("{css}: not a list: {value}")
        };
        elements.into_iter().map(|e| self.element(e, css)).collect()
    }

    /// The first element matching `css`, or `None` if there is none now.
    pub async fn try_find(&self, css: &str) -> Option<Element> {
        match self
            .session
            .call(Method::POST, "/element", Some(by_css(css)))
            .await
        {
            Ok(value) => Some(self.element(value, css)),
            Err(failure) if failure.error == "no such element" => None,
            Err(failure) => panic!("{css}: {}: {}", failure.error, failure.detail),
        }
    }

    /// Waits up to `timeout` for an element matching `css` to appear.
    pub async fn wait_for(&self, css: &str, timeout: Duration) -> Element {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(element) = self.try_find(css).await {
                return element;
            }
            if Instant::now() >= deadline {
                panic!(
                    "no element {css} after {timeout:?} on {}",
                    self.current_url().await
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits up to `timeout` for the JavaScript expression `condition` to be true. An expression
    /// that throws counts as false (its element may not be there yet); the last error is shown
    /// if it never becomes true.
    pub async fn wait_until(&self, condition: &str, timeout: Duration) {
        let script = format!("return Boolean(\n{condition}\n);");
        let deadline = Instant::now() + timeout;
        loop {
            let last = match self
                .session
                .call(
                    Method::POST,
                    "/execute/sync",
                    Some(script_body(&script, &[])),
                )
                .await
            {
                Ok(Value::Bool(true)) => return,
                Ok(value) => format!("it is {value}"),
                Err(failure) => format!("{}: {}", failure.error, failure.detail),
            };
            if Instant::now() >= deadline {
                let url = self.current_url().await;
                panic!("`{condition}` is not true after {timeout:?} on {url}: {last}");
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Runs `script` as the body of a function (it `return`s its result) with `args` as
    /// `arguments`, and returns its result. [`Element::arg`] passes an element.
    pub async fn execute(&self, script: &str, args: &[Value]) -> Value {
        self.session
            .run(
                Method::POST,
                "/execute/sync",
                Some(script_body(script, args)),
                script,
            )
            .await
    }

    /// Saves a PNG of the visible page to `target/screenshots/<name>.png` in the crate and
    /// returns its path.
    pub async fn screenshot(&self, name: &str) -> PathBuf {
        let value = self
            .session
            .run(Method::GET, "/screenshot", None, "screenshot")
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(string(value))
            .expect("a base64 screenshot");
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
        let viewport = "return [window.innerWidth, window.innerHeight]";
        let (mut outer_width, mut outer_height) = (width as i64, height as i64);
        for _ in 0..2 {
            let rect = json!({"width": outer_width, "height": outer_height});
            self.session
                .run(Method::POST, "/window/rect", Some(rect), "window size")
                .await;
            let inner = self.execute(viewport, &[]).await;
            let (inner_width, inner_height) = (inner[0].as_i64(), inner[1].as_i64());
            if (inner_width, inner_height) == (Some(width as i64), Some(height as i64)) {
                return;
            }
            outer_width += width as i64 - inner_width.expect("the viewport's width");
            outer_height += height as i64 - inner_height.expect("the viewport's height");
        }
        panic!(
            "the viewport is not {width}×{height} but {}",
            self.execute(viewport, &[]).await
        );
    }

    /// The messages of the browser's console errors (`console.error`, uncaught exceptions,
    /// failed loads) since the last call: Chromium hands each out once.
    pub async fn console_errors(&self) -> Vec<String> {
        // Not W3C: chromedriver's log command, fed by the `goog:loggingPrefs` capability.
        let body = json!({"type": "browser"});
        let value = self
            .session
            .run(Method::POST, "/se/log", Some(body), "browser log")
            .await;
        let Value::Array(entries) = value else {
            panic!("browser log: not a list: {value}")
        };
        entries
            .into_iter()
            .filter(|e| e["level"] == "SEVERE")
            .map(|e| string(e["message"].clone()))
            .collect()
    }

    fn element(&self, value: Value, css: &str) -> Element {
        let id = value[ELEMENT_KEY]
            .as_str()
            .unwrap_or_else(|| panic!("{css}: no element in {value}"));
        Element {
            session: self.session.clone(),
            id: id.to_string(),
            css: css.to_string(),
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let group = rustix::process::Pid::from_child(&self.chromedriver);
        rustix::process::kill_process_group(group, rustix::process::Signal::KILL).ok();
        self.chromedriver.wait().ok();
    }
}

impl Element {
    /// The element's rendered text, as a person reads it.
    pub async fn text(&self) -> String {
        string(self.command(Method::GET, "text", None).await)
    }

    /// The element's HTML attribute `name` as written in the page (an input's `value` attribute
    /// stays what the page said: [`Element::property`] has what was typed).
    pub async fn attr(&self, name: &str) -> Option<String> {
        let value = self
            .command(Method::GET, &format!("attribute/{name}"), None)
            .await;
        value.as_str().map(str::to_string)
    }

    /// The element's DOM property `name` now (`value`, `checked`, ...), `null` if it has none.
    pub async fn property(&self, name: &str) -> Value {
        self.command(Method::GET, &format!("property/{name}"), None)
            .await
    }

    /// Clicks the middle of the element, scrolling it into view first.
    pub async fn click(&self) {
        self.command(Method::POST, "click", Some(json!({}))).await;
    }

    /// Types `text` into the element.
    pub async fn send_keys(&self, text: &str) {
        self.command(Method::POST, "value", Some(json!({"text": text})))
            .await;
    }

    /// Empties an input or text area.
    pub async fn clear(&self) {
        self.command(Method::POST, "clear", Some(json!({}))).await;
    }

    /// The element as an argument of [`Browser::execute`].
    pub fn arg(&self) -> Value {
        json!({ELEMENT_KEY: self.id})
    }

    async fn command(&self, method: Method, command: &str, body: Option<Value>) -> Value {
        let path = format!("/element/{}/{command}", self.id);
        self.session
            .run(method, &path, body, &format!("{command} on {}", self.css))
            .await
    }
}

impl Session {
    /// Sends a command; its `value`, or the WebDriver error.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, Failure> {
        let mut request = self.http.request(method, format!("{}{path}", self.url));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let failure = |error: &str, detail: String| Failure {
            error: error.to_string(),
            detail,
        };
        let response = request
            .send()
            .await
            .map_err(|e| failure("no answer", e.to_string()))?;
        let status = response.status();
        let text = response
            .text()
            .await
            .map_err(|e| failure("no answer", e.to_string()))?;
        let mut value = match serde_json::from_str::<Value>(&text) {
            Ok(mut answer) => answer["value"].take(),
            Err(_) => return Err(failure("not JSON", format!("{status}: {text}"))),
        };
        if status.is_success() {
            return Ok(value);
        }
        // chromedriver's stack trace is a list of addresses in its own binary: noise in a test.
        if let Some(object) = value.as_object_mut() {
            object.remove("stacktrace");
        }
        let error = value["error"]
            .as_str()
            .unwrap_or("unknown error")
            .to_string();
        Err(Failure {
            error,
            detail: format!("{status} {value}"),
        })
    }

    /// Sends a command and returns its `value`; panics on a WebDriver error, saying what was
    /// being done (`what`).
    async fn run(&self, method: Method, path: &str, body: Option<Value>, what: &str) -> Value {
        match self.call(method.clone(), path, body).await {
            Ok(value) => value,
            Err(f) => panic!(
                "WebDriver {method} {path} ({what}) failed: {}: {}",
                f.error, f.detail
            ),
        }
    }
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

fn by_css(css: &str) -> Value {
    json!({"using": "css selector", "value": css})
}

fn script_body(script: &str, args: &[Value]) -> Value {
    json!({"script": script, "args": args})
}

fn string(value: Value) -> String {
    match value {
        Value::String(s) => s,
        other => panic!("expected a string from WebDriver, got {other}"),
    }
}
