//! Log lines on stderr, at the level `RUST_LOG` says (info by default): text for people, or with
//! `NIXERY_LOG_FORMAT=json` one JSON object a line with the fields Google Cloud Logging reads
//! (<https://cloud.google.com/logging/docs/structured-logging#structured_logging_special_fields>):
//! `severity`, `message`, `time`, and for the line of each HTTP request an `httpRequest`
//! (<https://cloud.google.com/logging/docs/reference/v2/rest/v2/LogEntry#HttpRequest>). The
//! event's other fields, and those of the spans it is in, stay beside them (Cloud Logging keeps
//! them in `jsonPayload`).
//!
//! Lines reach stderr through [`super::log_writer`], in batches.

use std::fmt;
use std::io::IsTerminal;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::{FormatEvent, FormatFields, Writer};
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormattedFields, MakeWriter};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;

use super::log_writer::{LogGuard, LogWriter};
use crate::config::LogFormat;

/// The target of the one line each HTTP request is logged with (by [`crate::http`]); in JSON its
/// fields become the line's `httpRequest`.
pub const REQUEST_TARGET: &str = "nixery::request";

/// The fields of a request line and their names in Cloud Logging's `httpRequest`.
const HTTP_REQUEST_FIELDS: [(&str, &str); 8] = [
    ("method", "requestMethod"),
    ("uri", "requestUrl"),
    ("status", "status"),
    ("latency", "latency"),
    ("user_agent", "userAgent"),
    ("remote_ip", "remoteIp"),
    ("response_size", "responseSize"),
    ("protocol", "protocol"),
];

/// Installs the logger for the whole process, writing `format` to stderr at the level
/// `RUST_LOG` says (info when it is unset or cannot be read). Call once, at start-up, and keep
/// the guard until the end: dropping it writes the lines still gathered.
pub fn init(format: LogFormat) -> std::io::Result<LogGuard<std::io::Stderr>> {
    let (writer, guard) = LogWriter::start(std::io::stderr())?;
    match format {
        LogFormat::Text => tracing_subscriber::fmt()
            .with_env_filter(filter())
            .with_writer(writer)
            .with_ansi(std::io::stderr().is_terminal())
            .init(),
        LogFormat::Json => json_subscriber(writer, filter()).init(),
    }
    Ok(guard)
}

fn filter() -> EnvFilter {
    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"))
}

/// A subscriber that writes Cloud Logging's JSON lines to `writer`.
fn json_subscriber<W>(writer: W, filter: EnvFilter) -> impl Subscriber + Send + Sync + 'static
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(false)
        .fmt_fields(JsonFields)
        .event_format(CloudLogging)
        .finish()
}

/// Writes each event as one JSON line for Cloud Logging (see the module's documentation).
pub struct CloudLogging;

impl<S> FormatEvent<S, JsonFields> for CloudLogging
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, JsonFields>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut fields = Map::new();
        // Outermost span first, so that inner spans and then the event win a clash.
        for span in ctx
            .event_scope()
            .into_iter()
            .flat_map(|scope| scope.from_root())
        {
            if let Some(formatted) = span.extensions().get::<FormattedFields<JsonFields>>()
                && let Ok(Value::Object(span_fields)) = serde_json::from_str(&formatted.fields)
            {
                fields.extend(span_fields);
            }
        }
        event.record(&mut JsonVisitor(&mut fields));
        let mut time = String::new();
        SystemTime.format_time(&mut Writer::new(&mut time))?;
        let line = cloud_logging_line(
            *event.metadata().level(),
            event.metadata().target(),
            time,
            fields,
        );
        writeln!(writer, "{line}")
    }
}

/// The line of an event at `level` from `target` at `time` (RFC 3339) with `fields`.
fn cloud_logging_line(
    level: Level,
    target: &str,
    time: String,
    mut fields: Map<String, Value>,
) -> Value {
    let message = fields.remove("message").unwrap_or_else(|| Value::from(""));
    // Records of the `log` crate come with their target and place as fields.
    let target = match fields.remove("log.target") {
        Some(Value::String(target)) => target,
        _ => target.to_owned(),
    };
    fields.retain(|name, _| !name.starts_with("log."));
    if target == REQUEST_TARGET {
        let mut request = Map::new();
        for (field, name) in HTTP_REQUEST_FIELDS {
            if let Some(value) = fields.remove(field) {
                request.insert(name.to_owned(), http_request_value(name, value));
            }
        }
        fields.insert("httpRequest".to_owned(), Value::Object(request));
    }
    fields.insert("severity".to_owned(), Value::from(severity(level)));
    fields.insert("message".to_owned(), message);
    fields.insert("time".to_owned(), Value::from(time));
    fields.insert("target".to_owned(), Value::from(target));
    Value::Object(fields)
}

