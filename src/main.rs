//! The `nixery` command: the server (settings, logging, signals: SIGINT/SIGTERM stop it, SIGHUP
//! re-reads the htpasswd file, the declared images and the allowed commits), and `nixery
//! popularity`.

#![forbid(unsafe_code)]

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use nixery::config::{Config, Invocation, LogFormat, PopularityArgs};
use nixery::server::metrics::METRICS;
use nixery::{image, nix, source};

/// Threads for blocking work (file reads of blobs being served, packing). Each thread costs
/// memory; past this many, blob reads wait their turn instead.
const MAX_BLOCKING_THREADS: usize = 64;

/// How long, at exit, blocking work still running after every task has stopped (a layer being
/// packed, a file being read) may go on before the process exits anyway.
const BLOCKING_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Connections open at once on NIXERY_METRICS_ADDRESS (a scraper or two).
const METRICS_CONNECTIONS: usize = 16;

/// How often the sizes of /nix/store and of the blobs on disk are measured for the metrics (each
/// measurement walks the directories).
const DISK_MEASURE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(300);

fn main() -> anyhow::Result<()> {
    let invocation = Invocation::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(MAX_BLOCKING_THREADS)
        .build()
        .context("starting the async runtime")?;
    let config = match invocation {
        Invocation::Serve(config) => config,
        Invocation::Popularity(args) => {
            let _log =
                nixery::server::logging::init(LogFormat::Text).context("starting the log")?;
            return runtime.block_on(popularity(&args));
        }
    };
    let _log = nixery::server::logging::init(config.log_format).context("starting the log")?;
    let staging = runtime.block_on(serve(config))?;
    // Every task is dropped here; blocking work (a layer being packed) gets a moment to end.
    runtime.shutdown_timeout(BLOCKING_GRACE);
    staging.remove_leftovers();
    tracing::info!("stopped");
    Ok(())
}

/// Serves until SIGINT or SIGTERM, then shuts down gracefully (`NIXERY_SHUTDOWN_GRACE`); returns
/// the storage's staging, to be cleared once every task has stopped.
async fn serve(config: Config) -> anyhow::Result<nixery::storage::Staging> {
    nixery::server::serve::raise_open_file_limit();
    let limits = nixery::server::serve::Limits::new(&config);
    let stop = CancellationToken::new();
    let signals = signals().context("installing the SIGINT and SIGTERM handlers")?;
    let state = nixery::state::open(&config).await?;
    reload_on_hangup(&state)?;
    let sources = state.sources.clone();
    let address = std::net::SocketAddr::new(config.listen_address, config.port);
    let listener = nixery::server::serve::bind(address)
        .with_context(|| format!("cannot listen on {address}: choose another PORT"))?;
    let address = listener.local_addr().context("reading the bound address")?;
    let mut addresses = vec![address];
    if let Some(metrics_address) = config.metrics_address {
        let metrics = nixery::server::serve::bind(metrics_address).with_context(|| {
            format!("cannot listen on {metrics_address}: choose another NIXERY_METRICS_ADDRESS")
        })?;
        let metrics_address = metrics.local_addr().context("reading the bound address")?;
        tracing::info!(%metrics_address, "metrics are served at /metrics");
        addresses.push(metrics_address);
        let limits = nixery::server::serve::Limits {
            max_connections: METRICS_CONNECTIONS,
            ..limits
        };
        let stop = stop.clone();
        // Its connections are closed with the rest when the runtime stops.
        tokio::spawn(nixery::server::serve::serve(
            metrics,
            nixery::http::metrics_router(),
            limits,
            stop,
        ));
    }
    let blobs = (config.storage_backend == nixery::config::StorageBackend::Filesystem)
        .then(|| config.storage_path.join("blobs"));
    nixery::server::metrics::measure_disks(blobs, DISK_MEASURE_INTERVAL, stop.clone());
    tracing::info!(
        %address,
        source = %sources.describe(),
        storage = %config.storage_path.display(),
        max_connections = limits.max_connections,
        "nixery is serving"
    );
    if let Some(path) = &config.address_file {
        nixery::server::serve::write_address_file(path, &addresses)
            .with_context(|| format!("writing NIXERY_ADDRESS_FILE {}", path.display()))?;
    }
    tokio::spawn({
        let stop = stop.clone();
        async move {
            signals.await;
            stop.cancel();
        }
    });

    let connections =
        nixery::server::serve::serve(listener, nixery::app(state.clone()), limits, stop).await;
    let grace = std::time::Duration::from_secs(config.shutdown_grace);
    nixery::server::serve::shut_down(connections, &*state.images, grace).await;
    Ok(state.storage.staging().clone())
}

