//! Public keys for `--auth-jwt-public-key`: a PEM file read once at start, whose key type
//! fixes the one signature algorithm accepted (RSA -> RS256, P-256 -> ES256, Ed25519 ->
//! EdDSA). Only the DER needed to find the key is parsed here (SubjectPublicKeyInfo, RFC
//! 5280 §4.1.2.7, and PKCS#1 `RSA PUBLIC KEY`); `ring` checks the key itself when it verifies.

use base64::Engine as _;

use super::jwt::Alg;

/// A public key in the form `ring` verifies with, and the algorithm its type allows.
#[derive(Clone)]
pub struct PublicKey {
    pub alg: Alg,
    /// RS256: the PKCS#1 `RSAPublicKey` DER; ES256: the uncompressed point (65 bytes);
    /// EdDSA: the 32-byte key.
    pub der: Vec<u8>,
}

// Object identifiers, DER-encoded with their tag and length.
const OID_RSA: &[u8] = &[
    0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01,
];
const OID_EC: &[u8] = &[0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
const OID_P256: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const OID_ED25519: &[u8] = &[0x06, 0x03, 0x2b, 0x65, 0x70];

const HOW: &str = "export the public key with `openssl pkey -in KEY.pem -pubout`";

/// Reads a PEM public key. Errors say what the file held and how to get a usable key.
pub fn from_pem(text: &str) -> Result<PublicKey, String> {
    let (label, der) = pem(text)?;
    match label.as_str() {
        "PUBLIC KEY" => from_spki(&der),
        "RSA PUBLIC KEY" => rsa(der),
        l if l.contains("PRIVATE KEY") => Err(format!(
            "the file holds a private key ({l}); megasock needs only the public key: {HOW}"
        )),
        "CERTIFICATE" => Err("the file holds a certificate; give its public key instead \
             (`openssl x509 -in CERT.pem -pubkey -noout`)"
            .into()),
        l => Err(format!("unexpected PEM block `{l}`: {HOW}")),
    }
}

/// The first PEM block: its label and its decoded bytes.
fn pem(text: &str) -> Result<(String, Vec<u8>), String> {
    let start = text
        .find("-----BEGIN ")
        .ok_or_else(|| format!("no PEM block (-----BEGIN ...) found: {HOW}"))?;
    let rest = &text[start + 11..];
    let label_end = rest.find("-----").ok_or("malformed PEM header line")?;
    let label = rest[..label_end].to_string();
    let body = &rest[label_end + 5..];
    let end = body
        .find(&format!("-----END {label}-----"))
        .ok_or_else(|| format!("PEM block `{label}` has no END line"))?;
    let b64: String = body[..end]
        .chars()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|e| format!("PEM block `{label}` is not valid base64: {e}"))?;
    Ok((label, der))
}

/// SubjectPublicKeyInfo ::= SEQUENCE { algorithm AlgorithmIdentifier, subjectPublicKey BIT STRING }
fn from_spki(der: &[u8]) -> Result<PublicKey, String> {
    const BAD: &str = "PUBLIC KEY block is not a DER SubjectPublicKeyInfo";
    let (spki, _) = tlv(der, 0x30).ok_or(BAD)?;
    let (alg_id, rest) = tlv(spki, 0x30).ok_or(BAD)?;
    let (bits, _) = tlv(rest, 0x03).ok_or(BAD)?;
    // A BIT STRING starts with its count of unused bits; keys use whole bytes.
    let key = match bits.split_first() {
        Some((0, key)) => key.to_vec(),
        _ => return Err(BAD.into()),
    };
    if alg_id.starts_with(OID_RSA) {
        rsa(key)
    } else if alg_id.starts_with(OID_EC) {
        if &alg_id[OID_EC.len()..] != OID_P256 {
            return Err(
                "EC key on a curve other than P-256: only ES256 (P-256) is supported".into(),
            );
        }
        if key.len() != 65 || key[0] != 4 {
            return Err("P-256 key is not an uncompressed point".into());
        }
        Ok(PublicKey {
            alg: Alg::ES256,
            der: key,
        })
    } else if alg_id == OID_ED25519 {
        if key.len() != 32 {
            return Err("Ed25519 key is not 32 bytes".into());
        }
        Ok(PublicKey {
            alg: Alg::EdDSA,
            der: key,
        })
    } else {
        Err("unsupported key type: use an RSA (RS256), P-256 (ES256) or Ed25519 (EdDSA) key".into())
    }
}

