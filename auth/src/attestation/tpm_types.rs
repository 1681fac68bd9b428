//! Strict parsers for the four TPM 2.0 structures a key attestation carries (TPM 2.0 Library,
//! Part 2): TPM2B_PUBLIC / TPMT_PUBLIC, TPMS_ATTEST (certify only) and TPMT_SIGNATURE.
//!
//! Every length is checked against what is left and against a per-field maximum before it is
//! used, every tag is checked against the values this service understands, and trailing bytes
//! are refused: a structure is accepted only if it is exactly one well-formed instance. Only the
//! object types, schemes and curves an EK, an AK or a bound key can have are understood;
//! anything else is an error, not a guess.

use sha2::{Digest, Sha256, Sha384, Sha512};

/// TPM_ALG_ID values used here (Part 2, table 9).
pub mod alg {
    pub const RSA: u16 = 0x0001;
    pub const SHA1: u16 = 0x0004;
    pub const AES: u16 = 0x0006;
    pub const KEYEDHASH: u16 = 0x0008;
    pub const SHA256: u16 = 0x000B;
    pub const SHA384: u16 = 0x000C;
    pub const SHA512: u16 = 0x000D;
    pub const NULL: u16 = 0x0010;
    pub const SM3_256: u16 = 0x0012;
    pub const SM4: u16 = 0x0013;
    pub const RSASSA: u16 = 0x0014;
    pub const RSAES: u16 = 0x0015;
    pub const RSAPSS: u16 = 0x0016;
    pub const OAEP: u16 = 0x0017;
    pub const ECDSA: u16 = 0x0018;
    pub const ECDH: u16 = 0x0019;
    pub const ECDAA: u16 = 0x001A;
    pub const SM2: u16 = 0x001B;
    pub const ECSCHNORR: u16 = 0x001C;
    pub const ECMQV: u16 = 0x001D;
    pub const KDF1_SP800_56A: u16 = 0x0020;
    pub const KDF2: u16 = 0x0021;
    pub const KDF1_SP800_108: u16 = 0x0022;
    pub const ECC: u16 = 0x0023;
    pub const SYMCIPHER: u16 = 0x0025;
    pub const CAMELLIA: u16 = 0x0026;
    pub const CFB: u16 = 0x0043;
}

/// TPM_ECC_CURVE values (Part 2, table 10).
pub mod curve {
    pub const NIST_P256: u16 = 0x0003;
    pub const NIST_P384: u16 = 0x0004;
}

/// TPMA_OBJECT bits (Part 2, table 31).
pub mod attr {
    pub const FIXED_TPM: u32 = 1 << 1;
    pub const ST_CLEAR: u32 = 1 << 2;
    pub const FIXED_PARENT: u32 = 1 << 4;
    pub const SENSITIVE_DATA_ORIGIN: u32 = 1 << 5;
    pub const USER_WITH_AUTH: u32 = 1 << 6;
    pub const ADMIN_WITH_POLICY: u32 = 1 << 7;
    pub const NO_DA: u32 = 1 << 10;
    pub const ENCRYPTED_DUPLICATION: u32 = 1 << 11;
    pub const RESTRICTED: u32 = 1 << 16;
    pub const DECRYPT: u32 = 1 << 17;
    pub const SIGN: u32 = 1 << 18;
}

/// TPM_GENERATED_VALUE: the magic that starts every structure the TPM signs itself.
pub const TPM_GENERATED_VALUE: u32 = 0xff54_4347;
/// TPM_ST_ATTEST_CERTIFY.
pub const TPM_ST_ATTEST_CERTIFY: u16 = 0x8017;

/// Largest digest (SHA-512) and so the largest authPolicy or name digest.
const MAX_DIGEST: usize = 64;
/// Largest RSA modulus accepted (4096 bits).
const MAX_RSA_BYTES: usize = 512;
/// Largest ECC coordinate accepted (P-521).
const MAX_ECC_BYTES: usize = 66;
/// Largest TPM2B_DATA (extraData); a TPM limits it to a digest.
const MAX_DATA: usize = 64;
/// A TPM2B_NAME is a hash algorithm and a digest, or a 4-byte handle.
const MAX_NAME: usize = 2 + MAX_DIGEST;

