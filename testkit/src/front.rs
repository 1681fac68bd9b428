//! One address in front of several auth service nodes, as a TCP load balancer puts it: each
//! connection goes to the next node in turn, and to the one after if that node does not accept
//! (it was killed). Bytes are relayed untouched, so TLS runs end to end between the client and
//! the node.

use std::io;
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

/// How a [`Front`] picks a node for a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    /// The next node in turn (then the ones after it, if it does not accept).
    RoundRobin,
    /// The first node of the list that accepts: the others only once it is down.
    Failover,
}

/// A running front; stops accepting when dropped.
pub struct Front {
    addr: SocketAddr,
    backends: Arc<Mutex<Vec<SocketAddr>>>,
    served: Arc<Mutex<Vec<SocketAddr>>>,
    stop: Arc<AtomicBool>,
}

impl Front {
    /// Listens on a free loopback port and sends connections to `backends` by `policy`.
    pub fn start(backends: &[SocketAddr], policy: Policy) -> Front {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind the front");
        let addr = listener.local_addr().expect("front address");
        let backends = Arc::new(Mutex::new(backends.to_vec()));
        let served = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let next = Arc::new(AtomicUsize::new(0));
        {
            let (backends, served, stop) = (backends.clone(), served.clone(), stop.clone());
            thread::spawn(move || {
                for client in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(client) = client else { continue };
                    let list = backends.lock().unwrap().clone();
                    let start = match policy {
                        Policy::RoundRobin => next.fetch_add(1, Ordering::SeqCst),
                        Policy::Failover => 0,
                    };
                    let served = served.clone();
                    thread::spawn(move || {
                        // The first node in turn that accepts gets the connection.
                        for i in 0..list.len() {
                            let b = list[(start + i) % list.len()];
                            if let Ok(server) =
                                TcpStream::connect_timeout(&b, Duration::from_secs(2))
                            {
                                served.lock().unwrap().push(b);
                                let _ = splice(client, server);
                                return;
                            }
                        }
                    });
                }
            });
        }
        Front {
            addr,
            backends,
            served,
            stop,
        }
    }

    /// The address clients use (`127.0.0.1:PORT`).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Replaces the nodes connections go to (new connections only).
    pub fn set_backends(&self, backends: &[SocketAddr]) {
        *self.backends.lock().unwrap() = backends.to_vec();
    }

    /// The node each connection so far went to, in order.
    pub fn served(&self) -> Vec<SocketAddr> {
        self.served.lock().unwrap().clone()
    }
}

impl Drop for Front {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
    }
}

fn splice(client: TcpStream, server: TcpStream) -> io::Result<()> {
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    let (mut c_read, mut s_write) = (client.try_clone()?, server.try_clone()?);
    let up = thread::spawn(move || {
        let _ = io::copy(&mut c_read, &mut s_write);
        let _ = s_write.shutdown(Shutdown::Write);
    });
    let (mut s_read, mut c_write) = (server, client);
    let _ = io::copy(&mut s_read, &mut c_write);
    let _ = c_write.shutdown(Shutdown::Write);
    let _ = up.join();
    Ok(())
}
