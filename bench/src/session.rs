//! Sessions: `keel.session_validate` per second on 1,000,000 sessions with 1, 4 and 16
//! clients, beside the plain-SQL way (a primary-key lookup by the token's SHA-256 on a table
//! of the same shape, hashing in the same statement) and Redis GET of a session stored under
//! its token. Also validate with the touch due on every call (`keel.session_touch_interval =
//! 0`), which writes and commits each time; the first way has no touch due (the common
//! case: one touch per session per interval). Each cell is the median of three runs of
//! KEEL_BENCH_SECONDS (default 1), taken in rounds, the reads' rounds before the touches';
//! clients pick tokens at random among 100,000 of the million. Then logins per second: a
//! plain INSERT beside session_create, with and without a per-user cap.

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use keel_pg_test::{Cluster, Redis};

const CLIENTS: [usize; 3] = [1, 4, 16];
const SESSIONS: i64 = 1_000_000;
/// Sessions whose tokens the clients use (every tenth).
const SAMPLE_EVERY: i64 = 10;

/// A million sessions made in SQL: the token's 32 bytes are sha256 of the row number, the
/// stored hash is sha256 of those bytes (as keel.session_create stores it). The plain table
/// has the same columns, the hash as its primary key, and PostgreSQL's default fillfactor
/// (keel.sessions leaves 30% of each page for HOT touches).
const SETUP: &str = "
    INSERT INTO keel.sessions (token_hash, user_id, data, expires_at)
    SELECT sha256(sha256(int8send(g))), 'user-' || (g % 100000),
           jsonb_build_object('role', 'member', 'mfa', true), now() + interval '30 days'
      FROM generate_series(1, 1000000) g;
    CREATE TABLE plain_sessions (LIKE keel.sessions INCLUDING DEFAULTS INCLUDING CONSTRAINTS);
    ALTER TABLE plain_sessions ADD PRIMARY KEY (token_hash);
    INSERT INTO plain_sessions SELECT * FROM keel.sessions";

const TOKENS: &str = "
    SELECT translate(rtrim(encode(sha256(int8send(g)), 'base64'), '='), '+/', '-_')
      FROM generate_series($1::bigint, $2::bigint, $3::bigint) g";

/// What validate checks when no touch is due: not revoked, before both expiries.
const PLAIN: &str = "
    SELECT session_id, user_id, data, created_at, expires_at, idle_expires_at
      FROM plain_sessions
     WHERE token_hash = sha256(decode(translate($1, '-_', '+/') || '=', 'base64'))
       AND revoked_at IS NULL AND expires_at > now()
       AND (idle_expires_at IS NULL OR idle_expires_at > now())";

const KEEL: &str = "SELECT session_id, user_id, data, created_at, expires_at, idle_expires_at
      FROM keel.session_validate($1)";

#[derive(Clone, Copy, PartialEq)]
enum Way {
    Plain,
    Keel,
    KeelTouch,
    RedisGet,
}

impl Way {
    fn label(self) -> &'static str {
        match self {
            Way::Plain => "plain PK lookup",
            Way::Keel => "pg_keel session_validate",
            Way::KeelTouch => "  … touch on every call",
            Way::RedisGet => "redis GET",
        }
    }
}

