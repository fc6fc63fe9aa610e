//! Access tokens: HMAC-signed JWTs (RFC 7519) with the claims the API promises, plus the
//! `Authorization: Bearer` header parser. Each secret has a `kid` derived from it, so tokens
//! signed with a previous secret keep working during a rotation and the key is found directly.

use std::time::Duration;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::unix_time::unix_now;

/// Shortest accepted HMAC secret: RFC 7518 §3.2 asks for a key at least as long as the
/// hash output; 32 bytes is that for HS256 and a sane floor for the others.
pub const MIN_SECRET_BYTES: usize = 32;

/// Clock skew forgiven by default: instances behind one balancer never agree to the
/// millisecond, and a token minted on one must work on its neighbour at once.
pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(60);

/// Domain separation for key ids, so a kid is not a plain hash of the secret.
const KID_LABEL: &[u8] = b"chatgate jwt kid v1\0";

/// The HMAC algorithm tokens are signed with (config values `"HS256"`, `"HS384"`, `"HS512"`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum TokenAlgorithm {
    /// HMAC with SHA-256, the default.
    #[default]
    HS256,
    /// HMAC with SHA-384.
    HS384,
    /// HMAC with SHA-512.
    HS512,
}

impl TokenAlgorithm {
    fn jwt(self) -> Algorithm {
        match self {
            TokenAlgorithm::HS256 => Algorithm::HS256,
            TokenAlgorithm::HS384 => Algorithm::HS384,
            TokenAlgorithm::HS512 => Algorithm::HS512,
        }
    }
}

/// The claims of a chatgate access token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The user's numeric id (the original backend's `identity` claim).
    pub identity: u64,
    /// The username.
    pub sub: String,
    /// Issued at, seconds since the Unix epoch.
    pub iat: u64,
    /// Not valid before, seconds since the Unix epoch (equal to `iat`).
    pub nbf: u64,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// Random token id (UUID v4), so a single token can be revoked.
    pub jti: String,
}

/// Why the token configuration was refused. Texts never contain a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenConfigError {
    /// A signing secret is shorter than [`MIN_SECRET_BYTES`].
    #[error("the {which} token secret is {len} bytes long; it must be at least {MIN_SECRET_BYTES} bytes")]
    SecretTooShort {
        /// `"current"` or `"previous #<n>"` (1-based), to find it in the config.
        which: String,
        /// Its length in bytes.
        len: usize,
    },
    /// The token lifetime is shorter than one second.
    #[error("the token lifetime must be at least one second")]
    LifetimeTooShort,
}

/// Signing a token failed (not expected with HMAC keys; kept as an error, not a panic).
#[derive(Debug, thiserror::Error)]
#[error("cannot sign access token: {0}")]
pub struct TokenIssueError(jsonwebtoken::errors::Error);

/// Why a token was refused; for logs and metric labels only, clients see one text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    /// Not three base64url parts, or an undecodable header (this includes `alg: none`).
    Malformed,
    /// The header names another algorithm than the configured one.
    WrongAlgorithm,
    /// No `kid`, or one that matches none of the configured secrets.
    UnknownKey,
    /// The signature does not match.
    BadSignature,
    /// `exp` is in the past.
    Expired,
    /// `nbf` is in the future.
    NotYetValid,
    /// Correctly signed, but a claim is missing or has the wrong type.
    InvalidClaims,
}

impl RejectReason {
    /// A short stable name, fit for a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::Malformed => "malformed",
            RejectReason::WrongAlgorithm => "wrong_algorithm",
            RejectReason::UnknownKey => "unknown_key",
            RejectReason::BadSignature => "bad_signature",
            RejectReason::Expired => "expired",
            RejectReason::NotYetValid => "not_yet_valid",
            RejectReason::InvalidClaims => "invalid_claims",
        }
    }
}

/// A refused token. Every reason shows the same text, so a client learns nothing about
/// which check failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("Invalid token: expired or fake token.")]
pub struct TokenRejected {
    /// The check that failed.
    pub reason: RejectReason,
}

impl From<RejectReason> for TokenRejected {
    fn from(reason: RejectReason) -> Self {
        TokenRejected { reason }
    }
}

