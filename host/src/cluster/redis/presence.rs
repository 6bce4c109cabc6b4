//! Presence in Redis: FreeIM's keys through [`ImHelper`], plus this node's own
//! records (see [`super::scripts`]; on a Redis Cluster, [`super::buckets`]).
//!
//! The node also keeps, in memory, the truth about its own sockets. Writes to
//! Redis can fail (Redis restarting); a failed write marks the records dirty
//! and the liveness task rewrites them from that truth ([`RedisPresence::resync`]).
//! Connect and disconnect writes hold a read lock on a gate that a resync takes
//! for writing, so a resync never interleaves with them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use imhost_client::ClientId;
use imhost_client::api::ChannelInfo;
use imhost_client::helper::{HelperError, ImHelper};
use imhost_client::wire::{Keys, TokenValue};
use redis::AsyncCommands;
use tokio::sync::{Notify, RwLock};

use super::buckets::BucketRecords;
use super::channel_cache::ChannelCache;
use super::scripts;
use crate::cluster::{ClusterError, Presence, TokenClaim, Topology};

fn unavailable(err: impl std::fmt::Display) -> ClusterError {
    ClusterError::Unavailable(err.to_string())
}

impl From<HelperError> for ClusterError {
    fn from(err: HelperError) -> Self {
        unavailable(err)
    }
}

impl From<redis::RedisError> for ClusterError {
    fn from(err: redis::RedisError) -> Self {
        unavailable(err)
    }
}

/// Where a node's status report lives (imhost's own key, beside FreeIM's).
fn status_key(keys: &Keys, server: &str) -> String {
    format!("{}Status{server}", keys.prefix())
}

/// One client's sockets on this node.
struct LocalClient {
    sockets: u64,
    /// Token value JSON, for `NodeMeta` and offline events.
    value: String,
}

pub struct RedisPresence {
    pub(super) helper: ImHelper,
    pub(super) me: String,
    pub(super) cache: ChannelCache,
    /// The truth about this node's sockets, whatever Redis says.
    local: Mutex<HashMap<ClientId, LocalClient>>,
    /// Held for reading by connect/disconnect writes, for writing by a resync.
    gate: RwLock<()>,
    /// Redis may disagree with `local`: a resync is due.
    dirty: AtomicBool,
    /// This node was found reaped while alive: the resync announces its
    /// clients online again (and on a cluster takes a new incarnation).
    reaped_alive: AtomicBool,
    /// Wakes the liveness task when a resync became due.
    pub(super) resync_due: Notify,
    /// This node's records on a Redis Cluster (`None` on one Redis).
    buckets: Option<BucketRecords>,
}

impl RedisPresence {
    /// `node_ttl`: how long this node's liveness key lives unrefreshed.
    pub fn new(helper: ImHelper, me: String, node_ttl: Duration) -> Self {
        let buckets = helper.keys().is_cluster().then(|| {
            BucketRecords::new(
                helper.connection(),
                helper.keys().clone(),
                me.clone(),
                node_ttl,
            )
        });
        Self {
            buckets,
            helper,
            me,
            cache: ChannelCache::default(),
            local: Mutex::default(),
            gate: RwLock::new(()),
            dirty: AtomicBool::new(false),
            reaped_alive: AtomicBool::new(false),
            resync_due: Notify::new(),
        }
    }

    pub fn keys(&self) -> &Keys {
        self.helper.keys()
    }

    fn conn(&self) -> imhost_client::conn::RedisConn {
        self.helper.connection()
    }

    /// Asks for a resync (Redis reconnected, or a write failed).
    pub fn mark_dirty(&self) {
        self.dirty.store(true, Ordering::SeqCst);
        self.resync_due.notify_one();
    }

    /// Takes the dirty flag.
    pub fn take_dirty(&self) -> bool {
        self.dirty.swap(false, Ordering::SeqCst)
    }

    fn write_failed(&self, err: redis::RedisError) -> ClusterError {
        self.mark_dirty();
        err.into()
    }

    /// Rewrites this node's records in Redis from its sockets.
    ///
    /// # Errors
    /// Redis failed (the records stay dirty).
    pub async fn resync(&self) -> Result<(), ClusterError> {
        let _exclusive = self.gate.write().await;
        if let Some(buckets) = &self.buckets {
            let local: HashMap<ClientId, (u64, String)> = {
                let local = self.local.lock().unwrap_or_else(|p| p.into_inner());
                local
                    .iter()
                    .map(|(id, c)| (*id, (c.sockets, c.value.clone())))
                    .collect()
            };
            let reaped = self.reaped_alive.swap(false, Ordering::SeqCst);
            return buckets
                .resync(&local, reaped)
                .await
                .map_err(|err| self.write_failed(err));
        }
        let keys = self.keys();
        let mut invocation = scripts::RESYNC.prepare_invoke();
        invocation
            .key(keys.node_online(&self.me))
            .key(keys.node_meta(&self.me))
            .key(keys.online(0))
            .key(keys.list_chan(""))
            .arg(keys.prefix())
            .arg(if self.reaped_alive.swap(false, Ordering::SeqCst) {
                keys.online_event()
            } else {
                String::new()
            });
        {
            let local = self.local.lock().unwrap_or_else(|p| p.into_inner());
            for (id, client) in local.iter() {
                invocation.arg(id).arg(client.sockets).arg(&client.value);
            }
        }
        let mut conn = self.conn();
        match invocation.invoke_async::<i64>(&mut conn).await {
            Ok(_) => Ok(()),
            Err(err) => Err(self.write_failed(err)),
        }
    }

