//! The single-node cluster: an in-process relay and presence store.
//!
//! The relay acts on a message in the caller's task once the node has
//! attached itself ([`EmbeddedRelay::attach`]): the API request that sent it
//! resolves, filters and hands it to the delivery shards on its own core,
//! and learns at once when the node is overloaded. Before that (while the
//! node is being built) messages wait in the dispatcher's bounded inbox.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use imhost_client::ClientId;
use imhost_client::api::ChannelInfo;
use imhost_client::wire::{ServerMessage, TokenValue};
use tokio::sync::{broadcast, mpsc};
use tokio::time::Instant;

use super::{ClusterError, LocalDelivery, Presence, PresenceChange, Relay, TokenClaim, Topology};

/// Relay of a node that is alone: every node is this node.
pub struct EmbeddedRelay {
    inbox: mpsc::Sender<ServerMessage>,
    local: OnceLock<Arc<dyn LocalDelivery>>,
    events: broadcast::Sender<PresenceChange>,
}

impl EmbeddedRelay {
    pub fn new(
        inbox: mpsc::Sender<ServerMessage>,
        events: broadcast::Sender<PresenceChange>,
    ) -> Self {
        Self {
            inbox,
            local: OnceLock::new(),
            events,
        }
    }

    /// From now on, messages are acted on by `local` in the sender's task.
    pub fn attach(&self, local: Arc<dyn LocalDelivery>) {
        let _ = self.local.set(local);
    }
}

#[async_trait]
impl Relay for EmbeddedRelay {
    async fn send(&self, _node: &str, message: ServerMessage) -> Result<(), ClusterError> {
        if let Some(local) = self.local.get() {
            return local.deliver(message).await;
        }
        self.inbox
            .send(message)
            .await
            .map_err(|_| ClusterError::Unavailable("node is shutting down".into()))
    }

    async fn send_all(&self, message: ServerMessage) -> Result<(), ClusterError> {
        self.send("", message).await
    }

    async fn announce(&self, change: PresenceChange) -> Result<(), ClusterError> {
        // No subscriber is not an error: events are fire-and-forget, as in FreeIM.
        let _ = self.events.send(change);
        Ok(())
    }
}

#[derive(Default)]
struct State {
    tokens: HashMap<String, (TokenValue, Instant)>,
    /// Tokens in issue order; with one TTL that is also expiry order, so
    /// purging is popping from the front.
    token_expiry: VecDeque<(Instant, String)>,
    online: HashMap<ClientId, u64>,
    channel_members: HashMap<String, BTreeSet<ClientId>>,
    client_channels: HashMap<ClientId, BTreeSet<String>>,
    /// Member lists handed out for delivery, each kept until its channel's
    /// membership changes: the same list (the same `Arc`) for every message
    /// meanwhile, which lets the registry keep the channel's resolved
    /// audience (see `crate::audience`).
    delivery: HashMap<String, Arc<[ClientId]>>,
}

impl State {
    fn purge_expired_tokens(&mut self, now: Instant) {
        while let Some((expires, _)) = self.token_expiry.front() {
            if *expires > now {
                break;
            }
            if let Some((_, token)) = self.token_expiry.pop_front() {
                self.tokens.remove(&token);
            }
        }
    }

    fn leave(&mut self, chan: &str, client: ClientId) {
        self.delivery.remove(chan);
        if let Some(members) = self.channel_members.get_mut(chan) {
            members.remove(&client);
            if members.is_empty() {
                self.channel_members.remove(chan);
            }
        }
        if let Some(chans) = self.client_channels.get_mut(&client) {
            chans.remove(chan);
            if chans.is_empty() {
                self.client_channels.remove(&client);
            }
        }
    }
}

/// Presence kept in this process's memory.
#[derive(Default)]
pub struct EmbeddedPresence {
    // std Mutex: every operation is a few map updates, never held across .await.
    state: Mutex<State>,
}

