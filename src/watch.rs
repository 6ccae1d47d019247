//! Reload when the configuration file changes on disk.
//!
//! The file's directory is watched (not the file), so atomic replaces by editors and
//! Kubernetes ConfigMap symlink swaps are seen. Events are debounced: the file must be quiet
//! for a moment before it is read, and a file whose content did not change is not reloaded.
//! A half-written file that does not validate is refused like any invalid configuration.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::instance::Instance;

/// How long the file must be quiet before it is read.
const QUIET: Duration = Duration::from_millis(400);

/// Starts watching `path`; reloads `instance` after each settled change.
pub fn spawn(instance: Arc<Instance>, path: PathBuf) {
    let (tx, mut rx) = mpsc::unbounded_channel::<()>();
    let dir = path
        .parent()
        .map(|p| {
            if p.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                p.to_owned()
            }
        })
        .unwrap_or_else(|| PathBuf::from("."));
    let name = path.file_name().map(ToOwned::to_owned);
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok_and(|event| concerns(&event, name.as_deref())) {
            let _ = tx.send(());
        }
    });
    let mut watcher = match watcher {
        Ok(w) => w,
        Err(e) => {
            warn!(error = %e, "cannot watch the configuration file; reload with SIGHUP or POST /reload");
            return;
        }
    };
    if let Err(e) = watcher.watch(&dir, RecursiveMode::NonRecursive) {
        warn!(dir = %dir.display(), error = %e, "cannot watch the configuration directory");
        return;
    }
    tokio::spawn(async move {
        let _watcher = watcher;
        let mut last = std::fs::read(&path).ok();
        loop {
            tokio::select! {
                () = instance.shutdown.cancelled() => return,
                event = rx.recv() => if event.is_none() { return },
            }
            // Debounce: wait until the directory has been quiet for QUIET.
            loop {
                match tokio::time::timeout(QUIET, rx.recv()).await {
                    Ok(Some(())) => continue,
                    Ok(None) => return,
                    Err(_) => break,
                }
            }
            let current = std::fs::read(&path).ok();
            if current.is_none() || current == last {
                continue;
            }
            debug!(path = %path.display(), "configuration file changed");
            last = current;
            let _ = instance.reload().await;
        }
    });
}

/// Whether a change in the watched directory may concern the file `name`. Editors and
/// ConfigMaps replace the file through other names in the directory: any change there may
/// concern it, and the content check sorts it out. Reads (opening and closing without
/// writing) never do: the watcher's own read of the file would otherwise set off another,
/// every debounce period, for ever.
fn concerns(event: &notify::Event, name: Option<&std::ffi::OsStr>) -> bool {
    if matches!(event.kind, notify::EventKind::Access(_)) {
        return false;
    }
    name.is_none()
        || event.paths.is_empty()
        || event.paths.iter().any(|p| p.file_name() == name)
        || event.paths.iter().any(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(".."))
        })
}

#[cfg(test)]
mod tests {
    use super::concerns;
    use notify::event::{AccessKind, AccessMode, CreateKind, DataChange, ModifyKind};
    use notify::{Event, EventKind};
    use std::ffi::OsStr;

    #[test]
    fn reads_of_the_file_are_not_changes() {
        let name = Some(OsStr::new("portunus.toml"));
        let at = |kind| Event::new(kind).add_path("/etc/portunus/portunus.toml".into());
        assert!(!concerns(
            &at(EventKind::Access(AccessKind::Open(AccessMode::Any))),
            name
        ));
        assert!(!concerns(
            &at(EventKind::Access(AccessKind::Close(AccessMode::Read))),
            name
        ));
        assert!(concerns(
            &at(EventKind::Modify(ModifyKind::Data(DataChange::Any))),
            name
        ));
        assert!(concerns(&at(EventKind::Create(CreateKind::File)), name));
        // A ConfigMap's symlink swap, and other files.
        let other =
            |path: &str| Event::new(EventKind::Create(CreateKind::Any)).add_path(path.into());
        assert!(concerns(&other("/etc/portunus/..data_tmp"), name));
        assert!(!concerns(&other("/etc/portunus/other.toml"), name));
    }
}
