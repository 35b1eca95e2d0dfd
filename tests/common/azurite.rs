//! Starts a private Azurite table service, installing the pinned version first if needed.
//! Shared by the tests and the demo (which includes this file by path).

use std::fs::File;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const DEV_ACCOUNT: &str = "devstoreaccount1";
pub const DEV_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

pub struct Azurite {
    child: Child,
    pub port: u16,
    workspace: PathBuf,
}

fn azurite_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("azurite")
}

/// Installs the pinned Azurite into `tests/azurite/node_modules` once, whichever test gets here
/// first; the others wait on the lock file.
pub fn ensure_installed() -> PathBuf {
    ensure_installed_quietly(false)
}

/// As [`ensure_installed`]; `announce` prints a line before a first-time install.
pub fn ensure_installed_quietly(announce: bool) -> PathBuf {
    let dir = azurite_dir();
    let bin = dir
        .join("node_modules")
        .join("azurite")
        .join("dist")
        .join("src")
        .join("table")
        .join("main.js");
    if bin.exists() {
        return bin;
    }
    let lock = File::create(std::env::temp_dir().join("vmss-healer-azurite-install.lock"))
        .expect("create the install lock file");
    lock.lock().expect("take the install lock");
    if !bin.exists() {
        if announce {
            eprintln!(
                "installing the pinned Azurite into {} (first run only)…",
                dir.display()
            );
        }
        let status = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(&dir)
            .status()
            .expect("run npm (Node.js 20 and npm are needed to install Azurite)");
        assert!(status.success(), "npm ci in {} failed", dir.display());
    }
    lock.unlock().ok();
    assert!(
        bin.exists(),
        "Azurite installed but {} is missing",
        bin.display()
    );
    bin
}

/// Reserves a free loopback port (Azurite 3.35 misreports port 0, so a real one is passed).
///
/// Never the same port twice in one process: the port is free when it is picked, but Azurite
/// binds it a second later, and meanwhile a test running beside it could be handed the same
/// port and bind its simulator there — Azurite then fails to start, and the handler's table
/// requests reach the simulator (seen in CI: a 401 from `Microsoft.Compute` to a create-table).
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = match GIVEN.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    };
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("bind a free port");
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// Waits until something accepts TCP connections on the port, or panics after `limit`.
pub fn wait_for_port(port: u16, limit: Duration, what: &str, child: &mut Child) {
    let deadline = Instant::now() + limit;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited with {status} before listening on port {port}");
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not listen on port {port} within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

impl Azurite {
    pub fn start() -> Self {
        let main_js = ensure_installed();
        let port = free_port();
        let workspace =
            std::env::temp_dir().join(format!("vmss-healer-azurite-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&workspace).expect("create Azurite's working directory");
        let mut child = Command::new("node")
            .arg(&main_js)
            .args(["--tableHost", "127.0.0.1", "--tablePort", &port.to_string()])
            .args([
                "--inMemoryPersistence",
                "--disableTelemetry",
                "--skipApiVersionCheck",
                "--silent",
            ])
            // In-memory persistence refuses --location; the cwd keeps any stray files out of the repo.
            .current_dir(&workspace)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start Azurite with node");
        wait_for_port(port, Duration::from_secs(30), "Azurite", &mut child);
        Azurite {
            child,
            port,
            workspace,
        }
    }

    pub fn table_endpoint(&self) -> String {
        format!("http://127.0.0.1:{}/{DEV_ACCOUNT}", self.port)
    }

    /// An explicit account + key connection string, as a real deployment would have.
    pub fn connection_string(&self) -> String {
        format!(
            "DefaultEndpointsProtocol=http;AccountName={DEV_ACCOUNT};AccountKey={DEV_KEY};TableEndpoint={};",
            self.table_endpoint()
        )
    }

    /// Stops the emulator now (a test of "storage down").
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Azurite {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.workspace);
    }
}
