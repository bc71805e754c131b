//! The accept loop: HTTP/1.1 on hyper with the limits `axum::serve` does not set, over plain TCP
//! or TLS. A client gets `header_read_timeout` to finish its TLS handshake and again to send its
//! request head (then the connection is closed), and at most `max_connections` connections are
//! served at once (beyond that, new ones wait in the listen backlog until one closes). Shutdown
//! stops accepting, lets in-flight requests finish and closes idle connections, within the grace
//! period.

mod tls;

pub use tls::{ServerTls, ServerTlsFiles, TlsError};

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use hyper_util::service::TowerToHyperService;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The connection limits.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Longest time to receive a request's head, from the connection's first byte or the end of
    /// the previous response; also the longest TLS handshake.
    pub header_read_timeout: Duration,
    /// Most connections served at once.
    pub max_connections: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            max_connections: 4096,
        }
    }
}

/// Serves `app` on `listener` (over TLS when `tls` is given) until `signal`, then shuts down
/// gracefully within `grace`.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    tls: Option<ServerTls>,
    signal: impl Future<Output = ()>,
    grace: Duration,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let graceful = GracefulShutdown::new();
    // HTTP/1.1 only: the version sniff of an auto builder reads the first bytes with no deadline,
    // and HTTP/2 has no header timeout; plain-HTTP clients speak HTTP/1.1.
    let mut builder = auto::Builder::new(TokioExecutor::new()).http1_only();
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let builder = Arc::new(builder);
    let acceptor = tls.map(|t| t.acceptor());
    tokio::pin!(signal);
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            () = &mut signal => break,
        };
        let tcp = tokio::select! {
            r = listener.accept() => match r {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    // Out of file descriptors and the like: wait a moment rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut signal => break,
        };
        // Without TCP_NODELAY, Nagle's algorithm holds back small SSE writes until the client's
        // delayed ACK: tens of milliseconds of subscriber latency for nothing.
        let _ = tcp.set_nodelay(true);
        let connection = Connection {
            builder: builder.clone(),
            service: TowerToHyperService::new(app.clone()),
            watcher: graceful.watcher(),
            permit,
        };
        match &acceptor {
            None => {
                tokio::spawn(connection.run(tcp));
            }
            Some(acceptor) => {
                let acceptor = acceptor.clone();
                let handshake_timeout = limits.header_read_timeout;
                tokio::spawn(async move {
                    match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => connection.run(stream).await,
                        Ok(Err(e)) => {
                            metrics::counter!("concord_tls_handshake_failures_total").increment(1);
                            tracing::debug!(error = %e, "TLS handshake failed");
                        }
                        Err(_) => {
                            metrics::counter!("concord_tls_handshake_failures_total").increment(1);
                            tracing::debug!("TLS handshake timed out");
                        }
                    }
                });
            }
        }
    }
    drop(listener);
    tracing::info!("shutting down: finishing in-flight requests");
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(grace) => tracing::warn!("grace period over; closing remaining connections"),
    }
}

/// One accepted connection and what serving it holds.
struct Connection {
    builder: Arc<auto::Builder<TokioExecutor>>,
    service: TowerToHyperService<Router>,
    watcher: Watcher,
    permit: OwnedSemaphorePermit,
}

impl Connection {
    async fn run<I>(self, io: I)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        metrics::gauge!("concord_http_connections").increment(1.0);
        let conn = self.builder.serve_connection(TokioIo::new(io), self.service);
        if let Err(e) = self.watcher.watch(conn).await {
            tracing::debug!(error = %e, "connection ended with an error");
        }
        metrics::gauge!("concord_http_connections").decrement(1.0);
        drop(self.permit);
    }
}
