//! Listening sockets: one lock per listen port, every shard's listener bound
//! before any shard starts, and a previous run's sockets waited out.
//!
//! Node-wide; used once at start, on the thread that starts the broker.
//!
//! Every shard listens on each address with `SO_REUSEPORT`, so a second
//! broker of the same user could bind the same port and silently take part
//! of the clients. Exclusivity therefore comes from a lock the kernel drops
//! when the process ends, however it ends: an abstract-namespace Unix socket
//! named after the address (`@shardmq/tcp-port/1883/10.0.0.5`, or
//! `@shardmq/tcp-port/1883` for every address of the host; per network
//! namespace, as ports are). A second broker on the address is refused and
//! told which process holds it, and so is one on every address of a port
//! where another listens on one address, or the other way round; two
//! brokers on two addresses of one port are not. A broker whose previous
//! run has just exited, even by `kill -9`, always gets the lock.
//!
//! After a `kill -9` the previous run's listening sockets may outlive the
//! process for a moment (io_uring releases its files after the process has
//! gone). Binding with `SO_REUSEPORT` succeeds beside them, but a client the
//! kernel steers to one of them would be reset, so start-up waits (at most
//! [`STALE_WAIT`]) until no other socket listens on the port, saying so in
//! the log. A socket on the port that a live process holds is named in the
//! refusal instead.

use std::collections::HashSet;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr as UnixAddr, UnixListener};
use std::time::{Duration, Instant};

use thiserror::Error;

/// How long start-up waits for a previous run's sockets on a listen port
/// to close, or for a bind refused with "address in use" to go through.
pub const STALE_WAIT: Duration = Duration::from_secs(5);

/// Listen backlog of every listening socket (see `tuning/README.md`).
const BACKLOG: i32 = 4096;

/// Why the broker cannot listen on an address.
#[derive(Debug, Error)]
pub enum ListenError {
    /// Another shardmq (or anything holding the port lock) runs on the
    /// address, or on every address of its port, or (for an address that is
    /// every address) on one of the port's.
    #[error(
        "cannot listen on {addr}: port {} is held by another shardmq ({holder}); \
         two brokers on one address would split its clients",
        addr.port()
    )]
    Locked {
        /// The address asked for.
        addr: SocketAddr,
        /// Who holds the lock, as far as `/proc` tells.
        holder: String,
    },
    /// Another process listens on the address.
    #[error("cannot listen on {addr}: address in use by {holder}")]
    InUse {
        /// The address asked for.
        addr: SocketAddr,
        /// Who listens there, as far as `/proc` tells.
        holder: String,
    },
    /// Binding or listening failed.
    #[error("cannot listen on {addr}: {source}")]
    Io {
        /// The address asked for.
        addr: SocketAddr,
        /// What failed.
        source: io::Error,
    },
}

/// Every shard's listening sockets and the port locks; the locks are held
/// while this (or the broker that keeps [`Listeners::locks`]) lives.
#[derive(Debug)]
pub struct Listeners {
    /// The addresses listened on, port 0 resolved, in configuration order.
    pub addrs: Vec<SocketAddr>,
    /// `sockets[shard][i]` listens on `addrs[i]`.
    pub sockets: Vec<Vec<socket2::Socket>>,
    /// One lock per port.
    pub locks: Vec<PortLock>,
}

/// The lock on one listen port; released when dropped or at process exit.
#[derive(Debug)]
pub struct PortLock {
    _socket: UnixListener,
}

/// Lock each port of `listen` and bind `shards` listening sockets to each
/// address, waiting out a previous run's sockets.
pub fn open(listen: &[SocketAddr], shards: usize) -> Result<Listeners, ListenError> {
    let mut out = Listeners {
        addrs: Vec::with_capacity(listen.len()),
        sockets: (0..shards).map(|_| Vec::new()).collect(),
        locks: Vec::new(),
    };
    let mut locked = HashSet::new();
    for &asked in listen {
        let deadline = Instant::now() + STALE_WAIT;
        if asked.port() != 0 && locked.insert(lock_name(asked.ip(), asked.port())) {
            out.locks.push(lock_port(asked, asked.port())?);
        }
        let first = bind_retrying(asked, deadline)?;
        let addr = first
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .ok_or_else(|| ListenError::Io {
                addr: asked,
                source: io::Error::other("no local address after bind"),
            })?;
        if asked.port() == 0 && locked.insert(lock_name(addr.ip(), addr.port())) {
            out.locks.push(lock_port(asked, addr.port())?);
        }
        out.sockets[0].push(first);
        for shard in out.sockets.iter_mut().skip(1) {
            shard.push(bind_retrying(addr, deadline)?);
        }
        wait_for_stale(addr, deadline)?;
        out.addrs.push(addr);
    }
    Ok(out)
}

