//! IMDS attested documents: proof that a heartbeat comes from the VM it names, which holds even
//! against a VM that learned another's vmId. The agent asks its own IMDS for the document with the
//! heartbeat's time as the nonce; the platform signs it (PKCS#7, signer `metadata.azure.com`); only
//! that VM's IMDS can produce one for its vmId. Pure: bytes, trust anchors and the clock in.

use base64::Engine;
use cms::cert::CertificateChoices;
use cms::content_info::ContentInfo;
use cms::signed_data::{SignedData, SignerIdentifier};
use der::asn1::OctetString;
use der::oid::ObjectIdentifier;
use der::{Decode, Encode};
use rsa::pkcs1v15::{Signature, VerifyingKey};
use rsa::pkcs8::DecodePublicKey;
use rsa::signature::Verifier;
use rsa::RsaPublicKey;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use x509_cert::Certificate;

const SIGNED_DATA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.7.2");
const SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.16.840.1.101.3.4.2.1");
const RSA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");
const SHA256_WITH_RSA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.11");
const MESSAGE_DIGEST: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.9.4");
/// The subject IMDS signs attested documents as.
pub const SIGNER: &str = "metadata.azure.com";

/// The certificates a signer's certificate must be issued by: the issuing CAs of
/// `metadata.azure.com` (`HEALER_ATTESTATION_CA`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trust {
    anchors: Vec<Certificate>,
}

impl Trust {
    /// Every `CERTIFICATE` block of a PEM bundle.
    pub fn from_pem(pem: &str) -> Result<Self, String> {
        let mut anchors = Vec::new();
        let mut rest = pem;
        while let Some(start) = rest.find("-----BEGIN CERTIFICATE-----") {
            let body = &rest[start + "-----BEGIN CERTIFICATE-----".len()..];
            let end = body
                .find("-----END CERTIFICATE-----")
                .ok_or("a certificate block has no END line")?;
            let b64: String = body[..end].split_whitespace().collect();
            let der = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|e| format!("a certificate is not base64: {e}"))?;
            anchors.push(
                Certificate::from_der(&der)
                    .map_err(|e| format!("not an X.509 certificate: {e}"))?,
            );
            rest = &body[end..];
        }
        if anchors.is_empty() {
            return Err("no PEM certificate found".into());
        }
        Ok(Trust { anchors })
    }

    pub fn len(&self) -> usize {
        self.anchors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.anchors.is_empty()
    }
}

