//! A tower layer that reports every API request (method, host, status, latency) to an
//! [`ApiRequestObserver`], for upstream's `rest_client_*` metrics.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use proxy_core::observer::ApiRequestObserver;
use tokio::time::Instant;

#[derive(Clone)]
pub struct ObserveLayer {
    observer: Arc<dyn ApiRequestObserver>,
    host: Arc<str>,
}

impl ObserveLayer {
    pub fn new(observer: Arc<dyn ApiRequestObserver>, host: &str) -> Self {
        ObserveLayer {
            observer,
            host: Arc::from(host),
        }
    }
}

impl<S> tower::Layer<S> for ObserveLayer {
    type Service = Observe<S>;

    fn layer(&self, inner: S) -> Observe<S> {
        Observe {
            inner,
            observer: Arc::clone(&self.observer),
            host: Arc::clone(&self.host),
        }
    }
}

#[derive(Clone)]
pub struct Observe<S> {
    inner: S,
    observer: Arc<dyn ApiRequestObserver>,
    host: Arc<str>,
}

impl<S, B, R> tower::Service<http::Request<B>> for Observe<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let method = request.method().as_str().to_string();
        let started = Instant::now();
        let observer = Arc::clone(&self.observer);
        let host = Arc::clone(&self.host);
        let response = self.inner.call(request);
        Box::pin(async move {
            let result = response.await;
            let status = result.as_ref().ok().map(|r| r.status().as_u16());
            observer.request_done(&method, &host, status, started.elapsed());
            result
        })
    }
}