/// Why bytes are not the structure they claim to be.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TpmParseError {
    #[error("{0}: truncated")]
    Truncated(&'static str),
    #[error("{0}: {1} trailing bytes")]
    Trailing(&'static str, usize),
    #[error("{field}: length {len} exceeds {max}")]
    TooLong {
        field: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{field}: unsupported value {value:#06x}")]
    Unsupported { field: &'static str, value: u32 },
    #[error("{0}: malformed")]
    Malformed(&'static str),
}

type Result<T> = std::result::Result<T, TpmParseError>;

/// A cursor over big-endian TPM marshalling. Invariant: `pos <= buf.len()`.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8], what: &'static str) -> Self {
        Reader { buf, pos: 0, what }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or(TpmParseError::Truncated(self.what))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    /// A TPM2B: a u16 size, then that many bytes, at most `max`.
    fn tpm2b(&mut self, field: &'static str, max: usize) -> Result<&'a [u8]> {
        let len = usize::from(self.u16()?);
        if len > max {
            return Err(TpmParseError::TooLong { field, len, max });
        }
        self.take(len)
    }

    fn finish(&self) -> Result<()> {
        match self.buf.len() - self.pos {
            0 => Ok(()),
            n => Err(TpmParseError::Trailing(self.what, n)),
        }
    }
}

/// A hash algorithm usable as a nameAlg or a scheme hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashAlg {
    Sha256,
    Sha384,
    Sha512,
}

impl HashAlg {
    /// The hash for a TPM_ALG_ID; SHA-1 and SM3 are refused (not collision resistant here, or
    /// not implemented).
    pub fn from_id(field: &'static str, id: u16) -> Result<Self> {
        match id {
            alg::SHA256 => Ok(HashAlg::Sha256),
            alg::SHA384 => Ok(HashAlg::Sha384),
            alg::SHA512 => Ok(HashAlg::Sha512),
            other => Err(TpmParseError::Unsupported {
                field,
                value: u32::from(other),
            }),
        }
    }

    pub fn id(self) -> u16 {
        match self {
            HashAlg::Sha256 => alg::SHA256,
            HashAlg::Sha384 => alg::SHA384,
            HashAlg::Sha512 => alg::SHA512,
        }
    }

    pub fn size(self) -> usize {
        match self {
            HashAlg::Sha256 => 32,
            HashAlg::Sha384 => 48,
            HashAlg::Sha512 => 64,
        }
    }

    /// Digest of the concatenation of `parts`.
    pub fn digest(self, parts: &[&[u8]]) -> Vec<u8> {
        fn run<D: Digest>(parts: &[&[u8]]) -> Vec<u8> {
            let mut h = D::new();
            for p in parts {
                h.update(p);
            }
            h.finalize().to_vec()
        }
        match self {
            HashAlg::Sha256 => run::<Sha256>(parts),
            HashAlg::Sha384 => run::<Sha384>(parts),
            HashAlg::Sha512 => run::<Sha512>(parts),
        }
    }
}

/// TPMT_SYM_DEF_OBJECT: the symmetric algorithm of a storage (e.g. EK) key, or none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SymDef {
    Null,
    Cipher { alg: u16, key_bits: u16, mode: u16 },
}

/// A scheme (TPMT_RSA_SCHEME, TPMT_ECC_SCHEME, TPMT_KDF_SCHEME): an algorithm and the hash it
/// uses, or null. ECDAA's commit count is parsed and dropped: ECDAA keys are never accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Null,
    /// A scheme without parameters (RSAES).
    Bare(u16),
    Hashed {
        alg: u16,
        hash: u16,
    },
}

/// The algorithm-specific part of a public area.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublicKey {
    Rsa {
        scheme: Scheme,
        key_bits: u16,
        /// The exponent with TPM's 0 already replaced by the default, 65537.
        exponent: u32,
        modulus: Vec<u8>,
    },
    Ecc {
        scheme: Scheme,
        curve: u16,
        kdf: Scheme,
        x: Vec<u8>,
        y: Vec<u8>,
    },
}

/// A parsed TPMT_PUBLIC. Invariant: `raw` is exactly the marshalled TPMT_PUBLIC the other
/// fields were parsed from, so [`Public::name`] names what was parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Public {
    pub name_alg: HashAlg,
    pub attributes: u32,
    pub auth_policy: Vec<u8>,
    pub symmetric: SymDef,
    pub key: PublicKey,
    raw: Vec<u8>,
}

