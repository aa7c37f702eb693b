//! The accept loop and what it bounds: how many connections are open
//! (`NIXERY_MAX_CONNECTIONS`), how long a client may take to send a request's headers
//! (`NIXERY_HEADER_TIMEOUT`) or leave a connection without a byte moving
//! (`NIXERY_IDLE_TIMEOUT`); and the graceful shutdown (`NIXERY_SHUTDOWN_GRACE`).
//!
//! Connections are served by hyper's HTTP/1 connection directly (registry clients speak
//! HTTP/1.1): its header timer runs from the moment a connection is accepted, and again while a
//! kept-alive connection waits for its next request. (hyper-util's `auto` builder reads the
//! protocol version before it, so a client that sends nothing would never time out.)
//!
//! A place among the connections is taken before `accept`, so past the cap new connections wait
//! in the kernel's backlog instead of taking a file descriptor each.

use std::convert::Infallible;
use std::io;
use std::path::Path;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicIsize, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::http::{Request, Response};
use bytes::Bytes;
use futures::FutureExt;
use futures::future::BoxFuture;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::builder::Images;
use crate::builder::events::Status;
use crate::command;
use crate::config::Config;
use crate::server::metrics::METRICS;

/// Connections the kernel keeps waiting to be accepted (it caps this at `net.core.somaxconn`,
/// 4096 by default). Past NIXERY_MAX_CONNECTIONS new connections wait here; past the backlog
/// too, the kernel drops their SYNs and clients send them again after 1 s, 3 s, 7 s…
const LISTEN_BACKLOG: u32 = 4096;

/// The share of the open-file limit that client connections may take by default; the rest is
/// for blobs being read, Nix's pipes, storage and the log.
const CONNECTION_SHARE_PERCENT: u64 = 80;

/// How often at most the log says the connection limit was reached (it may be reached many
/// times a second under a flood).
const LIMIT_WARNING_INTERVAL: Duration = Duration::from_secs(10);

/// How long the accept loop pauses after an error such as "too many open files", instead of
/// trying again at once; and how often at most such errors are logged.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);
const ACCEPT_ERROR_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// How often, while shutting down, the running builds are looked at again.
const SHUTDOWN_POLL: Duration = Duration::from_millis(100);

/// After the builds still running at the end of the grace are cancelled, how long the requests
/// that waited for them get to answer (with an error) before their connections are closed.
const CANCELLED_ANSWER_TIME: Duration = Duration::from_secs(1);

/// What bounds each connection.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// `NIXERY_HEADER_TIMEOUT`: a request's headers must be complete within this, counted from
    /// when the connection was accepted or its previous response was sent.
    pub header_timeout: Duration,
    /// `NIXERY_IDLE_TIMEOUT`: a connection on which no byte moved for this long, while the
    /// server is working on nothing for it, is closed.
    pub idle_timeout: Duration,
    /// `NIXERY_MAX_CONNECTIONS`: connections open at once.
    pub max_connections: usize,
}

impl Limits {
    /// The limits `config` sets; the default connection cap comes from the open-file limit, so
    /// call this after [`raise_open_file_limit`].
    pub fn new(config: &Config) -> Limits {
        Limits {
            header_timeout: Duration::from_secs(config.header_timeout),
            idle_timeout: Duration::from_secs(config.idle_timeout),
            max_connections: config
                .max_connections
                .map_or_else(default_max_connections, |n| n as usize),
        }
    }
}

/// Raises the soft limit on open files to the hard limit: every client connection and every blob
/// being served holds a descriptor, and the usual soft limit of 1024 is low for a registry.
pub fn raise_open_file_limit() {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        let raised = Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        if let Err(e) = setrlimit(Resource::Nofile, raised) {
            tracing::warn!(error = %e, "could not raise the open file limit");
        }
    }
}

/// [`CONNECTION_SHARE_PERCENT`] of the soft limit on open files (no cap when it is unlimited).
pub fn default_max_connections() -> usize {
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    limit.current.map_or(Semaphore::MAX_PERMITS, |files| {
        usize::try_from(files.saturating_mul(CONNECTION_SHARE_PERCENT) / 100)
            .unwrap_or(Semaphore::MAX_PERMITS)
            .clamp(1, Semaphore::MAX_PERMITS)
    })
}

