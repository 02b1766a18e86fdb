//! Who a client is: bearer tokens checked against a file of SHA-256 hashes, or the client
//! certificate's principal; and the client listener's gate that attaches the caller to each
//! request. Authorization (ACLs) reads the caller in the services (`Inner::authorize`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use sha2::{Digest, Sha256};
use tonic::{Request, Status};
use tracing::warn;

use crate::tls::{ConnInfo, Principal};

/// Longest bearer token accepted (ours are 43 characters): a bound before hashing.
const TOKEN_BYTES_MAX: usize = 512;
/// How often the tokens file is looked at for changes (a revoked token stops working within it).
const TOKENS_RECHECK: Duration = Duration::from_secs(1);
/// Most lines of a tokens file.
const TOKENS_MAX: usize = 100_000;

/// A tokens file that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("tokens file {path}: {reason}")]
pub struct TokensError {
    path: String,
    reason: String,
}

/// The principal names of a tokens file, by SHA-256 of their token (hex). Lines are
/// `NAME SHA256HEX`; blank lines and `#` comments are ignored.
pub fn parse_tokens(text: &str) -> Result<BTreeMap<String, String>, String> {
    let mut tokens = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut parts = line.split_whitespace();
        let (Some(name), Some(hash), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(format!("line {}: expected `NAME SHA256HEX`", n + 1));
        };
        if hash.len() != 64 || !hash.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(format!("line {}: the hash is 64 hex digits (SHA-256 of the token)", n + 1));
        }
        if name.len() > crate::acl::ACL_NAME_BYTES_MAX {
            return Err(format!("line {}: the name is longer than {} bytes", n + 1, crate::acl::ACL_NAME_BYTES_MAX));
        }
        if tokens.len() >= TOKENS_MAX {
            return Err(format!("more than {TOKENS_MAX} tokens"));
        }
        tokens.insert(hash.to_ascii_lowercase(), name.to_owned());
    }
    Ok(tokens)
}