/// A secret that still verifies tokens, found by its key id.
struct VerifyingKey {
    kid: String,
    key: DecodingKey,
}

/// Issues and verifies access tokens with the current secret, and verifies tokens signed with
/// previous secrets still listed in the config.
pub struct TokenService {
    algorithm: Algorithm,
    /// Header for new tokens: the algorithm and the current secret's kid.
    header: Header,
    signing_key: EncodingKey,
    /// The current secret first, then the previous ones.
    verifying_keys: Vec<VerifyingKey>,
    validation: Validation,
    ttl_secs: u64,
    /// Clock skew forgiven on `iat`, `nbf` and `exp`, in seconds.
    leeway_secs: u64,
}

impl std::fmt::Debug for TokenService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kids: Vec<&str> = self.verifying_keys.iter().map(|k| k.kid.as_str()).collect();
        f.debug_struct("TokenService")
            .field("algorithm", &self.algorithm)
            .field("kids", &kids)
            .field("ttl_secs", &self.ttl_secs)
            .field("leeway_secs", &self.leeway_secs)
            .finish_non_exhaustive()
    }
}

impl TokenService {
    /// Builds the service; every secret must be at least [`MIN_SECRET_BYTES`] long and `ttl`
    /// at least one second.
    pub fn new(
        algorithm: TokenAlgorithm,
        current_secret: &[u8],
        previous_secrets: &[Vec<u8>],
        ttl: Duration,
    ) -> Result<Self, TokenConfigError> {
        check_secret_length(current_secret, || "current".to_owned())?;
        for (index, secret) in previous_secrets.iter().enumerate() {
            check_secret_length(secret, || format!("previous #{}", index + 1))?;
        }
        if ttl.as_secs() == 0 {
            return Err(TokenConfigError::LifetimeTooShort);
        }

        let algorithm = algorithm.jwt();
        let current_kid = key_id(current_secret);
        let mut header = Header::new(algorithm);
        header.kid = Some(current_kid.clone());

        let mut verifying_keys = vec![VerifyingKey {
            kid: current_kid,
            key: DecodingKey::from_secret(current_secret),
        }];
        for secret in previous_secrets {
            let kid = key_id(secret);
            // A secret listed twice (or kept as "previous" after it became current) is harmless.
            if verifying_keys.iter().all(|known| known.kid != kid) {
                verifying_keys.push(VerifyingKey {
                    kid,
                    key: DecodingKey::from_secret(secret),
                });
            }
        }

        let mut validation = Validation::new(algorithm);
        validation.leeway = DEFAULT_LEEWAY.as_secs();
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "nbf", "sub"]);

        Ok(TokenService {
            algorithm,
            header,
            signing_key: EncodingKey::from_secret(current_secret),
            verifying_keys,
            validation,
            ttl_secs: ttl.as_secs(),
            leeway_secs: DEFAULT_LEEWAY.as_secs(),
        })
    }

    /// Forgives this much clock skew between instances (default [`DEFAULT_LEEWAY`]): a
    /// token whose `iat`/`nbf` lies up to `leeway` in the future, or whose `exp` passed up
    /// to `leeway` ago, is accepted. Whole seconds, as the claims are.
    pub fn with_leeway(mut self, leeway: Duration) -> Self {
        self.leeway_secs = leeway.as_secs();
        self.validation.leeway = self.leeway_secs;
        self
    }

    /// Issues a token for a user, valid from now for the configured lifetime.
    pub fn issue(&self, user_id: u64, username: &str) -> Result<String, TokenIssueError> {
        self.issue_at(user_id, username, unix_now())
    }

    /// Issues a token as if the clock read `now` (seconds since the Unix epoch).
    fn issue_at(&self, user_id: u64, username: &str, now: u64) -> Result<String, TokenIssueError> {
        let claims = Claims {
            identity: user_id,
            sub: username.to_owned(),
            iat: now,
            nbf: now,
            exp: now.saturating_add(self.ttl_secs),
            jti: uuid::Uuid::new_v4().to_string(),
        };
        jsonwebtoken::encode(&self.header, &claims, &self.signing_key).map_err(TokenIssueError)
    }

    /// Verifies a token's algorithm, key id, signature, `exp`, `nbf` and `iat` (within the
    /// leeway) and returns its claims.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenRejected> {
        let claims = self.verify_signed(token)?;
        // jsonwebtoken checks `exp` and `nbf`; a token issued in the future beyond the
        // skew is as fake as one not yet valid.
        if claims.iat > unix_now().saturating_add(self.leeway_secs) {
            return Err(RejectReason::NotYetValid.into());
        }
        Ok(claims)
    }

    fn verify_signed(&self, token: &str) -> Result<Claims, TokenRejected> {
        if let [only] = self.verifying_keys.as_slice() {
            // One key (no rotation in progress): `decode` reads the header itself, so skip
            // our own read of it. A failure takes the general path, which names the reason.
            if let Ok(data) = jsonwebtoken::decode::<Claims>(token, &only.key, &self.validation) {
                if data.header.alg == self.algorithm
                    && data.header.kid.as_deref() == Some(&only.kid)
                {
                    return Ok(data.claims);
                }
            }
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| RejectReason::Malformed)?;
        if header.alg != self.algorithm {
            return Err(RejectReason::WrongAlgorithm.into());
        }
        let kid = header.kid.as_deref().ok_or(RejectReason::UnknownKey)?;
        let key = self
            .verifying_keys
            .iter()
            .find(|known| known.kid == kid)
            .ok_or(RejectReason::UnknownKey)?;
        jsonwebtoken::decode::<Claims>(token, &key.key, &self.validation)
            .map(|data| data.claims)
            .map_err(|error| reject_reason(error.kind()).into())
    }
}

