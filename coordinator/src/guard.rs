//! What the public APIs check before anything else: the caller's address against the
//! access list (403), then the request rate against the limit (429 with Retry-After).
//! Pure and synchronous; the caller passes `now`.

use crate::error::ApiError;
use ipnet::IpNet;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Instant;

/// Entries an access list may hold.
pub const MAX_ACCESS_ENTRIES: usize = 10;

/// Who may call the public APIs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Access {
    /// Everyone.
    #[default]
    Open,
    /// Only addresses inside one of these networks.
    Allow(Vec<IpNet>),
    /// Everyone but addresses inside one of these networks.
    Deny(Vec<IpNet>),
}

impl Access {
    /// From the manifest's lists (CIDR `a.b.c.d/n`, IPv6 `x::/n`, or a bare address):
    /// at most one of them non-empty, at most [`MAX_ACCESS_ENTRIES`] entries.
    ///
    /// # Errors
    /// A message naming the list (`allow` or `deny`) and the entry at fault.
    pub fn parse(allow: &[String], deny: &[String]) -> Result<Access, String> {
        if !allow.is_empty() && !deny.is_empty() {
            return Err("allow: give an allow-list or a deny-list, not both".into());
        }
        let (field, list) = if deny.is_empty() {
            ("allow", allow)
        } else {
            ("deny", deny)
        };
        if list.len() > MAX_ACCESS_ENTRIES {
            return Err(format!(
                "{field}: {} entries, at most {MAX_ACCESS_ENTRIES}",
                list.len()
            ));
        }
        let nets = list
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let s = s.trim();
                s.parse::<IpNet>()
                    .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                    .map(|n| n.trunc())
                    .map_err(|_| format!("{field}[{i}]: `{s}` is not a CIDR network or an address"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(match (nets.is_empty(), field) {
            (true, _) => Access::Open,
            (false, "allow") => Access::Allow(nets),
            (false, _) => Access::Deny(nets),
        })
    }

    /// Whether `ip` may call (an IPv4 address mapped into IPv6 counts as IPv4).
    pub fn permits(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        let inside = |nets: &[IpNet]| nets.iter().any(|n| n.contains(&ip));
        match self {
            Access::Open => true,
            Access::Allow(nets) => inside(nets),
            Access::Deny(nets) => !inside(nets),
        }
    }

    /// `Ok` or the 403 the caller gets.
    ///
    /// # Errors
    /// 403 naming the address.
    pub fn check(&self, ip: IpAddr) -> Result<(), ApiError> {
        if self.permits(ip) {
            return Ok(());
        }
        metrics::counter!(xpyd_runtime::metrics::COORD_REJECTED_TOTAL, "reason" => "access")
            .increment(1);
        Err(ApiError::refusal(
            403,
            "permission_denied",
            "address_not_allowed",
            format!(
                "requests from {} are not allowed by this service's access list",
                ip.to_canonical()
            ),
        ))
    }
}

/// How the request rate is limited.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    /// Requests per second, `1..=10000`: in all (service scope) or per ready serving
    /// worker (instance scope).
    pub rps: u32,
    /// Instance scope: the limit is `rps` × the ready decode-side (decode or combined)
    /// workers, at least one.
    pub per_instance: bool,
}

impl RateLimit {
    /// Checks the range.
    ///
    /// # Errors
    /// A message naming `rps`.
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=10_000).contains(&self.rps) {
            return Err(format!("rps: {} is out of range 1..=10000", self.rps));
        }
        Ok(())
    }

    /// The rate in force with `instances` ready serving workers.
    pub fn rate(&self, instances: usize) -> f64 {
        let n = if self.per_instance {
            instances.max(1)
        } else {
            1
        };
        f64::from(self.rps) * n as f64
    }
}

/// A token bucket of one second's worth of requests: a burst of `rate + k` at one
/// instant admits `rate` and refuses exactly `k`; tokens come back at `rate` per second.
#[derive(Debug, Clone, PartialEq)]
pub struct Bucket {
    tokens: f64,
    last: f64,
}

impl Bucket {
    /// A full bucket at time `now_s` (seconds on any monotonic clock).
    pub fn new(rate: f64, now_s: f64) -> Self {
        Bucket {
            tokens: rate,
            last: now_s,
        }
    }

    /// Takes one token at `now_s` under `rate`; else the seconds until one is back.
    pub fn take(&mut self, rate: f64, now_s: f64) -> Result<(), f64> {
        let elapsed = (now_s - self.last).max(0.0);
        self.last = self.last.max(now_s);
        // The capacity follows the rate (instance scope changes it), never above it.
        self.tokens = (self.tokens + elapsed * rate).min(rate);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err((1.0 - self.tokens) / rate)
        }
    }
}

/// The coordinator's one limiter, shared by HTTP, WebSocket and gRPC.
#[derive(Debug)]
pub struct Limiter {
    limit: Option<RateLimit>,
    epoch: Instant,
    bucket: Mutex<Option<Bucket>>,
}

impl Limiter {
    /// A limiter for `limit` (`None`: no limit).
    pub fn new(limit: Option<RateLimit>) -> Self {
        Limiter {
            limit,
            epoch: Instant::now(),
            bucket: Mutex::new(None),
        }
    }

