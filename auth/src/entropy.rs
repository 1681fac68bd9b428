//! Where the auth service's randomness comes from.
//!
//! Every random value a ceremony puts on the wire or into the store (challenge nonces, instance
//! ids, certificate serials) is drawn from one [`Entropy`] held by the
//! [`crate::service::Service`].
//! In production it is the operating system's generator; a test passes a seeded generator and
//! gets the same transcript on every run.

use std::fmt;
use std::sync::{Arc, Mutex};

use rand_core::{CryptoRng, OsRng, RngCore};

/// A cryptographically secure generator that can move between threads.
trait Source: RngCore + CryptoRng + Send {}
impl<T: RngCore + CryptoRng + Send> Source for T {}

/// A shared handle on one generator; cheap to clone. Invariant: every clone draws from the same
/// stream, so draws made in a fixed order give the same values for the same seed.
#[derive(Clone)]
pub struct Entropy(Arc<Mutex<dyn Source>>);

impl Entropy {
    /// The operating system's generator (the default).
    pub fn os() -> Self {
        Entropy(Arc::new(Mutex::new(OsRng)))
    }

    /// Any cryptographically secure generator, typically a seeded one in tests.
    pub fn from_rng<R: RngCore + CryptoRng + Send + 'static>(rng: R) -> Self {
        Entropy(Arc::new(Mutex::new(rng)))
    }

    pub fn fill(&self, buf: &mut [u8]) {
        // A panic elsewhere while holding the lock cannot leave a generator half-updated in a
        // way that matters: its output is still unpredictable.
        match self.0.lock() {
            Ok(mut g) => g.fill_bytes(buf),
            Err(p) => p.into_inner().fill_bytes(buf),
        }
    }

    pub fn bytes<const N: usize>(&self) -> [u8; N] {
        let mut b = [0u8; N];
        self.fill(&mut b);
        b
    }

    /// A fresh UUIDv4 string, for a new bot instance.
    pub fn instance_id(&self) -> String {
        uuid::Builder::from_random_bytes(self.bytes())
            .into_uuid()
            .to_string()
    }

    /// A positive, non-zero 16-byte certificate serial number (RFC 5280 §4.1.2.2).
    pub fn serial(&self) -> [u8; 16] {
        let mut s: [u8; 16] = self.bytes();
        s[0] = (s[0] & 0x7f) | 0x01;
        s
    }
}

/// An [`Entropy`] as a `rand_core` generator, for APIs that take one (RSA-OAEP, ECDH).
pub(crate) struct EntropyRng<'a>(pub(crate) &'a Entropy);

impl RngCore for EntropyRng<'_> {
    fn next_u32(&mut self) -> u32 {
        u32::from_le_bytes(self.0.bytes())
    }
    fn next_u64(&mut self) -> u64 {
        u64::from_le_bytes(self.0.bytes())
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        self.0.fill(dest)
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
        self.0.fill(dest);
        Ok(())
    }
}

/// Draws from the same cryptographically secure stream as the [`Entropy`] it wraps.
impl CryptoRng for EntropyRng<'_> {}

impl Default for Entropy {
    fn default() -> Self {
        Entropy::os()
    }
}

impl fmt::Debug for Entropy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Entropy")
    }
}
