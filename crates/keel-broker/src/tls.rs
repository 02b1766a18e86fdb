//! TLS on a node's listeners, terminated in Keel's own accept loop, and the principal each
//! connection proves (DESIGN/ARCHITECTURE, "Security"): a certificate's URI SAN
//! `keel://node/N` names a node, otherwise its common name names a user.

use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::Stream;
use keel_raft::NodeId;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::rustls;
use tracing::{debug, warn};

use crate::metrics::GaugeGuard;

/// How long a client has to finish its TLS handshake: a connection that stalls is dropped
/// rather than held (the handshake runs beside the accept loop, never in it).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress per listener; beyond, new connections are closed at once.
const HANDSHAKES_MAX: usize = 256;
/// The URI SAN prefix of a node certificate.
pub const NODE_URI_PREFIX: &str = "keel://node/";

/// A TLS setting that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or holds no usable PEM.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// Who a connection proved to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// A node of the cluster (a certificate with the URI SAN `keel://node/N`).
    Node(NodeId),
    /// A user: a client certificate's common name (or, later, a token's principal).
    User(String),
}

impl std::fmt::Display for Principal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Principal::Node(id) => write!(f, "Node:{id}"),
            Principal::User(name) => write!(f, "User:{name}"),
        }
    }
}

/// What a connection proved, handed to every request on it (tonic's `ConnectInfo`, found in
/// the request's extensions).
#[derive(Debug, Clone, Default)]
pub struct ConnInfo {
    remote: Option<SocketAddr>,
    tls: bool,
    principal: Option<Principal>,
}

impl ConnInfo {
    /// The client's address.
    pub fn remote(&self) -> Option<SocketAddr> {
        self.remote
    }

    /// Whether the connection is TLS.
    pub fn tls(&self) -> bool {
        self.tls
    }

    /// The principal its certificate proved, if any.
    pub fn principal(&self) -> Option<&Principal> {
        self.principal.as_ref()
    }

    /// A simulated connection from node `node`: turmoil's streams carry no TLS, so the
    /// simulation names the dialling host's node instead. Only with the `sim` feature, which
    /// only the simulation enables; the released binary cannot make an identity this way.
    #[cfg(feature = "sim")]
    pub fn simulated(node: Option<NodeId>) -> ConnInfo {
        ConnInfo { remote: None, tls: true, principal: node.map(Principal::Node) }
    }
}

/// The client address of a request, from Keel's own listeners or tonic's.
pub fn remote_of<T>(request: &tonic::Request<T>) -> Option<SocketAddr> {
    request.extensions().get::<ConnInfo>().and_then(ConnInfo::remote).or_else(|| request.remote_addr())
}

/// The peer listener's gate: on a TLS connection only a node's certificate gets in, and its
/// node id rides with the request ([`keel_raft::VerifiedNode`]) so that raft and RegisterNode
/// refuse a claim to be another node. A plaintext peer listener (`insecure`) checks nothing.
/// The caller is the node itself ([`crate::auth::Caller::Peer`]), or the client principal the
/// forwarding node names in [`crate::auth::PRINCIPAL_HEADER`].
#[derive(Debug, Clone, Copy, Default)]
pub struct PeerGate;

fn forwarded_caller(request: &tonic::Request<()>) -> crate::auth::Caller {
    let named = request.metadata().get(crate::auth::PRINCIPAL_HEADER).and_then(|v| v.to_str().ok());
    match named.and_then(|v| v.strip_prefix("User:")) {
        Some(name) => crate::auth::Caller::Principal(Principal::User(name.to_owned())),
        None => crate::auth::Caller::Peer,
    }
}

impl tonic::service::Interceptor for PeerGate {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let caller = forwarded_caller(&request);
        request.extensions_mut().insert(caller);
        let Some(info) = request.extensions().get::<ConnInfo>().cloned() else { return Ok(request) };
        if !info.tls {
            return Ok(request);
        }
        match info.principal {
            Some(Principal::Node(id)) => {
                request.extensions_mut().insert(keel_raft::VerifiedNode(id));
                Ok(request)
            }
            other => {
                let who = other.map_or_else(|| "no certificate".to_owned(), |p| p.to_string());
                warn!(remote = ?info.remote, %who, "refused on the peer listener: not a node certificate");
                Err(tonic::Status::permission_denied(format!(
                    "the peer listener serves cluster nodes only ({who}); clients connect to the client port"
                )))
            }
        }
    }
}

/// The principal a certificate names: its first `keel://node/N` URI SAN, else its subject's
/// common name. `None` for a certificate that names neither (or does not parse).
pub fn principal_of(cert: &[u8]) -> Option<Principal> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert).ok()?;
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::URI(uri) = name
                && let Some(id) = uri.strip_prefix(NODE_URI_PREFIX)
            {
                return id.parse().ok().filter(|id| *id != keel_raft::NOBODY).map(Principal::Node);
            }
        }
    }
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?;
    (!cn.is_empty()).then(|| Principal::User(cn.to_owned()))
}

