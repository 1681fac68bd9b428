//! What a failed TPM operation means: TSS2 response codes classified by layer, and the
//! translation of a failure (with the stage it happened in) into a [`HalError`] that names the
//! culprit.

use std::path::PathBuf;

use tss_esapi::constants::response_code::{Tss2ResponseCode, Tss2ResponseCodeKind};

use super::session::{Fail, Stage};
use super::tcti::diagnose_device;
use crate::{Absence, AuthTarget, HalError, KeyFault, KeyName, Parent, TpmFault, TpmResponse};

/// What a tss-esapi error means for the caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Class {
    /// The TPM (or a resource manager speaking for it) answered with this code.
    Tpm(Tss2ResponseCodeKind),
    /// The TPM could not be reached or the answer never arrived.
    Transport,
    /// Anything else: library errors, unknown codes.
    Other,
}

const LAYER_TPM: u32 = 0;
const LAYER_FAPI: u32 = 6;
const LAYER_ESYS: u32 = 7;
const LAYER_SYS: u32 = 8;
const LAYER_MU: u32 = 9;
const LAYER_TCTI: u32 = 10;
const LAYER_RESMGR: u32 = 11;
const LAYER_RESMGR_TPM: u32 = 12;

/// The full TSS2_RC including the layer byte.
///
/// tss-esapi 7 keeps the raw value private and its `kind()` ignores the layer, so a TCTI I/O
/// error (0x000a000a) would look like TPM code 0x00a. The per-format code types print the raw
/// value ("Response code value: 0x…"); that is the only way to get it (a unit test pins it).
fn raw_rc(code: Tss2ResponseCode) -> Option<u32> {
    let text = match code {
        Tss2ResponseCode::Success => return Some(0),
        Tss2ResponseCode::FormatZero(c) => c.to_string(),
        Tss2ResponseCode::FormatOne(c) => c.to_string(),
    };
    let hex = text.rsplit("0x").next()?;
    u32::from_str_radix(hex.trim(), 16).ok()
}

pub(super) fn classify(err: &tss_esapi::Error) -> Class {
    let tss_esapi::Error::Tss2Error(code) = *err else {
        return Class::Other;
    };
    let Some(rc) = raw_rc(code) else {
        return Class::Other;
    };
    let (layer, base) = ((rc >> 16) & 0xff, rc & 0xffff);
    match layer {
        LAYER_TPM | LAYER_RESMGR_TPM => Tss2ResponseCode::from(base)
            .kind()
            .map_or(Class::Other, Class::Tpm),
        LAYER_TCTI => Class::Transport,
        // BAD_SEQUENCE (a previous transport failure wedged the context), NO_CONNECTION,
        // TRY_AGAIN, IO_ERROR, MALFORMED_RESPONSE, INSUFFICIENT_RESPONSE.
        LAYER_ESYS | LAYER_SYS if matches!(base, 7..=10 | 17 | 19) => Class::Transport,
        _ => Class::Other,
    }
}

/// True when a load failure is the blob's fault: a parameter-numbered format-one error (the
/// in-private or in-public argument is wrong) or the sensitive area failing to decrypt.
fn blob_rejected(err: &tss_esapi::Error, kind: Tss2ResponseCodeKind) -> bool {
    let tss_esapi::Error::Tss2Error(code) = *err else {
        return false;
    };
    // Format-one (bit 7) with the parameter flag (bit 6) set.
    let parameter_error = raw_rc(code).is_some_and(|rc| rc & 0xc0 == 0xc0);
    parameter_error
        || matches!(
            kind,
            Tss2ResponseCodeKind::Sensitive
                | Tss2ResponseCodeKind::Integrity
                | Tss2ResponseCodeKind::Binding
        )
}

/// The response code of a tss-esapi error and a one-line description naming its layer and code.
fn response(err: &tss_esapi::Error) -> TpmResponse {
    let code = match *err {
        tss_esapi::Error::Tss2Error(code) => raw_rc(code),
        tss_esapi::Error::WrapperError(_) => None,
    };
    TpmResponse::new(code, describe(err, code))
}

