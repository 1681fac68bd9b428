//! Connection workers: one thread per core, each running its own single-threaded tokio runtime,
//! with accepted connections handed out in turn.
//!
//! A ceremony connection is short and independent of every other, so work stealing buys little,
//! and tokio's multi-thread scheduler would cost the agent: a `--workspace` build unifies tokio's
//! features, and `rt-multi-thread` compiled into `boundkeyd` makes it larger than a build of the
//! agent alone (docs/performance.md). Each worker also has its own blocking pool for store calls.

use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;

use tokio::runtime::{Builder, Handle};
use tokio::sync::oneshot;

/// A running worker: its runtime's handle, the signal that ends it, and its thread.
struct Worker {
    handle: Handle,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// A fixed set of worker runtimes. Dropping it stops every worker (tasks still running are
/// cancelled) and waits for their threads, so nothing outlives the daemon.
pub struct Workers {
    workers: Vec<Worker>,
    next: AtomicUsize,
}

impl Workers {
    /// Starts `n` workers (at least one).
    pub fn start(n: usize) -> io::Result<Workers> {
        let mut workers = Vec::with_capacity(n.max(1));
        for i in 0..n.max(1) {
            let rt = Builder::new_current_thread().enable_all().build()?;
            let handle = rt.handle().clone();
            let (stop, stopped) = oneshot::channel::<()>();
            let thread = std::thread::Builder::new()
                .name(format!("authd-worker-{i}"))
                .spawn(move || {
                    // Drives the spawned connections until told to stop (or the sender is gone).
                    let _ = rt.block_on(stopped);
                })?;
            workers.push(Worker {
                handle,
                stop: Some(stop),
                thread: Some(thread),
            });
        }
        Ok(Workers {
            workers,
            next: AtomicUsize::new(0),
        })
    }

    /// As many workers as the machine has cores.
    pub fn per_core() -> io::Result<Workers> {
        Workers::start(std::thread::available_parallelism().map_or(1, |n| n.get()))
    }

    pub fn len(&self) -> usize {
        self.workers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.workers.is_empty()
    }

    /// Runs `fut` on the next worker in turn. Its body first runs on that worker's thread, so
    /// sockets it registers there (`TcpStream::from_std`) belong to that worker's reactor.
    pub fn spawn<F>(&self, fut: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.workers.len();
        // The task handle is not needed: completion is tracked by the caller's permits.
        drop(self.workers[i].handle.spawn(fut));
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for w in &mut self.workers {
            if let Some(stop) = w.stop.take() {
                let _ = stop.send(());
            }
        }
        for w in &mut self.workers {
            if let Some(t) = w.thread.take() {
                let _ = t.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use std::collections::HashSet;
    use std::sync::{Arc, Mutex};

    #[test]
    fn spreads_work_over_every_worker_and_stops_them() {
        let workers = Workers::start(3).unwrap();
        let seen = Arc::new(Mutex::new(HashSet::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        for _ in 0..6 {
            let seen = seen.clone();
            let tx = tx.clone();
            workers.spawn(async move {
                let name = std::thread::current().name().map(str::to_string);
                seen.lock().unwrap().insert(name);
                tx.send(()).unwrap();
            });
        }
        for _ in 0..6 {
            rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap();
        }
        assert_eq!(seen.lock().unwrap().len(), 3);
        drop(workers); // joins all three threads; hangs (and times the test out) if one did not stop
    }
}
