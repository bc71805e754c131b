//! TLS for the accept loop: a certificate read from PEM files and read again when the files
//! change (a renewed certificate is served without a restart), and, when a client CA is given,
//! mutual TLS (a client without a certificate that CA signed is refused in the handshake).

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio_rustls::TlsAcceptor;

/// How often, at most, a handshake looks whether the certificate files changed.
const RELOAD_CHECK: Duration = Duration::from_secs(1);

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
        match (
            var("CONCORD_TLS_CERT"),
            var("CONCORD_TLS_KEY"),
            var("CONCORD_TLS_CLIENT_CA"),
        ) {
            (None, None, None) => Ok(None),
            (Some(cert), Some(key), client_ca) => Ok(Some(Self { cert, key, client_ca })),
            (None, None, Some(_)) => Err(TlsError::Config(
                "CONCORD_TLS_CLIENT_CA (mutual TLS) needs CONCORD_TLS_CERT and CONCORD_TLS_KEY".into(),
            )),
            _ => Err(TlsError::Config(
                "CONCORD_TLS_CERT and CONCORD_TLS_KEY go together: set both or neither".into(),
            )),
        }
    }
}

/// TLS material that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} {path}: {detail}")]
    Invalid {
        what: &'static str,
        path: PathBuf,
        detail: String,
    },
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
        let resolver = Reloading::new(files.cert.clone(), files.key.clone(), provider.clone())?;
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let builder = match &files.client_ca {
            None => builder.with_no_client_auth(),
            Some(path) => {
                let mut roots = RootCertStore::empty();
                for cert in certificates(path, "client CA bundle")? {
                    roots.add(cert).map_err(|e| invalid("client CA bundle", path, e))?;
                }
                let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .map_err(|e| invalid("client CA bundle", path, e))?;
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

/// The process's provider (ring, the one the tree builds), or ring when none is installed yet.
fn provider() -> Arc<CryptoProvider> {
    CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()))
}

fn invalid(what: &'static str, path: &Path, e: impl std::fmt::Display) -> TlsError {
    TlsError::Invalid {
        what,
        path: path.to_path_buf(),
        detail: e.to_string(),
    }
}

fn read(path: &Path, what: &'static str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

fn certificates(path: &Path, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path, what)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(what, path, e))?;
    if certs.is_empty() {
        return Err(invalid(what, path, "no certificate in the file"));
    }
    Ok(certs)
}

fn certified_key(cert: &Path, key: &Path, provider: &CryptoProvider) -> Result<CertifiedKey, TlsError> {
    let chain = certificates(cert, "certificate")?;
    let mut pem = read(key, "private key")?;
    let parsed = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| invalid("private key", key, e));
    // The file's bytes held the key: wipe them (the parsed key wipes itself when dropped).
    zeroize::Zeroize::zeroize(&mut pem);
    CertifiedKey::from_der(chain, parsed?, provider).map_err(|e| invalid("private key", key, e))
}

/// What the files looked like when last read: a renewal changes one of these (a Kubernetes
/// Secret volume swaps a symbolic link, which changes the time and the inode behind the path).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp(Option<SystemTime>, u64, u64);

fn stamp(path: &Path) -> Option<Stamp> {
    let meta = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    let inode = std::os::unix::fs::MetadataExt::ino(&meta);
    #[cfg(not(unix))]
    let inode = 0;
    Some(Stamp(meta.modified().ok(), meta.len(), inode))
}

/// The certificate resolver that reads the files again when they change.
#[derive(Debug)]
struct Reloading {
    cert: PathBuf,
    key: PathBuf,
    provider: Arc<CryptoProvider>,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    current: Arc<CertifiedKey>,
    stamps: (Option<Stamp>, Option<Stamp>),
    checked: Instant,
}

impl Reloading {
    fn new(cert: PathBuf, key: PathBuf, provider: Arc<CryptoProvider>) -> Result<Self, TlsError> {
        let stamps = (stamp(&cert), stamp(&key));
        let current = Arc::new(certified_key(&cert, &key, &provider)?);
        Ok(Self {
            cert,
            key,
            provider,
            state: Mutex::new(State {
                current,
                stamps,
                checked: Instant::now(),
            }),
        })
    }

    /// The current certificate, read again first when the files changed since the last look
    /// (at most once per [`RELOAD_CHECK`]). A renewal caught half-written keeps the old one until
    /// the files read whole.
    fn current(&self) -> Arc<CertifiedKey> {
        let mut state = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if state.checked.elapsed() < RELOAD_CHECK {
            return state.current.clone();
        }
        state.checked = Instant::now();
        let stamps = (stamp(&self.cert), stamp(&self.key));
        if stamps != state.stamps {
            match certified_key(&self.cert, &self.key, &self.provider) {
                Ok(key) => {
                    state.current = Arc::new(key);
                    state.stamps = stamps;
                    metrics::counter!("concord_tls_certificate_reloads_total").increment(1);
                    tracing::info!(cert = %self.cert.display(), "TLS certificate read again");
                }
                Err(e) => tracing::warn!(error = %e, "renewed TLS certificate unusable; serving the previous one"),
            }
        }
        state.current.clone()
    }
}

impl ResolvesServerCert for Reloading {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}
