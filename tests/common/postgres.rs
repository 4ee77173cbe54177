//! A real PostgreSQL for the tests: a throwaway cluster and a fresh
//! database per [`TestDatabase`].
//!
//! - [`TestDatabase::start`] creates a new database in the cluster that this
//!   test process shares between its tests (started on first use), so tests
//!   in one binary run in parallel without seeing each other's tables. The
//!   database is dropped when the `TestDatabase` is.
//! - [`TestDatabase::start_own_cluster`] starts a cluster for this test
//!   alone, for tests that stop or restart PostgreSQL
//!   ([`TestDatabase::restart`], [`TestDatabase::stop_cluster`]). It is
//!   stopped and its folder removed when the `TestDatabase` is dropped.
//!
//! A cluster is `initdb` into a new folder under [`std::env::temp_dir`],
//! listening on a free port of 127.0.0.1 only (and a Unix socket in that
//! folder), trust authentication, superuser `postgres`, and PostgreSQL's
//! stock durable settings (`fsync` and `synchronous_commit` on); only
//! `max_connections` is raised to 200. The binaries are taken from the
//! highest version in `/usr/lib/postgresql/*/bin` (Debian's layout:
//! `scripts/test` installs the `postgresql` package when it is missing).
//! When the tests run as root, `initdb`, `pg_ctl` and so the server run as
//! the `postgres` system user through `runuser`, since PostgreSQL refuses
//! to run as root: the temporary folder must then be reachable by that user
//! (the default `/tmp` is).
//!
//! A cluster never outlives the test process, even one killed with
//! `SIGKILL`: each is watched by a small `sh` whose standard input is a
//! pipe that only the test process holds open. When the test process exits
//! the pipe reaches end of file and the watchdog stops PostgreSQL
//! (`pg_ctl stop -m immediate`) and removes the folder. The process-wide
//! cluster lives in a static that is never dropped, so this is how it
//! stops; an own cluster is stopped the same way when it is dropped, and
//! the drop waits for it.
//!
//! `TASKQ_TEST_DATABASE_URL=postgres://USER@HOST:PORT/DB` makes
//! [`TestDatabase::start`] use that server instead of starting one: each
//! `TestDatabase` is still a new database, created through that URL, so the
//! role must be allowed to create databases (`CREATEDB`) and, to drop them
//! afterwards while connections remain, the server must be PostgreSQL 13
//! or later (`DROP DATABASE ... WITH (FORCE)`). Tests that restart
//! PostgreSQL ([`TestDatabase::start_own_cluster`]) always start their own
//! local cluster. The `psql` binary is needed in both cases.
//!
//! # Examples
//!
//! ```ignore
//! use common::postgres::{StopMode, TestDatabase};
//!
//! let db = TestDatabase::start().await; // a fresh database, shared cluster
//! db.psql("create table t (n int); insert into t values (1), (2)").await;
//! assert_eq!(db.psql("select count(*) from t").await, "2");
//! // db.url(): postgres://postgres@127.0.0.1:PORT/taskq_test_..., for
//! // `taskq serve --store` or a client library.
//!
//! let db = TestDatabase::start_own_cluster().await; // one it may restart
//! db.restart().await; // same URL, committed data kept
//! db.stop_cluster(StopMode::Immediate).await; // as in a crash
//! db.start_cluster().await;
//! ```

use std::ffi::OsString;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Names an existing server to use instead of a local cluster.
pub const EXTERNAL_URL_VAR: &str = "TASKQ_TEST_DATABASE_URL";

/// The superuser of the clusters the harness starts.
const SUPERUSER: &str = "postgres";

/// How long `pg_ctl` may wait for a start or a stop, in seconds: the bound
/// on every readiness wait of the harness.
const PG_CTL_TIMEOUT_SECS: &str = "60";

/// Attempts at starting a new cluster, each on a new free port: the port is
/// found by binding port 0 and closing it, so another process may take it
/// before PostgreSQL binds it.
const PORT_ATTEMPTS: u32 = 5;

/// How a cluster is stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopMode {
    /// `pg_ctl stop -m fast`: sessions are cut, then a clean shutdown with a
    /// checkpoint.
    Fast,
    /// `pg_ctl stop -m immediate`: the server quits at once, without a
    /// checkpoint, as in a crash; the next start runs crash recovery.
    Immediate,
}

