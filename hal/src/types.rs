//! Fixed-size values that cross the key-store boundary.

use core::fmt;

use crate::HalError;

/// A SHA-256 digest to be signed.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// SHA-256 of `data`, computed on the host.
    pub fn of(data: &[u8]) -> Self {
        use sha2::Digest as _;
        Digest(sha2::Sha256::digest(data).into())
    }
}

/// An ECDSA P-256 signature in JWS form: r‖s, big-endian, 32 bytes each, low-S.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Signature(pub [u8; 64]);

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Signature(..)")
    }
}

/// A P-256 public key as an uncompressed SEC1 point (0x04 ‖ x ‖ y).
///
/// Invariant: always a valid point on the curve (checked on construction), kept both as its
/// encoding and as the decoded key, so neither view can fail later.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PublicKeyBytes {
    sec1: [u8; 65],
    key: p256::PublicKey,
}

impl PublicKeyBytes {
    /// Builds from the affine coordinates, checking the point is on the curve.
    pub fn from_xy(x: &[u8; 32], y: &[u8; 32]) -> Result<Self, HalError> {
        let mut b = [0u8; 65];
        b[0] = 0x04;
        b[1..33].copy_from_slice(x);
        b[33..].copy_from_slice(y);
        Self::from_sec1(&b)
    }

    /// Builds from SEC1 bytes (compressed or uncompressed), checking the point is on the curve.
    pub fn from_sec1(sec1: &[u8]) -> Result<Self, HalError> {
        let pk = p256::PublicKey::from_sec1_bytes(sec1).map_err(|_| HalError::InvalidPublicKey)?;
        Ok(Self::from(&pk))
    }

    pub fn as_bytes(&self) -> &[u8; 65] {
        &self.sec1
    }

    pub fn to_p256(&self) -> p256::PublicKey {
        self.key
    }
}

impl From<&p256::PublicKey> for PublicKeyBytes {
    fn from(pk: &p256::PublicKey) -> Self {
        use p256::elliptic_curve::sec1::ToEncodedPoint;
        let ep = pk.to_encoded_point(false);
        let mut sec1 = [0u8; 65];
        sec1.copy_from_slice(ep.as_bytes());
        PublicKeyBytes { sec1, key: *pk }
    }
}

impl fmt::Debug for PublicKeyBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKeyBytes(")?;
        for b in &self.sec1[1..9] {
            write!(f, "{b:02x}")?;
        }
        write!(f, "..)")
    }
}

/// The name of a key in a store: 1–48 characters from `[A-Za-z0-9._-]`, not starting with `.`.
///
/// Names become file names in the storage directory, so the character set is what keeps a name
/// from escaping it.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeyName(heapless::String<48>);

impl KeyName {
    pub fn new(s: &str) -> Result<Self, HalError> {
        let ok = !s.is_empty()
            && !s.starts_with('.')
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        let hs = heapless::String::try_from(s).map_err(|_| HalError::InvalidKeyName(s.into()))?;
        if ok {
            Ok(KeyName(hs))
        } else {
            Err(HalError::InvalidKeyName(s.into()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for KeyName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for KeyName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which key-store backend holds a key: the same names the wire and the admin API use.
pub use boundkey_proto::KeyBackend as Backend;
