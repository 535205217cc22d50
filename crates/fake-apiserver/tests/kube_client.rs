//! The fake server against the real kube-rs client: if kube-rs can list, page, watch,
//! resume and relist against it, the proxy's source is tested against the protocol and not
//! against our own idea of it.

use std::time::Duration;

use anyhow::{Context, Result};
use fake_apiserver::FakeApiServer;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{ListParams, ObjectList, WatchEvent, WatchParams};
use kube::runtime::watcher;
use kube::{Api, Client, Config};
use serde_json::json;

fn service(name: &str, labels: serde_json::Value) -> serde_json::Value {
    json!({
        "kind": "Service",
        "metadata": {"namespace": "ns", "name": name, "labels": labels},
        "spec": {"clusterIP": "10.96.0.1", "ports": [{"port": 80, "protocol": "TCP"}]},
    })
}

fn start() -> Result<(FakeApiServer, Client)> {
    let mut server = FakeApiServer::with_bookmark_interval(Duration::from_millis(100))?;
    let addr = server.serve(std::net::TcpListener::bind("127.0.0.1:0")?)?;
    let config = Config::new(format!("http://{addr}").parse()?);
    let client = Client::try_from(config).context("client")?;
    Ok((server, client))
}

async fn timeout<T>(f: impl std::future::Future<Output = T>) -> Result<T> {
    tokio::time::timeout(Duration::from_secs(10), f)
        .await
        .context("timed out")
}

#[tokio::test]
async fn resource_version_zero_is_answered_whole_as_from_the_watch_cache() -> Result<()> {
    let (server, client) = start()?;
    for i in 0..5 {
        server.apply(service(&format!("s{i}"), json!({})))?;
    }
    // client-go's reflectors ask this way; the real server's watch cache ignores limit.
    let request = http::Request::get("/api/v1/services?resourceVersion=0&limit=2").body(vec![])?;
    let list: ObjectList<Service> = client.request(request).await?;
    assert_eq!(
        list.items.len(),
        5,
        "limit ignored, as the watch cache does"
    );
    assert!(list.metadata.continue_.is_none_or(|c| c.is_empty()));
    // kube-rs drops resourceVersion=0 when a limit is set, so the proxy lists without one.
    let api: Api<Service> = Api::all(client);
    let all = api.list(&ListParams::default().match_any()).await?;
    assert_eq!(all.items.len(), 5);
    Ok(())
}

#[tokio::test]
async fn list_pages_with_limit_and_continue_and_selectors() -> Result<()> {
    let (server, client) = start()?;
    for i in 0..5 {
        server.apply(service(&format!("s{i}"), json!({})))?;
    }
    server.apply(service(
        "other-proxy",
        json!({"service.kubernetes.io/service-proxy-name": "x"}),
    ))?;
    server.apply(service("tier-db", json!({"tier": "db"})))?;
    let api: Api<Service> = Api::all(client);
    let page = api.list(&ListParams::default().limit(2)).await?;
    assert_eq!(page.items.len(), 2);
    let token = page.metadata.continue_.clone().context("continue token")?;
    let rv = page.metadata.resource_version.clone();
    // A change between pages does not show up in later pages (consistent snapshot).
    server.apply(service("s9", json!({})))?;
    let mut names: Vec<String> = page
        .items
        .iter()
        .filter_map(|s| s.metadata.name.clone())
        .collect();
    let mut next = Some(token);
    while let Some(token) = next {
        let page = api
            .list(&ListParams::default().limit(2).continue_token(&token))
            .await?;
        assert_eq!(page.metadata.resource_version, rv);
        names.extend(page.items.iter().filter_map(|s| s.metadata.name.clone()));
        next = page.metadata.continue_.filter(|c| !c.is_empty());
    }
    assert_eq!(
        names,
        ["other-proxy", "s0", "s1", "s2", "s3", "s4", "tier-db"]
    );

    let selected = api
        .list(&ListParams::default().labels(
            "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless,tier!=db",
        ))
        .await?;
    let names: Vec<_> = selected
        .items
        .iter()
        .filter_map(|s| s.metadata.name.as_deref())
        .collect();
    assert_eq!(names, ["s0", "s1", "s2", "s3", "s4", "s9"]);

    // A continue token from before a compaction is 410 Gone.
    let page = api.list(&ListParams::default().limit(1)).await?;
    server.apply(service("s10", json!({})))?;
    server.compact();
    let err = api
        .list(
            &ListParams::default()
                .limit(1)
                .continue_token(page.metadata.continue_.as_deref().context("token")?),
        )
        .await
        .expect_err("expired continue token");
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 410),
        "{err:?}"
    );
    Ok(())
}