impl StopMode {
    fn pg_ctl_mode(self) -> &'static str {
        match self {
            StopMode::Fast => "fast",
            StopMode::Immediate => "immediate",
        }
    }
}

/// A fresh, empty database on a real PostgreSQL, dropped (or its whole
/// cluster stopped and removed) when this is dropped.
pub struct TestDatabase {
    name: String,
    url: String,
    psql: PathBuf,
    home: Home,
}

/// Where a test database lives.
enum Home {
    /// The cluster shared by the tests of this process.
    Shared(&'static Cluster),
    /// The server named by `TASKQ_TEST_DATABASE_URL`, through this URL.
    External { admin_url: String },
    /// A cluster of this test's own.
    Own(Cluster),
}

impl TestDatabase {
    /// A new database in the cluster shared by this test process (started
    /// on first use), or on the `TASKQ_TEST_DATABASE_URL` server when it is
    /// set.
    ///
    /// # Panics
    ///
    /// When PostgreSQL cannot be started or the database cannot be created:
    /// the message says why, with the server log.
    pub async fn start() -> TestDatabase {
        let (home, admin_url, psql) = match std::env::var(EXTERNAL_URL_VAR) {
            Ok(url) if !url.is_empty() => {
                let psql = psql_binary();
                (
                    Home::External {
                        admin_url: url.clone(),
                    },
                    url,
                    psql,
                )
            }
            _ => {
                let cluster = tokio::task::spawn_blocking(shared_cluster)
                    .await
                    .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
                (Home::Shared(cluster), cluster.admin_url(), cluster.psql())
            }
        };
        let name = unique_database_name();
        if let Err(error) = run_psql(&psql, &admin_url, &format!("CREATE DATABASE {name}")).await {
            match home {
                Home::External { .. } => panic!(
                    "{EXTERNAL_URL_VAR}={admin_url}: CREATE DATABASE {name} failed: {error}\n\
                     The tests make a database each: the role in that URL needs CREATEDB \
                     (or unset {EXTERNAL_URL_VAR} to let the tests start their own PostgreSQL)."
                ),
                _ => panic!("CREATE DATABASE {name} failed: {error}"),
            }
        }
        TestDatabase {
            url: database_url(&admin_url, &name),
            name,
            psql,
            home,
        }
    }

    /// A database in a new cluster of this test's own, which the test may
    /// stop and restart. Always local, even when `TASKQ_TEST_DATABASE_URL`
    /// is set. Startup costs an `initdb` and a start (about 1.1 s on a
    /// 2-core machine, against about 0.15 s for a database in the shared
    /// cluster), so use [`TestDatabase::start`] unless the test stops
    /// PostgreSQL.
    ///
    /// # Panics
    ///
    /// When the cluster cannot be started: the message says why, with the
    /// server log.
    pub async fn start_own_cluster() -> TestDatabase {
        let cluster =
            tokio::task::spawn_blocking(|| Cluster::start().unwrap_or_else(|e| panic!("{e}")))
                .await
                .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
        let name = unique_database_name();
        let psql = cluster.psql();
        if let Err(error) = run_psql(
            &psql,
            &cluster.admin_url(),
            &format!("CREATE DATABASE {name}"),
        )
        .await
        {
            panic!("CREATE DATABASE {name} failed: {error}");
        }
        TestDatabase {
            url: database_url(&cluster.admin_url(), &name),
            name,
            psql,
            home: Home::Own(cluster),
        }
    }

    /// The connection URL of this database,
    /// `postgres://USER@127.0.0.1:PORT/DBNAME` for a local cluster. It
    /// stays the same across [`TestDatabase::restart`].
    pub fn url(&self) -> String {
        self.url.clone()
    }

    /// The database's name (unique per `TestDatabase`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The folder of the cluster (data, log, socket), for a local cluster;
    /// it is removed when the cluster stops for good.
    pub fn cluster_folder(&self) -> Option<&Path> {
        match &self.home {
            Home::Shared(cluster) => Some(&cluster.folder),
            Home::Own(cluster) => Some(&cluster.folder),
            Home::External { .. } => None,
        }
    }

