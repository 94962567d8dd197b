//! Duplicate detection (RFC 5080 2.2.2): a retransmitted request (same client, source port,
//! Identifier and Request Authenticator) gets the answer the first one got, not a second
//! decision or a second seat. Bounded in size and in time.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// How long an answer is kept for retransmissions.
pub const LIFETIME: Duration = Duration::from_secs(5);
/// Most requests remembered at once; past it the oldest are forgotten first.
pub const MAX_ENTRIES: usize = 65_536;

/// A request's identity for duplicate detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Key {
    /// Source address and port.
    pub src: SocketAddr,
    /// The packet's code (an Access-Request and an Accounting-Request are different requests).
    pub code: u8,
    /// The Identifier.
    pub identifier: u8,
    /// The Request Authenticator.
    pub authenticator: [u8; 16],
}

/// What is known about a request seen before.
#[derive(Debug, PartialEq, Eq)]
pub enum Seen {
    /// New: decide it (and [`Cache::answer`] when done).
    New,
    /// Still being decided: drop the retransmission.
    InFlight,
    /// Answered: send this again.
    Answered(Vec<u8>),
}

#[derive(Debug)]
struct Entry {
    at: Instant,
    answer: Option<Vec<u8>>,
}

/// The cache.
#[derive(Debug, Default)]
pub struct Cache {
    entries: HashMap<Key, Entry>,
    order: VecDeque<(Instant, Key)>,
}

impl Cache {
    /// Looks a request up, remembering it as in flight if new.
    pub fn check(&mut self, key: Key, now: Instant) -> Seen {
        self.expire(now);
        if let Some(e) = self.entries.get(&key) {
            return match &e.answer {
                Some(a) => Seen::Answered(a.clone()),
                None => Seen::InFlight,
            };
        }
        while self.entries.len() >= MAX_ENTRIES {
            match self.order.pop_front() {
                Some((_, k)) => {
                    self.entries.remove(&k);
                }
                None => break,
            }
        }
        self.entries.insert(
            key,
            Entry {
                at: now,
                answer: None,
            },
        );
        self.order.push_back((now, key));
        Seen::New
    }

    /// Records the answer to a request (none: it was dropped, and a retransmission may be
    /// decided afresh).
    pub fn answer(&mut self, key: Key, answer: Option<Vec<u8>>) {
        match answer {
            Some(a) => {
                if let Some(e) = self.entries.get_mut(&key) {
                    e.answer = Some(a);
                }
            }
            None => {
                self.entries.remove(&key);
            }
        }
    }

    fn expire(&mut self, now: Instant) {
        while let Some((at, k)) = self.order.front().copied() {
            if now.duration_since(at) < LIFETIME {
                break;
            }
            self.order.pop_front();
            if self.entries.get(&k).is_some_and(|e| e.at == at) {
                self.entries.remove(&k);
            }
        }
    }

    /// Requests remembered.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Nothing remembered.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn key(id: u8) -> Key {
        Key {
            src: "192.0.2.1:4000".parse().unwrap(),
            code: 1,
            identifier: id,
            authenticator: [id; 16],
        }
    }

    #[test]
    fn a_retransmission_gets_the_first_answer_until_it_expires() {
        let mut c = Cache::default();
        let t = Instant::now();
        assert_eq!(c.check(key(1), t), Seen::New);
        assert_eq!(c.check(key(1), t), Seen::InFlight);
        c.answer(key(1), Some(vec![2, 1]));
        assert_eq!(c.check(key(1), t), Seen::Answered(vec![2, 1]));
        assert_eq!(c.check(key(2), t), Seen::New);
        c.answer(key(2), None);
        assert_eq!(c.check(key(2), t), Seen::New);
        assert_eq!(c.check(key(1), t + LIFETIME), Seen::New);
    }

    #[test]
    fn the_cache_is_bounded() {
        let mut c = Cache::default();
        let t = Instant::now();
        for i in 0..(MAX_ENTRIES + 10) {
            let mut k = key(0);
            k.authenticator[..8].copy_from_slice(&(i as u64).to_le_bytes());
            c.check(k, t);
        }
        assert_eq!(c.len(), MAX_ENTRIES);
    }
}
