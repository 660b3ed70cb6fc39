//! Credentials of the protocol: the job token every call carries, and the
//! per-member session secret that `Join` hands out.
//!
//! * The job token is read from a file (`--token-file`) or from the
//!   environment variable [`TOKEN_ENV`], never from the command line, so that
//!   it does not show in `ps` or `/proc/PID/cmdline`. It travels in the
//!   [`TOKEN_HEADER`] metadata of every call.
//! * A member's secret travels in [`SECRET_HEADER`], next to its id in
//!   [`MEMBER_HEADER`]; rank processes receive it from their agent through
//!   [`MEMBER_SECRET_ENV`].
//! * [`Secret`] never prints its value (`Debug` and `Display` are redacted)
//!   and is compared in constant time ([`Secret::matches`]).
//! * [`endpoint`] turns a coordinator URL into a client endpoint: TLS
//!   (rustls) for `https://`, verified against the CA certificate given.

use std::fmt;
use std::path::{Path, PathBuf};
use subtle::ConstantTimeEq;
use tonic::metadata::{AsciiMetadataValue, MetadataMap};
use tonic::service::Interceptor;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
use tonic::{Request, Status};

/// The environment variable holding the job token.
pub const TOKEN_ENV: &str = "RSB_JOB_TOKEN";
/// The environment variable through which an agent hands its member secret
/// to its rank processes.
pub const MEMBER_SECRET_ENV: &str = "RSB_MEMBER_SECRET";
/// Metadata key of the job token.
pub const TOKEN_HEADER: &str = "x-rsb-job-token";
/// Metadata key of the calling member's id.
pub const MEMBER_HEADER: &str = "x-rsb-member";
/// Metadata key of the calling member's session secret.
pub const SECRET_HEADER: &str = "x-rsb-member-secret";
/// The file `coordinator up` writes a generated token to, in the run folder.
pub const TOKEN_FILE_NAME: &str = "job.token";

/// Shortest accepted token or secret, in characters.
pub const MIN_SECRET_LEN: usize = 16;
/// Longest accepted token or secret, in characters.
pub const MAX_SECRET_LEN: usize = 1024;

/// The option of `coordinator up`, `coordinator status` and `worker join`
/// that lets calls cross the network without TLS: the job token and the
/// members' secrets then travel in clear text, readable by anyone on the
/// path. Without it, only loopback goes without TLS.
pub const INSECURE_PLAINTEXT_FLAG: &str = "--insecure-plaintext";

/// Where calls may go without TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plaintext {
    /// Only to and from this host (loopback): the default.
    LoopbackOnly,
    /// Anywhere ([`INSECURE_PLAINTEXT_FLAG`]): on a network the user trusts.
    Anywhere,
}

impl Plaintext {
    /// [`Plaintext::Anywhere`] when `insecure` ([`INSECURE_PLAINTEXT_FLAG`] given).
    pub fn allowed_anywhere(insecure: bool) -> Plaintext {
        if insecure {
            Plaintext::Anywhere
        } else {
            Plaintext::LoopbackOnly
        }
    }
}

/// Whether `host`, a URL's host (`127.0.0.1`, `[::1]`, `localhost`), is
/// this host's loopback. A name other than `localhost` is not taken for one
/// (what it resolves to may change).
pub fn is_loopback_host(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost") || host.parse().is_ok_and(is_loopback_ip)
}

/// Whether `ip` is this host's loopback, an IPv4-mapped one
/// (`::ffff:127.0.0.1`) included.
pub fn is_loopback_ip(ip: std::net::IpAddr) -> bool {
    ip.to_canonical().is_loopback()
}