    /// Runs `sql` through the `psql` binary against this database and
    /// returns what it prints: the rows of the last statement one a line,
    /// columns separated by `|`, no header, no trailing newline (`"1"` for
    /// `select 1`). Several statements in one call run as one transaction
    /// (so `CREATE DATABASE` must be alone). Waits at most 10 s to connect;
    /// a statement is cancelled after 60 s.
    ///
    /// # Panics
    ///
    /// When `psql` fails (a connection or SQL error), with its message.
    pub async fn psql(&self, sql: &str) -> String {
        run_psql(&self.psql, &self.url, sql)
            .await
            .unwrap_or_else(|error| panic!("psql on {}: {sql}\n{error}", self.url))
    }

    /// Restarts PostgreSQL (a fast stop, then a start on the same port and
    /// folder) and returns once it accepts connections again. Committed
    /// data stays; open connections are cut.
    ///
    /// # Panics
    ///
    /// On a database from [`TestDatabase::start`] (the cluster is shared),
    /// or when the cluster cannot be stopped or started, with the log.
    pub async fn restart(&self) {
        let cluster = self.own_cluster("restart");
        cluster.stop(StopMode::Fast).await;
        cluster.start_again().await;
    }

    /// Stops PostgreSQL, for tests of calls made while the database is down.
    /// [`TestDatabase::start_cluster`] brings it back on the same port.
    ///
    /// # Panics
    ///
    /// As [`TestDatabase::restart`].
    pub async fn stop_cluster(&self, mode: StopMode) {
        self.own_cluster("stop_cluster").stop(mode).await;
    }

    /// Starts PostgreSQL again after [`TestDatabase::stop_cluster`] and
    /// returns once it accepts connections (after crash recovery, if it was
    /// stopped with [`StopMode::Immediate`]).
    ///
    /// # Panics
    ///
    /// As [`TestDatabase::restart`].
    pub async fn start_cluster(&self) {
        self.own_cluster("start_cluster").start_again().await;
    }

    /// Turns TLS on in this database's own cluster, with `cert_pem` (the
    /// server's certificate chain) and `key_pem` (its private key), and
    /// restarts it. Plain connections stay allowed: the test harness's own
    /// `psql` calls use them.
    ///
    /// # Panics
    ///
    /// As [`TestDatabase::restart`], or when the files cannot be written.
    #[allow(dead_code)]
    pub async fn enable_tls(&self, cert_pem: &str, key_pem: &str) {
        let cluster = self.own_cluster("enable_tls");
        let cert = cluster.data.join("taskq-test-server.crt");
        let key = cluster.data.join("taskq-test-server.key");
        let write = |path: &Path, text: &str| -> Result<(), String> {
            std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))?;
            // PostgreSQL refuses a key that others can read.
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| format!("{}: {e}", path.display()))?;
            if cluster.as_postgres_user {
                chown_to_postgres(path)?;
            }
            Ok(())
        };
        write(&cert, cert_pem)
            .and_then(|()| write(&key, key_pem))
            .and_then(|()| {
                append(
                    &cluster.data.join("postgresql.conf"),
                    "ssl = on\n\
                     ssl_cert_file = 'taskq-test-server.crt'\n\
                     ssl_key_file = 'taskq-test-server.key'\n",
                )
            })
            .unwrap_or_else(|error| panic!("enable_tls: {error}"));
        self.restart().await;
    }

    fn own_cluster(&self, what: &str) -> &Cluster {
        match &self.home {
            Home::Own(cluster) => cluster,
            _ => panic!(
                "TestDatabase::{what} stops PostgreSQL, which other tests share: \
                 start this database with TestDatabase::start_own_cluster()"
            ),
        }
    }
}

impl Drop for TestDatabase {
    /// Drops the database on a shared server (`WITH (FORCE)`, so
    /// connections left open do not keep it). An own cluster is stopped and
    /// removed by its own drop instead. Failures are reported, not raised:
    /// a panic here could abort a test that is already unwinding.
    fn drop(&mut self) {
        let admin_url = match &self.home {
            Home::Shared(cluster) => cluster.admin_url(),
            Home::External { admin_url } => admin_url.clone(),
            Home::Own(_) => return,
        };
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        let result = psql_command(&self.psql, &admin_url, &sql)
            .output()
            .map_err(|e| e.to_string())
            .and_then(psql_result);
        if let Err(error) = result {
            eprintln!(
                "tests/common/postgres: could not drop database {}: {error}",
                self.name
            );
        }
    }
}

