//! Command line and configuration file handling, compatible with upstream
//! kube-proxy v1.35.
//!
//! The effective configuration is built like upstream's `Options.Complete`:
//! - without `--config`: v1alpha1 defaults, then every flag given;
//! - with `--config FILE`: the file (defaulted), then only the logging flags
//!   and `--hostname-override`; other flags are ignored, as upstream does,
//!   and each one ignored produces a warning.
//!
//! Then platform defaults, then validation.

// The binary does not call into this module yet (main.rs is being written
// separately); drop this once it does.

mod config;
mod duration;
pub mod features;
mod flags;
mod validate;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};

use clap::{CommandFactory, FromArgMatches};

pub use config::*;
pub use duration::{parse_duration, DurationError, GoDuration};
pub use flags::{Flags, FLAGS_APPLIED_WITH_CONFIG_FILE, IMPLEMENTED_FLAGS};
pub use validate::{validate, FieldError};

/// What the binary should do after parsing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Run the proxy.
    Run,
    /// `--write-config-to FILE`: write `Options::config` there and exit.
    WriteConfig(PathBuf),
    /// `--cleanup`: remove our rules and exit.
    Cleanup,
    /// `--version`: print [`version_string`] and exit 0.
    PrintVersion,
    /// `--init-only`: do the privileged set-up (sysctls) and exit.
    InitOnly,
}

/// The parsed command line.
#[derive(Clone, Debug, PartialEq)]
pub struct Options {
    pub action: Action,
    /// The effective configuration: defaults <- config file <- flags.
    pub config: KubeProxyConfiguration,
    /// `--manifests PATH`: a file or directory of Service/EndpointSlice YAML.
    pub manifests: Option<PathBuf>,
    /// `--udp-timeout`: UDP session idle timeout of the userspace mode (not part of the
    /// configuration file since upstream removed that mode).
    pub udp_timeout: Option<GoDuration>,
    /// `--master URL` (not part of the configuration file upstream either).
    pub master: Option<String>,
    /// `--service-counters`: per-Service new-connection counters (ours; upstream's
    /// configuration file has no place for it, so the flag counts with `--config` too).
    pub service_counters: bool,
    /// Human-readable notes for the log, e.g. accepted-but-unimplemented flags.
    pub warnings: Vec<String>,
    /// The flags given on the command line and their values, for `/flagz`.
    pub given_flags: BTreeMap<String, String>,
}

/// Why the command line or configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum OptionsError {
    /// `-h/--help`: print the text to stdout and exit 0.
    #[error("{0}")]
    Help(String),
    /// An unknown flag, a bad flag value, or a flag-level inconsistency.
    #[error("{0}")]
    Flag(String),
    #[error("cannot read config file {path}: {source}")]
    ReadConfig {
        path: PathBuf,
        source: std::io::Error,
    },
    /// YAML syntax, type or unknown-field error in the config file.
    #[error("config file {path}{}: {message}", fmt_line(*line, *column))]
    ParseConfig {
        path: PathBuf,
        line: Option<u64>,
        column: Option<u64>,
        message: String,
    },
    /// One or more fields failed validation.
    #[error("{}", fmt_invalid(source_file.as_deref(), errors))]
    Invalid {
        /// The config file the values came from, if any.
        source_file: Option<PathBuf>,
        errors: Vec<LocatedFieldError>,
    },
    #[error("cannot write config file {path}: {message}")]
    WriteConfig { path: PathBuf, message: String },
}

impl OptionsError {
    /// Process exit code: 0 for help, 1 for everything else (not clap's 2).
    pub fn exit_code(&self) -> i32 {
        match self {
            OptionsError::Help(_) => 0,
            _ => 1,
        }
    }

    /// True when this is a help request rather than a failure.
    pub fn is_help(&self) -> bool {
        matches!(self, OptionsError::Help(_))
    }
}

/// A validation error plus where it came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocatedFieldError {
    pub error: FieldError,
    /// 1-based line in the config file, when found.
    pub line: Option<u64>,
    /// The command-line flag that set the value, when it came from a flag.
    pub flag: Option<&'static str>,
}

impl fmt::Display for LocatedFieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(line) = self.line {
            write!(f, "line {line}: ")?;
        }
        write!(f, "{}", self.error.field)?;
        if let Some(flag) = self.flag {
            write!(f, " (--{flag})")?;
        }
        write!(f, ": {}", self.error.message)
    }
}

fn fmt_line(line: Option<u64>, column: Option<u64>) -> String {
    match (line, column) {
        (Some(l), Some(c)) => format!(", line {l}, column {c}"),
        (Some(l), None) => format!(", line {l}"),
        _ => String::new(),
    }
}