/// What the platform attests (the fields of IMDS's signed JSON the healer uses).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Document {
    pub vm_id: String,
    pub nonce: String,
    pub subscription_id: String,
    pub expires_on: OffsetDateTime,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Signed {
    vm_id: String,
    #[serde(default)]
    nonce: String,
    #[serde(default)]
    subscription_id: String,
    time_stamp: Stamps,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Stamps {
    expires_on: String,
}

/// Checks the signature, the signer and its issuer, and returns what the document says.
pub fn open(signature_b64: &str, trust: &Trust, now: OffsetDateTime) -> Result<Document, String> {
    let compact: String = signature_b64.split_whitespace().collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(compact)
        .map_err(|e| format!("not base64: {e}"))?;
    let info = ContentInfo::from_der(&der).map_err(|e| format!("not PKCS#7: {e}"))?;
    if info.content_type != SIGNED_DATA {
        return Err(format!(
            "PKCS#7 content {} is not signed data",
            info.content_type
        ));
    }
    let signed: SignedData = info
        .content
        .decode_as()
        .map_err(|e| format!("not PKCS#7 signed data: {e}"))?;
    let content = signed
        .encap_content_info
        .econtent
        .as_ref()
        .ok_or("the document has no content")?
        .decode_as::<OctetString>()
        .map_err(|e| format!("content is not an octet string: {e}"))?
        .into_bytes();
    let signer = signed
        .signer_infos
        .0
        .iter()
        .next()
        .ok_or("the document has no signer")?;
    let SignerIdentifier::IssuerAndSerialNumber(sid) = &signer.sid else {
        return Err("signer identified by key id: not supported".into());
    };
    let certificate = signed
        .certificates
        .iter()
        .flat_map(|set| set.0.iter())
        .find_map(|c| match c {
            CertificateChoices::Certificate(c)
                if c.tbs_certificate.issuer == sid.issuer
                    && c.tbs_certificate.serial_number == sid.serial_number =>
            {
                Some(c)
            }
            _ => None,
        })
        .ok_or("the signer's certificate is not in the document")?;
    if signer.digest_alg.oid != SHA256 {
        return Err(format!("digest {} not supported", signer.digest_alg.oid));
    }
    if ![RSA, SHA256_WITH_RSA].contains(&signer.signature_algorithm.oid) {
        return Err(format!(
            "signature algorithm {} not supported",
            signer.signature_algorithm.oid
        ));
    }
    // With signed attributes, the signature covers them (DER, as a SET) and they carry the
    // content's digest.
    let covered = match &signer.signed_attrs {
        Some(attrs) => {
            let digest = attrs
                .iter()
                .find(|a| a.oid == MESSAGE_DIGEST)
                .and_then(|a| a.values.iter().next())
                .ok_or("signed attributes lack the message digest")?
                .decode_as::<OctetString>()
                .map_err(|e| format!("bad message digest: {e}"))?;
            if digest.as_bytes() != Sha256::digest(&content).as_slice() {
                return Err("the content does not match its signed digest".into());
            }
            attrs.to_der().map_err(|e| e.to_string())?
        }
        None => content.clone(),
    };
    let key = public_key(certificate)?;
    let signature = Signature::try_from(signer.signature.as_bytes())
        .map_err(|e| format!("bad signature: {e}"))?;
    VerifyingKey::<Sha256>::new(key)
        .verify(&covered, &signature)
        .map_err(|_| "the signature does not verify".to_string())?;

    check_certificate(certificate, trust, now)?;

    let body: Signed = serde_json::from_slice(&content)
        .map_err(|e| format!("the signed content is not IMDS's JSON: {e}"))?;
    Ok(Document {
        vm_id: body.vm_id,
        nonce: body.nonce,
        subscription_id: body.subscription_id,
        expires_on: imds_time(&body.time_stamp.expires_on)?,
    })
}

fn public_key(certificate: &Certificate) -> Result<RsaPublicKey, String> {
    let spki = certificate
        .tbs_certificate
        .subject_public_key_info
        .to_der()
        .map_err(|e| e.to_string())?;
    RsaPublicKey::from_public_key_der(&spki).map_err(|e| format!("not an RSA key: {e}"))
}

/// The signer must be `metadata.azure.com`, valid now, and issued by a trust anchor.
fn check_certificate(leaf: &Certificate, trust: &Trust, now: OffsetDateTime) -> Result<(), String> {
    let subject = leaf.tbs_certificate.subject.to_string();
    if !subject
        .split(',')
        .any(|part| part.trim().eq_ignore_ascii_case(&format!("CN={SIGNER}")))
    {
        return Err(format!("signed by `{subject}`, not {SIGNER}"));
    }
    let validity = &leaf.tbs_certificate.validity;
    let unix = |t: x509_cert::time::Time| t.to_unix_duration().as_secs() as i64;
    let now_s = now.unix_timestamp();
    if now_s < unix(validity.not_before) || now_s > unix(validity.not_after) {
        return Err("the signer's certificate is not valid now".into());
    }
    if leaf.signature_algorithm.oid != SHA256_WITH_RSA {
        return Err(format!(
            "the signer's certificate is signed with {}, not sha256WithRSA",
            leaf.signature_algorithm.oid
        ));
    }
    let tbs = leaf.tbs_certificate.to_der().map_err(|e| e.to_string())?;
    let signature = Signature::try_from(leaf.signature.raw_bytes())
        .map_err(|e| format!("bad certificate signature: {e}"))?;
    let issued = trust
        .anchors
        .iter()
        .filter(|a| a.tbs_certificate.subject == leaf.tbs_certificate.issuer)
        .any(|anchor| {
            public_key(anchor).is_ok_and(|key| {
                VerifyingKey::<Sha256>::new(key)
                    .verify(&tbs, &signature)
                    .is_ok()
            })
        });
    if issued {
        Ok(())
    } else {
        Err(format!(
            "the signer's certificate is not issued by a trusted CA (issuer `{}`)",
            leaf.tbs_certificate.issuer
        ))
    }
}

/// IMDS writes times as `MM/dd/yy HH:mm:ss -0000`.
fn imds_time(text: &str) -> Result<OffsetDateTime, String> {
    let bad = || format!("`{text}` is not an IMDS time (MM/dd/yy HH:mm:ss -0000)");
    let mut parts = text.split_whitespace();
    let (date, clock, offset) = (
        parts.next().ok_or_else(bad)?,
        parts.next().ok_or_else(bad)?,
        parts.next().unwrap_or("-0000"),
    );
    let num = |s: &str| s.parse::<u8>().map_err(|_| bad());
    let d: Vec<&str> = date.split('/').collect();
    let c: Vec<&str> = clock.split(':').collect();
    if d.len() != 3 || c.len() != 3 || offset.len() != 5 {
        return Err(bad());
    }
    let month = time::Month::try_from(num(d[0])?).map_err(|_| bad())?;
    let date = time::Date::from_calendar_date(2000 + i32::from(num(d[2])?), month, num(d[1])?)
        .map_err(|_| bad())?;
    let clock = time::Time::from_hms(num(c[0])?, num(c[1])?, num(c[2])?).map_err(|_| bad())?;
    let sign: i8 = if offset.starts_with('-') { -1 } else { 1 };
    let hours = offset[1..3].parse::<i8>().map_err(|_| bad())?;
    let minutes = offset[3..5].parse::<i8>().map_err(|_| bad())?;
    let offset = time::UtcOffset::from_hms(sign * hours, sign * minutes, 0).map_err(|_| bad())?;
    Ok(time::PrimitiveDateTime::new(date, clock).assume_offset(offset))
}

/// The nonce an agent asks for: the reading's time in whole seconds, so a document vouches for
/// one heartbeat and cannot be replayed for a later one.
pub fn nonce_for(event_time: OffsetDateTime) -> String {
    event_time.unix_timestamp().to_string()
}

/// Checks the attested document a heartbeat carries, once its vmId matched the mirror: a valid one
/// raises its proof to [`crate::heartbeat::Proof::Attested`]; an invalid one refuses the
/// heartbeat (only a forger sends a document that does not hold). Without trust anchors the
/// document cannot be checked and is ignored.
pub fn prove(
    hb: &mut crate::heartbeat::Heartbeat,
    mirrored_vm_id: Option<&str>,
    trust: Option<&Trust>,
    now: OffsetDateTime,
) -> Result<(), crate::heartbeat::Rejection> {
    let (Some(raw), Some(trust)) = (hb.attestation.take(), trust) else {
        return Ok(());
    };
    let refused = |why: String| crate::heartbeat::Rejection::AttestationRefused {
        instance: hb.target.to_string(),
        why,
    };
    let doc = open(&raw, trust, now).map_err(refused)?;
    vouches(&doc, mirrored_vm_id.unwrap_or_default(), hb.event_time, now).map_err(refused)?;
    hb.attested = true;
    Ok(())
}

/// Whether an opened document vouches for this heartbeat of this instance.
pub fn vouches(
    doc: &Document,
    mirrored_vm_id: &str,
    event_time: OffsetDateTime,
    now: OffsetDateTime,
) -> Result<(), String> {
    if !doc.vm_id.eq_ignore_ascii_case(mirrored_vm_id) {
        return Err(format!(
            "attested vmId `{}` is not the instance's `{mirrored_vm_id}`",
            doc.vm_id
        ));
    }
    if doc.nonce != nonce_for(event_time) {
        return Err(format!(
            "attested nonce `{}` does not bind this heartbeat (expected `{}`)",
            doc.nonce,
            nonce_for(event_time)
        ));
    }
    if doc.expires_on < now {
        return Err(format!("the document expired at {}", doc.expires_on));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    // The same signer as tests/agent.rs (a file of tests/, not of the library).
    mod attested {
        include!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/common/attested.rs"
        ));
    }
    use attested::{sign_document, FIXTURES};

    fn fixture(name: &str) -> String {
        std::fs::read_to_string(format!("{FIXTURES}/{name}")).unwrap()
    }

    const NOW: OffsetDateTime = datetime!(2026-11-23 10:00 UTC);

    fn document(vm_id: &str, nonce: &str) -> String {
        format!(
            r#"{{"licenseType":"","nonce":"{nonce}","plan":{{"name":"","product":"","publisher":""}},"sku":"22_04-lts-gen2","subscriptionId":"00000000-0000-0000-0000-000000000001","timeStamp":{{"createdOn":"11/23/26 09:00:00 -0000","expiresOn":"11/23/26 15:00:00 -0000"}},"vmId":"{vm_id}"}}"#
        )
    }

    #[test]
    fn a_platform_signed_document_opens_and_vouches_for_one_heartbeat() {
        let signed = sign_document("trusted", &document("vm-1", "1795428000"));
        let trust = Trust::from_pem(&fixture("trusted-ca.pem")).unwrap();
        let doc = open(&signed, &trust, NOW).unwrap();
        assert_eq!(doc.vm_id, "vm-1");
        assert_eq!(doc.expires_on, datetime!(2026-11-23 15:00 UTC));
        let event_time = OffsetDateTime::from_unix_timestamp(1_795_428_000).unwrap();
        assert_eq!(vouches(&doc, "VM-1", event_time, NOW), Ok(()));
        // Another instance, another heartbeat, or too late: no.
        assert!(vouches(&doc, "vm-2", event_time, NOW).is_err());
        assert!(vouches(&doc, "vm-1", event_time + time::Duration::seconds(1), NOW).is_err());
        assert!(vouches(&doc, "vm-1", event_time, NOW + time::Duration::hours(6)).is_err());

        // A look-alike chain, a trust bundle without its CA, a tampered document: refused.
        let rogue = sign_document("rogue", &document("vm-1", "1795428000"));
        let err = open(&rogue, &trust, NOW).unwrap_err();
        assert!(err.contains("not issued by a trusted CA"), "{err}");
        let mut der = base64::engine::general_purpose::STANDARD
            .decode(&signed)
            .unwrap();
        let at = der
            .windows(4)
            .position(|w| w == b"vm-1")
            .expect("the content is in the DER");
        der[at + 3] = b'2';
        let tampered = base64::engine::general_purpose::STANDARD.encode(der);
        let err = open(&tampered, &trust, NOW).unwrap_err();
        assert!(err.contains("does not match its signed digest"), "{err}");
        assert!(open("not base64!", &trust, NOW).is_err());
        // The certificates are valid for ten years from their creation, not from 1990.
        assert!(open(&signed, &trust, datetime!(1990-01-01 0:00 UTC))
            .unwrap_err()
            .contains("not valid now"));
    }

    #[test]
    fn trust_bundles_and_imds_times_parse() {
        let bundle = format!("{}\n{}", fixture("trusted-ca.pem"), fixture("rogue-ca.pem"));
        assert_eq!(Trust::from_pem(&bundle).unwrap().len(), 2);
        assert!(Trust::from_pem("nothing here").is_err());
        assert_eq!(
            imds_time("11/10/20 18:19:21 -0000"),
            Ok(datetime!(2020-11-10 18:19:21 UTC))
        );
        assert!(imds_time("2020-11-10T18:19:21Z").is_err());
    }
}
