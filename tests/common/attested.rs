// Signs documents as IMDS signs attested documents (PKCS#7, content inside, SHA-256), with the
// test chains in `tests/fixtures/attestation`, using the openssl command line: an implementation
// independent of the healer's verifier. Shared by `src/domain/attestation.rs`'s tests and `tests/agent.rs`.

use base64::Engine;

pub const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/attestation");

/// `chain` is `trusted` (stands in for the platform) or `rogue` (a look-alike).
pub fn sign_document(chain: &str, content: &str) -> String {
    let dir = std::env::temp_dir().join(format!("imds-doc-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).expect("a scratch directory");
    std::fs::write(dir.join("doc.json"), content).expect("write the document");
    let out = std::process::Command::new("openssl")
        .args([
            "cms",
            "-sign",
            "-nodetach",
            "-binary",
            "-outform",
            "DER",
            "-md",
            "sha256",
        ])
        .arg("-signer")
        .arg(format!("{FIXTURES}/{chain}-leaf.pem"))
        .arg("-inkey")
        .arg(format!("{FIXTURES}/{chain}-leaf.key"))
        .arg("-in")
        .arg(dir.join("doc.json"))
        .output()
        .expect("the openssl command line signs the test documents");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    base64::engine::general_purpose::STANDARD.encode(out.stdout)
}