/// A request field as `httpRequest` has it: `latency` a duration string (`"0.012000s"`),
/// `responseSize` an int64 (a string, as protobuf's JSON writes those).
fn http_request_value(name: &str, value: Value) -> Value {
    match (name, &value) {
        ("latency", Value::Number(seconds)) => {
            Value::from(format!("{:.6}s", seconds.as_f64().unwrap_or_default()))
        }
        ("responseSize", Value::Number(bytes)) => Value::from(bytes.to_string()),
        _ => value,
    }
}

/// Cloud Logging's name for a level (it has no TRACE).
fn severity(level: Level) -> &'static str {
    match level {
        Level::ERROR => "ERROR",
        Level::WARN => "WARNING",
        Level::INFO => "INFO",
        Level::DEBUG | Level::TRACE => "DEBUG",
    }
}

/// Keeps the fields of spans as JSON objects, which [`CloudLogging`] merges into the lines of
/// the events inside them.
pub struct JsonFields;

impl<'writer> FormatFields<'writer> for JsonFields {
    fn format_fields<R: RecordFields>(
        &self,
        mut writer: Writer<'writer>,
        fields: R,
    ) -> fmt::Result {
        let mut map = Map::new();
        fields.record(&mut JsonVisitor(&mut map));
        write!(writer, "{}", Value::Object(map))
    }

    fn add_fields(
        &self,
        current: &'writer mut FormattedFields<Self>,
        fields: &tracing::span::Record<'_>,
    ) -> fmt::Result {
        let mut map = match serde_json::from_str(&current.fields) {
            Ok(Value::Object(map)) => map,
            _ => Map::new(),
        };
        fields.record(&mut JsonVisitor(&mut map));
        current.fields = Value::Object(map).to_string();
        Ok(())
    }
}

/// Records fields as JSON values: numbers and booleans as such, errors with their causes, the
/// rest as the text they print.
struct JsonVisitor<'a>(&'a mut Map<String, Value>);

impl JsonVisitor<'_> {
    fn insert(&mut self, field: &Field, value: Value) {
        self.0.insert(field.name().to_owned(), value);
    }
}

