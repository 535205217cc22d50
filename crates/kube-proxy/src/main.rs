//! `kube-proxy`: flags and config file in, a running proxy out.

mod allocator;

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context as _};
use backend_iptables::plan::IptConfig;
use backend_nftables::plan::NftConfig;
use conntrack::ConntrackSettings;
use proxy_core::model::{IpFamily, LocalDetector, NodePortAddresses};
use proxy_core::runner::RunnerConfig;
use tracing_subscriber::EnvFilter;

use kube_proxy::app;
use kube_proxy::options::{self, Action, KubeProxyConfiguration, LocalMode, Options, ProxyMode};

fn main() -> ExitCode {
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == "explain") {
        let program = args.remove(0);
        args.remove(0);
        return explain_command(program, args);
    }
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
        Action::InitOnly => app::init_only(&run_settings(&opts)?),
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

/// `kube-proxy explain ...`: the answer on stdout; exit 1 with the reason on stderr.
fn explain_command(program: std::ffi::OsString, args: Vec<std::ffi::OsString>) -> ExitCode {
    use kube_proxy::explain;
    let result = (|| -> anyhow::Result<String> {
        let (eargs, rest) = explain::split_args(args)?;
        let opts = options::parse(std::iter::once(program).chain(rest.clone()))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        init_logging(opts.config.logging.verbosity);
        let Some(path) = opts.manifests.clone() else {
            if !rest.is_empty() {
                bail!("kube-proxy flags apply only with --manifests (the running proxy has its own); got {rest:?}");
            }
            let address = eargs
                .metrics_address
                .as_deref()
                .unwrap_or(explain::DEFAULT_METRICS_ADDRESS);
            let (status, body) = explain::remote(address, &eargs)?;
            if status != 200 {
                bail!("the proxy answered {status}: {}", body.trim_end());
            }
            return Ok(body);
        };
        if eargs.metrics_address.is_some() {
            bail!("give --metrics-address or --manifests, not both");
        }
        let settings = run_settings(&opts)?;
        explain::offline(
            &settings.backend,
            &settings.node_name,
            settings.serve_external_ips,
            &path,
            &eargs,
        )
    })();
    match result {
        Ok(answer) => {
            print!("{answer}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("kube-proxy explain: {err:#}");
            ExitCode::FAILURE
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

/// The `--conntrack-*` settings; zero or absent values leave the kernel's alone.
fn conntrack_settings(config: &KubeProxyConfiguration) -> ConntrackSettings {
    let c = &config.conntrack;
    let non_negative = |v: Option<i32>| v.and_then(|v| u32::try_from(v).ok()).unwrap_or(0);
    ConntrackSettings {
        max_per_core: non_negative(c.max_per_core),
        min: non_negative(c.min),
        tcp_established_timeout: c.tcp_established_timeout.and_then(|d| d.to_std()),
        tcp_close_wait_timeout: c.tcp_close_wait_timeout.and_then(|d| d.to_std()),
        tcp_be_liberal: c.tcp_be_liberal,
        udp_timeout: c.udp_timeout.to_std(),
        udp_stream_timeout: c.udp_stream_timeout.to_std(),
    }
}

/// `--detect-local-mode` and its companion setting.
fn local_detector(config: &KubeProxyConfiguration) -> anyhow::Result<LocalDetector> {
    let interface = |name: &str, what: &str| -> anyhow::Result<String> {
        // Linux interface names: at most 15 bytes, no '/', whitespace or quotes; we also
        // refuse '*' and '\\' since the name goes into an nftables string.
        let valid = !name.is_empty()
            && name.len() <= 15
            && name
                .bytes()
                .all(|b| b.is_ascii_graphic() && !matches!(b, b'/' | b'"' | b'\\' | b'*' | b'\''));
        if !valid {
            bail!("{what} {name:?} is not a valid interface name");
        }
        Ok(name.to_string())
    };
    Ok(match config.detect_local_mode {
        LocalMode::Unset | LocalMode::ClusterCidr => {
            let cidrs = config.cluster_cidrs();
            if cidrs.is_empty() {
                LocalDetector::None
            } else {
                LocalDetector::ClusterCidr(cidrs)
            }
        }
        LocalMode::NodeCidr => LocalDetector::NodeCidr,
        LocalMode::BridgeInterface => LocalDetector::BridgeInterface(interface(
            &config.detect_local.bridge_interface,
            "detectLocal.bridgeInterface",
        )?),
        LocalMode::InterfaceNamePrefix => LocalDetector::InterfaceNamePrefix(interface(
            &config.detect_local.interface_name_prefix,
            "detectLocal.interfaceNamePrefix",
        )?),
    })
}

/// `--manifests PATH`, or else the API server; not both.
fn source_settings(opts: &Options) -> anyhow::Result<app::SourceSettings> {
    let cc = &opts.config.client_connection;
    let kubeconfig = Some(cc.kubeconfig.trim())
        .filter(|k| !k.is_empty())
        .map(std::path::PathBuf::from);
    let master = opts.master.clone().filter(|m| !m.trim().is_empty());
    if let Some(path) = opts.manifests.clone() {
        if kubeconfig.is_some() || master.is_some() {
            bail!("--manifests and --kubeconfig/--master are exclusive: give one source");
        }
        return Ok(app::SourceSettings::Manifests {
            path,
            watch: source_files::WatchConfig::default(),
        });
    }
    Ok(app::SourceSettings::Kube {
        connection: source_kube::Connection {
            kubeconfig,
            master,
            qps: cc.qps,
            burst: cc.burst,
            content_type: cc.content_type.clone(),
        },
    })
}

fn run_settings(opts: &Options) -> anyhow::Result<app::RunSettings> {
    let config = &opts.config;
    match config.mode {
        ProxyMode::Unset
        | ProxyMode::NfTables
        | ProxyMode::IpTables
        | ProxyMode::Userspace
        | ProxyMode::Ipvs => {}
        other => bail!(
            "proxy mode {:?} is not available in this build yet; use --proxy-mode=nftables",
            other.as_str()
        ),
    }
    let source = source_settings(opts)?;
    let nft = &config.nftables;
    let nodeport_addresses = NodePortAddresses::parse(&config.node_port_addresses)
        .map_err(|e| anyhow::anyhow!("nodePortAddresses: {e}"))?;
    let (nodeport_cidrs, nodeport_primary) = nodeport_addresses.kernel_cidrs();
    let mut families = vec![IpFamily::V4];
    if std::path::Path::new("/proc/net/if_inet6").exists() {
        families.push(IpFamily::V6);
    } else {
        tracing::warn!("IPv6 is disabled on this host; programming IPv4 only");
    }
    // Each mode reads its own section of the configuration, as upstream does.
    let (backend, sync_period, min_sync_period) = match config.mode {
        ProxyMode::IpTables => {
            let ipt = &config.iptables;
            let backend = app::BackendSettings::Iptables(IptConfig {
                masquerade_bit: u8::try_from(ipt.masquerade_bit.unwrap_or(14))
                    .context("masqueradeBit")?,
                masquerade_all: ipt.masquerade_all,
                local: local_detector(config)?,
                nodeport_cidrs,
                nodeport_primary,
                localhost_node_ports: ipt.localhost_node_ports.unwrap_or(true),
                conntrack_tcp_be_liberal: backend_iptables::apply::conntrack_tcp_be_liberal(),
                families,
            });
            (backend, ipt.sync_period, ipt.min_sync_period)
        }
        ProxyMode::Ipvs => {
            let ipvs = &config.ipvs;
            let backend = app::BackendSettings::Ipvs(backend_ipvs::plan::IpvsConfig {
                scheduler: ipvs.scheduler.clone(),
                strict_arp: ipvs.strict_arp,
                masquerade_all: config.iptables.masquerade_all,
                cluster_cidrs: config.cluster_cidrs(),
                masquerade_bit: u8::try_from(config.iptables.masquerade_bit.unwrap_or(14))
                    .context("masqueradeBit")?,
                nodeport_cidrs,
                families,
                // Validated at parse time; anything unparsable is not excluded.
                exclude_cidrs: ipvs
                    .exclude_cidrs
                    .iter()
                    .filter_map(|c| c.parse().ok())
                    .collect(),
                timeouts: backend_ipvs::plan::Timeouts {
                    tcp: whole_seconds(ipvs.tcp_timeout),
                    tcp_fin: whole_seconds(ipvs.tcp_fin_timeout),
                    udp: whole_seconds(ipvs.udp_timeout),
                },
            });
            (backend, ipvs.sync_period, ipvs.min_sync_period)
        }
        ProxyMode::Userspace => (
            userspace_settings(opts, families)?,
            config.iptables.sync_period,
            config.iptables.min_sync_period,
        ),
        _ => (
            app::BackendSettings::Nftables(NftConfig {
                localhost_nodeports: localhost_nodeport_families(
                    config,
                    &nodeport_addresses,
                    &families,
                )?,
                masquerade_bit: u8::try_from(nft.masquerade_bit.unwrap_or(14))
                    .context("masqueradeBit")?,
                masquerade_all: nft.masquerade_all,
                local: local_detector(config)?,
                nodeport_cidrs,
                nodeport_primary,
                families,
                service_counters: opts.service_counters,
            }),
            nft.sync_period,
            nft.min_sync_period,
        ),
    };
    Ok(app::RunSettings {
        node_name: node_name(config)?,
        source,
        backend,
        conntrack: conntrack_settings(config),
        runner: RunnerConfig {
            min_sync_period: min_sync_period.to_std().unwrap_or_default(),
            sync_period: sync_period.to_std().unwrap_or(Duration::from_secs(30)),
            after_full_sync: Some(allocator::return_free_memory),
            ..RunnerConfig::default()
        },
        observability: observability_settings(opts),
        serve_external_ips: feature_gates(config)?
            .enabled(options::features::ALLOW_SERVICE_EXTERNAL_IPS),
    })
}

/// Every known gate with its stage and resolved value, for `kubernetes_feature_enabled`
/// (upstream lists all of them, not only those given).
fn feature_metric(config: &KubeProxyConfiguration) -> Vec<(String, String, bool)> {
    use options::features::{FeatureGates, Stage, GATES};
    let gates = FeatureGates::resolve(&config.feature_gates)
        .map(|(gates, _)| gates)
        .unwrap_or_default();
    GATES
        .iter()
        .map(|g| {
            let stage = match g.stage {
                Stage::Alpha => "ALPHA",
                Stage::Beta => "BETA",
                Stage::Ga => "",
                Stage::Deprecated => "DEPRECATED",
            };
            (g.name.to_string(), stage.to_string(), gates.enabled(g.name))
        })
        .collect()
}

/// The resolved feature gates (already validated when the options were parsed).
fn feature_gates(
    config: &KubeProxyConfiguration,
) -> anyhow::Result<options::features::FeatureGates> {
    options::features::FeatureGates::resolve(&config.feature_gates)
        .map(|(gates, _)| gates)
        .map_err(|e| anyhow::anyhow!("featureGates: {e}"))
}

/// Families whose loopback NodePorts nftables mode serves with user-space listeners: those
/// whose loopback `--nodeport-addresses` names, when the gate is on.
fn localhost_nodeport_families(
    config: &KubeProxyConfiguration,
    addresses: &NodePortAddresses,
    families: &[IpFamily],
) -> anyhow::Result<Vec<IpFamily>> {
    let named: Vec<IpFamily> = addresses
        .loopback_families()
        .into_iter()
        .filter(|f| families.contains(f))
        .collect();
    if named.is_empty() {
        return Ok(named);
    }
    if !feature_gates(config)?.enabled(options::features::NFTABLES_LOCALHOST_NODEPORTS) {
        tracing::warn!(
            "nodePortAddresses names a loopback address, but nftables mode serves NodePorts \
             on loopback only with the {} feature gate; they are not served there",
            options::features::NFTABLES_LOCALHOST_NODEPORTS
        );
        return Ok(Vec::new());
    }
    Ok(named)
}

/// A duration in whole seconds for the kernel; negative (refused by validation) is 0.
fn whole_seconds(d: options::GoDuration) -> u32 {
    d.to_std()
        .map_or(0, |d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX))
}

/// Metrics and health servers from the configuration.
fn observability_settings(opts: &Options) -> app::ObservabilitySettings {
    let config = &opts.config;
    app::ObservabilitySettings {
        metrics_bind_address: config.metrics_bind_address.clone(),
        healthz_bind_address: config.healthz_bind_address.clone(),
        bind_address_hard_fail: config.bind_address_hard_fail,
        config: serde_json::to_value(config).unwrap_or_default(),
        build: observability::metrics::BuildInfo {
            git_version: options::git_version(),
            git_commit: String::new(),
            build_date: String::new(),
            features: feature_metric(config),
        },
        zpages: zpages(opts),
    }
}

/// `/statusz` and `/flagz` behind upstream's `ComponentStatusz` and `ComponentFlagz`
/// gates (alpha in v1.35: off unless `--feature-gates` turns them on).
fn zpages(opts: &Options) -> observability::zpages::Zpages {
    let gate = |name: &str| {
        opts.config
            .feature_gates
            .get(name)
            .copied()
            .unwrap_or(false)
    };
    let version = options::git_version();
    let statusz = gate("ComponentStatusz").then(|| observability::zpages::Statusz {
        started: std::time::SystemTime::now(),
        binary_version: version.trim_start_matches('v').to_owned(),
        emulation_version: options::UPSTREAM_VERSION
            .trim_start_matches('v')
            .rsplit_once('.')
            .map_or_else(String::new, |(major_minor, _)| major_minor.to_owned()),
        paths: observability::server::METRICS_PATHS
            .iter()
            .map(|p| (*p).to_owned())
            .collect(),
    });
    let flagz = gate("ComponentFlagz").then(|| opts.given_flags.clone());
    observability::zpages::Zpages { statusz, flagz }
}

/// Userspace mode: redirect rules as root, listeners on `--bind-address` otherwise.
fn userspace_settings(
    opts: &Options,
    families: Vec<IpFamily>,
) -> anyhow::Result<app::BackendSettings> {
    let config = &opts.config;
    let bind: std::net::IpAddr = config
        .bind_address
        .trim()
        .parse()
        .with_context(|| format!("bindAddress: {:?}", config.bind_address))?;
    let udp_idle_timeout = match opts.udp_timeout {
        Some(d) => d
            .to_std()
            .filter(|d| !d.is_zero())
            .context("--udp-timeout must be greater than zero")?,
        None => backend_userspace::DEFAULT_UDP_IDLE_TIMEOUT,
    };
    let redirect = backend_userspace::running_as_root();
    let bind_ip = backend_userspace::listen_ip(bind);
    if redirect {
        tracing::info!("userspace mode as root: Service IPs are redirected to local listeners");
    } else {
        tracing::info!(address = %bind_ip, "userspace mode without root: each Service port is served on this address at its port (NodePort when set)");
    }
    Ok(app::BackendSettings::Userspace(
        backend_userspace::UserspaceConfig {
            redirect,
            bind_ip,
            udp_idle_timeout,
            families,
            ..Default::default()
        },
    ))
}
