//! Certificates made inside a test: an authority, leaves for 127.0.0.1 and localhost, and the
//! files a server and its clients read.
#![allow(dead_code)]

use concord_sdk::ClientTls;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use std::path::{Path, PathBuf};

/// A certificate authority made for one test.
pub struct Authority {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Authority {
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        Self {
            issuer: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap(),
        }
    }

    /// A leaf for `127.0.0.1` and `localhost` named `name`: (certificate PEM, key PEM, DER).
    pub fn leaf(&self, name: &str) -> (String, String, Vec<u8>) {
        let mut params = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem(), cert.der().to_vec())
    }

    pub fn pem(&self) -> String {
        self.issuer.pem()
    }
}

/// Writes `contents` to `dir/name` the way a renewal does (a new file renamed over the old).
pub fn put(dir: &Path, name: &str, contents: &str) -> PathBuf {
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    path
}

pub struct Pki {
    pub dir: tempfile::TempDir,
    pub ca: Authority,
}

impl Pki {
    pub fn new() -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().unwrap();
        let ca = Authority::new("concord test CA");
        put(dir.path(), "ca.pem", &ca.pem());
        Self { dir, ca }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Issues a leaf into `<name>.pem` and `<name>.key`; its DER.
    pub fn issue(&self, name: &str) -> Vec<u8> {
        let (cert, key, der) = self.ca.leaf(name);
        put(self.dir.path(), &format!("{name}.key"), &key);
        put(self.dir.path(), &format!("{name}.pem"), &cert);
        der
    }

    pub fn client_tls(&self, identity: Option<&str>) -> ClientTls {
        ClientTls {
            ca: Some(self.path("ca.pem")),
            client_cert: identity.map(|n| self.path(&format!("{n}.pem"))),
            client_key: identity.map(|n| self.path(&format!("{n}.key"))),
        }
    }

    pub fn http(&self, identity: Option<&str>) -> reqwest::Client {
        self.client_tls(identity)
            .apply(reqwest::Client::builder().tls_info(true).pool_max_idle_per_host(0))
            .unwrap()
            .build()
            .unwrap()
    }
}
