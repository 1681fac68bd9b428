//! `boundkey-authd start`: data directory, store, CAs, TLS listener, admin socket, housekeeping.

use std::io::{self, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use boundkey_auth::authority::{Authority, AuthorityState};
use boundkey_auth::service::Service;
use boundkey_auth::store::{Store, StoreError};
use boundkey_auth::ServiceConfig;
use boundkey_fs::{DirLock, FsError, LockError};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::admin::handler::AdminContext;
use crate::admin::{self, socket};
use crate::listener::{self, ListenerConfig};
use crate::store::postgres::config::resolve_password;
use crate::store::{OpenStoreError, PostgresOptions, StorageUrl, StorageUrlError};
use crate::tls::{self, ReloadableClientVerifier, TlsError};
use crate::workers::Workers;

/// How often the client verifier is rebuilt even without a rotation: a grace period ending
/// must drop the old identity CA from the trust store.
const VERIFIER_REFRESH: Duration = Duration::from_secs(60);

/// How often the CA state is read back from the store, so that a rotation made through another
/// auth service process sharing the store reaches this one without a restart. A staged rotation
/// (`--ca-rotation-delay`) must give every process at least this long, plus clock skew.
pub const AUTHORITY_REFRESH: Duration = Duration::from_secs(5);

/// The default rotation delay on PostgreSQL: three refresh periods, for processes that read the
/// state just before the rotation and clocks a little apart.
pub const SHARED_STORE_ROTATION_DELAY: Duration = Duration::from_secs(15);

#[derive(Debug, Clone)]
pub struct Options {
    pub data_dir: PathBuf,
    pub listen: String,
    pub cluster: String,
    pub storage: Option<String>,
    /// PostgreSQL: a file holding the password (else `BOUNDKEY_STORAGE_PASSWORD`, `PGPASSWORD`).
    pub storage_password_file: Option<PathBuf>,
    /// PostgreSQL: most pooled connections (0: the store's default).
    pub storage_pool_size: u32,
    pub tls_names: Vec<String>,
    pub ceremony_timeout: Duration,
    pub first_frame_timeout: Duration,
    pub max_connections: usize,
    pub max_connections_per_address: usize,
    pub max_pending_per_address: usize,
    pub instance_retention: Duration,
    pub purge_interval: Duration,
    /// How long after `ca rotate` the new keys begin to sign (they are trusted at once); see
    /// `boundkey_auth::authority`. Several processes on one store need at least two
    /// [`AUTHORITY_REFRESH`] periods. None: [`SHARED_STORE_ROTATION_DELAY`] on a store made to
    /// be shared (PostgreSQL), none on SQLite.
    pub ca_rotation_delay: Option<Duration>,
    pub service: ServiceConfig,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("data directory {0}")]
    DataDir(#[source] FsError),
    #[error("another boundkey-authd is already running with data directory {}{}", dir.display(), pid.as_deref().map(|p| format!(" (pid {p})")).unwrap_or_default())]
    AlreadyRunning { dir: PathBuf, pid: Option<String> },
    #[error("invalid --cluster {0:?}: use 1-64 characters from [A-Za-z0-9._-]")]
    ClusterName(String),
    #[error(transparent)]
    StorageUrl(#[from] StorageUrlError),
    #[error(transparent)]
    OpenStore(#[from] OpenStoreError),
    #[error("storage: {0}")]
    Store(#[from] StoreError),
    #[error("cannot start the connection workers: {0}")]
    Workers(#[source] io::Error),
    #[error("start-up task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error(
        "data directory {dir} belongs to cluster {stored:?}, not {requested:?} \
         (use --cluster {stored} or another --data-dir)"
    )]
    ClusterMismatch {
        dir: PathBuf,
        stored: String,
        requested: String,
    },
    #[error("CA state: {0}")]
    Authority(#[from] boundkey_auth::authority::AuthorityError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot write {0}")]
    WriteFile(#[source] FsError),
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: String, source: io::Error },
    #[error(transparent)]
    AdminSocket(#[from] socket::BindError),
    #[error("cannot install signal handlers: {0}")]
    Signals(io::Error),
}

fn dir_err(path: &Path) -> impl Fn(io::Error) -> StartError + '_ {
    move |source| StartError::DataDir(FsError::new(path, source))
}

/// Creates the data directory (0700) or tightens an existing one.
fn prepare_data_dir(dir: &Path) -> Result<(), StartError> {
    // An existing directory may be reached through a symlink the operator made; only a missing
    // one is created (ensure_dir refuses anything but a real directory).
    if !dir.is_dir() {
        boundkey_fs::ensure_dir(dir, 0o700).map_err(StartError::DataDir)?;
    }
    if boundkey_fs::tighten_dir(dir).map_err(StartError::DataDir)? {
        tracing::warn!(dir = %dir.display(), "data directory was accessible to others; removed group and other access");
    }
    Ok(())
}

/// File in the data directory whose `flock` marks it as in use: two servers never share one
/// data directory (they would fight over the admin socket).
const LOCK_NAME: &str = "authd.lock";

fn lock_data_dir(dir: &Path) -> Result<DirLock, StartError> {
    DirLock::acquire(dir, LOCK_NAME).map_err(|e| match e {
        LockError::Busy { dir, pid } => StartError::AlreadyRunning { dir, pid },
        LockError::Fs(e) => StartError::DataDir(e),
    })
}

/// The CA state and its store revision, made on the very first start.
fn load_or_create_authority(
    store: &Arc<dyn Store>,
    cluster: &str,
    dir: &Path,
) -> Result<(AuthorityState, u64), StartError> {
    if let Some((state, rev)) = store.load_authority()? {
        if state.cluster != cluster {
            return Err(StartError::ClusterMismatch {
                dir: dir.to_path_buf(),
                stored: state.cluster,
                requested: cluster.into(),
            });
        }
        return Ok((state, rev));
    }
    let state = AuthorityState::generate(cluster, crate::now())?;
    match store.save_authority(&state, None) {
        Ok(()) => {
            tracing::info!(
                cluster,
                "first start: created the TLS, identity and join-state CAs"
            );
            // Revisions are the store's: 1 on creation (Store::save_authority).
            Ok((state, 1))
        }
        // Another process sharing the database initialised it first: use theirs.
        Err(StoreError::AlreadyExists(_)) => load_or_create_authority(store, cluster, dir),
        Err(e) => Err(e.into()),
    }
}

fn tls_names(extra: &[String]) -> Vec<String> {
    let mut names: Vec<String> = ["localhost", "127.0.0.1", "::1"].map(String::from).into();
    names.extend(crate::hostname());
    for n in extra {
        if !names.contains(n) {
            names.push(n.clone());
        }
    }
    names
}

/// Installs the handlers now (not when first awaited), so a SIGTERM that arrives right after
/// the start-up summary is printed still means a clean shutdown rather than the default kill.
fn shutdown_signal() -> Result<impl std::future::Future<Output = &'static str>, StartError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(StartError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(StartError::Signals)?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        }
    })
}

/// Runs the server until SIGTERM/SIGINT. `out` receives the start-up summary lines.
pub async fn start(opts: Options, out: &mut dyn Write) -> Result<(), StartError> {
    admin_validate_cluster(&opts.cluster)?;
    prepare_data_dir(&opts.data_dir)?;
    // Absolute, so the printed paths and hints work from any working directory.
    let dir = std::fs::canonicalize(&opts.data_dir).map_err(dir_err(&opts.data_dir))?;
    let _dir_lock = lock_data_dir(&dir)?;
    // Before the start-up summary, so its warning precedes "listening".
    let max_connections = fit_open_file_limit(opts.max_connections.max(1));

    let storage = match &opts.storage {
        Some(s) => StorageUrl::parse(s)?,
        None => StorageUrl::default_for(&dir),
    };
    let pg = match &storage {
        StorageUrl::Postgres(_) => PostgresOptions {
            password: resolve_password(opts.storage_password_file.as_deref())
                .map_err(StorageUrlError::from)?,
            pool_size: opts.storage_pool_size,
        },
        StorageUrl::Sqlite(_) if opts.storage_password_file.is_some() => {
            return Err(OpenStoreError::PasswordForSqlite.into())
        }
        // PGPASSWORD may be set for other programs; SQLite simply has no use for it.
        StorageUrl::Sqlite(_) => PostgresOptions::default(),
    };
    let store = {
        let storage = storage.clone();
        tokio::task::spawn_blocking(move || storage.open(&pg)).await??
    };
    let store = crate::store::crash::wrap(store);
    tracing::info!(%storage, "store opened");
    let (state, authority_revision) = {
        let (store, cluster, dir) = (store.clone(), opts.cluster.clone(), dir.clone());
        tokio::task::spawn_blocking(move || load_or_create_authority(&store, &cluster, &dir))
            .await??
    };
    let ca_pin = state.ca_pin()?;
    let authority = Arc::new(Authority::load(&state)?);
    let ca_path = dir.join("ca.pem");
    boundkey_fs::write_atomic(&ca_path, authority.tls_ca_pem().as_bytes(), 0o644)
        .map_err(StartError::WriteFile)?;

    let provider = tls::provider();
    let verifier = ReloadableClientVerifier::new(provider.clone(), &authority, crate::now())?;
    let names = tls_names(&opts.tls_names);
    let tls_config =
        tls::server_config(provider, &authority, &names, verifier.clone(), crate::now())?;
    let service = Service::new(store.clone(), authority, opts.service);

    let tcp = TcpListener::bind(&opts.listen)
        .await
        .map_err(|source| StartError::Listen {
            addr: opts.listen.clone(),
            source,
        })?;
    let listen_addr: SocketAddr = tcp.local_addr().map_err(|source| StartError::Listen {
        addr: opts.listen.clone(),
        source,
    })?;
    let socket_path = dir.join(admin::SOCKET_NAME);
    let admin_listener = socket::bind(&socket_path)?;
    let signal = shutdown_signal()?;

    let admin_ctx = Arc::new(AdminContext {
        service: service.clone(),
        listen_addr,
        ca_pin,
        on_authority_change: {
            let verifier = verifier.clone();
            Box::new(move |a: &Arc<Authority>| verifier.reload(a, crate::now()))
        },
        ca_rotation_delay: opts.ca_rotation_delay.unwrap_or(match storage {
            StorageUrl::Postgres(_) => SHARED_STORE_ROTATION_DELAY,
            StorageUrl::Sqlite(_) => Duration::ZERO,
        }),
    });
    let admin_task = tokio::spawn(socket::serve(admin_listener, admin_ctx));
    let refresh_task = tokio::spawn({
        let (service, verifier) = (service.clone(), verifier.clone());
        async move {
            let mut tick = tokio::time::interval(VERIFIER_REFRESH);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                verifier.reload(&service.authority(), crate::now());
            }
        }
    });
    let sync_task = tokio::spawn(authority_sync_loop(
        service.clone(),
        verifier.clone(),
        authority_revision,
    ));
    let purge_task = tokio::spawn(purge_loop(
        store.clone(),
        opts.instance_retention,
        opts.purge_interval,
    ));

    let d = dir.display();
    let summary = format!(
        "cluster: {cluster}\nca_pin: {ca_pin}\nca_file: {ca}\nlistening: {listen_addr}\n\
         admin_socket: {sock}\n\
         create a bot: boundkeyctl --data-dir {d} bots add NAME\n\
         then a token: boundkeyctl --data-dir {d} tokens add --bot NAME --join-method bound_keypair\n",
        cluster = opts.cluster,
        ca = ca_path.display(),
        sock = socket_path.display(),
    );
    // A closed stdout (daemonised without a terminal) must not stop the server.
    let _ = out.write_all(summary.as_bytes()).and_then(|_| out.flush());
    tracing::info!(%listen_addr, cluster = %opts.cluster, "boundkey-authd listening");

    let (stop_tx, stop_rx) = watch::channel(false);
    let listen_cfg = ListenerConfig {
        ceremony_timeout: opts.ceremony_timeout,
        first_frame_timeout: opts.first_frame_timeout,
        max_connections,
        max_connections_per_address: opts.max_connections_per_address.max(1),
        max_pending_per_address: opts.max_pending_per_address.max(1),
        drain_timeout: opts.ceremony_timeout + Duration::from_secs(5),
    };
    let workers = Arc::new(Workers::per_core().map_err(StartError::Workers)?);
    tracing::debug!(workers = workers.len(), "connection workers started");
    let mut serve = tokio::spawn(listener::run(
        tcp,
        workers,
        TlsAcceptor::from(tls_config),
        service,
        listen_cfg,
        stop_rx,
    ));
    tokio::select! {
        sig = signal => {
            tracing::info!(signal = sig, "shutting down");
            let _ = stop_tx.send(true);
            let _ = (&mut serve).await;
        }
        _ = &mut serve => {}
    }
    admin_task.abort();
    refresh_task.abort();
    sync_task.abort();
    purge_task.abort();
    let _ = std::fs::remove_file(&socket_path);
    tracing::info!("stopped");
    Ok(())
}

