//! `/statusz` and `/flagz` (component-base's z-pages), served on the metrics server
//! when the `ComponentStatusz` / `ComponentFlagz` feature gates are on (alpha, off by
//! default, in v1.35).
//!
//! As upstream: plain text by default, with a delimiter picked at random among `:`,
//! `: `, `=` and ` ` so that nobody scrapes it; the structured `config.k8s.io/v1alpha1`
//! JSON when asked for it exactly with
//! `Accept: application/json;v=v1alpha1;g=config.k8s.io;as=Statusz` (or `as=Flagz`);
//! any other Accept that allows no `text/plain` is answered 406.

use std::collections::BTreeMap;
use std::time::SystemTime;

use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

/// The component name upstream shows.
const COMPONENT: &str = "kube-proxy";
const WARNING: &str = "Warning: This endpoint is not meant to be machine parseable, has no formatting compatibility guarantees and is for debugging purposes only.";
const DELIMITERS: [&str; 4] = [":", ": ", "=", " "];
const NOT_ACCEPTABLE: &str = "media type not acceptable, must be: text/plain";
const API_VERSION: &str = "config.k8s.io/v1alpha1";

/// What `/statusz` reports.
#[derive(Debug, Clone)]
pub struct Statusz {
    pub started: SystemTime,
    /// e.g. `1.35.0-kube-proxy-rs.0.1.0` (upstream: the binary's version without `v`).
    pub binary_version: String,
    /// `<major>.<minor>` of the upstream release we match.
    pub emulation_version: String,
    /// The metrics server's other paths.
    pub paths: Vec<String>,
}

/// The z-pages the metrics server serves; `None` when the gate is off.
#[derive(Debug, Clone, Default)]
pub struct Zpages {
    pub statusz: Option<Statusz>,
    /// Flag name → value as given on the command line.
    pub flagz: Option<BTreeMap<String, String>>,
}

enum Format {
    Text,
    Json,
}

/// Upstream's negotiation: the exact structured type, or text/plain (with at most a
/// `charset=utf-8` parameter, or a wildcard); no Accept header means text.
fn negotiate(headers: &HeaderMap, kind: &str) -> Option<Format> {
    let Some(accept) = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()) else {
        return Some(Format::Text);
    };
    if accept.trim().is_empty() {
        return Some(Format::Text);
    }
    for range in accept.split(',') {
        let mut parts = range.split(';').map(str::trim);
        let media = parts.next().unwrap_or_default().to_ascii_lowercase();
        let params: BTreeMap<String, String> = parts
            .filter_map(|p| p.split_once('='))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .filter(|(k, _)| k != "q")
            .collect();
        if media == "application/json" {
            let wanted = [("as", kind), ("g", "config.k8s.io"), ("v", "v1alpha1")];
            if params.len() == 3
                && wanted
                    .iter()
                    .all(|(k, v)| params.get(*k).map(String::as_str) == Some(*v))
            {
                return Some(Format::Json);
            }
            continue;
        }
        let text = matches!(media.as_str(), "text/plain" | "text/*" | "*/*");
        let charset_ok = params.is_empty()
            || (params.len() == 1
                && params
                    .get("charset")
                    .is_some_and(|c| c.eq_ignore_ascii_case("utf-8")));
        if text && charset_ok {
            return Some(Format::Text);
        }
    }
    None
}

/// A delimiter chosen anew per answer, as upstream does.
fn delimiter() -> &'static str {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    DELIMITERS[(nanos as usize / 1000) % DELIMITERS.len()]
}