/// Why a credential cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The token file could not be read.
    #[error("reading the job token from {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The value is not a usable secret (the value itself is never shown).
    #[error("the {what} {problem}")]
    Malformed {
        /// Where it came from.
        what: String,
        /// What is wrong with it.
        problem: String,
    },
    /// The system's random source failed.
    #[error("no random bytes from the operating system: {0}")]
    Random(String),
    /// The coordinator URL or its TLS settings cannot be used.
    #[error("coordinator {url}: {problem}")]
    Endpoint {
        /// The URL.
        url: String,
        /// What is wrong.
        problem: String,
    },
}

/// A token or session secret: printable ASCII, never shown in logs or
/// `Debug` output, compared in constant time.
#[derive(Clone)]
pub struct Secret(String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Secret {
    /// Checks `value` (from `what`, named in errors): 16 to 1024 printable,
    /// non-space ASCII characters, so that it fits a metadata value.
    pub fn new(value: String, what: &str) -> Result<Secret, AuthError> {
        let malformed = |problem: String| AuthError::Malformed { what: what.to_string(), problem };
        if value.len() < MIN_SECRET_LEN {
            return Err(malformed(format!(
                "is {} characters long; at least {MIN_SECRET_LEN} are required",
                value.len()
            )));
        }
        if value.len() > MAX_SECRET_LEN {
            return Err(malformed(format!("is longer than {MAX_SECRET_LEN} characters")));
        }
        if !value.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(malformed(
                "holds a character that is not printable ASCII (spaces included)".into(),
            ));
        }
        Ok(Secret(value))
    }

    /// 32 random bytes from the operating system, as 64 hex digits.
    pub fn generate() -> Result<Secret, AuthError> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).map_err(|e| AuthError::Random(e.to_string()))?;
        Ok(Secret(bytes.iter().map(|b| format!("{b:02x}")).collect()))
    }

    /// Reads a secret from a file (surrounding whitespace, such as the final
    /// newline, is ignored).
    pub fn from_file(path: &Path) -> Result<Secret, AuthError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| AuthError::Io { path: path.to_path_buf(), source })?;
        Secret::new(text.trim().to_string(), &format!("job token in {}", path.display()))
    }

    /// The secret in the environment variable `var`, if it is set and not empty.
    pub fn from_env(var: &str) -> Result<Option<Secret>, AuthError> {
        match std::env::var(var) {
            Ok(v) if !v.trim().is_empty() => {
                Secret::new(v.trim().to_string(), &format!("value of {var}")).map(Some)
            }
            Ok(_) | Err(std::env::VarError::NotPresent) => Ok(None),
            Err(std::env::VarError::NotUnicode(_)) => Err(AuthError::Malformed {
                what: format!("value of {var}"),
                problem: "is not valid UTF-8".into(),
            }),
        }
    }

    /// The job token: from `file` when given, otherwise from [`TOKEN_ENV`]
    /// (`None` when neither holds one).
    pub fn job_token(file: Option<&Path>) -> Result<Option<Secret>, AuthError> {
        match file {
            Some(path) => Secret::from_file(path).map(Some),
            None => Secret::from_env(TOKEN_ENV),
        }
    }

    /// A fingerprint of the secret (SHA-256 of it, domain-separated, as 64
    /// hex digits): what a state file keeps to recognise the job token at a
    /// restore without keeping the token itself.
    pub fn fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        let digest = Sha256::new()
            .chain_update(b"rsb job token fingerprint v1\0")
            .chain_update(self.0.as_bytes())
            .finalize();
        digest.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The secret itself, for sending it (never for logging it).
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether `candidate` is this secret, in time independent of where they differ.
    pub fn matches(&self, candidate: &[u8]) -> bool {
        bool::from(self.0.as_bytes().ct_eq(candidate))
    }

    fn metadata_value(&self) -> Result<AsciiMetadataValue, Status> {
        let mut value = AsciiMetadataValue::try_from(self.0.as_str())
            .map_err(|_| Status::internal("a credential is not a valid metadata value"))?;
        // Keeps HTTP/2 header compression from indexing (and so leaking) it.
        value.set_sensitive(true);
        Ok(value)
    }
}

