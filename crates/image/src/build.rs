//! `build`: debootstrap a rootfs, take its kernel and boot modules, make the ext4
//! image and the manifest, in a temporary directory renamed into place at the end.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use time::OffsetDateTime;

use crate::error::{ImageError, IoContext};
use crate::kernel::{self, Unpacked};
use crate::manifest::{FileEntry, Manifest, Sizes, StepTiming, MANIFEST_FORMAT};
use crate::modules;
use crate::spec::{ca_dest_name, ImageSpec, BASE_PACKAGES, HOST_CA_DIR, RECIPE_VERSION};
use crate::store::{self, Image, ROOTFS_FILE, VMLINUX_FILE, VMLINUZ_FILE};
use crate::tree::{self, HostDns, MountGuard, NoServices, TreeKind};
use crate::{fsutil, BuildOutcome};

/// The build log's name, in the build directory and then in the image directory.
pub const BUILD_LOG_FILE: &str = "build.log";

/// Extra room in the ext4 on top of the content: 20 % plus 512 MiB.
const ROOTFS_SLACK_PERCENT: u64 = 20;
const ROOTFS_SLACK_BYTES: u64 = 512 << 20;
/// mkfs.ext4's default bytes-per-inode for filesystems of this size.
const EXT4_BYTES_PER_INODE: u64 = 16 << 10;

/// Lines of a failed command's log put into the error.
const LOG_TAIL_LINES: usize = 25;

const CHROOT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Absolute paths of the host tools.
struct Tools {
    debootstrap: PathBuf,
    mkfs_ext4: PathBuf,
    chroot: PathBuf,
    xz: PathBuf,
    cp: PathBuf,
}

/// Builds the image `spec` describes under `images_root/NAME`, unless an image with
/// the same key and all its files is already there.
pub fn build(
    images_root: &Path,
    spec: &ImageSpec,
    progress: &MultiProgress,
) -> Result<BuildOutcome, ImageError> {
    store::validate_name(&spec.name)?;
    spec.validate()?;
    let key = spec.key();
    match store::load(images_root, &spec.name) {
        Ok(image) if image.manifest.key == key && image.manifest.files_present(&image.dir) => {
            return Ok(BuildOutcome::UpToDate(image));
        }
        _ => {}
    }

    let tools = check_tools()?;
    check_root()?;
    let owner = sudo_owner();
    create_dirs_owned(images_root, owner)?;
    remove_stale_builds(images_root, &spec.name);

    let build_dir = images_root.join(format!(".{}.build-{}", spec.name, std::process::id()));
    fsutil::remove_tree(&build_dir)?;
    fs::create_dir(&build_dir)
        .ctx(|| format!("creating build directory {}", build_dir.display()))?;

    let started = Instant::now();
    let result = Builder {
        images_root,
        spec,
        key: &key,
        dir: &build_dir,
        tools: &tools,
        progress,
    }
    .run(started)
    .and_then(|manifest| Ok((manifest, install(images_root, &spec.name, &build_dir)?)));

    match result {
        Ok((manifest, dir)) => {
            if let Some(owner) = owner {
                chown_tree(&dir, owner);
            }
            let failed_log = failed_log_path(images_root, &spec.name);
            let _ = fs::remove_file(failed_log);
            Ok(BuildOutcome::Built(Image {
                name: spec.name.clone(),
                dir,
                manifest,
            }))
        }
        Err(err) => {
            let err = keep_failed_log(images_root, &spec.name, &build_dir, err);
            if let Err(cleanup) = fsutil::remove_tree(&build_dir) {
                tracing::warn!("could not remove the failed build's directory: {cleanup}");
            }
            Err(err)
        }
    }
}

/// Everything one build needs.
struct Builder<'a> {
    images_root: &'a Path,
    spec: &'a ImageSpec,
    key: &'a str,
    dir: &'a Path,
    tools: &'a Tools,
    progress: &'a MultiProgress,
}

