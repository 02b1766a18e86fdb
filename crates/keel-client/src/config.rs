//! Client settings and the network door: how a client dials a broker.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::error::ClientError;

/// How the client dials a broker. Production dials TCP ([`TcpConnect`]); the simulation hands in
/// turmoil's network. Only the connector differs: tonic runs unchanged over both.
pub trait Connect: Send + Sync + 'static {
    /// A lazily connecting channel to `addr` (`host:port`); dialling happens on first use.
    fn channel(&self, addr: &str) -> Result<Channel, String>;
}

/// Dials brokers over TCP.
#[derive(Debug, Clone)]
pub struct TcpConnect {
    /// Deadline for establishing a connection.
    pub connect_timeout: Duration,
    /// Interval of HTTP/2 pings that find dead connections (a peer that vanished without a FIN).
    pub keep_alive_interval: Duration,
    /// TLS, if the brokers speak it (see [`Tls`]); `None` dials plaintext.
    pub tls: Option<ClientTlsConfig>,
}

impl Default for TcpConnect {
    fn default() -> TcpConnect {
        TcpConnect { connect_timeout: Duration::from_secs(1), keep_alive_interval: Duration::from_secs(5), tls: None }
    }
}

/// TLS settings of a client, as PEM: the CA the brokers' certificates chain to and, optionally,
/// a client certificate and key (mutual TLS: the certificate's common name is the principal).
#[derive(Clone, Default)]
pub struct Tls {
    /// The CA certificate(s) to trust.
    pub ca_pem: Vec<u8>,
    /// This client's certificate chain, if it presents one.
    pub cert_pem: Option<Vec<u8>>,
    /// The key of `cert_pem`.
    pub key_pem: Option<Vec<u8>>,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the key.
        f.debug_struct("Tls").field("client_cert", &self.cert_pem.is_some()).finish_non_exhaustive()
    }
}

impl Tls {
    /// Reads the PEM files: the CA, and a client certificate and key if both are given.
    pub fn from_files(
        ca: &std::path::Path,
        cert: Option<&std::path::Path>,
        key: Option<&std::path::Path>,
    ) -> Result<Tls, ClientError> {
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|e| ClientError::Config(format!("reading {}: {e}", p.display())))
        };
        let (cert_pem, key_pem) = match (cert, key) {
            (Some(c), Some(k)) => (Some(read(c)?), Some(read(k)?)),
            (None, None) => (None, None),
            _ => {
                return Err(ClientError::Config(
                    "a client certificate needs its key, and a key its certificate".into(),
                ));
            }
        };
        Ok(Tls { ca_pem: read(ca)?, cert_pem, key_pem })
    }

    /// tonic's client TLS settings from these.
    pub fn client_config(&self) -> ClientTlsConfig {
        let config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&self.ca_pem));
        match (&self.cert_pem, &self.key_pem) {
            (Some(cert), Some(key)) => config.identity(Identity::from_pem(cert, key)),
            _ => config,
        }
    }
}

impl Connect for TcpConnect {
    fn channel(&self, addr: &str) -> Result<Channel, String> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}")).map_err(|e| e.to_string())?;
        if let Some(tls) = &self.tls {
            endpoint = endpoint.tls_config(tls.clone()).map_err(|e| e.to_string())?;
        }
        Ok(endpoint
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(self.keep_alive_interval)
            .keep_alive_timeout(self.keep_alive_interval)
            .keep_alive_while_idle(true)
            .connect_lazy())
    }
}

/// Settings shared by [`crate::Admin`], [`crate::Producer`] and [`crate::Consumer`].
#[derive(Clone)]
pub struct ClientConfig {
    /// Brokers (`host:port`) to ask for the cluster's metadata; any one that answers is enough.
    pub bootstrap: Vec<String>,
    /// Deadline of one request, and the total time an admin or metadata call keeps retrying.
    pub request_timeout: Duration,
    /// First delay before retrying a failed request; it doubles on each retry.
    pub retry_backoff_min: Duration,
    /// Longest delay between retries.
    pub retry_backoff_max: Duration,
    /// Cached metadata older than this is refreshed before use.
    pub metadata_max_age: Duration,
    /// Seeds the client's only source of randomness (retry jitter, the first sticky partition),
    /// so that a simulation replays exactly.
    pub seed: u64,
    /// The network door.
    pub connect: Arc<dyn Connect>,
    /// A bearer token sent with every call (`authorization: Bearer …`), when the brokers
    /// authenticate clients by token.
    pub token: Option<String>,
}

impl fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientConfig")
            .field("bootstrap", &self.bootstrap)
            .field("request_timeout", &self.request_timeout)
            .field("retry_backoff_min", &self.retry_backoff_min)
            .field("retry_backoff_max", &self.retry_backoff_max)
            .field("metadata_max_age", &self.metadata_max_age)
            .field("seed", &self.seed)
            .finish_non_exhaustive()
    }
}

