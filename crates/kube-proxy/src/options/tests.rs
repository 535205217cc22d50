//! Tests of the public entry points: parse, load_config_file, write_config.

use std::io::Write;

use super::*;

fn parse_args(args: &[&str]) -> Result<Options, OptionsError> {
    parse(std::iter::once("kube-proxy").chain(args.iter().copied()))
}

fn ok(args: &[&str]) -> Options {
    match parse_args(args) {
        Ok(o) => o,
        Err(e) => panic!("{args:?}: {e}"),
    }
}

fn err(args: &[&str]) -> String {
    match parse_args(args) {
        Ok(o) => panic!("{args:?} unexpectedly parsed: {o:?}"),
        Err(e) => {
            assert_eq!(e.exit_code(), 1, "{e}");
            e.to_string()
        }
    }
}

fn config_file(yaml: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(yaml.as_bytes()).unwrap();
    f
}

const HEADER: &str = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n";

#[test]
fn no_flags_gives_effective_defaults() {
    let o = ok(&[]);
    assert_eq!(o.action, Action::Run);
    assert_eq!(o.config, KubeProxyConfiguration::effective_default());
    assert_eq!(o.config.mode, ProxyMode::NfTables);
    assert!(o.warnings.is_empty(), "{:?}", o.warnings);
    assert_eq!(o.manifests, None);
}

#[test]
fn help_is_not_a_failure() {
    let e = parse_args(&["--help"]).unwrap_err();
    assert!(e.is_help());
    assert_eq!(e.exit_code(), 0);
    assert!(e.to_string().contains("--iptables-sync-period"));
    assert!(parse_args(&["-h"]).unwrap_err().is_help());
}

#[test]
fn version_forms() {
    for args in [&["--version"][..], &["--version=true"], &["--version=raw"]] {
        assert_eq!(ok(args).action, Action::PrintVersion, "{args:?}");
    }
    assert_eq!(ok(&["--version=false"]).action, Action::Run);
    // pflag bools never consume the next argument.
    assert!(err(&["--version", "true"]).contains("true"));
    // Upstream prints `Kubernetes v1.35.x`; tools take the second word.
    assert_eq!(
        version_string().split_whitespace().nth(1),
        Some("v1.35.0"),
        "{}",
        version_string()
    );
    assert!(version_string().starts_with("Kubernetes v1.35.0 (kube-proxy-rs 0.1.0)"));
}

#[test]
fn actions() {
    assert_eq!(ok(&["--cleanup"]).action, Action::Cleanup);
    assert_eq!(ok(&["--cleanup=false"]).action, Action::Run);
    assert_eq!(
        ok(&["--write-config-to", "/tmp/x.yaml", "--cleanup"]).action,
        Action::WriteConfig("/tmp/x.yaml".into())
    );
    let o = ok(&["--manifests=/srv/m", "--master", "https://a:6443"]);
    assert_eq!(o.manifests, Some("/srv/m".into()));
    assert_eq!(o.master.as_deref(), Some("https://a:6443"));
}

#[test]
fn pflag_booleans() {
    assert!(ok(&["--masquerade-all"]).config.nftables.masquerade_all);
    for t in ["1", "t", "T", "TRUE", "true", "True"] {
        let o = ok(&[&format!("--masquerade-all={t}")]);
        assert!(o.config.iptables.masquerade_all && o.config.nftables.masquerade_all);
    }
    for f in ["0", "f", "F", "FALSE", "false", "False"] {
        assert!(
            !ok(&[&format!("--masquerade-all={f}")])
                .config
                .nftables
                .masquerade_all
        );
    }
    assert!(err(&["--masquerade-all=yes"]).contains("--masquerade-all"));
}

