//! One agent's sessions with the auth service: an attempt picks its plan from
//! [`resolve`](crate::resolve), drives the [`join`](crate::join) state machine over a
//! [`transport`](crate::transport) connection, and commits the outcome (state first, then
//! outputs, then key clean-up).

use std::time::Instant;

use boundkey_hal::{Digest, KeyName, KeyStore};
use boundkey_proto::{CeremonyKind, ClientMessage, JoinMethod};
use rustls::pki_types::CertificateDer;

use crate::config::Settings;
use crate::crash;
use crate::device::{self, Device};
use crate::error::AgentError;
use crate::heartbeat::HeartbeatTarget;
use crate::identity_key::IdentityKey;
use crate::join::{Ceremony, Effects, HeldKey, Outcome, Plan, Step};
use crate::keyset::KeyRef;
use crate::metrics::{KeystoreLatency, Metrics};
use crate::outputs::Outputs;
use crate::resolve::{self, AttemptPlan, Resolved, Target};
use crate::storage::{Identity, InFlight, JoinInfo, Secret, State, Storage};
use crate::time::{rfc3339, unix_now};
use crate::transport::{self, ClientIdentity, ClientTls, TransportError};

/// Longest a whole ceremony (connect, handshake, every round) may take.
pub(crate) const CEREMONY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// The agent on one storage directory. Invariant: the identity outputs are only ever written
/// from a state that is already on disk.
pub(crate) struct Agent {
    settings: Settings,
    device: Device,
    outputs: Option<Outputs>,
    /// Key-store latencies of every ceremony so far (for `/metrics`).
    latency: KeystoreLatency,
    /// Recoveries left, from the auth service's last Result (unknown until one arrives).
    recovery_remaining: Option<u32>,
}

impl Agent {
    /// Opens the device (see [`Device::open`]) and collects keys a crash left unrecorded.
    pub(crate) fn open(settings: Settings) -> Result<Agent, AgentError> {
        let mut device = Device::open(&settings)?;
        device.collect_orphans();
        let outputs = settings.destination.as_deref().map(Outputs::new);
        Ok(Agent {
            settings,
            device,
            outputs,
            latency: KeystoreLatency::default(),
            recovery_remaining: None,
        })
    }

    pub(crate) fn settings(&self) -> &Settings {
        &self.settings
    }

    pub(crate) fn resolved(&self) -> &Resolved {
        &self.device.resolved
    }

    /// Where and how to reach the auth service, or why that is unknown.
    pub(crate) fn target(&self) -> Result<&Target, AgentError> {
        self.device
            .resolved
            .target
            .as_ref()
            .map_err(|e| AgentError::NoTarget(*e))
    }

    /// Writes the stored identity to the destination if it is valid and not already there
    /// (e.g. after a crash between the state write and the output write).
    pub(crate) fn sync_outputs(&self) -> Result<(), AgentError> {
        let (Some(out), Some(id)) = (&self.outputs, &self.device.state.identity) else {
            return Ok(());
        };
        if resolve::usable(id, unix_now()) && !out.is_current(id) {
            out.write(id).map_err(AgentError::Outputs)?;
            tracing::info!(destination = %out.dir().display(), generation = id.generation, "identity outputs restored from storage");
        }
        Ok(())
    }

    /// Joins, renews or recovers, whichever applies, and commits the result.
    pub(crate) async fn join_or_renew(&mut self) -> Result<(), AgentError> {
        let target = self.target()?.clone();
        let kind = resolve::ceremony_kind(target.method, &self.device.state, unix_now());
        match self.attempt(&target, kind).await {
            Err(AgentError::Transport(TransportError::ClientCertRejected { detail, .. }))
                if kind == CeremonyKind::Renewal && target.method == JoinMethod::BoundKeypair =>
            {
                // The TLS layer refused the certificate, so no ceremony ran: recovering is safe.
                tracing::warn!(%detail, "the auth service rejected this device's certificate; recovering without it");
                self.attempt(&target, CeremonyKind::Recovery).await
            }
            other => other,
        }
    }

