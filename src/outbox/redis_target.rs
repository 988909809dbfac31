//! The Redis side of dispatch: one connection with connect, read and write timeouts, and a
//! Lua script that appends an event only if its dedupe key is absent, then sets that key for
//! the retention window. A batch is one pipeline. Never called inside a transaction or while
//! holding a lock (see `dispatch`).

use std::time::Duration;

use super::entry::{Event, Target};

/// Connect, read and write timeout for every Redis call.
pub const IO_TIMEOUT: Duration = Duration::from_secs(1);

/// Appends the event unless KEYS[1] (its dedupe key) exists, then sets KEYS[1] with a TTL.
/// The append comes first: if it fails (WRONGTYPE, OOM), nothing is written and a retry is
/// clean. Redis runs a script atomically, so a retried batch never appends an id twice.
const APPEND_ONCE: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local kind = ARGV[2]
if kind == 'stream' then
  local args = {KEYS[2]}
  if ARGV[3] ~= '' then
    table.insert(args, 'MAXLEN'); table.insert(args, '~'); table.insert(args, ARGV[3])
  end
  table.insert(args, '*')
  for i = 4, #ARGV do table.insert(args, ARGV[i]) end
  redis.call('XADD', unpack(args))
elseif kind == 'list' then
  redis.call('LPUSH', KEYS[2], ARGV[4])
else
  redis.call('PUBLISH', KEYS[2], ARGV[4])
end
redis.call('SET', KEYS[1], '1', 'EX', ARGV[1])
return 1
"#;

/// What happened to one event of a batch.
#[derive(Debug, PartialEq)]
pub enum Outcome {
    /// In its target now (appended by this call, or already there).
    Delivered,
    /// Redis refused for a reason that passes (OOM, READONLY, LOADING, ...): retry later.
    Transient(String),
    /// Redis refused this event itself (e.g. WRONGTYPE on its key): counts toward dead.
    Permanent(String),
}

/// Server error codes that say "not now" rather than "never".
const TRANSIENT_CODES: &[&str] = &[
    "OOM",
    "READONLY",
    "LOADING",
    "BUSY",
    "MASTERDOWN",
    "TRYAGAIN",
    "CLUSTERDOWN",
    "NOSCRIPT",
    "NOREPLICAS",
];

pub struct RedisTarget {
    url: String,
    conn: Option<(redis::Connection, String)>,
}

impl RedisTarget {
    pub fn new(url: &str) -> RedisTarget {
        RedisTarget {
            url: url.to_string(),
            conn: None,
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn is_connected(&self) -> bool {
        self.conn.is_some()
    }

    pub fn disconnect(&mut self) {
        self.conn = None;
    }

    fn connect(&mut self) -> Result<&mut (redis::Connection, String), String> {
        if self.conn.is_none() {
            let client = redis::Client::open(self.url.as_str()).map_err(|e| describe(&e))?;
            let mut conn = client
                .get_connection_with_timeout(IO_TIMEOUT)
                .map_err(|e| describe(&e))?;
            conn.set_read_timeout(Some(IO_TIMEOUT))
                .map_err(|e| describe(&e))?;
            conn.set_write_timeout(Some(IO_TIMEOUT))
                .map_err(|e| describe(&e))?;
            let sha: String = redis::cmd("SCRIPT")
                .arg("LOAD")
                .arg(APPEND_ONCE)
                .query(&mut conn)
                .map_err(|e| describe(&e))?;
            self.conn = Some((conn, sha));
        }
        self.conn
            .as_mut()
            .ok_or_else(|| "not connected".to_string())
    }

    /// Round trip time of a PING, connecting first if needed.
    pub fn ping(&mut self) -> Result<Duration, String> {
        let started = std::time::Instant::now();
        let (conn, _) = self.connect()?;
        let result: Result<String, _> = redis::cmd("PING").query(conn);
        match result {
            Ok(_) => Ok(started.elapsed()),
            Err(e) => {
                self.disconnect();
                Err(describe(&e))
            }
        }
    }

    /// Sends `events` in one pipeline; `ttl_secs` is how long dedupe keys live. Err when the
    /// batch as a whole failed (no connection, timeout): nothing is known to be delivered.
    pub fn dispatch(&mut self, events: &[Event], ttl_secs: i64) -> Result<Vec<Outcome>, String> {
        let (conn, sha) = self.connect()?;
        let mut pipe = redis::pipe();
        for e in events {
            let cmd = pipe
                .cmd("EVALSHA")
                .arg(sha.as_str())
                .arg(2)
                .arg(e.dedupe_key())
                .arg(&e.route.key);
            cmd.arg(ttl_secs.max(1));
            match &e.route.target {
                Target::Stream { maxlen } => {
                    cmd.arg("stream")
                        .arg(maxlen.map(|m| m.to_string()).unwrap_or_default());
                    for (k, v) in e.fields() {
                        cmd.arg(k).arg(v);
                    }
                }
                Target::List => {
                    cmd.arg("list").arg("").arg(e.message());
                }
                Target::PubSub => {
                    cmd.arg("pubsub").arg("").arg(e.message());
                }
            }
        }
        let results: Result<Vec<redis::RedisResult<redis::Value>>, _> =
            pipe.ignore_errors().query(conn);
        let results = match results {
            Ok(r) => r,
            Err(e) => {
                self.disconnect();
                return Err(describe(&e));
            }
        };
        let outcomes: Vec<Outcome> = results
            .into_iter()
            .map(|r| match r {
                Ok(_) => Outcome::Delivered,
                Err(e) if e.code().is_some_and(|c| TRANSIENT_CODES.contains(&c)) => {
                    Outcome::Transient(describe(&e))
                }
                Err(e) if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() => {
                    Outcome::Transient(describe(&e))
                }
                Err(e) => Outcome::Permanent(describe(&e)),
            })
            .collect();
        if outcomes.iter().any(|o| matches!(o, Outcome::Transient(_))) {
            self.disconnect(); // e.g. NOSCRIPT after SCRIPT FLUSH: reconnect reloads the script
        }
        Ok(outcomes)
    }
}

/// A Redis error in one line; redis-rs messages never contain the URL's password.
fn describe(e: &redis::RedisError) -> String {
    let text = e.to_string();
    text.lines()
        .next()
        .unwrap_or("redis error")
        .chars()
        .take(300)
        .collect()
}
