//! Connects per second per client address: a token bucket per address, so a
//! single address cannot churn connects (each costs an auth call, a token
//! lookup and presence writes) faster than `connect_rate_per_address`.
//!
//! An IPv6 client counts per /64: one subscriber usually holds a whole /64,
//! so counting whole addresses would give it 2^64 buckets. An IPv4-mapped
//! IPv6 address counts as its IPv4 address.
//!
//! The table is bounded: past [`MAX_ADDRESSES`] entries, buckets that have
//! refilled (addresses that went quiet) are dropped first, then the least
//! recently used tenth, so a flood of new addresses cannot reset the
//! buckets of those already being limited. Eviction scans the table once
//! per tenth of it, a bounded cost per connect.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Instant;

use ipnet::IpNet;

/// Addresses tracked at once.
const MAX_ADDRESSES: usize = 100_000;

struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Who a bucket belongs to: an IPv4 address or an IPv6 /64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Key {
    V4(u32),
    V6Prefix(u64),
}

impl Key {
    fn of(ip: IpAddr) -> Key {
        match ip {
            IpAddr::V4(v4) => Key::V4(u32::from(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Key::V4(u32::from(v4)),
                None => Key::V6Prefix((u128::from(v6) >> 64) as u64),
            },
        }
    }
}

/// The buckets of one node.
pub struct ConnectRate {
    per_second: f64,
    /// Addresses never limited (loopback by default: a local proxy that
    /// names no client puts every terminal there).
    exempt: Vec<IpNet>,
    buckets: Mutex<HashMap<Key, Bucket>>,
}

impl ConnectRate {
    /// `per_second` connects per address, in bursts of as many; 0: no limit.
    /// Addresses in `exempt` are never limited.
    pub fn new(per_second: u32, exempt: Vec<IpNet>) -> ConnectRate {
        ConnectRate {
            per_second: f64::from(per_second),
            exempt,
            buckets: Mutex::default(),
        }
    }

    /// Takes a token for `ip`; false when it has none left.
    pub fn admit(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        if self.per_second <= 0.0 || self.exempt.iter().any(|net| net.contains(&ip)) {
            return true;
        }
        let now = Instant::now();
        let key = Key::of(ip);
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= MAX_ADDRESSES && !buckets.contains_key(&key) {
            self.evict(&mut buckets, now);
        }
        let bucket = buckets.entry(key).or_insert(Bucket {
            tokens: self.per_second,
            at: now,
        });
        bucket.tokens = (bucket.tokens
            + now.duration_since(bucket.at).as_secs_f64() * self.per_second)
            .min(self.per_second);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

impl ConnectRate {
    /// Makes room: drops the buckets that have refilled, then, if that was
    /// not a tenth of the table, the least recently used until it is.
    fn evict(&self, buckets: &mut HashMap<Key, Bucket>, now: Instant) {
        let (full, rate) = (self.per_second, self.per_second);
        buckets.retain(|_, b| b.tokens + now.duration_since(b.at).as_secs_f64() * rate < full);
        let target = MAX_ADDRESSES - MAX_ADDRESSES / 10;
        if buckets.len() > target {
            let mut ages: Vec<Instant> = buckets.values().map(|b| b.at).collect();
            let excess = buckets.len() - target;
            let (_, cutoff, _) = ages.select_nth_unstable(excess - 1);
            let cutoff = *cutoff;
            buckets.retain(|_, b| b.at > cutoff);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_gets_its_burst_then_waits_others_are_unaffected() {
        let rate = ConnectRate::new(3, Vec::new());
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        let b: IpAddr = "10.0.0.2".parse().expect("ip");
        assert!((0..3).all(|_| rate.admit(a)));
        assert!(!rate.admit(a));
        assert!(rate.admit(b));
        assert!(ConnectRate::new(0, Vec::new()).admit(a), "0 is no limit");
    }

    #[test]
    fn exempt_networks_are_never_limited() {
        let loopback = ["127.0.0.0/8", "::1/128"].map(|n| n.parse().expect("net"));
        let rate = ConnectRate::new(1, loopback.to_vec());
        for ip in ["127.0.0.1", "127.9.9.9", "::1", "::ffff:127.0.0.1"] {
            let ip: IpAddr = ip.parse().expect("ip");
            assert!((0..100).all(|_| rate.admit(ip)), "{ip} is exempt");
        }
        let outside: IpAddr = "10.0.0.1".parse().expect("ip");
        assert!(rate.admit(outside));
        assert!(!rate.admit(outside), "others are limited");
    }

    #[test]
    fn an_ipv6_subscriber_counts_as_one_per_64() {
        let rate = ConnectRate::new(2, Vec::new());
        let one: IpAddr = "2001:db8:1:2::1".parse().expect("ip");
        let other_in_64: IpAddr = "2001:db8:1:2:ffff::9".parse().expect("ip");
        let next_64: IpAddr = "2001:db8:1:3::1".parse().expect("ip");
        assert!(rate.admit(one));
        assert!(rate.admit(other_in_64));
        assert!(!rate.admit(one), "the /64 spent its burst");
        assert!(rate.admit(next_64));
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().expect("ip");
        let v4: IpAddr = "10.0.0.1".parse().expect("ip");
        assert!(rate.admit(mapped) && rate.admit(v4));
        assert!(!rate.admit(v4), "a mapped address is its IPv4 address");
    }

    #[test]
    fn a_full_table_drops_the_least_recently_used_not_everyone() {
        let rate = ConnectRate::new(1, Vec::new());
        let limited: IpAddr = "192.0.2.1".parse().expect("ip");
        assert!(rate.admit(limited));
        assert!(!rate.admit(limited));
        // A flood of new addresses fills the table; the limited address
        // keeps connecting (and so stays recently used) meanwhile.
        for n in 0..(MAX_ADDRESSES as u32 + 1_000) {
            rate.admit(IpAddr::from((0x0a00_0000 + n).to_be_bytes()));
            if n % 5_000 == 0 {
                assert!(!rate.admit(limited), "still limited after {n}");
            }
        }
        assert!(!rate.admit(limited), "the flood did not reset its bucket");
        let len = rate.buckets.lock().expect("lock").len();
        assert!(len <= MAX_ADDRESSES, "bounded: {len}");
    }
}
