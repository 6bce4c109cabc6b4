//! The key-value store plugins get through the `host` interface: small values
//! with TTLs and atomic increments, namespaced per plugin by the caller. In
//! memory when embedded; in Redis when clustered, so state such as rate-limit
//! counters is shared by every node.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use imhost_client::conn::RedisConn;
use imhost_client::wire::Keys;
use tokio::time::Instant;

use super::ClusterError;

/// Keys the in-memory store holds at most (a plugin bug must not eat the node).
const EMBEDDED_MAX_KEYS: usize = 100_000;

#[async_trait]
pub trait PluginKv: Send + Sync {
    async fn get(&self, key: &str) -> Result<Option<String>, ClusterError>;
    /// `ttl` `None`: no expiry.
    async fn set(&self, key: &str, value: &str, ttl: Option<Duration>) -> Result<(), ClusterError>;
    /// Adds `delta`; the TTL is set when the key has none (fixed windows).
    async fn incr(&self, key: &str, delta: i64, ttl: Option<Duration>)
    -> Result<i64, ClusterError>;
    async fn delete(&self, key: &str) -> Result<(), ClusterError>;
}

#[derive(Default)]
pub struct EmbeddedKv {
    // std Mutex: each operation is one map access, never across an .await.
    entries: Mutex<HashMap<String, (String, Option<Instant>)>>,
}

impl EmbeddedKv {
    fn with<R>(&self, f: impl FnOnce(&mut HashMap<String, (String, Option<Instant>)>) -> R) -> R {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut entries)
    }
}

fn live(entry: &(String, Option<Instant>), now: Instant) -> bool {
    entry.1.is_none_or(|expires| expires > now)
}

fn full(
    entries: &mut HashMap<String, (String, Option<Instant>)>,
    key: &str,
) -> Result<(), ClusterError> {
    if entries.len() >= EMBEDDED_MAX_KEYS && !entries.contains_key(key) {
        let now = Instant::now();
        entries.retain(|_, e| live(e, now));
        if entries.len() >= EMBEDDED_MAX_KEYS {
            return Err(ClusterError::Unavailable(
                "plugin key-value store is full".into(),
            ));
        }
    }
    Ok(())
}

#[async_trait]
impl PluginKv for EmbeddedKv {
    async fn get(&self, key: &str) -> Result<Option<String>, ClusterError> {
        let now = Instant::now();
        Ok(self.with(|e| e.get(key).filter(|v| live(v, now)).map(|v| v.0.clone())))
    }

    async fn set(&self, key: &str, value: &str, ttl: Option<Duration>) -> Result<(), ClusterError> {
        let expires = ttl.map(|t| Instant::now() + t);
        self.with(|e| {
            full(e, key)?;
            e.insert(key.to_owned(), (value.to_owned(), expires));
            Ok(())
        })
    }

    async fn incr(
        &self,
        key: &str,
        delta: i64,
        ttl: Option<Duration>,
    ) -> Result<i64, ClusterError> {
        let now = Instant::now();
        self.with(|e| {
            full(e, key)?;
            let entry = e
                .entry(key.to_owned())
                .or_insert_with(|| ("0".into(), None));
            if !live(entry, now) {
                *entry = ("0".into(), None);
            }
            let current: i64 = entry
                .0
                .parse()
                .map_err(|_| ClusterError::Unavailable("value is not an integer".into()))?;
            let next = current.saturating_add(delta);
            entry.0 = next.to_string();
            if entry.1.is_none() {
                entry.1 = ttl.map(|t| now + t);
            }
            Ok(next)
        })
    }

    async fn delete(&self, key: &str) -> Result<(), ClusterError> {
        self.with(|e| e.remove(key));
        Ok(())
    }
}

/// Keys live under `{prefix}Plugin{key}`.
pub struct RedisKv {
    conn: RedisConn,
    keys: Keys,
}

impl RedisKv {
    pub fn new(conn: RedisConn, keys: Keys) -> Self {
        Self { conn, keys }
    }

    fn key(&self, key: &str) -> String {
        self.keys.plugin(key)
    }
}

fn unavailable(err: redis::RedisError) -> ClusterError {
    ClusterError::Unavailable(err.to_string())
}

const INCR_WITH_TTL: &str = r"
local v = redis.call('INCRBY', KEYS[1], ARGV[1])
if tonumber(ARGV[2]) > 0 and redis.call('PTTL', KEYS[1]) == -1 then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return v";

#[async_trait]
impl PluginKv for RedisKv {
    async fn get(&self, key: &str) -> Result<Option<String>, ClusterError> {
        let mut conn = self.conn.clone();
        redis::cmd("GET")
            .arg(self.key(key))
            .query_async(&mut conn)
            .await
            .map_err(unavailable)
    }

    async fn set(&self, key: &str, value: &str, ttl: Option<Duration>) -> Result<(), ClusterError> {
        let mut conn = self.conn.clone();
        let mut cmd = redis::cmd("SET");
        cmd.arg(self.key(key)).arg(value);
        if let Some(ttl) = ttl {
            cmd.arg("PX").arg(ttl.as_millis().max(1) as u64);
        }
        cmd.query_async(&mut conn).await.map_err(unavailable)
    }

    async fn incr(
        &self,
        key: &str,
        delta: i64,
        ttl: Option<Duration>,
    ) -> Result<i64, ClusterError> {
        let mut conn = self.conn.clone();
        redis::Script::new(INCR_WITH_TTL)
            .key(self.key(key))
            .arg(delta)
            .arg(ttl.map_or(0, |t| t.as_millis().max(1) as u64))
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)
    }

    async fn delete(&self, key: &str) -> Result<(), ClusterError> {
        let mut conn = self.conn.clone();
        let _: i64 = redis::cmd("DEL")
            .arg(self.key(key))
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn counters_keep_their_first_ttl() {
        let kv = EmbeddedKv::default();
        let ttl = Some(Duration::from_secs(1));
        assert_eq!(kv.incr("a", 1, ttl).await.expect("incr"), 1);
        tokio::time::advance(Duration::from_millis(600)).await;
        assert_eq!(kv.incr("a", 1, ttl).await.expect("incr"), 2);
        tokio::time::advance(Duration::from_millis(600)).await;
        assert_eq!(
            kv.incr("a", 1, ttl).await.expect("incr"),
            1,
            "window restarted"
        );
        kv.set("b", "x", None).await.expect("set");
        assert_eq!(kv.get("b").await.expect("get").as_deref(), Some("x"));
        kv.delete("b").await.expect("delete");
        assert_eq!(kv.get("b").await.expect("get"), None);
    }
}