fn describe(err: &tss_esapi::Error, code: Option<u32>) -> String {
    let Some(rc) = code else {
        return err.to_string();
    };
    let layer = match (rc >> 16) & 0xff {
        LAYER_TPM | LAYER_RESMGR_TPM => return format!("{err} (TPM_RC {rc:#x})"),
        LAYER_FAPI => "FAPI",
        LAYER_ESYS => "ESYS",
        LAYER_SYS => "SYS",
        LAYER_MU => "marshalling",
        LAYER_TCTI => "TCTI",
        LAYER_RESMGR => "resource manager",
        _ => "TSS",
    };
    // tss-esapi 7 cannot name codes from the software layers ("response code not recognized").
    let what = match rc & 0xffff {
        1 => "general failure",
        2 => "not implemented",
        3 => "bad context",
        5 => "bad reference",
        6 => "insufficient buffer",
        7 => "bad sequence",
        8 => "no connection",
        9 => "try again",
        10 => "I/O error",
        11 => "bad value",
        12 => "not permitted",
        16 => "bad size",
        17 => "malformed response",
        19 => "insufficient response",
        20 => "incompatible TCTI",
        21 => "not supported",
        23 => "out of memory",
        27 => "response authorization failed",
        _ => "error",
    };
    format!("{layer} {what} (TSS2_RC {rc:#x})")
}

/// What the store was doing when an operation failed, so the error can name the culprit.
pub(super) struct Doing<'a> {
    /// The operation, as "TPM error during {op}" reads it.
    pub(super) op: &'static str,
    pub(super) tcti: &'a str,
    /// The parent in use: the key's own, else the configured one for new keys.
    pub(super) parent: Parent,
    /// The key operated on and its file, if any.
    pub(super) key: Option<(&'a KeyName, PathBuf)>,
}

