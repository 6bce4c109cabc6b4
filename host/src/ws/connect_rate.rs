//! Connects per second per client address: a token bucket per address, so a
//! single address cannot churn connects (each costs an auth call, a token
//! lookup and presence writes) faster than `connect_rate_per_address`.
//!
//! The table is bounded: past [`MAX_ADDRESSES`] entries, buckets that have
//! refilled (addresses that went quiet) are dropped first, and if every
//! bucket is busy the table is cleared, which errs on the side of admitting.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Instant;

/// Addresses tracked at once.
const MAX_ADDRESSES: usize = 100_000;

struct Bucket {
    tokens: f64,
    at: Instant,
}

/// The buckets of one node.
pub struct ConnectRate {
    per_second: f64,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

impl ConnectRate {
    /// `per_second` connects per address, in bursts of as many; 0: no limit.
    pub fn new(per_second: u32) -> ConnectRate {
        ConnectRate {
            per_second: f64::from(per_second),
            buckets: Mutex::default(),
        }
    }

    /// Takes a token for `ip`; false when it has none left.
    pub fn admit(&self, ip: IpAddr) -> bool {
        if self.per_second <= 0.0 {
            return true;
        }
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= MAX_ADDRESSES && !buckets.contains_key(&ip) {
            let full = self.per_second;
            let rate = self.per_second;
            buckets.retain(|_, b| b.tokens + now.duration_since(b.at).as_secs_f64() * rate < full);
            if buckets.len() >= MAX_ADDRESSES {
                buckets.clear();
            }
        }
        let bucket = buckets.entry(ip).or_insert(Bucket {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_gets_its_burst_then_waits_others_are_unaffected() {
        let rate = ConnectRate::new(3);
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        let b: IpAddr = "10.0.0.2".parse().expect("ip");
        assert!((0..3).all(|_| rate.admit(a)));
        assert!(!rate.admit(a));
        assert!(rate.admit(b));
        assert!(ConnectRate::new(0).admit(a), "0 is no limit");
    }
}