/// Writes a generated token to `path`, readable by its owner only (mode
/// 0600, also when the file already existed).
pub fn write_token_file(path: &Path, token: &Secret) -> Result<(), AuthError> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let io = |source| AuthError::Io { path: path.to_path_buf(), source };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    options.mode(0o600);
    let mut file = options.open(path).map_err(io)?;
    #[cfg(unix)]
    file.set_permissions(std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    writeln!(file, "{}", token.expose()).map_err(io)?;
    file.sync_all().map_err(io)
}

/// The client endpoint of a coordinator URL. `https://` URLs use TLS and
/// need `ca`, the PEM file of the certificate authority (or the
/// self-signed certificate) the coordinator's certificate is checked
/// against; `http://` URLs take no `ca`, and name a loopback host unless
/// `plaintext` allows them anywhere (every call carries the job token).
pub fn endpoint(url: &str, ca: Option<&Path>, plaintext: Plaintext) -> Result<Endpoint, AuthError> {
    let problem = |problem: String| AuthError::Endpoint { url: url.to_string(), problem };
    let endpoint = Endpoint::from_shared(url.to_string())
        .map_err(|e| problem(e.to_string()))?
        // A dead or cut-off coordinator is noticed on an idle connection too.
        .connect_timeout(std::time::Duration::from_secs(10))
        .http2_keep_alive_interval(std::time::Duration::from_secs(10))
        .keep_alive_timeout(std::time::Duration::from_secs(20))
        .keep_alive_while_idle(true);
    match (url.starts_with("https://"), ca) {
        (true, Some(ca)) => {
            let pem = std::fs::read(ca)
                .map_err(|source| AuthError::Io { path: ca.to_path_buf(), source })?;
            let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem));
            endpoint.tls_config(tls).map_err(|e| problem(format!("TLS: {e}")))
        }
        (true, None) => Err(problem(
            "an https:// coordinator needs --tls-ca FILE (the PEM certificate of its CA)".into(),
        )),
        (false, Some(_)) => {
            Err(problem("--tls-ca is for https:// coordinators; this URL is not one".into()))
        }
        (false, None) => {
            let host = endpoint.uri().host().unwrap_or_default();
            if plaintext == Plaintext::LoopbackOnly && !is_loopback_host(host) {
                return Err(problem(format!(
                    "{host} is not this host's loopback, and without TLS the job token would \
                     cross the network in clear text: use an https:// URL with --tls-ca (the \
                     coordinator serving --tls-cert and --tls-key), or pass \
                     {INSECURE_PLAINTEXT_FLAG} on a network you trust"
                )));
            }
            Ok(endpoint)
        }
    }
}

/// What a client presents with every call: the job token and, once joined,
/// the member's id and session secret. A tonic interceptor.
#[derive(Debug, Clone)]
pub struct Credentials {
    token: Secret,
    member: Option<(AsciiMetadataValue, Secret)>,
}

impl Credentials {
    /// The job token alone (`Join`, `Status`).
    pub fn token(token: Secret) -> Credentials {
        Credentials { token, member: None }
    }

    /// The job token and a member's credentials.
    pub fn member(
        token: Secret,
        member_id: &str,
        secret: Secret,
    ) -> Result<Credentials, AuthError> {
        let id = AsciiMetadataValue::try_from(member_id).map_err(|_| AuthError::Malformed {
            what: "member id".into(),
            problem: "is not printable ASCII".into(),
        })?;
        Ok(Credentials { token, member: Some((id, secret)) })
    }
}

impl Interceptor for Credentials {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let metadata = request.metadata_mut();
        metadata.insert(TOKEN_HEADER, self.token.metadata_value()?);
        if let Some((id, secret)) = &self.member {
            metadata.insert(MEMBER_HEADER, id.clone());
            metadata.insert(SECRET_HEADER, secret.metadata_value()?);
        }
        Ok(request)
    }
}