fn typed(body: String, content_type: &'static str) -> Response {
    let mut r = body.into_response();
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn not_acceptable() -> Response {
    let mut r = (StatusCode::NOT_ACCEPTABLE, format!("{NOT_ACCEPTABLE}\n")).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// `Mon Jan  2 15:04:05 MST 2006` (Go's `time.UnixDate`), local zone.
fn unix_date(at: SystemTime) -> String {
    let Ok(ts) = jiff::Timestamp::try_from(at) else {
        return String::new();
    };
    let tz = jiff::tz::TimeZone::system();
    let zoned = ts.to_zoned(tz.clone());
    let abbreviation = tz.to_offset_info(ts).abbreviation().to_owned();
    format!(
        "{} {abbreviation} {}",
        zoned.strftime("%a %b %e %H:%M:%S"),
        zoned.year()
    )
}

pub fn statusz(s: &Statusz, headers: &HeaderMap, now: SystemTime) -> Response {
    let up = now.duration_since(s.started).unwrap_or_default().as_secs();
    match negotiate(headers, "Statusz") {
        None => not_acceptable(),
        Some(Format::Json) => {
            let body = serde_json::json!({
                "kind": "Statusz",
                "apiVersion": API_VERSION,
                "metadata": {"name": COMPONENT},
                "startTime": crate::gotime::rfc3339_nano(Some(s.started)),
                "uptimeSeconds": up,
                "binaryVersion": s.binary_version,
                "emulationVersion": s.emulation_version,
                "paths": s.paths,
            });
            typed(body.to_string(), "application/json")
        }
        Some(Format::Text) => {
            let d = delimiter();
            let body = format!(
                "\n{COMPONENT} statusz\n{WARNING}\n\nStarted{d} {}\nUp{d} {} hr {:02} min {:02} sec\nGo version{d} none (built with Rust)\nBinary version{d} {}\nEmulation version{d} {}\nPaths{d} {}\n",
                unix_date(s.started),
                up / 3600,
                (up / 60) % 60,
                up % 60,
                s.binary_version,
                s.emulation_version,
                s.paths.join(" "),
            );
            typed(body, "text/plain; charset=utf-8")
        }
    }
}

pub fn flagz(flags: &BTreeMap<String, String>, headers: &HeaderMap) -> Response {
    match negotiate(headers, "Flagz") {
        None => not_acceptable(),
        Some(Format::Json) => {
            let body = serde_json::json!({
                "kind": "Flagz",
                "apiVersion": API_VERSION,
                "metadata": {"name": COMPONENT},
                "flags": flags,
            });
            typed(body.to_string(), "application/json")
        }
        Some(Format::Text) => {
            let d = delimiter();
            let mut body = format!("\n{COMPONENT} flags\n{WARNING}\n\n");
            for (name, value) in flags {
                body.push_str(&format!("{name}{d}{value}\n"));
            }
            typed(body, "text/plain; charset=utf-8")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accept(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::ACCEPT,
            HeaderValue::from_str(value).expect("header"),
        );
        h
    }

    #[test]
    fn negotiates_as_upstream() {
        assert!(matches!(
            negotiate(&HeaderMap::new(), "Statusz"),
            Some(Format::Text)
        ));
        assert!(matches!(
            negotiate(&accept("*/*"), "Statusz"),
            Some(Format::Text)
        ));
        assert!(matches!(
            negotiate(&accept("text/plain; charset=UTF-8"), "Flagz"),
            Some(Format::Text)
        ));
        assert!(matches!(
            negotiate(
                &accept("application/json;v=v1alpha1;g=config.k8s.io;as=Statusz"),
                "Statusz"
            ),
            Some(Format::Json)
        ));
        assert!(negotiate(&accept("application/json"), "Statusz").is_none());
        assert!(negotiate(
            &accept("application/json;v=v1alpha1;g=config.k8s.io;as=Flagz"),
            "Statusz"
        )
        .is_none());
        assert!(negotiate(&accept("text/plain; version=1"), "Statusz").is_none());
    }

    #[tokio::test]
    async fn flagz_lists_flags_sorted() {
        let flags = BTreeMap::from([
            ("v".to_owned(), "2".to_owned()),
            ("feature-gates".to_owned(), "ComponentFlagz=true".to_owned()),
        ]);
        let r = flagz(&flags, &HeaderMap::new());
        assert_eq!(r.status(), 200);
        let body = axum::body::to_bytes(r.into_body(), 1 << 16)
            .await
            .expect("body");
        let text = String::from_utf8_lossy(&body);
        assert!(text.starts_with("\nkube-proxy flags\nWarning: "), "{text}");
        let lines: Vec<&str> = text.lines().skip(4).collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(lines[0].starts_with("feature-gates") && lines[0].ends_with("ComponentFlagz=true"));
        assert!(lines[1].starts_with('v') && lines[1].ends_with('2'));
    }
}
