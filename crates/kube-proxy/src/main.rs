//! `kube-proxy`: flags and config file in, a running proxy out.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context as _};
use backend_iptables::plan::IptConfig;
use backend_nftables::plan::NftConfig;
use proxy_core::model::IpFamily;
use proxy_core::runner::RunnerConfig;
use tracing_subscriber::EnvFilter;

use kube_proxy::app;
use kube_proxy::options::{self, Action, KubeProxyConfiguration, Options, ProxyMode};

/// How often the manifests directory is checked for changes: cheap (a stat per file),
/// and short enough that an edit shows up within a blink.
const MANIFEST_POLL_INTERVAL: Duration = Duration::from_millis(250);

fn main() -> ExitCode {
    let opts = match options::parse(std::env::args_os()) {
        Ok(opts) => opts,
        Err(err) if err.is_help() => {
            println!("{err}");
            return ExitCode::SUCCESS;
        }
        Err(err) => {
            eprintln!("kube-proxy: {err}");
            return ExitCode::from(err.exit_code().clamp(1, 255) as u8);
        }
    };
    init_logging(opts.config.logging.verbosity);
    for warning in &opts.warnings {
        tracing::warn!("{warning}");
    }
    match run(opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err:#}");
            eprintln!("kube-proxy: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(opts: Options) -> anyhow::Result<()> {
    match &opts.action {
        Action::PrintVersion => {
            println!("{}", options::version_string());
            Ok(())
        }
        Action::WriteConfig(path) => {
            options::write_config(&opts.config, path)?;
            tracing::info!(path = %path.display(), "wrote configuration");
            Ok(())
        }
        Action::Cleanup => app::cleanup(),
        Action::Run => {
            let settings = run_settings(&opts)?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            runtime.block_on(app::run(settings))
        }
    }
}

/// Upstream's `-v` levels mapped onto tracing's: 0–2 info, 3–4 debug, 5+ trace.
/// `RUST_LOG` overrides, for debugging a single module.
fn init_logging(verbosity: u32) {
    let level = match verbosity {
        0..=2 => "info",
        3..=4 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// The node's name as the API knows it: `--hostname-override`, else the host name.
fn node_name(config: &KubeProxyConfiguration) -> anyhow::Result<String> {
    let name = config.hostname_override.trim();
    if !name.is_empty() {
        return Ok(name.to_lowercase());
    }
    let host =
        std::fs::read_to_string("/proc/sys/kernel/hostname").context("reading the host name")?;
    Ok(host.trim().to_lowercase())
}

fn run_settings(opts: &Options) -> anyhow::Result<app::RunSettings> {
    let config = &opts.config;
    match config.mode {
        ProxyMode::Unset | ProxyMode::NfTables | ProxyMode::IpTables => {}
        other => bail!(
            "proxy mode {:?} is not available in this build yet; use --proxy-mode=nftables or iptables",
            other.as_str()
        ),
    }
    let Some(manifests) = opts.manifests.clone() else {
        bail!(
            "no --manifests given: reading Services from the Kubernetes API is not built yet; \
             run with --manifests PATH (a YAML file or a directory of them)"
        );
    };
    let nft = &config.nftables;
    let mut nodeport_cidrs = Vec::new();
    let mut nodeport_primary = false;
    for entry in &config.node_port_addresses {
        if entry == "primary" {
            nodeport_primary = true;
            continue;
        }
        nodeport_cidrs.push(
            entry
                .parse()
                .with_context(|| format!("nodePortAddresses: {entry:?}"))?,
        );
    }
    let mut families = vec![IpFamily::V4];
    if std::path::Path::new("/proc/net/if_inet6").exists() {
        families.push(IpFamily::V6);
    } else {
        tracing::warn!("IPv6 is disabled on this host; programming IPv4 only");
    }
    if config.mode == ProxyMode::IpTables {
        let ipt = &config.iptables;
        let backend = app::BackendSettings::Iptables(IptConfig {
            masquerade_bit: u8::try_from(ipt.masquerade_bit.unwrap_or(14))
                .context("masqueradeBit")?,
            masquerade_all: ipt.masquerade_all,
            cluster_cidrs: config.cluster_cidrs(),
            nodeport_cidrs,
            nodeport_primary,
            localhost_node_ports: ipt.localhost_node_ports.unwrap_or(true),
            conntrack_tcp_be_liberal: backend_iptables::apply::conntrack_tcp_be_liberal(),
            families,
        });
        return Ok(app::RunSettings {
            node_name: node_name(config)?,
            source: app::SourceSettings::Manifests {
                path: manifests,
                poll_interval: MANIFEST_POLL_INTERVAL,
            },
            backend,
            runner: RunnerConfig {
                min_sync_period: ipt.min_sync_period.to_std().unwrap_or_default(),
                sync_period: ipt.sync_period.to_std().unwrap_or(Duration::from_secs(30)),
                ..RunnerConfig::default()
            },
        });
    }
    Ok(app::RunSettings {
        node_name: node_name(config)?,
        source: app::SourceSettings::Manifests {
            path: manifests,
            poll_interval: MANIFEST_POLL_INTERVAL,
        },
        backend: app::BackendSettings::Nftables(NftConfig {
            masquerade_bit: u8::try_from(nft.masquerade_bit.unwrap_or(14))
                .context("masqueradeBit")?,
            masquerade_all: nft.masquerade_all,
            cluster_cidrs: config.cluster_cidrs(),
            nodeport_cidrs,
            nodeport_primary,
            families,
        }),
        runner: RunnerConfig {
            min_sync_period: nft.min_sync_period.to_std().unwrap_or_default(),
            sync_period: nft.sync_period.to_std().unwrap_or(Duration::from_secs(30)),
            ..RunnerConfig::default()
        },
    })
}