impl Builder<'_> {
    fn root(&self) -> PathBuf {
        self.dir.join("root")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join(BUILD_LOG_FILE)
    }

    fn run(&self, started: Instant) -> Result<Manifest, ImageError> {
        let root = self.root();
        let packages = self.spec.all_packages();
        let mut timings = Vec::new();

        // The cached trees: debootstrap once per suite, mirror and CA set; the
        // extra packages once per package set (all agent images share it).
        let mut tree = self.base_tree(&mut timings)?;
        if !self.spec.extra_packages().is_empty() {
            tree = self.packages_tree(&tree, &mut timings)?;
        }

        let step = Step::start(self.progress, "image root");
        let (mount, how) = self.mount_root(&tree)?;
        timings.push(step.done(how));

        let mise = self.install_mise(&mut timings)?;

        let mut agent_versions = BTreeMap::new();
        if self.spec.has_agents() {
            agent_versions = self.install_agents(&mut timings)?;
            agent_versions.extend(self.install_releases(&mut timings)?);
        }

        let step = Step::start(self.progress, "configure rootfs");
        self.chroot_logged(&["apt-get", "clean"])?;
        let package_versions = self.package_versions(&packages)?;
        trim_rootfs(&root)?;
        write_etc(&root)?;
        timings.push(step.done(""));

        let step = Step::start(self.progress, "kernel");
        let (release, vmlinuz_src) = kernel::find_kernel(&root)?;
        let vmlinuz = self.dir.join(VMLINUZ_FILE);
        fsutil::copy_file(&vmlinuz_src, &vmlinuz)?;
        let vmlinux = self.dir.join(VMLINUX_FILE);
        let (kernel_file, kernel_note) = match kernel::unpack_vmlinux(&vmlinuz, &vmlinux)? {
            Unpacked::Elf { bytes } => {
                timings.push(step.done(&format!("{release}, vmlinux {} MiB", bytes >> 20)));
                (VMLINUX_FILE, None)
            }
            Unpacked::UseBzImage { reason } => {
                timings.push(step.done(&format!("{release}, booting the bzImage: {reason}")));
                (VMLINUZ_FILE, Some(reason))
            }
        };

        let step = Step::start(self.progress, "boot modules");
        let boot_modules =
            modules::copy_boot_modules(&root, &release, &self.dir.join(store::MODULES_DIR))?;
        timings.push(step.done(&boot_modules.join(" ")));

        let step = Step::start(self.progress, "ext4 rootfs");
        let usage = fsutil::tree_usage_with(&root, mount.is_none())?;
        let size_mib = rootfs_size_mib(usage.bytes);
        step.message(&format!(
            "{} MiB for {} MiB of content",
            size_mib,
            usage.bytes >> 20
        ));
        let rootfs = self.dir.join(ROOTFS_FILE);
        let mut cmd = Command::new(&self.tools.mkfs_ext4);
        cmd.args(["-q", "-F", "-L", "sandpen-root"])
            .args(["-E", "lazy_itable_init=0,lazy_journal_init=0"]);
        if let Some(inodes) = inode_count(size_mib, usage.inodes) {
            cmd.arg("-N").arg(inodes.to_string());
        }
        cmd.arg("-d")
            .arg(&root)
            .arg(&rootfs)
            .arg(format!("{size_mib}M"));
        self.run_logged(cmd, "mkfs.ext4", Some(&step))?;
        // The manifest vouches for rootfs.img, so it must be on disk first.
        File::open(&rootfs)
            .and_then(|f| f.sync_all())
            .ctx(|| format!("syncing {}", rootfs.display()))?;
        drop(mount);
        for dir in [root.clone(), self.dir.join("upper"), self.dir.join("work")] {
            fsutil::remove_tree(&dir)?;
        }
        timings.push(step.done(&format!("{size_mib} MiB")));

        let mut names = vec![VMLINUZ_FILE.to_string()];
        if kernel_file == VMLINUX_FILE {
            names.push(VMLINUX_FILE.to_string());
        }
        names.push(ROOTFS_FILE.to_string());
        for module in boot_modules
            .iter()
            .map(String::as_str)
            .chain([modules::LOAD_ORDER_FILE])
        {
            names.push(format!("{}/{module}", store::MODULES_DIR));
        }
        let hash_started = Instant::now();
        let files = hash_files(self.progress, self.dir, &names)?;
        timings.push(StepTiming {
            step: "sha256".into(),
            seconds: hash_started.elapsed().as_secs_f64(),
        });

        let rootfs_meta = fs::metadata(&rootfs).ctx(|| format!("reading {}", rootfs.display()))?;
        let size_of = |name: &str| files.iter().find(|f| f.name == name).map_or(0, |f| f.size);
        let sizes = Sizes {
            rootfs_content: usage.bytes,
            rootfs_image: rootfs_meta.len(),
            rootfs_allocated: rootfs_meta.blocks() * 512,
            kernel: size_of(kernel_file),
            boot_modules: files
                .iter()
                .filter(|f| f.name.starts_with(store::MODULES_DIR))
                .map(|f| f.size)
                .sum(),
        };
        let manifest = Manifest {
            format: MANIFEST_FORMAT,
            name: self.spec.name.clone(),
            suite: self.spec.suite.clone(),
            mirror: self.spec.mirror.clone(),
            key: self.key.to_string(),
            recipe_version: RECIPE_VERSION,
            kernel_release: release,
            kernel_file: kernel_file.to_string(),
            kernel_note,
            boot_modules,
            created_at: OffsetDateTime::now_utc(),
            sandpen_version: env!("CARGO_PKG_VERSION").to_string(),
            packages,
            package_versions,
            agents: agent_versions,
            mise: Some(mise),
            files,
            sizes,
            build_seconds: started.elapsed().as_secs_f64(),
            parent: None,
            saved_from: None,
            steps: timings,
        };
        manifest.write(self.dir)?;
        Ok(manifest)
    }

    /// The debootstrapped base tree, from the cache or made now: the base
    /// packages, the host's CAs trusted, the kernel's modules unsigned.
    fn base_tree(&self, timings: &mut Vec<StepTiming>) -> Result<PathBuf, ImageError> {
        let key = tree::base_key(self.spec);
        let label = format!("debootstrap {}", self.spec.suite);
        if let Some(root) = tree::cached(self.images_root, TreeKind::Base, &key) {
            timings.push(Step::start(self.progress, &label).done("cached"));
            return Ok(root);
        }
        let staged = tree::staging_dir(self.images_root, TreeKind::Base, &key);
        fsutil::remove_tree(&staged)?;
        fs::create_dir_all(&staged).ctx(|| format!("creating {}", staged.display()))?;
        let root = staged.join("root");
        let step = Step::start(self.progress, &label);
        let mut cmd = Command::new(&self.tools.debootstrap);
        cmd.arg("--variant=minbase")
            .arg(format!("--include={}", BASE_PACKAGES.join(",")))
            .arg(&self.spec.suite)
            .arg(&root)
            .arg(&self.spec.mirror)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .env("LC_ALL", "C")
            .env("PATH", path_with_sbin());
        let made = self
            .run_logged(cmd, "debootstrap", Some(&step))
            .and_then(|()| self.install_ca_certs(&root))
            .and_then(|()| {
                let (release, _) = kernel::find_kernel(&root)?;
                let count = modules::unsign_modules(&root, &release, &self.tools.xz)?;
                self.chroot_logged_in(&root, &["depmod", "-a", &release], None)?;
                self.chroot_logged_in(&root, &["apt-get", "clean"], None)?;
                Ok(count)
            });
        let count = match made {
            Ok(count) => count,
            Err(e) => {
                let _ = fsutil::remove_tree(&staged);
                return Err(e);
            }
        };
        let root = tree::commit(self.images_root, TreeKind::Base, &key, &staged)?;
        timings.push(step.done(&format!(
            "{} packages, {count} modules unsigned",
            BASE_PACKAGES.len()
        )));
        Ok(root)
    }

    /// The base tree plus the spec's extra Debian packages, from the cache or
    /// made now (a copy of the base, then `apt-get install`).
    fn packages_tree(
        &self,
        base: &Path,
        timings: &mut Vec<StepTiming>,
    ) -> Result<PathBuf, ImageError> {
        let key = tree::packages_key(self.spec);
        let extras = self.spec.extra_packages();
        if let Some(root) = tree::cached(self.images_root, TreeKind::Packages, &key) {
            timings.push(Step::start(self.progress, "apt packages").done("cached"));
            return Ok(root);
        }
        let staged = tree::staging_dir(self.images_root, TreeKind::Packages, &key);
        fsutil::remove_tree(&staged)?;
        fs::create_dir_all(&staged).ctx(|| format!("creating {}", staged.display()))?;
        let root = staged.join("root");
        let step = Step::start(self.progress, "apt packages");
        let made = (|| {
            step.message("copying the base tree");
            let mut cp = Command::new(&self.tools.cp);
            cp.arg("-a").arg("--reflink=auto").arg(base).arg(&root);
            self.run_logged(cp, "cp", Some(&step))?;
            let _dns = HostDns::install(&root)?;
            let _services = NoServices::install(&root)?;
            let _proc = MountGuard::proc(&root)?;
            let update = self.chroot_networked(&root, &["apt-get", "update", "-q"]);
            self.run_logged(update, "apt-get update", Some(&step))?;
            let mut argv = vec![
                "apt-get",
                "install",
                "-y",
                "-q",
                "--no-install-recommends",
                "-o",
                "Dpkg::Options::=--force-confdef",
                "-o",
                "Dpkg::Options::=--force-confold",
            ];
            argv.extend(extras.iter().copied());
            let install = self.chroot_networked(&root, &argv);
            self.run_logged(install, "apt-get install", Some(&step))?;
            self.chroot_logged_in(&root, &["apt-get", "clean"], None)
        })();
        if let Err(e) = made {
            let _ = fsutil::remove_tree(&staged);
            return Err(e);
        }
        let root = tree::commit(self.images_root, TreeKind::Packages, &key, &staged)?;
        timings.push(step.done(&format!("{} packages", extras.len())));
        Ok(root)
    }

    /// The image's own root at `self.root()`: an overlay over `tree`, or a copy
    /// of it where overlayfs cannot be mounted. The mount (if any) is undone
    /// when the guard drops.
    fn mount_root(&self, tree: &Path) -> Result<(Option<MountGuard>, &'static str), ImageError> {
        let root = self.root();
        match MountGuard::overlay(tree, &self.dir.join("upper"), &self.dir.join("work"), &root) {
            Ok(guard) => Ok((Some(guard), "overlay over the cached tree")),
            Err(e) => {
                tracing::info!("no overlay ({e}); copying the tree instead");
                fsutil::remove_tree(&root)?;
                let mut cp = Command::new(&self.tools.cp);
                cp.arg("-a").arg("--reflink=auto").arg(tree).arg(&root);
                self.run_logged(cp, "cp", None)?;
                Ok((None, "a copy of the cached tree"))
            }
        }
    }

    /// `/usr/local/bin/mise`, from the npm tarball pinned in
    /// [`sandpen_agents::MISE`]: fetched by the chroot's curl (the host's proxy
    /// settings pass through), its sha512 checked here against the pinned
    /// integrity before `tar` sees a byte, then unpacked. Returns the version.
    fn install_mise(&self, timings: &mut Vec<StepTiming>) -> Result<String, ImageError> {
        use base64::Engine as _;
        use sha2::{Digest as _, Sha512};
        let pin = sandpen_agents::MISE;
        let root = self.root();
        let step = Step::start(self.progress, "mise");
        let work = root.join("tmp/sandpen-mise");
        if fs::symlink_metadata(&work).is_ok() {
            fsutil::remove_tree(&work)?;
        }
        fs::create_dir_all(&work).ctx(|| format!("creating {}", work.display()))?;
        {
            let _dns = HostDns::install(&root)?;
            let cmd = self.chroot_networked(
                &root,
                &[
                    "curl",
                    "-fsSL",
                    "--retry",
                    "3",
                    "-o",
                    "/tmp/sandpen-mise/mise.tgz",
                    pin.tarball,
                ],
            );
            self.run_logged(cmd, "curl", Some(&step))?;
        }
        let tarball = work.join("mise.tgz");
        let bytes = fs::read(&tarball).ctx(|| format!("reading {}", tarball.display()))?;
        let got = format!(
            "sha512-{}",
            base64::engine::general_purpose::STANDARD.encode(Sha512::digest(&bytes))
        );
        if got != pin.integrity {
            let _ = fsutil::remove_tree(&work);
            return Err(ImageError::Integrity {
                package: pin.package.into(),
                version: pin.version.into(),
                url: pin.tarball.into(),
                expected: pin.integrity.into(),
                got,
            });
        }
        drop(bytes);
        self.chroot_logged_in(
            &root,
            &[
                "tar",
                "-xzf",
                "/tmp/sandpen-mise/mise.tgz",
                "-C",
                "/tmp/sandpen-mise",
                "--no-same-owner",
                pin.file,
            ],
            Some(&step),
        )?;
        let bin = root.join("usr/local/bin/mise");
        fs::rename(work.join(pin.file), &bin).ctx(|| format!("installing {}", bin.display()))?;
        fs::set_permissions(&bin, fs::Permissions::from_mode(0o755))
            .ctx(|| format!("chmod {}", bin.display()))?;
        fsutil::remove_tree(&work)?;
        timings.push(step.done(&format!("{} {}", pin.package, pin.version)));
        Ok(pin.version.to_string())
    }

    /// `npm install -g` of the agents' packages, the trimming of what they
    /// never use, and their versions (agent name → version).
    fn install_agents(
        &self,
        timings: &mut Vec<StepTiming>,
    ) -> Result<BTreeMap<String, String>, ImageError> {
        let root = self.root();
        let agents = self.spec.agents();
        let packages: Vec<&str> = agents.iter().filter_map(|a| a.npm_package()).collect();
        if packages.is_empty() {
            return Ok(BTreeMap::new());
        }
        let step = Step::start(self.progress, "npm agents");
        {
            let _dns = HostDns::install(&root)?;
            let _proc = MountGuard::proc(&root)?;
            let mut argv = vec!["npm", "install", "-g", "--loglevel=warn"];
            argv.extend(packages.iter().copied());
            let cmd = self.chroot_networked(&root, &argv);
            self.run_logged(cmd, "npm install", Some(&step))?;
        }
        let mut trimmed = 0u64;
        let mut versions = BTreeMap::new();
        for agent in &agents {
            let sandpen_agents::Install::Npm { package, trim } = agent.install else {
                continue;
            };
            let dir = NPM_GLOBAL_ROOTS
                .iter()
                .map(|r| root.join(r).join(package))
                .find(|d| d.join("package.json").is_file())
                .ok_or_else(|| {
                    ImageError::io(
                        format!("npm did not install {package} under {NPM_GLOBAL_ROOTS:?}"),
                        std::io::Error::from(std::io::ErrorKind::NotFound),
                    )
                })?;
            for rel in trim {
                let path = dir.join(rel);
                if fs::symlink_metadata(&path).is_ok() {
                    trimmed += fsutil::tree_usage_with(&path, false)?.bytes;
                    fsutil::remove_tree(&path)?;
                }
            }
            versions.insert(
                agent.name.to_string(),
                npm_version(&dir.join("package.json"))?,
            );
        }
        // npm's cache (hundreds of MB) and logs.
        for rel in ["root/.npm", "root/.cache", "root/.config/configstore"] {
            let path = root.join(rel);
            if fs::symlink_metadata(&path).is_ok() {
                trimmed += fsutil::tree_usage_with(&path, false)?.bytes;
                fsutil::remove_tree(&path)?;
            }
        }
        let listed: Vec<String> = versions.iter().map(|(a, v)| format!("{a} {v}")).collect();
        timings.push(step.done(&format!(
            "{}; trimmed {} MiB",
            listed.join(", "),
            trimmed >> 20
        )));
        Ok(versions)
    }

    /// The agents that come as a vendor's release archive
    /// ([`sandpen_agents::Install::Release`]): the chroot's curl fetches the
    /// vendor's manifest for the pinned version and the archive (HTTPS only,
    /// `--add-host` as `--resolve`, `--upstream-ca` added to the system's
    /// CAs for these downloads alone); the archive's sha256 must be the one
    /// that manifest lists before `tar` sees a byte (crate::release); its
    /// programs are linked into /usr/local/bin. Returns name → version.
    fn install_releases(
        &self,
        timings: &mut Vec<StepTiming>,
    ) -> Result<BTreeMap<String, String>, ImageError> {
        let mut versions = BTreeMap::new();
        for agent in self.spec.agents() {
            let sandpen_agents::Install::Release(release) = agent.install else {
                continue;
            };
            let root = self.root();
            let step = Step::start(
                self.progress,
                &format!("{} {}", agent.name, release.version),
            );
            let work_rel = format!("tmp/sandpen-release-{}", agent.name);
            let work = root.join(&work_rel);
            if fs::symlink_metadata(&work).is_ok() {
                fsutil::remove_tree(&work)?;
            }
            fs::create_dir_all(&work).ctx(|| format!("creating {}", work.display()))?;
            let mut curl: Vec<String> = ["curl", "-fsS", "--proto", "=https", "--tlsv1.2"]
                .map(String::from)
                .to_vec();
            curl.extend(["--retry".into(), "2".into()]);
            for pair in &self.spec.add_hosts {
                if let Some((host, ip)) = pair.split_once(':') {
                    let ip = if ip.contains(':') {
                        format!("[{ip}]")
                    } else {
                        ip.to_string()
                    };
                    curl.extend(["--resolve".into(), format!("{host}:443:{ip}")]);
                }
            }
            if !self.spec.upstream_cas.is_empty() {
                let mut bundle = fs::read(root.join("etc/ssl/certs/ca-certificates.crt"))
                    .ctx(|| "reading the rootfs's CA bundle".to_string())?;
                for ca in &self.spec.upstream_cas {
                    bundle.push(b'\n');
                    bundle.extend(fs::read(ca).ctx(|| format!("reading {}", ca.display()))?);
                }
                let path = work.join("ca.pem");
                fs::write(&path, bundle).ctx(|| format!("writing {}", path.display()))?;
                curl.extend(["--cacert".into(), format!("/{work_rel}/ca.pem")]);
            }
            let fetch = |url: &str, out: &str| -> Result<(), ImageError> {
                let _dns = HostDns::install(&root)?;
                let mut argv: Vec<&str> = curl.iter().map(String::as_str).collect();
                let out = format!("/{work_rel}/{out}");
                argv.extend(["-o", &out, url]);
                let cmd = self.chroot_networked(&root, &argv);
                self.run_logged(cmd, "curl", Some(&step))
                    .map_err(|e| ImageError::ReleaseDownload {
                        url: url.to_string(),
                        host: release.host.to_string(),
                        detail: e.to_string().lines().last().unwrap_or("").to_string(),
                    })
            };
            let manifest_url = release.manifest_url();
            let archive_url = release.archive_url();
            fetch(&manifest_url, "manifest.json")?;
            let text = fs::read(work.join("manifest.json"))
                .ctx(|| format!("reading the manifest from {manifest_url}"))?;
            let expected = crate::release::listed_sha256(&release, &String::from_utf8_lossy(&text))
                .map_err(|source| ImageError::ReleaseManifest {
                    url: manifest_url.clone(),
                    source,
                })?;
            fetch(&archive_url, "archive.tar.gz")?;
            let got = fsutil::sha256_file(&work.join("archive.tar.gz"), |_| {})?;
            if got != expected {
                let _ = fsutil::remove_tree(&work);
                return Err(ImageError::ReleaseChecksum {
                    url: archive_url,
                    expected,
                    got,
                });
            }
            let dest_rel = format!("opt/{}-{}", agent.name, release.version);
            let dest = root.join(&dest_rel);
            if fs::symlink_metadata(&dest).is_ok() {
                fsutil::remove_tree(&dest)?;
            }
            fs::create_dir_all(&dest).ctx(|| format!("creating {}", dest.display()))?;
            self.chroot_logged_in(
                &root,
                &[
                    "tar",
                    "-xzf",
                    &format!("/{work_rel}/archive.tar.gz"),
                    "-C",
                    &format!("/{dest_rel}"),
                    "--no-same-owner",
                ],
                Some(&step),
            )?;
            for program in release.programs {
                let inside = dest.join(program);
                let is_file = fs::symlink_metadata(&inside).is_ok_and(|m| m.file_type().is_file());
                let name = Path::new(program).file_name().unwrap_or_default();
                if !is_file {
                    return Err(ImageError::io(
                        format!(
                            "{archive_url} has no program {program}; the vendor changed the \
                             archive's layout"
                        ),
                        std::io::Error::from(std::io::ErrorKind::NotFound),
                    ));
                }
                let link = root.join("usr/local/bin").join(name);
                let _ = fs::remove_file(&link);
                std::os::unix::fs::symlink(Path::new("/").join(&dest_rel).join(program), &link)
                    .ctx(|| format!("linking {}", link.display()))?;
            }
            fsutil::remove_tree(&work)?;
            timings.push(step.done(&format!("sha256 {} as the vendor lists", &got[..16])));
            versions.insert(agent.name.to_string(), release.version.to_string());
        }
        Ok(versions)
    }

    /// Copies the spec's CA certificates into the rootfs and refreshes its trust store.
    fn install_ca_certs(&self, root: &Path) -> Result<(), ImageError> {
        if self.spec.extra_ca_certs.is_empty() {
            return Ok(());
        }
        let dest_dir = root.join(HOST_CA_DIR.trim_start_matches('/'));
        let mut taken = Vec::new();
        for src in &self.spec.extra_ca_certs {
            let name = ca_dest_name(src);
            if taken.contains(&name) {
                return Err(ImageError::io(
                    format!(
                        "two extra CA certificates would both be named {name}; rename one ({})",
                        src.display()
                    ),
                    std::io::Error::from(std::io::ErrorKind::AlreadyExists),
                ));
            }
            let dest = dest_dir.join(&name);
            fs::read(src)
                .and_then(|pem| {
                    if let Some(parent) = dest.parent() {
                        fs::create_dir_all(parent)?;
                    }
                    fs::write(&dest, pem)?;
                    fs::set_permissions(&dest, fs::Permissions::from_mode(0o644))
                })
                .ctx(|| {
                    format!(
                        "copying extra CA certificate {} into the image; fix or remove it",
                        src.display()
                    )
                })?;
            taken.push(name);
        }
        self.chroot_logged_in(root, &["update-ca-certificates"], None)
    }

    /// Installed versions of `packages`, read with dpkg-query in the chroot.
    fn package_versions(
        &self,
        packages: &[String],
    ) -> Result<BTreeMap<String, String>, ImageError> {
        let output = self
            .chroot_command(&["dpkg-query", "-W", "-f=${Package}\\t${Version}\\n"])
            .stderr(Stdio::null())
            .output()
            .ctx(|| "running dpkg-query in the build chroot".to_string())?;
        let text = String::from_utf8_lossy(&output.stdout);
        Ok(text
            .lines()
            .filter_map(|line| line.split_once('\t'))
            .filter(|(name, _)| packages.iter().any(|p| p == name))
            .map(|(name, version)| (name.to_string(), version.to_string()))
            .collect())
    }

    fn chroot_command(&self, argv: &[&str]) -> Command {
        self.chroot_in(&self.root(), argv)
    }

    fn chroot_in(&self, root: &Path, argv: &[&str]) -> Command {
        let mut cmd = Command::new(&self.tools.chroot);
        cmd.arg(root)
            .args(argv)
            .env_clear()
            .env("PATH", CHROOT_PATH)
            .env("LC_ALL", "C")
            .env("DEBIAN_FRONTEND", "noninteractive");
        cmd
    }

    fn chroot_logged(&self, argv: &[&str]) -> Result<(), ImageError> {
        self.chroot_logged_in(&self.root(), argv, None)
    }

    fn chroot_logged_in(
        &self,
        root: &Path,
        argv: &[&str],
        step: Option<&Step>,
    ) -> Result<(), ImageError> {
        let cmd = self.chroot_in(root, argv);
        self.run_logged(cmd, &format!("chroot {}", argv.join(" ")), step)
    }

    /// A chroot command that reaches the network: the host's proxy settings
    /// pass through, and Node trusts the system store (with the host's CAs).
    fn chroot_networked(&self, root: &Path, argv: &[&str]) -> Command {
        let mut cmd = self.chroot_in(root, argv);
        cmd.env("HOME", "/root")
            .env("NODE_EXTRA_CA_CERTS", "/etc/ssl/certs/ca-certificates.crt")
            .env("npm_config_update_notifier", "false")
            .env("npm_config_fund", "false")
            .env("npm_config_audit", "false");
        for key in [
            "http_proxy",
            "https_proxy",
            "no_proxy",
            "HTTP_PROXY",
            "HTTPS_PROXY",
            "NO_PROXY",
        ] {
            if let Some(value) = std::env::var_os(key) {
                cmd.env(key, value);
            }
        }
        cmd
    }

    /// Runs `cmd` with its output appended to the build log. While it runs, the
    /// step's message shows the log's latest line. A failure carries the log's tail.
    fn run_logged(
        &self,
        mut cmd: Command,
        tool: &str,
        step: Option<&Step>,
    ) -> Result<(), ImageError> {
        let log_path = self.log_path();
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .ctx(|| format!("opening build log {}", log_path.display()))?;
        writeln!(log, "$ {}", command_line(&cmd))
            .ctx(|| format!("writing {}", log_path.display()))?;
        let start_offset = log
            .metadata()
            .map(|m| m.len())
            .ctx(|| format!("reading {}", log_path.display()))?;
        let stdout = log
            .try_clone()
            .ctx(|| format!("duplicating {}", log_path.display()))?;
        let stderr = log
            .try_clone()
            .ctx(|| format!("duplicating {}", log_path.display()))?;
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .ctx(|| format!("starting {tool}"))?;
        let mut tail = LogFollower::new(&log_path, start_offset);
        let status = loop {
            match child.try_wait().ctx(|| format!("waiting for {tool}"))? {
                Some(status) => break status,
                None => {
                    if let (Some(step), Some(line)) = (step, tail.latest_line()) {
                        step.message(&line);
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        };
        if status.success() {
            return Ok(());
        }
        let status_text = match status.code() {
            Some(code) => format!("exit status {code}"),
            None => format!("{status}"),
        };
        Err(ImageError::CommandFailed {
            tool: tool.to_string(),
            status: status_text,
            log: log_path.clone(),
            tail: log_tail(&log_path, start_offset, LOG_TAIL_LINES),
        })
    }
}

/// Where `npm install -g` puts packages: Debian's npm uses /usr/local.
const NPM_GLOBAL_ROOTS: &[&str] = &["usr/local/lib/node_modules", "usr/lib/node_modules"];

/// The `version` of an installed package's `package.json`.
fn npm_version(path: &Path) -> Result<String, ImageError> {
    #[derive(serde::Deserialize)]
    struct PackageJson {
        version: String,
    }
    let bytes = fs::read(path).ctx(|| format!("reading {}", path.display()))?;
    serde_json::from_slice::<PackageJson>(&bytes)
        .map(|p| p.version)
        .map_err(|source| ImageError::Manifest {
            path: path.to_path_buf(),
            source,
        })
}

/// The command as a shell-like line for the log.
fn command_line(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|part| part.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// One progress line: a spinner with the step's name, its latest news and elapsed time.
struct Step {
    bar: ProgressBar,
    label: String,
    started: Instant,
    finished: bool,
}

impl Step {
    fn start(progress: &MultiProgress, label: &str) -> Step {
        let style = ProgressStyle::with_template(
            "{spinner:.cyan} {prefix:<18.bold} {wide_msg:.dim} {elapsed:>4}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_spinner());
        let bar = progress.add(ProgressBar::new_spinner().with_style(style));
        bar.set_prefix(label.to_string());
        bar.enable_steady_tick(Duration::from_millis(120));
        Step {
            bar,
            label: label.to_string(),
            started: Instant::now(),
            finished: false,
        }
    }

    fn message(&self, text: &str) {
        self.bar.set_message(text.to_string());
    }

    /// Marks the step done with a closing detail; returns how long it took.
    fn done(mut self, detail: &str) -> StepTiming {
        let style = ProgressStyle::with_template("{prefix:<20.green} {msg} ({elapsed})")
            .unwrap_or_else(|_| ProgressStyle::default_spinner());
        self.bar.set_style(style);
        let label = format!("✓ {}", self.bar.prefix());
        self.bar.set_prefix(label);
        self.bar.finish_with_message(detail.to_string());
        self.finished = true;
        StepTiming {
            step: self.label.clone(),
            seconds: self.started.elapsed().as_secs_f64(),
        }
    }
}

impl Drop for Step {
    fn drop(&mut self) {
        if !self.finished {
            let style = ProgressStyle::with_template("{prefix:<20.red} {msg} ({elapsed})")
                .unwrap_or_else(|_| ProgressStyle::default_spinner());
            self.bar.set_style(style);
            let label = format!("✗ {}", self.bar.prefix());
            self.bar.set_prefix(label);
            self.bar.abandon_with_message("failed");
        }
    }
}

/// Reads what a running command appended to the log, keeping the latest line.
struct LogFollower {
    file: Option<File>,
    offset: u64,
    partial: Vec<u8>,
    latest: Option<String>,
}

impl LogFollower {
    fn new(path: &Path, offset: u64) -> Self {
        LogFollower {
            file: File::open(path).ok(),
            offset,
            partial: Vec::new(),
            latest: None,
        }
    }

    /// The last complete, non-empty line written so far (None if nothing new).
    fn latest_line(&mut self) -> Option<String> {
        let file = self.file.as_mut()?;
        file.seek(SeekFrom::Start(self.offset)).ok()?;
        let mut fresh = Vec::new();
        let n = file.read_to_end(&mut fresh).ok()?;
        self.offset += n as u64;
        self.partial.extend_from_slice(&fresh);
        if let Some(end) = self.partial.iter().rposition(|&b| b == b'\n') {
            let complete: Vec<u8> = self.partial.drain(..=end).collect();
            let text = String::from_utf8_lossy(&complete);
            if let Some(line) = text.lines().rev().map(str::trim).find(|l| !l.is_empty()) {
                self.latest = Some(line.chars().take(120).collect());
                return self.latest.clone();
            }
        }
        None
    }
}

/// The last `lines` lines of the log written since `offset`.
fn log_tail(path: &Path, offset: u64, lines: usize) -> String {
    let mut text = Vec::new();
    let read = File::open(path).and_then(|mut f| {
        f.seek(SeekFrom::Start(offset))?;
        f.read_to_end(&mut text)
    });
    if let Err(e) = read {
        return format!("(could not read the log: {e})");
    }
    let text = String::from_utf8_lossy(&text);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// ext4 size in MiB: content * 1.2 + 512 MiB, rounded up to a whole MiB.
pub(crate) fn rootfs_size_mib(content_bytes: u64) -> u64 {
    let bytes = content_bytes + content_bytes * ROOTFS_SLACK_PERCENT / 100 + ROOTFS_SLACK_BYTES;
    bytes.div_ceil(1 << 20)
}

/// An explicit inode count when mkfs's default would leave less than twice what the
/// tree has (trees of many small files, such as node_modules); else None.
pub(crate) fn inode_count(size_mib: u64, tree_inodes: u64) -> Option<u64> {
    let default = (size_mib << 20) / EXT4_BYTES_PER_INODE;
    let wanted = tree_inodes.saturating_mul(2);
    (wanted > default).then_some(wanted)
}

/// Removes what a guest does not need: apt's lists and caches, Debian's own
/// initramfs, and documentation (keeping copyright files).
fn trim_rootfs(root: &Path) -> Result<(), ImageError> {
    remove_children(&root.join("var/lib/apt/lists"), |name, _| {
        name != "partial" && name != "lock"
    })?;
    remove_children(&root.join("var/cache/apt"), |name, _| {
        name.ends_with(".bin")
    })?;
    remove_children(&root.join("boot"), |name, _| {
        name.starts_with("initrd.img-")
    })?;
    for link in ["initrd.img", "initrd.img.old"] {
        let path = root.join(link);
        if fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink()) {
            fs::remove_file(&path).ctx(|| format!("removing {}", path.display()))?;
        }
    }
    for dir in ["usr/share/man", "usr/share/info"] {
        remove_children(&root.join(dir), |_, _| true)?;
    }
    // usr/share/doc/PKG/copyright stays: the image redistributes these packages.
    let doc = root.join("usr/share/doc");
    let entries = match fs::read_dir(&doc) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(ImageError::io(format!("listing {}", doc.display()), e)),
    };
    for entry in entries {
        let entry = entry.ctx(|| format!("listing {}", doc.display()))?;
        let path = entry.path();
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            remove_children(&path, |name, _| name != "copyright")?;
        } else {
            fs::remove_file(&path).ctx(|| format!("removing {}", path.display()))?;
        }
    }
    Ok(())
}

/// Removes the entries of `dir` for which `pick(name, is_dir)` is true. A missing
/// `dir` is fine. Never follows symlinks.
fn remove_children(dir: &Path, pick: impl Fn(&str, bool) -> bool) -> Result<(), ImageError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(ImageError::io(format!("listing {}", dir.display()), e)),
    };
    for entry in entries {
        let entry = entry.ctx(|| format!("listing {}", dir.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        if !pick(&name, is_dir) {
            continue;
        }
        let path = entry.path();
        let removed = if is_dir {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        removed.ctx(|| format!("removing {}", path.display()))?;
    }
    Ok(())
}

/// Host-neutral /etc files: debootstrap copies the build host's resolv.conf and hostname.
fn write_etc(root: &Path) -> Result<(), ImageError> {
    let files: [(&str, &str); 4] = [
        ("etc/hostname", "sandpen\n"),
        ("etc/resolv.conf", ""),
        ("etc/fstab", ""),
        (
            "etc/hosts",
            "127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n",
        ),
    ];
    for (rel, content) in files {
        let path = root.join(rel);
        if fs::symlink_metadata(&path).is_ok() {
            fs::remove_file(&path).ctx(|| format!("replacing {}", path.display()))?;
        }
        fs::write(&path, content).ctx(|| format!("writing {}", path.display()))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644))
            .ctx(|| format!("setting mode of {}", path.display()))?;
    }
    Ok(())
}

/// Hashes the named files (relative to `dir`) with one byte-counting progress bar.
fn hash_files(
    progress: &MultiProgress,
    dir: &Path,
    names: &[String],
) -> Result<Vec<FileEntry>, ImageError> {
    let mut sizes = Vec::new();
    for name in names {
        let path = dir.join(name);
        let meta = fs::metadata(&path).ctx(|| format!("reading {}", path.display()))?;
        sizes.push(meta.len());
    }
    let style = ProgressStyle::with_template(
        "{spinner:.cyan} {prefix:<18.bold} [{bar:30}] {bytes}/{total_bytes} {elapsed:>4}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    let bar = progress.add(ProgressBar::new(sizes.iter().sum()).with_style(style));
    bar.set_prefix("sha256");
    let mut entries = Vec::new();
    for (name, size) in names.iter().zip(sizes) {
        let sha256 = fsutil::sha256_file(&dir.join(name), |n| bar.inc(n))?;
        entries.push(FileEntry {
            name: name.clone(),
            size,
            sha256,
        });
    }
    let done = ProgressStyle::with_template("{prefix:<20.green} {msg} ({elapsed})")
        .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(done);
    bar.set_prefix("✓ sha256");
    bar.finish_with_message(format!("{} files", entries.len()));
    Ok(entries)
}

/// Moves the finished build to `images_root/name`, replacing an older image.
fn install(images_root: &Path, name: &str, build_dir: &Path) -> Result<PathBuf, ImageError> {
    let final_dir = images_root.join(name);
    let old = images_root.join(format!(".{name}.old-{}", std::process::id()));
    let had_old = fs::symlink_metadata(&final_dir).is_ok();
    if had_old {
        fs::rename(&final_dir, &old)
            .ctx(|| format!("moving the old image {} aside", final_dir.display()))?;
    }
    if let Err(e) = fs::rename(build_dir, &final_dir) {
        if had_old {
            let _ = fs::rename(&old, &final_dir);
        }
        return Err(ImageError::io(
            format!("moving {} to {}", build_dir.display(), final_dir.display()),
            e,
        ));
    }
    if had_old {
        if let Err(e) = fsutil::remove_tree(&old) {
            tracing::warn!(
                "could not remove the replaced image at {}: {e}",
                old.display()
            );
        }
    }
    Ok(final_dir)
}

fn failed_log_path(images_root: &Path, name: &str) -> PathBuf {
    images_root.join(format!(".{name}.failed-build.log"))
}

/// Saves the build log of a failed build next to the images and points the error at it.
fn keep_failed_log(
    images_root: &Path,
    name: &str,
    build_dir: &Path,
    err: ImageError,
) -> ImageError {
    let kept = failed_log_path(images_root, name);
    if fs::copy(build_dir.join(BUILD_LOG_FILE), &kept).is_err() {
        return err;
    }
    match err {
        ImageError::CommandFailed {
            tool, status, tail, ..
        } => ImageError::CommandFailed {
            tool,
            status,
            log: kept,
            tail,
        },
        other => other,
    }
}

/// Removes `.NAME.build-PID` directories whose process is gone.
fn remove_stale_builds(images_root: &Path, name: &str) {
    let prefix = format!(".{name}.build-");
    let Ok(entries) = fs::read_dir(images_root) else {
        return;
    };
    for entry in entries.flatten() {
        let file_name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = file_name
            .strip_prefix(&prefix)
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        if let Err(e) = fsutil::remove_tree(&entry.path()) {
            tracing::warn!("could not remove a stale build directory: {e}");
        }
    }
}

fn check_tools() -> Result<Tools, ImageError> {
    let find = |tool: &str, package: &str| {
        find_tool(tool).ok_or_else(|| ImageError::MissingTool {
            tool: tool.to_string(),
            package: package.to_string(),
        })
    };
    Ok(Tools {
        debootstrap: find("debootstrap", "debootstrap")?,
        mkfs_ext4: find("mkfs.ext4", "e2fsprogs")?,
        chroot: find("chroot", "coreutils")?,
        xz: find("xz", "xz-utils")?,
        cp: find("cp", "coreutils")?,
    })
}

/// Looks `tool` up in PATH and in the sbin directories, which a user's PATH may lack.
pub(crate) fn find_tool(tool: &str) -> Option<PathBuf> {
    std::env::split_paths(&path_with_sbin())
        .map(|dir| dir.join(tool))
        .find(|path| {
            fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// PATH plus the standard sbin and bin directories.
fn path_with_sbin() -> std::ffi::OsString {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    for extra in ["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"] {
        if !dirs.iter().any(|d| d == Path::new(extra)) {
            dirs.push(PathBuf::from(extra));
        }
    }
    std::env::join_paths(dirs).unwrap_or_else(|_| CHROOT_PATH.into())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions, touches no memory and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn check_root() -> Result<(), ImageError> {
    if is_root() {
        Ok(())
    } else {
        Err(ImageError::NotRoot)
    }
}

/// The invoking user under `sudo`, so the image can be handed back to them.
fn sudo_owner() -> Option<(u32, u32)> {
    if !is_root() {
        return None;
    }
    let uid: u32 = std::env::var("SUDO_UID").ok()?.parse().ok()?;
    let gid: u32 = std::env::var("SUDO_GID").ok()?.parse().ok()?;
    (uid != 0).then_some((uid, gid))
}

/// `create_dir_all`, giving each directory it creates to `owner`.
fn create_dirs_owned(dir: &Path, owner: Option<(u32, u32)>) -> Result<(), ImageError> {
    let mut missing = Vec::new();
    let mut cursor = Some(dir);
    while let Some(path) = cursor {
        if path.as_os_str().is_empty() || fs::symlink_metadata(path).is_ok() {
            break;
        }
        missing.push(path.to_path_buf());
        cursor = path.parent();
    }
    for path in missing.iter().rev() {
        match fs::create_dir(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(ImageError::io(format!("creating {}", path.display()), e)),
        }
        if let Some((uid, gid)) = owner {
            let _ = std::os::unix::fs::chown(path, Some(uid), Some(gid));
        }
    }
    Ok(())
}

/// Gives a finished image directory and its files to `owner` (best effort).
fn chown_tree(dir: &Path, (uid, gid): (u32, u32)) {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(path) = stack.pop() {
        if let Err(e) = std::os::unix::fs::lchown(&path, Some(uid), Some(gid)) {
            tracing::warn!("could not give {} to uid {uid}: {e}", path.display());
        }
        if fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir()) {
            if let Ok(entries) = fs::read_dir(&path) {
                stack.extend(entries.flatten().map(|e| e.path()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rootfs_size_adds_a_fifth_and_half_a_gib() {
        assert_eq!(rootfs_size_mib(0), 512);
        assert_eq!(rootfs_size_mib(100 << 20), 632);
        // Rounds up to whole MiB.
        assert_eq!(rootfs_size_mib(1), 513);
        assert_eq!(rootfs_size_mib(424 << 20), 512 + 509); // 424 * 1.2 = 508.8 → up
    }

    #[test]
    fn inode_count_only_when_default_is_short() {
        // 1 GiB gives 65536 inodes by default.
        assert_eq!(inode_count(1024, 20_000), None);
        assert_eq!(inode_count(1024, 40_000), Some(80_000));
    }

    #[test]
    fn trims_apt_lists_docs_and_debian_initrd() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for rel in [
            "var/lib/apt/lists/partial",
            "var/cache/apt/archives/partial",
            "usr/share/doc/curl",
            "usr/share/man/man1",
            "boot",
        ] {
            fs::create_dir_all(root.join(rel)).unwrap();
        }
        for rel in [
            "var/lib/apt/lists/deb.debian.org_debian_dists_trixie_InRelease",
            "var/lib/apt/lists/lock",
            "var/cache/apt/pkgcache.bin",
            "usr/share/doc/curl/copyright",
            "usr/share/doc/curl/changelog.Debian.gz",
            "usr/share/man/man1/curl.1.gz",
            "boot/initrd.img-6.12.0",
            "boot/vmlinuz-6.12.0",
        ] {
            fs::write(root.join(rel), b"x").unwrap();
        }
        std::os::unix::fs::symlink("boot/initrd.img-6.12.0", root.join("initrd.img")).unwrap();
        trim_rootfs(root).unwrap();
        let exists = |rel: &str| fs::symlink_metadata(root.join(rel)).is_ok();
        assert!(!exists(
            "var/lib/apt/lists/deb.debian.org_debian_dists_trixie_InRelease"
        ));
        assert!(exists("var/lib/apt/lists/partial") && exists("var/lib/apt/lists/lock"));
        assert!(!exists("var/cache/apt/pkgcache.bin") && exists("var/cache/apt/archives/partial"));
        assert!(exists("usr/share/doc/curl/copyright"));
        assert!(!exists("usr/share/doc/curl/changelog.Debian.gz"));
        assert!(!exists("usr/share/man/man1") && exists("usr/share/man"));
        assert!(!exists("boot/initrd.img-6.12.0") && exists("boot/vmlinuz-6.12.0"));
        assert!(!exists("initrd.img"));
    }

    #[test]
    fn writes_host_neutral_etc() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("etc")).unwrap();
        fs::write(dir.path().join("etc/resolv.conf"), "nameserver 10.0.0.1\n").unwrap();
        fs::write(dir.path().join("etc/hostname"), "buildhost\n").unwrap();
        write_etc(dir.path()).unwrap();
        assert_eq!(
            fs::read_to_string(dir.path().join("etc/resolv.conf")).unwrap(),
            ""
        );
        assert_eq!(
            fs::read_to_string(dir.path().join("etc/fstab")).unwrap(),
            ""
        );
        assert_eq!(
            fs::read_to_string(dir.path().join("etc/hostname")).unwrap(),
            "sandpen\n"
        );
    }

    #[test]
    fn log_tail_takes_last_lines_after_offset() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("build.log");
        fs::write(&log, "old line\n").unwrap();
        let offset = fs::metadata(&log).unwrap().len();
        let mut text = String::new();
        for i in 0..40 {
            text.push_str(&format!("line {i}\n"));
        }
        OpenOptions::new()
            .append(true)
            .open(&log)
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let tail = log_tail(&log, offset, 3);
        assert_eq!(tail, "line 37\nline 38\nline 39");
        assert!(!log_tail(&log, 0, 100).is_empty());
    }

    #[test]
    fn log_follower_reports_latest_complete_line() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("build.log");
        fs::write(&log, "").unwrap();
        let mut follower = LogFollower::new(&log, 0);
        assert_eq!(follower.latest_line(), None);
        let mut f = OpenOptions::new().append(true).open(&log).unwrap();
        f.write_all(b"I: Retrieving InRelease\nI: Valid").unwrap();
        assert_eq!(
            follower.latest_line().as_deref(),
            Some("I: Retrieving InRelease")
        );
        f.write_all(b"ating Packages\n").unwrap();
        assert_eq!(
            follower.latest_line().as_deref(),
            Some("I: Validating Packages")
        );
    }

    #[test]
    fn finds_tools_and_names_missing_ones() {
        assert!(find_tool("sh").is_some());
        assert!(find_tool("surely-not-a-tool-sandpen").is_none());
        let err = ImageError::MissingTool {
            tool: "debootstrap".into(),
            package: "debootstrap".into(),
        };
        assert!(err.to_string().contains("apt-get install debootstrap"));
    }

    #[test]
    fn install_replaces_old_image_and_leaves_nothing_behind() {
        let root = tempfile::tempdir().unwrap();
        let old = root.path().join("default");
        fs::create_dir_all(&old).unwrap();
        fs::write(old.join("rootfs.img"), b"old").unwrap();
        let build_dir = root.path().join(".default.build-1");
        fs::create_dir_all(&build_dir).unwrap();
        fs::write(build_dir.join("rootfs.img"), b"new").unwrap();

        let dir = install(root.path(), "default", &build_dir).unwrap();
        assert_eq!(dir, old);
        assert_eq!(fs::read(dir.join("rootfs.img")).unwrap(), b"new");
        let names: Vec<String> = fs::read_dir(root.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["default"]);
    }

    #[test]
    fn stale_build_dirs_of_dead_processes_are_removed() {
        let root = tempfile::tempdir().unwrap();
        // PID numbers beyond pid_max (4194304) are never alive.
        let dead = root.path().join(".default.build-99999999");
        // PID 1 is always alive: its build (were it one) is left alone.
        let live = root.path().join(".default.build-1");
        // Our own PID's directory is a leftover: this call is not building yet.
        let own = root
            .path()
            .join(format!(".default.build-{}", std::process::id()));
        let other = root.path().join(".other.build-99999999");
        for dir in [&dead, &live, &own, &other] {
            fs::create_dir_all(dir.join("root/etc")).unwrap();
        }
        remove_stale_builds(root.path(), "default");
        assert!(!dead.exists() && !own.exists());
        assert!(live.exists());
        assert!(other.exists(), "another image's build is left alone");
    }

    #[test]
    fn failed_build_keeps_its_log_and_points_the_error_at_it() {
        let root = tempfile::tempdir().unwrap();
        let build_dir = root.path().join(".x.build-1");
        fs::create_dir_all(&build_dir).unwrap();
        fs::write(build_dir.join(BUILD_LOG_FILE), "E: boom\n").unwrap();
        let err = ImageError::CommandFailed {
            tool: "debootstrap".into(),
            status: "exit status 1".into(),
            log: build_dir.join(BUILD_LOG_FILE),
            tail: "E: boom".into(),
        };
        let err = keep_failed_log(root.path(), "x", &build_dir, err);
        let kept = failed_log_path(root.path(), "x");
        assert_eq!(fs::read_to_string(&kept).unwrap(), "E: boom\n");
        assert!(
            err.to_string().contains(&kept.display().to_string()),
            "{err}"
        );
    }

    #[test]
    fn failed_command_error_carries_log_tail() {
        let dir = tempfile::tempdir().unwrap();
        let tools = Tools {
            debootstrap: PathBuf::from("/bin/false"),
            mkfs_ext4: PathBuf::from("/bin/false"),
            chroot: PathBuf::from("/bin/false"),
            xz: PathBuf::from("/bin/false"),
            cp: PathBuf::from("/bin/false"),
        };
        let spec = ImageSpec::default_for("t");
        let progress = MultiProgress::with_draw_target(indicatif::ProgressDrawTarget::hidden());
        let builder = Builder {
            images_root: dir.path(),
            spec: &spec,
            key: "k",
            dir: dir.path(),
            tools: &tools,
            progress: &progress,
        };
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo E: Failed getting release file >&2; exit 3"]);
        let err = builder.run_logged(cmd, "debootstrap", None).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("`debootstrap` failed (exit status 3)"),
            "{text}"
        );
        assert!(text.contains("E: Failed getting release file"), "{text}");
        assert!(text.contains("build.log"), "{text}");
    }
}