/// Sorts jsonwebtoken's errors into our reasons. Claim errors can only surface after the
/// signature checked out, so they mean a well-signed token with bad contents.
fn reject_reason(kind: &ErrorKind) -> RejectReason {
    match kind {
        ErrorKind::InvalidSignature => RejectReason::BadSignature,
        ErrorKind::ExpiredSignature => RejectReason::Expired,
        ErrorKind::ImmatureSignature => RejectReason::NotYetValid,
        ErrorKind::InvalidAlgorithm | ErrorKind::MissingAlgorithm => RejectReason::WrongAlgorithm,
        ErrorKind::MissingRequiredClaim(_)
        | ErrorKind::InvalidClaimFormat(_)
        | ErrorKind::InvalidAudience
        | ErrorKind::InvalidIssuer
        | ErrorKind::InvalidSubject
        | ErrorKind::Json(_) => RejectReason::InvalidClaims,
        _ => RejectReason::Malformed,
    }
}

fn check_secret_length(
    secret: &[u8],
    which: impl FnOnce() -> String,
) -> Result<(), TokenConfigError> {
    if secret.len() < MIN_SECRET_BYTES {
        return Err(TokenConfigError::SecretTooShort {
            which: which(),
            len: secret.len(),
        });
    }
    Ok(())
}

/// The key id of a secret: 16 hex digits of SHA-256 over a fixed label and the secret.
/// With secrets of 32+ bytes it reveals nothing usable about the secret.
fn key_id(secret: &[u8]) -> String {
    let digest = Sha256::new()
        .chain_update(KID_LABEL)
        .chain_update(secret)
        .finalize();
    digest[..8]
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// Why an `Authorization` header yields no bearer token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BearerError {
    /// No header, another scheme, no space after `Bearer`, or nothing after it.
    #[error("Invalid token: empty or not starts with 'Bearer '")]
    Missing,
    /// A token is there but contains characters no JWT has (spaces, controls, non-ASCII).
    #[error("Invalid token: expired or fake token.")]
    Malformed,
}

