//! What of Nix's output a client may see. Nix names a remote builder by its store URI, whose
//! query holds the operator's settings (`ssh://root@host?ssh-key=/root/.ssh/id&remote-store=…`),
//! and ssh names the key files it tried; messages, build pages, events and the API show Nix's
//! words with those taken out. The machine stays named as `ssh://user@host` (see
//! [`super::machine_name`]). The server's own log keeps Nix's output whole.

use std::sync::LazyLock;

use regex::{Captures, Regex};

/// What a key file's path becomes.
pub const KEY_FILE: &str = "[key file]";

/// A URI with a query (up to a space or a quote, which end a URI in Nix's and ssh's messages).
static URI_QUERY: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r#"(?P<uri>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'"?]*)\?[^\s'"]*"#).expect("valid regex")
});

/// ssh's messages that name a key file (OpenSSH's words, `-v` included): the path is the group
/// that matched.
static SSH_KEY_MESSAGE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(concat!(
        r#"Identity file (\S+) not accessible"#,
        r#"|Load key "([^"]+)""#,
        r#"|no such identity: ([^\s:]+)"#,
        r#"|Permissions \S+ for '([^']+)' are too open"#,
        r#"|Enter passphrase for key '([^']+)'"#,
        r#"|identity file (\S+) type"#,
        r#"|(?:Will attempt key|Trying private key|Offering public key|Server accepts key): (\S+)"#,
    ))
    .expect("valid regex")
});

/// A path into an `.ssh` directory, wherever it is named.
static SSH_DIR_PATH: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r#"(?:~|/[^\s'":,]*)?/\.ssh/[^\s'":,]*"#).expect("valid regex"));

/// `text` (something Nix or ssh printed) as a client may see it: every URI without its query,
/// and every key file that ssh names, or that lies in an `.ssh` directory, replaced by
/// [`KEY_FILE`].
pub fn public_text(text: &str) -> String {
    let text = URI_QUERY.replace_all(text, "$uri");
    let text = SSH_KEY_MESSAGE.replace_all(&text, |c: &Captures| {
        let whole = &c[0];
        let Some((start, end)) = c.get(0).and_then(|m| {
            let path = c.iter().skip(1).flatten().next()?;
            Some((path.start() - m.start(), path.end() - m.start()))
        }) else {
            return whole.to_owned();
        };
        format!("{}{KEY_FILE}{}", &whole[..start], &whole[end..])
    });
    SSH_DIR_PATH.replace_all(&text, KEY_FILE).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What Nix 2.8 printed (with ssh's words) for a builder whose key file ssh refused
    /// (permissions 0644), named in the URI's `ssh-key` and, on a second machine, as the third
    /// field of its `builders` entry; the key's path is what it was here.
    #[test]
    fn key_files_and_store_settings_are_taken_out() {
        let nix_2_8 = "\
this derivation will be built:
  /nix/store/gcc82d1kmzizzxb8lk7ayi3cdvh550zk-failing-remote.drv
cannot build on 'ssh://root@127.0.0.1?remote-store=local%3Froot%3D/tmp/leaks/rs&ssh-key=/etc/nixery/builder_key': error: cannot connect to 'root@127.0.0.1': @@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@
@         WARNING: UNPROTECTED PRIVATE KEY FILE!          @
@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@
Permissions 0644 for '/etc/nixery/builder_key' are too open.
It is required that your private key files are NOT accessible by others.
This private key will be ignored.
Load key \"/etc/nixery/builder_key\": bad permissions
root@127.0.0.1: Permission denied (publickey).
Failed to find a machine for remote build!
";
        let public = public_text(nix_2_8);
        assert!(
            !public.contains("builder_key") && !public.contains("/etc/nixery"),
            "{public}"
        );
        assert!(
            !public.contains("remote-store") && !public.contains("/tmp/leaks/rs"),
            "{public}"
        );
        assert!(
            public.contains(
                "cannot build on 'ssh://root@127.0.0.1': error: cannot connect to 'root@127.0.0.1'"
            ) && public.contains("Permissions 0644 for '[key file]' are too open.")
                && public.contains("Load key \"[key file]\": bad permissions"),
            "{public}"
        );
    }

    #[test]
    fn other_key_messages_and_ssh_directories_are_taken_out() {
        for (text, public) in [
            (
                "Warning: Identity file /srv/k not accessible: No such file or directory.",
                "Warning: Identity file [key file] not accessible: No such file or directory.",
            ),
            (
                "no such identity: /srv/k: No such file or directory",
                "no such identity: [key file]: No such file or directory",
            ),
            (
                "debug1: Will attempt key: /srv/k ED25519 SHA256:abc explicit",
                "debug1: Will attempt key: [key file] ED25519 SHA256:abc explicit",
            ),
            (
                "debug1: identity file /srv/k type 3",
                "debug1: identity file [key file] type 3",
            ),
            (
                "the key is /home/nix/.ssh/id_builder, or ~/.ssh/id_ed25519: mode 0600",
                "the key is [key file], or [key file]: mode 0600",
            ),
            (
                "copying path '/nix/store/4miv9174j4m03awhkdz93zhzqiwlghhp-slowish' from 'ssh-ng://nix@b:22?ssh-key=/k&compress=true'...",
                "copying path '/nix/store/4miv9174j4m03awhkdz93zhzqiwlghhp-slowish' from 'ssh-ng://nix@b:22'...",
            ),
            // What is no URI query nor key file stays.
            (
                "error: builder for '/nix/store/zvywbj2gxkwr0rqsgkacxm4vk5a3cxqr-failing.drv' failed with exit code 1; why? /build/x",
                "error: builder for '/nix/store/zvywbj2gxkwr0rqsgkacxm4vk5a3cxqr-failing.drv' failed with exit code 1; why? /build/x",
            ),
        ] {
            assert_eq!(public_text(text), public, "{text}");
        }
    }
}
