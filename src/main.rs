//! The `nixery` server: settings, logging, signals, serving.

use std::io::IsTerminal;

use anyhow::Context;
use clap::Parser;
use tracing_subscriber::EnvFilter;

use nixery::config::Config;

/// Threads for blocking work (file reads of blobs being served, packing). Each thread costs
/// memory; past this many, blob reads wait their turn instead.
const MAX_BLOCKING_THREADS: usize = 64;

fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(MAX_BLOCKING_THREADS)
        .build()
        .context("starting the async runtime")?
        .block_on(serve(config))
}

async fn serve(config: Config) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();

    nixery::raise_open_file_limit();
    let state = nixery::state(&config).await?;
    let sources = state.sources.clone();
    let address = std::net::SocketAddr::new(config.listen_address, config.port);
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("cannot listen on {address}: choose another PORT"))?;
    let address = listener.local_addr().context("reading the bound address")?;
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
