//! sandpen's guest images: a Debian rootfs made with debootstrap, its kernel and
//! boot modules, an ext4 root filesystem and a manifest, under
//! `images_root/NAME/`. The initramfs is written on demand around the guest binary.
//!
//! An image directory holds:
//!
//! ```text
//! manifest.json          what it is and was built from (written last)
//! vmlinuz                Debian's bzImage
//! vmlinux                the ELF unpacked from it (absent if the payload is not zstd)
//! rootfs.img             raw ext4, the backing file of every sandbox overlay
//! modules/*.ko.xz        boot modules, still compressed
//! modules/load-order     their file names, dependencies first
//! build.log              output of debootstrap, chroot commands and mkfs
//! initrd-KEY.img         newc cpio, one per guest binary (Image::ensure_initrd)
//! save.log               a saved image's (`sandpen save`) commands and output
//! toolchains/SHA256/     a saved image's shared toolchain trees (linked copies)
//! ```

mod build;
mod cpio;
mod error;
mod fsutil;
mod initrd;
mod kernel;
mod manifest;
mod modules;
mod release;
mod save;
mod spec;
mod store;
mod tree;

pub use build::{build, BUILD_LOG_FILE};
pub use error::ImageError;
pub use initrd::check_static;
pub use manifest::{FileEntry, Manifest, Sizes, StepTiming, MANIFEST_FILE, MANIFEST_FORMAT};
pub use modules::{BOOT_MODULES, LOAD_ORDER_FILE};
pub use release::{listed_sha256, ManifestError};
pub use save::{lineage, save, SaveSpec, GUEST_CA_BUNDLE, GUEST_EXTRA_CA};
pub use spec::{ImageSpec, BASE_PACKAGES, DEFAULT_SUITE, FALLBACK_MIRROR, RECIPE_VERSION};
pub use store::{
    list, load, remove, Image, MODULES_DIR, ROOTFS_FILE, TOOLCHAINS_DIR, VMLINUX_FILE, VMLINUZ_FILE,
};
pub use tree::TREES_DIR;

/// What [`build`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum BuildOutcome {
    /// An image with the same key and all its files was there; nothing was done.
    UpToDate(Image),
    /// The image was (re)built.
    Built(Image),
}

impl BuildOutcome {
    /// The image, whichever way it came.
    pub fn image(&self) -> &Image {
        match self {
            BuildOutcome::UpToDate(image) | BuildOutcome::Built(image) => image,
        }
    }

    /// Consumes the outcome, giving the image.
    pub fn into_image(self) -> Image {
        match self {
            BuildOutcome::UpToDate(image) | BuildOutcome::Built(image) => image,
        }
    }
}
