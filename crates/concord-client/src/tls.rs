//! TLS of a client: which certificate authorities it trusts beyond the system's, and the
//! certificate it shows a server that asks for one (mutual TLS). Every client Concord ships (the
//! command line, `concord healthcheck`, the relay, the server's own calls to saga steps and 2PC
//! participants) reads the same three settings; a program on this crate passes them to
//! [`Client::with_tls`](crate::Client::with_tls), from [`ClientTls::from_env`] or its own.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

use crate::ClientError;

/// The environment variable naming a PEM bundle of certificate authorities to trust.
pub const ENV_CA: &str = "CONCORD_TLS_CA";
/// The environment variable naming the client's PEM certificate chain, for mutual TLS.
pub const ENV_CLIENT_CERT: &str = "CONCORD_TLS_CLIENT_CERT";
/// The environment variable naming the client certificate's PEM private key.
pub const ENV_CLIENT_KEY: &str = "CONCORD_TLS_CLIENT_KEY";

/// TLS settings of a client. The default trusts the system's roots and shows no certificate.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientTls {
    /// A PEM bundle of certificate authorities trusted in addition to the system's roots (a
    /// private CA that signs the servers' certificates).
    pub ca: Option<PathBuf>,
    /// The certificate chain (PEM) shown to a server that asks for one; needs [`Self::client_key`].
    pub client_cert: Option<PathBuf>,
    /// The private key (PEM: PKCS#8, PKCS#1 or SEC1) of [`Self::client_cert`].
    pub client_key: Option<PathBuf>,
}

impl ClientTls {
    /// The settings from `CONCORD_TLS_CA`, `CONCORD_TLS_CLIENT_CERT` and `CONCORD_TLS_CLIENT_KEY`;
    /// an unset or empty variable leaves its setting unset.
    #[must_use]
    pub fn from_env() -> Self {
        let var = |name| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
        Self {
            ca: var(ENV_CA),
            client_cert: var(ENV_CLIENT_CERT),
            client_key: var(ENV_CLIENT_KEY),
        }
    }

    /// Whether any setting is set.
    #[must_use]
    pub fn is_set(&self) -> bool {
        self.ca.is_some() || self.client_cert.is_some() || self.client_key.is_some()
    }

    /// `builder` with these settings. The CA bundle is read now; the client certificate now and
    /// again whenever its files change (see [`ReloadingKey`]), so a renewed certificate is shown
    /// without building the client again. Unset, reqwest's own TLS (the system's roots) stays.
    ///
    /// # Errors
    /// [`ClientError::Config`] when a file cannot be read or holds no certificate (or no key), or
    /// when only one of the client certificate and its key is set.
    pub fn apply(&self, builder: reqwest::ClientBuilder) -> Result<reqwest::ClientBuilder, ClientError> {
        if !self.is_set() {
            return Ok(builder);
        }
        let config_error = |e: &dyn std::fmt::Display| ClientError::Config(e.to_string());
        let extra_roots = match &self.ca {
            Some(ca) => certificates(ca, "CA bundle").map_err(|e| config_error(&e))?,
            None => Vec::new(),
        };
        let provider = provider();
        // The system's roots and the bundle's, verified as reqwest verifies by default.
        let verifier = rustls_platform_verifier::Verifier::new_with_extra_roots(extra_roots, provider.clone())
            .map_err(|e| config_error(&e))?;
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| config_error(&e))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier));
        let mut config = match (&self.client_cert, &self.client_key) {
            (None, None) => config.with_no_client_auth(),
            (Some(cert), Some(key)) => {
                let key = ReloadingKey::load(cert, key).map_err(|e| config_error(&e))?;
                config.with_client_cert_resolver(Arc::new(key))
            }
            _ => {
                return Err(ClientError::Config(format!(
                    "a client certificate needs its key: set both {ENV_CLIENT_CERT} and {ENV_CLIENT_KEY} \
                     (or neither)"
                )));
            }
        };
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(builder.tls_backend_preconfigured(config))
    }
}

/// A TLS file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsFileError {
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
}

/// The process's rustls provider (ring, the one the tree builds), or ring when none is
/// installed yet.
#[must_use]
pub fn provider() -> Arc<CryptoProvider> {
    CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()))
}

fn invalid(what: &'static str, path: &Path, e: impl std::fmt::Display) -> TlsFileError {
    TlsFileError::Invalid {
        what,
        path: path.to_path_buf(),
        detail: e.to_string(),
    }
}

