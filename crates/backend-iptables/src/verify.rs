//! `explain --verify` in iptables mode: the explained Service port's chains and its rules
//! in the shared chains, as `iptables-save` prints them, against what [`plan_port`]
//! programs for it (the planner itself, no second model).
//!
//! `iptables-save` prints rules in its own spelling (`-d 10.0.0.1/32`, options reordered,
//! `--mask … --rsource` added to `recent`, more digits of probability), so rules are
//! compared by a canonical form: options grouped with their arguments, normalised and
//! sorted.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use proxy_core::explain::{Explanation, Verify};
use proxy_core::model::{IpFamily, ProxyState, ServiceName, ServicePortName};

use crate::apply::{IptablesCommand, IptablesRunner};
use crate::names::{sanitize, service_port_string, PortChains};
use crate::plan::{parse_save, plan_port, IptConfig, SavedTable, Table, TopChain};

/// Verifies against the kernel of the node this runs on.
pub struct Verifier {
    config: IptConfig,
}

impl Verifier {
    pub fn new(config: IptConfig) -> Self {
        Verifier { config }
    }
}

impl Verify for Verifier {
    fn verify(&self, state: &ProxyState, explanation: &Explanation) -> Result<Vec<String>, String> {
        differences(
            &mut IptablesCommand::detect(),
            &self.config,
            state,
            explanation,
        )
    }
}

/// Splits a rule into words, honouring double quotes and backslash escapes.
fn words(rule: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let (mut quoted, mut escaped, mut any) = (false, false, false);
    for c in rule.chars() {
        if escaped {
            cur.push(c);
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == '"' {
            quoted = !quoted;
            any = true;
        } else if c.is_whitespace() && !quoted {
            if any || !cur.is_empty() {
                out.push(std::mem::take(&mut cur));
            }
            any = false;
        } else {
            cur.push(c);
        }
    }
    if any || !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// A rule's canonical form: its options with their arguments, normalised, sorted.
pub fn canonical(rule: &str) -> Vec<String> {
    let mut groups: Vec<Vec<String>> = Vec::new();
    let mut negate = false;
    for word in words(rule) {
        if word == "!" {
            negate = true;
            continue;
        }
        if word.starts_with('-') && word.len() > 1 && word.parse::<f64>().is_err() {
            let mut g = Vec::new();
            if std::mem::take(&mut negate) {
                g.push("!".to_string());
            }
            g.push(word);
            groups.push(g);
        } else if let Some(g) = groups.last_mut() {
            g.push(word);
        }
    }
    let mut out: Vec<String> = groups
        .into_iter()
        .filter(|g| !matches!(g.last().map(String::as_str), Some("--rsource")))
        .filter(|g| g.iter().all(|w| w != "--mask"))
        .map(|mut g| {
            let opt = g.iter().position(|w| w.starts_with('-')).unwrap_or(0);
            match g[opt].as_str() {
                "-s" | "-d" | "--source" | "--destination" => {
                    if let Some(addr) = g.get_mut(opt + 1) {
                        if let Ok(ip) = addr.parse::<IpAddr>() {
                            let bits = if ip.is_ipv4() { 32 } else { 128 };
                            *addr = format!("{ip}/{bits}");
                        }
                    }
                }
                "--probability" => {
                    if let Some(p) = g.get_mut(opt + 1) {
                        if let Ok(v) = p.parse::<f64>() {
                            *p = format!("{v:.4}");
                        }
                    }
                }
                _ => {}
            }
            g.join(" ")
        })
        .collect();
    out.sort();
    out
}

fn rules_of<'a>(saved: &'a SavedTable, chain: &str) -> Vec<&'a str> {
    let prefix = format!("-A {chain} ");
    saved
        .rules
        .iter()
        .filter(|r| r.starts_with(&prefix))
        .map(String::as_str)
        .collect()
}

