//! `/debug/explain` (issue #16): where a connection goes, from the last programmed state
//! and the proxy's settings, through [`proxy_core::explain::explain`]; with `verify=1`,
//! also what the kernel holds for that destination against the plan, checked by the
//! mode's backend (a [`Verify`]) on this node.

use std::net::IpAddr;
use std::sync::Arc;

use proxy_core::explain::{explain, Explanation, Query, Settings, Verify};
use proxy_core::model::ProxyState;
use serde_json::{json, Value};

/// The node's addresses as the kernel has them, read when a query comes.
pub type LocalAddresses = Arc<dyn Fn() -> Vec<IpAddr> + Send + Sync>;

/// What `/debug/explain` needs besides the programmed state.
#[derive(Clone)]
pub struct Explainer {
    pub settings: Settings,
    pub local_addresses: LocalAddresses,
    /// `None`: the mode cannot verify.
    pub verifier: Option<Arc<dyn Verify>>,
}

/// The query string of `/debug/explain`.
#[derive(Debug, Default, Clone, serde::Deserialize)]
pub struct ExplainParams {
    pub src: Option<String>,
    pub dst: Option<String>,
    pub proto: Option<String>,
    pub iif: Option<String>,
    pub verify: Option<String>,
    pub format: Option<String>,
}

/// A query the caller got wrong (400), or an answer.
pub enum Answer {
    BadRequest(String),
    NotReady,
    Explained {
        explanation: Box<Explanation>,
        verify: Option<Result<Vec<String>, String>>,
    },
}

impl ExplainParams {
    pub fn wants_verify(&self) -> Result<bool, String> {
        match self.verify.as_deref().map(str::trim) {
            None | Some("" | "0" | "false") => Ok(false),
            Some("1" | "true") => Ok(true),
            Some(other) => Err(format!("verify {other:?} is not one of 1, true, 0, false")),
        }
    }

    fn query(&self) -> Result<Query, String> {
        fn need<'a>(v: &'a Option<String>, name: &'static str) -> Result<&'a str, String> {
            v.as_deref()
                .ok_or_else(|| format!("missing {name} (e.g. {name}={})", example(name)))
        }
        Query::parse(
            need(&self.src, "src")?,
            need(&self.dst, "dst")?,
            need(&self.proto, "proto")?,
            self.iif.as_deref(),
        )
        .map_err(|e| e.to_string())
    }
}

fn example(name: &str) -> &'static str {
    match name {
        "src" => "10.244.1.5",
        "dst" => "10.96.0.10:80",
        _ => "tcp",
    }
}

impl Explainer {
    /// Answers one query (blocking: verifying reads the kernel).
    pub fn answer(&self, state: Option<Arc<ProxyState>>, params: &ExplainParams) -> Answer {
        let (query, verify) = match params.query().and_then(|q| Ok((q, params.wants_verify()?))) {
            Ok(v) => v,
            Err(message) => return Answer::BadRequest(message),
        };
        let Some(state) = state else {
            return Answer::NotReady;
        };
        let mut settings = self.settings.clone();
        settings.local_addresses = (self.local_addresses)();
        let explanation = explain(&state, &settings, &query);
        let verify = verify.then(|| match &self.verifier {
            Some(v) => v.verify(&state, &explanation),
            None => Err(format!("not supported in {} mode", settings.mode.as_str())),
        });
        Answer::Explained {
            explanation: Box::new(explanation),
            verify,
        }
    }
}

/// The JSON answer: the explanation, with `verify` when asked.
pub fn to_json(explanation: &Explanation, verify: &Option<Result<Vec<String>, String>>) -> Value {
    let mut value = serde_json::to_value(explanation).unwrap_or(Value::Null);
    if let (Some(v), Value::Object(map)) = (verify, &mut value) {
        let verify = match v {
            Ok(diffs) => json!({ "checked": true, "differences": diffs }),
            Err(e) => json!({ "checked": false, "error": e }),
        };
        map.insert("verify".into(), verify);
    }
    value
}

/// The text answer: the explanation's steps, then what verifying found.
pub fn to_text(explanation: &Explanation, verify: &Option<Result<Vec<String>, String>>) -> String {
    let mut out = explanation.to_string();
    match verify {
        None => {}
        Some(Ok(diffs)) if diffs.is_empty() => {
            out.push_str("Verify: the kernel holds what the plan says for this destination.\n")
        }
        Some(Ok(diffs)) => {
            out.push_str(&format!(
                "Verify: {} difference(s) from the plan:\n",
                diffs.len()
            ));
            for d in diffs {
                out.push_str(&format!("  - {d}\n"));
            }
        }
        Some(Err(e)) => out.push_str(&format!("Verify: not checked: {e}\n")),
    }
    out
}
