//! The network edge: one TLS 1.3 connection (rustls, ring) per ceremony or heartbeat, carrying
//! length-prefixed frames.
//!
//! Server authentication has two modes:
//! * [`Trust::Pin`] (first contact): the server is accepted only if its chain contains a
//!   certificate whose SubjectPublicKeyInfo hashes to the pin; the leaf is then verified against
//!   that certificate with webpki, hostname included. The check runs inside the TLS handshake,
//!   so a mismatched pin fails before a single application byte (token, secret) is sent.
//! * [`Trust::Ca`]: plain webpki verification against given CA certificates (the CA learned at
//!   first contact, or a CA file).
//!
//! A client certificate is presented (mTLS) when the caller passes one.
//!
//! Ceremonies always make a full handshake (the auth service refuses a ceremony on a resumed
//! session). Heartbeats keep one [`ClientTls`] per identity, so the next heartbeat resumes the
//! TLS session (one ECDHE, no signatures or certificate checks on either
//! side) instead of a full handshake: docs/decisions.md, "Heartbeats resume their TLS session".

use std::fmt;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use boundkey_proto::frame::{self, FrameError};
use boundkey_proto::{CaPin, ClientMessage, ServerMessage, FRAME_HEADER_LEN};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub(crate) enum TransportError {
    #[error("cannot connect to the auth service at {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "the auth service at {addr} does not match the pinned CA: expected {expected}, the server presented {found}; nothing was sent to it (check the ca_pin in the join URI against `boundkey-authd` output)"
    )]
    PinMismatch {
        addr: String,
        expected: String,
        found: String,
    },
    #[error("TLS handshake with the auth service at {addr} failed: {source}")]
    Handshake {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error("the auth service at {addr} rejected this device's certificate ({detail})")]
    ClientCertRejected { addr: String, detail: String },
    #[error("connection to the auth service at {addr} failed: {source}")]
    Io {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error("the auth service at {addr} closed the connection mid-ceremony")]
    Closed { addr: String },
    #[error("bad message from the auth service at {addr}: {source}")]
    Frame {
        addr: String,
        #[source]
        source: FrameError,
    },
    #[error("timed out after {secs}s waiting for the auth service at {addr}")]
    Timeout { addr: String, secs: u64 },
    #[error("invalid TLS material: {0}")]
    Config(String),
}

impl TransportError {
    /// Worth retrying later unchanged (network trouble, not a misconfiguration).
    pub(crate) fn is_retryable(&self) -> bool {
        !matches!(
            self,
            TransportError::PinMismatch { .. } | TransportError::Config(_)
        )
    }
}

pub(crate) use boundkey_proto::Endpoint;

/// How the server is authenticated.
#[derive(Debug, Clone)]
pub(crate) enum Trust {
    Pin(CaPin),
    Ca(Vec<CertificateDer<'static>>),
}

/// A client certificate chain and its private key, for mTLS.
pub(crate) struct ClientIdentity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientIdentity")
            .field("chain_len", &self.chain.len())
            .finish()
    }
}

impl ClientIdentity {
    /// From a PEM certificate chain and a PKCS#8 PEM key.
    pub(crate) fn from_pem(chain_pem: &str, key_pem: &str) -> Result<Self, TransportError> {
        let chain = certs_from_pem(chain_pem)?;
        if chain.is_empty() {
            return Err(TransportError::Config(
                "identity certificate PEM holds no certificate".into(),
            ));
        }
        use rustls::pki_types::pem::PemObject;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| TransportError::Config(format!("identity key: {e}")))?;
        Ok(ClientIdentity { chain, key })
    }
}

/// Parses every `CERTIFICATE` block of a PEM text.
pub(crate) fn certs_from_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, TransportError> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TransportError::Config(format!("certificate PEM: {e}")))
}

