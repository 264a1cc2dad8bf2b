//! Steering new connections during a rollout.
//!
//! A Node app whose stop handler is `server.close()` (most of them) closes
//! its idle keep-alive connections at once, and a client with a request in
//! flight on one sees a read error. Measured (benches/node_reload.rs), a
//! reload failed exactly one request per connection the old worker held when
//! it was stopped. With one SO_REUSEPORT socket per slot, the clients
//! reconnecting after slot 0's old worker closed its connections land on
//! every slot, so the old workers of slots 1, 2, 3 each held more
//! connections than the one before, and closed them too: a cascade.
//!
//! So while a rollout runs, supd attaches a classic BPF program to each
//! address's SO_REUSEPORT group that sends new connections only to slots
//! whose new worker is ready; each connection is then closed by an old worker
//! at most once per reload. The program picks a socket by its index in the
//! group, which is the order sockets joined it: a socket joins at the end and
//! a closed one is replaced by the last (the kernel's swap-remove), which
//! [`Groups`] mirrors. Where that order is unknown (sockets passed by
//! systemd's fd store) nothing is steered. An index the group does not have
//! makes the kernel fall back to its hash, so a wrong guess misroutes, never drops.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, Weak};

use crate::fdstore::StoredFd;

/// `SO_ATTACH_REUSEPORT_CBPF` (Linux 4.5).
const SO_ATTACH_REUSEPORT_CBPF: libc::c_int = 51;
/// `SO_DETACH_REUSEPORT_BPF` (Linux 5.8).
const SO_DETACH_REUSEPORT_BPF: libc::c_int = 68;
/// `SKF_AD_OFF + SKF_AD_RANDOM`: a classic BPF load of a random number.
const LOAD_RANDOM: u32 = 0xFFFF_F000 + 56;

/// One address's group: the slot of each index, and its socket.
#[derive(Debug, Default)]
struct Group {
    members: Vec<(u32, Weak<StoredFd>)>,
}

/// The SO_REUSEPORT groups of one app, one per `listen` address.
#[derive(Debug, Clone, Default)]
pub struct Groups {
    inner: Arc<Mutex<Vec<Group>>>,
    // The order is known only when supd bound every socket itself.
    known: bool,
}