/// Listens on `address` with a backlog of [`LISTEN_BACKLOG`] (the standard library's `bind`
/// asks for 128).
pub fn bind(address: std::net::SocketAddr) -> io::Result<TcpListener> {
    let socket = match address {
        std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(address)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Writes `addresses`, one a line, to `path` (NIXERY_ADDRESS_FILE): into a temporary file in the
/// same directory, renamed over `path`, so whoever waits for the file reads it whole.
pub fn write_address_file(path: &Path, addresses: &[std::net::SocketAddr]) -> io::Result<()> {
    use std::io::Write as _;
    let dir = path
        .parent()
        .filter(|dir| !dir.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut file = tempfile::NamedTempFile::new_in(dir)?;
    for address in addresses {
        writeln!(file, "{address}")?;
    }
    file.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// The connections being served, each a task; dropping this closes those still open.
pub struct Connections {
    tasks: JoinSet<()>,
}

impl Connections {
    /// How many are open.
    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    /// Waits until one has closed (at once if none is open).
    async fn one_closed(&mut self) {
        if let Some(Err(e)) = self.tasks.join_next().await
            && e.is_panic()
        {
            tracing::error!(error = %e, "a connection's task panicked");
        }
    }

    /// Waits until every connection has closed, or until `deadline`; returns how many are left.
    pub async fn closed_by(&mut self, deadline: tokio::time::Instant) -> usize {
        while !self.is_empty() {
            if tokio::time::timeout_at(deadline, self.one_closed())
                .await
                .is_err()
            {
                break;
            }
        }
        self.len()
    }
}

/// Serves `app` on `listener` within `limits` until `stop` is cancelled. Then it stops
/// accepting, and every open connection finishes the request it is serving (if any) and closes;
/// the connections still open are returned, to be waited for.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    stop: CancellationToken,
) -> Connections {
    let places = Arc::new(Semaphore::new(limits.max_connections));
    let mut connections = Connections {
        tasks: JoinSet::new(),
    };
    let mut limit_warning = Every::new(LIMIT_WARNING_INTERVAL);
    let mut error_log = Every::new(ACCEPT_ERROR_LOG_INTERVAL);
    let address = listener
        .local_addr()
        .map_or_else(|_| "?".to_owned(), |a| a.to_string());
    'accepting: loop {
        let place = match places.clone().try_acquire_owned() {
            Ok(place) => place,
            Err(_) => {
                METRICS.connection_limit_reached.inc();
                if let Some(times) = limit_warning.tick() {
                    tracing::warn!(
                        %address,
                        max_connections = limits.max_connections,
                        times,
                        "connection limit reached: new connections wait in the backlog until one closes (NIXERY_MAX_CONNECTIONS)"
                    );
                }
                loop {
                    tokio::select! {
                        place = places.clone().acquire_owned() => match place {
                            Ok(place) => break place,
                            // The semaphore is never closed.
                            Err(_) => break 'accepting,
                        },
                        () = connections.one_closed(), if !connections.is_empty() => {}
                        () = stop.cancelled() => break 'accepting,
                    }
                }
            }
        };
        let accepted = loop {
            tokio::select! {
                accepted = listener.accept() => break accepted,
                () = connections.one_closed(), if !connections.is_empty() => {}
                () = stop.cancelled() => break 'accepting,
            }
        };
        match accepted {
            Ok((stream, peer)) => {
                let stop = stop.clone();
                let app = app.clone();
                connections.tasks.spawn(async move {
                    if let Err(e) = connection(stream, peer, app, limits, stop, place).await {
                        tracing::debug!(%peer, error = %e, "connection closed");
                    }
                });
            }
            // The client gave up before it was accepted: nothing to do about it.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
                ) => {}
            Err(e) => {
                if let Some(times) = error_log.tick() {
                    tracing::error!(%address, error = %e, times, "accepting connections failed; trying again");
                }
                tokio::select! {
                    () = tokio::time::sleep(ACCEPT_ERROR_PAUSE) => {}
                    () = stop.cancelled() => break 'accepting,
                }
            }
        }
    }
    // Closing the listener refuses what waits in its backlog; the connections saw `stop` too.
    drop(listener);
    connections
}

/// The end of serving, after `serve` returned `connections`: waits up to `grace` for them to
/// close and for the builds still running to finish, cancels the builds left, gives the requests
/// that waited for them a moment to answer, closes what is left, and stops every process still
/// running (SIGTERM, SIGKILL after [`command::KILL_GRACE`]).
pub async fn shut_down(mut connections: Connections, images: &dyn Images, grace: Duration) {
    let started = tokio::time::Instant::now();
    let deadline = started + grace;
    tracing::info!(
        connections = connections.len(),
        builds = running_builds(images),
        grace_s = grace.as_secs(),
        "no new connections; waiting for the responses in flight and the builds running"
    );
    loop {
        let builds = running_builds(images);
        if connections.is_empty() && builds == 0 {
            tracing::info!(
                waited_ms = started.elapsed().as_millis() as u64,
                "every connection closed and every build finished"
            );
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::info!(
                connections = connections.len(),
                builds,
                "the grace is over (NIXERY_SHUTDOWN_GRACE)"
            );
            break;
        }
        let poll = deadline.min(tokio::time::Instant::now() + SHUTDOWN_POLL);
        let _ = tokio::time::timeout_at(poll, connections.one_closed()).await;
    }
    let cancelled = images.cancel_builds();
    if cancelled > 0 {
        tracing::info!(cancelled, "builds cancelled");
    }
    let left = connections
        .closed_by(tokio::time::Instant::now() + CANCELLED_ANSWER_TIME)
        .await;
    if left > 0 {
        tracing::info!(connections = left, "closing the connections still open");
    }
    drop(connections);
    match tokio::task::spawn_blocking(|| command::stop_all(command::KILL_GRACE)).await {
        Ok(stopped) if stopped.groups > 0 => tracing::info!(
            groups = stopped.groups,
            killed = stopped.killed,
            "processes stopped"
        ),
        Ok(_) => {}
        Err(e) => tracing::error!(error = %e, "stopping the processes failed"),
    }
}

/// Builds running (or waiting for a place) now.
fn running_builds(images: &dyn Images) -> usize {
    images
        .recent_builds(usize::MAX)
        .iter()
        .take_while(|run| run.status() == Status::Running)
        .count()
}

/// Serves one connection until it closes, the client stays idle too long, or after `stop`, the
/// request in flight is answered. `place` is given back when it ends.
async fn connection(
    stream: TcpStream,
    peer: std::net::SocketAddr,
    app: Router,
    limits: Limits,
    stop: CancellationToken,
    place: OwnedSemaphorePermit,
) -> Result<(), hyper::Error> {
    let _open = Open::new(place);
    // A response's last segment is sent at once, not held back (Nagle's algorithm) until the
    // client acknowledges the one before, which a client delaying its ACKs makes take 40 ms.
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(%peer, error = %e, "could not set TCP_NODELAY");
    }
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(Watched {
        stream,
        activity: activity.clone(),
    });
    let service = Handler {
        app: TowerToHyperService::new(app.into_service()),
        activity: activity.clone(),
        peer,
    };
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let mut served = pin!(http.serve_connection(io, service));
    // The watchdog runs in a task of its own (aborted with this set): if it woke this task to
    // look at the clock, hyper would be polled too and might write a few bytes the kernel took
    // without saying the socket was writable, which would count as activity.
    let mut watchdog = JoinSet::new();
    watchdog.spawn(async move { activity.idle(limits.idle_timeout).await });
    let mut stopping = false;
    loop {
        tokio::select! {
            biased;
            Some(_) = watchdog.join_next() => {
                tracing::debug!("closing a connection idle for NIXERY_IDLE_TIMEOUT");
                return Ok(());
            }
            result = served.as_mut() => return result,
            () = stop.cancelled(), if !stopping => {
                stopping = true;
                served.as_mut().graceful_shutdown();
            }
        }
    }
}

