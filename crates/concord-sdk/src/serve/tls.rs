//! TLS for the accept loop: a certificate read from PEM files and read again when the files
//! change (a renewed certificate is served without a restart), and, when a client CA is given,
//! mutual TLS (a client without a certificate that CA signed is refused in the handshake).

use concord_client::tls::{ReloadingKey, TlsFileError, certificates, provider};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use std::path::PathBuf;
use std::sync::Arc;
use tokio_rustls::TlsAcceptor;

/// Where the server's TLS material lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTlsFiles {
    /// The certificate chain, PEM, leaf first.
    pub cert: PathBuf,
    /// Its private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// A PEM bundle of the certificate authorities whose client certificates are accepted. Set,
    /// every client must show one (mutual TLS).
    pub client_ca: Option<PathBuf>,
}

impl ServerTlsFiles {
    /// The files `CONCORD_TLS_CERT`, `CONCORD_TLS_KEY` and `CONCORD_TLS_CLIENT_CA` name (the
    /// settings the Concord server reads): none when the first two are unset or empty.
    ///
    /// # Errors
    /// Only one of the certificate and its key set, or a client CA without them.
    pub fn from_env() -> Result<Option<Self>, TlsError> {
        let var = |name| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
        Self::from_paths(
            var("CONCORD_TLS_CERT"),
            var("CONCORD_TLS_KEY"),
            var("CONCORD_TLS_CLIENT_CA"),
        )
    }

    /// The files from the three settings (`tls_cert`, `tls_key`, `tls_client_ca`, whatever they
    /// were read from): none when all are unset.
    ///
    /// # Errors
    /// Only one of the certificate and its key set, or a client CA without them.
    pub fn from_paths(
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
        client_ca: Option<PathBuf>,
    ) -> Result<Option<Self>, TlsError> {
        match (cert, key, client_ca) {
            (None, None, None) => Ok(None),
            (Some(cert), Some(key), client_ca) => Ok(Some(Self { cert, key, client_ca })),
            (None, None, Some(_)) => Err(TlsError::Config(
                "the client CA (mutual TLS, tls_client_ca or CONCORD_TLS_CLIENT_CA) needs a certificate and \
                 its key: the server must speak TLS"
                    .into(),
            )),
            _ => Err(TlsError::Config(
                "the certificate and its key (tls_cert and tls_key, or CONCORD_TLS_CERT and CONCORD_TLS_KEY) go \
                 together: set both or neither"
                    .into(),
            )),
        }
    }
}

/// TLS material that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(transparent)]
    File(#[from] TlsFileError),
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// A server's TLS: build it once at start (it reads the files then, so a bad file stops the
/// start), hand it to [`serve`](super::serve).
#[derive(Clone)]
pub struct ServerTls {
    config: Arc<ServerConfig>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls").finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Reads the certificate, its key and the client CA bundle.
    ///
    /// # Errors
    /// A file that cannot be read, holds no certificate or key, or a key that does not match
    /// the certificate.
    pub fn load(files: &ServerTlsFiles) -> Result<Self, TlsError> {
        let provider = provider();
        let resolver = ReloadingKey::load(&files.cert, &files.key)?;
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let builder = match &files.client_ca {
            None => builder.with_no_client_auth(),
            Some(path) => {
                let mut roots = RootCertStore::empty();
                for cert in certificates(path, "client CA bundle")? {
                    roots
                        .add(cert)
                        .map_err(|e| TlsError::Config(format!("client CA bundle {}: {e}", path.display())))?;
                }
                let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .map_err(|e| TlsError::Config(format!("client CA bundle {}: {e}", path.display())))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder.with_cert_resolver(Arc::new(resolver));
        // The accept loop speaks HTTP/1.1 only.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            config: Arc::new(config),
        })
    }

    pub(super) fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.config.clone())
    }
}