impl Public {
    /// Parses a TPM2B_PUBLIC (a u16 size, then a TPMT_PUBLIC of exactly that size).
    pub fn from_tpm2b(bytes: &[u8]) -> Result<Public> {
        let mut r = Reader::new(bytes, "TPM2B_PUBLIC");
        let inner = r.tpm2b("TPM2B_PUBLIC", bytes.len())?;
        r.finish()?;
        Public::from_tpmt(inner)
    }

    /// Parses a TPMT_PUBLIC.
    pub fn from_tpmt(bytes: &[u8]) -> Result<Public> {
        let mut r = Reader::new(bytes, "TPMT_PUBLIC");
        let ty = r.u16()?;
        let name_alg = HashAlg::from_id("TPMT_PUBLIC.nameAlg", r.u16()?)?;
        let attributes = r.u32()?;
        let auth_policy = r.tpm2b("TPMT_PUBLIC.authPolicy", MAX_DIGEST)?.to_vec();
        let (symmetric, key) = match ty {
            alg::RSA => {
                let symmetric = sym_def(&mut r)?;
                let sch = scheme(&mut r, "TPMS_RSA_PARMS.scheme")?;
                let key_bits = r.u16()?;
                let exponent = match r.u32()? {
                    0 => 65_537,
                    e => e,
                };
                let modulus = r.tpm2b("TPM2B_PUBLIC_KEY_RSA", MAX_RSA_BYTES)?.to_vec();
                if modulus.len() * 8 != usize::from(key_bits) {
                    return Err(TpmParseError::Malformed("RSA modulus length != keyBits"));
                }
                let key = PublicKey::Rsa {
                    scheme: sch,
                    key_bits,
                    exponent,
                    modulus,
                };
                (symmetric, key)
            }
            alg::ECC => {
                let symmetric = sym_def(&mut r)?;
                let sch = scheme(&mut r, "TPMS_ECC_PARMS.scheme")?;
                let curve = r.u16()?;
                let kdf = scheme(&mut r, "TPMS_ECC_PARMS.kdf")?;
                let x = r.tpm2b("TPMS_ECC_POINT.x", MAX_ECC_BYTES)?.to_vec();
                let y = r.tpm2b("TPMS_ECC_POINT.y", MAX_ECC_BYTES)?.to_vec();
                let key = PublicKey::Ecc {
                    scheme: sch,
                    curve,
                    kdf,
                    x,
                    y,
                };
                (symmetric, key)
            }
            other => {
                return Err(TpmParseError::Unsupported {
                    field: "TPMT_PUBLIC.type",
                    value: u32::from(other),
                })
            }
        };
        r.finish()?;
        Ok(Public {
            name_alg,
            attributes,
            auth_policy,
            symmetric,
            key,
            raw: bytes.to_vec(),
        })
    }

    /// The TPM name: nameAlg (big-endian) followed by H_nameAlg(TPMT_PUBLIC).
    pub fn name(&self) -> Vec<u8> {
        let mut out = self.name_alg.id().to_be_bytes().to_vec();
        out.extend(self.name_alg.digest(&[&self.raw]));
        out
    }

