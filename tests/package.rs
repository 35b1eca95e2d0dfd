//! The deployable folder `infra/package.sh` stages: what `func azure functionapp publish` and
//! `func start` are run from. Builds the release binary the way a deployment does (a few minutes
//! on first run, cached after).

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The ELF facts that decide whether a binary runs without shared libraries: an interpreter
/// (`PT_INTERP`) or any `DT_NEEDED` entry means it does not.
fn dynamic_dependencies(elf: &[u8]) -> Result<Vec<String>, String> {
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]) as usize;
    let u32_at = |o: usize| u32::from_le_bytes(elf[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_le_bytes(elf[o..o + 8].try_into().unwrap()) as usize;
    if elf.len() < 64 || &elf[..4] != b"\x7fELF" || elf[4] != 2 || elf[5] != 1 {
        return Err("not a little-endian ELF64 file".into());
    }
    if u16_at(18) != 62 {
        return Err(format!("machine {} is not x86-64", u16_at(18)));
    }
    let (phoff, phentsize, phnum) = (u64_at(32), u16_at(54), u16_at(56));
    let mut needed = Vec::new();
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        match u32_at(ph) {
            3 => needed.push("an ELF interpreter (PT_INTERP)".to_string()),
            2 => {
                // PT_DYNAMIC: a static-pie binary has one, but needs no library.
                let (offset, size) = (u64_at(ph + 8), u64_at(ph + 32));
                for entry in elf[offset..offset + size].chunks_exact(16) {
                    let tag = u64::from_le_bytes(entry[..8].try_into().unwrap());
                    if tag == 1 {
                        needed.push("a shared library (DT_NEEDED)".to_string());
                    }
                }
            }
            _ => {}
        }
    }
    Ok(needed)
}

#[test]
fn the_staged_folder_is_what_the_functions_host_runs() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = std::env::temp_dir().join(format!("vmss-publish-{}", uuid::Uuid::new_v4()));
    let status = Command::new("bash")
        .arg(root.join("infra/package.sh"))
        .arg("--out")
        .arg(&out)
        .status()
        .expect("run infra/package.sh");
    assert!(status.success(), "infra/package.sh failed");

    assert!(out.join("host.json").is_file());
    // `func azure functionapp publish` needs the worker runtime from the folder it runs in.
    let local: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("local.settings.json")).unwrap())
            .unwrap();
    assert_eq!(
        local["Values"]["FUNCTIONS_WORKER_RUNTIME"], "custom",
        "{local}"
    );
    let ignore = std::fs::read_to_string(out.join(".funcignore")).unwrap();
    assert!(
        ignore.lines().any(|l| l == "local.settings.json"),
        "{ignore}"
    );

    use std::os::unix::fs::PermissionsExt;
    let handler = out.join("handler");
    let mode = std::fs::metadata(&handler).unwrap().permissions().mode();
    assert_eq!(mode & 0o111, 0o111, "handler is executable");
    let elf = std::fs::read(&handler).unwrap();
    assert_eq!(
        dynamic_dependencies(&elf),
        Ok(vec![]),
        "the handler must be statically linked"
    );
    // The parser tells a dynamic binary apart (bash is one on every machine this runs on).
    let bash = std::fs::read("/bin/bash").unwrap();
    assert!(!dynamic_dependencies(&bash).unwrap().is_empty());

    // Every function of the repository is staged at the folder's root, as the host expects…
    let functions: Vec<String> = std::fs::read_dir(root.join("functions"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(functions.len(), 3, "{functions:?}");
    for name in &functions {
        let staged = std::fs::read(out.join(name).join("function.json")).unwrap();
        let source =
            std::fs::read(root.join("functions").join(name).join("function.json")).unwrap();
        assert_eq!(staged, source, "{name}/function.json");
    }

    // …and the staged binary routes each of them (a malformed invocation is a 400 from its route,
    // an unknown function a 404).
    let port = common::azurite::free_port();
    let mut child = Command::new(&handler)
        .env_clear()
        .env("FUNCTIONS_CUSTOMHANDLER_PORT", port.to_string())
        .env("HEALER_SCALE_SETS", common::scale_set_id("web"))
        .env(
            "HEALER_STORAGE",
            "UseDevelopmentStorage=true;DevelopmentStorageProxyUri=http://127.0.0.1:9",
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the staged handler");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let result = runtime.block_on(async {
        let http = reqwest::Client::new();
        let base = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        while http.get(&base).send().await.is_err() {
            assert!(
                Instant::now() < deadline,
                "the staged handler did not start"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut answers = Vec::new();
        for name in functions
            .iter()
            .map(String::as_str)
            .chain(["not-a-function"])
        {
            let response = http
                .post(format!("{base}/{name}"))
                .body("not json")
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            let answer: serde_json::Value = response.json().await.unwrap_or_default();
            let reason = answer["ReturnValue"]["reason"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            answers.push((name.to_string(), status, reason));
        }
        answers
    });
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&out);
    // A bad body is answered 200 with its reason (design §1: a retry cannot mend it); what tells a
    // routed function from an unknown one is the reason.
    for (name, status, reason) in result {
        let want = if name == "not-a-function" {
            "unknown_function"
        } else {
            "bad_invocation"
        };
        assert_eq!((status, reason.as_str()), (200, want), "POST /{name}");
    }
}