#[test]
fn durations_and_numbers() {
    let o = ok(&[
        "--iptables-sync-period=1m30s",
        "--iptables-min-sync-period",
        "250ms",
        "--iptables-masquerade-bit=3",
        "--config-sync-period=1.5h",
        "--conntrack-tcp-timeout-established=0",
    ]);
    let c = &o.config;
    assert_eq!(c.iptables.sync_period, GoDuration::from_secs(90));
    assert_eq!(c.nftables.sync_period, GoDuration::from_secs(90));
    assert_eq!(c.nftables.min_sync_period, GoDuration::from_millis(250));
    assert_eq!(c.iptables.masquerade_bit, Some(3));
    assert_eq!(c.nftables.masquerade_bit, Some(3));
    assert_eq!(c.config_sync_period, GoDuration::from_mins(90));
    assert_eq!(c.conntrack.tcp_established_timeout, Some(GoDuration::ZERO));
    // An explicit 0 min-sync-period is kept (upstream only re-defaults file values).
    assert_eq!(
        ok(&["--iptables-min-sync-period=0"])
            .config
            .nftables
            .min_sync_period,
        GoDuration::ZERO
    );
}

#[test]
fn bad_values_name_the_flag() {
    for (args, flag) in [
        (
            &["--iptables-sync-period=abc"][..],
            "--iptables-sync-period",
        ),
        (
            &["--iptables-masquerade-bit=40"],
            "--iptables-masquerade-bit",
        ),
        (&["--bind-address=nonsense"], "--bind-address"),
        (
            &["--healthz-bind-address=1.2.3.4:99999"],
            "--healthz-bind-address",
        ),
        (&["--cluster-cidr=10.0.0.0/33"], "--cluster-cidr"),
        (&["--nodeport-addresses=foo"], "--nodeport-addresses"),
        (&["--proxy-mode=userspce"], "--proxy-mode"),
        (&["--proxy-mode=kernelspace"], "--proxy-mode"),
        (&["--detect-local-mode=Magic"], "--detect-local-mode"),
        (&["--oom-score-adj=-1001"], "--oom-score-adj"),
        (&["--feature-gates=AllBeta=maybe"], "--feature-gates"),
        (&["--v=-1"], "--v"),
        (&["--logging-format=xml"], "--logging-format"),
    ] {
        let msg = err(args);
        assert!(msg.contains(flag), "{args:?}: {msg}");
    }
}

#[test]
fn unknown_flag_is_an_error() {
    let msg = err(&["--no-such-flag"]);
    assert!(msg.contains("--no-such-flag"), "{msg}");
    let msg = err(&["positional"]);
    assert!(msg.contains("positional"), "{msg}");
}

#[test]
fn semantic_errors_point_at_the_flag() {
    let msg = err(&["--cluster-cidr=10.0.0.0/8,11.0.0.0/8"]);
    assert!(msg.contains("clusterCIDR (--cluster-cidr)"), "{msg}");
    let msg = err(&["--iptables-sync-period=0s", "--config-sync-period=-1s"]);
    assert!(
        msg.contains("nftables.syncPeriod (--iptables-sync-period)"),
        "{msg}"
    );
    assert!(
        msg.contains("configSyncPeriod (--config-sync-period)"),
        "{msg}"
    );
    let msg = err(&["--hostname-override=   "]);
    assert!(msg.contains("--hostname-override"), "{msg}");
}

