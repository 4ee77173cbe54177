//! TLS with certificates made at test time: trusted and untrusted clients,
//! mutual TLS, and the start-up checks on certificate files.

mod common;

use std::path::Path;
use std::process::Command;

use common::TestServer;
use common::pki::Pki;
use taskq::client::ClientTls;
use taskq::client::{Client, ClientOptions};
use taskq::server::BrokerConfig;
use taskq::server::ServerConfig;
use taskq::server::{Identity, ServerTls};

async fn tls_server(pki: &Pki, mutual: bool) -> TestServer {
    let (cert, key) = pki.issue("server", &["localhost"]);
    let config = ServerConfig {
        tls: Some(ServerTls {
            identity: Identity::load(&cert, &key).unwrap(),
            client_ca: mutual.then(|| pki.ca.clone().into_bytes()),
        }),
        ..ServerConfig::new(BrokerConfig::default())
    };
    TestServer::with_config(config).await
}

fn trusting(ca: &Path, identity: Option<Identity>) -> ClientOptions {
    ClientOptions {
        tls: Some(ClientTls {
            ca: Some(std::fs::read(ca).unwrap()),
            domain: Some("localhost".into()),
            identity,
        }),
        ..ClientOptions::default()
    }
}

#[tokio::test]
async fn a_client_that_trusts_the_ca_gets_in() {
    let pki = Pki::new("trusted");
    let server = tls_server(&pki, false).await;
    let client = Client::connect(&server.url(), trusting(&pki.ca_path(), None))
        .await
        .unwrap();
    let put = client.put("q", "over tls").await.unwrap();
    assert!(!put.task_id.is_empty());
    server.shutdown().await;
}

#[tokio::test]
async fn a_client_that_does_not_trust_the_ca_is_refused() {
    let pki = Pki::new("server-ca");
    let other = Pki::new("other-ca");
    let server = tls_server(&pki, false).await;
    let outcome = match Client::connect(&server.url(), trusting(&other.ca_path(), None)).await {
        Err(error) => Err(error.to_string()),
        Ok(client) => client
            .put("q", "x")
            .await
            .map(|_| ())
            .map_err(|e| e.to_string()),
    };
    let refused = outcome.expect_err("an untrusted certificate must not be accepted");
    assert!(
        refused.contains("invalid peer certificate"),
        "refused for its certificate: {refused}"
    );
    // A plaintext client gets nowhere either.
    let plain = Client::connect(&server.url(), ClientOptions::default()).await;
    let plain = match plain {
        Err(error) => Err(error.to_string()),
        Ok(client) => client
            .put("q", "x")
            .await
            .map(|_| ())
            .map_err(|e| e.to_string()),
    };
    let refused = plain.expect_err("a plaintext client gets nowhere");
    assert!(
        refused.contains("transport error: connection"),
        "refused by the transport: {refused}"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn mutual_tls_needs_a_client_certificate() {
    let pki = Pki::new("mutual");
    let server = tls_server(&pki, true).await;
    let without = match Client::connect(&server.url(), trusting(&pki.ca_path(), None)).await {
        Err(error) => Err(error.to_string()),
        Ok(client) => client
            .put("q", "x")
            .await
            .map(|_| ())
            .map_err(|e| e.to_string()),
    };
    let refused = without.expect_err("no client certificate, no entry");
    assert!(
        refused.contains("CertificateRequired"),
        "refused for want of a certificate: {refused}"
    );
    let (cert, key) = pki.issue("client", &["worker-1"]);
    let identity = Identity::load(&cert, &key).unwrap();
    let client = Client::connect(&server.url(), trusting(&pki.ca_path(), Some(identity)))
        .await
        .unwrap();
    client
        .put("q", "x")
        .await
        .expect("a certificate from the CA gets in");
    server.shutdown().await;
}

fn serve(args: &[&str]) -> (Option<i32>, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_taskq"))
        .arg("serve")
        .args(args)
        .env_remove("TASKQ_TOKENS")
        .env("TASKQ_HTTP_LISTEN", "127.0.0.1:0")
        .output()
        .unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn bad_certificate_files_exit_2_naming_the_file() {
    let pki = Pki::new("files");
    let (cert, key) = pki.issue("server", &["localhost"]);
    let (_, other_key) = pki.issue("other", &["localhost"]);
    let (cert, key, other_key) = (
        cert.to_str().unwrap(),
        key.to_str().unwrap(),
        other_key.to_str().unwrap(),
    );

    let (code, stderr) = serve(&["--tls-cert", "/nonexistent/cert.pem", "--tls-key", key]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("/nonexistent/cert.pem"), "{stderr}");

    let (code, stderr) = serve(&["--tls-cert", cert, "--tls-key", other_key]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("does not match") && stderr.contains(other_key),
        "{stderr}"
    );

    let (code, stderr) = serve(&["--tls-cert", key, "--tls-key", key]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("no PEM certificate"), "{stderr}");

    let (code, stderr) = serve(&["--tls-cert", cert]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("--tls-key"), "{stderr}");
}

/// TLS does not lift protected mode: no tokens, no public address.
#[test]
fn tls_without_tokens_still_refuses_a_public_address() {
    let pki = Pki::new("protected");
    let (cert, key) = pki.issue("server", &["localhost"]);
    let (code, stderr) = serve(&[
        "--listen",
        "0.0.0.0:0",
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("--listen"), "{stderr}");
}
