//! The secret store with a real OS keyring: a private D-Bus session with
//! gnome-keyring's Secret Service (Debian: `dbus-daemon gnome-keyring`),
//! started by the test itself, in a throwaway home.
//!
//! The test re-runs itself inside `dbus-run-session`; the inner run does the
//! checks. Values go to the keyring, the file keeps only the index, and a
//! process that cannot reach the keyring fails closed instead of guessing.

use std::process::Command;

use sandpen_credentials::{FileStore, Keyring, Scope, SecretValue};

const INNER: &str = "SANDPEN_KEYRING_TEST_INNER";
const SECRET: &str = "sk-keyring-e2e-5b1f0c9a7d";
/// Set (to the store's path) for the fresh process of `unprobed_reader`.
const UNPROBED: &str = "SANDPEN_KEYRING_TEST_UNPROBED";

/// This process's threads' names.
fn threads() -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|n| n.trim().to_string())
        .collect()
}

#[test]
fn unprobed_reader() {
    let Some(path) = std::env::var_os(UNPROBED) else {
        return; // only as the fresh process the keyring test starts
    };
    let store = FileStore::new(&path).with_keyring(Keyring::unprobed());
    let before = threads();
    assert_eq!(store.list().unwrap().len(), 2);
    assert_eq!(threads(), before, "listing the index started threads");
    let found = store.get("anthropic", None).unwrap().unwrap();
    assert_eq!(found.value.expose(), SECRET);
    let after = threads();
    eprintln!("threads before a value was read: {before:?}; after: {after:?}");
    assert!(
        after.len() > before.len(),
        "the read did not reach the D-Bus client (no thread of its own): {after:?}"
    );
}

#[test]
fn values_live_in_the_os_keyring_and_the_file_is_only_an_index() {
    if std::env::var_os(INNER).is_some() {
        return inner();
    }
    for tool in ["dbus-run-session", "gnome-keyring-daemon"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        assert!(
            found,
            "{tool} is missing: apt-get install dbus-daemon gnome-keyring"
        );
    }
    let home = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let out = Command::new("dbus-run-session")
        .arg("--")
        .arg("sh")
        .arg("-c")
        .arg(
            "printf pw | gnome-keyring-daemon --unlock --components=secrets >/dev/null && \
             exec \"$0\" --exact values_live_in_the_os_keyring_and_the_file_is_only_an_index --nocapture --test-threads 1",
        )
        .arg(&exe)
        .env(INNER, "1")
        .env("HOME", home.path())
        .env("XDG_DATA_HOME", home.path().join("data"))
        .env("XDG_RUNTIME_DIR", home.path())
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "inner run failed:\n{text}");
    assert!(
        text.contains("1 passed"),
        "the inner test did not run:\n{text}"
    );
}

fn inner() {
    let keyring = Keyring::detect().expect("the Secret Service answers");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("secrets");
    let store = FileStore::new(&path).with_keyring(keyring);
    assert_eq!(store.backend(), "OS keyring");
    store
        .set("anthropic", Scope::Global, SecretValue::new(SECRET))
        .unwrap();
    store
        .set(
            "github",
            Scope::Sandbox("app".into()),
            SecretValue::new("ghp-in-keyring"),
        )
        .unwrap();

    // The file is the index only.
    let file = std::fs::read_to_string(&path).unwrap();
    assert!(
        !file.contains(SECRET) && !file.contains("ghp-in-keyring"),
        "{file}"
    );
    assert!(file.contains("\"in_keyring\": true"), "{file}");

    let found = store.get("anthropic", Some("app")).unwrap().unwrap();
    assert_eq!(found.value.expose(), SECRET);
    assert_eq!(found.scope, Scope::Global);
    let gh = store.get("github", Some("app")).unwrap().unwrap();
    assert_eq!(gh.value.expose(), "ghp-in-keyring");
    assert_eq!(store.list().unwrap().len(), 2);

    // A process without the keyring fails closed, naming the way out.
    let file_only = FileStore::new(&path);
    let err = file_only.get("anthropic", None).unwrap_err().to_string();
    assert!(err.contains("OS keyring"), "{err}");
    assert!(!err.contains(SECRET));

    // The value is really in the Secret Service, under sandpen's account.
    let item = keyring::Entry::new("sandpen", "anthropic@global").unwrap();
    assert_eq!(item.get_password().unwrap(), SECRET);

    // A store whose keyring is not probed (the supervisor's) opens no
    // session-bus connection, and so starts none of the D-Bus client's
    // threads, until a value is read: checked in a fresh process.
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "unprobed_reader",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(UNPROBED, &path)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && text.contains("1 passed"), "{text}");

    // Removing deletes the keyring item too.
    assert!(store.remove("anthropic", &Scope::Global).unwrap());
    assert!(store.get("anthropic", None).unwrap().is_none());
    assert!(matches!(item.get_password(), Err(keyring::Error::NoEntry)));
}
