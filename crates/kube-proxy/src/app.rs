//! Wiring: a source feeds the change tracker, the sync runner drives the backend.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use backend_iptables::apply::IptablesCommand;
use backend_iptables::plan::IptConfig;
use backend_iptables::IptablesProxier;
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
    pub source: SourceSettings,
    pub backend: BackendSettings,
    pub runner: RunnerConfig,
}

/// Where Services and endpoints come from.
#[derive(Debug, Clone)]
pub enum SourceSettings {
    /// `--manifests PATH`, checked for changes every `poll_interval`.
    Manifests {
        path: PathBuf,
        poll_interval: Duration,
    },
}

/// Which datapath programs the Services.
#[derive(Debug, Clone)]
pub enum BackendSettings {
    Nftables(NftConfig),
    Iptables(IptConfig),
}

impl BackendSettings {
    pub fn mode(&self) -> &'static str {
        match self {
            BackendSettings::Nftables(_) => "nftables",
            BackendSettings::Iptables(_) => "iptables",
        }
    }

    /// Builds the backend.
    pub fn proxier(&self) -> Box<dyn Proxier> {
        match self {
            BackendSettings::Nftables(config) => {
                Box::new(NftablesProxier::new(config.clone(), NftCommand::default()))
            }
            BackendSettings::Iptables(config) => Box::new(IptablesProxier::new(
                config.clone(),
                IptablesCommand::detect(),
            )),
        }
    }

    /// One of each mode, with default settings (enough to clean up).
    fn all_modes() -> [BackendSettings; 2] {
        [
            BackendSettings::Nftables(NftConfig::default()),
            BackendSettings::Iptables(IptConfig::default()),
        ]
    }
}

/// Removes the rules of every mode but `mode` (ours, or upstream's that use the same
/// names), so that switching modes leaves no stale rules behind. Failures are logged.
fn remove_other_modes(mode: &str) {
    for backend in BackendSettings::all_modes() {
        if backend.mode() == mode {
            continue;
        }
        if let Err(err) = backend.proxier().cleanup() {
            tracing::warn!(mode = backend.mode(), error = %err, "could not remove the rules of another mode");
        }
    }
}

/// Removes every rule any mode of ours created, also when there is none.
pub fn cleanup() -> anyhow::Result<()> {
    for backend in BackendSettings::all_modes() {
        backend
            .proxier()
            .cleanup()
            .with_context(|| format!("removing {} rules", backend.mode()))?;
        tracing::info!(mode = backend.mode(), "removed rules");
    }
    Ok(())
}

/// Runs the proxy until SIGTERM or SIGINT. Rules stay in place on exit, as upstream's do,
/// so traffic keeps flowing while the proxy restarts.
pub async fn run(settings: RunSettings) -> anyhow::Result<()> {
    tracing::info!(
        node = %settings.node_name,
        mode = settings.backend.mode(),
        "starting kube-proxy"
    );
    remove_other_modes(settings.backend.mode());
    let (updates_tx, updates_rx) = mpsc::channel(64);
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let status = Arc::new(SyncStatus::default());

    // A source that cannot start (e.g. a wrong manifests path) ends the proxy with its error.
    let source = match &settings.source {
        SourceSettings::Manifests {
            path,
            poll_interval,
        } => {
            tracing::info!(manifests = %path.display(), "reading Services from manifests");
            let watch = source_files::watch(
                path.clone(),
                settings.node_name.clone(),
                *poll_interval,
                updates_tx,
            );
            tokio::spawn(async move { watch.await.context("reading manifests") })
        }
    };
    let sync_loop = tokio::spawn(runner::run(
        updates_rx,
        ChangeTracker::new(settings.node_name.clone()),
        settings.backend.proxier(),
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
                Ok(Err(err)) => Err(err),
                Err(join) => Err(anyhow::anyhow!("source task failed: {join}")),
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
