//! JSON Web Tokens (RFC 7519, compact JWS of RFC 7515) as megasock checks them.
//!
//! One key, whose type fixes the one algorithm accepted: a secret (`--auth-jwt-secret`) means
//! HS256; a public key (`--auth-jwt-public-key`) means RS256, ES256 or EdDSA by its type. The
//! token's `alg` header must name exactly that algorithm, so a token cannot pick a weaker
//! check (`"alg":"none"`, or HS256 keyed with the public key). The signature is checked
//! before the claims are even parsed.
//!
//! Claims: `exp` is required (a token that never expires is refused) and checked strictly;
//! `nbf` gets [`NBF_LEEWAY`] for clocks a little behind the issuer's; `aud` must name
//! `--auth-audience` when that is set (and a token with an `aud` is refused when it is not,
//! RFC 7519 §4.1.3); `iss` must equal `--auth-issuer` when that is set. `rooms` is megasock's
//! own: the rooms the token grants (see [`Grant::allows`]). Everything else is ignored.

use base64::Engine as _;
use ring::{hmac, signature};
use serde::Deserialize;

use super::keys::PublicKey;

/// How far in the future a token's `nbf` may be and still be accepted (seconds): the issuer's
/// clock may run a little ahead of this server's.
pub const NBF_LEEWAY: f64 = 30.0;

/// The signature algorithms megasock verifies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alg {
    HS256,
    RS256,
    ES256,
    EdDSA,
}

impl Alg {
    pub fn name(self) -> &'static str {
        match self {
            Alg::HS256 => "HS256",
            Alg::RS256 => "RS256",
            Alg::ES256 => "ES256",
            Alg::EdDSA => "EdDSA",
        }
    }
}

enum Key {
    Secret(hmac::Key),
    Public(signature::UnparsedPublicKey<Vec<u8>>),
}

/// Checks tokens against one key and the configured audience and issuer.
pub struct Verifier {
    alg: Alg,
    key: Key,
    audience: Option<String>,
    issuer: Option<String>,
}

impl std::fmt::Debug for Verifier {
    // Never prints the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("alg", &self.alg)
            .field("audience", &self.audience)
            .field("issuer", &self.issuer)
            .finish_non_exhaustive()
    }
}

