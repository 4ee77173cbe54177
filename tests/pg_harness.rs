//! The PostgreSQL harness of `tests/common/postgres.rs`: it starts, its
//! databases are isolated and dropped, an own cluster restarts with its data
//! and its URL, and no cluster outlives its test process.

mod common;

use common::eventually;
use common::postgres::{EXTERNAL_URL_VAR, StopMode, TestDatabase, database_url};

/// The port of a `postgres://USER@HOST:PORT/DB` URL.
fn port(url: &str) -> u16 {
    let authority = url.split('@').nth(1).unwrap().split('/').next().unwrap();
    authority.rsplit(':').next().unwrap().parse().unwrap()
}

fn refuses_connections(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_err()
}

#[tokio::test]
async fn a_database_answers_through_psql() {
    let db = TestDatabase::start().await;
    assert_eq!(db.psql("select 1").await, "1");
    assert_eq!(db.psql("select current_database()").await, db.name());
    assert!(db.url().starts_with("postgres://"), "{}", db.url());
    assert!(
        db.url().contains(&format!("/{}", db.name())),
        "{}",
        db.url()
    );
    assert_eq!(
        db.psql("select 1, 'a' union all select 2, 'b'").await,
        "1|a\n2|b"
    );
}

#[tokio::test]
async fn two_databases_do_not_share_tables() {
    let (a, b) = tokio::join!(TestDatabase::start(), TestDatabase::start());
    assert_ne!(a.url(), b.url());
    a.psql("create table only_in_a (n int); insert into only_in_a values (7)")
        .await;
    assert_eq!(a.psql("select n from only_in_a").await, "7");
    assert_eq!(b.psql("select to_regclass('only_in_a') is null").await, "t");
}

#[tokio::test]
async fn a_dropped_database_is_gone_from_the_server() {
    let db = TestDatabase::start().await;
    let name = db.name().to_owned();
    drop(db);
    let other = TestDatabase::start().await;
    let count = format!("select count(*) from pg_database where datname = '{name}'");
    assert_eq!(other.psql(&count).await, "0");
}

#[tokio::test]
#[should_panic(expected = "relation \"no_such_table\" does not exist")]
async fn psql_panics_with_the_error() {
    let db = TestDatabase::start().await;
    db.psql("select * from no_such_table").await;
}

#[tokio::test]
#[should_panic(expected = "start_own_cluster")]
async fn a_shared_cluster_is_not_restarted() {
    let db = TestDatabase::start().await;
    db.restart().await;
}

#[tokio::test]
async fn a_restart_keeps_committed_data_and_the_url() {
    let db = TestDatabase::start_own_cluster().await;
    let url = db.url();
    assert!(url.starts_with("postgres://postgres@127.0.0.1:"), "{url}");
    db.psql("create table t (n int); insert into t values (1)")
        .await;

    db.restart().await;
    assert_eq!(db.url(), url);
    assert_eq!(db.psql("select count(*) from t").await, "1");

    // A crash-like stop: what was committed is still there after recovery.
    db.psql("insert into t values (2)").await;
    db.stop_cluster(StopMode::Immediate).await;
    assert!(
        refuses_connections(port(&url)),
        "stopped, yet {url} accepts connections"
    );
    db.start_cluster().await;
    assert_eq!(db.psql("select sum(n) from t").await, "3");
}

#[tokio::test]
async fn an_own_cluster_keeps_the_stock_durable_settings() {
    let db = TestDatabase::start_own_cluster().await;
    let settings = "select current_setting('fsync'), current_setting('synchronous_commit'), \
                    current_setting('full_page_writes'), current_setting('listen_addresses')";
    assert_eq!(db.psql(settings).await, "on|on|on|127.0.0.1");
}

#[tokio::test]
async fn a_dropped_own_cluster_is_stopped_and_removed() {
    let db = TestDatabase::start_own_cluster().await;
    let folder = db.cluster_folder().unwrap().to_owned();
    let port = port(&db.url());
    assert!(folder.join("data/PG_VERSION").is_file());
    drop(db);
    assert!(!folder.exists(), "{} is left behind", folder.display());
    assert!(
        refuses_connections(port),
        "port {port} still accepts connections"
    );
}

/// The shared cluster lives in a static that is never dropped: this test
/// runs itself in a child process that starts it and exits, then checks
/// that the watchdog stopped it and removed its folder.
#[tokio::test]
async fn the_shared_cluster_stops_when_its_test_process_exits() {
    const CHILD: &str = "TASKQ_PG_HARNESS_CHILD";
    const NAME: &str = "the_shared_cluster_stops_when_its_test_process_exits";
    if std::env::var_os(CHILD).is_some() {
        let db = TestDatabase::start().await;
        println!("folder={}", db.cluster_folder().unwrap().display());
        println!("url={}", db.url());
        return;
    }
    let child = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", NAME, "--nocapture", "--test-threads=1"])
        .env(CHILD, "1")
        .env_remove(EXTERNAL_URL_VAR)
        .output()
        .await
        .unwrap();
    // libtest prints the test's name, then its output, on one line.
    let stdout = String::from_utf8_lossy(&child.stdout);
    assert!(
        child.status.success(),
        "child test failed: {stdout}{}",
        String::from_utf8_lossy(&child.stderr)
    );
    let line = |key: &str| {
        stdout
            .lines()
            .find_map(|line| Some(line.split_once(key)?.1))
            .unwrap_or_else(|| panic!("no {key} in the child's output: {stdout}"))
            .to_owned()
    };
    let folder = std::path::PathBuf::from(line("folder="));
    let port = port(&line("url="));
    eventually("the shared cluster of an exited process to stop", || {
        let (folder, port) = (folder.clone(), port);
        async move { !folder.exists() && refuses_connections(port) }
    })
    .await;
}

#[test]
fn database_url_replaces_only_the_database() {
    assert_eq!(
        database_url("postgres://me@db.example:5432/app?sslmode=require", "t1"),
        "postgres://me@db.example:5432/t1?sslmode=require"
    );
    assert_eq!(
        database_url("postgresql://me@127.0.0.1:5", "t2"),
        "postgresql://me@127.0.0.1:5/t2"
    );
    assert_eq!(
        database_url("postgres://a:b@h/", "t3"),
        "postgres://a:b@h/t3"
    );
}