/// SIGHUP re-reads the htpasswd file, the declared images and the allowed commits (counted in
/// `nixery_reloads_total`); without them it is only logged (its default action would end the
/// server).
fn reload_on_hangup(state: &nixery::state::AppState) -> anyhow::Result<()> {
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("installing the SIGHUP handler")?;
    let (auth, declared) = (state.auth.clone(), state.declared.clone());
    let pinned = state.sources.clone();
    tokio::spawn(async move {
        while hangup.recv().await.is_some() {
            match &auth {
                Some(auth) => auth.reload().await,
                None => tracing::info!("SIGHUP: no NIXERY_AUTH_HTPASSWD to read again"),
            }
            match declared.reload() {
                Ok(Some(images)) => {
                    METRICS.reloaded("images", true);
                    tracing::info!(images, "declared images read again")
                }
                Ok(None) => tracing::info!("SIGHUP: no NIXERY_IMAGES to read again"),
                Err(e) => {
                    METRICS.reloaded("images", false);
                    tracing::error!(error = %e, "declared images not read again; the old ones stay")
                }
            }
            match pinned.reload_allowed_commits() {
                Ok(Some(commits)) => {
                    METRICS.reloaded("allowed_commits", true);
                    tracing::info!(commits, "allowed commits read again")
                }
                Ok(None) => tracing::info!("SIGHUP: no NIXERY_ALLOWED_COMMITS to read again"),
                Err(e) => {
                    METRICS.reloaded("allowed_commits", false);
                    tracing::error!(error = %e, "allowed commits not read again; the old ones stay")
                }
            }
        }
    });
    Ok(())
}

/// `nixery popularity`: counts the package set's popularity and writes the JSON that
/// `NIX_POPULARITY_URL` reads; the packages that failed to build are listed on stderr.
async fn popularity(args: &PopularityArgs) -> anyhow::Result<()> {
    let origin = nixery::state::canonical(args.packages.source().map_err(anyhow::Error::msg)?)?;
    let work = tempfile::tempdir().context("creating a temporary directory")?;
    let timeout = std::time::Duration::from_secs(args.timeout);
    let sources = source::Sources::open(
        source::Settings {
            origin,
            ttl: std::time::Duration::ZERO,
            channel_url: args.packages.channel_url.clone(),
            tarball_url: args.packages.nixpkgs_tarball_url.clone(),
            keep: 1,
            fetch_timeout: timeout,
            // The operator names the commit to count.
            commit_pins: source::CommitPins::Any,
            allowed_commits: source::AllowedCommits::none(),
            records: None,
        },
        &args
            .storage_path
            .as_deref()
            .unwrap_or(work.path())
            .join("sources"),
    )
    .context("preparing the package source")?;
    let tag: image::Tag = args.tag.parse().context("--tag")?;
    let pin = sources.pin(&tag).await.context("resolving --tag")?;
    let tree = sources
        .tree(&pin)
        .await
        .context("fetching the package set")?;
    if let source::Pin::Commit { commit, source } = &pin {
        tracing::info!(%source, %commit, "counting the package set of a commit");
    }
    let pkgs_path = tree.path().to_path_buf();

    let env =
        nixery::state::nix_environment(&args.nix_config.replace("\\n", "\n"), "", work.path())
            .await?;
    let counted = nix::popularity_count::count(
        &pkgs_path,
        &nix::current_system(),
        work.path(),
        &env,
        timeout,
    )
    .await
    .context("counting popularity")?;
    if counted.packages.is_empty() {
        anyhow::bail!("no package of {} could be built", pkgs_path.display());
    }
    let mut json = serde_json::to_string_pretty(&counted.counts).context("writing JSON")?;
    json.push('\n');
    match &args.output {
        Some(path) => {
            std::fs::write(path, &json).with_context(|| format!("writing {}", path.display()))?
        }
        None => {
            use std::io::Write;
            std::io::stdout()
                .write_all(json.as_bytes())
                .context("writing to standard output")?;
        }
    }
    tracing::info!(
        packages = counted.packages.len(),
        paths = counted.counts.len(),
        failed = counted.failed.len(),
        "counted popularity"
    );
    if !counted.failed.is_empty() {
        tracing::warn!(
            "skipped {} packages that failed to build: {}",
            counted.failed.len(),
            counted.failed.join(", ")
        );
    }
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
fn signals() -> std::io::Result<impl Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    Ok(async move {
        let name = tokio::select! {
            _ = interrupt.recv() => "SIGINT",
            _ = terminate.recv() => "SIGTERM",
        };
        tracing::info!(signal = name, "shutting down");
    })
}
