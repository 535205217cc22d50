//! Endpoint choice for one Service port: round robin over the endpoints of the client's
//! IP family (the other family when it has none), with optional `ClientIP` affinity.
//! Pure: time comes in as an argument, so the tests need no clock.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

/// Affinity entries are swept for expiry once the table grows past this many (and then
/// only every so many picks), so a port with many clients cannot grow without bound.
const SWEEP_ABOVE: usize = 4096;

#[derive(Debug, Default)]
pub struct Balancer {
    /// Endpoints per family: [IPv4, IPv6], in the model's (sorted) order.
    endpoints: [Vec<SocketAddr>; 2],
    /// Next round-robin slot per family.
    next: [usize; 2],
    /// `Some(timeout)` for `sessionAffinity: ClientIP`.
    affinity: Option<Duration>,
    /// Client IP → (endpoint, last use).
    sticky: HashMap<IpAddr, (SocketAddr, Instant)>,
    picks: u64,
}

fn family_index(ip: IpAddr) -> usize {
    match ip.to_canonical() {
        IpAddr::V4(_) => 0,
        IpAddr::V6(_) => 1,
    }
}

impl Balancer {
    pub fn new(endpoints: Vec<SocketAddr>, affinity: Option<Duration>) -> Balancer {
        let mut b = Balancer::default();
        b.update(endpoints, affinity);
        b
    }

    /// Replaces the endpoints and affinity. Affinity entries pointing at endpoints that
    /// left are dropped, so those clients move at their next connection.
    pub fn update(&mut self, endpoints: Vec<SocketAddr>, affinity: Option<Duration>) {
        let mut split: [Vec<SocketAddr>; 2] = Default::default();
        for ep in endpoints {
            split[family_index(ep.ip())].push(ep);
        }
        if split != self.endpoints {
            self.endpoints = split;
            let endpoints = &self.endpoints;
            self.sticky
                .retain(|_, (ep, _)| endpoints[family_index(ep.ip())].contains(ep));
        }
        if affinity != self.affinity {
            self.affinity = affinity;
            self.sticky.clear();
        }
    }

    pub fn is_empty(&self) -> bool {
        self.endpoints.iter().all(Vec::is_empty)
    }

    /// Whether `ep` is still a current endpoint (UDP sessions check this per datagram).
    pub fn contains(&self, ep: &SocketAddr) -> bool {
        self.endpoints[family_index(ep.ip())].contains(ep)
    }

    /// The endpoints to try for a new connection from `client`, best first: the affine
    /// endpoint if any, else the next in round-robin order followed by the others (so a
    /// failed connect can move on). Empty when there are no endpoints.
    pub fn candidates(&mut self, client: IpAddr, now: Instant) -> Vec<SocketAddr> {
        let client = client.to_canonical();
        self.picks += 1;
        if self.sticky.len() > SWEEP_ABOVE && self.picks & 1023 == 0 {
            self.sweep(now);
        }
        let mut family = family_index(client);
        if self.endpoints[family].is_empty() {
            family = 1 - family;
        }
        let list = &self.endpoints[family];
        if list.is_empty() {
            return Vec::new();
        }
        if let (Some(timeout), Some((ep, last))) = (self.affinity, self.sticky.get_mut(&client)) {
            if now.saturating_duration_since(*last) < timeout && list.contains(ep) {
                *last = now;
                let first = *ep;
                let mut out = vec![first];
                out.extend(list.iter().copied().filter(|e| *e != first));
                return out;
            }
        }
        let start = self.next[family] % list.len();
        self.next[family] = start + 1;
        list[start..]
            .iter()
            .chain(&list[..start])
            .copied()
            .collect()
    }

    /// Records that `client` is now served by `ep` (affinity only).
    pub fn record(&mut self, client: IpAddr, ep: SocketAddr, now: Instant) {
        if self.affinity.is_some() {
            self.sticky.insert(client.to_canonical(), (ep, now));
        }
    }

    fn sweep(&mut self, now: Instant) {
        if let Some(timeout) = self.affinity {
            self.sticky
                .retain(|_, (_, last)| now.saturating_duration_since(*last) < timeout);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn round_robin_over_the_clients_family() {
        let mut b = Balancer::new(
            vec![sa("10.0.0.1:80"), sa("10.0.0.2:80"), sa("[fd00::1]:80")],
            None,
        );
        let now = Instant::now();
        let firsts: Vec<_> = (0..4)
            .map(|_| b.candidates(ip("192.168.0.9"), now)[0])
            .collect();
        assert_eq!(
            firsts,
            [
                sa("10.0.0.1:80"),
                sa("10.0.0.2:80"),
                sa("10.0.0.1:80"),
                sa("10.0.0.2:80")
            ]
        );
        // The rest follow the first, for retries.
        assert_eq!(
            b.candidates(ip("192.168.0.9"), now),
            [sa("10.0.0.1:80"), sa("10.0.0.2:80")]
        );
        assert_eq!(b.candidates(ip("fd00::9"), now), [sa("[fd00::1]:80")]);
        // A v4-mapped client counts as IPv4.
        assert_eq!(b.candidates(ip("::ffff:1.2.3.4"), now).len(), 2);
    }

    #[test]
    fn other_family_when_the_clients_has_none() {
        let mut b = Balancer::new(vec![sa("[fd00::1]:80")], None);
        assert_eq!(
            b.candidates(ip("127.0.0.1"), Instant::now()),
            [sa("[fd00::1]:80")]
        );
        b.update(Vec::new(), None);
        assert!(b.is_empty());
        assert!(b.candidates(ip("127.0.0.1"), Instant::now()).is_empty());
    }

    #[test]
    fn client_ip_affinity_sticks_until_timeout_or_endpoint_leaves() {
        let eps = vec![sa("10.0.0.1:80"), sa("10.0.0.2:80"), sa("10.0.0.3:80")];
        let mut b = Balancer::new(eps.clone(), Some(Duration::from_secs(10)));
        let t0 = Instant::now();
        let client = ip("192.168.0.9");
        let first = b.candidates(client, t0)[0];
        b.record(client, first, t0);
        for s in 1..5 {
            let at = t0 + Duration::from_secs(s * 5);
            assert_eq!(b.candidates(client, at)[0], first, "sticky at {s}");
        }
        // Another client is not affected by the first one's affinity.
        let other = b.candidates(ip("192.168.0.10"), t0)[0];
        assert_ne!(other, first);
        // Idle past the timeout: round robin again.
        let late = t0 + Duration::from_secs(20 + 11);
        assert_ne!(b.candidates(client, late)[0], first);
        // The affine endpoint leaves: the client moves.
        let client2 = ip("192.168.0.11");
        let ep = b.candidates(client2, t0)[0];
        b.record(client2, ep, t0);
        b.update(
            eps.iter().copied().filter(|e| *e != ep).collect(),
            Some(Duration::from_secs(10)),
        );
        assert_ne!(b.candidates(client2, t0)[0], ep);
        assert!(!b.contains(&ep));
    }

    #[test]
    fn without_affinity_nothing_is_remembered() {
        let mut b = Balancer::new(vec![sa("10.0.0.1:80"), sa("10.0.0.2:80")], None);
        let now = Instant::now();
        let client = ip("192.168.0.9");
        let first = b.candidates(client, now)[0];
        b.record(client, first, now);
        assert_ne!(b.candidates(client, now)[0], first);
    }
}