/// Counts a connection in `connections_open` and holds its place while it lives.
struct Open {
    _place: OwnedSemaphorePermit,
}

impl Open {
    fn new(place: OwnedSemaphorePermit) -> Open {
        METRICS.connections_open.inc();
        Open { _place: place }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        METRICS.connections_open.dec();
    }
}

/// What a connection's idle watchdog looks at.
struct Activity {
    opened: tokio::time::Instant,
    /// Milliseconds after `opened` at which a byte last moved, or work on a request began or
    /// ended.
    last: AtomicU64,
    /// What the server is doing for this connection: +1 for each handler running and each
    /// response body waiting for its next part; -1 for each request body waiting for the client
    /// (a handler reading a body the client does not send is waiting on the client, not the
    /// server). The connection may be idle only when this is 0 or less.
    working: AtomicIsize,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            opened: tokio::time::Instant::now(),
            last: AtomicU64::new(0),
            working: AtomicIsize::new(0),
        }
    }

    fn touch(&self) {
        let now = self.opened.elapsed().as_millis() as u64;
        self.last.fetch_max(now, Ordering::Relaxed);
    }

    fn work(&self, change: isize) {
        self.working.fetch_add(change, Ordering::SeqCst);
        self.touch();
    }

    fn quiet(&self) -> Duration {
        let last = Duration::from_millis(self.last.load(Ordering::Relaxed));
        self.opened.elapsed().saturating_sub(last)
    }

    /// Resolves once no byte has moved for `timeout` while the server works on nothing.
    async fn idle(&self, timeout: Duration) {
        loop {
            let quiet = self.quiet();
            if quiet < timeout {
                tokio::time::sleep(timeout - quiet).await;
            } else if self.working.load(Ordering::SeqCst) <= 0 {
                return;
            } else {
                tokio::time::sleep(timeout).await;
            }
        }
    }
}