/// RSAPublicKey ::= SEQUENCE { modulus INTEGER, publicExponent INTEGER }; ring verifies
/// RS256 with 2048 to 8192-bit moduli, so a smaller key is refused here, at start.
fn rsa(der: Vec<u8>) -> Result<PublicKey, String> {
    const BAD: &str = "RSA key is not a DER RSAPublicKey";
    let (seq, _) = tlv(&der, 0x30).ok_or(BAD)?;
    let (n, rest) = tlv(seq, 0x02).ok_or(BAD)?;
    tlv(rest, 0x02).ok_or(BAD)?;
    let n = match n.split_first() {
        Some((0, n)) => n, // a leading zero keeps the INTEGER positive
        _ => n,
    };
    let bits = n.len() * 8 - n.first().map_or(8, |b| b.leading_zeros() as usize);
    if !(2048..=8192).contains(&bits) {
        return Err(format!(
            "RSA key of {bits} bits: RS256 needs 2048 to 8192 bits"
        ));
    }
    Ok(PublicKey {
        alg: Alg::RS256,
        der,
    })
}

/// One DER element with tag `tag` at the start of `der`: its contents and what follows it.
fn tlv(der: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (&t, rest) = der.split_first()?;
    if t != tag {
        return None;
    }
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n].iter().fold(0usize, |a, &b| a << 8 | b as usize);
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| rest.split_at(len))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ED: &str = "-----BEGIN PUBLIC KEY-----\n\
        MCowBQYDK2VwAyEA5NdYLlpSjKt6wAxt80z6973w5RAoqvyujtWtOTrfDKM=\n-----END PUBLIC KEY-----\n";
    const EC: &str = "-----BEGIN PUBLIC KEY-----\n\
        MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE3CGyVMrOBuPMm1xOpwA0iNKHKrcr\n\
        5d1uVNcJsE3D0/bxAiisl+IrlODgRZjJF6LvRdS64Y7tXpavJ3NqITHDqw==\n-----END PUBLIC KEY-----\n";

    #[test]
    fn key_type_decides_the_algorithm() {
        let k = from_pem(ED).unwrap();
        assert_eq!((k.alg, k.der.len()), (Alg::EdDSA, 32));
        let k = from_pem(EC).unwrap();
        assert_eq!((k.alg, k.der.len()), (Alg::ES256, 65));
        let rsa = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/keys/rs256.pub.pem"
        ))
        .unwrap();
        assert_eq!(from_pem(&rsa).unwrap().alg, Alg::RS256);
    }

    #[test]
    fn errors_say_what_to_do() {
        let e = |t: &str| from_pem(t).err().unwrap();
        assert!(e("hello").contains("openssl pkey"));
        assert!(
            e("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----").contains("-pubout")
        );
        assert!(e("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----").contains("x509"));
        assert!(e("-----BEGIN PUBLIC KEY-----\n!!\n-----END PUBLIC KEY-----").contains("base64"));
        assert!(e("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----").contains("DER"));
        // A P-384 key (openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-384).
        let p384 = "-----BEGIN PUBLIC KEY-----\n\
            MHYwEAYHKoZIzj0CAQYFK4EEACIDYgAEaO4laughVhQkUSWuZIQr/Zx3Ckaac9cW\n\
            wu8ALbwT3IbL46IbxZY6Q/AWZ6KBA1vDIIrm13uAKxp7Nj+seRW2xckLKW2TUtLU\n\
            plAMjlZw2FLuVrte8uGzehkTSvdRDDIx\n-----END PUBLIC KEY-----";
        assert!(e(p384).contains("P-256"), "{}", e(p384));
        let small = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/keys/rsa1024.pub.pem"
        ))
        .unwrap();
        assert!(e(&small).contains("1024 bits"), "{}", e(&small));
    }
}