    /// Starts this node's run: undoes its records from before a restart and
    /// writes its liveness key. Returns how many clients were reaped.
    ///
    /// # Errors
    /// Redis failed.
    pub async fn begin(&self, ttl: Duration) -> Result<u64, ClusterError> {
        if let Some(buckets) = &self.buckets {
            return Ok(buckets.begin().await?);
        }
        let reaped = self.reap_records(&self.me, true).await?;
        self.write_alive(ttl).await?;
        Ok(reaped)
    }

    /// Undoes the presence of node `node` if it is dead. Returns how many
    /// clients were reaped.
    ///
    /// # Errors
    /// Redis failed.
    pub async fn reap(&self, node: &str) -> Result<u64, ClusterError> {
        if let Some(buckets) = &self.buckets {
            return Ok(buckets.reap(node).await?);
        }
        self.reap_records(node, false).await
    }

    /// One Redis: undoes node `node`'s records if it is dead, or
    /// unconditionally with `force` (this node's own, from before a restart).
    async fn reap_records(&self, node: &str, force: bool) -> Result<u64, ClusterError> {
        let keys = self.keys();
        let mut conn = self.conn();
        let reaped: i64 = scripts::REAP
            .key(keys.node_online(node))
            .key(keys.node_meta(node))
            .key(keys.online(0))
            .key(keys.list_chan(""))
            .key(keys.node_alive(node))
            .arg(keys.prefix())
            .arg(keys.offline_event())
            .arg(if force { "1" } else { "0" })
            .invoke_async(&mut conn)
            .await?;
        Ok(reaped.max(0) as u64)
    }

    /// Says this node is alive for `ttl`. A node whose key had expired may
    /// have been reaped by the others (it was late beyond `ttl`): its
    /// records are rewritten, and its clients announced online again.
    ///
    /// # Errors
    /// Redis failed.
    pub async fn refresh_alive(&self, ttl: Duration) -> Result<(), ClusterError> {
        let current = match &self.buckets {
            Some(buckets) => buckets.refresh_alive().await?,
            None => self.write_alive(ttl).await?,
        };
        if !current {
            tracing::warn!(
                "this node's liveness key had expired (it was late beyond node_ttl); rewriting its records"
            );
            self.reaped_alive.store(true, Ordering::SeqCst);
            self.mark_dirty();
        }
        Ok(())
    }

    /// One Redis: writes the liveness key; `false` when it had expired.
    async fn write_alive(&self, ttl: Duration) -> Result<bool, ClusterError> {
        let existed: i64 = scripts::ALIVE
            .key(self.keys().node_alive(&self.me))
            .arg(ttl.as_millis().max(1) as u64)
            .invoke_async(&mut self.conn())
            .await?;
        Ok(existed == 1)
    }

    /// Withdraws this node's liveness key (graceful stop).
    ///
    /// # Errors
    /// Redis failed.
    pub async fn withdraw(&self) -> Result<(), ClusterError> {
        let mut conn = self.conn();
        let _: i64 = conn.del(self.keys().node_alive(&self.me)).await?;
        Ok(())
    }
}

#[async_trait]
impl Presence for RedisPresence {
    async fn ping(&self) -> Result<(), ClusterError> {
        let mut conn = self.helper.connection();
        let _: String = redis::cmd("PING").query_async(&mut conn).await?;
        Ok(())
    }

    async fn publish_status(&self, report: &str, ttl: Duration) -> Result<(), ClusterError> {
        let key = status_key(self.helper.keys(), &self.me);
        let mut conn = self.helper.connection();
        let _: () = conn.set_ex(key, report, ttl.as_secs().max(1)).await?;
        Ok(())
    }

    async fn statuses(&self, servers: &[String]) -> Result<Vec<Option<String>>, ClusterError> {
        if servers.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = servers
            .iter()
            .map(|s| status_key(self.helper.keys(), s))
            .collect();
        let mut conn = self.helper.connection();
        // MGET, not GET, even for one key: the answer is always a list.
        let reports: Vec<Option<String>> =
            redis::cmd("MGET").arg(&keys).query_async(&mut conn).await?;
        Ok(reports)
    }

    async fn issue_token(&self, value: &TokenValue, ttl: Duration) -> Result<String, ClusterError> {
        let token = crate::token::new_connect_token();
        self.helper.issue_token(value, &token, ttl).await?;
        Ok(token)
    }

