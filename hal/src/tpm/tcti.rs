//! TCTI strings: which TPM to talk to, checked before the first connection, and a plain
//! diagnosis when a device TCTI cannot be opened.

use std::str::FromStr;

use tss_esapi::TctiNameConf;

use crate::{Absence, ConfigError, HalError};

/// Parses and checks a TCTI string.
pub(super) fn parse_tcti(s: &str) -> Result<TctiNameConf, ConfigError> {
    // tss-esapi 7 silently ignores keys it does not know (e.g. swtpm:path=…) and then connects
    // to 127.0.0.1:2321, which fails with a baffling error much later.
    if let Some(opts) = s
        .strip_prefix("swtpm:")
        .or_else(|| s.strip_prefix("mssim:"))
    {
        for kv in opts.split(',').filter(|kv| !kv.is_empty()) {
            let key = kv.split('=').next().unwrap_or_default();
            if key != "host" && key != "port" {
                return Err(ConfigError::TctiOption {
                    tcti: s.to_string(),
                    option: key.to_string(),
                });
            }
        }
    }
    TctiNameConf::from_str(s).map_err(|source| ConfigError::Tcti {
        tcti: s.to_string(),
        source,
    })
}

/// The library reports a device TCTI that cannot open its node only as an I/O error; opening
/// the node ourselves tells absent from forbidden.
pub(super) fn diagnose_device(tcti: &str) -> Option<HalError> {
    let path = match tcti.strip_prefix("device") {
        Some("") | Some(":") => "/dev/tpm0",
        Some(rest) => rest.strip_prefix(':')?,
        None => return None,
    };
    let tcti = tcti.to_string();
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
    {
        Ok(_) => None,
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            Some(HalError::PermissionDenied { tcti })
        }
        Err(source) => Some(HalError::DeviceAbsent {
            tcti,
            cause: Absence::Node {
                path: path.into(),
                source,
            },
        }),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn unix_socket_swtpm_tcti_is_refused() {
        assert!(parse_tcti("swtpm:path=/tmp/sock").is_err());
        assert!(parse_tcti("swtpm:host=127.0.0.1,port=2321").is_ok());
        assert!(parse_tcti("device:/dev/tpmrm0").is_ok());
        assert!(parse_tcti("bogus").is_err());
    }

    #[test]
    fn refusals_name_the_tcti_and_the_problem() {
        match parse_tcti("mssim:host=h,path=/x").unwrap_err() {
            ConfigError::TctiOption { tcti, option } => {
                assert_eq!(tcti, "mssim:host=h,path=/x");
                assert_eq!(option, "path");
            }
            other => panic!("{other:?}"),
        }
        let e = parse_tcti("bogus").unwrap_err();
        assert!(
            matches!(e, ConfigError::Tcti { ref tcti, .. } if tcti == "bogus"),
            "{e:?}"
        );
        assert!(e.to_string().contains("expected device:PATH"), "{e}");
    }

    /// tss-esapi parses TCTI strings with `regex`, which this workspace replaces with regex-lite
    /// (patches/regex). Its patterns are fixed and `unwrap`ped, so a pattern regex-lite could not
    /// compile would panic here; the canonical strings show every option was captured.
    #[test]
    fn tcti_strings_parse() {
        let canonical = |s: &str| -> String {
            let conf = parse_tcti(s).unwrap();
            std::ffi::CString::try_from(conf)
                .unwrap()
                .into_string()
                .unwrap()
        };
        assert_eq!(canonical("device:/dev/tpmrm0"), "device:/dev/tpmrm0");
        assert_eq!(
            canonical("swtpm:port=2400,host=127.0.0.1"),
            "swtpm:host=127.0.0.1,port=2400"
        );
        assert_eq!(
            canonical("mssim:host=tpm.example,port=2321"),
            "mssim:host=tpm.example,port=2321"
        );
        assert_eq!(canonical("swtpm"), "swtpm:host=localhost,port=2321");
        assert_eq!(
            canonical("tabrmd:bus_name=com.example.Tabrmd,bus_type=session"),
            "tabrmd:bus_name=com.example.Tabrmd,bus_type=session"
        );
        assert!(parse_tcti("swtpm:host=127.0.0.1,port=70000").is_err());
        assert!(parse_tcti("tabrmd:bus_name=nodots").is_err());
    }

    #[test]
    fn missing_device_node_is_device_absent() {
        let err = diagnose_device("device:/nonexistent/tpmrm9").unwrap();
        match &err {
            HalError::DeviceAbsent {
                tcti,
                cause: Absence::Node { path, .. },
            } => {
                assert_eq!(tcti, "device:/nonexistent/tpmrm9");
                assert_eq!(path, std::path::Path::new("/nonexistent/tpmrm9"));
            }
            other => panic!("expected DeviceAbsent, got {other:?}"),
        }
        assert!(err.to_string().contains("/nonexistent/tpmrm9"), "{err}");
        assert!(diagnose_device("swtpm:host=127.0.0.1,port=1").is_none());
    }
}