impl EmbeddedPresence {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl Presence for EmbeddedPresence {
    async fn issue_token(&self, value: &TokenValue, ttl: Duration) -> Result<String, ClusterError> {
        let token = crate::token::new_connect_token();
        let now = Instant::now();
        let mut state = self.lock();
        state.purge_expired_tokens(now);
        state
            .tokens
            .insert(token.clone(), (value.clone(), now + ttl));
        state.token_expiry.push_back((now + ttl, token.clone()));
        Ok(token)
    }

    async fn take_token(
        &self,
        token: &str,
        topology: &Topology,
    ) -> Result<TokenClaim, ClusterError> {
        let now = Instant::now();
        let mut state = self.lock();
        state.purge_expired_tokens(now);
        let Some((value, expires)) = state.tokens.get(token) else {
            return Ok(TokenClaim::Unknown);
        };
        if *expires <= now {
            return Ok(TokenClaim::Unknown);
        }
        if !topology.is_mine(value.client_id) {
            let owner = topology.node_for(value.client_id).to_owned();
            return Ok(TokenClaim::Misdirected { owner });
        }
        Ok(state
            .tokens
            .remove(token)
            .map_or(TokenClaim::Unknown, |(value, _)| TokenClaim::Taken(value)))
    }

    async fn connected(&self, client: &TokenValue) -> Result<u64, ClusterError> {
        let mut state = self.lock();
        let count = state.online.entry(client.client_id).or_default();
        *count += 1;
        Ok(*count)
    }

    async fn disconnected(&self, client: &TokenValue) -> Result<u64, ClusterError> {
        let client = client.client_id;
        let mut state = self.lock();
        let left = match state.online.get_mut(&client) {
            Some(count) if *count > 1 => {
                *count -= 1;
                *count
            }
            _ => 0,
        };
        if left == 0 {
            state.online.remove(&client);
            let chans = state.client_channels.remove(&client).unwrap_or_default();
            for chan in chans {
                state.leave(&chan, client);
            }
        }
        Ok(left)
    }

    async fn connections(&self, client: ClientId) -> Result<u64, ClusterError> {
        Ok(self.lock().online.get(&client).copied().unwrap_or(0))
    }

    async fn online(&self) -> Result<Vec<ClientId>, ClusterError> {
        let mut ids: Vec<_> = self.lock().online.keys().copied().collect();
        ids.sort_unstable();
        Ok(ids)
    }

    async fn join(&self, chan: &str, clients: &[ClientId]) -> Result<(), ClusterError> {
        let mut state = self.lock();
        state.delivery.remove(chan);
        for &client in clients {
            state
                .channel_members
                .entry(chan.to_owned())
                .or_default()
                .insert(client);
            state
                .client_channels
                .entry(client)
                .or_default()
                .insert(chan.to_owned());
        }
        Ok(())
    }

    async fn leave(&self, chan: &str, clients: &[ClientId]) -> Result<(), ClusterError> {
        let mut state = self.lock();
        for &client in clients {
            state.leave(chan, client);
        }
        Ok(())
    }

    async fn members(&self, chan: &str) -> Result<Vec<ClientId>, ClusterError> {
        Ok(self
            .lock()
            .channel_members
            .get(chan)
            .map(|m| m.iter().copied().collect())
            .unwrap_or_default())
    }

    async fn delivery_members(&self, chan: &str) -> Result<Arc<[ClientId]>, ClusterError> {
        let mut state = self.lock();
        if let Some(members) = state.delivery.get(chan) {
            return Ok(members.clone());
        }
        let Some(members) = state.channel_members.get(chan) else {
            return Ok(Arc::from([]));
        };
        let members: Arc<[ClientId]> = members.iter().copied().collect();
        state.delivery.insert(chan.to_owned(), members.clone());
        Ok(members)
    }

    async fn channels(&self) -> Result<Vec<ChannelInfo>, ClusterError> {
        let mut list: Vec<_> = self
            .lock()
            .channel_members
            .iter()
            .map(|(chan, members)| ChannelInfo {
                channel: chan.clone(),
                online: members.len() as u64,
            })
            .collect();
        list.sort_by(|a, b| a.channel.cmp(&b.channel));
        Ok(list)
    }

