use std::fs;
use std::path::Path;
use std::time::Duration;

use proxy_core::source::{Objects, SourceUpdate};
use source_files::{watch, SourceError};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

const INTERVAL: Duration = Duration::from_millis(20);

fn service(name: &str) -> String {
    format!("apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\nspec:\n  ports:\n    - port: 80\n")
}

fn start(
    path: &Path,
) -> (
    mpsc::Receiver<SourceUpdate>,
    JoinHandle<Result<(), SourceError>>,
) {
    let (tx, rx) = mpsc::channel(8);
    let task = tokio::spawn(watch(path.to_owned(), "node-a".into(), INTERVAL, tx));
    (rx, task)
}

async fn next(rx: &mut mpsc::Receiver<SourceUpdate>) -> Objects {
    match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
        Ok(Some(SourceUpdate::Replace(objects))) => objects,
        other => panic!("expected a Replace, got {other:?}"),
    }
}

/// Waits many poll intervals and checks nothing was sent.
async fn assert_quiet(rx: &mut mpsc::Receiver<SourceUpdate>) {
    tokio::time::sleep(INTERVAL * 10).await;
    assert!(rx.try_recv().is_err(), "unexpected update");
}

fn names(objects: &Objects) -> Vec<&str> {
    objects
        .services
        .iter()
        .map(|s| s.name.name.as_str())
        .collect()
}

#[tokio::test]
async fn reloads_on_modify_add_and_remove_only() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("a.yaml"), service("a")).unwrap();
    let (mut rx, task) = start(dir.path());

    assert_eq!(names(&next(&mut rx).await), ["a"]);
    assert_quiet(&mut rx).await;

    // Modified (the size changes, so coarse mtimes cannot hide it).
    fs::write(dir.path().join("a.yaml"), service("a-renamed")).unwrap();
    assert_eq!(names(&next(&mut rx).await), ["a-renamed"]);
    assert_quiet(&mut rx).await;

    // Added; a broken file still counts as a change and leaves the others in force.
    fs::write(dir.path().join("b.yaml"), service("b")).unwrap();
    assert_eq!(names(&next(&mut rx).await), ["a-renamed", "b"]);
    fs::write(dir.path().join("c.yaml"), "kind: [").unwrap();
    assert_eq!(names(&next(&mut rx).await), ["a-renamed", "b"]);

    // Ignored files do not trigger a reload.
    fs::write(dir.path().join(".a.yaml.swp"), "x").unwrap();
    fs::write(dir.path().join("notes.txt"), "x").unwrap();
    assert_quiet(&mut rx).await;

    // Removed.
    fs::remove_file(dir.path().join("a.yaml")).unwrap();
    assert_eq!(names(&next(&mut rx).await), ["b"]);

    drop(rx);
    let result = tokio::time::timeout(Duration::from_secs(5), task).await;
    assert!(matches!(result, Ok(Ok(Ok(())))), "{result:?}");
}

#[tokio::test]
async fn keeps_last_state_while_directory_is_gone() {
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("manifests");
    fs::create_dir(&dir).unwrap();
    fs::write(dir.join("a.yaml"), service("a")).unwrap();
    let (mut rx, _task) = start(&dir);
    assert_eq!(names(&next(&mut rx).await), ["a"]);

    fs::remove_dir_all(&dir).unwrap();
    assert_quiet(&mut rx).await;

    // Once it is back, its content applies.
    fs::create_dir(&dir).unwrap();
    fs::write(dir.join("b.yaml"), service("b")).unwrap();
    assert_eq!(names(&next(&mut rx).await), ["b"]);

    // An existing but empty directory is a real, empty state.
    fs::remove_file(dir.join("b.yaml")).unwrap();
    assert!(next(&mut rx).await.services.is_empty());
}

#[tokio::test]
async fn watches_a_single_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("all.yaml");
    fs::write(&file, service("a")).unwrap();
    let (mut rx, _task) = start(&file);
    assert_eq!(names(&next(&mut rx).await), ["a"]);

    // Replaced by rename, as editors and `kubectl`-style tools do: new inode.
    let tmp = dir.path().join("tmp");
    fs::write(&tmp, format!("{}---\n{}", service("a"), service("b"))).unwrap();
    fs::rename(&tmp, &file).unwrap();
    assert_eq!(names(&next(&mut rx).await), ["a", "b"]);

    fs::remove_file(&file).unwrap();
    assert_quiet(&mut rx).await;
}

#[tokio::test]
async fn first_load_failure_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let (tx, mut rx) = mpsc::channel(1);
    let err = watch(dir.path().join("missing"), "n".into(), INTERVAL, tx)
        .await
        .unwrap_err();
    assert!(matches!(err, SourceError::Access { .. }), "{err}");
    assert!(rx.recv().await.is_none());
}