/// PEM of one DER certificate.
pub(crate) fn cert_to_pem(der: &[u8]) -> String {
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine;
    let b64 = STANDARD.encode(der);
    let mut s = String::from("-----BEGIN CERTIFICATE-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        s.push_str(&String::from_utf8_lossy(chunk));
        s.push('\n');
    }
    s.push_str("-----END CERTIFICATE-----\n");
    s
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The SubjectPublicKeyInfo (complete DER TLV) of an X.509 certificate.
pub(crate) fn spki_of(cert: &[u8]) -> Option<&[u8]> {
    /// (tag, whole TLV, contents, rest)
    type Tlv<'a> = (u8, &'a [u8], &'a [u8], &'a [u8]);
    /// Splits one DER TLV off `b`.
    fn tlv(b: &[u8]) -> Option<Tlv<'_>> {
        let tag = *b.first()?;
        let first = *b.get(1)?;
        let (len, hdr) = if first < 0x80 {
            (first as usize, 2)
        } else {
            let n = (first & 0x7f) as usize;
            if n == 0 || n > 4 {
                return None;
            }
            let mut len = 0usize;
            for i in 0..n {
                len = (len << 8) | *b.get(2 + i)? as usize;
            }
            (len, 2 + n)
        };
        let end = hdr.checked_add(len)?;
        if end > b.len() {
            return None;
        }
        Some((tag, &b[..end], &b[hdr..end], &b[end..]))
    }
    let (0x30, _, cert_body, _) = tlv(cert)? else {
        return None;
    };
    let (0x30, _, tbs, _) = tlv(cert_body)? else {
        return None;
    };
    let mut rest = tbs;
    // Optional explicit [0] version.
    if rest.first() == Some(&0xa0) {
        rest = tlv(rest)?.3;
    }
    // serialNumber, signature, issuer, validity, subject.
    for expected in [0x02, 0x30, 0x30, 0x30, 0x30] {
        let (tag, _, _, r) = tlv(rest)?;
        if tag != expected {
            return None;
        }
        rest = r;
    }
    let (tag, whole, _, _) = tlv(rest)?;
    (tag == 0x30).then_some(whole)
}

#[derive(Debug, Default)]
struct PinOutcome {
    matched: Option<CertificateDer<'static>>,
    mismatch: Option<String>,
}

/// Accepts a server only if its chain contains the pinned CA, then verifies the leaf against it.
#[derive(Debug)]
struct PinnedVerifier {
    pin: CaPin,
    provider: Arc<CryptoProvider>,
    outcome: Mutex<PinOutcome>,
}

impl PinnedVerifier {
    fn record(&self, f: impl FnOnce(&mut PinOutcome)) {
        match self.outcome.lock() {
            Ok(mut g) => f(&mut g),
            Err(p) => f(&mut p.into_inner()),
        }
    }

    fn take(&self) -> PinOutcome {
        match self.outcome.lock() {
            Ok(mut g) => std::mem::take(&mut *g),
            Err(p) => std::mem::take(&mut *p.into_inner()),
        }
    }
}

#[derive(Debug)]
struct PinMismatchError;

impl fmt::Display for PinMismatchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("no certificate in the server's chain matches the CA pin")
    }
}

impl std::error::Error for PinMismatchError {}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let mut found = Vec::new();
        let mut anchor = None;
        for cert in std::iter::once(end_entity).chain(intermediates.iter()) {
            let Some(spki) = spki_of(cert.as_ref()) else {
                continue;
            };
            let pin = CaPin::of_spki(spki);
            if pin.matches(&self.pin) {
                anchor = Some(cert.clone().into_owned());
                break;
            }
            found.push(pin.to_string());
        }
        let Some(anchor) = anchor else {
            let found = if found.is_empty() {
                "no parsable certificate".to_string()
            } else {
                found.join(", ")
            };
            self.record(|o| o.mismatch = Some(found));
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Other(rustls::OtherError(Arc::new(PinMismatchError))),
            ));
        };
        let mut roots = RootCertStore::empty();
        roots.add(anchor.clone())?;
        let inner =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| {
                    rustls::Error::General(format!("pinned CA unusable as a trust anchor: {e}"))
                })?;
        inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)?;
        self.record(|o| o.matched = Some(anchor));
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// An open connection to the auth service.
pub(crate) struct Connection {
    addr: String,
    stream: TlsStream<TcpStream>,
    learned_ca: Option<CertificateDer<'static>>,
    mtls: bool,
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("addr", &self.addr)
            .finish()
    }
}

/// A TLS client configuration: how the server is authenticated and which certificate (if any)
/// is presented. rustls resumes a session only with the configuration that made it, so a
/// caller that wants resumption (heartbeats) keeps one of these across connections.
pub(crate) struct ClientTls {
    trust: Trust,
    config: Arc<ClientConfig>,
    pinned: Option<Arc<PinnedVerifier>>,
    mtls: bool,
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientTls")
            .field("mtls", &self.mtls)
            .finish()
    }
}

