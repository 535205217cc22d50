//! Label and field selectors, as the API server parses them (the equality-based forms
//! clients send in practice: `k`, `!k`, `k=v`, `k==v`, `k!=v`).

use std::collections::BTreeMap;

use serde_json::Value;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Requirement {
    Exists(String),
    NotExists(String),
    Equals(String, String),
    NotEquals(String, String),
}

/// A parsed label selector; empty matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector(Vec<Requirement>);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unable to parse requirement {0:?}: only k, !k, k=v, k==v and k!=v are supported")]
pub struct SelectorError(pub String);

impl LabelSelector {
    pub fn parse(text: &str) -> Result<Self, SelectorError> {
        let mut out = Vec::new();
        for term in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let valid_key = |k: &str| {
                !k.is_empty()
                    && k.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
            };
            let req = if let Some(key) = term.strip_prefix('!') {
                Requirement::NotExists(key.trim().to_string())
            } else if let Some((k, v)) = term.split_once("!=") {
                Requirement::NotEquals(k.trim().to_string(), v.trim().to_string())
            } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                Requirement::Equals(k.trim().to_string(), v.trim().to_string())
            } else {
                Requirement::Exists(term.to_string())
            };
            let key = match &req {
                Requirement::Exists(k)
                | Requirement::NotExists(k)
                | Requirement::Equals(k, _)
                | Requirement::NotEquals(k, _) => k,
            };
            if !valid_key(key) {
                return Err(SelectorError(term.to_string()));
            }
            out.push(req);
        }
        Ok(LabelSelector(out))
    }

    pub fn matches(&self, object: &Value) -> bool {
        let empty = BTreeMap::new();
        let labels: BTreeMap<String, String> = object
            .pointer("/metadata/labels")
            .and_then(|l| serde_json::from_value(l.clone()).ok())
            .unwrap_or(empty);
        self.0.iter().all(|req| match req {
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::NotExists(k) => !labels.contains_key(k),
            Requirement::Equals(k, v) => labels.get(k) == Some(v),
            // As the API server: a missing label is "not equal".
            Requirement::NotEquals(k, v) => labels.get(k) != Some(v),
        })
    }
}

/// A field label a resource can be selected by, and where its value sits in the object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FieldLabel {
    pub name: &'static str,
    pub pointer: &'static str,
}

/// The labels every object has; a resource adds its own (Services: `spec.clusterIP`, ...).
pub const METADATA_FIELDS: [FieldLabel; 2] = [
    FieldLabel {
        name: "metadata.name",
        pointer: "/metadata/name",
    },
    FieldLabel {
        name: "metadata.namespace",
        pointer: "/metadata/namespace",
    },
];

/// A parsed field selector over the field labels of one resource.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSelector(Vec<(&'static str, bool, String)>);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FieldSelectorError {
    #[error(transparent)]
    Syntax(#[from] SelectorError),
    /// The API server's words for a label the resource does not support.
    #[error("field label not supported: {0}")]
    Unsupported(String),
}

impl FieldSelector {
    /// Parses `text`, accepting only the field labels in `supported`.
    pub fn parse(text: &str, supported: &[FieldLabel]) -> Result<Self, FieldSelectorError> {
        let mut out = Vec::new();
        for term in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let (field, equal, value) = if let Some((f, v)) = term.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                (f, true, v)
            } else {
                return Err(SelectorError(term.to_string()).into());
            };
            let field = field.trim();
            let label = supported
                .iter()
                .find(|l| l.name == field)
                .ok_or_else(|| FieldSelectorError::Unsupported(field.to_string()))?;
            out.push((label.pointer, equal, value.trim().to_string()));
        }
        Ok(FieldSelector(out))
    }

    pub fn matches(&self, object: &Value) -> bool {
        self.0.iter().all(|(pointer, equal, value)| {
            // A field the object lacks compares as empty, as the server's field sets have it.
            let actual = object
                .pointer(pointer)
                .and_then(Value::as_str)
                .unwrap_or("");
            (actual == value) == *equal
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn label_forms() {
        let obj = json!({"metadata": {"labels": {"a": "1", "b": "2"}}});
        let bare = json!({"metadata": {}});
        let cases = [
            ("", true, true),
            ("a", true, false),
            ("!a", false, true),
            ("!c", true, true),
            ("a=1", true, false),
            ("a==1", true, false),
            ("a=2", false, false),
            ("a!=2", true, true),
            ("a!=1", false, true),
            (
                "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless",
                true,
                true,
            ),
            ("a=1,!b", false, false),
        ];
        for (sel, on_obj, on_bare) in cases {
            let s = LabelSelector::parse(sel).unwrap();
            assert_eq!(s.matches(&obj), on_obj, "{sel} on labelled");
            assert_eq!(s.matches(&bare), on_bare, "{sel} on bare");
        }
        assert!(LabelSelector::parse("a in (x,y)").is_err());
    }

    #[test]
    fn field_forms() {
        let parse = |text| FieldSelector::parse(text, &METADATA_FIELDS).unwrap();
        let obj = json!({"metadata": {"name": "n1", "namespace": "ns"}});
        assert!(parse("metadata.name=n1").matches(&obj));
        assert!(!parse("metadata.name=n2").matches(&obj));
        assert!(parse("metadata.name!=n2,metadata.namespace==ns").matches(&obj));
        assert_eq!(
            FieldSelector::parse("spec.clusterIP!=None", &METADATA_FIELDS)
                .unwrap_err()
                .to_string(),
            "field label not supported: spec.clusterIP"
        );
        let cluster_ip = FieldLabel {
            name: "spec.clusterIP",
            pointer: "/spec/clusterIP",
        };
        let headless = FieldSelector::parse("spec.clusterIP!=None", &[cluster_ip]).unwrap();
        assert!(!headless.matches(&json!({"spec": {"clusterIP": "None"}})));
        assert!(headless.matches(&json!({"spec": {"clusterIP": "10.0.0.1"}})));
        assert!(headless.matches(&json!({"spec": {"type": "ExternalName"}})));
    }
}
