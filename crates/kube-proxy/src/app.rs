//! Wiring: a source feeds the change tracker, the sync runner drives the backend.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use backend_nftables::apply::NftCommand;
use backend_nftables::plan::NftConfig;
use backend_nftables::NftablesProxier;
use proxy_core::proxier::Proxier;
use proxy_core::runner::{self, RunnerConfig};
use proxy_core::status::SyncStatus;
use proxy_core::tracker::ChangeTracker;
use tokio::sync::{mpsc, watch};

/// Everything `run` needs, resolved from flags and the config file.
#[derive(Debug, Clone)]
pub struct RunSettings {
    pub node_name: String,
    pub manifests: PathBuf,
    /// How often the manifests are checked for changes.
    pub poll_interval: Duration,
    pub nftables: NftConfig,
    pub runner: RunnerConfig,
}

/// Builds the backend for the configured mode.
pub fn nftables_proxier(config: NftConfig) -> Box<dyn Proxier> {
    Box::new(NftablesProxier::new(config, NftCommand::default()))
}

/// Removes every rule any mode of ours created.
pub fn cleanup() -> anyhow::Result<()> {
    let mut proxier = nftables_proxier(NftConfig::default());
    proxier.cleanup().context("removing nftables rules")?;
    tracing::info!("removed kube-proxy nftables tables (ip and ip6 kube-proxy)");
    Ok(())
}

/// Runs the proxy until SIGTERM or SIGINT. Rules stay in place on exit, as upstream's do,
/// so traffic keeps flowing while the proxy restarts.
pub async fn run(settings: RunSettings) -> anyhow::Result<()> {
    tracing::info!(
        node = %settings.node_name,
        manifests = %settings.manifests.display(),
        "starting kube-proxy in nftables mode"
    );
    let (updates_tx, updates_rx) = mpsc::channel(64);
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let status = Arc::new(SyncStatus::default());

    // The first load must work: a proxy with a wrong path should say so and stop.
    let source = tokio::spawn(source_files::watch(
        settings.manifests.clone(),
        settings.node_name.clone(),
        settings.poll_interval,
        updates_tx,
    ));
    let sync_loop = tokio::spawn(runner::run(
        updates_rx,
        ChangeTracker::new(settings.node_name.clone()),
        nftables_proxier(settings.nftables.clone()),
        settings.runner,
        Arc::clone(&status),
        shutdown_rx,
    ));

    let mut source = source;
    tokio::select! {
        result = &mut source => {
            let _ = shutdown_tx.send(true);
            let _ = sync_loop.await;
            return match result {
                Ok(Ok(())) => Ok(()),
                Ok(Err(err)) => Err(anyhow::Error::new(err).context("reading manifests")),
                Err(join) => Err(anyhow::anyhow!("manifest source task failed: {join}")),
            };
        }
        signal = shutdown_signal() => {
            signal?;
            tracing::info!("shutting down; programmed rules stay in place");
        }
    }
    source.abort();
    let _ = shutdown_tx.send(true);
    sync_loop.await.context("sync loop task failed")?;
    Ok(())
}

async fn shutdown_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