/// Every difference between `iptables-save` and the plan for the explained destination.
pub fn differences<R: IptablesRunner + ?Sized>(
    runner: &mut R,
    config: &IptConfig,
    state: &ProxyState,
    explanation: &Explanation,
) -> Result<Vec<String>, String> {
    let q = &explanation.query;
    let family = IpFamily::of(&q.dst.ip());
    if !config.families.contains(&family) {
        return Ok(Vec::new());
    }
    let mut saved: BTreeMap<Table, SavedTable> = BTreeMap::new();
    for table in [Table::Nat, Table::Filter] {
        let text = runner
            .save(family, Some(table))
            .map_err(|e| e.to_string())?;
        saved.extend(parse_save(&text));
    }
    let empty = SavedTable::default();
    let table = |t: Table| saved.get(&t).unwrap_or(&empty);
    let mut diffs = Vec::new();

    let name = explanation.matched.as_ref().map(|m| ServicePortName {
        service: ServiceName::new(&m.namespace, &m.service),
        port: m.port.as_str().into(),
        protocol: m.protocol,
    });
    let port = name.as_ref().and_then(|n| state.services.get(n));
    let Some((name, port)) = name.zip(port) else {
        // No Service port: no rule of ours may match the destination.
        let d = format!("-d {}", canonical_host(q.dst.ip()));
        let dport = format!("--dport {}", q.dst.port());
        for t in [Table::Nat, Table::Filter] {
            for r in rules_of(table(t), "KUBE-SERVICES") {
                let c = canonical(r);
                if c.contains(&d) && c.contains(&dport) && r.contains(&format!("-p {}", q.proto)) {
                    diffs.push(format!(
                        "in the kernel but not in the plan ({}): {r}",
                        t.name()
                    ));
                }
            }
        }
        return Ok(diffs);
    };
    let plan = plan_port(family, port, state.endpoints_of(&name), &state.node, config);

    // The port's own chains: present, with the planned rules in order.
    for chain in plan.chains.values() {
        let saved_table = table(chain.table);
        if !saved_table.chains.contains(&chain.name) {
            diffs.push(format!(
                "chain {} is missing ({})",
                chain.name,
                chain.table.name()
            ));
            continue;
        }
        let want: Vec<Vec<String>> = chain.rules.iter().map(|r| canonical(r)).collect();
        let held_rules = rules_of(saved_table, &chain.name);
        let held: Vec<Vec<String>> = held_rules.iter().map(|r| canonical(r)).collect();
        for (rule, c) in chain.rules.iter().zip(&want) {
            if !held.contains(c) {
                diffs.push(format!("missing in the kernel: {rule}"));
            }
        }
        for (rule, c) in held_rules.iter().zip(&held) {
            if !want.contains(c) {
                diffs.push(format!("in the kernel but not in the plan: {rule}"));
            }
        }
        if diffs.is_empty() && want != held {
            diffs.push(format!("the rules of {} are in another order", chain.name));
        }
    }
    // Its rules in the shared chains, and nothing else of it there.
    let names = PortChains::new(&name);
    let own = [&names.svc, &names.svl, &names.ext, &names.fw];
    let spn = sanitize(&service_port_string(&name));
    let mut wanted: BTreeSet<(Table, Vec<String>)> = BTreeSet::new();
    for (top, rule) in &plan.top {
        let c = canonical(rule);
        let held = rules_of(table(top.table()), top.name());
        if !held.iter().any(|r| canonical(r) == c) {
            diffs.push(format!(
                "missing in the kernel ({}): {rule}",
                top.table().name()
            ));
        }
        wanted.insert((top.table(), c));
    }
    for top in TopChain::ALL {
        for r in rules_of(table(top.table()), top.name()) {
            let ours = own.iter().any(|c| r.ends_with(&format!(" -j {c}")))
                || r.contains(&format!("--comment \"{spn} "));
            if ours && !wanted.contains(&(top.table(), canonical(r))) {
                diffs.push(format!(
                    "in the kernel but not in the plan ({}): {r}",
                    top.table().name()
                ));
            }
        }
    }
    diffs.dedup();
    Ok(diffs)
}

fn canonical_host(ip: IpAddr) -> String {
    let bits = if ip.is_ipv4() { 32 } else { 128 };
    format!("{ip}/{bits}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_spelling_reads_as_the_planned_rule() {
        let planned = "-A KUBE-SVC-X ! -s 10.244.0.0/16 -m comment --comment \"ns/a:b cluster IP\" -m tcp -p tcp -d 10.96.0.10 --dport 80 -j KUBE-MARK-MASQ";
        let saved = "-A KUBE-SVC-X ! -s 10.244.0.0/16 -d 10.96.0.10/32 -p tcp -m comment --comment \"ns/a:b cluster IP\" -m tcp --dport 80 -j KUBE-MARK-MASQ";
        assert_eq!(canonical(planned), canonical(saved));
        let planned = "-A KUBE-SEP-Y -m comment --comment \"ns/a\" -m tcp -p tcp -m recent --name KUBE-SEP-Y --set -j DNAT --to-destination 10.1.0.1:80";
        let saved = "-A KUBE-SEP-Y -p tcp -m comment --comment \"ns/a\" -m tcp -m recent --set --name KUBE-SEP-Y --mask 255.255.255.255 --rsource -j DNAT --to-destination 10.1.0.1:80";
        assert_eq!(canonical(planned), canonical(saved));
        let planned = "-A C -m statistic --mode random --probability 0.3333333333 -j S";
        let saved = "-A C -m statistic --mode random --probability 0.33333333349 -j S";
        assert_eq!(canonical(planned), canonical(saved));
        // A different negation or target is a different rule.
        assert_ne!(
            canonical("-A C ! -s 10.0.0.0/8 -j A"),
            canonical("-A C -s 10.0.0.0/8 -j A")
        );
        assert_ne!(canonical("-A C -j A"), canonical("-A C -j B"));
    }
}