impl Groups {
    /// Groups for `addrs` addresses; `known` is false when sockets were adopted from elsewhere.
    pub fn new(addrs: usize, known: bool) -> Groups {
        Groups { inner: Arc::new(Mutex::new((0..addrs).map(|_| Group::default()).collect())), known }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Group>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `slot`'s socket for address `addr` joined its group.
    pub fn joined(&self, addr: usize, slot: u32, fd: &Arc<StoredFd>) {
        if let Some(g) = self.lock().get_mut(addr) {
            g.members.retain(|(s, _)| *s != slot);
            g.members.push((slot, Arc::downgrade(fd)));
        }
    }

    /// `slot`'s sockets were closed: they left their groups.
    pub fn left(&self, slot: u32) {
        for g in self.lock().iter_mut() {
            if let Some(i) = g.members.iter().position(|(s, _)| *s == slot) {
                g.members.swap_remove(i);
            }
        }
    }

    /// Sends new connections to the sockets of `slots` only; `None` gives
    /// them back to the kernel's hash over every slot.
    pub fn steer(&self, slots: Option<&[u32]>) {
        for g in self.lock().iter_mut() {
            // Sockets dropped without `left` (slots removed by a scale-down) left the group too.
            for i in (0..g.members.len()).rev() {
                if g.members[i].1.strong_count() == 0 {
                    g.members.swap_remove(i);
                }
            }
            let Some(fd) = g.members.iter().find_map(|(_, w)| w.upgrade()) else { continue };
            let indices: Option<Vec<u32>> = slots.filter(|s| self.known && !s.is_empty()).and_then(|slots| {
                slots.iter().map(|s| g.members.iter().position(|(m, _)| m == s).map(|i| i as u32)).collect()
            });
            let r = match indices {
                Some(ix) => attach(fd.fd().as_raw_fd(), &ix),
                // Kernels before 5.8 cannot detach: spread over every member instead.
                None => detach(fd.fd().as_raw_fd()).or_else(|e| {
                    let all: Vec<u32> = (0..g.members.len() as u32).collect();
                    if all.is_empty() {
                        Err(e)
                    } else {
                        attach(fd.fd().as_raw_fd(), &all)
                    }
                }),
            };
            if let Err(e) = r {
                tracing::debug!("cannot steer new connections: {e}");
            }
        }
    }
}

/// The program: a random one of `indices`.
fn program(indices: &[u32]) -> Vec<libc::sock_filter> {
    let op = |code: u32, jt: u8, jf: u8, k: u32| libc::sock_filter { code: code as u16, jt, jf, k };
    let mut p = vec![
        op(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 0, 0, LOAD_RANDOM),
        op(libc::BPF_ALU | libc::BPF_MOD | libc::BPF_K, 0, 0, indices.len() as u32),
    ];
    for (j, &ix) in indices.iter().enumerate() {
        p.push(op(libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K, 0, 1, j as u32));
        p.push(op(libc::BPF_RET | libc::BPF_K, 0, 0, ix));
    }
    p.push(op(libc::BPF_RET | libc::BPF_K, 0, 0, indices[0]));
    p
}

fn attach(fd: libc::c_int, indices: &[u32]) -> std::io::Result<()> {
    let mut filter = program(indices);
    let prog = libc::sock_fprog { len: filter.len() as u16, filter: filter.as_mut_ptr() };
    // SAFETY: `prog` points at `filter`, which outlives the call; the kernel copies it.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            SO_ATTACH_REUSEPORT_CBPF,
            (&prog as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn detach(fd: libc::c_int) -> std::io::Result<()> {
    let unused: libc::c_int = 0;
    // SAFETY: a valid int for the option value; the kernel reads nothing else.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            SO_DETACH_REUSEPORT_BPF,
            (&unused as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    // No program attached: nothing to detach.
    if r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::ENOENT) {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    fn bind(port: u16) -> Arc<StoredFd> {
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
        sock.set_reuse_port(true).expect("reuseport");
        sock.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], port)).into()).expect("bind");
        sock.listen(64).expect("listen");
        let stored = crate::fdstore::adopt_or_bind("steer-test", |_| false, || Ok(sock.into())).expect("store");
        Arc::new(stored)
    }

    /// Real sockets: with the program attached every connection lands on the
    /// steered slot; detached, the kernel spreads them again.
    #[test]
    fn steers_to_the_chosen_slots_and_back() {
        let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("port").port();
        let groups = Groups::new(1, true);
        let fds: Vec<Arc<StoredFd>> = (0..3).map(|_| bind(port)).collect();
        for (slot, fd) in fds.iter().enumerate() {
            groups.joined(0, slot as u32, fd);
        }
        let listeners: Vec<TcpListener> = fds
            .iter()
            .map(|f| {
                let l = TcpListener::from(f.fd().try_clone().expect("dup"));
                l.set_nonblocking(true).expect("nonblocking");
                l
            })
            .collect();
        let count = |n: usize| -> Vec<usize> {
            let _conns: Vec<TcpStream> =
                (0..n).map(|_| TcpStream::connect(("127.0.0.1", port)).expect("connect")).collect();
            listeners.iter().map(|l| std::iter::from_fn(|| l.accept().ok()).count()).collect()
        };
        groups.steer(Some(&[1]));
        assert_eq!(count(30), vec![0, 30, 0]);
        groups.steer(Some(&[0, 2]));
        let c = count(60);
        assert_eq!((c[1], c[0] + c[2]), (0, 60), "{c:?}");
        assert!(c[0] > 0 && c[2] > 0, "both steered slots get connections: {c:?}");
        groups.steer(None);
        let c = count(90);
        assert!(c.iter().all(|n| *n > 0), "spread again: {c:?}");
        // A slot whose sockets closed leaves the group; the last one takes its index.
        groups.left(0);
        drop(listeners);
        groups.steer(Some(&[2]));
    }
}
