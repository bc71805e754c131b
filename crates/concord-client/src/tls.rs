//! TLS of a client: which certificate authorities it trusts beyond the system's, and the
//! certificate it shows a server that asks for one (mutual TLS). Every client Concord has (this
//! crate's [`Client`](crate::Client), the command line, the relay, the server's own calls to
//! saga steps and 2PC participants) reads the same three settings.

use std::path::{Path, PathBuf};

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

    /// `builder` with these settings: the files are read now.
    ///
    /// # Errors
    /// [`ClientError::Config`] when a file cannot be read or holds no certificate (or no key), or
    /// when only one of the client certificate and its key is set.
    pub fn apply(&self, mut builder: reqwest::ClientBuilder) -> Result<reqwest::ClientBuilder, ClientError> {
        if let Some(ca) = &self.ca {
            let pem = read(ca, "CA bundle")?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| ClientError::Config(format!("CA bundle {}: {e}", ca.display())))?;
            if certs.is_empty() {
                return Err(ClientError::Config(format!(
                    "CA bundle {} holds no certificate",
                    ca.display()
                )));
            }
            builder = builder.tls_certs_merge(certs);
        }
        match (&self.client_cert, &self.client_key) {
            (None, None) => {}
            (Some(cert), Some(key)) => {
                let mut pem = read(cert, "client certificate")?;
                pem.push(b'\n');
                pem.extend_from_slice(&read(key, "client key")?);
                let identity = reqwest::Identity::from_pem(&pem).map_err(|e| {
                    ClientError::Config(format!(
                        "client certificate {} with key {}: {e}",
                        cert.display(),
                        key.display()
                    ))
                })?;
                builder = builder.identity(identity);
            }
            _ => {
                return Err(ClientError::Config(format!(
                    "a client certificate needs its key: set both {ENV_CLIENT_CERT} and {ENV_CLIENT_KEY} \
                     (or neither)"
                )));
            }
        }
        Ok(builder)
    }
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>, ClientError> {
    std::fs::read(path).map_err(|e| ClientError::Config(format!("cannot read the {what} {}: {e}", path.display())))
}
