//! The Redis side of dispatch: one connection (`resp`: every reply bounded in bytes and in
//! time, TLS for rediss://, an ACL user and a password from the URL or a file) and a
//! Lua script that appends an event only if its dedupe key is absent, then sets that key for
//! the retention window. A batch is one script call. Never called inside a transaction or while
//! holding a lock (see `dispatch`).

use std::time::Duration;

use super::entry::{Event, Target};
use super::resp::{self, Command, Conn, Limits, Tls, Value};

/// Connect, read and write timeout for every Redis call.
pub const IO_TIMEOUT: Duration = Duration::from_secs(1);

/// The most one reply (or the sending of one batch) may take in all, however the server
/// paces its bytes.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

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
    conn: Option<(Conn, String)>,
}

/// What one connection to Redis may take: replies are small here (a script's sha, INFO, one
/// integer or error per event of a batch of at most 100,000), so 8 MiB is plenty and
/// anything bigger is hostile.
fn limits() -> Limits {
    Limits {
        max_reply_bytes: 8 * 1024 * 1024,
        max_elements: 200_000,
        max_depth: 4,
        connect_timeout: IO_TIMEOUT,
        io_timeout: IO_TIMEOUT,
        reply_timeout: REPLY_TIMEOUT,
    }
}

/// The TLS settings (for rediss:// URLs), from keel.redis_tls_*.
fn tls() -> Tls {
    let path = |s: Option<String>| s.filter(|p| !p.is_empty()).map(std::path::PathBuf::from);
    Tls {
        ca_file: path(crate::guc::text(&crate::guc::REDIS_TLS_CA_FILE)),
        verify: crate::guc::REDIS_TLS_VERIFY.get(),
        cert_file: path(crate::guc::text(&crate::guc::REDIS_TLS_CERT_FILE)),
        key_file: path(crate::guc::text(&crate::guc::REDIS_TLS_KEY_FILE)),
    }
}

/// The most a password file may hold.
const MAX_PASSWORD_FILE: u64 = 4096;

/// The password in keel.redis_password_file (first line), if the setting names a file: the
/// way to keep the secret out of settings that others can read and out of the server log.
/// Relative paths are relative to the data directory. The file must be a regular file that
/// neither its group nor others may access (like a libpq password file).
pub fn password_from_file() -> Result<Option<String>, String> {
    use std::os::unix::fs::PermissionsExt;
    let Some(path) = crate::guc::text(&crate::guc::REDIS_PASSWORD_FILE).filter(|p| !p.is_empty())
    else {
        return Ok(None);
    };
    let meta = std::fs::metadata(&path)
        .map_err(|e| format!("keel.redis_password_file {path:?}: {}", e.kind()))?;
    if !meta.is_file() {
        return Err(format!(
            "keel.redis_password_file {path:?} is not a regular file"
        ));
    }
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(format!(
            "keel.redis_password_file {path:?} may be read by its group or others: chmod 600 it"
        ));
    }
    if meta.len() > MAX_PASSWORD_FILE {
        return Err(format!(
            "keel.redis_password_file {path:?} is larger than 4 kB"
        ));
    }
    let text = std::fs::read(&path)
        .map_err(|e| format!("keel.redis_password_file {path:?}: {}", e.kind()))?;
    let text = String::from_utf8(text)
        .map_err(|_| format!("keel.redis_password_file {path:?} is not UTF-8"))?;
    let line = text.lines().next().unwrap_or("").to_string();
    if line.is_empty() {
        return Err(format!("keel.redis_password_file {path:?} is empty"));
    }
    Ok(Some(line))
}