#[test]
fn addresses_lists_and_maps() {
    let o = ok(&[
        "--bind-address=10.1.2.3",
        "--healthz-bind-address=10.1.2.3",
        "--metrics-bind-address=[::1]:9000",
        "--cluster-cidr=10.244.0.0/16,fd00:10:244::/56",
        "--nodeport-addresses=10.0.0.0/8,192.168.0.0/16",
        "--feature-gates=AllowServiceExternalIPs=true,LoggingBetaOptions=false",
        "--feature-gates",
        "LoggingAlphaOptions=1",
        "--hostname-override= Node-A ",
        "-v",
        "4",
        "--vmodule=proxier=5",
        "--ipvs-exclude-cidrs=10.0.0.0/8,fd00::/8",
    ]);
    let c = &o.config;
    assert_eq!(c.bind_address, "10.1.2.3");
    assert_eq!(c.healthz_bind_address, "10.1.2.3:10256");
    assert_eq!(c.metrics_bind_address, "[::1]:9000");
    assert_eq!(c.cluster_cidr, "10.244.0.0/16,fd00:10:244::/56");
    assert_eq!(c.node_port_addresses, vec!["10.0.0.0/8", "192.168.0.0/16"]);
    assert_eq!(
        c.feature_gates
            .iter()
            .map(|(k, v)| (k.as_str(), *v))
            .collect::<Vec<_>>(),
        vec![
            ("AllowServiceExternalIPs", true),
            ("LoggingAlphaOptions", true),
            ("LoggingBetaOptions", false)
        ]
    );
    assert_eq!(c.hostname_override, "node-a");
    assert_eq!(c.logging.verbosity, 4);
    assert_eq!(c.logging.vmodule[0].file_pattern, "proxier");
    assert_eq!(c.ipvs.exclude_cidrs.len(), 2);
    assert_eq!(ok(&["--v=3"]).config.logging.verbosity, 3);
    assert_eq!(ok(&["-v2"]).config.logging.verbosity, 2);
    assert_eq!(
        ok(&["--nodeport-addresses=primary"])
            .config
            .node_port_addresses,
        vec!["primary"]
    );
    assert_eq!(
        ok(&["--proxy-mode=iptables"]).config.node_port_addresses,
        Vec::<String>::new()
    );
}

/// A DaemonSet's arguments often gain a flag that an earlier one already sets: as with
/// upstream's flags, the last value wins and lists and maps add up.
#[test]
fn a_repeated_flag_is_taken_as_upstream_takes_it() {
    let o = ok(&[
        "--v=2",
        "--v=4",
        "--iptables-sync-period=10s",
        "--iptables-sync-period=20s",
        "--nodeport-addresses=10.0.0.0/8",
        "--nodeport-addresses=192.168.0.0/16",
        "--feature-gates=LoggingBetaOptions=false",
        "--feature-gates=LoggingAlphaOptions=true",
    ]);
    let c = &o.config;
    assert_eq!(c.logging.verbosity, 4);
    assert_eq!(c.iptables.sync_period.to_string(), "20s");
    assert_eq!(c.node_port_addresses, vec!["10.0.0.0/8", "192.168.0.0/16"]);
    assert_eq!(c.feature_gates.get("LoggingBetaOptions"), Some(&false));
    assert_eq!(c.feature_gates.get("LoggingAlphaOptions"), Some(&true));
}

#[test]
fn deprecated_port_flags() {
    let o = ok(&[
        "--healthz-port=0",
        "--metrics-bind-address=127.0.0.2",
        "--metrics-port=9999",
    ]);
    assert_eq!(o.config.healthz_bind_address, "");
    assert_eq!(o.config.metrics_bind_address, "127.0.0.2:9999");
    assert!(o.warnings.iter().any(|w| w.contains("--healthz-port")));
    assert_eq!(
        ok(&["--metrics-bind-address="]).config.metrics_bind_address,
        ""
    );
}

#[test]
fn underscores_in_flag_names() {
    let o = ok(&["--iptables_sync_period=10s", "--"]);
    assert_eq!(o.config.nftables.sync_period, GoDuration::from_secs(10));
}