/// Takes the token out of an `Authorization: Bearer <token>` header value. The scheme is
/// matched case-insensitively (RFC 9110 §11.1); extra spaces before the token and trailing
/// whitespace are tolerated.
pub fn bearer_token(authorization: Option<&[u8]>) -> Result<&str, BearerError> {
    const SCHEME: &[u8] = b"bearer ";
    let value = authorization.ok_or(BearerError::Missing)?;
    let value = value.trim_ascii_end();
    if value.len() < SCHEME.len() || !value[..SCHEME.len()].eq_ignore_ascii_case(SCHEME) {
        return Err(BearerError::Missing);
    }
    let token = value[SCHEME.len()..].trim_ascii_start();
    if token.is_empty() {
        return Err(BearerError::Missing);
    }
    if !token.iter().all(|byte| byte.is_ascii_graphic()) {
        return Err(BearerError::Malformed);
    }
    std::str::from_utf8(token).map_err(|_| BearerError::Malformed)
}

#[cfg(test)]
mod tests {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine as _;

    use super::*;

    const SECRET_A: &[u8] = b"0123456789abcdef0123456789abcdef-secret-a";
    const SECRET_B: &[u8] = b"fedcba9876543210fedcba9876543210-secret-b";
    const WEEK: Duration = Duration::from_secs(7 * 24 * 3600);

    fn service(current: &[u8], previous: &[&[u8]]) -> TokenService {
        let previous: Vec<Vec<u8>> = previous.iter().map(|s| s.to_vec()).collect();
        TokenService::new(TokenAlgorithm::HS256, current, &previous, WEEK).expect("valid config")
    }

    fn reason(result: Result<Claims, TokenRejected>) -> RejectReason {
        match result {
            Ok(claims) => panic!("token accepted: {claims:?}"),
            Err(rejected) => rejected.reason,
        }
    }

    fn b64(json: &str) -> String {
        URL_SAFE_NO_PAD.encode(json)
    }

    fn parts(token: &str) -> Vec<String> {
        token.split('.').map(str::to_owned).collect()
    }

    #[test]
    fn issue_then_verify_round_trip() {
        let tokens = service(SECRET_A, &[]);
        let before = unix_now();
        let token = tokens.issue(42, "alice").expect("issue");
        let claims = tokens.verify(&token).expect("valid token");
        let after = unix_now();

        assert_eq!(claims.identity, 42);
        assert_eq!(claims.sub, "alice");
        assert!(before <= claims.iat && claims.iat <= after);
        assert_eq!(claims.nbf, claims.iat);
        assert_eq!(claims.exp, claims.iat + 7 * 24 * 3600);
        let jti = uuid::Uuid::parse_str(&claims.jti).expect("jti is a uuid");
        assert_eq!(jti.get_version_num(), 4);

        let header: serde_json::Value = serde_json::from_slice(
            &URL_SAFE_NO_PAD
                .decode(&parts(&token)[0])
                .expect("base64 header"),
        )
        .expect("json header");
        assert_eq!(header["alg"], "HS256");
        assert_eq!(header["typ"], "JWT");
        assert_eq!(header["kid"], key_id(SECRET_A).as_str());
    }

    #[test]
    fn every_token_gets_its_own_jti() {
        let tokens = service(SECRET_A, &[]);
        let a = tokens
            .verify(&tokens.issue(1, "u").expect("issue"))
            .expect("valid");
        let b = tokens
            .verify(&tokens.issue(1, "u").expect("issue"))
            .expect("valid");
        assert_ne!(a.jti, b.jti);
    }

