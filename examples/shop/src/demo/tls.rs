//! The certificates of a `demo --tls` run: a certificate authority made for the run, and for
//! each process a certificate for `127.0.0.1` and `localhost` that it serves with and shows as a
//! client. Every process requires a client certificate of that authority (mutual TLS), so every
//! call of the run, the demo's own included, is authenticated both ways and encrypted.

use concord_sdk::ClientTls;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use std::path::{Path, PathBuf};

/// The run's authority and where its files are.
pub struct RunPki {
    dir: PathBuf,
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl RunPki {
    /// A new authority, its certificate written to `dir/ca.pem`.
    ///
    /// # Errors
    /// The file system's, or rcgen's.
    pub fn create(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "concord-shop demo CA");
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
        std::fs::write(dir.join("ca.pem"), issuer.pem())?;
        Ok(Self {
            dir: dir.to_path_buf(),
            issuer,
        })
    }

    /// Issues `name`'s certificate and key (`name.pem`, `name.key`, the key readable by its owner
    /// only).
    ///
    /// # Errors
    /// The file system's, or rcgen's.
    pub fn issue(&self, name: &str) -> anyhow::Result<()> {
        let mut params = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])?;
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        std::fs::write(self.cert(name), cert.pem())?;
        let mut file = std::fs::OpenOptions::new();
        file.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut file, 0o600);
        std::io::Write::write_all(&mut file.open(self.key(name))?, key.serialize_pem().as_bytes())?;
        Ok(())
    }

    fn cert(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.pem"))
    }

    fn key(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.key"))
    }

    /// What `name` shows and trusts as a client.
    #[must_use]
    pub fn client(&self, name: &str) -> ClientTls {
        ClientTls {
            ca: Some(self.dir.join("ca.pem")),
            client_cert: Some(self.cert(name)),
            client_key: Some(self.key(name)),
        }
    }

    /// The settings of process `name`: it serves over mutual TLS and calls others over it.
    #[must_use]
    pub fn env(&self, name: &str) -> Vec<(String, String)> {
        let path = |p: PathBuf| p.display().to_string();
        vec![
            ("CONCORD_TLS_CERT".into(), path(self.cert(name))),
            ("CONCORD_TLS_KEY".into(), path(self.key(name))),
            ("CONCORD_TLS_CLIENT_CA".into(), path(self.dir.join("ca.pem"))),
            ("CONCORD_TLS_CA".into(), path(self.dir.join("ca.pem"))),
            ("CONCORD_TLS_CLIENT_CERT".into(), path(self.cert(name))),
            ("CONCORD_TLS_CLIENT_KEY".into(), path(self.key(name))),
        ]
    }
}