#[test]
fn unimplemented_flags_warn() {
    let o = ok(&[
        "--profiling",
        "--proxy-port-range=1000-2000",
        "--kubeconfig=/k",
        "--config-sync-period=1m",
        "--oom-score-adj=-500",
        "--conntrack-min=5",
        "--init-only",
    ]);
    for flag in [
        "--profiling",
        "--proxy-port-range",
        "--config-sync-period",
        "--oom-score-adj",
    ] {
        assert!(
            o.warnings.iter().any(|w| w.contains(&format!("{flag} "))),
            "no warning for {flag}: {:?}",
            o.warnings
        );
    }
    assert!(o.config.enable_profiling);
    assert_eq!(o.config.oom_score_adj, Some(-500));
    assert_eq!(o.config.client_connection.kubeconfig, "/k");

    let o = ok(&["--proxy-mode=ipvs", "--detect-local-mode=NodeCIDR"]);
    assert!(
        !o.warnings.iter().any(|w| w.contains("not implemented")),
        "{:?}",
        o.warnings
    );
    assert!(
        !o.warnings.iter().any(|w| w.contains("NodeCIDR")),
        "every detect-local mode is implemented: {:?}",
        o.warnings
    );
    let o = ok(&[
        "--proxy-mode=nftables",
        "--masquerade-all",
        "--v=2",
        "--manifests=/m",
    ]);
    assert!(o.warnings.is_empty(), "{:?}", o.warnings);
    // The API source's connection flags are implemented.
    let o = ok(&[
        "--kubeconfig=/k",
        "--master=http://127.0.0.1:8080",
        "--kube-api-qps=20",
        "--kube-api-burst=40",
        "--kube-api-content-type=application/json",
    ]);
    assert!(o.warnings.is_empty(), "{:?}", o.warnings);
}

#[test]
fn config_file_values_and_defaults() {
    let f = config_file(&format!(
        "{HEADER}bindAddress: 10.0.0.5\nclusterCIDR: 10.244.0.0/16\nnftables:\n  syncPeriod: 1m\n  \
         minSyncPeriod: 0s\nconntrack:\n  maxPerCore: 0\nlogging:\n  flushFrequency: 0\n  verbosity: 2\n"
    ));
    let c = load_config_file(f.path()).unwrap();
    assert_eq!(c.bind_address, "10.0.0.5");
    assert_eq!(c.healthz_bind_address, "0.0.0.0:10256");
    assert_eq!(c.nftables.sync_period, GoDuration::from_mins(1));
    // Upstream re-defaults zero durations found in the file.
    assert_eq!(c.nftables.min_sync_period, GoDuration::from_secs(1));
    // ...but keeps explicit zeros of pointer fields.
    assert_eq!(c.conntrack.max_per_core, Some(0));
    assert_eq!(c.conntrack.min, Some(131072));
    assert_eq!(c.logging.flush_frequency, GoDuration::from_secs(5));
    assert_eq!(c.logging.verbosity, 2);
    assert_eq!(c.mode, ProxyMode::NfTables);
    assert_eq!(c.node_port_addresses, vec!["primary"]);

    let f = config_file(&format!("{HEADER}bindAddress: \"::\"\n"));
    let c = load_config_file(f.path()).unwrap();
    assert_eq!(c.healthz_bind_address, "[::]:10256");
    assert_eq!(c.metrics_bind_address, "[::1]:10249");
}

#[test]
fn kubeadm_style_config_loads() {
    // Shape of the ConfigMap kubeadm v1.30 generates.
    let yaml = r#"apiVersion: kubeproxy.config.k8s.io/v1alpha1
bindAddress: 0.0.0.0
bindAddressHardFail: false
clientConnection:
  acceptContentTypes: ""
  burst: 0
  contentType: ""
  kubeconfig: /var/lib/kube-proxy/kubeconfig.conf
  qps: 0
clusterCIDR: 10.244.0.0/16
configSyncPeriod: 0s
conntrack:
  maxPerCore: null
  min: null
  tcpBeLiberal: false
  tcpCloseWaitTimeout: null
  tcpEstablishedTimeout: null
  udpStreamTimeout: 0s
  udpTimeout: 0s
detectLocal:
  bridgeInterface: ""
  interfaceNamePrefix: ""
detectLocalMode: ""
enableProfiling: false
healthzBindAddress: ""
hostnameOverride: ""
iptables:
  localhostNodePorts: null
  masqueradeAll: false
  masqueradeBit: null
  minSyncPeriod: 0s
  syncPeriod: 0s
ipvs:
  excludeCIDRs: null
  minSyncPeriod: 0s
  scheduler: ""
  strictARP: false
  syncPeriod: 0s
  tcpFinTimeout: 0s
  tcpTimeout: 0s
  udpTimeout: 0s
kind: KubeProxyConfiguration
logging:
  flushFrequency: 0
  options:
    json:
      infoBufferSize: "0"
    text:
      infoBufferSize: "0"
  verbosity: 0
metricsBindAddress: ""
mode: ""
nftables:
  masqueradeAll: false
  masqueradeBit: null
  minSyncPeriod: 0s
  syncPeriod: 0s
nodePortAddresses: null
oomScoreAdj: null
portRange: ""
showHiddenMetricsForVersion: ""
winkernel:
  enableDSR: false
  forwardHealthCheckVip: false
  networkName: ""
  rootHnsEndpointName: ""
  sourceVip: ""
"#;
    let f = config_file(yaml);
    let c = load_config_file(f.path()).unwrap_or_else(|e| panic!("{e}"));
    let mut want = KubeProxyConfiguration::effective_default();
    want.client_connection.kubeconfig = "/var/lib/kube-proxy/kubeconfig.conf".into();
    want.cluster_cidr = "10.244.0.0/16".into();
    assert_eq!(c, want);
    let o = ok(&["--config", f.path().to_str().unwrap()]);
    assert_eq!(o.config, want);
}