/// A PostgreSQL cluster in a temporary folder, watched so that it stops
/// when the test process exits.
struct Cluster {
    /// The temporary folder: `data/`, `log`, and the Unix socket.
    folder: PathBuf,
    data: PathBuf,
    log: PathBuf,
    /// `/usr/lib/postgresql/VERSION/bin`.
    bin: PathBuf,
    port: u16,
    /// Whether the server binaries run as the `postgres` user (the tests
    /// run as root).
    as_postgres_user: bool,
    /// The `sh` that stops the cluster and removes `folder` once its
    /// standard input, held only here, closes.
    watchdog: Child,
}

/// The cluster of this test process, or why it could not start (kept, so
/// that every test reports it instead of retrying `initdb`).
fn shared_cluster() -> &'static Cluster {
    static SHARED: OnceLock<Result<Cluster, String>> = OnceLock::new();
    match SHARED.get_or_init(Cluster::start) {
        Ok(cluster) => cluster,
        Err(error) => panic!("{error}"),
    }
}

impl Cluster {
    /// `initdb`, then a start on a free port, waiting until it accepts
    /// connections. Blocking: callers run it on the blocking pool.
    fn start() -> Result<Cluster, String> {
        let bin = server_bin_dir()?;
        let as_postgres_user = running_as_root();
        let folder = new_temp_folder()?;
        // The watchdog first, so that the folder goes away whatever fails
        // from here on (its stdin closes when `cluster` is dropped).
        let mut cluster = Cluster {
            data: folder.join("data"),
            log: folder.join("log"),
            watchdog: spawn_watchdog(&folder, &server_argv(&bin, "pg_ctl", as_postgres_user))?,
            folder,
            bin,
            port: 0,
            as_postgres_user,
        };
        if as_postgres_user {
            chown_to_postgres(&cluster.folder)?;
        }
        let initdb = cluster
            .server_command("initdb")
            .arg("-D")
            .arg(&cluster.data)
            .args([
                "-U",
                SUPERUSER,
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
            ])
            .output();
        check(initdb, "initdb").map_err(|error| {
            if as_postgres_user {
                format!(
                    "{error}\n(initdb runs as the postgres user, which must be able to enter {}: \
                     point TMPDIR at a folder it can reach, such as /tmp)",
                    cluster.folder.display()
                )
            } else {
                error
            }
        })?;
        let mut settings = format!(
            "\n# tests/common/postgres.rs\n\
             listen_addresses = '127.0.0.1'\n\
             unix_socket_directories = '{}'\n\
             max_connections = 200\n",
            cluster.folder.display().to_string().replace('\'', "''"),
        );
        for attempt in 1..=PORT_ATTEMPTS {
            cluster.port = free_port()?;
            // A later line wins: each attempt appends its port.
            settings.push_str(&format!("port = {}\n", cluster.port));
            append(&cluster.data.join("postgresql.conf"), &settings)?;
            settings.clear();
            // So that the log read after a failure is this attempt's.
            let _ = std::fs::remove_file(&cluster.log);
            match check(cluster.pg_ctl_start().output(), "pg_ctl start") {
                Ok(_) => return Ok(cluster),
                Err(_) if attempt < PORT_ATTEMPTS && cluster.port_was_taken() => continue,
                Err(error) => return Err(format!("{error}\n{}", cluster.log_tail())),
            }
        }
        unreachable!("the last attempt returns")
    }

    fn admin_url(&self) -> String {
        format!("postgres://{SUPERUSER}@127.0.0.1:{}/postgres", self.port)
    }

    fn psql(&self) -> PathBuf {
        self.bin.join("psql")
    }

    async fn stop(&self, mode: StopMode) {
        let mut command = self.server_command("pg_ctl");
        command
            .args([
                "stop",
                "-w",
                "-t",
                PG_CTL_TIMEOUT_SECS,
                "-m",
                mode.pg_ctl_mode(),
                "-D",
            ])
            .arg(&self.data);
        let output = tokio::process::Command::from(command).output().await;
        if let Err(error) = check(output, "pg_ctl stop") {
            panic!("{error}\n{}", self.log_tail());
        }
    }

