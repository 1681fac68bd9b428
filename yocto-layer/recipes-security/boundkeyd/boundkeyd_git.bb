SUMMARY = "boundkeyd: TPM-bound device identity agent"
DESCRIPTION = "The boundkey agent joins an auth service with a key held in the TPM, \
               writes a short-lived X.509 identity for local consumers and keeps it renewed."
HOMEPAGE = "https://example.invalid/boundkey"
CVE_PRODUCT = "boundkey"
SECTION = "security"
LICENSE = "Apache-2.0"
# The workspace's `license = "Apache-2.0"` line (scripts/yocto-check.sh checks it).
LIC_FILES_CHKSUM = "file://Cargo.toml;beginline=74;endline=74;md5=2507bd5f0713f05419cd2f22fa06fe62"

# The source: this repository. BOUNDKEY_GIT_URI and SRCREV are placeholders to set in your
# distro or local.conf (SRCREV: the commit this layer was taken from, because the crates
# include file below is generated from that commit's Cargo.lock). To build a local checkout
# instead, use externalsrc (yocto-layer/README.md).
PV = "0.1.0+git"
BOUNDKEY_GIT_URI ?= "git://git.example.invalid/boundkey.git;protocol=https;branch=main"
SRC_URI = "${BOUNDKEY_GIT_URI};destsuffix=${BP}"
SRCREV ?= "${AUTOREV}"
# scarthgap unpacks into WORKDIR and may not define UNPACKDIR; wrynose unpacks into
# UNPACKDIR. An explicit destsuffix keeps S right on both.
UNPACKDIR ??= "${WORKDIR}"
S = "${UNPACKDIR}/${BP}"

# Every crate of Cargo.lock: cargo resolves the whole workspace against the vendored crates,
# even when it builds only boundkeyd. Regenerate with `scripts/yocto-check.sh --update`.
require ${BPN}-crates.inc

inherit cargo cargo-update-recipe-crates pkgconfig systemd useradd

# `bitbake -c update_crates boundkeyd` (cargo-update-recipe-crates) would also list the crates
# of fuzz/Cargo.lock, which this recipe never builds: regenerate the include file with
# scripts/yocto-check.sh --update instead (same format, the workspace's Cargo.lock only).

# The TPM backend (tss-esapi) links libtss2-esys/-sys/-mu/-tctildr; the device TCTI is
# loaded with dlopen at run time, so it is an explicit run-time dependency.
PACKAGECONFIG ??= "tpm"
PACKAGECONFIG[tpm] = ",,tpm2-tss,libtss2-tcti-device"

# The cargo class always builds --release; the features follow PACKAGECONFIG.
CARGO_BUILD_FLAGS:append = " --no-default-features ${@bb.utils.contains('PACKAGECONFIG', 'tpm', '--features tpm', '', d)}"
# The workspace's release profile is tuned for standalone builds (panic=abort, strip). The
# Yocto Rust sysroot has no panic_abort, and Yocto strips binaries itself (an already
# stripped binary fails its QA check), so both are overridden here.
export CARGO_PROFILE_RELEASE_PANIC = "unwind"
export CARGO_PROFILE_RELEASE_STRIP = "false"

do_install:append() {
    install -d ${D}${systemd_system_unitdir}
    sed -e 's,/usr/bin/boundkeyd,${bindir}/boundkeyd,' \
        ${S}/packaging/boundkeyd.service > ${D}${systemd_system_unitdir}/boundkeyd.service
    chmod 0644 ${D}${systemd_system_unitdir}/boundkeyd.service

    install -d ${D}${sysconfdir}/boundkey
    install -m 0644 ${S}/packaging/boundkeyd.toml ${D}${sysconfdir}/boundkey/boundkeyd.toml

    # systemd's StateDirectory= creates and re-owns it too; shipping it keeps a read-only
    # root file system with a persistent /var/lib correct from the first boot.
    install -d -m 0700 -o boundkeyd -g boundkeyd ${D}${localstatedir}/lib/boundkeyd
}

USERADD_PACKAGES = "${PN}"
GROUPADD_PARAM:${PN} = "--system tss"
USERADD_PARAM:${PN} = "--system --user-group --groups tss --no-create-home \
                       --home-dir ${localstatedir}/lib/boundkeyd --shell ${base_sbindir}/nologin \
                       --comment 'boundkey device identity agent' boundkeyd"

SYSTEMD_SERVICE:${PN} = "boundkeyd.service"
SYSTEMD_AUTO_ENABLE:${PN} = "enable"

CONFFILES:${PN} = "${sysconfdir}/boundkey/boundkeyd.toml"
FILES:${PN} += "${localstatedir}/lib/boundkeyd"