#[test]
fn config_errors_name_file_field_and_line() {
    let f = config_file(&format!("{HEADER}mode: nftables\nbogusField: 1\n"));
    let msg = err(&["--config", f.path().to_str().unwrap()]);
    assert!(msg.contains("bogusField"), "{msg}");
    assert!(msg.contains("line 4"), "{msg}");
    assert!(msg.contains(&f.path().display().to_string()), "{msg}");

    let f = config_file(&format!(
        "{HEADER}iptables:\n  syncPeriod: 30s\n  sinkPeriod: 1s\n"
    ));
    let msg = load_config_file(f.path()).unwrap_err().to_string();
    assert!(
        msg.contains("sinkPeriod") && msg.contains("line 5"),
        "{msg}"
    );

    let f = config_file(&format!("{HEADER}iptables: {{syncPeriod: banana}}\n"));
    let msg = load_config_file(f.path()).unwrap_err().to_string();
    assert!(msg.contains("banana") && msg.contains("line 3"), "{msg}");

    let f = config_file(&format!("{HEADER}conntrack:\n  min: lots\n"));
    let msg = load_config_file(f.path()).unwrap_err().to_string();
    assert!(msg.contains("line 4"), "{msg}");

    let f = config_file(&format!("{HEADER}mode: [unclosed\n"));
    let msg = load_config_file(f.path()).unwrap_err().to_string();
    assert!(msg.contains("line"), "{msg}");

    let f = config_file(&format!("{HEADER}mode: userspce\n"));
    let msg = load_config_file(f.path()).unwrap_err().to_string();
    assert!(msg.contains("userspce") && msg.contains("line 3"), "{msg}");
}

#[test]
fn wrong_type_meta() {
    let f =
        config_file("apiVersion: kubeproxy.config.k8s.io/v1beta1\nkind: KubeProxyConfiguration\n");
    let msg = load_config_file(f.path()).unwrap_err().to_string();
    assert!(
        msg.contains("apiVersion") && msg.contains("v1beta1") && msg.contains("line 1"),
        "{msg}"
    );
    let f =
        config_file("apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeletConfiguration\n");
    let msg = load_config_file(f.path()).unwrap_err().to_string();
    assert!(
        msg.contains("kind") && msg.contains("KubeletConfiguration"),
        "{msg}"
    );
    let f = config_file("mode: nftables\n");
    let msg = load_config_file(f.path()).unwrap_err().to_string();
    assert!(msg.contains("apiVersion is missing"), "{msg}");
}

#[test]
fn missing_config_file() {
    let msg = err(&["--config=/nonexistent/kube-proxy.yaml"]);
    assert!(msg.contains("/nonexistent/kube-proxy.yaml"), "{msg}");
}

