//! quinn over turmoil's simulated UDP: an `AsyncUdpSocket` over
//! `turmoil::net::UdpSocket`, so the real mesh (quinn, rustls, the session
//! shell) runs inside a turmoil simulation. Test code only: turmoil never
//! reaches the release binary.

use std::fmt;
use std::future::Future;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, Endpoint, EndpointConfig, TokioRuntime, UdpPoller};

type Readable = Pin<Box<dyn Future<Output = io::Result<()>> + Send>>;

/// A turmoil UDP socket that quinn can drive.
pub struct SimSocket {
    inner: Arc<turmoil::net::UdpSocket>,
    /// The pending wait for the next datagram, kept across polls so its
    /// waker stays registered.
    readable: Mutex<Option<Readable>>,
}

impl fmt::Debug for SimSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimSocket")
            .field("local_addr", &self.inner.local_addr().ok())
            .finish_non_exhaustive()
    }
}

impl SimSocket {
    pub fn new(socket: turmoil::net::UdpSocket) -> Self {
        SimSocket {
            inner: Arc::new(socket),
            readable: Mutex::new(None),
        }
    }
}

/// turmoil's sockets have no send backpressure: always writable.
#[derive(Debug)]
struct AlwaysWritable;

impl UdpPoller for AlwaysWritable {
    fn poll_writable(self: Pin<&mut Self>, _cx: &mut Context) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl AsyncUdpSocket for SimSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(AlwaysWritable)
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        // One datagram per transmit (`max_transmit_segments` is 1).
        self.inner
            .try_send_to(transmit.contents, transmit.destination)
            .map(|_| ())
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let (Some(buf), Some(slot)) = (bufs.first_mut(), meta.first_mut()) else {
            return Poll::Ready(Ok(0));
        };
        let mut readable = self
            .readable
            .lock()
            .map_err(|_| io::Error::other("socket state poisoned"))?;
        loop {
            if let Some(wait) = readable.as_mut() {
                match wait.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(r) => {
                        *readable = None;
                        r?;
                    }
                }
            }
            match self.inner.try_recv_from(buf) {
                Ok((len, addr)) => {
                    *slot = RecvMeta {
                        addr,
                        len,
                        stride: len,
                        ecn: None,
                        dst_ip: None,
                    };
                    return Poll::Ready(Ok(1));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let socket = self.inner.clone();
                    *readable = Some(Box::pin(async move { socket.readable().await }));
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// A quinn endpoint on a turmoil socket bound to `port` on the current
/// host, with quinn's own randomness seeded (connection ids and the like),
/// so one turmoil seed gives one run. Server and client configurations are
/// left to the mesh.
pub async fn endpoint(port: u16, seed: u64) -> io::Result<Endpoint> {
    let socket = turmoil::net::UdpSocket::bind((std::net::Ipv4Addr::UNSPECIFIED, port)).await?;
    let mut rng_seed = [0u8; 32];
    rng_seed[..8].copy_from_slice(&seed.to_le_bytes());
    let mut config = EndpointConfig::default();
    config.rng_seed(Some(rng_seed));
    Endpoint::new_with_abstract_socket(config, None, Arc::new(SimSocket::new(socket)), Arc::new(TokioRuntime))
}
