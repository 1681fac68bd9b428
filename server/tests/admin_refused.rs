//! A user the admin socket refuses is told so (issue 8, defect 16): "permission denied" with the
//! uid the socket accepts, never "Broken pipe" or a connection error. Runs `boundkeyctl` as
//! uid 65534 through `setpriv` against a server running as this (root) user.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use common::*;

const NOBODY: &str = "65534";

fn ctl_as_nobody(s: &Server) -> String {
    let out = Command::new("setpriv")
        .args(["--reuid", NOBODY, "--regid", NOBODY, "--clear-groups", CTL])
        .arg("--data-dir")
        .arg(&s.data_dir)
        .args(["bots", "ls"])
        .output()
        .expect("run setpriv (util-linux)");
    assert!(!out.status.success(), "a foreign user was served");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn a_refused_user_is_told_permission_denied() {
    let me = rustix::process::geteuid().as_raw();
    assert_eq!(me, 0, "this test runs as root, to act as another user");
    let s = Server::start();
    // Let uid 65534 reach the socket file; its mode (0600) still keeps it out.
    chmod(s.dir.path(), 0o711);
    chmod(&s.data_dir, 0o711);
    let socket = s.data_dir.join("admin.sock");
    let err = ctl_as_nobody(&s);
    assert!(
        err.contains("permission denied") && err.contains("uid 0 (the user running"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");

    // A socket whose mode was loosened by mistake: the server's uid check refuses the peer and
    // hangs up. Repeated, since whether the client's write or the server's close comes first
    // is a race.
    chmod(&socket, 0o666);
    for _ in 0..20 {
        let err = ctl_as_nobody(&s);
        assert!(
            err.contains("permission denied") && err.contains("uid 0 (the user running"),
            "{err}"
        );
        assert!(!err.contains("Broken pipe"), "{err}");
        assert!(err.contains("65534"), "says who was refused: {err}");
    }
    assert!(s.log().contains("foreign uid refused"));
}