/// Why a token was refused. Each is one `reason` of `megasock_auth_rejections_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenError {
    /// Not a JWT megasock can read, or one it refuses by rule (no `exp`, `crit` header).
    Malformed(&'static str),
    /// Another algorithm than the key's, or a signature that does not verify.
    BadSignature(&'static str),
    Expired,
    NotYetValid,
    Audience(&'static str),
    Issuer(&'static str),
}

impl TokenError {
    /// The reason in the 401's body.
    pub fn reason(self) -> &'static str {
        match self {
            TokenError::Malformed(r)
            | TokenError::BadSignature(r)
            | TokenError::Audience(r)
            | TokenError::Issuer(r) => r,
            TokenError::Expired => "token expired (exp is in the past): get a new token",
            TokenError::NotYetValid => "token not valid yet (nbf is in the future)",
        }
    }
}

/// What a valid token grants.
#[derive(Debug)]
pub struct Grant {
    /// `exp`, in seconds since the Unix epoch.
    pub expires: f64,
    /// The `rooms` claim; None if the token has none.
    rooms: Option<Vec<String>>,
}

impl Grant {
    /// True if the token grants `room`: every room without a `rooms` claim; otherwise an
    /// entry equal to the name, or an entry ending in `*` whose part before it starts the
    /// name (`chat:*` grants `chat:1`; `*` grants every room). `"rooms": []` grants none.
    pub fn allows(&self, room: &str) -> bool {
        self.rooms.as_ref().is_none_or(|grants| {
            grants.iter().any(|g| match g.strip_suffix('*') {
                Some(prefix) => room.starts_with(prefix),
                None => g == room,
            })
        })
    }
}

#[derive(Deserialize)]
struct Header {
    alg: String,
    #[serde(default)]
    crit: Option<serde::de::IgnoredAny>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct Claims {
    exp: Option<f64>,
    nbf: Option<f64>,
    iss: Option<String>,
    aud: Option<Audience>,
    rooms: Option<Vec<String>>,
}

impl Verifier {
    /// HS256 with `secret` (its bytes as given).
    pub fn secret(secret: &[u8], audience: Option<String>, issuer: Option<String>) -> Verifier {
        Verifier {
            alg: Alg::HS256,
            key: Key::Secret(hmac::Key::new(hmac::HMAC_SHA256, secret)),
            audience,
            issuer,
        }
    }

    /// The algorithm the key's type allows.
    pub fn public(key: PublicKey, audience: Option<String>, issuer: Option<String>) -> Verifier {
        let algorithm: &'static dyn signature::VerificationAlgorithm = match key.alg {
            Alg::RS256 => &signature::RSA_PKCS1_2048_8192_SHA256,
            Alg::ES256 => &signature::ECDSA_P256_SHA256_FIXED,
            // A secret is never a public key; keys.rs gives only the three above.
            Alg::EdDSA | Alg::HS256 => &signature::ED25519,
        };
        Verifier {
            alg: key.alg,
            key: Key::Public(signature::UnparsedPublicKey::new(algorithm, key.der)),
            audience,
            issuer,
        }
    }

    pub fn alg(&self) -> Alg {
        self.alg
    }

    /// For the start log (never the key).
    pub fn describe(&self) -> String {
        format!(
            "tokens {} (aud {}, iss {})",
            self.alg.name(),
            self.audience.as_deref().unwrap_or("none allowed"),
            self.issuer.as_deref().unwrap_or("any")
        )
    }

    /// Checks `token` at `now` (seconds since the Unix epoch).
    pub fn verify(&self, token: &str, now: f64) -> Result<Grant, TokenError> {
        const NOT_JWT: TokenError =
            TokenError::Malformed("not a JWT (three base64url parts separated by dots)");
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(NOT_JWT);
        };
        let header: Header = json(h).ok_or(TokenError::Malformed(
            "token header is not base64url-encoded JSON with an alg",
        ))?;
        if header.alg != self.alg.name() {
            return Err(TokenError::BadSignature(match self.alg {
                Alg::HS256 => "token alg is not HS256, the only one this server's key accepts",
                Alg::RS256 => "token alg is not RS256, the only one this server's key accepts",
                Alg::ES256 => "token alg is not ES256, the only one this server's key accepts",
                Alg::EdDSA => "token alg is not EdDSA, the only one this server's key accepts",
            }));
        }
        if header.crit.is_some() {
            return Err(TokenError::Malformed(
                "token header has crit: no JWS extension is supported",
            ));
        }
        let sig = b64(s).ok_or(NOT_JWT)?;
        let signed = &token.as_bytes()[..h.len() + 1 + p.len()];
        let ok = match &self.key {
            Key::Secret(k) => hmac::verify(k, signed, &sig).is_ok(),
            Key::Public(k) => k.verify(signed, &sig).is_ok(),
        };
        if !ok {
            return Err(TokenError::BadSignature(
                "token signature does not verify with this server's key",
            ));
        }
        let claims: Claims = json(p).ok_or(TokenError::Malformed(
            "token claims are not JSON with numeric exp/nbf, string iss, string or array aud, \
             array rooms",
        ))?;
        let exp = claims.exp.ok_or(TokenError::Malformed(
            "token has no exp claim: megasock accepts only tokens that expire",
        ))?;
        if now >= exp {
            return Err(TokenError::Expired);
        }
        if claims.nbf.is_some_and(|nbf| now + NBF_LEEWAY < nbf) {
            return Err(TokenError::NotYetValid);
        }
        match (&self.audience, &claims.aud) {
            (None, None) => {}
            (None, Some(_)) => {
                return Err(TokenError::Audience(
                    "token has an aud claim but the server has no --auth-audience \
                     (RFC 7519 4.1.3 requires refusing it)",
                ))
            }
            (Some(_), None) => {
                return Err(TokenError::Audience(
                    "token has no aud claim; this server requires its --auth-audience",
                ))
            }
            (Some(want), Some(aud)) => {
                let named = match aud {
                    Audience::One(a) => a == want,
                    Audience::Many(list) => list.iter().any(|a| a == want),
                };
                if !named {
                    return Err(TokenError::Audience(
                        "token aud does not name this server's --auth-audience",
                    ));
                }
            }
        }
        if let Some(want) = &self.issuer {
            if claims.iss.as_deref() != Some(want.as_str()) {
                return Err(TokenError::Issuer(
                    "token iss is not this server's --auth-issuer",
                ));
            }
        }
        Ok(Grant {
            expires: exp,
            rooms: claims.rooms,
        })
    }
}

/// base64url without padding, canonical (RFC 7515 §2).
fn b64(s: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s)
        .ok()
}

