//! What an outbox event becomes in Redis, as plain data: the target, the dedupe key, and the
//! stream fields or message. No Postgres and no network here, so it is unit-tested directly.

/// Event ids per Redis dedupe hash. Below Redis' default `hash-max-listpack-entries` (128)
/// counting a replay or two, so a block stays in the compact encoding.
pub const DEDUPE_BLOCK: i64 = 100;

/// One committed outbox row, as the dispatcher reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub id: i64,
    pub topic: String,
    pub aggregate_id: Option<String>,
    pub version: Option<i64>,
    /// JSON text.
    pub payload: String,
    /// JSON text.
    pub headers: Option<String>,
    /// RFC 3339, UTC.
    pub created_at: String,
    pub replays: i32,
    pub route: Route,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    Stream { maxlen: Option<i64> },
    List,
    PubSub,
}

/// The namespace of pg_keel's own Redis keys (the dedupe records).
pub const INTERNAL_PREFIX: &str = "keel#";

#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    pub target: Target,
    pub key: String,
}

impl Route {
    /// The route of `topic` given its row in keel.outbox_routes, if any: by default the
    /// stream `<prefix><topic>` (keel.redis_prefix, `keel:` unless set).
    pub fn resolve(
        topic: &str,
        prefix: &str,
        target: Option<&str>,
        key: Option<String>,
        maxlen: Option<i64>,
    ) -> Route {
        let key = key.unwrap_or_else(|| format!("{prefix}{topic}"));
        let target = match target {
            Some("list") => Target::List,
            Some("pubsub") => Target::PubSub,
            _ => Target::Stream { maxlen },
        };
        Route { target, key }
    }
}

impl Event {
    /// Redis key whose presence means "this event (this replay of it) is already in its target".
    /// The Redis hash that remembers this event was appended: one per block of
    /// `DEDUPE_BLOCK` ids, small enough for Redis' compact encoding (a few bytes per event
    /// instead of a key with its own expiry each).
    /// `epoch` names this outbox (made at CREATE EXTENSION): ids start again at 1 in a
    /// re-created or restored outbox, and must not be taken for events already sent.
    /// Internal keys live under `keel#`, which no key of a topic can start with: topic names
    /// have no `#`, `keel.redis_prefix` may not contain one, and a route's own key may not start
    /// with `keel#` (`INTERNAL_PREFIX`).
    pub fn dedupe_bucket(&self, epoch: &str) -> String {
        format!(
            "{INTERNAL_PREFIX}dispatched:{epoch}:{}",
            self.id.div_euclid(DEDUPE_BLOCK)
        )
    }

    /// This event's field in its bucket; a replay gets a new one, so it is appended again.
    pub fn dedupe_field(&self) -> String {
        format!("{}:{}", self.id.rem_euclid(DEDUPE_BLOCK), self.replays)
    }

    /// Stream fields, in a fixed order. Absent values are empty strings, so every entry has
    /// every field.
    pub fn fields(&self) -> Vec<(&'static str, String)> {
        vec![
            ("id", self.id.to_string()),
            ("topic", self.topic.clone()),
            (
                "aggregate_id",
                self.aggregate_id.clone().unwrap_or_default(),
            ),
            (
                "version",
                self.version.map(|v| v.to_string()).unwrap_or_default(),
            ),
            ("payload", self.payload.clone()),
            ("headers", self.headers.clone().unwrap_or_default()),
            ("created_at", self.created_at.clone()),
        ]
    }

    /// The message pushed to a list or published on a channel: one JSON object with the same
    /// fields (payload and headers embedded as JSON, not strings).
    pub fn message(&self) -> String {
        let quote = |s: &str| {
            let mut out = String::with_capacity(s.len() + 2);
            out.push('"');
            for c in s.chars() {
                match c {
                    '"' => out.push_str("\\\""),
                    '\\' => out.push_str("\\\\"),
                    c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
                    c => out.push(c),
                }
            }
            out.push('"');
            out
        };
        let opt_str = |v: &Option<String>| v.as_deref().map(quote).unwrap_or_else(|| "null".into());
        format!(
            "{{\"id\":{},\"topic\":{},\"aggregate_id\":{},\"version\":{},\"payload\":{},\"headers\":{},\"created_at\":{}}}",
            self.id,
            quote(&self.topic),
            opt_str(&self.aggregate_id),
            self.version.map(|v| v.to_string()).unwrap_or_else(|| "null".into()),
            self.payload,
            self.headers.as_deref().unwrap_or("null"),
            quote(&self.created_at),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> Event {
        Event {
            id: 42,
            topic: "orders".into(),
            aggregate_id: Some("order-\"7\"".into()),
            version: Some(3),
            payload: "{\"total\": 10}".into(),
            headers: None,
            created_at: "2026-11-26T10:00:00.000001Z".into(),
            replays: 0,
            route: Route::resolve("orders", "keel:", None, None, None),
        }
    }

    #[test]
    fn default_route_is_the_topic_stream() {
        assert_eq!(
            event().route,
            Route {
                target: Target::Stream { maxlen: None },
                key: "keel:orders".into()
            }
        );
        assert_eq!(
            Route::resolve("t", "keel:", Some("list"), Some("q".into()), None).target,
            Target::List
        );
        assert_eq!(
            Route::resolve("t", "keel:", Some("pubsub"), None, None).key,
            "keel:t"
        );
        assert_eq!(
            Route::resolve("t", "app1:", None, None, None).key,
            "app1:t",
            "keel.redis_prefix names the default key"
        );
    }

    #[test]
    fn every_field_is_present_in_order() {
        let names: Vec<&str> = event().fields().iter().map(|(k, _)| *k).collect();
        assert_eq!(
            names,
            [
                "id",
                "topic",
                "aggregate_id",
                "version",
                "payload",
                "headers",
                "created_at"
            ]
        );
        let mut e = event();
        e.aggregate_id = None;
        e.version = None;
        assert_eq!(e.fields()[2].1, "");
        assert_eq!(e.fields()[3].1, "");
    }

    #[test]
    fn message_is_json_with_escaped_strings() {
        assert_eq!(
            event().message(),
            "{\"id\":42,\"topic\":\"orders\",\"aggregate_id\":\"order-\\\"7\\\"\",\"version\":3,\
             \"payload\":{\"total\": 10},\"headers\":null,\"created_at\":\"2026-11-26T10:00:00.000001Z\"}"
        );
    }

    #[test]
    fn replays_get_their_own_dedupe_key() {
        let mut e = event();
        let first = (e.dedupe_bucket("ab12"), e.dedupe_field());
        e.replays = 1;
        assert_eq!(first.0, e.dedupe_bucket("ab12"));
        assert_ne!(first.1, e.dedupe_field());
    }

    #[test]
    fn dedupe_blocks_group_neighbouring_ids() {
        let at = |id| {
            let mut e = event();
            e.id = id;
            (e.dedupe_bucket("ab12"), e.dedupe_field())
        };
        assert_eq!(at(0), ("keel#dispatched:ab12:0".into(), "0:0".into()));
        assert_eq!(at(99), ("keel#dispatched:ab12:0".into(), "99:0".into()));
        assert_eq!(at(100), ("keel#dispatched:ab12:1".into(), "0:0".into()));
        assert_eq!(
            at(12345),
            ("keel#dispatched:ab12:123".into(), "45:0".into())
        );
    }
}
