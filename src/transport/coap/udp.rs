//! Batched UDP: many datagrams per system call (`recvmmsg`/`sendmmsg` on Linux), so a busy
//! CoAP socket pays one kernel entry per batch instead of one per datagram. Elsewhere, one
//! datagram per call with the same interface.
//!
//! Both calls are non-blocking: they run inside tokio's `try_io`, which re-arms readiness on
//! `WouldBlock`.

use std::io;
use std::net::SocketAddr;

use tokio::io::Interest;
use tokio::net::UdpSocket;

/// Datagrams moved per system call.
pub const BATCH: usize = 32;

/// One received datagram's metadata; its bytes are in the matching buffer.
#[derive(Debug, Clone, Copy)]
pub struct Received {
    pub len: usize,
    pub peer: Option<SocketAddr>,
    /// The datagram was longer than its buffer and was cut.
    pub truncated: bool,
}

/// Asks for `bytes` of kernel receive and send buffer; returns the receive buffer granted
/// (the kernel caps the request), or `None` where it cannot be set.
pub fn set_buffers(socket: &UdpSocket, bytes: usize) -> Option<usize> {
    sys::set_buffers(socket, bytes)
}

/// Receives up to `bufs.len()` datagrams that are already waiting; `WouldBlock` when none is.
pub fn try_recv(socket: &UdpSocket, bufs: &mut [Vec<u8>], meta: &mut Vec<Received>) -> io::Result<usize> {
    meta.clear();
    socket.try_io(Interest::READABLE, || sys::recv(socket, bufs, meta))
}

/// Sends `datagrams[i]` to `peers[i]`; returns how many went out (from the front), at least
/// one unless an error is returned. `WouldBlock` when the socket's send buffer is full.
pub fn try_send(socket: &UdpSocket, datagrams: &[&[u8]], peers: &[SocketAddr]) -> io::Result<usize> {
    socket.try_io(Interest::WRITABLE, || sys::send(socket, datagrams, peers))
}

#[cfg(target_os = "linux")]
mod sys {
    use std::io::{self, IoSlice, IoSliceMut};
    use std::net::SocketAddr;
    use std::os::fd::AsRawFd;

    use nix::sys::socket::{
        getsockopt, recvmmsg, sendmmsg, setsockopt, sockopt, ControlMessage, MsgFlags, MultiHeaders, SockaddrLike,
        SockaddrStorage,
    };
    use tokio::net::UdpSocket;

    use super::Received;

    fn std_addr(a: &SockaddrStorage) -> Option<SocketAddr> {
        if let Some(v4) = a.as_sockaddr_in() {
            return Some(SocketAddr::V4((*v4).into()));
        }
        a.as_sockaddr_in6().map(|v6| SocketAddr::V6((*v6).into()))
    }

    pub fn set_buffers(socket: &UdpSocket, bytes: usize) -> Option<usize> {
        // Failures leave the kernel's default, which still works, only with less headroom.
        let _ = setsockopt(socket, sockopt::RcvBuf, &bytes);
        let _ = setsockopt(socket, sockopt::SndBuf, &bytes);
        getsockopt(socket, sockopt::RcvBuf).ok()
    }

    pub fn recv(socket: &UdpSocket, bufs: &mut [Vec<u8>], meta: &mut Vec<Received>) -> io::Result<usize> {
        // The headers hold raw pointers (not Send), so they live only for this call.
        let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(bufs.len(), None);
        let mut slices: Vec<[IoSliceMut<'_>; 1]> = bufs.iter_mut().map(|b| [IoSliceMut::new(b)]).collect();
        let results = recvmmsg(socket.as_raw_fd(), &mut headers, slices.iter_mut(), MsgFlags::MSG_DONTWAIT, None)
            .map_err(io::Error::from)?;
        for r in results {
            meta.push(Received {
                len: r.bytes,
                peer: r.address.as_ref().filter(|a| a.len() > 0).and_then(std_addr),
                truncated: r.flags.contains(MsgFlags::MSG_TRUNC),
            });
        }
        Ok(meta.len())
    }

    pub fn send(socket: &UdpSocket, datagrams: &[&[u8]], peers: &[SocketAddr]) -> io::Result<usize> {
        let n = datagrams.len().min(peers.len());
        if n == 0 {
            return Ok(0);
        }
        let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(n, None);
        let slices: Vec<[IoSlice<'_>; 1]> = datagrams[..n].iter().map(|d| [IoSlice::new(d)]).collect();
        let addrs: Vec<Option<SockaddrStorage>> = peers[..n].iter().map(|p| Some(SockaddrStorage::from(*p))).collect();
        let no_cmsgs: [ControlMessage<'_>; 0] = [];
        let sent = sendmmsg(socket.as_raw_fd(), &mut headers, slices.iter(), &addrs, no_cmsgs, MsgFlags::MSG_DONTWAIT)
            .map_err(io::Error::from)?;
        Ok(sent.count())
    }
}

#[cfg(not(target_os = "linux"))]
mod sys {
    use std::io;
    use std::net::SocketAddr;

    use tokio::net::UdpSocket;

    use super::Received;

    pub fn set_buffers(_socket: &UdpSocket, _bytes: usize) -> Option<usize> {
        None
    }

    pub fn recv(socket: &UdpSocket, bufs: &mut [Vec<u8>], meta: &mut Vec<Received>) -> io::Result<usize> {
        // Without recvmmsg, one datagram; anything longer than the buffer is cut silently, so
        // the buffer is the largest datagram.
        let (len, peer) = socket.try_recv_from(&mut bufs[0])?;
        meta.push(Received { len, peer: Some(peer), truncated: len == bufs[0].len() });
        Ok(1)
    }

    pub fn send(socket: &UdpSocket, datagrams: &[&[u8]], peers: &[SocketAddr]) -> io::Result<usize> {
        socket.try_send_to(datagrams[0], peers[0]).map(|_| 1)
    }
}
