use std::io::Write;
use std::os::unix::fs::MetadataExt;

use super::*;

const URL: &str = "https://nodejs.org/dist/v22.23.5/node-v22.23.5-linux-x64.tar.gz";

/// One archive entry: path, kind, mode, body or link target.
enum Item<'a> {
    Dir(&'a str),
    File(&'a str, u32, &'a [u8]),
    Symlink(&'a str, &'a str),
    Fifo(&'a str),
}

fn archive(items: &[Item]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for item in items {
        let mut h = tar::Header::new_gnu();
        h.set_mtime(1_700_000_000);
        let (path, data): (&str, &[u8]) = match item {
            Item::Dir(p) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                (p, b"")
            }
            Item::File(p, mode, body) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                (p, body)
            }
            Item::Symlink(p, target) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_link_name(target).unwrap();
                (p, b"")
            }
            Item::Fifo(p) => {
                h.set_entry_type(tar::EntryType::Fifo);
                h.set_mode(0o644);
                (p, b"")
            }
        };
        h.set_size(data.len() as u64);
        // Bypasses the builder's own path checks: the tests need bad paths.
        let name = path.as_bytes();
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.set_cksum();
        b.append(&h, data).unwrap();
    }
    let tar = b.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).unwrap();
    gz.finish().unwrap()
}

/// A cache in a fresh folder that holds `bytes` as the body of `URL`.
fn cached(bytes: &[u8]) -> (tempfile::TempDir, ToolCache) {
    let dir = tempfile::tempdir().unwrap();
    let cache = ToolCache::open(&dir.path().join("toolchains"), "").unwrap();
    let mut f = cache.filling(URL, bytes.len() as u64, None).unwrap();
    f.write(bytes).unwrap();
    f.finish().unwrap();
    (dir, cache)
}

fn node() -> Vec<u8> {
    archive(&[
        Item::Dir("node-v22.23.5-linux-x64/"),
        Item::Dir("node-v22.23.5-linux-x64/bin/"),
        Item::File("node-v22.23.5-linux-x64/bin/node", 0o4775, b"\x7fELF node"),
        Item::Symlink(
            "node-v22.23.5-linux-x64/bin/npm",
            "../lib/node_modules/npm/bin/npm-cli.js",
        ),
        Item::Dir("node-v22.23.5-linux-x64/lib/"),
        Item::File("node-v22.23.5-linux-x64/lib/README.md", 0o666, b"read me"),
    ])
}

#[test]
fn only_exact_versions_of_tree_tools_have_an_archive() {
    assert_eq!(archive_url("node", "22.23.5").as_deref(), Some(URL));
    for v in [
        "22",
        "22.23",
        "lts",
        "22.23.5-rc.1",
        "../1.2.3",
        "1.2.3/x",
        "",
    ] {
        assert_eq!(archive_url("node", v), None, "{v}");
    }
    assert_eq!(archive_url("python", "3.12.7"), None);
}

#[test]
fn a_cached_archive_becomes_a_sealed_tree_once() {
    let (_dir, cache) = cached(&node());
    assert!(cache
        .tree("https://nodejs.org/dist/v1.0.0/x.tar.gz")
        .unwrap()
        .is_none());
    let tree = cache.tree(URL).unwrap().unwrap();
    assert_eq!(tree.dir, cache.dir().join("trees").join(&tree.sha256));
    // The archive's one top folder is the tree's root.
    let node = tree.dir.join("bin/node");
    assert_eq!(fs::read(&node).unwrap(), b"\x7fELF node");
    // No set-uid bit, no write bit; the folders stay removable.
    assert_eq!(fs::metadata(&node).unwrap().mode() & 0o7777, 0o555);
    assert_eq!(
        fs::metadata(tree.dir.join("lib/README.md")).unwrap().mode() & 0o7777,
        0o444
    );
    assert_eq!(
        fs::read_link(tree.dir.join("bin/npm")).unwrap(),
        Path::new("../lib/node_modules/npm/bin/npm-cli.js")
    );
    // The second time is the same tree, not a second unpack.
    let ino = fs::metadata(&node).unwrap().ino();
    let again = cache.tree(URL).unwrap().unwrap();
    assert_eq!(fs::metadata(again.dir.join("bin/node")).unwrap().ino(), ino);
    assert_eq!(fs::read_dir(cache.dir().join("tmp")).unwrap().count(), 0);
}

#[test]
fn an_archive_with_a_device_or_a_way_out_is_refused_whole() {
    let outside = tempfile::tempdir().unwrap();
    let escape = outside.path().join("escaped");
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("Fifo", archive(&[Item::Dir("t/"), Item::Fifo("t/pipe")])),
        (
            "leaving",
            archive(&[Item::Dir("t/"), Item::File("t/../../escaped", 0o644, b"x")]),
        ),
        (
            "outside",
            archive(&[
                Item::Symlink("link", outside.path().to_str().unwrap()),
                Item::File("link/escaped", 0o644, b"x"),
            ]),
        ),
    ];
    for (why, bytes) in cases {
        let (_dir, cache) = cached(&bytes);
        let err = cache.tree(URL).unwrap_err().to_string();
        assert!(err.contains(why), "{why}: {err}");
        assert_eq!(fs::read_dir(cache.dir().join("trees")).unwrap().count(), 0);
        assert_eq!(fs::read_dir(cache.dir().join("tmp")).unwrap().count(), 0);
        assert!(!escape.exists(), "{why}: wrote outside the tree");
    }
    // An absolute path is taken as relative to the tree's root.
    let (_dir, cache) = cached(&archive(&[Item::File(
        "/tmp/absolute-from-tree-test",
        0o644,
        b"x",
    )]));
    let tree = cache.tree(URL).unwrap().unwrap();
    assert!(tree.dir.join("absolute-from-tree-test").is_file());
    assert!(!Path::new("/tmp/absolute-from-tree-test").exists());
}

#[test]
fn a_view_holds_only_the_trees_given_and_shares_their_files() {
    let (dir, cache) = cached(&node());
    let tree = cache.tree(URL).unwrap().unwrap();
    let view = dir.path().join("sandbox/toolchains");
    let name = publish(&tree, &view).unwrap();
    assert_eq!(name, tree.sha256);
    let listed: Vec<_> = fs::read_dir(&view)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(listed, vec![std::ffi::OsString::from(&name)]);
    let shown = view.join(&name).join("bin/node");
    assert_eq!(
        fs::metadata(&shown).unwrap().ino(),
        fs::metadata(tree.dir.join("bin/node")).unwrap().ino()
    );
    assert!(fs::symlink_metadata(view.join(&name).join("bin/npm"))
        .unwrap()
        .file_type()
        .is_symlink());
    // Given twice, it is the same view; removing it leaves the tree.
    assert_eq!(publish(&tree, &view).unwrap(), name);
    remove_tree(&view).unwrap();
    assert!(tree.dir.join("bin/node").is_file());
}
