//! Wiring: a source feeds the change tracker, the sync runner drives the backend.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use backend_iptables::apply::{Backend as IptablesBackend, IptablesCommand};
use backend_iptables::plan::IptConfig;
use backend_iptables::IptablesProxier;
use backend_ipvs::plan::IpvsConfig;
use backend_ipvs::IpvsProxier;
use backend_nftables::apply::NftCommand;
use backend_nftables::plan::NftConfig;
use backend_nftables::NftablesProxier;
use backend_userspace::localhost::WithLocalhostNodePorts;
use backend_userspace::{UserspaceConfig, UserspaceProxier};
use conntrack::{ConntrackNetlink, ConntrackSettings};
use observability::health::Health;
use observability::metrics::{MetricsMode, ProxyMetrics};
use observability::observer::ProxyObserver;
use proxy_core::model::{IpFamily, Protocol};
use proxy_core::observer::{ApiRequestObserver, SyncObserver};
use proxy_core::proxier::Proxier;
use proxy_core::runner::{self, RunnerConfig};
use proxy_core::stale::CleaningProxier;
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
    pub conntrack: ConntrackSettings,
    pub observability: ObservabilitySettings,
    /// The `AllowServiceExternalIPs` feature gate: serve Services' `externalIPs`.
    pub serve_external_ips: bool,
}

/// The metrics and health servers (`--metrics-bind-address`, `--healthz-bind-address`,
/// `--bind-address-hard-fail`).
#[derive(Debug, Clone, Default)]
pub struct ObservabilitySettings {
    /// `IP:port`; empty: no metrics server.
    pub metrics_bind_address: String,
    /// `IP:port`; empty: no health server.
    pub healthz_bind_address: String,
    /// A bind error ends the proxy rather than being retried.
    pub bind_address_hard_fail: bool,
    /// The effective configuration, for `/configz`.
    pub config: serde_json::Value,
    pub build: observability::metrics::BuildInfo,
    /// `/statusz` and `/flagz`, each present when its feature gate is on.
    pub zpages: observability::zpages::Zpages,
}

/// Where Services and endpoints come from.
#[derive(Debug, Clone)]
pub enum SourceSettings {
    /// `--manifests PATH`, watched for changes as `watch` says.
    Manifests {
        path: PathBuf,
        watch: source_files::WatchConfig,
    },
    /// The Kubernetes API server (`--kubeconfig`, `--master` or in-cluster).
    Kube { connection: source_kube::Connection },
}

/// Which datapath programs the Services.
#[derive(Debug, Clone)]
pub enum BackendSettings {
    Nftables(NftConfig),
    Iptables(IptConfig),
    Userspace(UserspaceConfig),
    Ipvs(IpvsConfig),
}

