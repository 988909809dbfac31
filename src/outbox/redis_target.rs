//! The Redis side of dispatch: one connection with connect, read and write timeouts, and a
//! Lua script that appends an event only if its dedupe key is absent, then sets that key for
//! the retention window. A batch is one script call. Never called inside a transaction or while
//! holding a lock (see `dispatch`).

use std::time::Duration;

use super::entry::{Event, Target};

/// Connect, read and write timeout for every Redis call.
pub const IO_TIMEOUT: Duration = Duration::from_secs(1);

/// One call per batch. For each event i, KEYS[2i-1] is the hash that remembers its id (one per
/// block of `DEDUPE_BLOCK` ids, see `Event::dedupe_bucket`) and KEYS[2i] its target; ARGV[1]
/// is how long those hashes live, then per event: its dedupe field, kind, maxlen ('' for
/// none), the number n of values that follow, and those n values (stream field/value pairs,
/// or one message). HSETNX claims the event's field (a refusal there, such as WRONGTYPE, refuses
/// that event only); if it was there already the event is skipped (0). Otherwise it is appended (errors caught per event: the field is removed again,
/// so a retry is clean) and answers 1. Each hash touched gets its expiry set once per call.
/// Redis runs a script atomically, so a batch retried after a crash or timeout never appends
/// an id twice.
const APPEND_ONCE: &str = r#"
local ttl = ARGV[1]
local out = {}
local touched = {}
local a = 2
for i = 1, #KEYS, 2 do
  local seen, target = KEYS[i], KEYS[i + 1]
  local field, kind, maxlen, n = ARGV[a], ARGV[a + 1], ARGV[a + 2], tonumber(ARGV[a + 3])
  local first, last = a + 4, a + 3 + n
  a = last + 1
  local claimed = redis.pcall('HSETNX', seen, field, 1)
  if type(claimed) == 'table' and claimed.err then
    out[#out + 1] = claimed.err
  elseif claimed == 0 then
    out[#out + 1] = 0
  else
    touched[seen] = true
    local r
    if kind == 'stream' then
      if maxlen == '' then
        r = redis.pcall('XADD', target, '*', unpack(ARGV, first, last))
      else
        r = redis.pcall('XADD', target, 'MAXLEN', '~', maxlen, '*', unpack(ARGV, first, last))
      end
    elseif kind == 'list' then
      r = redis.pcall('LPUSH', target, ARGV[first])
    else
      r = redis.pcall('PUBLISH', target, ARGV[first])
    end
    if type(r) == 'table' and r.err then
      redis.call('HDEL', seen, field)
      out[#out + 1] = r.err
    else
      out[#out + 1] = 1
    end
  end
end
for seen in pairs(touched) do redis.call('EXPIRE', seen, ttl) end
return out
"#;

/// The figures of Redis' INFO that say whether it can keep what the outbox gives it.
#[derive(Debug, Default, PartialEq)]
pub struct RedisInfo {
    pub used_memory: i64,
    /// 0: no limit.
    pub maxmemory: i64,
    pub maxmemory_policy: String,
    pub evicted_keys: i64,
    /// master or slave.
    pub role: String,
}

impl RedisInfo {
    /// Reads `key:value` lines of INFO output; unknown and malformed lines are skipped, long
    /// values cut (a Redis that lies cannot make them large).
    pub fn parse(text: &str) -> RedisInfo {
        let mut info = RedisInfo::default();
        for line in text.lines() {
            let Some((key, value)) = line.trim_end().split_once(':') else {
                continue;
            };
            let number = || value.parse::<i64>().unwrap_or(0);
            let word = || value.chars().take(64).collect::<String>();
            match key {
                "used_memory" => info.used_memory = number(),
                "maxmemory" => info.maxmemory = number(),
                "maxmemory_policy" => info.maxmemory_policy = word(),
                "evicted_keys" => info.evicted_keys = number(),
                "role" => info.role = word(),
                _ => {}
            }
        }
        info
    }
}

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

    /// What `keel.health()` reports of this Redis: memory, evictions, role, eviction policy
    /// (`INFO memory`, `stats`, `replication`: one section per call, as every version takes).
    pub fn info(&mut self) -> Result<RedisInfo, String> {
        let (conn, _) = self.connect()?;
        let mut text = String::new();
        for section in ["memory", "stats", "replication"] {
            let part: Result<String, _> = redis::cmd("INFO").arg(section).query(conn);
            match part {
                Ok(part) => text.push_str(&part),
                Err(e) => {
                    self.disconnect();
                    return Err(describe(&e));
                }
            }
        }
        Ok(RedisInfo::parse(&text))
    }

    /// Writes the script call for `events` without waiting for Redis to run it, so the caller
    /// can do other work meanwhile; `receive` must come next on this connection. `epoch` names
    /// the outbox (see `Event::dedupe_bucket`), `ttl_secs` is how long dedupe records live. An Err from either means the batch as a whole failed (no
    /// connection, timeout): nothing is known to be delivered.
    pub fn send(&mut self, events: &[Event], epoch: &str, ttl_secs: i64) -> Result<(), String> {
        let (conn, sha) = self.connect()?;
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(sha.as_str()).arg(events.len() * 2);
        for e in events {
            cmd.arg(e.dedupe_bucket(epoch)).arg(&e.route.key);
        }
        cmd.arg(ttl_secs.max(1));
        for e in events {
            cmd.arg(e.dedupe_field());
            match &e.route.target {
                Target::Stream { maxlen } => {
                    let fields = e.fields();
                    cmd.arg("stream")
                        .arg(maxlen.map(|m| m.to_string()).unwrap_or_default())
                        .arg(fields.len() * 2);
                    for (k, v) in fields {
                        cmd.arg(k).arg(v);
                    }
                }
                Target::List => {
                    cmd.arg("list").arg("").arg(1).arg(e.message());
                }
                Target::PubSub => {
                    cmd.arg("pubsub").arg("").arg(1).arg(e.message());
                }
            }
        }
        let sent = conn.send_packed_command(&cmd.get_packed_command());
        sent.map_err(|e| {
            self.disconnect();
            describe(&e)
        })
    }

    /// Reads the answer to the last `send` of `expected` events.
    pub fn receive(&mut self, expected: usize) -> Result<Vec<Outcome>, String> {
        let (conn, _) = self.connect_existing()?;
        let reply = conn.recv_response().and_then(|v| v.extract_error());
        let replies = match reply {
            Ok(redis::Value::Array(r)) => r,
            Ok(other) => {
                self.disconnect();
                let text: String = format!("{other:?}").chars().take(200).collect();
                return Err(format!("unexpected answer from redis: {text}"));
            }
            Err(e) if e.code().is_some_and(|c| TRANSIENT_CODES.contains(&c)) => {
                // Redis refused the whole call (OOM, READONLY, NOSCRIPT after SCRIPT FLUSH...):
                // not the events' fault. Reconnecting reloads the script.
                self.disconnect();
                let message = describe(&e);
                return Ok((0..expected)
                    .map(|_| Outcome::Transient(message.clone()))
                    .collect());
            }
            Err(e) => {
                self.disconnect();
                return Err(describe(&e));
            }
        };
        if replies.len() != expected {
            self.disconnect();
            return Err(format!(
                "redis answered {} results for {} events",
                replies.len(),
                expected
            ));
        }
        Ok(replies
            .into_iter()
            .map(|v| match v {
                redis::Value::Int(_) => Outcome::Delivered,
                redis::Value::BulkString(b) => refusal(&String::from_utf8_lossy(&b)),
                redis::Value::SimpleString(s) => refusal(&s),
                other => Outcome::Permanent(format!("unexpected reply {other:?}")),
            })
            .collect())
    }

    fn connect_existing(&mut self) -> Result<&mut (redis::Connection, String), String> {
        self.conn
            .as_mut()
            .ok_or_else(|| "connection lost before the answer".to_string())
    }
}

/// An event's own refusal ("WRONGTYPE Operation against a key ..."), classified by its code.
fn refusal(text: &str) -> Outcome {
    let code = text.split_whitespace().next().unwrap_or("");
    let message: String = text.chars().take(300).collect();
    if TRANSIENT_CODES.contains(&code) {
        Outcome::Transient(message)
    } else {
        Outcome::Permanent(message)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_is_read_line_by_line() {
        let text =
            "# Memory\r\nused_memory:1048576\r\nmaxmemory:0\r\nmaxmemory_policy:allkeys-lru\r\n\
                    # Stats\r\nevicted_keys:7\r\nbogus\r\n# Replication\r\nrole:slave\r\n";
        let info = RedisInfo::parse(text);
        assert_eq!(info.used_memory, 1_048_576);
        assert_eq!(info.maxmemory, 0);
        assert_eq!(info.maxmemory_policy, "allkeys-lru");
        assert_eq!(info.evicted_keys, 7);
        assert_eq!(info.role, "slave");
        let lying = RedisInfo::parse(&format!("role:{}\nused_memory:lots", "x".repeat(10_000)));
        assert_eq!(lying.role.len(), 64);
        assert_eq!(lying.used_memory, 0);
    }
}