#[test]
fn validation_errors_from_file_have_lines_and_are_collected() {
    let f = config_file(&format!(
        "{HEADER}bindAddress: 10.0.0.1\nnftables:\n  masqueradeBit: 40\n  syncPeriod: -1s\noomScoreAdj: 5000\n"
    ));
    let e = parse_args(&["--config", f.path().to_str().unwrap()]).unwrap_err();
    let OptionsError::Invalid { errors, .. } = &e else {
        panic!("{e}")
    };
    let got: Vec<(String, Option<u64>)> = errors
        .iter()
        .map(|e| (e.error.field.clone(), e.line))
        .collect();
    assert!(
        got.contains(&("nftables.masqueradeBit".into(), Some(5))),
        "{got:?}"
    );
    assert!(
        got.contains(&("nftables.syncPeriod".into(), Some(6))),
        "{got:?}"
    );
    assert!(got.contains(&("oomScoreAdj".into(), Some(7))), "{got:?}");
    let msg = e.to_string();
    assert!(msg.contains("line 5: nftables.masqueradeBit"), "{msg}");
}

#[test]
fn config_file_and_flags_follow_upstream_precedence() {
    let f = config_file(&format!(
        "{HEADER}hostnameOverride: from-file\nmode: nftables\nlogging:\n  verbosity: 1\n  vmodule:\n  - filePattern: a\n    verbosity: 2\nnftables:\n  syncPeriod: 45s\n"
    ));
    let path = f.path().to_str().unwrap();
    let o = ok(&[
        "--config",
        path,
        "--hostname-override=From-Flag",
        "-v=5",
        "--vmodule=b=3",
        "--iptables-sync-period=10s",
        "--proxy-mode=iptables",
        "--cleanup",
    ]);
    // Honoured on top of the file.
    assert_eq!(o.config.hostname_override, "from-flag");
    assert_eq!(o.config.logging.verbosity, 5);
    let patterns: Vec<&str> = o
        .config
        .logging
        .vmodule
        .iter()
        .map(|v| v.file_pattern.as_str())
        .collect();
    assert_eq!(patterns, vec!["b", "a"]);
    assert_eq!(o.action, Action::Cleanup);
    // Ignored, as upstream does, with a warning each.
    assert_eq!(o.config.nftables.sync_period, GoDuration::from_secs(45));
    assert_eq!(o.config.mode, ProxyMode::NfTables);
    for flag in ["--iptables-sync-period", "--proxy-mode"] {
        assert!(
            o.warnings
                .iter()
                .any(|w| w.contains(flag) && w.contains("--config")),
            "{flag}: {:?}",
            o.warnings
        );
    }
    assert!(!o.warnings.iter().any(|w| w.contains("--hostname-override")));
}

#[test]
fn write_then_load_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.yaml");
    let out_s = out.to_str().unwrap();

    // Defaults only.
    let o = ok(&["--write-config-to", out_s]);
    assert_eq!(o.action, Action::WriteConfig(out.clone()));
    write_config(&o.config, &out).unwrap();
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(
        text.contains("apiVersion: kubeproxy.config.k8s.io/v1alpha1"),
        "{text}"
    );
    assert!(text.contains("kind: KubeProxyConfiguration"), "{text}");
    assert!(text.contains("15m0s") && text.contains("30s"), "{text}");
    assert_eq!(load_config_file(&out).unwrap(), o.config);

    // Many flags.
    let o = ok(&[
        "--write-config-to",
        out_s,
        "--bind-address=::",
        "--cluster-cidr=10.244.0.0/16,fd00::/56",
        "--iptables-sync-period=1h2m3.5s",
        "--iptables-min-sync-period=0",
        "--masquerade-all",
        "--iptables-masquerade-bit=0",
        "--feature-gates=LoggingAlphaOptions=true",
        "--hostname-override=n1",
        "--metrics-bind-address=",
        "--conntrack-max-per-core=0",
        "--kube-api-qps=2.5",
        "--vmodule=x=1",
        "--v=3",
        "--ipvs-exclude-cidrs=1.0.0.0/8",
    ]);
    write_config(&o.config, &out).unwrap();
    let back = load_config_file(&out).unwrap();
    // Two intended differences: upstream re-defaults a zero minSyncPeriod and an
    // empty metricsBindAddress found in a file.
    let mut want = o.config.clone();
    want.iptables.min_sync_period = GoDuration::from_secs(1);
    want.nftables.min_sync_period = GoDuration::from_secs(1);
    want.metrics_bind_address = "[::1]:10249".into();
    assert_eq!(back, want);

    // From a config file plus overriding flags, then through parse again.
    let src = config_file(&format!(
        "{HEADER}mode: nftables\nclusterCIDR: 10.0.0.0/8\n"
    ));
    let o = ok(&[
        "--config",
        src.path().to_str().unwrap(),
        "--write-config-to",
        out_s,
        "--v=7",
        "--hostname-override=x",
    ]);
    write_config(&o.config, &out).unwrap();
    let again = ok(&["--config", out_s]);
    assert_eq!(again.config, o.config);
    assert_eq!(again.config.logging.verbosity, 7);
}

