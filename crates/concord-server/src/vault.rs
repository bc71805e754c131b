//! Opening the vault: its own database and the master key that opens its keyring.

use crate::config::Settings;
use anyhow::Context as _;
use concord_core::app::vault::Vault;
use concord_core::domain::vault::SecretKey;
use concord_core::ports::{EventStore, VaultStore};
use concord_store_postgres::PostgresVaultStore;
use concord_store_sqlite::SqliteVaultStore;
use std::path::PathBuf;
use std::sync::Arc;

/// Opens the vault's database and the vault on it.
///
/// # Errors
/// An unreachable database, or a master key that is missing, malformed or not the one this vault
/// was created with.
pub async fn open(settings: &Settings, events: Arc<dyn EventStore>) -> anyhow::Result<Arc<Vault>> {
    let url = settings.vault_url();
    let store: Arc<dyn VaultStore> = if url.starts_with("sqlite:") {
        Arc::new(
            SqliteVaultStore::connect(&url, settings.sqlite_synchronous_full)
                .await
                .context("opening the vault's SQLite database")?,
        )
    } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
        Arc::new(
            PostgresVaultStore::connect(&url, settings.db_connections)
                .await
                .context("opening the vault's PostgreSQL database")?,
        )
    } else {
        anyhow::bail!("vault database URL must start with sqlite:// or postgres://")
    };
    let master = master_key(settings, &url, store.as_ref()).await?;
    let mut config = settings.vault_config();
    config.previous_master_keys = settings
        .vault_previous_master_keys
        .iter()
        .map(|k| SecretKey::from_base64(k.expose()))
        .collect::<Result<_, _>>()
        .context("CONCORD_VAULT_PREVIOUS_MASTER_KEYS")?;
    let vault = Vault::open(store, events, master, config)
        .await
        .context("opening the vault")?;
    Ok(Arc::new(vault))
}

/// Where the key file is when none is configured: beside a SQLite vault, else in the working
/// directory.
fn default_key_file(vault_url: &str) -> PathBuf {
    match vault_url.strip_prefix("sqlite://") {
        Some(rest) if !rest.contains(":memory:") => {
            let path = rest.split('?').next().unwrap_or(rest);
            PathBuf::from(path.strip_suffix(".db").unwrap_or(path)).with_extension("key")
        }
        _ => PathBuf::from("concord-vault.key"),
    }
}

async fn master_key(settings: &Settings, vault_url: &str, store: &dyn VaultStore) -> anyhow::Result<SecretKey> {
    if let Some(text) = &settings.vault_master_key {
        return SecretKey::from_base64(text.expose()).context("CONCORD_VAULT_MASTER_KEY");
    }
    let path = settings
        .vault_master_key_file
        .as_ref()
        .map_or_else(|| default_key_file(vault_url), PathBuf::from);
    match std::fs::read_to_string(&path).map(zeroize::Zeroizing::new) {
        Ok(text) => SecretKey::from_base64(&text).with_context(|| format!("vault master key file {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            anyhow::ensure!(
                store.master_keys().await?.is_empty(),
                "the vault at {vault_url} has keys, but no master key is configured and {} does not exist: \
                 set CONCORD_VAULT_MASTER_KEY or vault_master_key_file to the key it was created with",
                path.display()
            );
            let key = SecretKey::generate()?;
            write_key_file(&path, &key)?;
            tracing::warn!(
                path = %path.display(),
                "generated the vault's master key; keep a copy apart from the databases: without it no token \
                 can be revealed, and whoever holds both can reveal them all"
            );
            Ok(key)
        }
        Err(e) => Err(e).with_context(|| format!("reading vault master key file {}", path.display())),
    }
}

fn write_key_file(path: &std::path::Path, key: &SecretKey) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(path)
        .with_context(|| format!("creating vault master key file {}", path.display()))?;
    file.write_all(key.to_base64().as_bytes())?;
    file.write_all(b"\n")?;
    file.sync_all()?;
    // The file's name is durable only once its directory is: fsync it too, or a crash could
    // leave a vault whose keyring was sealed under a key that no file holds.
    #[cfg(unix)]
    {
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(std::path::Path::new("."));
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("syncing the directory of {}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_file_sits_beside_a_sqlite_vault() {
        assert_eq!(
            default_key_file("sqlite:///data/concord-vault.db"),
            PathBuf::from("/data/concord-vault.key")
        );
        assert_eq!(default_key_file("sqlite://v.db?mode=rwc"), PathBuf::from("v.key"));
        assert_eq!(
            default_key_file("postgres://db/vault"),
            PathBuf::from("concord-vault.key")
        );
    }
}