/// Take the abstract-socket lock of `addr`'s address on `port`, or say
/// who holds it or one it overlaps (see the module docs).
fn lock_port(addr: SocketAddr, port: u16) -> Result<PortLock, ListenError> {
    let whole = format!("shardmq/tcp-port/{port}");
    let every = addr.ip().to_canonical().is_unspecified();
    let name = lock_name(addr.ip(), port);
    let locked = |held: Vec<u64>| {
        let holder =
            process_holding(&held).unwrap_or_else(|| "a process this user cannot see".into());
        ListenError::Locked { addr, holder }
    };
    let bound =
        UnixAddr::from_abstract_name(name.as_bytes()).and_then(|a| UnixListener::bind_addr(&a));
    let socket = match bound {
        Ok(socket) => socket,
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
            let held = unix_socket_inodes(|n| n == format!("@{name}")).unwrap_or_default();
            return Err(locked(held));
        }
        Err(source) => return Err(ListenError::Io { addr, source }),
    };
    // The locks this one overlaps: every address of the port, or (for
    // every address) each one of the port's; this process's own (a
    // configuration listing both) do not count.
    let mine = format!("@{name}");
    let own = own_socket_inodes();
    let overlapping: Vec<u64> = unix_socket_inodes(|n| match every {
        true => n != mine && n.starts_with(&format!("@{whole}/")),
        false => n == format!("@{whole}"),
    })
    .unwrap_or_default()
    .into_iter()
    .filter(|i| !own.contains(i))
    .collect();
    if !overlapping.is_empty() {
        return Err(locked(overlapping));
    }
    Ok(PortLock { _socket: socket })
}

/// The lock's name for `ip` on `port`: the port's for every address
/// (IPv4-mapped ones as what the kernel binds them to).
fn lock_name(ip: IpAddr, port: u16) -> String {
    match ip.to_canonical() {
        ip if ip.is_unspecified() => format!("shardmq/tcp-port/{port}"),
        ip => format!("shardmq/tcp-port/{port}/{ip}"),
    }
}

/// Bind one listening socket, retrying "address in use" until `deadline`
/// unless a live process is found listening there.
fn bind_retrying(addr: SocketAddr, deadline: Instant) -> Result<socket2::Socket, ListenError> {
    let mut said = false;
    loop {
        match bind_one(addr) {
            Ok(s) => return Ok(s),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                if let Some(holder) = process_holding(&tcp_listeners(addr)) {
                    return Err(ListenError::InUse { addr, holder });
                }
                if Instant::now() >= deadline {
                    return Err(ListenError::Io { addr, source: e });
                }
                if !said {
                    log::info!("{addr}: address in use by no live process; retrying the bind");
                    said = true;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(source) => return Err(ListenError::Io { addr, source }),
        }
    }
}

/// A listening socket on `addr`: SO_REUSEPORT (every shard listens on the
/// same address and the kernel spreads connections) and SO_REUSEADDR (a
/// restart is not refused while the previous run's connections sit in
/// TIME_WAIT). Close-on-exec, as socket2 makes every socket.
fn bind_one(addr: SocketAddr) -> io::Result<socket2::Socket> {
    let domain = socket2::Domain::for_address(addr);
    let socket = socket2::Socket::new(domain, socket2::Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket)
}

/// Wait until no socket but ours listens on `addr`'s port (for an address
/// that overlaps `addr`), until `deadline`. A live process listening there
/// is an error; sockets no process holds are a previous run's, closing.
fn wait_for_stale(addr: SocketAddr, deadline: Instant) -> Result<(), ListenError> {
    let mut said = false;
    loop {
        let ours = own_socket_inodes();
        let others: Vec<u64> = tcp_listeners(addr)
            .into_iter()
            .filter(|i| !ours.contains(i))
            .collect();
        if others.is_empty() {
            if said {
                log::info!("{addr}: the previous run's sockets are closed");
            }
            return Ok(());
        }
        if let Some(holder) = process_holding(&others) {
            return Err(ListenError::InUse { addr, holder });
        }
        if Instant::now() >= deadline {
            log::warn!(
                "{addr}: {} listening socket(s) of a previous run still open after {} s; \
                 serving anyway",
                others.len(),
                STALE_WAIT.as_secs()
            );
            return Ok(());
        }
        if !said {
            log::info!(
                "{addr}: waiting for {} listening socket(s) of a previous run to close",
                others.len()
            );
            said = true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Inodes of the TCP sockets listening on `addr`'s port at an address that
/// overlaps `addr` (the same, or either one unspecified).
fn tcp_listeners(addr: SocketAddr) -> Vec<u64> {
    let mut inodes = Vec::new();
    for (file, v6) in [("/proc/net/tcp", false), ("/proc/net/tcp6", true)] {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        for line in text.lines().skip(1) {
            if let Some((ip, port, inode)) = parse_tcp_listener(line, v6) {
                let (ip, mine) = (ip.to_canonical(), addr.ip().to_canonical());
                let overlaps = ip == mine || ip.is_unspecified() || mine.is_unspecified();
                if port == addr.port() && overlaps && inode != 0 {
                    inodes.push(inode);
                }
            }
        }
    }
    inodes
}

/// One line of `/proc/net/tcp{,6}`: the local address, port and inode of a
/// socket in state LISTEN (0A); None for other states or a line it cannot
/// read.
fn parse_tcp_listener(line: &str, v6: bool) -> Option<(IpAddr, u16, u64)> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    if fields.get(3) != Some(&"0A") {
        return None;
    }
    let (ip_hex, port_hex) = fields.get(1)?.split_once(':')?;
    let port = u16::from_str_radix(port_hex, 16).ok()?;
    let inode = fields.get(9)?.parse().ok()?;
    // The kernel prints each 32-bit word of the address as a host-order
    // number: its bytes in memory are the address bytes.
    let mut bytes = [0u8; 16];
    let words = if v6 { 4 } else { 1 };
    if ip_hex.len() != words * 8 {
        return None;
    }
    for w in 0..words {
        let word = u32::from_str_radix(ip_hex.get(w * 8..w * 8 + 8)?, 16).ok()?;
        bytes[w * 4..w * 4 + 4].copy_from_slice(&word.to_ne_bytes());
    }
    let ip = if v6 {
        IpAddr::V6(Ipv6Addr::from(bytes))
    } else {
        IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
    };
    Some((ip, port, inode))
}

/// Inodes of the Unix sockets bound to `path` (`@name` for an abstract one).
fn unix_socket_inodes(path: impl Fn(&str) -> bool) -> Option<Vec<u64>> {
    let text = std::fs::read_to_string("/proc/net/unix").ok()?;
    let inodes: Vec<u64> = text
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields
                .get(7)
                .is_some_and(|p| path(p))
                .then(|| fields.get(6)?.parse().ok())?
        })
        .collect();
    Some(inodes)
}

/// The socket inodes this process holds.
fn own_socket_inodes() -> HashSet<u64> {
    fd_socket_inodes(std::path::Path::new("/proc/self/fd")).collect()
}

/// The socket inodes in one `/proc/PID/fd` directory.
fn fd_socket_inodes(dir: &std::path::Path) -> impl Iterator<Item = u64> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let link = std::fs::read_link(e.ok()?.path()).ok()?;
            let link = link.to_str()?;
            link.strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        })
}