impl BackendSettings {
    pub fn mode(&self) -> &'static str {
        match self {
            BackendSettings::Nftables(_) => "nftables",
            BackendSettings::Iptables(_) => "iptables",
            BackendSettings::Userspace(_) => "userspace",
            BackendSettings::Ipvs(_) => "ipvs",
        }
    }

    /// The IP families the backend programs.
    pub fn families(&self) -> &[IpFamily] {
        match self {
            BackendSettings::Nftables(c) => &c.families,
            BackendSettings::Iptables(c) => &c.families,
            BackendSettings::Userspace(c) => &c.families,
            BackendSettings::Ipvs(c) => &c.families,
        }
    }

    /// The sysctls the mode needs before it programs anything (besides conntrack's).
    fn node_sysctls(&self) -> Vec<(&'static str, &'static str)> {
        match self {
            BackendSettings::Iptables(c) => {
                backend_iptables::apply::node_sysctls(c.localhost_node_ports)
            }
            BackendSettings::Ipvs(c) => backend_ipvs::node_sysctls(c),
            BackendSettings::Nftables(_) | BackendSettings::Userspace(_) => Vec::new(),
        }
    }

    /// Builds the backend.
    pub fn proxier(&self) -> Box<dyn Proxier> {
        match self {
            BackendSettings::Nftables(config) => {
                let kernel = NftablesProxier::new(config.clone(), NftCommand::default());
                if config.localhost_nodeports.is_empty() {
                    Box::new(kernel)
                } else {
                    Box::new(WithLocalhostNodePorts::new(
                        kernel,
                        config.localhost_nodeports.clone(),
                    ))
                }
            }
            BackendSettings::Iptables(config) => Box::new(IptablesProxier::new(
                config.clone(),
                IptablesCommand::detect(),
            )),
            BackendSettings::Userspace(config) => {
                Box::new(UserspaceProxier::new(config.clone(), NftCommand::default()))
            }
            BackendSettings::Ipvs(config) => Box::new(IpvsProxier::new(config.clone())),
        }
    }

    /// The settings that decide a packet's path, for `explain`.
    pub fn explain_settings(&self) -> proxy_core::explain::Settings {
        use proxy_core::explain::{Mode, Settings};
        use proxy_core::model::LocalDetector;
        match self {
            BackendSettings::Nftables(c) => Settings {
                masquerade_all: c.masquerade_all,
                local: c.local.clone(),
                nodeport_cidrs: c.nodeport_cidrs.clone(),
                nodeport_primary: c.nodeport_primary,
                families: c.families.clone(),
                localhost_nodeports: c.localhost_nodeports.clone(),
                ..Settings::new(Mode::Nftables)
            },
            BackendSettings::Iptables(c) => Settings {
                masquerade_all: c.masquerade_all,
                local: c.local.clone(),
                nodeport_cidrs: c.nodeport_cidrs.clone(),
                nodeport_primary: c.nodeport_primary,
                families: c.families.clone(),
                iptables_localhost_nodeports: c.localhost_node_ports,
                ..Settings::new(Mode::Iptables)
            },
            BackendSettings::Ipvs(c) => Settings {
                masquerade_all: c.masquerade_all,
                local: if c.cluster_cidrs.is_empty() {
                    LocalDetector::None
                } else {
                    LocalDetector::ClusterCidr(c.cluster_cidrs.clone())
                },
                nodeport_cidrs: c.nodeport_cidrs.clone(),
                families: c.families.clone(),
                ..Settings::new(Mode::Ipvs)
            },
            BackendSettings::Userspace(c) => Settings {
                families: c.families.clone(),
                ..Settings::new(Mode::Userspace)
            },
        }
    }

    /// What checks the kernel against the plan for `explain --verify`, where the mode can.
    fn verifier(&self) -> Option<Arc<dyn proxy_core::explain::Verify>> {
        match self {
            BackendSettings::Nftables(c) => {
                Some(Arc::new(backend_nftables::verify::Verifier::new(c.clone())))
            }
            BackendSettings::Iptables(c) => {
                Some(Arc::new(backend_iptables::verify::Verifier::new(c.clone())))
            }
            BackendSettings::Ipvs(_) | BackendSettings::Userspace(_) => None,
        }
    }

    /// Builds the backend only to remove its rules: no probing of the host (iptables
    /// mode's cleanup walks both iptables variants, so it needs no detection).
    fn cleaner(&self) -> Box<dyn Proxier> {
        match self {
            BackendSettings::Iptables(config) => Box::new(IptablesProxier::new(
                config.clone(),
                IptablesCommand::new(IptablesBackend::Nft),
            )),
            other => other.proxier(),
        }
    }

    /// Whether the datapath NATs in the kernel (userspace mode does too, as root, to
    /// redirect Service IPs), so conntrack entries can go stale.
    fn uses_kernel_nat(&self) -> bool {
        match self {
            BackendSettings::Userspace(config) => config.redirect,
            _ => true,
        }
    }

    /// One of each mode, with default settings (enough to clean up).
    fn all_modes() -> [BackendSettings; 4] {
        [
            BackendSettings::Nftables(NftConfig::default()),
            BackendSettings::Iptables(IptConfig::default()),
            BackendSettings::Userspace(UserspaceConfig::default()),
            BackendSettings::Ipvs(IpvsConfig::default()),
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
        match backend.cleaner().cleanup() {
            Ok(()) => {}
            // The other mode's tool is not installed here (iptables mode's, on a node that
            // never ran it): nothing to run, nothing worth a warning.
            Err(err) if err.is_missing_tool() => {
                tracing::debug!(mode = backend.mode(), error = %err, "tool not installed: not removing the rules of another mode");
            }
            Err(err) => {
                tracing::warn!(mode = backend.mode(), error = %err, "could not remove the rules of another mode");
            }
        }
    }
}