/// The SHA-256 of a token, hex: what a tokens file holds.
pub fn token_hash(token: &str) -> String {
    Sha256::digest(token.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

struct Loaded {
    modified: Option<SystemTime>,
    checked: Instant,
    tokens: BTreeMap<String, String>,
}

/// A tokens file, re-read when it changes (checked at most once a second), so that adding or
/// revoking a token needs no restart. A file that becomes unreadable or malformed keeps the
/// last good contents and is logged.
pub struct Tokens {
    path: PathBuf,
    loaded: Mutex<Loaded>,
}

impl Tokens {
    /// Loads `path`; an unreadable or malformed file is an error at startup.
    pub fn load(path: &Path) -> Result<Tokens, TokensError> {
        let error = |reason: String| TokensError { path: path.display().to_string(), reason };
        let text = std::fs::read_to_string(path).map_err(|e| error(e.to_string()))?;
        let tokens = parse_tokens(&text).map_err(error)?;
        let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        Ok(Tokens { path: path.to_owned(), loaded: Mutex::new(Loaded { modified, checked: Instant::now(), tokens }) })
    }

    /// The principal name `token` belongs to, if any.
    pub fn principal(&self, token: &str) -> Option<String> {
        let mut loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        if loaded.checked.elapsed() >= TOKENS_RECHECK {
            loaded.checked = Instant::now();
            let modified = std::fs::metadata(&self.path).and_then(|m| m.modified()).ok();
            if modified != loaded.modified {
                match std::fs::read_to_string(&self.path).map_err(|e| e.to_string()).and_then(|t| parse_tokens(&t)) {
                    Ok(tokens) => {
                        loaded.tokens = tokens;
                        loaded.modified = modified;
                    }
                    Err(e) => {
                        warn!(path = %self.path.display(), error = %e, "tokens file unusable; keeping the last good one")
                    }
                }
            }
        }
        loaded.tokens.get(&token_hash(token)).cloned()
    }
}

/// Who made a request, as the client gate established it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// A principal proved by a token or a certificate.
    Principal(Principal),
    /// Nobody in particular: authentication is off (no tokens file).
    Anonymous,
    /// A node forwarding a request it admitted (the peer listener).
    Peer,
}

/// The client listener's gate: reads the bearer token (or the certificate's principal) and
/// attaches the [`Caller`]. With a tokens file, a request without either is UNAUTHENTICATED
/// (the gate guards the client services only: health and reflection answer anyone). Without
/// one, a caller is its certificate's principal or anonymous, and authorization is off.
#[derive(Clone)]
pub struct ClientGate {
    tokens: Option<Arc<Tokens>>,
    /// When a refusal was last logged: at most one line a second, whatever a client sends.
    last_logged: Arc<Mutex<Option<Instant>>>,
}

impl ClientGate {
    /// A gate checking `tokens`; `None`: authentication off.
    pub fn new(tokens: Option<Arc<Tokens>>) -> ClientGate {
        ClientGate { tokens, last_logged: Arc::new(Mutex::new(None)) }
    }

    /// Logs a refusal (rate-limited) and returns its status.
    fn refuse(&self, info: &ConnInfo, why: &str) -> Status {
        let now = Instant::now();
        let mut last = self.last_logged.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_none_or(|at| now.duration_since(at) >= Duration::from_secs(1)) {
            *last = Some(now);
            warn!(remote = ?info.remote(), why, "unauthenticated request refused");
        }
        unauthenticated(why)
    }
}

fn unauthenticated(why: &str) -> Status {
    Status::unauthenticated(format!(
        "{why}: send `authorization: Bearer TOKEN` (keel: --token / KEEL_TOKEN) or a client certificate"
    ))
}

impl tonic::service::Interceptor for ClientGate {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let info = request.extensions().get::<ConnInfo>().cloned().unwrap_or_default();
        let bearer = match request.metadata().get("authorization") {
            None => None,
            Some(value) => {
                let value = value.to_str().map_err(|_| self.refuse(&info, "the authorization header is not text"))?;
                let token = value
                    .strip_prefix("Bearer ")
                    .ok_or_else(|| self.refuse(&info, "the authorization header is not `Bearer TOKEN`"))?;
                Some(token.trim().to_owned())
            }
        };
        let caller = match (&self.tokens, bearer) {
            (Some(tokens), Some(token)) => {
                if token.len() > TOKEN_BYTES_MAX {
                    return Err(self.refuse(&info, "the token is too long"));
                }
                match tokens.principal(&token) {
                    Some(name) => Caller::Principal(Principal::User(name)),
                    None => return Err(self.refuse(&info, "unknown token")),
                }
            }
            // Authentication is off here: a token is ignored, so that clients can be given
            // tokens before the nodes get their tokens file (a rolling change).
            (None, Some(_)) => Caller::Anonymous,
            (_, None) => match info.principal() {
                Some(principal) => Caller::Principal(principal.clone()),
                None if self.tokens.is_none() => Caller::Anonymous,
                None => return Err(self.refuse(&info, "no credentials")),
            },
        };
        request.extensions_mut().insert(caller);
        Ok(request)
    }
}

/// The header a node forwards its caller's principal in; trusted on the peer listener only.
pub const PRINCIPAL_HEADER: &str = "x-keel-principal";

/// The caller of a request, as a gate attached it (`None` behind no gate).
pub fn caller<T>(request: &Request<T>) -> Option<Caller> {
    request.extensions().get::<Caller>().cloned()
}

/// Denials logged per principal are at most one a second; the map forgets beyond this many.
const DENIAL_LOG_PRINCIPALS_MAX: usize = 1_000;

impl crate::broker::Inner {
    /// Whether client authentication (and so authorization) is on: a tokens file is set.
    pub(crate) fn auth_on(&self) -> bool {
        self.tokens.is_some()
    }

    /// What the rules say of `caller` doing `operation` on `resource`: `Ok(None)` allowed,
    /// `Ok(Some(principal))` denied, `Err` unauthenticated. Nodes, superusers and (with
    /// authentication off) everyone may; otherwise an ACL must allow it.
    fn decide(
        &self,
        caller: Option<&Caller>,
        resource: &crate::acl::Resource<'_>,
        operation: crate::acl::Operation,
    ) -> Result<Option<String>, Status> {
        let name = match caller {
            Some(Caller::Peer | Caller::Principal(Principal::Node(_)) | Caller::Anonymous) => return Ok(None),
            None if !self.auth_on() => return Ok(None),
            None => return Err(unauthenticated("no credentials")),
            Some(Caller::Principal(Principal::User(name))) => name,
        };
        if !self.auth_on() || self.config.auth.superusers.contains(name) {
            return Ok(None);
        }
        let principal = format!("User:{name}");
        if crate::acl::allowed(&self.metadata().acls, &principal, resource, operation) {
            return Ok(None);
        }
        Ok(Some(principal))
    }

