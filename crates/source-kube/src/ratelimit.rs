//! Client-side rate limit for API requests (`--kube-api-qps`, `--kube-api-burst`), as
//! client-go's token bucket: `burst` requests may go at once, then `qps` per second.
//!
//! A tower layer under kube's client, so every request (list, watch, retries) takes a
//! token. Long-running watches take one token when they start, as in client-go.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

/// A token bucket shared by every clone of the service.
#[derive(Debug)]
struct Bucket {
    /// Tokens available now; negative when requests have reserved future tokens.
    tokens: f64,
    burst: f64,
    qps: f64,
    updated: Instant,
}

impl Bucket {
    /// Takes one token and says how long the caller must wait before using it.
    fn reserve(&mut self, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.updated = now;
        self.tokens = (self.tokens + elapsed * self.qps).min(self.burst);
        self.tokens -= 1.0;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.qps)
        }
    }
}

/// The layer: `RateLimitLayer::new(qps, burst)`; `qps <= 0` turns limiting off, as in
/// client-go.
#[derive(Debug, Clone)]
pub struct RateLimitLayer {
    bucket: Option<Arc<Mutex<Bucket>>>,
}

impl RateLimitLayer {
    pub fn new(qps: f32, burst: i32) -> Self {
        if qps <= 0.0 || !qps.is_finite() {
            return RateLimitLayer { bucket: None };
        }
        // A burst below one would never let a request through.
        let burst = f64::from(burst.max(1));
        RateLimitLayer {
            bucket: Some(Arc::new(Mutex::new(Bucket {
                tokens: burst,
                burst,
                qps: f64::from(qps),
                updated: Instant::now(),
            }))),
        }
    }
}

impl<S> tower::Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;

    fn layer(&self, inner: S) -> RateLimit<S> {
        RateLimit {
            inner,
            bucket: self.bucket.clone(),
            wait: None,
            reserved: false,
        }
    }
}

/// The service: waits in `poll_ready` until a token is available, then defers to the
/// inner service.
pub struct RateLimit<S> {
    inner: S,
    bucket: Option<Arc<Mutex<Bucket>>>,
    wait: Option<Pin<Box<Sleep>>>,
    /// A token is held for the next `call`.
    reserved: bool,
}

impl<S, R> tower::Service<R> for RateLimit<S>
where
    S: tower::Service<R>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        let Some(bucket) = &self.bucket else {
            return self.inner.poll_ready(cx);
        };
        loop {
            if self.reserved {
                return self.inner.poll_ready(cx);
            }
            if let Some(wait) = &mut self.wait {
                ready!(wait.as_mut().poll(cx));
                self.wait = None;
                self.reserved = true;
                continue;
            }
            let now = Instant::now();
            // The lock only guards a few arithmetic operations; a poisoned one still holds
            // consistent numbers.
            let delay = bucket
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .reserve(now);
            if delay.is_zero() {
                self.reserved = true;
            } else {
                self.wait = Some(Box::pin(tokio::time::sleep_until(now + delay)));
            }
        }
    }

    fn call(&mut self, request: R) -> Self::Future {
        self.reserved = false;
        self.inner.call(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;
    use tower::{Layer, Service};

    /// An inner service that answers at once with the time it was called.
    struct Clock;

    impl Service<()> for Clock {
        type Response = Instant;
        type Error = std::convert::Infallible;
        type Future = std::future::Ready<Result<Instant, Self::Error>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: ()) -> Self::Future {
            std::future::ready(Ok(Instant::now()))
        }
    }

    async fn send(svc: &mut RateLimit<Clock>) -> Duration {
        let start = Instant::now();
        poll_fn(|cx| svc.poll_ready(cx)).await.unwrap();
        svc.call(()).await.unwrap().duration_since(start)
    }

    #[tokio::test(start_paused = true)]
    async fn burst_then_qps() {
        let layer = RateLimitLayer::new(10.0, 3);
        let mut a = layer.layer(Clock);
        let mut b = layer.layer(Clock);
        let t0 = Instant::now();
        // The burst goes at once, shared between clones.
        assert_eq!(send(&mut a).await, Duration::ZERO);
        assert_eq!(send(&mut b).await, Duration::ZERO);
        assert_eq!(send(&mut a).await, Duration::ZERO);
        // Then one every 100 ms.
        for n in 1..=4u32 {
            send(&mut b).await;
            let at = Instant::now().duration_since(t0);
            assert!(
                at >= Duration::from_millis(100) * n
                    && at < Duration::from_millis(100) * n + Duration::from_millis(5),
                "request {n} at {at:?}"
            );
        }
        // An idle second refills the bucket, up to the burst only.
        tokio::time::sleep(Duration::from_secs(5)).await;
        for _ in 0..3 {
            assert_eq!(send(&mut a).await, Duration::ZERO);
        }
        assert!(send(&mut a).await >= Duration::from_millis(99));
    }

    #[tokio::test(start_paused = true)]
    async fn zero_qps_is_unlimited() {
        let mut svc = RateLimitLayer::new(0.0, 1).layer(Clock);
        for _ in 0..100 {
            assert_eq!(send(&mut svc).await, Duration::ZERO);
        }
    }
}