fn fmt_invalid(file: Option<&Path>, errors: &[LocatedFieldError]) -> String {
    let mut out = match file {
        Some(p) => format!("invalid configuration in {}:", p.display()),
        None => "invalid configuration:".to_string(),
    };
    for e in errors {
        out.push_str("\n  - ");
        out.push_str(&e.to_string());
    }
    out
}

/// The upstream kube-proxy release whose behaviour we match.
pub const UPSTREAM_VERSION: &str = "v1.35.0";

/// Our version as upstream's `gitVersion` would carry it: `v1.35.0-kube-proxy-rs.0.1.0`.
pub fn git_version() -> String {
    format!(
        "{UPSTREAM_VERSION}-kube-proxy-rs.{}",
        env!("CARGO_PKG_VERSION")
    )
}

/// `--version`: upstream prints `Kubernetes v1.35.0`; tools read the second word, so
/// that is the release we match, and ours follows in parentheses.
pub fn version_string() -> String {
    format!(
        "Kubernetes {UPSTREAM_VERSION} (kube-proxy-rs {})",
        env!("CARGO_PKG_VERSION")
    )
}

/// Parses the command line (including the program name as first element) and,
/// when given, the `--config` file; returns the effective, validated options.
pub fn parse<I, T>(args: I) -> Result<Options, OptionsError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let args = normalize_flag_names(args.into_iter().map(Into::into));
    let cmd = Flags::command();
    let matches = cmd.clone().try_get_matches_from(args).map_err(from_clap)?;
    let flags = Flags::from_arg_matches(&matches).map_err(from_clap)?;
    let given = flags::flags_set(&cmd, &matches);

    if matches!(
        flags.version,
        Some(flags::VersionFlag::On | flags::VersionFlag::Raw)
    ) {
        // Upstream prints the version before looking at anything else.
        return Ok(Options {
            action: Action::PrintVersion,
            config: KubeProxyConfiguration::effective_default(),
            manifests: flags.manifests,
            udp_timeout: flags.udp_timeout,
            master: flags.master,
            service_counters: false,
            warnings: Vec::new(),
            given_flags: BTreeMap::new(),
        });
    }

    let mut warnings = Vec::new();
    let config = match &flags.config {
        Some(path) => {
            let mut cfg = load_config_file(path)?;
            flags.apply_logging_to(&mut cfg);
            for flag in &given {
                if !FLAGS_APPLIED_WITH_CONFIG_FILE.contains(flag) {
                    warnings.push(format!(
                        "flag --{flag} is ignored because --config is given \
                         (as upstream kube-proxy does); set it in the config file instead"
                    ));
                }
            }
            apply_hostname_override(&flags, &mut cfg)?;
            cfg.apply_platform_defaults();
            check(&cfg, Some(path), &given)?;
            cfg
        }
        None => {
            let mut cfg = KubeProxyConfiguration::default();
            flags.apply_to(&mut cfg);
            // Upstream's deprecated --healthz-port/--metrics-port handling; it
            // also turns a bare IP from the *-bind-address flags into IP:port.
            cfg.healthz_bind_address = address_from_deprecated_port(
                &cfg.healthz_bind_address,
                flags.healthz_port.unwrap_or(DEFAULT_HEALTHZ_PORT),
            );
            cfg.metrics_bind_address = address_from_deprecated_port(
                &cfg.metrics_bind_address,
                flags.metrics_port.unwrap_or(DEFAULT_METRICS_PORT),
            );
            apply_hostname_override(&flags, &mut cfg)?;
            cfg.apply_platform_defaults();
            check(&cfg, None, &given)?;
            cfg
        }
    };

    // Errors were reported by `check`; what is left are upstream's warnings.
    if let Ok((_, gate_warnings)) = features::FeatureGates::resolve(&config.feature_gates) {
        warnings.extend(gate_warnings);
    }
    for flag in &given {
        let honoured = flags.config.is_none() || FLAGS_APPLIED_WITH_CONFIG_FILE.contains(flag);
        if honoured && !IMPLEMENTED_FLAGS.contains(flag) {
            warnings.push(flags::warning_for_flag(flag));
        }
    }
    if !matches!(
        config.mode,
        ProxyMode::NfTables | ProxyMode::Userspace | ProxyMode::IpTables | ProxyMode::Ipvs
    ) {
        warnings.push(format!(
            "proxy mode {:?} is not implemented yet; only \"nftables\", \"iptables\", \"ipvs\" and \"userspace\" are",
            config.mode.as_str()
        ));
    }

    let service_counters = flags.service_counters == Some(true);
    if service_counters && !matches!(config.mode, ProxyMode::NfTables | ProxyMode::Unset) {
        return Err(OptionsError::Flag(format!(
            "--service-counters is supported only in nftables mode; {:?} mode does not count \
             per Service (use --proxy-mode=nftables, or drop the flag)",
            config.mode.as_str()
        )));
    }

    let action = if let Some(path) = flags.write_config_to {
        Action::WriteConfig(path)
    } else if flags.cleanup == Some(true) {
        Action::Cleanup
    } else if flags.init_only == Some(true) {
        Action::InitOnly
    } else {
        Action::Run
    };

    Ok(Options {
        action,
        config,
        manifests: flags.manifests,
        udp_timeout: flags.udp_timeout,
        master: flags.master,
        service_counters,
        warnings,
        given_flags: flags::given_values(&cmd, &matches),
    })
}

