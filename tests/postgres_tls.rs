//! TLS to the database: a real PostgreSQL with `ssl = on` and certificates
//! made at test time, reached with each `sslmode` a managed service asks
//! for; what is checked is read back from the server's `pg_stat_ssl`.

mod common;

use std::time::Duration;

use common::TestServer;
use common::pki::Pki;
use common::postgres::TestDatabase;
use taskq::server::{self, BrokerConfig, PostgresConfig, ServerConfig, StoreConfig};

/// A cluster of the test's own with TLS on, its certificate issued by
/// `pki` for `names`.
async fn database_with_tls(pki: &Pki, names: &[&str]) -> TestDatabase {
    let database = TestDatabase::start_own_cluster().await;
    let (cert, key) = pki.issue("postgres-server", names);
    database
        .enable_tls(
            &std::fs::read_to_string(cert).unwrap(),
            &std::fs::read_to_string(key).unwrap(),
        )
        .await;
    database
}

/// The database's URL with `host` in place of 127.0.0.1 and `query` added.
fn url(database: &TestDatabase, host: &str, query: &str) -> String {
    let url = database
        .url()
        .replacen("@127.0.0.1:", &format!("@{host}:"), 1);
    assert!(url.contains(host), "{url}");
    format!("{url}?{query}")
}

/// What the migrations at start answer for `url`: the error's text, or
/// "ok".
async fn migrate(url: &str) -> String {
    match tokio::time::timeout(
        Duration::from_secs(30),
        server::migrate(&PostgresConfig::new(url)),
    )
    .await
    .expect("migrate answers within 30s")
    {
        Ok(_) => "ok".into(),
        Err(error) => error.to_string(),
    }
}

/// taskq's connections to `database` (its pool and its listener) by
/// whether they use TLS: (over TLS, in plain text).
async fn taskq_connections(database: &TestDatabase) -> (u32, u32) {
    let counts = database
        .psql(
            "SELECT count(*) FILTER (WHERE s.ssl), count(*) FILTER (WHERE NOT s.ssl) \
             FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE a.datname = current_database() AND a.application_name LIKE 'taskq%'",
        )
        .await;
    let (tls, plain) = counts.split_once('|').unwrap();
    (tls.parse().unwrap(), plain.parse().unwrap())
}

/// Puts a task through a server on `store_url`, takes it and reports it.
async fn round_trip(store_url: &str) -> TestServer {
    let mut config = ServerConfig::new(BrokerConfig::default());
    config.store = StoreConfig::Postgres(PostgresConfig::new(store_url));
    let server = TestServer::with_config(config).await;
    let client = server.taskq_client().await;
    let put = client.put("tls", "over tls").await.unwrap();
    let request = taskq::pb::GetTaskRequest {
        queue: "tls".into(),
        worker_id: "w1".into(),
        ..Default::default()
    };
    let task = client
        .get_task(request, Duration::ZERO)
        .await
        .unwrap()
        .expect("the task put is there");
    assert_eq!(task.id, put.task_id);
    client
        .put_result(
            &task,
            taskq::pb::put_result_request::Outcome::Output("done".into()),
        )
        .await
        .unwrap();
    let result = client
        .result(&put.task_id, Duration::ZERO)
        .await
        .unwrap()
        .expect("the result is there");
    assert_eq!(&result.output[..], b"done");
    server
}

#[tokio::test]
async fn verify_full_checks_the_ca_and_the_host_and_every_connection_is_encrypted() {
    let pki = Pki::new("pg-verify-full");
    let database = database_with_tls(&pki, &["localhost"]).await;
    let ca = pki.ca_path().display().to_string();

    let server = round_trip(&url(
        &database,
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    ))
    .await;
    let (tls, plain) = taskq_connections(&database).await;
    assert!(
        tls >= 2,
        "the pool and the listener are over TLS: {tls} are"
    );
    assert_eq!(plain, 0, "no taskq connection in plain text");
    server.shutdown().await;

    // The certificate is for localhost, not for 127.0.0.1.
    let refused = migrate(&url(
        &database,
        "127.0.0.1",
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    ))
    .await;
    assert!(refused.contains("TLS"), "{refused}");
    assert!(refused.contains("certificate"), "{refused}");

    // Another CA's certificate is refused, whatever the host.
    let other = Pki::new("pg-other-ca");
    let refused = migrate(&url(
        &database,
        "localhost",
        &format!(
            "sslmode=verify-full&sslrootcert={}",
            other.ca_path().display()
        ),
    ))
    .await;
    assert!(refused.contains("certificate"), "{refused}");
    let refused = migrate(&url(
        &database,
        "localhost",
        &format!(
            "sslmode=verify-ca&sslrootcert={}",
            other.ca_path().display()
        ),
    ))
    .await;
    assert!(refused.contains("certificate"), "{refused}");
}

#[tokio::test]
async fn verify_ca_checks_the_ca_not_the_host_and_require_only_encrypts() {
    let pki = Pki::new("pg-verify-ca");
    let database = database_with_tls(&pki, &["db.example.invalid"]).await;
    let ca = pki.ca_path().display().to_string();

    let refused = migrate(&url(
        &database,
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    ))
    .await;
    assert!(refused.contains("certificate"), "{refused}");

    let server = round_trip(&url(
        &database,
        "localhost",
        &format!("sslmode=verify-ca&sslrootcert={ca}"),
    ))
    .await;
    assert_eq!(taskq_connections(&database).await.1, 0);
    server.shutdown().await;

    let server = round_trip(&url(&database, "127.0.0.1", "sslmode=require")).await;
    let (tls, plain) = taskq_connections(&database).await;
    assert!(tls >= 2, "{tls} connections over TLS");
    assert_eq!(plain, 0);
    server.shutdown().await;
}

#[tokio::test]
async fn require_refuses_a_database_without_tls_and_disable_stays_plain() {
    // The shared cluster has TLS off.
    let database = TestDatabase::start().await;
    let refused = migrate(&url(&database, "127.0.0.1", "sslmode=require")).await;
    assert!(refused.contains("does not support TLS"), "{refused}");

    let server = round_trip(&url(&database, "127.0.0.1", "sslmode=disable")).await;
    let (tls, plain) = taskq_connections(&database).await;
    assert_eq!(tls, 0);
    assert!(plain >= 2, "{plain} plain connections");
    server.shutdown().await;
}