/// "pid N (name)" of a process holding one of `inodes`, if one is visible.
fn process_holding(inodes: &[u64]) -> Option<String> {
    if inodes.is_empty() {
        return None;
    }
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        if fd_socket_inodes(&entry.path().join("fd")).any(|i| inodes.contains(&i)) {
            let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
            return Some(format!("pid {pid} ({})", comm.trim()));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_net_tcp_lines_parse_as_the_kernel_prints_them() {
        let v4 = "   1: 0100007F:075B 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 123456 1 0000000000000000 100 0 0 10 0";
        assert_eq!(
            parse_tcp_listener(v4, false),
            Some(("127.0.0.1".parse().unwrap(), 1883, 123456))
        );
        let established = v4.replace(" 0A ", " 01 ");
        assert_eq!(parse_tcp_listener(&established, false), None);
        let v6 = "   0: 00000000000000000000000001000000:075B 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 42 1 0000000000000000 100 0 0 10 0";
        assert_eq!(
            parse_tcp_listener(v6, true),
            Some(("::1".parse().unwrap(), 1883, 42))
        );
        assert_eq!(parse_tcp_listener("garbage", false), None);
    }

    #[test]
    fn a_second_lock_on_a_port_names_the_holder() {
        // Port 0 is never locked by a running broker (it locks the port it
        // resolved), so this test cannot collide with one.
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let held = lock_port(addr, 0).unwrap();
        let err = lock_port(addr, 0).unwrap_err().to_string();
        assert!(
            err.contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        // Another address of the port, and (in the same process: one
        // configuration listing both) every address of it, are fine;
        // tests/restart.rs refuses overlaps between two brokers.
        let _other = lock_port("127.0.0.2:1".parse().unwrap(), 0).unwrap();
        let _every = lock_port("0.0.0.0:1".parse().unwrap(), 0).unwrap();
        let mapped: SocketAddr = "[::ffff:0.0.0.0]:1".parse().unwrap();
        assert_eq!(lock_name(mapped.ip(), 1), "shardmq/tcp-port/1");
        drop(held);
    }

    #[test]
    fn a_live_listener_without_reuseport_is_named() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let err = open(&[addr], 1).unwrap_err().to_string();
        assert!(err.contains("address in use by pid"), "{err}");
    }

    #[test]
    fn every_shard_gets_a_listener_on_the_resolved_port() {
        let l = open(&["127.0.0.1:0".parse().unwrap()], 3).unwrap();
        assert_ne!(l.addrs[0].port(), 0);
        assert_eq!(l.sockets.len(), 3);
        assert!(l.sockets.iter().all(|s| s.len() == 1));
        assert_eq!(l.locks.len(), 1);
    }
}
