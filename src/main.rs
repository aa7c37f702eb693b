//! The `nixery` server: settings, logging, signals, serving.

#![forbid(unsafe_code)]

use std::io::IsTerminal;

use anyhow::Context;
use clap::Parser;
use tracing_subscriber::EnvFilter;

use nixery::config::{Config, PopularityArgs};

/// Threads for blocking work (file reads of blobs being served, packing). Each thread costs
/// memory; past this many, blob reads wait their turn instead.
const MAX_BLOCKING_THREADS: usize = 64;

/// How often the sizes of /nix/store and of the blobs on disk are measured for the metrics (each
/// measurement walks the directories).
const DISK_MEASURE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(300);

fn main() -> anyhow::Result<()> {
    // `nixery popularity …` is a command of its own; anything else configures the server.
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(MAX_BLOCKING_THREADS)
        .build()
        .context("starting the async runtime")?;
    if args.get(1).is_some_and(|a| a == "popularity") {
        args.remove(0);
        let popularity = PopularityArgs::parse_from(args);
        init_logging();
        return runtime.block_on(nixery::popularity(&popularity));
    }
    let config = Config::parse_from(args);
    init_logging();
    runtime.block_on(serve(config))
}

/// Logs to stderr, at the level `RUST_LOG` says (info by default).
fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

async fn serve(config: Config) -> anyhow::Result<()> {
    nixery::raise_open_file_limit();
    let state = nixery::state(&config).await?;
    let sources = state.sources.clone();
    let address = std::net::SocketAddr::new(config.listen_address, config.port);
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("cannot listen on {address}: choose another PORT"))?;
    let address = listener.local_addr().context("reading the bound address")?;
    if let Some(metrics_address) = config.metrics_address {
        let metrics = tokio::net::TcpListener::bind(metrics_address)
            .await
            .with_context(|| {
                format!("cannot listen on {metrics_address}: choose another NIXERY_METRICS_ADDRESS")
            })?;
        let metrics_address = metrics.local_addr().context("reading the bound address")?;
        tracing::info!(%metrics_address, "metrics are served at /metrics");
        tokio::spawn(async move {
            if let Err(e) = axum::serve(metrics, nixery::http::metrics_router()).await {
                tracing::error!(error = %e, "serving metrics failed");
            }
        });
    }
    let blobs = (config.storage_backend == nixery::config::StorageBackend::Filesystem)
        .then(|| config.storage_path.join("blobs"));
    nixery::metrics::measure_disks(blobs, DISK_MEASURE_INTERVAL);
    tracing::info!(%address, source = %sources.describe(), storage = %config.storage_path.display(), "nixery is serving");
    axum::serve(listener, nixery::app(state))
        .with_graceful_shutdown(shutdown())
        .await
        .context("serving")?;
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler installs");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
}