    async fn attempt(&mut self, t: &Target, kind: CeremonyKind) -> Result<(), AgentError> {
        if self.device.state.in_flight.is_some() {
            // This attempt repeats a ceremony whose result may be lost, so it writes no in-flight
            // mark before the service can commit. Show the state can still be written first: if
            // the service redelivered a result this device then failed to store (a full disk),
            // the service would be two steps ahead and refuse the device as a clone.
            self.device.save(self.device.state.clone())?;
        }
        let now = unix_now();
        let state = &self.device.state;
        let plan = resolve::plan_attempt(
            t,
            kind,
            state,
            self.settings
                .join
                .registration_secret
                .as_ref()
                .map(|s| s.as_str()),
        )?;
        let client = match (&plan, &state.identity) {
            (
                AttemptPlan {
                    present_certificate: true,
                    ..
                },
                Some(id),
            ) => Some(ClientIdentity::from_pem(
                &id.certificate,
                &id.private_key.0,
            )?),
            _ => None,
        };
        let identity_key = identity_key_for_attempt(state)?;
        let identity_key_pem = identity_key.to_pkcs8_pem()?;
        let lost_first_join = kind == CeremonyKind::FirstJoin && state.in_flight.is_some();
        let ceremony_plan = Plan {
            method: t.method,
            token: plan.token.clone(),
            registration_secret: plan.registration_secret.clone(),
            identity_key: identity_key.clone(),
            ttl_secs: self.settings.certificate_ttl.as_secs(),
            join_state: plan.join_state.clone(),
            keys: state
                .keys
                .all()
                .map(|k| HeldKey {
                    name: k.name.clone(),
                    public_key: k.public_key,
                })
                .collect(),
            prior_uncertain: state.in_flight.is_some(),
        };
        tracing::info!(
            ceremony = kind.as_str(),
            method = %t.method,
            auth_server = %t.endpoint,
            mtls = client.is_some(),
            "contacting the auth service"
        );
        // The key the auth service will most likely ask to be proven: loaded while the network
        // is busy. A first join by secret has none yet; its parent is made ready instead.
        let expected_key = match kind {
            CeremonyKind::FirstJoin if plan.registration_secret.is_some() => None,
            _ => state.keys.active.as_ref().map(|k| k.name.clone()),
        };
        let (mut ceremony, first) = Ceremony::start(ceremony_plan);
        let driven = {
            let Device {
                storage,
                state,
                keystore,
                ..
            } = &mut self.device;
            let mut fx = AgentEffects {
                store: keystore.as_mut(),
                latency: &mut self.latency,
                storage,
                state,
                kind,
                now,
                identity_key_pem: &identity_key_pem,
            };
            let driven = tokio::time::timeout(
                CEREMONY_TIMEOUT,
                drive(
                    t,
                    client.as_ref(),
                    &mut ceremony,
                    first,
                    expected_key,
                    &mut fx,
                ),
            )
            .await
            .unwrap_or_else(|_| {
                Err(AgentError::Transport(TransportError::Timeout {
                    addr: t.endpoint.to_string(),
                    secs: CEREMONY_TIMEOUT.as_secs(),
                }))
            });
            // Whatever happened, nothing stays loaded in the TPM.
            fx.store.release();
            driven
        };
        match driven {
            Ok((outcome, learned_ca)) => self.commit(t, kind, outcome, identity_key, learned_ca),
            Err(e) => {
                self.settle_uncertainty(
                    kind,
                    ceremony.uncertain_after_failure(),
                    &identity_key_pem,
                );
                Err(match e {
                    AgentError::Refused { code, message } => AgentError::refused(
                        code,
                        &message,
                        t.token
                            .as_deref()
                            .filter(|_| t.method == JoinMethod::BoundKeypair),
                        lost_first_join,
                    ),
                    other => other,
                })
            }
        }
    }

    /// Makes the stored in-flight mark say `uncertain` (after a failed ceremony).
    fn settle_uncertainty(&mut self, kind: CeremonyKind, uncertain: bool, identity_key_pem: &str) {
        if self.device.state.in_flight.is_some() == uncertain {
            return;
        }
        let mut next = self.device.state.clone();
        next.in_flight = uncertain.then(|| InFlight {
            since: unix_now(),
            ceremony: Some(kind),
            identity_key: Some(Secret(identity_key_pem.to_string())),
        });
        if let Err(e) = self.device.save(next) {
            tracing::warn!(error = %e, "could not update the in-flight mark");
        }
        if uncertain {
            tracing::warn!("the auth service may have accepted the last ceremony without this device receiving the result; the next attempt repeats it with the same identity key so the service can deliver the result again");
        }
    }