#[test]
fn write_config_reports_path() {
    let e = write_config(
        &KubeProxyConfiguration::default(),
        Path::new("/nonexistent-dir/x.yaml"),
    )
    .unwrap_err();
    assert!(e.to_string().contains("/nonexistent-dir/x.yaml"));
    assert_eq!(e.exit_code(), 1);
}

#[test]
fn locate_field_walks_nesting() {
    let text = "a: 1\nb:\n  c: 2\n  d:\n    e: 3\nc: 4\n";
    assert_eq!(locate_field(text, "c"), Some(6));
    assert_eq!(locate_field(text, "b.c"), Some(3));
    assert_eq!(locate_field(text, "b.d.e"), Some(5));
    assert_eq!(locate_field(text, "b.x"), Some(2));
    assert_eq!(locate_field(text, "zz"), None);
}
#[test]
fn type_errors_name_the_field() {
    let f = config_file(&format!(
        "{HEADER}conntrack:\n  tcpBeLiberal: false\n  min: lots\n"
    ));
    let msg = load_config_file(f.path()).unwrap_err().to_string();
    assert!(
        msg.contains("conntrack.min") && msg.contains("line 5"),
        "{msg}"
    );
    assert_eq!(
        field_path_at("a:\n  b:\n    c: x\n  d: y\n", 4).as_deref(),
        Some("a.d")
    );
    assert_eq!(field_path_at("a: {b: c}\n", 1).as_deref(), Some("a"));
    assert_eq!(field_path_at("- x\n", 1), None);
}

#[test]
fn userspace_mode_and_udp_timeout_are_accepted() {
    let o = ok(&["--proxy-mode=userspace", "--udp-timeout=2s"]);
    assert_eq!(o.config.mode, ProxyMode::Userspace);
    assert_eq!(o.udp_timeout, Some(GoDuration::from_secs(2)));
    assert!(o.warnings.is_empty(), "{:?}", o.warnings);
    let f = config_file(&format!("{HEADER}mode: userspace\n"));
    assert_eq!(
        load_config_file(f.path()).unwrap().mode,
        ProxyMode::Userspace
    );
    assert_eq!(ok(&[]).udp_timeout, None);
}

