//! A TCP relay between a TPM client and a [`Swtpm`](crate::Swtpm) that records every TPM
//! command passing through it, so tests and benchmarks can state how many commands (and which)
//! an operation costs without trusting the code under test to count them.
//!
//! The swtpm TCTI talks to two ports, commands on `P` and control on `P + 1`; the relay listens
//! on its own pair and forwards each to the TPM's. Commands are read off the client's byte
//! stream by their header (tag, size, command code), whatever the connection pattern. A command
//! byte-for-byte equal to the one before it is the TSS resubmitting after `TPM_RC_RETRY` (swtpm
//! answers so now and then): it is counted apart, as the TPM's doing, not the client's.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

/// Names of the command codes the key store and the attestation use (TPM 2.0 Part 2, 6.5.2).
pub fn command_name(code: u32) -> &'static str {
    match code {
        0x0000_0120 => "EvictControl",
        0x0000_0131 => "CreatePrimary",
        0x0000_0147 => "ActivateCredential",
        0x0000_0148 => "Certify",
        0x0000_014e => "NV_Read",
        0x0000_0153 => "Create",
        0x0000_0157 => "Load",
        0x0000_015d => "Sign",
        0x0000_0165 => "FlushContext",
        0x0000_0169 => "NV_ReadPublic",
        0x0000_0173 => "ReadPublic",
        0x0000_0176 => "StartAuthSession",
        0x0000_017a => "GetCapability",
        0x0000_017b => "GetRandom",
        0x0000_0144 => "Startup",
        0x0000_0151 => "PolicySecret",
        0x0000_0171 => "PolicyOR",
        _ => "other",
    }
}

/// A running relay; stops accepting when dropped.
pub struct TpmCommandCounter {
    port: u16,
    commands: Arc<Mutex<Seen>>,
    stop: Arc<AtomicBool>,
}

#[derive(Default)]
struct Seen {
    codes: Vec<u32>,
    last: Vec<u8>,
    resubmissions: usize,
    /// Every byte sent to the TPM, and every byte it answered, in order (what a probe on the
    /// TPM bus would record).
    to_tpm: Vec<u8>,
    from_tpm: Vec<u8>,
}