    /// Whether every bit of `mask` is set in the object attributes.
    pub fn has(&self, mask: u32) -> bool {
        self.attributes & mask == mask
    }
}

fn sym_def(r: &mut Reader<'_>) -> Result<SymDef> {
    match r.u16()? {
        alg::NULL => Ok(SymDef::Null),
        a @ (alg::AES | alg::SM4 | alg::CAMELLIA) => Ok(SymDef::Cipher {
            alg: a,
            key_bits: r.u16()?,
            mode: r.u16()?,
        }),
        other => Err(TpmParseError::Unsupported {
            field: "TPMT_SYM_DEF_OBJECT.algorithm",
            value: u32::from(other),
        }),
    }
}

fn scheme(r: &mut Reader<'_>, field: &'static str) -> Result<Scheme> {
    match r.u16()? {
        alg::NULL => Ok(Scheme::Null),
        alg::RSAES => Ok(Scheme::Bare(alg::RSAES)),
        a @ (alg::RSASSA
        | alg::RSAPSS
        | alg::OAEP
        | alg::ECDSA
        | alg::ECDH
        | alg::SM2
        | alg::ECSCHNORR
        | alg::ECMQV
        | alg::KDF1_SP800_56A
        | alg::KDF2
        | alg::KDF1_SP800_108) => Ok(Scheme::Hashed {
            alg: a,
            hash: r.u16()?,
        }),
        alg::ECDAA => {
            let hash = r.u16()?;
            let _count = r.u16()?;
            Ok(Scheme::Hashed {
                alg: alg::ECDAA,
                hash,
            })
        }
        other => Err(TpmParseError::Unsupported {
            field,
            value: u32::from(other),
        }),
    }
}

/// A parsed TPMS_ATTEST of type TPM_ST_ATTEST_CERTIFY. Invariant: the magic was
/// TPM_GENERATED_VALUE and the type was certify; nothing else is representable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertifyInfo {
    pub qualified_signer: Vec<u8>,
    pub extra_data: Vec<u8>,
    pub clock: u64,
    pub reset_count: u32,
    pub restart_count: u32,
    pub safe: bool,
    pub firmware_version: u64,
    /// Name of the certified object.
    pub name: Vec<u8>,
    pub qualified_name: Vec<u8>,
}

/// Why a TPMS_ATTEST is not a certification (kept apart from malformed bytes, which are a
/// different failure for the caller).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttestError {
    #[error(transparent)]
    Parse(#[from] TpmParseError),
    #[error("TPMS_ATTEST.magic is {0:#010x}, not TPM_GENERATED_VALUE: not made by a TPM")]
    NotGenerated(u32),
    #[error("TPMS_ATTEST.type is {0:#06x}, not TPM_ST_ATTEST_CERTIFY")]
    NotCertify(u16),
}

impl CertifyInfo {
    /// Parses the contents of a TPM2B_ATTEST (without its size prefix).
    pub fn parse(bytes: &[u8]) -> std::result::Result<CertifyInfo, AttestError> {
        let mut r = Reader::new(bytes, "TPMS_ATTEST");
        let magic = r.u32()?;
        if magic != TPM_GENERATED_VALUE {
            return Err(AttestError::NotGenerated(magic));
        }
        let ty = r.u16()?;
        if ty != TPM_ST_ATTEST_CERTIFY {
            return Err(AttestError::NotCertify(ty));
        }
        let qualified_signer = r.tpm2b("TPMS_ATTEST.qualifiedSigner", MAX_NAME)?.to_vec();
        let extra_data = r.tpm2b("TPMS_ATTEST.extraData", MAX_DATA)?.to_vec();
        let clock = r.u64()?;
        let reset_count = r.u32()?;
        let restart_count = r.u32()?;
        let safe = match r.u8()? {
            0 => false,
            1 => true,
            _ => return Err(TpmParseError::Malformed("TPMS_CLOCK_INFO.safe").into()),
        };
        let firmware_version = r.u64()?;
        let name = r.tpm2b("TPMS_CERTIFY_INFO.name", MAX_NAME)?.to_vec();
        let qualified_name = r
            .tpm2b("TPMS_CERTIFY_INFO.qualifiedName", MAX_NAME)?
            .to_vec();
        r.finish()?;
        Ok(CertifyInfo {
            qualified_signer,
            extra_data,
            clock,
            reset_count,
            restart_count,
            safe,
            firmware_version,
            name,
            qualified_name,
        })
    }
}