#[test]
fn feature_gates_follow_upstreams_rules_from_flags_and_file() {
    let msg = err(&["--feature-gates=NoSuchGate=true"]);
    assert!(
        msg.contains("unrecognized feature gate: NoSuchGate"),
        "{msg}"
    );
    assert!(msg.contains("--feature-gates"), "{msg}");
    let msg = err(&["--feature-gates=TopologyAwareHints=false"]);
    assert!(
        msg.contains(
            "cannot set feature gate TopologyAwareHints to false, feature is locked to true"
        ),
        "{msg}"
    );
    let msg = err(&["--feature-gates=AllowServiceExternalIPs=maybe"]);
    assert!(
        msg.contains("invalid value of AllowServiceExternalIPs=maybe"),
        "{msg}"
    );
    assert!(err(&["--feature-gates=AllowServiceExternalIPs"]).contains("missing bool value"));
    let msg = err(&["--proxy-mode=ipvs", "--feature-gates=KubeProxyIPVS=false"]);
    assert!(msg.contains("KubeProxyIPVS"), "{msg}");

    let o = ok(&["--feature-gates=AllowServiceExternalIPs=false,AllAlpha=true"]);
    assert!(
        o.warnings.iter().any(|w| w
            == "Setting deprecated feature gate AllowServiceExternalIPs=false. It will be removed in a future release."),
        "{:?}",
        o.warnings
    );

    let f = config_file(&format!("{HEADER}featureGates:\n  Bogus: true\n"));
    let msg = err(&["--config", f.path().to_str().unwrap()]);
    assert!(msg.contains("unrecognized feature gate: Bogus"), "{msg}");
    let f = config_file(&format!(
        "{HEADER}featureGates:\n  AllowServiceExternalIPs: false\n"
    ));
    let o = ok(&["--config", f.path().to_str().unwrap()]);
    assert_eq!(
        o.config.feature_gates.get("AllowServiceExternalIPs"),
        Some(&false)
    );
}

#[test]
fn init_only_is_an_action_after_cleanup() {
    assert_eq!(ok(&["--init-only"]).action, Action::InitOnly);
    assert_eq!(ok(&["--init-only=false"]).action, Action::Run);
    // Upstream handles --cleanup before it gets to the init-only exit.
    assert_eq!(ok(&["--init-only", "--cleanup"]).action, Action::Cleanup);
    let o = ok(&["--init-only"]);
    assert!(
        !o.warnings.iter().any(|w| w.contains("--init-only")),
        "{:?}",
        o.warnings
    );
}

#[test]
fn windows_modes_are_named_out_of_scope() {
    for mode in ["winuserspace", "winkernel"] {
        let e = err(&[&format!("--proxy-mode={mode}")]);
        assert!(e.contains(mode) && e.contains("Windows mode"), "{e}");
    }
}

#[test]
fn given_flags_are_kept_for_flagz() {
    let o = ok(&[
        "--v=3",
        "--feature-gates=ComponentFlagz=true",
        "--metrics-bind-address=127.0.0.1:10249",
    ]);
    assert_eq!(o.given_flags.get("v").map(String::as_str), Some("3"));
    assert_eq!(
        o.given_flags
            .get("metrics-bind-address")
            .map(String::as_str),
        Some("127.0.0.1:10249")
    );
    assert!(o.given_flags.contains_key("feature-gates"));
    assert!(!o.given_flags.contains_key("healthz-bind-address"));
}

/// `--service-counters`: off by default, a flag only (upstream's file has no place for
/// it, so it counts with `--config` too), and refused in the modes that do not count.
#[test]
fn service_counters_flag_is_nftables_only() {
    assert!(!ok(&[]).service_counters);
    let o = ok(&["--service-counters"]);
    assert!(o.service_counters);
    assert!(o.warnings.is_empty(), "{:?}", o.warnings);
    assert!(ok(&["--proxy-mode=nftables", "--service-counters=true"]).service_counters);
    assert!(!ok(&["--service-counters=false", "--proxy-mode=iptables"]).service_counters);
    let f = config_file(&format!("{HEADER}mode: nftables\n"));
    let path = format!("--config={}", f.path().display());
    let o = ok(&[&path, "--service-counters"]);
    assert!(o.service_counters);
    assert!(o.warnings.is_empty(), "{:?}", o.warnings);
    for mode in ["iptables", "ipvs", "userspace"] {
        let msg = err(&[&format!("--proxy-mode={mode}"), "--service-counters"]);
        assert!(
            msg.contains("only in nftables mode") && msg.contains(mode),
            "{mode}: {msg}"
        );
    }
    let f = config_file(&format!("{HEADER}mode: iptables\n"));
    let msg = err(&[
        &format!("--config={}", f.path().display()),
        "--service-counters",
    ]);
    assert!(msg.contains("only in nftables mode"), "{msg}");
}