impl TpmCommandCounter {
    /// Relays to the swtpm whose command port is `tpm_port` (control on `tpm_port + 1`).
    pub fn start(tpm_port: u16) -> TpmCommandCounter {
        let commands = Arc::new(Mutex::new(Seen::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (cmd, ctrl) = bind_pair();
        let port = cmd.local_addr().unwrap().port();
        for (listener, target, count) in [(cmd, tpm_port, true), (ctrl, tpm_port + 1, false)] {
            let commands = commands.clone();
            let stop = stop.clone();
            thread::spawn(move || {
                for client in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(client) = client else { continue };
                    let commands = count.then(|| commands.clone());
                    thread::spawn(move || {
                        let _ = relay(client, target, commands);
                    });
                }
            });
        }
        TpmCommandCounter {
            port,
            commands,
            stop,
        }
    }

    /// The TCTI string that reaches the TPM through this relay.
    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    /// Every command code seen so far, in order (resubmissions not included).
    pub fn commands(&self) -> Vec<u32> {
        self.commands.lock().unwrap().codes.clone()
    }

    /// The commands seen so far, and forgets them.
    pub fn take(&self) -> Vec<u32> {
        let mut seen = self.commands.lock().unwrap();
        seen.last.clear();
        std::mem::take(&mut seen.codes)
    }

    /// Everything the client sent to the TPM and everything the TPM answered, so far: what
    /// someone sniffing the bus would have.
    pub fn traffic(&self) -> (Vec<u8>, Vec<u8>) {
        let seen = self.commands.lock().unwrap();
        (seen.to_tpm.clone(), seen.from_tpm.clone())
    }

    /// How many commands the TSS sent again after the TPM asked it to retry.
    pub fn resubmissions(&self) -> usize {
        self.commands.lock().unwrap().resubmissions
    }

    /// `commands` as names, e.g. `CreatePrimary, Load, Sign, FlushContext x2`.
    pub fn describe(commands: &[u32]) -> String {
        let mut out: Vec<(u32, usize)> = Vec::new();
        for &c in commands {
            match out.last_mut() {
                Some((last, n)) if *last == c => *n += 1,
                _ => out.push((c, 1)),
            }
        }
        out.iter()
            .map(|&(c, n)| match n {
                1 => command_name(c).to_string(),
                _ => format!("{} x{n}", command_name(c)),
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl Drop for TpmCommandCounter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake both accept loops so they see the flag.
        let _ = TcpStream::connect((Ipv4Addr::LOCALHOST, self.port));
        let _ = TcpStream::connect((Ipv4Addr::LOCALHOST, self.port + 1));
    }
}

fn bind_pair() -> (TcpListener, TcpListener) {
    for _ in 0..50 {
        let a = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let p = a.local_addr().unwrap().port();
        if p == u16::MAX {
            continue;
        }
        if let Ok(b) = TcpListener::bind((Ipv4Addr::LOCALHOST, p + 1)) {
            return (a, b);
        }
    }
    panic!("no adjacent free ports for the TPM command relay");
}

fn relay(client: TcpStream, target: u16, commands: Option<Arc<Mutex<Seen>>>) -> io::Result<()> {
    let server = TcpStream::connect((Ipv4Addr::LOCALHOST, target))?;
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    let (mut c_read, mut s_write) = (client.try_clone()?, server.try_clone()?);
    let answers = commands.clone();
    let upstream = thread::spawn(move || {
        let mut parser = CommandParser::default();
        let mut buf = [0u8; 4096];
        loop {
            let n = match c_read.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if let Some(c) = &commands {
                let mut seen = c.lock().unwrap();
                seen.to_tpm.extend_from_slice(&buf[..n]);
                for cmd in parser.feed(&buf[..n]) {
                    if cmd == seen.last {
                        seen.resubmissions += 1;
                        continue;
                    }
                    seen.codes.push(code_of(&cmd));
                    seen.last = cmd;
                }
            }
            if s_write.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = s_write.shutdown(Shutdown::Write);
    });
    let (mut s_read, mut c_write) = (server, client);
    let mut buf = [0u8; 4096];
    loop {
        let n = match s_read.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some(c) = &answers {
            c.lock().unwrap().from_tpm.extend_from_slice(&buf[..n]);
        }
        if c_write.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = c_write.shutdown(Shutdown::Write);
    let _ = upstream.join();
    Ok(())
}

fn code_of(cmd: &[u8]) -> u32 {
    u32::from_be_bytes([cmd[6], cmd[7], cmd[8], cmd[9]])
}

/// Splits a client's byte stream into whole TPM commands: a 10-byte header (tag, size, code),
/// then `size - 10` bytes of body.
#[derive(Default)]
struct CommandParser {
    cmd: Vec<u8>,
}

impl CommandParser {
    fn feed(&mut self, mut bytes: &[u8]) -> Vec<Vec<u8>> {
        let mut done = Vec::new();
        while !bytes.is_empty() {
            let want = if self.cmd.len() < 10 {
                10
            } else {
                let h = &self.cmd;
                (u32::from_be_bytes([h[2], h[3], h[4], h[5]]) as usize).max(10)
            };
            let n = (want - self.cmd.len()).min(bytes.len());
            self.cmd.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            if self.cmd.len() >= 10 && self.cmd.len() == want {
                let h = &self.cmd;
                let size = (u32::from_be_bytes([h[2], h[3], h[4], h[5]]) as usize).max(10);
                if size == self.cmd.len() {
                    done.push(std::mem::take(&mut self.cmd));
                }
            }
        }
        done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_split_whatever_the_chunking() {
        // Two commands: GetRandom (12 bytes) and FlushContext (14 bytes).
        let mut stream = vec![0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x7b, 0, 8];
        stream.extend([0x80, 0x01, 0, 0, 0, 14, 0, 0, 0x01, 0x65, 0x80, 0, 0, 1]);
        for chunk in 1..stream.len() {
            let mut p = CommandParser::default();
            let seen: Vec<u32> = stream
                .chunks(chunk)
                .flat_map(|c| p.feed(c))
                .map(|c| code_of(&c))
                .collect();
            assert_eq!(seen, vec![0x17b, 0x165], "chunk {chunk}");
        }
        assert_eq!(
            TpmCommandCounter::describe(&[0x131, 0x157, 0x15d, 0x165, 0x165]),
            "CreatePrimary, Load, Sign, FlushContext x2"
        );
    }
}