/// Upstream `processHostnameOverrideFlag`: the flag wins over the file, is
/// trimmed and lower-cased, and may not be blank.
fn apply_hostname_override(
    flags: &Flags,
    cfg: &mut KubeProxyConfiguration,
) -> Result<(), OptionsError> {
    if let Some(name) = flags.hostname_override.as_deref().filter(|n| !n.is_empty()) {
        let name = name.trim();
        if name.is_empty() {
            return Err(OptionsError::Flag(
                "invalid value for '--hostname-override': must not be blank".to_string(),
            ));
        }
        cfg.hostname_override = name.to_lowercase();
    }
    Ok(())
}

/// Port 0 disables the server; otherwise a bare IP gets the port.
fn address_from_deprecated_port(addr: &str, port: u16) -> String {
    if port == 0 {
        return String::new();
    }
    append_port_if_needed(addr, port)
}

fn check(
    cfg: &KubeProxyConfiguration,
    file: Option<&Path>,
    given: &[&'static str],
) -> Result<(), OptionsError> {
    let errors = validate(cfg);
    if errors.is_empty() {
        return Ok(());
    }
    let text = file.and_then(|p| std::fs::read_to_string(p).ok());
    let errors = errors
        .into_iter()
        .map(|error| {
            let base = error.field.split('[').next().unwrap_or_default();
            let flag = flags::FIELD_FLAGS
                .iter()
                .find(|(field, flag)| {
                    *field == base
                        && given.contains(flag)
                        && (file.is_none() || FLAGS_APPLIED_WITH_CONFIG_FILE.contains(flag))
                })
                .map(|(_, flag)| *flag);
            let line = text.as_deref().and_then(|t| locate_field(t, &error.field));
            LocatedFieldError { error, line, flag }
        })
        .collect();
    Err(OptionsError::Invalid {
        source_file: file.map(Path::to_path_buf),
        errors,
    })
}

fn from_clap(e: clap::Error) -> OptionsError {
    use clap::error::ErrorKind;
    let text = e.render().to_string();
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            OptionsError::Help(text)
        }
        _ => OptionsError::Flag(text.trim_end().to_string()),
    }
}

/// Upstream normalises `_` to `-` in flag names (`--iptables_sync_period`).
fn normalize_flag_names(args: impl Iterator<Item = OsString>) -> Vec<OsString> {
    let mut out = Vec::new();
    let mut after_terminator = false;
    for (i, arg) in args.enumerate() {
        let fixed = match arg.to_str() {
            Some("--") => {
                after_terminator = true;
                None
            }
            Some(s) if i > 0 && !after_terminator && s.starts_with("--") => {
                let (name, value) = match s.find('=') {
                    Some(eq) => s.split_at(eq),
                    None => (s, ""),
                };
                Some(OsString::from(format!(
                    "--{}{value}",
                    name[2..].replace('_', "-")
                )))
            }
            _ => None,
        };
        out.push(fixed.unwrap_or(arg));
    }
    out
}

/// Reads, decodes (strictly), and defaults a `KubeProxyConfiguration` file.
/// The result has platform defaults applied but is not validated.
pub fn load_config_file(path: &Path) -> Result<KubeProxyConfiguration, OptionsError> {
    let text = std::fs::read_to_string(path).map_err(|source| OptionsError::ReadConfig {
        path: path.to_path_buf(),
        source,
    })?;
    let mut cfg = decode_config(&text).map_err(|(line, column, mut message)| {
        // Type errors from the YAML decoder do not say which field they are about.
        if let Some(path) = line.and_then(|l| field_path_at(&text, l)) {
            if !message.contains(&path) {
                message = format!("{path}: {message}");
            }
        }
        OptionsError::ParseConfig {
            path: path.to_path_buf(),
            line,
            column,
            message,
        }
    })?;
    cfg.apply_defaults();
    cfg.apply_platform_defaults();
    Ok(cfg)
}

type DecodeError = (Option<u64>, Option<u64>, String);

fn saphyr_error(e: &serde_saphyr::Error) -> DecodeError {
    let loc = e.location();
    // The rendered message may repeat the position; keep only its first line.
    let message = e.to_string();
    let first = message.lines().next().unwrap_or_default();
    let message = strip_position_prefix(first).to_string();
    (
        loc.as_ref().map(|l| l.line()),
        loc.as_ref().map(|l| l.column()),
        message,
    )
}

