//! The `nonroot` meta-package: the user `nonroot`, uid and gid 65532 (the ones distroless images
//! use), with a home directory it owns, and an image config that runs as it. Store paths stay
//! read-only and owned by root; the packer adds these entries to the image's root layer.

/// The user's and its group's id.
pub const ID: u64 = 65532;

/// The user's home directory, owned by it, mode 0755.
pub const HOME: &str = "/home/nonroot";

/// The image config's `User`.
pub const USER: &str = "65532:65532";

/// `/etc/passwd`: root, nobody and nonroot, none with a login shell.
pub const PASSWD: &str = "root:x:0:0:root:/root:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
";

/// `/etc/group`.
pub const GROUP: &str = "root:x:0:
nobody:x:65534:
nonroot:x:65532:
";