    /// Starts the stopped cluster on its port; waits until it accepts
    /// connections.
    async fn start_again(&self) {
        let output = tokio::process::Command::from(self.pg_ctl_start())
            .output()
            .await;
        if let Err(error) = check(output, "pg_ctl start") {
            let taken = if self.port_was_taken() {
                format!(
                    "(port {} was taken by another process while it was stopped)\n",
                    self.port
                )
            } else {
                String::new()
            };
            panic!("{error}\n{taken}{}", self.log_tail());
        }
    }

    /// `pg_ctl start`, waiting (bounded) until the server accepts
    /// connections; the server's output goes to `log`.
    fn pg_ctl_start(&self) -> Command {
        let mut command = self.server_command("pg_ctl");
        command
            .args(["start", "-w", "-t", PG_CTL_TIMEOUT_SECS, "-D"])
            .arg(&self.data)
            .arg("-l")
            .arg(&self.log);
        command
    }

    /// A server binary (`initdb`, `pg_ctl`) as the user that may run it,
    /// from `/`, which that user can always enter.
    fn server_command(&self, program: &str) -> Command {
        let argv = server_argv(&self.bin, program, self.as_postgres_user);
        let mut command = Command::new(&argv[0]);
        command
            .args(&argv[1..])
            .current_dir("/")
            .stdin(Stdio::null());
        command
    }

    fn port_was_taken(&self) -> bool {
        std::fs::read_to_string(&self.log).is_ok_and(|log| log.contains("Address already in use"))
    }

    /// The end of the server log, for panic messages.
    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(60)..].join("\n");
        format!("--- {} (last lines) ---\n{tail}", self.log.display())
    }
}

impl Drop for Cluster {
    /// Closes the watchdog's stdin and waits for it to stop PostgreSQL and
    /// remove the folder. (The shared cluster is never dropped: its
    /// watchdog acts when the test process exits.)
    fn drop(&mut self) {
        drop(self.watchdog.stdin.take());
        let _ = self.watchdog.wait();
    }
}

/// `sh` waiting for end of file on its stdin, then stopping the cluster and
/// removing `folder`. Its own process group keeps a Ctrl-C on the terminal
/// from killing it before it has cleaned up; its output goes nowhere, so a
/// pipe reading `cargo test` is not held open after the tests end.
fn spawn_watchdog(folder: &Path, pg_ctl: &[OsString]) -> Result<Child, String> {
    use std::os::unix::process::CommandExt;
    const SCRIPT: &str = r#"folder=$1; shift
cat >/dev/null
"$@" stop -D "$folder/data" -m immediate -w -t 60 >/dev/null 2>&1
rm -rf "$folder""#;
    Command::new("sh")
        .arg("-c")
        .arg(SCRIPT)
        .arg("taskq-pg-watchdog")
        .arg(folder)
        .args(pg_ctl)
        .current_dir("/")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(|e| format!("could not start the watchdog shell (sh): {e}"))
}

/// The command line of a server binary: through `runuser -u postgres` when
/// the tests run as root.
fn server_argv(bin: &Path, program: &str, as_postgres_user: bool) -> Vec<OsString> {
    let mut argv: Vec<OsString> = Vec::new();
    if as_postgres_user {
        argv.extend(["runuser", "-u", "postgres", "--"].map(OsString::from));
    }
    argv.push(bin.join(program).into_os_string());
    argv
}

/// The `bin` folder of the highest PostgreSQL version installed in
/// Debian's layout.
fn server_bin_dir() -> Result<PathBuf, String> {
    let root = Path::new("/usr/lib/postgresql");
    let versions = std::fs::read_dir(root).into_iter().flatten().flatten();
    versions
        .filter(|entry| entry.path().join("bin/initdb").is_file())
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            // "15", or "9.6" before PostgreSQL 10.
            let version: Vec<u32> = name
                .split('.')
                .map(|n| n.parse().ok())
                .collect::<Option<_>>()?;
            Some((version, entry.path().join("bin")))
        })
        .max()
        .map(|(_, bin)| bin)
        .ok_or_else(|| {
            format!(
                "no PostgreSQL server found (/usr/lib/postgresql/*/bin/initdb): install Debian's \
                 postgresql package (scripts/test does so when run as root); tests that do not \
                 restart PostgreSQL may use an existing server named by {EXTERNAL_URL_VAR}"
            )
        })
}