    #[test]
    fn key_ids_are_stable_short_and_distinct() {
        let kid = key_id(SECRET_A);
        assert_eq!(kid.len(), 16);
        assert!(kid
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        assert_eq!(kid, key_id(SECRET_A));
        assert_ne!(kid, key_id(SECRET_B));
        let plain_sha256_prefix: String = Sha256::digest(SECRET_A)[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_ne!(kid, plain_sha256_prefix);
    }

    #[test]
    fn expired_token_is_rejected_past_the_leeway() {
        let tokens = service(SECRET_A, &[]);
        let leeway = DEFAULT_LEEWAY.as_secs();
        let issued = unix_now() - WEEK.as_secs() - leeway - 2;
        let token = tokens.issue_at(1, "alice", issued).expect("issue");
        assert_eq!(reason(tokens.verify(&token)), RejectReason::Expired);
        // Expired a little less than the leeway ago: a neighbour's clock may be behind.
        let issued = unix_now() - WEEK.as_secs() - leeway + 5;
        let token = tokens.issue_at(1, "alice", issued).expect("issue");
        assert!(tokens.verify(&token).is_ok());
    }

    #[test]
    fn token_from_the_future_is_accepted_within_the_leeway_only() {
        let tokens = service(SECRET_A, &[]);
        let leeway = DEFAULT_LEEWAY.as_secs();
        // Minted on an instance whose clock runs ahead.
        for ahead in [1, leeway - 5] {
            let token = tokens
                .issue_at(1, "alice", unix_now() + ahead)
                .expect("issue");
            assert!(tokens.verify(&token).is_ok(), "{ahead} s ahead");
        }
        let token = tokens
            .issue_at(1, "alice", unix_now() + leeway + 5)
            .expect("issue");
        assert_eq!(reason(tokens.verify(&token)), RejectReason::NotYetValid);
        // `iat` beyond the skew with an innocent `nbf` is as fake.
        let now = unix_now();
        let claims = Claims {
            identity: 1,
            sub: "alice".into(),
            iat: now + leeway + 5,
            nbf: now,
            exp: now + 600,
            jti: "j".into(),
        };
        let token =
            jsonwebtoken::encode(&tokens.header, &claims, &tokens.signing_key).expect("sign");
        assert_eq!(reason(tokens.verify(&token)), RejectReason::NotYetValid);
    }

    #[test]
    fn leeway_is_configurable_down_to_none() {
        let tokens = service(SECRET_A, &[]).with_leeway(Duration::ZERO);
        let token = tokens.issue_at(1, "alice", unix_now() + 3).expect("issue");
        assert_eq!(reason(tokens.verify(&token)), RejectReason::NotYetValid);
        let strict_expired = tokens
            .issue_at(1, "alice", unix_now() - WEEK.as_secs() - 3)
            .expect("issue");
        assert_eq!(
            reason(tokens.verify(&strict_expired)),
            RejectReason::Expired
        );
    }

    #[test]
    fn alg_none_is_rejected() {
        let tokens = service(SECRET_A, &[]);
        let now = unix_now();
        let claims = format!(
            r#"{{"identity":1,"sub":"alice","iat":{now},"nbf":{now},"exp":{},"jti":"x"}}"#,
            now + 60
        );
        let kid = key_id(SECRET_A);
        for header in [
            r#"{"alg":"none","typ":"JWT"}"#.to_owned(),
            format!(r#"{{"alg":"none","typ":"JWT","kid":"{kid}"}}"#),
            format!(r#"{{"alg":"None","kid":"{kid}"}}"#),
        ] {
            for signature in ["", "AAAA"] {
                let token = format!("{}.{}.{signature}", b64(&header), b64(&claims));
                assert_eq!(
                    reason(tokens.verify(&token)),
                    RejectReason::Malformed,
                    "{header}"
                );
            }
        }
    }

    #[test]
    fn other_algorithm_with_the_right_secret_is_rejected() {
        let tokens = service(SECRET_A, &[]);
        let now = unix_now();
        let mut header = Header::new(Algorithm::HS512);
        header.kid = Some(key_id(SECRET_A));
        let claims = Claims {
            identity: 1,
            sub: "alice".into(),
            iat: now,
            nbf: now,
            exp: now + 60,
            jti: "j".into(),
        };
        let token = jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(SECRET_A))
            .expect("encode");
        assert_eq!(reason(tokens.verify(&token)), RejectReason::WrongAlgorithm);

        // The same token shape with the configured algorithm passes, so the test above
        // fails for the algorithm and nothing else.
        header.alg = Algorithm::HS256;
        let token = jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(SECRET_A))
            .expect("encode");
        assert_eq!(tokens.verify(&token), Ok(claims));
    }

    #[test]
    fn configured_hs512_works_and_refuses_hs256() {
        let hs512 = TokenService::new(TokenAlgorithm::HS512, SECRET_A, &[], WEEK).expect("config");
        let token = hs512.issue(7, "bob").expect("issue");
        assert!(token.starts_with(&b64(&format!(
            r#"{{"typ":"JWT","alg":"HS512","kid":"{}"}}"#,
            key_id(SECRET_A)
        ))));
        assert_eq!(hs512.verify(&token).expect("valid").identity, 7);
        let hs256_token = service(SECRET_A, &[]).issue(7, "bob").expect("issue");
        assert_eq!(
            reason(hs512.verify(&hs256_token)),
            RejectReason::WrongAlgorithm
        );
    }

    #[test]
    fn wrong_missing_and_unknown_kid_are_rejected() {
        let signer_b = service(SECRET_B, &[]);
        let verifier = service(SECRET_A, &[SECRET_B]);
        let now = unix_now();
        let claims = Claims {
            identity: 1,
            sub: "alice".into(),
            iat: now,
            nbf: now,
            exp: now + 60,
            jti: "j".into(),
        };
        let sign = |kid: Option<String>| {
            let mut header = Header::new(Algorithm::HS256);
            header.kid = kid;
            jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(SECRET_B))
                .expect("encode")
        };
        // Signed with B but claiming to be A: the kid selects A's key and the signature fails.
        assert_eq!(
            reason(verifier.verify(&sign(Some(key_id(SECRET_A))))),
            RejectReason::BadSignature
        );
        assert_eq!(
            reason(verifier.verify(&sign(None))),
            RejectReason::UnknownKey
        );
        assert_eq!(
            reason(verifier.verify(&sign(Some("0011223344556677".into())))),
            RejectReason::UnknownKey
        );
        assert_eq!(
            verifier.verify(&sign(Some(key_id(SECRET_B)))),
            Ok(claims.clone())
        );
        assert!(signer_b.verify(&sign(Some(key_id(SECRET_B)))).is_ok());
    }

    #[test]
    fn tampered_payload_is_rejected() {
        let tokens = service(SECRET_A, &[]);
        let token = tokens.issue(1, "alice").expect("issue");
        let mut segments = parts(&token);
        let mut claims: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(&segments[1]).expect("base64"))
                .expect("json");
        claims["identity"] = 2.into();
        segments[1] = b64(&claims.to_string());
        assert_eq!(
            reason(tokens.verify(&segments.join("."))),
            RejectReason::BadSignature
        );
    }