/// File descriptors kept out of `--max-connections`: database, admin socket and its clients,
/// log, runtime.
const RESERVED_FDS: u64 = 64;

/// Raises the soft open-file limit towards the hard one so `max` connections fit, and returns
/// how many connections do fit: accepting past the limit would fail with EMFILE, which refuses
/// everyone alike, so the cap is lowered instead (with a warning).
fn fit_open_file_limit(max: usize) -> usize {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let want = (max as u64).saturating_add(RESERVED_FDS);
    let mut lim = getrlimit(Resource::Nofile);
    let soft = lim.current.unwrap_or(u64::MAX);
    if soft >= want {
        return max;
    }
    let target = lim.maximum.map_or(want, |hard| hard.min(want));
    if target > soft {
        lim.current = Some(target);
        if let Err(e) = setrlimit(Resource::Nofile, lim) {
            tracing::warn!(error = %e, "cannot raise the open-file limit");
        }
    }
    let soft = getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX);
    if soft >= want {
        return max;
    }
    let fits = usize::try_from(soft.saturating_sub(RESERVED_FDS))
        .unwrap_or(max)
        .max(1);
    tracing::warn!(
        requested = max,
        fits,
        open_file_limit = soft,
        "--max-connections lowered to fit the open-file limit (raise `ulimit -n`)"
    );
    fits
}