/// `psql` of the highest installed server version, else the one on `PATH`.
fn psql_binary() -> PathBuf {
    server_bin_dir()
        .map(|bin| bin.join("psql"))
        .unwrap_or_else(|_| PathBuf::from("psql"))
}

/// Whether this process runs as root (its effective uid, from
/// `/proc/self/status`).
fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let uids = status
                .lines()
                .find(|line| line.starts_with("Uid:"))?
                .to_owned();
            Some(uids.split_whitespace().nth(2)? == "0")
        })
        .unwrap_or(false)
}

fn chown_to_postgres(folder: &Path) -> Result<(), String> {
    let missing = || {
        "the tests run as root, so PostgreSQL must run as the postgres system user, \
         which does not exist: install Debian's postgresql package, which creates it"
            .to_owned()
    };
    let entry = Command::new("getent")
        .args(["passwd", "postgres"])
        .output()
        .map_err(|_| missing())?;
    let entry = String::from_utf8_lossy(&entry.stdout).into_owned();
    let fields: Vec<&str> = entry.trim().split(':').collect();
    let (Some(uid), Some(gid)) = (
        fields.get(2).and_then(|f| f.parse().ok()),
        fields.get(3).and_then(|f| f.parse().ok()),
    ) else {
        return Err(missing());
    };
    std::os::unix::fs::chown(folder, Some(uid), Some(gid)).map_err(|e| {
        format!(
            "could not give {} to the postgres user: {e}",
            folder.display()
        )
    })
}

/// A new folder `taskq-pg-PID-N` under the temporary directory.
fn new_temp_folder() -> Result<PathBuf, String> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let folder = std::env::temp_dir().join(format!("taskq-pg-{}-{n}", std::process::id()));
        match std::fs::create_dir(&folder) {
            Ok(()) => return Ok(folder),
            // Left by an earlier process with the same pid.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(format!("could not create {}: {e}", folder.display())),
        }
    }
}

/// A loopback port that was free a moment ago.
fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .map_err(|e| format!("could not find a free port on 127.0.0.1: {e}"))
}

fn append(path: &Path, text: &str) -> Result<(), String> {
    OpenOptions::new()
        .append(true)
        .open(path)
        .and_then(|mut file| file.write_all(text.as_bytes()))
        .map_err(|e| format!("could not write {}: {e}", path.display()))
}

/// The output of a finished command, or what went wrong with it.
fn check(output: std::io::Result<Output>, what: &str) -> Result<Output, String> {
    let output = output.map_err(|e| format!("could not run {what}: {e}"))?;
    if output.status.success() {
        Ok(output)
    } else {
        Err(format!(
            "{what} failed ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

/// A database name no other test, process or earlier run uses.
fn unique_database_name() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("taskq_test_{}_{millis}_{n}", std::process::id())
}

/// `url` with its database replaced by `database`, its query (such as
/// `?sslmode=require`) kept.
pub fn database_url(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, format!("?{query}")),
        None => (url, String::new()),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let authority_end = base[authority_start..]
        .find('/')
        .map_or(base.len(), |i| authority_start + i);
    format!("{}/{database}{query}", &base[..authority_end])
}

/// `psql` quiet, unaligned, rows only, stopping at the first error, with
/// bounded connect and statement times, and no `~/.psqlrc`.
fn psql_command(psql: &Path, url: &str, sql: &str) -> Command {
    let mut command = Command::new(psql);
    command
        .args([
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            url,
            "-c",
            sql,
        ])
        .env("PGCONNECT_TIMEOUT", "10")
        .env("PGOPTIONS", "-c statement_timeout=60s")
        .stdin(Stdio::null());
    command
}

async fn run_psql(psql: &Path, url: &str, sql: &str) -> Result<String, String> {
    let output = tokio::process::Command::from(psql_command(psql, url, sql))
        .output()
        .await
        .map_err(|e| format!("could not run {}: {e}", psql.display()))?;
    psql_result(output)
}

fn psql_result(output: Output) -> Result<String, String> {
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout)
            .trim_end_matches('\n')
            .to_owned())
    } else {
        Err(format!(
            "psql failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim_end()
        ))
    }
}
