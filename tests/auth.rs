//! Token auth over real gRPC: none, wrong and right tokens; health needs none.

mod common;

use common::TestServer;
use taskq::auth::Tokens;
use taskq::broker::BrokerConfig;
use taskq::pb;
use taskq::server::ServerConfig;
use tonic::Code;

const TOKEN: &str = "s3cret-token-for-tests";

async fn server_with_token() -> TestServer {
    let config = ServerConfig {
        tokens: Tokens::from_list(&format!("{TOKEN},second-token"), "test").unwrap(),
        ..ServerConfig::new(BrokerConfig::default())
    };
    TestServer::with_config(config).await
}

#[tokio::test]
async fn calls_without_a_token_are_unauthenticated() {
    let server = server_with_token().await;
    let mut client = server.client().await;
    let status = client
        .get_stats(pb::GetStatsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(
        status.message().contains("authorization"),
        "{}",
        status.message()
    );
    let put = client
        .put_task(pb::PutTaskRequest::default())
        .await
        .unwrap_err();
    assert_eq!(put.code(), Code::Unauthenticated);
    server.shutdown().await;
}

#[tokio::test]
async fn a_wrong_token_is_unauthenticated_and_not_echoed() {
    let server = server_with_token().await;
    let mut client = server.client_with_token("guess-token").await;
    let status = client
        .put_task(pb::PutTaskRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(!status.message().contains("guess-token"));
    assert!(!status.message().contains(TOKEN));
    // A prefix of a real token is not a token.
    let mut prefix = server.client_with_token(&TOKEN[..6]).await;
    let status = prefix
        .get_stats(pb::GetStatsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    server.shutdown().await;
}

#[tokio::test]
async fn every_configured_token_is_accepted() {
    let server = server_with_token().await;
    for token in [TOKEN, "second-token"] {
        let mut client = server.client_with_token(token).await;
        let put = client
            .put_task(pb::PutTaskRequest::default())
            .await
            .expect("the right token is accepted")
            .into_inner();
        assert!(!put.task_id.is_empty());
    }
    server.shutdown().await;
}

#[tokio::test]
async fn health_needs_no_token() {
    let server = server_with_token().await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(server.channel().await);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "taskq.v1.TaskQueue".into(),
        })
        .await
        .expect("health is reachable without a token")
        .into_inner();
    assert_eq!(
        status.status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
    server.shutdown().await;
}