/// The first certificate of a PEM text, as DER.
pub fn first_cert_der(pem: &[u8]) -> Option<Vec<u8>> {
    CertificateDer::pem_slice_iter(pem).next()?.ok().map(|c| c.as_ref().to_vec())
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::File { path: path.display().to_string(), reason: e.to_string() })
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bad = |reason: String| TlsError::File { path: path.display().to_string(), reason };
    let pem = read(path)?;
    let certs: Vec<_> =
        CertificateDer::pem_slice_iter(&pem).collect::<Result<_, _>>().map_err(|e| bad(e.to_string()))?;
    if certs.is_empty() {
        return Err(bad("no PEM certificate in it".into()));
    }
    Ok(certs)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Which client certificates a listener asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientCerts {
    /// Required, from the CA (the peer listener: only nodes connect).
    Required,
    /// Optional; when presented, verified against the CA (the client listener).
    Optional,
}

/// A TLS acceptor from PEM files: this node's certificate chain and key, and the CA that client
/// certificates must chain to.
pub fn acceptor(cert: &Path, key: &Path, ca: &Path, client_certs: ClientCerts) -> Result<TlsAcceptor, TlsError> {
    let chain = certs(cert)?;
    let key_pem = read(key)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| TlsError::File { path: key.display().to_string(), reason: format!("no private key: {e}") })?;
    let mut roots = rustls::RootCertStore::empty();
    for ca_cert in certs(ca)? {
        roots.add(ca_cert).map_err(|e| TlsError::File { path: ca.display().to_string(), reason: e.to_string() })?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
    let verifier = match client_certs {
        ClientCerts::Required => verifier,
        ClientCerts::Optional => verifier.allow_unauthenticated(),
    }
    .build()
    .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    // gRPC is HTTP/2: generic clients (grpcurl, grpcio) insist on negotiating it.
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(TlsAcceptor(tokio_rustls::TlsAcceptor::from(Arc::new(config))))
}

/// A listener's TLS side, built by [`acceptor`].
#[derive(Clone)]
pub struct TlsAcceptor(tokio_rustls::TlsAcceptor);

/// One accepted connection, plain or TLS, counted in `keel_connections` while open.
pub struct Conn {
    stream: Stream2,
    info: ConnInfo,
    _open: GaugeGuard,
}

enum Stream2 {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.get_mut().stream {
            Stream2::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream2::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match &mut self.get_mut().stream {
            Stream2::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream2::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match &mut self.get_mut().stream {
            Stream2::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream2::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.stream {
            Stream2::Plain(s) => s.is_write_vectored(),
            Stream2::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.get_mut().stream {
            Stream2::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream2::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.get_mut().stream {
            Stream2::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream2::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The connections of `listener` as `serve_with_incoming` takes them: TLS handshakes (when
/// `tls` is set) run in their own tasks, bounded in number and time, so a stalled client never
/// holds up the next accept. `opened` counts each connection while it lives.
pub fn incoming(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    opened: impl Fn() -> GaugeGuard + Send + Sync + 'static,
) -> impl Stream<Item = Result<Conn, std::io::Error>> {
    let (tx, rx) = mpsc::channel::<Conn>(64);
    let handshakes = Arc::new(tokio::sync::Semaphore::new(HANDSHAKES_MAX));
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                // The server stopped taking connections.
                () = tx.closed() => return,
            };
            let (stream, remote) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: pause rather than spin.
                    warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let open = opened();
            let Some(tls) = tls.clone() else {
                let conn = Conn {
                    stream: Stream2::Plain(stream),
                    info: ConnInfo { remote: Some(remote), ..ConnInfo::default() },
                    _open: open,
                };
                if tx.send(conn).await.is_err() {
                    return;
                }
                continue;
            };
            let Ok(permit) = Arc::clone(&handshakes).try_acquire_owned() else {
                debug!(%remote, "too many TLS handshakes in progress; connection closed");
                continue;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.0.accept(stream)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        debug!(%remote, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        debug!(%remote, "TLS handshake timed out");
                        return;
                    }
                };
                let principal = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|chain| chain.first())
                    .and_then(|leaf| principal_of(leaf.as_ref()));
                let info = ConnInfo { remote: Some(remote), tls: true, principal };
                let _ = tx.send(Conn { stream: Stream2::Tls(Box::new(stream)), info, _open: open }).await;
            });
        }
    });
    futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|conn| (Ok(conn), rx)) })
}
