//! Which backend a device without a configured choice uses.
//!
//! The answer depends on the build as well as the machine: a build without the `tpm` feature
//! cannot use a TPM even when a device node exists, so it must not pick one and fail later.

use std::path::Path;

use crate::Backend;

/// Device nodes of the kernel's TPM 2.0 driver: the resource manager and the raw device.
const TPM_DEVICE_NODES: [&str; 2] = ["/dev/tpmrm0", "/dev/tpm0"];

/// True when this build can use a TPM (it was built with the `tpm` feature).
pub const fn tpm_supported() -> bool {
    cfg!(feature = "tpm")
}

/// True when this build supports a TPM and this machine exposes a TPM character device.
pub fn tpm_present() -> bool {
    default_backend() == Backend::Tpm
}

/// The backend for a device whose configuration names none: the TPM when this build can use it
/// and the machine has one, else the file backend.
pub fn default_backend() -> Backend {
    choose(tpm_supported(), device_node_exists())
}

fn device_node_exists() -> bool {
    TPM_DEVICE_NODES.iter().any(|p| Path::new(p).exists())
}

fn choose(supported: bool, device_node: bool) -> Backend {
    if supported && device_node {
        Backend::Tpm
    } else {
        Backend::File
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tpm_is_chosen_only_when_supported_and_present() {
        assert_eq!(choose(true, true), Backend::Tpm);
        assert_eq!(choose(true, false), Backend::File);
        assert_eq!(choose(false, true), Backend::File);
        assert_eq!(choose(false, false), Backend::File);
    }

    #[test]
    fn default_backend_agrees_with_tpm_present() {
        let expected = if tpm_present() {
            Backend::Tpm
        } else {
            Backend::File
        };
        assert_eq!(default_backend(), expected);
    }

    #[cfg(not(feature = "tpm"))]
    #[test]
    fn a_build_without_tpm_support_never_picks_the_tpm() {
        assert!(!tpm_supported());
        assert!(!tpm_present());
        assert_eq!(default_backend(), Backend::File);
    }

    #[cfg(feature = "tpm")]
    #[test]
    fn a_build_with_tpm_support_says_so() {
        assert!(tpm_supported());
    }
}