    fn commit(
        &mut self,
        t: &Target,
        kind: CeremonyKind,
        outcome: Outcome,
        identity_key: IdentityKey,
        learned_ca: Option<CertificateDer<'static>>,
    ) -> Result<(), AgentError> {
        crash::point("after-result-received");
        let r = outcome.result;
        self.recovery_remaining = r.recovery_remaining;
        let mut next = self.device.state.clone();
        let dropped = match &outcome.bound_key {
            Some(k) => next.keys.promote(&k.public_key).ok_or_else(|| {
                AgentError::Protocol("the bound key named by the result is not recorded".into())
            })?,
            None => Vec::new(),
        };
        let previous_ca = next.join.as_ref().and_then(|j| j.server_ca.clone());
        next.join = Some(JoinInfo {
            method: t.method,
            token: match t.method {
                JoinMethod::BoundKeypair => t.token.clone(),
                JoinMethod::Token => None,
            },
            auth_server: t.endpoint.clone(),
            server_ca: learned_ca
                .map(|c| transport::cert_to_pem(c.as_ref()))
                .or(previous_ca),
        });
        next.identity = Some(Identity {
            bot_name: r.bot_name.clone(),
            instance_id: r.instance_id.clone(),
            generation: r.generation,
            join_method: r.join_method,
            not_before: r.not_before,
            expires: r.expires,
            certificate: r.certificate,
            ca_bundle: r.ca_bundle,
            private_key: Secret(identity_key.to_pkcs8_pem()?),
            join_state: r.join_state,
        });
        next.in_flight = None;
        let rotated = self.device.state.keys.active != next.keys.active;
        self.device.save(next)?;
        crash::point("after-state-written");
        if let (Some(out), Some(id)) = (&self.outputs, &self.device.state.identity) {
            out.write(id).map_err(AgentError::Outputs)?;
        }
        crash::point("after-outputs-written");
        self.device.delete_keys(&dropped);
        tracing::info!(
            ceremony = kind.as_str(),
            bot = %r.bot_name,
            instance = %r.instance_id,
            generation = r.generation,
            not_before = %rfc3339(r.not_before),
            expires = %rfc3339(r.expires),
            "new identity"
        );
        if rotated {
            if let Some(k) = &self.device.state.keys.active {
                tracing::info!(kid = %k.kid(), key = %k.name, "bound key is now this key");
            }
        }
        if let Err(e) = self.device.refresh(&self.settings) {
            tracing::warn!(error = %e, "could not re-read the join settings after the join");
        }
        Ok(())
    }

    /// Copies what `/metrics` reports about the stored identity and the key store into `m`.
    pub(crate) fn observe(&self, m: &mut Metrics) {
        let id = self.device.state.identity.as_ref();
        m.certificate_expiry = id.map(|i| i.expires);
        m.generation = id.map(|i| i.generation);
        m.keystore = Some(self.device.state.backend().as_str());
        m.latency = self.latency.clone();
        m.recovery_remaining = self.recovery_remaining.map(u64::from);
    }

    /// The stored identity's expiry if it is usable now: the agent is ready to serve it.
    pub(crate) fn valid_until(&self) -> Option<i64> {
        let id = self.device.state.identity.as_ref()?;
        resolve::usable(id, unix_now()).then_some(id.expires)
    }

    /// What a heartbeat needs, if the stored identity is usable.
    pub(crate) fn heartbeat_target(&self) -> Option<HeartbeatTarget> {
        let id = self.device.state.identity.as_ref()?;
        if !resolve::usable(id, unix_now()) {
            return None;
        }
        let t = self.target().ok()?;
        let client = ClientIdentity::from_pem(&id.certificate, &id.private_key.0).ok()?;
        Some(HeartbeatTarget {
            endpoint: t.endpoint.clone(),
            tls: ClientTls::new(&t.trust, Some(&client), true).ok()?,
            keystore: self.device.state.backend(),
            one_shot: self.settings.oneshot,
        })
    }
}

/// A fresh identity key, or the one recorded by a ceremony whose result may have been lost
/// (reusing it is what lets the auth service recognise the retry).
fn identity_key_for_attempt(state: &State) -> Result<IdentityKey, AgentError> {
    let recorded = state
        .in_flight
        .as_ref()
        .and_then(|f| f.identity_key.as_ref());
    match recorded.map(|k| IdentityKey::from_pkcs8_pem(&k.0)) {
        Some(Ok(k)) => Ok(k),
        Some(Err(e)) => {
            tracing::warn!(error = %e, "the interrupted ceremony's identity key is unreadable; using a new one");
            IdentityKey::generate()
        }
        None => IdentityKey::generate(),
    }
}

/// The agent's side effects for a ceremony: the key store and the storage directory.
struct AgentEffects<'a> {
    store: &'a mut dyn KeyStore,
    latency: &'a mut KeystoreLatency,
    storage: &'a Storage,
    state: &'a mut State,
    kind: CeremonyKind,
    now: i64,
    /// PKCS#8 PEM of this ceremony's identity key, recorded with the in-flight mark.
    identity_key_pem: &'a str,
}

impl AgentEffects<'_> {
    fn save(&mut self, next: State) -> Result<(), AgentError> {
        self.storage.save(&next)?;
        *self.state = next;
        Ok(())
    }
}

