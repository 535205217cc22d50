//! Feature gates (`--feature-gates`, `featureGates` in the config file): the gates upstream
//! kube-proxy v1.35–v1.37 reads, with upstream's defaults, stages and locks, resolved with
//! component-base's rules: an unknown gate is an error, so is a locked gate set to what it
//! is not locked to; `AllAlpha` / `AllBeta` set every alpha / beta gate not named
//! explicitly; setting a GA or deprecated gate is allowed with a warning.

use std::collections::BTreeMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Alpha,
    Beta,
    Ga,
    Deprecated,
}

/// One gate as the newest release we follow defines it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gate {
    pub name: &'static str,
    pub default: bool,
    pub stage: Stage,
    pub locked: bool,
}

/// Serve `spec.externalIPs` (deprecated in v1.36, KEP-5707; false stops serving them).
pub const ALLOW_SERVICE_EXTERNAL_IPS: &str = "AllowServiceExternalIPs";
/// Serve NodePorts on loopback in nftables mode through user-space listeners (alpha in
/// v1.37, KEP-6032).
pub const NFTABLES_LOCALHOST_NODEPORTS: &str = "KubeProxyNFTablesLocalhostNodePorts";
/// Allow `mode: ipvs` (deprecated in v1.37, KEP-5495).
pub const KUBE_PROXY_IPVS: &str = "KubeProxyIPVS";

const ALL_ALPHA: &str = "AllAlpha";
const ALL_BETA: &str = "AllBeta";

const fn gate(name: &'static str, default: bool, stage: Stage, locked: bool) -> Gate {
    Gate {
        name,
        default,
        stage,
        locked,
    }
}

/// The gates kube-proxy's code (pkg/proxy, cmd/kube-proxy, and the logging options it
/// registers) reads in v1.35–v1.37, as of their latest stage there.
pub const GATES: &[Gate] = &[
    gate(ALLOW_SERVICE_EXTERNAL_IPS, true, Stage::Deprecated, false),
    // `/flagz` and `/statusz` on the metrics server (component-base zpages; alpha and
    // off in v1.35, the release we match).
    gate("ComponentFlagz", false, Stage::Alpha, false),
    gate("ComponentStatusz", false, Stage::Alpha, false),
    gate("ContextualLogging", true, Stage::Beta, false),
    gate(KUBE_PROXY_IPVS, true, Stage::Deprecated, false),
    gate(NFTABLES_LOCALHOST_NODEPORTS, false, Stage::Alpha, false),
    gate("LoggingAlphaOptions", false, Stage::Alpha, false),
    gate("LoggingBetaOptions", true, Stage::Beta, false),
    gate("MultiCIDRServiceAllocator", true, Stage::Ga, true),
    gate("NFTablesProxyMode", true, Stage::Ga, true),
    gate("PreferSameTrafficDistribution", true, Stage::Ga, true),
    gate("ServiceTrafficDistribution", true, Stage::Ga, true),
    gate("TopologyAwareHints", true, Stage::Ga, true),
    gate("WinDSR", true, Stage::Ga, true),
    gate("WinOverlay", true, Stage::Ga, true),
];

/// The resolved value of every gate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureGates(BTreeMap<&'static str, bool>);

impl Default for FeatureGates {
    fn default() -> Self {
        FeatureGates(GATES.iter().map(|g| (g.name, g.default)).collect())
    }
}

impl FeatureGates {
    /// Applies the requested settings to the defaults; returns the gates and the warnings
    /// upstream logs, or upstream's error for the first bad setting.
    pub fn resolve(requested: &BTreeMap<String, bool>) -> Result<(Self, Vec<String>), String> {
        let mut gates = FeatureGates::default();
        let mut warnings = Vec::new();
        for (name, &value) in requested {
            if name == ALL_ALPHA || name == ALL_BETA {
                let stage = if name == ALL_ALPHA {
                    Stage::Alpha
                } else {
                    Stage::Beta
                };
                for g in GATES.iter().filter(|g| g.stage == stage) {
                    if !requested.contains_key(g.name) {
                        gates.0.insert(g.name, value);
                    }
                }
                continue;
            }
            let gate = GATES
                .iter()
                .find(|g| g.name == name)
                .ok_or_else(|| format!("unrecognized feature gate: {name}"))?;
            if gate.locked && value != gate.default {
                return Err(format!(
                    "cannot set feature gate {name} to {value}, feature is locked to {}",
                    gate.default
                ));
            }
            gates.0.insert(gate.name, value);
            match gate.stage {
                Stage::Deprecated => warnings.push(format!(
                    "Setting deprecated feature gate {name}={value}. It will be removed in a future release."
                )),
                Stage::Ga => warnings.push(format!(
                    "Setting GA feature gate {name}={value}. It will be removed in a future release."
                )),
                Stage::Alpha | Stage::Beta => {}
            }
        }
        Ok((gates, warnings))
    }

    pub fn enabled(&self, name: &str) -> bool {
        self.0.get(name).copied().unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(pairs: &[(&str, bool)]) -> BTreeMap<String, bool> {
        pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    #[test]
    fn defaults_are_upstreams() {
        let gates = FeatureGates::default();
        assert!(gates.enabled(ALLOW_SERVICE_EXTERNAL_IPS));
        assert!(gates.enabled(KUBE_PROXY_IPVS));
        assert!(gates.enabled("PreferSameTrafficDistribution"));
        assert!(!gates.enabled("LoggingAlphaOptions"));
    }

    #[test]
    fn unknown_and_locked_gates_are_upstreams_errors() {
        assert_eq!(
            FeatureGates::resolve(&request(&[("Foo", true)])),
            Err("unrecognized feature gate: Foo".into())
        );
        assert_eq!(
            FeatureGates::resolve(&request(&[("PreferSameTrafficDistribution", false)])),
            Err(
                "cannot set feature gate PreferSameTrafficDistribution to false, feature is locked to true"
                    .into()
            )
        );
        // Setting a locked gate to its value is allowed, with the GA warning.
        let (_, warnings) =
            FeatureGates::resolve(&request(&[("NFTablesProxyMode", true)])).unwrap();
        assert_eq!(
            warnings,
            ["Setting GA feature gate NFTablesProxyMode=true. It will be removed in a future release."]
        );
    }

    #[test]
    fn deprecated_gates_can_be_turned_off_with_a_warning() {
        let (gates, warnings) =
            FeatureGates::resolve(&request(&[(ALLOW_SERVICE_EXTERNAL_IPS, false)])).unwrap();
        assert!(!gates.enabled(ALLOW_SERVICE_EXTERNAL_IPS));
        assert_eq!(
            warnings,
            ["Setting deprecated feature gate AllowServiceExternalIPs=false. It will be removed in a future release."]
        );
    }

    #[test]
    fn all_alpha_and_all_beta_leave_named_gates_alone() {
        let (gates, _) = FeatureGates::resolve(&request(&[
            ("AllAlpha", true),
            ("AllBeta", false),
            ("ContextualLogging", true),
        ]))
        .unwrap();
        assert!(gates.enabled("LoggingAlphaOptions"));
        assert!(!gates.enabled("LoggingBetaOptions"));
        assert!(gates.enabled("ContextualLogging"));
        // Neither touches GA or deprecated gates.
        assert!(gates.enabled(ALLOW_SERVICE_EXTERNAL_IPS));
    }
}