#[tokio::test]
async fn watch_resumes_bookmarks_and_410() -> Result<()> {
    let (server, client) = start()?;
    server.apply(service("a", json!({})))?;
    let api: Api<Service> = Api::all(client);
    let list = api.list(&ListParams::default()).await?;
    let rv = list.metadata.resource_version.context("rv")?;
    server.apply(service("b", json!({})))?;
    // Moving out of the selector is a DELETED event for this watcher.
    server.apply(service("a", json!({"service.kubernetes.io/headless": ""})))?;
    let mut stream = api
        .watch(
            &WatchParams::default()
                // Bookmarks are on by default in kube-rs.
                .labels("!service.kubernetes.io/headless"),
            &rv,
        )
        .await?
        .boxed();
    let mut seen = Vec::new();
    while seen.len() < 3 {
        match timeout(stream.next()).await?.context("stream ended")?? {
            WatchEvent::Added(s) => {
                seen.push(format!("ADDED {}", s.metadata.name.unwrap_or_default()))
            }
            WatchEvent::Deleted(s) => {
                seen.push(format!("DELETED {}", s.metadata.name.unwrap_or_default()))
            }
            WatchEvent::Bookmark(_) => seen.push("BOOKMARK".into()),
            other => anyhow::bail!("unexpected {other:?}"),
        }
    }
    assert_eq!(seen, ["ADDED b", "DELETED a", "BOOKMARK"]);

    // expire_watches: an ERROR event with a 410 Status, then the stream ends.
    server.expire_watches();
    loop {
        match timeout(stream.next())
            .await?
            .context("stream ended before the error")??
        {
            WatchEvent::Bookmark(_) => continue,
            WatchEvent::Error(status) => {
                assert_eq!(status.code, 410);
                break;
            }
            other => anyhow::bail!("unexpected {other:?}"),
        }
    }
    // Watching from the old resourceVersion now is 410 too.
    let mut stream = api.watch(&WatchParams::default(), &rv).await?.boxed();
    match timeout(stream.next()).await?.context("no event")?? {
        WatchEvent::Error(status) => assert_eq!(status.code, 410),
        other => anyhow::bail!("unexpected {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn runtime_watcher_relists_after_gone_and_survives_drops() -> Result<()> {
    let (server, client) = start()?;
    server.apply(json!({"kind": "Node", "metadata": {"name": "n1"}}))?;
    server.apply(json!({"kind": "Node", "metadata": {"name": "n2"}}))?;
    let api: Api<Node> = Api::all(client.clone());
    let mut events = watcher(
        api,
        watcher::Config::default()
            .fields("metadata.name=n1")
            .list_semantic(watcher::ListSemantic::MostRecent),
    )
    .boxed();
    // Events (as short strings) until `last` is seen; errors are recovered from by the
    // watcher itself and show as "error".
    async fn until(
        events: &mut (impl futures::Stream<Item = Result<watcher::Event<Node>, watcher::Error>> + Unpin),
        last: &str,
    ) -> Result<Vec<String>> {
        let mut seen = Vec::new();
        loop {
            let event = timeout(events.next()).await?.context("watcher ended")?;
            let text = match event {
                Ok(watcher::Event::Init) => "init".to_string(),
                Ok(watcher::Event::InitApply(n)) => {
                    format!("list {}", n.metadata.name.unwrap_or_default())
                }
                Ok(watcher::Event::InitDone) => "done".to_string(),
                Ok(watcher::Event::Apply(n)) => {
                    format!("apply {}", n.metadata.name.unwrap_or_default())
                }
                Ok(watcher::Event::Delete(n)) => {
                    format!("delete {}", n.metadata.name.unwrap_or_default())
                }
                Err(_) => "error".to_string(),
            };
            seen.push(text.clone());
            if text == last {
                return Ok(seen);
            }
        }
    }
    assert_eq!(
        until(&mut events, "done").await?,
        ["init", "list n1", "done"]
    );
    // A dropped connection: the watcher resumes from its resourceVersion, no relist.
    server.drop_connections();
    tokio::time::sleep(Duration::from_millis(100)).await;
    server.apply(json!({"kind": "Node", "metadata": {"name": "n2", "labels": {"x": "1"}}}))?;
    server.apply(json!({"kind": "Node", "metadata": {"name": "n1", "labels": {"x": "1"}}}))?;
    let seen = until(&mut events, "apply n1").await?;
    assert!(!seen.contains(&"init".to_string()), "{seen:?}");
    // 410 Gone: a relist.
    server.expire_watches();
    let seen = until(&mut events, "done").await?;
    assert!(
        seen.ends_with(&["init".into(), "list n1".into(), "done".into()]),
        "{seen:?}"
    );
    let lists = server
        .requests()
        .iter()
        .filter(|r| r.starts_with("/api/v1/nodes") && !r.contains("watch=true"))
        .count();
    assert_eq!(lists, 2, "{:?}", server.requests());
    let _: Api<EndpointSlice> = Api::all(client);
    Ok(())
}

#[tokio::test]
async fn field_selectors_filter_lists_and_watches_and_unsupported_labels_are_refused() -> Result<()>
{
    let (server, client) = start()?;
    let mut headless = service("headless", json!({}));
    headless["spec"] = json!({"clusterIP": "None"});
    server.apply(headless)?;
    server.apply(service("plain", json!({})))?;
    let api: Api<Service> = Api::all(client.clone());
    let not_headless = ListParams::default().fields("spec.clusterIP!=None");
    let list = timeout(api.list(&not_headless)).await??;
    let names: Vec<_> = list
        .items
        .iter()
        .filter_map(|s| s.metadata.name.clone())
        .collect();
    assert_eq!(names, ["plain"]);
    // A watch from that list sees a new headless Service never, a plain one at once.
    let rv = list
        .metadata
        .resource_version
        .context("list resourceVersion")?;
    let params = WatchParams::default()
        .fields("spec.clusterIP!=None")
        .timeout(5);
    let mut events = timeout(api.watch(&params, &rv)).await??.boxed();
    let mut late_headless = service("late-headless", json!({}));
    late_headless["spec"] = json!({"clusterIP": "None"});
    server.apply(late_headless)?;
    server.apply(service("late-plain", json!({})))?;
    loop {
        match timeout(events.next()).await?.context("watch ended")?? {
            WatchEvent::Bookmark(_) => continue,
            WatchEvent::Added(svc) => {
                assert_eq!(svc.metadata.name.as_deref(), Some("late-plain"));
                break;
            }
            other => panic!("expected late-plain ADDED, got {other:?}"),
        }
    }
    // EndpointSlices have no spec.clusterIP: the server refuses the selector.
    let slices: Api<EndpointSlice> = Api::all(client);
    let err = timeout(slices.list(&not_headless))
        .await?
        .expect_err("unsupported field label");
    assert!(
        err.to_string()
            .contains("field label not supported: spec.clusterIP"),
        "{err}"
    );
    Ok(())
}