/// A parsed TPMT_SIGNATURE of a scheme this service verifies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signature {
    /// RSASSA-PKCS1-v1_5 or RSASSA-PSS (`alg`), over a digest of `hash`.
    Rsa { alg: u16, hash: u16, sig: Vec<u8> },
    /// ECDSA over a digest of `hash`; `r` and `s` as the TPM gave them (big-endian, maybe short).
    Ecdsa { hash: u16, r: Vec<u8>, s: Vec<u8> },
}

impl Signature {
    /// Parses a TPMT_SIGNATURE.
    pub fn parse(bytes: &[u8]) -> Result<Signature> {
        let mut r = Reader::new(bytes, "TPMT_SIGNATURE");
        let sig = match r.u16()? {
            a @ (alg::RSASSA | alg::RSAPSS) => Signature::Rsa {
                alg: a,
                hash: r.u16()?,
                sig: r.tpm2b("TPMS_SIGNATURE_RSA.sig", MAX_RSA_BYTES)?.to_vec(),
            },
            alg::ECDSA => Signature::Ecdsa {
                hash: r.u16()?,
                r: r.tpm2b("TPMS_SIGNATURE_ECC.signatureR", MAX_ECC_BYTES)?
                    .to_vec(),
                s: r.tpm2b("TPMS_SIGNATURE_ECC.signatureS", MAX_ECC_BYTES)?
                    .to_vec(),
            },
            other => {
                return Err(TpmParseError::Unsupported {
                    field: "TPMT_SIGNATURE.sigAlg",
                    value: u32::from(other),
                })
            }
        };
        r.finish()?;
        Ok(sig)
    }
}