impl ClientTls {
    /// TLS 1.3, the server authenticated per `trust`, `client` presented if given. With
    /// `resume`, the session of one connection is kept (in memory, for this configuration
    /// only) and resumed by the next; without, every handshake is a full one.
    pub(crate) fn new(
        trust: &Trust,
        client: Option<&ClientIdentity>,
        resume: bool,
    ) -> Result<ClientTls, TransportError> {
        let provider = provider();
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TransportError::Config(e.to_string()))?;
        let mut pinned = None;
        let builder = match trust {
            Trust::Pin(pin) => {
                let v = Arc::new(PinnedVerifier {
                    pin: *pin,
                    provider: provider.clone(),
                    outcome: Mutex::new(PinOutcome::default()),
                });
                pinned = Some(v.clone());
                builder.dangerous().with_custom_certificate_verifier(v)
            }
            Trust::Ca(certs) => {
                let mut roots = RootCertStore::empty();
                for c in certs {
                    roots
                        .add(c.clone())
                        .map_err(|e| TransportError::Config(format!("CA certificate: {e}")))?;
                }
                builder.with_root_certificates(roots)
            }
        };
        let mut config = match client {
            Some(id) => builder
                .with_client_auth_cert(id.chain.clone(), id.key.clone_key())
                .map_err(|e| TransportError::Config(format!("identity certificate: {e}")))?,
            None => builder.with_no_client_auth(),
        };
        config.resumption = if resume {
            // One auth service per configuration.
            rustls::client::Resumption::in_memory_sessions(1)
        } else {
            rustls::client::Resumption::disabled()
        };
        Ok(ClientTls {
            trust: trust.clone(),
            config: Arc::new(config),
            pinned,
            mtls: client.is_some(),
        })
    }

    /// Connects and performs the TLS 1.3 handshake.
    pub(crate) async fn connect(&self, endpoint: &Endpoint) -> Result<Connection, TransportError> {
        let addr = endpoint.to_string();
        let server_name = ServerName::try_from(endpoint.host.clone())
            .map_err(|e| TransportError::Config(format!("server name {:?}: {e}", endpoint.host)))?;
        let tcp = tokio::time::timeout(
            CONNECT_TIMEOUT,
            TcpStream::connect((endpoint.host.as_str(), endpoint.port)),
        )
        .await
        .map_err(|_| TransportError::Timeout {
            addr: addr.clone(),
            secs: CONNECT_TIMEOUT.as_secs(),
        })?
        .map_err(|source| TransportError::Connect {
            addr: addr.clone(),
            source,
        })?;
        let _ = tcp.set_nodelay(true);
        let connector = TlsConnector::from(self.config.clone());
        let handshake = tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(server_name, tcp))
            .await
            .map_err(|_| TransportError::Timeout {
                addr: addr.clone(),
                secs: CONNECT_TIMEOUT.as_secs(),
            })?;
        let outcome = self.pinned.as_ref().map(|v| v.take()).unwrap_or_default();
        let stream = match handshake {
            Ok(s) => s,
            Err(source) => {
                if let (Trust::Pin(pin), Some(found)) = (&self.trust, outcome.mismatch) {
                    return Err(TransportError::PinMismatch {
                        addr,
                        expected: pin.to_string(),
                        found,
                    });
                }
                return Err(classify_io(&addr, source, self.mtls, true));
            }
        };
        Ok(Connection {
            addr,
            stream,
            learned_ca: outcome.matched,
            mtls: self.mtls,
        })
    }
}

/// Connects with a full handshake (presenting `client` if given) and authenticates the server
/// per `trust`: a ceremony's connection.
pub(crate) async fn connect(
    endpoint: &Endpoint,
    trust: &Trust,
    client: Option<&ClientIdentity>,
) -> Result<Connection, TransportError> {
    ClientTls::new(trust, client, false)?
        .connect(endpoint)
        .await
}

/// Maps an I/O error, recognising a TLS alert that says the server refused our certificate.
fn classify_io(addr: &str, e: io::Error, mtls: bool, handshake: bool) -> TransportError {
    if mtls {
        if let Some(rustls::Error::AlertReceived(alert)) =
            e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>())
        {
            use rustls::AlertDescription as A;
            if matches!(
                alert,
                A::BadCertificate
                    | A::CertificateExpired
                    | A::CertificateRevoked
                    | A::CertificateUnknown
                    | A::UnknownCA
                    | A::UnsupportedCertificate
                    | A::CertificateRequired
                    | A::DecryptError
            ) {
                return TransportError::ClientCertRejected {
                    addr: addr.to_string(),
                    detail: format!("{alert:?}"),
                };
            }
        }
    }
    if handshake {
        TransportError::Handshake {
            addr: addr.to_string(),
            source: e,
        }
    } else if e.kind() == io::ErrorKind::UnexpectedEof {
        TransportError::Closed {
            addr: addr.to_string(),
        }
    } else {
        TransportError::Io {
            addr: addr.to_string(),
            source: e,
        }
    }
}