/// The TCP stream, noting each byte read or written in the connection's [`Activity`].
struct Watched {
    stream: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.activity.touch();
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.stream).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        polled
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// The app as hyper calls it for one connection, telling its [`Activity`] when the server is
/// working on a request and when it waits on the client.
struct Handler {
    app: TowerToHyperService<axum::routing::RouterIntoService<Body>>,
    activity: Arc<Activity>,
    /// The client's address, for the request log (`remoteIp`).
    peer: std::net::SocketAddr,
}

impl hyper::service::Service<Request<Incoming>> for Handler {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response<Body>, Infallible>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let working = Working::new(self.activity.clone(), 1);
        let activity = self.activity.clone();
        let mut request = request;
        request
            .extensions_mut()
            .insert(axum::extract::ConnectInfo(self.peer));
        let request = request.map(|body| {
            Body::new(Watching {
                inner: body,
                pending: Working::idle(activity.clone(), -1),
            })
        });
        let response = hyper::service::Service::call(&self.app, request);
        async move {
            let response = response.await?;
            drop(working);
            Ok(response.map(|body| {
                Body::new(Watching {
                    inner: body,
                    pending: Working::idle(activity, 1),
                })
            }))
        }
        .boxed()
    }
}

/// A change to an [`Activity`]'s `working` while it is applied, undone when dropped.
struct Working {
    activity: Arc<Activity>,
    change: isize,
    applied: bool,
}

impl Working {
    fn new(activity: Arc<Activity>, change: isize) -> Working {
        let mut working = Working::idle(activity, change);
        working.set(true);
        working
    }

    /// Not applied yet.
    fn idle(activity: Arc<Activity>, change: isize) -> Working {
        Working {
            activity,
            change,
            applied: false,
        }
    }

    fn set(&mut self, applied: bool) {
        if applied != self.applied {
            self.applied = applied;
            self.activity
                .work(if applied { self.change } else { -self.change });
        }
    }
}

impl Drop for Working {
    fn drop(&mut self) {
        self.set(false);
    }
}

/// A body whose waits count in the connection's [`Activity`]: a request body's wait for the
/// client (-1), a response body's wait for the server (+1).
struct Watching<B> {
    inner: B,
    pending: Working,
}

impl<B> hyper::body::Body for Watching<B>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        this.pending.set(polled.is_pending());
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Lets an event through at most once per interval, counting those held back.
struct Every {
    interval: Duration,
    last: Option<Instant>,
    held: u64,
}

impl Every {
    fn new(interval: Duration) -> Every {
        Every {
            interval,
            last: None,
            held: 0,
        }
    }

    /// `Some(times the event happened since the last one let through, this one included)`
    /// when this one goes through.
    fn tick(&mut self) -> Option<u64> {
        self.held += 1;
        if self.last.is_some_and(|last| last.elapsed() < self.interval) {
            return None;
        }
        self.last = Some(Instant::now());
        Some(std::mem::take(&mut self.held))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_lets_one_event_through_per_interval_and_counts_the_rest() {
        let mut every = Every::new(Duration::from_millis(200));
        assert_eq!(every.tick(), Some(1));
        assert_eq!(every.tick(), None);
        assert_eq!(every.tick(), None);
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(every.tick(), Some(3));
    }

    #[tokio::test]
    async fn a_connection_is_idle_only_when_quiet_and_the_server_works_on_nothing() {
        let activity = Arc::new(Activity::new());
        let timeout = Duration::from_millis(200);
        // A handler at work (a build being waited for): not idle, however quiet.
        let handler = Working::new(activity.clone(), 1);
        let idle = tokio::time::timeout(timeout * 5, activity.idle(timeout));
        assert!(
            idle.await.is_err(),
            "a request being worked on made it idle"
        );
        // A handler waiting for a body the client does not send waits on the client.
        let mut body = Working::idle(activity.clone(), -1);
        body.set(true);
        let started = Instant::now();
        activity.idle(timeout).await;
        assert!(started.elapsed() >= timeout);
        body.set(false);
        // Once the work ends, the connection is idle a timeout later.
        drop(handler);
        let started = Instant::now();
        activity.idle(timeout).await;
        let waited = started.elapsed();
        assert!(waited >= timeout && waited < timeout * 2, "{waited:?}");
        // A byte moving starts the clock again.
        tokio::time::sleep(timeout / 2).await;
        activity.touch();
        let started = Instant::now();
        activity.idle(timeout).await;
        assert!(started.elapsed() >= timeout - Duration::from_millis(5));
    }
}
