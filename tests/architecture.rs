//! Architecture invariants that a compiler does not check.

use std::path::Path;

fn sources(dir: &Path) -> Vec<(String, String)> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(sources(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            let text = std::fs::read_to_string(&path).unwrap();
            files.push((path.display().to_string(), text));
        }
    }
    files
}

/// The engine knows no transport: no tonic, prost, generated types or
/// server modules. This keeps it reusable behind another front end or a
/// durable store.
#[test]
fn the_engine_knows_no_transport() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/broker");
    let files = sources(&root);
    assert!(files.len() >= 4, "found the engine's files");
    for (path, text) in files {
        let forbidden = [
            "tonic::",
            "tonic_",
            "prost::",
            "prost_",
            "crate::pb",
            "crate::rpc",
            "crate::server",
            "crate::auth",
        ];
        for forbidden in forbidden {
            assert!(!text.contains(forbidden), "{path} mentions {forbidden}");
        }
    }
}

/// Only the binary installs a tracing subscriber.
#[test]
fn the_library_never_installs_a_subscriber() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    for (path, text) in sources(&root) {
        if path.ends_with("telemetry.rs") {
            continue;
        }
        assert!(!text.contains(".init()"), "{path} installs a subscriber");
        assert!(
            !text.contains("set_global_default"),
            "{path} installs a subscriber"
        );
    }
}

/// The client library and the worker runtime speak only `taskq.v1`: no
/// engine, no server.
#[test]
fn clients_know_only_the_contract() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = sources(&src.join("worker"));
    files.push((
        "src/client.rs".into(),
        std::fs::read_to_string(src.join("client.rs")).unwrap(),
    ));
    for (path, text) in files {
        for forbidden in [
            "crate::broker",
            "crate::rpc",
            "crate::server",
            "crate::auth",
        ] {
            assert!(!text.contains(forbidden), "{path} uses {forbidden}");
        }
    }
}