impl ClientConfig {
    /// Defaults around the given bootstrap brokers (`host:port` each).
    pub fn new<I, S>(bootstrap: I) -> ClientConfig
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        ClientConfig {
            bootstrap: bootstrap.into_iter().map(Into::into).collect(),
            request_timeout: Duration::from_secs(10),
            retry_backoff_min: Duration::from_millis(50),
            retry_backoff_max: Duration::from_secs(1),
            metadata_max_age: Duration::from_secs(30),
            seed: 0,
            connect: Arc::new(TcpConnect::default()),
            token: None,
        }
    }

    /// Defaults around a bootstrap list written as `"h1:p1,h2:p2"`.
    pub fn from_bootstrap(list: &str) -> Result<ClientConfig, ClientError> {
        Ok(ClientConfig::new(parse_bootstrap(list)?))
    }

    /// Sets the seed of the client's randomness.
    pub fn with_seed(mut self, seed: u64) -> ClientConfig {
        self.seed = seed;
        self
    }

    /// Dials the brokers over TLS (with a client certificate if `tls` has one).
    pub fn with_tls(mut self, tls: &Tls) -> ClientConfig {
        self.connect = Arc::new(TcpConnect { tls: Some(tls.client_config()), ..TcpConnect::default() });
        self
    }

    /// Sends `token` with every call.
    pub fn with_token(mut self, token: impl Into<String>) -> ClientConfig {
        self.token = Some(token.into());
        self
    }

    /// The `authorization` value of the token, if set.
    pub(crate) fn bearer(&self) -> Result<Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>, ClientError> {
        match &self.token {
            None => Ok(None),
            Some(token) => format!("Bearer {token}")
                .parse()
                .map(Some)
                .map_err(|_| ClientError::Config("the token must be printable ASCII".into())),
        }
    }

    /// Sets the network door.
    pub fn with_connect(mut self, connect: Arc<dyn Connect>) -> ClientConfig {
        self.connect = connect;
        self
    }

    /// Checks the settings; every client constructor calls this.
    pub fn validate(&self) -> Result<(), ClientError> {
        if self.bootstrap.is_empty() {
            return Err(ClientError::Config("bootstrap: at least one broker address is needed".into()));
        }
        for addr in &self.bootstrap {
            check_addr(addr)?;
        }
        if self.request_timeout.is_zero() {
            return Err(ClientError::Config("request_timeout must be positive".into()));
        }
        if self.retry_backoff_min.is_zero() || self.retry_backoff_max < self.retry_backoff_min {
            return Err(ClientError::Config(format!(
                "retry backoff must satisfy 0 < min ({:?}) <= max ({:?})",
                self.retry_backoff_min, self.retry_backoff_max
            )));
        }
        Ok(())
    }
}

/// Parses `"h1:p1,h2:p2"` into addresses. Blanks around entries are ignored; an empty list, an
/// empty entry or an entry without a numeric port is an error.
pub fn parse_bootstrap(list: &str) -> Result<Vec<String>, ClientError> {
    if list.trim().is_empty() {
        return Err(ClientError::Config("bootstrap: the broker list is empty (expected \"host:port,...\")".into()));
    }
    let mut out = Vec::new();
    for entry in list.split(',') {
        let entry = entry.trim();
        if entry.is_empty() {
            return Err(ClientError::Config(format!("bootstrap: empty entry in {list:?}")));
        }
        check_addr(entry)?;
        if !out.iter().any(|a| a == entry) {
            out.push(entry.to_owned());
        }
    }
    Ok(out)
}

fn check_addr(addr: &str) -> Result<(), ClientError> {
    let bad = |why: &str| ClientError::Config(format!("bootstrap: {addr:?} is not host:port ({why})"));
    let (host, port) = addr.rsplit_once(':').ok_or_else(|| bad("no port"))?;
    if host.is_empty() {
        return Err(bad("empty host"));
    }
    if host.contains(char::is_whitespace) {
        return Err(bad("blank in the host"));
    }
    port.parse::<u16>().map_err(|_| bad("the port is not a number in 0..=65535"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn bootstrap_lists_parse() {
        let ok = [
            ("h1:1", vec!["h1:1"]),
            ("h1:1,h2:2", vec!["h1:1", "h2:2"]),
            (" h1:1 , h2:2 ", vec!["h1:1", "h2:2"]),
            ("h1:1,h1:1", vec!["h1:1"]),
            ("127.0.0.1:9092", vec!["127.0.0.1:9092"]),
            ("[::1]:9092", vec!["[::1]:9092"]),
        ];
        for (input, want) in ok {
            assert_eq!(parse_bootstrap(input).unwrap(), want, "{input:?}");
        }
        for bad in ["", "  ", "h1", "h1:", ":9092", "h1:1,,h2:2", "h1:1,", "h1:port", "h1:70000", "a b:1"] {
            let err = parse_bootstrap(bad).unwrap_err();
            assert!(matches!(err, ClientError::Config(_)), "{bad:?} gave {err}");
        }
    }

    #[test]
    fn empty_bootstrap_error_says_so() {
        let err = parse_bootstrap("").unwrap_err().to_string();
        assert!(err.contains("empty"), "{err}");
    }

    #[test]
    fn config_validates() {
        assert!(ClientConfig::new(["h:1"]).validate().is_ok());
        assert!(ClientConfig::new(Vec::<String>::new()).validate().is_err());
        let mut c = ClientConfig::new(["h:1"]);
        c.retry_backoff_max = Duration::from_millis(1);
        assert!(c.validate().is_err());
        assert_eq!(ClientConfig::from_bootstrap("a:1,b:2").unwrap().bootstrap, ["a:1", "b:2"]);
    }
}