    #[test]
    fn missing_claims_are_rejected_even_when_signed() {
        let tokens = service(SECRET_A, &[]);
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(key_id(SECRET_A));
        let now = unix_now();
        let without_jti = serde_json::json!({
            "identity": 1, "sub": "alice", "iat": now, "nbf": now, "exp": now + 60
        });
        let without_nbf = serde_json::json!({
            "identity": 1, "sub": "alice", "iat": now, "exp": now + 60, "jti": "j"
        });
        for claims in [without_jti, without_nbf] {
            let token = jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(SECRET_A))
                .expect("encode");
            assert_eq!(reason(tokens.verify(&token)), RejectReason::InvalidClaims);
        }
    }

    #[test]
    fn garbage_tokens_are_malformed() {
        let tokens = service(SECRET_A, &[]);
        for token in ["", "abc", "a.b", "a.b.c", "a.b.c.d", "....", "eyJ.eyJ.sig"] {
            assert_eq!(
                reason(tokens.verify(token)),
                RejectReason::Malformed,
                "{token:?}"
            );
        }
    }

    #[test]
    fn rotation_keeps_previous_secrets_until_they_are_removed() {
        let before_rotation = service(SECRET_A, &[]);
        let old_token = before_rotation.issue(1, "alice").expect("issue");

        let rotated = service(SECRET_B, &[SECRET_A]);
        assert_eq!(
            rotated.verify(&old_token).expect("still valid").sub,
            "alice"
        );
        let new_token = rotated.issue(1, "alice").expect("issue");
        assert!(rotated.verify(&new_token).is_ok());
        assert_eq!(
            reason(before_rotation.verify(&new_token)),
            RejectReason::UnknownKey
        );

        let old_secret_removed = service(SECRET_B, &[]);
        assert_eq!(
            reason(old_secret_removed.verify(&old_token)),
            RejectReason::UnknownKey
        );
        assert!(old_secret_removed.verify(&new_token).is_ok());
    }

    #[test]
    fn short_secrets_are_refused_without_echoing_them() {
        let short = b"only-31-bytes-long-secret-12345";
        assert_eq!(short.len(), 31);
        let error =
            TokenService::new(TokenAlgorithm::HS256, short, &[], WEEK).expect_err("short secret");
        assert_eq!(
            error.to_string(),
            "the current token secret is 31 bytes long; it must be at least 32 bytes"
        );
        let error = TokenService::new(
            TokenAlgorithm::HS256,
            SECRET_A,
            &[SECRET_B.to_vec(), short.to_vec()],
            WEEK,
        )
        .expect_err("short previous secret");
        assert_eq!(
            error.to_string(),
            "the previous #2 token secret is 31 bytes long; it must be at least 32 bytes"
        );
        assert!(TokenService::new(TokenAlgorithm::HS256, &[7u8; 32], &[], WEEK).is_ok());
        assert_eq!(
            TokenService::new(
                TokenAlgorithm::HS256,
                SECRET_A,
                &[],
                Duration::from_millis(999)
            )
            .expect_err("zero ttl"),
            TokenConfigError::LifetimeTooShort
        );
    }

    #[test]
    fn rejections_all_show_the_contract_text() {
        let rejected = TokenRejected::from(RejectReason::Expired);
        assert_eq!(
            rejected.to_string(),
            "Invalid token: expired or fake token."
        );
        assert_eq!(
            TokenRejected::from(RejectReason::BadSignature).to_string(),
            rejected.to_string()
        );
        assert_eq!(RejectReason::NotYetValid.as_str(), "not_yet_valid");
    }

    #[test]
    fn algorithm_names_deserialize() {
        let parsed: Vec<TokenAlgorithm> =
            serde_json::from_str(r#"["HS256","HS384","HS512"]"#).expect("algorithms");
        assert_eq!(
            parsed,
            [
                TokenAlgorithm::HS256,
                TokenAlgorithm::HS384,
                TokenAlgorithm::HS512
            ]
        );
        assert!(serde_json::from_str::<TokenAlgorithm>(r#""none""#).is_err());
        assert!(serde_json::from_str::<TokenAlgorithm>(r#""RS256""#).is_err());
        assert_eq!(TokenAlgorithm::default(), TokenAlgorithm::HS256);
    }

    #[test]
    fn bearer_header_parsing() {
        let ok = |value: &'static [u8]| bearer_token(Some(value));
        assert_eq!(ok(b"Bearer abc.def.ghi"), Ok("abc.def.ghi"));
        assert_eq!(ok(b"bearer abc"), Ok("abc"));
        assert_eq!(ok(b"BEARER abc"), Ok("abc"));
        assert_eq!(ok(b"Bearer    abc"), Ok("abc"));
        assert_eq!(ok(b"Bearer abc \t"), Ok("abc"));
        assert_eq!(ok(b"Bearer a-b_c~d+e/f="), Ok("a-b_c~d+e/f="));

        assert_eq!(bearer_token(None), Err(BearerError::Missing));
        for missing in [
            &b""[..],
            b"Bearer",
            b"Bearer ",
            b"Bearer    ",
            b"Bearerabc",
            b"Bearer\tabc",
            b"Basic YWxpY2U6cHc=",
            b"Token abc",
            b" Bearer abc",
            b"Bear abc",
        ] {
            assert_eq!(
                bearer_token(Some(missing)),
                Err(BearerError::Missing),
                "{:?}",
                String::from_utf8_lossy(missing)
            );
        }
        for malformed in [
            &b"Bearer abc def"[..],
            b"Bearer abc\tdef",
            b"Bearer \xc3\xa4bc",
            b"Bearer a\x7f",
        ] {
            assert_eq!(bearer_token(Some(malformed)), Err(BearerError::Malformed));
        }
        assert_eq!(
            BearerError::Missing.to_string(),
            "Invalid token: empty or not starts with 'Bearer '"
        );
    }
}