impl Connection {
    /// The pinned CA certificate found in the server's chain (pin mode only).
    pub(crate) fn learned_ca(&self) -> Option<&CertificateDer<'static>> {
        self.learned_ca.as_ref()
    }

    pub(crate) async fn send(&mut self, msg: &ClientMessage) -> Result<(), TransportError> {
        let bytes = frame::encode_frame(msg).map_err(|source| TransportError::Frame {
            addr: self.addr.clone(),
            source,
        })?;
        let r = async {
            self.stream.write_all(&bytes).await?;
            self.stream.flush().await
        }
        .await;
        r.map_err(|e| classify_io(&self.addr, e, self.mtls, false))
    }

    pub(crate) async fn recv(&mut self) -> Result<ServerMessage, TransportError> {
        let mut header = [0u8; FRAME_HEADER_LEN];
        self.stream
            .read_exact(&mut header)
            .await
            .map_err(|e| classify_io(&self.addr, e, self.mtls, false))?;
        let len = frame::payload_len(header).map_err(|source| TransportError::Frame {
            addr: self.addr.clone(),
            source,
        })?;
        let mut payload = vec![0u8; len];
        self.stream
            .read_exact(&mut payload)
            .await
            .map_err(|e| classify_io(&self.addr, e, self.mtls, false))?;
        frame::decode_frame(&payload).map_err(|source| TransportError::Frame {
            addr: self.addr.clone(),
            source,
        })
    }

    /// Best-effort close_notify.
    pub(crate) async fn close(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(2), self.stream.shutdown()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 …`; its pin computed with
    /// `openssl x509 -pubkey -noout | openssl pkey -pubin -outform DER | sha256sum`.
    const CA_PEM: &str = "-----BEGIN CERTIFICATE-----
MIIBeDCCAR+gAwIBAgIUE00xQkHUvadES10PeTzusKj0ePcwCgYIKoZIzj0EAwIw
EjEQMA4GA1UEAwwHdGVzdCBDQTAeFw0yNjExMjExOTA4MDhaFw0zNjExMTgxOTA4
MDhaMBIxEDAOBgNVBAMMB3Rlc3QgQ0EwWTATBgcqhkjOPQIBBggqhkjOPQMBBwNC
AAQe3efe1eGfYD3hYtVui2rLXDOEX+Tl8JqncWqUVFVX+r68fpi2zhJRxuhvrX6R
DKlQAJNhQV7ltva2UGAETLL9o1MwUTAdBgNVHQ4EFgQUIidVJhuRLrJ+ReB1GaEH
5an0T8UwHwYDVR0jBBgwFoAUIidVJhuRLrJ+ReB1GaEH5an0T8UwDwYDVR0TAQH/
BAUwAwEB/zAKBggqhkjOPQQDAgNHADBEAiA8oNLBc84Rpu7nlqEnG/LhjkhOmhXY
G39bdckMP4vKOgIgR8f1ifqfD2wUsZWCaYJxyY1+qidetXfsHO0ZAiKzR8w=
-----END CERTIFICATE-----
";
    const CA_PIN: &str = "sha256:bfa226acf6b11275229fa57af09494518ccbfd87a48e026a39327d532a6ff4aa";

    #[test]
    fn spki_of_a_real_certificate_gives_the_openssl_pin() {
        let certs = certs_from_pem(CA_PEM).unwrap();
        assert_eq!(certs.len(), 1);
        let spki = spki_of(certs[0].as_ref()).unwrap();
        assert_eq!(CaPin::of_spki(spki).to_string(), CA_PIN);
        // The PEM round trip used to store the learned CA.
        assert_eq!(
            certs_from_pem(&cert_to_pem(certs[0].as_ref())).unwrap(),
            certs
        );
        // Truncations never panic and never yield a (wrong) SPKI.
        let der = certs[0].as_ref();
        for n in 0..der.len() {
            assert!(spki_of(&der[..n]).is_none(), "prefix {n}");
        }
    }

    #[test]
    fn spki_parser_rejects_garbage() {
        assert!(spki_of(b"").is_none());
        assert!(spki_of(&[0x30, 0x82, 0xff, 0xff]).is_none());
        assert!(spki_of(&[0x30, 0x03, 0x30, 0x01, 0x00]).is_none());
    }
}