/// Whether keel.redis_url carries a password (`keel.health()` warns: see
/// `password_from_file`).
#[pgrx::pg_extern(stable, parallel_safe, name = "_redis_url_has_password")]
fn redis_url_has_password() -> bool {
    crate::guc::text(&crate::guc::REDIS_URL)
        .and_then(|url| resp::parse_url(&url).ok())
        .is_some_and(|u| u.password.is_some_and(|p| !p.is_empty()))
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

    fn connect(&mut self) -> Result<&mut (Conn, String), String> {
        if self.conn.is_none() {
            let mut url = resp::parse_url(&self.url)?;
            if let Some(password) = password_from_file()? {
                url.password = Some(password);
            }
            let mut conn = Conn::connect(&url, &tls(), limits())?;
            let sha = match conn.call(&[b"SCRIPT", b"LOAD", APPEND_ONCE.as_bytes()])? {
                Value::Bulk(sha) if sha.len() <= 64 => String::from_utf8_lossy(&sha).into_owned(),
                Value::Error(e) => return Err(cut(&e)),
                other => {
                    return Err(format!(
                        "unexpected answer to SCRIPT LOAD: {}",
                        other.describe()
                    ))
                }
            };
            self.conn = Some((conn, sha));
        }
        self.conn
            .as_mut()
            .ok_or_else(|| "not connected".to_string())
    }

    /// One command and its reply, connecting first if needed; a connection that failed is
    /// dropped (the next call connects again).
    fn call(&mut self, args: &[&[u8]]) -> Result<Value, String> {
        let (conn, _) = self.connect()?;
        let reply = conn.call(args);
        if reply.is_err() {
            self.disconnect();
        }
        reply
    }

    /// Round trip time of a PING, connecting first if needed.
    pub fn ping(&mut self) -> Result<Duration, String> {
        let started = std::time::Instant::now();
        match self.call(&[b"PING"])? {
            Value::Simple(_) | Value::Bulk(_) => Ok(started.elapsed()),
            Value::Error(e) => {
                self.disconnect();
                Err(cut(&e))
            }
            other => {
                self.disconnect();
                Err(format!("unexpected answer to PING: {}", other.describe()))
            }
        }
    }

    /// What `keel.health()` reports of this Redis: memory, evictions, role, eviction policy
    /// (`INFO memory`, `stats`, `replication`: one section per call, as every version takes).
    pub fn info(&mut self) -> Result<RedisInfo, String> {
        let mut text = String::new();
        for section in ["memory", "stats", "replication"] {
            match self.call(&[b"INFO", section.as_bytes()])? {
                Value::Bulk(part) => text.push_str(&String::from_utf8_lossy(&part)),
                Value::Error(e) => return Err(cut(&e)),
                other => {
                    self.disconnect();
                    return Err(format!("unexpected answer to INFO: {}", other.describe()));
                }
            }
        }
        Ok(RedisInfo::parse(&text))
    }

    /// Writes the script call for `events` without waiting for Redis to run it, so the caller
    /// can do other work meanwhile; `receive` must come next on this connection. `epoch` names
    /// the outbox (see `Event::dedupe_bucket`), `ttl_secs` is how long dedupe records live. An
    /// Err from either means the batch as a whole failed (no connection, timeout): nothing is
    /// known to be delivered.
    pub fn send(&mut self, events: &[Event], epoch: &str, ttl_secs: i64) -> Result<(), String> {
        let (conn, sha) = self.connect()?;
        let mut cmd = Command::new("EVALSHA");
        cmd.arg(sha.as_bytes()).arg_int(events.len() as i64 * 2);
        for e in events {
            cmd.arg(e.dedupe_bucket(epoch)).arg(&e.route.key);
        }
        cmd.arg_int(ttl_secs.max(1));
        for e in events {
            cmd.arg(e.dedupe_field());
            match &e.route.target {
                Target::Stream { maxlen } => {
                    let fields = e.fields();
                    cmd.arg("stream")
                        .arg(maxlen.map(|m| m.to_string()).unwrap_or_default())
                        .arg_int(fields.len() as i64 * 2);
                    for (k, v) in fields {
                        cmd.arg(k).arg(v);
                    }
                }
                Target::List => {
                    cmd.arg("list").arg("").arg_int(1).arg(e.message());
                }
                Target::PubSub => {
                    cmd.arg("pubsub").arg("").arg_int(1).arg(e.message());
                }
            }
        }
        let sent = conn.send_command(&cmd);
        if sent.is_err() {
            self.disconnect();
        }
        sent
    }

    /// Reads the answer to the last `send` of `expected` events.
    pub fn receive(&mut self, expected: usize) -> Result<Vec<Outcome>, String> {
        let Some((conn, _)) = self.conn.as_mut() else {
            return Err("connection lost before the answer".to_string());
        };
        let replies = match conn.receive() {
            Ok(Value::Array(r)) => r,
            Ok(Value::Error(e)) if TRANSIENT_CODES.contains(&code(&e)) => {
                // Redis refused the whole call (OOM, READONLY, NOSCRIPT after SCRIPT FLUSH...):
                // not the events' fault. Reconnecting reloads the script.
                self.disconnect();
                let message = cut(&e);
                return Ok((0..expected)
                    .map(|_| Outcome::Transient(message.clone()))
                    .collect());
            }
            Ok(Value::Error(e)) => {
                self.disconnect();
                return Err(cut(&e));
            }
            Ok(other) => {
                self.disconnect();
                return Err(format!(
                    "unexpected answer from redis: {}",
                    other.describe()
                ));
            }
            Err(e) => {
                self.disconnect();
                return Err(e);
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
                Value::Int(_) => Outcome::Delivered,
                Value::Error(e) => refusal(&e),
                Value::Bulk(b) => refusal(&String::from_utf8_lossy(&b)),
                Value::Simple(s) => refusal(&s),
                other => Outcome::Permanent(format!("unexpected reply {}", other.describe())),
            })
            .collect())
    }
}

fn code(text: &str) -> &str {
    text.split_whitespace().next().unwrap_or("")
}

fn cut(text: &str) -> String {
    text.chars().take(300).collect()
}

/// An event's own refusal ("WRONGTYPE Operation against a key ..."), classified by its code.
fn refusal(text: &str) -> Outcome {
    let message = cut(text);
    if TRANSIENT_CODES.contains(&code(text)) {
        Outcome::Transient(message)
    } else {
        Outcome::Permanent(message)
    }
}

/// `message` with the password of `url` and of keel.redis_password_file (if any) blanked
/// out, wherever it appears: a last guard, since the client's own errors never carry it.
pub fn scrub(message: &str, url: &str) -> String {
    let mut text = message.to_string();
    let from_url = super::resp::parse_url(url).ok().and_then(|u| u.password);
    let from_file = password_from_file().ok().flatten();
    for secret in [from_url, from_file].into_iter().flatten() {
        if !secret.is_empty() {
            text = text.replace(&secret, "***");
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrub_blanks_the_password_in_any_message() {
        assert_eq!(
            scrub("auth failed for s3cret", "redis://:s3cret@h:1"),
            "auth failed for ***"
        );
        assert_eq!(scrub("refused", "redis://h:1"), "refused");
    }

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