    /// Admits one request now, or the 429 the caller gets (Retry-After: whole seconds
    /// until a request would be admitted). `instances` counts the ready serving workers;
    /// it is asked only by an instance-scoped limit, so a service without one takes no
    /// cluster lock per request.
    ///
    /// # Errors
    /// 429 `rate_limit_exceeded`.
    pub fn admit(&self, instances: impl FnOnce() -> usize) -> Result<(), ApiError> {
        let Some(limit) = self.limit else {
            return Ok(());
        };
        let now = self.epoch.elapsed().as_secs_f64();
        let rate = limit.rate(if limit.per_instance { instances() } else { 1 });
        let mut bucket = self.bucket.lock().expect("limiter lock");
        let b = bucket.get_or_insert_with(|| Bucket::new(rate, now));
        b.take(rate, now).map_err(|wait| {
            metrics::counter!(xpyd_runtime::metrics::COORD_REJECTED_TOTAL, "reason" => "rate_limit")
                .increment(1);
            let mut e = ApiError::refusal(
                429,
                "rate_limit_exceeded",
                "rate_limit_exceeded",
                format!(
                    "more than {rate} requests per second{}",
                    if limit.per_instance {
                        format!(" ({} per ready instance)", limit.rps)
                    } else {
                        String::new()
                    }
                ),
            );
            e.retry_after = Some(wait.ceil().max(1.0) as u64);
            e
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn access_lists_parse_and_decide() {
        let a = Access::parse(&s(&["127.0.0.2/32", "10.0.0.0/8", "::1"]), &[]).unwrap();
        assert!(a.permits("127.0.0.2".parse().unwrap()));
        assert!(a.permits("10.9.8.7".parse().unwrap()));
        assert!(a.permits("::1".parse().unwrap()));
        assert!(a.permits("::ffff:10.1.1.1".parse().unwrap()), "mapped IPv4");
        assert!(!a.permits("127.0.0.1".parse().unwrap()));
        let d = Access::parse(&[], &s(&["127.0.0.3"])).unwrap();
        assert!(!d.permits("127.0.0.3".parse().unwrap()));
        assert!(d.permits("127.0.0.1".parse().unwrap()));
        assert_eq!(
            d.check("127.0.0.3".parse().unwrap()).unwrap_err().status,
            403
        );
        assert_eq!(Access::parse(&[], &[]).unwrap(), Access::Open);
        // A host part beyond the prefix is dropped, not refused.
        let t = Access::parse(&s(&["192.168.1.77/24"]), &[]).unwrap();
        assert!(t.permits("192.168.1.1".parse().unwrap()));
    }

    #[test]
    fn bad_access_lists_name_the_entry() {
        let e = Access::parse(&s(&["10.0.0.0/8", "nope"]), &[]).unwrap_err();
        assert!(e.starts_with("allow[1]: `nope`"), "{e}");
        let e = Access::parse(&[], &s(&["10.0.0.0/33"])).unwrap_err();
        assert!(e.starts_with("deny[0]"), "{e}");
        let e = Access::parse(&s(&["10.0.0.1"]), &s(&["10.0.0.2"])).unwrap_err();
        assert!(e.contains("not both"), "{e}");
        let many: Vec<String> = (0..11).map(|i| format!("10.0.0.{i}")).collect();
        let e = Access::parse(&many, &[]).unwrap_err();
        assert!(e.contains("11 entries, at most 10"), "{e}");
    }

    #[test]
    fn a_burst_over_the_rate_is_refused_by_exactly_the_excess() {
        let mut b = Bucket::new(5.0, 0.0);
        let admitted = (0..8).filter(|_| b.take(5.0, 0.0).is_ok()).count();
        assert_eq!(admitted, 5);
        // One token is back after 0.2 s, and the wait said so.
        let wait = b.take(5.0, 0.1).unwrap_err();
        assert!((wait - 0.1).abs() < 1e-9, "{wait}");
        assert!(b.take(5.0, 0.2).is_ok());
        // A long idle refills to one second's worth, no more.
        let admitted = (0..20).filter(|_| b.take(5.0, 100.0).is_ok()).count();
        assert_eq!(admitted, 5);
    }

    #[test]
    fn instance_scope_multiplies_by_ready_instances() {
        let l = RateLimit {
            rps: 3,
            per_instance: true,
        };
        assert_eq!(l.rate(4), 12.0);
        assert_eq!(l.rate(0), 3.0, "at least one instance's worth");
        let s = RateLimit {
            rps: 3,
            per_instance: false,
        };
        assert_eq!(s.rate(4), 3.0);
        assert!(RateLimit { rps: 0, ..s }.validate().is_err());
        assert!(RateLimit { rps: 10_001, ..s }.validate().is_err());
    }

    #[test]
    fn the_limiter_answers_429_with_retry_after() {
        let l = Limiter::new(Some(RateLimit {
            rps: 2,
            per_instance: false,
        }));
        assert!(l.admit(|| 1).is_ok());
        assert!(l.admit(|| 1).is_ok());
        let e = l.admit(|| 1).unwrap_err();
        assert_eq!((e.status, e.retry_after), (429, Some(1)));
        assert!(
            l.admit(|| unreachable!("a service-wide limit counts no workers"))
                .is_err()
        );
        assert!(
            Limiter::new(None)
                .admit(|| unreachable!("no limit asks nothing"))
                .is_ok()
        );
    }

    proptest! {
        /// Over any arrival pattern, admissions in any window of length `t` never exceed
        /// one second's burst plus `rate × t`.
        #[test]
        fn admissions_never_exceed_burst_plus_rate(
            rate in 1u32..50,
            gaps in proptest::collection::vec(0.0f64..0.3, 1..300),
        ) {
            let rate = f64::from(rate);
            let mut b = Bucket::new(rate, 0.0);
            let mut now = 0.0;
            let mut admitted = Vec::new();
            for g in gaps {
                now += g;
                if b.take(rate, now).is_ok() {
                    admitted.push(now);
                }
            }
            for (i, t0) in admitted.iter().enumerate() {
                let within = admitted[i..].iter().filter(|t| **t - t0 <= 1.0).count();
                prop_assert!(within as f64 <= rate + rate * 1.0 + 1e-9);
            }
        }
    }
}
