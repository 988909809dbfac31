//! Test harness for pg_keel over real client connections.
//!
//! [`Cluster`] is a throwaway PostgreSQL cluster (own data dir, free port, pg_keel preloaded) of
//! the version `KEEL_PG_CONFIG` names (15 by default), run as the `postgres` user when we are
//! root; [`Redis`] a throwaway redis-server on a free port. Both can be stopped, crashed and
//! restarted by tests, and both stop when dropped.
//! [`run`] drives a list of tests (made with [`tests!`]) and prints a closing
//! `N passed, N failed` line.
//!
//! The rules a test file lives by (CONTRIBUTING.md, "Adding a client test", says more):
//! - **One cluster (and one redis-server) per file.** Its tests run one after another on it,
//!   in the order of the file's `tests![…]`; a test that must come last says so there.
//! - **Unique object names.** Every queue, topic, policy, schedule, role and user id a test
//!   makes is its own: a name two tests share makes each depend on the other.
//! - **Leave the servers running.** A test that crashes or stops PostgreSQL or Redis starts
//!   them again before it ends (`env.pg.start_again()`, `env.redis.start_again()`).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub use postgres::{Client, NoTls};

/// Database the tests (and the background worker) use.
pub const DATABASE: &str = "keel_test";

/// What `pg_config <flag>` of the PostgreSQL under test prints (`KEEL_PG_CONFIG`, set by
/// `make test PG=..`; Debian's PostgreSQL 15 otherwise).
pub fn pg_config(flag: &str) -> String {
    let pg_config = std::env::var("KEEL_PG_CONFIG")
        .unwrap_or_else(|_| "/usr/lib/postgresql/15/bin/pg_config".into());
    let out = Command::new(&pg_config)
        .arg(flag)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {pg_config}: {e}"));
    assert!(out.status.success(), "{pg_config} {flag} failed");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn pg_bindir() -> PathBuf {
    PathBuf::from(pg_config("--bindir"))
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// A TCP port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port")
}

/// Polls `check` until it returns Some or `within` has passed.
pub fn wait_for<T>(within: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = check() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A PostgreSQL cluster of our own with pg_keel preloaded and installed in [`DATABASE`].
pub struct Cluster {
    dir: PathBuf,
    bindir: PathBuf,
    as_postgres: bool,
    pub port: u16,
}

impl Cluster {
    /// initdb, configure, start, create the database and the extension.
    pub fn start(extra_conf: &[&str]) -> Cluster {
        let as_postgres = is_root();
        let dir =
            std::env::temp_dir().join(format!("keel-test-{}-{}", std::process::id(), free_port()));
        std::fs::create_dir_all(&dir).expect("create cluster dir");
        let cluster = Cluster {
            dir,
            bindir: pg_bindir(),
            as_postgres,
            port: free_port(),
        };
        if as_postgres {
            cluster.must(
                Command::new("chown")
                    .arg("postgres:postgres")
                    .arg(&cluster.dir),
            );
        }
        cluster.must(
            cluster
                .pg("initdb")
                .args([
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "-E",
                    "UTF8",
                    "--no-sync",
                    "-D",
                ])
                .arg(cluster.data()),
        );
        let mut conf = vec![
            format!("port = {}", cluster.port),
            "listen_addresses = '127.0.0.1'".into(),
            format!("unix_socket_directories = '{}'", cluster.dir.display()),
            "shared_preload_libraries = 'pg_keel'".into(),
            format!("keel.database = '{DATABASE}'"),
            "max_connections = 100".into(),
            "fsync = off".into(),
            "log_min_messages = warning".into(),
        ];
        conf.extend(extra_conf.iter().map(|s| s.to_string()));
        let conf_path = cluster.data().join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf_path).expect("read postgresql.conf");
        text.push_str("\n# keel-pg-test\n");
        text.push_str(&conf.join("\n"));
        text.push('\n');
        std::fs::write(&conf_path, text).expect("write postgresql.conf");
        cluster.start_server();
        let mut admin = cluster.connect_db("postgres");
        admin
            .batch_execute(&format!("CREATE DATABASE {DATABASE}"))
            .expect("create database");
        let mut c = cluster.connect();
        c.batch_execute("CREATE EXTENSION pg_keel")
            .expect("create extension");
        // The worker's first start races CREATE DATABASE above (it retries every 2 s): tests
        // begin once it is connected, so none of them runs without it (unless not preloaded).
        wait_for(Duration::from_secs(30), || {
            let ready: bool = c
                .query_one(
                    "SELECT pid IS NOT NULL
                         OR current_setting('shared_preload_libraries') NOT LIKE '%pg_keel%'
                       FROM keel.worker_status()",
                    &[],
                )
                .ok()?
                .get(0);
            ready.then_some(())
        })
        .expect("the pg_keel worker did not start within 30 s");
        cluster
    }

    /// A hot standby of this cluster (`pg_basebackup -R`, streaming), started and connected.
    /// It has the same settings, pg_keel preloaded included, on a port of its own.
    pub fn standby(&self) -> Cluster {
        let dir = std::env::temp_dir().join(format!(
            "keel-test-{}-{}-standby",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&dir).expect("create standby dir");
        let standby = Cluster {
            dir,
            bindir: self.bindir.clone(),
            as_postgres: self.as_postgres,
            port: free_port(),
        };
        if standby.as_postgres {
            standby.must(
                Command::new("chown")
                    .arg("postgres:postgres")
                    .arg(&standby.dir),
            );
        }
        let port = self.port.to_string();
        standby.must(
            standby
                .pg("pg_basebackup")
                .arg("-h")
                .arg(&self.dir)
                .args(["-p", &port, "-U", "postgres", "-R", "-X", "stream"])
                .args(["--checkpoint=fast", "--no-sync", "-D"])
                .arg(standby.data()),
        );
        // Later lines win: the standby's own port and socket directory.
        let conf_path = standby.data().join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf_path).expect("read postgresql.conf");
        text.push_str(&format!(
            "\n# keel-pg-test standby\nport = {}\nunix_socket_directories = '{}'\nhot_standby = on\n",
            standby.port,
            standby.dir.display()
        ));
        std::fs::write(&conf_path, text).expect("write postgresql.conf");
        standby.start_server();
        standby.connect();
        standby
    }

    /// Waits until `standby` has replayed everything this cluster had written when called
    /// (inserted, not only flushed: commits without a flush wait here for the WAL writer).
    pub fn wait_replayed_by(&self, standby: &Cluster) {
        let lsn: String = one(
            &mut self.connect(),
            "SELECT pg_current_wal_insert_lsn()::text",
        );
        let mut s = standby.connect();
        wait_for(Duration::from_secs(30), || {
            let done: bool = s
                .query_one(
                    "SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn",
                    &[&lsn],
                )
                .ok()?
                .get(0);
            done.then_some(())
        })
        .unwrap_or_else(|| panic!("the standby did not replay up to {lsn} within 30 s"));
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// The server log, for a failing test to print.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    fn pg(&self, program: &str) -> Command {
        let path = self.bindir.join(program);
        if self.as_postgres {
            let mut c = Command::new("sudo");
            c.args(["-n", "-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        }
    }

    fn must(&self, cmd: &mut Command) {
        let out = cmd
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
        if !out.status.success() {
            panic!(
                "{cmd:?} failed: {}\n{}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    fn pg_ctl(&self, args: &[&str]) {
        let log = self.dir.join("server.log");
        let mut cmd = self.pg("pg_ctl");
        cmd.arg("-D")
            .arg(self.data())
            .arg("-l")
            .arg(&log)
            .args(args);
        self.must(&mut cmd);
    }

    fn start_server(&self) {
        self.pg_ctl(&["-w", "-t", "60", "start"]);
    }

    /// Clean shutdown (`-m fast`) then start.
    pub fn restart(&self) {
        self.pg_ctl(&["-w", "-t", "60", "-m", "fast", "stop"]);
        self.start_server();
    }

    /// `pg_ctl promote` (of a standby), waiting until it accepts writes.
    pub fn promote(&self) {
        self.pg_ctl(&["-w", "-t", "60", "promote"]);
    }

    /// `pg_ctl stop -m immediate` (no shutdown checkpoint: crash recovery at the next start).
    pub fn crash(&self) {
        self.pg_ctl(&["-w", "-m", "immediate", "stop"]);
    }

    pub fn start_again(&self) {
        self.start_server();
    }

    pub fn conninfo(&self, db: &str) -> String {
        format!(
            "host={} port={} user=postgres dbname={db} connect_timeout=10",
            self.dir.display(),
            self.port
        )
    }

    pub fn connect_db(&self, db: &str) -> Client {
        let info = self.conninfo(db);
        wait_for(Duration::from_secs(30), || {
            Client::connect(&info, NoTls).ok()
        })
        .unwrap_or_else(|| panic!("cannot connect to {info}"))
    }

    /// A connection that collects every notice message the server sends (set
    /// client_min_messages to see DEBUG ones).
    pub fn connect_with_notices(&self) -> (Client, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
        let notices = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = notices.clone();
        let mut config: postgres::Config = self.conninfo(DATABASE).parse().expect("conninfo");
        config
            .notice_callback(move |n| sink.lock().expect("notices").push(n.message().to_string()));
        (config.connect(NoTls).expect("connect"), notices)
    }

    /// A new connection to [`DATABASE`].
    /// A connection to the test database as `role` (which must exist and have LOGIN).
    pub fn connect_as(&self, role: &str) -> Client {
        let info = self
            .conninfo(DATABASE)
            .replace("user=postgres", &format!("user={role}"));
        Client::connect(&info, NoTls).unwrap_or_else(|e| panic!("connect as {role}: {e}"))
    }

    pub fn connect(&self) -> Client {
        self.connect_db(DATABASE)
    }

    pub fn socket_dir(&self) -> &Path {
        &self.dir
    }

    /// `pg_dump -Fc` of [`DATABASE`] restored with `pg_restore` into a new database `name`
    /// (dropped first if it exists); a connection to it. [`Cluster::drop_database`] removes it.
    pub fn restored_copy(&self, name: &str) -> Client {
        let dump = self.dir.join(format!("{name}.dump"));
        let dump = dump.to_str().expect("utf-8 path");
        self.client("pg_dump", &["-Fc", "-f", dump, DATABASE]);
        let mut admin = self.connect_db("postgres");
        exec(&mut admin, &format!("DROP DATABASE IF EXISTS {name}"));
        exec(&mut admin, &format!("CREATE DATABASE {name}"));
        self.client("pg_restore", &["-d", name, dump]);
        self.connect_db(name)
    }

    /// A connection to database `name`, made anew (dropped first if a failed run left it).
    pub fn fresh_database(&self, name: &str) -> Client {
        let mut admin = self.connect_db("postgres");
        exec(&mut admin, &format!("DROP DATABASE IF EXISTS {name}"));
        exec(&mut admin, &format!("CREATE DATABASE {name}"));
        self.connect_db(name)
    }

    pub fn drop_database(&self, name: &str) {
        exec(
            &mut self.connect_db("postgres"),
            &format!("DROP DATABASE {name}"),
        );
    }

    /// Runs a client program of this PostgreSQL (pg_dump, psql, ...) against this cluster as
    /// user postgres; panics with its output when it fails.
    pub fn client(&self, program: &str, args: &[&str]) -> String {
        let out = Command::new(self.bindir.join(program))
            .arg("-h")
            .arg(&self.dir)
            .args(["-p", &self.port.to_string(), "-U", "postgres"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("{program}: {e}"));
        if !out.status.success() {
            panic!(
                "{program} {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let mut cmd = self.pg("pg_ctl");
        cmd.arg("-D")
            .arg(self.data())
            .args(["-w", "-m", "immediate", "stop"]);
        let _ = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A redis-server of our own, without persistence, on a free port.
pub struct Redis {
    child: std::sync::Mutex<Option<Child>>,
    pub port: u16,
}

impl Redis {
    /// Every entry of a stream: (entry id, fields).
    pub fn xrange(&self, key: &str) -> Vec<(String, std::collections::HashMap<String, String>)> {
        let raw: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
            .arg(key)
            .arg("-")
            .arg("+")
            .query(&mut self.connection())
            .expect("XRANGE");
        raw.into_iter()
            .map(|(id, fields)| (id, fields.into_iter().collect()))
            .collect()
    }

    pub fn start() -> Redis {
        let redis = Redis {
            child: std::sync::Mutex::new(None),
            port: free_port(),
        };
        redis.start_again();
        redis
    }

    /// A handle on a redis-server someone else runs on `port` (not stopped when dropped).
    pub fn attach(port: u16) -> Redis {
        Redis {
            child: std::sync::Mutex::new(None),
            port,
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub fn start_again(&self) {
        let program = std::env::var("KEEL_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        let child = Command::new(&program)
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
        *self.child.lock().expect("redis child") = Some(child);
        let url = self.url();
        wait_for(Duration::from_secs(10), || {
            let client = redis::Client::open(url.as_str()).ok()?;
            let mut conn = client
                .get_connection_with_timeout(Duration::from_millis(200))
                .ok()?;
            redis::cmd("PING").query::<String>(&mut conn).ok()
        })
        .expect("redis-server did not answer PING");
    }

    pub fn stop(&self) {
        if let Some(mut child) = self.child.lock().ok().and_then(|mut c| c.take()) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn connection(&self) -> redis::Connection {
        redis::Client::open(self.url().as_str())
            .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(2)))
            .expect("connect to redis")
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What every test gets: the shared cluster and Redis of this run.
pub struct Env {
    pub pg: Cluster,
    pub redis: Redis,
}

impl Env {
    pub fn start() -> Env {
        Env::start_with(&[])
    }

    /// With more postgresql.conf lines (later lines win).
    pub fn start_with(extra_conf: &[&str]) -> Env {
        let redis = Redis::start();
        let url = format!("keel.redis_url = '{}'", redis.url());
        let mut conf = vec![url.as_str()];
        conf.extend_from_slice(extra_conf);
        let pg = Cluster::start(&conf);
        Env { pg, redis }
    }
}

pub type TestFn = fn(&Env);

/// The table of a file's tests, in the order they run: `tests![a, b, c]` is
/// `&[("a", a), ("b", b), ("c", c)]`, so a test's name is its function's and cannot drift.
/// A test not listed never runs. Comments inside the list stay where they are (say why a test
/// must come last).
#[macro_export]
macro_rules! tests {
    ($($test:ident),* $(,)?) => {
        &[$((stringify!($test), $test as $crate::TestFn)),*]
    };
}

/// Runs `tests` (name, fn) against one [`Env`], each isolated by catch_unwind; prints one line
/// per test and a closing `N passed, N failed`; stops everything it started; exits 1 on failure.
/// Arguments: substrings that select tests by name (like libtest's filter).
pub fn run(tests: &[(&str, TestFn)]) -> ! {
    run_with(tests, &[])
}

/// [`run`] on a cluster with more postgresql.conf lines.
pub fn run_with(tests: &[(&str, TestFn)], extra_conf: &[&str]) -> ! {
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let selected: Vec<_> = tests
        .iter()
        .filter(|(name, _)| filters.is_empty() || filters.iter().any(|f| name.contains(f.as_str())))
        .collect();
    println!("running {} tests", selected.len());
    let env = Env::start_with(extra_conf);
    let (mut passed, mut failed) = (0, Vec::new());
    for (name, test) in selected {
        let started = Instant::now();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| test(&env)));
        let ms = started.elapsed().as_millis();
        match outcome {
            Ok(()) => {
                passed += 1;
                println!("test {name} ... ok ({ms} ms)");
            }
            Err(_) => {
                failed.push(name.to_string());
                println!("test {name} ... FAILED ({ms} ms)");
            }
        }
    }
    if !failed.is_empty() {
        let log = env.pg.log();
        let lines: Vec<&str> = log.lines().collect();
        let tail_from = lines.len().saturating_sub(40);
        println!("\nfailures: {}", failed.join(", "));
        // The background worker's life (starts, stops, exits, its errors) over the whole run,
        // then the end of the log.
        let workers: Vec<String> = lines
            .iter()
            .filter(|l| l.contains("pg_keel worker started"))
            .filter_map(|l| Some(format!("[{}]", l.split('[').nth(1)?.split(']').next()?)))
            .collect();
        println!("--- server log: what the pg_keel worker logged before the last lines ---");
        for line in &lines[..tail_from] {
            if line.contains("background worker") || workers.iter().any(|w| line.contains(w)) {
                println!("{line}");
            }
        }
        println!("--- server log (last lines) ---");
        for line in &lines[tail_from..] {
            println!("{line}");
        }
    }
    drop(env);
    println!("\n{} passed, {} failed", passed, failed.len());
    std::process::exit(if failed.is_empty() { 0 } else { 1 });
}

/// Waits (30 s at most) until this database's pg_keel worker is connected and has nothing
/// pending; its pid. Panics with the worker's state otherwise.
pub fn wait_worker_idle(c: &mut Client) -> i32 {
    wait_for(Duration::from_secs(30), || {
        let row = c
            .query_one("SELECT pid, state FROM keel.worker_status()", &[])
            .ok()?;
        let (pid, state): (Option<i32>, String) = (row.get(0), row.get(1));
        state.starts_with("idle: nothing pending").then_some(pid?)
    })
    .unwrap_or_else(|| {
        panic!(
            "worker not ready: {:?}",
            one::<String>(c, "SELECT state FROM keel.worker_status()")
        )
    })
}

/// Puts every maintenance task on a one-second schedule; returns the schedule it replaced, for
/// [`restore_tasks`].
pub fn run_tasks_every_second(c: &mut Client) -> Vec<(String, String, bool)> {
    let saved = c
        .query(
            "SELECT name, every::text, enabled FROM keel.tasks ORDER BY name",
            &[],
        )
        .expect("keel.tasks")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    exec(
        c,
        "SELECT keel.set_task(name, '1 second', true) FROM keel.tasks",
    );
    saved
}

/// Puts the schedule [`run_tasks_every_second`] returned back.
pub fn restore_tasks(c: &mut Client, saved: &[(String, String, bool)]) {
    for (name, every, enabled) in saved {
        c.execute(
            "SELECT keel.set_task($1, $2::text::interval, $3)",
            &[name, every, enabled],
        )
        .expect("set_task");
    }
}

/// The first column of the one row `sql` returns; panics with the error otherwise.
pub fn one<T: for<'a> postgres::types::FromSql<'a>>(c: &mut Client, sql: &str) -> T {
    c.query_one(sql, &[])
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"))
        .get(0)
}

/// Runs `sql` (one or more statements); panics with the error if it fails.
pub fn exec(c: &mut Client, sql: &str) {
    c.batch_execute(sql)
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
}

/// Runs each (statement, expected SQLSTATE) and panics listing every statement that did not
/// fail with its expected code.
pub fn expect_sqlstates(c: &mut Client, cases: &[(&str, &str)]) {
    let wrong: Vec<String> = cases
        .iter()
        .filter_map(|(sql, want)| {
            let got = sqlstate(c.batch_execute(sql));
            (got.as_deref() != Some(*want)).then(|| format!("{sql}: want {want}, got {got:?}"))
        })
        .collect();
    assert!(wrong.is_empty(), "wrong SQLSTATEs:\n{}", wrong.join("\n"));
}

/// The SQLSTATE of a failed statement, or None when it succeeded.
pub fn sqlstate(result: Result<impl Sized, postgres::Error>) -> Option<String> {
    match result {
        Ok(_) => None,
        Err(e) => Some(
            e.code()
                .map(|c| c.code().to_string())
                .unwrap_or_else(|| format!("no SQLSTATE: {e}")),
        ),
    }
}