/// Drops a leading `error: line N column M: ` that we already report.
fn strip_position_prefix(message: &str) -> &str {
    let m = message.strip_prefix("error: ").unwrap_or(message);
    let Some(rest) = m.strip_prefix("line ") else {
        return m;
    };
    match rest.split_once(": ") {
        Some((pos, tail)) if pos.contains("column") => tail,
        _ => m,
    }
}

fn decode_config(text: &str) -> Result<KubeProxyConfiguration, DecodeError> {
    // Check the type first so a wrong kind is reported as such, not as a
    // pile of unknown fields.
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct TypeMeta {
        #[serde(default)]
        api_version: Option<String>,
        #[serde(default)]
        kind: Option<String>,
    }
    let meta: TypeMeta = serde_saphyr::from_str(text).map_err(|e| saphyr_error(&e))?;
    let at = |field: &str| locate_field(text, field);
    match meta.api_version.as_deref() {
        Some(API_VERSION) => {}
        Some(other) => {
            return Err((
                at("apiVersion"),
                None,
                format!("apiVersion is {other:?}, expected {API_VERSION:?}"),
            ))
        }
        None => {
            return Err((
                None,
                None,
                format!("apiVersion is missing, expected {API_VERSION:?}"),
            ))
        }
    }
    match meta.kind.as_deref() {
        Some(KIND) => {}
        Some(other) => {
            return Err((
                at("kind"),
                None,
                format!("kind is {other:?}, expected {KIND:?}"),
            ))
        }
        None => return Err((None, None, format!("kind is missing, expected {KIND:?}"))),
    }
    serde_saphyr::from_str(text).map_err(|e| saphyr_error(&e))
}

/// Writes `cfg` as YAML (with apiVersion and kind) to `path`.
pub fn write_config(cfg: &KubeProxyConfiguration, path: &Path) -> Result<(), OptionsError> {
    let fail = |message: String| OptionsError::WriteConfig {
        path: path.to_path_buf(),
        message,
    };
    let mut cfg = cfg.clone();
    cfg.api_version = API_VERSION.to_string();
    cfg.kind = KIND.to_string();
    let yaml = serde_saphyr::to_string(&cfg).map_err(|e| fail(e.to_string()))?;
    std::fs::write(path, yaml).map_err(|e| fail(e.to_string()))
}

/// Dotted path of the key on 1-based `line` of block-style YAML, found by
/// walking up to less-indented keys; `None` if the line holds no key.
fn field_path_at(text: &str, line: u64) -> Option<String> {
    let lines: Vec<&str> = text.lines().collect();
    let idx = usize::try_from(line).ok()?.checked_sub(1)?;
    let key_of = |l: &str| -> Option<(usize, String)> {
        let trimmed = l.trim_start();
        let (key, _) = trimmed.split_once(':')?;
        let key = key.trim().trim_matches(['"', '\'']);
        if key.is_empty() || key.starts_with(['-', '#', '{', '[']) || key.contains(' ') {
            return None;
        }
        Some((l.len() - trimmed.len(), key.to_string()))
    };
    let (mut indent, key) = key_of(lines.get(idx)?)?;
    let mut path = vec![key];
    for l in lines[..idx].iter().rev() {
        if indent == 0 {
            break;
        }
        if let Some((i, k)) = key_of(l) {
            if i < indent {
                path.push(k);
                indent = i;
            }
        }
    }
    path.reverse();
    Some(path.join("."))
}

/// Best-effort 1-based line of a dotted field path (`iptables.syncPeriod`,
/// `nodePortAddresses[1]`) in block-style YAML; falls back to the nearest
/// parent that was found.
fn locate_field(text: &str, field: &str) -> Option<u64> {
    let lines: Vec<&str> = text.lines().collect();
    let mut start = 0;
    let mut parent_indent: Option<usize> = None;
    let mut found_line = None;
    for segment in field.split('.') {
        let key = segment.split('[').next().unwrap_or(segment);
        let mut hit = None;
        for (i, line) in lines.iter().enumerate().skip(start) {
            let trimmed = line.trim_start();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            let indent = line.len() - trimmed.len();
            match parent_indent {
                Some(p) if indent <= p => break,
                None if indent > 0 => continue,
                _ => {}
            }
            let unquoted = trimmed.trim_start_matches(['"', '\'']);
            if let Some(rest) = unquoted.strip_prefix(key) {
                if rest.trim_start_matches(['"', '\'']).starts_with(':') {
                    hit = Some((i, indent));
                    break;
                }
            }
        }
        let Some((i, indent)) = hit else { break };
        found_line = Some(i as u64 + 1);
        start = i + 1;
        parent_indent = Some(indent);
    }
    found_line
}

#[cfg(test)]
mod tests;