impl Visit for JsonVisitor<'_> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        let number = serde_json::Number::from_f64(value);
        self.insert(
            field,
            number.map_or_else(|| Value::from(value.to_string()), Value::Number),
        );
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.insert(field, Value::from(value));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.insert(field, Value::from(value));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.insert(field, Value::from(value));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.insert(field, Value::from(value));
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        let mut text = value.to_string();
        let mut source = value.source();
        while let Some(cause) = source {
            text.push_str(": ");
            text.push_str(&cause.to_string());
            source = cause.source();
        }
        self.insert(field, Value::from(text));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.insert(field, Value::from(format!("{value:?}")));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// What a subscriber wrote, shared with the test.
    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Buffer {
        type Writer = Buffer;

        fn make_writer(&'a self) -> Buffer {
            self.clone()
        }
    }

    impl Buffer {
        /// Each line written, parsed.
        fn lines(&self) -> Vec<serde_json::Value> {
            let text = String::from_utf8(self.0.lock().unwrap().clone()).unwrap();
            text.lines()
                .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
                .collect()
        }
    }

    /// The JSON lines that `log` writes, at every level.
    fn logged(log: impl FnOnce()) -> Vec<serde_json::Value> {
        let buffer = Buffer::default();
        let subscriber = json_subscriber(buffer.clone(), EnvFilter::new("trace"));
        tracing::subscriber::with_default(subscriber, log);
        buffer.lines()
    }

    fn is_rfc3339(time: &str) -> bool {
        let re = regex::Regex::new(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$").unwrap();
        re.is_match(time)
    }

    #[test]
    fn an_event_is_one_line_with_cloud_loggings_fields() {
        let lines = logged(|| {
            tracing::warn!(
                digest = "sha256:ab",
                layers = 3u64,
                delta = -2i64,
                ratio = 0.5,
                cached = true,
                path = %std::path::Path::new("/nix/store/x").display(),
                "an image lost a blob;\nbuilding it again"
            );
        });
        let [line] = lines.as_slice() else {
            panic!("{lines:?}")
        };
        assert_eq!(line["severity"], "WARNING");
        assert_eq!(line["message"], "an image lost a blob;\nbuilding it again");
        assert!(is_rfc3339(line["time"].as_str().unwrap()), "{line}");
        assert_eq!(line["target"], "nixery::server::logging::tests");
        assert_eq!(line["digest"], "sha256:ab");
        assert_eq!(line["layers"], 3);
        assert_eq!(line["delta"], -2);
        assert_eq!(line["ratio"], 0.5);
        assert_eq!(line["cached"], true);
        assert_eq!(line["path"], "/nix/store/x");
        assert!(line.get("httpRequest").is_none());
    }

    #[test]
    fn levels_are_cloud_logging_severities() {
        let lines = logged(|| {
            tracing::error!("e");
            tracing::warn!("w");
            tracing::info!("i");
            tracing::debug!("d");
            tracing::trace!("t");
        });
        let severities: Vec<&str> = lines
            .iter()
            .map(|l| l["severity"].as_str().unwrap())
            .collect();
        assert_eq!(severities, ["ERROR", "WARNING", "INFO", "DEBUG", "DEBUG"]);
    }

    #[test]
    fn a_request_line_has_an_http_request() {
        let lines = logged(|| {
            tracing::info!(
                target: REQUEST_TARGET,
                method = "GET",
                uri = "/v2/shell/hello/manifests/latest",
                status = 200u16,
                latency = 0.0123,
                user_agent = "docker/27.5.1",
                remote_ip = "127.0.0.1",
                response_size = 1234u64,
                protocol = "HTTP/1.1",
                "request"
            );
        });
        let [line] = lines.as_slice() else {
            panic!("{lines:?}")
        };
        assert_eq!(line["severity"], "INFO");
        assert_eq!(line["message"], "request");
        assert_eq!(
            line["httpRequest"],
            serde_json::json!({
                "requestMethod": "GET",
                "requestUrl": "/v2/shell/hello/manifests/latest",
                "status": 200,
                "latency": "0.012300s",
                "userAgent": "docker/27.5.1",
                "remoteIp": "127.0.0.1",
                "responseSize": "1234",
                "protocol": "HTTP/1.1",
            })
        );
        // Moved into httpRequest, not repeated.
        assert!(line.get("method").is_none() && line.get("status").is_none());
    }

    #[test]
    fn span_fields_and_error_causes_are_kept() {
        #[derive(Debug, thiserror::Error)]
        #[error("building failed")]
        struct Outer(#[source] std::io::Error);

        let lines = logged(|| {
            let span = tracing::info_span!(
                "request",
                method = "GET",
                uri = "/v2/",
                image = tracing::field::Empty
            );
            let _entered = span.enter();
            span.record("image", "shell/hello");
            let inner = tracing::info_span!("build", image = "shell/curl");
            let _inner = inner.enter();
            let err = Outer(std::io::Error::other("disk full"));
            tracing::error!(
                error = &err as &(dyn std::error::Error + 'static),
                "image build failed"
            );
        });
        let [line] = lines.as_slice() else {
            panic!("{lines:?}")
        };
        assert_eq!(line["method"], "GET");
        assert_eq!(line["uri"], "/v2/");
        // The inner span wins.
        assert_eq!(line["image"], "shell/curl");
        assert_eq!(line["error"], "building failed: disk full");
        assert_eq!(line["severity"], "ERROR");
    }

    /// The request line of the HTTP layer itself, through the router, in the JSON format.
    #[tokio::test]
    async fn each_request_is_logged_once_with_its_http_request() {
        use tower::ServiceExt;

        let buffer = Buffer::default();
        let subscriber = json_subscriber(buffer.clone(), EnvFilter::new("info"));
        let _default = tracing::subscriber::set_default(subscriber);
        let request = axum::http::Request::get("/metrics?x=1")
            .header("user-agent", "probe/1.0")
            .body(axum::body::Body::empty())
            .unwrap();
        let response = crate::http::metrics_router()
            .oneshot(request)
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let request = axum::http::Request::head("/nowhere")
            .body(axum::body::Body::empty())
            .unwrap();
        let response = crate::http::metrics_router()
            .oneshot(request)
            .await
            .unwrap();
        assert_eq!(response.status(), 404);

        let lines = buffer.lines();
        let requests: Vec<&serde_json::Value> = lines
            .iter()
            .filter(|l| l["target"] == REQUEST_TARGET)
            .collect();
        assert_eq!(requests.len(), 2, "{lines:?}");
        let metrics = &requests[0]["httpRequest"];
        assert_eq!(metrics["requestMethod"], "GET");
        assert_eq!(metrics["requestUrl"], "/metrics?x=1");
        assert_eq!(metrics["status"], 200);
        assert_eq!(metrics["userAgent"], "probe/1.0");
        assert_eq!(metrics["protocol"], "HTTP/1.1");
        let latency = metrics["latency"].as_str().unwrap();
        assert!(
            latency.ends_with('s') && latency.trim_end_matches('s').parse::<f64>().is_ok(),
            "{latency}"
        );
        let size: u64 = metrics["responseSize"].as_str().unwrap().parse().unwrap();
        assert!(size > 0);
        // No client address without a connection; no agent when none was sent.
        assert!(metrics.get("remoteIp").is_none());
        let missing = &requests[1]["httpRequest"];
        assert_eq!(
            (
                missing["requestMethod"].as_str(),
                missing["status"].as_u64()
            ),
            (Some("HEAD"), Some(404))
        );
        assert!(missing.get("userAgent").is_none());
        assert_eq!(requests[1]["severity"], "INFO");
    }
}