/// Removes every rule any mode of ours created, also when there is none.
pub fn cleanup() -> anyhow::Result<()> {
    for backend in BackendSettings::all_modes() {
        match backend.cleaner().cleanup() {
            Ok(()) => tracing::info!(mode = backend.mode(), "removed rules"),
            // No iptables tools on the node: there can be no iptables rules of ours.
            Err(err) if err.is_missing_tool() => {
                tracing::debug!(mode = backend.mode(), error = %err, "tool not installed; nothing to remove");
            }
            Err(err) => {
                return Err(err).with_context(|| format!("removing {} rules", backend.mode()));
            }
        }
    }
    Ok(())
}

/// What upstream v1.35+ logs when it starts in ipvs mode.
pub const IPVS_DEPRECATION: &str = "The ipvs proxier is now deprecated and may be removed in a future release. Please use 'nftables' instead.";

/// The conntrack sysctls (`--conntrack-*`), which upstream sets before it creates the
/// proxier; settings the kernel does not let us write are logged.
fn set_conntrack_sysctls(settings: &RunSettings) {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    for warning in conntrack::apply_sysctls(&settings.conntrack, cpus) {
        tracing::warn!("{warning}");
    }
}

/// `--init-only`: the privileged set-up upstream does before it would start syncing
/// (conntrack sysctls, then the mode's own: `route_localnet` for iptables with
/// localhost NodePorts, the IPVS knobs for ipvs), then return. Needs no source and
/// programs no rules.
pub fn init_only(settings: &RunSettings) -> anyhow::Result<()> {
    set_conntrack_sysctls(settings);
    for (key, value) in settings.backend.node_sysctls() {
        backend_iptables::apply::write_sysctl(key, value)
            .with_context(|| format!("{} mode set-up", settings.backend.mode()))?;
        tracing::info!(sysctl = key, value, "set sysctl");
    }
    tracing::info!(
        mode = settings.backend.mode(),
        "system initialized and --init-only specified"
    );
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
    if let BackendSettings::Ipvs(_) = settings.backend {
        // Upstream v1.35's words (KEP-5495), at error level as upstream logs them; the
        // mode keeps working.
        tracing::error!("{IPVS_DEPRECATION}");
    }
    set_conntrack_sysctls(&settings);
    let (updates_tx, updates_rx) = mpsc::channel(64);
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let status = Arc::new(SyncStatus::default());
    let Observability {
        observer,
        api_requests,
    } = start_observability(&settings).await?;

    // A source that cannot start (e.g. a wrong manifests path) ends the proxy with its error.
    let source = match &settings.source {
        SourceSettings::Manifests { path, watch } => {
            tracing::info!(manifests = %path.display(), "reading Services from manifests");
            let watch = source_files::watch(
                path.clone(),
                settings.node_name.clone(),
                watch.clone(),
                updates_tx,
            );
            tokio::spawn(async move { watch.await.context("reading manifests") })
        }
        SourceSettings::Kube { connection } => {
            // A client that cannot be built (bad kubeconfig) is fatal; an API server that
            // does not answer is not: the source retries and sends nothing meanwhile.
            let client = source_kube::client(connection, Some(api_requests))
                .await
                .context("connecting to the Kubernetes API")?;
            let node = settings.node_name.clone();
            let source_status = Arc::new(source_kube::SourceStatus::default());
            tokio::spawn(async move {
                source_kube::watch(client, node, updates_tx, source_status).await;
                Ok(())
            })
        }
    };
    let proxier: Box<dyn Proxier> = if settings.backend.uses_kernel_nat() {
        Box::new(CleaningProxier::new(
            settings.backend.proxier(),
            ConntrackNetlink::default(),
            settings.backend.families().to_vec(),
            Arc::clone(&observer),
        ))
    } else {
        settings.backend.proxier()
    };
    let sync_loop = tokio::spawn(runner::run_observed(
        updates_rx,
        ChangeTracker::new(settings.node_name.clone())
            .with_external_ips(settings.serve_external_ips),
        proxier,
        settings.runner,
        Arc::clone(&status),
        shutdown_rx,
        observer,
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

/// Builds the metrics and health state and starts their servers; returns the observer
/// the sync loop reports to. Fails only on a bind error with `--bind-address-hard-fail`.
/// What the servers hand back to the rest of the proxy.
struct Observability {
    /// Told about every sync.
    observer: Arc<dyn SyncObserver>,
    /// Told about every API request (`rest_client_*`).
    api_requests: Arc<dyn ApiRequestObserver>,
}

/// Loopback NodePort packets the nftables rules rejected, per family and protocol, from
/// the tables' named counters (read at scrape time; a family that cannot be read is left
/// out and logged).
fn localhost_nodeport_rejects(families: &[IpFamily]) -> Vec<(IpFamily, Protocol, u64)> {
    let mut out = Vec::new();
    for &family in families {
        match backend_nftables::apply::read_named_counters(family) {
            Ok(counters) => {
                for protocol in backend_nftables::render::LOCALHOST_NODEPORT_PROTOCOLS {
                    let name = backend_nftables::render::localhost_nodeport_counter(protocol);
                    if let Some((_, packets)) = counters.iter().find(|(n, _)| *n == name) {
                        out.push((family, protocol, *packets));
                    }
                }
            }
            Err(err) => {
                tracing::debug!(?family, error = %err, "cannot read the localhost NodePort counters");
            }
        }
    }
    out
}

async fn start_observability(settings: &RunSettings) -> anyhow::Result<Observability> {
    use observability::server;
    let obs = &settings.observability;
    let mode = MetricsMode::from_name(settings.backend.mode()).unwrap_or(MetricsMode::Nftables);
    let mut metrics = ProxyMetrics::new(&obs.build, mode).context("registering metrics")?;
    if let BackendSettings::Nftables(config) = &settings.backend {
        if !config.localhost_nodeports.is_empty() {
            let families = config.localhost_nodeports.clone();
            metrics = metrics
                .with_localhost_nodeports(Arc::new(move || localhost_nodeport_rejects(&families)))
                .context("registering the localhost NodePort metrics")?;
        }
    }
    let families = settings.backend.families();
    // Upstream's health timeout: two sync periods.
    let health = Arc::new(Health::new(settings.runner.sync_period * 2, families));
    let (observer, targets) = ProxyObserver::new(metrics.clone(), Arc::clone(&health), families);
    if let BackendSettings::Nftables(config) = &settings.backend {
        if config.service_counters {
            let families = config.families.clone();
            observer
                .programmed()
                .set_traffic_reader(Arc::new(move |state| {
                    backend_nftables::apply::read_service_traffic(&families, state).unwrap_or_else(
                        |err| {
                            tracing::debug!(error = %err, "cannot read the Service counters");
                            Vec::new()
                        },
                    )
                }));
            metrics
                .register_service_traffic(observer.programmed())
                .context("registering the Service counters")?;
        }
    }
    if let Some(address) = server::parse_address("metrics", &obs.metrics_bind_address)? {
        let router = server::metrics_router(server::MetricsContext {
            metrics: metrics.clone(),
            mode: settings.backend.mode(),
            config: Arc::new(obs.config.clone()),
            zpages: Arc::new(obs.zpages.clone()),
            programmed: observer.programmed(),
            explain: Some(Arc::new(observability::explain::Explainer {
                settings: settings.backend.explain_settings(),
                local_addresses: Arc::new(kernel_addresses),
                verifier: settings.backend.verifier(),
            })),
        });
        server::spawn("metrics", address, router, obs.bind_address_hard_fail).await?;
    }
    if let Some(address) = server::parse_address("healthz", &obs.healthz_bind_address)? {
        let router = server::health_router(Arc::clone(&health), metrics.clone());
        server::spawn("healthz", address, router, obs.bind_address_hard_fail).await?;
    }
    tokio::spawn(observability::service_health::run(targets, health));
    Ok(Observability {
        observer: Arc::new(observer),
        api_requests: Arc::new(metrics),
    })
}

/// The node's addresses as the kernel has them (for `explain`); empty, logged, when
/// they cannot be read.
fn kernel_addresses() -> Vec<std::net::IpAddr> {
    match netlink::route::Route::open().and_then(|mut r| r.addresses()) {
        Ok(list) => list.into_iter().map(|(_, ip)| ip).collect(),
        Err(err) => {
            tracing::debug!(error = %err, "cannot list the node's addresses");
            Vec::new()
        }
    }
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