    async fn take_token(
        &self,
        token: &str,
        topology: &Topology,
    ) -> Result<TokenClaim, ClusterError> {
        let key = self.keys().token(token);
        let mut conn = self.conn();
        // Look first, take second: a misdirected terminal must not burn its token.
        let Some(text): Option<String> = conn.get(&key).await? else {
            return Ok(TokenClaim::Unknown);
        };
        let Ok(value) = serde_json::from_str::<TokenValue>(&text) else {
            return Ok(TokenClaim::Unknown);
        };
        if !topology.is_mine(value.client_id) {
            let owner = topology.node_for(value.client_id).to_owned();
            return Ok(TokenClaim::Misdirected { owner });
        }
        let taken: Option<String> = conn.get_del(&key).await?;
        Ok(match taken {
            Some(_) => TokenClaim::Taken(value),
            None => TokenClaim::Unknown,
        })
    }

    async fn connected(&self, client: &TokenValue) -> Result<u64, ClusterError> {
        let _shared = self.gate.read().await;
        let value = serde_json::to_string(client).unwrap_or_default();
        {
            let mut local = self.local.lock().unwrap_or_else(|p| p.into_inner());
            let entry = local.entry(client.client_id).or_insert(LocalClient {
                sockets: 0,
                value: String::new(),
            });
            entry.sockets += 1;
            entry.value.clone_from(&value);
        }
        if let Some(buckets) = &self.buckets {
            return buckets
                .connected(client.client_id, &value)
                .await
                .map_err(|e| self.write_failed(e));
        }
        let keys = self.keys();
        let mut conn = self.conn();
        let count = scripts::CONNECTED
            .key(keys.online(0))
            .key(keys.node_online(&self.me))
            .key(keys.node_meta(&self.me))
            .arg(client.client_id)
            .arg(value)
            .invoke_async::<i64>(&mut conn)
            .await
            .map_err(|e| self.write_failed(e))?;
        Ok(count.max(0) as u64)
    }

    async fn disconnected(&self, client: &TokenValue) -> Result<u64, ClusterError> {
        let _shared = self.gate.read().await;
        {
            let mut local = self.local.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(entry) = local.get_mut(&client.client_id) {
                entry.sockets = entry.sockets.saturating_sub(1);
                if entry.sockets == 0 {
                    local.remove(&client.client_id);
                }
            }
        }
        if let Some(buckets) = &self.buckets {
            return buckets
                .disconnected(client.client_id)
                .await
                .map_err(|e| self.write_failed(e));
        }
        let keys = self.keys();
        let mut conn = self.conn();
        let left = scripts::DISCONNECTED
            .key(keys.online(0))
            .key(keys.node_online(&self.me))
            .key(keys.node_meta(&self.me))
            .key(keys.list_chan(""))
            .arg(client.client_id)
            .arg(keys.prefix())
            .invoke_async::<i64>(&mut conn)
            .await
            .map_err(|e| self.write_failed(e))?;
        Ok(left.max(0) as u64)
    }

    async fn connections(&self, client: ClientId) -> Result<u64, ClusterError> {
        Ok(self.helper.online_count(client).await?)
    }

    async fn online(&self) -> Result<Vec<ClientId>, ClusterError> {
        let mut ids = self.helper.get_client_list_by_online().await?;
        ids.sort_unstable();
        Ok(ids)
    }

    async fn join(&self, chan: &str, clients: &[ClientId]) -> Result<(), ClusterError> {
        self.helper.join_chan(chan, clients).await?;
        self.cache.invalidate(chan);
        Ok(())
    }

    async fn leave(&self, chan: &str, clients: &[ClientId]) -> Result<(), ClusterError> {
        self.helper.leave_chan(chan, clients).await?;
        self.cache.invalidate(chan);
        Ok(())
    }

    async fn members(&self, chan: &str) -> Result<Vec<ClientId>, ClusterError> {
        let mut ids = self.helper.get_chan_client_list(chan).await?;
        ids.sort_unstable();
        Ok(ids)
    }

    async fn delivery_members(&self, chan: &str) -> Result<Arc<[ClientId]>, ClusterError> {
        let epoch = match self.cache.get(chan) {
            Ok(members) => return Ok(members),
            Err(epoch) => epoch,
        };
        let members: Arc<[ClientId]> = self.helper.get_chan_client_list(chan).await?.into();
        if let Some(epoch) = epoch {
            self.cache.fill(chan, members.clone(), epoch);
        }
        Ok(members)
    }

    async fn channels(&self) -> Result<Vec<ChannelInfo>, ClusterError> {
        Ok(self
            .helper
            .get_chan_list()
            .await?
            .into_iter()
            .map(|(channel, online)| ChannelInfo {
                channel,
                online: online.max(0) as u64,
            })
            .collect())
    }

    async fn channels_of(&self, client: ClientId) -> Result<Vec<String>, ClusterError> {
        Ok(self.helper.get_chan_list_by_client_id(client).await?)
    }
}