/// Translates a failed TPM operation into the error the caller sees.
pub(super) fn to_hal_error(fail: Fail, doing: Doing<'_>) -> HalError {
    let Doing {
        op,
        tcti,
        parent,
        key,
    } = doing;
    let response = response(&fail.err);
    if fail.stage == Stage::Connect {
        return diagnose_device(tcti).unwrap_or(HalError::DeviceAbsent {
            tcti: tcti.to_string(),
            cause: Absence::Connect(response),
        });
    }
    match classify(&fail.err) {
        Class::Transport => HalError::DeviceLost {
            op,
            tcti: tcti.to_string(),
            response,
        },
        Class::Tpm(Tss2ResponseCodeKind::Lockout) => HalError::Lockout,
        Class::Tpm(Tss2ResponseCodeKind::AuthFail | Tss2ResponseCodeKind::BadAuth) => {
            let what = match (fail.stage, &key) {
                (Stage::Sign | Stage::Query, Some((name, _))) => AuthTarget::Key(name.to_string()),
                _ => match parent {
                    Parent::Template => AuthTarget::OwnerHierarchy,
                    Parent::Persistent(h) => AuthTarget::ParentKey(h),
                },
            };
            HalError::AuthFailed { what }
        }
        Class::Tpm(kind) if fail.stage == Stage::Load && blob_rejected(&fail.err, kind) => {
            match key {
                Some((name, path)) => HalError::KeyCorrupt {
                    name: name.to_string(),
                    path,
                    fault: KeyFault::RefusedByTpm { parent, response },
                },
                None => HalError::Tpm {
                    op,
                    fault: TpmFault::BlobRefused(response),
                },
            }
        }
        Class::Tpm(Tss2ResponseCodeKind::Handle) if fail.stage == Stage::Parent => HalError::Tpm {
            op,
            fault: TpmFault::ParentUnusable { parent, response },
        },
        _ => HalError::Tpm {
            op,
            fault: TpmFault::Command {
                stage: fail.stage.as_str(),
                response,
            },
        },
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn class(rc: u32) -> Class {
        classify(&tss_esapi::Error::Tss2Error(Tss2ResponseCode::from(rc)))
    }

    fn fail(stage: Stage, rc: u32) -> Fail {
        Fail {
            stage,
            err: tss_esapi::Error::Tss2Error(Tss2ResponseCode::from(rc)),
            leaked: false,
        }
    }

    #[test]
    fn raw_rc_survives_both_formats_and_layers() {
        for rc in [0x0a000a, 0x07000a, 0x98e, 0x921, 0x1df, 0x0c098e] {
            assert_eq!(raw_rc(Tss2ResponseCode::from(rc)), Some(rc));
        }
    }

    #[test]
    fn auth_failures_with_any_session_or_parameter_bits() {
        use Tss2ResponseCodeKind::{AuthFail, BadAuth};
        // TPM_RC_AUTH_FAIL / TPM_RC_BAD_AUTH, bare and tagged with session 1 / 2 or parameter 1,
        // and passed through a resource manager's layer.
        for (rc, kind) in [
            (0x08e, AuthFail),
            (0x98e, AuthFail),
            (0xa8e, AuthFail),
            (0x0c098e, AuthFail),
            (0x0a2, BadAuth),
            (0x9a2, BadAuth),
            (0x1e2, BadAuth),
        ] {
            assert_eq!(class(rc), Class::Tpm(kind), "{rc:#x}");
        }
    }

    #[test]
    fn lockout_and_object_memory_are_tpm_warnings() {
        assert_eq!(class(0x921), Class::Tpm(Tss2ResponseCodeKind::Lockout));
        assert_eq!(class(0x902), Class::Tpm(Tss2ResponseCodeKind::ObjectMemory));
    }

    #[test]
    fn transport_errors_are_not_tpm_codes() {
        // TCTI IO_ERROR, ESYS IO_ERROR / BAD_SEQUENCE / MALFORMED_RESPONSE.
        for rc in [0x0a000a, 0x0a0008, 0x07000a, 0x070007, 0x070011] {
            assert_eq!(class(rc), Class::Transport, "{rc:#x}");
        }
        assert_eq!(class(0x07000b), Class::Other); // ESYS BAD_VALUE: our bug, not the wire
    }

    #[test]
    fn load_errors_that_blame_the_blob() {
        let e = |rc| tss_esapi::Error::Tss2Error(Tss2ResponseCode::from(rc));
        let kind = |rc| Tss2ResponseCode::from(rc).kind().unwrap();
        // INTEGRITY on parameter 1, SIZE on parameter 2, SENSITIVE.
        for rc in [0x1df, 0x2d5, 0x155] {
            assert!(blob_rejected(&e(rc), kind(rc)), "{rc:#x}");
        }
        // HANDLE on handle 1 blames the parent, not the blob.
        assert!(!blob_rejected(&e(0x18b), kind(0x18b)));
    }

    #[test]
    fn failures_name_their_culprit() {
        let key = KeyName::new("k").unwrap();
        let doing = |parent| Doing {
            op: "sign",
            tcti: "swtpm:host=127.0.0.1,port=1",
            parent,
            key: Some((&key, PathBuf::from("/keys/k.tpmkey"))),
        };
        // The key's auth while signing; the owner's or the parent's while making the parent.
        let e = to_hal_error(fail(Stage::Sign, 0x98e), doing(Parent::Template));
        assert!(matches!(e, HalError::AuthFailed { what: AuthTarget::Key(ref n) } if n == "k"));
        let e = to_hal_error(fail(Stage::Parent, 0x98e), doing(Parent::Template));
        assert!(matches!(
            e,
            HalError::AuthFailed {
                what: AuthTarget::OwnerHierarchy
            }
        ));
        let e = to_hal_error(
            fail(Stage::Parent, 0x98e),
            doing(Parent::Persistent(0x8100_0001)),
        );
        assert!(matches!(
            e,
            HalError::AuthFailed {
                what: AuthTarget::ParentKey(0x8100_0001)
            }
        ));
        // A blob the TPM will not load is the key file's fault, named by path.
        match to_hal_error(fail(Stage::Load, 0x1df), doing(Parent::Template)) {
            HalError::KeyCorrupt {
                name,
                path,
                fault: KeyFault::RefusedByTpm { .. },
            } => {
                assert_eq!(name, "k");
                assert_eq!(path, PathBuf::from("/keys/k.tpmkey"));
            }
            other => panic!("{other:?}"),
        }
        // A transport failure may go away; a lockout is reported as such.
        let e = to_hal_error(fail(Stage::Sign, 0x0a000a), doing(Parent::Template));
        assert!(
            matches!(e, HalError::DeviceLost { .. }) && e.is_transient(),
            "{e}"
        );
        let e = to_hal_error(fail(Stage::Sign, 0x921), doing(Parent::Template));
        assert!(matches!(e, HalError::Lockout));
        // A missing persistent parent names its handle.
        let e = to_hal_error(
            fail(Stage::Parent, 0x18b),
            doing(Parent::Persistent(0x8100_0001)),
        );
        assert!(
            matches!(
                e,
                HalError::Tpm {
                    fault: TpmFault::ParentUnusable {
                        parent: Parent::Persistent(0x8100_0001),
                        ref response,
                    },
                    ..
                } if response.code() == Some(0x18b)
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains("0x81000001"), "{e}");
    }

    #[test]
    fn responses_keep_their_code_and_name_their_layer() {
        let r = response(&tss_esapi::Error::Tss2Error(Tss2ResponseCode::from(
            0x0a000a,
        )));
        assert_eq!(r.code(), Some(0x0a000a));
        assert_eq!(r.to_string(), "TCTI I/O error (TSS2_RC 0xa000a)");
        let r = response(&tss_esapi::Error::Tss2Error(Tss2ResponseCode::from(0x98e)));
        assert_eq!(r.code(), Some(0x98e));
        assert!(r.to_string().contains("TPM_RC 0x98e"), "{r}");
    }
}