fn admin_validate_cluster(cluster: &str) -> Result<(), StartError> {
    boundkey_auth::admin::validate_name(cluster)
        .map_err(|_| StartError::ClusterName(cluster.into()))
}

/// Installs the CA state another process wrote (a `ca rotate` through another node) once its
/// revision changes. A failed read is retried at the next tick; the authority in use stays.
async fn authority_sync_loop(
    service: Service,
    verifier: Arc<ReloadableClientVerifier>,
    mut seen: u64,
) {
    let mut tick = tokio::time::interval(AUTHORITY_REFRESH);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let store = service.store().clone();
        let read = tokio::task::spawn_blocking(move || store.load_authority()).await;
        let (state, rev) = match read {
            Ok(Ok(Some(found))) => found,
            Ok(Ok(None)) => continue,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot read the CA state back from the store");
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "CA state read failed");
                continue;
            }
        };
        if rev == seen {
            continue;
        }
        match Authority::load(&state) {
            Ok(a) => {
                let a = Arc::new(a);
                service.replace_authority(a.clone());
                verifier.reload(&a, crate::now());
                seen = rev;
                tracing::info!(revision = rev, "CA state changed in the store; now in use");
            }
            Err(e) => {
                tracing::error!(error = %e, "the CA state in the store is unusable; keeping the one in use")
            }
        }
    }
}

async fn purge_loop(store: Arc<dyn Store>, retention: Duration, every: Duration) {
    let retention = i64::try_from(retention.as_secs()).unwrap_or(i64::MAX);
    let mut tick = tokio::time::interval(every.max(Duration::from_secs(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let cutoff = crate::now().saturating_sub(retention);
        let store = store.clone();
        match tokio::task::spawn_blocking(move || store.purge_instances(cutoff)).await {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => tracing::info!(
                purged = n,
                "purged bot instances expired past the retention period"
            ),
            Ok(Err(e)) => tracing::warn!(error = %e, "purging expired bot instances failed"),
            Err(e) => tracing::warn!(error = %e, "purge task failed"),
        }
    }
}