impl Effects for AgentEffects<'_> {
    type Error = AgentError;

    fn create_key(&mut self) -> Result<HeldKey, AgentError> {
        let t = Instant::now();
        let k = device::create_key(self.store, self.now);
        self.latency.create_key.observe(t.elapsed());
        let k = k?;
        crash::point("after-key-created");
        tracing::info!(key = %k.name, kid = %k.kid(), "created a new bound key for the auth service's rotation request");
        Ok(HeldKey {
            name: k.name,
            public_key: k.public_key,
        })
    }

    fn persist_pending(&mut self, key: &HeldKey, uncertain: bool) -> Result<(), AgentError> {
        let mut next = self.state.clone();
        let dropped = next.keys.set_pending(KeyRef {
            name: key.name.clone(),
            public_key: key.public_key,
            created_at: self.now,
        });
        if !uncertain {
            next.in_flight = None;
        }
        self.save(next)?;
        device::delete_keys(self.store, &dropped);
        crash::point("after-key-persisted");
        Ok(())
    }

    fn mark_uncertain(&mut self) -> Result<(), AgentError> {
        let mut next = self.state.clone();
        next.in_flight = Some(InFlight {
            since: self.now,
            ceremony: Some(self.kind),
            identity_key: Some(Secret(self.identity_key_pem.to_string())),
        });
        self.save(next)
    }

    fn sign(&mut self, key: &str, digest: &[u8; 32]) -> Result<[u8; 64], AgentError> {
        let name = KeyName::new(key)?;
        crash::point("before-sign");
        let t = Instant::now();
        let sig = self.store.sign_digest(&name, &Digest(*digest));
        self.latency.sign.observe(t.elapsed());
        Ok(sig?.0)
    }

    fn attest(
        &mut self,
        key: &str,
        qualifying: &[u8; 32],
    ) -> Result<Option<boundkey_hal::KeyAttestation>, AgentError> {
        let name = KeyName::new(key)?;
        let t = Instant::now();
        let r = self.store.attest(&name, qualifying);
        self.latency.attest.observe(t.elapsed());
        match r {
            Ok(a) => Ok(Some(a)),
            // Sent without one: the auth service's refusal names the requirement.
            Err(boundkey_hal::HalError::CannotAttest(_)) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    fn activate_credential(
        &mut self,
        credential_blob: &[u8],
        encrypted_secret: &[u8],
    ) -> Result<Vec<u8>, AgentError> {
        let t = Instant::now();
        let secret = self
            .store
            .activate_credential(credential_blob, encrypted_secret);
        self.latency.activate.observe(t.elapsed());
        Ok(secret?.to_vec())
    }
}

/// Drives one ceremony over one connection. Work that does not depend on the auth service's
/// answers is done while the service works on them, on this thread (the answer waits in the
/// socket): after Init, the key store loads `expected_key` (or makes its parent ready) and the
/// in-flight mark is written while the service prepares its challenge; after a solution, the key
/// store unloads while the service commits. No extra thread: the daemon stays single-threaded.
async fn drive(
    t: &Target,
    client: Option<&ClientIdentity>,
    ceremony: &mut Ceremony,
    first: ClientMessage,
    expected_key: Option<String>,
    fx: &mut AgentEffects<'_>,
) -> Result<(Outcome, Option<CertificateDer<'static>>), AgentError> {
    let expected_key = expected_key.and_then(|k| KeyName::new(&k).ok());
    let mut conn = transport::connect(&t.endpoint, &t.trust, client).await?;
    conn.send(&first).await?;
    crash::point("after-init-sent");
    // A hint only: an operation that needs what failed to load reports the failure itself.
    if let Err(e) = fx.store.prepare(expected_key.as_ref()) {
        tracing::debug!(error = %e, "could not get the key store ready ahead of the challenge");
    }
    if matches!(fx.kind, CeremonyKind::Renewal | CeremonyKind::Recovery) {
        ceremony.mark_early(fx)?;
    }
    loop {
        let msg = conn.recv().await?;
        match ceremony.handle(msg, fx)? {
            Step::Send(m) => {
                conn.send(&m).await?;
                match m {
                    ClientMessage::RotationResponse(_) => {
                        crash::point("after-rotation-response-sent")
                    }
                    ClientMessage::ChallengeSolution(_) => {
                        crash::point("after-solution-sent");
                        // Most likely the last TPM use of this ceremony: unload while the
                        // service commits (a further round makes what it needs again).
                        fx.store.release();
                    }
                    _ => {}
                }
            }
            Step::Done(o) => {
                let ca = conn.learned_ca().cloned();
                conn.close().await;
                return Ok((*o, ca));
            }
        }
    }
}