fn next(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

fn rate(
    pg: &Cluster,
    redis: &Redis,
    tokens: &Arc<Vec<String>>,
    way: Way,
    clients: usize,
    run: Duration,
) -> f64 {
    let barrier = Arc::new(Barrier::new(clients + 1));
    let handles: Vec<_> = (0..clients)
        .map(|i| {
            let barrier = barrier.clone();
            let tokens = tokens.clone();
            let mut seed = 0x2545_f491_4f6c_dd1d ^ (i as u64 + 1);
            let mut c = pg.connect();
            let mut r = redis.connection();
            std::thread::spawn(move || {
                // The common case is a validation with no touch due (a session is touched
                // once per keel.session_touch_interval); the bench runs longer than the
                // default 60 s, so it says so explicitly. The other way touches every time.
                let interval = match way {
                    Way::KeelTouch => "0",
                    _ => "3600",
                };
                c.batch_execute(&format!("SET keel.session_touch_interval = {interval}"))
                    .expect("touch interval");
                let stmt = c
                    .prepare(if way == Way::Plain { PLAIN } else { KEEL })
                    .expect("prepare");
                // The first call of a backend plans its statements: not what is measured.
                c.query_opt(&stmt, &[&tokens[0]]).expect("warm-up");
                barrier.wait();
                let started = Instant::now();
                let mut n = 0u64;
                while started.elapsed() < run {
                    for _ in 0..20 {
                        let t = &tokens[(next(&mut seed) % tokens.len() as u64) as usize];
                        match way {
                            Way::RedisGet => {
                                let v: Option<String> =
                                    redis::cmd("GET").arg(t).query(&mut r).expect("GET");
                                assert!(v.is_some(), "every sampled token is in Redis");
                            }
                            _ => {
                                let row = c.query_opt(&stmt, &[t]).expect("validate");
                                assert!(row.is_some(), "every sampled session is valid");
                            }
                        }
                        n += 1;
                    }
                }
                (n, started.elapsed())
            })
        })
        .collect();
    barrier.wait();
    crate::ratelimit::total_rate(handles)
}

pub fn run(pg: &Cluster, redis: &Redis) {
    let seconds: u64 = std::env::var("KEEL_BENCH_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let run = Duration::from_secs(seconds);
    let mut c = pg.connect();
    let setup = Instant::now();
    c.batch_execute(SETUP).expect("sessions");
    // VACUUM refuses to run in the transaction a multi-statement batch is.
    c.batch_execute("VACUUM ANALYZE keel.sessions")
        .expect("vacuum");
    c.batch_execute("VACUUM ANALYZE plain_sessions")
        .expect("vacuum");
    let tokens: Vec<String> = c
        .query(TOKENS, &[&1i64, &SESSIONS, &SAMPLE_EVERY])
        .expect("tokens")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut r = redis.connection();
    for chunk in tokens.chunks(10_000) {
        let mut p = redis::pipe();
        for t in chunk {
            p.cmd("SET")
                .arg(t)
                .arg(r#"{"user_id":"user-1","role":"member","mfa":true}"#)
                .arg("EX")
                .arg(30 * 86_400)
                .ignore();
        }
        let _: () = p.query(&mut r).expect("SET");
    }
    let tokens = Arc::new(tokens);
    println!(
        "\nsessions: validations/s on {SESSIONS} sessions ({} tokens in use; made in {:.0} s), \
         median of 3 runs of {seconds} s per cell",
        tokens.len(),
        setup.elapsed().as_secs_f64()
    );
    println!("{:<28} {:>10} {:>10} {:>10}", "clients", 1, 4, 16);
    let ways = [Way::Plain, Way::Keel, Way::KeelTouch, Way::RedisGet];
    let mut samples: Vec<Vec<Vec<f64>>> = vec![vec![Vec::new(); CLIENTS.len()]; ways.len()];
    // The reads first, in rounds; the touches last: they leave dead row versions that
    // autovacuum then works through, which must not land in the read cells.
    for group in [&[0usize, 1, 3][..], &[2][..]] {
        for _ in 0..3 {
            for &w in group {
                for (k, clients) in CLIENTS.iter().enumerate() {
                    samples[w][k].push(rate(pg, redis, &tokens, ways[w], *clients, run));
                }
            }
        }
    }
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let cells: Vec<Vec<f64>> = samples
        .iter()
        .map(|way| way.iter().map(|c| median(c)).collect())
        .collect();
    for (w, way) in ways.iter().enumerate() {
        println!(
            "{:<28} {:>10.0} {:>10.0} {:>10.0}",
            way.label(),
            cells[w][0],
            cells[w][1],
            cells[w][2]
        );
    }
    let ratio = |k: usize| cells[1][k] / cells[0][k];
    println!(
        "session_validate / plain PK lookup = {:.2}x, {:.2}x, {:.2}x (1, 4, 16 clients)",
        ratio(0),
        ratio(1),
        ratio(2)
    );
    logins(pg, run);
}

/// Logins per second, 4 clients, each its own transaction, over 1,000 users picked at
/// random: a plain INSERT of a session row (the hash made in the same statement), pg_keel's
/// session_create, the hand-written cap of 5 (an advisory lock, an UPDATE that revokes all
/// but the 4 most recently seen, the INSERT), and session_create with a per-user cap of 5
/// (which takes the user's row lock and evicts the least recently seen). Median of three
/// runs.
fn logins(pg: &Cluster, run: Duration) {
    const LOGIN_CLIENTS: usize = 4;
    let ways = [
        (
            "plain INSERT",
            "INSERT INTO plain_sessions (token_hash, user_id, expires_at)
             VALUES (sha256(gen_random_uuid()::text::bytea), $1, now() + interval '30 days')",
        ),
        (
            "pg_keel session_create",
            "SELECT token FROM keel.session_create($1)",
        ),
        ("plain capped INSERT", "SELECT plain_capped_login($1)"),
        (
            "  … max_per_user => 5",
            "SELECT token FROM keel.session_create($1, max_per_user => 5)",
        ),
    ];
    // The hand-written cap: the user's advisory lock, then (in a new snapshot) revoke all but
    // the 4 most recently seen, then the INSERT.
    pg.connect()
        .batch_execute(
            "CREATE FUNCTION plain_capped_login(who text) RETURNS void LANGUAGE plpgsql AS $$
             BEGIN
                 PERFORM pg_advisory_xact_lock(hashtext(who));
                 UPDATE plain_sessions SET revoked_at = now(), expires_at = now()
                  WHERE token_hash IN (
                     SELECT token_hash FROM plain_sessions
                      WHERE user_id = who AND revoked_at IS NULL AND expires_at > now()
                      ORDER BY last_seen_at DESC OFFSET 4);
                 INSERT INTO plain_sessions (token_hash, user_id, expires_at)
                 VALUES (sha256(gen_random_uuid()::text::bytea), who, now() + interval '30 days');
             END $$;
             CREATE INDEX ON plain_sessions (user_id)",
        )
        .expect("plain capped login");
    let once = |sql: &'static str| -> f64 {
        let barrier = Arc::new(Barrier::new(LOGIN_CLIENTS + 1));
        let handles: Vec<_> = (0..LOGIN_CLIENTS)
            .map(|i| {
                let barrier = barrier.clone();
                let mut c = pg.connect();
                let mut seed = 0x9e37_79b9_7f4a_7c15 ^ (i as u64 + 1);
                std::thread::spawn(move || {
                    let stmt = c.prepare(sql).expect("prepare");
                    barrier.wait();
                    let started = Instant::now();
                    let mut n = 0u64;
                    while started.elapsed() < run {
                        let user = format!("login-{}", next(&mut seed) % 1000);
                        c.execute(&stmt, &[&user]).expect("login");
                        n += 1;
                    }
                    (n, started.elapsed())
                })
            })
            .collect();
        barrier.wait();
        crate::ratelimit::total_rate(handles)
    };
    let mut samples = vec![Vec::new(); ways.len()];
    for _ in 0..3 {
        for (w, (_, sql)) in ways.iter().enumerate() {
            samples[w].push(once(sql));
        }
    }
    println!("\nsessions: logins/s, {LOGIN_CLIENTS} clients over 1,000 users, median of 3");
    let mut cells = Vec::new();
    for (w, (label, _)) in ways.iter().enumerate() {
        samples[w].sort_by(|a: &f64, b| a.total_cmp(b));
        cells.push(samples[w][1]);
        println!("{label:<28} {:>10.0}", samples[w][1]);
    }
    println!(
        "session_create / plain INSERT = {:.2}x; capped: session_create / plain = {:.2}x, \
         / uncapped session_create = {:.2}x",
        cells[1] / cells[0],
        cells[3] / cells[2],
        cells[3] / cells[1]
    );
}