/// The member credentials a call presents, if any: `(member id, secret)`.
pub fn presented_member(metadata: &MetadataMap) -> Option<(&str, &[u8])> {
    let id = metadata.get(MEMBER_HEADER)?.to_str().ok()?;
    let secret = metadata.get(SECRET_HEADER)?.as_bytes();
    Some((id, secret))
}

/// Whether a call presents `token` (constant-time comparison).
pub fn presents_token(metadata: &MetadataMap, token: &Secret) -> bool {
    metadata.get(TOKEN_HEADER).is_some_and(|v| token.matches(v.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_checked_generated_and_never_printed() {
        assert!(Secret::new("short".into(), "token").is_err());
        assert!(Secret::new("with a space in the middle".into(), "token").is_err());
        let s = Secret::generate().unwrap();
        assert_eq!(s.expose().len(), 64);
        assert!(!s.matches(Secret::generate().unwrap().expose().as_bytes()));
        assert!(!format!("{s:?} {s}").contains(s.expose()));
        assert!(s.matches(s.expose().as_bytes()));
        assert!(!s.matches(&s.expose().as_bytes()[1..]));
        assert!(!s.matches(b""));
    }

    #[test]
    fn a_token_file_is_private_and_read_back() {
        let dir = std::env::temp_dir().join(format!("rsb-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(TOKEN_FILE_NAME);
        let token = Secret::generate().unwrap();
        write_token_file(&path, &token).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let read = Secret::job_token(Some(&path)).unwrap().expect("the token file's token");
        assert!(read.matches(token.expose().as_bytes()));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn https_needs_a_ca_and_http_takes_none() {
        let loopback = Plaintext::LoopbackOnly;
        assert!(endpoint("http://127.0.0.1:1", None, loopback).is_ok());
        let ca = std::path::Path::new("/nonexistent/ca.pem");
        assert!(endpoint("http://127.0.0.1:1", Some(ca), loopback).is_err());
        let e = endpoint("https://127.0.0.1:1", None, loopback).unwrap_err().to_string();
        assert!(e.contains("--tls-ca"), "{e}");
        assert!(endpoint("https://127.0.0.1:1", Some(ca), loopback).is_err(), "a missing CA file");
    }

    #[test]
    fn http_beyond_loopback_needs_the_insecure_plaintext_option() {
        for url in [
            "http://127.0.0.1:1",
            "http://127.8.0.2:1",
            "http://[::1]:1",
            "http://[::ffff:127.0.0.1]:1",
            "http://localhost:1",
        ] {
            assert!(endpoint(url, None, Plaintext::LoopbackOnly).is_ok(), "{url}");
        }
        for url in [
            "http://10.0.0.1:50051",
            "http://[fd00::1]:1",
            "http://coordinator:1",
            "http://0.0.0.0:1",
        ] {
            let e = endpoint(url, None, Plaintext::LoopbackOnly).unwrap_err().to_string();
            assert!(e.contains(INSECURE_PLAINTEXT_FLAG) && e.contains("clear text"), "{url}: {e}");
            assert!(endpoint(url, None, Plaintext::Anywhere).is_ok(), "{url}");
        }
    }

    #[test]
    fn the_interceptor_attaches_the_credentials() {
        let token = Secret::generate().unwrap();
        let secret = Secret::generate().unwrap();
        let mut creds = Credentials::member(token.clone(), "m1-a", secret.clone()).unwrap();
        let request = creds.call(Request::new(())).unwrap();
        assert!(presents_token(request.metadata(), &token));
        let (id, presented) = presented_member(request.metadata()).unwrap();
        assert_eq!(id, "m1-a");
        assert!(secret.matches(presented));
        let bare = Credentials::token(token.clone()).call(Request::new(())).unwrap();
        assert!(presented_member(bare.metadata()).is_none());
        assert!(!presents_token(Request::new(()).metadata(), &token));
    }
}