    /// Refuses `caller` doing `operation` on `resource` unless [`Self::decide`] allows it. A
    /// denial is PERMISSION_DENIED and logged (rate-limited per principal).
    pub(crate) fn authorize(
        &self,
        caller: Option<&Caller>,
        resource: crate::acl::Resource<'_>,
        operation: crate::acl::Operation,
    ) -> Result<(), Status> {
        let Some(principal) = self.decide(caller, &resource, operation)? else { return Ok(()) };
        let now = tokio::time::Instant::now();
        let mut logged = self.denials_logged.lock().unwrap_or_else(|e| e.into_inner());
        if logged.get(&principal).is_none_or(|at| now.duration_since(*at) >= Duration::from_secs(1)) {
            warn!(%principal, operation = operation.name(), %resource, "denied");
            if logged.len() >= DENIAL_LOG_PRINCIPALS_MAX {
                logged.clear();
            }
            logged.insert(principal.clone(), now);
        }
        Err(Status::permission_denied(format!("{principal} may not {} {resource}", operation.name())))
    }

    /// RESOURCE_EXHAUSTED (reason QUOTA_EXCEEDED, with a `RetryInfo`) while the caller is over its
    /// `direction` quota; nodes and anonymous callers have none.
    pub(crate) fn check_quota(
        &self,
        caller: Option<&Caller>,
        direction: crate::quota::Direction,
    ) -> Result<(), Status> {
        let Some(Caller::Principal(Principal::User(name))) = caller else { return Ok(()) };
        match self.quotas.check(name, direction, Instant::now()) {
            Ok(()) => Ok(()),
            Err(wait) => {
                use tonic_types::{ErrorDetails, StatusExt};
                let mut details = ErrorDetails::with_retry_info(Some(wait));
                details.set_error_info("QUOTA_EXCEEDED", crate::error::DOMAIN, std::collections::HashMap::new());
                Err(Status::with_error_details(
                    tonic::Code::ResourceExhausted,
                    format!("User:{name} is over its {direction:?} quota on this node; retry in {wait:?}"),
                    details,
                ))
            }
        }
    }

    /// Charges `bytes` to the caller's `direction` quota.
    pub(crate) fn charge_quota(&self, caller: Option<&Caller>, direction: crate::quota::Direction, bytes: usize) {
        if let Some(Caller::Principal(Principal::User(name))) = caller {
            self.quotas.charge(name, direction, bytes as u64, Instant::now());
        }
    }

    /// Whether `caller` may do `operation` on `resource`, without logging a denial (filters
    /// of listings).
    pub(crate) fn may(
        &self,
        caller: Option<&Caller>,
        resource: crate::acl::Resource<'_>,
        operation: crate::acl::Operation,
    ) -> bool {
        matches!(self.decide(caller, &resource, operation), Ok(None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tokens_file_is_parsed_or_refused_whole() {
        let hash = token_hash("secret");
        let tokens = parse_tokens(&format!("# who\nalice {hash}\n\n")).unwrap();
        assert_eq!(tokens.get(&hash).map(String::as_str), Some("alice"));
        for bad in ["alice", "alice abc", &format!("alice {hash} extra"), &format!("{} {hash}", "n".repeat(300))] {
            assert!(parse_tokens(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_token_file_change_is_seen_without_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        std::fs::write(&path, format!("alice {}\n", token_hash("a"))).unwrap();
        let tokens = Tokens::load(&path).unwrap();
        assert_eq!(tokens.principal("a").as_deref(), Some("alice"));
        assert_eq!(tokens.principal("b"), None);
        std::fs::write(&path, format!("bob {}\n", token_hash("b"))).unwrap();
        // A different mtime is what the reload looks for; force one rather than wait.
        let later = std::fs::metadata(&path).unwrap().modified().unwrap() + Duration::from_secs(5);
        std::fs::File::options().write(true).open(&path).unwrap().set_modified(later).unwrap();
        let due = Instant::now().checked_sub(TOKENS_RECHECK).unwrap();
        tokens.loaded.lock().unwrap().checked = due;
        assert_eq!(tokens.principal("b").as_deref(), Some("bob"));
        assert_eq!(tokens.principal("a"), None, "a removed token is revoked");
    }
}