fn json<T: serde::de::DeserializeOwned>(part: &str) -> Option<T> {
    serde_json::from_slice(&b64(part)?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::access::test_signer::Signer;

    const NOW: f64 = 1_800_000_000.0;
    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn hs() -> Verifier {
        Verifier::secret(SECRET, None, None)
    }

    fn claims(extra: &str) -> String {
        format!("{{\"sub\":\"u1\",\"exp\":{}{extra}}}", NOW + 60.0)
    }

    #[test]
    fn rfc7515_a1_hs256_example_verifies() {
        // RFC 7515 appendix A.1: the key is the JWK's `k`; the token expired in 2011.
        let k = b64("AyM1SysPpbyDfgZld3umj1qzKObwVMkoqQ-EstJQLr_T-1qS0gZH75aKtMN3Yj0iPS4hcgUuTwjAzZr1Z9CAow").unwrap();
        let token = "eyJ0eXAiOiJKV1QiLA0KICJhbGciOiJIUzI1NiJ9.eyJpc3MiOiJqb2UiLA0KICJleHAiOjEzMDA4MTkzODAsDQogImh0dHA6Ly9leGFtcGxlLmNvbS9pc19yb290Ijp0cnVlfQ.dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
        let v = Verifier::secret(&k, None, Some("joe".into()));
        assert!(v.verify(token, 1_300_819_379.0).is_ok());
        assert_eq!(
            v.verify(token, 1_300_819_380.0).unwrap_err(),
            TokenError::Expired
        );
        let mut bad = token.to_string();
        bad.pop();
        bad.push('j');
        assert!(matches!(
            v.verify(&bad, 1.0),
            Err(TokenError::BadSignature(_)) | Err(TokenError::Malformed(_))
        ));
    }

    #[test]
    fn rfc8037_a4_ed25519_example_verifies() {
        // RFC 8037 appendix A.4 (the payload is not JSON claims, so only the signature passes).
        let x = b64("11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo").unwrap();
        let v = Verifier::public(
            PublicKey {
                alg: Alg::EdDSA,
                der: x,
            },
            None,
            None,
        );
        let token = "eyJhbGciOiJFZERTQSJ9.RXhhbXBsZSBvZiBFZDI1NTE5IHNpZ25pbmc.hgyY0il_MGCjP0JzlnLWG1PPOt7-09PGcvMg3AIbQR6dWbhijcNR4ki4iylGjg5BhVsPt9g7sVvpAr_MuM0KAg";
        assert!(
            matches!(v.verify(token, NOW), Err(TokenError::Malformed(m)) if m.contains("claims"))
        );
        let tampered = token.replace("RXhhbXBsZSBvZiBFZDI1NTE5", "RXhhbXBsZSBvZiBFZDI1NTE4");
        assert!(matches!(
            v.verify(&tampered, NOW),
            Err(TokenError::BadSignature(_))
        ));
    }

    #[test]
    fn every_algorithm_round_trips_and_only_its_own() {
        let keys = |f: &str| {
            std::fs::read_to_string(format!("{}/tests/keys/{f}", env!("CARGO_MANIFEST_DIR")))
                .unwrap()
        };
        let cases = [
            (Signer::hs256(SECRET), hs()),
            (
                Signer::rs256(),
                Verifier::public(
                    super::super::keys::from_pem(&keys("rs256.pub.pem")).unwrap(),
                    None,
                    None,
                ),
            ),
            (
                Signer::es256(),
                Verifier::public(
                    super::super::keys::from_pem(&keys("es256.pub.pem")).unwrap(),
                    None,
                    None,
                ),
            ),
            (
                Signer::eddsa(),
                Verifier::public(
                    super::super::keys::from_pem(&keys("ed25519.pub.pem")).unwrap(),
                    None,
                    None,
                ),
            ),
        ];
        for (signer, verifier) in &cases {
            let token = signer.token(&claims(""));
            let g = verifier
                .verify(&token, NOW)
                .unwrap_or_else(|e| panic!("{}: {e:?}", signer.alg()));
            assert_eq!(g.expires, NOW + 60.0);
            for (other, v) in &cases {
                if other.alg() != signer.alg() {
                    assert!(matches!(
                        v.verify(&token, NOW),
                        Err(TokenError::BadSignature(_))
                    ));
                }
            }
        }
        // HS256 keyed with the RSA public key (the classic confusion) is refused by alg.
        let pem = keys("rs256.pub.pem");
        let forged = Signer::hs256(pem.as_bytes()).token(&claims(""));
        assert!(matches!(
            cases[1].1.verify(&forged, NOW),
            Err(TokenError::BadSignature(_))
        ));
    }

    #[test]
    fn claims_are_checked() {
        let s = Signer::hs256(SECRET);
        let v = hs();
        let t = |c: &str| s.token(c);
        assert_eq!(
            v.verify(&t(&format!("{{\"exp\":{NOW}}}")), NOW)
                .unwrap_err(),
            TokenError::Expired
        );
        assert!(
            matches!(v.verify(&t("{\"sub\":\"x\"}"), NOW), Err(TokenError::Malformed(m)) if m.contains("exp"))
        );
        assert!(matches!(
            v.verify(&t("{\"exp\":\"soon\"}"), NOW),
            Err(TokenError::Malformed(_))
        ));
        assert!(matches!(
            v.verify(&t("[1]"), NOW),
            Err(TokenError::Malformed(_))
        ));
        let nbf = |d: f64| claims(&format!(",\"nbf\":{}", NOW + d));
        assert!(
            v.verify(&t(&nbf(NBF_LEEWAY - 1.0)), NOW).is_ok(),
            "within the leeway"
        );
        assert_eq!(
            v.verify(&t(&nbf(NBF_LEEWAY + 1.0)), NOW).unwrap_err(),
            TokenError::NotYetValid
        );
        // Audience: a string or an array naming it; required when configured, refused when not.
        let va = Verifier::secret(SECRET, Some("ws".into()), Some("idp".into()));
        let ok = |c: &str| va.verify(&t(&claims(c)), NOW);
        assert!(ok(",\"aud\":\"ws\",\"iss\":\"idp\"").is_ok());
        assert!(ok(",\"aud\":[\"api\",\"ws\"],\"iss\":\"idp\"").is_ok());
        assert!(matches!(
            ok(",\"aud\":\"api\",\"iss\":\"idp\""),
            Err(TokenError::Audience(_))
        ));
        assert!(matches!(
            ok(",\"iss\":\"idp\""),
            Err(TokenError::Audience(_))
        ));
        assert!(matches!(
            ok(",\"aud\":\"ws\",\"iss\":\"other\""),
            Err(TokenError::Issuer(_))
        ));
        assert!(matches!(ok(",\"aud\":\"ws\""), Err(TokenError::Issuer(_))));
        assert!(matches!(
            v.verify(&t(&claims(",\"aud\":\"ws\"")), NOW),
            Err(TokenError::Audience(_))
        ));
        // Header rules: another alg, "none", crit.
        let none = format!("{}.{}.", b64e("{\"alg\":\"none\"}"), b64e(&claims("")));
        assert!(matches!(
            v.verify(&none, NOW),
            Err(TokenError::BadSignature(_))
        ));
        let crit = s.sign_parts(
            "{\"alg\":\"HS256\",\"crit\":[\"b64\"],\"b64\":false}",
            &claims(""),
        );
        assert!(
            matches!(v.verify(&crit, NOW), Err(TokenError::Malformed(m)) if m.contains("crit"))
        );
        for junk in ["", "a.b", "a.b.c.d", "...", "eyJ.eyJ.x"] {
            assert!(v.verify(junk, NOW).is_err(), "{junk}");
        }
        // Padding is not base64url as JWS has it.
        let padded = format!("{}=", t(&claims("")));
        assert!(v.verify(&padded, NOW).is_err());
    }

    #[test]
    fn room_grants() {
        let s = Signer::hs256(SECRET);
        let grant = |rooms: &str| hs().verify(&s.token(&claims(rooms)), NOW).unwrap();
        let all = grant("");
        assert!(all.allows("anything"));
        let g = grant(",\"rooms\":[\"lobby\",\"chat:*\"]");
        assert!(g.allows("lobby") && g.allows("chat:1") && g.allows("chat:"));
        assert!(!g.allows("lobby2") && !g.allows("chat") && !g.allows("x:chat:1"));
        assert!(grant(",\"rooms\":[\"*\"]").allows("x"));
        assert!(!grant(",\"rooms\":[]").allows("lobby"));
        assert!(hs()
            .verify(&s.token(&claims(",\"rooms\":\"lobby\"")), NOW)
            .is_err());
    }

    fn b64e(s: &str) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
    }
}
