//! The network door in the simulation: turmoil's TCP under tonic, for raft peers, brokers and
//! clients alike. Only the listener and the connector differ from production; tonic runs
//! unchanged over them.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::{Channel, Endpoint, Uri};

/// The port every simulated node serves its client gRPC services on.
pub const PORT: u16 = 9000;

/// The port of every simulated node's peer listener (raft, the controller, forwarded calls).
pub const PEER_PORT: u16 = 10000;

/// How long a dial may take. Simulated TCP answers a connect in one round trip, or never (a
/// partition), so this only bounds how long a call waits on a cut link before it fails.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// How long h2 remembers a stream this side reset: "forever", so that only the count cap
/// (`max_concurrent_reset_streams`) bounds it. h2 expires them on the *wall* clock (std
/// `Instant`, below hyper's timer), after 1-5 s of real time that are 20-100 simulated seconds
/// here: late frames for an expired stream then draw an extra RST, at a moment that depends on
/// how fast the machine ran — the same seed replayed differently twice in one process. Servers
/// cannot set it (hyper does not expose it); so far the client side was the one that mattered.
const RESET_STREAM_MEMORY: Duration = Duration::from_secs(365 * 24 * 3600);

/// turmoil's TCP for tonic's client: dials `host:port` through the simulated network. It is both
/// the raft peers' connector and the Keel client's.
#[derive(Debug, Clone, Copy, Default)]
pub struct TurmoilConnector;

impl TurmoilConnector {
    fn dial(addr: &str) -> Result<Channel, String> {
        let endpoint = Endpoint::from_shared(format!("http://{addr}")).map_err(|e| e.to_string())?;
        let connector = tower::service_fn(|uri: Uri| async move {
            let host = uri.host().unwrap_or_default().to_owned();
            let port = uri.port_u16().unwrap_or(PORT);
            let stream = turmoil::net::TcpStream::connect((host.as_str(), port)).await?;
            Ok::<_, std::io::Error>(TokioIo::new(stream))
        });
        Ok(endpoint
            .connect_timeout(CONNECT_TIMEOUT)
            .http2_reset_stream_duration(RESET_STREAM_MEMORY)
            .connect_with_connector_lazy(connector))
    }
}

impl keel_raft::Connector for TurmoilConnector {
    fn channel(&self, addr: &str) -> Result<Channel, String> {
        TurmoilConnector::dial(addr)
    }
}

impl keel_client::Connect for TurmoilConnector {
    fn channel(&self, addr: &str) -> Result<Channel, String> {
        TurmoilConnector::dial(addr)
    }
}

/// An accepted simulated connection, as tonic's server wants it, with the node of the host
/// that dialled (`nN`), if it is one.
pub struct Accepted(turmoil::net::TcpStream, Option<u64>);

/// What a simulated connection proves: turmoil's streams carry no TLS, so the dialling host's
/// name stands in for a node certificate, and the peer gate and the raft and RegisterNode
/// claim checks run as they do over mTLS.
impl tonic::transport::server::Connected for Accepted {
    type ConnectInfo = keel_broker::tls::ConnInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        keel_broker::tls::ConnInfo::simulated(self.1)
    }
}

impl AsyncRead for Accepted {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Accepted {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// A listener's accept loop as the stream of connections `serve_with_incoming` takes.
pub fn incoming(
    listener: turmoil::net::TcpListener,
) -> impl futures_util::Stream<Item = Result<Accepted, std::io::Error>> {
    futures_util::stream::unfold(listener, |listener| async move {
        let next = listener.accept().await.map(|(s, from)| {
            let node = turmoil::reverse_lookup(from.ip())
                .and_then(|host| host.strip_prefix('n').and_then(|id| id.parse().ok()));
            Accepted(s, node)
        });
        Some((next, listener))
    })
}