    async fn channels_of(&self, client: ClientId) -> Result<Vec<String>, ClusterError> {
        Ok(self
            .lock()
            .client_channels
            .get(&client)
            .map(|c| c.iter().cloned().collect())
            .unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(id: ClientId) -> TokenValue {
        TokenValue {
            client_id: id,
            metadata: None,
        }
    }

    fn single() -> Topology {
        Topology {
            me: "a".into(),
            servers: vec!["a".into()],
        }
    }

    #[tokio::test]
    async fn a_misdirected_token_stays_usable() {
        let p = EmbeddedPresence::new();
        let t = p
            .issue_token(&value(1), Duration::from_secs(10))
            .await
            .expect("issue");
        let b_of_two = Topology {
            me: "b".into(),
            servers: vec!["b".into(), "a".into()],
        };
        assert_eq!(
            p.take_token(&t, &b_of_two).await.expect("take"),
            TokenClaim::Misdirected { owner: "a".into() }
        );
        let a_of_two = Topology {
            me: "a".into(),
            ..b_of_two
        };
        assert_eq!(
            p.take_token(&t, &a_of_two).await.expect("take"),
            TokenClaim::Taken(value(1))
        );
    }

    #[tokio::test]
    async fn a_channels_delivery_list_is_the_same_until_its_membership_changes() {
        let p = EmbeddedPresence::new();
        p.join("a", &[1, 2]).await.expect("join");
        let first = p.delivery_members("a").await.expect("members");
        assert_eq!(&first[..], &[1, 2]);
        let again = p.delivery_members("a").await.expect("members");
        assert!(Arc::ptr_eq(&first, &again));
        p.join("b", &[3]).await.expect("join");
        assert!(Arc::ptr_eq(
            &first,
            &p.delivery_members("a").await.expect("a")
        ));

        p.join("a", &[3]).await.expect("join");
        let joined = p.delivery_members("a").await.expect("members");
        assert_eq!(&joined[..], &[1, 2, 3]);
        p.leave("a", &[1]).await.expect("leave");
        assert_eq!(&p.delivery_members("a").await.expect("a")[..], &[2, 3]);
        // A member's last connection going takes it out of its channels.
        p.connected(&value(2)).await.expect("connected");
        p.disconnected(&value(2)).await.expect("disconnected");
        assert_eq!(&p.delivery_members("a").await.expect("a")[..], &[3]);
        assert!(p.delivery_members("none").await.expect("none").is_empty());
    }

    #[tokio::test]
    async fn tokens_are_single_use() {
        let p = EmbeddedPresence::new();
        let t = p
            .issue_token(&value(1), Duration::from_secs(10))
            .await
            .expect("issue");
        assert_eq!(
            p.take_token(&t, &single()).await.expect("take"),
            TokenClaim::Taken(value(1))
        );
        assert_eq!(
            p.take_token(&t, &single()).await.expect("take"),
            TokenClaim::Unknown
        );
    }

    #[tokio::test(start_paused = true)]
    async fn tokens_expire() {
        let p = EmbeddedPresence::new();
        let t = p
            .issue_token(&value(1), Duration::from_secs(10))
            .await
            .expect("issue");
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(
            p.take_token(&t, &single()).await.expect("take"),
            TokenClaim::Unknown
        );
        assert!(p.lock().tokens.is_empty(), "expired token purged");
    }

    #[tokio::test]
    async fn last_device_leaving_leaves_channels() {
        let p = EmbeddedPresence::new();
        p.join("room", &[1, 2]).await.expect("join");
        assert_eq!(p.connected(&value(1)).await.expect("c"), 1);
        assert_eq!(p.connected(&value(1)).await.expect("c"), 2);
        assert_eq!(p.disconnected(&value(1)).await.expect("d"), 1);
        assert_eq!(p.members("room").await.expect("m"), vec![1, 2]);
        assert_eq!(p.disconnected(&value(1)).await.expect("d"), 0);
        assert_eq!(p.members("room").await.expect("m"), vec![2]);
        assert_eq!(
            p.channels().await.expect("list"),
            vec![ChannelInfo {
                channel: "room".into(),
                online: 1
            }]
        );
    }
}
