//! The OS keyring (the Secret Service on Linux, through the `keyring`
//! crate's pure-Rust D-Bus backend), where one answers. The secret store
//! keeps its index (service, scope, time) in its file either way; with a
//! keyring, the values live there instead of in the file.

use crate::store::{SecretValue, StoreError};

/// The keyring's service attribute for every sandpen entry; the account is
/// `SERVICE@SCOPE`.
pub const KEYRING_SERVICE: &str = "sandpen";

/// A keyring that answered a probe.
#[derive(Debug, Clone)]
pub struct Keyring(());

fn failure(op: &'static str, e: keyring::Error) -> StoreError {
    // keyring's messages name the platform failure, never a value.
    StoreError::Keyring {
        op,
        reason: e.to_string(),
    }
}

impl Keyring {
    /// The OS keyring, or why none answers (no session bus, no Secret
    /// Service, a locked collection that needs a prompt, ...).
    pub fn detect() -> Result<Keyring, String> {
        if let Err(e) = keyring::Entry::store_status() {
            return Err(e.to_string());
        }
        let probe =
            keyring::Entry::new(KEYRING_SERVICE, "probe@sandpen").map_err(|e| e.to_string())?;
        match probe.get_password() {
            Ok(_) | Err(keyring::Error::NoEntry) => Ok(Keyring(())),
            Err(e) => Err(e.to_string()),
        }
    }

    /// The OS keyring, not asked anything yet: the first value read or
    /// written opens the session bus. For a process that must not talk to
    /// D-Bus (nor start the D-Bus client's threads) before it needs a value:
    /// the supervisor, which confines itself first. A keyring that does not
    /// answer then fails that read, naming why.
    pub fn unprobed() -> Keyring {
        Keyring(())
    }

    fn entry(&self, account: &str) -> Result<keyring::Entry, StoreError> {
        keyring::Entry::new(KEYRING_SERVICE, account).map_err(|e| failure("open", e))
    }

    pub(crate) fn set(&self, account: &str, value: &SecretValue) -> Result<(), StoreError> {
        self.entry(account)?
            .set_password(value.expose())
            .map_err(|e| failure("store", e))
    }

    pub(crate) fn get(&self, account: &str) -> Result<Option<SecretValue>, StoreError> {
        match self.entry(account)?.get_password() {
            Ok(v) => Ok(Some(SecretValue::new(v))),
            Err(keyring::Error::NoEntry) => Ok(None),
            Err(e) => Err(failure("read", e)),
        }
    }

    pub(crate) fn delete(&self, account: &str) -> Result<(), StoreError> {
        match self.entry(account)?.delete_credential() {
            Ok(()) | Err(keyring::Error::NoEntry) => Ok(()),
            Err(e) => Err(failure("delete", e)),
        }
    }
}
