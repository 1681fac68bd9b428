//! TLS for the ceremony listener: TLS 1.3 only, ring provider, the listener certificate from
//! the service's TLS CA, and optional client certificates checked against the identity CAs.
//!
//! The identity CAs change (rotation, and the end of a grace period), so the client verifier is
//! held behind a lock and swapped; a handshake uses whichever verifier was current when it ran.

use std::fmt;
use std::sync::{Arc, RwLock};

use boundkey_auth::authority::Authority;
use boundkey_auth::UnixTime;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig, SignatureScheme,
};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot issue the listener certificate: {0}")]
    Issue(#[from] boundkey_auth::authority::AuthorityError),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// ring, with the TLS 1.3 suites in the order the listener picks them (it ignores the
/// client's order): AES-128-GCM with SHA-256 first. Every handshake, full or resumed, runs its
/// key schedule through dozens of HMACs, and SHA-256 has x86-64 and ARMv8 instructions that
/// SHA-384 lacks; AES-128 is ample for a session of one message. Clients (the agent included)
/// list AES-256-GCM-SHA384 first by default, which would otherwise decide.
pub fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite;
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites = vec![
        cipher_suite::TLS13_AES_128_GCM_SHA256,
        cipher_suite::TLS13_AES_256_GCM_SHA384,
        cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(p)
}

/// Optional client authentication against the identity CAs, with a replaceable trust store.
pub struct ReloadableClientVerifier {
    provider: Arc<CryptoProvider>,
    inner: RwLock<Arc<dyn ClientCertVerifier>>,
}

impl fmt::Debug for ReloadableClientVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ReloadableClientVerifier")
    }
}

fn build_verifier(
    provider: &Arc<CryptoProvider>,
    roots: Vec<CertificateDer<'static>>,
) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    let mut store = RootCertStore::empty();
    for r in roots {
        store.add(r)?;
    }
    Ok(
        WebPkiClientVerifier::builder_with_provider(Arc::new(store), provider.clone())
            // A device whose certificate expired while offline must still reach the service
            // to recover; the ceremony decides what an anonymous client may do.
            .allow_unauthenticated()
            .build()?,
    )
}

impl ReloadableClientVerifier {
    pub fn new(
        provider: Arc<CryptoProvider>,
        authority: &Authority,
        now: UnixTime,
    ) -> Result<Arc<Self>, TlsError> {
        let inner = build_verifier(&provider, authority.identity_roots(now))?;
        Ok(Arc::new(ReloadableClientVerifier {
            provider,
            inner: RwLock::new(inner),
        }))
    }

    /// Rebuilds the trust store from the identity CAs trusted at `now`. On failure the previous
    /// verifier stays in place (logged): refusing every renewal would be worse.
    pub fn reload(&self, authority: &Authority, now: UnixTime) {
        match build_verifier(&self.provider, authority.identity_roots(now)) {
            Ok(v) => match self.inner.write() {
                Ok(mut g) => *g = v,
                Err(p) => *p.into_inner() = v,
            },
            Err(e) => {
                tracing::error!(error = %e, "could not rebuild the client certificate verifier")
            }
        }
    }

    fn current(&self) -> Arc<dyn ClientCertVerifier> {
        match self.inner.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }
}

impl ClientCertVerifier for ReloadableClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // The hints live in the swappable inner verifier and cannot be borrowed from here. An
        // empty list means "send your certificate if you have one", which is what agents do.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: rustls::pki_types::UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.current()
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.current().supported_verify_schemes()
    }
}

/// TLS 1.3 session tickets issued after each full handshake. One is enough: a heartbeat
/// client resumes its latest session once and receives a new ticket each time.
const TICKETS_PER_HANDSHAKE: usize = 1;

/// The listener's TLS configuration: TLS 1.3 only, certificate for `names`.
///
/// Sessions resume from stateless tickets (encrypted with a key that lives in this process's
/// memory only and rotates every 6 hours): a heartbeat then costs one ECDHE instead of a full
/// handshake's signature, certificate chain check and ECDHE, and the server keeps nothing per
/// session, so its memory does not grow with the fleet. What a resumed session may do is the
/// listener's and the service's decision (docs/decisions.md, "Heartbeats resume their TLS
/// session"): only heartbeats, and the certificate restored from the ticket is verified again
/// at every use. No early data is accepted (`max_early_data_size` stays 0).
pub fn server_config(
    provider: Arc<CryptoProvider>,
    authority: &Authority,
    names: &[String],
    verifier: Arc<ReloadableClientVerifier>,
    now: UnixTime,
) -> Result<Arc<ServerConfig>, TlsError> {
    let (chain, key) = authority.issue_server_cert(names, now)?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, PrivateKeyDer::Pkcs8(key))?;
    config.ignore_client_order = true;
    config.ticketer = rustls::crypto::ring::Ticketer::new()?;
    // No server-side session cache: tickets carry the session, so nothing is stored per client.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = TICKETS_PER_HANDSHAKE;
    Ok(Arc::new(config))
}