/// Marshals a TPM2B: the u16 length, then the bytes. Callers only pass digests, points and
/// secrets, all far below 64 KiB.
pub fn tpm2b(bytes: &[u8]) -> Vec<u8> {
    let len = u16::try_from(bytes.len()).unwrap_or(u16::MAX);
    let mut out = len.to_be_bytes().to_vec();
    out.extend_from_slice(&bytes[..usize::from(len)]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An ECC P-256 signing key's TPMT_PUBLIC as tpm2_create makes it.
    fn ecc_public(attributes: u32, x: &[u8], y: &[u8]) -> Vec<u8> {
        let mut t = Vec::new();
        t.extend(alg::ECC.to_be_bytes());
        t.extend(alg::SHA256.to_be_bytes());
        t.extend(attributes.to_be_bytes());
        t.extend(tpm2b(&[]));
        t.extend(alg::NULL.to_be_bytes());
        t.extend(alg::ECDSA.to_be_bytes());
        t.extend(alg::SHA256.to_be_bytes());
        t.extend(curve::NIST_P256.to_be_bytes());
        t.extend(alg::NULL.to_be_bytes());
        t.extend(tpm2b(x));
        t.extend(tpm2b(y));
        t
    }

    #[test]
    fn a_public_area_round_trips_and_is_named() {
        let attrs = attr::FIXED_TPM | attr::FIXED_PARENT | attr::SIGN;
        let t = ecc_public(attrs, &[1; 32], &[2; 32]);
        let p = Public::from_tpm2b(&tpm2b(&t)).unwrap();
        assert!(p.has(attr::FIXED_TPM | attr::SIGN));
        assert!(!p.has(attr::DECRYPT));
        let PublicKey::Ecc { x, curve, .. } = &p.key else {
            panic!("{p:?}")
        };
        assert_eq!((x.as_slice(), *curve), (&[1u8; 32][..], curve::NIST_P256));
        let name = p.name();
        assert_eq!(&name[..2], &alg::SHA256.to_be_bytes());
        assert_eq!(name[2..], Sha256::digest(&t)[..]);
    }

    #[test]
    fn every_truncation_and_any_trailing_byte_is_refused() {
        let t = tpm2b(&ecc_public(0, &[1; 32], &[2; 32]));
        for cut in 0..t.len() {
            assert!(Public::from_tpm2b(&t[..cut]).is_err(), "cut at {cut}");
        }
        let mut long = t.clone();
        long.push(0);
        assert!(matches!(
            Public::from_tpm2b(&long),
            Err(TpmParseError::Trailing(..))
        ));
        // A size prefix that is one short leaves a trailing byte inside the TPMT_PUBLIC.
        let mut inner = ecc_public(0, &[1; 32], &[2; 32]);
        inner.push(7);
        assert!(Public::from_tpm2b(&tpm2b(&inner)).is_err());
    }

    #[test]
    fn unknown_types_hashes_and_oversized_fields_are_refused() {
        let mut t = ecc_public(0, &[1; 32], &[2; 32]);
        t[0..2].copy_from_slice(&alg::KEYEDHASH.to_be_bytes());
        assert!(matches!(
            Public::from_tpmt(&t),
            Err(TpmParseError::Unsupported { .. })
        ));
        let mut t = ecc_public(0, &[1; 32], &[2; 32]);
        t[2..4].copy_from_slice(&alg::SHA1.to_be_bytes());
        assert!(Public::from_tpmt(&t).is_err(), "SHA-1 names are refused");
        let big = ecc_public(0, &[1; 67], &[2; 32]);
        assert!(matches!(
            Public::from_tpmt(&big),
            Err(TpmParseError::TooLong { .. })
        ));
    }

    #[test]
    fn attest_magic_and_type_are_checked() {
        let mut a = Vec::new();
        a.extend(TPM_GENERATED_VALUE.to_be_bytes());
        a.extend(TPM_ST_ATTEST_CERTIFY.to_be_bytes());
        a.extend(tpm2b(&[0; 34]));
        a.extend(tpm2b(&[9; 32]));
        a.extend(7u64.to_be_bytes());
        a.extend(1u32.to_be_bytes());
        a.extend(2u32.to_be_bytes());
        a.push(1);
        a.extend(3u64.to_be_bytes());
        a.extend(tpm2b(&[5; 34]));
        a.extend(tpm2b(&[6; 34]));
        let c = CertifyInfo::parse(&a).unwrap();
        assert_eq!(c.extra_data, vec![9; 32]);
        assert_eq!(c.name, vec![5; 34]);
        assert!(c.safe);
        let mut bad = a.clone();
        bad[0] = 0;
        assert!(matches!(
            CertifyInfo::parse(&bad),
            Err(AttestError::NotGenerated(_))
        ));
        let mut quote = a.clone();
        quote[5] = 0x18; // TPM_ST_ATTEST_QUOTE
        assert!(matches!(
            CertifyInfo::parse(&quote),
            Err(AttestError::NotCertify(0x8018))
        ));
        let mut trailing = a.clone();
        trailing.push(0);
        assert!(CertifyInfo::parse(&trailing).is_err());
    }

    #[test]
    fn signatures_parse_strictly() {
        let mut s = Vec::new();
        s.extend(alg::ECDSA.to_be_bytes());
        s.extend(alg::SHA256.to_be_bytes());
        s.extend(tpm2b(&[1; 32]));
        s.extend(tpm2b(&[2; 31]));
        assert_eq!(
            Signature::parse(&s).unwrap(),
            Signature::Ecdsa {
                hash: alg::SHA256,
                r: vec![1; 32],
                s: vec![2; 31]
            }
        );
        s.push(0);
        assert!(Signature::parse(&s).is_err());
        assert!(Signature::parse(&alg::NULL.to_be_bytes()).is_err());
    }
}