fn read_file(path: &Path, what: &'static str) -> Result<Vec<u8>, TlsFileError> {
    std::fs::read(path).map_err(|source| TlsFileError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

/// The certificates of a PEM file; at least one.
///
/// # Errors
/// A file that cannot be read, does not parse, or holds no certificate.
pub fn certificates(path: &Path, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsFileError> {
    let pem = read_file(path, what)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(what, path, e))?;
    if certs.is_empty() {
        return Err(invalid(what, path, "no certificate in the file"));
    }
    Ok(certs)
}

fn certified_key(cert: &Path, key: &Path, provider: &CryptoProvider) -> Result<CertifiedKey, TlsFileError> {
    let chain = certificates(cert, "certificate")?;
    let pem = zeroize::Zeroizing::new(read_file(key, "private key")?);
    // The file's bytes are wiped when `pem` drops, the parsed key when rustls drops it.
    let parsed = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| invalid("private key", key, e))?;
    CertifiedKey::from_der(chain, parsed, provider).map_err(|e| invalid("private key", key, e))
}

/// How often, at most, a handshake looks whether the certificate files changed.
const RELOAD_CHECK: Duration = Duration::from_secs(1);

/// What a file looked like when last read: a renewal changes one of these. A Kubernetes Secret
/// volume swaps a symbolic link (a new inode); a rewrite in place that keeps the modification
/// time (`cp -p`) still moves the change time, which no program can set.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp(Option<SystemTime>, u64, [i64; 3]);

fn stamp(path: &Path) -> Option<Stamp> {
    let meta = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    let unix = {
        use std::os::unix::fs::MetadataExt as _;
        [
            i64::try_from(meta.ino()).unwrap_or(i64::MAX),
            meta.ctime(),
            meta.ctime_nsec(),
        ]
    };
    #[cfg(not(unix))]
    let unix = [0; 3];
    Some(Stamp(meta.modified().ok(), meta.len(), unix))
}

/// A certificate and key read from PEM files and read again when the files change: the server
/// certificate of `concord_sdk::serve` and the client certificate of [`ClientTls`] both renew
/// without a restart. The files are looked at, at most once per second, by the handshake that
/// needs the key; a renewal caught half-written (or a key that does not match its certificate)
/// keeps the last good pair in service until the files read whole.
#[derive(Debug)]
pub struct ReloadingKey {
    cert: PathBuf,
    key: PathBuf,
    provider: Arc<CryptoProvider>,
    state: Mutex<KeyState>,
}

#[derive(Debug)]
struct KeyState {
    current: Arc<CertifiedKey>,
    stamps: (Option<Stamp>, Option<Stamp>),
    checked: Instant,
    /// A handshake is looking at the files: the others serve the current pair meanwhile.
    checking: bool,
}

impl ReloadingKey {
    /// Reads the pair now.
    ///
    /// # Errors
    /// A file that cannot be read or parsed, or a key that does not match the certificate.
    pub fn load(cert: &Path, key: &Path) -> Result<Self, TlsFileError> {
        let provider = provider();
        // Stamped before reading: a change during the read is seen at the next look.
        let stamps = (stamp(cert), stamp(key));
        let current = Arc::new(certified_key(cert, key, &provider)?);
        Ok(Self {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            provider,
            state: Mutex::new(KeyState {
                current,
                stamps,
                checked: Instant::now(),
                checking: false,
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, KeyState> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The current pair, read again first when the files changed since the last look. The
    /// lock is never held over the file system: one handshake looks, the others go on with the
    /// pair they have.
    #[must_use]
    pub fn current(&self) -> Arc<CertifiedKey> {
        let seen = {
            let mut state = self.lock();
            if state.checking || state.checked.elapsed() < RELOAD_CHECK {
                return state.current.clone();
            }
            state.checking = true;
            state.stamps.clone()
        };
        let stamps = (stamp(&self.cert), stamp(&self.key));
        let renewed = if stamps == seen {
            None
        } else {
            match certified_key(&self.cert, &self.key, &self.provider) {
                Ok(key) => Some(Arc::new(key)),
                Err(e) => {
                    tracing::warn!(error = %e, "renewed TLS certificate unusable; keeping the previous one");
                    None
                }
            }
        };
        let mut state = self.lock();
        state.checking = false;
        state.checked = Instant::now();
        if let Some(key) = renewed {
            state.current = key;
            state.stamps = stamps;
        }
        state.current.clone()
    }
}

impl rustls::server::ResolvesServerCert for ReloadingKey {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

impl rustls::client::ResolvesClientCert for ReloadingKey {
    fn resolve(&self, _issuers: &[&[u8]], _schemes: &[rustls::SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }

    fn has_certs(&self) -> bool {
        true
    }
}
