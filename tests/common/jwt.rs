//! Signing JWTs for the tests and the token-cost example (megasock itself only verifies):
//! HS256, RS256, ES256 and EdDSA with `ring` and the private keys in `tests/keys/` (made with
//! openssl; see tests/keys/README.md). Included by path where needed, so it stays free of the
//! rest of the test helpers.

use base64::Engine as _;
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, Ed25519KeyPair, RsaKeyPair};

pub enum Signer {
    Hs256(ring::hmac::Key),
    Rs256(RsaKeyPair),
    Es256(EcdsaKeyPair),
    EdDsa(Ed25519KeyPair),
}

/// `tests/keys/NAME`.
pub fn key_path(name: &str) -> String {
    format!("{}/tests/keys/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// The DER inside a PEM file's first block.
fn pem_der(name: &str) -> Vec<u8> {
    let text = std::fs::read_to_string(key_path(name)).unwrap();
    let b64: String = text.lines().filter(|l| !l.starts_with("-----")).collect();
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap()
}

pub fn b64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Seconds since the Unix epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

impl Signer {
    pub fn hs256(secret: &[u8]) -> Signer {
        Signer::Hs256(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret))
    }
    pub fn rs256() -> Signer {
        Signer::Rs256(RsaKeyPair::from_pkcs8(&pem_der("rs256.pem")).unwrap())
    }
    pub fn es256() -> Signer {
        let der = pem_der("es256.pem");
        let rng = SystemRandom::new();
        Signer::Es256(
            EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &der, &rng)
                .unwrap(),
        )
    }
    pub fn eddsa() -> Signer {
        Signer::EdDsa(Ed25519KeyPair::from_pkcs8_maybe_unchecked(&pem_der("ed25519.pem")).unwrap())
    }

    pub fn alg(&self) -> &'static str {
        match self {
            Signer::Hs256(_) => "HS256",
            Signer::Rs256(_) => "RS256",
            Signer::Es256(_) => "ES256",
            Signer::EdDsa(_) => "EdDSA",
        }
    }

    /// A token with the usual header and these claims (JSON text).
    pub fn token(&self, claims: &str) -> String {
        let header = format!("{{\"alg\":\"{}\",\"typ\":\"JWT\"}}", self.alg());
        self.sign_parts(&header, claims)
    }

    /// A token with this header and these claims (both JSON text), signed with this key.
    pub fn sign_parts(&self, header: &str, claims: &str) -> String {
        let input = format!(
            "{}.{}",
            b64url(header.as_bytes()),
            b64url(claims.as_bytes())
        );
        let rng = SystemRandom::new();
        let sig = match self {
            Signer::Hs256(k) => ring::hmac::sign(k, input.as_bytes()).as_ref().to_vec(),
            Signer::Rs256(k) => {
                let mut sig = vec![0; k.public().modulus_len()];
                k.sign(
                    &signature::RSA_PKCS1_SHA256,
                    &rng,
                    input.as_bytes(),
                    &mut sig,
                )
                .unwrap();
                sig
            }
            Signer::Es256(k) => k.sign(&rng, input.as_bytes()).unwrap().as_ref().to_vec(),
            Signer::EdDsa(k) => k.sign(input.as_bytes()).as_ref().to_vec(),
        };
        format!("{input}.{}", b64url(&sig))
    }
}
